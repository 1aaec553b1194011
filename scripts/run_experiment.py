"""Train and evaluate one row of the ACDC table through the bundle, and write its results JSON.

Runs exactly the commands a user runs (``python -m monai.bundle run training`` then ``evaluating``)
with the given config overlays and overrides, records wall-clock minutes, the GPU, the git commit
(``fias_monai.utils.source_commit``: ``+dirty`` for uncommitted changes, the ``GIT_COMMIT`` env var where the tree
is no git checkout), GPU utilisation samples, the validation curve
(``val_history.csv``) and the per-class metrics, and saves the predictions of a few validation volumes
(uint8 npz) for the qualitative figure. Both files are written atomically, the results JSON first: its presence
marks an evaluated row, and ``<name>_val_preds.npz`` marks the predictions saved (a job cut off while they are
being saved keeps the row).

    python scripts/run_experiment.py --name fias_tiny --overlays bundle/configs/acdc.json \
        --workdir /tmp/runs --out results/ --overrides '{"dataset_dir": "/tmp/acdc"}'

The same row evaluated again with other evaluation settings (the training is reused, not repeated;
results in ``<name>_<eval_tag>_results.json``):

    python scripts/run_experiment.py --name fias_tiny --overlays bundle/configs/acdc.json ... \
        --eval_tag lcc --eval_overrides '{"keep_largest_component": True}'
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import fire

from fias_monai.utils import atomic_path, bundle_cli_args, source_commit

# the line before the training command in the log: the row's facts as JSON (scripts/report_acdc.py reads it back)
RUN_LINE = "# run_experiment: "


def _visible_gpu() -> str:
    """The index nvidia-smi knows the run's GPU by: the first of CUDA_VISIBLE_DEVICES (nvidia-smi ignores it)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"


def _gpu_sampler(samples: list, stop: threading.Event) -> None:
    # the run's own GPU, so that runs side by side on one host (one GPU each) each sample their own card
    gpu = _visible_gpu()
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout.strip().splitlines()[0]
            util, mem = (float(v) for v in out.split(","))
            samples.append({"t": time.time(), "util": util, "mem_mib": mem})
        except Exception:
            pass
        stop.wait(1.0)


def _gpu_name() -> str:
    """The run's card as nvidia-smi names it ("NVIDIA H200"), "cpu" without one; no CUDA context in this process."""
    try:
        return subprocess.run(["nvidia-smi", "-i", _visible_gpu(), "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:
        return "cpu"


def _bundle(run_id: str, configs: list[str], overrides: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(configs)] + overrides
    start = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise SystemExit(f"{run_id} failed (exit {proc.returncode}); see {log}")
    return time.time() - start


def main(name: str, overlays: str, workdir: str = "/tmp/runs", out: str = "results", save_preds: int | None = None,
         overrides: dict | None = None, eval_tag: str = "", eval_overrides: dict | None = None) -> None:
    """Args (beyond the module's examples):
        save_preds: how many validation volumes' predictions to save (``<name>_val_preds.npz``). Default: 3
            for a training row, none for a re-evaluation (``eval_tag``). A re-evaluation that asks for them
            saves its own (``<name>_<eval_tag>_val_preds.npz``) with ``eval_overrides`` applied, e.g. without
            the largest-component step; one that loads another checkpoint than ``models/model.pt`` is refused,
            as the predictions come from that file.
    """
    if eval_tag and save_preds and any(k.startswith("validate#handlers") for k in (eval_overrides or {})):
        raise SystemExit(f"--save_preds with --eval_tag {eval_tag}: the predictions come from models/model.pt, and "
                         "these evaluation overrides change the evaluation's checkpoint loader")
    save_preds = (0 if eval_tag else 3) if save_preds is None else save_preds
    overlays_list = [o for o in overlays.split(",") if o]
    run_dir = Path(workdir) / name
    bundle_root = run_dir / "bundle"
    (bundle_root / "models").mkdir(parents=True, exist_ok=True)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{name}_log.txt"
    overrides = {"bundle_root": str(bundle_root), **(overrides or {})}
    common = bundle_cli_args(overrides)
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_gpu_sampler, args=(samples, stop), daemon=True)
    sampler.start()
    # a finished training is recorded, so that a call cut off during evaluation can be re-run and only
    # evaluates (the checkpoint in the workdir is kept)
    done_file = run_dir / "training_done.json"
    run_key = {"overlays": overlays_list, "overrides": overrides}
    # read once: the log's first line and the results JSON name the same commit and card
    commit, gpu = source_commit(), _gpu_name()
    if done_file.exists():
        done = json.loads(done_file.read_text())
        if done.get("run") != run_key:
            raise SystemExit(f"{done_file}: a training with other settings ({done.get('run')}) finished under the "
                             f"name {name!r}; choose another --name or delete {run_dir}")
        train_s, train_start, train_end = done["train_s"], done["start"], done["end"]
        samples.extend(done["gpu_samples"])
        print(f"{name}: training already done ({train_s / 60:.2f} min), evaluating only")
    else:
        # what the results JSON records, written first: a row whose evaluation never finishes (a call cut off)
        # is still reported from its log with the right config, commit and card (report_acdc._from_training_log)
        with open(log, "a") as f:
            f.write(RUN_LINE + json.dumps({"name": name, "overlays": overlays_list, "overrides": overrides,
                                           "git_commit": commit, "gpu": gpu}, default=str) + "\n")
        train_start = time.time()
        train_s = _bundle("training", ["bundle/configs/train.json", *overlays_list], common, log)
        train_end = time.time()
        done_file.write_text(json.dumps({"run": run_key, "train_s": train_s, "start": train_start, "end": train_end,
                                         "gpu_samples": list(samples)}))
    eval_dir = bundle_root / (f"eval_{eval_tag}" if eval_tag else "eval")
    eval_args = common + bundle_cli_args({"output_dir": eval_dir, **(eval_overrides or {})})
    eval_s = _bundle("evaluating", ["bundle/configs/train.json", *overlays_list, "bundle/configs/evaluate.json"],
                     eval_args, log)
    stop.set()
    sampler.join()

    import torch

    summary = list(csv.DictReader(open(eval_dir / "metrics_summary.csv")))
    per_case = list(csv.DictReader(open(eval_dir / "metrics_per_case.csv")))
    history = list(csv.DictReader(open(bundle_root / "logs" / "val_history.csv")))
    train_util = [s["util"] for s in samples if train_start + 60 < s["t"] < train_end]
    result_name = f"{name}_{eval_tag}" if eval_tag else name
    result = {
        "name": result_name,
        "overlays": overlays_list,
        "overrides": overrides,
        "eval_overrides": eval_overrides or {},
        "command": f"python -m monai.bundle run training --config_file \"{['bundle/configs/train.json', *overlays_list]}\" "
                   + " ".join(common),
        "git_commit": commit,
        "gpu": gpu,  # nvidia-smi's name, as in the log's first line, without a CUDA context here
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch": torch.__version__,
        "train_wall_minutes_incl_caching": round(train_s / 60, 2),
        "eval_wall_minutes": round(eval_s / 60, 2),
        "gpu_util_mean_during_training": round(sum(train_util) / max(1, len(train_util)), 1),
        "gpu_util_samples": len(train_util),
        "summary": summary,
        "val_history": history,
        "per_case": per_case,
    }
    # before the predictions: saving them takes longer than the evaluation (a fresh process, every volume through
    # the preprocessing again), and a device call that ended during it lost four evaluated rows in session 16
    with atomic_path(out_dir / f"{result_name}_results.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("name", "gpu", "train_wall_minutes_incl_caching",
                                             "gpu_util_mean_during_training")}))
    for row in summary:
        print(row)
    if save_preds:
        _save_predictions(result_name, overlays_list, {**overrides, **(eval_overrides or {})}, out_dir, save_preds, log)


