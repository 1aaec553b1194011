"""Shared I/O helpers for the dataset converters.

Everything the converters write goes through :func:`write_nifti_atomic` or :func:`write_json_atomic`, so
that an interrupted conversion never leaves a half-written file under its final name (a later run, or a
training job, would otherwise read a truncated volume), and so that an existing output is never replaced
unless the caller asked for it.

Reading helpers turn the many ways a file can be broken (missing, truncated, wrong keys, NaN, labels out
of range, ...) into :class:`InvalidCaseError`, whose message always names the offending file. The
converters collect those per case and report them all at once with :class:`DataConversionError`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "InvalidCaseError",
    "DataConversionError",
    "write_nifti_atomic",
    "write_json_atomic",
    "check_outputs_absent",
    "read_h5_arrays",
    "read_npz_arrays",
    "read_nifti",
    "check_finite_image",
    "read_zhw_h5_volume",
    "check_label",
    "check_same_shape",
    "squeeze_to_3d",
    "labels_dict",
]

logger = logging.getLogger(__name__)


class InvalidCaseError(ValueError):
    """One input file (or case) cannot be converted.

    Attributes:
        path: the offending file.
        reason: what is wrong with it, in words.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    @property
    def failures(self) -> list[tuple[str, str]]:
        """``(path, reason)`` for every bad file behind this error (several for a multi-file case)."""
        return getattr(self, "_failures", None) or [(self.path, self.reason)]

    @classmethod
    def combine(cls, errors: Sequence["InvalidCaseError"]) -> "InvalidCaseError":
        """One error for a case built from several files, keeping every file's own message."""
        if len(errors) == 1:
            return errors[0]
        err = cls(errors[0].path, "; ".join(str(e) for e in errors))
        err._failures = [f for e in errors for f in e.failures]
        return err


class DataConversionError(RuntimeError):
    """Raised at the end of a conversion when some cases failed.

    The good cases (and a datalist listing only them) have already been written when this is raised, so
    the caller can inspect the failures without redoing the whole conversion.

    Attributes:
        failures: list of ``(path, reason)`` tuples, one per failed file.
        datalist: the datalist written for the good cases, or ``None`` if none succeeded.
    """

    def __init__(self, what: str, failures: Sequence[tuple[str, str]], num_ok: int, datalist: Path | None) -> None:
        self.failures = list(failures)
        self.datalist = datalist
        written = f"datalist of the good ones: {datalist}" if datalist is not None else "no datalist written"
        lines = [f"{what}: {len(self.failures)} file(s) failed, {num_ok} case(s) converted ({written}):"]
        lines += [f"  - {p}: {r}" for p, r in self.failures]
        super().__init__("\n".join(lines))


def _tmp_sibling(path: Path) -> Path:
    """A temporary name in the same folder (so os.replace is a rename, hence atomic) keeping the suffix.

    The suffix matters for NIfTI: nibabel picks gzip compression from a trailing ``.gz``.
    """
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}{suffix}")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temp file to its final name, atomically, refusing to clobber unless overwrite."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # os.link fails if the target exists, so the existence check and the publication are one
        # atomic step: two concurrent writers can never both think they created the file.
        os.link(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise FileExistsError(f"refusing to overwrite existing file {path} (pass overwrite=True)") from None
    except OSError:
        # Filesystems without hard links: fall back to check-then-rename (tiny race window).
        if path.exists():
            tmp.unlink(missing_ok=True)
            raise FileExistsError(f"refusing to overwrite existing file {path} (pass overwrite=True)") from None
        os.replace(tmp, path)
        return
    tmp.unlink(missing_ok=True)


def write_nifti_atomic(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray | None = None, overwrite: bool = False
) -> Path:
    """Write ``array`` as a NIfTI file, atomically.

    Args:
        path: target file (``.nii`` or ``.nii.gz``); parent folders are created.
        array: the voxel data, stored with its own dtype (callers cast: image float32, label uint8).
        affine: 4x4 voxel-to-world matrix; identity when ``None``.
        overwrite: replace an existing file; otherwise raise :class:`FileExistsError`.

    Returns:
        The written path.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (the old file is left untouched).
    """
    import nibabel as nib

    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"refusing to overwrite existing file {path} (pass overwrite=True)")
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array), affine)
    # Both qform and sform set to "scanner" so every reader (nibabel, ITK, MONAI) sees the same affine.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = _tmp_sibling(path)
    try:
        nib.save(img, str(tmp))
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON, atomically (same rules as :func:`write_nifti_atomic`)."""
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"refusing to overwrite existing file {path} (pass overwrite=True)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_outputs_absent(paths: Iterable[str | os.PathLike], overwrite: bool) -> None:
    """Fail before writing anything if outputs exist, so a refused run leaves no partial output.

    Raises:
        FileExistsError: naming the existing file(s), when ``overwrite`` is False.
    """
    if overwrite:
        return
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise FileExistsError(f"refusing to overwrite existing output file(s) {shown} (pass overwrite=True)")


def _require_file(path: Path) -> None:
    if not path.exists():
        raise InvalidCaseError(path, "file does not exist")
    if not path.is_file():
        raise InvalidCaseError(path, "not a regular file")


def read_h5_arrays(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read datasets ``keys`` from an HDF5 file into memory.

    Raises:
        InvalidCaseError: missing file, unreadable/corrupt file, or a missing key.
    """
    import h5py

    path = Path(path)
    _require_file(path)
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError for truncated files, others for garbage
        raise InvalidCaseError(path, f"cannot read HDF5 file (corrupt or truncated?): {e}") from e
    with f:
        missing = [k for k in keys if k not in f]
        if missing:
            raise InvalidCaseError(path, f"missing key(s) {missing} (found keys {sorted(f.keys())})")
        try:
            return {k: np.asarray(f[k][()]) for k in keys}
        except Exception as e:
            raise InvalidCaseError(path, f"cannot read HDF5 data (corrupt or truncated?): {e}") from e


