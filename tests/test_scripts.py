"""The experiment script behind the ACDC table (``scripts/run_experiment.py``), on CPU with a tiny network.

* a row trains once and evaluates, and writes its results JSON before its predictions (the JSON marks an
  evaluated row, the predictions' npz their own completion); ``--eval_tag`` evaluates the same trained model
  again with other evaluation settings (or the final weights, ``models/last.pt``) into
  ``<name>_<tag>_results.json`` without training again;
* a ``None`` override is refused before anything runs (MONAI's bundle CLI would drop it silently).

The ACDC report (``scripts/report_acdc.py``): its comparisons and error tables on small arrays, and the whole
report on a tiny runs folder (each row's docs JSON, the table, the curve and the qualitative figure).

And the label-resampling ceiling of ``scripts/resolution_ceiling.py`` on a synthetic label.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import REPO, requires_shared, write_h5
from fias_monai.data import make_demo_dataset
from fias_monai.data.io import read_h5_arrays

TINY = {"network_def#embed_dims": [24, 48, 96, 192], "network_def#depths": [1, 1, 1, 1], "image_size": [64, 64],
        "epochs": 1, "batch_size": 2, "num_workers": 0, "cache_workers": 1}


def _args(tmp_path, overrides: dict, *extra: str, save_preds: int = 0) -> list[str]:
    return ["--name", "row", "--overlays", "", "--save_preds", str(save_preds), "--workdir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--overrides", repr(overrides), *extra]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fire_run_experiment(tmp_path, overrides: dict, *extra: str, script=None, save_preds: int = 0) -> None:
    """``python scripts/run_experiment.py ARGS``, its command line parsed by fire as the script does, in this
    process: a subprocess for the script itself would spend ~9 s importing MONAI (its bundle runs are
    subprocesses all the same). ``script``: the loaded module, for a test that replaces one of its helpers."""
    import fire

    fire.Fire((script or _load_script("run_experiment")).main, name="run_experiment.py",
              command=_args(tmp_path, overrides, *extra, save_preds=save_preds))


def _run_experiment(tmp_path, monkeypatch, capsys, overrides: dict, *extra: str, **kwargs) -> str:
    """The script from the repo root (its config paths are relative) on CPU; returns what it printed."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    capsys.readouterr()
    try:
        _fire_run_experiment(tmp_path, overrides, *extra, **kwargs)
    except SystemExit as e:  # a failed bundle run: the script exits naming its log
        log = tmp_path / "out" / "row_log.txt"
        pytest.fail(f"run_experiment.py exited ({e}):\n{log.read_text()[-6000:] if log.is_file() else ''}")
    return capsys.readouterr().out


@pytest.mark.slow
def test_run_experiment_evaluates_a_trained_row_again_under_an_eval_tag(tmp_path, monkeypatch, capsys):
    # 2 training volumes of 4 slices (4 iterations) and 1 validation volume: the script's bookkeeping is under
    # test, not the training (the bundle would otherwise generate its 11-volume demo set here)
    make_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, shape=(64, 64, 4))
    overrides = {**TINY, "dataset_dir": str(tmp_path / "demo")}
    script = _load_script("run_experiment")
    results_json_existed = []  # when the predictions were saved
    save_predictions = script._save_predictions

    saved_with = []  # each save's overrides

    def record(name, *args):
        results_json_existed.append((tmp_path / "out" / f"{name}_results.json").exists())
        saved_with.append(args[1])
        save_predictions(name, *args)

    script._save_predictions = record
    first = _run_experiment(tmp_path, monkeypatch, capsys, overrides, script=script, save_preds=1)
    assert "training already done" not in first
    # the results JSON comes first: a call that ends while the predictions are saved keeps the evaluated row
    assert results_json_existed == [True]
    # the predictions of the one validation volume, on its label grid, and no temporary file left beside them
    with np.load(tmp_path / "out" / "row_val_preds.npz") as preds:
        case = sorted(preds.files)[0].split("__")[0]
        assert sorted(preds.files) == [f"{case}__classmax", f"{case}__image", f"{case}__label", f"{case}__pred"]
        assert preds[f"{case}__pred"].shape == preds[f"{case}__label"].shape == (64, 64, 4)
        assert preds[f"{case}__pred"].dtype == np.uint8 and preds[f"{case}__pred"].max() < 4
        # each class's highest probability per slice (4 classes x 4 slices): where the argmax kept a class on a
        # slice, that class had a probability of at least 1/4 there
        classmax, pred = preds[f"{case}__classmax"].astype(np.float32), preds[f"{case}__pred"]
        assert classmax.shape == (4, 4) and 0 <= classmax.min() and classmax.max() <= 1.001
        present = np.array([[(pred[..., z] == c).any() for z in range(4)] for c in range(4)])
        assert present.any() and (classmax[present] >= 0.25 - 1e-3).all()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["row_log.txt", "row_results.json",
                                                                      "row_val_preds.npz"]
    again = _run_experiment(tmp_path, monkeypatch, capsys, overrides, "--eval_tag", "lcc",
                            "--eval_overrides", repr({"keep_largest_component": True}))
    assert "training already done" in again

    out = tmp_path / "out"
    plain, tagged = (json.loads((out / f"{n}_results.json").read_text()) for n in ("row", "row_lcc"))
    assert (plain["name"], tagged["name"]) == ("row", "row_lcc")
    assert plain["eval_overrides"] == {} and tagged["eval_overrides"] == {"keep_largest_component": True}
    assert [r["class_name"] for r in tagged["summary"]] == [r["class_name"] for r in plain["summary"]]
    log = (out / "row_log.txt").read_text()
    assert log.count("monai.bundle run training") == 1 and log.count("monai.bundle run evaluating") == 2
    # the row's facts, written before training, once (the re-evaluation trained nothing)
    assert log.startswith(script.RUN_LINE) and log.count(script.RUN_LINE) == 1
    facts = json.loads(log.splitlines()[0][len(script.RUN_LINE):])
    assert (facts["overlays"], facts["overrides"]) == (plain["overlays"], plain["overrides"])
    assert (facts["git_commit"], facts["gpu"]) == (plain["git_commit"], plain["gpu"])
    assert "--keep_largest_component True" in log
    bundle = tmp_path / "runs" / "row" / "bundle"
    assert (bundle / "eval" / "metrics_summary.csv").is_file() and (bundle / "eval_lcc" / "metrics_summary.csv").is_file()

    # the final weights instead of the best validation's, as bundle/docs/acdc_results.md documents it: the resume
    # checkpoint holds the optimizer and the best score too, and the loader takes its "model" entry
    _run_experiment(tmp_path, monkeypatch, capsys, overrides, "--eval_tag", "last", "--eval_overrides",
                    '{"validate#handlers#0#load_path": "$os.path.join(@ckpt_dir, \\"last.pt\\")"}')
    log = (out / "row_log.txt").read_text()
    assert log.count("monai.bundle run training") == 1 and log.count("monai.bundle run evaluating") == 3
    assert f"Restored all variables from {bundle / 'models' / 'last.pt'}" in log
    assert (out / "row_last_results.json").is_file()

    # a re-evaluation asked for predictions saves its own, made with its overrides (here: without the largest-component
    # step); the ones above, with --save_preds 0, saved none
    _run_experiment(tmp_path, monkeypatch, capsys, overrides, "--eval_tag", "nolcc", "--eval_overrides",
                    repr({"keep_largest_component": False}), script=script, save_preds=1)
    assert results_json_existed == [True, True] and saved_with[-1]["keep_largest_component"] is False
    assert sorted(p.name for p in out.glob("*_val_preds.npz")) == ["row_nolcc_val_preds.npz", "row_val_preds.npz"]
    # one that loads another checkpoint would save predictions of models/model.pt under its name: refused up front
    with pytest.raises(SystemExit, match="change the evaluation's checkpoint loader"):
        _fire_run_experiment(tmp_path, overrides, "--eval_tag", "last2", "--eval_overrides",
                             '{"validate#handlers#0#load_path": "x"}', save_preds=1)
    assert not (out / "row_last2_results.json").exists()


