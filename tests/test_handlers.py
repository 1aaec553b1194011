import csv
import math

import pytest
import torch
from ignite.engine import Engine, Events

from fias_monai.handlers import (
    BestModelSaver,
    LastCheckpointHandler,
    MetricHistoryHandler,
    PeriodicValidationHandler,
    ThroughputHandler,
    TimeBudgetHandler,
    TrainingClock,
    WeightAverageHandler,
    atomic_torch_save,
)


def _validator(values):
    val = Engine(lambda e, b: None)
    scores = iter(values)

    @val.on(Events.EPOCH_COMPLETED)
    def _score(engine):
        engine.state.metrics["val_mean_dice"] = next(scores)

    return val


def test_history_has_one_row_per_validation(tmp_path):
    val = _validator([0.1, 0.5, 0.4])
    trainer = Engine(lambda e, b: 0.0)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=1), lambda e: val.run([0, 1]))  # as ValidationHandler
    MetricHistoryHandler(val, tmp_path / "h.csv").attach(trainer)
    trainer.run([0, 1, 2], max_epochs=3)
    rows = list(csv.DictReader(open(tmp_path / "h.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [float(r["val_mean_dice"]) for r in rows] == [0.1, 0.5, 0.4]
    assert all(float(r["time_s"]) >= 0 for r in rows)


def test_best_model_saver_keeps_the_best_across_a_restart(tmp_path):
    net = torch.nn.Linear(2, 2)
    saver = BestModelSaver(net, tmp_path / "model.pt", metric_name="val_mean_dice")
    val = _validator([0.3, 0.7, 0.5])
    saver.attach(val)
    for _ in range(3):
        with torch.no_grad():
            net.weight.add_(1.0)
        val.run([0])
    assert saver.best_metric == 0.7
    best = torch.load(tmp_path / "model.pt")
    # a restarted saver with the restored state does not overwrite a better model with a worse one
    restarted = BestModelSaver(net, tmp_path / "model.pt", metric_name="val_mean_dice")
    restarted.load_state_dict(saver.state_dict())
    val2 = _validator([0.6])
    restarted.attach(val2)
    val2.run([0])
    assert torch.equal(torch.load(tmp_path / "model.pt")["weight"], best["weight"])


def test_last_checkpoint_resumes_epoch_and_optimizer(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)

    def step(engine, batch):
        opt.zero_grad()
        loss = net(torch.ones(1, 2)).sum()
        loss.backward()
        opt.step()
        return loss.item()

    trainer = Engine(step)
    LastCheckpointHandler(tmp_path, {"model": net, "optimizer": opt}).attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    saved = torch.load(tmp_path / "last.pt")
    assert saved["trainer"] == {"epoch": 2, "iteration": 4} and saved["optimizer"]["state"]

    net2 = torch.nn.Linear(2, 1)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.1)
    epochs_run = []
    trainer2 = Engine(lambda e, b: 0.0)
    LastCheckpointHandler(tmp_path, {"model": net2, "optimizer": opt2}, resume=True).attach(trainer2)
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    trainer2.run([0, 1], max_epochs=3)
    assert epochs_run == [3]  # epochs 1-2 were done before the "crash"
    assert torch.equal(net2.weight, net.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_last_checkpoint_every_n_epochs_and_after_the_last(tmp_path, monkeypatch):
    import fias_monai.handlers as h

    saved = []
    monkeypatch.setattr(h, "atomic_torch_save", lambda state, path: saved.append(state["trainer"]["epoch"]))
    net = torch.nn.Linear(1, 1)
    trainer = Engine(lambda e, b: 0.0)
    LastCheckpointHandler(tmp_path, {"model": net}, save_interval=2).attach(trainer)
    trainer.run([0], max_epochs=5)
    assert saved == [2, 4, 5]  # epoch 5 is not a multiple of 2 but the run ends there

    saved.clear()
    stopper = Engine(lambda e, b: 0.0)
    stopper.add_event_handler(Events.EPOCH_COMPLETED(once=3), lambda e: e.terminate())  # a time-budget stop
    LastCheckpointHandler(tmp_path, {"model": net}, save_interval=2).attach(stopper)
    stopper.run([0], max_epochs=10)
    assert saved == [2, 3]

    saved.clear()
    trainer = Engine(lambda e, b: 0.0)
    LastCheckpointHandler(tmp_path, {"model": net}, save_interval=2).attach(trainer)
    trainer.run([0], max_epochs=4)
    assert saved == [2, 4]  # the last epoch was saved by the interval: not twice
    with pytest.raises(ValueError, match="save_interval"):
        LastCheckpointHandler(tmp_path, {"model": net}, save_interval=0)


class _RecordingValidator:
    def __init__(self):
        self.epochs = []

    def run(self, epoch):
        self.epochs.append(epoch)


@pytest.mark.parametrize("stop_at, expected", [(None, [3, 6, 7]), (4, [3, 4]), (6, [3, 6])])
def test_periodic_validation_also_validates_the_last_epoch(stop_at, expected):
    trainer = Engine(lambda e, b: 0.0)
    if stop_at:  # attached before the validation handler, as the TimeBudgetHandler is in train.json
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_at), lambda e: e.terminate())
    handler = PeriodicValidationHandler(interval=3)
    handler.validator = val = _RecordingValidator()
    handler.attach(trainer)
    trainer.run([0], max_epochs=7)
    assert val.epochs == expected
    with pytest.raises(ValueError, match="val_interval"):
        PeriodicValidationHandler(interval=0)


def test_time_budget_decays_lr_and_stops(monkeypatch):
    import fias_monai.handlers as h

    clock = {"t": 0.0}
    monkeypatch.setattr(h.time, "monotonic", lambda: clock["t"])
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    lrs = []

    def step(engine, batch):
        lrs.append(opt.param_groups[0]["lr"])
        clock["t"] += 6.0  # each iteration takes 6 s
        return 0.0

    trainer = Engine(step)
    TimeBudgetHandler(1.0, opt, min_lr_ratio=0.0).attach(trainer)  # 60 s
    trainer.run([0, 1], max_epochs=100)  # 12 s an epoch
    assert trainer.state.epoch == 5  # epoch 5 ends at 60 s exactly; a 6th would overrun the budget
    assert lrs[0] == 1.0 and lrs[-1] < lrs[0]
    assert math.isclose(lrs[2], 0.5 * (1 + math.cos(math.pi * 12 / 60)))


def test_a_resumed_run_counts_on_from_the_time_trained(monkeypatch, tmp_path):
    # 12-s epochs in a 60-s budget, the run stopped after epoch 3 (36 s) and resumed from last.pt: the lr goes on
    # from 36/60 of the cosine, the budget ends after epoch 5 (not 5 epochs after the restart), and the validation
    # curve's times go on from 36 s instead of starting again at 0
    import fias_monai.handlers as h

    now = {"t": 0.0}
    monkeypatch.setattr(h.time, "monotonic", lambda: now["t"])

    def run(max_epochs, resume):
        net = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        lrs = []

        def step(engine, batch):
            lrs.append(opt.param_groups[0]["lr"])
            now["t"] += 6.0
            return 0.0

        trainer, val, clock = Engine(step), _validator([0.5] * 5), TrainingClock()
        TimeBudgetHandler(1.0, opt, min_lr_ratio=0.0, clock=clock).attach(trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: val.run([0]))  # as ValidationHandler
        MetricHistoryHandler(val, tmp_path / "h.csv", clock=clock).attach(trainer)
        LastCheckpointHandler(tmp_path, {"model": net, "optimizer": opt, "training_clock": clock},
                              resume=resume).attach(trainer)
        trainer.run([0, 1], max_epochs=max_epochs)
        return trainer, lrs

    run(max_epochs=3, resume=False)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["training_clock"] == {"seconds": 36.0}
    now["t"] += 500.0  # the restart is not training time
    resumed, lrs = run(max_epochs=100, resume=True)
    assert resumed.state.epoch == 5 and len(lrs) == 4
    assert math.isclose(lrs[0], 0.5 * (1 + math.cos(math.pi * 36 / 60)))
    rows = list(csv.DictReader(open(tmp_path / "h.csv")))
    assert [(r["epoch"], float(r["time_s"])) for r in rows] == [("1", 12), ("2", 24), ("3", 36), ("4", 48), ("5", 60)]


def test_last_checkpoint_resumes_a_checkpoint_that_lacks_an_optional_entry(tmp_path, caplog):
    # a last.pt of a bundle before 0.2.19 has no training_clock: resumed with a warning, the clock at 0; any
    # other missing entry stays an error naming the file and the entry
    net = torch.nn.Linear(1, 1)
    trainer = Engine(lambda e, b: 0.0)
    LastCheckpointHandler(tmp_path, {"model": net}).attach(trainer)
    trainer.run([0], max_epochs=2)
    strict = Engine(lambda e, b: 0.0)
    LastCheckpointHandler(tmp_path, {"model": net, "training_clock": TrainingClock()}, resume=True).attach(strict)
    with pytest.raises(KeyError, match=r"last.pt has no 'training_clock' entry to resume from"):
        strict.run([0], max_epochs=3)
    clock = TrainingClock()
    lenient = Engine(lambda e, b: 0.0)
    LastCheckpointHandler(tmp_path, {"model": net, "training_clock": clock}, resume=True,
                          optional_keys=["training_clock"]).attach(lenient)
    with caplog.at_level("WARNING", logger="fias_monai.handlers"):
        lenient.run([0], max_epochs=3)
    assert lenient.state.iteration == 3 and clock.before_s == 0.0  # resumed after epoch 2: one epoch run
    assert f"checkpoint {tmp_path / 'last.pt'} has no 'training_clock' entry" in caplog.text


@pytest.mark.parametrize("minutes", [None, 0, 0.0])
def test_time_budget_off_with_none_or_zero(monkeypatch, minutes):
    # 0 is the command line's way to switch it off: MONAI's bundle CLI ignores a None override
    import fias_monai.handlers as h

    clock = {"t": 0.0}
    monkeypatch.setattr(h.time, "monotonic", lambda: clock["t"])
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)

    def step(engine, batch):
        clock["t"] += 600.0  # ten minutes an iteration: any budget would stop the run and decay the lr
        return 0.0

    trainer = Engine(step)
    TimeBudgetHandler(minutes, opt).attach(trainer)
    trainer.run([0], max_epochs=3)
    assert trainer.state.epoch == 3 and opt.param_groups[0]["lr"] == 1.0


