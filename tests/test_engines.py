"""GraphedSupervisedTrainer: same updates as MONAI's SupervisedTrainer, CUDA graph where possible."""

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler

from fias_monai.engines import GraphedSupervisedTrainer, graph_unsupported_reason
from fias_monai.handlers import TimeBudgetHandler, WeightAverageHandler
from fias_monai.losses import FeatureMixingLoss


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 3, 1))


def _data(n=6, batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(batch, 1, size, size, generator=g),
             "label": torch.randint(0, 3, (batch, 1, size, size), generator=g)} for _ in range(n)]


def _train(cls, device, epochs=2, schedule=False, handlers=(), **kwargs):
    net = _net().to(device)
    cuda = device.type == "cuda"
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, fused=cuda, capturable=cuda)
    handlers = [h(net) for h in handlers]
    if schedule:
        handlers.append(LrScheduleHandler(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
                                          epoch_level=False, print_lr=False))
    trainer = cls(device=device, max_epochs=epochs, train_data_loader=_data(), network=net, optimizer=opt,
                  loss_function=FeatureMixingLoss(), amp=cuda, amp_kwargs={"dtype": torch.bfloat16},
                  train_handlers=handlers, **kwargs)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    trainer.run()
    return net, losses, trainer


def test_cpu_falls_back_to_the_eager_step_with_identical_updates():
    ref, ref_losses, _ = _train(SupervisedTrainer, torch.device("cpu"))
    net, losses, trainer = _train(GraphedSupervisedTrainer, torch.device("cpu"))
    assert trainer._graph is None and not trainer._use_graph
    assert losses == ref_losses and len(losses) == 12
    for a, b in zip(ref.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


def _grad_norm(net):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in net.parameters()])))


def test_max_grad_norm_clips_the_eager_step_before_the_optimizer():
    ref, _, _ = _train(SupervisedTrainer, torch.device("cpu"), epochs=1)
    assert _grad_norm(ref) > 0.05  # the last iteration's gradients, left in place after its step
    net, losses, trainer = _train(GraphedSupervisedTrainer, torch.device("cpu"), epochs=1, max_grad_norm=1e-3)
    assert not trainer._use_graph
    assert _grad_norm(net) == pytest.approx(1e-3, rel=1e-3)
    # the clipped gradients are the ones stepped: SGD with lr 1 moves the weights by exactly them
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    trainer = GraphedSupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=_data(n=1),
                                       network=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                                       loss_function=FeatureMixingLoss(), max_grad_norm=1e-3)
    trainer.run()
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, net.parameters())])
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-3)


def test_max_grad_norm_refuses_what_it_cannot_do():
    net = _net()
    kwargs = dict(device=torch.device("cpu"), max_epochs=1, train_data_loader=_data(), network=net,
                  optimizer=torch.optim.Adam(net.parameters()), loss_function=FeatureMixingLoss())
    with pytest.raises(ValueError, match="accumulation_steps"):
        GraphedSupervisedTrainer(max_grad_norm=1.0, accumulation_steps=2, **kwargs)
    with pytest.raises(ValueError, match="positive"):
        GraphedSupervisedTrainer(max_grad_norm=-1.0, **kwargs)
    assert GraphedSupervisedTrainer(max_grad_norm=None, **kwargs).max_grad_norm == 0.0


