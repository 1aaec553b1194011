"""What the weight average (``ema_decay``) costs the bundle's training step: images/s of
``GraphedSupervisedTrainer`` (the captured step of ``train.json`` + ``acdc.json``: FIAS-tiny, batch 16,
256x256, bf16, channels_last, fused Adam, the feature-mixing loss) in ONE process, for

- ``off``: no average (the reference of the ratios);
- ``timm``: timm's ``ModelEmaV3.update`` after every step (what commit 2fbdfc8 shipped; it rebuilds both
  state dicts at each update);
- ``cached``: the bundle's :class:`fias_monai.handlers.WeightAverageHandler` (one foreach lerp over lists
  gathered once).

Each iteration ends as the bundle's does: the update is queued, then the loss is read on the host (the NaN
check, ``TerminateOnNanHandler``), so host time spent on the update shows when the step is host-bound.

    python scripts/benchmark_weight_average.py --variants off,timm,cached

On one H100 (session 15, commit f832aa8; docs/benchmark.md): ``off`` 516.5, ``timm`` 508.2, ``cached`` 506.6
images/s (medians of three 40-iteration blocks; ratios 0.984 and 0.981).
``--device cpu`` runs the eager step (a smoke test, not a timing).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import fire
import torch

from fias_monai.handlers import WeightAverageHandler

VARIANTS = ("off", "timm", "cached")


def _grad_clip_benchmark():
    # the trainer, the timed blocks and the report as in benchmark_grad_clip.py (the config's own network,
    # optimizer and loss; the same warm-up and capture before the blocks)
    spec = importlib.util.spec_from_file_location("benchmark_grad_clip", Path(__file__).with_name("benchmark_grad_clip.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _updater(variant: str, trainer, decay: float):
    """A callable run after each iteration (the engine's ITERATION_COMPLETED), or None for ``off``; ``variant``
    is one of VARIANTS."""
    if variant == "off":
        return None
    if variant == "timm":
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(trainer.network, decay=decay, use_warmup=True, warmup_gamma=1.0, warmup_power=1.0)
        return lambda engine: ema.update(trainer.network, step=engine.state.iteration)
    return WeightAverageHandler(trainer.network, decay=decay)  # "cached" (main checks the names)


def main(variants: str | tuple = "off,timm,cached", decay: float = 0.999, batch: int = 16, size: int = 256,
         iters: int = 40, repeats: int = 3, device: str = "cuda") -> dict[str, float]:
    """Prints and returns the median images/s per variant."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark_weight_average.py times the CUDA-graph step: it needs a GPU (or --device cpu)")
    names = list(variants) if isinstance(variants, (list, tuple)) else str(variants).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    bench = _grad_clip_benchmark()
    batches = bench.synthetic_batches(batch, size)
    rates: dict[str, list[float]] = {}
    for name in names:
        trainer = bench._trainer(batches, 0.0, dev.type)
        update = _updater(name, trainer, decay)

        def step(i: int) -> None:
            trainer.state.iteration += 1  # as the engine counts it (the update's warm-up reads it)
            output = trainer._iteration(trainer, batches[i % len(batches)])
            if update is not None:
                update(trainer)
            float(output["loss"])  # the NaN check's read: the host waits for the step here

        rates[name] = bench.time_blocks(name, step, trainer, batch, iters, repeats)
    return bench.report(rates, f"batch {batch}, {size}x{size}, decay {decay}", cuda=dev.type == "cuda")


if __name__ == "__main__":
    fire.Fire(main)
