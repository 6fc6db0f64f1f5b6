"""A KL-regularized convolutional image autoencoder for latent diffusion (LDM, Rombach et al. 2022).

The encoder maps an RGB image (B, 3, H, W) in [-1, 1] to the mean and log-variance of a
diagonal Gaussian over latents (B, z, H/f, W/f), f = 2 ** (levels - 1); the decoder maps a
latent back to the image. With ``cond_channels > 0`` the decoder is *label-aware*: every
decoder norm is a :class:`~nucsynth.nets.blocks.SPADE` fed with the layout's condition map at
full resolution (resized nearest to each block), so nucleus boundaries can stay pixel-exact
although the latent is f times coarser. The encoder never sees the condition.

Blocks are residual (GroupNorm or SPADE, SiLU, 3x3 conv) without a time embedding;
down-sampling is a stride-2 conv, up-sampling nearest-neighbour then a conv. No attention:
at f = 4 the receptive field of the convolutions covers a nucleus, and attention at full
resolution would dominate the CPU cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nucsynth.device import in_inference_format

from .blocks import SPADE, GroupNorm, group_count

__all__ = ["AutoencoderConfig", "KLAutoencoder", "autoencoder_preset", "AE_PRESETS"]

AE_PRESETS = ("tiny", "base", "paper")


@dataclass
class AutoencoderConfig:
    """Hyperparameters of :class:`KLAutoencoder` (JSON-friendly via ``to_dict``/``from_dict``).

    ``channels`` holds the width of each level, full resolution first; the down-sampling
    factor is ``2 ** (len(channels) - 1)``. ``cond_channels = 0`` gives a plain decoder.
    """

    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: int = 1
    cond_channels: int = 0
    spade_hidden: int = 32
    max_groups: int = 32

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 1 or min(self.channels) < 1:
            raise ValueError(f"AutoencoderConfig.channels must be positive widths, got {self.channels}")
        for name in ("in_channels", "latent_channels", "num_res_blocks", "spade_hidden", "max_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"AutoencoderConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.cond_channels, int) or self.cond_channels < 0:
            raise ValueError(f"AutoencoderConfig.cond_channels must be an integer >= 0, got {self.cond_channels!r}")

    @property
    def factor(self) -> int:
        """Down-sampling factor f: a (H, W) image has (H/f, W/f) latents."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AutoencoderConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(d))


def autoencoder_preset(name: str, cond_channels: int = 0, latent_channels: int = 4) -> AutoencoderConfig:
    """Autoencoder of preset ``name`` (all f = 4):

    - ``tiny``: widths (32, 64, 128), one res-block per level (~1 M parameters; trains on a
      2-core CPU in tens of minutes);
    - ``base``: widths (64, 128, 256), two res-blocks per level (GPU);
    - ``paper``: widths (128, 256, 512), two res-blocks (LDM's f = 4 scale).
    """
    table = {"tiny": ((32, 64, 128), 1), "base": ((64, 128, 256), 2), "paper": ((128, 256, 512), 2)}
    if name not in table:
        raise ValueError(f"unknown autoencoder preset {name!r}; choose one of {list(AE_PRESETS)}")
    widths, blocks = table[name]
    return AutoencoderConfig(latent_channels=latent_channels, channels=widths, num_res_blocks=blocks,
                             cond_channels=cond_channels, spade_hidden=32 if name == "tiny" else 64)


