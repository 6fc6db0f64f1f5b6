"""Large canvases: overlapping windows of the training size, denoised jointly at every step.

A network trained on W x W patches is asked, at every solver step, for its prediction on
overlapping W x W windows of the whole canvas; the predictions are blended where windows
overlap and the sampler takes ONE step on the whole canvas (MultiDiffusion, Bar-Tal et al.
2023). Because every step sees the blend, neighbouring windows agree on what lies in their
overlap and no seam forms. The blend weight of a window ramps down linearly over the
overlap towards its inner edges (a feathered, partition-of-unity blend rather than
MultiDiffusion's plain average), so no window border is a hard step in the prediction.

Memory is bounded by the window, not the canvas: attention (whose cost grows with the
square of the tokens) only ever sees one window; the canvas-sized tensors are the sampler
state, the condition and the blend accumulators, a few floats per pixel.
:func:`estimate_bytes` gives the peak before anything runs, and :func:`check_memory`
refuses a canvas the machine cannot hold, with the estimate.

The wrapper acts on the diffusion state, pixels or latents alike: it takes ``x_t`` (B, C, h,
w), ``t`` and the condition (B, Cc, H, W) with H = h * scale (scale 1 for a pixel model, or
a condition kept at image resolution for a latent one), the window in state units.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["window_starts", "blend_weights", "windowed", "seam_ratio", "estimate_bytes", "available_bytes",
           "check_memory", "DEFAULT_OVERLAP", "WINDOWS_PER_CALL"]

DEFAULT_OVERLAP = 0.25  # share of the window that overlaps its neighbour on each side
WINDOWS_PER_CALL = 4  # windows evaluated per network call (the memory bound)

NetFn = Callable[[Tensor, Tensor, Any], Tensor]


def window_starts(size: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``window`` covering 0..size with at least ``overlap``
    shared between neighbours; the last window ends exactly at ``size``."""
    if window >= size:
        return [0]
    stride = max(1, window - overlap)
    n = -(-(size - window) // stride) + 1  # ceil
    # spread the n windows evenly: overlaps equal, none below the requested one
    return [round(i * (size - window) / (n - 1)) for i in range(n)]


def _ramp(n: int, overlap: int, lo: bool, hi: bool) -> Tensor:
    """1-D weights: 1 inside, linear ramp over ``overlap`` at an inner edge (lo / hi)."""
    w = torch.ones(n)
    if overlap > 0:
        r = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if lo:
            w[:overlap] = torch.minimum(w[:overlap], r)
        if hi:
            w[n - overlap :] = torch.minimum(w[n - overlap :], r.flip(0))
    return w


def blend_weights(size: tuple[int, int], window: tuple[int, int], overlap: int) -> tuple[list[tuple[int, int]], Tensor]:
    """The window origins (y0, x0) over a canvas of ``size`` and one (wy, wx) weight map per
    origin row/column, stacked (n, 1, wy, wx). Edges on the canvas border are not feathered."""
    (h, w), (wy, wx) = size, window
    ys, xs = window_starts(h, wy, overlap), window_starts(w, wx, overlap)
    origins, maps = [], []
    for i, y0 in enumerate(ys):
        ry = _ramp(wy, min(overlap, wy // 2), i > 0, i < len(ys) - 1)
        for j, x0 in enumerate(xs):
            rx = _ramp(wx, min(overlap, wx // 2), j > 0, j < len(xs) - 1)
            origins.append((y0, x0))
            maps.append(ry[:, None] * rx[None, :])
    return origins, torch.stack(maps)[:, None]


def windowed(net_fn: NetFn, window: int, overlap: float = DEFAULT_OVERLAP, per_call: int = WINDOWS_PER_CALL) -> NetFn:
    """``net_fn(x, t, *conds)`` over overlapping windows of ``window`` (state units) when the
    canvas is larger than one window; unchanged below that (the same calls, the same
    numbers). Each condition is a map (B, [C,] H, W) at an integer multiple of the state's
    resolution (cropped with the window), a per-sample vector (B, F) (repeated), or a
    mapping of these; ``per_call`` windows share one network call."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if not 0.0 <= overlap < 0.5:
        raise ValueError(f"overlap must be in [0, 0.5), got {overlap}")

    def crop(c: Any, y0: int, x0: int, wy: int, wx: int, h: int, w: int) -> Any:
        # maps (B, [C,] H, W) at s times the state's resolution are cropped; vectors pass
        if isinstance(c, Tensor) and c.ndim >= 3 and c.shape[-2] % h == 0 and c.shape[-1] % w == 0:
            s = c.shape[-2] // h
            return c[..., y0 * s : (y0 + wy) * s, x0 * s : (x0 + wx) * s]
        if isinstance(c, Mapping):
            return {k: crop(v, y0, x0, wy, wx, h, w) for k, v in c.items()}
        return c

    def fn(x: Tensor, t: Tensor, *conds: Any) -> Tensor:
        b, _, h, w = x.shape
        if h <= window and w <= window:
            return net_fn(x, t, *conds)
        wy, wx = min(window, h), min(window, w)
        origins, weights = blend_weights((h, w), (wy, wx), int(round(overlap * window)))
        weights = weights.to(x.device, x.dtype)
        out: Tensor | None = None
        total = torch.zeros((1, 1, h, w), device=x.device, dtype=x.dtype)
        for k0 in range(0, len(origins), per_call):
            chunk = origins[k0 : k0 + per_call]
            xs = torch.cat([x[:, :, y0 : y0 + wy, x0 : x0 + wx] for y0, x0 in chunk])
            ts = t.repeat(len(chunk)) if t.ndim else t
            cs = [_cat_conds([crop(c, y0, x0, wy, wx, h, w) for y0, x0 in chunk]) for c in conds]
            pred = net_fn(xs, ts, *cs)
            if out is None:
                out = torch.zeros((b, pred.shape[1], h, w), device=x.device, dtype=pred.dtype)
            for j, (y0, x0) in enumerate(chunk):
                wmap = weights[k0 + j]
                out[:, :, y0 : y0 + wy, x0 : x0 + wx] += pred[j * b : (j + 1) * b] * wmap
                total[:, :, y0 : y0 + wy, x0 : x0 + wx] += wmap
        assert out is not None
        return out / total

    return fn


def seam_ratio(image: Any, window: int, overlap: float = DEFAULT_OVERLAP, shift: int = 0) -> float:
    """How much larger the image gradient is across window borders than inside windows:
    mean |difference of neighbouring pixels| (grey level) over the pixel pairs that straddle
    a window border, divided by the mean over the pairs at least 2 px from any border; both
    axes. 1 = no seam; a canvas that fits one window has no border (returns 1). ``shift``
    moves the borders by that many px: the same figure at positions that are not borders,
    i.e. how much the ratio varies inside windows by chance."""
    import numpy as np

    img = np.asarray(image, dtype=np.float64)
    grey = img.mean(-1) if img.ndim == 3 else img
    ratios_num, ratios_den = [], []
    for axis in (0, 1):
        size = grey.shape[axis]
        w = min(window, size)
        starts = window_starts(size, w, int(round(overlap * window)))
        edges = sorted({x0 for x0 in starts if x0 > 0} | {x0 + w for x0 in starts if x0 + w < size})
        g = np.abs(np.diff(grey, axis=axis)).mean(axis=1 - axis)  # pair (k, k+1) -> g[k]
        border = np.array([e - 1 + shift for e in edges if 0 <= e - 1 + shift < size - 1], dtype=int)
        if border.size == 0:
            continue
        near = np.unique(np.concatenate([border + d for d in (-2, -1, 0, 1, 2)]))
        inside = np.setdiff1d(np.arange(g.size), near)
        ratios_num.append(g[border].mean())
        ratios_den.append(g[inside].mean())
    if not ratios_num:
        return 1.0
    return float(np.mean(ratios_num) / np.mean(ratios_den))


def _cat_conds(conds: list[Any]) -> Any:
    """One condition per window (each with the batch first) -> one batch, window-major."""
    first = conds[0]
    if isinstance(first, Tensor):
        return torch.cat(conds) if first.ndim else first
    if isinstance(first, Mapping):
        return {k: _cat_conds([c[k] for c in conds]) for k in first}
    return first


# ---------------------------------------------------------------------- memory
def _unet_activation_bytes(network: Mapping[str, Any], window: int, guided: bool) -> int:
    """Rough peak activation memory of one window forward of a SpadeUNet config (float32):
    every res-block keeps a few feature maps of its level alive, SPADE its hidden map, and
    attention the (tokens x tokens) score matrix per head."""
    mc = int(network.get("model_channels", 64))
    mult = list(network.get("channel_mult", (1, 2, 4)))
    blocks = int(network.get("num_res_blocks", 2))
    attn = set(int(r) for r in network.get("attention_resolutions", ()))
    head = int(network.get("head_channels", 32) or 32)
    spade = int(network.get("spade_hidden", 128) or 128)
    total = 0
    for level, m in enumerate(mult):
        side = max(1, window // 2**level)
        px = side * side
        ch = mc * m
        total += px * (ch * 6 * (blocks + 1) + spade * 2)  # encoder + decoder skips, temporaries, SPADE
        if side in attn or (window // 2**level) in attn:
            heads = max(1, ch // head)
            total += heads * px * px + 3 * ch * px
    return 4 * total * (2 if guided else 1)


def estimate_bytes(network: Mapping[str, Any], canvas: tuple[int, int], batch: int, channels: int, cond_channels: int,
                   window: int, guided: bool = True, per_call: int = WINDOWS_PER_CALL) -> int:
    """Estimated peak memory (bytes) of sampling ``batch`` canvases of ``canvas`` (state units)
    with a network of config ``network`` trained on ``window``: the canvas-sized tensors
    (sampler state and history, noise, output and blend accumulators, the condition and its
    null, float32) plus one network call on ``per_call`` windows (or the whole canvas when
    it fits one window)."""
    h, w = canvas
    rows = batch * (2 if guided else 1)
    state = 4 * h * w * (batch * channels * 10 + rows * cond_channels)
    side = min(max(h, w), window)
    windows = 1 if max(h, w) <= window else per_call
    return int(state + batch * windows * _unet_activation_bytes(network, side, guided))


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device`` (:func:`nucsynth.device.available_memory`: CUDA's free
    memory; on CPU the kernel's MemAvailable capped by the container's memory limit); None
    where it cannot be told."""
    from nucsynth.device import available_memory

    return available_memory(torch.device(device))


def check_memory(needed: int, device: torch.device | str, what: str) -> None:
    """Refuse (ValueError, before any work) when ``needed`` bytes exceed what ``device`` has
    free, naming both figures."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise ValueError(f"{what} needs about {needed / 2**30:.1f} GiB on {torch.device(device)} but only "
                         f"{free / 2**30:.1f} GiB is free: render a smaller canvas, fewer samples at once "
                         "(--batch-size), or on a device with more memory")