def test_run_experiment_refuses_a_none_override_before_running(tmp_path):
    with pytest.raises(ValueError) as e:
        _fire_run_experiment(tmp_path, {**TINY, "max_minutes": None})
    assert "['max_minutes'] are None" in str(e.value) and "max_minutes: 0" in str(e.value)
    assert not (tmp_path / "out" / "row_log.txt").exists()  # nothing was started


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")
def test_source_commit_names_the_checkout_or_the_copy_it_was_made_from(tmp_path, monkeypatch):
    """The commit a results file records: the tree's own (``+dirty`` with tracked changes), else GIT_COMMIT."""
    from fias_monai.utils import source_commit

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    monkeypatch.delenv("GIT_COMMIT", raising=False)
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "a.py").write_text("x = 1\n")
    assert source_commit(tree) is None  # no checkout, no variable: unknown, not a guess
    monkeypatch.setenv("GIT_COMMIT", "f" * 40)
    assert source_commit(tree) == "f" * 40  # a copy of the code on the GPU machine

    git("init", "-q")
    assert source_commit(tree) == "f" * 40  # a repository without a commit yet
    git("add", "a.py")
    git("commit", "-q", "-m", "a")
    head = git("rev-parse", "HEAD")
    assert len(head) == 40 and source_commit(tree) == head  # the checkout's own commit wins over the variable
    (tree / "b.py").write_text("untracked\n")
    assert source_commit(tree) == head  # untracked files do not change what ran
    (tree / "a.py").write_text("x = 2\n")
    assert source_commit(tree) == head + "+dirty"
    assert source_commit(tree / "pkg") == "f" * 40  # a folder inside a clone is not that clone's code


def test_resolution_ceiling_is_exact_at_stride_1_only_with_nearest_exact():
    ceiling = _load_script("resolution_ceiling").ceiling
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


def test_report_confusion_counts_where_each_error_goes():
    report = _load_script("report_acdc")
    label = np.array([[0, 2, 2, 3], [0, 2, 2, 1]])
    pred = np.array([[2, 2, 0, 3], [0, 3, 2, 1]])
    m = report.voxel_confusion(label, pred)
    assert m.sum() == label.size and np.trace(m) == 5
    assert m[0, 2] == 1 and m[2, 0] == 1 and m[2, 3] == 1  # bg->MYO, MYO->bg, MYO->LV
    with pytest.raises(ValueError, match="shape"):
        report.voxel_confusion(label, pred[:, :3])
    with pytest.raises(ValueError, match="outside"):
        report.voxel_confusion(label, pred + 1)
    # two runs, each with its saved volumes; only the case both saved is counted
    run_a = {"c1__label": label, "c1__pred": pred, "c2__label": label, "c2__pred": label}
    run_b = {"c1__label": label, "c1__pred": label}
    table = report.confusion_table({"a": _Npz(run_a), "b": _Npz(run_b)}, {"a": "run A"})
    lines = table.splitlines()
    assert lines[0] == "voxels over 1 volumes (c1)" and "| run A | b |" in lines[1]
    assert "| MYO -> background | 1 | 0 |" in lines and "| background -> MYO | 1 | 0 |" in lines
    assert "| MYO: predicted / true volume | 0.750 | 1.000 |" in lines  # 2 of the 4 MYO voxels and 1 background voxel
    with pytest.raises(ValueError, match="no validation volume in common"):
        report.confusion_table({"a": _Npz(run_a), "c": _Npz({"c3__label": label, "c3__pred": label})})


