# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Fault-tolerant folder inference for the bundle: one bad file does not stop the others.

MONAI's ``SupervisedEvaluator`` stops at the first exception. :func:`run_inference` (the ``run`` of
``bundle/configs/inference.json``) keeps the configured evaluator, network, inferer and post transforms,
but feeds the evaluator one volume at a time, so an unreadable file, a bad volume (see
:class:`fias_monai.transforms.CheckVolumed`), a network error or a refused output costs only that file.
At the end every failure is listed with its reason and :class:`InferenceError` is raised: the bundle
command then prints the list (no traceback) and exits with status 1.

Checks made before any inference (each a clear error naming the folder or file):

* the input folder exists and holds NIfTI files (``*.nii``, ``*.nii.gz``); other files in it are listed
  as failures ("not a NIfTI file") and the NIfTI ones are still processed;
* the output folder can be created and written;
* the model weights load (weights of another network: the modules and shapes that differ are named);
* no output would overwrite an existing file (unless ``overwrite``) or an input.

Volumes are read by the configured ``DataLoader`` workers, so reading the next volume overlaps with
inference on the current one; at most one worker per volume after the first is started (see
:func:`loader_workers`), and a single volume is read in this process: a worker could overlap with nothing,
and starting it, passing the volume back through shared memory and joining it cost about 0.4 s.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset as _TorchDataset

from .transforms import OutputExistsError, OutputFolderError, SafeSaveImaged, describe_error

__all__ = ["NIFTI_SUFFIXES", "InferenceError", "list_inputs", "loader_workers", "run_inference", "is_nifti"]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


class InferenceError(SystemExit):
    """Inference could not run, or some files failed.

    A subclass of ``SystemExit`` on purpose: raised from the bundle's ``run`` expression, it passes
    through MONAI's expression wrapper, and Python prints just the message (the list of failures) and
    exits with status 1 instead of showing a traceback. Catch it with ``except InferenceError``.

    Attributes:
        failures: ``(file, reason)`` for every file that failed.
        outputs: the files written.
    """

    def __init__(self, message: str, failures: Sequence[tuple[str, str]] = (), outputs: Sequence[str] = ()):
        super().__init__(message)
        self.message = message
        self.failures = list(failures)
        self.outputs = list(outputs)

    def __str__(self) -> str:
        return self.message


