import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A narrow FIAS for CPU tests: every block of the real one, a fraction of the width and depth.
TINY_NET = dict(embed_dims=(24, 48, 96, 192), depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24),
                decoder_heads=(8, 6, 4, 2))


HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed with this torch build")


def run_in_triton_interpreter(script: str) -> list:
    """Run ``script`` in a subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when it decorates the
    kernels, so it cannot be switched on inside this process) and return the JSON its last line prints.
    The repository goes on the front of the caller's PYTHONPATH (the GPU machine's packages live there)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def requires_shared(*parts):
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not present (users' clones lack ../shared)")


def write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    """One volume of the SSL4MIS ACDC h5 layout (datasets ``image`` and ``label``)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)


def acdc_arrays(seed: int, shape=(3, 40, 36), corner_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(Z, H, W) float32 image in [0, 1] and a uint8 label using all 4 classes; H != W so a transpose
    mix-up shows. ``corner_label`` also sets voxel (0, 0, 0) to class 3 (a label at the volume's edge)."""
    rng = np.random.default_rng(seed)
    image = rng.random(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[:, 2:6, 3:7] = 1
    label[:, 8:12, 8:12] = 2
    label[:, 9:11, 9:11] = 3
    if corner_label:
        label[0, 0, 0] = 3
    return image, label


def read_nifti(path) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """(data as stored, affine, on-disk dtype) of a NIfTI file."""
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine, img.get_data_dtype()