def test_report_compares_two_runs_volume_by_volume():
    report = _load_script("report_acdc")

    def rows(dice):  # {case: (RV, MYO, LV)} -> per_case rows as run_experiment writes them (strings)
        return [{"case": c, "class_name": k, "dice": str(v)} for c, ds in dice.items() for k, v in zip(("RV", "MYO", "LV"), ds)]

    a = rows({"p1": (0.90, 0.80, 0.95), "p2": (0.70, 0.82, 0.95)})
    b = rows({"p1": (0.80, 0.85, 0.95), "p2": (0.80, 0.80, 0.90)})
    cmp = report.per_volume_comparison(a, b)
    assert cmp["RV"][0] == pytest.approx(0.0) and cmp["RV"][1:] == (1, 2)  # +10 on p1, -10 on p2
    assert cmp["MYO"][0] == pytest.approx(-1.5) and cmp["MYO"][1:] == (1, 2)  # -5, +2
    assert cmp["LV"][0] == pytest.approx(2.5) and cmp["LV"][1:] == (1, 2)  # 0 (a tie is not "better"), +5
    # each volume's mean over the three classes: p1 88.33 against 86.67, p2 82.33 against 83.33
    assert cmp["mean"][0] == pytest.approx((5 / 3 - 1) / 2) and cmp["mean"][1:] == (1, 2)
    with pytest.raises(ValueError, match="different volumes"):
        report.per_volume_comparison(a, rows({"p1": (0.9, 0.9, 0.9)}))
    # an earlier row's JSON without per_case: the error names that run, not a volume mismatch
    with pytest.raises(ValueError, match="^peer_m20 has no per-volume rows"):
        report.per_volume_comparison(a, [], names=("fias_m20", "peer_m20"))

    # two seeds of the same change: each pair weighs the same, the volume counts add up
    other = report.per_volume_comparison(b, a)  # the reverse pair: RV 0, MYO +1.5, LV -2.5; better on 1, 1, 0
    pooled = report.pooled_comparison([cmp, other])
    assert pooled["MYO"][0] == pytest.approx(0.0) and pooled["MYO"][1] == pytest.approx([-1.5, 1.5])
    assert pooled["MYO"][2:] == (2, 4) and pooled["LV"][2:] == (1, 4)
    assert pooled["LV"][0] == pytest.approx(0.0) and pooled["RV"][2:] == (2, 4)
    with pytest.raises(ValueError, match="no comparisons"):
        report.pooled_comparison([])


def test_report_averages_the_validations_of_the_last_quarter():
    report = _load_script("report_acdc")
    # validations at 2, 4, ..., 20 minutes; the last quarter of 20 minutes starts at 15: those at 16, 18 and 20
    history = [{"time_s": 120.0 * i, "val_mean_dice": d} for i, d in
               enumerate([0.80, 0.85, 0.88, 0.90, 0.91, 0.92, 0.95, 0.91, 0.90, 0.92], start=1)]
    mean, n = report.late_validation_mean(history)
    assert n == 3 and mean == pytest.approx((0.91 + 0.90 + 0.92) / 3)  # the best (0.95, at 14 min) is not in it
    assert report.late_validation_mean(history, fraction=1.0) == (pytest.approx(np.mean([r["val_mean_dice"] for r in history])), 10)
    with pytest.raises(ValueError, match="no validations"):
        report.late_validation_mean([])
    # where the run stood at 14 and 13 minutes: the best by then, not the last; nothing logged by 1 minute
    assert report.best_validation_by(history, 14) == 0.95 and report.best_validation_by(history, 13.9) == 0.92
    with pytest.raises(ValueError, match="no validation by 1 min"):
        report.best_validation_by(history, 1)


def test_report_averages_the_seeds_of_a_recipe():
    report = _load_script("report_acdc")

    def run(dice, hd95="1.5", last=0.90, **extra):  # {class: dice} -> a results JSON's summary and curve
        summary = [{"class_name": c, "dice": str(d), "hd95": hd95 if c == "mean" else ""} for c, d in dice.items()]
        curve = [{"time_s": t, "val_mean_dice": v} for t, v in ((60.0, 0.80), (180.0, 0.92), (240.0, last))]
        return {"summary": summary, "val_history": curve, **extra}

    a = run({"RV": 0.90, "MYO": 0.88, "LV": 0.94, "mean": 0.9067}, hd95="1.2", last=0.90)
    b = run({"RV": 0.86, "MYO": 0.90, "LV": 0.95, "mean": 0.9033}, hd95="1.6", last=0.88)
    m = report.run_mean([a, b])
    assert list(m) == ["mean", "RV", "MYO", "LV", "HD95", "last validation", "last-quarter mean"]
    assert m["mean"][0] == pytest.approx(90.5) and m["mean"][1] == pytest.approx([90.67, 90.33])
    assert m["RV"][0] == pytest.approx(88.0) and m["HD95"][0] == pytest.approx(1.4)
    assert m["last validation"][0] == pytest.approx(89.0)
    # the last quarter of 240 s starts at 180 s: (92 + 90) / 2 and (92 + 88) / 2
    assert m["last-quarter mean"][1] == pytest.approx([91.0, 90.0])
    # a row cut before its budget ended: its best validation joins the mean Dice, nothing it does not have
    cut = run({"mean": 0.92}, hd95="", cut_at_minutes=17.0)
    m = report.run_mean([a, b, cut])
    assert list(m) == ["mean"] and m["mean"][0] == pytest.approx((90.67 + 90.33 + 92.0) / 3)
    # where the runs stood at 3 minutes (validations at 1, 3 and 4 min): a cut row has it if cut no earlier
    m = report.run_mean([a, b, cut], by_minutes=3)
    assert list(m) == ["mean", "best by 3 min"] and m["best by 3 min"][1] == pytest.approx([92.0, 92.0, 92.0])
    assert "best by 3 min" not in report.run_mean([a, run({"mean": 0.92}, cut_at_minutes=2.0)], by_minutes=3)
    assert report.run_mean([a, b], by_minutes=0.5).keys() == {*report.run_mean([a, b])}  # no validation by then
    with pytest.raises(ValueError, match="no runs"):
        report.run_mean([])