def test_bundle_cli_args_refuse_none_which_monai_would_drop():
    from fias_monai.utils import bundle_cli_args

    assert bundle_cli_args({"epochs": 50, "max_minutes": 0, "lr": 1e-3}) == [
        "--epochs", "50", "--max_minutes", "0", "--lr", "0.001"]
    with pytest.raises(ValueError, match=r"\['max_minutes'\] are None.*max_minutes: 0"):
        bundle_cli_args({"epochs": 50, "max_minutes": None})


def test_terminate_on_nan_handler_stops_at_the_first_non_finite_loss():
    from fias_monai.handlers import TerminateOnNanHandler

    losses = [1.0, 0.5, float("nan"), 0.4, 0.3]
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(losses[engine.state.iteration - 1])})
    TerminateOnNanHandler(output_transform=lambda out: out["loss"]).attach(trainer)
    trainer.run([0] * 5, max_epochs=1)
    assert trainer.state.iteration == 3


def test_time_budget_warms_up_linearly(monkeypatch):
    import fias_monai.handlers as h

    clock = {"t": 0.0}
    monkeypatch.setattr(h.time, "monotonic", lambda: clock["t"])
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=2.0)
    lrs = []

    def step(engine, batch):
        lrs.append(opt.param_groups[0]["lr"])
        clock["t"] += 1.0
        return 0.0

    trainer = Engine(step)
    TimeBudgetHandler(10.0, opt, min_lr_ratio=1.0, warmup_iterations=4).attach(trainer)  # constant after warm-up
    trainer.run([0, 1], max_epochs=4)
    assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0])


