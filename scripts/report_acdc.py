"""Turn the ACDC runs' outputs (scripts/run_experiment.py) into the table, curve and figure of bundle/docs.

    python scripts/report_acdc.py --runs .data/gpu_runs --out bundle/docs

Writes ``results/<name>.json`` (config, commit, GPU, minutes, per-class metrics, validation curve),
``acdc_val_curve.png`` (validation mean Dice against training wall-clock time) and
``acdc_qualitative.png`` (image, ground truth, FIAS and the peers on a few validation slices), and
prints the Markdown table. matplotlib draws the curve and the figure (a dependency of this script and the
tests, not of the package: ``pip install -e ".[test]"`` brings it).
The curve comes from ``val_history.csv``; for runs made before that file was complete it is parsed from
the training log's timestamps (trainer start to each "val_mean_dice" line).
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import textwrap
from datetime import datetime
from pathlib import Path

import fire
import numpy as np

NAMES = {
    "fias_m45_fr_clip": "FIAS-tiny, 4.5 minutes, full-resolution head, gradient clipping 1.0",
    "fias_m45_fr_clip_s1": "FIAS-tiny, 4.5 minutes, head, clipping, seed 1",
    "fias_m45_fr_clip_es2": "FIAS-tiny, 4.5 minutes, head, clipping, end_slice_weight 2",
    "fias_m45_fr_clip_es2_s1": "FIAS-tiny, 4.5 minutes, head, clipping, end_slice_weight 2, seed 1",
    "fias_m12_fr_clip": "FIAS-tiny, 12 minutes, full-resolution head, gradient clipping 1.0",
    "fias_m12_fr_clip_s1": "FIAS-tiny, 12 minutes, full-resolution head, gradient clipping 1.0, seed 1",
    "swinunetr_m12": "MONAI SwinUNETR-2D, 12-minute budget",
    "basicunet_m12": "MONAI BasicUNet, 12-minute budget",
    "fias_m12_fr_clip_tta": "FIAS-tiny, 12 minutes, head, clipping, test-time flips",
    "fias_m12_fr_clip_s1_tta": "FIAS-tiny, 12 minutes, head, clipping, seed 1, test-time flips",
    "swinunetr_m12_tta": "MONAI SwinUNETR-2D, 12 minutes, test-time flips",
    "basicunet_m12_tta": "MONAI BasicUNet, 12 minutes, test-time flips",
    "fias_m12_fr_clip_es2": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2",
    "fias_m12_fr_clip_es2_tta": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2, test-time flips",
    "fias_m12_fr_clip_es2_nolcc": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2, no largest-component step",
    "fias_m12_fr_clip_es2_s1": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2, seed 1",
    "fias_m12_fr_clip_es2_s2": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2, seed 2",
    "fias_m12_fr_clip_es2_s1_tta": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2, seed 1, test-time flips",
    "fias_m12_fr_clip_es2_s2_tta": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2, seed 2, test-time flips",
    "basicunet_m12_s1": "MONAI BasicUNet, 12-minute budget, seed 1",
    "swinunetr_m12_s1": "MONAI SwinUNETR-2D, 12-minute budget, seed 1",
    "basicunet_m12_s1_tta": "MONAI BasicUNet, 12 minutes, seed 1, test-time flips",
    "swinunetr_m12_s1_tta": "MONAI SwinUNETR-2D, 12 minutes, seed 1, test-time flips",
    "fias_m12_fr_clip_es2_ctx1": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2, context_slices 1 (2.5D)",
    "fias_m12_fr_clip_es2_ctx1_tta": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2, 2.5D, test-time flips",
    "fias_m6_fr_clip_es2": "FIAS-tiny, 6 minutes, head, clipping, end_slice_weight 2",
    "fias_m6_fr_clip_es2_s1": "FIAS-tiny, 6 minutes, head, clipping, end_slice_weight 2, seed 1",
    "fias_m6_fr_clip_es2_h0": "FIAS-tiny, 6 minutes, head, clipping, end_slice_weight 2, finest output only",
    "fias_m6_fr_clip_es2_s1_h0": "FIAS-tiny, 6 minutes, head, clipping, end_slice_weight 2, seed 1, finest output only",
    "fias_m6_fr_clip_es2_h01": "FIAS-tiny, 6 minutes, head, clipping, end_slice_weight 2, finest two outputs",
    "fias_m6_fr_clip_es2_s1_h01": "FIAS-tiny, 6 minutes, head, clipping, end_slice_weight 2, seed 1, finest two outputs",
    "fias_m12_fr_clip_es2_r0": "FIAS-tiny, 12 minutes, head, clipping, end_slice_weight 2, seed 0 again",
    "fias_m12_fr_clip_es2_r0_tta": "FIAS-tiny, 12 minutes, head, clipping, es2, seed 0 again, test-time flips",
    "fias_m12_fr_clip_es2_r0_h0": "FIAS-tiny, 12 minutes, head, clipping, es2, seed 0 again, finest output only",
    "fias_m12_fr_clip_es2_r0_h0tta": "FIAS-tiny, 12 minutes, head, clipping, es2, seed 0 again, finest output, flips",
    "fias_m12_fr_clip_es2_h0sel": "FIAS-tiny, 12 minutes, head, clipping, es2, finest output (validated and chosen)",
    "fias_m12_fr_clip_es2_h0sel_tta": "FIAS-tiny, 12 minutes, head, clipping, es2, finest output chosen, flips",
    "fias_m12_fr_clip_es2_h0sel_all3": "FIAS-tiny, 12 minutes, finest output chosen, evaluated with all three outputs",
    "fias_m12_fr_clip_es2_h0sel_s1": "FIAS-tiny, 12 minutes, head, clipping, es2, finest output chosen, seed 1",
    "fias_m12_fr_clip_es2_h0sel_s1_tta": "FIAS-tiny, 12 minutes, finest output chosen, seed 1, test-time flips",
    "fias_m12_fr_clip_es2_h0sel_s1_all3": "FIAS-tiny, 12 minutes, finest output chosen, seed 1, all three outputs",
    "fias_m12_fr_clip_es2_h0sel_s2": "FIAS-tiny, 12 minutes, head, clipping, es2, finest output chosen, seed 2",
    "fias_m12_fr_clip_es2_h0sel_s2_tta": "FIAS-tiny, 12 minutes, finest output chosen, seed 2, test-time flips",
    "fias_m12_fr_clip_es2_h0sel_s2_all3": "FIAS-tiny, 12 minutes, finest output chosen, seed 2, all three outputs",
    "fias_m12_fr_clip_es2_h0sel_s3": "FIAS-tiny, 12 minutes, head, clipping, es2, finest output chosen, seed 3",
    "fias_m12_fr_clip_es2_h0sel_s3_tta": "FIAS-tiny, 12 minutes, finest output chosen, seed 3, test-time flips",
    "fias_m12_fr_clip_es2_h0sel_s3_all3": "FIAS-tiny, 12 minutes, finest output chosen, seed 3, all three outputs",
    "fias_m12_fr_clip_es2_h0sel_s4": "FIAS-tiny, 12 minutes, head, clipping, es2, finest output chosen, seed 4",
    "fias_m12_fr_clip_es2_h0sel_s4_tta": "FIAS-tiny, 12 minutes, finest output chosen, seed 4, test-time flips",
    "fias_m12_fr_clip_es2_h0sel_s5": "FIAS-tiny, 12 minutes, head, clipping, es2, finest output chosen, seed 5",
    "fias_m12_fr_clip_es2_h0sel_s5_tta": "FIAS-tiny, 12 minutes, finest output chosen, seed 5, test-time flips",
    "fias_m12_fr_clip_es4_h0sel_s4": "FIAS-tiny, 12 minutes, acdc_12min.json with end_slice_weight 4, seed 4",
    "fias_m12_fr_clip_es4_h0sel_s4_tta": "FIAS-tiny, 12 minutes, end_slice_weight 4, seed 4, test-time flips",
    "fias_m12_fr_clip_es4_h0sel_s5": "FIAS-tiny, 12 minutes, acdc_12min.json with end_slice_weight 4, seed 5",
    "fias_m12_fr_clip_es4_h0sel_s5_tta": "FIAS-tiny, 12 minutes, end_slice_weight 4, seed 5, test-time flips",
    "fias_m5_h0sel_s0": "FIAS-tiny, 5 minutes, acdc_12min.json's settings, 2D",
    "fias_m5_h0sel_s1": "FIAS-tiny, 5 minutes, acdc_12min.json's settings, 2D, seed 1",
    "fias_m5_h0sel_ctx1_s0": "FIAS-tiny, 5 minutes, acdc_12min.json's settings, 2.5D (context_slices 1)",
    "fias_m5_h0sel_ctx1_s1": "FIAS-tiny, 5 minutes, acdc_12min.json's settings, 2.5D, seed 1",
    "fias_m20_fr_clip_es2_h0sel_s0": "FIAS-tiny, acdc_12min.json with 20 minutes, seed 0",
    "fias_m20_fr_clip_es2_h0sel_s0_cut29": "FIAS-tiny, acdc_12min.json with 20 minutes, seed 0 (session 29)",
    "fias_m20_fr_clip_es2_h0sel_s0_tta": "FIAS-tiny, acdc_12min.json with 20 minutes, seed 0, test-time flips",
    "fias_m20_fr_clip_es2_h0sel_s1": "FIAS-tiny, acdc_12min.json with 20 minutes, seed 1",
    "fias_m20_fr_clip_es2_h0sel_s1_cut29": "FIAS-tiny, acdc_12min.json with 20 minutes, seed 1 (session 29)",
    "fias_m20_fr_clip_es2_h0sel_s1_tta": "FIAS-tiny, acdc_12min.json with 20 minutes, seed 1, test-time flips",
    "fias_m20_fr_clip_es2_h0sel_s2": "FIAS-tiny, acdc_12min.json with 20 minutes, seed 2",
    "fias_m20_fr_clip_es2_h0sel_s2_cut29": "FIAS-tiny, acdc_12min.json with 20 minutes, seed 2 (session 29)",
    "fias_m20_fr_clip_es2_h0sel_s2_tta": "FIAS-tiny, acdc_12min.json with 20 minutes, seed 2, test-time flips",
    "swinunetr_m20_s2": "MONAI SwinUNETR-2D, 20-minute budget, seed 2",
    "swinunetr_m20_s2_cut29": "MONAI SwinUNETR-2D, 20-minute budget, seed 2 (session 29)",
    "swinunetr_m20_s2_cut35": "MONAI SwinUNETR-2D, 20-minute budget, seed 2 (session 35)",
    "swinunetr_m20_s2_tta": "MONAI SwinUNETR-2D, 20 minutes, seed 2, test-time flips",
    "swinunetr_m12_s2": "MONAI SwinUNETR-2D, 12-minute budget, seed 2",
    "swinunetr_m12_s2_tta": "MONAI SwinUNETR-2D, 12 minutes, seed 2, test-time flips",
    "fias_m6_h0sel": "FIAS-tiny, 6 minutes, acdc_12min.json's settings, feature mixing (7 subsets)",
    "fias_m6_h0sel_s1": "FIAS-tiny, 6 minutes, acdc_12min.json's settings, feature mixing, seed 1",
    "fias_m6_h0sel_sep": "FIAS-tiny, 6 minutes, acdc_12min.json's settings, loss#mixing separate",
    "fias_m6_h0sel_sep_s1": "FIAS-tiny, 6 minutes, acdc_12min.json's settings, loss#mixing separate, seed 1",
    "fias_m65_ref": "FIAS-tiny, 6.5 minutes, default recipe",
    "fias_m65_ref_s1": "FIAS-tiny, 6.5 minutes, default recipe, seed 1",
    "fias_m65_ref_s2": "FIAS-tiny, 6.5 minutes, default recipe, seed 2",
    "fias_m65_ref_s3": "FIAS-tiny, 6.5 minutes, default recipe, seed 3",
    "fias_m65_bw2": "FIAS-tiny, 6.5 minutes, border_weight 2",
    "fias_m65_bw2_s1": "FIAS-tiny, 6.5 minutes, border_weight 2, seed 1",
    "fias_m65_bw2_s2": "FIAS-tiny, 6.5 minutes, border_weight 2, seed 2",
    "fias_m65_bw2_s3": "FIAS-tiny, 6.5 minutes, border_weight 2, seed 3",
    "fias_m20_fr_clip_s1": "FIAS-tiny, 20 minutes, full-resolution head, gradient clipping 1.0, seed 1",
    "fias_m20_fr_clip_s2": "FIAS-tiny, 20 minutes, full-resolution head, gradient clipping 1.0, seed 2",
    "fias_m20_fr_clip_bw2": "FIAS-tiny, 20 minutes, full-resolution head, gradient clipping 1.0, border_weight 2",
    "fias_m20_fr_clip_bw2_s1":
        "FIAS-tiny, 20 minutes, full-resolution head, gradient clipping 1.0, border_weight 2, seed 1",
    "fias_m20_fr": "FIAS-tiny, 20 minutes, full-resolution head",
    "fias_m20_fr_s1": "FIAS-tiny, 20 minutes, full-resolution head, seed 1",
    "fias_m20_fr_clip": "FIAS-tiny, 20 minutes, full-resolution head, gradient clipping 1.0",
    "swinunetr_m20_s1": "MONAI SwinUNETR-2D, 20-minute budget, seed 1",
    "fias_m20_fr_last": "FIAS-tiny, 20 minutes, full-resolution head, final weights",
    "fias_m20_fr_s1_last": "FIAS-tiny, 20 minutes, full-resolution head, seed 1, final weights",
    "fias_m20_fr_clip_last": "FIAS-tiny, 20 minutes, full-resolution head, gradient clipping 1.0, final weights",
    "swinunetr_m20_s1_last": "MONAI SwinUNETR-2D, 20-minute budget, seed 1, final weights",
    "fias_m20": "FIAS-tiny, 20-minute budget",
    "basicunet_m20": "MONAI BasicUNet, 20-minute budget",
    "fias_m20_s1": "FIAS-tiny, 20-minute budget, seed 1",
    "fias_m20_aug": "FIAS-tiny, 20 minutes, stronger spatial augmentation",
    "fias_m20_adamw": "FIAS-tiny, 20 minutes, AdamW, weight decay 0.05 (NaN after 29 epochs)",
    "swinunetr_m20": "MONAI SwinUNETR-2D, 20-minute budget",
    "fias_m20_s1_last": "FIAS-tiny, 20-minute budget, seed 1, final weights",
    "fias_m20_aug_last": "FIAS-tiny, 20 minutes, stronger spatial augmentation, final weights",
    "swinunetr_m20_last": "MONAI SwinUNETR-2D, 20-minute budget, final weights",
    "fias_v14_ema": "FIAS-tiny, 7.5 minutes, ema_decay 0.999, alone on the host",
    "fias_v10_h100": "FIAS-tiny, bundle 0.2.8, 7.5-minute budget, alone on the host",
    "fias_v10": "FIAS-tiny, bundle 0.2.8, 7.5-minute budget",
    "fias_v10_fr": "FIAS-tiny, full-resolution head",
    "fias_v10_fr_s1": "FIAS-tiny, full-resolution head, seed 1",
    "basicunet_v10": "MONAI BasicUNet, 7.5-minute budget",
    "fias_v9": "FIAS-tiny, bundle 0.2.7",
    "fias_v9_s1": "FIAS-tiny, bundle 0.2.7, seed 1",
    "fias_v9_aug": "FIAS-tiny, stronger spatial augmentation",
    "fias_v9_lr1e3": "FIAS-tiny, lr 1e-3",
    "basicunet_v9": "MONAI BasicUNet",
    "basicunet_v9_aug": "MONAI BasicUNet, stronger spatial augmentation",
    "swinunetr_v9": "MONAI SwinUNETR-2D (fs 48, v2)",
    "swinunetr_v9_aug": "MONAI SwinUNETR-2D, stronger spatial augmentation",
    "fias_v8": "FIAS-tiny, bundle 0.2.6",
    "fias_v8_s1": "FIAS-tiny, bundle 0.2.6, seed 1",
    "fias_v8_aug": "FIAS-tiny, stronger spatial augmentation",
    "fias_v8_aug_s1": "FIAS-tiny, stronger spatial augmentation, seed 1",
    "fias_v8_b8": "FIAS-tiny, batch 8",
    "fias_v8_b32": "FIAS-tiny, batch 32, lr 1e-3",
    "basicunet_v8": "MONAI BasicUNet",
    "swinunetr_v8": "MONAI SwinUNETR-2D (fs 48, v2)",
    "fias_v7_fused": "FIAS-tiny, bundle 0.2.5 (fused MSDA kernel), x1",
    "fias_v7": "FIAS-tiny, bundle 0.2.5 with the gather MSDA",
    "fias_v7_m9.5": "FIAS-tiny, bundle 0.2.5 with the gather MSDA, 9.5-minute budget",
    "fias_e50_m0_s0": "FIAS-tiny, 50 epochs (no time budget), warm-up 2, NCHW, seed 0",
    "fias_e50_m0_s1": "FIAS-tiny, 50 epochs (no time budget), warm-up 2, NCHW, seed 1",
    "fias_v6": "FIAS-tiny",
    "basicunet_v6": "MONAI BasicUNet",
    "swinunetr_v6": "MONAI SwinUNETR-2D (fs 48, v2)",
    "fias_v6_lcc": "FIAS-tiny, largest component",
    "basicunet_v6_lcc": "MONAI BasicUNet, largest component",
    "swinunetr_v6_lcc": "MONAI SwinUNETR-2D, largest component",
    "fias_w2_v6": "FIAS-tiny, warm-up 2 epochs",
    "fias_w2_v6_lcc": "FIAS-tiny, warm-up 2 epochs, largest component",
    "fias_lr1e-3_w2": "FIAS-tiny, lr 1e-3, warm-up 2",
    "fias_lr1e-3_w2_lcc": "FIAS-tiny, lr 1e-3, warm-up 2, largest component",
    "fias_lr2e-3_w2": "FIAS-tiny, lr 2e-3, warm-up 2 (diverged)",
    "fias_tiny_v7": "FIAS-tiny, bundle 0.2.4 (channels_last, largest component), x1",
    "fias_tiny_v5": "FIAS-tiny",
    "basicunet_v5": "MONAI BasicUNet",
    "swinunetr_v5": "MONAI SwinUNETR-2D (fs 48, v2)",
    "fias_e50_w2_s0": "FIAS-tiny, 50 epochs, warm-up 2, seed 0",
    "fias_e50_w2_s1": "FIAS-tiny, 50 epochs, warm-up 2, seed 1",
    "fias_tiny_pct_aug": "FIAS-tiny, validation every epoch",
    "basicunet_pct_aug": "MONAI BasicUNet, validation every epoch",
    "swinunetr_pct_aug": "MONAI SwinUNETR-2D, validation every epoch",
    "fias_tiny_pct": "FIAS-tiny, no intensity augmentation",
    "fias_tiny_x4": "FIAS-tiny, min-max scaling",
    "basicunet_graph": "MONAI BasicUNet, min-max scaling",
    "swinunetr_graph": "MONAI SwinUNETR-2D, min-max scaling",
    "fias_tiny_ds_final": "FIAS-tiny, min-max, loss on the summed output only",
    "fias_tiny_lr2e-4": "FIAS-tiny, min-max, lr 2e-4",
    "fias_tiny": "FIAS-tiny, min-max (x1 machine, earlier session)",
    "fias_tiny_eager": "FIAS-tiny, min-max, eager step (earlier session)",
    "basicunet_eager": "MONAI BasicUNet, min-max, eager step (earlier session)",
    "swinunetr_eager": "MONAI SwinUNETR-2D, min-max, eager step (earlier session)",
}
# the curve: the default ACDC recipe alone on one H100 (the card of the time-to-accuracy target) and the runs
# of session 10 trained side by side on one host of H200s (FIAS-tiny with and without the full-resolution
# head, BasicUNet); the figure: session 9's three networks from one host (bundle 0.2.7, the same recipe).
# Session 11's 20-minute budget against 7.5 minutes, and earlier recipes' curves and figures, are drawn with
# --curve/--figure and a --tag (see bundle/docs/acdc_results.md)
CURVE_RUNS = "fias_v10_h100,fias_v10,fias_v10_fr,basicunet_v10"
FIGURE_RUNS = "fias_v9,basicunet_v9,swinunetr_v9"
_TS = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_TRAINER = r" - ignite\.engine\.engine\.\w*SupervisedTrainer - INFO - "  # the trainer's own log lines


def _ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def _training_part(log: str) -> str:
    """A run_experiment log's training, before the evaluation's command line (each starts with ``$ ``)."""
    return log.split("$ ")[1] if "$ " in log else log


def _trainer_start(train_part: str) -> datetime | None:
    """When the trainer started (or resumed) in the training part of a log, or None if it never did."""
    start = re.search(_TS + _TRAINER + r"Engine run (?:resuming|starting)", train_part)
    return _ts(start.group(1)) if start else None


def curve_from_log(log: str) -> list[dict]:
    """(seconds since the trainer started, val mean Dice) for every validation in a training log."""
    train_part = _training_part(log)
    t0 = _trainer_start(train_part)
    if t0 is None:
        return []
    rows = []
    for m in re.finditer(_TS + r" - INFO - Epoch\[\d+\] Metrics -- val_mean_dice: ([0-9.]+)", train_part):
        rows.append({"time_s": (_ts(m.group(1)) - t0).total_seconds(), "val_mean_dice": float(m.group(2))})
    for i, r in enumerate(rows):
        r["validation"] = i + 1
    return rows


def _from_training_log(name: str, log: str, gpu: str = "", commit: str = "") -> dict:
    """Results of a run whose evaluation did not finish (it failed, or the call ended first): the best
    validation mean Dice of training (the same protocol metric on the same volumes as the evaluation, without
    per-class values or HD95). The row's config, commit and card come from the line run_experiment writes before
    training (``# run_experiment: {...}``); logs older than that line name only the command, and ``gpu`` /
    ``commit`` (main's ``log_gpu`` / ``log_commit``) say the rest, else "unknown".

    A log in which the trainer neither reached its time budget nor finished its run (an epoch-bound run ends
    with ignite's "Engine run finished") is a training cut off midway (the device machine went back): the note
    says so, and ``cut_after_epoch`` / ``cut_at_minutes`` (since the trainer started) say where, as its best
    validation is then a lower bound of that run's own finish, not its result (a rerun of the same seed is
    another run: it may finish lower)."""
    best = re.findall(r"Key metric: val_mean_dice best value: ([0-9.]+) at epoch: (\d+)", log)
    stop = re.search(r"time budget of ([0-9.]+) min reached after epoch (\d+) \(([0-9.]+) min elapsed\)", log)
    facts = re.search(r"^# run_experiment: (\{.*\})$", log, re.M)
    facts = json.loads(facts.group(1)) if facts else {}
    command = re.search(r"^\$ \S+ (-m monai\.bundle run training .*)$", log, re.M)
    configs = re.search(r"--config_file (\[[^]]*\])", command.group(1)) if command else None
    note = ("the evaluation did not finish; mean DSC is the best validation mean Dice logged during training "
            "(same protocol and volumes), without per-class values or HD95")
    curve, cut = curve_from_log(log), {}
    if stop is None and not re.search(_TRAINER + "Engine run finished", log):
        train_part = _training_part(log)
        epochs = re.findall(_TS + _TRAINER + r"Epoch\[(\d+)\] Complete", train_part)
        t0 = _trainer_start(train_part)
        if epochs and t0 is not None:
            cut = {"cut_after_epoch": int(epochs[-1][1]),
                   "cut_at_minutes": round((_ts(epochs[-1][0]) - t0).total_seconds() / 60, 2)}
        note = ("training was cut off before its time budget ended" + (
            f" (the log ends after epoch {cut['cut_after_epoch']}, {cut['cut_at_minutes']} min after the trainer "
            "started)" if cut else "") + "; mean DSC is the best validation mean Dice logged up to then (same "
            "protocol and volumes as the evaluation), a lower bound of that run's own finish (not of a rerun of "
            "the seed, which may finish lower), without per-class values or HD95 "
            f"({len(curve)} validation{'s' * (len(curve) != 1)})")
    return {
        "name": name,
        "note": note,
        **cut,
        "overlays": facts.get("overlays", ast.literal_eval(configs.group(1))[1:] if configs else []),
        "overrides": facts.get("overrides", {}),
        "command": "python " + command.group(1) if command else "",
        "git_commit": facts.get("git_commit") or commit or "unknown",
        "gpu": facts.get("gpu") or gpu or "unknown",
        "train_wall_minutes_incl_caching": float(stop.group(3)) if stop else None,
        "summary": [{"class_index": "all", "class_name": "mean", "dice": best[-1][0], "hd95": "",
                     "best_epoch": best[-1][1]}] if best else [],
        "val_history": curve,
        "val_history_source": "parsed from the training log timestamps",
    }


def _card(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100'."""
    return next((w for w in gpu.split() if w[:1] in "ABHLV" and w[1:].isdigit()), gpu)


def _names(value) -> list[str]:
    """Run names from a comma-separated string (fire turns ``a,b`` on the command line into a tuple)."""
    return [n for n in (value if isinstance(value, (list, tuple)) else str(value).split(",")) if n]


CLASSES = ("background", "RV", "MYO", "LV")  # acdc.json's label values 0-3


def _common_cases(preds: dict[str, dict]) -> list[str]:
    """The validation volumes whose predictions every run saved (``<case>__pred`` in each ``_val_preds.npz``)."""
    cases = sorted(set.intersection(*({k.split("__")[0] for k in p.files if k.endswith("__pred")} for p in preds.values())))
    if not cases:
        raise ValueError(f"the runs {', '.join(preds)} saved no validation volume in common")
    return cases


def voxel_confusion(label: np.ndarray, pred: np.ndarray, num_classes: int = len(CLASSES)) -> np.ndarray:
    """Voxel counts of one volume: row = ground-truth class, column = predicted class.

    Args:
        label: integer label map (any shape).
        pred: integer prediction of the same shape.
        num_classes: size of the square result.
    """
    if label.shape != pred.shape:
        raise ValueError(f"label {label.shape} and prediction {pred.shape} differ in shape")
    label, pred = label.astype(np.int64).ravel(), pred.astype(np.int64).ravel()
    if min(label.min(initial=0), pred.min(initial=0)) < 0 or max(label.max(initial=0), pred.max(initial=0)) >= num_classes:
        raise ValueError(f"label values outside 0..{num_classes - 1}")
    return np.bincount(num_classes * label + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def confusion_table(preds: dict[str, dict], names: dict[str, str] | None = None) -> str:
    """Markdown table of where each run's errors go, summed over the volumes every run saved: one row per
    (ground truth -> prediction) pair of different classes, in voxels, and each class's predicted / true
    volume. ``preds``: run name -> its ``_val_preds.npz`` (``<case>__label`` / ``<case>__pred``)."""
    names = names or {}
    cases = _common_cases(preds)
    mats = {n: sum(voxel_confusion(p[f"{c}__label"], p[f"{c}__pred"]) for c in cases) for n, p in preds.items()}
    lines = [f"voxels over {len(cases)} volumes ({', '.join(cases)})",
             "| ground truth -> prediction | " + " | ".join(names.get(n, n) for n in mats) + " |",
             "|---|" + "---:|" * len(mats)]
    k = len(CLASSES)
    for t in range(k):
        for q in range(k):
            if t != q:
                lines.append(f"| {CLASSES[t]} -> {CLASSES[q]} | " + " | ".join(str(int(m[t, q])) for m in mats.values()) + " |")
    for c in range(1, k):
        lines.append(f"| {CLASSES[c]}: predicted / true volume | "
                     + " | ".join(f"{m[:, c].sum() / max(m[c].sum(), 1):.3f}" for m in mats.values()) + " |")
    return "\n".join(lines)


def error_distances(label: np.ndarray, pred: np.ndarray, truth: int, predicted: int, ref: int) -> np.ndarray:
    """How far each voxel of ground truth ``truth`` predicted as ``predicted`` lies from the ground truth's
    class ``ref``: the in-plane distance in pixels to the nearest ``ref`` voxel of the same slice (slices along
    the last axis, as the network sees them); ``inf`` on slices without ``ref``.

    For background predicted as MYO with ``ref`` MYO, 1 is a voxel touching the true myocardium (a border
    drawn one pixel too wide); for MYO predicted as background with ``ref`` background, it is the depth
    into the myocardium.

    Args:
        label: integer label map (H, W, Z).
        pred: integer prediction of the same shape.
        truth, predicted, ref: class values.
    """
    from scipy import ndimage

    if label.shape != pred.shape:
        raise ValueError(f"label {label.shape} and prediction {pred.shape} differ in shape")
    out = [np.zeros(0)]
    for z in range(label.shape[-1]):
        lab = label[..., z]
        err = (lab == truth) & (pred[..., z] == predicted)
        if err.any():
            ref_mask = lab == ref
            out.append(ndimage.distance_transform_edt(~ref_mask)[err] if ref_mask.any()
                       else np.full(int(err.sum()), np.inf))
    return np.concatenate(out)


def centroid_offset(volumes: list[tuple[np.ndarray, np.ndarray]], cls: int, min_pixels: int = 20) -> tuple[float, float, int]:
    """Whether predictions are shifted: the mean in-plane offset (rows, columns; pixels) of the predicted class
    ``cls``'s centroid from the true one, over every slice (last axis) of the ``(label, pred)`` volumes where
    both have at least ``min_pixels`` pixels, weighted by the true area; and how many slices that is. A border
    drawn too wide all round moves the centroid by nothing, a shifted prediction by the shift."""
    offsets, weights = [], []
    for label, pred in volumes:
        for z in range(label.shape[-1]):
            true, predicted = label[..., z] == cls, pred[..., z] == cls
            if true.sum() >= min_pixels and predicted.sum() >= min_pixels:
                offsets.append(np.argwhere(predicted).mean(0) - np.argwhere(true).mean(0))
                weights.append(true.sum())
    if not offsets:
        return 0.0, 0.0, 0
    dy, dx = np.average(np.array(offsets), axis=0, weights=weights)
    return float(dy), float(dx), len(offsets)


def border_table(preds: dict[str, dict], names: dict[str, str] | None = None) -> str:
    """Markdown table of how far the myocardium's errors lie from the true border, summed over the volumes
    every run saved (``error_distances``): background predicted as MYO by distance to the true MYO, and MYO
    predicted as background by depth into it. ``preds``: run name -> its ``_val_preds.npz``."""
    names = names or {}
    cases = _common_cases(preds)
    bg, myo = CLASSES.index("background"), CLASSES.index("MYO")
    # the bins and the slices without the reference class add up to all the errors
    bins = [("1 pixel", 0, 1.0), ("1-2 pixels", 1.0, 2.0), ("2-3 pixels", 2.0, 3.0), ("more than 3 pixels", 3.0, np.inf)]
    lines = [f"voxels over {len(cases)} volumes; in-plane distance to the true border",
             "| error | " + " | ".join(names.get(n, n) for n in preds) + " |", "|---|" + "---:|" * len(preds)]
    volumes = {n: [(p[f"{c}__label"], p[f"{c}__pred"]) for c in cases] for n, p in preds.items()}  # read once
    for title, truth, predicted, ref in (("background -> MYO", bg, myo, myo), ("MYO -> background", myo, bg, bg)):
        dist = {n: np.concatenate([error_distances(label, pred, truth, predicted, ref) for label, pred in vols])
                for n, vols in volumes.items()}
        lines.append(f"| {title}, all | " + " | ".join(str(d.size) for d in dist.values()) + " |")
        for label, lo, hi in bins:
            lines.append(f"| {title}, {label} | "
                         + " | ".join(str(int(((d > lo) & (d <= hi) & np.isfinite(d)).sum())) for d in dist.values()) + " |")
        lines.append(f"| {title}, on slices without {CLASSES[ref]} | "
                     + " | ".join(str(int(np.isinf(d).sum())) for d in dist.values()) + " |")
    offsets = {n: centroid_offset(vols, myo) for n, vols in volumes.items()}
    lines.append("| MYO centroid offset, rows / columns (pixels) | "
                 + " | ".join(f"{dy:+.2f} / {dx:+.2f}" for dy, dx, _ in offsets.values()) + " |")
    return "\n".join(lines)


def slice_position_table(preds: dict[str, dict], names: dict[str, str] | None = None) -> str:
    """Markdown table of each class's Dice by position along the stack, summed over the volumes every run
    saved: per volume, the slices that hold the class in the ground truth are cut into a first, a middle
    and a last third (the middle takes the remainder), and each part's voxels are pooled over the volumes
    into one Dice. ACDC's short-axis stacks run from the base (first slices) to the apex. Slices without
    the class in the ground truth are left out, so false positives beyond the ends are not counted here
    (``border_table`` counts MYO's). ``preds``: run name -> its ``_val_preds.npz``.
    """
    names = names or {}
    cases = _common_cases(preds)
    parts = ("first third", "middle third", "last third")
    lines = [f"Dice (%) of the voxels pooled over {len(cases)} volumes, by third of the slices holding the class",
             "| class, slices | " + " | ".join(names.get(n, n) for n in preds) + " |", "|---|" + "---:|" * len(preds)]
    # every array read once (each NpzFile lookup reads it from the file again), as in border_table; the ground
    # truth from the first run only: it is the same in every run
    labels = [next(iter(preds.values()))[f"{c}__label"] for c in cases]
    volumes = {n: [p[f"{c}__pred"] for c in cases] for n, p in preds.items()}
    for cls in CLASSES[1:]:
        value = CLASSES.index(cls)
        overlap = {n: np.zeros(len(parts)) for n in preds}
        total = {n: np.zeros(len(parts)) for n in preds}
        for k, label_map in enumerate(labels):
            label = label_map == value
            held = np.flatnonzero(label.reshape(-1, label.shape[-1]).any(axis=0))
            third = len(held) // 3
            slices = (held[:third], held[third:len(held) - third], held[len(held) - third:])
            label_parts = [label[..., zs] for zs in slices]  # cut once per volume, not once per run
            for n, run_preds in volumes.items():
                pred = run_preds[k] == value
                for i, (zs, label_part) in enumerate(zip(slices, label_parts)):
                    pred_part = pred[..., zs]
                    overlap[n][i] += 2 * np.count_nonzero(pred_part & label_part)
                    total[n][i] += np.count_nonzero(pred_part) + np.count_nonzero(label_part)
        for i, part in enumerate(parts):
            lines.append(f"| {cls}, {part} | " + " | ".join(
                f"{100 * overlap[n][i] / total[n][i]:.2f}" if total[n][i] else "n/a" for n in preds) + " |")
    return "\n".join(lines)


# where the bins of a missed slice's highest class probability meet (missed_slice_table): < 0.1, 0.1-0.3, ...
MISSED_PROBABILITY_EDGES = (0.1, 0.3, 0.5)


def missed_slice_table(preds: dict[str, dict], names: dict[str, str] | None = None) -> str:
    """Markdown table of whole slices a run leaves without a class the ground truth has there, over the volumes
    every run saved: per class the number of such slices (and whether each is the first or the last slice
    holding the class, or one in between) and the ground-truth voxels on them; the slices left with no
    foreground at all though the ground truth has some; and the protocol's mean Dice as predicted and with
    those slices right (each missed slice's class voxels given their class, the rest unchanged), which
    bounds what finding the class on every slice would gain. The saved predictions come after the
    largest-component step, so a slice also counts where that step removed what the network found. It
    cannot have removed a prediction of the whole truth where the truth touches (in-plane 8-neighbours)
    the class predicted on a neighbouring slice, as it would have been connected to it: those slices are
    counted too. Where a run saved each class's highest probability per slice (``__classmax``, run_experiment
    since session 27), its missed slices are also binned by that probability: a class found nowhere on the slice
    (below 0.1) against a near miss (0.3-0.5) or one the argmax had and a later step removed (0.5 or more).
    ``preds``: run name -> its ``_val_preds.npz``.
    """
    from scipy import ndimage

    from fias_monai.metrics import case_dice

    names = names or {}
    cases = _common_cases(preds)
    labels = [next(iter(preds.values()))[f"{c}__label"] for c in cases]  # the same in every run
    rows: dict[str, dict[str, str]] = {}
    edges = MISSED_PROBABILITY_EDGES
    bins = " / ".join([f"< {edges[0]}", *(f"{a}-{b}" for a, b in zip(edges, edges[1:])), f">= {edges[-1]}"])
    for n, run_preds in preds.items():
        missed = {cls: [0, 0, 0, 0] for cls in CLASSES[1:]}  # first, in between, last; voxels
        blank = touching = 0
        has_probability = all(f"{case}__classmax" in run_preds.files for case in cases)
        by_probability = [0] * (len(edges) + 1)
        dice_as_is, dice_fixed = [], []
        for case, label in zip(cases, labels):
            pred = run_preds[f"{case}__pred"]
            fixed = pred.copy()
            blank += int(np.count_nonzero((label > 0).any(axis=(0, 1)) & ~(pred > 0).any(axis=(0, 1))))
            for cls in CLASSES[1:]:
                value = CLASSES.index(cls)
                held = np.flatnonzero((label == value).any(axis=(0, 1)))
                for z in held[~(pred[..., held] == value).any(axis=(0, 1))]:
                    missed[cls][0 if z == held[0] else 2 if z == held[-1] else 1] += 1
                    truth = label[..., z] == value
                    missed[cls][3] += int(np.count_nonzero(truth))
                    near = ndimage.binary_dilation(truth, np.ones((3, 3), bool))
                    neighbours = [t for t in (z - 1, z + 1) if 0 <= t < pred.shape[-1]]
                    touching += any((pred[..., t][near] == value).any() for t in neighbours)
                    fixed[..., z][truth] = value
                    if has_probability:
                        highest = float(run_preds[f"{case}__classmax"][value, z])
                        by_probability[sum(highest >= edge for edge in edges)] += 1
            dice_as_is.append(list(case_dice(pred, label, len(CLASSES)).values()))
            dice_fixed.append(list(case_dice(fixed, label, len(CLASSES)).values()))
        rows[n] = {f"{cls}, slices missed (first / in between / last)": f"{sum(m[:3])} ({m[0]} / {m[1]} / {m[2]})"
                   for cls, m in missed.items()}
        rows[n].update({f"{cls}, its voxels on them": str(m[3]) for cls, m in missed.items()})
        rows[n]["missed slices whose truth touches the class on a neighbouring slice"] = (
            f"{touching} of {sum(sum(m[:3]) for m in missed.values())}")
        rows[n]["slices with foreground left blank"] = str(blank)
        rows[n][f"missed slices by the class's highest probability on them ({bins})"] = (
            " / ".join(map(str, by_probability)) if has_probability else "n/a")
        rows[n]["mean Dice (%) as predicted"] = f"{100 * np.mean(dice_as_is):.2f}"
        rows[n]["mean Dice (%) with the missed slices right"] = f"{100 * np.mean(dice_fixed):.2f}"
    lines = [f"whole slices without a class the ground truth has there, over {len(cases)} volumes",
             "| | " + " | ".join(names.get(n, n) for n in preds) + " |", "|---|" + "---:|" * len(preds)]
    for key in next(iter(rows.values())):
        lines.append(f"| {key} | " + " | ".join(rows[n][key] for n in preds) + " |")
    return "\n".join(lines)


def per_volume_comparison(a: list[dict], b: list[dict],
                          names: tuple[str, str] = ("a", "b")) -> dict[str, tuple[float, int, int]]:
    """How run ``a`` does against run ``b`` volume by volume, from their ``per_case`` rows (one per volume and
    class, ``dice`` in [0, 1]): for each class, and for the volume's mean over the classes, the mean
    difference a - b in Dice points and on how many volumes a is better, out of how many.

    Args:
        names: the two runs' names, for the error messages.

    Raises:
        ValueError: a run has no per-volume rows (a results JSON from before per_case was kept, or none), or the
            two runs were evaluated on different volumes or classes.
    """
    for name, rows in zip(names, (a, b)):
        if not rows:
            raise ValueError(f"{name} has no per-volume rows (per_case) to compare")

    def table(rows):
        t: dict[str, dict[str, float]] = {}
        for row in rows:
            t.setdefault(row["case"], {})[row["class_name"]] = 100 * float(row["dice"])
        return t

    ta, tb = table(a), table(b)
    if set(ta) != set(tb) or any(set(ta[c]) != set(tb[c]) for c in ta):
        raise ValueError(f"{names[0]} and {names[1]} were evaluated on different volumes or classes")
    classes = [c for c in CLASSES[1:] if c in next(iter(ta.values()))]
    diffs = {c: [ta[v][c] - tb[v][c] for v in ta] for c in classes}
    diffs["mean"] = [np.mean([ta[v][c] for c in classes]) - np.mean([tb[v][c] for c in classes]) for v in ta]
    return {c: (float(np.mean(d)), int(sum(x > 0 for x in d)), len(d)) for c, d in diffs.items()}


def late_validation_mean(history: list[dict], fraction: float = 0.25) -> tuple[float, int]:
    """The mean of a run's validation mean Dice over the last ``fraction`` of its training time, and how many
    validations that is. The reported model is the best validation on the reported volumes, a pick that favours
    the run whose validations swing most; this mean is free of it.

    Raises:
        ValueError: the run has no validations.
    """
    if not history:
        raise ValueError("no validations to average")
    start = (1 - fraction) * history[-1]["time_s"]
    late = [row["val_mean_dice"] for row in history if row["time_s"] >= start]
    return float(np.mean(late)), len(late)


def best_validation_by(history: list[dict], minutes: float) -> float:
    """The best validation mean Dice a run had logged ``minutes`` after its trainer started: where runs stood at
    one time, the one measure a run cut short shares with finished runs of its budget. It is not the score of a
    run given that many minutes: the learning rate follows a cosine over the whole budget.

    Raises:
        ValueError: the run logged no validation by then.
    """
    by = [row["val_mean_dice"] for row in history if row["time_s"] <= 60 * minutes]
    if not by:
        raise ValueError(f"no validation by {minutes:g} min")
    return float(max(by))


def run_mean(rows: list[dict], by_minutes: float = 0.0) -> dict[str, tuple[float, list[float]]]:
    """The mean over several runs (the seeds of one recipe) of what the tables give for each: mean Dice, each
    class's Dice and the mean HD95 from the evaluation, the last validation (the final weights' score) and the
    mean over the last quarter of training (``late_validation_mean``); each with the runs' own values, Dice in
    percent, HD95 in voxels. A measure some run lacks is left out rather than averaged over fewer runs: a row cut
    before its budget ended (``cut_at_minutes``) has no per-class values or HD95, and its last validations are
    not those of the finished run. With ``by_minutes``, also the best validation by then
    (``best_validation_by``), which a cut row has if it was cut no earlier.

    Raises:
        ValueError: no runs.
    """
    if not rows:
        raise ValueError("no runs to average")
    each: list[dict[str, float]] = []
    for r in rows:
        by = {row["class_name"]: row for row in r.get("summary", [])}
        values = {"mean": 100 * float(by["mean"]["dice"])} if "mean" in by else {}
        values.update({c: 100 * float(by[c]["dice"]) for c in CLASSES[1:] if c in by})
        if by.get("mean", {}).get("hd95") not in (None, ""):
            values["HD95"] = float(by["mean"]["hd95"])
        if r.get("val_history") and "cut_at_minutes" not in r:
            values["last validation"] = 100 * float(r["val_history"][-1]["val_mean_dice"])
            values["last-quarter mean"] = 100 * late_validation_mean(r["val_history"])[0]
        if by_minutes and r.get("cut_at_minutes", by_minutes) >= by_minutes:
            with contextlib.suppress(ValueError):  # no validation by then: a measure this run lacks
                values[f"best by {by_minutes:g} min"] = 100 * best_validation_by(r.get("val_history", []), by_minutes)
        each.append(values)
    shared = [k for k in each[0] if all(k in v for v in each)]
    return {k: (float(np.mean([v[k] for v in each])), [v[k] for v in each]) for k in shared}


def pooled_comparison(
        comparisons: list[dict[str, tuple[float, int, int]]]) -> dict[str, tuple[float, list[float], int, int]]:
    """Several pairs' ``per_volume_comparison`` (one per seed, say) together: for each class, the mean of the
    pairs' mean differences (each pair weighs the same), those differences, and on how many of all the pairs'
    volumes the first run is better, out of how many.
    """
    if not comparisons:
        raise ValueError("no comparisons to pool")
    out = {}
    for c in comparisons[0]:
        diffs = [cmp[c][0] for cmp in comparisons]
        out[c] = (float(np.mean(diffs)), diffs, sum(cmp[c][1] for cmp in comparisons),
                  sum(cmp[c][2] for cmp in comparisons))
    return out


def _titled_figure(rows: list[np.ndarray], columns: list[str], cases: list[str], zs: list[tuple[int, int, str]],
                   per_case: dict[str, list[dict]], path: Path, gap: int = 2) -> None:
    """The panels of compare_panel (one row image per case, tiles ``gap`` pixels apart) with what the paper's
    figure states in text: column titles, the case and slice of each row, each prediction's 3D Dice per class
    on that case (from the run's evaluation), and the colour key."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from fias_monai.visualize import DEFAULT_CLASS_COLORS

    n = len(columns)
    widths = [r.shape[1] for r in rows]
    fig, axes = plt.subplots(len(rows), 1, figsize=(2.3 * n, 2.75 * len(rows)), dpi=120, squeeze=False,
                             gridspec_kw={"height_ratios": [r.shape[0] / w for r, w in zip(rows, widths)]})
    classes = CLASSES[1:]  # the foreground classes
    for ax, row, w, case, (z, depth, why) in zip(axes[:, 0], rows, widths, cases, zs):
        ax.imshow(row)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        tile = (w - gap * (n - 1)) / n
        centres = [(tile + gap) * i + tile / 2 for i in range(n)]
        for x, title in zip(centres, columns):  # wrapped to the tile: long run names would run into their neighbours
            ax.text(x, -6, textwrap.fill(title, 24), ha="center", va="bottom", fontsize=7.5)
        ax.set_ylabel(f"{case}\nslice {z} of {depth} (0-based,\n{why})", fontsize=7.5)
        for x, name in zip(centres[2:], per_case):
            dice = {d["class_name"]: 100 * float(d["dice"]) for d in per_case[name] if d["case"] == case}
            if dice:
                ax.text(x, row.shape[0] + 4, "  ".join(f"{c} {dice[c]:.1f}" for c in classes if c in dice),
                        ha="center", va="top", fontsize=6.5)
    # compare_panel colours label value i with DEFAULT_CLASS_COLORS[i]; acdc.json's labels are RV 1, MYO 2, LV 3
    key = [Patch(color=DEFAULT_CLASS_COLORS[i + 1], label=c) for i, c in enumerate(classes)]
    fig.legend(handles=key, loc="lower center", ncol=3, fontsize=8, frameon=False,
               title="3D Dice (%) of each prediction on its case, under it", title_fontsize=7.5)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def plot_validation_curve(runs: dict[str, dict], path: Path) -> None:
    """Draw validation mean Dice against training wall-clock time, one line per run in the order given, and save
    it as ``path``. A validation below half of its run's best (a collapse) is marked under the axis instead.

    Args:
        runs: run name to its results (``val_history`` rows of ``time_s`` and ``val_mean_dice``, ``gpu``, and
            ``cut_at_minutes`` for a run cut before its budget ended).
        path: the PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = list(runs)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    gpus = {runs[n]["gpu"] for n in drawn}  # runs on different cards name theirs in the legend
    # a validation below half of its run's best is a collapse (one such point, 0.00, would squeeze every curve
    # into the top tenth of a 0-100 axis): the axis starts above it, and it is marked at the bottom and named
    collapsed, colours, kept = [], {}, []
    for name in drawn:
        r = runs[name]
        best = max((row["val_mean_dice"] for row in r["val_history"]), default=0.0)
        keep = [row for row in r["val_history"] if row["val_mean_dice"] >= best / 2]
        collapsed += [(name, row) for row in r["val_history"] if row["val_mean_dice"] < best / 2]
        kept += [row["val_mean_dice"] for row in keep]
        label = NAMES.get(name, name) + (f" ({_card(r['gpu'])})" if len(gpus) > 1 else "")
        if "cut_at_minutes" in r:  # a row whose machine went back before its budget ended
            label += f", cut at {r['cut_at_minutes']:.0f} min"
        line, = ax.plot([row["time_s"] / 60 for row in keep], [100 * row["val_mean_dice"] for row in keep],
                        marker=".", label=label)
        colours[name] = line.get_color()
    ax.axhline(90, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training wall-clock time (min)")
    ax.set_ylabel("validation mean Dice (%)")
    card = f", {gpus.pop()}" if len(gpus) == 1 else ""
    ax.set_title(f"ACDC val.list, 3D protocol{card} (one GPU per run)", fontsize=9)
    # from the decade below the lowest drawn validation: the plateau and the 90 line stay readable
    floor = 10 * int(10 * min(kept, default=0.0))
    ax.set_ylim(floor, 100)
    for name in dict.fromkeys(n for n, _ in collapsed):  # one note per run, however many of its points are off
        rows = [row for n, row in collapsed if n == name]
        minutes = [row["time_s"] / 60 for row in rows]
        ax.plot(minutes, [floor + 0.4] * len(rows), ls="", marker="v", color=colours[name], clip_on=False)
        when = f"{minutes[0]:.1f}" if len(rows) == 1 else f"{minutes[0]:.1f}-{minutes[-1]:.1f}"
        values = ", ".join(f"{100 * row['val_mean_dice']:.2f}" for row in rows)
        # one point: the note ends left of it; several: it starts right of the last one (a long note, kept on the axes)
        anchor, dx, ha = (minutes[0], -6, "right") if len(rows) == 1 else (minutes[-1], 6, "left")
        ax.annotate(f"{values} at {when} min (off the axis)", (anchor, floor + 0.4), xytext=(dx, 2),
                    textcoords="offset points", ha=ha, fontsize=7)
    ax.grid(alpha=0.3)
    if len(drawn) > 4:
        # more long labels than an empty corner holds would cover the curves' early minutes, dips included:
        # the legend goes under the axes, and the figure grows by its height
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        fig.set_size_inches(6, 4 + 0.16 * len(drawn))
    else:
        # with one collapse marked at the bottom, the legend sits just above its note; a run with several points
        # off the axis (a slow start) rises through that corner, so matplotlib picks the emptiest place instead
        one_each = len(collapsed) == len({n for n, _ in collapsed})
        above_note = {"loc": "lower right", "bbox_to_anchor": (1, 0.06)} if collapsed and one_each else {}
        ax.legend(fontsize=8, **above_note)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _docs_result(out_dir: Path, name: str) -> dict:
    """An earlier session's row: its JSON in ``out_dir``/results, or {} if there is none."""
    path = out_dir / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main(runs: str = ".data/gpu_runs", out: str = "bundle/docs", curve: str = CURVE_RUNS,
         figure: str = FIGURE_RUNS, cases: str | None = None, tag: str = "", confusion: str = "",
         versus: str = "", border: str = "", positions: str = "", missed: str = "", late: str = "",
         mean: str = "", by_minutes: float = 0.0, log_gpu: str = "", log_commit: str = "") -> None:
    """Args:
        runs: folder of run_experiment outputs (``<name>_log.txt``, ``_results.json``, ``_val_preds.npz``).
        out: the bundle's docs folder.
        curve: comma-separated run names drawn in the validation curve (empty: none drawn, none written).
        figure: comma-separated run names of the qualitative figure's columns.
        cases: comma-separated saved volumes shown as rows (default: the first and the last volume the
            first figure run saved: patient019 and patient021, the case min-max scaling made hard), each at its
            slice with the most ground truth, or at slice z with ``case:z`` (e.g. ``patient050_frame01:8``).
        tag: appended to the two PNG names (``--tag _minmax`` for the previous recipe's runs).
        confusion: comma-separated run names whose saved volumes' voxel confusion is printed (where each
            run's errors go: ``confusion_table``).
        versus: comma-separated ``a:b`` pairs of runs compared volume by volume (``per_volume_comparison``);
            with several pairs (one change over several seeds), also all of them together (``pooled_comparison``).
        border: comma-separated run names whose myocardium errors are binned by distance to the true
            border (``border_table``).
        positions: comma-separated run names whose Dice is split by position along the stack, first, middle
            and last third of each class's slices (``slice_position_table``).
        missed: comma-separated run names whose whole-slice misses are counted (``missed_slice_table``).
        late: comma-separated run names whose best, last and last-quarter mean validation are printed
            (``late_validation_mean``: a score free of the best-checkpoint pick).
        mean: groups of runs separated by ``;``, each comma-separated (the seeds of one recipe), whose means are
            printed (``run_mean``: Dice per class, HD95, last validation, last-quarter mean, with each run's value).
        by_minutes: with ``late`` and ``mean``, also the best validation logged by this many minutes after the
            trainer started (``best_validation_by``: runs cut short beside finished ones, at a common time).
        log_gpu, log_commit: the card and commit of runs reported from their training log alone (no results
            JSON) whose log predates run_experiment's ``# run_experiment:`` line, which records both.

    Curve, ``versus``, ``late`` and ``mean`` runs missing from ``runs`` are read from their JSONs in ``out``/results
    (earlier sessions' rows).
    """
    runs_dir, out_dir = Path(runs), Path(out)
    (out_dir / "results").mkdir(parents=True, exist_ok=True)
    results = {}
    logged = {p.name[: -len("_log.txt")] for p in runs_dir.glob("*_log.txt")}
    # a row evaluated again with other settings (run_experiment --eval_tag) shares its training's log
    retagged = {p.name[: -len("_results.json")] for p in runs_dir.glob("*_results.json")} - logged
    for name in sorted(logged | retagged):
        path = runs_dir / f"{name}_results.json"
        if path.exists():
            r = json.loads(path.read_text())
        else:  # training finished but evaluation did not: keep what the training log measured
            r = _from_training_log(name, (runs_dir / f"{name}_log.txt").read_text(errors="replace"), log_gpu,
                                   log_commit)
        base = name if name in logged else max((n for n in logged if name.startswith(n + "_")), key=len, default=None)
        if base is None:
            continue
        log = (runs_dir / f"{base}_log.txt").read_text(errors="replace")
        history = r["val_history"]
        if len(history) < 2:  # written by a MetricHistoryHandler that missed repeated validations
            history = curve_from_log(log)
            r["val_history_source"] = "parsed from the training log timestamps"
        r["val_history"] = [{k: float(v) for k, v in row.items()} for row in history]
        epochs = re.findall(r"Epoch\[(\d+)\] Complete", _training_part(log))
        # the log may hold only an evaluation (a re-run after a cut-off call): the curve counts epochs too
        r["epochs_trained"] = max([int(e) for e in epochs] + [len(r["val_history"])]) or None
        # r keeps per_case in the docs' JSON since session 13: per-volume comparisons with later rows need it
        results[r["name"]] = r
        (out_dir / "results" / f"{r['name']}.json").write_text(json.dumps(r, indent=1))

    print("| network | mean DSC | RV | MYO | LV | mean HD95 (voxels) | epochs | training minutes | GPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        by = {row["class_name"]: row for row in r["summary"]}
        pct = lambda c: f"{100 * float(by[c]['dice']):.2f}" if c in by else "n/a"  # noqa: E731
        hd = f"{float(by['mean']['hd95']):.2f}" if by.get("mean", {}).get("hd95") not in (None, "") else "n/a"
        minutes = f"cut at {r['cut_at_minutes']}" if "cut_at_minutes" in r else r["train_wall_minutes_incl_caching"]
        print(f"| {NAMES.get(name, name)} | {pct('mean')} | {pct('RV')} | {pct('MYO')} | {pct('LV')} | "
              f"{hd} | {r['epochs_trained']} | {minutes} | {r['gpu']} |")
        first90 = next((row["time_s"] for row in r["val_history"] if row["val_mean_dice"] >= 0.90), None)
        print(f"  {name}: first val mean Dice >= 0.90 at "
              f"{'%.1f min' % (first90 / 60) if first90 is not None else 'never'}; "
              f"GPU utilisation {r.get('gpu_util_mean_during_training')} %")

    def result(name: str) -> dict:
        """This report's row, else an earlier session's JSON in the docs, else {}; each JSON read once, however
        many options name the run."""
        if name not in results:
            results[name] = _docs_result(out_dir, name)
        return results[name]

    drawn = [n for n in _names(curve) if result(n)]
    # an empty --curve draws nothing, so the docs' curve of that name is left as it is
    if drawn:
        plot_validation_curve({n: result(n) for n in drawn}, out_dir / f"acdc_val_curve{tag}.png")
    elif _names(curve):
        print(f"--curve: no results of {', '.join(_names(curve))}; no curve drawn")

    # the tables of saved predictions, in the order they are printed, each with the option naming its runs
    tables = ((confusion, confusion_table), (border, border_table), (positions, slice_position_table),
              (missed, missed_slice_table))
    # each run's saved predictions opened once, for the figure and the tables alike
    saved_preds = {n: np.load(runs_dir / f"{n}_val_preds.npz")
                   for n in {*_names(figure), *(n for option, _ in tables for n in _names(option))}
                   if (runs_dir / f"{n}_val_preds.npz").exists()}
    order = [n for n in _names(figure) if n in saved_preds]
    if order:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from fias_monai.visualize import compare_panel

        ref = saved_preds[order[0]]
        saved = sorted({k.split("__")[0] for k in ref.files})
        rows = _names(cases) if cases else sorted({saved[0], saved[-1]})
        panels, zs, cases = [], [], []
        for row in rows:  # "case" (its slice with the most ground truth) or "case:z" (slice z)
            case, _, chosen = row.partition(":")
            if case not in saved:
                raise SystemExit(f"--cases {row}: {case} is not among {order[0]}'s saved volumes ({', '.join(saved)})")
            image, label = ref[f"{case}__image"], ref[f"{case}__label"]
            depth = label.shape[-1]
            if chosen and not (chosen.isdigit() and int(chosen) < depth):
                raise SystemExit(f"--cases {row}: {case} has slices 0 to {depth - 1}")
            z = int(chosen) if chosen else int(np.argmax((label > 0).sum(axis=(0, 1))))
            zs.append((z, depth, "chosen" if chosen else "the most ground truth"))
            cases.append(case)
            panels.append(compare_panel(image, label, {NAMES.get(n, n): saved_preds[n][f"{case}__pred"] for n in order},
                                        out_dir / f".panel_{len(panels)}.png", slices=[z]))
        _titled_figure([plt.imread(p) for p in panels], ["image", "ground truth", *(NAMES.get(n, n) for n in order)],
                       cases, zs, {n: result(n).get("per_case", []) for n in order},
                       out_dir / f"acdc_qualitative{tag}.png")
        for p in panels:
            Path(p).unlink()
        print("qualitative columns: image, ground truth, " + ", ".join(NAMES.get(n, n) for n in order), "; cases", cases)
    for option, table in tables:
        chosen = {n: saved_preds[n] for n in _names(option) if n in saved_preds}
        if chosen:
            print(table(chosen, NAMES))

    def stop(option: str, error: ValueError) -> SystemExit:  # a named run lacks what the option reads: say where
        return SystemExit(f"{option}: {error} (runs read from {runs_dir} and {out_dir / 'results'})")

    for name in _names(late):
        r = result(name)
        history = r.get("val_history", [])
        try:
            late_mean, n = late_validation_mean(history)
            best_by = best_validation_by(history, by_minutes) if by_minutes else None
        except ValueError as e:
            raise stop(f"--late {name}", e) from None
        by = "" if best_by is None else f", best by {by_minutes:g} min {100 * best_by:.2f}"
        cut = r.get("cut_at_minutes")  # its last quarter is of the training it had, not of its budget
        print(f"{name}: validation mean Dice best {100 * max(row['val_mean_dice'] for row in history):.2f}, "
              f"last {100 * history[-1]['val_mean_dice']:.2f}, mean over the last quarter of training "
              f"{100 * late_mean:.2f} ({n} validation{'s' * (n != 1)}{f'; cut at {cut} min' if cut else ''}){by}")
    # fire turns a single group "a,b" into a tuple, and leaves "a,b;c" a string
    for names in ([list(mean)] if isinstance(mean, (list, tuple)) else [_names(g) for g in str(mean).split(";") if g]):
        group = {n: result(n) for n in names}
        unknown = [n for n, r in group.items() if not r]
        if unknown:
            raise SystemExit(f"--mean: no results of {', '.join(unknown)} in {runs_dir} or {out_dir / 'results'}")
        averaged = run_mean(list(group.values()), by_minutes)
        cut = [n for n, r in group.items() if "cut_at_minutes" in r]
        print(f"mean of {', '.join(names)} ({len(names)} run{'s' if len(names) > 1 else ''}"
              + (f"; cut before the end of the budget, their best validation by then a lower bound: {', '.join(cut)}"
                 if cut else "") + "):")
        for k, (m, values) in averaged.items():
            print(f"  {k}: {m:.2f} ({', '.join(f'{v:.2f}' for v in values)})")
    comparisons = []
    for pair in _names(versus):
        a, b = pair.split(":")
        rows = [result(n).get("per_case", []) for n in (a, b)]
        try:  # an unknown run, or one whose JSON predates per-volume rows (before session 13), stops the report
            comparisons.append(per_volume_comparison(*rows, names=(a, b)))
        except ValueError as e:
            raise stop(f"--versus {pair}", e) from None
        print(f"{a} against {b}, volume by volume:")
        for c, (d, better, n) in comparisons[-1].items():
            print(f"  {c}: {d:+.2f} Dice points, better on {better} of {n} volumes")
    if len(comparisons) > 1:  # the same change over several seeds: its mean effect and how often it helped
        print(f"the {len(comparisons)} pairs together:")
        for c, (d, each, better, n) in pooled_comparison(comparisons).items():
            print(f"  {c}: {d:+.2f} Dice points (pairs: {', '.join(f'{x:+.2f}' for x in each)}), "
                  f"better on {better} of {n} volumes")


if __name__ == "__main__":
    fire.Fire(main)
