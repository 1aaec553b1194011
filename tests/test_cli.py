"""Tests of the command line ``python -m fias_monai`` (tiny fixtures built in tmp_path; CPU).

Most commands run in-process through :func:`fias_monai.__main__.main` (the exact argv parsing of
``python -m fias_monai``, minus the interpreter start-up); the ``slow`` tests run the real
``python -m fias_monai`` in a subprocess, once on the real AMOS slices and once on an error path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, BackgroundRun, acdc_arrays, read_nifti, write_h5
from fias_monai.__main__ import COMMANDS, main
from fias_monai.data import load_datalist

AMOS = SHARED_DATA / "amos_ct_slices"
ACDC = SHARED_DATA / "acdc"


# ----------------------------------------------------------------------------------------------------
# helpers


def _cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _cli_subprocess(*args, timeout: float = 120) -> BackgroundRun:
    """``python -m fias_monai ARGS`` started in the background."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FIAS_MONAI_TRACEBACK", None)
    return BackgroundRun([sys.executable, "-m", "fias_monai", *args], cwd=REPO, env=env, timeout=timeout)


def _assert_clean_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 1, err
    assert "Traceback" not in err, err
    assert err.lstrip().startswith("error:") or "\nerror:" in err, err
    for n in needles:
        assert n in err, f"{n!r} not in stderr:\n{err}"


def _datalist(path) -> dict:
    return json.loads(Path(path).read_text())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def acdc_h5(tmp_path) -> tuple[Path, dict]:
    """The SSL4MIS ACDC layout: volumes/patientXXX_frameYY.h5 (image (Z,H,W) float32 in [0,1], label
    uint8) plus train.list / val.list. patient002 (a TransUNet test patient) is in neither list -> test;
    patient090 is in neither list and not a test patient -> ignored."""
    src = tmp_path / "acdc_h5"
    (src / "volumes").mkdir(parents=True)
    arrays = {}
    for i, case in enumerate(["patient001_frame01", "patient001_frame12", "patient019_frame01",
                              "patient002_frame01", "patient090_frame01"]):
        arrays[case] = acdc_arrays(i)
        write_h5(src / "volumes" / f"{case}.h5", *arrays[case])
    (src / "train.list").write_text("patient001_frame01\npatient001_frame12\n")
    (src / "val.list").write_text("patient019_frame01\n\n")
    return src, arrays


# ----------------------------------------------------------------------------------------------------
# help and usage


def test_help_lists_every_command_with_its_docstring(capsys):
    rc, out, err = _cli(capsys, "--help")
    out += err  # fire shows help on stderr
    assert rc == 0
    for name, fn in COMMANDS.items():
        assert name in out
        assert fn.__doc__.strip().splitlines()[0] in out
    rc, out, err = _cli(capsys, "prepare_acdc_h5", "--help")
    out += err
    assert rc == 0
    assert "SSL4MIS" in out and "--overwrite" in out and "SRC" in out and "OUT" in out


def test_usage_errors_exit_2(capsys, tmp_path):
    rc, _, err = _cli(capsys, "prepare_acdc_h5")  # SRC and OUT missing
    assert rc == 2 and "src" in err.lower()
    rc, _, err = _cli(capsys, "no_such_command")
    assert rc == 2
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------
# ACDC


