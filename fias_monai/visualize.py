# Copyright (c) fias-monai contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Segmentation overlays drawn with scikit-image (no matplotlib).

* :func:`save_overlays` - per case, a few slices with the most ground-truth foreground, each saved
  as one PNG ``image | GT overlay | prediction overlay`` side by side.
* :func:`compare_panel` - a paper-style qualitative figure: one row per slice, columns
  ``image, GT, <model A>, <model B>, ...`` (dict order), saved as one PNG.

Volumes may be numpy arrays or torch tensors of shape ``(H, W, D)``, ``(1, H, W, D)``, or for
segmentations ``(C, H, W, D)`` one-hot / scores (argmaxed); 2D ``(H, W)`` inputs are one slice.
Slices are taken along ``axis`` (default: the last spatial axis). Each class ``c`` always gets
the color ``class_colors[c]`` in every panel (background 0 is not painted). All PNGs are RGB
uint8 and written atomically (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from skimage import io as skio
from skimage.color import gray2rgb, label2rgb
from skimage.segmentation import find_boundaries

from .utils import atomic_path

__all__ = [
    "DEFAULT_CLASS_COLORS",
    "select_slices",
    "normalize_intensity",
    "overlay_slice",
    "save_overlays",
    "compare_panel",
]

# index 0 = background (unused); then distinct colors (Synapse: aorta, gallbladder, kidney L,
# kidney R, liver, pancreas, spleen, stomach get 1..8), cycled for more classes.
DEFAULT_CLASS_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 0.0),
    (0.90, 0.10, 0.10),
    (0.10, 0.75, 0.10),
    (0.15, 0.35, 0.95),
    (0.95, 0.90, 0.10),
    (0.90, 0.10, 0.90),
    (0.10, 0.90, 0.90),
    (1.00, 0.55, 0.00),
    (0.55, 0.25, 0.85),
    (0.60, 0.85, 0.25),
    (0.95, 0.50, 0.65),
    (0.45, 0.30, 0.15),
    (0.00, 0.50, 0.50),
)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return np.asarray(x)


def _as_volume(x: Any, is_seg: bool) -> np.ndarray:
    """To a spatial array (2D or 3D) without channel dim."""
    a = _np(x)
    if a.ndim == 4:
        if a.shape[0] == 1:
            a = a[0]
        elif is_seg:
            a = np.argmax(a, axis=0)
        else:
            a = a[0]  # multi-channel image: show the first channel
    if a.ndim not in (2, 3):
        raise ValueError(f"expected (H, W), (H, W, D) or (C, H, W, D), got shape {a.shape}.")
    if is_seg:
        a = np.rint(a).astype(np.int64) if np.issubdtype(a.dtype, np.floating) else a.astype(np.int64)
    return a


def _slice(vol: np.ndarray, idx: int, axis: int) -> np.ndarray:
    if vol.ndim == 2:
        return vol
    return np.take(vol, idx, axis=axis)


def select_slices(label: Any, num_slices: int = 3, axis: int = -1, pred: Any = None) -> list[int]:
    """Indices (ascending) of the ``num_slices`` slices with the most ground-truth foreground.

    Ties (and slices without GT foreground) are ranked by prediction foreground, then by
    closeness to the middle slice, so an empty ground truth still yields valid indices.
    """
    lab = _as_volume(label, True)
    if lab.ndim == 2:
        return [0]
    ax = axis % 3
    n = lab.shape[ax]
    other = tuple(a for a in range(3) if a != ax)
    gt_count = (lab > 0).sum(axis=other)
    pred_count = (_as_volume(pred, True) > 0).sum(axis=other) if pred is not None else np.zeros(n, dtype=np.int64)
    centre = -np.abs(np.arange(n) - (n - 1) / 2.0)
    order = np.lexsort((centre, pred_count, gt_count))[::-1]  # last key is primary
    return sorted(int(i) for i in order[: max(1, min(num_slices, n))])


