"""Neural networks of the engine: the SPADE U-Net and its presets, the RRDB point-map
encoder, text encoders, and FLOP/parameter counting."""

from .blocks import ConditionCache, ConditionFeatures
from .flops import count_flops, count_params
from .rrdb import RRDBEncoder
from .text import BuiltinPromptEncoder, OpenClipTextEncoder, prompt_from_layout
from .unet import PRESETS, SpadeUNet, UNetConfig, unet_preset

__all__ = [
    "SpadeUNet", "UNetConfig", "unet_preset", "PRESETS", "count_flops", "count_params", "RRDBEncoder",
    "BuiltinPromptEncoder", "OpenClipTextEncoder", "prompt_from_layout", "ConditionFeatures", "ConditionCache",
]
