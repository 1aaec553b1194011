# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""The FIAS training loss: MERIT-style feature mixing over the deep-supervision maps (paper 2.3)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
from monai.losses import DiceCELoss
from torch.nn.modules.loss import _Loss

__all__ = ["FeatureMixingLoss", "MIXING_MODES", "nonempty_subsets"]

# which combinations of the deep-supervision maps are scored (see FeatureMixingLoss)
MIXING_MODES = ("all", "separate", "final")


def nonempty_subsets(n: int) -> list[tuple[int, ...]]:
    """All 2**n - 1 non-empty index subsets of range(n), smallest first."""
    return [s for r in range(1, n + 1) for s in combinations(range(n), r)]


class FeatureMixingLoss(_Loss):
    """Deep supervision with feature mixing (MERIT, Rahman & Marculescu 2024), as FIAS trains.

    For each non-empty subset of the prediction maps (7 for FIAS's three heads) the logits of its
    members are SUMMED and the sum is scored with ``lambda_dice * Dice + lambda_ce * CE``
    (softmax Dice over all classes, background included, as TransUNet/MERIT); the total is the sum
    over subsets. A single tensor input is scored once, so the same loss also serves networks
    without deep supervision (and FIAS in eval mode).

    ``mixing`` selects the combinations scored, for the deep-supervision ablation: ``"all"`` the paper's
    7 subsets; ``"separate"`` each map alone (classic deep supervision, 3 terms); ``"final"`` only the sum
    of all maps, i.e. the eval-mode output (no deep supervision, 1 term).

    Args:
        lambda_dice: weight of the Dice term (the paper's gamma = 0.4).
        lambda_ce: weight of the cross-entropy term (1 - gamma = 0.6).
        include_background: Dice over the background class too.
        mixing: ``"all"`` (paper), ``"separate"`` or ``"final"``, see above.
        **dice_ce_kwargs: further arguments of :class:`monai.losses.DiceCELoss`.

    Shapes:
        input: (B, C, H, W) logits, or a sequence of such maps.
        target: (B, 1, H, W) class indices.
    """

    def __init__(self, lambda_dice: float = 0.4, lambda_ce: float = 0.6, include_background: bool = True,
                 mixing: str = "all", **dice_ce_kwargs) -> None:
        super().__init__()
        if mixing not in MIXING_MODES:
            raise ValueError(f"FeatureMixingLoss: mixing must be one of {MIXING_MODES}, got {mixing!r}.")
        self.mixing = mixing
        dice_ce_kwargs.setdefault("to_onehot_y", True)
        dice_ce_kwargs.setdefault("softmax", True)
        self.map_loss = DiceCELoss(include_background=include_background, lambda_dice=lambda_dice,
                                   lambda_ce=lambda_ce, **dice_ce_kwargs)

    def forward(self, input: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor):
            return self.map_loss(input, target)
        maps = list(input)
        if not maps:
            raise ValueError("FeatureMixingLoss got an empty list of prediction maps.")
        n = len(maps)
        subsets = {"all": nonempty_subsets(n), "separate": [(i,) for i in range(n)],
                   "final": [tuple(range(n))]}[self.mixing]
        total = input[0].new_zeros(())
        for subset in subsets:
            mixed = maps[subset[0]]
            for i in subset[1:]:
                mixed = mixed + maps[i]
            total = total + self.map_loss(mixed, target)
        return total
