"""Bad inputs get errors naming the file and the problem; outputs are never lost; training resumes after
SIGKILL. (docs/reliability.md has the table of what the user sees; tiny volumes and networks, CPU.)"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fias_monai import FIAS
from fias_monai.data import (
    DataConversionError,
    SliceDataset,
    SliceDatasetError,
    load_datalist,
    make_demo_dataset,
    prepare_acdc_h5,
    prepare_acdc_official,
)
from fias_monai.data.io import InvalidCaseError
from fias_monai.inference import InferenceError
from fias_monai.transforms import (
    CheckedCacheDataset,
    CheckVolumed,
    OutputExistsError,
    OutputFolderError,
    SafeSaveImaged,
    VolumeLoadError,
    as_bool,
    check_writable_dir,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
PY = sys.executable
TINY_DIMS, TINY_DEPTHS = [24, 48, 96, 192], [1, 1, 1, 1]
TINY_OVERRIDES = {"network_def#embed_dims": TINY_DIMS, "network_def#depths": TINY_DEPTHS, "image_size": [64, 64]}
TINY_CLI = ["--network_def#embed_dims", str(TINY_DIMS), "--network_def#depths", str(TINY_DEPTHS),
            "--image_size", "[64,64]"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}

# what each bad input must produce (a phrase of the message), shared by inference / training / prep
EXPECT = {
    "missing": "does not exist",
    "truncated": "truncated or corrupt",
    "notnifti": "not a readable NIfTI file",
    "flat2d": "2D image",
    "cine4d": "4D image: 3 volumes",
    "nan": "1 NaN and 1 Inf voxel",
    "constant": "constant image",
    "tiny20": "slices are 20x20 pixels, smaller than the minimum 32x32",
    "labelrange": "label values 9 are beyond the 4 classes",
    "labelshape": "label shape 64x60x4 differs from the image shape 64x64x4",
}


def _save(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _image(seed=0, shape=(64, 64, 4)):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _label(seed=0, shape=(64, 64, 4)):
    return np.random.default_rng(seed).integers(0, 4, shape).astype(np.uint8)


def make_bad_images(folder: Path) -> dict[str, Path]:
    """One image file per bad-input case (plus two good ones), as an input folder for inference."""
    f = {"good_a": _save(folder / "good_a.nii.gz", _image(1)), "good_b": _save(folder / "good_b.nii", _image(2))}
    raw = (folder / "good_a.nii.gz").read_bytes()
    f["truncated"] = folder / "truncated.nii.gz"
    f["truncated"].write_bytes(raw[: len(raw) // 2])
    f["notnifti"] = folder / "notnifti.nii.gz"
    f["notnifti"].write_text("PatientName=ANON\nthis is a text file, not NIfTI\n")
    f["notes"] = folder / "notes.txt"
    f["notes"].write_text("export log")
    f["flat2d"] = _save(folder / "flat2d.nii.gz", _image(3, (64, 64)))
    f["cine4d"] = _save(folder / "cine4d.nii.gz", _image(4, (64, 64, 4, 3)))
    a = _image(5)
    a[1, 2, 3], a[3, 2, 1] = np.nan, np.inf
    f["nan"] = _save(folder / "nan.nii.gz", a)
    f["constant"] = _save(folder / "constant.nii.gz", np.full((64, 64, 4), -1000, np.int16))
    f["tiny20"] = _save(folder / "tiny20.nii.gz", _image(6, (20, 20, 4)))
    return f


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle_root whose models/model.pt matches the tiny network overrides."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(FIAS(1, 4, embed_dims=tuple(TINY_DIMS), depths=tuple(TINY_DEPTHS)).state_dict(),
               root / "models" / "model.pt")
    return root


def _infer(bundle_root, dataset_dir, output_dir, **overrides):
    """The inference bundle in-process (as `python -m monai.bundle run --config_file inference.json`)."""
    from monai.bundle import run

    run(config_file=str(CONFIGS / "inference.json"), bundle_root=str(bundle_root), dataset_dir=str(dataset_dir),
        output_dir=str(output_dir), num_workers=0, **{**TINY_OVERRIDES, **overrides})


# ----------------------------------------------------------------------------------------------------
# inference


def test_inference_cli_continues_past_every_bad_file_and_exits_nonzero(tiny_bundle, tmp_path):
    """One folder with every bad kind of file: the good ones are segmented, each bad one is listed with
    its problem at the end, and the command exits with status 1 (no traceback)."""
    src, out = tmp_path / "in", tmp_path / "out"
    files = make_bad_images(src)
    before = _digest(src)
    cmd = [PY, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"),
           "--dataset_dir", str(src), "--output_dir", str(out), "--bundle_root", str(tiny_bundle), *TINY_CLI]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    tail = proc.stderr[proc.stderr.rindex("input file(s) failed"):]  # the summary printed last
    assert "Traceback" not in tail
    assert "8 of 10 input file(s) failed (2 segmentation(s) written)" in proc.stderr
    reasons = {"truncated": EXPECT["truncated"], "notnifti": EXPECT["notnifti"],
               "notes": "not a NIfTI file (.nii or .nii.gz expected)", "flat2d": EXPECT["flat2d"],
               "cine4d": EXPECT["cine4d"], "nan": EXPECT["nan"], "constant": EXPECT["constant"],
               "tiny20": EXPECT["tiny20"]}
    lines = tail.splitlines()
    for key, phrase in reasons.items():
        assert any(line.startswith(f"  - {files[key]}: ") and phrase in line for line in lines), (key, tail)
    for key in ("good_a", "good_b"):
        seg = out / (files[key].name.split(".")[0] + "_seg.nii.gz")
        ref, got = nib.load(str(files[key])), nib.load(str(seg))
        assert got.shape == ref.shape and got.get_data_dtype() == np.uint8
        np.testing.assert_allclose(got.affine, ref.affine)
    assert sorted(p.name for p in out.iterdir()) == ["good_a_seg.nii.gz", "good_b_seg.nii.gz"]  # no temp files
    assert _digest(src) == before  # inputs untouched


def test_inference_missing_file_in_datalist(tiny_bundle, tmp_path):
    good = _save(tmp_path / "in" / "good.nii.gz", _image())
    missing = tmp_path / "in" / "gone.nii.gz"
    with pytest.raises(InferenceError) as e:
        _infer(tiny_bundle, tmp_path / "in", tmp_path / "out",
               input_files=[{"image": str(missing)}, {"image": str(good)}])
    assert e.value.failures == [(str(missing), "file does not exist (or cannot be read)")]
    assert (tmp_path / "out" / "good_seg.nii.gz").is_file()


@pytest.mark.parametrize("kind", ["missing", "empty", "only_other"])
def test_inference_missing_or_empty_folder(tiny_bundle, tmp_path, kind):
    folder = tmp_path / "scans"
    if kind != "missing":
        folder.mkdir()
    if kind == "only_other":
        (folder / "IM0001.dcm").write_bytes(b"\0" * 132 + b"DICM")
    with pytest.raises(InferenceError) as e:
        _infer(tiny_bundle, folder, tmp_path / "out")
    msg = str(e.value)
    assert str(folder) in msg
    assert ("does not exist" in msg) if kind == "missing" else ("contains no NIfTI files" in msg)
    if kind == "only_other":
        assert "IM0001.dcm" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_inference_unwritable_output_folder_fails_before_inference(tiny_bundle, tmp_path):
    _save(tmp_path / "in" / "good.nii.gz", _image())
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InferenceError, match=r"cannot create output folder .*a_file/out"):
        _infer(tiny_bundle, tmp_path / "in", blocker / "out")
    with pytest.raises(InferenceError, match=r"output folder .*a_file is a file"):
        _infer(tiny_bundle, tmp_path / "in", blocker)


def test_unwritable_folder_is_reported(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # root ignores permissions; simulate the failing write instead
        ro.chmod(0o555)
    else:
        import tempfile

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        with pytest.raises(OutputFolderError, match=r"output folder .*ro is not writable: Permission denied"):
            check_writable_dir(ro)
    finally:
        ro.chmod(0o755)


def test_inference_missing_weights_is_fatal(tmp_path):
    _save(tmp_path / "in" / "good.nii.gz", _image())
    with pytest.raises(InferenceError, match=r"cannot load the model weights .*model.pt.*file missing"):
        _infer(tmp_path / "nobundle", tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out" / "good_seg.nii.gz").exists()


@pytest.mark.parametrize("trained_with", ["full_res_head", "context_slices"])
def test_inference_with_weights_of_another_network_says_what_differs(tmp_path, trained_with):
    """Weights trained with the full-resolution head (acdc_12min.json), or with 2.5D input, served by the
    plain inference.json: a fatal error naming the file, the modules or shapes that differ, and what to do;
    nothing is written. (PyTorch's own first line says only "Error(s) in loading state_dict for FIAS".)"""
    _save(tmp_path / "in" / "good.nii.gz", _image())
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    other = dict(full_res_head=True) if trained_with == "full_res_head" else dict(in_channels=3)
    net = FIAS(**{"in_channels": 1, "out_channels": 4, **other}, embed_dims=tuple(TINY_DIMS), depths=tuple(TINY_DEPTHS))
    torch.save(net.state_dict(), tmp_path / "bundle" / "models" / "model.pt")
    expected = (r"full_res_head\.\* \(\d+\)" if trained_with == "full_res_head"
                else r"encoder\.stem\.0\.conv\.weight \(\d+, 3, 3, 3\) in the weights, \(\d+, 1, 3, 3\) in the network")
    with pytest.raises(InferenceError, match=r"cannot load the model weights .*model.pt: they do not fit the "
                                             r"configured network \(.*" + expected + r".*acdc_12min.json"):
        _infer(tmp_path / "bundle", tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out" / "good_seg.nii.gz").exists()


def _two_convs(width: int = 2) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, width, 1))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _idle_engine():
    from ignite.engine import Engine

    return Engine(lambda e, b: None)