def test_report_reads_earlier_rows_from_the_docs_results(tmp_path):
    # --versus and --curve name runs of earlier sessions: their JSONs in the docs' results folder
    report = _load_script("report_acdc")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old_run.json").write_text(json.dumps({"name": "old_run", "per_case": [{"case": "p1"}]}))
    assert report._docs_result(tmp_path, "old_run")["per_case"] == [{"case": "p1"}]
    assert report._docs_result(tmp_path, "never_ran") == {}


def test_report_bins_myocardium_errors_by_distance_to_the_true_border():
    report = _load_script("report_acdc")
    # one row of pixels per slice (H 1, W 9, Z 2): MYO at columns 3-5 on slice 0, none on slice 1
    label = np.zeros((1, 9, 2), np.uint8)
    label[0, 3:6, 0] = 2
    pred = label.copy()
    pred[0, [2, 8], 0] = 2  # background called MYO: touching the MYO (1 pixel) and 3 pixels beyond it
    pred[0, [3, 4], 0] = 0  # MYO called background: at the border (depth 1) and at the centre (depth 2)
    pred[0, 0, 1] = 2  # background called MYO on a slice without MYO
    fp = report.error_distances(label, pred, truth=0, predicted=2, ref=2)
    assert sorted(fp.tolist()) == [1.0, 3.0, np.inf]
    fn = report.error_distances(label, pred, truth=2, predicted=0, ref=0)
    assert sorted(fn.tolist()) == [1.0, 2.0]
    lines = report.border_table({"a": _Npz({"c1__label": label, "c1__pred": pred})}).splitlines()
    assert "| background -> MYO, all | 3 |" in lines and "| background -> MYO, 1 pixel | 1 |" in lines
    assert "| background -> MYO, 2-3 pixels | 1 |" in lines and "| background -> MYO, on slices without MYO | 1 |" in lines
    assert "| background -> MYO, more than 3 pixels | 0 |" in lines  # the slice without MYO is counted once
    assert "| MYO -> background, 1 pixel | 1 |" in lines and "| MYO -> background, 1-2 pixels | 1 |" in lines
    with pytest.raises(ValueError, match="shape"):
        report.error_distances(label, pred[..., :1], 0, 2, 2)


def test_report_centroid_offset_tells_a_shift_from_a_wider_border():
    report = _load_script("report_acdc")
    label = np.zeros((16, 16, 2), np.uint8)
    label[4:10, 4:10] = 2  # a 6x6 square on both slices
    shifted = np.roll(label, 1, axis=0)  # one row down
    wider = label.copy()
    wider[3:11, 3:11] = 2  # one pixel wider all round
    dy, dx, n = report.centroid_offset([(label, shifted)], cls=2)
    assert (dy, dx, n) == (pytest.approx(1.0), pytest.approx(0.0), 2)
    dy, dx, n = report.centroid_offset([(label, wider), (label, label)], cls=2)
    assert (dy, dx, n) == (pytest.approx(0.0), pytest.approx(0.0), 4)
    assert report.centroid_offset([(label, np.zeros_like(label))], cls=2) == (0.0, 0.0, 0)
    row = [line for line in report.border_table({"a": _Npz({"c1__label": label, "c1__pred": shifted})}).splitlines()
           if line.startswith("| MYO centroid offset")]
    assert row == ["| MYO centroid offset, rows / columns (pixels) | +1.00 / +0.00 |"]


def test_report_splits_each_class_dice_by_third_of_the_slices_holding_it():
    report = _load_script("report_acdc")
    # 2x2 pixels per slice, 8 slices: MYO on slices 1-7 (thirds: 1-2, 3-5, 6-7), LV only on slice 0 (one slice:
    # all of it in the middle third), RV nowhere
    label = np.zeros((2, 2, 8), np.uint8)
    label[..., 1:] = 2
    label[..., 0] = 3
    pred = label.copy()
    pred[..., 6:] = 0  # the last third of MYO missed entirely
    pred[0, :, 3] = 0  # half of one middle slice missed: 2 x 10 / (10 + 12) in the middle third
    pred[..., 0] = 2  # LV called MYO: slice 0 holds no MYO, so that false positive is outside MYO's thirds
    perfect = _Npz({"c1__label": label, "c1__pred": label})
    lines = report.slice_position_table({"a": _Npz({"c1__label": label, "c1__pred": pred}), "b": perfect},
                                        {"a": "run A"}).splitlines()
    assert lines[1] == "| class, slices | run A | b |"
    assert "| MYO, first third | 100.00 | 100.00 |" in lines
    assert "| MYO, middle third | 90.91 | 100.00 |" in lines
    assert "| MYO, last third | 0.00 | 100.00 |" in lines
    assert "| LV, middle third | 0.00 | 100.00 |" in lines and "| LV, first third | n/a | n/a |" in lines
    assert "| RV, middle third | n/a | n/a |" in lines


