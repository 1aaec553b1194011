# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""A full-resolution segmentation head for FIAS's finest decoder output (beyond the paper).

The paper's finest deep-supervision head sits on the 1/4-resolution decoder output and is upsampled
bilinearly to the input, as in the MERIT/CASCADE code FIAS builds on. That bounds what thin structures
can score: on ACDC's validation volumes a perfect 1/4-resolution prediction reaches 96.5 Dice on the
myocardium and 98.0 on the LV, against 100 at full resolution (scripts/resolution_ceiling.py). This
head decodes the 1/4 map back to the input size the way a U-Net does, with skips from a small
convolutional stem on the input image, so that the finest prediction can place boundaries to the pixel.
It is built from MONAI BasicUNet's blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks.convolutions import Convolution
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat

__all__ = ["FullResolutionHead"]


class FullResolutionHead(nn.Module):
    """Decode a 1/4-resolution feature map to full-resolution logits with image skips at 1/1 and 1/2.

    stem: two 3x3 convolutions on the image (1/1); down: max-pool and two convolutions (1/2);
    then two BasicUNet up steps (transposed convolution, concatenation with the skip, two convolutions):
    1/4 -> 1/2 -> 1/1, and a 1x1 convolution to the classes.

    Args:
        spatial_dims: 2 for FIAS's slices.
        in_channels: image channels.
        decoder_channels: channels of the 1/4-resolution decoder output.
        out_channels: classes, background included.
        channels: stem widths at 1/1 and 1/2 (and of the up steps that meet them).
        act: activation of every convolution (BasicUNet's default).
        norm: normalisation of every convolution (BasicUNet's default).

    Shapes:
        image (B, in_channels, H, W) and decoded (B, decoder_channels, H/4, W/4) -> (B, out_channels, H, W).
    """

    def __init__(self, spatial_dims: int, in_channels: int, decoder_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32),
                 act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                 norm: str | tuple = ("instance", {"affine": True})) -> None:
        super().__init__()
        full, half = channels
        self.stem = TwoConv(spatial_dims, in_channels, full, act, norm, bias=True)
        self.down = Down(spatial_dims, full, half, act, norm, bias=True)
        self.up_half = UpCat(spatial_dims, decoder_channels, half, half, act, norm, bias=True)
        self.up_full = UpCat(spatial_dims, half, full, full, act, norm, bias=True)
        self.head = Convolution(spatial_dims, full, out_channels, kernel_size=1, conv_only=True)

    def forward(self, image: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        skip_full = self.stem(image)
        skip_half = self.down(skip_full)
        return self.head(self.up_full(self.up_half(decoded, skip_half), skip_full))
