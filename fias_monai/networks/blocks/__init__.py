"""The blocks of FIAS, one paper block per module."""

from .caf import FUSIONS, ContextAwareFusion, SumFusion, TransformerOnlyFusion, make_fusion
from .dilateformer import (
    ATTENTION_IMPLS,
    DilateFormer,
    DilateFormerBlock,
    GlobalAttention,
    MultiScaleDilatedAttention,
    checkpoint_filter_fn,
    msda_gathered,
    msda_reference,
    msda_shifted,
)
from .msda_kernel import fused_msda_available, msda_fused
from .dmk import DMKBlock, DMKEncoder
from .full_res_head import FullResolutionHead
from .layernorm_kernel import FusedLayerNorm, fused_layer_norm_available, layer_norm_fused
from .mixatt import (DECODERS, ConvDecoderBlock, MixAttBlock, MonteCarloAttention, PaddedHeadSABlock,
                     make_decoder_block)

__all__ = [
    "FUSIONS",
    "ContextAwareFusion",
    "SumFusion",
    "TransformerOnlyFusion",
    "make_fusion",
    "ATTENTION_IMPLS",
    "DilateFormer",
    "DilateFormerBlock",
    "GlobalAttention",
    "MultiScaleDilatedAttention",
    "checkpoint_filter_fn",
    "msda_gathered",
    "msda_reference",
    "msda_shifted",
    "msda_fused",
    "fused_msda_available",
    "FusedLayerNorm",
    "fused_layer_norm_available",
    "layer_norm_fused",
    "DMKBlock",
    "DMKEncoder",
    "FullResolutionHead",
    "DECODERS",
    "ConvDecoderBlock",
    "MixAttBlock",
    "MonteCarloAttention",
    "PaddedHeadSABlock",
    "make_decoder_block",
]