def test_report_counts_whole_slices_missed_and_the_dice_with_them_right():
    report = _load_script("report_acdc")
    # 4x4 pixels, 7 slices: MYO on row 0 of slices 0-5, LV on [2:4, 2:4] of slices 0-4, RV on row 1, columns 0-1,
    # of slices 1-3; slice 6 empty in the ground truth and the prediction alike (not a blank left by the run)
    label = np.zeros((4, 4, 7), np.uint8)
    label[0, :, :6] = 2
    label[2:4, 2:4, :5] = 3
    label[1, 0:2, 1:4] = 1
    pred = label.copy()
    pred[..., 4][pred[..., 4] == 3] = 0  # LV's last slice missed (4 voxels)
    pred[..., 2][pred[..., 2] == 3] = 0  # and one in between (4 voxels)
    pred[..., 5] = 0  # the last slice blank: MYO's last slice missed (4 voxels)
    pred[1, 0:2, 1] = 2  # RV's first slice called MYO (2 voxels); the slice keeps foreground
    pred[1, 3, 0] = 3  # one false LV voxel, on no missed slice: it stays when the missed slices are put right
    # run A saved each class's highest probability per slice: its four missed slices get one of each bin
    classmax = np.ones((4, 7), np.float16)
    classmax[1, 1], classmax[2, 5], classmax[3, 2], classmax[3, 4] = 0.05, 0.2, 0.4, 0.7
    lines = report.missed_slice_table({"a": _Npz({"c1__label": label, "c1__pred": pred, "c1__classmax": classmax}),
                                       "b": _Npz({"c1__label": label, "c1__pred": label})}, {"a": "run A"}).splitlines()
    assert lines[1] == "| | run A | b |"
    assert "| RV, slices missed (first / in between / last) | 1 (1 / 0 / 0) | 0 (0 / 0 / 0) |" in lines
    assert "| MYO, slices missed (first / in between / last) | 1 (0 / 0 / 1) | 0 (0 / 0 / 0) |" in lines
    assert "| LV, slices missed (first / in between / last) | 2 (0 / 1 / 1) | 0 (0 / 0 / 0) |" in lines
    assert "| RV, its voxels on them | 2 | 0 |" in lines and "| LV, its voxels on them | 8 | 0 |" in lines
    assert "| slices with foreground left blank | 1 | 0 |" in lines
    # each missed slice's truth lies under the class predicted on the slice before it
    assert "| missed slices whose truth touches the class on a neighbouring slice | 4 of 4 | 0 of 0 |" in lines
    # as predicted: RV 2*4/(6+4), MYO 2*20/(24+22), LV 2*12/(20+13); put right: RV 1, MYO 1, LV 2*20/(20+21)
    assert "| mean Dice (%) as predicted | 79.89 | 100.00 |" in lines
    assert "| mean Dice (%) with the missed slices right | 99.19 | 100.00 |" in lines
    assert ("| missed slices by the class's highest probability on them (< 0.1 / 0.1-0.3 / 0.3-0.5 / >= 0.5) | "
            "1 / 1 / 1 / 1 | n/a |") in lines
    # an apical LV pixel two pixels from the LV predicted on the slice before (and none after) does not touch it
    apex = np.zeros((4, 4, 3), np.uint8)
    apex[0:2, 0:2, :2] = 3
    apex[3, 3, 2] = 3
    missed = np.where(np.arange(3) == 2, 0, apex)
    lines = report.missed_slice_table({"a": _Npz({"c1__label": apex, "c1__pred": missed})}).splitlines()
    assert "| missed slices whose truth touches the class on a neighbouring slice | 0 of 1 |" in lines
    apex[3, 3, 2], apex[2, 2, 2] = 0, 3  # diagonally next to it: touching, as 3D 26-connectivity counts it
    lines = report.missed_slice_table({"a": _Npz({"c1__label": apex, "c1__pred": missed})}).splitlines()
    assert "| missed slices whose truth touches the class on a neighbouring slice | 1 of 1 |" in lines


def _report_row(name: str, mean: float, history: list[tuple[float, float]], cases: list[str]) -> dict:
    """A results JSON as run_experiment writes it (strings for the metrics, as MONAI's CSV gives them)."""
    return {"name": name, "gpu": "NVIDIA H100 80GB HBM3", "train_wall_minutes_incl_caching": 2.0,
            "gpu_util_mean_during_training": 50.0,
            "summary": [{"class_name": c, "dice": str(d), "hd95": "1.5"}
                        for c, d in (("RV", mean - 0.01), ("MYO", mean), ("LV", mean + 0.01), ("mean", mean))],
            "val_history": [{"epoch": i + 1, "time_s": t, "val_mean_dice": d} for i, (t, d) in enumerate(history)],
            "per_case": [{"case": c, "class_name": k, "dice": str(mean)} for c in cases for k in ("RV", "MYO", "LV")]}


