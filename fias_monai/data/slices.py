# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""2D training slices cut from 3D volumes, decoded once and cached in memory.

FIAS trains on slices and is evaluated on volumes. Decoding NIfTI, reorienting, normalising and
resizing every volume each epoch would starve the GPU, so this dataset does that work once (in a
thread pool) and keeps the 256x256 slices in memory; only the random augmentation runs per sample.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.data import DistributedSampler, DistributedWeightedRandomSampler
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

__all__ = ["SliceDataset", "SliceDatasetError", "slice_sampler"]

logger = logging.getLogger(__name__)


class SliceDatasetError(RuntimeError):
    """One or more volumes could not be turned into slices; ``failures`` lists (file, reason)."""

    def __init__(self, failures: Sequence[tuple[str, str]]):
        self.failures = list(failures)
        lines = "\n".join(f"  {f}: {r}" for f, r in self.failures)
        super().__init__(f"{len(self.failures)} training volume(s) could not be loaded:\n{lines}")


def _name(item: dict) -> str:
    return str(item.get("image", item)) if isinstance(item, dict) else str(item)


class SliceDataset(Dataset):
    """Every slice along ``axis`` of every volume in ``data``, cached after ``volume_transform``.

    Args:
        data: datalist entries, e.g. ``{"image": path, "label": path}`` (MONAI Label overrides this).
        volume_transform: deterministic dict transform giving channel-first volumes, image (C, H, W, D)
            and label (1, H, W, D): loading, orientation, intensity scaling, in-plane resizing.
        transform: random per-sample 2D transform (augmentation), applied on every access.
        num_classes: if given, labels outside [0, num_classes) are an error naming the file.
        axis: spatial axis of the slices (-1: the last, axial for MONAI-loaded NIfTI).
        num_workers: threads that decode volumes while caching.

    Raises:
        SliceDatasetError: after trying every volume, listing each file that failed and why.
    """

    def __init__(self, data: Sequence[dict], volume_transform: Callable, transform: Callable | None = None,
                 num_classes: int | None = None, axis: int = -1, num_workers: int = 4) -> None:
        self.data = list(data)
        if not self.data:
            raise ValueError("SliceDataset got no volumes: the training list is empty (check the datalist's "
                             "'training' section)")
        self.transform = transform
        self.num_classes = num_classes
        self.axis = axis
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.index: list[tuple[int, int]] = []  # (volume, slice)
        self.volume_names: list[str] = []
        failures = []
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            results = pool.map(lambda item: self._load(item, volume_transform), self.data)
            for item, result in zip(self.data, results):
                if isinstance(result, str):
                    failures.append((_name(item), result))
                    continue
                image, label = result
                v = len(self.images)
                self.images.append(image)
                self.labels.append(label)
                self.volume_names.append(_name(item))
                self.index.extend((v, z) for z in range(image.shape[-1]))
        if failures:
            raise SliceDatasetError(failures)
        logger.info("SliceDataset: %d slices from %d volumes cached", len(self.index), len(self.images))

    def _load(self, item: dict, volume_transform: Callable) -> tuple[torch.Tensor, torch.Tensor] | str:
        try:
            out = volume_transform(item)
        except Exception as e:  # report the file, keep going with the others
            cause = e
            while getattr(cause, "__cause__", None) is not None:  # MONAI wraps transform errors
                cause = cause.__cause__
            return f"{type(cause).__name__}: {cause}"
        image = torch.as_tensor(out["image"]).float()
        label = torch.as_tensor(out["label"])
        if image.ndim != 4 or label.ndim != 4:
            return f"expected channel-first 3D volumes, got image {tuple(image.shape)} and label {tuple(label.shape)}"
        if image.shape[1:] != label.shape[1:]:
            return f"image shape {tuple(image.shape[1:])} differs from label shape {tuple(label.shape[1:])}"
        if not torch.isfinite(image).all():
            return "image has NaN or Inf voxels"
        if self.num_classes is not None and (label.min() < 0 or label.max() >= self.num_classes):
            return (f"label values span {label.min().item():g}..{label.max().item():g}, outside the "
                    f"{self.num_classes} classes 0..{self.num_classes - 1}")
        axis = self.axis % 3 + 1
        # slices last, so a slice is a contiguous view; labels as uint8 to keep the cache small
        return image.movedim(axis, -1).contiguous(), label.movedim(axis, -1).to(torch.uint8).contiguous()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        v, z = self.index[i]
        sample = {"image": self.images[v][..., z].clone(), "label": self.labels[v][..., z].float()}
        return self.transform(sample) if self.transform is not None else sample

    @property
    def num_volumes(self) -> int:
        return len(self.images)

    def end_slice_mask(self) -> np.ndarray:
        """Whether each slice (in dataset order) ends a foreground class's extent along the stack.

        A slice is an end slice when some foreground class is on it and not on the slice before or the
        slice after, or the slice is the volume's first or last (the class is cut there by the field of
        view). On ACDC these are the apical and basal slices, where a class is small and easily missed.

        Returns:
            bool array of shape (len(self),).
        """
        ends = []
        for label in self.labels:
            # numpy, single-threaded: it runs while the training starts, next to other processes on a shared host
            label = label.numpy().reshape(-1, label.shape[-1])  # (voxels of a slice, slices)
            depth = label.shape[1]
            # one pass over the volume: voxels per (class, slice), counted as class * depth + slice
            counts = np.bincount((label.astype(np.int64) * depth + np.arange(depth)).ravel())
            counts = np.pad(counts, (0, -len(counts) % depth)).reshape(-1, depth)
            present = counts[1:] > 0  # (foreground classes, slices)
            absent = np.pad(~present, ((0, 0), (1, 1)), constant_values=True)  # outside the volume: absent
            ends.append((present & (absent[:, :-2] | absent[:, 2:])).any(0))
        return np.concatenate(ends)

    def sampling_weights(self, end_slice_weight: float = 1.0) -> torch.Tensor:
        """Per-slice sampling weights: ``end_slice_weight`` for end slices (:meth:`end_slice_mask`), 1 otherwise.

        For a weighted sampler (``WeightedRandomSampler``, or MONAI's ``DistributedWeightedRandomSampler``
        under DDP), so that the slices where a class begins or ends are drawn more often.

        Raises:
            ValueError: ``end_slice_weight`` is not a positive finite number.
        """
        if not (np.isfinite(end_slice_weight) and end_slice_weight > 0):
            raise ValueError(f"end_slice_weight must be a positive number, got {end_slice_weight!r}")
        weights = torch.ones(len(self), dtype=torch.double)
        weights[torch.from_numpy(self.end_slice_mask())] = float(end_slice_weight)
        return weights

    def class_voxel_counts(self) -> np.ndarray:
        """Voxels per class over the cached slices (a sanity check of the label mapping)."""
        n = self.num_classes or int(max(lb.max().item() for lb in self.labels)) + 1
        return np.sum([np.bincount(lb.flatten().numpy(), minlength=n) for lb in self.labels], axis=0)


