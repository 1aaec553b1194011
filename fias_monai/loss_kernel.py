# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""The statistics of the feature-mixing loss as one fused Triton kernel (forward and backward).

:class:`~fias_monai.losses.FeatureMixingLoss` scores S combinations of N deep-supervision maps (7 of 3
for FIAS), each with softmax Dice and cross-entropy. Everything those need from the full-size maps is
a handful of sums per combination, batch item and class:

- ``ce``: the summed cross-entropy, sum over pixels of ``logsumexp(z) - z[label]`` (times the pixel's
  weight where a cross-entropy weight map is given: the border weighting of the loss);
- ``intersection``: sum over pixels of ``softmax(z)[c] * onehot[c]``;
- ``prob_sum``: sum over pixels of ``softmax(z)[c]``;
- ``label_count``: sum over pixels of ``onehot[c]`` (a constant),

where ``z`` is the combination's mixed logits, ``sum_m weight[s, m] * map_m``. This module computes
them in one pass over the maps: each program reads 1,024 pixels of every map once (in autotuned
sub-tiles), mixes, takes the softmax of each combination in registers and writes its partial sums once;
they are then summed in a fixed order (deterministic, no atomics). The Dice and CE formulas on these small
tensors stay in PyTorch, so their options (smoothing, batch Dice, background) are plain tensor code.

