"""Multinomial (categorical) diffusion for label maps (Hoogeboom et al. 2021).

With K classes and x a one-hot vector:

- one step:  q(x_t | x_{t-1}) = Cat(alpha_t x_{t-1} + (1 - alpha_t) / K)
- marginal:  q(x_t | x_0)     = Cat(abar_t x_0 + (1 - abar_t) / K)
- posterior: q(x_{t-1} | x_t, x_0) ∝ [abar_{t-1} x_0 + (1 - abar_{t-1}) / K]
                                     * [alpha_t x_t + (1 - alpha_t) / K]
  (at t = 0 the first factor is x_0 itself).
- model:     p(x_{t-1} | x_t) = q(x_{t-1} | x_t, x0_hat), x0_hat = softmax(network logits).
- loss:      KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL
             -log p(x_0 | x_t) at t = 0 (nats per pixel).

Everything is computed with log-probabilities (logaddexp / logsumexp) for stability, and
sampling is Gumbel-argmax with a torch.Generator. Indexing and respacing are those of
:class:`~nucsynth.diffusion.gaussian.GaussianDiffusion`: index i of a respaced process is the
original timestep ``timesteps[i]``, and its one-step transition between kept steps uses
alpha'_i = abar[timesteps[i]] / abar[timesteps[i-1]], so a joint loop can step a Gaussian and
a multinomial process over the same indices with one network call (see :meth:`step`).

Label tensors are integer class indices (B, *spatial); probabilities and logits put the
class axis at dim 1: (B, K, *spatial).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nucsynth.diffusion.gaussian import as_index, gather_constant, respace_indices
from nucsynth.diffusion.noise import Generators, rand, randint
from nucsynth.diffusion.schedules import respace_betas, validate_betas

_LOG_EPS = 1e-30  # log(0) stand-in for one-hot vectors (finite, so 0 * log 0 terms stay 0)


def log_onehot(x: Tensor, num_classes: int) -> Tensor:
    """log of the one-hot encoding (B, K, *spatial) of class indices x (B, *spatial)."""
    if x.dtype.is_floating_point:
        raise TypeError(f"labels must be an integer tensor of class indices, got {x.dtype}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(x.min())}..{int(x.max())}")
    onehot = F.one_hot(x.long(), num_classes).movedim(-1, 1).to(torch.float64 if x.device.type != "mps" else torch.float32)
    return torch.log(onehot.clamp(min=_LOG_EPS))


def gumbel_argmax(log_probs: Tensor, generator: Generators = None) -> Tensor:
    """Sample class indices (B, *spatial) from log-probabilities (B, K, *spatial); one
    generator, or one per row (see :mod:`nucsynth.diffusion.noise`)."""
    u = rand(log_probs.shape, generator, log_probs.device, log_probs.dtype)
    neg_log_u = (-torch.log(u.clamp(min=1e-30))).clamp(min=1e-30)
    gumbel = -torch.log(neg_log_u)
    return (log_probs + gumbel).argmax(dim=1)


class MultinomialDiffusion:
    """A (possibly respaced) multinomial diffusion process over ``num_classes`` classes.

    Args:
        num_classes: K >= 2.
        betas: the (n,) schedule (e.g. ``make_betas("cosine")``): alpha_t = 1 - beta_t is
            the probability of keeping the class at step t.
        timesteps: original timestep of each index (default 0..n-1).
    """

    def __init__(self, num_classes: int, betas: Sequence[float] | np.ndarray, timesteps: Sequence[int] | np.ndarray | None = None) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.betas = validate_betas(betas)
        n = len(self.betas)
        self.num_timesteps = n
        self.timesteps = np.arange(n, dtype=np.int64) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
        if self.timesteps.shape != (n,) or np.any(np.diff(self.timesteps) <= 0):
            raise ValueError("timesteps must be strictly increasing, one per beta")
        with np.errstate(divide="ignore"):  # beta = 1 (full resampling) gives log alpha = -inf
            self.log_alpha = np.log1p(-self.betas)
        self.log_1m_alpha = np.log(self.betas)
        self.log_abar = np.cumsum(self.log_alpha)
        self.log_1m_abar = np.log(-np.expm1(self.log_abar))
        self.alphas_cumprod = np.exp(self.log_abar)
        self._log_k = math.log(self.num_classes)
        self._cache: dict[tuple[str, str], Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def _c(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        return gather_constant(self._cache, name, getattr(self, name), t, like)

    def _index(self, t: Tensor | int, like: Tensor) -> Tensor:
        t = as_index(t, like.shape[0], like.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"process indices must lie in 0..{self.num_timesteps - 1}")
        return t

    def log_onehot(self, x: Tensor) -> Tensor:
        """log one-hot (B, K, ...) of labels x (B, ...)."""
        return log_onehot(x, self.num_classes)

    # ------------------------------------------------------------------ distributions
    def q_marginal_log(self, log_x0: Tensor, t: Tensor | int) -> Tensor:
        """log q(x_t | x_0) = log(abar_t x_0 + (1 - abar_t) / K)."""
        t = self._index(t, log_x0)
        return torch.logaddexp(log_x0 + self._c("log_abar", t, log_x0), self._c("log_1m_abar", t, log_x0) - self._log_k)

    def q_step_log(self, log_x_prev: Tensor, t: Tensor | int) -> Tensor:
        """log q(x_t | x_{t-1}) = log(alpha_t x_{t-1} + (1 - alpha_t) / K) (as a function of
        x_t for given x_{t-1}; by symmetry also the likelihood factor of x_{t-1} given x_t)."""
        t = self._index(t, log_x_prev)
        return torch.logaddexp(
            log_x_prev + self._c("log_alpha", t, log_x_prev), self._c("log_1m_alpha", t, log_x_prev) - self._log_k
        )

    def q_posterior_log(self, log_x0: Tensor, log_xt: Tensor, t: Tensor | int) -> Tensor:
        """log q(x_{t-1} | x_t, x_0), normalized over classes (dim 1). ``log_x0`` may be a
        soft distribution (the network's prediction)."""
        t = self._index(t, log_xt)
        prev = self.q_marginal_log(log_x0, (t - 1).clamp(min=0))
        at_zero = (t == 0).reshape(-1, *([1] * (log_x0.ndim - 1)))
        prev = torch.where(at_zero, log_x0, prev)
        unnormed = prev + self.q_step_log(log_xt, t)
        return unnormed - torch.logsumexp(unnormed, dim=1, keepdim=True)

    def p_posterior_log(self, logits: Tensor, log_xt: Tensor, t: Tensor | int) -> Tensor:
        """log p(x_{t-1} | x_t): the network's x0 prediction softmax(logits) pushed through
        the posterior."""
        if logits.shape != log_xt.shape:
            raise ValueError(f"logits shape {tuple(logits.shape)} != one-hot x_t shape {tuple(log_xt.shape)} (B, K, ...)")
        log_x0_hat = F.log_softmax(logits.to(log_xt.dtype), dim=1)
        return self.q_posterior_log(log_x0_hat, log_xt, t)

    # ------------------------------------------------------------------ training
    def q_sample(self, x0: Tensor, t: Tensor | int, generator: torch.Generator | None = None) -> Tensor:
        """Labels x_t ~ q(x_t | x_0) for labels x0 (B, ...)."""
        return gumbel_argmax(self.q_marginal_log(self.log_onehot(x0), t), generator)

    def training_losses(self, logits: Tensor, x0: Tensor, xt: Tensor, t: Tensor | int, reduction: str = "mean") -> dict[str, Tensor]:
        """``"loss"``: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the decoder NLL
        -log p(x_0|x_t) at t = 0, averaged over pixels (nats); also ``"kl"`` (same term) and
        ``"ce"`` (cross-entropy of the x0 prediction, a diagnostic).
        ``reduction``: ``"mean"`` or ``"none"`` (per-sample (B,))."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if x0.shape != xt.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} != xt shape {tuple(xt.shape)}")
        log_x0, log_xt = self.log_onehot(x0), self.log_onehot(xt)
        t = self._index(t, log_xt)
        log_q = self.q_posterior_log(log_x0, log_xt, t)
        log_p = self.p_posterior_log(logits, log_xt, t)
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
        nll = -(log_x0.exp() * log_p).sum(dim=1)
        at_zero = (t == 0).reshape(-1, *([1] * (kl.ndim - 1)))
        per_pixel = torch.where(at_zero, nll, kl)
        loss = per_pixel.reshape(x0.shape[0], -1).mean(dim=1)
        ce = F.cross_entropy(logits.float(), x0.long(), reduction="none").reshape(x0.shape[0], -1).mean(dim=1)
        terms = {"loss": loss.to(logits.dtype), "kl": loss.detach().to(logits.dtype), "ce": ce.detach()}
        if reduction == "mean":
            terms = {k: v.mean() for k, v in terms.items()}
        return terms

    # ------------------------------------------------------------------ sampling
    def sample_prior(self, shape: Sequence[int], generator: Generators = None, device: torch.device | str = "cpu") -> Tensor:
        """Labels (B, ...) from the stationary distribution: uniform over the K classes."""
        return randint(self.num_classes, shape, generator, device)

    def step(self, logits: Tensor, xt: Tensor, i: int | Tensor, generator: Generators = None, argmax_final: bool = False) -> Tensor:
        """One reverse step x_i -> x_{i-1} ~ p(x_{i-1} | x_i) given the network's logits
        (B, K, ...) at (x_i, timesteps[i]). At i = 0 the result is the data estimate
        (sampled, or the most probable class with ``argmax_final``)."""
        log_xt = self.log_onehot(xt)
        log_p = self.p_posterior_log(logits, log_xt, i)
        final = isinstance(i, int) and i == 0 or isinstance(i, Tensor) and bool((i == 0).all())
        if argmax_final and final:
            return log_p.argmax(dim=1)
        return gumbel_argmax(log_p, generator)

    # ------------------------------------------------------------------ respacing
    def respaced(self, steps: int | Sequence[int], spacing: str = "uniform") -> MultinomialDiffusion:
        """The process over a subset of steps (int n or ORIGINAL timesteps, as
        :meth:`GaussianDiffusion.respaced`), one-step transitions from the ratio of abar's."""
        idx = respace_indices(self.timesteps, steps, spacing, self.alphas_cumprod)
        return MultinomialDiffusion(self.num_classes, respace_betas(self.alphas_cumprod, idx), timesteps=self.timesteps[idx])

    def __repr__(self) -> str:
        return f"MultinomialDiffusion(num_classes={self.num_classes}, steps={self.num_timesteps})"