def slice_sampler(dataset: SliceDataset, end_slice_weight: float = 1.0, distributed: bool = False,
                  **distributed_kwargs) -> Sampler | None:
    """The training loader's sampler, one config entry for one GPU and for DDP.

    Args:
        dataset: the training slices.
        end_slice_weight: how many times as often an end slice (:meth:`SliceDataset.end_slice_mask`) is drawn
            as any other; 1 keeps the plain epoch (every slice once, shuffled).
        distributed: one process per GPU: each rank draws its own share (MONAI's ``DistributedSampler``, or
            ``DistributedWeightedRandomSampler`` with weights).
        distributed_kwargs: further arguments of those samplers (``even_divisible``, ``shuffle``,
            ``num_replicas``, ``rank``).

    Returns:
        None on one GPU without weights (the loader shuffles); otherwise a sampler of ``len(dataset)``
        draws per epoch in all (with replacement when weighted).
    """
    if distributed:
        if end_slice_weight == 1:
            return DistributedSampler(dataset, **distributed_kwargs)
        weights = dataset.sampling_weights(end_slice_weight)
        return DistributedWeightedRandomSampler(dataset, weights, **distributed_kwargs)
    if distributed_kwargs:
        raise TypeError(f"slice_sampler: {sorted(distributed_kwargs)} apply only with distributed=True")
    if end_slice_weight == 1:
        return None
    return WeightedRandomSampler(dataset.sampling_weights(end_slice_weight), num_samples=len(dataset))
