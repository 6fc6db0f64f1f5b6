"""The diffusion U-Net with SPADE conditioning (SDM, Wang et al. 2022), and its presets.

Layout of the network (guided diffusion, Dhariwal & Nichol 2021):

- the noisy image ``x`` goes through the input conv and the ENCODER (res-blocks with plain
  GroupNorm, attention at the configured resolutions, down-sampling); the encoder never
  sees the condition map;
- the condition map ``cond`` enters the MIDDLE block and EVERY DECODER res-block through
  :class:`~nucsynth.nets.blocks.SPADE` (resized nearest to each block's size);
- the timestep embedding (plus an optional global ``context`` vector through a linear
  layer) modulates every res-block by scale/shift after its output norm;
- optional ``early`` features (B, Ce, H, W) are added after the input conv (1x1 projection),
  optional ``late`` features (B, Cl, H, W) are concatenated before the output conv;
- the output conv is zero-initialized: a fresh network predicts zeros.

``cond_channels = 0`` gives an unconditional U-Net (plain GroupNorm everywhere).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nucsynth.device import in_inference_format

from .blocks import (
    AttentionBlock, ConditionFeatures, Downsample, GroupNorm, ResBlock, Upsample, group_count, timestep_embedding,
    zero_module,
)

__all__ = ["UNetConfig", "SpadeUNet", "unet_preset", "PRESETS"]

PRESETS = ("tiny", "base", "paper")


@dataclass
class UNetConfig:
    """Hyperparameters of :class:`SpadeUNet` (JSON-friendly through ``to_dict``/``from_dict``).

    ``attention_resolutions`` are feature-map sizes in pixels *for an input of
    ``image_size``* (e.g. 32, 16, 8 at 256 px); the network stores them as down-sampling
    factors, so the same levels get attention when it runs on other input sizes.
    Inputs must have sides divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    image_size: int
    in_channels: int
    out_channels: int
    cond_channels: int = 0
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    head_channels: int = 64
    resblock_updown: bool = True
    middle_attention: bool = True
    spade_hidden: int = 128
    dropout: float = 0.0
    context_dim: int = 0
    early_channels: int = 0
    late_channels: int = 0
    max_groups: int = 32
    checkpointing: bool = False

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        for name in ("image_size", "in_channels", "out_channels", "model_channels", "num_res_blocks",
                     "head_channels", "spade_hidden", "max_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {v!r}")
        for name in ("cond_channels", "context_dim", "early_channels", "late_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"UNetConfig.{name} must be an integer >= 0, got {v!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig.channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        factor = self.downsample_factor
        if self.image_size % factor:
            raise ValueError(
                f"UNetConfig: image_size {self.image_size} is not divisible by {factor} "
                f"(2 ** (levels - 1) for channel_mult {self.channel_mult})"
            )
        valid = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        bad = [r for r in self.attention_resolutions if r not in valid]
        if bad:
            raise ValueError(
                f"UNetConfig: attention resolutions {bad} are not feature-map sizes of this network "
                f"(image_size {self.image_size}, levels at {valid} px)"
            )
        for level, mult in enumerate(self.channel_mult):
            ch = mult * self.model_channels
            if self.image_size // 2**level in self.attention_resolutions and ch % self.head_channels:
                raise ValueError(
                    f"UNetConfig: level {level} has {ch} channels, not a multiple of head_channels={self.head_channels}"
                )
        if self.middle_attention and (self.channel_mult[-1] * self.model_channels) % self.head_channels:
            raise ValueError(
                f"UNetConfig: middle block has {self.channel_mult[-1] * self.model_channels} channels, "
                f"not a multiple of head_channels={self.head_channels}"
            )

    @property
    def downsample_factor(self) -> int:
        """Total down-sampling of the encoder; input sides must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def attention_factors(self) -> tuple[int, ...]:
        """Down-sampling factors (1, 2, 4, ...) of the levels that have attention."""
        return tuple(sorted(self.image_size // r for r in self.attention_resolutions))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples as lists)."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a config from another version)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"UNetConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(d))


# Channel multipliers per image size. "paper" follows SDM / guided diffusion (256 px:
# (1,1,2,2,4,4); 128 px: (1,1,2,3,4); 64 px: (1,2,3,4)); "base" keeps the same levels
# (down to 8 px) at a quarter of the width.
_PAPER_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4), 512: (1, 1, 2, 2, 4, 4, 4)}
_BASE_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4), 512: (1, 1, 2, 2, 4, 4, 4)}
# "tiny" stops at 16 px (one attention level, cheap on CPU) and keeps widths at 32/64.
_TINY_MULT = {32: (1, 2), 64: (1, 1, 2), 128: (1, 1, 2, 2), 256: (1, 1, 2, 2, 2), 512: (1, 1, 1, 2, 2, 2)}


def unet_preset(
    name: str,
    image_size: int,
    in_channels: int,
    out_channels: int,
    cond_channels: int,
    context_dim: int = 0,
    early_channels: int = 0,
    late_channels: int = 0,
) -> UNetConfig:
    """The U-Net configuration of preset ``name`` for ``image_size`` px inputs.

    - ``tiny``: ~1.4 M parameters at 64 px, for CPU tests and demos (attention only at 16 px).
    - ``base``: the shipped default; at 256 px it costs 0.086 of ``paper``'s FLOPs per
      forward pass and trains on a 24 GB GPU (see docs/models.md for measured figures).
    - ``paper``: the SDM reference scale (256 base channels, 2 res-blocks per level,
      attention at 32/16/8 px with 64 channels per head, res-block up/down).

    Supported image sizes: 32, 64, 128, 256, 512 (the network also runs on other input
    sizes that are multiples of its down-sampling factor).
    """
    tables = {"tiny": _TINY_MULT, "base": _BASE_MULT, "paper": _PAPER_MULT}
    if name not in tables:
        raise ValueError(f"unknown U-Net preset {name!r}; choose one of {list(PRESETS)}")
    table = tables[name]
    if image_size not in table:
        raise ValueError(f"U-Net preset {name!r}: image_size {image_size} is not supported; choose one of {sorted(table)}")
    mult = table[image_size]
    resolutions = [image_size // 2**i for i in range(len(mult))]
    common = dict(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        cond_channels=cond_channels,
        channel_mult=mult,
        context_dim=context_dim,
        early_channels=early_channels,
        late_channels=late_channels,
        resblock_updown=True,
    )
    if name == "tiny":
        return UNetConfig(
            model_channels=32,
            num_res_blocks=1,
            attention_resolutions=(16,),
            head_channels=32,
            spade_hidden=16,
            **common,
        )
    if name == "base":
        return UNetConfig(
            model_channels=64,
            num_res_blocks=2,
            attention_resolutions=tuple(r for r in resolutions if r in (32, 16, 8)),
            head_channels=64,
            spade_hidden=64,
            **common,
        )
    return UNetConfig(
        model_channels=256,
        num_res_blocks=2,
        attention_resolutions=tuple(r for r in resolutions if r in (32, 16, 8)),
        head_channels=64,
        spade_hidden=128,
        **common,
    )


class SpadeUNet(nn.Module):
    """Guided-diffusion U-Net whose middle and decoder blocks take the condition through SPADE.

    ``forward(x, t, cond=None, context=None, early=None, late=None)``:

    - ``x`` (B, in_channels, H, W): the noisy input; ``t`` (B,): timesteps (original 0..T-1);
    - ``cond`` (B, cond_channels, h, w): required iff ``cond_channels > 0`` (pass zeros for
      the null condition of classifier-free guidance); any size, resized nearest per block;
      or a :class:`~nucsynth.nets.blocks.ConditionFeatures` wrapping it, so that repeated
      calls with the same condition (the steps of a sampler) compute SPADE's gamma/beta once;
    - ``context`` (B, context_dim): required iff ``context_dim > 0``;
    - ``early`` (B, early_channels, H, W), ``late`` (B, late_channels, H, W): required iff
      configured.

    Returns (B, out_channels, H, W). Without gradients (inference) the input is put in
    the device's :func:`~nucsynth.device.inference_memory_format` (channels-last on CPU),
    which changes results only by float rounding (~1e-6).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        mc = cfg.model_channels
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.context_embed = nn.Linear(cfg.context_dim, emb_ch) if cfg.context_dim else None
        self.input_conv = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.early_proj = nn.Conv2d(cfg.early_channels, mc, 1) if cfg.early_channels else None
        attn_ds = set(cfg.attention_factors)

        def res(cin: int, cout: int, cond: int, updown: str | None = None) -> ResBlock:
            return ResBlock(
                cin, emb_ch, cout, cond_channels=cond, spade_hidden=cfg.spade_hidden, dropout=cfg.dropout,
                updown=updown, max_groups=cfg.max_groups, checkpointing=cfg.checkpointing,
            )

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.head_channels, cfg.max_groups)

        # Encoder: plain norms only; it is never given the condition.
        self.encoder = nn.ModuleList()
        skip_chs = [mc]
        ch, ds = mc, 1
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc, 0)]
                ch = mult * mc
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.encoder.append(nn.ModuleList(layers))
                skip_chs.append(ch)
            if level != last:
                down = res(ch, ch, 0, "down") if cfg.resblock_updown else Downsample(ch)
                self.encoder.append(nn.ModuleList([down]))
                skip_chs.append(ch)
                ds *= 2

        middle: list[nn.Module] = [res(ch, ch, cfg.cond_channels)]
        if cfg.middle_attention:
            middle.append(attn(ch))
        middle.append(res(ch, ch, cfg.cond_channels))
        self.middle = nn.ModuleList(middle)

        # Decoder: every res-block takes the condition through SPADE.
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), mult * mc, cfg.cond_channels)]
                ch = mult * mc
                if ds in attn_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, cfg.cond_channels, "up") if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.decoder.append(nn.ModuleList(layers))

        self.out_norm = GroupNorm(group_count(ch, cfg.max_groups), ch)
        self.out_conv = zero_module(nn.Conv2d(ch + cfg.late_channels, cfg.out_channels, 3, padding=1))

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor, cond: Tensor | ConditionFeatures | None) -> Tensor:
        for layer in layers:
            h = layer(h, emb, cond) if isinstance(layer, ResBlock) else layer(h)
        return h

    def _check(self, name: str, value: Tensor | None, channels: int, batch: int, ndim: int,
               size: tuple[int, int] | None = None) -> None:
        """Validate an optional input: present iff configured, with the right shape."""
        if channels == 0:
            if value is not None:
                raise ValueError(f"SpadeUNet: got `{name}` but the network was built with {name} channels = 0")
            return
        if value is None:
            hint = " (zeros for the null condition)" if name == "cond" else ""
            raise ValueError(f"SpadeUNet: this network needs `{name}` with {channels} channels{hint}, got None")
        if value.ndim != ndim or value.shape[0] != batch or value.shape[1] != channels:
            dims = ", H, W" if ndim == 4 else ""
            raise ValueError(f"SpadeUNet: `{name}` must have shape (B={batch}, {channels}{dims}), got {tuple(value.shape)}")
        if size is not None and tuple(value.shape[-2:]) != size:
            raise ValueError(f"SpadeUNet: `{name}` must match the input size {size}, got {tuple(value.shape[-2:])}")

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor | ConditionFeatures | None = None,
        context: Tensor | None = None,
        early: Tensor | None = None,
        late: Tensor | None = None,
    ) -> Tensor:
        """Predict the network output (B, out_channels, H, W); see the class docstring."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"SpadeUNet: x must have shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, hgt, wid = x.shape
        f = cfg.downsample_factor
        if hgt % f or wid % f:
            raise ValueError(f"SpadeUNet: input size {hgt}x{wid} is not divisible by {f} (the network's down-sampling)")
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"SpadeUNet: t must have shape ({b},), got {tuple(t.shape)}")
        cond_map = cond.tensor if isinstance(cond, ConditionFeatures) else cond
        self._check("cond", cond_map, cfg.cond_channels, b, 4)  # any size: SPADE resizes it per block
        self._check("context", context, cfg.context_dim, b, 2)
        self._check("early", early, cfg.early_channels, b, 4, (hgt, wid))
        self._check("late", late, cfg.late_channels, b, 4, (hgt, wid))

        x = in_inference_format(x)  # inference: the memory format fastest on this device
        if isinstance(cond, Tensor):
            cond = in_inference_format(cond)
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(x.dtype))
        if self.context_embed is not None:
            emb = emb + self.context_embed(context.to(emb.dtype))

        h = self.input_conv(x)
        if self.early_proj is not None:
            h = h + self.early_proj(early.to(h.dtype))
        skips = [h]
        for layers in self.encoder:
            h = self._run(layers, h, emb, None)
            skips.append(h)
        h = self._run(self.middle, h, emb, cond)
        for layers in self.decoder:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb, cond)
        h = F.silu(self.out_norm(h))
        if late is not None:
            h = torch.cat([h, late.to(h.dtype)], dim=1)
        return self.out_conv(h)
