"""Building blocks of the diffusion U-Net (guided-diffusion style, with SPADE conditioning).

- :func:`timestep_embedding`: sinusoidal embedding of (possibly fractional) timesteps.
- :class:`SPADE`: spatially-adaptive normalization (Park et al. 2019) as used by SDM
  (Wang et al. 2022): parameter-free GroupNorm, then gamma/beta predicted from the
  condition map resized (nearest) to the feature size; ``out = x * (1 + gamma) + beta``.
- :class:`ConditionFeatures`, :class:`ConditionCache`: a condition map whose SPADE
  modulation is computed once per block and reused at every solver step of a render
  (gamma/beta depend on the condition and the weights only, never on the noisy image or
  the timestep).
- :class:`ResBlock`: residual block whose output norm is followed by the time embedding's
  scale/shift (``use_scale_shift_norm``), with optional up/down-sampling inside the block.
  Built with ``cond_channels=0`` it uses plain GroupNorm and never takes a condition.
- :class:`AttentionBlock`: multi-head self-attention over pixels with a fixed number of
  channels per head, computed by ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "group_count",
    "timestep_embedding",
    "zero_module",
    "SPADE",
    "ConditionFeatures",
    "ConditionCache",
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
    ``x``, so a label map keeps hard class boundaries at every scale. ``cond`` may also be
    a :class:`ConditionFeatures`, which computes this block's modulation once and reuses it.
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, max_groups: int = 32) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(group_count(channels, max_groups), channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def modulation(self, cond: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 + gamma, beta)`` (B, C, H, W) of condition ``cond`` for features ``x`` (B, C, H, W)."""
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, size=x.shape[-2:], mode="nearest")
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            cond = cond.contiguous(memory_format=torch.channels_last)  # gamma/beta in x's layout
        a = self.shared(cond.to(x.dtype))
        return 1 + self.gamma(a), self.beta(a)

    def forward(self, x: Tensor, cond: "Tensor | ConditionFeatures") -> Tensor:  # noqa: D102
        normed = self.norm(x.float()).to(x.dtype)
        scale, shift = cond.modulation(self, x) if isinstance(cond, ConditionFeatures) else self.modulation(cond, x)
        return normed * scale + shift


class _Budget:
    """Bytes that kept features may still take (shared by the features of one render)."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"the condition-feature budget must be >= 0 bytes, got {limit}")
        self.limit, self.used = int(limit), 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True


def _default_budget(device: torch.device) -> _Budget:
    from nucsynth.device import feature_cache_budget

    return _Budget(feature_cache_budget(device))


class ConditionFeatures:
    """A condition map (B, Cc, h, w) plus the SPADE modulation it gives each block, kept.

    Pass it to a network wherever the condition tensor goes. The first time a
    :class:`SPADE` block sees it, the block computes ``(1 + gamma, beta)`` as usual; under
    ``torch.no_grad()`` the pair is kept (keyed by block, feature size, dtype and autocast
    state) and every later call returns it: a sampler calling the network at every step
    with the same condition pays for SPADE's convolutions once. The output is bit-identical
    to passing the tensor.

    Valid while the network's weights do not change: make one per sampling call. Outside
    ``no_grad`` nothing is kept (training needs the graph).

    ``budget_bytes``: the most memory the kept tensors may take (default
    :func:`nucsynth.device.feature_cache_budget` of the condition's device; ``base`` at
    256 px keeps 0.49 GB per condition map). Blocks past the budget compute their
    modulation at every call, as without a cache.
    """

    def __init__(self, cond: Tensor, budget_bytes: int | None = None, *, _budget: _Budget | None = None) -> None:
        if not isinstance(cond, Tensor) or cond.ndim != 4:
            got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise ValueError(f"ConditionFeatures: the condition must be a (B, C, H, W) tensor, got {got}")
        self.tensor = cond
        self._budget = _budget or (_default_budget(cond.device) if budget_bytes is None else _Budget(budget_bytes))
        self._kept: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def shape(self) -> torch.Size:
        """Shape of the condition map (B, Cc, h, w)."""
        return self.tensor.shape

    @property
    def cached_bytes(self) -> int:
        """Memory taken by the kept features of this condition."""
        return sum(t.numel() * t.element_size() for pair in self._kept.values() for t in pair)

    def modulation(self, spade: SPADE, x: Tensor) -> tuple[Tensor, Tensor]:
        """``spade``'s ``(1 + gamma, beta)`` for features ``x``: kept, or computed (and kept
        when gradients are off and the budget allows)."""
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        key = (spade, tuple(x.shape[-2:]), x.dtype, x.device, amp)
        kept = self._kept.get(key)
        if kept is not None:
            return kept
        pair = spade.modulation(self.tensor, x)
        if not torch.is_grad_enabled() and self._budget.take(sum(t.numel() * t.element_size() for t in pair)):
            self._kept[key] = pair
        return pair


def _fingerprint(cond: Tensor) -> int:
    """A cheap content hash of ``cond`` (equal tensors hash equal; a match is confirmed
    with ``torch.equal``). CPU: Adler-32 of the bytes; elsewhere two reductions."""
    c = cond.detach()
    if c.device.type == "cpu":
        return zlib.adler32(c.contiguous().reshape(-1).view(torch.uint8).numpy())
    f = c.float().reshape(-1)
    ramp = torch.arange(f.numel(), device=f.device, dtype=torch.float32).remainder_(251).add_(1)
    return hash(tuple(torch.stack([f.sum(), (f * ramp).sum()]).tolist()))


class ConditionCache:
    """The :class:`ConditionFeatures` of every condition tensor one sampling call gives a
    network: ``cache(cond)`` returns the same features object whenever ``cond`` holds the
    same values as a condition seen before, so SPADE's work is done once per distinct
    condition and render, whatever the step.

    Matching is by content (shape, dtype, device and values: a fingerprint, confirmed by
    ``torch.equal``), because samplers hand the network new tensor objects at every step:
    rows sliced out of a batch, windows cropped out of a canvas. It also makes the B rows
    of a guided batch's null condition (and every all-zero window) share one set of
    features. Make one cache per sampling call (the kept features assume fixed weights);
    ``budget_bytes`` (default :func:`nucsynth.device.feature_cache_budget`) bounds all of
    its features together.
    """

    def __init__(self, budget_bytes: int | None = None) -> None:
        self._budget_bytes = budget_bytes
        self._budget: _Budget | None = None
        # fingerprint -> [(condition as first seen, its version then, features)]
        self._seen: dict[tuple, list[tuple[Tensor, int, ConditionFeatures]]] = {}

    @property
    def cached_bytes(self) -> int:
        """Memory taken by all kept features."""
        return 0 if self._budget is None else self._budget.used

    @property
    def conditions(self) -> int:
        """Number of distinct conditions seen."""
        return sum(len(v) for v in self._seen.values())

    def __call__(self, cond: Tensor) -> ConditionFeatures:
        """The features object of condition ``cond`` (B, Cc, h, w)."""
        if not isinstance(cond, Tensor):
            raise ValueError(f"ConditionCache: expected a condition tensor, got {type(cond).__name__}")
        bucket = self._seen.setdefault((tuple(cond.shape), cond.dtype, cond.device, _fingerprint(cond)), [])
        for first, version, feats in bucket:
            if first._version == version and (first is cond or torch.equal(first, cond)):
                return feats
        if self._budget is None:
            self._budget = _default_budget(cond.device) if self._budget_bytes is None else _Budget(self._budget_bytes)
        feats = ConditionFeatures(cond, _budget=self._budget)
        bucket.append((cond, cond._version, feats))
        return feats


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
