"""A small synthetic 3D segmentation dataset, so the bundle trains end to end with no download.

Each case has three foreground classes of clearly different sizes, loosely modelled on the ACDC heart
(a large blood pool wrapped in a thin wall, plus a small structure elsewhere), because FIAS is meant to
help exactly with structures of very different scales:

* ``1 large``: a rotated ellipsoid (a few % of the voxels);
* ``2 ring``: a shell a few voxels thick around it (in every slice it looks like a ring);
* ``3 small``: a blob of 2-3.5 voxels radius placed away from the others (well under 1 % of voxels).

Positions, sizes, orientation and intensities are random per case but fully determined by
``(seed, case index)``. Intensities separate the classes on average but overlap a little through a
smooth background and Gaussian noise, so the task is not a mere threshold. Images are float32 in [0, 1]
(like the ACDC volumes), labels uint8, volumes (H, W, Z) with identity affine, written as NIfTI with the
same ``datalist.json`` layout as the real-data converters.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .datalist import DATALIST_NAME, _Case, _run_conversion, load_datalist

__all__ = ["DEMO_LABELS", "make_demo_dataset", "ensure_demo_dataset"]

logger = logging.getLogger(__name__)

DEMO_LABELS = {0: "background", 1: "large", 2: "ring", 3: "small"}
_DEMO_NAME = "FIAS synthetic demo"


def _ellipsoid(grid, center, radii, theta=0.0):
    """Boolean mask of an ellipsoid rotated by ``theta`` in the (H, W) plane."""
    yy, xx, zz = grid
    dy, dx, dz = yy - center[0], xx - center[1], zz - center[2]
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dy + s * dx, -s * dy + c * dx
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= 1.0


def _make_case(shape: Sequence[int], seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate one (image, label) pair; depends only on (shape, seed, index)."""
    # Seeding per case (not one stream for the whole set) keeps case k identical whatever num_train is.
    rng = np.random.default_rng([seed, index])
    h, w, d = shape
    m = min(h, w)
    grid = np.meshgrid(np.arange(h), np.arange(w), np.arange(d), indexing="ij", sparse=True)
    label = np.zeros(shape, dtype=np.uint8)

    # Large ellipsoid + shell. In-plane sizes scale with the image; along z the shell may be cut by the
    # volume border (as a short-axis cardiac stack cuts the heart).
    r_in = rng.uniform(0.16, 0.24, size=2) * m
    thick = rng.uniform(0.025, 0.04) * m
    rz = rng.uniform(0.3, 0.4) * d
    outer = (r_in[0] + thick, r_in[1] + thick, rz + max(1.0, 0.08 * d))
    margin = max(outer[0], outer[1]) + 2
    center = (
        rng.uniform(margin, h - margin),
        rng.uniform(margin, w - margin),
        rng.uniform(0.4, 0.6) * (d - 1),
    )
    theta = rng.uniform(0, np.pi)
    inner_mask = _ellipsoid(grid, center, (r_in[0], r_in[1], rz), theta)
    outer_mask = _ellipsoid(grid, center, outer, theta)
    label[outer_mask] = 2
    label[inner_mask] = 1

    # Small blob: a few voxels radius, kept >= 3 voxels away from the shell so it is its own object.
    r_small = (rng.uniform(0.025, 0.037) * m, rng.uniform(0.025, 0.037) * m, max(1.0, rng.uniform(0.1, 0.15) * d))
    keep_out = _ellipsoid(grid, center, (outer[0] + 3, outer[1] + 3, outer[2] + 3), theta)
    lo = np.ceil(np.array(r_small[:2])) + 1
    for _ in range(200):
        sc = (
            float(np.round(rng.uniform(lo[0], h - 1 - lo[0]))),
            float(np.round(rng.uniform(lo[1], w - 1 - lo[1]))),
            float(np.round(rng.uniform(0.3, 0.7) * (d - 1))),
        )
        small = _ellipsoid(grid, sc, r_small)
        if small.any() and not (small & keep_out).any():
            break
    else:  # pragma: no cover - the corners are always free for the sizes drawn above
        raise RuntimeError(f"could not place the small structure in a {tuple(shape)} volume")
    label[small] = 3

    # Intensities: class means differ, a smooth background and noise make them overlap a bit.
    yy, xx, zz = grid
    bg = 0.22 + np.zeros(shape, dtype=np.float32)
    for _ in range(3):
        k = rng.uniform(0.5, 2.0, size=3) * np.array([1 / h, 1 / w, 0.5 / d])
        bg = bg + np.float32(rng.uniform(0.03, 0.06)) * np.cos(
            2 * np.pi * (k[0] * yy + k[1] * xx + k[2] * zz) + rng.uniform(0, 2 * np.pi)
        ).astype(np.float32)
    means = {1: 0.68, 2: 0.45, 3: 0.88}
    image = bg
    for cls, mean in means.items():
        image[label == cls] = mean + rng.uniform(-0.05, 0.05)
    image = image + rng.normal(0.0, 0.07, size=shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


def make_demo_dataset(
    out_dir: str | os.PathLike,
    num_train: int = 8,
    num_val: int = 3,
    shape: Sequence[int] = (96, 96, 12),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Generate the synthetic dataset as NIfTI volumes + ``datalist.json``.

    Args:
        out_dir: output folder (``imagesTr/``, ``labelsTr/``, ``datalist.json``).
        num_train: number of training cases (``demo_000`` ...).
        num_val: number of validation cases (following the training ones).
        shape: volume shape (H, W, Z); slices along the last axis.
        seed: random seed; the same seed gives byte-identical volumes.
        overwrite: replace existing files (otherwise :class:`FileExistsError`, nothing written).

    Returns:
        Path of the datalist.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape[:2]) < 24 or shape[2] < 3:
        raise ValueError(f"shape must be (H, W, Z) with H, W >= 24 and Z >= 3, got {shape}")
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")

    def load(i: int):
        image, label = _make_case(shape, seed, i)
        return image, label, np.eye(4)

    cases = [
        _Case(f"demo_{i:03d}", "training" if i < num_train else "validation", Path(f"<synthetic {i}>"),
              lambda i=i: load(i))
        for i in range(num_train + num_val)
    ]  # fmt: skip
    return _run_conversion(
        "make_demo_dataset",
        cases,
        out_dir,
        labels=DEMO_LABELS,
        name=_DEMO_NAME,
        description=(
            f"Synthetic demo data (fias_monai.data.synthetic, seed={seed}, shape={list(shape)}): large ellipsoid, "
            "ring/shell around it, small blob; images float32 in [0, 1], identity affine."
        ),
        modality="synthetic",
        overwrite=overwrite,
    )


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise generation between processes (e.g. one per GPU starting the bundle at once)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; atomic writes still prevent torn files
        yield
        return
    with open(folder / ".demo.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_dataset(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Return the demo datalist in ``out_dir``, generating the dataset first only if it is absent.

    The datalist is written last, so its presence means a complete dataset; existing files are never
    rewritten. If a demo datalist is present but lists missing files (a half-deleted folder), the set is
    regenerated. To change ``shape``/``seed``, delete the folder first.

    Args:
        out_dir: the demo folder.
        **kwargs: passed to :func:`make_demo_dataset` (``num_train``, ``num_val``, ``shape``, ``seed``).

    Returns:
        Path of the datalist.
    """
    out = Path(out_dir)
    datalist = out / DATALIST_NAME
    with _folder_lock(out):
        if datalist.is_file():
            try:
                for section in ("training", "validation"):
                    load_datalist(datalist, section)
                return datalist
            except FileNotFoundError:
                import json

                if json.loads(datalist.read_text(encoding="utf-8")).get("name") != _DEMO_NAME:
                    raise  # not ours: do not touch someone else's dataset
                logger.warning("demo dataset in %s is incomplete; regenerating it", out)
                kwargs = {**kwargs, "overwrite": True}
        logger.info("generating the synthetic demo dataset in %s", out)
        return make_demo_dataset(out, **kwargs)