def test_prepare_acdc_h5(capsys, tmp_path, acdc_h5):
    src, arrays = acdc_h5
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "prepare_acdc_h5", src, out)
    assert rc == 0, err
    dl = out / "datalist.json"
    assert stdout.strip().splitlines()[-1] == str(dl)  # the datalist path, for DL=$(...)
    doc = _datalist(dl)
    assert doc["labels"] == {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
    names = {sec: [Path(e["image"]).name for e in doc[sec]] for sec in ("training", "validation", "test")}
    assert names == {
        "training": ["patient001_frame01.nii.gz", "patient001_frame12.nii.gz"],
        "validation": ["patient019_frame01.nii.gz"],
        "test": ["patient002_frame01.nii.gz"],
    }
    for sec in ("training", "validation", "test"):
        for entry in load_datalist(dl, sec):
            case = Path(entry["image"]).name.split(".")[0]
            image, label = arrays[case]
            img, aff, img_dtype = read_nifti(entry["image"])
            lab, _, lab_dtype = read_nifti(entry["label"])
            assert img_dtype == np.float32 and lab_dtype == np.uint8
            np.testing.assert_array_equal(img, image.transpose(1, 2, 0))  # (Z,H,W) -> (H,W,Z)
            np.testing.assert_array_equal(lab, label.transpose(1, 2, 0))
            np.testing.assert_array_equal(aff, np.eye(4))

    # a second run refuses to overwrite, says how to, and changes nothing
    before = _snapshot(out)
    rc, stdout, err = _cli(capsys, "prepare_acdc_h5", src, out)
    _assert_clean_error(rc, err, "refusing to overwrite", "--overwrite")
    assert stdout == ""
    assert _snapshot(out) == before
    rc, _, err = _cli(capsys, "prepare_acdc_h5", src, out, "--overwrite")
    assert rc == 0, err

    # a subset of patients / cases
    rc, _, err = _cli(capsys, "prepare_acdc_h5", src, tmp_path / "sub", "--cases", "patient001,patient019_frame01")
    assert rc == 0, err
    doc = _datalist(tmp_path / "sub" / "datalist.json")
    assert (doc["numTraining"], doc["numValidation"], doc["numTest"]) == (2, 1, 0)
    rc, _, err = _cli(capsys, "prepare_acdc_h5", src, tmp_path / "one", "--cases", "patient019")
    assert rc == 0, err
    assert _datalist(tmp_path / "one" / "datalist.json")["numValidation"] == 1


def test_prepare_acdc_h5_reports_every_bad_file(capsys, tmp_path, acdc_h5):
    src, _ = acdc_h5
    (src / "volumes" / "patient001_frame12.h5").write_bytes(b"not an hdf5 file")  # corrupt
    (src / "val.list").write_text("patient019_frame01\npatient021_frame01\n")  # listed, absent
    image, label = acdc_arrays(7)
    label[0, 0, 0] = 9  # out of range
    write_h5(src / "volumes" / "patient002_frame01.h5", image, label)
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "prepare_acdc_h5", src, out)
    _assert_clean_error(rc, err, "3 file(s) failed", "patient001_frame12.h5", "patient021_frame01.h5",
                        "patient002_frame01.h5", "out of range")
    assert stdout == ""
    # the good cases and a datalist of only them are written
    doc = _datalist(out / "datalist.json")
    assert (doc["numTraining"], doc["numValidation"], doc["numTest"]) == (1, 1, 0)
    assert str(out / "datalist.json") in err


def test_prepare_acdc_errors_without_traceback(capsys, tmp_path):
    rc, _, err = _cli(capsys, "prepare_acdc_h5", tmp_path / "nowhere", tmp_path / "out")
    _assert_clean_error(rc, err, "does not exist")
    (tmp_path / "nolists").mkdir()
    rc, _, err = _cli(capsys, "prepare_acdc_h5", tmp_path / "nolists", tmp_path / "out")
    _assert_clean_error(rc, err, "train.list")
    rc, _, err = _cli(capsys, "prepare_acdc_official", tmp_path / "nolists", tmp_path / "out")
    _assert_clean_error(rc, err, "no patientXXX")
    rc, _, err = _cli(capsys, "prepare_acdc_official", tmp_path / "nolists", tmp_path / "out", "--outside_split", "x")
    _assert_clean_error(rc, err, "outside_split")
    assert not (tmp_path / "out").exists()


def test_prepare_acdc_official(capsys, tmp_path):
    src = tmp_path / "database" / "training"
    affine = np.array([[0, -1.4, 0, 30.0], [1.4, 0, 0, -12.0], [0, 0, 10.0, 5.0], [0, 0, 0, 1]])
    for pid, seed in ((1, 0), (19, 1), (3, 2), (120, 3)):  # train, validation, test, outside 1..100
        d = src / f"patient{pid:03d}"
        d.mkdir(parents=True)
        image, label = acdc_arrays(seed, shape=(40, 36, 3))
        nib.save(nib.Nifti1Image(image * 300 + 20, affine), str(d / f"patient{pid:03d}_frame01.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(d / f"patient{pid:03d}_frame01_gt.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros((40, 36, 3, 5), np.float32), affine), str(d / f"patient{pid:03d}_4d.nii.gz"))
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "prepare_acdc_official", tmp_path / "database", out)
    assert rc == 0, err
    doc = _datalist(out / "datalist.json")
    assert (doc["numTraining"], doc["numValidation"], doc["numTest"]) == (1, 1, 1)
    entry = load_datalist(out / "datalist.json", "test")[0]
    assert Path(entry["image"]).name == "patient003_frame01.nii.gz"
    img, aff, dtype = read_nifti(entry["image"])
    np.testing.assert_allclose(aff, affine, atol=1e-5)
    assert dtype == np.float32 and img.min() == 0.0 and img.max() == 1.0
    rc, _, err = _cli(capsys, "prepare_acdc_official", tmp_path / "database", tmp_path / "out2",
                      "--outside_split", "training")
    assert rc == 0, err
    assert _datalist(tmp_path / "out2" / "datalist.json")["numTraining"] == 2