class _Block(nn.Module):
    """Residual block: norm, SiLU, conv, norm, SiLU, conv (+ 1x1 skip when widths differ).
    Norms are SPADE when ``cond_channels > 0`` (then ``forward`` needs ``cond``)."""

    def __init__(self, cin: int, cout: int, cond_channels: int, hidden: int, max_groups: int) -> None:
        super().__init__()
        self.cond = cond_channels > 0
        self.norm1 = SPADE(cin, cond_channels, hidden, max_groups) if self.cond else GroupNorm(group_count(cin, max_groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = SPADE(cout, cond_channels, hidden, max_groups) if self.cond else GroupNorm(group_count(cout, max_groups), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip: nn.Module = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def _norm(self, norm: nn.Module, x: Tensor, cond: Tensor | None) -> Tensor:
        return norm(x, cond) if self.cond else norm(x)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:  # noqa: D102
        h = self.conv1(F.silu(self._norm(self.norm1, x, cond)))
        h = self.conv2(F.silu(self._norm(self.norm2, h, cond)))
        return self.skip(x) + h


class KLAutoencoder(nn.Module):
    """Image <-> latent autoencoder; see the module docstring.

    - :meth:`encode` (B, 3, H, W) -> mean, logvar (B, z, H/f, W/f); H, W multiples of f;
    - :meth:`decode` (B, z, h, w) [+ cond (B, Cc, h*f, w*f) if label-aware] -> (B, 3, h*f, w*f).
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.channels
        plain = dict(cond_channels=0, hidden=cfg.spade_hidden, max_groups=cfg.max_groups)
        cond = dict(cond_channels=cfg.cond_channels, hidden=cfg.spade_hidden, max_groups=cfg.max_groups)
        # encoder
        self.enc_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.enc_blocks = nn.ModuleList()
        self.enc_down = nn.ModuleList()
        c = ch[0]
        for level, width in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(_Block(c, width, **plain))
                c = width
            self.enc_blocks.append(blocks)
            if level < len(ch) - 1:
                self.enc_down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.enc_mid = _Block(c, c, **plain)
        self.enc_norm = GroupNorm(group_count(c, cfg.max_groups), c)
        self.enc_out = nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)
        # decoder (mirror)
        self.dec_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        self.dec_mid = _Block(c, c, **cond)
        self.dec_blocks = nn.ModuleList()
        self.dec_up = nn.ModuleList()
        for level, width in reversed(list(enumerate(ch))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(_Block(c, width, **cond))
                c = width
            self.dec_blocks.append(blocks)
            if level > 0:
                self.dec_up.append(nn.Conv2d(c, c, 3, padding=1))
        self.dec_norm = (SPADE(c, cfg.cond_channels, cfg.spade_hidden, cfg.max_groups) if cfg.cond_channels
                         else GroupNorm(group_count(c, cfg.max_groups), c))
        self.dec_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    @property
    def factor(self) -> int:
        """Down-sampling factor f."""
        return self.config.factor

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance (each (B, z, H/f, W/f)) of images ``x`` in [-1, 1]."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"KLAutoencoder.encode: x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"KLAutoencoder.encode: image size {tuple(x.shape[-2:])} is not a multiple of {self.factor}")
        h = self.enc_in(in_inference_format(x))  # as the U-Net (CPU: channels-last)
        for level, blocks in enumerate(self.enc_blocks):
            for block in blocks:
                h = block(h)
            if level < len(self.enc_down):
                h = self.enc_down[level](h)
        h = self.enc_mid(h)
        mean, logvar = self.enc_out(F.silu(self.enc_norm(h))).float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """Images (B, 3, h*f, w*f) (not clamped) from latents ``z`` (B, z, h, w).

        ``cond`` (B, cond_channels, h*f, w*f) is required iff the decoder is label-aware
        (zeros = no label information)."""
        cfg = self.config
        if z.ndim != 4 or z.shape[1] != cfg.latent_channels:
            raise ValueError(f"KLAutoencoder.decode: z must be (B, {cfg.latent_channels}, h, w), got {tuple(z.shape)}")
        if cfg.cond_channels:
            want = (z.shape[0], cfg.cond_channels, z.shape[2] * self.factor, z.shape[3] * self.factor)
            if cond is None or tuple(cond.shape) != want:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"KLAutoencoder.decode: this label-aware decoder needs cond of shape {want}, got {got}")
        elif cond is not None:
            raise ValueError("KLAutoencoder.decode: got cond but the decoder is not label-aware (cond_channels = 0)")
        z = in_inference_format(z)  # channels-last on CPU: 0.85 of the NCHW time at 256 px
        cond = None if cond is None else in_inference_format(cond)
        h = self.dec_mid(self.dec_in(z), cond)
        for i, blocks in enumerate(self.dec_blocks):
            for block in blocks:
                h = block(h, cond)
            if i < len(self.dec_up):
                h = self.dec_up[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.dec_norm(h, cond) if cfg.cond_channels else self.dec_norm(h)
        return self.dec_out(F.silu(h))

    def forward(self, x: Tensor, cond: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction, mean and logvar; ``noise`` (like the mean) samples the posterior
        (training), ``None`` decodes the mean."""
        mean, logvar = self.encode(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z.to(x.dtype), cond), mean, logvar