def test_weights_loader_loads_weights_that_fit(tmp_path):
    # evaluate.json's and inference.json's loader loads as MONAI's CheckpointLoader does
    from fias_monai.handlers import WeightsLoader

    trained, net = _two_convs(), _two_convs()
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    WeightsLoader(str(tmp_path / "model.pt"), {"model": net})(_idle_engine())
    assert _same_weights(net, trained)


@pytest.mark.parametrize("case", ["another network", "missing", "not a checkpoint", "truncated"])
def test_weights_loader_names_the_file_and_what_is_wrong(tmp_path, case):
    """One line with the file and the reason the file itself shows, instead of PyTorch's key-by-key list."""
    from fias_monai.handlers import WeightsLoader, WeightsLoadError

    path = tmp_path / "model.pt"
    if case == "not a checkpoint":
        path.write_text("a text file saved as model.pt\n")
    elif case == "truncated":  # an interrupted copy: the zip archive's first half
        torch.save(_two_convs().state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "another network":
        torch.save(_two_convs(width=4).state_dict(), path)
    why = {"another network": r"they do not fit the configured network \(2 of another shape: 1\.weight \(4, 2, 1, 1\) "
                              r"in the weights, \(2, 2, 1, 1\) in the network; 1\.bias \(4,\) in the weights, "
                              r"\(2,\) in the network\); run with the overlays and network settings the model was "
                              r"trained with \(e\.g\. configs/acdc_12min\.json after acdc\.json, context_slices, "
                              r"the variant\)",
           "missing": r"file missing \(train first, or set --bundle_root\)",
           # named by its first bytes, not by PyTorch's advice to load it with weights_only=False
           "not a checkpoint": r"not a readable PyTorch checkpoint, truncated or another format \(it starts with "
                               r"b'a text f': neither a zip archive nor a pickle\)",
           "truncated": r"not a readable PyTorch checkpoint, truncated or another format \(.*failed reading zip "
                        r"archive.*\)"}[case]
    with pytest.raises(WeightsLoadError, match=rf"^cannot load the model weights {re.escape(str(path))}: {why}$"):
        WeightsLoader(str(path), {"model": _two_convs()})(_idle_engine())


def test_weights_loader_chains_an_error_the_file_does_not_explain(tmp_path):
    # a bare state dict for two entries: the reason is the error's first line, and the error is the cause
    from fias_monai.handlers import WeightsLoader, WeightsLoadError

    path, net = tmp_path / "model.pt", _two_convs()
    torch.save(_two_convs().state_dict(), path)
    loader = WeightsLoader(str(path), {"model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1)})
    with pytest.raises(WeightsLoadError, match=rf"^cannot load the model weights {re.escape(str(path))}: "
                                               r"ValueError: Key 'model' .* not found") as info:
        loader(_idle_engine())
    assert isinstance(info.value.__cause__, ValueError)


def test_inference_load_once_explains_a_plain_checkpoint_loader(tmp_path):
    """A plain CheckpointLoader of a user's own inference config: weights that fit load (and the loader is
    detached); a file that is no checkpoint gets the WeightsLoader's line."""
    from monai.handlers import CheckpointLoader

    from fias_monai.inference import _load_weights_once

    path, trained, net, engine = tmp_path / "model.pt", _two_convs(), _two_convs(), _idle_engine()
    torch.save(trained.state_dict(), path)
    CheckpointLoader(str(path), {"model": net}).attach(engine)
    _load_weights_once(engine)
    assert _same_weights(net, trained)
    path.write_text("a text file saved as model.pt\n")
    CheckpointLoader(str(path), {"model": net}).attach(engine)
    with pytest.raises(InferenceError, match=rf"cannot load the model weights {re.escape(str(path))}: not a "
                                             r"readable PyTorch checkpoint, truncated or another format"):
        _load_weights_once(engine)


def test_state_dict_mismatch_counts_modules_and_lists_shapes():
    from fias_monai.utils import state_dict_mismatch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 2, 1))
    assert state_dict_mismatch(net.state_dict(), net) == ""
    state = {**net.state_dict(), "0.weight": torch.zeros(2, 3, 3, 3), "head.weight": torch.zeros(1)}
    del state["1.bias"]
    assert state_dict_mismatch(state, net) == (
        "1 tensors the network does not have: head.* (1); 1 tensors of the network missing: 1.* (1); "
        "1 of another shape: 0.weight (2, 3, 3, 3) in the weights, (2, 1, 3, 3) in the network")
    many = {f"{i}.weight": torch.zeros(1) for i in range(2)} | {f"{i}.bias": torch.zeros(9) for i in range(2)}
    assert state_dict_mismatch(many, net, shown=1).startswith("4 of another shape: 0.weight (1,) in the weights")
    assert state_dict_mismatch(many, net, shown=1).endswith("; ...")


def test_inference_never_overwrites_unless_asked_and_never_inputs(tiny_bundle, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _save(src / "a.nii.gz", _image(1))
    _save(src / "b.nii.gz", _image(2))
    out.mkdir()
    (out / "a_seg.nii.gz").write_bytes(b"precious")  # an existing output
    with pytest.raises(InferenceError) as e:
        _infer(tiny_bundle, src, out)
    assert e.value.failures == [(str(src / "a.nii.gz"), f"output {out / 'a_seg.nii.gz'} already exists; "
                                 "not overwritten (pass --overwrite true to replace it)")]
    assert (out / "a_seg.nii.gz").read_bytes() == b"precious" and (out / "b_seg.nii.gz").is_file()
    _infer(tiny_bundle, src, out, overwrite="true")  # explicit override (the CLI passes a string)
    assert nib.load(str(out / "a_seg.nii.gz")).shape == (64, 64, 4)
    with pytest.raises(ValueError, match="overwrite must be true or false"):
        as_bool("maybe", "overwrite")
    assert as_bool("false") is False and as_bool("True") is True

    # writing into the input folder with an empty postfix would replace the inputs: refused even with overwrite
    before = _digest(src)
    with pytest.raises(InferenceError) as e:
        _infer(tiny_bundle, src, src, overwrite=True, **{f"postprocessing#transforms#{_saver_index()}#output_postfix": ""})
    assert len(e.value.failures) == 2 and all("would replace an input file" in r for _, r in e.value.failures)
    assert _digest(src) == before


def _saver_index() -> int:
    """Position of the SafeSaveImaged step in inference.json's postprocessing (found, not hard-coded)."""
    steps = json.loads((REPO / "bundle" / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    return next(i for i, t in enumerate(steps) if isinstance(t, dict) and t.get("_target_", "").endswith("SafeSaveImaged"))


def test_inference_loader_workers_only_for_volumes_after_the_first(tmp_path, monkeypatch):
    """A single scan is read in the bundle process whatever num_workers says (a worker could overlap with
    nothing; starting, feeding and joining it cost ~0.4 s per call); several scans get at most one worker
    per scan after the first. The segmentations are identical either way, voxels and headers."""
    import monai.data
    from monai.bundle import run

    from fias_monai.inference import loader_workers

    assert [loader_workers(2, n) for n in (0, 1, 2, 3, 9)] == [0, 0, 1, 2, 2]
    assert loader_workers(0, 9) == 0 and loader_workers(10, 4) == 3

    used = []

    class SpyLoader(monai.data.DataLoader):
        def __init__(self, dataset, *args, **kwargs):
            used.append((type(dataset).__name__, kwargs.get("num_workers", 0)))
            super().__init__(dataset, *args, **kwargs)

    monkeypatch.setattr(monai.data, "DataLoader", SpyLoader)

    # a 1x1 conv stand-in whose argmax is a function of the scaled intensity: every class appears
    conv = torch.nn.Conv2d(1, 4, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 10.0, 20.0, 30.0]).view(4, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, -2.5, -7.5, -15.0]))
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    torch.save(conv.state_dict(), root / "models" / "model.pt")
    rng = np.random.default_rng(0)
    scans = {}
    for name, shape, aff in (("a", (96, 80, 5), np.diag([-0.8, -0.8, 2.5, 1.0])),
                             ("b", (72, 6, 88), np.array([[0, 0, 1.0, 0], [-1.2, 0, 0, 0], [0, 3.0, 0, 0],
                                                          [0, 0, 0, 1]])),
                             ("c", (64, 64, 3), np.eye(4))):
        scans[name] = _save(tmp_path / "all" / f"{name}.nii.gz",
                            (rng.random(shape) * 400 - 100).astype(np.float32), aff)
        _save(tmp_path / f"one_{name}" / f"{name}.nii.gz", np.asanyarray(nib.load(str(scans[name])).dataobj), aff)

    def infer(src, out, workers):
        used.clear()
        run(config_file=str(CONFIGS / "inference.json"), bundle_root=str(root), dataset_dir=str(src),
            output_dir=str(out), num_workers=workers, image_size=[64, 64],
            network_def={"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": 4, "kernel_size": 1})
        return [w for kind, w in used if kind == "_Guarded"]

    assert infer(tmp_path / "all", tmp_path / "out_workers", 2) == [2]
    assert infer(tmp_path / "all", tmp_path / "out_main", 0) == [0]
    for name in scans:
        assert infer(tmp_path / f"one_{name}", tmp_path / "out_single", 2) == [0]
    for name, src in scans.items():
        ref = nib.load(str(tmp_path / "out_main" / f"{name}_seg.nii.gz"))
        ref_data = np.asanyarray(ref.dataobj)
        assert ref.shape == nib.load(str(src)).shape and len(np.unique(ref_data)) == 4
        np.testing.assert_array_equal(ref.affine, nib.load(str(src)).affine)
        for other in ("out_workers", "out_single"):
            got = nib.load(str(tmp_path / other / f"{name}_seg.nii.gz"))
            np.testing.assert_array_equal(np.asanyarray(got.dataobj), ref_data, err_msg=f"{other}/{name}")
            np.testing.assert_array_equal(got.affine, ref.affine)
            assert got.header == ref.header


def test_safe_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves neither a partial output nor a temporary file."""
    from monai.data import MetaTensor
    from monai.data.image_writer import NibabelWriter

    img = MetaTensor(torch.zeros(1, 8, 8, 3), meta={"filename_or_obj": str(tmp_path / "in" / "x.nii.gz")})
    saver = SafeSaveImaged(keys="pred", output_dir=str(tmp_path / "out"), output_postfix="seg",
                           output_dtype=np.uint8, separate_folder=False, print_log=False)

    def crash(self, filename, *a, **k):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(NibabelWriter, "write", crash)
        with pytest.raises(RuntimeError):
            saver({"pred": img})
    assert list((tmp_path / "out").iterdir()) == []
    saver({"pred": img})
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x_seg.nii.gz"]
    with pytest.raises(OutputExistsError, match="already exists"):
        saver({"pred": img})


# ----------------------------------------------------------------------------------------------------
# CheckVolumed (the check used by inference, training and validation)


def _meta_image(arr, name="scan.nii.gz"):
    from monai.data import MetaTensor

    x = torch.as_tensor(arr)
    return MetaTensor(x if x.ndim != 3 else x, meta={"filename_or_obj": f"/data/{name}"})


@pytest.mark.parametrize("case", ["flat2d", "cine4d", "nan", "constant", "tiny20", "labelrange", "labelshape"])
def test_check_volume_names_file_and_problem(case):
    img, lab = _image(0)[None], _label(0)[None].astype(np.float32)
    if case == "flat2d":
        img = img[..., 0]
    elif case == "cine4d":
        img = np.concatenate([img] * 3)
    elif case == "nan":
        img[0, 1, 2, 3], img[0, 3, 2, 1] = np.nan, np.inf
    elif case == "constant":
        img = np.full_like(img, 3.0)
    elif case == "tiny20":
        img, lab = _image(0, (20, 20, 4))[None], _label(0, (20, 20, 4))[None]
    elif case == "labelrange":
        lab[0, 0, 0, 0] = 9
    elif case == "labelshape":
        lab = lab[:, :, :60]
    t = CheckVolumed(keys=["image", "label"], num_classes=4)
    bad = "lab.nii.gz" if case.startswith("label") else "img.nii.gz"
    with pytest.raises(InvalidCaseError) as e:
        t({"image": _meta_image(img, "img.nii.gz"), "label": _meta_image(lab, "lab.nii.gz")})
    assert str(e.value).startswith(f"/data/{bad}: ") and EXPECT[case] in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("values, expect", [
    ({(0, 1, 2, 3): np.inf}, "0 NaN and 1 Inf voxel"),
    ({(0, 1, 2, 3): -np.inf, (0, 60, 2, 0): -np.inf}, "0 NaN and 2 Inf voxel"),
    ({(0, 9, 9, 3): np.nan}, "1 NaN and 0 Inf voxel"),
], ids=["inf", "neg_inf_x2", "nan"])
def test_check_volume_counts_nan_inf_whatever_the_extremes(values, expect):
    """The one-pass min/max that clears a finite volume must still send every NaN/Inf case to the count."""
    img = _image(0)[None]
    for idx, v in values.items():
        img[idx] = v
    with pytest.raises(InvalidCaseError, match=expect):
        CheckVolumed(keys="image")({"image": _meta_image(img)})
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        with pytest.raises(InvalidCaseError, match=expect):
            CheckVolumed(keys="image")({"image": _meta_image(torch.as_tensor(img).to(dtype))})


def test_check_volume_passes_good_data_and_uses_the_ras_inplane_axes():
    img = _meta_image(_image(0)[None])
    out = CheckVolumed(keys="image")({"image": img})
    assert out["image"] is img
    CheckVolumed(keys="image", allow_constant=True)({"image": _meta_image(np.zeros((1, 64, 64, 4), np.float32))})
    # a sagittal stack stored (slices, H, W) = (4, 64, 64): 4 is the slice axis once oriented to RAS
    from monai.data import MetaTensor

    aff = torch.tensor([[0.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    sag = MetaTensor(torch.rand(1, 4, 64, 64), affine=aff, meta={"filename_or_obj": "sag.nii.gz"})
    CheckVolumed(keys="image")({"image": sag})
    with pytest.raises(InvalidCaseError, match="slices are 20x20"):
        CheckVolumed(keys="image")({"image": MetaTensor(torch.rand(1, 64, 20, 20), affine=aff)})


# ----------------------------------------------------------------------------------------------------
# training and validation data loading (train.json chains, with CheckVolumed as proposed)


def _train_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["image_size"] = [64, 64]
    check = {"_target_": "fias_monai.transforms.CheckVolumed", "keys": ["image", "label"],
             "num_classes": "@num_classes"}
    for chain in ("train#volume_transforms#transforms", "validate#preprocessing#transforms"):
        ts = parser[chain]
        if not any(isinstance(t, dict) and "CheckVolumed" in str(t.get("_target_")) for t in ts):
            at = 1 + next(i for i, t in enumerate(ts)
                          if isinstance(t, dict) and t.get("_target_") == "EnsureChannelFirstd")
            parser[chain] = ts[:at] + [copy.deepcopy(check)] + ts[at:]  # the change proposed for train.json
    return parser


@pytest.fixture(scope="module")
def bad_training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    imgs = make_bad_images(root / "imagesTr")
    items, expect = [], {}
    for key in ("good_a", "truncated", "notnifti", "flat2d", "cine4d", "nan", "constant", "tiny20"):
        shape = {"flat2d": (64, 64), "cine4d": (64, 64, 4), "tiny20": (20, 20, 4)}.get(key, (64, 64, 4))
        lab = _save(root / "labelsTr" / f"{key}.nii.gz", _label(1, shape))
        items.append({"image": str(imgs[key]), "label": str(lab)})
        if key != "good_a":
            expect[str(imgs[key])] = EXPECT[key]
    bad_lab = _label(2)
    bad_lab[0, 0, 0] = 9
    items.append({"image": str(imgs["good_a"]), "label": str(_save(root / "labelsTr" / "range.nii.gz", bad_lab))})
    items.append({"image": str(imgs["good_a"]),
                  "label": str(_save(root / "labelsTr" / "shape.nii.gz", _label(3, (64, 60, 4))))})
    items.append({"image": str(imgs["notes"]), "label": str(root / "labelsTr" / "range.nii.gz")})
    return items, expect, root


def test_training_slice_dataset_lists_every_bad_volume(bad_training_data):
    items, expect, root = bad_training_data
    parser = _train_config()
    chain = parser.get_parsed_content("train#volume_transforms")
    with pytest.raises(SliceDatasetError) as e:
        SliceDataset(items, chain, num_classes=4, num_workers=1)
    got = dict(e.value.failures)
    assert len(e.value.failures) == len(items) - 1  # all but the good pair
    # SliceDataset words read errors itself ("EOFError: ..."); describe_error's wording is accepted too
    raw = {"truncated": "Compressed file ended", "notnifti": "is not a gzip file"}
    for path, phrase in expect.items():
        key = Path(path).name.split(".")[0]
        assert phrase in got[path] or raw.get(key, phrase) in got[path], (path, got[path])
    labels = [f for f, r in e.value.failures if f == items[0]["image"]]  # the label cases name the label file
    reasons = [r for f, r in e.value.failures if f == items[0]["image"]]
    assert len(labels) == 2
    assert any(str(root / "labelsTr" / "range.nii.gz") in r and EXPECT["labelrange"] in r for r in reasons)
    assert any(str(root / "labelsTr" / "shape.nii.gz") in r and EXPECT["labelshape"] in r for r in reasons)
    assert any(p in got[str(root / "imagesTr" / "notes.txt")]
               for p in ("not a readable image file", "cannot find a suitable reader"))


def test_validation_dataset_lists_every_bad_volume(bad_training_data):
    items, expect, root = bad_training_data
    parser = _train_config()
    pre = parser.get_parsed_content("validate#preprocessing")
    with pytest.raises(VolumeLoadError) as e:
        CheckedCacheDataset(items, pre, cache_rate=1.0, num_workers=1, progress=False)
    got = {}
    for f, r in e.value.failures:
        got.setdefault(f, []).append(r)
    assert len(e.value.failures) == len(items) - 1
    for path, phrase in expect.items():
        assert any(phrase in r for r in got[path]), (path, got[path])
    assert str(e.value).startswith(f"{len(items) - 1} validation volume(s) could not be loaded:")


def test_training_datalist_with_missing_files(tmp_path):
    datalist = make_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, shape=(32, 32, 3))
    (tmp_path / "demo" / "imagesTr" / "demo_001.nii.gz").unlink()
    (tmp_path / "demo" / "labelsTr" / "demo_002.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 1 missing file\(s\):\n  .*imagesTr/demo_001.nii.gz"):
        load_datalist(datalist, "training")
    with pytest.raises(FileNotFoundError, match=r"labelsTr/demo_002.nii.gz"):
        load_datalist(datalist, "validation")


# ----------------------------------------------------------------------------------------------------
# data preparation (fias_monai.data.prepare_*)


@pytest.fixture(scope="module")
def acdc_prep(tmp_path_factory):
    """Official ACDC layout with one bad case per kind; converted once."""
    src = tmp_path_factory.mktemp("acdc")

    def case(pid, image=None, label=None):
        d = src / f"patient{pid:03d}"
        if image is not None:
            _save(d / f"patient{pid:03d}_frame01.nii.gz", image)
        if label is not None:
            _save(d / f"patient{pid:03d}_frame01_gt.nii.gz", label)
        return d / f"patient{pid:03d}_frame01.nii.gz", d / f"patient{pid:03d}_frame01_gt.nii.gz"

    paths = {"good": case(1, _image(), _label())}
    paths["truncated"] = case(4, _image(), _label())
    raw = paths["truncated"][0].read_bytes()
    paths["truncated"][0].write_bytes(raw[: len(raw) // 2])
    paths["notnifti"] = case(5, None, _label())
    paths["notnifti"][0].write_text("not a NIfTI file")
    paths["flat2d"] = case(6, _image(0, (64, 64)), _label(0, (64, 64)))
    paths["cine4d"] = case(7, _image(0, (64, 64, 4, 3)), _label())
    a = _image()
    a[1, 1, 1], a[2, 2, 2] = np.nan, np.inf
    paths["nan"] = case(10, a, _label())
    paths["constant"] = case(11, np.full((64, 64, 4), 7, np.float32), _label())
    lab = _label()
    lab[0, 0, 0] = 9
    paths["labelrange"] = case(13, _image(), lab)
    paths["labelshape"] = case(15, _image(), _label(0, (64, 60, 4)))
    paths["tiny20"] = case(16, _image(0, (20, 20, 4)), _label(0, (20, 20, 4)))
    paths["missing"] = case(18, _image(), None)
    out = tmp_path_factory.mktemp("acdc_out")
    with pytest.raises(DataConversionError) as e:
        prepare_acdc_official(src, out)
    return paths, dict(e.value.failures), out


PREP_EXPECT = {  # what the converters say today (fias_monai/data/io.py)
    "truncated": (0, "cannot read NIfTI file (corrupt or truncated?)"),
    "notnifti": (0, "is not a gzip file"),
    "flat2d": (0, "image must be a 3D volume, got shape (64, 64)"),
    "cine4d": (0, "image must be a 3D volume, got shape (64, 64, 4, 3)"),
    "nan": (0, "image contains 2 NaN/Inf value(s)"),
    "labelrange": (1, "label values out of range [0, 3]: 9 (1 voxels)"),
    "labelshape": (1, "image shape (64, 64, 4) != label shape (64, 60, 4)"),
    "missing": (1, "label file missing for patient018_frame01.nii.gz"),
}


@pytest.mark.parametrize("case", sorted(PREP_EXPECT))
def test_prep_reports_bad_case_by_file(acdc_prep, case):
    paths, failures, out = acdc_prep
    which, phrase = PREP_EXPECT[case]
    assert phrase in failures[str(paths[case][which])]
    assert (out / "imagesTr" / "patient001_frame01.nii.gz").is_file()  # the good case is still converted
    first = load_datalist(out / "datalist.json", "training")[0]["image"]
    assert first.endswith("patient001_frame01.nii.gz")


def test_prep_rejects_constant_image(acdc_prep):
    paths, failures, _ = acdc_prep
    assert "constant image" in failures[str(paths["constant"][0])]


def test_prep_rejects_tiny_images(acdc_prep):
    paths, failures, _ = acdc_prep
    assert "slices are 20x20 pixels, smaller than the minimum 32x32" in failures[str(paths["tiny20"][0])]


def test_prep_missing_listed_file_empty_folder_unwritable_output(tmp_path):
    import h5py

    src = tmp_path / "h5"
    (src / "data").mkdir(parents=True)
    (src / "train.list").write_text("patient001_frame01\npatient003_frame01\n")
    (src / "val.list").write_text("")
    with h5py.File(src / "data" / "patient001_frame01.h5", "w") as f:
        f["image"], f["label"] = _image(0, (4, 64, 64)), _label(0, (4, 64, 64))
    with pytest.raises(DataConversionError) as e:
        prepare_acdc_h5(src, tmp_path / "out")
    assert e.value.failures == [(str(src / "data" / "patient003_frame01.h5"), "listed in train.list but missing")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no patientXXX/patientXXX_frameYY.nii.gz files under .*empty"):
        prepare_acdc_official(tmp_path / "empty", tmp_path / "out2")
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OSError, match=r"blocker/out"):
        prepare_acdc_h5(src, tmp_path / "blocker" / "out")


# ----------------------------------------------------------------------------------------------------
# SIGKILL mid-epoch, then --resume true


def _last(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_training_killed_mid_epoch_resumes_from_last_checkpoint(tmp_path):
    # 2 training volumes of 10 slices, batch 2: 10 iterations an epoch (~0.1 s each here), so that the kill at
    # iteration 2 of epoch 2 leaves 8 iterations and a validation (~1 s) before epoch 2 could end. A time budget
    # far longer than the run: the time trained before the kill must travel in last.pt
    make_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, shape=(64, 64, 10))
    bundle = tmp_path / "bundle"
    last = bundle / "models" / "last.pt"
    cmd = [PY, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(tmp_path / "demo"), "--epochs", "3",
           "--batch_size", "2", "--num_workers", "0", "--cache_workers", "1", "--max_minutes", "60", *TINY_CLI]
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log1, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 400
        while not last.exists():
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 400 s (the first epoch of a tiny run; a loaded 2-CPU machine is slow)"
            time.sleep(0.05)
        # kill once the progress bar shows epoch 2 under way (2 of its 10 iterations done)
        while "Epoch [2/3]: [2/10]" not in (tmp_path / "run1.log").read_text(errors="replace"):
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "epoch 2 did not start"
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log1.close()
    assert proc.returncode == -signal.SIGKILL
    ckpt = _last(last)
    assert ckpt["trainer"]["epoch"] == 1, "killed during epoch 2: the checkpoint is still epoch 1's"
    best_after_1 = ckpt["best"]["best_metric"]
    assert best_after_1 > -float("inf") and ckpt["best"]["best_epoch"] == 1
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")], "no temp file left by the kill"
    trained_s = ckpt["training_clock"]["seconds"]
    assert 0 < trained_s < 400

    proc2 = subprocess.run(cmd + ["--resume", "true"], cwd=REPO, capture_output=True, text=True, env=ENV,
                           timeout=300)
    log = proc2.stdout + proc2.stderr
    assert proc2.returncode == 0, log[-3000:]
    assert f"resumed from {last} at epoch 1" in log
    assert f"training clock: {trained_s / 60:.1f} min trained before the resume" in log
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in log
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in log
    assert "SupervisedTrainer - INFO - Epoch[3] Complete" in log
    assert "Epoch [1/3]" not in log  # no iteration of epoch 1 was redone
    final = _last(last)
    assert final["trainer"]["epoch"] == 3
    assert final["trainer"]["iteration"] == 3 * ckpt["trainer"]["iteration"]
    assert final["optimizer"]["state"], "optimizer moments saved"
    assert final["best"]["best_metric"] >= best_after_1  # kept, not reset
    assert final["lr_scheduler"]["last_epoch"] == final["trainer"]["iteration"]
    assert final["training_clock"]["seconds"] > trained_s  # counted on from the time before the kill
    with open(bundle / "logs" / "val_history.csv") as f:
        curve = {int(r["epoch"]): float(r["time_s"]) for r in csv.DictReader(f)}
    assert sorted(curve) == [1, 2, 3] and curve[1] < trained_s + 0.01 < curve[2] < curve[3]  # the curve goes on too
