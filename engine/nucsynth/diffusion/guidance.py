"""Classifier-free guidance (Ho & Salimans 2022) in one batched network call.

Our convention: eps = eps_c + scale * (eps_c - eps_u), so scale 0 is the plain conditional
model. The papers write it differently; :func:`guidance_scale_from` converts:

- SDM / DiffMix / NASDM: eps_u + s (eps_c - eps_u)        -> scale = s - 1 (s = 1.5 -> 0.5)
- NuDiff:                (w + 1) eps_c - w eps_u          -> scale = w     (w = 2 -> 2)
- co-synthesis:          w eps_c + (1 - w) eps_u          -> scale = w - 1 (w = 3 -> 2;
  EndoNuke's w = 0.5 -> -0.5, an interpolation towards the unconditional model)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

NetFn = Callable[[Tensor, Tensor, Any], Tensor]
ModelFn = Callable[[Tensor, Tensor], Tensor]

_CONVENTIONS = {
    "ours": lambda v: v,
    "sdm": lambda v: v - 1.0,  # also DiffMix, NASDM
    "nudiff": lambda v: v,
    "cosynthesis": lambda v: v - 1.0,
}


def guidance_scale_from(value: float, convention: str) -> float:
    """Convert a paper's guidance weight to our ``scale`` (see the module docstring).

    ``convention``: ``"sdm"`` (SDM, DiffMix, NASDM), ``"nudiff"``, ``"cosynthesis"`` or
    ``"ours"``.
    """
    try:
        return float(_CONVENTIONS[convention](float(value)))
    except KeyError:
        raise ValueError(f"unknown guidance convention {convention!r}; expected one of {sorted(_CONVENTIONS)}") from None


def _batch_size(cond: Any) -> int | None:
    if isinstance(cond, Tensor):
        return cond.shape[0] if cond.ndim else None
    if isinstance(cond, Mapping):
        sizes = [_batch_size(v) for v in cond.values()]
    elif isinstance(cond, (list, tuple)):
        sizes = [_batch_size(v) for v in cond]
    else:
        return None
    sizes = [s for s in sizes if s is not None]
    return sizes[0] if sizes else None


def _concat(cond: Any, null: Any, batch: int) -> Any:
    """Stack a condition and its null along the batch (recursing into dicts / tuples); a
    null tensor of batch 1 is broadcast to ``batch``."""
    if isinstance(cond, Tensor):
        if not isinstance(null, Tensor):
            raise TypeError(f"null condition must be a Tensor like the condition, got {type(null).__name__}")
        if null.shape[0] == 1 and batch != 1:
            null = null.expand(batch, *null.shape[1:])
        if null.shape != cond.shape:
            raise ValueError(f"null condition shape {tuple(null.shape)} != condition shape {tuple(cond.shape)}")
        return torch.cat([cond, null.to(cond.device, cond.dtype)], dim=0)
    if isinstance(cond, Mapping):
        if not isinstance(null, Mapping) or set(null) != set(cond):
            raise ValueError("null condition must be a mapping with the same keys as the condition")
        return {k: _concat(cond[k], null[k], batch) for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(null, (list, tuple)) or len(null) != len(cond):
            raise ValueError("null condition must be a sequence of the same length as the condition")
        return type(cond)(_concat(c, u, batch) for c, u in zip(cond, null))
    if cond is None and null is None:
        return None
    raise TypeError(f"unsupported condition type {type(cond).__name__}")


def guided(net_fn: NetFn, cond: Any, null_cond: Any, scale: float, eps_channels: int,
           per_sample: bool = False) -> ModelFn:
    """A ``model_fn(x, t)`` applying classifier-free guidance to ``net_fn(x, t, cond)``.

    One forward pass of the batch [x; x] with [cond; null_cond]; the first ``eps_channels``
    output channels are guided as eps_c + scale * (eps_c - eps_u); any further channels
    (learned variance, other heads) come from the conditional half. ``scale`` == 0 calls
    ``net_fn`` once on the conditional batch only; -1 <= scale < 0 interpolates towards the
    unconditional model (co-synthesis' w < 1). ``cond`` / ``null_cond`` are tensors or
    (nested) dicts / tuples of tensors with the batch first; a null of batch 1 broadcasts.

    ``per_sample``: one network pass per sample instead, of its pair [x_i; x_i] (or of x_i
    alone when ``scale`` == 0), so every sample's result is the same, bit for bit, alone or
    in any batch (CPU kernels choose their float summation order by batch size; see
    :mod:`nucsynth.diffusion.noise`), at the cost of batching across samples.

    The stacked condition [cond; null_cond] is built once and the same tensors go to
    ``net_fn`` at every call, so a network that keeps per-condition work
    (:class:`nucsynth.nets.blocks.ConditionCache`) finds it again at every step.
    """
    if scale < -1:
        raise ValueError(f"guidance scale must be >= -1 (0 = conditional, -1 = unconditional model), got {scale}")
    if eps_channels < 1:
        raise ValueError(f"eps_channels must be >= 1, got {eps_channels}")
    if per_sample:
        return _per_sample(net_fn, cond, null_cond, scale, eps_channels)
    if scale == 0:
        return lambda x, t: net_fn(x, t, cond)
    built: list[tuple[int, Any]] = []  # (batch, [cond; null]) once the batch is known

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        if not built or built[0][0] != batch:
            cond_batch = _batch_size(cond)
            if cond_batch is not None and cond_batch != batch:
                raise ValueError(f"condition batch {cond_batch} != sample batch {batch}")
            built[:] = [(batch, _concat(cond, null_cond, batch))]
        out = net_fn(torch.cat([x, x]), torch.cat([t, t]), built[0][1])
        out_c, out_u = out[:batch], out[batch:]
        eps_c, eps_u = out_c[:, :eps_channels], out_u[:, :eps_channels]
        eps = eps_c + scale * (eps_c - eps_u)
        return torch.cat([eps, out_c[:, eps_channels:]], dim=1)

    return model_fn


def _per_sample(net_fn: NetFn, cond: Any, null_cond: Any, scale: float, eps_channels: int) -> ModelFn:
    """:func:`guided` with one network pass per sample (its ``per_sample`` mode)."""
    from nucsynth.diffusion.noise import row_of

    rows: dict[int, ModelFn] = {}  # sample index -> its guided model_fn, built once

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        cond_batch = _batch_size(cond)
        if cond_batch is not None and cond_batch != batch:
            raise ValueError(f"condition batch {cond_batch} != sample batch {batch}")
        outs = []
        for i in range(batch):
            if i not in rows:
                rows[i] = guided(net_fn, row_of(cond, i, batch), row_of(null_cond, i, batch), scale, eps_channels)
            outs.append(rows[i](x[i : i + 1], row_of(t, i, batch)))
        return torch.cat(outs)

    return model_fn
