# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Small shared helpers."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "bundle_cli_args", "destroy_process_group", "source_commit", "state_dict_mismatch"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` in one rename.

    A reader, or a crash mid-write, never sees a half-written file; on failure the temporary file is
    removed and ``path`` keeps its old content. ``suffix`` keeps the extension for writers that infer
    the format from the name (e.g. ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # durable before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def bundle_cli_args(overrides: dict) -> list[str]:
    """``--key value`` arguments for ``python -m monai.bundle run`` from a dict of config overrides.

    MONAI's bundle CLI silently drops overrides whose value is None (the config's own value stays),
    so a None here raises instead of being passed: a ``"max_minutes": None`` once left a 7.5-minute
    time budget in force. Switch the time budget off with ``0``.
    """
    dropped = [k for k, v in overrides.items() if v is None]
    if dropped:
        raise ValueError(f"override(s) {dropped} are None, which `python -m monai.bundle run` ignores (the "
                         f"config's value would stay); give a value instead (max_minutes: 0 switches the time "
                         f"budget off)")
    return [a for k, v in overrides.items() for a in (f"--{k}", str(v))]


def source_commit(root: str | os.PathLike | None = None) -> str | None:
    """The git commit of the source tree at ``root`` (default: the one this package runs from), for results files.

    ``<sha>+dirty`` when tracked files differ from that commit, so a number measured on uncommitted code says so.
    Where ``root`` is no git checkout (a copy of the code on another machine, an installed package) the
    ``GIT_COMMIT`` environment variable names the commit the copy was made from; ``None`` without either.
    Only ``root`` itself counts as a checkout, not a repository around it (a virtual environment inside a clone
    would otherwise report the clone's commit for a package installed from elsewhere).
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == root.resolve():
            return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, no commit yet
        pass
    return os.environ.get("GIT_COMMIT")


def state_dict_mismatch(state: Mapping[str, Any], module: Any, shown: int = 3) -> str:
    """Why ``state`` does not load strictly into ``module``, in one line; ``""`` if nothing keeps it from loading.

    PyTorch's own message lists every key over many lines, and its first line says only that loading failed.
    Here the keys on one side only are counted by their first name component (``full_res_head.* (23)``: a
    model trained with the full-resolution head, served without it), and the first ``shown`` tensors whose
    shapes differ are given with both shapes (a stem of 3 input channels against 1: other ``context_slices``).
    """
    own = module.state_dict()

    def by_module(keys: list[str]) -> str:
        return ", ".join(f"{name}.* ({n})" for name, n in Counter(k.split(".")[0] for k in keys).items())

    def shape(value: Any) -> tuple:
        return tuple(getattr(value, "shape", ()))

    extra = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    reshaped = [k for k in own if k in state and shape(state[k]) != shape(own[k])]
    parts = []
    if extra:
        parts.append(f"{len(extra)} tensors the network does not have: {by_module(extra)}")
    if missing:
        parts.append(f"{len(missing)} tensors of the network missing: {by_module(missing)}")
    if reshaped:
        shapes = "; ".join(f"{k} {shape(state[k])} in the weights, {shape(own[k])} in the network"
                           for k in reshaped[:shown])
        parts.append(f"{len(reshaped)} of another shape: {shapes}" + ("; ..." if len(reshaped) > shown else ""))
    return "; ".join(parts)


def destroy_process_group(linger_s: float = 0.2) -> None:
    """Destroy the default process group, if there is one; with gloo, then wait ``linger_s`` seconds.

    Why the wait: once a DDP wrapper has been built, gloo's worker threads outlive
    ``torch.distributed.destroy_process_group`` (torch 2.14 keeps the backend alive in C++; they stay
    after the wrapper is deleted and collected, too), so they cannot be joined before exit. A worker
    that releases a finished collective after the interpreter has begun to shut down takes the GIL, and
    the process aborts with "terminate called without an active exception" (pytorch/pytorch#190489)
    after training and saving went well. Two gloo ranks on a busy 2-core machine aborted so in 11 of
    60 runs; with a 0.2 s wait after the destroy, in 0 of 60. NCCL needs no wait; ``linger_s=0`` skips
    it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gloo = dist.get_backend() == "gloo"
    dist.destroy_process_group()
    if gloo and linger_s > 0:
        time.sleep(linger_s)
