"""Tests of fias_monai.visualize (scikit-image overlays, CPU, fast)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from skimage import io as skio

from fias_monai.visualize import compare_panel, overlay_slice, save_overlays, select_slices

H, W, D = 24, 32, 10


def _case():
    image = np.full((H, W, D), 50.0)  # constant image -> every unlabelled pixel is the same gray
    image[0, 0, :] = 0.0  # give the percentile window a range
    image[-1, -1, :] = 100.0
    label = np.zeros((H, W, D), dtype=np.int64)
    label[4:10, 4:12, 2:5] = 1  # 48 px on slices 2, 3, 4
    label[14:20, 18:28, 3:5] = 2  # + 60 px on slices 3, 4
    label[14:16, 18:20, 8] = 2  # 4 px on slice 8
    pred = np.zeros_like(label)
    pred[14:20, 18:28, :] = 2  # prediction: class 2 only, on every slice
    return image, label, pred


def _is_gray(px):
    return int(px[0]) == int(px[1]) == int(px[2])


def test_select_slices_most_gt_foreground():
    _, label, pred = _case()
    assert select_slices(label, 3) == [2, 3, 4]
    assert select_slices(label, 2) == [3, 4]
    # along axis 0: rows 4..9 have 8*3 = 24 px each, rows 14/15 have 20 + 2, rows 16..19 have 20;
    # ties between rows 4..9 go to the row closest to the middle (11.5) -> 9
    assert select_slices(label, 1, axis=0) == [9]
    assert select_slices(label, 7, axis=0) == [4, 5, 6, 7, 8, 9, 14]
    # empty ground truth: falls back to prediction foreground, still valid indices
    sel = select_slices(np.zeros_like(label), 2, pred=label)
    assert sel == [3, 4]


def test_save_overlays_png_size_and_colors(tmp_path):
    image, label, pred = _case()
    paths = save_overlays(image, label, pred, str(tmp_path / "ov"), "case01", num_slices=3)
    assert [os.path.basename(p) for p in paths] == [f"case01_slice{i:03d}.png" for i in (2, 3, 4)]
    # only the PNGs, no temp files left
    assert sorted(os.listdir(tmp_path / "ov")) == sorted(os.path.basename(p) for p in paths)
    for p, z in zip(paths, (2, 3, 4)):
        a = skio.imread(p)
        assert a.dtype == np.uint8 and a.shape == (H, 3 * W, 3)  # 3 panels side by side
        img_panel, gt_panel, pred_panel = a[:, :W], a[:, W : 2 * W], a[:, 2 * W :]
        # panel 1: plain gray image
        assert all(_is_gray(img_panel[y, x]) for y in range(H) for x in range(W))
        # panel 2: colored exactly where the GT is labelled
        lab = label[:, :, z]
        colored = ~((gt_panel[..., 0] == gt_panel[..., 1]) & (gt_panel[..., 1] == gt_panel[..., 2]))
        np.testing.assert_array_equal(colored, lab > 0)
        # panel 3: colored exactly where the prediction is labelled
        colored_p = ~((pred_panel[..., 0] == pred_panel[..., 1]) & (pred_panel[..., 1] == pred_panel[..., 2]))
        np.testing.assert_array_equal(colored_p, pred[:, :, z] > 0)
    a = skio.imread(paths[1])  # slice 3 has both classes in GT, class 2 only in prediction
    gt_panel, pred_panel = a[:, W : 2 * W], a[:, 2 * W :]
    c1, c2 = gt_panel[5, 5], gt_panel[15, 20]
    assert not np.array_equal(c1, c2)  # different classes -> different colors
    # class 2 has the same color in GT and prediction panels even though class 1 is absent in pred
    np.testing.assert_array_equal(pred_panel[15, 20], c2)
    # default color of class 1 is red-ish, class 2 green-ish
    assert c1[0] > c1[1] and c2[1] > c2[0]


def test_save_overlays_torch_onehot_custom_colors_and_gap(tmp_path):
    image, label, pred = _case()
    onehot = torch.nn.functional.one_hot(torch.as_tensor(pred), 3).permute(3, 0, 1, 2).float()
    colors = {1: (255, 0, 0), 2: (0, 0, 255)}
    paths = save_overlays(
        torch.as_tensor(image)[None], torch.as_tensor(label)[None], onehot, str(tmp_path), "c",
        num_slices=1, class_colors=colors, gap=4, alpha=1.0,
    )
    a = skio.imread(paths[0])
    assert a.shape == (H, 3 * W + 2 * 4, 3)
    assert tuple(a[:, W : W + 4].reshape(-1, 3).min(axis=0)) == (255, 255, 255)  # white separator
    gt_panel = a[:, W + 4 : 2 * W + 4]
    np.testing.assert_array_equal(gt_panel[15, 20], [0, 0, 255])  # alpha 1 -> pure class color
    np.testing.assert_array_equal(gt_panel[5, 5], [255, 0, 0])


def test_overlay_contour_style():
    gray = np.full((10, 10), 0.5)
    seg = np.zeros((10, 10), dtype=int)
    seg[2:8, 2:8] = 1
    out = overlay_slice(gray, seg, style="contour")
    assert not _is_gray((out[2, 2] * 255).round())  # boundary colored
    assert _is_gray((out[4, 4] * 255).round())  # interior not colored
    assert _is_gray((out[0, 0] * 255).round())  # background not colored
    with pytest.raises(ValueError):
        overlay_slice(gray, seg, style="bogus")


def test_compare_panel_grid(tmp_path):
    image, label, pred = _case()
    out = compare_panel(
        image, label, {"model_a": pred, "model_b": label}, str(tmp_path / "fig" / "qual.png"), slices=[3, 4], gap=2
    )
    a = skio.imread(out)
    n_cols, n_rows = 2 + 2, 2  # image, GT, model_a, model_b
    assert a.shape == (n_rows * H + (n_rows - 1) * 2, n_cols * W + (n_cols - 1) * 2, 3)
    assert a.dtype == np.uint8
    # row 0 (slice 3): model_b column equals the GT column; model_a differs (no class 1)
    col = lambda k: a[:H, k * (W + 2) : k * (W + 2) + W]  # noqa: E731
    np.testing.assert_array_equal(col(3), col(1))
    assert not np.array_equal(col(2), col(1))
    assert all(_is_gray(px) for px in col(0).reshape(-1, 3))
    assert sorted(os.listdir(tmp_path / "fig")) == ["qual.png"]


def test_shape_mismatch_raises(tmp_path):
    image, label, pred = _case()
    with pytest.raises(ValueError):
        save_overlays(image, label, pred[:, :, :5], str(tmp_path), "x")
    with pytest.raises(ValueError):
        compare_panel(image, label, {"a": pred[:-1]}, str(tmp_path / "y.png"), slices=[0])
