"""Multinomial diffusion (Hoogeboom et al. 2021): marginals, posterior, loss, sampling, respacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucsynth.diffusion import GaussianDiffusion, MultinomialDiffusion, Stepper, make_betas
from nucsynth.diffusion.multinomial import gumbel_argmax

K = 5


def one_step_matrix(beta: float, k: int = K) -> np.ndarray:
    """Q[i, j] = q(x_t = j | x_{t-1} = i) = (1 - beta) 1[i = j] + beta / K."""
    return (1 - beta) * np.eye(k) + beta / k


@pytest.fixture(scope="module")
def proc() -> MultinomialDiffusion:
    return MultinomialDiffusion(K, make_betas("cosine", 200))


def test_marginal_equals_iterated_one_step_transitions(proc):
    probs = np.eye(K)  # row c: start from class c
    for t in range(proc.num_timesteps):
        probs = probs @ one_step_matrix(proc.betas[t])
        if t in (0, 7, 100, 199):
            x0 = torch.arange(K).view(K, 1)
            closed = proc.q_marginal_log(proc.log_onehot(x0), t).exp()[..., 0].numpy()
            np.testing.assert_allclose(closed, probs, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_marginal_is_uniform_at_T(kind):
    m = MultinomialDiffusion(K, make_betas(kind, 1000))
    x0 = torch.arange(K).view(K, 1)
    p = m.q_marginal_log(m.log_onehot(x0), m.num_timesteps - 1).exp()
    torch.testing.assert_close(p, torch.full_like(p, 1 / K), atol=1e-3, rtol=0)


def test_posterior_against_bayes_and_sums_to_one(proc):
    for t in (1, 5, 120, 199):
        abar_prev = np.prod(1 - proc.betas[:t])
        prior = abar_prev * np.eye(K) + (1 - abar_prev) / K  # q(x_{t-1} | x0) rows
        lik = one_step_matrix(proc.betas[t])  # q(x_t | x_{t-1})
        for c0 in range(K):
            for ct in range(K):
                ref = prior[c0] * lik[:, ct]
                ref /= ref.sum()
                got = proc.q_posterior_log(
                    proc.log_onehot(torch.tensor([[c0]])), proc.log_onehot(torch.tensor([[ct]])), t
                ).exp()[0, :, 0].numpy()
                np.testing.assert_allclose(got, ref, atol=1e-9)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, K, 6, 6, generator=g, dtype=torch.float64)
    xt = torch.randint(0, K, (4, 6, 6), generator=g)
    p = proc.p_posterior_log(logits, proc.log_onehot(xt), torch.tensor([0, 3, 50, 199])).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(4, 6, 6, dtype=torch.float64))
    assert torch.all(p >= 0)


def test_posterior_at_t0_is_the_x0_prediction_weighted_by_x_t(proc):
    log_x0 = torch.log_softmax(torch.randn(1, K, 1, dtype=torch.float64), dim=1)
    xt = torch.tensor([[2]])
    post = proc.q_posterior_log(log_x0, proc.log_onehot(xt), 0).exp()[0, :, 0]
    ref = log_x0.exp()[0, :, 0] * torch.as_tensor(one_step_matrix(proc.betas[0])[:, 2])
    torch.testing.assert_close(post, ref / ref.sum())


def test_loss_is_a_nonnegative_kl_that_vanishes_for_the_truth(proc):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, K, (6, 8, 8), generator=g)
    t = torch.tensor([0, 1, 10, 60, 150, 199])
    xt = proc.q_sample(x0, t, g)
    logits = torch.randn(6, K, 8, 8, generator=g, requires_grad=True)
    terms = proc.training_losses(logits, x0, xt, t, reduction="none")
    assert terms["loss"].shape == (6,) and torch.all(terms["loss"] >= -1e-9)
    terms["loss"].sum().backward()
    assert logits.grad.abs().sum() > 0
    perfect = 50.0 * torch.nn.functional.one_hot(x0, K).movedim(-1, 1).float()
    exact = proc.training_losses(perfect, x0, xt, t, reduction="none")["loss"]
    assert torch.all(exact < 1e-6) and torch.all(exact < terms["loss"].detach())


def test_q_sample_frequencies_and_gumbel(proc):
    g = torch.Generator().manual_seed(2)
    x0 = torch.full((1, 200, 200), 3)
    xt = proc.q_sample(x0, 60, g)
    expected = proc.q_marginal_log(proc.log_onehot(x0[:, :1, :1]), 60).exp()[0, :, 0, 0]
    freq = torch.bincount(xt.flatten(), minlength=K).double() / xt.numel()
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    draws = gumbel_argmax(p.log().view(1, 3, 1).expand(1, 3, 40_000), g)
    torch.testing.assert_close(torch.bincount(draws.flatten(), minlength=3).double() / 40_000, p, atol=0.01, rtol=0)


def test_respaced_transitions_agree_with_the_full_process(proc):
    r = proc.respaced([0, 30, 31, 120, 199])
    np.testing.assert_allclose(r.alphas_cumprod, proc.alphas_cumprod[r.timesteps], rtol=1e-9)
    # one respaced step (index 3: 31 -> 120) equals the product of the original steps 32..120
    probs = np.eye(K)
    for t in range(32, 121):
        probs = probs @ one_step_matrix(proc.betas[t])
    np.testing.assert_allclose(one_step_matrix(r.betas[3]), probs, atol=1e-10)
    x0 = torch.arange(K).view(K, 1)
    torch.testing.assert_close(r.q_marginal_log(r.log_onehot(x0), 3), proc.q_marginal_log(proc.log_onehot(x0), 120))
    full = proc.respaced(proc.num_timesteps)
    np.testing.assert_allclose(full.betas, proc.betas, rtol=1e-9)


def test_joint_loop_with_a_gaussian_process_denoises_both():
    """Step a Gaussian and a multinomial process over the same respaced indices with one
    'network' call per step: an oracle that knows the data recovers it exactly."""
    T = 1000
    gauss = GaussianDiffusion(make_betas("cosine", T)).respaced(15, spacing="logsnr")
    labels = MultinomialDiffusion(K, make_betas("cosine", T)).respaced(gauss.timesteps.tolist())
    assert np.array_equal(labels.timesteps, gauss.timesteps)
    g = torch.Generator().manual_seed(3)
    img_true = torch.rand(2, 1, 8, 8, generator=g) * 1.6 - 0.8
    lab_true = torch.randint(0, K, (2, 8, 8), generator=g)
    x = torch.randn(2, 1, 8, 8, generator=g)
    lab = labels.sample_prior((2, 8, 8), g)
    stepper = Stepper(gauss, "dpm++2m")
    abar = torch.as_tensor(GaussianDiffusion(make_betas("cosine", T)).alphas_cumprod, dtype=torch.float32)
    for i in range(gauss.num_timesteps - 1, -1, -1):
        t = int(gauss.timesteps[i])
        eps = (x - abar[t].sqrt() * img_true) / (1 - abar[t]).sqrt()  # the oracle network
        logits = 30.0 * torch.nn.functional.one_hot(lab_true, K).movedim(-1, 1).float()
        x = stepper.step(eps, x, i, g)
        lab = labels.step(logits, lab, i, g, argmax_final=True)
    torch.testing.assert_close(x, img_true, atol=1e-4, rtol=0)
    assert torch.equal(lab, lab_true)


def test_bad_inputs(proc):
    with pytest.raises(ValueError, match="num_classes"):
        MultinomialDiffusion(1, make_betas("cosine", 10))
    with pytest.raises(ValueError, match="labels must lie"):
        proc.q_sample(torch.tensor([[K]]), 0)
    with pytest.raises(TypeError, match="integer"):
        proc.q_sample(torch.zeros(1, 2), 0)
    with pytest.raises(ValueError, match="logits shape"):
        proc.step(torch.zeros(1, K + 1, 2), torch.zeros(1, 2, dtype=torch.long), 5)
