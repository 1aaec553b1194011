"""MLflow through MONAI's tracking option: ``python -m monai.bundle run training ... --tracking mlflow``.

``--tracking mlflow`` merges ``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS`` into the config: an
``MLFlowHandler`` on ``train#trainer`` (loss and lr per iteration, the config as an artifact) and one on
``validate#evaluator`` (the validation metrics per epoch), writing to a SQLite store at
``<output_dir>/mlruns.db`` (``bundle_root/eval``) with the artifacts in ``<output_dir>/mlruns``.

The commands run in subprocesses on a tiny network and tiny data, from an empty working folder, and the
store is read back with ``MlflowClient`` and compared with what TensorBoard, ``val_history.csv`` and
``metrics_summary.csv`` got: a training, then an evaluation (its own run, closed), then a training after an
interrupted one (its own run, named by train.json's ``run_name``: ``train_<time>``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="mlflow is not installed (the test extra brings mlflow-skinny)")
pytest.importorskip("sqlalchemy", reason="MLflow's SQLite store needs SQLAlchemy (in the test extra)")
pytest.importorskip("alembic", reason="MLflow's SQLite store needs alembic (in the test extra)")

from mlflow.tracking import MlflowClient  # noqa: E402

from fias_monai.data import make_demo_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TRAIN, EVALUATE = CONFIGS / "train.json", CONFIGS / "evaluate.json"
EXPERIMENT = "monai_experiment"  # DEFAULT_MLFLOW_SETTINGS' experiment_name

# tiny network (inputs must divide by 32) on 2 training volumes of 4 slices: 8 slices / batch 2 = 4 iterations
# an epoch; lr 3e-3 so that the validation Dice leaves 0 within the 5 epochs
TINY = {"network_def#embed_dims": [24, 48, 96, 192], "network_def#depths": [1, 1, 1, 1], "image_size": [64, 64],
        "batch_size": 2, "num_workers": 0, "cache_workers": 1, "learning_rate": 0.003}
EPOCHS, ITERS_PER_EPOCH = 5, 4


def _bundle(cwd: Path, *args: str, overrides: dict) -> str:
    """``python -m monai.bundle ARGS --tracking mlflow --key value ...`` in ``cwd``; returns the log."""
    cmd = [sys.executable, "-m", "monai.bundle", *args, "--tracking", "mlflow"]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_TRACKING_URI", None)  # it would take precedence over the bundle's tracking_uri
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n{log[-6000:]}"
    return log


def _client(bundle_root: Path, exists: bool = True) -> MlflowClient:
    """A client of the store that --tracking mlflow uses: ``<output_dir>/mlruns.db``, output_dir = bundle_root/eval."""
    db = bundle_root / "eval" / "mlruns.db"
    assert db.is_file() or not exists, f"no MLflow store at {db}"
    return MlflowClient(tracking_uri=f"sqlite:///{db.as_posix()}")


def _runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, [e.name for e in client.search_experiments()]
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _history(client: MlflowClient, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracking_demo")
    make_demo_dataset(root / "demo", num_train=2, num_val=1, shape=(64, 64, 4))
    return root / "demo"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo):
    """One training with --tracking mlflow, run from an empty folder; returns (cwd, bundle_root, client, run)."""
    root = tmp_path_factory.mktemp("tracking")
    cwd, bundle_root = root / "cwd", root / "bundle"
    cwd.mkdir()
    _bundle(cwd, "run", "training", "--config_file", str(TRAIN),
            overrides={**TINY, "epochs": EPOCHS, "bundle_root": str(bundle_root), "dataset_dir": str(demo)})
    client = _client(bundle_root)
    runs = _runs(client)
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    return cwd, bundle_root, client, runs[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_is_recorded(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd, bundle_root, client, run = trained
    assert run.info.status == "FINISHED"
    assert run.data.params == {"max_epochs": str(EPOCHS), "epoch_length": str(ITERS_PER_EPOCH)}

    # train loss: one value per iteration, the ones TensorBoard got
    loss = _history(client, run, "train_loss")
    assert [s for s, _ in loss] == list(range(1, EPOCHS * ITERS_PER_EPOCH + 1))
    tb = {}
    for events in sorted((bundle_root / "logs").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in set(acc.Tags()["scalars"]) & {"train_loss", "val_mean_dice"}:
            tb.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    assert [v for _, v in loss] == pytest.approx([tb["train_loss"][s] for s, _ in loss], rel=1e-6)
    assert all(0.0 < v < 20.0 for _, v in loss), loss
    assert loss[-1][1] < loss[0][1], f"the loss did not go down: {loss}"
    lr = _history(client, run, "lr_group_0")  # min_lr_ratio 1.0: the constant lr of the paper
    assert [s for s, _ in lr] == [s for s, _ in loss]
    assert [v for _, v in lr] == pytest.approx([TINY["learning_rate"]] * len(loss))

    # validation mean Dice: one value per epoch, the ones of val_history.csv and TensorBoard
    dice = _history(client, run, "val_mean_dice")
    with open(bundle_root / "logs" / "val_history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [s for s, _ in dice] == [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert [v for _, v in dice] == pytest.approx([float(r["val_mean_dice"]) for r in rows], abs=1e-12)
    assert [v for _, v in dice] == pytest.approx([tb["val_mean_dice"][s] for s, _ in dice], rel=1e-6)
    assert all(0.0 <= v <= 1.0 for _, v in dice), dice
    print(f"MLflow: train_loss {loss[0][1]:.3f} -> {loss[-1][1]:.3f} over {len(loss)} iterations; "
          f"val_mean_dice per epoch {[round(v, 4) for _, v in dice]}")

    # the executed config is the run's artifact, under bundle_root/eval/mlruns (next to the store)
    eval_dir = bundle_root / "eval"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert len(artifacts) == 1 and artifacts[0].startswith("config_") and artifacts[0].endswith(".json"), artifacts
    assert run.info.artifact_uri == (eval_dir / "mlruns" / run.info.run_id / "artifacts").as_uri()
    logged = json.loads((eval_dir / "mlruns" / run.info.run_id / "artifacts" / artifacts[0]).read_text())
    assert logged["epochs"] == EPOCHS and logged["learning_rate"] == TINY["learning_rate"]
    assert logged["bundle_root"] == str(bundle_root)

    # nothing written to the working folder (no ./mlruns, no ./mlruns.db)
    assert not list(cwd.iterdir()), list(cwd.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluating_gets_its_own_closed_run(trained, demo):
    """evaluate.json names its run eval_<time> and closes it (MONAI's validator handler leaves it open, and
    the next run with no run_name would write into it)."""
    cwd, bundle_root, client, train_run = trained
    before = {k: _history(client, train_run, k) for k in train_run.data.metrics}
    known = {r.info.run_id for r in _runs(client)}
    _bundle(cwd, "run", "evaluating", "--config_file", json.dumps([str(TRAIN), str(EVALUATE)]),
            overrides={**TINY, "bundle_root": str(bundle_root), "dataset_dir": str(demo)})
    new = [r for r in _runs(client) if r.info.run_id not in known]
    assert len(new) == 1, [(r.info.run_name, r.info.status) for r in new]
    ev = new[0]
    assert ev.info.run_name.startswith("eval_") and ev.info.status == "FINISHED", (ev.info.run_name, ev.info.status)
    assert {k: _history(client, train_run, k) for k in train_run.data.metrics} == before, "training run changed"
    assert "train_loss" not in ev.data.metrics
    with open(bundle_root / "eval" / "metrics_summary.csv", newline="") as f:
        mean = next(r for r in csv.DictReader(f) if r["class_index"] == "all")
    assert ev.data.metrics["mean_dice_protocol"] == pytest.approx(float(mean["dice"]), abs=1e-6)
    assert ev.data.metrics["mean_hd95_protocol"] == pytest.approx(float(mean["hd95"]), abs=1e-4)
    # the model evaluated is the best model of the training: its Dice is the best one MLflow recorded
    best = max(v for _, v in _history(client, train_run, "val_mean_dice"))
    assert ev.data.metrics["val_mean_dice"] == pytest.approx(best, abs=1e-6)
    assert not list(cwd.iterdir()), list(cwd.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_after_an_interrupted_one_gets_its_own_run(trained, demo):
    cwd, bundle_root, client, _ = trained
    # the store as an interrupted training leaves it: a run still RUNNING
    stale = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id, run_name="run_interrupted")
    client.log_metric(stale.info.run_id, "train_loss", 9.0, step=1)
    before = {r.info.run_id for r in _runs(client)}
    _bundle(cwd, "run", "training", "--config_file", str(TRAIN),
            overrides={**TINY, "epochs": 1, "bundle_root": str(bundle_root), "dataset_dir": str(demo)})
    runs = _runs(client)
    assert _history(client, client.get_run(stale.info.run_id), "train_loss") == [(1, 9.0)], "wrote into the open run"
    assert client.get_run(stale.info.run_id).data.params == {}
    new = [r for r in runs if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in new]
    assert [s for s, _ in _history(client, new[0], "train_loss")] == list(range(1, ITERS_PER_EPOCH + 1))