def normalize_intensity(
    image: np.ndarray, window: tuple[float, float] | None = None, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Float image -> [0, 1]. ``window=(lo, hi)`` (e.g. CT ``(-125, 275)``) or robust percentiles."""
    img = np.asarray(image, dtype=np.float64)
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
    else:
        finite = img[np.isfinite(img)]
        lo, hi = (np.percentile(finite, percentiles) if finite.size else (0.0, 1.0))
    if hi <= lo:
        return np.zeros_like(img)
    return np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def _color_of(c: int, class_colors: Sequence | Mapping | None) -> tuple[float, float, float]:
    if isinstance(class_colors, Mapping):
        col = class_colors[c]
    else:
        palette = DEFAULT_CLASS_COLORS if class_colors is None else class_colors
        col = palette[c] if c < len(palette) else DEFAULT_CLASS_COLORS[1 + (c - 1) % (len(DEFAULT_CLASS_COLORS) - 1)]
    arr = np.asarray(col, dtype=np.float64)
    if arr.max() > 1.0:  # 0..255 colors
        arr = arr / 255.0
    return float(arr[0]), float(arr[1]), float(arr[2])


def overlay_slice(
    gray: np.ndarray,
    seg: np.ndarray,
    class_colors: Sequence | Mapping | None = None,
    alpha: float = 0.45,
    style: str = "fill",
) -> np.ndarray:
    """Color a 2D segmentation over a 2D [0, 1] gray slice; returns float RGB in [0, 1].

    ``style="fill"``: :func:`skimage.color.label2rgb` overlay (``alpha`` blend);
    ``style="contour"``: class boundaries (:func:`skimage.segmentation.find_boundaries`, inner mode)
    painted in the class color.
    """
    seg = np.asarray(seg).astype(np.int64)
    present = [int(c) for c in np.unique(seg) if c > 0]
    rgb = gray2rgb(np.clip(gray, 0.0, 1.0))
    if not present:
        return rgb
    if style == "fill":
        # label2rgb assigns colors by rank among the labels present; give it exactly the colors of
        # the present classes, in ascending label order, so a class has the same color in every panel.
        colors = [_color_of(c, class_colors) for c in present]
        return label2rgb(seg, image=rgb, colors=colors, alpha=alpha, bg_label=0, image_alpha=1.0, saturation=1.0)
    if style == "contour":
        out = rgb.copy()
        for c in present:
            edge = find_boundaries(seg == c, mode="inner")
            out[edge] = _color_of(c, class_colors)
        return out
    raise ValueError(f"style must be 'fill' or 'contour', got {style!r}.")


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _imsave_atomic(path: str, rgb_uint8: np.ndarray) -> None:
    with atomic_path(path, suffix=".png") as tmp:  # skimage picks the format from the extension
        skio.imsave(tmp, rgb_uint8, check_contrast=False)


def _prepare(image: Any, label: Any, axis: int, window, rot90: int):
    img = _as_volume(image, False)
    lab = _as_volume(label, True)
    if img.shape != lab.shape:
        raise ValueError(f"image and label shapes differ: {img.shape} vs {lab.shape}.")

    def view(vol: np.ndarray, idx: int) -> np.ndarray:
        s = _slice(vol, idx, axis)
        return np.rot90(s, rot90) if rot90 else s

    # normalise once over the whole volume so all slices share the same intensity mapping
    img = normalize_intensity(img, window)
    return img, lab, view


def _stack(tiles: Sequence[np.ndarray], gap: int, axis: int) -> np.ndarray:
    """Concatenate RGB tiles along ``axis`` (1: side by side, 0: rows) with ``gap`` white pixels between."""
    if gap <= 0:
        return np.concatenate(tiles, axis=axis)
    shape = list(tiles[0].shape)
    shape[axis] = gap
    sep = np.ones(shape, dtype=tiles[0].dtype)
    out: list[np.ndarray] = []
    for i, t in enumerate(tiles):
        if i:
            out.append(sep)
        out.append(t)
    return np.concatenate(out, axis=axis)


def save_overlays(
    image: Any,
    label: Any,
    pred: Any,
    out_dir: str,
    case_name: str,
    num_slices: int = 3,
    class_colors: Sequence | Mapping | None = None,
    axis: int = -1,
    alpha: float = 0.45,
    style: str = "fill",
    window: tuple[float, float] | None = None,
    rot90: int = 0,
    gap: int = 0,
    slices: Sequence[int] | None = None,
) -> list[str]:
    """Save ``image | GT overlay | prediction overlay`` PNGs for a few slices of one case.

    Args:
        image, label, pred: the case's volumes (see module doc); same spatial shape.
        out_dir: folder for the PNGs, named ``f"{case_name}_slice{index:03d}.png"``.
        case_name: file name prefix.
        num_slices: how many slices (those with the most GT foreground, :func:`select_slices`).
        class_colors: per-class RGB colors indexed by class (0..1 floats or 0..255), sequence with
            background at 0 or mapping; default :data:`DEFAULT_CLASS_COLORS`.
        axis: slicing axis of the 3D volume.
        alpha, style: overlay opacity / ``"fill"`` or ``"contour"`` (:func:`overlay_slice`).
        window: intensity window ``(lo, hi)``; default 0.5/99.5 percentiles of the volume.
        rot90: number of 90-degree rotations applied to each slice for display (e.g. 1 for NIfTI).
        gap: white separator width in pixels between panels (0: width is exactly 3 x slice width).
        slices: explicit slice indices (overrides ``num_slices`` selection).

    Returns:
        the written paths, in slice order. Each PNG is RGB uint8 of shape ``(h, 3*w + 2*gap, 3)``.
    """
    img, lab, view = _prepare(image, label, axis, window, rot90)
    prd = _as_volume(pred, True)
    if prd.shape != lab.shape:
        raise ValueError(f"pred and label shapes differ: {prd.shape} vs {lab.shape}.")
    idxs = list(slices) if slices is not None else select_slices(lab, num_slices, axis, pred=prd)
    paths = []
    for i in idxs:
        gray = view(img, i)
        panels = [
            gray2rgb(gray),
            overlay_slice(gray, view(lab, i), class_colors, alpha, style),
            overlay_slice(gray, view(prd, i), class_colors, alpha, style),
        ]
        path = os.path.join(out_dir, f"{case_name}_slice{int(i):03d}.png")
        _imsave_atomic(path, _to_uint8(_stack(panels, gap, axis=1)))
        paths.append(path)
    return paths


def compare_panel(
    image: Any,
    label: Any,
    preds: Mapping[str, Any],
    out_path: str,
    slices: Sequence[int] | int | None = None,
    class_colors: Sequence | Mapping | None = None,
    axis: int = -1,
    alpha: float = 0.45,
    style: str = "fill",
    window: tuple[float, float] | None = None,
    rot90: int = 0,
    gap: int = 2,
    show_image: bool = True,
) -> str:
    """Paper-style qualitative figure: a row per slice, columns ``[image,] GT, *preds`` (dict order).

    Args:
        image, label: the case's volumes; ``preds``: ``{model_name: prediction volume}``.
        out_path: PNG path (written atomically).
        slices: slice indices (one row each); an int ``k`` or ``None`` (= 3) picks the ``k`` slices
            with the most GT foreground.
        gap: white separator width between tiles (pixels).
        show_image: include the plain image column first.
        Others: as :func:`save_overlays`.

    Returns:
        ``out_path``. No text is drawn; the column order is ``["image", "GT", *preds.keys()]``.
    """
    img, lab, view = _prepare(image, label, axis, window, rot90)
    pvols = {k: _as_volume(v, True) for k, v in preds.items()}
    for k, v in pvols.items():
        if v.shape != lab.shape:
            raise ValueError(f"prediction {k!r} shape {v.shape} differs from label {lab.shape}.")
    if slices is None or isinstance(slices, int):
        slices = select_slices(lab, 3 if slices is None else int(slices), axis)
    rows = []
    for i in slices:
        gray = view(img, int(i))
        tiles = [gray2rgb(gray)] if show_image else []
        tiles.append(overlay_slice(gray, view(lab, int(i)), class_colors, alpha, style))
        tiles.extend(overlay_slice(gray, view(p, int(i)), class_colors, alpha, style) for p in pvols.values())
        rows.append(_stack(tiles, gap, axis=1))
    _imsave_atomic(out_path, _to_uint8(_stack(rows, gap, axis=0)))
    return out_path
