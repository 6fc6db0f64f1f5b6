"""SPADE condition features kept per render: bit-identical output, computed once per
distinct condition whatever the number of steps, sampler, guidance, masking or windows."""

from __future__ import annotations

import pytest
import torch

from nucsynth.diffusion import GaussianDiffusion, guided, make_betas, sample
from nucsynth.diffusion.noise import exact_rows, generators
from nucsynth.nets.blocks import SPADE, ConditionCache, ConditionFeatures
from nucsynth.nets.unet import SpadeUNet, unet_preset


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(cond_channels: int = 5, size: int = 32) -> SpadeUNet:
    torch.manual_seed(0)
    net = SpadeUNet(unet_preset("tiny", size, 3, 6, cond_channels)).eval()
    with torch.no_grad():  # non-zero output layers, so that every block matters
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def _cond(batch: int, size: int = 32, channels: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, channels, (batch, size, size), generator=g)
    return torch.nn.functional.one_hot(labels, channels).permute(0, 3, 1, 2).float()


class CountModulations:
    """Counts SPADE gamma/beta computations."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = SPADE.modulation

        def counted(spade, cond, x):
            self.calls += 1
            return original(spade, cond, x)

        monkeypatch.setattr(SPADE, "modulation", counted)


def test_features_give_bit_identical_output_and_are_computed_once(monkeypatch):
    net, cond = _net(), _cond(2)
    spades = sum(isinstance(m, SPADE) for m in net.modules())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([900, 10])
    count = CountModulations(monkeypatch)
    with torch.no_grad():
        plain = net(x, t, cond)
        assert count.calls == spades
        feats = ConditionFeatures(cond)
        for step in range(3):
            out = net(x * (step + 1), t - step, feats)
            assert torch.equal(out, net(x * (step + 1), t - step, cond))
        assert count.calls == spades + spades + 3 * spades  # the features: once; the plain passes: every time
        assert torch.equal(net(x, t, feats), plain) and count.calls == 5 * spades
    assert feats.cached_bytes > 0


def test_no_features_kept_while_training_and_gradients_flow():
    net, cond = _net(), _cond(2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 500])
    feats = ConditionFeatures(cond)
    a = net(x, t, feats)
    a.square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x, t, cond).square().mean().backward()
    assert feats.cached_bytes == 0
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))


def test_budget_bounds_the_kept_features():
    net, cond = _net(), _cond(1)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([300])
    with torch.no_grad():
        full = ConditionFeatures(cond)
        ref = net(x, t, full)
        total = full.cached_bytes
        for budget in (0, total // 3):
            part = ConditionFeatures(cond, budget_bytes=budget)
            assert torch.equal(net(x, t, part), ref) and torch.equal(net(x, t, part), ref)
            assert part.cached_bytes <= budget
    with pytest.raises(ValueError, match="budget must be >= 0 bytes, got -1"):
        ConditionFeatures(cond, budget_bytes=-1)
    with pytest.raises(ValueError, match=r"must be a \(B, C, H, W\) tensor, got \(5, 32, 32\)"):
        ConditionFeatures(cond[0])


def test_cache_matches_by_content_and_shares_the_null_rows():
    cache = ConditionCache()
    cond = _cond(2)
    both = torch.cat([cond, torch.zeros_like(cond)])
    rows = [cache(both[i : i + 1]) for i in range(4)]
    assert rows[0] is not rows[1] and rows[2] is rows[3]  # two layouts, one null
    assert cache(both[0:1].clone()) is rows[0]  # a new tensor with the same values
    assert cache.conditions == 3
    again = both[1:2]
    again.add_(1.0)  # changed in place: no longer the condition first seen
    assert cache(both[1:2]) is not rows[1]
    with pytest.raises(ValueError, match="expected a condition tensor"):
        cache([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("method,scale,masked", [("dpm++2m", 0.5, False), ("ddim", 0.0, True), ("ancestral", 0.5, True)])
def test_sampling_bit_identical_and_spade_work_independent_of_steps(monkeypatch, method, scale, masked):
    net, cond = _net(), _cond(2)
    diffusion = GaussianDiffusion(make_betas("linear", 1000), prediction="eps", learned_variance=True)
    spades = sum(isinstance(m, SPADE) for m in net.modules())
    init = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(32, 32)
    mask[8:24, 4:20] = 1

    def render(cached: bool, steps: int) -> torch.Tensor:
        cache = ConditionCache() if cached else None

        def net_fn(x, t, c):
            return net(x, t, cache(c) if cache is not None else c)

        model_fn = guided(exact_rows(net_fn, "cpu"), cond, torch.zeros_like(cond[:1]), scale, eps_channels=3)
        with torch.no_grad():
            return sample(diffusion, model_fn, (2, 3, 32, 32), steps, method=method,
                          generator=generators([3, 4], "cpu"), eta=0.5 if method == "ddim" else 0.0,
                          init_image=init if masked else None, mask=mask if masked else None)

    count = CountModulations(monkeypatch)
    plain = render(False, 3)
    plain_calls = count.calls
    count.calls = 0
    kept = render(True, 3)
    assert torch.equal(kept, plain)
    distinct = 2 + (scale != 0)  # two layouts (+ the null, once for both rows)
    assert count.calls == distinct * spades
    assert plain_calls == 3 * (2 if scale == 0 else 4) * spades  # rows one at a time on CPU
    count.calls = 0
    render(True, 5)
    assert count.calls == distinct * spades  # more steps, no more SPADE work


def test_windowed_sampling_keeps_one_set_per_distinct_window(monkeypatch):
    windows = pytest.importorskip("nucsynth.diffusion.windows")
    net, cond = _net(), _cond(1, size=64)
    spades = sum(isinstance(m, SPADE) for m in net.modules())
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([400])
    count = CountModulations(monkeypatch)
    cache = ConditionCache()
    plain_fn = windows.windowed(lambda a, b, c: net(a, b, c), 32)
    kept_fn = windows.windowed(lambda a, b, c: net(a, b, cache(c)), 32)
    with torch.no_grad():
        ref = plain_fn(x, t, cond)
        count.calls = 0
        for _ in range(3):
            assert torch.equal(kept_fn(x, t, cond), ref)
    assert 0 < count.calls <= cache.conditions * spades


def test_inference_runs_channels_last_on_cpu_with_the_same_output():
    from nucsynth.device import inference_memory_format

    assert inference_memory_format(torch.device("cpu")) == torch.channels_last
    net, cond = _net(), _cond(2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([50, 700])
    seen = []
    hook = net.input_conv.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    try:
        train_like = net(x, t, cond).detach()  # gradients on: NCHW as given
        with torch.no_grad():
            infer = net(x, t, cond)
    finally:
        hook.remove()
    assert seen == [False, True]
    torch.testing.assert_close(infer, train_like, rtol=1e-5, atol=1e-5)