def test_report_writes_the_docs_json_table_curve_and_figure_from_a_runs_folder(tmp_path, capsys):
    # the whole report as the docs' commands run it, on two tiny runs, a re-evaluation and an earlier session's row
    import matplotlib.pyplot as plt

    report = _load_script("report_acdc")
    runs, out = tmp_path / "runs", tmp_path / "docs"
    runs.mkdir()
    (out / "results").mkdir(parents=True)
    cases = ["p1_frame01", "p2_frame01"]
    rng = np.random.default_rng(0)
    label = np.zeros((24, 24, 3), np.uint8)
    label[6:18, 6:18, 1:] = 2
    label[9:15, 9:15, 1:] = 3
    for name, mean, history in (("a", 0.9123, [(30, 0.5), (60, 0.1), (90, 0.91)]), ("b", 0.8, [(30, 0.6), (90, 0.8)])):
        (runs / f"{name}_results.json").write_text(json.dumps(_report_row(name, mean, history, cases)))
        (runs / f"{name}_log.txt").write_text("".join(f"x - Epoch[{e}] Complete. Time taken\n" for e in (1, 2, 3)))
        np.savez(runs / f"{name}_val_preds.npz", **{f"{c}__{k}": v for c in cases for k, v in (
            ("image", rng.random(label.shape, np.float32)), ("label", label), ("pred", np.roll(label, 1, axis=0)))})
    # a re-evaluation (run_experiment --eval_tag last) has no log of its own: it shares its training's
    (runs / "a_last_results.json").write_text(json.dumps(_report_row("a_last", 0.9, [], cases)))
    (out / "results" / "old.json").write_text(json.dumps(_report_row("old", 0.85, [(20, 0.85)], cases)))

    report.main(runs=str(runs), out=str(out), curve="a,b,old,missing", figure="a,b", tag="_t", versus="a:b",
                positions="b", missed="a")
    printed = capsys.readouterr().out
    assert "| a | 91.23 | 90.23 | 91.23 | 92.23 | 1.50 | 3 | 2.0 | NVIDIA H100 80GB HBM3 |" in printed.splitlines()
    assert "  a: first val mean Dice >= 0.90 at 1.5 min; GPU utilisation 50.0 %" in printed.splitlines()
    assert "  b: first val mean Dice >= 0.90 at never; GPU utilisation 50.0 %" in printed.splitlines()
    assert "| a_last | 90.00 |" in printed  # the re-evaluation is a row of its own, its epochs from a's log
    assert "  mean: +11.23 Dice points, better on 2 of 2 volumes" in printed
    assert "| class, slices | b |" in printed and "| RV, first third | n/a |" in printed  # --positions
    assert "| | a |" in printed and "| slices with foreground left blank | 0 |" in printed  # --missed
    written = json.loads((out / "results" / "a.json").read_text())
    assert written["epochs_trained"] == 3 and [r["val_mean_dice"] for r in written["val_history"]] == [0.5, 0.1, 0.91]
    assert json.loads((out / "results" / "a_last.json").read_text())["epochs_trained"] == 3
    # the curve: 6 x 4 inches at 120 dpi; the figure: two rows (cases) of four tiles, the panels' files removed
    assert plt.imread(out / "acdc_val_curve_t.png").shape == (480, 720, 4)
    figure = plt.imread(out / "acdc_qualitative_t.png")
    assert figure.shape[0] > 300 and figure.shape[1] > 4 * 100 and figure[..., :3].std() > 0.05
    assert sorted(p.name for p in out.iterdir()) == ["acdc_qualitative_t.png", "acdc_val_curve_t.png", "results"]
    assert "qualitative columns: image, ground truth, a, b ; cases ['p1_frame01', 'p2_frame01']" in printed

    # five runs' long labels would cover the curves: the legend goes under the axes and the figure grows by 0.8 inch
    for name in "cde":
        (runs / f"{name}_results.json").write_text(json.dumps(_report_row(name, 0.9, [(30, 0.8), (90, 0.9)], cases)))
        (runs / f"{name}_log.txt").write_text("x - Epoch[1] Complete. Time taken\n")
    report.main(runs=str(runs), out=str(out), curve="a,b,c,d,e", figure="", tag="_five")
    assert plt.imread(out / "acdc_val_curve_five.png").shape == (576, 720, 4)

    # an empty --curve (the tables alone) leaves the docs' curve of the untagged name as it is;
    # --mean: groups split at ";" (an earlier session's row among them), beside --late (whose own mean once took the
    # option's place); one group alone comes from fire as a tuple
    (out / "acdc_val_curve.png").write_bytes(b"the time target's curve")
    capsys.readouterr()
    report.main(runs=str(runs), out=str(out), curve="", figure="", late="a", mean="a,b;c,old", by_minutes=1)
    assert (out / "acdc_val_curve.png").read_bytes() == b"the time target's curve"
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("a: validation mean Dice best ") and line.endswith(", best by 1 min 50.00")
               for line in printed)
    assert "mean of a, b (2 runs):" in printed and "  mean: 85.62 (91.23, 80.00)" in printed
    assert "  best by 1 min: 55.00 (50.00, 60.00)" in printed
    assert "mean of c, old (2 runs):" in printed and "  mean: 87.50 (90.00, 85.00)" in printed
    report.main(runs=str(runs), out=str(out), curve="", figure="", mean=("a", "b"))
    assert "mean of a, b (2 runs):" in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit, match="no results of nope in"):
        report.main(runs=str(runs), out=str(out), curve="", figure="", mean="a,nope")
    # runs a table needs but that lack the values stop the report with their name
    with pytest.raises(SystemExit, match=r"--late nope: no validations to average \(runs read from "):
        report.main(runs=str(runs), out=str(out), curve="", figure="", late="a,nope")
    (out / "results" / "early.json").write_text(json.dumps({**_report_row("early", 0.9, [(20, 0.9)], cases),
                                                            "per_case": []}))
    with pytest.raises(SystemExit,
                       match=r"--versus a:early: early has no per-volume rows \(per_case\) to compare "
                             r"\(runs read from "):
        report.main(runs=str(runs), out=str(out), curve="", figure="", versus="a:early")
    report.main(runs=str(runs), out=str(out), curve="nope", figure="", tag="_none")
    assert "--curve: no results of nope; no curve drawn" in capsys.readouterr().out
    assert not (out / "acdc_val_curve_none.png").exists()


def test_report_keeps_a_row_whose_evaluation_never_finished_with_its_own_facts(tmp_path, capsys):
    # training ended, the call ended before the evaluation: the row is kept from its log, with the config, commit
    # and card run_experiment wrote before training; a log older than that line takes them from the command line
    report = _load_script("report_acdc")
    runs, out = tmp_path / "runs", tmp_path / "docs"
    runs.mkdir()
    facts = {"name": "g", "overlays": ["bundle/configs/acdc.json"], "overrides": {"seed": 1}, "git_commit": "abc",
             "gpu": "NVIDIA H200"}
    training = ("$ /venv/bin/python3 -m monai.bundle run training --config_file ['bundle/configs/train.json', "
                "'bundle/configs/acdc.json', 'bundle/configs/acdc_12min.json'] --max_minutes 6 --seed 1\n"
                "x - Epoch[1] Complete. Time taken\nx - Key metric: val_mean_dice best value: 0.87 at epoch: 1\n"
                "x - Epoch[2] Complete. Time taken\nx - Key metric: val_mean_dice best value: 0.9 at epoch: 2\n"
                "x - time budget of 6 min reached after epoch 2 (6.0 min elapsed)\n")
    # the line as run_experiment writes it: the reader and the writer agree
    (runs / "g_log.txt").write_text(_load_script("run_experiment").RUN_LINE + json.dumps(facts) + "\n" + training)
    (runs / "h_log.txt").write_text(training)
    report.main(runs=str(runs), out=str(out), curve="", figure="", log_gpu="NVIDIA H100", log_commit="def")
    assert "| g | 90.00 | n/a | n/a | n/a | n/a | 2 | 6.0 | NVIDIA H200 |" in capsys.readouterr().out
    g, h = (json.loads((out / "results" / f"{n}.json").read_text()) for n in "gh")
    assert (g["git_commit"], g["overlays"], g["overrides"]) == ("abc", ["bundle/configs/acdc.json"], {"seed": 1})
    assert (h["git_commit"], h["gpu"]) == ("def", "NVIDIA H100")
    assert h["overlays"] == ["bundle/configs/acdc.json", "bundle/configs/acdc_12min.json"]
    assert h["command"].startswith("python -m monai.bundle run training") and h["command"].endswith("--seed 1")
    assert g["summary"][0]["best_epoch"] == "2" and "did not finish" in g["note"]


