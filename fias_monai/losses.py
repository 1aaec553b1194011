# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""The FIAS training loss: MERIT-style feature mixing over the deep-supervision maps (paper 2.3)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch.nn.modules.loss import _Loss

__all__ = ["FeatureMixingLoss", "MIXING_MODES", "nonempty_subsets"]

# which combinations of the deep-supervision maps are scored (see FeatureMixingLoss)
MIXING_MODES = ("all", "separate", "final")
# DiceCELoss options the stacked pass reproduces; any other falls back to one DiceCELoss per combination
_STACKED_KWARGS = {"to_onehot_y", "softmax", "smooth_nr", "smooth_dr", "batch"}


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

    All scored combinations are stacked and scored in one pass (one log-softmax, one one-hot of the
    labels, batched reductions) instead of one :class:`~monai.losses.DiceCELoss` call per combination:
    the same value, in a handful of large kernels instead of ~15 small ones per combination. Options
    this pass does not implement (class weights, squared or Jaccard Dice, label smoothing, ...) fall
    back to the per-combination DiceCELoss.

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
        self.lambda_dice, self.lambda_ce, self.include_background = lambda_dice, lambda_ce, include_background
        # the stacked pass implements softmax Dice (optionally batch-wise, any smoothing) plus plain CE
        self.stacked = (dice_ce_kwargs["to_onehot_y"] is True and dice_ce_kwargs["softmax"] is True
                        and set(dice_ce_kwargs) <= _STACKED_KWARGS)

    def forward(self, input: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor):
            maps, subsets = [input], [(0,)]
        else:
            maps = list(input)
            if not maps:
                raise ValueError("FeatureMixingLoss got an empty list of prediction maps.")
            n = len(maps)
            subsets = {"all": nonempty_subsets(n), "separate": [(i,) for i in range(n)],
                       "final": [tuple(range(n))]}[self.mixing]
        mixed = [_sum_maps(maps, subset) for subset in subsets]
        if not (self.stacked and target.ndim == maps[0].ndim and target.shape[1] == 1 and maps[0].shape[1] > 1):
            total = maps[0].new_zeros(())
            for m in mixed:
                total = total + self.map_loss(m, target)
            return total
        return self._stacked_dice_ce(torch.stack(mixed), target)

    def _stacked_dice_ce(self, mixed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum over the S stacked logit maps (S, B, C, *spatial) of lambda_dice * Dice + lambda_ce * CE,
        as DiceCELoss(to_onehot_y=True, softmax=True) scores each (mean over batch and classes)."""
        n_classes = mixed.shape[2]
        labels = target[:, 0].long()  # B, *spatial
        log_prob = mixed.to(torch.promote_types(mixed.dtype, torch.float32)).log_softmax(dim=2)
        ce = -log_prob.gather(2, labels.expand(mixed.shape[0], *labels.shape).unsqueeze(2))
        ce = ce.flatten(1).mean(1)  # S: the mean over every voxel, as CrossEntropyLoss
        onehot = F.one_hot(labels, n_classes).movedim(-1, 1).to(log_prob.dtype)  # B, C, *spatial
        prob = log_prob.exp()
        if not self.include_background:
            prob, onehot = prob[:, :, 1:], onehot[:, 1:]
        dice_loss = self.map_loss.dice
        dims = tuple(range(3, prob.ndim))
        if dice_loss.batch:
            dims = (1, *dims)
        intersection = (prob * onehot).sum(dims)
        denominator = prob.sum(dims) + onehot.sum(tuple(d - 1 for d in dims))
        dice = 1.0 - (2.0 * intersection + dice_loss.smooth_nr) / (denominator + dice_loss.smooth_dr)
        dice = dice.flatten(1).mean(1)  # S
        return (self.lambda_dice * dice + self.lambda_ce * ce).sum()


def _sum_maps(maps: list[torch.Tensor], subset: tuple[int, ...]) -> torch.Tensor:
    """The mixed map of a subset: its members' logits summed (in their own dtype, as the paper's code)."""
    mixed = maps[subset[0]]
    for i in subset[1:]:
        mixed = mixed + maps[i]
    return mixed