The backward kernel recomputes the softmax of every combination from the maps and writes each map's
gradient directly: for combination s, ``dz = p * (g - sum(p * g)) + dce * (p - onehot)`` with
``g = dI * onehot + dP`` (``dce`` times the pixel's weight, if any), and map m receives
``sum_s weight[s, m] * dz_s``. In PyTorch the same loss stacks S full-size float32 copies of the logits
and their softmax (about 20 kernels and a few hundred MB per step at FIAS's training shape); here it is
two kernels that read the maps once each.

Labels outside ``[0, C)`` count as no class (no one-hot entry, cross-entropy against nothing); the
bundle's data checks reject such labels before training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .triton_support import interpreting, require_triton_on, tl, triton, triton_runs_on

__all__ = ["mixed_softmax_stats", "fused_loss_available", "MAX_MAPS"]

MAX_MAPS = 3  # the kernel reads up to three maps (FIAS's deep-supervision heads)
_PIX = 1024  # pixels per program of the forward kernel (its partial sums' granularity)


def fused_loss_available(x: torch.Tensor) -> bool:
    """Whether :func:`mixed_softmax_stats` can run on ``x``'s device (CUDA with Triton, or the interpreter)."""
    return triton_runs_on(x)


def _configs() -> list:
    """Pixel-tile sizes and warps Triton's autotuner picks from on first use per shape: wide tiles cut
    the number of cross-thread reductions, narrow ones the registers per thread (the backward pass holds
    a dozen tiles). The interpreter (CPU tests) gets one, with several sub-tiles per forward program."""
    if interpreting():
        return [triton.Config({"BLOCK_P": 128}, num_warps=4)]
    return [triton.Config({"BLOCK_P": p}, num_warps=w) for p, w in ((32, 2), (64, 4), (128, 4), (128, 8), (256, 8))]


if triton is not None:

    @triton.jit
    def _tile(x0, x1, x2, lab_ptr, b, p, P, C, s0b, s0c, s0p, s1b, s1c, s1p, s2b, s2c, s2p,
              N_MAPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Pixels ``p`` (BLOCK_P of them) of batch item ``b``: the maps as float32 (BLOCK_P, BLOCK_C) tiles
        (absent maps are zeros), the one-hot labels, and the masks of existing pixels and classes."""
        pm = p < P
        c = tl.arange(0, BLOCK_C)
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        bb = b.to(tl.int64)
        pp = p.to(tl.int64)[:, None]
        l0 = tl.load(x0 + bb * s0b + c[None, :] * s0c + pp * s0p, mask=m2, other=0.0).to(tl.float32)
        l1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        l2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        if N_MAPS > 1:
            l1 = tl.load(x1 + bb * s1b + c[None, :] * s1c + pp * s1p, mask=m2, other=0.0).to(tl.float32)
        if N_MAPS > 2:
            l2 = tl.load(x2 + bb * s2b + c[None, :] * s2c + pp * s2p, mask=m2, other=0.0).to(tl.float32)
        lab = tl.load(lab_ptr + bb * P + p, mask=pm, other=-1)
        onehot = ((c[None, :] == lab[:, None]) & m2).to(tl.float32)
        return l0, l1, l2, onehot, pm, cm, m2, c

    @triton.jit
    def _softmax(w_ptr, s, l0, l1, l2, cm, N_MAPS: tl.constexpr):
        """Combination ``s``'s mixed logits and their softmax over the existing classes, per pixel."""
        z = tl.load(w_ptr + s * N_MAPS) * l0
        if N_MAPS > 1:
            z += tl.load(w_ptr + s * N_MAPS + 1) * l1
        if N_MAPS > 2:
            z += tl.load(w_ptr + s * N_MAPS + 2) * l2
        z = tl.where(cm[None, :], z, float("-inf"))
        zmax = tl.max(z, axis=1)
        e = tl.exp(z - zmax[:, None])
        se = tl.sum(e, axis=1)
        return z, e / se[:, None], zmax + tl.log(se)

    @triton.jit
    def _pixel_weight(cew_ptr, b, p, P, pm, HAS_CEW: tl.constexpr, BLOCK_P: tl.constexpr):
        """The cross-entropy weight of pixels ``p`` of batch item ``b``: read from the weight map, or 1."""
        w = tl.full([BLOCK_P], 1.0, tl.float32)
        if HAS_CEW:
            w = tl.load(cew_ptr + b.to(tl.int64) * P + p, mask=pm, other=0.0)
        return w

    @triton.autotune(configs=_configs(), key=["P", "C", "S", "N_MAPS", "HAS_CEW"])
    @triton.jit
    def _stats_fwd_kernel(x0, x1, x2, lab_ptr, cew_ptr, w_ptr, ce_ptr, inter_ptr, psum_ptr, count_ptr, B, P, C, NBLK,
                          s0b, s0c, s0p, s1b, s1c, s1p, s2b, s2c, s2p, S: tl.constexpr, N_MAPS: tl.constexpr,
                          HAS_CEW: tl.constexpr, PIX: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        # PIX pixels per program, in sub-tiles of BLOCK_P; the partial sums of every combination are
        # accumulated as rows of small (S_PAD, BLOCK_C) tiles and written once. PIX is fixed, so the
        # partial-sum layout is the same whichever BLOCK_P the autotuner picks.
        b = tl.program_id(1)
        blk = tl.program_id(0)
        srow = tl.arange(0, S_PAD)
        acc_inter = tl.zeros([S_PAD, BLOCK_C], tl.float32)
        acc_psum = tl.zeros([S_PAD, BLOCK_C], tl.float32)
        acc_ce = tl.zeros([S_PAD], tl.float32)
        acc_count = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, PIX, BLOCK_P):
            p = blk * PIX + start + tl.arange(0, BLOCK_P)
            l0, l1, l2, onehot, pm, cm, m2, c = _tile(x0, x1, x2, lab_ptr, b, p, P, C, s0b, s0c, s0p, s1b, s1c, s1p,
                                                      s2b, s2c, s2p, N_MAPS, BLOCK_P, BLOCK_C)
            acc_count += tl.sum(onehot, axis=0)
            wpix = _pixel_weight(cew_ptr, b, p, P, pm, HAS_CEW, BLOCK_P)
            for s in tl.static_range(S):
                z, prob, lse = _softmax(w_ptr, s, l0, l1, l2, cm, N_MAPS)
                z_label = tl.sum(tl.where(onehot > 0, z, 0.0), axis=1)
                ce = tl.sum(tl.where(pm, (lse - z_label) * wpix, 0.0), axis=0)
                prob = tl.where(m2, prob, 0.0)
                this = (srow == s)[:, None]
                acc_inter = tl.where(this, acc_inter + tl.sum(prob * onehot, axis=0)[None, :], acc_inter)
                acc_psum = tl.where(this, acc_psum + tl.sum(prob, axis=0)[None, :], acc_psum)
                acc_ce = tl.where(srow == s, acc_ce + ce, acc_ce)
        c = tl.arange(0, BLOCK_C)
        rows = (srow * B + b) * NBLK + blk
        smask = srow < S
        tl.store(ce_ptr + rows, acc_ce, mask=smask)
        tl.store(inter_ptr + rows[:, None] * BLOCK_C + c[None, :], acc_inter, mask=smask[:, None])
        tl.store(psum_ptr + rows[:, None] * BLOCK_C + c[None, :], acc_psum, mask=smask[:, None])
        tl.store(count_ptr + (b * NBLK + blk) * BLOCK_C + c, acc_count)

    @triton.autotune(configs=_configs(), key=["P", "C", "S", "N_MAPS", "HAS_CEW"])
    @triton.jit
    def _stats_bwd_kernel(x0, x1, x2, lab_ptr, cew_ptr, w_ptr, dce_ptr, dinter_ptr, dpsum_ptr, g0, g1, g2, B, P, C,
                          s0b, s0c, s0p, s1b, s1c, s1p, s2b, s2c, s2p, S: tl.constexpr, N_MAPS: tl.constexpr,
                          HAS_CEW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        l0, l1, l2, onehot, pm, cm, m2, c = _tile(x0, x1, x2, lab_ptr, b, p, P, C, s0b, s0c, s0p, s1b, s1c, s1p,
                                                  s2b, s2c, s2p, N_MAPS, BLOCK_P, BLOCK_C)
        wpix = _pixel_weight(cew_ptr, b, p, P, pm, HAS_CEW, BLOCK_P)
        d0 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        d1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        d2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for s in tl.static_range(S):
            z, prob, lse = _softmax(w_ptr, s, l0, l1, l2, cm, N_MAPS)
            prob = tl.where(m2, prob, 0.0)
            row = s * B + b
            d_inter = tl.load(dinter_ptr + row * C + c, mask=cm, other=0.0)
            d_psum = tl.load(dpsum_ptr + row * C + c, mask=cm, other=0.0)
            d_ce = tl.load(dce_ptr + row)
            g = d_inter[None, :] * onehot + d_psum[None, :]  # d loss / d softmax
            dz = prob * (g - tl.sum(prob * g, axis=1)[:, None]) + (d_ce * wpix)[:, None] * (prob - onehot)
            dz = tl.where(m2, dz, 0.0)
            d0 += tl.load(w_ptr + s * N_MAPS) * dz
            if N_MAPS > 1:
                d1 += tl.load(w_ptr + s * N_MAPS + 1) * dz
            if N_MAPS > 2:
                d2 += tl.load(w_ptr + s * N_MAPS + 2) * dz
        pp = p.to(tl.int64)[:, None]
        bb = b.to(tl.int64)
        tl.store(g0 + bb * s0b + c[None, :] * s0c + pp * s0p, d0.to(g0.dtype.element_ty), mask=m2)
        if N_MAPS > 1:
            tl.store(g1 + bb * s1b + c[None, :] * s1c + pp * s1p, d1.to(g1.dtype.element_ty), mask=m2)
        if N_MAPS > 2:
            tl.store(g2 + bb * s2b + c[None, :] * s2c + pp * s2p, d2.to(g2.dtype.element_ty), mask=m2)


def _flat_strides(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(x, (batch, class, pixel) strides) with the spatial dims read as one flat pixel axis. NCHW and
    channels_last maps qualify as they are; anything else is made contiguous first."""
    spatial = x.shape[2:]
    inner = x.stride()[-1]
    expected = [inner]
    for size in reversed(spatial[1:]):
        expected.insert(0, expected[0] * size)
    if list(x.stride()[2:]) != expected:
        x = x.contiguous()
        inner = 1
    return x, (x.stride(0), x.stride(1), inner)


def _launch(maps: Sequence[torch.Tensor]):
    pixels = maps[0][0, 0].numel()
    flat = [_flat_strides(m) for m in maps]
    tensors = [t for t, _ in flat] + [flat[0][0]] * (MAX_MAPS - len(maps))
    strides = [s for _, st in flat for s in st] + [0, 0, 0] * (MAX_MAPS - len(maps))
    block_c = max(triton.next_power_of_2(maps[0].shape[1]), 2)
    return tensors, strides, block_c, pixels


class _MixedSoftmaxStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: torch.Tensor, labels: torch.Tensor, ce_weight: torch.Tensor | None, *maps: torch.Tensor):
        s, n = weights.shape
        b, c = maps[0].shape[:2]
        tensors, strides, block_c, pixels = _launch(maps)
        nblk = triton.cdiv(pixels, _PIX)
        dev = maps[0].device
        ce = torch.empty(s, b, nblk, device=dev, dtype=torch.float32)
        inter = torch.empty(s, b, nblk, block_c, device=dev, dtype=torch.float32)
        psum = torch.empty_like(inter)
        count = torch.empty(b, nblk, block_c, device=dev, dtype=torch.float32)
        has_cew = ce_weight is not None
        cew = ce_weight if has_cew else ce  # an unused pointer argument: any tensor does
        _stats_fwd_kernel[(nblk, b)](*tensors, labels, cew, weights, ce, inter, psum, count, b, pixels, c, nblk,
                                     *strides, S=s, N_MAPS=n, HAS_CEW=has_cew, PIX=_PIX,
                                     S_PAD=max(triton.next_power_of_2(s), 2), BLOCK_C=block_c)
        # the maps as the kernel read them (the same tensors unless one had to be made contiguous)
        ctx.save_for_backward(weights, labels, cew, *tensors[:n])
        ctx.has_cew = has_cew
        ctx.strides, ctx.block_c, ctx.pixels = strides, block_c, pixels
        # per-tile partial sums, added up in a fixed order: the same value on every run
        count = count.sum(1)[..., :c]
        ctx.mark_non_differentiable(count)
        return ce.sum(2), inter.sum(2)[..., :c], psum.sum(2)[..., :c], count

    @staticmethod
    def backward(ctx, d_ce, d_inter, d_psum, _d_count):
        weights, labels, cew, *maps = ctx.saved_tensors
        s, n = weights.shape
        b, c = maps[0].shape[:2]
        pixels = ctx.pixels
        grads = [torch.empty_like(m) for m in maps]  # keeps each map's memory format
        d_ce = torch.zeros(s, b, device=weights.device) if d_ce is None else d_ce.float().contiguous()
        d_inter = torch.zeros(s, b, c, device=weights.device) if d_inter is None else d_inter.float().contiguous()
        d_psum = torch.zeros(s, b, c, device=weights.device) if d_psum is None else d_psum.float().contiguous()
        absent = MAX_MAPS - n  # unused kernel arguments: any tensor does

        def grid(meta):
            return triton.cdiv(pixels, meta["BLOCK_P"]), b

        _stats_bwd_kernel[grid](*maps, *[maps[0]] * absent, labels, cew, weights, d_ce, d_inter, d_psum, *grads,
                                *[grads[0]] * absent, b, pixels, c, *ctx.strides, S=s, N_MAPS=n,
                                HAS_CEW=ctx.has_cew, BLOCK_C=ctx.block_c)
        return (None, None, None, *grads)


def mixed_softmax_stats(maps: Sequence[torch.Tensor], weights: torch.Tensor, labels: torch.Tensor,
                        ce_weight: torch.Tensor | None = None):
    """Cross-entropy and soft-Dice sums of every mixed combination of ``maps``, fused.

    Args:
        maps: 1 to 3 logit maps of one shape (B, C, *spatial), any float dtype, NCHW or channels_last.
        weights: (S, N) float32 mixing table on the maps' device: combination s is
            ``sum_m weights[s, m] * maps[m]`` (0/1 for FIAS's subsets).
        labels: (B, *spatial) or (B, 1, *spatial) class indices.
        ce_weight: optional (B, *spatial) or (B, 1, *spatial) weight of each pixel's cross-entropy (no
            gradient); None weighs every pixel 1.

    Returns:
        ``(ce, intersection, prob_sum, label_count)``: (S, B) summed (weighted) cross-entropy, (S, B, C)
        sums of softmax times one-hot and of softmax, (B, C) label voxel counts (no gradient); float32, all
        differentiable with respect to ``maps`` except the counts.
    """
    if not maps or len(maps) > MAX_MAPS:
        raise ValueError(f"mixed_softmax_stats takes 1 to {MAX_MAPS} maps, got {len(maps)}.")
    require_triton_on(maps[0], "mixed_softmax_stats")
    shape = maps[0].shape
    if any(m.shape != shape for m in maps):
        raise ValueError(f"mixed_softmax_stats needs maps of one shape, got {[tuple(m.shape) for m in maps]}.")
    if weights.shape != (weights.shape[0], len(maps)):
        raise ValueError(f"weights must be (S, {len(maps)}), got {tuple(weights.shape)}.")
    if labels.ndim == len(shape):
        labels = labels[:, 0]
    labels = labels.reshape(shape[0], -1).to(torch.int32).contiguous()
    weights = weights.to(device=maps[0].device, dtype=torch.float32).contiguous()
    if ce_weight is not None:
        if ce_weight.ndim == len(shape):
            ce_weight = ce_weight[:, 0]
        if tuple(ce_weight.shape) != (shape[0], *shape[2:]):
            raise ValueError(f"ce_weight must be (B, *spatial) = {(shape[0], *shape[2:])}, "
                             f"got {tuple(ce_weight.shape)}.")
        ce_weight = ce_weight.detach().reshape(shape[0], -1).to(device=maps[0].device, dtype=torch.float32).contiguous()
    return _MixedSoftmaxStats.apply(weights, labels, ce_weight, *maps)
