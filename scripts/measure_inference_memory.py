#!/usr/bin/env python
# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Peak memory of the bundle's inference on one large CT volume (CPU).

Makes a synthetic 512x512x600 int16 CT (HU, 0.7x0.7x1.0 mm) as .nii.gz in a temporary folder, a random
tiny-FIAS model.pt, then runs the real command in a subprocess::

    python -m monai.bundle run --config_file bundle/configs/inference.json --dataset_dir IN --output_dir OUT \
        --bundle_root TMP/bundle --network_def#embed_dims "[24,48,96,192]" --network_def#depths "[1,1,1,1]"

(the tiny network keeps the CPU time down; the input size stays the real 256x256, so every volume-sized
array is as in production). It reports:

* ``maxrss_children_mib``: ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, the peak RSS of the largest
  single process (the bundle process or one DataLoader worker);
* ``peak_tree_rss_mib``: the peak of the summed RSS of the bundle process and all its descendants
  (sampled every 0.1 s from /proc; Linux only), i.e. what the machine needs.

Usage: ``python scripts/measure_inference_memory.py [--depth 600] [--size 512] [--num_workers 2] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_ct(path: Path, size: int, depth: int) -> None:
    """A body-like int16 CT: air, an elliptic body of soft tissue, a 'spine', noise; written slab by slab."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    vol = np.full((size, size, depth), -1000, dtype=np.int16)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = size / 2, size / 2
    body = ((yy - cy) / (0.36 * size)) ** 2 + ((xx - cx) / (0.45 * size)) ** 2 <= 1
    spine = ((yy - cy - 0.2 * size) / (0.04 * size)) ** 2 + ((xx - cx) / (0.04 * size)) ** 2 <= 1
    for z0 in range(0, depth, 50):
        z1 = min(depth, z0 + 50)
        slab = rng.normal(40, 20, (size, size, z1 - z0)).astype(np.int16)
        slab[~body] = -1000
        slab[spine] = 700
        vol[..., z0:z1] = slab
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    img = nib.Nifti1Image(vol, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))


def make_model(path: Path) -> None:
    import torch

    from fias_monai import FIAS

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(FIAS(1, 4, embed_dims=(24, 48, 96, 192), depths=(1, 1, 1, 1)).state_dict(), path)


def _tree_rss_kib(pid: int) -> int:
    """Summed VmRSS of ``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        p = int(d)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(p)
        rss[p] = int(fields.get("VmRSS", "0 kB").split()[0]) if "VmRSS" in fields else 0
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--depth", type=int, default=600)
    ap.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (inference.json default: 2)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fias_mem_"))
    try:
        (tmp / "in").mkdir()
        t0 = time.perf_counter()
        make_ct(tmp / "in" / "ct.nii.gz", args.size, args.depth)
        make_model(tmp / "bundle" / "models" / "model.pt")
        print(f"synthetic CT {args.size}x{args.size}x{args.depth} int16 written in {time.perf_counter() - t0:.0f} s "
              f"({(tmp / 'in' / 'ct.nii.gz').stat().st_size / 2**20:.0f} MiB .nii.gz)", flush=True)

        cmd = [sys.executable, "-m", "monai.bundle", "run",
               "--config_file", str(REPO / "bundle/configs/inference.json"),
               "--dataset_dir", str(tmp / "in"), "--output_dir", str(tmp / "out"), "--bundle_root", str(tmp / "bundle"),
               "--network_def#embed_dims", "[24,48,96,192]", "--network_def#depths", "[1,1,1,1]",
               "--num_workers", str(args.num_workers)]
        peak = [0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], _tree_rss_kib(proc.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, _ = proc.communicate()
        sampler.join()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(out[-5000:])
            print(f"inference failed with status {proc.returncode}")
            return 1
        import nibabel as nib

        seg = nib.load(str(tmp / "out" / "ct_seg.nii.gz"))
        assert seg.shape == (args.size, args.size, args.depth), seg.shape
        result = {
            "volume": [args.size, args.size, args.depth],
            "num_workers": args.num_workers,
            "wall_s": round(wall, 1),
            "maxrss_children_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "peak_tree_rss_mib": round(peak[0] / 1024),
            "float32_volume_mib": round(args.size * args.size * args.depth * 4 / 2**20),
        }
        print(json.dumps(result))
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
