"""End-to-end test of the bundle under a real MONAI Label server (scripts/monailabel_server.sh).

MONAI Label pins pydicom<3 / numpy<2, so it lives in its own environment ("label venv"):

    python -m venv .venv-label
    .venv-label/bin/pip install -c constraints.txt -e ".[label]"
    FIAS_LABEL_PYTHON=$PWD/.venv-label/bin/python pytest tests/test_monailabel.py

The test process only needs the main environment (it writes NIfTI files, the bundle's randomly initialised
models/model.pt, and talks HTTP). Everything that imports monailabel runs in subprocesses of the label venv's
python: the server, and the training it starts. The server is always stopped (its whole process group,
training subprocesses included), also when a test fails.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BackgroundRun
from fias_monai.data import load_datalist, make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "monailabel_server.sh"
MODEL = "fias"  # the name monailabel_server.sh serves the bundle under


def _label_python() -> Path:
    env = os.environ.get("FIAS_LABEL_PYTHON")
    if env:
        return Path(env)
    for cand in (REPO / ".venv-label" / "bin" / "python", REPO.parent / "venv-label" / "bin" / "python"):
        if cand.exists():
            return cand
    return REPO / ".venv-label" / "bin" / "python"


LABEL_PY = _label_python()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not LABEL_PY.exists(),
        reason=f"no MONAI Label environment: {LABEL_PY} does not exist (create it with "
        f"`pip install -c constraints.txt -e '.[label]'` in a separate venv and point FIAS_LABEL_PYTHON at its python)",
    ),
]

# Tiny network + CPU-friendly loader settings, written into the copied configs: the server takes no overrides.
TINY = {"image_size": [64, 64], "batch_size": 2, "num_workers": 0, "cache_workers": 1, "val_interval": 1, "epochs": 1}
TINY_NET = {"embed_dims": [24, 48, 96, 192], "depths": [1, 1, 1, 1]}
# A flipped, anisotropic, shifted grid: the label must come back on exactly this grid.
AFFINE = np.array([[-0.8, 0.0, 0.0, 40.0], [0.0, 0.8, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0.0, 0.0, 0.0, 1.0]])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path})"


def _tiny_bundle(dst: Path) -> Path:
    """Copy bundle/ without weights or outputs and write the tiny settings into its configs."""
    skip = shutil.ignore_patterns("*.pt", "*.ts", "eval", "logs", "output", "mlruns", "__pycache__")
    shutil.copytree(REPO / "bundle", dst, ignore=skip)
    (dst / "models").mkdir(exist_ok=True)
    for name in ("train.json", "inference.json"):
        path = dst / "configs" / name
        cfg = json.loads(path.read_text())
        assert "image_size" in cfg and "network_def" in cfg, f"{name} lost image_size/network_def"
        cfg["network_def"].update(TINY_NET)
        cfg.update({k: v for k, v in TINY.items() if k in cfg})
        path.write_text(json.dumps(cfg, indent=4))
    return dst


def _random_model(bundle: Path) -> None:
    """models/model.pt: seeded random weights of the network that the bundle's inference.json builds."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")


def _probe() -> str:
    """Why the label venv cannot run the server, if it cannot import monailabel and fias_monai (asked only
    after a failure: the subprocess costs ~8 s)."""
    probe = subprocess.run([str(LABEL_PY), "-c", "import monailabel, fias_monai"], capture_output=True, text=True)
    return "" if probe.returncode == 0 else (
        f"\n{LABEL_PY} cannot import monailabel and fias_monai:\n{probe.stderr[-3000:]}")


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


class Server:
    """Client side of one running server."""

    def __init__(self, url: str, log: Path, app: Path, studies: Path, labels: dict, test_image: str, shape) -> None:
        self.url, self.log, self.app, self.studies = url, log, app, studies
        self.labels, self.test_image, self.shape = labels, test_image, shape
        self.bundle = app / "model" / MODEL

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 120):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        elif method == "POST":
            req.data = b""
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method: str, path: str, body: dict | None = None, timeout: float = 120):
        status, raw = self.request(method, path, body, timeout)
        assert status == 200, f"{method} {path}: HTTP {status} {raw[:2000]!r}\nserver log:\n{_tail(self.log)}"
        return json.loads(raw)

    def infer(self, image: str, dest: Path) -> nib.Nifti1Image:
        status, raw = self.request("POST", f"/infer/{MODEL}?image={image}&output=image", timeout=180)
        assert status == 200, f"infer {image}: HTTP {status} {raw[:2000]!r}\nserver log:\n{_tail(self.log)}"
        dest.write_bytes(raw)
        return nib.load(str(dest))


