"""Neural networks of the engine: the SPADE U-Net and its presets, the RRDB point-map
encoder, text encoders, and FLOP/parameter counting."""

from .flops import count_flops, count_params
from .unet import PRESETS, SpadeUNet, UNetConfig, unet_preset

__all__ = ["SpadeUNet", "UNetConfig", "unet_preset", "PRESETS", "count_flops", "count_params"]