@pytest.mark.skipif(not (ACDC / "train.list").is_file(), reason=f"{ACDC} is not present (clones lack ../shared)")
def test_prepare_acdc_h5_real_subset(capsys, tmp_path):
    rc, _, err = _cli(capsys, "prepare_acdc_h5", ACDC, tmp_path / "acdc", "--cases", "patient001,patient019")
    assert rc == 0, err
    dl = tmp_path / "acdc" / "datalist.json"
    train, val = load_datalist(dl, "training"), load_datalist(dl, "validation")
    frames = sorted(p.name.replace(".h5", ".nii.gz") for p in (ACDC / "volumes").glob("patient001_frame*.h5"))
    assert [Path(e["image"]).name for e in train] == frames and len(frames) == 2  # ED and ES
    assert [Path(e["image"]).name[:10] for e in val] == ["patient019"] * 2
    for entry in train + val:
        img, _, _ = read_nifti(entry["image"])
        lab, _, _ = read_nifti(entry["label"])
        assert img.shape == lab.shape and img.ndim == 3 and img.shape[2] < img.shape[0]
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert set(np.unique(lab)) == {0, 1, 2, 3}
        with h5py.File(ACDC / "volumes" / Path(entry["image"]).name.replace(".nii.gz", ".h5")) as f:
            np.testing.assert_array_equal(lab, f["label"][()].transpose(1, 2, 0))


# ----------------------------------------------------------------------------------------------------
# Synapse / BTCV


def _npz(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    np.savez(path, image=image, label=label)


def test_prepare_synapse_slices_and_volumes(capsys, tmp_path):
    src = tmp_path / "Synapse"
    (src / "train_npz").mkdir(parents=True)
    (src / "test_vol_h5").mkdir()
    rng = np.random.default_rng(0)
    # case0005 (training): slices 8, 9, 10 written out of order -> stacked in numeric order
    slices = {}
    for idx in (10, 8, 9):
        image = rng.random((40, 36), dtype=np.float32)
        label = np.full((40, 36), idx % 9, dtype=np.uint8)
        slices[idx] = (image, label)
        _npz(src / "train_npz" / f"case0005_slice{idx:03d}.npz", image, label)
    # case0008 (a TransUNet test case) as an h5 volume (Z, H, W)
    vol = rng.random((4, 40, 36), dtype=np.float32)
    vlab = rng.integers(0, 9, size=(4, 40, 36), dtype=np.uint8)
    write_h5(src / "test_vol_h5" / "case0008.npy.h5", vol, vlab)
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "prepare_synapse", src, out)
    assert rc == 0, err
    assert stdout.strip() == str(out / "datalist.json")
    dl = out / "datalist.json"
    assert _datalist(dl)["labels"]["8"] == "stomach"
    (train,), (test,) = load_datalist(dl, "training"), load_datalist(dl, "test")
    img, aff, dtype = read_nifti(train["image"])
    lab, _, lab_dtype = read_nifti(train["label"])
    assert img.shape == (40, 36, 3) and dtype == np.float32 and lab_dtype == np.uint8
    for z, idx in enumerate((8, 9, 10)):
        np.testing.assert_allclose(img[..., z], slices[idx][0] * 400 - 125, atol=1e-3)  # back to HU
        np.testing.assert_array_equal(lab[..., z], slices[idx][1])
    img, _, _ = read_nifti(test["image"])
    lab, _, _ = read_nifti(test["label"])
    np.testing.assert_allclose(img, vol.transpose(1, 2, 0) * 400 - 125, atol=1e-3)
    np.testing.assert_array_equal(lab, vlab.transpose(1, 2, 0))


