"""Tests of the synthetic demo dataset used by the bundle when no real data is configured."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fias_monai.data import ensure_demo_dataset, load_datalist, make_demo_dataset


def _arrays(entry):
    img = nib.load(entry["image"])
    lab = nib.load(entry["label"])
    return np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj), img, lab


def _all_entries(dl):
    return load_datalist(dl, "training") + load_datalist(dl, "validation")


def test_demo_layout_classes_and_sizes(tmp_path):
    t0 = time.perf_counter()
    dl = make_demo_dataset(tmp_path / "demo")
    elapsed = time.perf_counter() - t0
    assert elapsed < 4.0, f"demo generation took {elapsed:.2f}s (target < 2 s)"
    doc = json.loads(dl.read_text())
    assert doc["labels"] == {"0": "background", "1": "large", "2": "ring", "3": "small"}
    assert doc["numTraining"] == 8 and doc["numValidation"] == 3 and doc["test"] == []
    entries = _all_entries(dl)
    assert len(entries) == 11
    for entry in entries:
        image, label, img, lab = _arrays(entry)
        assert image.shape == label.shape == (96, 96, 12)
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(img.affine, np.eye(4))
        frac = np.bincount(label.ravel(), minlength=4) / label.size
        assert len(frac) == 4 and (frac > 0).all(), f"{entry['label']}: a class is missing {frac}"
        assert frac[3] < 0.01, "small class must be small"
        assert frac[1] > 0.02 and frac[1] > 20 * frac[3], "large class must be large"
        assert frac[2] > 5 * frac[3]
        # intensities separate the classes on average but overlap a little
        means = [image[label == k].mean() for k in range(4)]
        assert means[0] < means[2] < means[1] < means[3]
        assert image[label == 0].max() > image[label == 2].min()
        assert 0.0 <= image.min() and image.max() <= 1.0


def test_demo_deterministic_for_a_seed(tmp_path):
    kw = dict(num_train=2, num_val=1, shape=(48, 40, 6))
    a = _all_entries(make_demo_dataset(tmp_path / "a", seed=3, **kw))
    b = _all_entries(make_demo_dataset(tmp_path / "b", seed=3, **kw))
    c = _all_entries(make_demo_dataset(tmp_path / "c", seed=4, **kw))
    for ea, eb in zip(a, b):
        for key in ("image", "label"):
            assert Path(ea[key]).read_bytes() == Path(eb[key]).read_bytes()
    assert not np.array_equal(_arrays(a[0])[1], _arrays(c[0])[1])
    # cases differ from each other, and each has every class at this smaller shape too
    assert not np.array_equal(_arrays(a[0])[1], _arrays(a[1])[1])
    for e in a + c:
        assert set(np.unique(_arrays(e)[1])) == {0, 1, 2, 3}


def test_ensure_demo_dataset_does_not_rewrite(tmp_path):
    out = tmp_path / "demo"
    kw = dict(num_train=2, num_val=1, shape=(48, 48, 6))
    dl = ensure_demo_dataset(out, **kw)
    assert dl == out / "datalist.json"
    files = [dl] + [Path(e[k]) for e in _all_entries(dl) for k in ("image", "label")]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    time.sleep(0.01)
    assert ensure_demo_dataset(out, **kw) == dl
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    with pytest.raises(FileExistsError, match="datalist.json|demo_000"):
        make_demo_dataset(out, **kw)
    # a half-deleted demo folder is regenerated; a foreign dataset is never touched
    files[1].unlink()
    ensure_demo_dataset(out, **kw)
    assert files[1].exists()
    doc = json.loads(dl.read_text())
    doc["name"] = "someone else's data"
    dl.write_text(json.dumps(doc))
    files[1].unlink()
    with pytest.raises(FileNotFoundError, match=files[1].name):
        ensure_demo_dataset(out, **kw)
