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
# The narrow FIAS of the CPU bundle tests, as config overrides (FIAS inputs must divide by 32: 64x64 slices).
TINY_BUNDLE = {"network_def#embed_dims": [24, 48, 96, 192], "network_def#depths": [1, 1, 1, 1], "image_size": [64, 64]}


HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed with this torch build")


# The Triton-interpreter checks (test_loss_kernel, test_layernorm_kernel, test_msda_kernel) run in ONE
# subprocess: TRITON_INTERPRET=1 is read when Triton decorates the kernels, so it cannot be switched on in
# this process, and each fresh interpreter spends ~8 s of its ~10 s importing torch and MONAI. Each module
# registers its script when pytest imports it (collection, before any test runs); the first test that asks
# for a result runs every registered script not run yet, one after another in that subprocess, each with
# its own globals and its own captured output, and every test then checks only its own script's result.
_INTERPRETER_CHECKS: dict[str, str] = {}  # script -> name, in registration order
_INTERPRETER_RESULTS: dict[str, dict] = {}  # script -> {"ok", "output", "error"}

_INTERPRETER_RUNNER = r"""
import contextlib, io, json, sys, traceback
checks = json.load(open(sys.argv[1]))
results = {}
for name, script in checks:
    buf = io.StringIO()
    ok, error = True, ""
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            exec(compile(script, f"<Triton-interpreter check {name}>", "exec"), {"__name__": "__main__"})
    except BaseException:
        ok, error = False, traceback.format_exc()
    results[name] = dict(ok=ok, output=buf.getvalue(), error=error)
    with open(sys.argv[2], "w") as f:  # after every script: a crash later keeps the results so far
        json.dump(results, f)
"""


def triton_interpreter_check(name: str, script: str) -> str:
    """Register ``script`` (it prints a JSON result as its last line) to run in the shared interpreter
    subprocess; returns the script, for :func:`run_in_triton_interpreter`."""
    _INTERPRETER_CHECKS[script] = name
    return script


def _run_interpreter_checks(scripts: list[str]) -> None:
    import tempfile

    names = [_INTERPRETER_CHECKS[s] for s in scripts]
    assert len(set(names)) == len(names), f"Triton-interpreter check names must be unique: {names}"
    # The repository goes on the front of the caller's PYTHONPATH (the GPU machine's packages live there).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    with tempfile.TemporaryDirectory() as tmp:
        checks, out = Path(tmp, "checks.json"), Path(tmp, "results.json")
        checks.write_text(json.dumps([[n, s] for n, s in zip(names, scripts)]))
        run = subprocess.run([sys.executable, "-c", _INTERPRETER_RUNNER, str(checks), str(out)], env=env,
                             capture_output=True, text=True, timeout=900)
        results = json.loads(out.read_text()) if out.is_file() else {}
    for name, script in zip(names, scripts):
        _INTERPRETER_RESULTS[script] = results.get(name) or dict(
            ok=False, output=run.stdout[-3000:],
            error=f"the interpreter subprocess ended (exit {run.returncode}) before {name!r} finished:\n"
                  f"{run.stderr[-3000:]}")


def run_in_triton_interpreter(script: str) -> list:
    """The JSON that ``script``'s last printed line holds, from a run with ``TRITON_INTERPRET=1`` in the
    shared subprocess (every registered check not run yet runs now, once); fails with this script's own
    output and traceback if it raised."""
    if script not in _INTERPRETER_CHECKS:
        triton_interpreter_check(f"check {len(_INTERPRETER_CHECKS) + 1}", script)
    if script not in _INTERPRETER_RESULTS:
        _run_interpreter_checks([s for s in _INTERPRETER_CHECKS if s not in _INTERPRETER_RESULTS])
    res = _INTERPRETER_RESULTS[script]
    name = _INTERPRETER_CHECKS[script]
    assert res["ok"], f"{name} failed in the Triton interpreter:\n{res['output'][-3000:]}\n{res['error'][-3000:]}"
    return json.loads(res["output"].strip().splitlines()[-1])