@pytest.fixture(scope="module")
def overlay_dry_run(tmp_path_factory):
    """``monailabel_server.sh --overlay synapse.json,acdc_12min.json,<2.5D input> --init-model --dry-run`` on a
    copy of the tiny bundle, started in the background: the server fixture asks for it first, so that its ~9 s
    (the label venv's python importing torch and fias_monai on one core) go by beside the server's start-up on
    the other. Three overlays merged in order: a label set, the 12-minute recipe (its network keys reach both
    configs) and ``context_slices: 1`` (three input channels). Returns (tmp folder, bundle copy, the run)."""
    tmp = tmp_path_factory.mktemp("overlay")
    bundle = _tiny_bundle(tmp / "bundle")
    (tmp / "studies").mkdir()
    (tmp / "context.json").write_text(json.dumps({"context_slices": 1}))
    overlays = [REPO / "bundle" / "configs" / "synapse.json", REPO / "bundle" / "configs" / "acdc_12min.json",
                tmp / "context.json"]
    cmd = ["bash", SCRIPT, tmp / "studies", "--app", tmp / "app", "--bundle", bundle,
           "--overlay", ",".join(map(str, overlays)), "--init-model", "--dry-run", "--python", LABEL_PY]
    run = BackgroundRun(cmd, cwd=tmp, env=dict(os.environ), timeout=180, check=True)
    yield tmp, bundle, run
    run.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, overlay_dry_run):
    tmp = tmp_path_factory.mktemp("monailabel")

    # Data: demo volumes (3 labelled studies for training/validation) + an unlabelled one of another shape.
    demo = load_datalist(make_demo_dataset(tmp / "demo", num_train=2, num_val=1, shape=(64, 64, 6)), "training")
    demo += load_datalist(tmp / "demo" / "datalist.json", "validation")
    odd = load_datalist(make_demo_dataset(tmp / "odd", num_train=1, num_val=0, shape=(72, 56, 5), seed=7), "training")
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, entry in enumerate(demo):
        _save(np.asarray(nib.load(entry["image"]).dataobj), studies / f"case{i}.nii.gz")
        _save(np.asarray(nib.load(entry["label"]).dataobj), studies / "labels" / "final" / f"case{i}.nii.gz")
    test_image = np.asarray(nib.load(odd[0]["image"]).dataobj)
    _save(test_image, studies / "unlabelled.nii.gz")

    # Bundle with a tiny models/model.pt: seeded random weights of the copied inference.json's network (the
    # server checks that they fit it); test_train_one_epoch_updates_model trains them through the server.
    bundle = _tiny_bundle(tmp / "bundle")
    _random_model(bundle)

    # The server, through the documented script, in its own process group.
    port = _free_port()
    app, log = tmp / "app", tmp / "server.log"
    env = {**os.environ, "FIAS_LABEL_PYTHON": str(LABEL_PY), "MONAI_LABEL_SESSION_PATH": str(tmp / "sessions"),
           "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", str(SCRIPT), str(studies), "--app", str(app), "--bundle", str(bundle), "--port", str(port)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{_tail(log)}{_probe()}"
            try:
                with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            assert time.monotonic() < deadline, f"server not up after 120 s:\n{_tail(log)}{_probe()}"
            time.sleep(0.25)
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        labels = {v.lower(): int(k) for k, v in channels.items() if v.lower() != "background"}
        yield Server(url, log, app, studies, labels, "unlabelled", test_image.shape)
    finally:
        try:  # a running training is a child process: ask the server to stop it first
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/train/", method="DELETE"), timeout=5)
        except Exception:
            pass
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or killpg(.., 0) keeps finding its zombie
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.poll()


def test_info_lists_model_with_bundle_labels(server):
    info = server.json("GET", "/info/")
    assert MODEL in info["models"], f"models: {list(info['models'])}\n{_tail(server.log)}"
    model = info["models"][MODEL]
    assert model["type"] == "segmentation"
    assert model["labels"] == server.labels and server.labels, (model["labels"], server.labels)
    assert model["dimension"] == 2
    assert "model.pt" in model["config"]["model_filename"]
    assert MODEL in info["trainers"]
    assert info["datastore"]["total"] == 4 and info["datastore"]["completed"] == 3


def _check_label(img: nib.Nifti1Image, server: Server, shape=None) -> None:
    shape = server.shape if shape is None else shape
    data = np.asarray(img.dataobj)
    assert data.shape == shape, f"label shape {data.shape} != image shape {shape}"
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-4, err_msg="label affine differs from the image's")
    values = np.unique(data)
    assert np.all(values == np.round(values)), f"non-integer label values {values[:10]}"
    assert set(values.astype(int).tolist()) <= {0, *server.labels.values()}, f"unknown class ids {values}"