def test_atomic_save_leaves_no_partial_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_torch_save({"a": torch.ones(2)}, target)
    with pytest.raises(Exception):
        atomic_torch_save({"bad": lambda: None}, target)  # unpicklable: the save fails midway
    assert torch.equal(torch.load(target)["a"], torch.ones(2))  # old checkpoint intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp left behind


def test_throughput_counts_images_between_first_and_last_iteration(monkeypatch):
    clock = iter(range(0, 1000, 2))  # every iteration completes 2 s after the previous one
    monkeypatch.setattr("fias_monai.handlers.time.monotonic", lambda: float(next(clock)))
    trainer = Engine(lambda e, b: None)
    ThroughputHandler().attach(trainer)
    history = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: history.append(e.state.metrics["train_images_per_s"]))
    batches = [{"image": torch.zeros(4, 1, 8, 8)} for _ in range(6)]
    trainer.run(batches, max_epochs=2)
    # 5 batches of 4 images after the first one, in 5 * 2 s
    assert history == [pytest.approx(2.0), pytest.approx(2.0)]


def test_release_loader_workers_handler_stops_persistent_workers_when_training_completes():
    from torch.utils.data import DataLoader

    from fias_monai.handlers import ReleaseLoaderWorkersHandler

    def loader():
        return DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)

    # without the handler the persistent workers outlive the run (PyTorch joins them only at exit)
    plain = loader()
    Engine(lambda e, batch: None).run(plain, max_epochs=2)
    workers = list(plain._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    plain._iterator._shutdown_workers()

    # with it they are gone when run() returns, and the loader can run again with fresh workers
    seen = {}
    engine = Engine(lambda e, batch: None)
    engine.add_event_handler(Events.COMPLETED, lambda e: seen.update(workers=list(e.state.dataloader._iterator._workers)))
    ReleaseLoaderWorkersHandler().attach(engine)
    data = loader()
    engine.run(data, max_epochs=2)
    assert len(seen["workers"]) == 2 and not any(w.is_alive() for w in seen["workers"])
    assert data._iterator is None
    engine.run(data, max_epochs=3)
    assert engine.state.epoch == 3


def _weights_set_to_the_iteration(net):
    def step(engine, batch):
        with torch.no_grad():
            net.weight.fill_(float(engine.state.iteration))
    return Engine(step)


def test_weight_average_is_the_running_mean_then_the_exponential_average():
    net = torch.nn.Linear(1, 1, bias=False)
    wrapped = torch.nn.Module()
    wrapped.module = net  # as DistributedDataParallel holds it: the handler averages the inner network
    avg = WeightAverageHandler(wrapped, decay=0.75, warmup_power=1.0)  # 1 / (1 - 0.75) = 4 iterations of plain mean
    assert avg.averaged is not net and not avg.averaged.training
    trainer = _weights_set_to_the_iteration(net)
    avg.attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(avg.averaged.weight.item()))
    trainer.run(range(6), max_epochs=1)
    # weights 1..6 after the steps: means of 1..n up to n = 4, then ema = 0.75 ema + 0.25 w
    assert seen[:4] == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert seen[4] == pytest.approx(0.75 * 2.5 + 0.25 * 5)
    assert seen[5] == pytest.approx(0.75 * seen[4] + 0.25 * 6)
    assert net.weight.item() == 6.0  # the trained weights are left alone
    # last.pt's 'ema' entry is the averaged network's state (train.json's averaged_network), and restores it
    restored = WeightAverageHandler(torch.nn.Linear(1, 1, bias=False), decay=0.75, warmup_power=1.0)
    restored.averaged.load_state_dict(avg.averaged.state_dict())
    assert restored.averaged.weight.item() == pytest.approx(seen[5])


