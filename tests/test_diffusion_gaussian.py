"""Gaussian diffusion mathematics: schedules, noising, posterior, variance, losses, respacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nucsynth.diffusion import GaussianDiffusion, make_betas, space_timesteps
from nucsynth.diffusion.gaussian import discretized_gaussian_log_likelihood


def _posterior_by_bayes(abar_prev: float, alpha: float, x0: float, xt: float) -> tuple[float, float]:
    """Posterior of x_{t-1} from the prior N(sqrt(abar_prev) x0, 1 - abar_prev) and the
    likelihood N(x_t; sqrt(alpha) x_{t-1}, 1 - alpha), by brute force on a fine grid."""
    prior_mean, prior_var = math.sqrt(abar_prev) * x0, 1 - abar_prev
    lik_var = 1 - alpha
    grid = np.linspace(-6, 6, 600_001)
    log_dens = -0.5 * (grid - prior_mean) ** 2 / prior_var - 0.5 * (xt - math.sqrt(alpha) * grid) ** 2 / lik_var
    w = np.exp(log_dens - log_dens.max())
    w /= w.sum()
    mean = float((w * grid).sum())
    return mean, float((w * (grid - mean) ** 2).sum())


# ---------------------------------------------------------------------------- schedules
def test_linear_schedule_ends_and_scaling():
    b = make_betas("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b250 = make_betas("linear", 250)
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(0.08)


def test_cosine_schedule_matches_its_alpha_bar_and_clip():
    T = 1000
    b = make_betas("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = np.cumprod(1 - b)
    for t in (0, 10, 500, 900):
        assert abar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert b.max() <= 0.999 and b[-1] == pytest.approx(0.999)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("sigmoid")
    with pytest.raises(ValueError, match="positive integer"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="T > 20"):
        make_betas("linear", 10)
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(make_betas("linear", 100), prediction="x0")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion([0.1, 1.5])


def test_diffusers_schedules_agree():
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only) not installed")
    for ours, theirs in (("linear", "linear"), ("cosine", "squaredcos_cap_v2")):
        sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
        d = GaussianDiffusion(make_betas(ours))
        np.testing.assert_allclose(d.betas, sch.betas.double().numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(d.alphas_cumprod, sch.alphas_cumprod.double().numpy(), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- forward process
def test_q_sample_statistics():
    d = GaussianDiffusion(make_betas("linear"))
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for t in (0, 300, 999):
        xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        abar = d.alphas_cumprod[t]
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
        assert xt.var().item() == pytest.approx(1 - abar, rel=2e-2, abs=1e-5)


def test_q_sample_per_sample_timesteps_and_shape_errors():
    d = GaussianDiffusion(make_betas("cosine", 100))
    x0 = torch.ones(3, 2, 4, 4)
    noise = torch.zeros_like(x0)
    xt = d.q_sample(x0, torch.tensor([0, 50, 99]), noise)
    for i, t in enumerate((0, 50, 99)):
        assert torch.allclose(xt[i], torch.full_like(xt[i], math.sqrt(d.alphas_cumprod[t])))
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x0, 1, torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="0..99"):
        d.q_sample(x0, 100, noise)


# ---------------------------------------------------------------------------- posterior
@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("t", [1, 37, 500, 998])
def test_posterior_against_brute_force(kind, t):
    d = GaussianDiffusion(make_betas(kind))
    x0, xt = 0.4, -0.3
    mean, var, logvar = d.q_posterior(torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), t)
    ref_mean, ref_var = _posterior_by_bayes(d.alphas_cumprod_prev[t], 1 - d.betas[t], x0, xt)
    assert mean.item() == pytest.approx(ref_mean, abs=1e-6)
    assert var.item() == pytest.approx(ref_var, rel=1e-4)
    assert logvar.item() == pytest.approx(math.log(ref_var), abs=1e-4)


def test_posterior_at_t0_is_the_data_with_clipped_log_variance():
    d = GaussianDiffusion(make_betas("linear"))
    x0 = torch.randn(2, 3, dtype=torch.float64)
    xt = torch.randn(2, 3, dtype=torch.float64)
    mean, var, logvar = d.q_posterior(x0, xt, 0)
    assert torch.allclose(mean, x0) and torch.all(var == 0)
    assert torch.allclose(logvar, torch.full_like(logvar, math.log(d.posterior_variance[1])))


# ---------------------------------------------------------------------------- parameterizations
def test_eps_and_v_predictions_recover_x0_and_eps():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 999])
    for prediction in ("eps", "v"):
        d = GaussianDiffusion(make_betas("cosine"), prediction=prediction)
        xt = d.q_sample(x0, t, noise)
        target = noise if prediction == "eps" else d.v_target(x0, t, noise)
        x0_hat, eps_hat = d.predict_x0_eps(target, xt, t)
        assert torch.allclose(x0_hat, x0, atol=1e-6) and torch.allclose(eps_hat, noise, atol=1e-6)


def test_learned_variance_stays_between_the_bounds():
    d = GaussianDiffusion(make_betas("linear"), learned_variance=True)
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 1000, (64,), generator=g)
    xt = torch.randn(64, 3, 4, 4, generator=g)
    out = torch.randn(64, 6, 4, 4, generator=g) * 3  # values beyond [-1, 1] are clamped
    logvar = d.p_mean_variance(out, xt, t)["logvar"].double()
    lo = torch.as_tensor(d.posterior_log_variance_clipped)[t].view(-1, 1, 1, 1)
    hi = torch.as_tensor(np.log(d.betas))[t].view(-1, 1, 1, 1)
    assert torch.all(logvar >= lo - 1e-5) and torch.all(logvar <= hi + 1e-5)
    ends = d.p_mean_variance(torch.cat([out[:, :3], torch.full_like(out[:, 3:], 1.0)], 1), xt, t)["logvar"].double()
    assert torch.allclose(ends, hi.expand_as(ends), atol=1e-5)
    ends = d.p_mean_variance(torch.cat([out[:, :3], torch.full_like(out[:, 3:], -1.0)], 1), xt, t)["logvar"].double()
    assert torch.allclose(ends, lo.expand_as(ends), atol=1e-5)


def test_model_output_channel_check():
    d = GaussianDiffusion(make_betas("linear", 100), learned_variance=True)
    with pytest.raises(ValueError, match="expected 6 channels"):
        d.p_mean_variance(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), 0)


# ---------------------------------------------------------------------------- losses
def _loss_inputs(d: GaussianDiffusion, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 1, 5, 100, 600, 999])
    noise = torch.randn(x0.shape, generator=g)
    return x0, t, noise, d.q_sample(x0, t, noise)


def test_hybrid_loss_stop_gradient_and_weighting():
    d = GaussianDiffusion(make_betas("linear"), learned_variance=True)
    x0, t, noise, xt = _loss_inputs(d)
    out = torch.randn(6, 6, 8, 8, requires_grad=True)
    terms = d.training_losses(out, x0, xt, t, noise, reduction="none")
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (6,)
    assert torch.allclose(terms["loss"], terms["mse"] + 0.001 * 1000 * terms["vb"])
    assert torch.allclose(terms["mse"], ((noise - out[:, :3]) ** 2).mean((1, 2, 3)))
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert torch.all(grad[:, :3] == 0), "the vb term must not train the mean"
    assert grad[:, 3:].abs().sum() > 0, "the vb term trains the variance"
    scalar = d.training_losses(out, x0, xt, t, noise)
    assert scalar["loss"].ndim == 0 and scalar["loss"].item() == pytest.approx(terms["loss"].mean().item(), rel=1e-6)


def test_vb_vanishes_for_the_true_posterior_and_decoder_at_t0():
    d = GaussianDiffusion(make_betas("linear"), learned_variance=True)
    x0, t, noise, xt = _loss_inputs(d)
    perfect = torch.cat([noise, -torch.ones_like(noise)], 1)  # true eps, variance = beta~
    vb = d.vb_terms(perfect, x0, xt, t)
    assert torch.all(vb[1:].abs() < 1e-4), vb
    assert vb[0] >= 0  # t = 0: the decoder NLL


def test_discretized_gaussian_likelihood_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.45, 0.02, 0.3, 0.8], dtype=torch.float64)
    log_scale = torch.log(torch.tensor([0.1, 0.05, 0.02, 0.001, 0.3], dtype=torch.float64))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale).numpy()
    sd = log_scale.exp().numpy()
    xs, ms, w = x.numpy(), mean.numpy(), 1 / 255
    ref = np.log(stats.norm.cdf(xs + w, ms, sd) - stats.norm.cdf(xs - w, ms, sd))
    ref[0] = np.log(stats.norm.cdf(xs[0] + w, ms[0], sd[0]))  # lowest bin extends to -inf
    ref[-1] = np.log(stats.norm.sf(xs[-1] - w, ms[-1], sd[-1]))  # highest bin to +inf
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # a very narrow Gaussian on the bin centre: probability ~1 (0 nats)
    sharp = discretized_gaussian_log_likelihood(x, x, torch.full_like(x, -10.0))
    assert torch.all(sharp.abs() < 1e-6)


def test_fixed_variance_loss_is_the_mse_and_reports_vb():
    d = GaussianDiffusion(make_betas("cosine"), prediction="v")
    x0, t, noise, xt = _loss_inputs(d)
    out = torch.randn(6, 3, 8, 8, requires_grad=True)
    terms = d.training_losses(out, x0, xt, t, noise)
    assert terms["loss"].item() == pytest.approx(terms["mse"].item())
    assert not terms["vb"].requires_grad and terms["vb"].item() > 0


# ---------------------------------------------------------------------------- respacing
def test_space_timesteps_shapes():
    for spacing in ("uniform", "quadratic", "logsnr"):
        abar = np.cumprod(1 - make_betas("linear"))
        for n in (1, 2, 10, 20, 100, 1000):
            kept = space_timesteps(1000, n, spacing, abar)
            assert len(kept) == n and np.all(np.diff(kept) > 0) and kept[-1] == 999
            if n > 1:
                assert kept[0] == 0
    assert space_timesteps(1000, [5, 1, 700]).tolist() == [1, 5, 700]
    with pytest.raises(ValueError, match="unique"):
        space_timesteps(1000, [5, 5])
    with pytest.raises(ValueError, match="between 1 and T"):
        space_timesteps(10, 11)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_respaced_schedule_agrees_with_full(kind):
    d = GaussianDiffusion(make_betas(kind), learned_variance=True)
    r = d.respaced(25)
    assert r.num_timesteps == 25 and r.timesteps[0] == 0 and r.timesteps[-1] == 999
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[r.timesteps], rtol=1e-9)
    # noising at a respaced index equals noising at its original timestep
    x0 = torch.rand(1, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    assert torch.allclose(r.q_sample(x0, 10, noise), d.q_sample(x0, int(r.timesteps[10]), noise))
    # a respaced process of a respaced process keeps the original timesteps
    rr = r.respaced([0, int(r.timesteps[5]), 999])
    assert rr.timesteps.tolist() == [0, int(r.timesteps[5]), 999]
    np.testing.assert_allclose(rr.alphas_cumprod, d.alphas_cumprod[rr.timesteps], rtol=1e-7)
    with pytest.raises(ValueError, match="not steps of this process"):
        r.respaced([1, 2])


def test_respacing_to_all_steps_is_the_identity():
    d = GaussianDiffusion(make_betas("cosine"))
    r = d.respaced(1000)
    np.testing.assert_allclose(r.betas, d.betas, rtol=1e-12, atol=1e-15)
    assert np.array_equal(r.timesteps, np.arange(1000))
    np.testing.assert_allclose(r.posterior_variance, d.posterior_variance, rtol=1e-9, atol=1e-15)
    t = torch.tensor([3, 700])
    assert torch.equal(r.model_timesteps(t), t)
