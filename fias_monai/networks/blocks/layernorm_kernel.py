# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""LayerNorm over narrow channel rows as a Triton kernel (forward and backward), and the module using it.

FIAS-tiny normalises 65,536 tokens of 72 channels per batch in each stage-1 block (and 16,384 of 144 in
stage 2). PyTorch's LayerNorm kernels, built for wide rows, took 0.49 ms forward and backward per
stage-1 norm on an H100, about twenty times the time of reading and writing the data; under bf16 autocast
they also return float32, so the next projection reads twice the bytes. This kernel gives each program a
tile of rows, keeps a row's mean and 1/std in float32 registers and writes the result in the input's
dtype (as timm's fast-norm path and apex's fused LayerNorm do under autocast). The backward pass writes
the input gradient and per-program partial sums of the weight and bias gradients, added up afterwards
in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fias_monai.triton_support import tl, triton, triton_runs_on

__all__ = ["FusedLayerNorm", "layer_norm_fused", "fused_layer_norm_available"]

_MAX_WIDTH = 1024  # wider rows are what PyTorch's kernel is good at
_TILE = 4096  # elements (rows x padded width) per program


def fused_layer_norm_available(x: torch.Tensor) -> bool:
    """Whether :func:`layer_norm_fused` can run on ``x`` (CUDA with Triton, or the interpreter)."""
    return x.shape[-1] <= _MAX_WIDTH and triton_runs_on(x)


if triton is not None:

    @triton.jit
    def _rows(x_ptr, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        n = tl.arange(0, BLOCK_N)
        nmask = n < N
        mask = (r < R)[:, None] & nmask[None, :]
        offs = r.to(tl.int64)[:, None] * N + n[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return r, n, nmask, mask, offs, x

    @triton.jit
    def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, R, N, eps, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        r, n, nmask, mask, offs, x = _rows(x_ptr, R, N, BLOCK_R, BLOCK_N)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        w = tl.load(w_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + r, mean, mask=r < R)
        tl.store(rstd_ptr + r, rstd, mask=r < R)

    @triton.jit
    def _ln_bwd_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, R, N,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        r, n, nmask, mask, offs, x = _rows(x_ptr, R, N, BLOCK_R, BLOCK_N)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + r, mask=r < R, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=r < R, other=0.0)
        w = tl.load(w_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        pid = tl.program_id(0)
        tl.store(dw_ptr + pid * BLOCK_N + n, tl.sum(dy * xhat, axis=0))
        tl.store(db_ptr + pid * BLOCK_N + n, tl.sum(dy, axis=0))


def _launch(n: int, rows: int):
    block_n = triton.next_power_of_2(n)
    block_r = max(1, min(_TILE // block_n, triton.next_power_of_2(rows)))
    return block_r, block_n, (triton.cdiv(rows, block_r),)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        x2 = x.reshape(-1, n)  # a view for contiguous rows
        rows = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_r, block_n, grid = _launch(n, rows)
        _ln_fwd_kernel[grid](x2, weight, bias, y, mean, rstd, rows, n, eps, BLOCK_R=block_r, BLOCK_N=block_n,
                             num_warps=4)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape, ctx.bias_dtype = x.shape, bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dy = dy.reshape(rows, n).contiguous()
        dx = torch.empty_like(x2)
        block_r, block_n, grid = _launch(n, rows)
        dw = torch.empty(grid[0], block_n, device=x2.device, dtype=torch.float32)
        db = torch.empty_like(dw)
        _ln_bwd_kernel[grid](x2, weight, dy, mean, rstd, dx, dw, db, rows, n, BLOCK_R=block_r, BLOCK_N=block_n,
                             num_warps=4)
        dw = dw.sum(0)[:n].to(weight.dtype)
        db = db.sum(0)[:n].to(ctx.bias_dtype)
        return dx.view(ctx.shape), dw, db, None


def layer_norm_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim with float32 statistics; the output has ``x``'s dtype.

    Args:
        x: (..., N) with N <= 1024, on CUDA (or in Triton's interpreter); made contiguous if it is not.
        weight, bias: (N,).
        eps: added to the variance.
    """
    if not fused_layer_norm_available(x):
        raise RuntimeError(f"layer_norm_fused runs on CUDA tensors (or in Triton's interpreter) with rows of at "
                           f"most {_MAX_WIDTH}; got {tuple(x.shape)} on {x.device}.")
    return _LayerNorm.apply(x.contiguous(), weight, bias, eps)


class FusedLayerNorm(nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` (same parameters and state-dict keys) that runs the Triton kernel on
    CUDA for affine norms over one dim of up to 1024 channels. Under autocast its output keeps the
    input's dtype (bf16) instead of float32; statistics are float32 either way. Elsewhere, under
    torch.compile (whose own fusion covers it) and in TorchScript, it is ``nn.LayerNorm``.

    Shapes:
        (..., N) -> (..., N)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (len(self.normalized_shape) == 1 and self.weight is not None and self.bias is not None
                and not torch.jit.is_scripting() and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling() and fused_layer_norm_available(x)):
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") and x.is_cuda else x.dtype
            return layer_norm_fused(x.to(dtype), self.weight, self.bias, self.eps)
        return super().forward(x)