def test_report_says_a_row_cut_off_in_training_is_a_lower_bound(tmp_path, capsys):
    # the device machine went back mid-training: no budget line, so the row is the best validation so far, and its
    # JSON says where the log ends instead of a training time it never reached
    report = _load_script("report_acdc")
    runs, out = tmp_path / "runs", tmp_path / "docs"
    runs.mkdir()
    trainer = " - ignite.engine.engine.GraphedSupervisedTrainer - INFO - "
    log = ("$ /venv/bin/python3 -m monai.bundle run training --config_file ['bundle/configs/train.json', "
           "'bundle/configs/acdc.json'] --max_minutes 20\n"
           f"2026-11-28 20:10:40,000{trainer}Engine run starting with max_epochs=1000.\n"
           "2026-11-28 20:14:40,000 - INFO - Epoch[5] Metrics -- val_mean_dice: 0.9000\n"
           "x - Key metric: val_mean_dice best value: 0.9 at epoch: 5\n"
           f"2026-11-28 20:14:41,000{trainer}Epoch[5] Complete. Time taken: 00:00:03.423\n"
           f"2026-11-28 20:27:40,600{trainer}Epoch[6] Complete. Time taken: 00:00:03.423\n"
           # the evaluator's epochs are not the trainer's
           "2026-11-28 20:30:44,000 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[6] Complete. x\n")
    (runs / "c_log.txt").write_text(log)
    # an epoch-bound run (no time budget) that finished: only its evaluation is missing, it was not cut
    (runs / "d_log.txt").write_text(log + f"2026-11-28 20:30:45,000{trainer}Engine run finished. Time taken: x\n")
    report.main(runs=str(runs), out=str(out), curve="", figure="", log_gpu="NVIDIA H200", log_commit="abc")
    assert "| c | 90.00 | n/a | n/a | n/a | n/a | 6 | cut at 17.01 | NVIDIA H200 |" in capsys.readouterr().out
    c, d = (json.loads((out / "results" / f"{n}.json").read_text()) for n in "cd")
    assert (c["cut_after_epoch"], c["cut_at_minutes"], c["train_wall_minutes_incl_caching"]) == (6, 17.01, None)
    assert c["note"].startswith("training was cut off before its time budget ended (the log ends after epoch 6, "
                                "17.01 min after the trainer started)")
    assert "lower bound of that run's own finish" in c["note"]
    assert "(1 validation)" in c["note"] and "did not finish" not in c["note"]
    assert "cut_after_epoch" not in d and d["note"].startswith("the evaluation did not finish")
    # --late says which rows were cut: their last quarter is of the training they had, not of their budget
    report.main(runs=str(runs), out=str(out), curve="", figure="", late="c,d", log_gpu="NVIDIA H200")
    printed = capsys.readouterr().out
    assert "(1 validation; cut at 17.01 min)" in printed and "(1 validation)" in printed


class _Npz(dict):
    """The mapping part of np.load's NpzFile that confusion_table reads."""

    @property
    def files(self):
        return list(self)


def test_benchmark_grad_clip_runs_the_bundle_step_with_and_without_clipping(monkeypatch):
    """Smoke test on CPU (eager step, tiny batch): the GPU timing itself is the script's job."""
    monkeypatch.chdir(REPO)
    bench = _load_script("benchmark_grad_clip")
    medians = bench.main(max_grad_norms="0,1.0", batch=2, size=64, iters=1, repeats=1, device="cpu")
    assert set(medians) == {0.0, 1.0} and all(r > 0 for r in medians.values())


def test_benchmark_weight_average_runs_each_variant(monkeypatch):
    """Smoke test on CPU (eager step, tiny batch): the GPU timing itself is the script's job."""
    monkeypatch.chdir(REPO)
    bench = _load_script("benchmark_weight_average")
    medians = bench.main(variants="off,timm,cached", batch=2, size=64, iters=1, repeats=1, device="cpu")
    assert list(medians) == ["off", "timm", "cached"] and all(r > 0 for r in medians.values())
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.main(variants="off,swa", device="cpu")


def _write_h5_folder(folder, volumes: dict) -> None:
    (folder / "volumes").mkdir(parents=True)
    for name, (image, label) in volumes.items():
        write_h5(folder / "volumes" / f"{name}.h5", image, label)
    (folder / "train.list").write_text("a\nb\n")
    (folder / "val.list").write_text("c\n")


def _read_h5(path):
    arrays = read_h5_arrays(path, ("image", "label"))
    return arrays["image"], arrays["label"]


