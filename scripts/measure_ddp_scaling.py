"""Multi-GPU scaling of bundle training: the same run with torchrun on 1 and on N GPUs (issue: multi-GPU).

Runs exactly the users' command, once per GPU count, with the same per-GPU batch and epochs:

    torchrun --standalone --nproc_per_node=K -m monai.bundle run training \
        --config_file "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json', <overlays>]"

and reads each run's ``logs/val_history.csv`` (``train_images_per_s`` from ThroughputHandler, all ranks
together, and ``val_mean_dice`` per epoch). Reports images/s (median over epochs after the first) and
the validation Dice after the last epoch, with the speed-up and Dice difference against 1 GPU.

    python scripts/measure_ddp_scaling.py --gpus 1,2 --epochs 12 --overlays bundle/configs/acdc.json \
        --overrides '{"dataset_dir": "/tmp/acdc", "max_minutes": 0}' --out results/
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire

from fias_monai.utils import bundle_cli_args


def _run(gpus: int, epochs: int, overlays: list[str], overrides: dict, workdir: Path, log: Path,
         scale_lr: bool = False) -> dict:
    bundle_root = workdir / f"gpus{gpus}" / "bundle"
    (bundle_root / "models").mkdir(parents=True, exist_ok=True)
    configs = ["bundle/configs/train.json", "bundle/configs/multi_gpu_train.json", *overlays]
    args = {"bundle_root": str(bundle_root), "epochs": epochs, **overrides}
    if scale_lr:  # linear scaling rule: the effective batch grows with the GPU count
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(configs)
        args["learning_rate"] = float(args.get("learning_rate", parser["learning_rate"])) * gpus
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={gpus}",
           "-m", "monai.bundle", "run", "training", "--config_file", str(configs)]
    cmd += bundle_cli_args(args)
    start = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"{gpus}-GPU run failed (exit {proc.returncode}); see {log}")
    history = list(csv.DictReader(open(bundle_root / "logs" / "val_history.csv")))
    rates = [float(r["train_images_per_s"]) for r in history[1:] if r.get("train_images_per_s")]
    return {
        "gpus": gpus,
        "learning_rate": args.get("learning_rate", "config default"),
        "epochs": epochs,
        "command": " ".join(cmd),
        "wall_s_incl_startup": round(wall, 1),
        "train_images_per_s_median": round(statistics.median(rates), 1) if rates else None,
        "val_mean_dice_last": float(history[-1]["val_mean_dice"]),
        "val_mean_dice_best": max(float(r["val_mean_dice"]) for r in history),
        "history": history,
    }


def main(gpus: str | tuple = "1,2", epochs: int = 12, overlays: str = "bundle/configs/acdc.json",
         overrides: dict | None = None, workdir: str = "/tmp/ddp_runs", out: str = "results",
         scale_lr: bool = False, name: str = "ddp_scaling") -> None:
    import torch

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{name}_log.txt"
    counts = [int(g) for g in (gpus if isinstance(gpus, (list, tuple)) else str(gpus).split(","))]
    result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "gpu_count_visible": torch.cuda.device_count(), "torch": torch.__version__,
              "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "scale_lr": scale_lr, "runs": []}
    runs = result["runs"]
    for g in counts:  # the JSON is rewritten after each run, so a cut-off call keeps the finished ones
        runs.append(_run(g, epochs, [o for o in overlays.split(",") if o], overrides or {}, Path(workdir) / name,
                         log, scale_lr))
        base = runs[0]
        for r in runs:
            if r["train_images_per_s_median"] and base["train_images_per_s_median"]:
                r["speedup_vs_first"] = round(r["train_images_per_s_median"] / base["train_images_per_s_median"], 3)
            r["dice_diff_points_vs_first"] = round(100 * (r["val_mean_dice_last"] - base["val_mean_dice_last"]), 2)
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"{'GPUs':>4} {'images/s':>9} {'speed-up':>8} {'val Dice (last)':>15} {'diff (pts)':>10}")
    for r in runs:
        print(f"{r['gpus']:>4} {r['train_images_per_s_median']!s:>9} {r.get('speedup_vs_first')!s:>8} "
              f"{r['val_mean_dice_last']:>15.4f} {r['dice_diff_points_vs_first']:>10}")


if __name__ == "__main__":
    fire.Fire(main)
