"""ACDC (cardiac cine-MRI) converters: SSL4MIS h5 layout and official NIfTI layout -> NIfTI + datalist.

Both produce the same case names (``patientXXX_frameYY``), the same label ids (0 background, 1 RV,
2 MYO, 3 LV), images min-max scaled to [0, 1] per volume, and the TransUNet / MT-UNet patient split that
the FIAS paper follows, so a bundle trained on one can be evaluated on the other.

Output layout (``out_dir``)::

    datalist.json
    imagesTr/patient001_frame01.nii.gz   float32 (H, W, Z)   training + validation cases
    labelsTr/patient001_frame01.nii.gz   uint8   (H, W, Z)
    imagesTs/..., labelsTs/...                               the 20 TransUNet test patients
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from .datalist import _Case, _run_conversion
from .io import (
    check_finite_image,
    check_label,
    check_same_shape,
    read_nifti,
    read_zhw_h5_volume,
    squeeze_to_3d,
)

__all__ = [
    "ACDC_LABELS",
    "ACDC_VAL_PATIENTS",
    "ACDC_TEST_PATIENTS",
    "prepare_acdc_h5",
    "prepare_acdc_official",
]

logger = logging.getLogger(__name__)

ACDC_LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
#: TransUNet / MT-UNet split (patient numbers); the remaining patients 1..100 are training.
ACDC_VAL_PATIENTS = (19, 21, 29, 33, 41, 50, 61, 71, 76, 80)
ACDC_TEST_PATIENTS = (2, 3, 8, 9, 12, 14, 17, 24, 42, 48, 49, 53, 55, 64, 67, 79, 81, 88, 92, 95)

_CASE_RE = re.compile(r"^patient(\d{3})_frame(\d{2})$")
_OFFICIAL_RE = re.compile(r"^(patient(\d{3})_frame(\d{2}))\.nii(\.gz)?$")


def _patient_id(case: str) -> int | None:
    m = _CASE_RE.match(case)
    return int(m.group(1)) if m else None


def _wanted(case: str, cases: set[str] | None) -> bool:
    """``cases`` may name whole cases (patient001_frame01) or patients (patient001)."""
    return cases is None or case in cases or case.split("_frame")[0] in cases


def _read_list(path: Path) -> list[str]:
    """One case per line; blank lines ignored; tolerate a trailing ``.h5`` extension."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            names.append(line[:-3] if line.endswith(".h5") else line)
    return names


def _find_volume_dir(src: Path) -> Path:
    # SSL4MIS ships the h5 volumes in data/ (ACDC/data); the shared copy uses volumes/. Accept both,
    # and a flat folder.
    for sub in ("volumes", "data"):
        if (src / sub).is_dir() and any((src / sub).glob("*.h5")):
            return src / sub
    return src


def _load_h5_case(path: Path):
    # Slice z of the output is exactly the SSL4MIS 2D training slice image[z].
    return read_zhw_h5_volume(path, len(ACDC_LABELS))


