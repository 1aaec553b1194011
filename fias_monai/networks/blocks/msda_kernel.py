# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Multi-Scale Dilated Attention as one fused Triton kernel (forward and backward).

The same function as :func:`~fias_monai.networks.blocks.dilateformer.msda_reference`, for all dilation
groups of an MSDA layer at once, read straight from the qkv projection's output. Unlike the unfold and
gather forms it materialises no neighbourhood copies: every query loads its ``kernel_size**2`` keys and
values, keeps an online softmax in registers, and writes the output in the token-last layout the output
projection reads. The backward pass recomputes the attention weights from the saved log-sum-exp (as
FlashAttention does) and gives each pixel its query gradient and, gathering from the queries that see
it, its key and value gradients, so no atomics are needed.

Zero padding is reproduced exactly: a neighbour outside the image has logit 0 and value 0 and still
takes part in the softmax, as ``nn.Unfold``'s padded zeros do in the official code.

Triton compiles the kernels for CUDA tensors. ``TRITON_INTERPRET=1`` runs them on CPU tensors through
Triton's interpreter, which is how the CPU tests check them against the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fias_monai.triton_support import interpreting, require_triton_on, tl, triton, triton_runs_on

__all__ = ["msda_fused", "fused_msda_available"]


def fused_msda_available(x: torch.Tensor) -> bool:
    """Whether :func:`msda_fused` can run on ``x``'s device (CUDA with Triton, or Triton's interpreter)."""
    return triton_runs_on(x)


