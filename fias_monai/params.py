# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Parameter counts of the FIAS variants and of the paper's Table 3 ablations of FIAS-tiny.

Used by ``python -m fias_monai params`` and ``scripts/count_parameters.py``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = ["ABLATIONS", "count_parameters", "parameter_table", "parameter_table_markdown"]

#: Table 3 ablations of FIAS-tiny: row name -> FIAS keyword arguments.
ABLATIONS: dict[str, dict] = {
    "no DMK": {"use_dmk": False},
    "Summation fusion": {"fusion": "sum"},
    "no MixAtt": {"decoder": "conv"},
}


def count_parameters(net: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``net`` (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def parameter_table(
    in_channels: int = 1,
    out_channels: int = 9,
    variants: Iterable[str] | None = None,
    ablations: bool = True,
) -> list[tuple[str, int]]:
    """Parameter count of every FIAS variant, then of the FIAS-tiny ablations.

    Args:
        in_channels: image channels.
        out_channels: classes, background included (9 for Synapse, 4 for ACDC and the demo).
        variants: the variants to count (default: all of :data:`fias_monai.networks.FIAS_VARIANTS`).
        ablations: also count the Table 3 ablations of FIAS-tiny (:data:`ABLATIONS`).

    Returns:
        ``[(row name, parameters), ...]``, e.g. ``("FIAS-tiny", 37802647)``.

    Raises:
        ValueError: an unknown variant.
    """
    from .networks import FIAS, FIAS_VARIANTS

    names: Sequence[str] = list(FIAS_VARIANTS) if variants is None else list(variants)
    unknown = [v for v in names if v not in FIAS_VARIANTS]
    if unknown:
        raise ValueError(f"unknown FIAS variant(s) {unknown}; known: {list(FIAS_VARIANTS)}")
    rows = [(f"FIAS-{v}", count_parameters(FIAS(in_channels, out_channels, v))) for v in names]
    if ablations:
        for name, kw in ABLATIONS.items():
            rows.append((f"FIAS-tiny, {name}", count_parameters(FIAS(in_channels, out_channels, "tiny", **kw))))
    return rows


def parameter_table_markdown(rows: Sequence[tuple[str, int]], in_channels: int = 1, out_channels: int = 9) -> str:
    """Markdown table of :func:`parameter_table` rows (thousands separated by commas)."""
    lines = [f"| network (in={in_channels}, classes={out_channels}) | parameters |", "|---|---:|"]
    lines += [f"| {name} | {n:,} |" for name, n in rows]
    return "\n".join(lines) + "\n"