def prepare_acdc_h5(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    cases: Iterable[str] | None = None,
) -> Path:
    """Convert the SSL4MIS ACDC h5 layout to NIfTI volumes + a datalist.

    Expected input::

        src_dir/train.list, src_dir/val.list       one case name per line (patientXXX_frameYY)
        src_dir/volumes/patientXXX_frameYY.h5      keys image float32 (Z,H,W) in [0,1], label uint8 (Z,H,W)
                                                   (``data/`` or ``src_dir`` itself also accepted)

    ``train.list`` -> training, ``val.list`` -> validation; h5 files of the 20 TransUNet test patients
    that are in the folder but in neither list -> test. Other unlisted files are ignored (logged).
    No spacing is stored in these files, so the affine is the identity.

    Args:
        src_dir: the dataset folder.
        out_dir: where to write ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/`` and
            ``datalist.json``.
        overwrite: replace existing outputs (otherwise :class:`FileExistsError`, nothing written).
        cases: optional subset of case names (``patient001_frame01``) or patients (``patient001``).

    Returns:
        Path of the written datalist.

    Raises:
        FileNotFoundError: ``src_dir`` or its lists are missing.
        FileExistsError: an output exists and ``overwrite`` is False.
        DataConversionError: some cases failed (listed); the good ones and their datalist are written.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"ACDC h5 folder {src} does not exist")
    lists = {}
    for sec, fname in (("training", "train.list"), ("validation", "val.list")):
        p = src / fname
        if not p.is_file():
            raise FileNotFoundError(f"ACDC h5 folder {src} has no {fname} (expected one case name per line)")
        lists[sec] = _read_list(p)
    both = sorted(set(lists["training"]) & set(lists["validation"]))
    if both:
        raise ValueError(f"{src}: case(s) in both train.list and val.list: {both}")
    vol_dir = _find_volume_dir(src)
    wanted = set(cases) if cases is not None else None

    split: dict[str, str] = {}
    for sec, names in lists.items():
        for n in names:
            pid = _patient_id(n)
            if pid in ACDC_TEST_PATIENTS:
                logger.warning("%s lists %s, a TransUNet test patient, in %s: following the list", src, n, sec)
            split[n] = sec
    present = sorted(p.name[:-3] for p in vol_dir.glob("*.h5"))
    ignored = []
    for n in present:
        if n in split:
            continue
        if _patient_id(n) in ACDC_TEST_PATIENTS:
            split[n] = "test"
        else:
            ignored.append(n)
    if ignored:
        logger.warning(
            "%s: %d h5 file(s) in no list and not test patients, ignored: %s", vol_dir, len(ignored), ignored
        )

    failures, jobs = [], []
    for n, sec in split.items():
        if not _wanted(n, wanted):
            continue
        path = vol_dir / f"{n}.h5"
        if not path.is_file():
            # Listed but absent: report it with the other failures instead of aborting everything.
            failures.append((str(path), f"listed in {'train.list' if sec == 'training' else 'val.list'} but missing"))
            continue
        jobs.append(_Case(n, sec, path, lambda path=path: _load_h5_case(path)))
    return _run_conversion(
        "prepare_acdc_h5",
        jobs,
        out_dir,
        labels=ACDC_LABELS,
        name="ACDC",
        description=(
            f"ACDC cine-MRI (SSL4MIS h5 preprocessing) converted from {src}: images min-max scaled to [0, 1] "
            "per volume, no voxel spacing (identity affine); split from train.list/val.list, test = the 20 "
            "TransUNet test patients present."
        ),
        modality="MRI",
        overwrite=overwrite,
        failures=failures,
    )


def _official_split(pid: int) -> str | None:
    if pid in ACDC_TEST_PATIENTS:
        return "test"
    if pid in ACDC_VAL_PATIENTS:
        return "validation"
    if 1 <= pid <= 100:
        return "training"
    return None  # patients 101-150 (the challenge test set) are outside the TransUNet split


def _load_official_case(img_path: Path, gt_path: Path):
    image, affine = read_nifti(img_path, dtype=np.float32)
    image = squeeze_to_3d(image, img_path, "image")
    label, lab_affine = read_nifti(gt_path)
    label = squeeze_to_3d(label, gt_path, "label")
    check_same_shape(image, label, gt_path)
    image = check_finite_image(image, img_path)
    label = check_label(label, gt_path, len(ACDC_LABELS))
    if not np.allclose(affine, lab_affine, atol=1e-3):
        # The image geometry is authoritative; both outputs get it so they stay voxel-aligned.
        logger.warning("%s: affine differs from %s; using the image affine for both", gt_path, img_path)
    # Min-max to [0, 1] per volume, as the SSL4MIS h5 files are, so both layouts feed the network the same.
    lo, hi = float(image.min()), float(image.max())
    if hi > lo:
        image = ((image.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    else:
        logger.warning("%s: constant image, written as zeros", img_path)
        image = np.zeros_like(image, dtype=np.float32)
    return image, label, affine


def prepare_acdc_official(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    cases: Iterable[str] | None = None,
    outside_split: str = "skip",
) -> Path:
    """Convert the official ACDC NIfTI layout to NIfTI volumes + a datalist.

    Expected input (searched recursively, so ``database/training`` and ``database/testing`` both work)::

        patientXXX/patientXXX_frameYY.nii.gz      the annotated ED/ES frames
        patientXXX/patientXXX_frameYY_gt.nii.gz   labels 0 bg, 1 RV, 2 MYO, 3 LV
        patientXXX/patientXXX_4d.nii.gz, Info.cfg ignored

    The NIfTI affine is kept; images are min-max scaled to [0, 1] per volume (as in the h5 layout).
    Split by patient (TransUNet): validation 019 021 029 033 041 050 061 071 076 080, test 002 003 008
    009 012 014 017 024 042 048 049 053 055 064 067 079 081 088 092 095, other patients 1..100 training.

    Args:
        src_dir: the dataset folder.
        out_dir: output folder (see module docstring).
        overwrite: replace existing outputs (otherwise :class:`FileExistsError`, nothing written).
        cases: optional subset of case names (``patient001_frame01``) or patients (``patient001``).
        outside_split: what to do with patients outside 1..100 (the challenge's 50 test patients):
            ``"skip"`` (default, keeps the paper's training set), ``"training"`` or ``"test"``.

    Returns:
        Path of the written datalist.

    Raises:
        FileNotFoundError: no frame files under ``src_dir``.
        FileExistsError: an output exists and ``overwrite`` is False.
        DataConversionError: some cases failed (listed); the good ones and their datalist are written.
    """
    if outside_split not in ("skip", "training", "test"):
        raise ValueError(f"outside_split must be 'skip', 'training' or 'test', got {outside_split!r}")
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"ACDC folder {src} does not exist")
    wanted = set(cases) if cases is not None else None
    frames = sorted(
        (p for p in src.rglob("patient*_frame*.nii*") if _OFFICIAL_RE.match(p.name)), key=lambda p: p.name
    )
    if not frames:
        raise FileNotFoundError(f"no patientXXX/patientXXX_frameYY.nii.gz files under {src}")

    jobs, failures, skipped = [], [], []
    for img_path in frames:
        m = _OFFICIAL_RE.match(img_path.name)
        case, pid = m.group(1), int(m.group(2))
        if not _wanted(case, wanted):
            continue
        sec = _official_split(pid)
        if sec is None:
            if outside_split == "skip":
                skipped.append(case)
                continue
            sec = outside_split
        gt_path = img_path.with_name(f"{case}_gt{''.join(img_path.suffixes)}")
        if not gt_path.is_file():
            failures.append((str(gt_path), f"label file missing for {img_path.name}"))
            continue
        jobs.append(_Case(case, sec, img_path, lambda i=img_path, g=gt_path: _load_official_case(i, g)))
    if skipped:
        logger.info("%s: %d frame(s) of patients outside 1..100 skipped (outside_split='skip')", src, len(skipped))
    return _run_conversion(
        "prepare_acdc_official",
        jobs,
        out_dir,
        labels=ACDC_LABELS,
        name="ACDC",
        description=(
            f"ACDC cine-MRI (official NIfTI) converted from {src}: original affine kept, images min-max scaled "
            "to [0, 1] per volume; TransUNet patient split."
        ),
        modality="MRI",
        overwrite=overwrite,
        failures=failures,
    )
