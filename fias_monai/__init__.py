# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""fias-monai: the FIAS segmentation network (ISBI 2025) as a MONAI network and MONAI Bundle."""

from .losses import FeatureMixingLoss
from .networks import FIAS, FIAS_VARIANTS, fias_base, fias_small, fias_tiny

__version__ = "0.1.0"
__all__ = ["FIAS", "FIAS_VARIANTS", "fias_tiny", "fias_small", "fias_base", "FeatureMixingLoss", "__version__"]
