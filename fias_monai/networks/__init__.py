"""FIAS networks."""

from .fias import FIAS, FIAS_VARIANTS, fias_base, fias_small, fias_tiny, load_dilateformer_checkpoint

__all__ = ["FIAS", "FIAS_VARIANTS", "fias_tiny", "fias_small", "fias_base", "load_dilateformer_checkpoint"]
