"""MSD-style datalist JSON: writing, loading, and the shared per-case conversion loop.

A datalist looks like (paths relative to the datalist's own folder, so a converted dataset can be moved
or mounted elsewhere as a whole)::

    {
      "name": "ACDC", "description": "...", "tensorImageSize": "3D",
      "modality": {"0": "MRI"},
      "labels": {"0": "background", "1": "RV", "2": "MYO", "3": "LV"},
      "numTraining": 140, "numValidation": 20, "numTest": 0,
      "training":   [{"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz"}, ...],
      "validation": [...],
      "test":       [{"image": "imagesTs/y.nii.gz", "label": "labelsTs/y.nii.gz"}, ...]
    }

It is readable by ``monai.data.load_decathlon_datalist(path, data_list_key="training")`` as well as by
:func:`load_datalist` here (which also checks that every listed file exists).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .io import (
    DataConversionError,
    InvalidCaseError,
    check_outputs_absent,
    labels_dict,
    write_json_atomic,
    write_nifti_atomic,
)

__all__ = ["DATALIST_NAME", "SECTIONS", "write_datalist", "load_datalist"]

logger = logging.getLogger(__name__)

#: File name every converter gives its datalist, inside ``out_dir``.
DATALIST_NAME = "datalist.json"
#: The sections a datalist always has (possibly empty).
SECTIONS = ("training", "validation", "test")
#: Keys of a datalist entry that hold file paths (made relative on write, absolute on load).
_PATH_KEYS = ("image", "label")


def _relative(value: Any, root: Path) -> Any:
    if isinstance(value, (list, tuple)):
        return [_relative(v, root) for v in value]
    p = Path(value)
    if p.is_absolute():
        p = Path(os.path.relpath(p, root))
    return p.as_posix()  # forward slashes: the same JSON works on Windows and Linux


def _absolute(value: Any, root: Path) -> Any:
    if isinstance(value, (list, tuple)):
        return [_absolute(v, root) for v in value]
    p = Path(value)
    return str(p if p.is_absolute() else (root / p).resolve())


def write_datalist(
    path: str | os.PathLike,
    training: Sequence[Mapping[str, Any]],
    validation: Sequence[Mapping[str, Any]] = (),
    test: Sequence[Mapping[str, Any]] = (),
    labels: Sequence[str] | Mapping[Any, str] | None = None,
    name: str = "",
    description: str = "",
    modality: str | Mapping[Any, str] = "",
    overwrite: bool = False,
) -> Path:
    """Write an MSD-style datalist JSON atomically.

    Args:
        path: the JSON file to write.
        training: entries ``{"image": ..., "label": ...}``; absolute paths are made relative to the
            datalist's folder, relative ones are kept as given (already relative to that folder).
        validation: entries, same form.
        test: entries, same form (``label`` optional).
        labels: class names, ``["background", "RV", ...]`` or ``{0: "background", ...}``.
        name: dataset name.
        description: free text (source, preprocessing, split).
        modality: ``"MRI"``/``"CT"`` (stored MSD-style as ``{"0": "MRI"}``) or a mapping.
        overwrite: replace an existing datalist; otherwise raise :class:`FileExistsError`.

    Returns:
        The written path.

    Raises:
        ValueError: an entry without ``image`` (or without ``label`` in training/validation).
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    root = path.parent.resolve()
    sections = {}
    for sec, entries in zip(SECTIONS, (training, validation, test)):
        out = []
        for i, entry in enumerate(entries):
            required = ("image",) if sec == "test" else _PATH_KEYS
            missing = [k for k in required if k not in entry]
            if missing:
                raise ValueError(f"datalist {path}: {sec}[{i}] lacks key(s) {missing}: {dict(entry)}")
            out.append({k: (_relative(v, root) if k in _PATH_KEYS else v) for k, v in entry.items()})
        sections[sec] = out
    if isinstance(modality, Mapping):
        modality_out = {str(k): str(v) for k, v in modality.items()}
    else:
        modality_out = {"0": str(modality)} if modality else {}
    doc = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": modality_out,
        "labels": labels_dict(labels) if labels is not None else {},
        "numTraining": len(sections["training"]),
        "numValidation": len(sections["validation"]),
        "numTest": len(sections["test"]),
        **sections,
    }
    return write_json_atomic(path, doc, overwrite=overwrite)