def test_prepare_synapse_errors(capsys, tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    rc, _, err = _cli(capsys, "prepare_synapse", src, tmp_path / "out")
    _assert_clean_error(rc, err, "no *.npz")
    rng = np.random.default_rng(1)
    for idx in (0, 1, 3):  # slice 2 missing: stacking across the gap would be wrong geometry
        _npz(src / f"train_gap_slice{idx}.npz", rng.random((32, 32), dtype=np.float32), np.zeros((32, 32), np.uint8))
    _npz(src / "valid_hu_slice0.npz", rng.random((32, 32), dtype=np.float32) * 500, np.zeros((32, 32), np.uint8))
    _npz(src / "train_ok_slice0.npz", rng.random((32, 32), dtype=np.float32), np.ones((32, 32), np.uint8))
    rc, _, err = _cli(capsys, "prepare_synapse", src, tmp_path / "out")
    _assert_clean_error(rc, err, "2 file(s) failed", "missing slice indices [2]", "valid_hu_slice0.npz",
                        "expected [0, 1]")
    assert _datalist(tmp_path / "out" / "datalist.json")["numTraining"] == 1


@pytest.mark.skipif(not AMOS.is_dir(), reason=f"{AMOS} is not present (clones lack ../shared)")
def test_prepare_synapse_real_amos_slices(capsys, tmp_path):
    out = tmp_path / "amos"
    rc, stdout, err = _cli(capsys, "prepare_synapse", AMOS, out)
    assert rc == 0, err
    dl = out / "datalist.json"
    (train,), (val,) = load_datalist(dl, "training"), load_datalist(dl, "validation")
    assert load_datalist(dl, "test") == []
    for entry, case, first, n, side in ((train, "train_amos_0001", 60, 11, 768), (val, "valid_amos_0013", 50, 11, 512)):
        img, aff, dtype = read_nifti(entry["image"])
        lab, _, lab_dtype = read_nifti(entry["label"])
        assert img.shape == lab.shape == (side, side, n)
        assert dtype == np.float32 and lab_dtype == np.uint8
        assert -125.001 <= img.min() and img.max() <= 275.001  # HU, within the TransUNet window
        assert set(np.unique(lab)) <= set(range(9)) and len(np.unique(lab)) > 3
        for z in (0, n - 1):
            with np.load(AMOS / f"{case}_slice{first + z:04d}.npz") as f:
                np.testing.assert_array_equal(lab[..., z], f["label"])
                np.testing.assert_allclose(img[..., z], f["image"] * 400 - 125, atol=1e-3)


def test_prepare_btcv(capsys, tmp_path):
    root = tmp_path / "RawData" / "Training"
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-150.0, 20.0, -300.0)
    rng = np.random.default_rng(0)
    btcv_label = np.arange(14, dtype=np.uint8).repeat(3).reshape(42, 1, 1).repeat(32, 1).repeat(3, 2)  # every BTCV id
    for num in (5, 2, 3):  # training, test (TransUNet test case), no label
        nib.save(nib.Nifti1Image((rng.random((42, 32, 3)) * 1000 - 500).astype(np.float32), affine),
                 str(root / "img" / f"img{num:04d}.nii.gz"))
        if num != 3:
            nib.save(nib.Nifti1Image(btcv_label, affine), str(root / "label" / f"label{num:04d}.nii.gz"))
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "prepare_btcv", tmp_path, out)
    _assert_clean_error(rc, err, "1 file(s) failed", "label0003", "img0003")
    dl = out / "datalist.json"
    (train,), (test,) = load_datalist(dl, "training"), load_datalist(dl, "test")  # case0002 is a test case
    assert Path(train["image"]).name == "case0005.nii.gz" and Path(test["image"]).name == "case0002.nii.gz"
    lab, aff, _ = read_nifti(train["label"])
    np.testing.assert_allclose(aff, affine, atol=1e-5)
    from fias_monai.data import BTCV_TO_SYNAPSE

    np.testing.assert_array_equal(lab[::3, 0, 0], [BTCV_TO_SYNAPSE[k] for k in range(14)])
    # only the good cases, with --cases; an existing output needs --overwrite
    rc, _, err = _cli(capsys, "prepare_btcv", tmp_path, out, "--cases", "case0005")
    _assert_clean_error(rc, err, "refusing to overwrite")
    rc, _, err = _cli(capsys, "prepare_btcv", tmp_path, out, "--cases", "case0005", "--overwrite")
    assert rc == 0, err
    assert _datalist(dl)["numTest"] == 0
    rc, _, err = _cli(capsys, "prepare_btcv", tmp_path / "RawData" / "img", out)
    _assert_clean_error(rc, err, "no BTCV img/ folder")


