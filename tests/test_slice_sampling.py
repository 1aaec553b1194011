# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Drawing training slices where a class begins or ends along the stack more often (end_slice_weight)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DistributedSampler, DistributedWeightedRandomSampler
from torch.utils.data import WeightedRandomSampler

from fias_monai.data import SliceDataset, slice_sampler


def _volume(depth: int, extents: dict[int, range]) -> dict:
    """A (1, 4, 4, depth) label with each class on one pixel of the slices in its extent."""
    label = torch.zeros(1, 4, 4, depth, dtype=torch.uint8)
    for c, zs in extents.items():
        for z in zs:
            label[0, c, c, z] = c
    return {"image": label.float(), "label": label}


@pytest.fixture
def dataset() -> SliceDataset:
    volumes = [
        _volume(6, {1: range(1, 4), 2: range(2, 6)}),  # class 1 on slices 1-3, class 2 on 2-5 (cut by the last)
        _volume(3, {}),  # background only
        _volume(5, {3: range(0, 1), 1: range(1, 4)}),  # class 3 on the first slice only, class 1 on 1-3
    ]
    return SliceDataset(volumes, volume_transform=lambda v: v, num_workers=1)


def test_end_slices_are_where_a_class_begins_or_ends_or_meets_the_volume_border(dataset):
    mask = dataset.end_slice_mask()
    expected = [
        [0, 1, 1, 1, 0, 1],  # 1: class 1 starts, 2: class 2 starts, 3: class 1 ends, 4: inside both, 5: the last slice
        [0, 0, 0],
        [1, 1, 0, 1, 0],  # 0: class 3's only slice (and the first), 1: class 1 starts, 3: class 1 ends
    ]
    assert mask.dtype == bool and mask.tolist() == [bool(x) for row in expected for x in row]


def test_sampling_weights_and_their_errors(dataset):
    weights = dataset.sampling_weights(3)
    assert weights.tolist() == [3.0 if m else 1.0 for m in dataset.end_slice_mask()]
    assert dataset.sampling_weights().tolist() == [1.0] * len(dataset)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="end_slice_weight must be a positive number"):
            dataset.sampling_weights(bad)


def test_slice_sampler_draws_end_slices_as_often_as_weighted(dataset):
    assert slice_sampler(dataset) is None  # the loader shuffles: every slice once per epoch
    sampler = slice_sampler(dataset, end_slice_weight=3)
    assert isinstance(sampler, WeightedRandomSampler) and len(sampler) == len(dataset) == 14
    torch.manual_seed(0)
    counts = np.bincount([i for _ in range(3000) for i in sampler], minlength=len(dataset))
    mask = dataset.end_slice_mask()
    # 7 end slices of 14 at weight 3: each is drawn 3 / 28 of the time, every other slice 1 / 28
    assert counts.sum() == 3000 * 14
    assert counts[mask].mean() / counts[~mask].mean() == pytest.approx(3.0, rel=0.05)
    with pytest.raises(TypeError, match="only with distributed=True"):
        slice_sampler(dataset, end_slice_weight=3, num_replicas=2)


@pytest.mark.parametrize("weight, kind", [(1, DistributedSampler), (3, DistributedWeightedRandomSampler)])
def test_slice_sampler_under_ddp_gives_each_rank_its_share(dataset, weight, kind):
    samplers = [slice_sampler(dataset, weight, distributed=True, num_replicas=2, rank=r, even_divisible=True)
                for r in (0, 1)]
    assert all(type(s) is kind and len(s) == 7 for s in samplers)
    if weight == 1:  # every slice once across the ranks
        assert sorted(i for s in samplers for i in s) == list(range(14))
    else:  # each rank draws, by weight, only from its own half of the slices
        assert samplers[0].weights.tolist() == dataset.sampling_weights(3).tolist()
        halves = [set(DistributedSampler(dataset, num_replicas=2, rank=r, even_divisible=True)) for r in (0, 1)]
        assert halves[0].isdisjoint(halves[1])
        torch.manual_seed(0)
        for sampler, half in zip(samplers, halves):
            draws = [i for _ in range(200) for i in sampler]
            assert set(draws) == half
