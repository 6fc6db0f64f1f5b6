"""Gaussian diffusion: forward noising, the true posterior, model parameterizations, losses.

Follows Ho et al. (2020) and Nichol & Dhariwal (2021, "improved DDPM"). Indexing: a process
of ``num_timesteps`` = n steps has indices i = 0..n-1; x_i is the sample after step i and
the data is x_-1 =: x_0 of the papers. ``timesteps[i]`` is the ORIGINAL timestep (0..T-1) of
index i; the network is always called with original timesteps, so a model trained on the
full process can be sampled with any respaced one.

The network output is eps (or v, with ``prediction="v"``) in its first C channels; with
``learned_variance`` a further C channels hold values v in [-1, 1] (clamped) that interpolate
the log variance between log beta~_t (v = -1) and log beta_t (v = +1) as in improved DDPM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from nucsynth.diffusion.schedules import respace_betas, space_timesteps, validate_betas

PREDICTIONS = ("eps", "v")
FIXED_VARIANCES = ("small", "large")
_LOG2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all dimensions except the first (batch)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-likelihood (nats) of 8-bit data scaled to [-1, 1] under a Gaussian.

    Each of the 256 levels owns a bin of width 2/255; the two end bins extend to +-inf
    (Ho et al. 2020, eq. 13, the decoder term L_0).
    """
    inv_std = torch.exp(-log_scale)
    centered = x - mean
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    delta = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, torch.log(delta))
    )