def test_pack_acdc_h5_round_trip_is_bit_exact(tmp_path):
    """Integer-form images go through lossless JPEG 2000 and come back bit for bit; a volume of arbitrary floats
    is stored raw and comes back too; the lists travel; nothing is written over an existing file or folder."""
    pack = _load_script("pack_acdc_h5")
    rng = np.random.default_rng(0)
    k = rng.integers(0, 978, size=(3, 40, 36))
    k[0, 0, 0] = 977  # the volume's maximum, as min-max scaling leaves it
    integer_image = (k / 977.0).astype(np.float32)
    float_image = rng.random((2, 30, 20), dtype=np.float32) ** 3
    labels = [rng.integers(0, 4, size=s.shape, dtype=np.uint8) for s in (integer_image, float_image)]
    src = tmp_path / "src"
    _write_h5_folder(src, {"p001_frame01": (integer_image, labels[0]), "p002_frame01": (float_image, labels[1])})
    archive = tmp_path / "pack" / "acdc.npz"
    pack.pack(str(src), str(archive))
    stored = np.load(archive).files
    assert "p001_frame01__j2k" in stored and "p001_frame01__raw" not in stored
    assert "p002_frame01__raw" in stored
    pack.unpack(str(archive), str(tmp_path / "dst"))
    for name, image, label in (("p001_frame01", integer_image, labels[0]), ("p002_frame01", float_image, labels[1])):
        got_image, got_label = _read_h5(tmp_path / "dst" / "volumes" / f"{name}.h5")
        assert got_image.dtype == np.float32 and got_image.tobytes() == image.tobytes()
        np.testing.assert_array_equal(got_label, label)
    assert (tmp_path / "dst" / "train.list").read_text() == "a\nb\n"
    assert (tmp_path / "dst" / "val.list").read_text() == "c\n"
    with pytest.raises(SystemExit, match="exists"):
        pack.unpack(str(archive), str(tmp_path / "dst"))
    with pytest.raises(SystemExit, match="exists"):
        pack.pack(str(src), str(archive))


def test_pack_acdc_h5_refuses_a_tampered_archive(tmp_path):
    """A rebuilt image that does not match the packed checksum stops the unpacking and names the volume."""
    pack = _load_script("pack_acdc_h5")
    image = (np.arange(2 * 16 * 16).reshape(2, 16, 16) % 50 / 49.0).astype(np.float32)
    src = tmp_path / "src"
    _write_h5_folder(src, {"p003_frame02": (image, np.zeros(image.shape, np.uint8))})
    archive = tmp_path / "acdc.npz"
    pack.pack(str(src), str(archive))
    arrays = dict(np.load(archive))
    arrays["p003_frame02__scale"] = np.array(int(arrays["p003_frame02__scale"]) + 1)
    np.savez(archive, **arrays)
    with pytest.raises(SystemExit, match="p003_frame02.*checksum"):
        pack.unpack(str(archive), str(tmp_path / "dst"))


@requires_shared("acdc", "volumes", "patient019_frame01.h5")
def test_pack_acdc_h5_on_real_acdc_volumes(tmp_path):
    """Two real ACDC volumes take the JPEG 2000 path (their images are k / M) and come back bit for bit."""
    from conftest import SHARED_DATA

    pack = _load_script("pack_acdc_h5")
    src = tmp_path / "src"
    (src / "volumes").mkdir(parents=True)
    for name in ("patient019_frame01", "patient050_frame02"):
        (src / "volumes" / f"{name}.h5").symlink_to(SHARED_DATA / "acdc" / "volumes" / f"{name}.h5")
    archive = tmp_path / "acdc.npz"
    pack.pack(str(src), str(archive))
    assert {"patient019_frame01__j2k", "patient050_frame02__j2k"} <= set(np.load(archive).files)
    pack.unpack(str(archive), str(tmp_path / "dst"))
    for name in ("patient019_frame01", "patient050_frame02"):
        image, label = _read_h5(src / "volumes" / f"{name}.h5")
        got_image, got_label = _read_h5(tmp_path / "dst" / "volumes" / f"{name}.h5")
        assert got_image.tobytes() == image.tobytes()
        np.testing.assert_array_equal(got_label, label)


def test_report_figure_rows_at_chosen_slices(tmp_path, capsys, monkeypatch):
    """``--cases case:z`` shows slice z (one case may be two rows); a slice or case the run did not save is named."""
    import matplotlib.pyplot as plt

    report = _load_script("report_acdc")
    runs, out = tmp_path / "runs", tmp_path / "docs"
    runs.mkdir()
    label = np.zeros((24, 24, 4), np.uint8)
    label[6:18, 6:18, :3] = 2
    label[10:14, 10:14, 3] = 3  # the last slice: only a small LV
    pred = label.copy()
    pred[..., 3] = 0  # the run leaves it empty
    np.savez(runs / "a_val_preds.npz", p1_frame01__image=np.ones(label.shape, np.float32), p1_frame01__label=label,
             p1_frame01__pred=pred)
    report.main(runs=str(runs), out=str(out), curve="", figure="a", cases="p1_frame01:3,p1_frame01", tag="_z")
    assert "cases ['p1_frame01', 'p1_frame01']" in capsys.readouterr().out
    figure = plt.imread(out / "acdc_qualitative_z.png")
    assert figure.shape[0] > 2 * 150  # two rows
    assert not list(out.glob(".panel*"))  # the panels removed
    with pytest.raises(SystemExit, match="p1_frame01 has slices 0 to 3"):
        report.main(runs=str(runs), out=str(out), curve="", figure="a", cases="p1_frame01:4")
    # a column whose evaluation is an earlier session's docs JSON (not drawn in --curve) still gets its 3D Dice
    (out / "results").mkdir(exist_ok=True)
    (out / "results" / "a.json").write_text(json.dumps(_report_row("a", 0.75, [(20, 0.75)], ["p1_frame01"])))
    given = {}
    monkeypatch.setattr(report, "_titled_figure", lambda *args: given.update(per_case=args[4]))
    report.main(runs=str(runs), out=str(out), curve="", figure="a", cases="p1_frame01")
    assert [(d["case"], d["class_name"], d["dice"]) for d in given["per_case"]["a"]] == [
        ("p1_frame01", "RV", "0.75"), ("p1_frame01", "MYO", "0.75"), ("p1_frame01", "LV", "0.75")]
    with pytest.raises(SystemExit, match="p9_frame01 is not among a's saved volumes"):
        report.main(runs=str(runs), out=str(out), curve="", figure="a", cases="p9_frame01")