def _configs() -> list:
    """Launch settings Triton's autotuner picks from, per feature-map shape, on first use. The interpreter
    (CPU tests) gets one, so it never benchmarks."""
    if interpreting():
        return [triton.Config({"BLOCK_P": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_P": p}, num_warps=w) for p, w in ((32, 2), (64, 4), (128, 4))]


if triton is not None:

    @triton.jit
    def _program_tile(dil_ptr, H, W, HEADS, HEADS_PER_GROUP, HEAD_DIM, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's work, the same in both kernels: batch item ``b`` and ``head`` (grid axis 1), the
        head's dilation, and BLOCK_P pixels ``p`` (grid axis 0; row ``y``, column ``x``) by BLOCK_D
        channels ``d``, with the masks of the pixels and channels that exist."""
        pid_p = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = pid_n // HEADS
        head = pid_n % HEADS
        dil = tl.load(dil_ptr + head // HEADS_PER_GROUP)
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < H * W
        y = p // W
        x = p % W
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        return b, head, dil, p, pmask, y, x, d, dmask

    @triton.autotune(configs=_configs(), key=["H", "W", "C", "HEADS"])
    @triton.jit
    def _msda_fwd_kernel(qkv_ptr, out_ptr, lse_ptr, dil_ptr, s_b, s_c, s_h, s_w, H, W, C, HEADS, HEADS_PER_GROUP,
                         HEAD_DIM, scale, K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        b, head, dil, p, pmask, y, x, d, dmask = _program_tile(dil_ptr, H, W, HEADS, HEADS_PER_GROUP, HEAD_DIM,
                                                               BLOCK_P, BLOCK_D)
        base = qkv_ptr + b.to(tl.int64) * s_b
        ch = (head * HEAD_DIM + d) * s_c
        pix = y * s_h + x * s_w
        q = tl.load(base + pix[:, None] + ch[None, :], mask=pmask[:, None] & dmask[None, :], other=0.0)
        q = q.to(tl.float32) * scale
        m = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_P], tl.float32)
        acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        for t in range(K * K):  # a loop, not unrolled: unrolling 9 steps made each compile take ~20 s
            yy = y + (t // K - (K - 1) // 2) * dil
            xx = x + (t % K - (K - 1) // 2) * dil
            valid = pmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            nb = (yy * s_h + xx * s_w)[:, None]
            kv_mask = valid[:, None] & dmask[None, :]
            k = tl.load(base + nb + C * s_c + ch[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(base + nb + 2 * C * s_c + ch[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q * k, axis=1)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            e = tl.exp(s - m_new)
            l = l * alpha + e
            acc = acc * alpha[:, None] + e[:, None] * v
            m = m_new
        out = acc / l[:, None]
        tok = b.to(tl.int64) * H * W + p  # token index of the (B, H, W, ...) outputs
        tl.store(out_ptr + tok[:, None] * C + (head * HEAD_DIM + d)[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=pmask[:, None] & dmask[None, :])
        tl.store(lse_ptr + tok * HEADS + head, m + tl.log(l), mask=pmask)

    @triton.autotune(configs=_configs(), key=["H", "W", "C", "HEADS"])
    @triton.jit
    def _msda_bwd_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, dil_ptr, s_b, s_c, s_h, s_w, H, W, C,
                         HEADS, HEADS_PER_GROUP, HEAD_DIM, scale, K: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        b, head, dil, p, pmask, y, x, d, dmask = _program_tile(dil_ptr, H, W, HEADS, HEADS_PER_GROUP, HEAD_DIM,
                                                               BLOCK_P, BLOCK_D)
        base_off = b.to(tl.int64) * s_b
        ch = (head * HEAD_DIM + d) * s_c
        pix = (y * s_h + x * s_w)[:, None]
        own_mask = pmask[:, None] & dmask[None, :]
        tok0 = b.to(tl.int64) * H * W
        dch = (head * HEAD_DIM + d)[None, :]
        # this pixel as a query (q, dout, lse, delta) and as a key (k, v)
        q = tl.load(qkv_ptr + base_off + pix + ch[None, :], mask=own_mask, other=0.0).to(tl.float32)
        k = tl.load(qkv_ptr + base_off + pix + C * s_c + ch[None, :], mask=own_mask, other=0.0).to(tl.float32)
        v = tl.load(qkv_ptr + base_off + pix + 2 * C * s_c + ch[None, :], mask=own_mask, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + (tok0 + p)[:, None] * C + dch, mask=own_mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + (tok0 + p) * HEADS + head, mask=pmask, other=0.0)
        delta = tl.load(delta_ptr + (tok0 + p) * HEADS + head, mask=pmask, other=0.0)
        dq = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        dk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        for t in range(K * K):
            oy = (t // K - (K - 1) // 2) * dil
            ox = (t % K - (K - 1) // 2) * dil
            # as a query: the neighbour at +offset is a key of this pixel
            yy = y + oy
            xx = x + ox
            valid = pmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            nb = (yy * s_h + xx * s_w)[:, None]
            kv_mask = valid[:, None] & dmask[None, :]
            kn = tl.load(qkv_ptr + base_off + nb + C * s_c + ch[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            vn = tl.load(qkv_ptr + base_off + nb + 2 * C * s_c + ch[None, :], mask=kv_mask, other=0.0)
            prob = tl.exp(tl.sum(q * kn, axis=1) * scale - lse)
            ds = prob * (tl.sum(do * vn.to(tl.float32), axis=1) - delta)
            dq += ds[:, None] * kn
            # as a key: the query at -offset sees this pixel through the same offset
            ry = y - oy
            rx = x - ox
            rvalid = pmask & (ry >= 0) & (ry < H) & (rx >= 0) & (rx < W)
            r_mask = rvalid[:, None] & dmask[None, :]
            rtok = tok0 + ry * W + rx
            qr = tl.load(qkv_ptr + base_off + (ry * s_h + rx * s_w)[:, None] + ch[None, :], mask=r_mask,
                         other=0.0).to(tl.float32)
            dor = tl.load(dout_ptr + rtok[:, None] * C + dch, mask=r_mask, other=0.0).to(tl.float32)
            lse_r = tl.load(lse_ptr + rtok * HEADS + head, mask=rvalid, other=0.0)
            delta_r = tl.load(delta_ptr + rtok * HEADS + head, mask=rvalid, other=0.0)
            prob_r = tl.where(rvalid, tl.exp(tl.sum(qr * k, axis=1) * scale - lse_r), 0.0)
            ds_r = prob_r * (tl.sum(dor * v, axis=1) - delta_r)
            dk += ds_r[:, None] * qr
            dv += prob_r[:, None] * dor
        ty = dqkv_ptr.dtype.element_ty
        tl.store(dqkv_ptr + base_off + pix + ch[None, :], (dq * scale).to(ty), mask=own_mask)
        tl.store(dqkv_ptr + base_off + pix + C * s_c + ch[None, :], (dk * scale).to(ty), mask=own_mask)
        tl.store(dqkv_ptr + base_off + pix + 2 * C * s_c + ch[None, :], dv.to(ty), mask=own_mask)


def _launch_args(qkv: torch.Tensor, num_heads: int, dilations: torch.Tensor, kernel_size: int):
    b, c3, h, w = qkv.shape
    c = c3 // 3
    head_dim = c // num_heads

    def grid(meta):
        return triton.cdiv(h * w, meta["BLOCK_P"]), b * num_heads

    common = (*qkv.stride(), h, w, c, num_heads, num_heads // dilations.numel(), head_dim, head_dim**-0.5)
    meta = dict(K=kernel_size, BLOCK_D=triton.next_power_of_2(head_dim))
    return grid, common, meta


class _FusedMSDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, num_heads: int, dilations: torch.Tensor, kernel_size: int) -> torch.Tensor:
        b, c3, h, w = qkv.shape
        out = qkv.new_empty(b, h, w, c3 // 3)
        lse = qkv.new_empty(b, h, w, num_heads, dtype=torch.float32)
        grid, common, meta = _launch_args(qkv, num_heads, dilations, kernel_size)
        _msda_fwd_kernel[grid](qkv, out, lse, dilations, *common, **meta)
        ctx.save_for_backward(qkv, out, lse, dilations)
        ctx.num_heads, ctx.kernel_size = num_heads, kernel_size
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        qkv, out, lse, dilations = ctx.saved_tensors
        b, h, w, c = out.shape
        dout = dout.contiguous()
        # delta = rowsum(dout * out) per query and head, the softmax backward's correction term
        delta = (dout.float() * out.float()).view(b, h, w, ctx.num_heads, -1).sum(-1).contiguous()
        dqkv = torch.empty_like(qkv)  # same strides as qkv (NCHW or channels_last)
        grid, common, meta = _launch_args(qkv, ctx.num_heads, dilations, ctx.kernel_size)
        _msda_bwd_kernel[grid](qkv, dout, lse, delta, dqkv, dilations, *common, **meta)
        return dqkv, None, None, None


def msda_fused(qkv: torch.Tensor, num_heads: int, dilations: Sequence[int] | torch.Tensor,
               kernel_size: int = 3) -> torch.Tensor:
    """Multi-scale dilated attention of all dilation groups, fused.

    Args:
        qkv: (B, 3C, H, W) output of the qkv projection, channels ordered (q/k/v, group, head, head_dim),
            NCHW or channels_last memory.
        num_heads: heads over all groups (divisible by the number of dilations).
        dilations: one dilation per channel group, a sequence or an int32 tensor on ``qkv``'s device.
        kernel_size: odd window size (3 in DilateFormer).

    Returns:
        (B, H, W, C) attention output, token-last, channels ordered (group, head, head_dim), equal to
        the reference formulation applied group by group and concatenated.
    """
    require_triton_on(qkv, "msda_fused", "use impl='auto' or 'gather'")
    if kernel_size % 2 != 1:
        raise ValueError(f"msda_fused needs an odd kernel_size, got {kernel_size}.")
    if not torch.is_tensor(dilations):
        dilations = torch.tensor(list(dilations), dtype=torch.int32, device=qkv.device)
    return _FusedMSDA.apply(qkv, num_heads, dilations, kernel_size)