def load_datalist(
    path: str | os.PathLike, section: str = "training", base_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Load one section of a datalist with absolute paths, checking that every file exists.

    Args:
        path: the datalist JSON.
        section: ``"training"``, ``"validation"``, ``"test"`` or any other list-valued key.
        base_dir: folder relative paths are resolved against; the datalist's folder by default.

    Returns:
        A list of entries (new dicts) whose ``image``/``label`` values are absolute path strings.
        An empty section gives an empty list.

    Raises:
        FileNotFoundError: the datalist, or any file it lists, does not exist (all missing ones named).
        ValueError: the datalist is not valid JSON, or has no such section.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get(section), list):
        have = sorted(k for k, v in doc.items() if isinstance(v, list)) if isinstance(doc, dict) else []
        raise ValueError(f"datalist {path} has no list section {section!r} (sections: {have})")
    root = Path(base_dir).resolve() if base_dir is not None else path.parent.resolve()
    out, missing = [], []
    for i, entry in enumerate(doc[section]):
        if isinstance(entry, str):  # MSD test sections may list bare image paths
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"datalist {path}: {section}[{i}] is not an object: {entry!r}")
        entry = {k: (_absolute(v, root) if k in _PATH_KEYS else v) for k, v in entry.items()}
        for k in _PATH_KEYS:
            for p in np.atleast_1d(entry.get(k, [])).tolist():
                if not Path(p).exists():
                    missing.append(p)
        out.append(entry)
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise FileNotFoundError(f"datalist {path} ({section}) lists {len(missing)} missing file(s):\n  {shown}")
    return out


# ----------------------------------------------------------------------------------------------------
# Shared conversion loop (used by the acdc/synapse converters; not part of the public API).


@dataclass
class _Case:
    """One output case: a name, a split section, and a loader returning ``(image, label, affine)``.

    ``load`` must return the image as float32 (H, W, Z), the label as uint8 of the same shape, and a 4x4
    affine, or raise :class:`InvalidCaseError`. ``source`` names the file reported when something
    unexpected (not an InvalidCaseError) goes wrong.
    """

    name: str
    section: str
    source: Path
    load: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]
    extra: dict = field(default_factory=dict)


def _case_paths(out_dir: Path, case: _Case) -> tuple[Path, Path]:
    # MSD convention: imagesTr/labelsTr for everything used while developing (training and
    # validation), imagesTs/labelsTs for the held-out test cases.
    img_dir, lab_dir = ("imagesTs", "labelsTs") if case.section == "test" else ("imagesTr", "labelsTr")
    return out_dir / img_dir / f"{case.name}.nii.gz", out_dir / lab_dir / f"{case.name}.nii.gz"


#: Smallest in-plane size (pixels per side) a converted volume may have: FIAS's coarsest stride.
MIN_INPLANE_SIZE = 32


def _run_conversion(
    what: str,
    cases: Sequence[_Case],
    out_dir: str | os.PathLike,
    *,
    labels: Mapping[Any, str] | Sequence[str],
    name: str,
    description: str,
    modality: str,
    overwrite: bool,
    failures: Iterable[tuple[str, str]] = (),
) -> Path:
    """Convert every case, continue past bad ones, write the datalist of the good ones, then report.

    Args:
        what: the converter's name, used in the error message.
        cases: the cases to write.
        out_dir: output folder (created).
        labels, name, description, modality: datalist metadata.
        overwrite: replace existing outputs.
        failures: problems found before loading (e.g. a case listed but absent), reported with the rest.

    Returns:
        The datalist path.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is False (checked before writing anything).
        DataConversionError: at least one case failed (after the good ones were written).
    """
    out_dir = Path(out_dir)
    failures = list(failures)
    names = [c.name for c in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what}: several inputs map to the same output case name(s) {dup}")
    datalist = out_dir / DATALIST_NAME
    targets = [p for c in cases for p in _case_paths(out_dir, c)] + [datalist]
    # Refuse before touching anything, so a refused run leaves the old outputs byte-for-byte unchanged.
    check_outputs_absent(targets, overwrite)

    entries: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
    for case in cases:
        try:
            image, label, affine = case.load()
        except InvalidCaseError as e:
            failures.extend(e.failures)
            logger.warning("%s: skipping %s", what, e)
            continue
        except Exception as e:  # keep going: one odd file must not cost the other cases
            failures.append((str(case.source), f"{type(e).__name__}: {e}"))
            logger.warning("%s: skipping %s: %s", what, case.source, e)
            continue
        if min(image.shape[:2]) < MIN_INPLANE_SIZE:
            h, w = image.shape[:2]
            failures.append((str(case.source), f"slices are {h}x{w} pixels, smaller than the minimum "
                             f"{MIN_INPLANE_SIZE}x{MIN_INPLANE_SIZE}: FIAS downsamples by 32, so this is not a "
                             "scan to train on (thumbnail, localizer or wrong axis?)"))
            logger.warning("%s: skipping %s: %dx%d slices", what, case.source, h, w)
            continue
        img_path, lab_path = _case_paths(out_dir, case)
        write_nifti_atomic(img_path, image.astype(np.float32, copy=False), affine, overwrite=overwrite)
        write_nifti_atomic(lab_path, label.astype(np.uint8, copy=False), affine, overwrite=overwrite)
        entries[case.section].append({"image": str(img_path.resolve()), "label": str(lab_path.resolve()), **case.extra})

    num_ok = sum(len(v) for v in entries.values())
    written = None
    if num_ok:
        written = write_datalist(
            datalist,
            entries["training"],
            entries["validation"],
            entries["test"],
            labels=labels,
            name=name,
            description=description,
            modality=modality,
            overwrite=overwrite,
        )
    if failures:
        raise DataConversionError(what, failures, num_ok, written)
    if not num_ok:
        raise FileNotFoundError(f"{what}: no cases to convert")
    return datalist
