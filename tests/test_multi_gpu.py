"""Multi-GPU (DDP) training: ``bundle/configs/multi_gpu_train.json`` merged after ``train.json``.

Everything runs on CPU with the gloo backend: the config picks gloo when CUDA is absent, and the
same code paths (process group, DistributedSampler, DDP wrapper, all-gathered metric, rank-0-only
logging and saving) are exercised as under NCCL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine

from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TRAIN = CONFIGS / "train.json"
MULTI = CONFIGS / "multi_gpu_train.json"
TINY_OVERRIDES = {  # the CLI overrides of the end-to-end run, for the in-process parse
    "image_size": [64, 64], "batch_size": 2, "num_workers": 0, "cache_workers": 1, "epochs": 1,
    "network_def#embed_dims": [24, 48, 96, 192], "network_def#depths": [1, 1, 1, 1],
}


def _merged(fake_dist=None, **overrides) -> ConfigParser:
    parser = ConfigParser(globals=None if fake_dist is None else {"dist": fake_dist})
    parser.read_config([str(TRAIN), str(MULTI)])
    if fake_dist is not None:
        # MONAI evaluates every "$import ..." whenever it resolves anything: drop the one binding
        # `dist` (in initialize) so that the stand-in stays
        parser["initialize"] = [x for x in parser["initialize"] if "import torch.distributed" not in x]
    parser.update(overrides)
    return parser


def _tiny_demo(root: Path) -> Path:
    from fias_monai.data import make_demo_dataset

    make_demo_dataset(root / "demo", num_train=2, num_val=2, shape=(64, 64, 4))  # 8 training slices
    return root / "demo"


# ----------------------------------------------------------------------------------------------
# the merged config, parsed without a process group
# ----------------------------------------------------------------------------------------------
def test_merged_config_ids_without_process_group():
    assert not dist.is_initialized()
    parser = _merged()
    for id_ in ("train#sampler", "validate#sampler", "train#dataloader#sampler", "validate#dataloader#sampler",
                "train#trainer#train_handlers", "validate#evaluator#val_handlers", "rank0_only_handlers#types"):
        assert id_ in parser, id_
    assert "DistributedDataParallel" in parser["network#_target_"]
    # DDP wraps exactly the single-GPU network (device, memory format): both name the one expression
    assert parser["network#module"] == json.loads(TRAIN.read_text())["network"] == "@network_on_device"
    assert parser["validate#sampler#_target_"] == "DistributedSampler"
    # the training sampler is train.json's own entry (end_slice_weight), switched to its distributed form
    assert parser["train#sampler#_target_"] == "fias_monai.data.slice_sampler" and parser["train#sampler#distributed"]
    assert parser["train#sampler#shuffle"] is True and parser["validate#sampler#shuffle"] is False
    assert parser["train#dataloader#sampler"] == "@train#sampler" and parser["train#dataloader#shuffle"] is False
    assert parser["validate#dataloader#sampler"] == "@validate#sampler"
    assert "LOCAL_RANK" in parser["device"]
    # "+initialize"/"+finalize" appended to train.json's lists: its own steps stay, in front
    init, train_init = parser["initialize"], ConfigParser.load_config_file(TRAIN)["initialize"]
    assert init[: len(train_init)] == train_init
    assert any("init_process_group" in x and "gloo" in x and "nccl" in x for x in init)
    # the group goes through the helper that waits out gloo's worker threads (pytorch/pytorch#190489)
    assert parser["finalize"][-1] == "$fias_monai.utils.destroy_process_group()"
    assert "$import fias_monai.utils" in parser["imports"]
    assert "NVLS" not in MULTI.read_text()  # never touch NVLink multicast
    # the device needs no process group (LOCAL_RANK) and is the CPU here
    if not torch.cuda.is_available():
        assert parser.get_parsed_content("device") == torch.device("cpu")


@pytest.mark.parametrize("rank", [0, 1])
def test_samplers_split_and_rank0_only_handlers(tmp_path, rank):
    """With a stand-in for ``torch.distributed`` (world size 2) and the plain network (DDP needs a
    process group): each rank gets half the training slices, validation volumes are split without
    repeats, and ranks > 0 drop only the logging handlers."""
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    from fias_monai.handlers import (BestModelSaver, LastCheckpointHandler, MetricHistoryHandler,
                                     ProgressBarHandler)

    fake_dist = types.SimpleNamespace(get_rank=lambda: rank, get_world_size=lambda: 2)
    parser = _merged(
        fake_dist=fake_dist, **TINY_OVERRIDES, bundle_root=str(tmp_path / "bundle"), dataset_dir=str(_tiny_demo(tmp_path)),
        network="$@network_def.to(@device)",
        **{"train#sampler#num_replicas": 2, "train#sampler#rank": rank,
           "validate#sampler#num_replicas": 2, "validate#sampler#rank": rank},
    )
    train_sampler = parser.get_parsed_content("train#sampler")
    assert len(parser.get_parsed_content("train#dataset")) == 8 and len(train_sampler) == 4
    loader = parser.get_parsed_content("train#dataloader")
    assert loader.sampler is train_sampler and len(loader) == 2
    val_sampler = parser.get_parsed_content("validate#sampler")
    assert list(val_sampler) == [rank]  # 2 volumes, one each, none repeated

    handlers = parser.get_parsed_content("train#trainer#train_handlers")
    val_handlers = parser.get_parsed_content("validate#evaluator#val_handlers")
    logging_types = (StatsHandler, TensorBoardStatsHandler, ProgressBarHandler, MetricHistoryHandler)
    all_handlers = parser.get_parsed_content("train#handlers")
    if rank == 0:
        assert handlers is all_handlers
    else:
        assert not any(isinstance(h, logging_types) for h in handlers + val_handlers)
        assert [h for h in all_handlers if not isinstance(h, logging_types)] == handlers
    # every rank keeps what must run everywhere: resume checkpoint, best-model tracking
    assert any(isinstance(h, LastCheckpointHandler) for h in handlers)
    assert any(isinstance(h, BestModelSaver) for h in val_handlers)


# ----------------------------------------------------------------------------------------------
# the metric and the handlers under a real (2-process gloo) process group
# ----------------------------------------------------------------------------------------------
def _volumes(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.randint(0, 4, (1, 12, 10, 6), generator=g)
        pred = torch.where(torch.rand(label.shape, generator=g) < 0.7, label, torch.randint(0, 4, label.shape,
                                                                                             generator=g))
        out.append((pred, label))
    return out


def _reference_mean_dice(vols) -> float:
    """The protocol mean Dice over all volumes in one process."""
    from fias_monai.metrics import ProtocolMetric

    m = ProtocolMetric(4)
    for pred, label in vols:
        m(y_pred=pred[None], y=label[None])
    return float(m.aggregate())


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from fias_monai.handlers import BestModelSaver, LastCheckpointHandler, _from_rank0
    from fias_monai.metrics import MeanDiceProtocol

    os.environ["LOCAL_RANK"] = str(rank)  # as torchrun sets it (ignite reads it)
    # a CPU gloo group on a GPU machine too: ignite's collectives move tensors to the current CUDA device
    # whenever CUDA is available, and a forked child cannot initialise CUDA once the parent has (the GPU
    # tests before this one in a session): "Cannot re-initialize CUDA in forked subprocess"
    torch.cuda.is_available = lambda: False
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        vols = _volumes(3, seed=0)
        mine = [vols[i] for i in range(rank, len(vols), world)]  # uneven: rank 0 two volumes, rank 1 one

        evaluator = Engine(lambda e, batch: {"pred": [batch[0]], "label": [batch[1]]})
        metric = MeanDiceProtocol(num_classes=4, output_transform=lambda o: (o["pred"], o["label"]))
        metric.attach(evaluator, "val_mean_dice")
        evaluator.state.key_metric_name = "val_mean_dice"
        net = torch.nn.Linear(2, 2)
        saver = BestModelSaver(net, Path(out_dir) / f"model_rank{rank}.pt")
        saver.attach(evaluator)
        evaluator.run(mine, max_epochs=1)

        ckpt = LastCheckpointHandler(Path(out_dir) / f"ckpt_rank{rank}", {"model": net, "best": saver})
        ckpt.save(evaluator)
        torch.save({"metric": evaluator.state.metrics["val_mean_dice"], "best": saver.best_metric,
                    "rank0_value": _from_rank0(float(rank + 10))}, Path(out_dir) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metric_all_gather_and_rank0_writes(tmp_path):
    """Ranks with different numbers of volumes (as with ``even_divisible=False``) all get the mean
    over every volume; the savers track it on every rank and write only on rank 0."""
    # fork: the children reuse the parent's imports (a spawned child spends ~10 s importing monai)
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt") for r in (0, 1))
    ref = _reference_mean_dice(_volumes(3, seed=0))  # one process, all volumes
    assert 0.0 < ref < 1.0
    assert r0["metric"] == pytest.approx(ref, abs=1e-6) and r1["metric"] == pytest.approx(ref, abs=1e-6)
    assert r0["best"] == r1["best"] == pytest.approx(ref, abs=1e-6)
    assert r0["rank0_value"] == r1["rank0_value"] == 10.0
    assert (tmp_path / "model_rank0.pt").is_file() and not (tmp_path / "model_rank1.pt").exists()
    assert (tmp_path / "ckpt_rank0" / "last.pt").is_file() and not (tmp_path / "ckpt_rank1" / "last.pt").exists()


def test_destroy_process_group_waits_after_gloo_and_is_a_no_op_without_a_group(tmp_path):
    from fias_monai.utils import destroy_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    t0 = time.perf_counter()
    destroy_process_group(linger_s=0.3)
    assert not dist.is_initialized()
    assert time.perf_counter() - t0 >= 0.3  # gloo: the wait that lets its worker threads finish
    t0 = time.perf_counter()
    destroy_process_group(linger_s=5.0)  # nothing to destroy: returns at once, does not raise
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------------------------
# end to end: the command users run, with torchrun, 2 processes, gloo
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_processes_one_epoch(tmp_path):
    demo = _tiny_demo(tmp_path)
    bundle_root = tmp_path / "bundle"
    config_files = f"['{TRAIN}','{MULTI}']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "training", "--config_file", config_files,
           "--logging_file", str(CONFIGS / "logging.conf"),
           "--bundle_root", str(bundle_root), "--dataset_dir", str(demo)]
    for k, v in TINY_OVERRIDES.items():
        cmd += [f"--{k}", str(v).replace(" ", "")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    elapsed = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    ckpt_dir = bundle_root / "models"
    model = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)
    last = torch.load(ckpt_dir / "last.pt", map_location="cpu", weights_only=False)
    assert model and not any(k.startswith("module.") for k in model), "model.pt must hold the unwrapped network"
    assert not any(k.startswith("module.") for k in last["model"])
    assert model.keys() == last["model"].keys()
    # each rank trained on half of the 8 slices: 4 per rank / batch 2 = 2 iterations (4 on one process)
    assert last["trainer"] == {"epoch": 1, "iteration": 2}

    # both ranks built the datasets, validated and got the same all-gathered metric ...
    assert len(re.findall(r"SliceDataset: 8 slices from 2 volumes cached", log)) == 2, log[-6000:]
    best = re.findall(r"Got new best metric of val_mean_dice: ([0-9.eE+-]+)", log)
    assert len(best) == 2 and best[0] == best[1], log[-6000:]
    # ... but only rank 0 logged it and saved
    assert len(re.findall(r"Metrics -- val_mean_dice", log)) == 1, log[-6000:]
    assert len(re.findall(r"new best val_mean_dice .*: saved", log)) == 1, log[-6000:]
    history = bundle_root / "logs" / "val_history.csv"
    if history.exists():  # MetricHistoryHandler: written by rank 0 alone, one row per validation
        lines = history.read_text().splitlines()
        assert lines[0].startswith("epoch,") and len(lines) == 2, lines
    print(f"torchrun 2 x gloo, one epoch: {elapsed:.1f} s")
