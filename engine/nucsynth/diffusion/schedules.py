"""Noise schedules and timestep respacing, shared by Gaussian and multinomial diffusion.

All schedule constants are computed in float64 with numpy; the processes cast them to the
dtype of the tensors they act on only at the point of use.

Conventions: a schedule is an array ``betas`` of length T indexed by t = 0..T-1, where
step t maps x_t-1 -> x_t (x_-1 being the data). ``alphas_cumprod[t]`` = prod_{s<=t}(1 - beta_s)
is the signal share of x_t. A respaced process keeps a sorted subset of original steps
``timesteps`` and recomputes its betas so that its cumulative products at the kept steps are
exactly those of the original process (Nichol & Dhariwal 2021, section 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SCHEDULES = ("linear", "cosine")
COSINE_OFFSET = 0.008  # the small offset s of Nichol & Dhariwal (2021), eq. 17
MAX_BETA = 0.999  # their clipping of the cosine betas near t = T


def make_betas(kind: str = "linear", T: int = 1000) -> np.ndarray:
    """Return the float64 betas (T,) of a named schedule.

    ``"linear"``: Ho et al. (2020), 1e-4 -> 0.02 at T = 1000; for other T both ends are
    scaled by 1000 / T as in improved DDPM, so the process keeps the same total noise.
    ``"cosine"``: Nichol & Dhariwal (2021): abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s) /
    (1 + s)) * pi/2), beta_t = 1 - abar(t+1)/abar(t) clipped at 0.999.
    """
    if not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if kind == "linear":
        if T <= 20:  # the scaled end beta 0.02 * 1000 / T would reach 1 (no signal left)
            raise ValueError(f"the linear schedule needs T > 20 (its scaled betas reach 1), got T={T}")
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if kind == "cosine":
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")


def validate_betas(betas: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return betas as a float64 1-D array, raising ValueError unless all lie in (0, 1]."""
    arr = np.asarray(betas, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0) or np.any(arr > 1):
        raise ValueError("betas must be finite and lie in (0, 1]")
    return arr


SPACINGS = ("uniform", "quadratic", "logsnr")


def space_timesteps(
    T: int, steps: int | Sequence[int], spacing: str = "uniform", alphas_cumprod: np.ndarray | None = None
) -> np.ndarray:
    """Choose the timesteps (indices 0..T-1) a respaced process keeps, sorted ascending.

    ``steps`` an int n (1 <= n <= T): n distinct steps, always including t = 0 (the last
    denoising step) and t = T-1 (the start from pure noise); n = T keeps every step.
    ``spacing``: ``"uniform"`` in t (improved DDPM, DDIM, DiffMix), ``"quadratic"`` in t
    (denser at low noise; DDIM's CIFAR-10 setting) or ``"logsnr"``: uniform in the half
    log signal-to-noise ratio lambda = log(sqrt(abar) / sqrt(1 - abar)), which needs
    ``alphas_cumprod`` (the spacing recommended for DPM-Solver at low resolution).
    ``steps`` a sequence: exactly those timesteps (unique, in 0..T-1); spacing is ignored.
    """
    if not isinstance(steps, (int, np.integer)):
        return _explicit_timesteps(T, steps)
    n = int(steps)
    if not 1 <= n <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {n}")
    if n == 1:
        return np.array([T - 1], dtype=np.int64)
    if spacing == "uniform":
        raw = np.linspace(0, T - 1, n)
    elif spacing == "quadratic":
        raw = np.linspace(0, np.sqrt(T - 1), n) ** 2
    elif spacing == "logsnr":
        if alphas_cumprod is None or len(alphas_cumprod) != T:
            raise ValueError("logsnr spacing needs the process's alphas_cumprod (length T)")
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # decreasing in t
        targets = np.linspace(lam[0], lam[-1], n)
        raw = np.interp(-targets, -lam, np.arange(T, dtype=np.float64))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    return _distinct(np.round(raw).astype(np.int64), T)


def _distinct(kept: np.ndarray, T: int) -> np.ndarray:
    """Make sorted steps strictly increasing within 0..T-1, keeping both ends, by nudging
    collisions (dense spacings round several targets to the same step)."""
    kept = np.sort(kept)
    kept[0], kept[-1] = 0, T - 1
    for k in range(1, len(kept) - 1):
        kept[k] = max(kept[k], kept[k - 1] + 1)
    for k in range(len(kept) - 2, -1, -1):
        kept[k] = min(kept[k], kept[k + 1] - 1)
    return kept


def _explicit_timesteps(T: int, steps: Sequence[int]) -> np.ndarray:
    kept = np.asarray(list(steps), dtype=np.int64)
    if kept.ndim != 1 or kept.size == 0:
        raise ValueError("steps must be an int or a non-empty sequence of timesteps")
    if kept.min() < 0 or kept.max() >= T:
        raise ValueError(f"timesteps must lie in 0..{T - 1}, got {kept.min()}..{kept.max()}")
    unique = np.unique(kept)
    if unique.size != kept.size:
        raise ValueError("timesteps must be unique")
    return unique


def respace_betas(alphas_cumprod: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Betas of the process that visits only the ``kept`` indices of ``alphas_cumprod``.

    beta'_i = 1 - abar[kept[i]] / abar[kept[i-1]] (abar before the first kept step = 1), so
    the respaced cumulative products equal the original ones at the kept steps.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(kept)]
    prev = np.concatenate([[1.0], abar[:-1]])
    return 1.0 - abar / prev