def test_weight_average_off_is_the_network_itself():
    net = torch.nn.Linear(1, 1, bias=False)
    avg = WeightAverageHandler(net, decay=0)
    assert avg.averaged is net
    trainer = _weights_set_to_the_iteration(net)
    avg.attach(trainer)
    assert not trainer.has_event_handler(avg, Events.ITERATION_COMPLETED)
    trainer.run(range(2), max_epochs=1)
    assert avg.averaged.weight.item() == 2.0


def test_weight_average_copies_integer_buffers_and_averages_float_ones():
    net = torch.nn.BatchNorm1d(1)
    avg = WeightAverageHandler(net, decay=0.5)
    trainer = Engine(lambda e, b: net.train()(torch.full((4, 1), float(e.state.iteration)) * torch.arange(4.0)[:, None]))
    avg.attach(trainer)
    trainer.run(range(3), max_epochs=1)
    assert int(avg.averaged.num_batches_tracked) == int(net.num_batches_tracked) == 3
    assert 0 < avg.averaged.running_var.item() < net.running_var.item()  # trails the growing variance


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1])
def test_weight_average_refuses_a_decay_outside_0_1(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverageHandler(torch.nn.Linear(1, 1), decay=decay)
    with pytest.raises(ValueError, match="warmup_power must be in"):
        WeightAverageHandler(torch.nn.Linear(1, 1), decay=0.9, warmup_power=0.0)


def test_weight_average_takes_a_given_copy_and_refuses_anything_else():
    net = torch.nn.Linear(2, 1)
    copy_ = torch.nn.Linear(2, 1)
    avg = WeightAverageHandler(net, decay=0.9, averaged=copy_)
    assert avg.averaged is copy_ and not copy_.training and not copy_.weight.requires_grad
    with pytest.raises(ValueError, match="not the network itself"):
        WeightAverageHandler(net, decay=0.9, averaged=net)
    with pytest.raises(ValueError, match="state differs"):
        WeightAverageHandler(net, decay=0.9, averaged=torch.nn.Linear(3, 1))
    assert WeightAverageHandler(net, decay=0, averaged=net).averaged is net  # off: the network itself


def _lag_after(iterations, **kwargs):
    net = torch.nn.Linear(1, 1, bias=False)
    avg = WeightAverageHandler(net, decay=0.999, **kwargs)
    trainer = _weights_set_to_the_iteration(net)  # weights drifting by 1 per step, as early training moves fast
    avg.attach(trainer)
    trainer.run(range(iterations), max_epochs=1)
    return iterations - avg.averaged.weight.item()


def test_weight_average_warm_up_keeps_close_to_weights_that_move():
    # the plain mean (power 1) trails a steady drift by half the run; the default power 3/4 by well under
    # half of that (its horizon after 400 steps is 400 ** 0.75 = 89 steps; measured lag 75)
    assert _lag_after(400, warmup_power=1.0) == pytest.approx(199.5)
    lag = _lag_after(400)
    assert 0 < lag < 199.5 / 2
    assert _lag_after(100) < lag  # and the horizon grows with the iterations