class BackgroundRun:
    """A subprocess started now, in the background. Slow tests start two independent ones at a time: each
    spends most of its time importing torch and MONAI on one core, and the machine has two. Its output goes
    to temporary files (no pipe fills up while the other run is waited for); :meth:`result` waits for it
    (and with ``check`` fails the test on a non-zero exit, naming the command and the output's tails),
    :meth:`stop` (a fixture's teardown) kills it if no test waited for it."""

    def __init__(self, cmd: list, *, cwd, env: dict, timeout: float, check: bool = False) -> None:
        import tempfile

        self.cmd, self.timeout, self.check = [str(c) for c in cmd], timeout, check
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=self._out, stderr=self._err)
        self._done = None

    def result(self) -> subprocess.CompletedProcess:
        if self._done is None:
            try:
                self.proc.wait(timeout=self.timeout)
            finally:
                self.stop()
            self._out.seek(0)
            self._err.seek(0)
            self._done = subprocess.CompletedProcess(self.cmd, self.proc.returncode, self._out.read(),
                                                     self._err.read())
            self._out.close()
            self._err.close()
        proc = self._done
        if self.check:
            assert proc.returncode == 0, (
                f"exit {proc.returncode}: {' '.join(self.cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
                f"--- stderr ---\n{proc.stderr[-6000:]}")
        return proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def overfit(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Train ``net`` in train mode on one batch with Adam and FIAS's feature-mixing loss; the loss per step."""
    from fias_monai.losses import FeatureMixingLoss

    loss_fn = FeatureMixingLoss()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(net.train()(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def requires_shared(*parts):
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not present (users' clones lack ../shared)")


def axcodes_affine(codes: str, spacing, origin) -> np.ndarray:
    """An oblique-free affine whose voxel axes point along ``codes`` (e.g. "LPI", "PSR")."""
    world = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    aff = np.eye(4)
    aff[:3, :3] = 0
    for axis, (code, sp) in enumerate(zip(codes, spacing)):
        row, sign = world[code]
        aff[row, axis] = sign * sp
    aff[:3, 3] = origin
    return aff


def intensity_coded_inference(tmp_path: Path, config_file, meta_file, cases: dict, read_channel: int = 0,
                              in_channels: int = 1, overrides: dict | None = None) -> dict:
    """Run inference.json with a stand-in "network" whose argmax is a known function of the intensity.

    The network is a 1x1 convolution that reads input channel ``read_channel`` of ``in_channels``: argmax
    0, 1, 2, 3 for a [0, 1]-scaled value in [0, .25), [.25, .5), [.5, .75), [.75, 1]. Each case
    (name -> (axis codes, shape)) is a random label map in 0..3 saved as intensities that the per-volume
    min-max maps onto those four levels exactly, with an affine along the axis codes; in-plane sides of 64
    after reorientation to RAS keep the Resize to 64x64 the identity.

    Returns:
        name -> (label map, its affine, the written segmentation as a nibabel image).
    """
    from monai.bundle import ConfigWorkflow

    conv = torch.nn.Conv2d(in_channels, 4, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, read_channel] = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(4, 1, 1)
        conv.bias.copy_(torch.tensor([0.0, -2.5, -7.5, -15.0]))
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    torch.save(conv.state_dict(), tmp_path / "bundle" / "models" / "model.pt")

    levels = np.array([0.0, 0.375, 0.625, 1.0])  # the per-volume min-max keeps these exactly
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name, (codes, shape) in cases.items():
        seg = rng.integers(0, 4, size=shape).astype(np.uint8)
        seg.flat[:4] = [0, 1, 2, 3]
        image = (levels[seg] * 400.0 - 100.0).astype(np.float32)
        affine = axcodes_affine(codes, (0.7, 1.3, 2.5), (12.5, -40.0, 7.0))
        nib.save(nib.Nifti1Image(image, affine), str(inp / f"{name}.nii.gz"))
        written[name] = (seg, affine)
    network = {"_target_": "torch.nn.Conv2d", "in_channels": in_channels, "out_channels": 4, "kernel_size": 1}
    wf = ConfigWorkflow(config_file=str(config_file), meta_file=str(meta_file), logging_file=False,
                        workflow_type="infer", bundle_root=str(tmp_path / "bundle"), dataset_dir=str(inp),
                        output_dir=str(out), num_workers=0, image_size=[64, 64], network_def=network,
                        **(overrides or {}))
    wf.initialize()
    wf.run()
    wf.finalize()
    return {name: (seg, affine, nib.load(str(out / f"{name}_seg.nii.gz"))) for name, (seg, affine) in written.items()}


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
