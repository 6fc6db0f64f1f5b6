"""Samplers, partial noising, masked re-rendering and classifier-free guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucsynth.diffusion import GaussianDiffusion, Stepper, guidance_scale_from, guided, make_betas, sample

MU, STD = 0.3, 0.5  # the toy data distribution N(MU, STD^2), per pixel


def gaussian_data_eps_model(d: GaussianDiffusion, mu: float = MU, std: float = STD, learned: bool = False):
    """The exact (optimal) eps predictor for data ~ N(mu, std^2): with
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu)
    / (abar std^2 + 1 - abar). ``t`` are original timesteps."""
    abar_table = torch.as_tensor(d.alphas_cumprod)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = abar_table[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * mu) / (abar * std**2 + 1 - abar)
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learned else eps

    return model_fn


def toy_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 'network' for comparing solvers step by step."""
    return 0.6 * torch.tanh(1.3 * x) + 0.05 * torch.sin(x * 3.0) + (t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1) * 0.1


# ---------------------------------------------------------------------------- quality
@pytest.mark.parametrize("method,steps,tol", [("dpm++2m", 20, 0.03), ("ddim", 50, 0.06), ("ancestral", 200, 0.06)])
def test_samplers_recover_gaussian_data(method, steps, tol):
    d = GaussianDiffusion(make_betas("linear"), learned_variance=(method == "ancestral"))
    model = gaussian_data_eps_model(d, learned=d.learned_variance)
    g = torch.Generator().manual_seed(0)
    x = sample(d, model, (1024, 1, 2, 2), steps, method=method, generator=g, clip_x0=False)
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(STD, rel=tol)


def test_dpm_solver_is_accurate_at_10_steps_on_cosine():
    d = GaussianDiffusion(make_betas("cosine"))
    x = sample(d, gaussian_data_eps_model(d), (2048, 1, 4, 4), 10, generator=torch.Generator().manual_seed(1), clip_x0=False)
    assert x.mean().item() == pytest.approx(MU, abs=0.02) and x.std().item() == pytest.approx(STD, rel=0.05)


def test_clamped_x0_keeps_samples_in_range():
    d = GaussianDiffusion(make_betas("linear"))
    model = gaussian_data_eps_model(d, mu=0.9, std=0.5)  # much of this data lies above 1
    for method in ("dpm++2m", "ddim"):
        x = sample(d, model, (256, 1, 2, 2), 15, method=method, generator=torch.Generator().manual_seed(0))
        assert x.max().item() <= 1.0 + 1e-5 and x.min().item() >= -1.0 - 1e-5


