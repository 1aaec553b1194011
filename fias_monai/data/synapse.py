"""Synapse multi-organ abdominal CT converters -> NIfTI (Hounsfield units) + datalist.

Every Synapse source ends up in the same form: CT in Hounsfield units (float32, NOT windowed), the
8-organ label ids of the TransUNet tables (0 background, 1 aorta, 2 gallbladder, 3 left kidney,
4 right kidney, 5 liver, 6 pancreas, 7 spleen, 8 stomach), and the TransUNet split. The intensity
window [-125, 275] HU -> [0, 1] (:data:`SYNAPSE_HU_WINDOW`) is deliberately left to the bundle's
transforms, so it is applied in exactly one place whatever the source was:

* TransUNet npz/h5 files store ``clip(HU, -125, 275)`` scaled to [0, 1]; they are written back as
  ``HU = x * 400 - 125`` (values outside the window were clipped by that preprocessing and stay at the
  window edges, so windowing again is exact).
* Raw BTCV NIfTI keeps its HU values and affine; its 13 organ ids are mapped to the 8 above.

Output layout (``out_dir``): ``imagesTr/ labelsTr/`` (training, validation), ``imagesTs/ labelsTs/``
(test), ``datalist.json``; files named ``caseXXXX.nii.gz`` (or the source's case name, e.g. amos_0001).
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np

from .datalist import _Case, _run_conversion
from .io import (
    InvalidCaseError,
    check_finite_image,
    check_label,
    check_same_shape,
    read_nifti,
    read_npz_arrays,
    read_zhw_h5_volume,
    squeeze_to_3d,
)

__all__ = [
    "SYNAPSE_LABELS",
    "SYNAPSE_HU_WINDOW",
    "SYNAPSE_TEST_CASES",
    "BTCV_TO_SYNAPSE",
    "prepare_synapse_transunet",
    "prepare_btcv",
]

logger = logging.getLogger(__name__)

SYNAPSE_LABELS = {
    0: "background",
    1: "aorta",
    2: "gallbladder",
    3: "left kidney",
    4: "right kidney",
    5: "liver",
    6: "pancreas",
    7: "spleen",
    8: "stomach",
}
#: The CT window of the TransUNet preprocessing, in HU; the bundle maps it to [0, 1] (clipped).
SYNAPSE_HU_WINDOW = (-125.0, 275.0)
_HU_LO, _HU_SPAN = SYNAPSE_HU_WINDOW[0], SYNAPSE_HU_WINDOW[1] - SYNAPSE_HU_WINDOW[0]
#: TransUNet lists_Synapse/test_vol.txt (case numbers); every other numbered case is training.
SYNAPSE_TEST_CASES = (8, 22, 38, 36, 32, 2, 29, 3, 1, 4, 25, 35)
#: BTCV 13-organ id -> Synapse 8-organ id (esophagus, IVC, portal/splenic vein, adrenals -> background).
BTCV_TO_SYNAPSE = {0: 0, 1: 7, 2: 4, 3: 3, 4: 2, 5: 0, 6: 5, 7: 8, 8: 1, 9: 0, 10: 0, 11: 6, 12: 0, 13: 0}

# "<prefix>_<case>_sliceNNN.npz": the prefix (train_/valid_/...) is optional, TransUNet has none.
_SLICE_RE = re.compile(
    r"^(?:(?P<prefix>train|training|tr|valid|validation|val|test|testing|ts)_)?(?P<case>.+?)_slice(?P<idx>\d+)\.npz$"
)
_PREFIX_SECTION = {
    "train": "training", "training": "training", "tr": "training",
    "valid": "validation", "validation": "validation", "val": "validation",
    "test": "test", "testing": "test", "ts": "test",
}  # fmt: skip
_NUMBERED_RE = re.compile(r"^(?:case|img|label)?(\d+)$")


def _synapse_split(case: str, prefix: str | None = None) -> str:
    """TransUNet split for ``caseXXXX``; other names go by their file prefix, else training."""
    if prefix:
        return _PREFIX_SECTION[prefix]
    m = _NUMBERED_RE.match(case)
    if m:
        return "test" if int(m.group(1)) in SYNAPSE_TEST_CASES else "training"
    return "training"


def _to_hu(x: np.ndarray, path: Path) -> np.ndarray:
    """[0, 1] windowed intensities -> HU. Anything else means the file is not in the TransUNet format."""
    x = check_finite_image(x, path)
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InvalidCaseError(
            path, f"image values in [{lo:.4g}, {hi:.4g}], expected [0, 1] (clip(HU, -125, 275) scaled, TransUNet)"
        )
    return (np.clip(x, 0.0, 1.0) * np.float32(_HU_SPAN) + np.float32(_HU_LO)).astype(np.float32)


def _wanted(case: str, cases: set[str] | None) -> bool:
    return cases is None or case in cases


def _load_slices(case: str, slices: list[tuple[int, Path]]):
    """Stack a case's 2D npz slices, sorted by slice index, into (H, W, Z)."""
    slices = sorted(slices)
    idx = [i for i, _ in slices]
    dup = sorted({i for i in idx if idx.count(i) > 1})
    if dup:
        files = [str(p) for i, p in slices if i in dup]
        raise InvalidCaseError(slices[0][1], f"case {case}: duplicate slice indices {dup} ({files})")
    gaps = sorted(set(range(idx[0], idx[-1] + 1)) - set(idx))
    if gaps:
        # Stacking across a gap would silently give wrong geometry (and a wrong 3D Dice).
        raise InvalidCaseError(
            slices[0][1], f"case {case}: missing slice indices {gaps[:10]}{' ...' if len(gaps) > 10 else ''}"
        )
    images, labels, failures = [], [], []
    for _, path in slices:
        try:
            a = read_npz_arrays(path, ("image", "label"))
            if a["image"].ndim != 2:
                raise InvalidCaseError(path, f"'image' must be a 2D slice (H, W), got shape {a['image'].shape}")
            check_same_shape(a["image"], a["label"], path)
            if images and a["image"].shape != images[0].shape:
                raise InvalidCaseError(
                    path, f"slice shape {a['image'].shape} differs from the case's {images[0].shape}"
                )
            images.append(_to_hu(a["image"], path))
            labels.append(check_label(a["label"], path, len(SYNAPSE_LABELS)))
        except InvalidCaseError as e:
            failures.append(e)
    if failures:
        # One bad slice spoils the volume; name every bad slice, not only the first.
        raise InvalidCaseError.combine(failures)
    return np.stack(images, axis=-1), np.stack(labels, axis=-1), np.eye(4)