def test_infer_returns_label_on_image_grid(server, tmp_path):
    _check_label(server.infer(server.test_image, tmp_path / "pred.nii.gz"), server)
    out = server.json("POST", f"/infer/{MODEL}?image={server.test_image}&output=json")
    assert out["label_names"] == server.labels
    # MONAI Label strips the bundle's SaveImaged and writes the result itself: nothing lands in the bundle.
    assert not (server.bundle / "output").exists(), "the bundle's SaveImaged ran inside MONAI Label"


def test_ten_concurrent_infers(server, tmp_path):
    images = [server.test_image if i % 2 else f"case{i % 3}" for i in range(10)]

    def one(i):
        status, raw = server.request("POST", f"/infer/{MODEL}?image={images[i]}&output=image", timeout=240)
        (tmp_path / f"p{i}.nii.gz").write_bytes(raw)
        return status, raw

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    bad = [(i, s, r[:300]) for i, (s, r) in enumerate(results) if s != 200]
    assert not bad, f"failed requests: {bad}\n{_tail(server.log)}"
    for i in range(10):
        img = nib.load(str(tmp_path / f"p{i}.nii.gz"))
        _check_label(img, server, None if images[i] == server.test_image else (64, 64, 6))


def test_train_one_epoch_updates_model(server, tmp_path):
    model_pt = server.bundle / "models" / "model.pt"
    before = (model_pt.stat().st_mtime_ns, hashlib.sha256(model_pt.read_bytes()).hexdigest())
    # 3 labelled studies, val_split 0.34: 2 train + 1 validation volume (an empty validation split never saves).
    task = server.json("POST", f"/train/{MODEL}",
                       {"max_epochs": 1, "val_split": 0.34, "multi_gpu": False, "device": "cpu"})
    assert task["status"] in ("SUBMITTED", "RUNNING"), task
    deadline = time.monotonic() + 180
    while True:
        task = server.json("GET", "/train/")
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.monotonic() < deadline, f"training not done after 180 s: {task}"
        time.sleep(0.5)
    details = "\n".join(task.get("details") or [])
    assert task["status"] == "DONE", f"train task {task['status']}:\n{details}\n{_tail(server.log)}"
    after = (model_pt.stat().st_mtime_ns, hashlib.sha256(model_pt.read_bytes()).hexdigest())
    assert after[0] != before[0] and after[1] != before[1], f"model.pt not rewritten by training:\n{details}"
    # the server picks up the new weights on the next request
    _check_label(server.infer(server.test_image, tmp_path / "after.nii.gz"), server)
    assert "Reload model from cache" in server.log.read_text(errors="replace"), "new model.pt was not reloaded"