# ---------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("method", ["dpm++2m", "ddim", "ancestral"])
def test_same_seed_same_output(method):
    d = GaussianDiffusion(make_betas("cosine"), learned_variance=True)
    model = gaussian_data_eps_model(d, learned=True)
    run = lambda seed: sample(d, model, (2, 3, 8, 8), 12, method=method, eta=0.5, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_ddim_eta0_is_deterministic_given_the_start():
    d = GaussianDiffusion(make_betas("linear"))
    process = d.respaced(20)
    x_start = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for seed in (1, 2):  # the generator is never used by DDIM with eta = 0
        stepper, x = Stepper(process, "ddim", eta=0.0), x_start.clone()
        g = torch.Generator().manual_seed(seed)
        for i in range(19, -1, -1):
            x = stepper.step(toy_net(x, torch.full((2,), int(process.timesteps[i]))), x, i, g)
        outs.append(x)
    assert torch.equal(outs[0], outs[1])


def test_stepper_order_is_enforced():
    stepper = Stepper(GaussianDiffusion(make_betas("linear")).respaced(10), "dpm++2m")
    x = torch.zeros(1, 1, 2, 2)
    stepper.step(x, x, 9)
    with pytest.raises(ValueError, match="one index at a time"):
        stepper.step(x, x, 5)


# ---------------------------------------------------------------------------- vs diffusers
def _run_ours(process: GaussianDiffusion, method: str, x: torch.Tensor) -> torch.Tensor:
    stepper = Stepper(process, method, eta=0.0, clip_x0=False)
    for i in range(process.num_timesteps - 1, -1, -1):
        t = torch.full((x.shape[0],), int(process.timesteps[i]))
        x = stepper.step(toy_net(x, t), x, i)
    return x


@pytest.mark.parametrize("kind,theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_ddim_matches_diffusers(kind, theirs):
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only) not installed")
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=theirs, clip_sample=False, set_alpha_to_one=True)
    sch.set_timesteps(10)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = x0.clone()
    for t in sch.timesteps:
        ref = sch.step(toy_net(ref, t.expand(2)), t, ref, eta=0.0).prev_sample
    process = GaussianDiffusion(make_betas(kind)).respaced(sorted(int(t) for t in sch.timesteps))
    ours = _run_ours(process, "ddim", x0.clone())
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [10, 20])
@pytest.mark.parametrize("kind,theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_dpm_solver_pp_2m_matches_diffusers(kind, theirs, n):
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only) not installed")
    sch = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule=theirs, algorithm_type="dpmsolver++", solver_order=2,
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
    )
    sch.set_timesteps(n)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = x0.clone()
    for t in sch.timesteps:
        ref = sch.step(toy_net(ref, t.expand(2)), t, ref).prev_sample
    process = GaussianDiffusion(make_betas(kind)).respaced(sorted(int(t) for t in sch.timesteps))
    ours = _run_ours(process, "dpm++2m", x0.clone())
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- the network's view
def test_model_sees_original_timesteps_and_progress_is_reported():
    d = GaussianDiffusion(make_betas("linear"))
    seen, progress = [], []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sample(d, model, (3, 1, 2, 2), 8, method="ddim", spacing="uniform", progress=lambda i, n: progress.append((i, n)))
    assert [int(t[0]) for t in seen] == d.respaced(8).timesteps[::-1].tolist()
    assert all(t.shape == (3,) and t.dtype == torch.long for t in seen)
    assert progress == [(k, 8) for k in range(1, 9)]


def test_progress_can_cancel():
    d = GaussianDiffusion(make_betas("linear"))
    calls = []

    def cancel(i, n):
        calls.append(i)
        if i == 3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        sample(d, lambda x, t: torch.zeros_like(x), (1, 1, 2, 2), 10, progress=cancel)
    assert calls == [1, 2, 3]


