# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Depthwise Multi-Kernel (DMK) convolution encoder, the CNN path of FIAS (paper Eq. 1-2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks.convolutions import Convolution

__all__ = ["DMKBlock", "DMKEncoder"]


class DMKBlock(nn.Module):
    """One DMK stage: L = Conv3x3(X); Z_m = DWConv_k(L), k in (5, 7); F = Conv1x1(L + Z_1 + Z_2).

    The depthwise convolutions act on this stage's L (the paper's Eq. 1 writes L_{l-1}, a typo).
    The 3x3 convolution carries the stage's stride, so the path downsamples on its own and its
    outputs match DilateFormer's strides and channels. Norm and activation: conv-BN-ReLU after the
    3x3 and the 1x1 convolutions; the depthwise convolutions are plain (they only add context).

    Args:
        spatial_dims: 2 for FIAS (any MONAI spatial dims work).
        in_channels: channels of X.
        out_channels: channels of L and F.
        stride: stride of the 3x3 convolution.
        kernel_sizes: depthwise kernel sizes; the paper's k(m) = (m + 1) * 2 + 1 gives (5, 7).

    Shapes:
        (B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1,
                 kernel_sizes: Sequence[int] = (5, 7)) -> None:
        super().__init__()
        self.local = Convolution(spatial_dims, in_channels, out_channels, strides=stride, kernel_size=3,
                                 norm="BATCH", act="RELU", bias=False)
        self.context = nn.ModuleList([
            Convolution(spatial_dims, out_channels, out_channels, kernel_size=k, groups=out_channels, conv_only=True)
            for k in kernel_sizes
        ])
        self.fuse = Convolution(spatial_dims, out_channels, out_channels, kernel_size=1, norm="BATCH", act="RELU",
                                bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local(x)
        mixed = local
        for conv in self.context:
            mixed = mixed + conv(local)
        return self.fuse(mixed)


class DMKEncoder(nn.Module):
    """Four DMK stages after a stride-2 stem: a pyramid at strides 4, 8, 16, 32.

    Args:
        spatial_dims: 2 for FIAS.
        in_channels: image channels.
        channels: output channels per stage (equal to DilateFormer's embed dims, so CAF can fuse).
        kernel_sizes: depthwise kernel sizes of each DMK block.

    Shapes:
        (B, in_channels, H, W) -> [(B, channels[i], H / 2**(i+2), W / 2**(i+2)) for i in 0..3]
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, channels: Sequence[int] = (72, 144, 288, 576),
                 kernel_sizes: Sequence[int] = (5, 7)) -> None:
        super().__init__()
        stem_out = max(channels[0] // 2, 8)
        self.stem = Convolution(spatial_dims, in_channels, stem_out, strides=2, kernel_size=3, norm="BATCH",
                                act="RELU", bias=False)
        widths = [stem_out, *channels]
        self.stages = nn.ModuleList([
            DMKBlock(spatial_dims, widths[i], widths[i + 1], stride=2, kernel_sizes=kernel_sizes)
            for i in range(len(channels))
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