# ----------------------------------------------------------------------------------------------------
# demo and parameter table


def test_make_demo(capsys, tmp_path):
    out = tmp_path / "demo"
    rc, stdout, err = _cli(capsys, "make_demo", out, "--num_train", 2, "--num_val", 1, "--shape", "[32,40,4]")
    assert rc == 0, err
    assert stdout.strip() == str(out / "datalist.json")
    entries = load_datalist(out / "datalist.json", "training") + load_datalist(out / "datalist.json", "validation")
    assert len(entries) == 3
    img, _, dtype = read_nifti(entries[0]["image"])
    assert img.shape == (32, 40, 4) and dtype == np.float32
    before = _snapshot(out)
    rc, _, err = _cli(capsys, "make_demo", out, "--num_train", 2, "--num_val", 1, "--shape", "32,40,4")
    _assert_clean_error(rc, err, "--overwrite")
    assert _snapshot(out) == before
    rc, _, err = _cli(capsys, "make_demo", out, "--num_train", 2, "--num_val", 1, "--shape", "32,40,4", "--overwrite")
    assert rc == 0, err
    assert _snapshot(out) == before  # same seed, same bytes
    rc, _, err = _cli(capsys, "make_demo", tmp_path / "bad", "--shape", "[8,8,2]")
    _assert_clean_error(rc, err, "shape")
    rc, _, err = _cli(capsys, "make_demo", tmp_path / "bad", "--shape", "big")
    _assert_clean_error(rc, err, "--shape")
    assert not (tmp_path / "bad").exists()


def test_params(capsys):
    from fias_monai.networks import FIAS
    from fias_monai.params import count_parameters

    rc, out, err = _cli(capsys, "params", "--variants", "tiny", "--out_channels", 4)
    assert rc == 0, err
    rows = {}
    for line in out.strip().splitlines()[2:]:
        name, n = (c.strip() for c in line.strip("|").split("|"))
        rows[name] = int(n.replace(",", ""))
    assert list(rows) == ["FIAS-tiny", "FIAS-tiny, no DMK", "FIAS-tiny, Summation fusion", "FIAS-tiny, no MixAtt"]
    assert rows["FIAS-tiny"] == count_parameters(FIAS(1, 4, "tiny"))
    assert rows["FIAS-tiny, no DMK"] < rows["FIAS-tiny"]
    assert "classes=4" in out
    rc, _, err = _cli(capsys, "params", "--variants", "huge")
    _assert_clean_error(rc, err, "unknown FIAS variant", "huge")


# ----------------------------------------------------------------------------------------------------
# the real program, in a subprocess


@pytest.fixture(scope="module")
def python_m(tmp_path_factory):
    """The real program's runs, started together (each spends ~9 s importing MONAI on one of the 2 cores):
    an error path, and the real AMOS slices when present. Returns (tmp folder, runs by name)."""
    tmp = tmp_path_factory.mktemp("python_m")
    runs = {"error": _cli_subprocess("prepare_acdc_h5", tmp / "missing", tmp / "out")}
    if AMOS.is_dir():
        runs["amos"] = _cli_subprocess("prepare_synapse", AMOS, tmp / "amos")
    yield tmp, runs
    for run in runs.values():
        run.stop()


@pytest.mark.slow
@pytest.mark.skipif(not AMOS.is_dir(), reason=f"{AMOS} is not present (clones lack ../shared)")
def test_python_m_fias_monai_on_real_amos(python_m):
    tmp, runs = python_m
    out = tmp / "amos"
    proc = runs["amos"].result()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "datalist.json")
    assert "2 case(s) written (training 1, validation 1, test 0)" in proc.stderr
    doc = _datalist(out / "datalist.json")
    names = [Path(e["image"]).name for e in doc["training"] + doc["validation"]]
    assert names == ["amos_0001.nii.gz", "amos_0013.nii.gz"]


@pytest.mark.slow
def test_python_m_fias_monai_error(python_m):
    tmp, runs = python_m
    proc = runs["error"].result()
    _assert_clean_error(proc.returncode, proc.stderr, "does not exist")
    assert proc.stdout == ""