def _load_h5_volume(path: Path):
    # Slice z of the output is the TransUNet 2D slice z, as for the npz slices.
    return read_zhw_h5_volume(path, len(SYNAPSE_LABELS), intensity=_to_hu)


def prepare_synapse_transunet(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    cases: Iterable[str] | None = None,
) -> Path:
    """Convert the TransUNet Synapse layout (or a flat folder of npz slices) to HU NIfTI + a datalist.

    Accepted input (both parts optional, at least one file needed)::

        src_dir/train_npz/caseXXXX_sliceYYY.npz   image (H, W) in [0, 1], label (H, W); grouped per case
        src_dir/test_vol_h5/caseXXXX.npy.h5       image (Z, H, W) in [0, 1], label (Z, H, W)
        src_dir/<prefix>_<case>_sliceNNNN.npz     flat folder, e.g. train_amos_0001_slice0060.npz
        src_dir/*.h5                              flat folder of volumes

    Images are written in HU (``x * 400 - 125``), float32, (H, W, Z), identity affine (no spacing is
    stored in these files). Split: ``caseXXXX`` with XXXX in :data:`SYNAPSE_TEST_CASES` -> test, other
    numbered cases -> training; other names go by the file prefix (``train_``/``valid_``/``test_``)
    or to training.

    Args:
        src_dir: the dataset folder.
        out_dir: output folder (see module docstring).
        overwrite: replace existing outputs (otherwise :class:`FileExistsError`, nothing written).
        cases: optional subset of case names (``case0005``, ``amos_0001``).

    Returns:
        Path of the written datalist.

    Raises:
        FileNotFoundError: no npz/h5 files found.
        FileExistsError: an output exists and ``overwrite`` is False.
        DataConversionError: some cases failed (listed); the good ones and their datalist are written.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"Synapse folder {src} does not exist")
    wanted = set(cases) if cases is not None else None
    npz = sorted(p for d in (src, src / "train_npz") if d.is_dir() for p in d.glob("*.npz"))
    h5 = sorted(p for d in (src, src / "test_vol_h5") if d.is_dir() for p in d.glob("*.h5"))
    if not npz and not h5:
        raise FileNotFoundError(f"no *.npz slices or *.h5 volumes in {src} (nor in train_npz/, test_vol_h5/)")

    jobs, failures = [], []
    groups: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    prefixes: dict[str, set[str]] = defaultdict(set)
    for p in npz:
        m = _SLICE_RE.match(p.name)
        if not m:
            failures.append((str(p), "file name is not <case>_slice<N>.npz"))
            continue
        groups[m["case"]].append((int(m["idx"]), p))
        prefixes[m["case"]].add(m["prefix"] or "")
    for case, slices in sorted(groups.items()):
        if not _wanted(case, wanted):
            continue
        sections = {_synapse_split(case, pre or None) for pre in prefixes[case]}
        if len(sections) > 1:
            reason = f"case {case} has slices with conflicting split prefixes {sorted(prefixes[case])}"
            failures.append((str(slices[0][1]), reason))
            continue
        jobs.append(_Case(case, sections.pop(), slices[0][1], lambda c=case, s=slices: _load_slices(c, s)))
    for p in h5:
        case = p.name.split(".")[0]  # caseXXXX.npy.h5 -> caseXXXX
        if not _wanted(case, wanted):
            continue
        if case in groups:
            reason = f"case {case} also given as npz slices ({groups[case][0][1].parent}); h5 volume not used"
            failures.append((str(p), reason))
            continue
        jobs.append(_Case(case, _synapse_split(case), p, lambda p=p: _load_h5_volume(p)))
    return _run_conversion(
        "prepare_synapse_transunet",
        jobs,
        out_dir,
        labels=SYNAPSE_LABELS,
        name="Synapse",
        description=(
            f"Synapse multi-organ CT (TransUNet preprocessing) converted from {src}: images in HU "
            "(x*400-125; values were clipped to [-125, 275] by that preprocessing), identity affine; "
            "8 organs; TransUNet split. Apply the [-125, 275] HU window in the training transforms."
        ),
        modality="CT",
        overwrite=overwrite,
        failures=failures,
    )


_BTCV_LUT = np.zeros(256, dtype=np.uint8)
for _k, _v in BTCV_TO_SYNAPSE.items():
    _BTCV_LUT[_k] = _v


def _load_btcv_case(img_path: Path, lab_path: Path):
    image, affine = read_nifti(img_path, dtype=np.float32)
    image = squeeze_to_3d(image, img_path, "image")
    label, lab_affine = read_nifti(lab_path)
    label = squeeze_to_3d(label, lab_path, "label")
    check_same_shape(image, label, lab_path)
    image = check_finite_image(image, img_path)
    label = check_label(label, lab_path, len(BTCV_TO_SYNAPSE))  # validate in the 13-organ range first
    if not np.allclose(affine, lab_affine, atol=1e-3):
        logger.warning("%s: affine differs from %s; using the image affine for both", lab_path, img_path)
    return image, _BTCV_LUT[label], affine


def prepare_btcv(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    cases: Iterable[str] | None = None,
) -> Path:
    """Convert raw BTCV (Multi-Atlas Abdomen) NIfTI to the Synapse 8-organ form + a datalist.

    Expected input: ``src_dir/img/imgXXXX.nii.gz`` and ``src_dir/label/labelXXXX.nii.gz`` (or the same
    under ``src_dir/Training/`` or ``src_dir/RawData/Training/``). HU values and the affine are kept
    (float32 image); labels are mapped with :data:`BTCV_TO_SYNAPSE`. Output cases are named
    ``caseXXXX`` like TransUNet's, and split the same way (:data:`SYNAPSE_TEST_CASES` -> test).

    Args:
        src_dir: the dataset folder.
        out_dir: output folder (see module docstring).
        overwrite: replace existing outputs (otherwise :class:`FileExistsError`, nothing written).
        cases: optional subset of output case names (``case0001``).

    Returns:
        Path of the written datalist.

    Raises:
        FileNotFoundError: no ``img/`` folder with images.
        FileExistsError: an output exists and ``overwrite`` is False.
        DataConversionError: some cases failed (listed); the good ones and their datalist are written.
    """
    src = Path(src_dir)
    root = next((d for d in (src, src / "Training", src / "RawData" / "Training") if (d / "img").is_dir()), None)
    if root is None:
        raise FileNotFoundError(f"no BTCV img/ folder in {src} (nor in Training/, RawData/Training/)")
    wanted = set(cases) if cases is not None else None
    jobs, failures = [], []
    images = sorted(p for p in (root / "img").glob("img*.nii*") if re.match(r"^img\d+\.nii(\.gz)?$", p.name))
    if not images:
        raise FileNotFoundError(f"no imgXXXX.nii.gz files in {root / 'img'}")
    for img_path in images:
        num = re.match(r"^img(\d+)", img_path.name).group(1)
        case = f"case{int(num):04d}"
        if not _wanted(case, wanted):
            continue
        lab_path = next(
            (q for q in (root / "label" / img_path.name.replace("img", "label", 1),
                         root / "label" / f"label{num}.nii.gz", root / "label" / f"label{num}.nii") if q.is_file()),
            None,
        )  # fmt: skip
        if lab_path is None:
            failures.append((str(root / "label" / f"label{num}.nii.gz"), f"label file missing for {img_path.name}"))
            continue
        jobs.append(_Case(case, _synapse_split(case), img_path, lambda i=img_path, l=lab_path: _load_btcv_case(i, l)))
    return _run_conversion(
        "prepare_btcv",
        jobs,
        out_dir,
        labels=SYNAPSE_LABELS,
        name="Synapse (BTCV)",
        description=(
            f"BTCV multi-organ CT converted from {src}: HU and affine kept; 13 organs mapped to the 8 Synapse "
            "organs (esophagus, IVC, portal/splenic vein, adrenals -> background); TransUNet split. Apply the "
            "[-125, 275] HU window in the training transforms."
        ),
        modality="CT",
        overwrite=overwrite,
        failures=failures,
    )