def read_npz_arrays(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read arrays ``keys`` from an ``.npz`` file (no pickles: data files must not run code).

    Raises:
        InvalidCaseError: missing file, unreadable/corrupt file, or a missing key.
    """
    path = Path(path)
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise InvalidCaseError(path, f"missing key(s) {missing} (found keys {sorted(z.files)})")
            return {k: np.asarray(z[k]) for k in keys}
    except InvalidCaseError:
        raise
    except Exception as e:  # BadZipFile, EOFError, ValueError, OSError...
        raise InvalidCaseError(path, f"cannot read npz file (corrupt or truncated?): {e}") from e


def read_nifti(path: str | os.PathLike, dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume eagerly (so a truncated file fails here, not later in training).

    Args:
        path: the ``.nii``/``.nii.gz`` file.
        dtype: if given, the data is read with the header scaling applied as this float dtype
            (images); otherwise the stored values (with scaling, if any) are returned (labels).

    Returns:
        ``(array, affine)``.

    Raises:
        InvalidCaseError: missing or unreadable/corrupt file.
    """
    import nibabel as nib

    path = Path(path)
    _require_file(path)
    try:
        img = nib.load(str(path))
        data = img.get_fdata(dtype=dtype) if dtype is not None else np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # ImageFileError, BadGzipFile, EOFError, zlib.error...
        raise InvalidCaseError(path, f"cannot read NIfTI file (corrupt or truncated?): {e}") from e
    return np.asarray(data), affine


def squeeze_to_3d(array: np.ndarray, path: str | os.PathLike, what: str) -> np.ndarray:
    """Drop trailing singleton axes (``(X, Y, Z, 1)``) and insist on a 3D volume."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InvalidCaseError(path, f"{what} must be a 3D volume, got shape {tuple(array.shape)}")
    return array


def check_finite_image(image: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Return ``image`` as float32 after checking it holds no NaN/Inf (they poison the loss silently)
    and is not constant (a blank or failed export)."""
    image = np.asarray(image, dtype=np.float32)
    bad = ~np.isfinite(image)
    if bad.any():
        raise InvalidCaseError(path, f"image contains {int(bad.sum())} NaN/Inf value(s)")
    if image.size and image.min() == image.max():
        raise InvalidCaseError(path, f"constant image: all {image.size} voxels equal {float(image.flat[0]):g} "
                                     "(blank or failed export): nothing to segment")
    return image


def check_label(label: np.ndarray, path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Validate a label map and return it as uint8.

    Labels must be finite, integer-valued (some sources store them as float) and in
    ``[0, num_classes - 1]``.

    Raises:
        InvalidCaseError: naming the out-of-range values found.
    """
    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise InvalidCaseError(path, "label contains NaN/Inf values")
        if not np.array_equal(label, np.round(label)):
            raise InvalidCaseError(path, "label contains non-integer values")
    elif label.dtype.kind not in "iub":
        raise InvalidCaseError(path, f"label has unsupported dtype {label.dtype}")
    values = np.unique(label)
    bad = values[(values < 0) | (values > num_classes - 1)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise InvalidCaseError(
            path, f"label values out of range [0, {num_classes - 1}]: {shown} ({int(np.isin(label, bad).sum())} voxels)"
        )
    return label.astype(np.uint8)


def check_same_shape(image: np.ndarray, label: np.ndarray, path: str | os.PathLike) -> None:
    """Image and label must be voxel-aligned."""
    if tuple(image.shape) != tuple(label.shape):
        raise InvalidCaseError(path, f"image shape {tuple(image.shape)} != label shape {tuple(label.shape)}")


def labels_dict(names: Sequence[str] | Mapping[Any, str]) -> dict[str, str]:
    """``["background", "RV"]`` or ``{0: "background"}`` -> ``{"0": "background", ...}`` sorted by id."""
    items = names.items() if isinstance(names, Mapping) else enumerate(names)
    out = {}
    for k, v in items:
        try:
            ik = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"label ids must be integers, got {k!r}") from None
        out[ik] = str(v)
    return {str(k): out[k] for k in sorted(out)}


def read_zhw_h5_volume(path: Path, num_classes: int, intensity=check_finite_image):
    """Read an h5 volume stored (Z, H, W) with keys ``image`` and ``label`` (SSL4MIS ACDC, TransUNet
    Synapse), check it, and return (image, label, affine) as (H, W, Z) arrays with an identity affine:
    axial slices along the last axis, as MONAI's LoadImage yields for NIfTI, so output slice z is the
    source's 2D slice z.

    Args:
        path: the h5 file.
        num_classes: labels must lie in [0, num_classes).
        intensity: ``fn(image, path) -> image`` that checks (and may convert) the intensities.
    """
    arrays = read_h5_arrays(path, ("image", "label"))
    image, label = arrays["image"], arrays["label"]
    if image.ndim != 3:
        raise InvalidCaseError(path, f"'image' must be (Z, H, W), got shape {tuple(image.shape)}")
    check_same_shape(image, label, path)
    image = intensity(image, path)
    label = check_label(label, path, num_classes)
    return np.ascontiguousarray(image.transpose(1, 2, 0)), np.ascontiguousarray(label.transpose(1, 2, 0)), np.eye(4)