def test_overlay_sets_label_set(overlay_dry_run):
    """--overlay writes the overlay's classes into the copy's metadata + configs; --init-model fits the new head."""
    tmp_path, bundle, run = overlay_dry_run
    proc = run.result()  # fails the test on a non-zero exit
    log = proc.stdout + proc.stderr
    copy = tmp_path / "app" / "model" / MODEL / "configs"
    overlay = json.loads((REPO / "bundle" / "configs" / "synapse.json").read_text())
    meta = json.loads((copy / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert list(pred["channel_def"].values()) == overlay["class_names"] and pred["num_channels"] == 9
    for name in ("inference.json", "train.json"):
        cfg = json.loads((copy / name).read_text())
        assert cfg["class_names"] == overlay["class_names"], name
        assert cfg["intensity_transform"] == overlay["intensity_transform"], name
        assert cfg["network_def"]["embed_dims"] == TINY_NET["embed_dims"], name  # the rest of the config is kept
    assert json.loads((copy / "inference.json").read_text())["dataset_dir"] != overlay["dataset_dir"]
    assert (copy.parent / "models" / "model.pt").is_file()
    # 2.5D: both configs stack one neighbour per side, the metadata says so, the new weights take 3 channels
    for name in ("inference.json", "train.json"):
        assert json.loads((copy / name).read_text())["context_slices"] == 1, name
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 3 and image["channel_def"] == {"0": "image, slice -1", "1": "image",
                                                                   "2": "image, slice +1"}
    state = torch.load(copy.parent / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["encoder.stem.0.conv.weight"].shape[1] == 3  # the DilateFormer's first convolution
    # the 12-minute recipe: its network keys in both configs (the new weights have the full-resolution head),
    # its training keys in train.json only
    for name in ("inference.json", "train.json"):
        net = json.loads((copy / name).read_text())["network_def"]
        assert (net["full_res_head"], net["inference_heads"]) == (True, [0]), name
    assert any(k.startswith("full_res_head.") for k in state)
    assert json.loads((copy / "train.json").read_text())["max_minutes"] == 12
    assert "max_minutes" not in json.loads((copy / "inference.json").read_text())
    assert "start_server" in log
    # the repo's bundle is untouched
    assert json.loads((bundle / "configs" / "metadata.json").read_text()) != meta


def _overlay_dry_run_now(tmp: Path, overlays: list, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    """``monailabel_server.sh <empty studies> --overlay <overlays, comma-joined> ARGS --dry-run``, waited for."""
    (tmp / "studies").mkdir()
    cmd = ["bash", str(SCRIPT), str(tmp / "studies"), "--app", str(tmp / "app"), *map(str, args),
           "--overlay", ",".join(map(str, overlays)), "--dry-run", "--python", str(LABEL_PY)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_a_missing_overlay_in_the_list_is_named(tmp_path):
    """Each of the comma-separated overlays is checked before anything is copied; the missing one is named."""
    missing = tmp_path / "acdc_12min.json"
    proc = _overlay_dry_run_now(tmp_path, [REPO / "bundle" / "configs" / "acdc.json", missing], timeout=60)
    assert proc.returncode != 0
    assert f"overlay {missing} does not exist" in proc.stderr
    assert not (tmp_path / "app").exists()


def test_weights_of_another_network_are_refused_with_what_differs(tmp_path):
    """A model trained without the 12-minute recipe, served with it (--overlay acdc.json,acdc_12min.json, no
    --init-model): the script stops before the server starts, naming the modules that differ."""
    bundle = _tiny_bundle(tmp_path / "bundle")
    _random_model(bundle)  # the plain network: no full-resolution head
    configs = REPO / "bundle" / "configs"
    proc = _overlay_dry_run_now(tmp_path, [configs / "acdc.json", configs / "acdc_12min.json"], "--bundle", bundle)
    assert proc.returncode != 0 and "start_server" not in proc.stderr
    # the line evaluation and inference give (fias_monai.handlers.weights_load_error), naming the file
    assert re.search(r"cannot load the model weights \S*model\.pt: they do not fit the configured network \(.*tensors "
                     r"of the network missing: full_res_head\.\* \(\d+\)", proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_an_unreadable_model_is_refused_naming_the_file(tmp_path):
    """A models/model.pt that is no PyTorch checkpoint (a text file, a truncated download): the script stops before
    the server starts with one line naming the file, not a traceback of torch.load."""
    bundle = _tiny_bundle(tmp_path / "bundle")
    (bundle / "models" / "model.pt").write_text("not a checkpoint\n")
    proc = _overlay_dry_run_now(tmp_path, [REPO / "bundle" / "configs" / "acdc.json"], "--bundle", bundle)
    assert proc.returncode != 0 and "start_server" not in proc.stderr
    assert re.search(r"cannot load the model weights \S*model\.pt: not a readable PyTorch checkpoint", proc.stderr), \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