def gather_constant(cache: dict, name: str, values: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """values[t] as a (B, 1, ...) tensor with ``like``'s dtype/device (float64 tables are
    cached per device and cast only after the gather)."""
    key = (name, str(like.device))
    table = cache.get(key)
    if table is None:
        table = torch.as_tensor(values, dtype=torch.float64)
        if like.device.type == "mps":  # MPS has no float64: cast on the CPU first
            table = table.float()
        table = table.to(like.device)
        cache[key] = table
    vals = table[t.to(like.device).long()].to(like.dtype)
    return vals.reshape(-1, *([1] * (like.ndim - 1)))


def as_index(t: Tensor | int, batch: int, device: torch.device) -> Tensor:
    """Process indices as a LongTensor (B,) from an int, a 0-d or a (B,) tensor."""
    if isinstance(t, Tensor):
        t = t.to(device=device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(batch)
    else:
        t = torch.full((batch,), int(t), dtype=torch.long, device=device)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion process.

    Args:
        betas: the (n,) noise schedule, e.g. ``make_betas("linear", 1000)``.
        prediction: what the network predicts: ``"eps"`` (the noise) or ``"v"``
            (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022).
        learned_variance: the network emits 2C channels; the second half interpolates the
            log variance (improved DDPM) and is trained by the hybrid loss.
        vb_weight: lambda of L_hybrid = L_simple + lambda * L_vlb (0.001 in improved DDPM).
        fixed_variance: without learned variance, ancestral sampling uses the posterior
            variance beta~_t (``"small"``) or beta_t (``"large"``).
        timesteps: original timestep of each index (default 0..n-1: not respaced).
    """

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray,
        prediction: str = "eps",
        learned_variance: bool = False,
        vb_weight: float = 0.001,
        fixed_variance: str = "small",
        timesteps: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if fixed_variance not in FIXED_VARIANCES:
            raise ValueError(f"fixed_variance must be one of {FIXED_VARIANCES}, got {fixed_variance!r}")
        if vb_weight < 0:
            raise ValueError(f"vb_weight must be >= 0, got {vb_weight}")
        self.betas = validate_betas(betas)
        self.prediction = prediction
        self.learned_variance = bool(learned_variance)
        self.vb_weight = float(vb_weight)
        self.fixed_variance = fixed_variance
        n = len(self.betas)
        self.num_timesteps = n
        if timesteps is None:
            self.timesteps = np.arange(n, dtype=np.int64)
        else:
            self.timesteps = np.asarray(timesteps, dtype=np.int64)
            if self.timesteps.shape != (n,) or np.any(np.diff(self.timesteps) <= 0):
                raise ValueError("timesteps must be strictly increasing, one per beta")
        self._compute_constants()
        self._cache: dict[tuple[str, str], Tensor] = {}

    # ------------------------------------------------------------------ constants
    def _compute_constants(self) -> None:
        b = self.betas
        alphas = 1.0 - b
        abar = np.cumprod(alphas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = np.sqrt(abar)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - abar)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1.0)
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_variance = post_var
        # beta~_0 = 0: use beta~_1 for the log (improved DDPM), beta_0 for a one-step process.
        first = post_var[1] if len(b) > 1 else b[0]
        self.posterior_log_variance_clipped = np.log(np.concatenate([[first], post_var[1:]]))
        self.posterior_mean_coef1 = b * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
        self.log_betas = np.log(b)
        # "large" fixed variance: beta_t, with beta~_1 at t = 0 (improved DDPM's fixedlarge).
        self.large_log_variance = np.log(np.concatenate([[first], b[1:]]))

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Gather constant ``name`` at indices t (B,), shaped (B, 1, ...) like ``like``."""
        return gather_constant(self._cache, name, getattr(self, name), t, like)

    def _as_index(self, t: Tensor | int, batch: int, device: torch.device) -> Tensor:
        t = as_index(t, batch, device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"process indices must lie in 0..{self.num_timesteps - 1}")
        return t

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original timesteps (what the network sees) for process indices t."""
        table = torch.as_tensor(self.timesteps, dtype=torch.long, device=t.device)
        return table[t.long()]

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        """Uniformly random process indices (B,) for training."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        t = self._as_index(t, x0.shape[0], x0.device)
        return (
            self._extract("sqrt_alphas_cumprod", t, x0) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        t = self._as_index(t, xt.shape[0], xt.device)
        mean = self._extract("posterior_mean_coef1", t, xt) * x0 + self._extract("posterior_mean_coef2", t, xt) * xt
        var = self._extract("posterior_variance", t, xt).expand_as(xt)
        logvar = self._extract("posterior_log_variance_clipped", t, xt).expand_as(xt)
        return mean, var, logvar

    # ------------------------------------------------------------------ parameterizations
    def x0_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt - self._extract("sqrt_recipm1_alphas_cumprod", t, xt) * eps

    def eps_from_x0(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt - x0) / self._extract("sqrt_recipm1_alphas_cumprod", t, xt)

    def v_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        return self._extract("sqrt_alphas_cumprod", t, x0) * noise - self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    def split_output(self, model_out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """Split a network output into its prediction (C) and variance values (C or None)."""
        expected = 2 * channels if self.learned_variance else channels
        if model_out.ndim < 2 or model_out.shape[1] != expected:
            raise ValueError(
                f"model output has shape {tuple(model_out.shape)}; expected {expected} channels "
                f"({'learned variance: 2 x ' if self.learned_variance else ''}{channels} data channels)"
            )
        if self.learned_variance:
            return model_out[:, :channels], model_out[:, channels:]
        return model_out, None

    def predict_x0_eps(self, pred: Tensor, xt: Tensor, t: Tensor | int, clip_x0: bool = False) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by the prediction channels; with ``clip_x0`` x0 is clamped to
        [-1, 1] and eps recomputed from the clamped x0 so both stay consistent with x_t."""
        t = self._as_index(t, xt.shape[0], xt.device)
        if self.prediction == "eps":
            eps = pred
            x0 = self.x0_from_eps(xt, t, eps)
        else:
            a = self._extract("sqrt_alphas_cumprod", t, xt)
            s = self._extract("sqrt_one_minus_alphas_cumprod", t, xt)
            x0 = a * xt - s * pred
            eps = s * xt + a * pred
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.eps_from_x0(xt, t, x0)
        return x0, eps

    def model_log_variance(self, var_values: Tensor | None, xt: Tensor, t: Tensor) -> Tensor:
        """Log variance of p(x_{t-1} | x_t): learned interpolation or the fixed choice."""
        if var_values is None:
            name = "posterior_log_variance_clipped" if self.fixed_variance == "small" else "large_log_variance"
            return self._extract(name, t, xt).expand_as(xt)
        frac = (var_values.clamp(-1.0, 1.0) + 1.0) / 2.0
        min_log = self._extract("posterior_log_variance_clipped", t, xt)
        max_log = self._extract("log_betas", t, xt)
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, model_out: Tensor, xt: Tensor, t: Tensor | int, clip_x0: bool = True) -> dict[str, Tensor]:
        """Mean / variance / log-variance of p(x_{t-1} | x_t) plus the implied x0 and eps."""
        t = self._as_index(t, xt.shape[0], xt.device)
        pred, var_values = self.split_output(model_out, xt.shape[1])
        x0, eps = self.predict_x0_eps(pred, xt, t, clip_x0=clip_x0)
        mean, _, _ = self.q_posterior(x0, xt, t)
        logvar = self.model_log_variance(var_values, xt, t)
        return {"mean": mean, "var": torch.exp(logvar), "logvar": logvar, "x0": x0, "eps": eps}

    # ------------------------------------------------------------------ losses
    def vb_terms(self, model_out: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-sample variational bound term L_t in bits per dimension: KL(q || p) for
        t > 0 and the discretized-Gaussian decoder NLL at t = 0."""
        true_mean, _, true_logvar = self.q_posterior(x0, xt, t)
        out = self.p_mean_variance(model_out, xt, t, clip_x0=False)
        kl = mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["logvar"])) / _LOG2
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["logvar"])) / _LOG2
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model_out: Tensor, x0: Tensor, xt: Tensor, t: Tensor, noise: Tensor, reduction: str = "mean"
    ) -> dict[str, Tensor]:
        """Hybrid loss of improved DDPM for a network output at (x_t, t).

        ``"mse"``: L_simple, the mean squared error of eps (or v). ``"vb"``: the per-step
        bound term L_t (bits/dim) computed with a stop-gradient on the predicted mean, so it
        trains only the variance channels. ``"loss"`` = mse + vb_weight * n * vb, where n =
        num_timesteps turns the per-step term into an estimate of the whole L_vlb (with
        T = 1000 and lambda = 0.001 the weight is 1, as in the reference code). Without
        learned variance ``"vb"`` is still reported (detached) and ``"loss"`` = mse.
        ``reduction``: ``"mean"`` (scalars) or ``"none"`` (per-sample tensors (B,)).
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if x0.shape != xt.shape or noise.shape != x0.shape:
            raise ValueError("x0, xt and noise must have the same shape")
        t = self._as_index(t, x0.shape[0], x0.device)
        pred, var_values = self.split_output(model_out, x0.shape[1])
        target = noise if self.prediction == "eps" else self.v_target(x0, t, noise)
        mse = mean_flat((target - pred) ** 2)
        if var_values is not None:
            frozen = torch.cat([pred.detach(), var_values], dim=1)
            vb = self.vb_terms(frozen, x0, xt, t)
            loss = mse + self.vb_weight * self.num_timesteps * vb
        else:
            with torch.no_grad():
                vb = self.vb_terms(model_out.detach(), x0, xt, t)
            loss = mse
        terms = {"loss": loss, "mse": mse, "vb": vb}
        if reduction == "mean":
            terms = {k: v.mean() for k, v in terms.items()}
        return terms

    # ------------------------------------------------------------------ respacing
    def respaced(self, steps: int | Sequence[int], spacing: str = "uniform") -> GaussianDiffusion:
        """The process over a subset of this one's steps, with recomputed betas.

        ``steps``: an int n (spaced over this process by ``spacing``, see
        :func:`~nucsynth.diffusion.schedules.space_timesteps`, always keeping its first and
        last step) or a sequence of ORIGINAL timesteps, each one of ``self.timesteps``.
        The result's ``timesteps`` maps its indices to original timesteps; respacing to all
        steps returns an identical process.
        """
        idx = respace_indices(self.timesteps, steps, spacing, self.alphas_cumprod)
        return GaussianDiffusion(
            respace_betas(self.alphas_cumprod, idx),
            prediction=self.prediction,
            learned_variance=self.learned_variance,
            vb_weight=self.vb_weight,
            fixed_variance=self.fixed_variance,
            timesteps=self.timesteps[idx],
        )

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(steps={self.num_timesteps}, original_T={int(self.timesteps[-1]) + 1}, "
            f"prediction={self.prediction!r}, learned_variance={self.learned_variance})"
        )


def respace_indices(
    timesteps: np.ndarray, steps: int | Sequence[int], spacing: str = "uniform", alphas_cumprod: np.ndarray | None = None
) -> np.ndarray:
    """Indices into a process with the given original ``timesteps`` that ``steps`` keeps
    (an int: spaced by ``spacing``; a sequence: those original timesteps)."""
    if isinstance(steps, (int, np.integer)):
        return space_timesteps(len(timesteps), int(steps), spacing, alphas_cumprod)
    wanted = np.asarray(list(steps), dtype=np.int64)
    idx = np.searchsorted(timesteps, wanted)
    ok = (idx < len(timesteps)) & (timesteps[np.minimum(idx, len(timesteps) - 1)] == wanted)
    if wanted.size == 0 or not np.all(ok):
        missing = wanted[~ok] if wanted.size else wanted
        raise ValueError(f"timesteps {missing.tolist()} are not steps of this process")
    if np.unique(idx).size != idx.size:
        raise ValueError("timesteps must be unique")
    return np.sort(idx)
