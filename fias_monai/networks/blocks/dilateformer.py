# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""DilateFormer encoder (Jiao et al., IEEE TMM 2023), the transformer path of FIAS.

Stages 1-2 use Multi-Scale Dilated Attention (MSDA): the channels are split into one group per
dilation (1, 2, 3) and every query attends to the 3x3 neighbourhood sampled with that group's
dilation. Stages 3-4 use global multi-head self-attention (MONAI's ``SABlock``). Every block adds a
depthwise 3x3 convolution as conditional position encoding before attention.

The module layout differs from the official code; :func:`checkpoint_filter_fn` maps the official
ImageNet checkpoint onto it (and adapts the RGB stem to ``in_channels``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, SABlock
from monai.networks.blocks.convolutions import Convolution
from timm.layers import DropPath, trunc_normal_
from timm.models import adapt_input_conv

from fias_monai.networks.blocks.layernorm_kernel import FusedLayerNorm
from fias_monai.networks.blocks.msda_kernel import fused_msda_available, msda_fused

__all__ = [
    "msda_reference",
    "msda_shifted",
    "msda_gathered",
    "MultiScaleDilatedAttention",
    "GlobalAttention",
    "DilateFormerBlock",
    "DilateFormerStage",
    "DilateFormer",
    "checkpoint_filter_fn",
    "ATTENTION_IMPLS",
]

ATTENTION_IMPLS = ("auto", "fused", "shift", "unfold", "gather")


def msda_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, dilation: int,
                   kernel_size: int = 3) -> torch.Tensor:
    """Sliding-window dilated attention of one dilation group, the straightforward way (``nn.Unfold``).

    This is the formulation of the official code and serves as the oracle in the tests. It
    materialises ``kernel_size**2`` copies of the keys and values.

    Args:
        q, k, v: (B, G, H, W) with G = heads_in_group * head_dim.
        head_dim: channels per head.
        dilation: spacing of the 3x3 neighbourhood.
        kernel_size: neighbourhood size (3 in DilateFormer).

    Returns:
        (B, G, H, W) attention output, channel order (head, head_dim).
    """
    b, g, h, w = q.shape
    heads, kk = g // head_dim, kernel_size * kernel_size
    pad = dilation * (kernel_size - 1) // 2
    qh = q.reshape(b, heads, head_dim, 1, h * w).permute(0, 1, 4, 3, 2)  # B,h,N,1,d
    kh = F.unfold(k, kernel_size, dilation, pad, 1).reshape(b, heads, head_dim, kk, h * w).permute(0, 1, 4, 2, 3)
    attn = ((qh * head_dim**-0.5) @ kh).softmax(dim=-1)  # B,h,N,1,kk
    vh = F.unfold(v, kernel_size, dilation, pad, 1).reshape(b, heads, head_dim, kk, h * w).permute(0, 1, 4, 3, 2)
    out = (attn @ vh).squeeze(3)  # B,h,N,d
    return out.permute(0, 1, 3, 2).reshape(b, g, h, w)


def msda_shifted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, dilation: int,
                 kernel_size: int = 3) -> torch.Tensor:
    """The same function as :func:`msda_reference`, computed from shifted views of zero-padded k and v.

    Each of the ``kernel_size**2`` neighbours is a strided slice (a view, no copy) of the padded
    keys; its logit is a per-head dot product. Only (B, heads, kk, H, W) logits are materialised
    instead of kk copies of every key and value, and the element-wise form fuses well under
    ``torch.compile``. Zero padding reproduces the reference exactly: a padded key gives logit 0
    and a zero value, as ``nn.Unfold``'s zero padding does.
    """
    b, g, h, w = q.shape
    heads = g // head_dim
    pad = dilation * (kernel_size - 1) // 2
    qh = (q * head_dim**-0.5).reshape(b, heads, head_dim, h, w)
    kp = F.pad(k, (pad, pad, pad, pad)).reshape(b, heads, head_dim, h + 2 * pad, w + 2 * pad)
    vp = F.pad(v, (pad, pad, pad, pad)).reshape(b, heads, head_dim, h + 2 * pad, w + 2 * pad)
    offsets = [(i * dilation, j * dilation) for i in range(kernel_size) for j in range(kernel_size)]
    logits = torch.stack([(qh * kp[..., di:di + h, dj:dj + w]).sum(2) for di, dj in offsets], dim=2)
    attn = logits.softmax(dim=2)  # B,heads,kk,H,W
    out = sum(attn[:, :, n:n + 1] * vp[..., di:di + h, dj:dj + w] for n, (di, dj) in enumerate(offsets))
    return out.reshape(b, g, h, w)


