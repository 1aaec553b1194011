# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""FIAS: Feature Imbalance-Aware Segmentation (Liu, Xu, Ho; ISBI 2025) as a MONAI network.

Dual-path encoder (DilateFormer + DMK convolutions) fused per scale by Context-Aware Fusion, a
MixAtt decoder, and 1x1 deep-supervision heads on the last three decoder outputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UpSample
from monai.networks.blocks.convolutions import Convolution

from .blocks.caf import TransformerOnlyFusion, make_fusion
from .blocks.dilateformer import DilateFormer, checkpoint_filter_fn
from .blocks.dmk import DMKEncoder
from .blocks.full_res_head import FullResolutionHead
from .blocks.mixatt import make_decoder_block

__all__ = ["FIAS", "FIAS_VARIANTS", "fias_tiny", "fias_small", "fias_base", "load_dilateformer_checkpoint"]

# DilateFormer variants (Jiao et al. 2023). The paper's FIAS uses "tiny" (depths 2, 2, 6, 2).
FIAS_VARIANTS: dict[str, dict] = {
    "tiny": {"embed_dims": (72, 144, 288, 576), "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    "small": {"embed_dims": (72, 144, 288, 576), "depths": (3, 5, 8, 3), "num_heads": (3, 6, 12, 24)},
    "base": {"embed_dims": (96, 192, 384, 768), "depths": (4, 8, 10, 3), "num_heads": (3, 6, 12, 24)},
}

STRIDE = 32  # the coarsest pyramid level; input sides must divide by it


class FIAS(nn.Module):
    """FIAS segmentation network for 2D slices.

    Args:
        in_channels: image channels.
        out_channels: classes, background included.
        variant: ``"tiny"`` (the paper's), ``"small"`` or ``"base"``: the DilateFormer widths, depths
            and heads of :data:`FIAS_VARIANTS`. ``embed_dims``, ``depths`` and ``num_heads`` override
            single entries (e.g. a narrow network for tests).
        use_dmk: the DMK convolution path (Table 3 ablation "no DMK" when False: DilateFormer alone).
        fusion: ``"caf"`` (Context-Aware Fusion) or ``"sum"`` (Table 3 ablation "Summation").
        decoder: ``"mixatt"`` or ``"conv"`` (Table 3 ablation "no MixAtt": Eq. 7 blocks alone).
        decoder_heads: self-attention heads of the four decoder blocks, coarsest first.
        decoder_dropout: dropout of Eq. 7.
        drop_path_rate: DilateFormer stochastic depth.
        full_res_head: beyond the paper, off by default. The finest deep-supervision output comes from
            :class:`~fias_monai.networks.blocks.FullResolutionHead` (the 1/4 decoder output decoded to the
            input size with skips from a small convolutional stem on the image) instead of a 1x1 head at
            1/4 upsampled bilinearly. The other two heads are unchanged.
        inference_heads: beyond the paper: which deep-supervision outputs (0 the finest, 2 the coarsest) eval
            mode sums. ``None``: all three, the paper's (and MERIT's) output. The weights do not depend on it, so
            one checkpoint can be evaluated either way.
        attention_impl: MSDA implementation, the same function at different speeds: ``"auto"`` (the fused
            Triton kernel on CUDA, plain PyTorch ``"gather"`` elsewhere), ``"fused"``, ``"gather"``,
            ``"shift"`` or ``"unfold"`` (the reference); see docs/benchmark.md.
        pretrained_encoder: optional path of an official DilateFormer ImageNet checkpoint (a local
            file; nothing is downloaded).

    Shapes:
        input (B, in_channels, H, W) with H and W divisible by 32.
        train mode: a list of three logits maps (B, out_channels, H, W), the deep-supervision heads
        from the finest (1/4) to the coarsest (1/16) decoder output.
        eval mode: one tensor (B, out_channels, H, W), the sum of the three (or of ``inference_heads``), so
        MONAI inferers, bundles and MONAI Label use the network unchanged.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 4, variant: str = "tiny",
                 embed_dims: Sequence[int] | None = None, depths: Sequence[int] | None = None,
                 num_heads: Sequence[int] | None = None, use_dmk: bool = True, fusion: str = "caf",
                 decoder: str = "mixatt", decoder_heads: Sequence[int] = (8, 6, 4, 2), decoder_dropout: float = 0.1,
                 drop_path_rate: float = 0.1, full_res_head: bool = False,
                 inference_heads: Sequence[int] | None = None, attention_impl: str = "auto",
                 pretrained_encoder: str | os.PathLike | None = None) -> None:
        super().__init__()
        if variant not in FIAS_VARIANTS:
            raise ValueError(f"variant must be one of {tuple(FIAS_VARIANTS)}, got {variant!r}.")
        cfg = dict(FIAS_VARIANTS[variant])
        for key, value in (("embed_dims", embed_dims), ("depths", depths), ("num_heads", num_heads)):
            if value is not None:
                cfg[key] = tuple(value)
        dims = cfg["embed_dims"]
        if len(decoder_heads) != len(dims):
            raise ValueError(f"decoder_heads needs one entry per scale ({len(dims)}), got {decoder_heads}.")
        self.in_channels, self.out_channels = in_channels, out_channels
        heads = (0, 1, 2) if inference_heads is None else tuple(int(i) for i in inference_heads)
        if not heads or len(set(heads)) != len(heads) or not set(heads) <= {0, 1, 2}:
            raise ValueError(f"inference_heads must name distinct outputs among 0 (finest), 1 and 2 (coarsest); "
                             f"got {inference_heads}.")
        self.inference_heads = heads
        self.use_dmk, self.fusion_kind, self.decoder_kind = use_dmk, fusion, decoder

        self.encoder = DilateFormer(in_channels, dims, cfg["depths"], cfg["num_heads"],
                                    drop_path_rate=drop_path_rate, attention_impl=attention_impl)
        self.dmk = DMKEncoder(2, in_channels, dims) if use_dmk else None
        self.fusions = nn.ModuleList([
            make_fusion(fusion, 2, c) if use_dmk else TransformerOnlyFusion() for c in dims
        ])
        # Decoder, coarsest first. Block 1 refines the 1/32 map; each later block upsamples the
        # previous output to the next scale's width and concatenates it with that scale's fused
        # features, and the block halves the 2C channels of the concatenation back to C.
        rev = dims[::-1]
        self.upsamples = nn.ModuleList([
            UpSample(2, rev[i - 1], rev[i], scale_factor=2, mode="nontrainable", interp_mode="bilinear",
                     align_corners=False)
            for i in range(1, len(rev))
        ])
        self.decoder_blocks = nn.ModuleList([
            make_decoder_block(decoder, 2, rev[i] if i == 0 else 2 * rev[i], rev[i], decoder_heads[i], decoder_dropout)
            for i in range(len(rev))
        ])
        # Deep supervision on the last three decoder outputs (1/16, 1/8, 1/4); stored finest first. With
        # full_res_head the finest output gets its own decoder to full resolution instead of a 1x1 head.
        self.full_res_head = FullResolutionHead(2, in_channels, dims[0], out_channels) if full_res_head else None
        self.heads = nn.ModuleList([
            Convolution(2, c, out_channels, kernel_size=1, conv_only=True)
            for c in dims[1 if full_res_head else 0:3]
        ])
        if pretrained_encoder is not None:
            load_dilateformer_checkpoint(self.encoder, pretrained_encoder)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError that states the rule when ``x`` cannot go through the network."""
        if x.ndim != 4:
            raise ValueError(f"FIAS takes 2D slices shaped (B, C, H, W); got a {x.ndim}D tensor {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"FIAS was built for {self.in_channels} input channel(s); got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)}).")
        h, w = x.shape[-2:]
        if h % STRIDE or w % STRIDE or h == 0 or w == 0:
            raise ValueError(f"FIAS needs H and W divisible by {STRIDE} (its coarsest stride); got {h}x{w}. "
                             f"Resize or pad the slices, e.g. to 256x256.")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The fused encoder pyramid [(B, C_i, H / 2**(i+2), W / 2**(i+2)) for i in 0..3]."""
        if not torch.jit.is_tracing():  # a traced graph keeps no Python checks; skip their warnings
            self.check_input(x)
        transformer = self.encoder(x)
        cnn = self.dmk(x) if self.dmk is not None else [None] * len(transformer)
        return [fuse(t, c) if c is not None else fuse(t) for fuse, t, c in zip(self.fusions, transformer, cnn)]

    def forward_decoder(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder outputs, coarsest first: [(B, C_3, H/32, W/32), ..., (B, C_0, H/4, W/4)]."""
        x = self.decoder_blocks[0](features[-1])
        outputs = [x]
        for up, block, skip in zip(self.upsamples, self.decoder_blocks[1:], reversed(features[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[-2:]
        decoded = self.forward_decoder(self.forward_features(x))
        finest_first = decoded[::-1][:3]
        upsampled = finest_first[1:] if self.full_res_head is not None else finest_first
        logits = [F.interpolate(head(d), size=size, mode="bilinear", align_corners=False)
                  for head, d in zip(self.heads, upsampled)]
        if self.full_res_head is not None:
            logits.insert(0, self.full_res_head(x, finest_first[0]))
        if self.training:
            return logits
        out = logits[self.inference_heads[0]]
        for i in self.inference_heads[1:]:
            out = out + logits[i]
        return out


def load_dilateformer_checkpoint(encoder: DilateFormer, path: str | os.PathLike) -> None:
    """Load an official DilateFormer checkpoint from a local file into ``encoder``, strictly.

    Every encoder tensor must come from the file: a missing or unexpected key raises, so nothing
    is silently skipped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DilateFormer checkpoint not found: {path} (weights are never downloaded; "
                                f"pass a local file).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder.load_state_dict(checkpoint_filter_fn(state, encoder), strict=True)


def fias_tiny(**kwargs) -> FIAS:
    """FIAS with DilateFormer-tiny (depths 2, 2, 6, 2): the paper's network."""
    return FIAS(variant="tiny", **kwargs)


def fias_small(**kwargs) -> FIAS:
    """FIAS with DilateFormer-small (depths 3, 5, 8, 3)."""
    return FIAS(variant="small", **kwargs)


def fias_base(**kwargs) -> FIAS:
    """FIAS with DilateFormer-base (widths 96-768, depths 4, 8, 10, 3)."""
    return FIAS(variant="base", **kwargs)
