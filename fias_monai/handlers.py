# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Ignite handlers the bundle's training needs beyond MONAI's: crash-safe resume, best-model keeping
across restarts, and a progress bar with the loss and an ETA."""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
import os
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import TerminateOnNan
from monai.handlers import CheckpointLoader, ValidationHandler

from .utils import atomic_path

__all__ = ["atomic_torch_save", "LastCheckpointHandler", "BestModelSaver", "ProgressBarHandler", "TimeBudgetHandler",
           "TrainingClock", "MetricHistoryHandler", "OverlayHandler", "ThroughputHandler", "PeriodicValidationHandler",
           "TerminateOnNanHandler", "ReleaseLoaderWorkersHandler", "WeightAverageHandler", "WeightsLoader",
           "WeightsLoadError", "weights_load_error"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a reader (or a
    crash) never sees a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _is_main_process() -> bool:
    """False only on the ranks > 0 of an initialized ``torch.distributed`` process group (DDP)."""
    return idist.get_rank() == 0


def _positive_epochs(value, name: str) -> int:
    """``value`` as an int, or a ValueError naming the config key when it is below 1."""
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive number of epochs, got {value}")
    return int(value)


def _from_rank0(value: float) -> float:
    """Under DDP, rank 0's ``value`` on every rank (a broadcast, so every rank must call it); else ``value``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


class BestModelSaver:
    """Write the network's state dict to ``filename`` whenever the evaluator's key metric improves.

    Unlike a fresh ``CheckpointSaver``, the best score survives a restart: :class:`LastCheckpointHandler`
    stores and restores ``best_metric``, so a resumed run never replaces a better model with a worse one.

    Under DDP attach it on every rank: all ranks track the same (all-gathered) metric and best
    score, and only rank 0 writes the file.

    Args:
        network: the model to save (a DDP wrapper is unwrapped).
        filename: target path (``models/model.pt``), written atomically.
        metric_name: key in ``engine.state.metrics``; the evaluator's key metric by default.
    """

    def __init__(self, network: torch.nn.Module, filename: str | os.PathLike, metric_name: str | None = None) -> None:
        self.network = network
        self.filename = Path(filename)
        self.metric_name = metric_name
        self.best_metric = -float("inf")
        self.best_epoch = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or engine.state.key_metric_name
        value = float(engine.state.metrics[name])
        if value > self.best_metric:
            main = _is_main_process()  # DDP: every rank tracks the best, rank 0 writes
            if main:
                net = getattr(self.network, "module", self.network)  # unwrap DDP
                atomic_torch_save(net.state_dict(), self.filename)
            self.best_metric = value
            self.best_epoch = getattr(engine.state, "trainer_epoch", None) or engine.state.epoch
            if main:
                logger.info("new best %s %.4f: saved %s", name, value, self.filename)

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric = state["best_metric"]
        self.best_epoch = state["best_epoch"]