def msda_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, dilation: int,
                  kernel_size: int = 3) -> torch.Tensor:
    """The same function as :func:`msda_reference`: unfolded neighbourhoods, but the per-query dot
    products and the weighted sum are broadcast multiply-reduces instead of millions of 1 x d by
    d x 9 batched matrix products (which GPUs run poorly)."""
    b, g, h, w = q.shape
    heads, kk = g // head_dim, kernel_size * kernel_size
    pad = dilation * (kernel_size - 1) // 2
    qh = (q * head_dim**-0.5).reshape(b, heads, head_dim, 1, h * w)
    kh = F.unfold(k, kernel_size, dilation, pad, 1).reshape(b, heads, head_dim, kk, h * w)
    attn = (qh * kh).sum(2, keepdim=True).softmax(dim=3)  # B,h,1,kk,N
    vh = F.unfold(v, kernel_size, dilation, pad, 1).reshape(b, heads, head_dim, kk, h * w)
    return (attn * vh).sum(3).reshape(b, g, h, w)


_MSDA_FNS = {"shift": msda_shifted, "unfold": msda_reference, "gather": msda_gathered}


class MultiScaleDilatedAttention(nn.Module):
    """Multi-Scale Dilated Attention (MSDA) on channels-last tokens.

    Args:
        dim: channels C; divisible by ``num_heads``.
        num_heads: heads in total, divided evenly among the dilation groups.
        dilations: one dilation per channel group (DilateFormer: 1, 2, 3).
        kernel_size: window size per dilation.
        qkv_bias: bias of the 1x1 qkv projection.
        impl: how the attention is computed; every choice is the same function, at different speed
            (see docs/benchmark.md). ``"fused"``: one Triton kernel for all groups
            (:func:`~fias_monai.networks.blocks.msda_kernel.msda_fused`, CUDA); ``"gather"``, ``"shift"``,
            ``"unfold"`` (the reference formulation): plain PyTorch, any device; ``"auto"``: ``"fused"``
            on CUDA where Triton is installed, ``"shift"`` under ``torch.compile`` (which fuses it
            itself), ``"gather"`` otherwise.

    Shapes:
        (B, H, W, C) -> (B, H, W, C)
    """

    def __init__(self, dim: int, num_heads: int, dilations: Sequence[int] = (1, 2, 3), kernel_size: int = 3,
                 qkv_bias: bool = True, impl: str = "auto") -> None:
        super().__init__()
        if num_heads % len(dilations) or dim % num_heads:
            raise ValueError(f"MSDA needs heads ({num_heads}) divisible by the number of dilations "
                             f"({len(dilations)}) and dim ({dim}) divisible by heads.")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}.")
        self.dim, self.num_heads, self.dilations = dim, num_heads, tuple(dilations)
        self.kernel_size, self.head_dim, self.impl = kernel_size, dim // num_heads, impl
        # A 1x1 conv as in the official code, so its checkpoint loads without reshaping.
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # The fused kernel reads the dilations from device memory; a buffer moves with the module and
        # needs no host-to-device copy per call (which a CUDA graph capture would refuse). Not saved.
        self.register_buffer("dilation_table", torch.tensor(self.dilations, dtype=torch.int32), persistent=False)

    def resolved_impl(self, x: torch.Tensor) -> str:
        """The implementation ``forward`` uses for input ``x`` (``impl`` with ``"auto"`` resolved)."""
        if self.impl != "auto":
            return self.impl
        if torch.compiler.is_compiling():
            return "shift"
        return "fused" if fused_msda_available(x) and self.kernel_size % 2 else "gather"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = len(self.dilations)
        qkv = self.qkv(x.permute(0, 3, 1, 2))  # B,3C,H,W; channels ordered (qkv, group, head, d)
        impl = self.resolved_impl(x)
        if impl == "fused":
            return self.proj(msda_fused(qkv, self.num_heads, self.dilation_table, self.kernel_size))
        qkv = qkv.reshape(b, 3, n, c // n, h, w)
        fn = _MSDA_FNS[impl]
        out = torch.cat([fn(qkv[:, 0, i], qkv[:, 1, i], qkv[:, 2, i], self.head_dim, d, self.kernel_size)
                         for i, d in enumerate(self.dilations)], dim=1)
        return self.proj(out.permute(0, 2, 3, 1))


class GlobalAttention(nn.Module):
    """Global multi-head self-attention on channels-last maps, MONAI's fused ``SABlock`` inside.

    Shapes:
        (B, H, W, C) -> (B, H, W, C)
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.attn = SABlock(dim, num_heads, qkv_bias=qkv_bias, use_flash_attention=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        return self.attn(x.reshape(b, h * w, c)).reshape(b, h, w, c)


class DilateFormerBlock(nn.Module):
    """x + DWConv(x), then pre-norm attention and MLP residuals (LayerNorm eps 1e-6, MLP ratio 4).

    Args:
        dim: channels.
        num_heads: attention heads.
        dilated: MSDA when True, global self-attention when False.
        dilations, kernel_size, attention_impl: MSDA settings.
        mlp_ratio: hidden width of the MLP over ``dim``.
        drop_path: stochastic depth rate of this block.

    Shapes:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, dim: int, num_heads: int, dilated: bool, dilations: Sequence[int] = (1, 2, 3),
                 kernel_size: int = 3, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 attention_impl: str = "auto") -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # conditional position encoding
        self.norm1 = FusedLayerNorm(dim, eps=1e-6)
        self.attn: nn.Module
        if dilated:
            self.attn = MultiScaleDilatedAttention(dim, num_heads, dilations, kernel_size, impl=attention_impl)
        else:
            self.attn = GlobalAttention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = FusedLayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dropout_rate=0.0, act="GELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        y = x.permute(0, 2, 3, 1)
        y = y + self.drop_path(self.attn(self.norm1(y)))
        y = y + self.drop_path(self.mlp(self.norm2(y)))
        return y.permute(0, 3, 1, 2)