# ---------------------------------------------------------------------------- partial noising / masks
def test_strength_zero_returns_the_image_and_one_is_pure_noise():
    d = GaussianDiffusion(make_betas("linear"))
    model = gaussian_data_eps_model(d)
    init = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    calls = []
    out = sample(d, lambda x, t: calls.append(1) or model(x, t), init.shape, 20, init_image=init, strength=0.0)
    assert torch.equal(out, init) and not calls
    full = sample(d, model, init.shape, 20, generator=torch.Generator().manual_seed(5))
    from_image = sample(d, model, init.shape, 20, init_image=init, strength=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(full, from_image)


def test_partial_noising_follows_diffmix_schedule_and_keeps_the_image_close():
    d = GaussianDiffusion(make_betas("linear"))
    model = gaussian_data_eps_model(d)
    init = torch.full((4, 3, 8, 8), 0.3) + 0.2 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def recording(x, t):
        seen.append(int(t[0]))
        return model(x, t)

    g = torch.Generator().manual_seed(1)
    out = sample(d, recording, init.shape, 100, method="ddim", spacing="uniform", init_image=init, strength=0.55, generator=g)
    assert len(seen) == 55 and seen[0] == round(0.55 * 999) and seen[-1] == 0
    low = sample(d, model, init.shape, 20, init_image=init, strength=0.1, generator=torch.Generator().manual_seed(1))
    high = sample(d, model, init.shape, 20, init_image=init, strength=0.9, generator=torch.Generator().manual_seed(1))
    assert (low - init).abs().mean() < (high - init).abs().mean()
    assert (out - init).abs().mean() < 0.5


@pytest.mark.parametrize("method", ["dpm++2m", "ddim", "ancestral"])
def test_masked_rerendering_keeps_the_unmasked_region_exactly(method):
    d = GaussianDiffusion(make_betas("cosine"))
    model = gaussian_data_eps_model(d)
    init = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mask = np.zeros((16, 16), np.float32)
    mask[4:10, 5:12] = 1
    out = sample(d, model, init.shape, 10, method=method, init_image=init, mask=mask, generator=torch.Generator().manual_seed(0))
    keep = torch.from_numpy(mask == 0)
    assert torch.equal(out[..., keep], init[..., keep])
    assert (out[..., ~keep] - init[..., ~keep]).abs().mean() > 0.1
    # with a strength, the masked region starts from the noised image instead of pure noise
    partial = sample(d, model, init.shape, 10, method=method, init_image=init, mask=mask, strength=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(partial[..., keep], init[..., keep])


@pytest.mark.parametrize("method", ["dpm++2m", "ddim"])
def test_fresh_pixels_keep_nothing_of_the_image_and_the_rest_starts_from_it(method):
    """DiffMix with edited nuclei: ``fresh`` pixels are denoised from pure noise over the whole
    chain (the model here is per pixel, so nothing mixes between pixels), the others from the
    image noised to the strength."""
    d = GaussianDiffusion(make_betas("linear"))
    model = gaussian_data_eps_model(d)
    a = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    fresh = np.zeros((16, 16), np.float32)
    fresh[4:10, 5:12] = 1
    inside = torch.from_numpy(fresh == 1)
    b, c = a.clone(), a.clone()
    b[..., inside] = -a[..., inside]  # another image inside the fresh pixels only
    c[..., ~inside] = -a[..., ~inside]  # ... outside them only

    def run(init, **kw):
        kw = {"strength": 0.5, "fresh": fresh, **kw}
        return sample(d, model, init.shape, 10, method=method, init_image=init, generator=torch.Generator().manual_seed(0), **kw)

    out = run(a)
    assert torch.equal(out, run(b))  # nothing of the image survives in the fresh pixels
    other = run(c)
    assert torch.equal(out[..., inside], other[..., inside])
    assert (out[..., ~inside] - other[..., ~inside]).abs().mean() > 0.1  # the rest follows the image
    from_noise = run(a, strength=1.0, fresh=None)
    assert torch.equal(out[..., inside], from_noise[..., inside])  # exactly a render from pure noise there
    # a sample's pixels do not depend on its batch, also when it has no fresh pixel at all
    pair = torch.cat([a, c])
    both = sample(d, model, pair.shape, 10, method=method, init_image=pair, strength=0.5,
                  fresh=np.stack([fresh, np.zeros_like(fresh)]),
                  generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    assert torch.equal(both[:1], out)
    alone = sample(d, model, c.shape, 10, method=method, init_image=c, strength=0.5, fresh=np.zeros_like(fresh),
                   generator=[torch.Generator().manual_seed(1)])
    assert torch.equal(both[1:], alone)
    with pytest.raises(ValueError, match="fresh needs an init_image and a strength"):
        sample(d, model, a.shape, 10, init_image=a, mask=fresh, fresh=fresh)


def test_bad_sampling_inputs():
    d = GaussianDiffusion(make_betas("linear"))
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    init = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="need an init_image"):
        sample(d, model, (1, 3, 4, 4), 5, strength=0.5)
    with pytest.raises(ValueError, match="needs a strength"):
        sample(d, model, (1, 3, 4, 4), 5, init_image=init)
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
        sample(d, model, (1, 3, 4, 4), 5, init_image=init, strength=1.5)
    with pytest.raises(ValueError, match="init_image has shape"):
        sample(d, model, (2, 3, 4, 4), 5, init_image=init, strength=0.5)
    with pytest.raises(ValueError, match="mask values"):
        sample(d, model, (1, 3, 4, 4), 5, init_image=init, mask=torch.full((4, 4), 2.0))
    with pytest.raises(ValueError, match="does not broadcast"):
        sample(d, model, (1, 3, 4, 4), 5, init_image=init, mask=torch.ones(5, 5))
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample(d, model, (1, 3, 4, 4), 5, method="euler")
    with pytest.raises(ValueError, match="expected 3 channels"):
        sample(d, lambda x, t: torch.zeros(1, 6, 4, 4), (1, 3, 4, 4), 5)


# ---------------------------------------------------------------------------- guidance
class CountingNet:
    """net_fn(x, t, cond) with an eps head and a 'variance' head, counting its calls."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        eps = torch.tanh(x) + cond.mean(dim=(1, 2, 3), keepdim=True)
        var = 0.1 * cond[:, :1].expand_as(x) + 0.01 * x
        return torch.cat([eps, var], 1)


def test_guidance_zero_is_the_conditional_model_in_one_pass():
    net = CountingNet()
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 10, 999])
    cond, null = torch.rand(3, 4, 4, 4), torch.zeros(3, 4, 4, 4)
    out = guided(net, cond, null, scale=0.0, eps_channels=2)(x, t)
    assert net.batches == [3]
    assert torch.equal(out, CountingNet()(x, t, cond))


def test_guidance_uses_one_batched_pass_and_the_conditional_variance():
    net = CountingNet()
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 10, 999])
    cond, null = torch.rand(3, 4, 4, 4), torch.zeros(1, 4, 4, 4)  # a null of batch 1 broadcasts
    out = guided(net, cond, null, scale=0.5, eps_channels=2)(x, t)
    assert net.batches == [6]
    ref = CountingNet()
    oc, ou = ref(x, t, cond), ref(x, t, null.expand(3, -1, -1, -1))
    torch.testing.assert_close(out[:, :2], oc[:, :2] + 0.5 * (oc[:, :2] - ou[:, :2]))
    torch.testing.assert_close(out[:, 2:], oc[:, 2:])


def test_guidance_with_dict_conditions_and_errors():
    seen = []

    def net(x, t, cond):
        seen.append({k: v.shape[0] for k, v in cond.items()})
        return x * cond["text"].view(-1, 1, 1, 1)

    x, t = torch.ones(2, 1, 2, 2), torch.tensor([1, 2])
    cond = {"points": torch.ones(2, 1, 2, 2), "text": torch.tensor([2.0, 3.0])}
    null = {"points": cond["points"], "text": torch.zeros(2)}  # guidance on the text only
    out = guided(net, cond, null, scale=2.0, eps_channels=1)(x, t)
    assert seen == [{"points": 4, "text": 4}]
    torch.testing.assert_close(out, x * torch.tensor([6.0, 9.0]).view(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="same keys"):
        guided(net, cond, {"text": null["text"]}, 1.0, 1)(x, t)
    with pytest.raises(ValueError, match=">= -1"):
        guided(net, cond, null, -1.5, 1)
    # scale -1 is the unconditional model (co-synthesis w = 0)
    torch.testing.assert_close(guided(net, cond, null, -1.0, 1)(x, t), torch.zeros_like(x))


def test_paper_guidance_conventions():
    assert guidance_scale_from(1.5, "sdm") == pytest.approx(0.5)
    assert guidance_scale_from(2.0, "nudiff") == pytest.approx(2.0)
    assert guidance_scale_from(3.0, "cosynthesis") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="convention"):
        guidance_scale_from(1.0, "imagen")
    # the SDM form eps_u + s (eps_c - eps_u) equals ours with scale s - 1
    eps_c, eps_u, s = torch.randn(5), torch.randn(5), 1.5
    ours = eps_c + guidance_scale_from(s, "sdm") * (eps_c - eps_u)
    torch.testing.assert_close(ours, eps_u + s * (eps_c - eps_u))
