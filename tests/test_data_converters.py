"""Tests of the dataset converters and datalist helpers (tiny fixtures built in tmp_path; CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA, acdc_arrays, read_nifti, requires_shared, write_h5
from fias_monai.data import (
    DataConversionError,
    load_datalist,
    prepare_acdc_h5,
    prepare_acdc_official,
    prepare_btcv,
    prepare_synapse_transunet,
    write_datalist,
)


# ----------------------------------------------------------------------------------------------------
# fixtures / helpers


def _acdc_arrays(seed: int, shape=(4, 40, 36)):
    return acdc_arrays(seed, shape, corner_label=True)


def _nii(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _datalist(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _names(doc: dict, section: str) -> list[str]:
    return sorted(Path(e["image"]).name.replace(".nii.gz", "") for e in doc[section])


@pytest.fixture()
def acdc_h5(tmp_path):
    src = tmp_path / "acdc_h5"
    (src / "volumes").mkdir(parents=True)
    cases = {
        "patient001_frame01": 0,  # train.list
        "patient019_frame01": 1,  # val.list
        "patient002_frame01": 2,  # unlisted, TransUNet test patient -> test
        "patient005_frame01": 3,  # unlisted, not a test patient -> ignored
    }
    for name, seed in cases.items():
        write_h5(src / "volumes" / f"{name}.h5", *_acdc_arrays(seed))
    (src / "train.list").write_text("patient001_frame01\n")
    (src / "val.list").write_text("patient019_frame01\n\n")
    return src


# ----------------------------------------------------------------------------------------------------
# ACDC, h5 layout


def test_acdc_h5_layout_split_and_values(acdc_h5, tmp_path):
    out = tmp_path / "out"
    dl = prepare_acdc_h5(acdc_h5, out)
    assert dl == out / "datalist.json"
    doc = _datalist(dl)
    assert doc["labels"] == {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
    assert doc["modality"] == {"0": "MRI"}
    assert _names(doc, "training") == ["patient001_frame01"]
    assert _names(doc, "validation") == ["patient019_frame01"]
    assert _names(doc, "test") == ["patient002_frame01"]
    assert doc["training"][0] == {
        "image": "imagesTr/patient001_frame01.nii.gz",
        "label": "labelsTr/patient001_frame01.nii.gz",
    }
    assert doc["test"][0]["image"] == "imagesTs/patient002_frame01.nii.gz"
    assert not list(out.rglob("patient005*"))

    image, label = _acdc_arrays(0)
    entry = load_datalist(dl, "training")[0]
    assert Path(entry["image"]).is_absolute() and Path(entry["label"]).is_file()
    img, aff, dt = read_nifti(entry["image"])
    lab, laff, ldt = read_nifti(entry["label"])
    assert img.shape == lab.shape == (40, 36, 4)  # (H, W, Z)
    assert dt == np.float32 and ldt == np.uint8
    np.testing.assert_array_equal(aff, np.eye(4))
    np.testing.assert_array_equal(laff, np.eye(4))
    for z in range(4):  # output slice z is exactly the h5 slice z
        np.testing.assert_array_equal(img[..., z], image[z])
        np.testing.assert_array_equal(lab[..., z], label[z])


def test_acdc_h5_bad_cases_reported_good_ones_written(acdc_h5, tmp_path):
    vol = acdc_h5 / "volumes"
    # truncated HDF5 file
    good = (vol / "patient001_frame01.h5").read_bytes()
    (vol / "patient004_frame01.h5").write_bytes(good[:300])
    # label value out of range
    image, label = _acdc_arrays(4)
    label[1, 3, 3] = 7
    write_h5(vol / "patient006_frame01.h5", image, label)
    # shape mismatch
    write_h5(vol / "patient007_frame01.h5", image, label[:, :10])
    # wrong keys
    with h5py.File(vol / "patient010_frame01.h5", "w") as f:
        f.create_dataset("img", data=image)
    # NaN
    nan_image = image.copy()
    nan_image[0, 0, 0] = np.nan
    write_h5(vol / "patient011_frame01.h5", nan_image, _acdc_arrays(4)[1])
    (acdc_h5 / "train.list").write_text(
        "\n".join(["patient001_frame01", "patient004_frame01", "patient006_frame01", "patient007_frame01",
                   "patient010_frame01", "patient011_frame01", "patient013_frame01"]) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(DataConversionError) as ei:
        prepare_acdc_h5(acdc_h5, out)
    msg = str(ei.value)
    failed = {Path(p).name: r for p, r in ei.value.failures}
    assert set(failed) == {
        "patient004_frame01.h5", "patient006_frame01.h5", "patient007_frame01.h5",
        "patient010_frame01.h5", "patient011_frame01.h5", "patient013_frame01.h5",
    }  # fmt: skip
    for name in failed:
        assert name in msg
    assert "corrupt" in failed["patient004_frame01.h5"]
    assert "out of range" in failed["patient006_frame01.h5"] and "7" in failed["patient006_frame01.h5"]
    assert "shape" in failed["patient007_frame01.h5"]
    assert "'label'" in failed["patient010_frame01.h5"]
    assert "NaN" in failed["patient011_frame01.h5"]
    assert "missing" in failed["patient013_frame01.h5"]
    # the good cases and a datalist of only them were written
    doc = _datalist(out / "datalist.json")
    assert _names(doc, "training") == ["patient001_frame01"]
    assert _names(doc, "validation") == ["patient019_frame01"]
    assert ei.value.datalist == out / "datalist.json"
    assert not (out / "imagesTr" / "patient004_frame01.nii.gz").exists()
    for sec in ("training", "validation", "test"):
        load_datalist(out / "datalist.json", sec)  # all listed files exist


def test_overwrite_refused_and_old_bytes_kept(acdc_h5, tmp_path):
    out = tmp_path / "out"
    dl = prepare_acdc_h5(acdc_h5, out)
    img_file = out / "imagesTr" / "patient001_frame01.nii.gz"
    before = {p: p.read_bytes() for p in (img_file, dl)}
    # change the source so a (wrong) rewrite would change the bytes
    write_h5(acdc_h5 / "volumes" / "patient001_frame01.h5", *_acdc_arrays(99))
    with pytest.raises(FileExistsError, match="patient001_frame01.nii.gz|datalist.json"):
        prepare_acdc_h5(acdc_h5, out)
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in out.rglob(".*tmp*")]  # no temp files left behind
    prepare_acdc_h5(acdc_h5, out, overwrite=True)
    assert img_file.read_bytes() != before[img_file]
    np.testing.assert_array_equal(read_nifti(img_file)[0][..., 0], _acdc_arrays(99)[0][0])


# ----------------------------------------------------------------------------------------------------
# ACDC, official NIfTI layout


def _official_patient(src: Path, pid: int, seed: int, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = src / f"patient{pid:03d}"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    image = rng.integers(10, 800, size=(36, 34, 5)).astype(np.int16)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[2:6, 2:6, :] = 1
    label[8:12, 5:9, 1:4] = 2
    label[9:11, 6:8, 2] = 3
    for frame in (1, 12):
        _nii(d / f"patient{pid:03d}_frame{frame:02d}.nii.gz", image, affine)
        _nii(d / f"patient{pid:03d}_frame{frame:02d}_gt.nii.gz", label, affine)
    _nii(d / f"patient{pid:03d}_4d.nii.gz", np.zeros((18, 14, 5, 3), np.int16), affine)
    (d / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: NOR\n")
    return image, label


def test_acdc_official_keeps_affine_scales_and_splits(tmp_path):
    src = tmp_path / "training"
    affine = np.array([[1.5, 0, 0, -20.0], [0, 1.5, 0, 30.0], [0, 0, 10.0, 5.0], [0, 0, 0, 1]])
    image, label = _official_patient(src, 1, 0, affine)
    _official_patient(src, 2, 1, affine)  # TransUNet test patient
    _official_patient(src, 19, 2, affine)  # TransUNet validation patient
    _official_patient(src, 120, 3, affine)  # challenge test set: outside the split, skipped by default
    out = tmp_path / "out"
    doc = _datalist(prepare_acdc_official(src, out))
    assert _names(doc, "training") == ["patient001_frame01", "patient001_frame12"]
    assert _names(doc, "validation") == ["patient019_frame01", "patient019_frame12"]
    assert _names(doc, "test") == ["patient002_frame01", "patient002_frame12"]
    assert not list(out.rglob("*4d*")) and not list(out.rglob("*_gt*")) and not list(out.rglob("patient120*"))
    img, aff, dt = read_nifti(out / "imagesTr" / "patient001_frame01.nii.gz")
    lab, laff, ldt = read_nifti(out / "labelsTr" / "patient001_frame01.nii.gz")
    assert img.shape == lab.shape == image.shape and dt == np.float32 and ldt == np.uint8
    np.testing.assert_allclose(aff, affine, atol=1e-5)
    np.testing.assert_allclose(laff, affine, atol=1e-5)
    assert img.min() == 0.0 and img.max() == 1.0
    np.testing.assert_allclose(img, (image - image.min()) / (image.max() - image.min()), atol=1e-6)
    np.testing.assert_array_equal(lab, label)


def test_acdc_official_corrupt_and_missing_gt(tmp_path):
    src = tmp_path / "training"
    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    _official_patient(src, 1, 0, affine)
    _official_patient(src, 4, 1, affine)
    _official_patient(src, 5, 2, affine)
    bad_img = src / "patient004" / "patient004_frame01.nii.gz"
    bad_img.write_bytes(b"this is not a gzip file at all")
    truncated = src / "patient004" / "patient004_frame12.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:120])
    (src / "patient005" / "patient005_frame12_gt.nii.gz").unlink()
    out = tmp_path / "out"
    with pytest.raises(DataConversionError) as ei:
        prepare_acdc_official(src, out, cases=["patient001", "patient004", "patient005"])
    failed = {Path(p).name for p, _ in ei.value.failures}
    assert failed == {"patient004_frame01.nii.gz", "patient004_frame12.nii.gz", "patient005_frame12_gt.nii.gz"}
    assert str(bad_img) in str(ei.value) and str(truncated) in str(ei.value)
    doc = _datalist(out / "datalist.json")
    assert _names(doc, "training") == ["patient001_frame01", "patient001_frame12", "patient005_frame01"]


# ----------------------------------------------------------------------------------------------------
# Synapse, TransUNet layout + flat npz folder


def _synapse_slice(seed: int, shape=(40, 36)):
    rng = np.random.default_rng(seed)
    image = rng.random(shape, dtype=np.float32)
    image[0, 0], image[0, 1] = 0.0, 1.0  # window edges (-125 / 275 HU)
    label = (np.arange(image.size).reshape(shape) % 9).astype(np.float32)  # TransUNet stores float labels
    return image, label


def _save_slice(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    np.savez(path, image=image, label=label)


def test_synapse_transunet_hu_roundtrip_stacking_and_split(tmp_path):
    src = tmp_path / "Synapse"
    (src / "train_npz").mkdir(parents=True)
    (src / "test_vol_h5").mkdir()
    slices = {}
    for idx in (10, 2, 3, 4, 5, 6, 7, 8, 9):  # written out of order; 2..10 contiguous
        slices[idx] = _synapse_slice(idx)
        np.savez(src / "train_npz" / f"case0005_slice{idx:03d}.npz", image=slices[idx][0], label=slices[idx][1])
    vol_img = np.stack([_synapse_slice(100 + z)[0] for z in range(3)])
    vol_lab = np.stack([_synapse_slice(100 + z)[1] for z in range(3)])
    write_h5(src / "test_vol_h5" / "case0001.npy.h5", vol_img, vol_lab)
    out = tmp_path / "out"
    doc = _datalist(prepare_synapse_transunet(src, out))
    assert doc["labels"]["1"] == "aorta" and doc["labels"]["8"] == "stomach" and len(doc["labels"]) == 9
    assert doc["modality"] == {"0": "CT"}
    assert _names(doc, "training") == ["case0005"] and _names(doc, "test") == ["case0001"]
    assert doc["validation"] == []

    img, aff, dt = read_nifti(out / "imagesTr" / "case0005.nii.gz")
    lab, _, ldt = read_nifti(out / "labelsTr" / "case0005.nii.gz")
    assert img.shape == lab.shape == (40, 36, 9) and dt == np.float32 and ldt == np.uint8
    np.testing.assert_array_equal(aff, np.eye(4))
    for z, idx in enumerate(range(2, 11)):  # sorted by slice index
        np.testing.assert_allclose(img[..., z], slices[idx][0] * 400 - 125, atol=1e-3)
        np.testing.assert_array_equal(lab[..., z], slices[idx][1])
    assert img[0, 0, 0] == -125.0 and img[0, 1, 0] == 275.0

    timg, _, _ = read_nifti(out / "imagesTs" / "case0001.nii.gz")
    tlab, _, _ = read_nifti(out / "labelsTs" / "case0001.nii.gz")
    assert timg.shape == (40, 36, 3)
    np.testing.assert_allclose(timg, vol_img.transpose(1, 2, 0) * 400 - 125, atol=1e-3)
    np.testing.assert_array_equal(tlab, vol_lab.transpose(1, 2, 0))


def test_synapse_flat_prefixes_and_errors(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for idx in (60, 61):
        _save_slice(src / f"train_amos_0001_slice{idx:04d}.npz", *_synapse_slice(idx))
    _save_slice(src / "valid_amos_0013_slice0050.npz", *_synapse_slice(1))
    # label out of range
    bad_label = _synapse_slice(2)[1]
    bad_label[3, 3] = 12
    np.savez(src / "train_amos_0100_slice0001.npz", image=_synapse_slice(2)[0], label=bad_label)
    # raw HU instead of [0, 1]
    np.savez(src / "train_amos_0101_slice0001.npz", image=_synapse_slice(3)[0] * 1000, label=_synapse_slice(3)[1])
    # gap in slice indices
    for idx in (1, 3):
        _save_slice(src / f"train_amos_0102_slice{idx:04d}.npz", *_synapse_slice(idx))
    # corrupt npz
    (src / "train_amos_0103_slice0001.npz").write_bytes(b"PK\x03\x04garbage")
    out = tmp_path / "out"
    with pytest.raises(DataConversionError) as ei:
        prepare_synapse_transunet(src, out)
    failed = {Path(p).name: r for p, r in ei.value.failures}
    assert set(failed) == {
        "train_amos_0100_slice0001.npz", "train_amos_0101_slice0001.npz",
        "train_amos_0102_slice0001.npz", "train_amos_0103_slice0001.npz",
    }  # fmt: skip
    assert "out of range [0, 8]: 12" in failed["train_amos_0100_slice0001.npz"]
    assert "expected [0, 1]" in failed["train_amos_0101_slice0001.npz"]
    assert "missing slice indices [2]" in failed["train_amos_0102_slice0001.npz"]
    assert "corrupt" in failed["train_amos_0103_slice0001.npz"]
    doc = _datalist(out / "datalist.json")
    assert _names(doc, "training") == ["amos_0001"] and _names(doc, "validation") == ["amos_0013"]
    assert read_nifti(out / "imagesTr" / "amos_0001.nii.gz")[0].shape == (40, 36, 2)


# ----------------------------------------------------------------------------------------------------
# BTCV raw NIfTI


def test_btcv_remap_affine_hu_and_split(tmp_path):
    src = tmp_path / "RawData" / "Training"
    (src / "img").mkdir(parents=True)
    (src / "label").mkdir()
    affine = np.array([[-0.7, 0, 0, 170.0], [0, -0.7, 0, 180.0], [0, 0, 3.0, -300.0], [0, 0, 0, 1]])
    shape = (34, 32, 4)
    hu = np.random.default_rng(0).integers(-1024, 1500, size=shape).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    for organ in range(14):  # organ k at voxel (k % 10, k // 10, 1)
        label[organ % 10, organ // 10, 1] = organ
    for num in (1, 5):  # case0001 is a TransUNet test case, case0005 training
        _nii(src / "img" / f"img{num:04d}.nii.gz", hu, affine)
        _nii(src / "label" / f"label{num:04d}.nii.gz", label, affine)
    bad = label.copy()
    bad[0, 0, 0] = 14
    _nii(src / "img" / "img0006.nii.gz", hu, affine)
    _nii(src / "label" / "label0006.nii.gz", bad, affine)
    _nii(src / "img" / "img0007.nii.gz", hu, affine)  # label missing
    out = tmp_path / "out"
    with pytest.raises(DataConversionError) as ei:
        prepare_btcv(tmp_path / "RawData", out)
    failed = {Path(p).name: r for p, r in ei.value.failures}
    assert set(failed) == {"label0006.nii.gz", "label0007.nii.gz"}
    assert "out of range [0, 13]: 14" in failed["label0006.nii.gz"]
    doc = _datalist(out / "datalist.json")
    assert _names(doc, "training") == ["case0005"] and _names(doc, "test") == ["case0001"]

    img, aff, dt = read_nifti(out / "imagesTr" / "case0005.nii.gz")
    lab, laff, ldt = read_nifti(out / "labelsTr" / "case0005.nii.gz")
    assert dt == np.float32 and ldt == np.uint8 and img.shape == lab.shape == shape
    np.testing.assert_allclose(aff, affine, atol=1e-5)
    np.testing.assert_allclose(laff, affine, atol=1e-5)
    np.testing.assert_array_equal(img, hu.astype(np.float32))  # HU kept
    expected = {0: 0, 1: 7, 2: 4, 3: 3, 4: 2, 5: 0, 6: 5, 7: 8, 8: 1, 9: 0, 10: 0, 11: 6, 12: 0, 13: 0}
    for organ, synapse_id in expected.items():
        assert lab[organ % 10, organ // 10, 1] == synapse_id, organ
    assert lab[8, 0, 1] == 1 and lab[5, 0, 1] == 0 and lab[1, 1, 1] == 6  # 8->1, 5->0, 11->6
    assert set(np.unique(lab)) <= set(range(9))


# ----------------------------------------------------------------------------------------------------
# datalist helpers


def test_write_and_load_datalist(tmp_path):
    (tmp_path / "imgs").mkdir()
    a, b = tmp_path / "imgs" / "a.nii.gz", tmp_path / "imgs" / "b.nii.gz"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    dl = write_datalist(
        tmp_path / "dl.json", [{"image": str(a), "label": str(b)}], [], [{"image": "imgs/a.nii.gz"}],
        labels=["background", "thing"], name="n", description="d", modality="CT",
    )  # fmt: skip
    doc = _datalist(dl)
    assert doc["training"] == [{"image": "imgs/a.nii.gz", "label": "imgs/b.nii.gz"}]
    assert doc["labels"] == {"0": "background", "1": "thing"} and doc["validation"] == []
    assert load_datalist(dl, "training") == [{"image": str(a.resolve()), "label": str(b.resolve())}]
    assert load_datalist(dl, "validation") == []
    with pytest.raises(FileExistsError, match="dl.json"):
        write_datalist(tmp_path / "dl.json", [], labels=["background"])
    with pytest.raises(ValueError, match="no list section 'bogus'"):
        load_datalist(dl, "bogus")
    b.unlink()
    with pytest.raises(FileNotFoundError) as ei:
        load_datalist(dl, "training")
    assert "dl.json" in str(ei.value) and "b.nii.gz" in str(ei.value)
    # readable by MONAI's own loader too
    from monai.data import load_decathlon_datalist

    assert load_decathlon_datalist(str(dl), data_list_key="test") == [{"image": str(a.resolve())}]


# ----------------------------------------------------------------------------------------------------
# real data (../shared/data), skipped in clones without it


@requires_shared("acdc")
def test_real_acdc_h5_subset(tmp_path):
    dl = prepare_acdc_h5(SHARED_DATA / "acdc", tmp_path / "acdc", cases=["patient001", "patient019_frame01"])
    doc = _datalist(dl)
    assert _names(doc, "training") == ["patient001_frame01", "patient001_frame02"]
    assert _names(doc, "validation") == ["patient019_frame01"] and doc["test"] == []
    with h5py.File(SHARED_DATA / "acdc" / "volumes" / "patient001_frame01.h5", "r") as f:
        src_img, src_lab = f["image"][()], f["label"][()]
    entry = load_datalist(dl, "training")[0]
    img, aff, dt = read_nifti(entry["image"])
    lab, _, _ = read_nifti(entry["label"])
    assert img.shape == src_img.transpose(1, 2, 0).shape and dt == np.float32
    np.testing.assert_array_equal(img, src_img.transpose(1, 2, 0))
    np.testing.assert_array_equal(lab, src_lab.transpose(1, 2, 0))
    assert set(np.unique(lab)) == {0, 1, 2, 3}


@pytest.mark.skipif(not (SHARED_DATA / "amos_ct_slices").exists(), reason="../shared/data not present in this clone")
def test_real_amos_slices(tmp_path):
    dl = prepare_synapse_transunet(SHARED_DATA / "amos_ct_slices", tmp_path / "amos")
    doc = _datalist(dl)
    assert _names(doc, "training") == ["amos_0001"] and _names(doc, "validation") == ["amos_0013"]
    entries = load_datalist(dl, "training") + load_datalist(dl, "validation")
    assert len(entries) == 2
    for entry, hw in zip(entries, ((768, 768), (512, 512))):
        img, _, dt = read_nifti(entry["image"])
        lab, _, ldt = read_nifti(entry["label"])
        assert img.shape == lab.shape == (*hw, 11) and dt == np.float32 and ldt == np.uint8
        assert lab.min() >= 0 and lab.max() <= 8 and lab.max() > 0
        assert img.min() >= -125.0 and img.max() <= 275.0
