#!/usr/bin/env python
# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Time the bundle's inference workflow on a synthetic CT (issue: inference speed).

Target (issue): a 512x512x100 CT through the whole inference workflow in under 0.5 s of network time and
under 3 s end to end (load, infer, save) on one H100.

What it does:

1. Writes a synthetic int16 CT of ``size x size x slices`` voxels (HU: air -1000, an elliptic body of
   soft tissue 0-60 HU with noise, a fat layer, liver, kidneys, contrast-filled aorta, spine, lungs in
   the upper slices, bowel gas; spacing 0.8x0.8x2.5 mm; stored LPS, as DICOM-converted CTs usually are,
   so the reorientation to RAS and back is exercised) as .nii.gz, ``copies`` times, and a randomly
   initialised checkpoint ``models/model.pt`` of the configured network (FIAS-tiny with the overlay's
   class count) in a temporary ``bundle_root`` (weights do not matter for timing; pass ``--bundle_root``
   to use trained ones).
2. Builds the bundle in-process exactly as ``python -m monai.bundle run`` does: ``ConfigWorkflow`` over
   ``bundle/configs/inference.json`` plus the overlays (default ``bundle/configs/synapse.json``: 9 classes,
   the CT window) with ``bundle_root``, ``dataset_dir`` and ``output_dir`` overridden, then calls the
   workflow's ``run`` once per volume (the datalist narrowed to that volume), so each timing is what a
   one-scan call costs once the process is up:

   * ``e2e_s``: ``ConfigWorkflow.run()`` wall clock, synchronised: input checks, DataLoader (read,
     preprocess, collate; plus a worker's start and join where the bundle starts one), transfer,
     SliceInferer, argmax, inversion to the scan's grid, save;
   * ``network_s``: summed wall time of the network's forward calls (a forward pre-hook and a forward
     hook that synchronise CUDA), over SliceInferer's batches; ``network_gpu_s``: the same spans in CUDA
     events;
   * ``load_preprocess_s`` (up to the evaluator's ITERATION_STARTED), ``inferer_s`` (to device +
     SliceInferer, up to FORWARD_COMPLETED), ``postprocess_save_s`` (to ITERATION_COMPLETED).

   The first volume is reported apart (cold: CUDA kernels' first use, weight loading, allocator
   warm-up); the others give the warm median, which is compared with the targets.
   Then the same volumes in one call (``folder``): what a folder of scans costs per scan, with the
   loader workers reading the next scan while the current one is segmented.
3. A breakdown pass on one more (warm) volume with the DataLoader in the main process
   (``num_workers`` 0), every pre/post transform timed (``Invertd``'s inverses of ``Resized`` and
   ``Orientationd`` separately).
4. ``python -m monai.bundle run --config_file [...]`` on one volume in a subprocess: process
   start-to-finish (Python, imports, CUDA init, network build, weights, one volume).

Writes a JSON (device, torch/CUDA/MONAI versions, sizes, per-volume timings, medians, targets,
pass/fail) to ``--out`` and prints a table. Runs on CPU too (the numbers then say nothing about the
target); ``--size 128 --slices 10`` for a quick check. To profile the pipeline around the network on
CPU, swap in a 1x1 convolution: ``--overrides '{"network_def": {"_target_": "torch.nn.Conv2d",
"in_channels": 1, "out_channels": "@num_classes", "kernel_size": 1}}'``.

    PYTHONPATH=. python scripts/time_inference.py --out time_inference_h100.json

Options: ``--size 512 --slices 100 --copies 3 --overlays bundle/configs/synapse.json`` (comma-separated,
``""`` for none), ``--overrides '{"infer_batch_size": 128}'`` (bundle config overrides, applied to the
in-process runs, the checkpoint's network and the CLI run alike), ``--bundle_root DIR`` (a trained
``models/model.pt``), ``--work_dir DIR`` (keep the inputs and outputs there), ``--cli false``,
``--breakdown false``, ``--folder false``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import fire

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
INFER = CONFIGS / "inference.json"
TARGET_NETWORK_S = 0.5
TARGET_E2E_S = 3.0


