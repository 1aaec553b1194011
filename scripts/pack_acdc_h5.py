"""Pack an SSL4MIS-style ACDC h5 folder into one lossless archive, and unpack it bit for bit.

The ACDC volumes of the SSL4MIS preprocessing (``volumes/*.h5`` with ``image`` float32 and ``label`` uint8,
plus ``train.list`` / ``val.list``) take 92 MB; a remote GPU host that takes at most 64 MiB per transfer
(the device machine of bundle/docs/acdc_results.md's runs) needs them smaller. The images are min-max scaled
integers, ``image == float32(k / M)`` for integer intensities ``k`` and the volume's maximum ``M``, so each
slice is stored as 16-bit integers in lossless JPEG 2000 (Pillow's OpenJPEG codec) and rebuilt exactly: 41 MiB
for the 160 volumes. A volume that is not of that form is stored as its float32 bytes (compressed). Unpacking
checks every rebuilt image against the SHA-256 of the original and refuses to write over an existing folder.

    python scripts/pack_acdc_h5.py pack ../shared/data/acdc .data/acdc_pack/acdc.npz
    python scripts/pack_acdc_h5.py unpack .data/acdc_pack/acdc.npz /tmp/acdc
    python -m fias_monai prepare_acdc_h5 /tmp/acdc /tmp/acdc_nifti
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import fire
import h5py
import numpy as np
from PIL import Image

from fias_monai.data.io import InvalidCaseError, read_h5_arrays
from fias_monai.utils import atomic_path

LISTS = ("train.list", "val.list")


def _sha(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _integer_form(image: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``(k, M)`` with ``float32(k / M) == image`` bit for bit and ``k`` in uint16, or None."""
    if image.dtype != np.float32 or image.size == 0 or not np.isfinite(image).all() or image.min() < 0:
        return None
    steps = np.diff(np.unique(image))
    if steps.size == 0 or steps.min() <= 0:
        return None
    guess = int(round(1.0 / float(steps.min())))
    # the smallest step is 1 / M when two neighbouring intensities occur; try the neighbours of the guess too
    for scale in range(max(guess - 3, 1), min(guess + 4, 65536)):
        k = np.round(image.astype(np.float64) * scale)
        if k.max() <= 65535 and np.array_equal((k / scale).astype(np.float32), image):
            return k.astype(np.uint16), scale
    return None


def _encode_slices(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blobs = []
    for plane in k:
        plane = np.ascontiguousarray(plane)
        buf = io.BytesIO()
        Image.frombytes("I;16", (plane.shape[1], plane.shape[0]), plane.tobytes()).save(
            buf, format="JPEG2000", irreversible=False)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    return np.concatenate(blobs), np.array([len(b) for b in blobs], np.int64)


def _decode_slices(blob: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    edges = np.concatenate([[0], np.cumsum(lengths)])
    return np.stack([np.array(Image.open(io.BytesIO(blob[a:b].tobytes()))).astype(np.uint16)
                     for a, b in zip(edges[:-1], edges[1:])])


def pack(src: str, out: str) -> str:
    """Pack ``src`` (``volumes/*.h5`` and the split lists) into the archive ``out`` (.npz); returns ``out``."""
    src_dir, out_path = Path(src), Path(out)
    files = sorted((src_dir / "volumes").glob("*.h5"))
    if not files:
        raise SystemExit(f"{src_dir / 'volumes'}: no .h5 volumes to pack")
    if out_path.exists():
        raise SystemExit(f"{out_path}: exists; choose another path or delete it")
    arrays: dict[str, np.ndarray] = {}
    for path in files:
        name = path.stem
        try:  # the converters' reader: a missing, corrupt or keyless file is named with what is wrong
            volume = read_h5_arrays(path, ("image", "label"))
        except InvalidCaseError as e:
            raise SystemExit(str(e)) from e
        image, label = volume["image"], volume["label"]
        arrays[f"{name}__label"] = label
        arrays[f"{name}__sha"] = np.array(_sha(image))
        integer = _integer_form(image) if image.ndim == 3 else None
        if integer is None:
            arrays[f"{name}__raw"] = image
            continue
        k, scale = integer
        arrays[f"{name}__j2k"], arrays[f"{name}__lengths"] = _encode_slices(k)
        arrays[f"{name}__scale"], arrays[f"{name}__shape"] = np.array(scale), np.array(k.shape)
    for name in LISTS:
        if (src_dir / name).exists():
            arrays[name] = np.array((src_dir / name).read_text())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    print(f"{out_path}: {len(files)} volumes, {out_path.stat().st_size / 2**20:.1f} MiB")
    return str(out_path)


def unpack(archive: str, dst: str) -> str:
    """Rebuild the folder packed in ``archive`` under ``dst`` (must not exist); returns ``dst``."""
    dst_dir = Path(dst)
    if dst_dir.exists():
        raise SystemExit(f"{dst_dir}: exists; unpack into a new folder")
    data = np.load(archive)
    names = sorted({key.split("__")[0] for key in data.files if "__" in key})
    (dst_dir / "volumes").mkdir(parents=True)
    for name in names:
        if f"{name}__raw" in data.files:
            image = data[f"{name}__raw"]
        else:
            k = _decode_slices(data[f"{name}__j2k"], data[f"{name}__lengths"])
            image = (k.astype(np.float64) / int(data[f"{name}__scale"])).astype(np.float32)
            if image.shape != tuple(data[f"{name}__shape"]):
                raise SystemExit(f"{archive}: {name} decoded to {image.shape}, packed {tuple(data[f'{name}__shape'])}")
        if _sha(image) != str(data[f"{name}__sha"]):
            raise SystemExit(f"{archive}: {name}'s rebuilt image differs from the packed one (checksum)")
        with h5py.File(dst_dir / "volumes" / f"{name}.h5", "w") as h5:
            h5["image"], h5["label"] = image, data[f"{name}__label"]
    for list_name in LISTS:
        if list_name in data.files:
            (dst_dir / list_name).write_text(str(data[list_name]))
    print(f"{dst_dir}: {len(names)} volumes rebuilt, checksums match")
    return str(dst_dir)


if __name__ == "__main__":
    fire.Fire({"pack": pack, "unpack": unpack})