class DilateFormerStage(nn.Module):
    """A stack of blocks and an optional stride-2 downsample (conv3x3 s2 with bias, then BatchNorm).

    ``forward`` returns the stage output before downsampling (the pyramid level) and the
    downsampled map that feeds the next stage.
    """

    def __init__(self, dim: int, out_dim: int | None, depth: int, num_heads: int, dilated: bool,
                 drop_path: Sequence[float], **block_kwargs) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            DilateFormerBlock(dim, num_heads, dilated, drop_path=drop_path[i], **block_kwargs) for i in range(depth)
        ])
        self.downsample = (
            Convolution(2, dim, out_dim, strides=2, kernel_size=3, norm="BATCH", act=None, bias=True)
            if out_dim else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.blocks(x)
        return x, (self.downsample(x) if self.downsample is not None else None)


class DilateFormer(nn.Module):
    """DilateFormer as a 4-level feature pyramid (strides 4, 8, 16, 32).

    Args:
        in_channels: input channels (1 for CT/MRI; the official ImageNet stem has 3).
        embed_dims: channels per stage.
        depths: blocks per stage.
        num_heads: heads per stage (MSDA stages: divisible by ``len(dilations)``).
        dilated_stages: which stages use MSDA (the rest use global self-attention).
        dilations: MSDA dilations.
        kernel_size: MSDA window.
        mlp_ratio: MLP width ratio.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        attention_impl: MSDA implementation, one of ``ATTENTION_IMPLS`` (the same function; ``"auto"``
            picks the fastest for the device, see :class:`MultiScaleDilatedAttention`).
        stem_width: width of the first stem conv (16 in DilateFormer).

    Shapes:
        (B, in_channels, H, W) -> [(B, embed_dims[i], H / 2**(i+2), W / 2**(i+2)) for i in 0..3]
    """

    def __init__(self, in_channels: int = 1, embed_dims: Sequence[int] = (72, 144, 288, 576),
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 dilated_stages: Sequence[bool] = (True, True, False, False), dilations: Sequence[int] = (1, 2, 3),
                 kernel_size: int = 3, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
                 attention_impl: str = "auto", stem_width: int = 16) -> None:
        super().__init__()
        if not (len(embed_dims) == len(depths) == len(num_heads) == len(dilated_stages)):
            raise ValueError("embed_dims, depths, num_heads and dilated_stages must have one entry per stage.")
        self.in_channels = in_channels
        self.embed_dims = tuple(embed_dims)
        self.strides = tuple(2 ** (i + 2) for i in range(len(embed_dims)))
        # Overlapping stride-4 stem: conv-BN-GELU x3, then a plain strided conv (no norm after it).
        s = stem_width
        conv = dict(spatial_dims=2, kernel_size=3, norm="BATCH", act="GELU", bias=False)
        self.stem = nn.Sequential(
            Convolution(in_channels=in_channels, out_channels=s, strides=1, **conv),
            Convolution(in_channels=s, out_channels=2 * s, strides=2, **conv),
            Convolution(in_channels=2 * s, out_channels=4 * s, strides=1, **conv),
            Convolution(2, 4 * s, embed_dims[0], strides=2, kernel_size=3, conv_only=True, bias=False),
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            out_dim = embed_dims[i + 1] if i + 1 < len(depths) else None
            stage_dpr = dpr[sum(depths[:i]):sum(depths[:i + 1])]  # this stage's share of the drop-path ramp
            self.stages.append(DilateFormerStage(
                embed_dims[i], out_dim, depth, num_heads[i], dilated_stages[i], stage_dpr,
                dilations=dilations, kernel_size=kernel_size, mlp_ratio=mlp_ratio, attention_impl=attention_impl,
            ))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the official code: truncated-normal Linear weights, unit LayerNorm.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            feat, x = stage(x)
            features.append(feat)
        return features


# Official key -> this module's key. The official code keeps each downsample inside its stage and
# names the stem ``patch_embed.proj`` (an nn.Sequential with GELUs at 2, 5, 8).
_OFFICIAL_KEY_RULES = (
    (r"^patch_embed\.proj\.0\.", "stem.0.conv."),
    (r"^patch_embed\.proj\.1\.", "stem.0.adn.N."),
    (r"^patch_embed\.proj\.3\.", "stem.1.conv."),
    (r"^patch_embed\.proj\.4\.", "stem.1.adn.N."),
    (r"^patch_embed\.proj\.6\.", "stem.2.conv."),
    (r"^patch_embed\.proj\.7\.", "stem.2.adn.N."),
    (r"^patch_embed\.proj\.9\.", "stem.3.conv."),
    (r"^stages\.(\d+)\.downsample\.proj\.0\.", r"stages.\1.downsample.conv."),
    (r"^stages\.(\d+)\.downsample\.proj\.1\.", r"stages.\1.downsample.adn.N."),
    (r"\.mlp\.fc1\.", ".mlp.linear1."),
    (r"\.mlp\.fc2\.", ".mlp.linear2."),
)
_OFFICIAL_GLOBAL_ATTN = re.compile(r"^(stages\.\d+\.blocks\.\d+)\.attn\.(qkv|proj)\.(weight|bias)$")
_OFFICIAL_DROPPED = re.compile(r"^(head|norm)\.")  # the classifier; segmentation uses the pyramid


def checkpoint_filter_fn(state_dict: dict, model: DilateFormer) -> dict:
    """Map an official DilateFormer ImageNet checkpoint onto :class:`DilateFormer`.

    Accepts the raw state dict or the training checkpoint that wraps it (``{"model": ...}``), drops
    the classifier (``head.*``, final ``norm.*``), renames stem, downsample, MLP and global-attention
    keys, and adapts the 3-channel stem to ``model.in_channels`` with timm's ``adapt_input_conv``.
    Keys that already use this module's names pass through unchanged.

    Args:
        state_dict: the loaded checkpoint.
        model: the encoder the result is meant for (tells which stages are global-attention ones).

    Returns:
        A state dict for ``model.load_state_dict(..., strict=True)``.
    """
    for wrapper in ("model", "state_dict", "model_ema"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if _OFFICIAL_DROPPED.match(key):
            continue
        m = _OFFICIAL_GLOBAL_ATTN.match(key)
        if m and not isinstance(model.stages[int(key.split(".")[1])].blocks[0].attn, MultiScaleDilatedAttention):
            name = {"qkv": "qkv", "proj": "out_proj"}[m.group(2)]
            key = f"{m.group(1)}.attn.attn.{name}.{m.group(3)}"
        for pattern, repl in _OFFICIAL_KEY_RULES:
            key = re.sub(pattern, repl, key)
        if key == "stem.0.conv.weight" and value.shape[1] != model.in_channels:
            value = adapt_input_conv(model.in_channels, value)
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"Checkpoint tensor {key} has shape {tuple(value.shape)}, the encoder expects "
                             f"{tuple(own[key].shape)}: is it the same DilateFormer variant?")
        out[key] = value
    return out
