# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Fusion of the transformer and CNN pyramids: Context-Aware Fusion (paper Eq. 3-6) and ablations."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks.convolutions import Convolution

__all__ = ["ContextAwareFusion", "SumFusion", "TransformerOnlyFusion", "make_fusion", "FUSIONS"]

FUSIONS = ("caf", "sum")


class ContextAwareFusion(nn.Module):
    """Context-Aware Fusion (CAF) of two same-shaped feature maps.

    Channel weights (Eq. 3): w_ch = sigmoid(Conv(Cat(AvgPool(Conv([F1; F2])), MaxPool(Conv([F1; F2]))))),
    global pooling of the 2C-channel concatenation; one Conv serves both pools, as written.
    Reduction (Eq. 4): F' = Conv(w_ch * [F1; F2]), 2C -> C (1x1 conv-BN-ReLU).
    Spatial weights (Eq. 5): w_sp = sigmoid(Conv(ChannelMean(Conv(F1) + Conv(F2)))), one weight per
    pixel from a ``spatial_kernel`` conv (7x7, as CBAM's spatial gate). Output (Eq. 6): w_sp * F'.

    Args:
        spatial_dims: 2 for FIAS.
        channels: C, channels of each input and of the output.
        spatial_kernel: kernel of the spatial-gate conv.

    Shapes:
        (B, C, H, W), (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, spatial_dims: int, channels: int, spatial_kernel: int = 7) -> None:
        super().__init__()
        c2 = 2 * channels
        self.channel_conv = Convolution(spatial_dims, c2, c2, kernel_size=1, conv_only=True)
        self.channel_gate = Convolution(spatial_dims, 2 * c2, c2, kernel_size=1, conv_only=True)
        self.reduce = Convolution(spatial_dims, c2, channels, kernel_size=1, norm="BATCH", act="RELU", bias=False)
        self.spatial_conv1 = Convolution(spatial_dims, channels, channels, kernel_size=1, conv_only=True)
        self.spatial_conv2 = Convolution(spatial_dims, channels, channels, kernel_size=1, conv_only=True)
        self.spatial_gate = Convolution(spatial_dims, 1, 1, kernel_size=spatial_kernel, conv_only=True)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        both = torch.cat([f1, f2], dim=1)
        t = self.channel_conv(both)
        dims = tuple(range(2, t.ndim))
        pooled = torch.cat([t.mean(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)], dim=1)
        fused = self.reduce(torch.sigmoid(self.channel_gate(pooled)) * both)
        s = self.spatial_conv1(f1) + self.spatial_conv2(f2)
        w_sp = torch.sigmoid(self.spatial_gate(s.mean(dim=1, keepdim=True)))
        return w_sp * fused


class SumFusion(nn.Module):
    """Ablation "Summation" (paper Table 3): F1 + F2."""

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        return f1 + f2


class TransformerOnlyFusion(nn.Module):
    """Ablation "no DMK" (paper Table 3): the DilateFormer features pass alone."""

    def forward(self, f1: torch.Tensor, f2: torch.Tensor | None = None) -> torch.Tensor:
        return f1


def make_fusion(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """Build the fusion block named ``kind`` (``"caf"`` or ``"sum"``)."""
    if kind == "caf":
        return ContextAwareFusion(spatial_dims, channels)
    if kind == "sum":
        return SumFusion()
    raise ValueError(f"fusion must be one of {FUSIONS}, got {kind!r}.")
