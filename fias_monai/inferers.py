# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Test-time flips: a MONAI inferer that averages a network's class probabilities over mirrored inputs.

The training augmentation flips each slice along both in-plane axes (``RandFlipd`` on spatial axes 0
and 1), so the network has seen every mirrored view; averaging the softmax over them is nnU-Net's
"mirroring" test-time augmentation. MONAI has no inferer for it (``monai.data.TestTimeAugmentation``
draws random invertible transforms for uncertainty, one forward pass per draw, and needs dictionaries).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer

__all__ = ["FlipAveragingInferer", "flip_combinations"]


def flip_combinations(spatial_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty set of the given spatial axes, e.g. ``[0, 1]`` -> ``[(0,), (1,), (0, 1)]``."""
    axes = sorted(set(int(a) for a in spatial_axes))
    return [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]


class FlipAveragingInferer(Inferer):
    """Runs ``inferer`` on the input and on its flips, and averages the softmax probabilities.

    Each flipped prediction is flipped back before averaging. The result is the log of the mean
    probability, so that ``argmax`` (and ``softmax``) downstream treat it like logits: argmax of the
    output is argmax of the averaged probabilities. With no flips the inner inferer's output is
    returned unchanged.

    Args:
        inferer: the inferer each view goes through, e.g. MONAI's ``SliceInferer``.
        flips: the flips besides the identity, each a sequence of spatial axes flipped together (axis 0 is
            the first dimension after the channel). ``[[0], [1], [0, 1]]`` mirrors a slice both ways
            and both at once: four forward passes in all. An empty sequence (the default) turns the
            averaging off.

    Shapes:
        input ``(B, C_in, *spatial)``, output ``(B, C_out, *spatial)`` as the inner inferer's.

    Raises:
        ValueError: a flip axis is not a spatial axis of the input.
    """

    def __init__(self, inferer: Inferer, flips: Sequence[Sequence[int]] = ()) -> None:
        super().__init__()
        self.inferer = inferer
        self.flips = [tuple(int(a) for a in f) for f in flips]
        if any(not f for f in self.flips):
            raise ValueError(f"FlipAveragingInferer: empty flip in {list(flips)}; the unflipped input is always used")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        n_spatial = inputs.ndim - 2
        for axes in self.flips:
            if any(not 0 <= a < n_spatial for a in axes):
                raise ValueError(f"FlipAveragingInferer: flip axes {axes} are not among the input's "
                                 f"{n_spatial} spatial axes (input shape {tuple(inputs.shape)})")
        logits = self.inferer(inputs, network, *args, **kwargs)
        if not self.flips:
            return logits
        # the sum in float32: bf16 autocast outputs would lose the small differences the average is for
        prob = torch.softmax(logits.float(), dim=1)
        for axes in self.flips:
            dims = [a + 2 for a in axes]
            flipped = self.inferer(torch.flip(inputs, dims), network, *args, **kwargs)
            prob += torch.softmax(torch.flip(flipped, dims).float(), dim=1)
        return torch.log(prob / (len(self.flips) + 1))