def test_reasons_a_graph_cannot_hold_the_step():
    net = _net()
    kwargs = dict(max_epochs=1, train_data_loader=_data(), network=net, loss_function=FeatureMixingLoss())
    plain = torch.optim.Adam(net.parameters())
    capt = torch.optim.Adam(net.parameters(), capturable=True)
    cpu = GraphedSupervisedTrainer(device=torch.device("cpu"), optimizer=capt, **kwargs)
    assert "not CUDA" in graph_unsupported_reason(cpu)
    cuda = torch.device("cuda")
    assert "capturable" in graph_unsupported_reason(GraphedSupervisedTrainer(device=cuda, optimizer=plain, **kwargs))
    acc = GraphedSupervisedTrainer(device=cuda, optimizer=capt, accumulation_steps=2, **kwargs)
    assert "accumulation" in graph_unsupported_reason(acc)
    fp16 = GraphedSupervisedTrainer(device=cuda, optimizer=capt, amp=True, **kwargs)
    assert "float16" in graph_unsupported_reason(fp16)
    assert graph_unsupported_reason(GraphedSupervisedTrainer(device=cuda, optimizer=capt, **kwargs)) is None
    ddp = GraphedSupervisedTrainer(device=cuda, optimizer=capt, **kwargs)
    ddp.network = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    assert "DistributedDataParallel" in graph_unsupported_reason(ddp)


def test_time_budget_updates_a_tensor_lr_in_place():
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True)
    budget = TimeBudgetHandler(1.0, opt, min_lr_ratio=0.0)
    lr = opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    budget.elapsed = lambda: 30.0  # half the budget: cosine gives half the lr
    budget._set_lr(None)
    assert opt.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(5e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replays_match_the_eager_trainer_on_gpu():
    torch.backends.cudnn.deterministic = True
    device = torch.device("cuda")
    ref, ref_losses, _ = _train(SupervisedTrainer, device, schedule=True)
    net, losses, trainer = _train(GraphedSupervisedTrainer, device, schedule=True, warmup_iterations=2)
    assert trainer._graph is not None  # captured at iteration 2, replayed for 10 iterations
    assert isinstance(trainer.optimizer.param_groups[0]["lr"], torch.Tensor)
    assert trainer.optimizer.param_groups[0]["lr"].item() == pytest.approx(1e-2 * 0.5 ** 12)
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    for (name, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3), name
    # the step still learns: loss falls over the 12 iterations
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_step_clips_like_the_eager_step_on_gpu():
    torch.backends.cudnn.deterministic = True
    device = torch.device("cuda")
    # eager (MONAI's step with a GradScaler under amp: unscaled, then clipped) against the captured step
    ref, ref_losses, eager = _train(GraphedSupervisedTrainer, device, cuda_graph=False, max_grad_norm=1e-3)
    net, losses, trainer = _train(GraphedSupervisedTrainer, device, warmup_iterations=2, max_grad_norm=1e-3)
    assert eager._graph is None and trainer._graph is not None
    assert _grad_norm(ref) == pytest.approx(1e-3, rel=1e-2)
    assert _grad_norm(net) == pytest.approx(1e-3, rel=1e-2)  # the graph's gradient buffers, clipped in place
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    unclipped, _, _ = _train(GraphedSupervisedTrainer, device, warmup_iterations=2)
    assert _grad_norm(unclipped) > 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_weight_average_reads_the_graph_steps_weights_on_gpu():
    # the replayed step updates the weights in place; the average (queued after it) must see every step's
    # weights: with a horizon longer than the run it is their plain mean
    device = torch.device("cuda")
    made, after_step = [], []

    def average(net):
        made.append(WeightAverageHandler(net, decay=0.99, warmup_power=1.0))
        return made[0]

    def record(net):
        class Record:
            def attach(self, engine):
                engine.add_event_handler(Events.ITERATION_COMPLETED,
                                         lambda e: after_step.append([t.detach().clone() for t in net.state_dict().values()]))
        return Record()

    net, losses, trainer = _train(GraphedSupervisedTrainer, device, warmup_iterations=2, handlers=(average, record))
    assert trainer._graph is not None and len(after_step) == 12
    for i, (key, value) in enumerate(made[0].averaged.state_dict().items()):
        if value.is_floating_point():
            expected = torch.stack([w[i].float() for w in after_step]).mean(0)
            assert torch.allclose(value.float(), expected, atol=1e-5), key
    assert not torch.equal(made[0].averaged[0].weight, net[0].weight)
