# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Where the package's Triton kernels can run: one import guard and one device check for all of them
(MSDA, LayerNorm and the feature-mixing loss).

Triton compiles the kernels for CUDA tensors. ``TRITON_INTERPRET=1`` (read when the kernels are
decorated, so it must be set before their modules are imported) runs them on CPU tensors through
Triton's interpreter, which is how the CPU tests check them.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton: the kernel modules import, their kernels are unavailable
    triton = tl = None

__all__ = ["triton", "tl", "interpreting", "triton_runs_on", "require_triton_on"]


def interpreting() -> bool:
    """Whether Triton runs the kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``x``'s device: CUDA with Triton installed, or the interpreter."""
    return triton is not None and (x.is_cuda or interpreting())


def require_triton_on(x: torch.Tensor, name: str, hint: str = "") -> None:
    """Raise a RuntimeError naming ``name`` (and ``hint``, what to use instead) where
    :func:`triton_runs_on` is false: Triton missing, or a tensor outside CUDA and the interpreter."""
    suffix = f"; {hint}" if hint else ""
    if triton is None:
        raise RuntimeError(f"{name} needs Triton, which this torch installation lacks{suffix}.")
    if not triton_runs_on(x):
        raise RuntimeError(f"{name} runs on CUDA tensors (or in Triton's interpreter, TRITON_INTERPRET=1); "
                           f"got a tensor on {x.device}{suffix}.")
