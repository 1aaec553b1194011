# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""MixAtt decoder block (paper Eq. 7-10): conv, multi-head self-attention and Monte Carlo attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import SABlock
from monai.networks.blocks.convolutions import Convolution

from fias_monai.networks.blocks.layernorm_kernel import FusedLayerNorm

__all__ = ["MonteCarloAttention", "ConvDecoderBlock", "MixAttBlock", "PaddedHeadSABlock", "make_decoder_block",
           "DECODERS"]

DECODERS = ("mixatt", "conv")


def _make_divisible(value: float, divisor: int = 8) -> int:
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class MonteCarloAttention(nn.Module):
    """Monte Carlo attention (SvANet): channel weights from a randomly chosen pooled cell.

    In training, each forward picks one pool size k from ``pool_sizes`` and one cell of the k x k
    adaptive-average-pooled map (shared by the batch): Eq. 9's one-hot association m_i. At eval the
    pool is always global (k = 1), so inference is deterministic. The pooled (B, C, 1, 1) vector goes
    through 1x1 conv C -> hidden, ReLU, 1x1 conv hidden -> C and a sigmoid.

    Args:
        spatial_dims: 2 for FIAS.
        channels: C.
        pool_sizes: candidate adaptive pool sizes (1, 2, 3).
        hidden: bottleneck width; default max(C / 4 rounded to a multiple of 8, 32).

    Shapes:
        (B, C, H, W) -> (B, C, 1, 1) weights in (0, 1)
    """

    def __init__(self, spatial_dims: int, channels: int, pool_sizes: Sequence[int] = (1, 2, 3),
                 hidden: int | None = None) -> None:
        super().__init__()
        self.pool_sizes = tuple(pool_sizes)
        hidden = hidden or max(_make_divisible(channels / 4), 32)
        self.fc = nn.Sequential(
            Convolution(spatial_dims, channels, hidden, kernel_size=1, conv_only=True),
            nn.ReLU(inplace=True),
            Convolution(spatial_dims, hidden, channels, kernel_size=1, conv_only=True),
        )

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled descriptor: a random cell of a random pool size in training, the mean at eval."""
        if not self.training:
            return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        # All candidate cells side by side: (B, C, sum k*k). The draw (uniform pool size, then uniform
        # cell) is an inverse-CDF lookup of one device-side uniform number: no host sync, no graph
        # break under torch.compile, and capturable in a CUDA graph.
        cells = torch.cat([F.adaptive_avg_pool2d(x, k).flatten(2) for k in self.pool_sizes], dim=2)
        probs = torch.cat([x.new_full((k * k,), 1.0 / (len(self.pool_sizes) * k * k), dtype=torch.float32)
                           for k in self.pool_sizes])
        cdf = probs.cumsum(0)
        u = torch.rand(1, device=x.device) * cdf[-1]
        index = torch.searchsorted(cdf, u).clamp_(max=cells.shape[2] - 1)
        return cells.index_select(2, index).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(self.sample(x)))


class PaddedHeadSABlock(SABlock):
    """MONAI's :class:`~monai.networks.blocks.SABlock` (fused SDPA attention) with each head zero-padded
    to a multiple of 8 channels inside the attention call.

    FlashAttention kernels need head widths that are multiples of 8; FIAS-tiny's two finest MixAtt
    blocks have 36-channel heads (72 / 2 and 144 / 4), for which SDPA falls back to a slower kernel
    (fwd+bwd at (16, 2, 4096, 36) in bf16: 2.30 ms, against 1.33 ms padded to 40 on an H100). Zero
    channels add nothing to q.k (the scale stays 1/sqrt(36)) and give zero output channels, which are
    cut off again: the same function, the same parameters and state-dict keys as SABlock. (Attention
    dropout, 0 in FIAS, applies in training only; SABlock also applies it at eval.)

    Args:
        *args, **kwargs: as :class:`~monai.networks.blocks.SABlock`.
        pad_heads: pad always (True), never (False), or on CUDA tensors only (None, the default): padding
            pays only where FlashAttention exists; elsewhere it is 11 % more attention work.

    Shapes:
        (B, N, hidden_size) -> (B, N, hidden_size)
    """

    def __init__(self, *args, pad_heads: bool | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad_heads = pad_heads

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        pad = -self.dim_head % 8
        wanted = x.is_cuda if self.pad_heads is None else self.pad_heads
        if not (pad and wanted) or attn_mask is not None or not self.use_flash_attention \
                or not self.use_combined_linear or self.rel_positional_embedding is not None:
            return super().forward(x, attn_mask)
        qkv = self.input_rearrange(self.qkv(x))  # 3, B, heads, N, dim_head
        q, k, v = qkv[0], qkv[1], qkv[2]  # indexed, not unpacked: TorchScript tracing stays exact
        if self.attention_dtype is not None:
            q, k = q.to(self.attention_dtype), k.to(self.attention_dtype)
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale, is_causal=self.causal,
                                           dropout_p=self.dropout_rate if self.training else 0.0)
        x = self.out_rearrange(x[..., : self.dim_head])
        return self.drop_output(self.out_proj(x) if self.include_fc else x)


class ConvDecoderBlock(nn.Module):
    """Eq. 7 alone: Dropout(ReLU(Conv(ReLU(BN(Conv(x)))))), also the "no MixAtt" ablation block.

    Args:
        spatial_dims: 2 for FIAS.
        in_channels: channels of the concatenated input.
        out_channels: output channels (half the concatenation in FIAS).
        dropout: dropout rate at the end.

    Shapes:
        (B, in_channels, H, W) -> (B, out_channels, H, W)
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv1 = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, norm="BATCH", act="RELU",
                                 bias=False)
        self.conv2 = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, norm=None, act="RELU",
                                 dropout=dropout, adn_ordering="AD")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class MixAttBlock(ConvDecoderBlock):
    """MixAtt block: P1 = Eq. 7; A = MHSA(LN(P1)), computed once; P2 = A + P1 (Eq. 8);
    P = Conv(P2 * MCA(P2) + A) (Eq. 9-10, a 1x1 conv).

    Args:
        spatial_dims: 2 for FIAS.
        in_channels: channels of the concatenated input.
        out_channels: channels of P; divisible by ``num_heads``.
        num_heads: self-attention heads (8, 6, 4, 2 from the coarsest block to the finest).
        dropout: dropout rate of Eq. 7.

    Shapes:
        (B, in_channels, H, W) -> (B, out_channels, H, W)
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, num_heads: int,
                 dropout: float = 0.1) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, dropout)
        if out_channels % num_heads:
            raise ValueError(f"MixAtt width {out_channels} is not divisible by its {num_heads} heads.")
        self.norm = FusedLayerNorm(out_channels)
        self.mhsa = PaddedHeadSABlock(out_channels, num_heads, qkv_bias=True, use_flash_attention=True)
        self.mca = MonteCarloAttention(spatial_dims, out_channels)
        self.proj = Convolution(spatial_dims, out_channels, out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = super().forward(x)
        b, c = p1.shape[:2]
        tokens = p1.flatten(2).transpose(1, 2)  # B, N, C
        attn = self.mhsa(self.norm(tokens)).transpose(1, 2).reshape(p1.shape)
        p2 = attn + p1
        return self.proj(p2 * self.mca(p2) + attn)


def make_decoder_block(kind: str, spatial_dims: int, in_channels: int, out_channels: int, num_heads: int,
                       dropout: float = 0.1) -> nn.Module:
    """Build a ``"mixatt"`` block or the ``"conv"`` ablation block."""
    if kind == "mixatt":
        return MixAttBlock(spatial_dims, in_channels, out_channels, num_heads, dropout)
    if kind == "conv":
        return ConvDecoderBlock(spatial_dims, in_channels, out_channels, dropout)
    raise ValueError(f"decoder must be one of {DECODERS}, got {kind!r}.")
