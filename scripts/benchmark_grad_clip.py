"""What gradient clipping costs the bundle's training step: images/s of ``GraphedSupervisedTrainer``
(the captured step of ``train.json``) for FIAS-tiny with the ACDC recipe (batch 16, 256x256, bf16,
channels_last, fused Adam, the feature-mixing loss), without and with ``max_grad_norm``, in ONE process.

    python scripts/benchmark_grad_clip.py --max_grad_norms 0,1.0

Measured on one NVIDIA H100 80GB HBM3 (torch 2.11, commit 9ad122a, this loop run as a one-off before it
became this script): 525.2 images/s without clipping, 525.9 with ``max_grad_norm`` 1.0 (median of three
40-iteration blocks each; ratio 1.001). This script, on one NVIDIA H100 80GB HBM3 of an otherwise idle 4x H100
host (commit fcce2d2): 514.6 and 521.1 images/s (ratio 1.013, inside the unclipped blocks' 3 % spread).
``--device cpu`` runs the eager step (a smoke test, not a timing).
"""

from __future__ import annotations

import statistics
import time

import fire
import torch
from monai.bundle import ConfigParser

from fias_monai.engines import GraphedSupervisedTrainer

CONFIGS = ["bundle/configs/train.json", "bundle/configs/acdc.json"]


def _trainer(batches: list[dict], max_grad_norm: float, device: str) -> GraphedSupervisedTrainer:
    """train.json's trainer, built from the config's own network, optimizer, loss and precision entries (so the
    step is the bundle's), on in-memory batches instead of the data loader and without the run's handlers."""
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    if device == "cpu":  # the config picks the GPU whenever there is one
        parser.update({"device": "$torch.device('cpu')", "amp": False, "cuda_graph": False, "channels_last": False})
    torch.manual_seed(0)
    parts = {k: parser.get_parsed_content(k) for k in ("device", "network", "optimizer", "loss", "amp", "amp_kwargs",
                                                          "cuda_graph")}
    return GraphedSupervisedTrainer(device=parts["device"], max_epochs=1, train_data_loader=batches,
                                    network=parts["network"], optimizer=parts["optimizer"], loss_function=parts["loss"],
                                    amp=parts["amp"], amp_kwargs=parts["amp_kwargs"], cuda_graph=parts["cuda_graph"],
                                    max_grad_norm=max_grad_norm, decollate=False)


def main(max_grad_norms: str | tuple = "0,1.0", batch: int = 16, size: int = 256, iters: int = 40,
         repeats: int = 3, device: str = "cuda") -> dict[float, float]:
    """Prints and returns the median images/s per ``max_grad_norm``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark_grad_clip.py times the CUDA-graph step: it needs a GPU (or --device cpu)")
    norms = [float(v) for v in (max_grad_norms if isinstance(max_grad_norms, (list, tuple))
                                else str(max_grad_norms).split(","))]
    batches = synthetic_batches(batch, size)
    rates = {}
    for norm in norms:
        trainer = _trainer(batches, norm, dev.type)
        name = f"max_grad_norm {norm}"
        rates[name] = time_blocks(name, lambda i: trainer._iteration(trainer, batches[i % len(batches)]), trainer,
                                  batch, iters, repeats)
    medians = report(rates, f"batch {batch}, {size}x{size}", cuda=dev.type == "cuda")
    return dict(zip(norms, medians.values()))


def synthetic_batches(batch: int, size: int, count: int = 4) -> list[dict]:
    """``count`` fixed random batches (image in [0, 1], labels over the config's classes), reused in turn."""
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    classes = parser.get_parsed_content("num_classes")
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(batch, 1, size, size, generator=g),
             "label": torch.randint(0, classes, (batch, 1, size, size), generator=g)} for _ in range(count)]


def time_blocks(name: str, step, trainer: GraphedSupervisedTrainer, batch: int, iters: int, repeats: int) -> list[float]:
    """Images/s of ``repeats`` blocks of ``iters`` calls ``step(i)`` (one training iteration each), after six
    calls of eager warm-up and the capture (the first also autotunes the Triton kernels); printed under ``name``."""
    cuda = torch.device(trainer.state.device).type == "cuda"
    for i in range(6):
        step(i)
    if cuda:
        assert trainer._graph is not None, "the step was not captured"
        torch.cuda.synchronize()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(iters):
            step(i)
        if cuda:
            torch.cuda.synchronize()
        rates.append(batch * iters / (time.perf_counter() - start))
    print(f"{name}: {[round(r, 1) for r in rates]} images/s", flush=True)
    return rates


def report(rates: dict[str, list[float]], setting: str, cuda: bool) -> dict[str, float]:
    """Prints each variant's median and its ratio against the first variant; returns the medians."""
    medians = {name: statistics.median(r) for name, r in rates.items()}
    first = next(iter(medians))
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{card}, {setting}:")
    for name, med in medians.items():
        print(f"  {name}: median {med:.1f} images/s, ratio {med / medians[first]:.3f} against {first}")
    return medians


if __name__ == "__main__":
    fire.Fire(main)