def _scan(dataset_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(NIfTI files, other entries) of a folder, hidden entries skipped; a single file is accepted too."""
    p = Path(dataset_dir)
    if p.is_file():
        return ([p], []) if is_nifti(p) else ([], [p])
    if not p.exists():
        raise InferenceError(f"input folder {p} does not exist (set --dataset_dir to the folder of NIfTI scans)")
    if not p.is_dir():
        raise InferenceError(f"input {p} is neither a folder nor a file")
    try:
        entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
    except OSError as e:
        raise InferenceError(f"cannot list input folder {p}: {e.strerror or e}") from e
    nifti = [e for e in entries if is_nifti(e) and not e.is_dir()]
    return nifti, [e for e in entries if e not in nifti]


def list_inputs(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The datalist of a folder: ``[{"image": path}]`` for each NIfTI file, sorted.

    Lenient on purpose (a missing folder gives ``[]``): :func:`run_inference` reports a missing or empty
    folder with a clear message before doing anything else.
    """
    try:
        nifti, _ = _scan(dataset_dir)
    except InferenceError:
        return []
    return [{"image": str(f)} for f in nifti]


def _flatten(transform: Any) -> list[Any]:
    if transform is None:
        return []
    if hasattr(transform, "flatten"):
        transform = transform.flatten()
    ts = getattr(transform, "transforms", None)
    if ts is None:
        return [transform]
    return [t for x in ts for t in _flatten(x)] if any(hasattr(x, "transforms") for x in ts) else list(ts)


class _Guarded(_TorchDataset):
    """Items of ``dataset`` at ``indices``; a failing item becomes ``{"__error__": reason}``."""

    def __init__(self, dataset: Any, indices: Sequence[int], names: Sequence[str]) -> None:
        self.dataset, self.indices, self.names = dataset, list(indices), list(names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[self.indices[i]]
        except Exception as e:  # reported by the runner with the file's name
            return {"__error__": describe_error(e, self.names[i])}


def _item_name(item: Any) -> str:
    if isinstance(item, dict):
        return str(item.get("image", item))
    return str(item)


def _load_weights_once(evaluator: Any) -> None:
    """Run the evaluator's CheckpointLoader(s) now, then detach them so they do not reload per file.

    A missing or mismatched checkpoint is fatal (an :class:`InferenceError` naming the file and what is
    wrong, :func:`~fias_monai.handlers.weights_load_error`), never a per-file failure: segmenting
    with random weights must not happen.
    """
    from ignite.engine import Events
    from monai.handlers import CheckpointLoader

    from .handlers import WeightsLoadError, weights_load_error

    handlers = getattr(evaluator, "_event_handlers", {}).get(Events.STARTED, [])
    for h, *_ in list(handlers):
        if isinstance(h, CheckpointLoader):
            try:
                h(evaluator)
            except Exception as e:  # WeightsLoader's error says why; a plain CheckpointLoader's gets the same line
                error = e if isinstance(e, WeightsLoadError) else weights_load_error(h.load_path, h.load_dict, e)
                raise InferenceError(str(error)) from error
            evaluator.remove_event_handler(h, Events.STARTED)
            logger.info("loaded weights %s", h.load_path)


def loader_workers(num_workers: int, num_volumes: int) -> int:
    """DataLoader workers worth starting for ``num_volumes`` volumes: ``num_volumes - 1`` at most.

    The first volume is waited for whoever reads it; a worker only helps by reading the *next* volumes
    while the current one is segmented. So one volume is read in-process (no worker start, no
    shared-memory hand-off, no join, and the preprocessing gets this process's threads instead of a
    worker's single one); the transforms and the results are the same either way.
    """
    return max(0, min(int(num_workers or 0), num_volumes - 1))


def run_inference(evaluator: Any, dataset_dir: str | os.PathLike | None = None,
                  postprocessing: Any = None) -> list[str]:
    """Run ``evaluator`` over its dataset one volume at a time, continuing past failures.

    Args:
        evaluator: the configured ``SupervisedEvaluator``; its ``data_loader.dataset`` must be a map-style
            dataset of ``{"image": path}`` items (``batch_size`` 1, as volumes differ in shape).
        dataset_dir: the input folder: checked to exist and hold NIfTI files; its other files are
            reported as failures.
        postprocessing: the evaluator's post transforms (a ``Compose`` or a list), where the
            :class:`SafeSaveImaged` transforms are found: their output folder is checked first, inputs are
            protected from them, and existing outputs are refused before any inference.

    Returns:
        The written files (when every file succeeded).

    Raises:
        InferenceError: missing/empty input folder, unwritable output folder, weights that do not load
            (before any inference); or, at the end, the list of files that failed (after the others were
            written).
    """
    loader = evaluator.data_loader
    dataset = loader.dataset
    items = list(getattr(dataset, "data", None) or [])
    names = [_item_name(it) for it in items]
    failures: list[tuple[str, str]] = []

    if dataset_dir is not None:
        nifti, others = _scan(dataset_dir)
        for o in others:
            if o.is_dir():
                failures.append((str(o), "is a folder, not a NIfTI file (a DICOM series? convert it to NIfTI first)"))
            else:
                failures.append((str(o), "not a NIfTI file (.nii or .nii.gz expected); not processed"))
        if not items:
            found = f"; it holds {len(others)} other file(s), e.g. {others[0].name}" if others else ""
            raise InferenceError(
                f"input folder {dataset_dir} contains no NIfTI files (*.nii, *.nii.gz){found}", failures)
    elif not items:
        raise InferenceError("nothing to segment: the datalist is empty")

    if isinstance(postprocessing, (list, tuple)):
        flat = [t for x in postprocessing for t in _flatten(x)]
    else:
        flat = _flatten(postprocessing)
    savers = [t for t in flat if isinstance(t, SafeSaveImaged)]
    for s in savers:
        try:
            s.check_output_dir()
        except OutputFolderError as e:
            raise InferenceError(e.strerror or str(e), failures) from e
        s.protect([n for n in names if n])
    _load_weights_once(evaluator)

    # Refuse outputs that exist (or are inputs) before spending any compute on them.
    todo: list[int] = []
    for i, name in enumerate(names):
        try:
            for s in savers:
                s.check_target(s.output_path(name), name)
        except OutputExistsError as e:
            failures.append((name, e.strerror or str(e)))
            continue
        todo.append(i)

    from monai.data import DataLoader

    guarded = DataLoader(
        _Guarded(dataset, todo, [names[i] for i in todo]),
        batch_size=1,
        shuffle=False,
        num_workers=loader_workers(getattr(loader, "num_workers", 0), len(todo)),
        collate_fn=getattr(loader, "collate_fn", None),
    )
    outputs: list[str] = []
    n = len(todo)
    try:
        for k, (i, batch) in enumerate(zip(todo, guarded), 1):
            name = names[i]
            if isinstance(batch, dict) and "__error__" in batch:
                reason = batch["__error__"]
                reason = reason[0] if isinstance(reason, (list, tuple)) else reason
                failures.append((name, reason))
                logger.error("[%d/%d] FAILED %s: %s", k, n, name, reason)
                continue
            t0 = time.perf_counter()
            evaluator.data_loader = [batch]
            evaluator.state.epoch_length = 1
            evaluator._internal_run_generator = None  # ignite keeps a dead generator after an exception
            evaluator.should_terminate = False
            try:
                evaluator.run()
            except Exception as e:
                reason = describe_error(e, name)
                failures.append((name, reason))
                logger.error("[%d/%d] FAILED %s: %s", k, n, name, reason)
                continue
            finally:
                batch = None
            written = [str(s.output_path(name)) for s in savers]
            outputs.extend(written)
            logger.info("[%d/%d] %s -> %s (%.1f s)", k, n, name, ", ".join(written) or "done",
                        time.perf_counter() - t0)
    finally:
        evaluator.data_loader = loader
        evaluator.state.epoch_length = len(loader) if hasattr(loader, "__len__") else None

    total = len(names) + sum(1 for f, _ in failures if f not in names)
    if failures:
        lines = [f"{len(failures)} of {total} input file(s) failed ({len(outputs)} segmentation(s) written):"]
        lines += [f"  - {f}: {r}" for f, r in failures]
        msg = "\n".join(lines)
        logger.error(msg)
        raise InferenceError(msg, failures, outputs)
    logger.info("%d segmentation(s) written%s", len(outputs),
                f" to {savers[0].output_dir}" if savers else "")
    return outputs