def _save_predictions(name, overlays_list, overrides, out_dir, n, log) -> None:
    """Predictions of the first n validation volumes on the label grid, for the qualitative figure, and per slice
    each class's highest softmax probability at the network's grid before any postprocessing (``__classmax``,
    classes x slices), which tells a slice the network nearly found from one it did not see (report_acdc --missed)."""
    code = f"""
import numpy as np, torch, json
from monai.bundle import ConfigParser
from fias_monai.utils import atomic_path
p = ConfigParser()
p.read_config({['bundle/configs/train.json', *overlays_list, 'bundle/configs/evaluate.json']!r})
p.update({ {k: (json.loads(v) if isinstance(v, str) and v[:1] in '[{' else v) for k, v in overrides.items()}!r})
net = p.get_parsed_content('network')
dev = p.get_parsed_content('device')
net.load_state_dict(torch.load(p.get_parsed_content('ckpt_dir') + '/model.pt', map_location=dev))
net.eval()
post = p.get_parsed_content('validate#postprocessing')
pre = p.get_parsed_content('validate#preprocessing')
inferer = p.get_parsed_content('validate#inferer')
data = p.get_parsed_content('validate#dataset#data')
out = {{}}
for item in data[:{n}]:
    d = pre(dict(item))
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == 'cuda'):
        d['pred'] = inferer(d['image'][None].to(dev), net)[0].float().cpu()
    # logits, or log mean probabilities under test-time flips: softmax gives probabilities either way
    classmax = torch.softmax(d['pred'], 0).amax(dim=(1, 2))
    d = post(d)
    case = str(item['label']).split('/')[-1].split('.')[0]
    if classmax.shape[-1] == d['label'].shape[-1]:  # slices are predicted one by one: the stack is kept
        out[case + '__classmax'] = classmax.numpy().astype('float16')
    out[case + '__pred'] = d['pred'][0].numpy().astype('uint8')
    out[case + '__label'] = d['label'][0].numpy().astype('uint8')
    out[case + '__image'] = (d['image'][0].numpy().clip(0, 1) * 255).astype('uint8')
with atomic_path({str(out_dir / f'{name}_val_preds.npz')!r}, suffix='.npz') as tmp:
    np.savez_compressed(tmp, **out)
"""
    with open(log, "a") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT)


if __name__ == "__main__":
    fire.Fire(main)