class LastCheckpointHandler:
    """Save everything needed to resume every ``save_interval`` epochs and when training ends; resume
    from it when asked.

    The checkpoint (atomic, ``<save_dir>/<filename>``) holds each ``save_dict`` entry's state dict
    plus the trainer's epoch and iteration. With ``resume=True`` and the file present, training
    continues at the next epoch with model, optimizer, scheduler and best metric restored, so a
    killed run loses at most the ``save_interval`` epochs since the last save. Under DDP attach it on
    every rank: every rank resumes from the file, only rank 0 writes it.

    Args:
        save_dir: folder of the checkpoint.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler,
            a :class:`BestModelSaver`...).
        resume: load the checkpoint at start when it exists.
        optional_keys: ``save_dict`` entries a checkpoint may lack (written by an older bundle): left as
            they are, with a warning, where any other missing entry is an error.
        filename: checkpoint file name.
        save_interval: save after every this many epochs (and always after the last one). FIAS-tiny's
            model and Adam state are 0.45 GB, about 1.3 s to write after each 4.8-s training
            epoch on ACDC (H100).
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: dict, resume: bool = False,
                 filename: str = "last.pt", save_interval: int = 1, optional_keys: Sequence[str] = ()) -> None:
        from .transforms import as_bool  # the bundle CLI passes "false" as a (truthy) string

        self.path = Path(save_dir) / filename
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.resume = as_bool(resume, "resume")
        self.save_interval = _positive_epochs(save_interval, "save_interval")
        self.optional_keys = set(optional_keys)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self._save_if_unsaved)  # also after a time-budget stop

    def _save_if_unsaved(self, engine: Engine) -> None:
        if engine.state.epoch % self.save_interval:  # a multiple was saved at EPOCH_COMPLETED already
            self.save(engine)

    def save(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        state = {k: getattr(v, "module", v).state_dict() for k, v in self.save_dict.items()}
        state["trainer"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        atomic_torch_save(state, self.path)

    def load(self, engine: Engine) -> None:
        if not self.resume:
            return
        if not self.path.is_file():
            logger.warning("resume requested but %s does not exist: starting from scratch", self.path)
            return
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        for key, obj in self.save_dict.items():
            if key not in state:
                if key not in self.optional_keys:
                    raise KeyError(f"checkpoint {self.path} has no '{key}' entry to resume from")
                logger.warning("checkpoint %s has no '%s' entry (an older bundle's): resuming without it",
                               self.path, key)
                continue
            getattr(obj, "module", obj).load_state_dict(state[key])
        engine.state.epoch = state["trainer"]["epoch"]
        engine.state.iteration = state["trainer"]["iteration"]
        logger.info("resumed from %s at epoch %d", self.path, engine.state.epoch)


class WeightsLoadError(RuntimeError):
    """Model weights that cannot be loaded: the file and the reason, in one line."""


def weights_load_error(path: str | os.PathLike, load_dict: dict, exc: BaseException) -> WeightsLoadError:
    """The :class:`WeightsLoadError` for ``exc``, raised while loading ``path`` into ``load_dict`` the way MONAI's
    ``CheckpointLoader`` loads it: ``"cannot load the model weights PATH: why"``.

    Why: what the file itself shows (:func:`_weights_file_problem`), which says all there is, so ``exc`` is not
    chained (PyTorch's message for a mismatch lists every key and names no file); else ``exc``'s first line,
    and ``exc`` is chained as the cause.
    """
    from .transforms import describe_error

    problem = _weights_file_problem(path, load_dict)
    error = WeightsLoadError(f"cannot load the model weights {path}: {problem or describe_error(exc)}")
    error.__cause__, error.__suppress_context__ = (None if problem else exc), True
    return error


def _weights_file_problem(path: str | os.PathLike, load_dict: dict) -> str:
    """Why the file at ``path`` cannot load into ``load_dict``, read from the file, in that order: it is missing;
    it is no PyTorch checkpoint (truncated, another format); its tensors do not fit the configured networks
    (``state_dict_mismatch``: the modules on one side only and the shapes that differ, e.g. weights of
    ``acdc_12min.json``'s full-resolution head loaded without that overlay). ``""`` if it shows none of these."""
    from .utils import state_dict_mismatch

    if not Path(path).is_file():
        return "file missing (train first, or set --bundle_root)"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a read of its own: the failure may have come from load_state_dict instead
        return f"not a readable PyTorch checkpoint, truncated or another format ({_unreadable_because(path, e)})"
    if not isinstance(checkpoint, dict):
        return ""
    if len(load_dict) == 1 and next(iter(load_dict)) not in checkpoint:  # a bare state dict, as MONAI reads it
        checkpoint = {next(iter(load_dict)): checkpoint}
    mismatch = "; ".join(filter(None, (
        state_dict_mismatch(checkpoint[key], obj) for key, obj in load_dict.items()
        if isinstance(obj, torch.nn.Module) and isinstance(checkpoint.get(key), dict))))
    if not mismatch:
        return ""
    return (f"they do not fit the configured network ({mismatch}); run with the overlays and network settings the "
            f"model was trained with (e.g. configs/acdc_12min.json after acdc.json, context_slices, the variant)")


def _unreadable_because(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``. PyTorch's weights-only loader answers a file that is no
    checkpoint at all (a text file, an HTML page saved by a failed download) with advice to load it unsafely, so
    such a file is named by its first bytes; a damaged checkpoint keeps PyTorch's first line (``exc``)."""
    from .transforms import describe_error

    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive, its legacy format a pickle
        return f"it starts with {head!r}: neither a zip archive nor a pickle"
    return describe_error(exc)


class WeightsLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` whose failure names the file and says what is wrong, in one line.

    Loading is MONAI's, unchanged (same arguments); only a failure differs: :func:`weights_load_error`'s
    :class:`WeightsLoadError` instead of PyTorch's key-by-key list, so a model evaluated or served with other
    overlays than it was trained with says which modules or shapes differ and what to do. A subclass, so code
    that finds the evaluator's loaders by ``isinstance(h, CheckpointLoader)`` (inference's load-once) still
    finds it.
    """

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
        except Exception as e:
            raise weights_load_error(self.load_path, self.load_dict, e)  # noqa: B904 - its cause is set there


class WeightAverageHandler:
    """An exponential moving average (EMA) of the network's weights, updated after every training
    iteration, for validation and for the saved best model.

    The average covers parameters and floating-point buffers (integer buffers are copied). After iteration
    ``n`` (1-based) it moves by the weight ``max(1 - decay, n ** -warmup_power)`` towards the network's
    weights: the first iteration copies them (no pull towards the random initialisation, which a fixed
    decay keeps for a whole horizon), and the horizon then grows with ``n`` until it reaches
    ``1 / (1 - decay)`` iterations (timm's EMA warm-up, ``warmup_gamma`` 1). ``warmup_power`` 1 averages all
    weights so far (the plain mean up to iteration ``1 / (1 - decay)``); on ACDC that average trailed far
    behind the training early on (validation mean Dice 12.6 after 5 epochs, against 74.2 without it;
    session 14), so the default is 3/4, timm's value for runs of fewer than about a million steps
    (decay 0.999 reached after 10,000 iterations; the horizon is 32 iterations at 100, 178 at 1,000).

    The update is one ``torch._foreach_lerp_`` over tensor lists gathered once, at construction, where timm's
    ``ModelEmaV3`` (the same average) rebuilds both state dicts at every update. Queued after FIAS-tiny's
    captured ACDC step on an H100 the two are level, about 2 % below no average (median step rates 0.981
    and 0.984 of it; ``scripts/benchmark_weight_average.py``, docs/benchmark.md). The cached lists assume
    the network's tensors are updated in place (optimizer steps, ``load_state_dict``, the CUDA-graph step
    all do): build the handler after the network is on its device and in its memory format.

    With ``decay`` 0 the handler does nothing and :attr:`averaged` is the network itself.

    Args:
        network: the trained network (a DDP wrapper is unwrapped: every rank holds the same weights,
            so every rank's average is the same).
        decay: the per-iteration decay in [0, 1), e.g. 0.999 (a horizon of about 1,000 iterations);
            0 switches the average off.
        warmup_power: how fast the horizon grows at the start (above); 1 gives the plain mean.
        averaged: the module that holds the average, a copy of ``network`` with the same tensor layout (the
            bundle makes it a config item of its own, ``averaged_network``, so that validation, the saved
            model and ``last.pt`` name it without referring to this handler's place in ``train#handlers``,
            where MONAI Label inserts its checkpoint loader); None: a deep copy of ``network``.

    Attach it before the handlers that wait for the step's result (the NaN check reads the loss), so that
    queuing the update overlaps the step on the GPU instead of following it.
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.0, warmup_power: float = 0.75,
                 averaged: torch.nn.Module | None = None) -> None:
        decay = float(decay or 0.0)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the weight-average decay must be in [0, 1), 0 for none (got {decay})")
        if not 0.0 < warmup_power <= 1.0:
            raise ValueError(f"warmup_power must be in (0, 1] (got {warmup_power})")
        self.decay = decay
        self.warmup_power = float(warmup_power)
        self.network = getattr(network, "module", network)
        self._average: torch.nn.Module | None = None
        if decay:
            if averaged is network or averaged is self.network:
                raise ValueError("the averaged module must be a copy of the network, not the network itself")
            self._average = (copy.deepcopy(self.network) if averaged is None else averaged).eval().requires_grad_(False)
            mine, theirs = self._average.state_dict(), self.network.state_dict()
            if list(mine) != list(theirs) or any(mine[k].shape != v.shape for k, v in theirs.items()):
                raise ValueError("the averaged module's state differs from the network's: pass a copy of the network")
            self._float: tuple[list, list] = ([], [])  # (average's tensors, network's tensors): lerped
            self._other: tuple[list, list] = ([], [])  # integer buffers: copied
            for a, n in zip(mine.values(), theirs.values()):
                group = self._float if a.is_floating_point() else self._other
                group[0].append(a)
                group[1].append(n)

    @property
    def averaged(self) -> torch.nn.Module:
        """The averaged network (in eval mode), or the trained network itself when the average is off."""
        return self._average if self._average is not None else self.network

    def attach(self, engine: Engine) -> None:
        if self._average is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        n = engine.state.iteration  # 1-based: weight 1 at the first (the average becomes those weights)
        weight = max(n ** -self.warmup_power, 1.0 - self.decay)
        torch._foreach_lerp_(self._float[0], self._float[1], weight)
        if self._other[0]:
            torch._foreach_copy_(self._other[0], self._other[1])


class ProgressBarHandler:
    """ignite's tqdm progress bar showing the running loss; tqdm adds the rate and the ETA."""

    def __init__(self, persist: bool = False) -> None:
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=self.persist).attach(engine, output_transform=lambda out: {"loss": _loss(out)})


def _loss(output) -> float:
    if isinstance(output, list):
        output = output[0]
    loss = output["loss"] if isinstance(output, dict) else output
    return loss.item() if isinstance(loss, torch.Tensor) else float(loss)


class TrainingClock:
    """The wall-clock seconds a training run has trained, carried across a resume.

    :class:`TimeBudgetHandler` and :class:`MetricHistoryHandler` start it when the trainer starts; the first
    reads it for the lr and the stop, the second for the validation curve's times. As an entry of
    :class:`LastCheckpointHandler`'s ``save_dict`` it is kept in ``last.pt``, so that a resumed run counts on
    from the time trained before the checkpoint: a time budget goes on where its cosine stood instead of
    starting afresh, and the curve's times go on instead of starting again at 0. The time between the last
    checkpoint and a kill is trained again and counted once; the restart itself (loading, caching,
    compiling) is not counted. The bundle makes it a config item of its own, ``training_clock``, so that
    ``last.pt`` names it without referring to a handler's place in ``train#handlers``, where MONAI Label
    inserts its checkpoint loader.
    """

    def __init__(self) -> None:
        self.before_s = 0.0  # trained before a resume
        self.started_at = None

    def start(self) -> None:
        """Start counting; the first call counts (several handlers of one run share the clock)."""
        if self.started_at is None:
            self.started_at = time.monotonic()

    def seconds(self) -> float:
        """Seconds trained, including those before a resume."""
        return self.before_s + (time.monotonic() - self.started_at if self.started_at is not None else 0.0)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state: dict) -> None:
        self.before_s = float(state["seconds"])
        logger.info("training clock: %.1f min trained before the resume", self.before_s / 60)


class TimeBudgetHandler:
    """Train for a wall-clock budget: cosine learning-rate decay over the budget's elapsed fraction,
    and a stop at the end of the last epoch that fits.

    Used to give networks of different speeds the same training time (the ACDC comparison) and to
    measure time to accuracy. Disabled when ``minutes`` is None or 0.

    Args:
        minutes: the budget; None or 0 disables the handler.
        optimizer: its param groups' ``lr`` is set every iteration (from each group's initial lr).
        min_lr_ratio: the lr at the end of the budget, relative to the initial lr (1.0: constant).
        warmup_iterations: linear warm-up over the first iterations (the lr of iteration ``i`` is
            multiplied by ``i / warmup_iterations``), as the epoch schedule's warm-up does.
        clock: the :class:`TrainingClock` that counts the time trained (give the one the resume checkpoint
            keeps); None: a clock of its own, which a resume does not restore.

    Under DDP (attach it on every rank) rank 0's clock decides the lr and the stop for all ranks.
    """

    def __init__(self, minutes: float | None, optimizer: torch.optim.Optimizer, min_lr_ratio: float = 0.01,
                 warmup_iterations: int = 0, clock: TrainingClock | None = None) -> None:
        # None or 0 switch the budget off (0 because MONAI's bundle CLI drops None overrides)
        self.budget_s = 60.0 * float(minutes) if minutes else None
        self.optimizer = optimizer
        self.min_lr_ratio = min_lr_ratio
        self.warmup_iterations = int(warmup_iterations)
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self.clock = TrainingClock() if clock is None else clock
        self.epoch_start = None

    def attach(self, engine: Engine) -> None:
        if self.budget_s is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_lr)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._maybe_stop)

    def elapsed(self) -> float:
        return self.clock.seconds()

    def _started(self, engine: Engine) -> None:
        self.clock.start()

    def _epoch_started(self, engine: Engine) -> None:
        self.epoch_start = time.monotonic()

    def _set_lr(self, engine: Engine) -> None:
        frac = _from_rank0(min(1.0, self.elapsed() / self.budget_s))  # DDP: one lr on every rank
        scale = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        if self.warmup_iterations and engine.state.iteration <= self.warmup_iterations:  # 1-based: 1st step 1/warmup
            scale *= engine.state.iteration / self.warmup_iterations
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(group["lr"], torch.Tensor):  # a CUDA-graphed step reads this tensor: update in place
                group["lr"].fill_(base * scale)
            else:
                group["lr"] = base * scale

    def _maybe_stop(self, engine: Engine) -> None:
        epoch_s = time.monotonic() - self.epoch_start
        if _from_rank0(self.elapsed() + epoch_s > self.budget_s):  # DDP: every rank stops together
            logger.info("time budget of %.1f min reached after epoch %d (%.1f min elapsed)",
                        self.budget_s / 60, engine.state.epoch, self.elapsed() / 60)
            engine.terminate()


class PeriodicValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` (every ``interval`` epochs) that also validates the last epoch.

    With ``interval > 1`` the plain handler skips the final epochs, whose weights (at the end of the lr
    decay) are usually the best: a run of 73 epochs with ``interval=5`` would keep epoch 70's model.
    The last epoch is the trainer's ``max_epochs`` or the one after which a handler attached before
    this one (:class:`TimeBudgetHandler`) called ``engine.terminate()``.

    Args:
        interval: validate after every this many epochs.
        validator: the evaluator to run.
    """

    def __init__(self, interval: int, validator=None) -> None:
        super().__init__(interval=_positive_epochs(interval, "val_interval"), validator=validator, epoch_level=True)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._maybe_validate)

    def _maybe_validate(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if epoch % self.interval == 0 or engine.should_terminate or epoch >= engine.state.max_epochs:
            self(engine)


class TerminateOnNanHandler(TerminateOnNan):
    """ignite's ``TerminateOnNan`` with the ``attach`` that MONAI's engines call on their handlers: stop
    training after the first iteration whose loss is NaN or infinite (a diverged run), with a warning.

    Args:
        output_transform: picks the loss from the engine's output (the bundle: ``from_engine(['loss'], first=True)``).
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)


class ReleaseLoaderWorkersHandler:
    """Stop the training DataLoader's persistent workers as soon as training completes.

    With ``persistent_workers`` and ``pin_memory`` (the bundle's loader on a GPU) PyTorch registers one
    ``atexit`` join per worker, with a 5-s timeout, and nothing tells the idle workers to quit before
    the interpreter exits: every GPU training process waited 5 s per worker at exit (10 workers: 50 s
    between the end of ``threading`` shutdown and the last ``atexit`` handler, measured on an H100 host).
    Shutting the iterator down here asks the workers to exit and joins them, so those joins return at once.

    A persistent-worker DataLoader keeps its live iterator (``DataLoader._iterator``, private: there is no
    public way to stop the workers but deleting the loader) for the next epoch; it is dropped here, and
    the loader makes a new one, with new workers, if it is iterated again.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loader = engine.state.dataloader
        iterator = getattr(loader, "_iterator", None)
        if iterator is None:
            return
        loader._iterator = None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class ThroughputHandler:
    """Training images per second of each epoch, all ranks together, into
    ``engine.state.metrics["train_images_per_s"]`` (so :class:`MetricHistoryHandler` records it).

    Counted from the epoch's first to its last completed iteration, so neither the loader start of the
    epoch nor the validation after it is included; under DDP the per-rank count is multiplied by the
    world size (DistributedSampler gives every rank the same number of batches).
    """

    def __init__(self) -> None:
        self.images = 0
        self.first = None
        self.last = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)

    def _reset(self, engine: Engine) -> None:
        self.images, self.first, self.last = 0, None, None

    def _count(self, engine: Engine) -> None:
        now = time.monotonic()
        if self.first is None:  # the first batch opens the clock: its own images are not counted
            self.first = now
            return
        self.last = now
        self.images += _batch_len(engine.state.batch)

    def _record(self, engine: Engine) -> None:
        if self.last is not None and self.last > self.first:
            rate = self.images * idist.get_world_size() / (self.last - self.first)
            engine.state.metrics["train_images_per_s"] = rate
            if _is_main_process():
                logger.info("epoch %d: %.1f training images/s", engine.state.epoch, rate)


def _batch_len(batch) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch)  # decollated: one item per image


class MetricHistoryHandler:
    """Log the validation curve against wall-clock time: one CSV row per validated epoch
    (epoch, seconds since training started, the validator's metrics), rewritten atomically.

    Attach to the trainer after its ``ValidationHandler``.

    Args:
        validator: the evaluator whose metrics each row records.
        filename: the CSV file.
        clock: the :class:`TrainingClock` whose seconds a row records (give the one the resume checkpoint
            keeps, so that a resumed run's times go on from the time trained before); None: a clock of its own.
    """

    def __init__(self, validator: Engine, filename: str | os.PathLike, clock: TrainingClock | None = None) -> None:
        self.validator = validator
        self.filename = Path(filename)
        self.rows: list[dict] = []
        self.clock = TrainingClock() if clock is None else clock
        self._validated = False
        # each validation run is a fresh 1-epoch evaluator run: count its completions, not its state
        validator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(self, "_validated", True))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.clock.start())
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self._validated:
            return  # no validation ran this epoch
        self._validated = False
        if not self.rows and self.filename.is_file():
            # a resumed run keeps the curve of the epochs before the restart
            with open(self.filename) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < engine.state.epoch]
        state = self.validator.state
        row = {"epoch": engine.state.epoch, "time_s": round(self.clock.seconds(), 2)}
        row.update({k: float(v) for k, v in state.metrics.items() if isinstance(v, (int, float))})
        if "train_images_per_s" in engine.state.metrics:  # from ThroughputHandler, attached before this one
            row["train_images_per_s"] = round(float(engine.state.metrics["train_images_per_s"]), 1)
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        text = ",".join(keys) + "\n" + "".join(",".join(str(r.get(k, "")) for k in keys) + "\n" for r in self.rows)
        with atomic_path(self.filename) as tmp:
            tmp.write_text(text)


class OverlayHandler:
    """Save image | ground truth | prediction overlay PNGs for the first ``max_cases`` evaluated volumes
    (drawn with scikit-image by :func:`fias_monai.visualize.save_overlays`).

    Expects the evaluator's decollated output to hold ``image``, ``label`` and ``pred`` on the same grid
    (evaluate.json inverts the resized image back with the prediction).
    """

    def __init__(self, output_dir: str | os.PathLike, max_cases: int = 4, num_slices: int = 3) -> None:
        self.output_dir = Path(output_dir)
        self.max_cases = max_cases
        self.num_slices = num_slices
        self.saved = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: setattr(self, "saved", 0))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from .metrics import case_name_from_meta
        from .visualize import save_overlays

        for i, item in enumerate(engine.state.output):
            if self.saved >= self.max_cases:
                return
            image, label, pred = item["image"], item["label"], item["pred"]
            name = case_name_from_meta(getattr(label, "meta", {}), f"case_{engine.state.iteration:04d}_{i}")
            save_overlays(_volume(image), _volume(label), _volume(pred), self.output_dir, name,
                          num_slices=self.num_slices)
            self.saved += 1


def _volume(x):
    x = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if x.ndim == 4 and x.shape[0] > 1:  # one-hot or scores
        x = x.argmax(0)
    return (x[0] if x.ndim == 4 else x).numpy()
