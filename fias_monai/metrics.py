# Copyright (c) fias-monai contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""The FIAS paper's evaluation protocol (the TransUNet protocol) on top of MONAI's metrics.

Protocol
--------
For every case (a WHOLE 3D volume, not a slice) and every foreground class ``c`` in ``1 .. C-1``
the binary masks ``pred == c`` and ``label == c`` are compared:

=======================  =======================  =========  ==========================
prediction of class c    ground truth of class c  Dice       HD95
=======================  =======================  =========  ==========================
non-empty                non-empty                computed   computed (95th percentile)
non-empty                empty                    1          0
empty                    non-empty                0          0
empty                    empty                    0          0
=======================  =======================  =========  ==========================

This is exactly ``calculate_metric_percase`` of TransUNet (``utils.py``)::

    if pred.sum() > 0 and gt.sum() > 0:  return dc(pred, gt), hd95(pred, gt)
    elif pred.sum() > 0 and gt.sum() == 0: return 1, 0
    else:                                 return 0, 0

Note the (odd, but faithful) consequences: a class absent from both prediction and ground
truth scores Dice 0, and a false-positive class scores Dice 1 / HD95 0. Do not "fix" these rules
when reproducing the paper's tables; they are what the published numbers were computed with.

The per-case numbers are averaged over cases for each class, and the per-class means are then
averaged over the classes (the "mean" row of the paper's tables).

The non-empty case uses MONAI: Dice via :func:`monai.metrics.compute_dice` and HD95 via
:func:`monai.metrics.compute_hausdorff_distance` (``percentile=95``, symmetric, euclidean,
surface voxels from a 6-/4-connected erosion). HD95 is in voxels when no spacing is given and in
physical units (mm for NIfTI) when ``spacing`` is given; the spacing must be listed in the array
axis order.

HD95 flavour (``hd95_method``)
------------------------------
* ``"monai"`` (default): MONAI's definition, ``max(p95(d(pred->gt)), p95(d(gt->pred)))``.
* ``"pooled"``: medpy's ``metric.binary.hd95`` as called by TransUNet,
  ``p95(concat(d(pred->gt), d(gt->pred)))``. The surface distances still come from MONAI
  (:func:`monai.metrics.utils.get_edge_surface_distance`); only the percentile is taken over the
  pooled distances. The two flavours agree when the two directed distance distributions are
  alike and can differ slightly otherwise (``"monai"`` is never smaller).

Contents
--------
* :func:`case_metrics` - one case, all foreground classes, ``{class_index: (dice, hd95)}``.
* :class:`MetricRow`, :func:`make_rows`, :func:`summarize`, :class:`ProtocolResults` - aggregation.
* :func:`write_metrics_csv`, :func:`read_metrics_csv`, :func:`write_summary` - atomic file output.
* :class:`ProtocolMetricHandler` - ignite handler for a MONAI evaluator over whole volumes; writes
  the per-case CSV and the summary at ``EPOCH_COMPLETED`` and sets ``engine.state.metrics[name]``.
* :class:`ProtocolMetric` (a :class:`monai.metrics.CumulativeIterationMetric`) and its ignite
  wrappers :class:`MeanDiceProtocol` / :class:`HD95Protocol`, usable as ``key_val_metric``.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from monai.data import decollate_batch
from monai.data.utils import affine_to_spacing
from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric, compute_dice, compute_hausdorff_distance
from monai.metrics.utils import get_edge_surface_distance
from monai.utils import IgniteInfo, min_version, optional_import

from .utils import atomic_path

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")

__all__ = [
    "HD95_METHODS",
    "CSV_COLUMNS",
    "SUMMARY_COLUMNS",
    "to_index_map",
    "case_metrics",
    "case_dice",
    "MetricRow",
    "ClassSummary",
    "Summary",
    "make_rows",
    "summarize",
    "summary_markdown",
    "ProtocolResults",
    "write_metrics_csv",
    "read_metrics_csv",
    "write_summary",
    "spacing_from_meta",
    "case_name_from_meta",
    "ProtocolMetric",
    "MeanDiceProtocol",
    "HD95Protocol",
    "ProtocolMetricHandler",
]

HD95_METHODS = ("monai", "pooled")
CSV_COLUMNS = ("case", "class_index", "class_name", "dice", "hd95", "hd95_unit")
SUMMARY_COLUMNS = ("class_index", "class_name", "dice", "hd95", "hd95_unit", "n_cases")
VOXEL_UNIT = "voxel"
MM_UNIT = "mm"


# ----------------------------------------------------------------------------------------------
# single case
# ----------------------------------------------------------------------------------------------
def to_index_map(x: Any, num_classes: int | None = None, spatial_dims: int = 3) -> torch.Tensor:
    """Convert a segmentation to an integer label map of shape ``spatial`` (no channel dim).

    Accepted inputs (numpy array or torch tensor, MetaTensor included):

    * ``spatial`` (``spatial_dims`` dims): already an index map;
    * ``(1, *spatial)``: index map with a channel dim (e.g. after ``AsDiscrete(argmax=True)``);
    * ``(C, *spatial)`` with ``C > 1``: one-hot or per-class scores, reduced with ``argmax`` over C
      (``C`` must equal ``num_classes`` when that is given).

    Float index maps are rounded. Returns a ``torch.long`` tensor on the input's device.
    """
    t = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x)
    if t.ndim == spatial_dims + 1:
        if t.shape[0] == 1:
            t = t[0]
        else:
            if num_classes is not None and t.shape[0] != num_classes:
                raise ValueError(
                    f"channel dim {t.shape[0]} is neither 1 (index map) nor num_classes={num_classes} (one-hot)."
                )
            t = torch.argmax(t, dim=0)
    elif t.ndim != spatial_dims:
        raise ValueError(
            f"expected {spatial_dims} spatial dims with an optional leading channel dim, got shape {tuple(t.shape)}."
        )
    if t.is_floating_point():
        t = torch.round(t)
    return t.long()