# ----------------------------------------------------------------------------------------------------
# inputs


def _axcodes_affine(axcodes: str, spacing: tuple[float, ...], shape: tuple[int, ...]):
    """An oblique-free affine whose voxel axes point along ``axcodes``, centred on the world origin."""
    import numpy as np

    world = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    aff = np.eye(4)
    aff[:3, :3] = 0
    for axis, (code, sp) in enumerate(zip(axcodes.upper(), spacing)):
        row, sign = world[code]
        aff[row, axis] = sign * sp
    aff[:3, 3] = -aff[:3, :3] @ (np.asarray(shape, dtype=float) - 1) / 2
    return aff


def make_ct(path: str | os.PathLike, size: int = 512, slices: int = 100, spacing=(0.8, 0.8, 2.5),
            axcodes: str = "LPS", seed: int = 0) -> Path:
    """Write a body-like int16 CT (Hounsfield units) of ``size x size x slices`` as NIfTI.

    Air -1000 outside an elliptic body of soft tissue (0-60 HU, noise sd 12), a subcutaneous fat layer
    (-100), liver (+60), spleen (+50), kidneys (+150, contrast), aorta (+250), spine (+700 cortex,
    +250 marrow), lungs (-850) in the upper third, bowel gas (-950); organ sizes vary along z.
    """
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    n = size
    yy, xx = np.mgrid[:n, :n].astype(np.float32) / n  # row (A-P in the image), column (R-L)

    def ellipse(cy, cx, ry, rx):
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

    vol = np.empty((n, n, slices), dtype=np.int16)
    body = ellipse(0.5, 0.5, 0.34, 0.44)
    inner = ellipse(0.5, 0.5, 0.31, 0.41)
    for z in range(slices):
        t = z / max(slices - 1, 1)  # 0 = inferior, 1 = superior
        s = rng.normal(35.0, 12.0, (n, n)).astype(np.float32)
        s[body & ~inner] = rng.normal(-100.0, 15.0, int((body & ~inner).sum()))
        grow = 0.6 + 0.4 * np.sin(np.pi * t)
        s[ellipse(0.42, 0.33, 0.12 * grow, 0.13 * grow)] += 25.0  # liver, 60 HU
        s[ellipse(0.45, 0.72, 0.05 * grow, 0.05 * grow)] += 15.0  # spleen
        for cx in (0.38, 0.62):
            s[ellipse(0.64, cx, 0.035 * grow, 0.025 * grow)] = rng.normal(150.0, 20.0)  # kidneys
        s[ellipse(0.6, 0.52, 0.018, 0.018)] = 250.0  # aorta
        s[ellipse(0.72, 0.5, 0.045, 0.04)] = 700.0  # vertebral body
        s[ellipse(0.72, 0.5, 0.032, 0.028)] = 250.0  # marrow
        if t > 0.66:  # lung bases
            r = 0.1 * (t - 0.66) / 0.34 + 0.02
            for cx in (0.3, 0.7):
                s[ellipse(0.45, cx, r * 1.3, r)] = rng.normal(-850.0, 30.0)
        s[ellipse(0.5 + 0.1 * np.cos(7 * t), 0.5, 0.015, 0.02)] = -950.0  # bowel gas
        s[~body] = -1000.0
        vol[..., z] = np.clip(np.rint(s), -1024, 3071).astype(np.int16)
    affine = _axcodes_affine(axcodes, spacing, vol.shape)
    img = nib.Nifti1Image(vol, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    img.header.set_xyzt_units("mm", "sec")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _parse_network(config_files: list[str], overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update(overrides)
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("num_classes")


def make_checkpoint(bundle_root: str | os.PathLike, config_files: list[str], overrides: dict) -> Path:
    """Save a randomly initialised ``network_def`` (with the configs' class count) as ``models/model.pt``."""
    import torch

    torch.manual_seed(0)
    net, _ = _parse_network(config_files, overrides)
    path = Path(bundle_root) / "models" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------------
# timing helpers


def _sync(device) -> None:
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _NetworkTimer:
    """Wall time (synchronised) and CUDA-event time of every forward call of ``module``."""

    def __init__(self, module, device) -> None:
        import torch

        self.device = device
        self.cuda = torch.device(device).type == "cuda"
        self.reset()
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def reset(self) -> None:
        self.wall: list[float] = []
        self.events: list[tuple[Any, Any]] = []
        self._t0 = 0.0
        self._ev0 = None

    def _pre(self, module, args) -> None:
        import torch

        _sync(self.device)
        if self.cuda:
            self._ev0 = torch.cuda.Event(enable_timing=True)
            self._ev0.record()
        self._t0 = time.perf_counter()

    def _post(self, module, args, output) -> None:
        import torch

        if self.cuda:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            self.events.append((self._ev0, ev1))
        _sync(self.device)
        self.wall.append(time.perf_counter() - self._t0)

    def gpu_s(self) -> float | None:
        if not self.cuda:
            return None
        _sync(self.device)
        return sum(a.elapsed_time(b) for a, b in self.events) / 1000

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _EngineTimer:
    """Synchronised timestamps of the evaluator's iteration events."""

    def __init__(self, evaluator, device) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        self.device = device
        self.marks: dict[str, float] = {}
        for name, event in (("iteration_started", Events.ITERATION_STARTED),
                            ("forward_completed", IterationEvents.FORWARD_COMPLETED),
                            ("iteration_completed", Events.ITERATION_COMPLETED)):
            evaluator.add_event_handler(event, self._mark, name)

    def _mark(self, engine, name: str) -> None:
        _sync(self.device)
        self.marks[name] = time.perf_counter()


@contextlib.contextmanager
def _timed_transforms(transforms, records: dict[str, float]):
    """Time every transform's ``__call__`` (and ``inverse``) into ``records`` (seconds, summed).

    Each instance gets a subclass of its own class (so ``isinstance``, and the inverse lookup of
    ``Invertd``, are unchanged); restored on exit.
    """
    originals = []

    def wrap(t, device):
        cls = t.__class__
        label = cls.__name__

        def timed(method, key):
            def run(self, *args, **kwargs):
                _sync(device)
                t0 = time.perf_counter()
                try:
                    return method(self, *args, **kwargs)
                finally:
                    _sync(device)
                    records[key] += time.perf_counter() - t0

            return run

        ns: dict[str, Any] = {"__call__": timed(cls.__call__, label)}
        if hasattr(cls, "inverse"):
            ns["inverse"] = timed(cls.inverse, f"  {label}.inverse (in Invertd)")
        originals.append((t, cls))
        t.__class__ = type(f"Timed{cls.__name__}", (cls,), ns)

    try:
        for ts, device in transforms:
            for t in ts:
                wrap(t, device)
        yield records
    finally:
        for t, cls in originals:
            t.__class__ = cls


def _flat(compose) -> list:
    from fias_monai.inference import _flatten

    return _flatten(compose)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(v, nd)


# ----------------------------------------------------------------------------------------------------
# environment


def _environment(device) -> dict:
    import monai
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "monai": monai.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or None,
        "host": platform.node(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    if env["gpu"]:
        with contextlib.suppress(Exception):
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
    return env


# ----------------------------------------------------------------------------------------------------
# the runs


def _check_output(src: Path, seg_path: Path, num_classes: int) -> dict:
    """The segmentation has the input's shape and affine, uint8 labels below ``num_classes``."""
    import nibabel as nib
    import numpy as np

    img, seg = nib.load(str(src)), nib.load(str(seg_path))
    data = np.asanyarray(seg.dataobj)
    ok = (seg.shape == img.shape and np.allclose(seg.affine, img.affine, atol=1e-4)
          and seg.get_data_dtype() == np.uint8 and int(data.max()) < num_classes)
    return {"ok": bool(ok), "shape": list(seg.shape), "dtype": str(seg.get_data_dtype()),
            "affine_max_abs_diff": float(np.abs(seg.affine - img.affine).max()),
            "labels": sorted(int(v) for v in np.unique(data)), "mib": round(seg_path.stat().st_size / 2**20, 2)}


def _run_in_process(config_files: list[str], overrides: dict, bundle_root: Path, inputs: list[Path],
                    in_dir: Path, out_dir: Path, breakdown_input: Path | None, folder_run: bool = True) -> dict:
    import torch
    from monai.bundle import ConfigWorkflow

    from fias_monai.inference import InferenceError
    from fias_monai.transforms import SafeSaveImaged

    t0 = time.perf_counter()
    wf = ConfigWorkflow(config_file=config_files, workflow_type="infer", bundle_root=str(bundle_root),
                        dataset_dir=str(in_dir), output_dir=str(out_dir), **overrides)
    wf.initialize()
    t_init = time.perf_counter() - t0
    p = wf.parser
    device = p.get_parsed_content("device")
    t0 = time.perf_counter()
    evaluator = p.get_parsed_content("evaluator")  # builds the network and moves it to the device
    _sync(device)
    t_build = time.perf_counter() - t0
    network = p.get_parsed_content("network")
    dataset = p.get_parsed_content("dataset")
    loader = p.get_parsed_content("dataloader")
    pre, post = p.get_parsed_content("preprocessing"), p.get_parsed_content("postprocessing")
    num_classes = int(p.get_parsed_content("num_classes"))
    by_name = {Path(d["image"]).name: d for d in dataset.data}

    net_timer = _NetworkTimer(network, device)
    eng_timer = _EngineTimer(evaluator, device)

    def run_workflow() -> tuple[float, float]:
        """(start, end) of one synchronised ``wf.run()``."""
        _sync(device)
        t_start = time.perf_counter()
        try:
            wf.run()
        except InferenceError as e:
            raise RuntimeError(f"inference failed: {e}") from None
        _sync(device)
        return t_start, time.perf_counter()

    def one(src: Path) -> dict:
        dataset.data = [by_name[src.name]]
        net_timer.reset()
        eng_timer.marks.clear()
        t_start, t_end = run_workflow()
        m = eng_timer.marks
        rec = {
            "input": src.name,
            "e2e_s": t_end - t_start,
            "network_s": sum(net_timer.wall),
            "network_gpu_s": net_timer.gpu_s(),
            "network_calls": len(net_timer.wall),
            "load_preprocess_s": m["iteration_started"] - t_start,
            "inferer_s": m["forward_completed"] - m["iteration_started"],
            "postprocess_save_s": m["iteration_completed"] - m["forward_completed"],
            "after_s": t_end - m["iteration_completed"],
        }
        rec["check"] = _check_output(src, out_dir / src.name.replace(".nii.gz", "_seg.nii.gz"), num_classes)
        return {k: (_r(v) if isinstance(v, float) else v) for k, v in rec.items()}

    volumes = []
    for i, src in enumerate(inputs):
        rec = one(src)
        rec["cold"] = i == 0
        volumes.append(rec)
        print(f"  volume {i} ({'cold' if i == 0 else 'warm'}): e2e {rec['e2e_s']:.3f} s, "
              f"network {rec['network_s']:.3f} s", flush=True)

    savers = [t for t in _flat(post) if isinstance(t, SafeSaveImaged)]
    folder = None
    if folder_run and len(inputs) > 1:  # all the volumes in one call: the loader workers read ahead
        dataset.data = [by_name[src.name] for src in inputs]
        overwrite = [s.overwrite for s in savers]
        for s in savers:
            s.overwrite = True  # the per-volume runs wrote these outputs already
        net_timer.reset()
        try:
            t_start, t_end = run_workflow()
        finally:
            for s, o in zip(savers, overwrite):
                s.overwrite = o
        total = t_end - t_start
        try:
            from fias_monai.inference import loader_workers

            started = loader_workers(loader.num_workers, len(inputs))
        except ImportError:
            started = loader.num_workers
        folder = {"volumes": len(inputs), "total_s": _r(total), "per_volume_s": _r(total / len(inputs)),
                  "network_s": _r(sum(net_timer.wall)), "loader_workers": started}
        print(f"  folder of {len(inputs)} volumes in one call: {total:.3f} s ({total / len(inputs):.3f} s per volume)",
              flush=True)

    breakdown = None
    if breakdown_input is not None:
        records: dict[str, float] = defaultdict(float)
        workers = loader.num_workers
        loader.num_workers = 0  # transforms in this process, so they can be timed
        try:
            with _timed_transforms([(_flat(pre), device), (_flat(post), device)], records):
                rec = one(breakdown_input)
        finally:
            loader.num_workers = workers
        steps = {k: _r(v) for k, v in records.items()}
        breakdown = {"input": breakdown_input.name, "num_workers": 0, "timings": rec, "transforms_s": steps,
                     "savers": [type(s).__name__ for s in savers]}

    try:  # how many DataLoader workers one call over one volume starts
        from fias_monai.inference import loader_workers

        workers_one_volume = loader_workers(loader.num_workers, 1)
    except ImportError:  # before the change that reads a single volume in-process
        workers_one_volume = loader.num_workers
    config = {
        "num_workers": loader.num_workers,
        "loader_workers_one_volume": workers_one_volume,
        "infer_batch_size": p.get_parsed_content("infer_batch_size"),
        "image_size": p.get_parsed_content("image_size"),
        "amp": bool(p.get_parsed_content("amp")),
        "num_classes": num_classes,
        "variant": p.get_parsed_content("variant"),
        "network_class": type(network).__name__,
        "network_parameters": sum(x.numel() for x in network.parameters()),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }
    env = _environment(device)
    net_timer.remove()
    wf.finalize()
    return {"setup_s": {"initialize": _r(t_init), "build_network": _r(t_build)}, "volumes": volumes,
            "folder": folder, "breakdown": breakdown, "config": config, "environment": env}


def _cli_overrides(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _run_cli(config_files: list[str], overrides: dict, bundle_root: Path, in_dir: Path, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(config_files),
           "--bundle_root", str(bundle_root), "--dataset_dir", str(in_dir), "--output_dir", str(out_dir),
           *_cli_overrides(overrides)]
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    per_volume = None
    for line in log.splitlines():  # run_inference logs "[1/1] <in> -> <out> (x.x s)"
        if "[1/1]" in line and line.rstrip().endswith(" s)"):
            with contextlib.suppress(ValueError):
                per_volume = float(line.rstrip()[:-3].rsplit("(", 1)[1])
    return {"command": " ".join(cmd), "returncode": proc.returncode, "wall_s": _r(wall, 3),
            "logged_volume_s": per_volume, "log_tail": log[-3000:] if proc.returncode else log[-600:]}


# ----------------------------------------------------------------------------------------------------
# main


def _table(result: dict) -> str:
    env, vols, cfg = result["environment"], result["volumes"], result["config"]
    net = cfg["network_class"] + (f"-{cfg['variant']}" if cfg["network_class"] == "FIAS" else "")
    dev = env["gpu"] or f"CPU ({env['cpu']}, {env['torch_threads']} threads)"
    lines = [f"device: {dev}; torch {env['torch']}, CUDA {env['cuda']}, MONAI {env['monai']}",
             f"volume: {'x'.join(map(str, result['volume']['shape']))} int16 {result['volume']['axcodes']}, "
             f"configs: {', '.join(Path(c).name for c in result['config_files'])}",
             f"network: {net} ({cfg['network_parameters'] / 1e6:.1f} M parameters, {cfg['num_classes']} classes), "
             f"infer_batch_size {cfg['infer_batch_size']}, amp {cfg['amp']}, num_workers {cfg['num_workers']} "
             f"({cfg['loader_workers_one_volume']} started for one volume); "
             f"setup: network build {result['setup_s']['build_network']:.2f} s",
             "",
             f"{'volume':<14}{'e2e s':>8}{'network s':>11}{'net GPU s':>11}{'load+pre s':>12}{'inferer s':>11}"
             f"{'post+save s':>13}",
             ]

    def row(label, v):
        g = v.get("network_gpu_s")
        return (f"{label:<14}{v['e2e_s']:>8.3f}{v['network_s']:>11.3f}{(f'{g:.3f}' if g is not None else '-'):>11}"
                f"{v['load_preprocess_s']:>12.3f}{v['inferer_s']:>11.3f}{v['postprocess_save_s']:>13.3f}")

    for i, v in enumerate(vols):
        lines.append(row(f"{i} ({'cold' if v['cold'] else 'warm'})", v))
    if result["warm_median"]:
        lines.append(row("warm median", result["warm_median"]))
    if result.get("folder"):
        f = result["folder"]
        lines.append(f"folder of {f['volumes']} in one call ({f['loader_workers']} loader workers): "
                     f"{f['total_s']:.3f} s, {f['per_volume_s']:.3f} s per volume, network {f['network_s']:.3f} s in all")
    if result.get("breakdown"):
        b = result["breakdown"]
        lines += ["", f"breakdown (one warm volume, DataLoader in-process): e2e {b['timings']['e2e_s']:.3f} s, "
                      f"network {b['timings']['network_s']:.3f} s, inferer {b['timings']['inferer_s']:.3f} s"]
        lines += [f"  {k:<44}{v:>8.3f} s" for k, v in b["transforms_s"].items()]
    if result.get("cli"):
        c = result["cli"]
        lines += ["", f"CLI, one volume, process start to finish: {c['wall_s']:.2f} s "
                      f"(its own per-volume log: {c['logged_volume_s']} s; exit {c['returncode']})"]
    t = result["targets"]
    lines += ["", f"targets (warm median): network < {t['network_s']} s: {'PASS' if t['network_pass'] else 'FAIL'}; "
                  f"end to end < {t['e2e_s']} s: {'PASS' if t['e2e_pass'] else 'FAIL'}"
                  + ("" if env["gpu"] else "  (CPU run: does not count)")]
    return "\n".join(lines)


def main(out: str | None = None, size: int = 512, slices: int = 100, copies: int = 3,
         overlays: str = "bundle/configs/synapse.json", overrides: dict | None = None,
         bundle_root: str | None = None, work_dir: str | None = None, axcodes: str = "LPS",
         spacing: tuple = (0.8, 0.8, 2.5), cli: bool = True, breakdown: bool = True, folder: bool = True) -> dict:
    """Time the inference workflow; see the module docstring.

    Args:
        out: JSON file for the results (printed only when None).
        size: in-plane size of the synthetic CT (square).
        slices: number of slices.
        copies: volumes timed in-process (the first is reported as cold).
        overlays: comma-separated config overlays merged after inference.json ("" for none).
        overrides: bundle config overrides (e.g. {"infer_batch_size": 128}).
        bundle_root: a bundle root with trained ``models/model.pt``; a random checkpoint when None.
        work_dir: folder for inputs and outputs (kept); a temporary folder (removed) when None.
        axcodes: orientation the synthetic CT is stored in.
        spacing: voxel spacing in mm.
        cli: also time ``python -m monai.bundle run`` on one volume in a subprocess.
        breakdown: also time every transform on one more volume (DataLoader in-process).
        folder: also time the ``copies`` volumes in one call (loader workers reading ahead).
    """
    import torch

    from fias_monai.transforms import as_bool
    from fias_monai.utils import source_commit

    # fire passes "false" as a string
    cli, breakdown, folder = as_bool(cli, "cli"), as_bool(breakdown, "breakdown"), as_bool(folder, "folder")
    overrides = dict(overrides or {})
    for key in ("bundle_root", "dataset_dir", "output_dir"):
        if key in overrides:
            raise ValueError(f"pass --{key.replace('dataset_dir', 'work_dir')} to the script, not in overrides")
    config_files = [str(INFER)] + [str((REPO / o) if not Path(o).is_absolute() else o)
                                   for o in (overlays.split(",") if isinstance(overlays, str) else overlays) if o]
    for c in config_files:
        if not Path(c).is_file():
            raise FileNotFoundError(c)
    spacing = tuple(float(s) for s in (spacing.split(",") if isinstance(spacing, str) else spacing))

    tmp = Path(tempfile.mkdtemp(prefix="fias_time_")) if work_dir is None else Path(work_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        in_dir, single_dir = tmp / "in", tmp / "in_single"
        for d in (in_dir, single_dir, tmp / "out", tmp / "out_cli"):
            if d.exists():
                shutil.rmtree(d)
        t0 = time.perf_counter()
        first = make_ct(in_dir / "ct_000.nii.gz", size, slices, spacing, axcodes)
        t_make = time.perf_counter() - t0
        inputs = [first]
        for i in range(1, copies + int(breakdown)):
            inputs.append(in_dir / f"ct_{i:03d}.nii.gz")
            shutil.copyfile(first, inputs[-1])
        single_dir.mkdir()
        shutil.copyfile(first, single_dir / "ct_cli.nii.gz")
        print(f"synthetic CT {size}x{size}x{slices} int16 ({axcodes}, {spacing} mm): "
              f"{first.stat().st_size / 2**20:.1f} MiB .nii.gz, written in {t_make:.1f} s", flush=True)

        if bundle_root is None:
            root = tmp / "bundle"
            ckpt = make_checkpoint(root, config_files, overrides)
            weights = f"random ({ckpt})"
        else:
            root = Path(bundle_root)
            weights = str(root / "models" / "model.pt")

        print("in-process runs (ConfigWorkflow):", flush=True)
        res = _run_in_process(config_files, overrides, root, inputs[:copies], in_dir, tmp / "out",
                              inputs[copies] if breakdown else None, folder)
        vols = res["volumes"]
        warm = [v for v in vols if not v["cold"]] or vols
        keys = ("e2e_s", "network_s", "network_gpu_s", "load_preprocess_s", "inferer_s", "postprocess_save_s",
                "after_s")
        warm_median = {k: _r(_median([v[k] for v in warm])) for k in keys}
        result: dict[str, Any] = {
            "what": "bundle inference workflow on a synthetic CT, per volume (scripts/time_inference.py)",
            "environment": res["environment"],
            "git_commit": source_commit(),
            "volume": {"shape": [size, size, slices], "dtype": "int16", "spacing_mm": list(spacing),
                       "axcodes": axcodes, "file_mib": round(first.stat().st_size / 2**20, 2)},
            "config_files": [os.path.relpath(c, REPO) for c in config_files],
            "overrides": overrides,
            "weights": weights,
            "config": res["config"],
            "setup_s": res["setup_s"],
            "volumes": vols,
            "cold": vols[0],
            "warm_median": warm_median,
            "folder": res["folder"],
            "breakdown": res["breakdown"],
        }
        gc.collect()  # the in-process workflow (network, engine) is gone: free its GPU memory for the CLI run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if cli:
            print("CLI run (subprocess):", flush=True)
            result["cli"] = _run_cli(config_files, overrides, root, single_dir, tmp / "out_cli")
        on_gpu = res["environment"]["gpu"] is not None
        result["targets"] = {
            "network_s": TARGET_NETWORK_S, "e2e_s": TARGET_E2E_S, "measured_on": "warm median",
            "network_pass": warm_median["network_s"] < TARGET_NETWORK_S,
            "e2e_pass": warm_median["e2e_s"] < TARGET_E2E_S,
            "counts": on_gpu,
            "note": None if on_gpu else "CPU run: the targets are for one H100; these numbers do not count",
        }
        result["outputs_ok"] = all(v["check"]["ok"] for v in vols) and (
            result["breakdown"] is None or result["breakdown"]["timings"]["check"]["ok"])
        print()
        print(_table(result))
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2) + "\n")
            print(f"\nwritten {out}")
        if not result["outputs_ok"]:
            raise SystemExit("an output's shape/affine/dtype/labels did not match its input (see 'check')")
        if cli and result["cli"]["returncode"] != 0:
            print(result["cli"]["log_tail"])
            raise SystemExit(f"the CLI run failed (exit {result['cli']['returncode']})")
        return result
    finally:
        if work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)  # the table is printed; the dict is for callers
