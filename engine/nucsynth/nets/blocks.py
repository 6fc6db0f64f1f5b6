"""Building blocks of the diffusion U-Net (guided-diffusion style, with SPADE conditioning).

- :func:`timestep_embedding`: sinusoidal embedding of (possibly fractional) timesteps.
- :class:`SPADE`: spatially-adaptive normalization (Park et al. 2019) as used by SDM
  (Wang et al. 2022): parameter-free GroupNorm, then gamma/beta predicted from the
  condition map resized (nearest) to the feature size; ``out = x * (1 + gamma) + beta``.
- :class:`ResBlock`: residual block whose output norm is followed by the time embedding's
  scale/shift (``use_scale_shift_norm``), with optional up/down-sampling inside the block.
  Built with ``cond_channels=0`` it uses plain GroupNorm and never takes a condition.
- :class:`AttentionBlock`: multi-head self-attention over pixels with a fixed number of
  channels per head, computed by ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "group_count",
    "timestep_embedding",
    "zero_module",
    "SPADE",
    "GroupNorm",
    "Downsample",
    "Upsample",
    "ResBlock",
    "AttentionBlock",
]


def group_count(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """Number of GroupNorm groups for ``channels``: at most ``max_groups``, and at least
    ``min_per_group`` channels per group for narrow layers (32 groups of 1 channel would
    normalize each channel alone), always a divisor of ``channels``."""
    g = max(1, min(max_groups, channels // min_per_group))
    while channels % g:
        g -= 1
    return g


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of timesteps ``t`` (B,), integer or fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` (output layers start as the identity/zero map)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """Affine GroupNorm computed in float32 (stable under bf16/fp16 autocast)."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return super().forward(x.float()).to(x.dtype)


class SPADE(nn.Module):
    """Spatially-adaptive GroupNorm: ``GN(x) * (1 + gamma(c)) + beta(c)``.

    ``cond`` (B, Cc, h, w) is resized with nearest-neighbour interpolation to the size of
    ``x``, so a label map keeps hard class boundaries at every scale.
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, max_groups: int = 32) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(group_count(channels, max_groups), channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:  # noqa: D102
        normed = self.norm(x.float()).to(x.dtype)
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, size=x.shape[-2:], mode="nearest")
        a = self.shared(cond.to(x.dtype))
        return normed * (1 + self.gamma(a)) + self.beta(a)


class Downsample(nn.Module):
    """Halve the spatial size: strided 3x3 conv, or 2x2 average pooling when ``use_conv`` is false."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op: nn.Module = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.op(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour, then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Residual block with time-embedding scale/shift after the output norm.

    With ``cond_channels > 0`` both norms are :class:`SPADE` and ``forward`` requires a
    condition map; with ``cond_channels == 0`` both are plain GroupNorm and ``cond`` must be
    ``None``. ``updown`` is ``"up"``, ``"down"`` or ``None`` (resampling inside the block,
    as in guided diffusion's ``resblock_updown``).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        *,
        cond_channels: int = 0,
        spade_hidden: int = 128,
        dropout: float = 0.0,
        updown: str | None = None,
        max_groups: int = 32,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if updown not in (None, "up", "down"):
            raise ValueError(f"updown must be None, 'up' or 'down', got {updown!r}")
        self.cond_channels = cond_channels
        self.checkpointing = checkpointing
        self.in_norm = self._norm(channels, cond_channels, spade_hidden, max_groups)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        if updown == "up":
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif updown == "down":
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = self._norm(out_channels, cond_channels, spade_hidden, max_groups)
        self.out_rest = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip: nn.Module = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    @staticmethod
    def _norm(channels: int, cond_channels: int, hidden: int, max_groups: int) -> nn.Module:
        if cond_channels > 0:
            return SPADE(channels, cond_channels, hidden, max_groups)
        return GroupNorm(group_count(channels, max_groups), channels)

    def _apply_norm(self, norm: nn.Module, x: Tensor, cond: Tensor | None) -> Tensor:
        if self.cond_channels > 0:
            if cond is None:
                raise ValueError("this SPADE block needs a condition map, got None")
            return norm(x, cond)
        if cond is not None:
            raise ValueError("this block was built without a condition (cond_channels=0) but got one")
        return norm(x)

    def _forward(self, x: Tensor, emb: Tensor, cond: Tensor | None) -> Tensor:
        h = F.silu(self._apply_norm(self.in_norm, x, cond))
        h = self.in_conv(self.h_upd(h))
        x = self.x_upd(x)
        scale, shift = self.emb(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self._apply_norm(self.out_norm, h, cond) * (1 + scale) + shift
        return self.skip(x) + self.out_rest(h)

    def forward(self, x: Tensor, emb: Tensor, cond: Tensor | None = None) -> Tensor:  # noqa: D102
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, cond, use_reentrant=False)
        return self._forward(x, emb, cond)


class AttentionBlock(nn.Module):
    """Self-attention over all pixels, ``channels // head_channels`` heads, residual,
    zero-initialized output projection (so the block starts as the identity)."""

    def __init__(self, channels: int, head_channels: int = 64, max_groups: int = 32) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention: {channels} channels are not a multiple of head_channels={head_channels}")
        self.heads = channels // head_channels
        self.norm = GroupNorm(group_count(channels, max_groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)
