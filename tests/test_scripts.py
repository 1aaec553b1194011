"""The experiment script behind the ACDC table (``scripts/run_experiment.py``), on CPU with a tiny network.

* a row trains once and evaluates; ``--eval_tag`` evaluates the same trained model again with other
  evaluation settings into ``<name>_<tag>_results.json`` without training again;
* a ``None`` override is refused before anything runs (MONAI's bundle CLI would drop it silently).

And the label-resampling ceiling of ``scripts/resolution_ceiling.py`` on a synthetic label.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

TINY = {"network_def#embed_dims": [24, 48, 96, 192], "network_def#depths": [1, 1, 1, 1], "image_size": [64, 64],
        "epochs": 1, "batch_size": 2, "num_workers": 0, "cache_workers": 1}


def _run_experiment(tmp_path, overrides: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/run_experiment.py", "--name", "row", "--overlays", "", "--save_preds", "0",
           "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--overrides", repr(overrides), *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_run_experiment_evaluates_a_trained_row_again_under_an_eval_tag(tmp_path):
    overrides = {**TINY, "dataset_dir": str(tmp_path / "demo")}
    first = _run_experiment(tmp_path, overrides)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = _run_experiment(tmp_path, overrides, "--eval_tag", "lcc",
                            "--eval_overrides", repr({"keep_largest_component": True}))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "training already done" in again.stdout

    out = tmp_path / "out"
    plain, tagged = (json.loads((out / f"{n}_results.json").read_text()) for n in ("row", "row_lcc"))
    assert (plain["name"], tagged["name"]) == ("row", "row_lcc")
    assert plain["eval_overrides"] == {} and tagged["eval_overrides"] == {"keep_largest_component": True}
    assert [r["class_name"] for r in tagged["summary"]] == [r["class_name"] for r in plain["summary"]]
    log = (out / "row_log.txt").read_text()
    assert log.count("monai.bundle run training") == 1 and log.count("monai.bundle run evaluating") == 2
    assert "--keep_largest_component True" in log
    bundle = tmp_path / "runs" / "row" / "bundle"
    assert (bundle / "eval" / "metrics_summary.csv").is_file() and (bundle / "eval_lcc" / "metrics_summary.csv").is_file()


def test_run_experiment_refuses_a_none_override_before_running(tmp_path):
    proc = _run_experiment(tmp_path, {**TINY, "max_minutes": None})
    assert proc.returncode != 0
    assert "['max_minutes'] are None" in proc.stderr and "max_minutes: 0" in proc.stderr
    assert not (tmp_path / "out" / "row_log.txt").exists()  # nothing was started


def test_resolution_ceiling_is_exact_at_stride_1_only_with_nearest_exact():
    spec = importlib.util.spec_from_file_location("resolution_ceiling", REPO / "scripts" / "resolution_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ceiling = module.ceiling
    label = np.zeros((216, 200, 2), np.uint8)
    yy, xx = np.mgrid[:216, :200]
    r = np.hypot(yy - 100, xx - 90)
    label[(r > 22) & (r < 27)] = 2  # a thin ring, as the myocardium
    label[r <= 22] = 3
    assert np.array_equal(ceiling(label, 4, 1, mode="nearest-exact"), label)
    shifted = ceiling(label, 4, 1, mode="nearest")
    assert 0 < (shifted != label).sum() < 0.05 * label.size  # PyTorch's floor moves the ring's edges
    coarse = ceiling(label, 4, 4, mode="nearest-exact")
    assert (coarse != label).sum() > 0 and set(np.unique(coarse)) == {0, 2, 3}  # stride 4 blurs, keeps the ring
