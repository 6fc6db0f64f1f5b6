"""Samplers over a respaced step set: ancestral, DDIM and DPM-Solver++(2M).

A sampler walks the indices i = n-1 .. 0 of a (respaced) process, calling the network once
per index at the ORIGINAL timestep ``process.timesteps[i]`` and moving x_i -> x_{i-1}; the
last move (i = 0) lands on the data. Every sampler makes exactly one network call per step.

- ``"ancestral"``: x_{i-1} ~ p(x_{i-1} | x_i) with the learned or fixed variance (Ho et al.
  2020; Nichol & Dhariwal 2021). Needs many steps (>= 100); the only one using the learned
  variance.
- ``"ddim"``: Song et al. (2021); ``eta`` = 0 is deterministic, eta = 1 matches the
  ancestral variance beta~. Good from about 50 steps.
- ``"dpm++2m"``: multistep second-order DPM-Solver++ in data (x0) prediction (Lu et al.
  2022), first order at the first step and at the final step to the data. Good at 10-25.

The predicted x0 is clamped to [-1, 1] at every step (``clip_x0``; the data range), and for
DDIM / DPM-Solver the noise is re-derived from the clamped x0.

:class:`Stepper` exposes one step at a time so that a joint loop can step several
processes (e.g. Gaussian image + multinomial labels) with one network call per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from nucsynth.diffusion.gaussian import GaussianDiffusion
from nucsynth.diffusion.noise import Generators, randn
from nucsynth.diffusion.schedules import space_timesteps

METHODS = ("dpm++2m", "ddim", "ancestral")
# Step spacing per method: measured on an analytic Gaussian model (tests), DPM-Solver++ is
# far more accurate uniform in log-SNR, DDIM slightly better quadratic than uniform in t.
DEFAULT_SPACING = {"dpm++2m": "logsnr", "ddim": "quadratic", "ancestral": "uniform"}
ModelFn = Callable[[Tensor, Tensor], Tensor]
ProgressFn = Callable[[int, int], None]




class Stepper:
    """One sampler method over one (respaced) process, advanced one index at a time.

    ``step(model_out, x, i, generator)`` takes the network output at (x_i, timesteps[i]) and
    returns x_{i-1} (the data estimate when i = 0). Steps must be taken in the order
    n-1, n-2, ..., 0 (DPM-Solver++ keeps the previous x0 prediction); a stepper starting
    part-way (partial noising) may begin at any index.
    """

    def __init__(self, process: GaussianDiffusion, method: str = "dpm++2m", eta: float = 0.0, clip_x0: bool = True) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.process = process
        self.method = method
        self.eta = float(eta)
        self.clip_x0 = clip_x0
        abar = process.alphas_cumprod
        self._alpha = np.sqrt(abar)  # signal scale alpha_i
        self._sigma = np.sqrt(1.0 - abar)  # noise scale sigma_i
        self._lambda = np.log(self._alpha) - np.log(self._sigma)  # half log-SNR
        self._prev: tuple[int, Tensor] | None = None  # (index, x0 prediction) for 2M
        self._last_index: int | None = None

    def step(self, model_out: Tensor, x: Tensor, i: int, generator: Generators = None) -> Tensor:
        """Advance x_i -> x_{i-1} given the network output at index i."""
        if not 0 <= i < self.process.num_timesteps:
            raise ValueError(f"step index {i} outside 0..{self.process.num_timesteps - 1}")
        if self._last_index is not None and i != self._last_index - 1:
            raise ValueError(f"steps must go down one index at a time: got {i} after {self._last_index}")
        self._last_index = i
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        if self.method == "ancestral":
            return self._ancestral(model_out, x, t, i, generator)
        pred, _ = self.process.split_output(model_out, x.shape[1])
        x0, eps = self.process.predict_x0_eps(pred, x, t, clip_x0=self.clip_x0)
        if self.method == "ddim":
            return self._ddim(x0, eps, i, generator)
        return self._dpmpp_2m(x, x0, i)

    def _ancestral(self, model_out: Tensor, x: Tensor, t: Tensor, i: int, generator: Generators) -> Tensor:
        out = self.process.p_mean_variance(model_out, x, t, clip_x0=self.clip_x0)
        if i == 0:
            return out["mean"]
        return out["mean"] + torch.exp(0.5 * out["logvar"]) * randn(x.shape, generator, x.device, x.dtype)

    def _ddim(self, x0: Tensor, eps: Tensor, i: int, generator: Generators) -> Tensor:
        abar = self.process.alphas_cumprod[i]
        abar_prev = self.process.alphas_cumprod_prev[i]  # 1 at i = 0: land on the data
        sigma = self.eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
        out = float(np.sqrt(abar_prev)) * x0 + float(np.sqrt(max(1 - abar_prev - sigma**2, 0.0))) * eps
        if sigma > 0 and i > 0:
            out = out + float(sigma) * randn(x0.shape, generator, x0.device, x0.dtype)
        return out

    def _dpmpp_2m(self, x: Tensor, x0: Tensor, i: int) -> Tensor:
        prev = self._prev
        self._prev = (i, x0)
        if i == 0:  # the step to sigma = 0 is first order and lands on the x0 prediction
            return x0
        s, t = i, i - 1
        h = self._lambda[t] - self._lambda[s]
        phi = -np.expm1(-h)  # 1 - exp(-h)
        out = float(self._sigma[t] / self._sigma[s]) * x + float(self._alpha[t] * phi) * x0
        if prev is not None and prev[0] == i + 1:
            r = (self._lambda[s] - self._lambda[prev[0]]) / h
            d1 = (x0 - prev[1]) / float(r)
            out = out + float(0.5 * self._alpha[t] * phi) * d1
        return out


def _resolve_device(device: torch.device | str | None, init_image: Tensor | None, generator: Generators) -> torch.device:
    if device is not None:
        return torch.device(device)
    if init_image is not None:
        return init_image.device
    if isinstance(generator, torch.Generator):
        return generator.device
    if generator:
        return list(generator)[0].device
    return torch.device("cpu")


def _prepare_mask(mask: Tensor | np.ndarray, shape: tuple[int, ...], device: torch.device) -> Tensor:
    m = torch.as_tensor(mask, device=device).float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4:
        raise ValueError(f"mask must be (H,W), (B,H,W) or (B,1|C,H,W); got shape {tuple(torch.as_tensor(mask).shape)}")
    try:
        torch.broadcast_shapes(m.shape, shape)
    except RuntimeError as err:
        raise ValueError(f"mask of shape {tuple(m.shape)} does not broadcast to the sample shape {shape}") from err
    if m.numel() and (m.min() < 0 or m.max() > 1):
        raise ValueError("mask values must lie in [0, 1] (1 = regenerate, 0 = keep)")
    return m


def plan_process(
    diffusion: GaussianDiffusion, steps: int | Sequence[int], spacing: str, strength: float | None = None
) -> GaussianDiffusion | None:
    """The respaced process a sampling run walks (None when there is nothing to do).

    Without partial noising: ``diffusion.respaced(steps, spacing)``. With ``strength`` s in
    (0, 1): the run starts at original noise level t_s = round(s * (T - 1)); an int
    ``steps`` n becomes round(s * n) steps (at least 1) spaced over 0..t_s, an explicit
    step list keeps its steps at or below t_s.
    """
    if strength is None or strength >= 1.0:
        return diffusion.respaced(steps, spacing)
    if strength <= 0.0:
        return None
    last = int(round(strength * (diffusion.num_timesteps - 1)))
    if isinstance(steps, (int, np.integer)):
        n_run = min(max(1, int(round(strength * int(steps)))), last + 1)
        idx = space_timesteps(last + 1, n_run, spacing, diffusion.alphas_cumprod[: last + 1])
        return diffusion.respaced(diffusion.timesteps[idx].tolist())
    full = diffusion.respaced(steps)
    keep = full.timesteps[full.timesteps <= diffusion.timesteps[last]]
    return diffusion.respaced(keep.tolist()) if keep.size else None


def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    steps: int | Sequence[int],
    method: str = "dpm++2m",
    eta: float = 0.0,
    generator: Generators = None,
    init_image: Tensor | None = None,
    strength: float | None = None,
    mask: Tensor | np.ndarray | None = None,
    progress: ProgressFn | None = None,
    device: torch.device | str | None = None,
    clip_x0: bool = True,
    spacing: str | None = None,
    fresh: Tensor | np.ndarray | None = None,
) -> Tensor:
    """Draw samples (B, C, H, W) in the data scale ([-1, 1]) from ``model_fn``.

    Args:
        diffusion: the process the network was trained on (full or respaced).
        model_fn: ``model_fn(x_t, t) -> output`` with t the ORIGINAL timesteps (B,) and
            output of C channels (2C with learned variance), e.g. from
            :func:`nucsynth.diffusion.guidance.guided`.
        shape: the sample shape (B, C, H, W).
        steps: number of sampling steps or the original timesteps to visit.
        method: ``"dpm++2m"`` (10-25 steps), ``"ddim"`` (>= 50; ``eta``) or ``"ancestral"``.
        generator: makes the result deterministic (same seed + inputs + device); a
            sequence of generators, one per sample, draws each sample's noise from its own
            (a sample then does not depend on the others of its batch: see
            :mod:`nucsynth.diffusion.noise`).
        init_image: (B, C, H, W) data-scale image for partial noising and/or masked
            re-rendering.
        strength: in [0, 1]: the image is noised to original timestep about
            strength * T and denoised from there with about strength * steps steps (SDEdit;
            DiffMix: 0.55 with 100 DDIM steps, i.e. from t ~ 550 in 55 steps). 1 starts from
            pure noise, 0 returns the image. Default 1 when only a mask is given.
        mask: 1 = regenerate, 0 = keep; (H, W), (B, H, W) or (B, 1|C, H, W). At every step
            the kept region is replaced by ``init_image`` noised to the current level
            (RePaint without resampling); the output equals ``init_image`` exactly where
            mask = 0.
        progress: ``progress(done, total)`` after each step; raise inside it to cancel.
        device: where to sample (default: init_image's, else the generator's, else CPU).
        clip_x0: clamp the predicted x0 to [-1, 1] at each step.
        spacing: how an int ``steps`` is spread over the chain (``"uniform"``,
            ``"quadratic"``, ``"logsnr"``); default per method: logsnr for dpm++2m,
            quadratic for ddim, uniform for ancestral (see docs/diffusion.md).
        fresh: with ``init_image`` and a partial ``strength``: 1 = start these pixels from
            pure noise (e.g. where an edit changed the layout, so nothing of the old image
            survives there), 0 = from ``init_image`` noised to ``strength``; same shapes
            as ``mask``, not together with it. The run walks the whole chain of ``steps``;
            the 0 pixels are held at ``init_image`` noised to the current level until the
            chain reaches the ``strength`` level, then everything is denoised together
            (an all-zero ``fresh`` takes that path too, so a sample comes out the same
            alone or in a batch with others that have fresh pixels).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (B, C, ...), got {shape}")
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
    spacing = DEFAULT_SPACING[method] if spacing is None else spacing
    dev = _resolve_device(device, init_image, generator)
    init = m = None
    if init_image is None:
        if strength is not None or mask is not None:
            raise ValueError("strength and mask need an init_image")
    else:
        init = init_image.to(dev, torch.float32)
        if tuple(init.shape) != shape:
            raise ValueError(f"init_image has shape {tuple(init.shape)}; expected {shape}")
        if strength is None:
            if mask is None:
                raise ValueError("init_image without mask needs a strength in [0, 1]")
            strength = 1.0
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must lie in [0, 1], got {strength}")
        m = _prepare_mask(mask, shape, dev) if mask is not None else None
    held, release = None, -1  # fresh: the pixels held at the noised image, and the last index holding them
    if fresh is not None:
        if init is None or strength is None or mask is not None:
            raise ValueError("fresh needs an init_image and a strength, and cannot be combined with a mask")
        if float(strength) < 1.0:  # (also with no fresh pixel: a sample's pixels must not depend on its batch)
            held = 1 - _prepare_mask(fresh, shape, dev)
            release = _release_index(diffusion, steps, spacing, float(strength))
            strength = 1.0  # the whole chain: the fresh pixels start from pure noise
    process = plan_process(diffusion, steps, spacing, None if strength is None else float(strength))
    if process is None:
        return init.clone()
    start = process.num_timesteps - 1
    noise = randn(shape, generator, dev)
    partial = strength is not None and float(strength) < 1.0
    x = process.q_sample(init, start, noise) if partial else noise
    if m is not None:
        x = m * x + (1 - m) * process.q_sample(init, start, randn(shape, generator, dev))
    if held is not None and start >= release >= 0:
        x = (1 - held) * x + held * process.q_sample(init, start, randn(shape, generator, dev))
    stepper = Stepper(process, method=method, eta=eta, clip_x0=clip_x0)
    total = start + 1
    for k, i in enumerate(range(start, -1, -1), start=1):
        t = torch.full((shape[0],), int(process.timesteps[i]), dtype=torch.long, device=dev)
        x = stepper.step(model_fn(x, t), x, i, generator)
        if m is not None:
            if i == 0:  # exact copy where mask = 0 (no arithmetic on the kept pixels)
                x = torch.where(m.expand(shape) == 0, init, m * x + (1 - m) * init)
            else:
                x = m * x + (1 - m) * process.q_sample(init, i - 1, randn(shape, generator, dev))
        if held is not None and i - 1 >= release >= 0:  # still above the strength level: hold
            x = (1 - held) * x + held * process.q_sample(init, i - 1, randn(shape, generator, dev))
        if progress is not None:
            progress(k, total)
    return x


def _release_index(diffusion: GaussianDiffusion, steps: int | Sequence[int], spacing: str, strength: float) -> int:
    """Index in the full respaced chain where a run at ``strength`` would start (its first
    timestep at or below the strength level t_s = round(s (T - 1))); -1 = none (nothing held)."""
    full = diffusion.respaced(steps, spacing) if isinstance(steps, (int, np.integer)) else diffusion.respaced(steps)
    last = int(round(strength * (diffusion.num_timesteps - 1)))
    below = np.flatnonzero(full.timesteps <= diffusion.timesteps[last])
    return int(below[-1]) if below.size else -1