def _check_spacing(spacing: Any, spatial_dims: int) -> list[float] | None:
    if spacing is None:
        return None
    s = np.asarray(spacing.cpu() if isinstance(spacing, torch.Tensor) else spacing, dtype=np.float64).reshape(-1)
    if s.size == 1:
        s = np.repeat(s, spatial_dims)
    if s.size != spatial_dims or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be {spatial_dims} positive numbers (array axis order), got {spacing}.")
    return [float(v) for v in s]


def _union_bbox(mask: torch.Tensor) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask grown by one voxel (clipped to the array).

    Cropping to it leaves Dice and the surface voxels (erosion with a zero border) unchanged.
    """
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = torch.nonzero(mask.any(dim=other) if other else mask, as_tuple=False).flatten()
        lo = max(int(idx.min()) - 1, 0)
        hi = min(int(idx.max()) + 2, mask.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def _hd95_pair(p: torch.Tensor, g: torch.Tensor, spacing: list[float] | None, method: str) -> float:
    """HD95 of two non-empty binary masks (spatial shape, CPU) via MONAI."""
    with warnings.catch_warnings():
        # MONAI's own internal call passes a deprecated argument; not actionable here
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        return _hd95_pair_impl(p, g, spacing, method)


def _hd95_pair_impl(p: torch.Tensor, g: torch.Tensor, spacing: list[float] | None, method: str) -> float:
    if method == "monai":
        hd = compute_hausdorff_distance(
            p[None, None].float(), g[None, None].float(), include_background=True, percentile=95, spacing=spacing
        )
        return float(hd[0, 0])
    # "pooled": medpy / TransUNet flavour: 95th percentile of both directed distance sets together
    _, dists, _ = get_edge_surface_distance(p, g, distance_metric="euclidean", spacing=spacing, symmetric=True)
    pooled = np.concatenate([np.asarray(torch.as_tensor(d).cpu(), dtype=np.float64).reshape(-1) for d in dists])
    return float(np.percentile(pooled, 95))


def _dice_pair(p: torch.Tensor, g: torch.Tensor) -> float:
    """Dice of two non-empty binary masks via MONAI's ``compute_dice``."""
    # boolean masks: MONAI counts voxels exactly (result is float32, so ~1e-7 relative precision)
    return float(compute_dice(p[None, None].bool(), g[None, None].bool(), include_background=True)[0, 0])


def case_metrics(
    pred: Any,
    label: Any,
    num_classes: int,
    spacing: Sequence[float] | float | None = None,
    *,
    spatial_dims: int = 3,
    compute_hd95: bool = True,
    hd95_method: str = "monai",
) -> dict[int, tuple[float, float]]:
    """Protocol metrics of one case (one whole volume) for every foreground class.

    Args:
        pred: predicted segmentation, index map ``(H, W, D)`` / ``(1, H, W, D)`` or one-hot /
            scores ``(C, H, W, D)`` (see :func:`to_index_map`), numpy or torch.
        label: ground truth, same conventions and spatial shape as ``pred``.
        num_classes: number of classes including background (class 0 is never scored).
        spacing: voxel size in array-axis order (one number = isotropic). ``None``: HD95 in
            voxels; given: HD95 in the spacing's unit (mm for NIfTI pixdim).
        spatial_dims: number of spatial dims (3 for the protocol; 2 allowed for tests / 2D data).
        compute_hd95: ``False`` skips the (expensive) distance computation; HD95 is then NaN for
            the computed (both non-empty) case and still 0 for the empty-case rules.
        hd95_method: ``"monai"`` (default) or ``"pooled"`` (medpy/TransUNet flavour), see module doc.

    Returns:
        ``{class_index: (dice, hd95)}`` for ``class_index`` in ``1 .. num_classes-1``, with the
        TransUNet empty-case rules applied (module docstring).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}.")
    if hd95_method not in HD95_METHODS:
        raise ValueError(f"hd95_method must be one of {HD95_METHODS}, got {hd95_method!r}.")
    sp = _check_spacing(spacing, spatial_dims)
    p_idx = to_index_map(pred, num_classes, spatial_dims)
    g_idx = to_index_map(label, num_classes, spatial_dims)
    if p_idx.shape != g_idx.shape:
        raise ValueError(f"pred and label spatial shapes differ: {tuple(p_idx.shape)} vs {tuple(g_idx.shape)}.")
    g_idx = g_idx.to(p_idx.device)

    out: dict[int, tuple[float, float]] = {}
    for c in range(1, num_classes):
        p = p_idx == c
        g = g_idx == c
        p_any, g_any = bool(p.any()), bool(g.any())
        if p_any and g_any:
            box = _union_bbox(p | g)
            pc, gc = p[box], g[box]
            dice = _dice_pair(pc, gc)
            hd95 = _hd95_pair(pc.cpu(), gc.cpu(), sp, hd95_method) if compute_hd95 else float("nan")
            out[c] = (dice, hd95)
        elif p_any:  # prediction non-empty, ground truth empty
            out[c] = (1.0, 0.0)
        else:  # prediction empty, whatever the ground truth
            out[c] = (0.0, 0.0)
    return out


def case_dice(pred: Any, label: Any, num_classes: int, *, spatial_dims: int = 3) -> dict[int, float]:
    """Protocol Dice only (no distance computation): ``{class_index: dice}``."""
    res = case_metrics(pred, label, num_classes, spatial_dims=spatial_dims, compute_hd95=False)
    return {c: d for c, (d, _) in res.items()}


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------
@dataclass
class MetricRow:
    """One case x one foreground class."""

    case: str
    class_index: int
    class_name: str
    dice: float
    hd95: float
    hd95_unit: str = VOXEL_UNIT


@dataclass
class ClassSummary:
    class_index: int
    class_name: str
    dice: float
    hd95: float
    n_cases: int


@dataclass
class Summary:
    """Per-class means over cases, and their mean over classes (the tables' "mean" row)."""

    per_class: list[ClassSummary] = field(default_factory=list)
    mean_dice: float = float("nan")
    mean_hd95: float = float("nan")
    hd95_unit: str = VOXEL_UNIT
    n_cases: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _class_name(class_index: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    """``class_names`` is indexed by class index: a mapping, or a sequence with background at 0."""
    if class_names is not None:
        if isinstance(class_names, Mapping):
            if class_index in class_names:
                return str(class_names[class_index])
        elif 0 <= class_index < len(class_names):
            return str(class_names[class_index])
    return f"class{class_index}"


def make_rows(
    case: str,
    metrics: Mapping[int, tuple[float, float]],
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    hd95_unit: str = VOXEL_UNIT,
) -> list[MetricRow]:
    """Turn :func:`case_metrics` output into rows (``class_names[i]`` names class ``i``, 0 = background)."""
    return [
        MetricRow(str(case), int(c), _class_name(int(c), class_names), float(d), float(h), hd95_unit)
        for c, (d, h) in sorted(metrics.items())
    ]


def _unit_of(rows: Sequence[MetricRow]) -> str:
    units = sorted({r.hd95_unit for r in rows})
    if len(units) > 1:
        warnings.warn(f"HD95 values with different units are averaged together: {units}.", stacklevel=3)
        return "mixed"
    return units[0] if units else VOXEL_UNIT


def summarize(
    rows: Sequence[MetricRow], class_names: Sequence[str] | Mapping[int, str] | None = None
) -> Summary:
    """Mean over cases per class, then mean over classes.

    NaN HD95 values (``compute_hd95=False``) propagate (a class mean with a NaN is NaN).
    """
    by_class: dict[int, list[MetricRow]] = {}
    for r in rows:
        by_class.setdefault(int(r.class_index), []).append(r)
    per_class = []
    for c in sorted(by_class):
        rs = by_class[c]
        name = _class_name(c, class_names) if class_names is not None else rs[0].class_name
        per_class.append(
            ClassSummary(
                class_index=c,
                class_name=name,
                dice=float(np.mean([r.dice for r in rs])),
                hd95=float(np.mean([r.hd95 for r in rs])),
                n_cases=len(rs),
            )
        )
    cases = {r.case for r in rows}
    if not per_class:
        return Summary(n_cases=0)
    return Summary(
        per_class=per_class,
        mean_dice=float(np.mean([s.dice for s in per_class])),
        mean_hd95=float(np.mean([s.hd95 for s in per_class])),
        hd95_unit=_unit_of(rows),
        n_cases=len(cases),
    )


class ProtocolResults:
    """Accumulates protocol rows case by case.

    Example::

        res = ProtocolResults(num_classes=9, class_names=SYNAPSE_NAMES)
        for name, pred, label, pixdim in cases:
            res.add_case(name, pred, label, spacing=pixdim)
        res.write("eval/")              # metrics_per_case.csv, metrics_summary.csv, metrics_summary.md
        print(res.summary().mean_dice)
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | Mapping[int, str] | None = None,
        spatial_dims: int = 3,
        compute_hd95: bool = True,
        hd95_method: str = "monai",
    ) -> None:
        self.num_classes = num_classes
        self.class_names = class_names
        self.spatial_dims = spatial_dims
        self.compute_hd95 = compute_hd95
        self.hd95_method = hd95_method
        self.rows: list[MetricRow] = []
        self._case_counts: dict[str, int] = {}

    def reset(self) -> None:
        self.rows = []
        self._case_counts = {}

    def _unique_case(self, case: str) -> str:
        n = self._case_counts.get(case, 0)
        self._case_counts[case] = n + 1
        return case if n == 0 else f"{case}#{n + 1}"

    def add_case(self, case: str, pred: Any, label: Any, spacing: Any = None) -> dict[int, tuple[float, float]]:
        res = case_metrics(
            pred,
            label,
            self.num_classes,
            spacing=spacing,
            spatial_dims=self.spatial_dims,
            compute_hd95=self.compute_hd95,
            hd95_method=self.hd95_method,
        )
        self.add_metrics(case, res, hd95_unit=VOXEL_UNIT if spacing is None else MM_UNIT)
        return res

    def add_metrics(self, case: str, metrics: Mapping[int, tuple[float, float]], hd95_unit: str = VOXEL_UNIT) -> None:
        self.rows.extend(make_rows(self._unique_case(str(case)), metrics, self.class_names, hd95_unit))

    def summary(self) -> Summary:
        return summarize(self.rows, self.class_names)

    def dice_matrix(self) -> np.ndarray:
        """(n_cases, num_classes - 1) Dice matrix in insertion order."""
        n_fg = self.num_classes - 1
        return np.asarray([r.dice for r in self.rows], dtype=np.float64).reshape(-1, n_fg)

    def write(
        self, output_dir: str, csv_filename: str = "metrics_per_case.csv", summary_filename: str = "metrics_summary"
    ) -> Summary:
        """Write ``csv_filename`` and ``summary_filename`` + ``.csv`` / ``.md`` into ``output_dir``."""
        write_metrics_csv(self.rows, os.path.join(output_dir, csv_filename), self.class_names)
        base = os.path.join(output_dir, summary_filename)
        return write_summary(self.rows, base + ".csv", base + ".md", self.class_names)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def _fmt(v: float) -> str:
    return repr(float(v))  # shortest repr, round-trips exactly


def write_metrics_csv(
    rows: Sequence[MetricRow], path: str, class_names: Sequence[str] | Mapping[int, str] | None = None
) -> None:
    """Per-case per-class CSV with columns :data:`CSV_COLUMNS` (atomic write).

    ``class_names`` (indexed by class index, 0 = background), when given, overrides the rows' names.
    Floats are written with ``repr`` so :func:`read_metrics_csv` gives back the exact values.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        name = _class_name(r.class_index, class_names) if class_names is not None else r.class_name
        w.writerow([r.case, int(r.class_index), name, _fmt(r.dice), _fmt(r.hd95), r.hd95_unit])
    _atomic_write_text(path, buf.getvalue())


def read_metrics_csv(path: str) -> list[MetricRow]:
    """Read a file written by :func:`write_metrics_csv`."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: expected columns {CSV_COLUMNS}, got {reader.fieldnames}.")
        return [
            MetricRow(
                case=d["case"],
                class_index=int(d["class_index"]),
                class_name=d["class_name"],
                dice=float(d["dice"]),
                hd95=float(d["hd95"]),
                hd95_unit=d["hd95_unit"],
            )
            for d in reader
        ]


def summary_markdown(summary: Summary, dice_percent: bool = True, precision: int = 2) -> str:
    """Markdown table: one row per class plus a "mean" row (Dice in % by default, like the paper)."""
    scale, dice_hdr = (100.0, "Dice (%)") if dice_percent else (1.0, "Dice")
    prec = precision if dice_percent else max(precision, 4)
    lines = [
        f"| class_index | class | {dice_hdr} | HD95 ({summary.hd95_unit}) | cases |",
        "|---:|:---|---:|---:|---:|",
    ]
    for s in summary.per_class:
        lines.append(
            f"| {s.class_index} | {s.class_name} | {s.dice * scale:.{prec}f} | {s.hd95:.{precision}f} | {s.n_cases} |"
        )
    lines.append(
        f"| | **mean** | **{summary.mean_dice * scale:.{prec}f}** | **{summary.mean_hd95:.{precision}f}** "
        f"| {summary.n_cases} |"
    )
    return "\n".join(lines) + "\n"


def write_summary(
    rows: Sequence[MetricRow],
    csv_path: str,
    md_path: str | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    dice_percent: bool = True,
) -> Summary:
    """Write the mean table as CSV (columns :data:`SUMMARY_COLUMNS`, last row ``class_index="all"``,
    ``class_name="mean"``, ``n_cases`` = number of distinct cases) and as Markdown (``md_path``,
    default: ``csv_path`` with ``.md``). Both atomic. Returns the :class:`Summary`."""
    summary = summarize(rows, class_names)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)
    for s in summary.per_class:
        w.writerow([s.class_index, s.class_name, _fmt(s.dice), _fmt(s.hd95), summary.hd95_unit, s.n_cases])
    w.writerow(["all", "mean", _fmt(summary.mean_dice), _fmt(summary.mean_hd95), summary.hd95_unit, summary.n_cases])
    _atomic_write_text(csv_path, buf.getvalue())
    if md_path is None:
        md_path = os.path.splitext(csv_path)[0] + ".md"
    _atomic_write_text(md_path, summary_markdown(summary, dice_percent=dice_percent))
    return summary


# ----------------------------------------------------------------------------------------------
# meta data helpers
# ----------------------------------------------------------------------------------------------
_KNOWN_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy.h5", ".h5", ".npz", ".npy", ".dcm")


def case_name_from_meta(meta: Mapping | None, default: str) -> str:
    """Basename of ``meta["filename_or_obj"]`` without known image extensions, else ``default``."""
    if not meta:
        return default
    fn = meta.get("filename_or_obj")
    if isinstance(fn, (list, tuple)):
        fn = fn[0] if fn else None
    if fn is None or str(fn) == "":
        return default
    base = os.path.basename(str(fn).rstrip("/\\"))
    for ext in _KNOWN_EXTS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def spacing_from_meta(meta: Mapping | None, spatial_dims: int = 3) -> list[float] | None:
    """Voxel spacing (array axis order) from a MONAI meta dict.

    Uses ``meta["affine"]`` (the current affine, updated by ``Spacingd``/``Orientationd``, i.e.
    :attr:`MetaTensor.pixdim`) first, then the loader's header ``meta["pixdim"][1:1+spatial_dims]``.
    Returns ``None`` when neither is present.
    """
    if not meta:
        return None
    aff = meta.get("affine")
    if aff is not None:
        a = torch.as_tensor(np.asarray(aff.cpu() if isinstance(aff, torch.Tensor) else aff, dtype=np.float64))
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if a.ndim == 2 and a.shape[0] == a.shape[1] and a.shape[0] > spatial_dims:
            return [float(v) for v in affine_to_spacing(a, r=spatial_dims)]
    pix = meta.get("pixdim")
    if pix is not None:
        p = np.asarray(pix.cpu() if isinstance(pix, torch.Tensor) else pix, dtype=np.float64).reshape(-1)
        if p.size >= spatial_dims + 1:
            return [float(v) for v in p[1 : 1 + spatial_dims]]
    return None


def _meta_of(x: Any) -> Mapping | None:
    m = getattr(x, "meta", None)
    return m if isinstance(m, Mapping) and len(m) > 0 else None


# ----------------------------------------------------------------------------------------------
# MONAI metric + ignite wrappers (for key_val_metric during training validation)
# ----------------------------------------------------------------------------------------------
class ProtocolMetric(CumulativeIterationMetric):
    """Protocol Dice or HD95 as a MONAI cumulative metric.

    ``y_pred`` / ``y``: batch-first ``(B, C, *spatial)`` one-hot/scores or ``(B, 1, *spatial)``
    index maps, or lists of channel-first tensors (decollated). Each batch item must be a whole
    volume. Per item it buffers a ``(num_classes - 1,)`` row of protocol values (empty-case rules
    applied). ``aggregate()`` returns the mean over cases per class, then over classes.

    Args:
        num_classes: classes including background.
        metric: ``"dice"`` or ``"hd95"``.
        reduction: ``"mean"`` (scalar, default), ``"mean_batch"`` (per-class means, shape
            ``(num_classes - 1,)``), or ``"none"`` (the ``(n_cases, num_classes - 1)`` buffer).
        spacing: fixed voxel spacing for HD95 (a per-call ``spacing=`` kwarg overrides it).
        hd95_method: see module doc.
    """

    def __init__(
        self,
        num_classes: int,
        metric: str = "dice",
        reduction: str = "mean",
        spacing: Sequence[float] | float | None = None,
        hd95_method: str = "monai",
    ) -> None:
        super().__init__()
        if metric not in ("dice", "hd95"):
            raise ValueError(f"metric must be 'dice' or 'hd95', got {metric!r}.")
        if reduction not in ("mean", "mean_batch", "none"):
            raise ValueError(f"reduction must be 'mean', 'mean_batch' or 'none', got {reduction!r}.")
        self.num_classes = num_classes
        self.metric = metric
        self.reduction = reduction
        self.spacing = spacing
        self.hd95_method = hd95_method

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("ProtocolMetric needs a ground truth `y`.")
        if y_pred.ndim < 3:
            raise ValueError(f"expected batch-first (B, C, *spatial) input, got shape {tuple(y_pred.shape)}.")
        spatial_dims = y_pred.ndim - 2
        spacing = kwargs.get("spacing", self.spacing)
        idx = 0 if self.metric == "dice" else 1
        rows = []
        for b in range(y_pred.shape[0]):
            res = case_metrics(
                y_pred[b],
                y[b],
                self.num_classes,
                spacing=spacing,
                spatial_dims=spatial_dims,
                compute_hd95=self.metric == "hd95",
                hd95_method=self.hd95_method,
            )
            rows.append([res[c][idx] for c in range(1, self.num_classes)])
        return torch.tensor(rows, dtype=torch.float32)

    def aggregate(self, reduction: str | None = None) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a PyTorch Tensor, got {type(data)}.")
        reduction = reduction or self.reduction
        if reduction == "none":
            return data
        per_class = data.float().mean(dim=0)
        return per_class if reduction == "mean_batch" else per_class.mean()


class MeanDiceProtocol(IgniteMetricHandler):
    """Ignite metric: protocol mean foreground Dice (mean over cases per class, then over classes).

    Drop-in for ``monai.handlers.MeanDice`` as ``key_val_metric`` of an evaluator that runs on whole
    volumes; e.g. in a bundle config::

        "key_metric": {"val_mean_dice": {"_target_": "fias_monai.metrics.MeanDiceProtocol",
                       "num_classes": 9, "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}}

    ``pred``/``label`` may be one-hot, scores (argmaxed) or index maps with a channel dim.
    """

    def __init__(
        self,
        num_classes: int,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            metric_fn=ProtocolMetric(num_classes, metric="dice", reduction=reduction),
            output_transform=output_transform,
            save_details=save_details,
        )


class HD95Protocol(IgniteMetricHandler):
    """Ignite metric: protocol mean HD95 (voxels, or ``spacing`` units when a fixed ``spacing`` is given).

    Expensive on big volumes; for per-case spacing from meta data use :class:`ProtocolMetricHandler`.
    """

    def __init__(
        self,
        num_classes: int,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        reduction: str = "mean",
        spacing: Sequence[float] | float | None = None,
        hd95_method: str = "monai",
    ) -> None:
        super().__init__(
            metric_fn=ProtocolMetric(
                num_classes, metric="hd95", reduction=reduction, spacing=spacing, hd95_method=hd95_method
            ),
            output_transform=output_transform,
            save_details=save_details,
        )


# ----------------------------------------------------------------------------------------------
# evaluation handler (files + engine.state.metrics)
# ----------------------------------------------------------------------------------------------
class ProtocolMetricHandler:
    """Ignite handler computing the full protocol over an evaluator's epoch and writing the files.

    Attach it to a :class:`monai.engines.SupervisedEvaluator` (or any ignite engine) that
    produces one WHOLE volume per sample (batch size 1 recommended; larger batches work if the
    samples are whole volumes).

    Per ``ITERATION_COMPLETED`` it reads ``engine.state.output``:

    * a list of per-sample dicts (MONAI's decollated output, ``decollate=True``, the default), each
      with ``pred_key`` and ``label_key`` entries of shape ``(C, *spatial)`` (one-hot / scores,
      argmaxed) or ``(1, *spatial)`` (index map), after the evaluator's post-transforms; or
    * a batch-first dict (``decollate=False``), which is decollated here; or
    * anything, if ``output_transform`` maps ``engine.state.output`` to ``(preds, labels)`` (lists
      of channel-first tensors or batch-first tensors).

    Case name: ``meta["filename_or_obj"]`` (basename without extension), looked up in order in
    the label's MetaTensor ``.meta``, the prediction's ``.meta``, then per-sample
    ``engine.state.batch`` entries (``batch[i][label_key].meta``, ``batch[i][f"{label_key}_meta_dict"]``,
    then the same for ``image_key``), or ``batch_transform(engine.state.batch)`` (a list of meta dicts)
    if given; fallback ``case_0000``, ``case_0001``, ...

    HD95 unit: ``spacing`` given -> that fixed spacing for all cases (unit "mm"); else
    ``use_spacing=True`` -> per-case spacing from the same meta dicts (:func:`spacing_from_meta`:
    the ``affine``, else the header ``pixdim``; an error if none is found); else voxels.

    At ``EPOCH_COMPLETED`` (rank ``save_rank`` only; rows are gathered across ranks first) it writes
    into ``output_dir``: ``csv_filename`` (per case per class) and ``summary_filename`` + ``.csv``/
    ``.md``; on every rank it sets ``engine.state.metrics[name]`` = mean Dice and, if
    ``hd95_name``, ``engine.state.metrics[hd95_name]`` = mean HD95, and
    ``engine.state.metric_details[name]`` = the ``(n_cases, C-1)`` Dice tensor when the state has
    ``metric_details``. Attach it BEFORE handlers that read these metrics at ``EPOCH_COMPLETED``
    (``StatsHandler``, ``MetricsSaver``, checkpoint savers) so they see the values.
    """

    def __init__(
        self,
        num_classes: int,
        output_dir: str,
        class_names: Sequence[str] | Mapping[int, str] | None = None,
        use_spacing: bool = False,
        spacing: Sequence[float] | float | None = None,
        name: str = "mean_dice_protocol",
        hd95_name: str | None = "mean_hd95_protocol",
        compute_hd95: bool = True,
        hd95_method: str = "monai",
        output_transform: Callable | None = None,
        batch_transform: Callable | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        spatial_dims: int = 3,
        csv_filename: str = "metrics_per_case.csv",
        summary_filename: str = "metrics_summary",
        save_rank: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.output_dir = output_dir
        self.class_names = class_names
        self.use_spacing = use_spacing
        self.spacing = spacing
        self.name = name
        self.hd95_name = hd95_name
        self.output_transform = output_transform
        self.batch_transform = batch_transform
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key
        self.spatial_dims = spatial_dims
        self.csv_filename = csv_filename
        self.summary_filename = summary_filename
        self.save_rank = save_rank
        self.results = ProtocolResults(
            num_classes, class_names, spatial_dims=spatial_dims, compute_hd95=compute_hd95, hd95_method=hd95_method
        )
        self._count = 0
        self.last_summary: Summary | None = None

    # ignite plumbing
    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Any = None) -> None:
        self.results.reset()
        self._count = 0

    # data extraction
    def _pairs(self, engine: Any) -> list[tuple[Any, Any]]:
        out = engine.state.output
        if self.output_transform is not None:
            preds, labels = self.output_transform(out)
            # batch-first tensors iterate per sample, lists of channel-first tensors per item
            return list(zip(preds, labels))
        if isinstance(out, Mapping):
            out = decollate_batch(out)
        if not isinstance(out, (list, tuple)):
            raise TypeError(
                f"engine.state.output must be a list of dicts or a dict, got {type(out)}; pass output_transform."
            )
        return [(o[self.pred_key], o[self.label_key]) for o in out]

    def _batch_metas(self, engine: Any, n: int) -> list[list[Mapping]]:
        """Candidate meta dicts from ``engine.state.batch`` for each of the ``n`` samples."""
        batch = getattr(engine.state, "batch", None)
        if batch is None:
            return [[] for _ in range(n)]
        if self.batch_transform is not None:
            metas = self.batch_transform(batch)
            if isinstance(metas, Mapping):
                metas = decollate_batch(metas)
            metas = list(metas)
            return [[metas[i]] if i < len(metas) and isinstance(metas[i], Mapping) else [] for i in range(n)]
        if isinstance(batch, Mapping):
            try:
                batch = decollate_batch(batch)
            except Exception:  # pragma: no cover - unusual batch structures
                return [[] for _ in range(n)]
        res: list[list[Mapping]] = []
        for i in range(n):
            cands: list[Mapping] = []
            item = batch[i] if isinstance(batch, (list, tuple)) and i < len(batch) else None
            if isinstance(item, Mapping):
                for key in (self.label_key, self.image_key):
                    m = _meta_of(item.get(key))
                    if m:
                        cands.append(m)
                    md = item.get(f"{key}_meta_dict")
                    if isinstance(md, Mapping) and md:
                        cands.append(md)
            res.append(cands)
        return res

    def iteration_completed(self, engine: Any) -> None:
        pairs = self._pairs(engine)
        batch_metas = self._batch_metas(engine, len(pairs))
        for (pred, label), extra in zip(pairs, batch_metas):
            metas = [m for m in (_meta_of(label), _meta_of(pred)) if m] + list(extra)
            default = f"case_{self._count:04d}"
            self._count += 1
            case = default
            for m in metas:
                case = case_name_from_meta(m, default)
                if case != default:
                    break
            spacing = None
            if self.spacing is not None:
                spacing = self.spacing
            elif self.use_spacing:
                for m in metas:
                    spacing = spacing_from_meta(m, self.spatial_dims)
                    if spacing is not None:
                        break
                if spacing is None:
                    raise ValueError(
                        f"use_spacing=True but no 'affine'/'pixdim' found in the meta data of case {case!r}; "
                        "load labels as MetaTensors (LoadImaged) or pass a fixed `spacing`."
                    )
            self.results.add_case(case, pred, label, spacing=spacing)

    def _gathered_rows(self) -> list[MetricRow]:
        rows = self.results.rows
        ws = idist.get_world_size()
        if ws > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * ws
            torch.distributed.all_gather_object(gathered, [asdict(r) for r in rows])
            rows = [MetricRow(**d) for part in gathered for d in part]
        return rows

    def epoch_completed(self, engine: Any) -> None:
        rows = self._gathered_rows()
        summary = summarize(rows, self.class_names)
        self.last_summary = summary
        if idist.get_rank() == self.save_rank:
            write_metrics_csv(rows, os.path.join(self.output_dir, self.csv_filename), self.class_names)
            base = os.path.join(self.output_dir, self.summary_filename)
            write_summary(rows, base + ".csv", base + ".md", self.class_names)
        engine.state.metrics[self.name] = summary.mean_dice
        if self.hd95_name:
            engine.state.metrics[self.hd95_name] = summary.mean_hd95
        if hasattr(engine.state, "metric_details") and isinstance(engine.state.metric_details, dict):
            n_fg = self.num_classes - 1
            if rows and len(rows) % n_fg == 0:
                engine.state.metric_details[self.name] = torch.tensor(
                    [r.dice for r in rows], dtype=torch.float32
                ).reshape(-1, n_fg)

    def __call__(self, engine: Any) -> None:
        self.epoch_completed(engine)
