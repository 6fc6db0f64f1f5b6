"""Tests of the SPADE U-Net, its presets and the FLOP counter."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nucsynth.nets import PRESETS, SpadeUNet, UNetConfig, count_flops, count_params, unet_preset
from nucsynth.nets.blocks import SPADE, AttentionBlock, group_count


def _tiny(size: int = 32, **kw) -> UNetConfig:
    return unet_preset("tiny", size, 3, 6, kw.pop("cond", 6), **kw)


def _randomize_output(net: SpadeUNet, seed: int = 1) -> None:
    """Give the zero-initialized layers random weights so that every path reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(cfg: UNetConfig, b: int = 2, size: int | None = None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = size or cfg.image_size
    d = {
        "x": torch.randn(b, cfg.in_channels, s, s, generator=g),
        "t": torch.randint(0, 1000, (b,), generator=g),
    }
    if cfg.cond_channels:
        d["cond"] = torch.randn(b, cfg.cond_channels, s, s, generator=g)
    if cfg.context_dim:
        d["context"] = torch.randn(b, cfg.context_dim, generator=g)
    if cfg.early_channels:
        d["early"] = torch.randn(b, cfg.early_channels, s, s, generator=g)
    if cfg.late_channels:
        d["late"] = torch.randn(b, cfg.late_channels, s, s, generator=g)
    return d


@pytest.fixture(scope="module")
def full_net() -> SpadeUNet:
    """A tiny network with every optional input, all layers non-zero (shared: do not modify)."""
    torch.manual_seed(0)
    net = SpadeUNet(_tiny(context_dim=8, early_channels=5, late_channels=4))
    _randomize_output(net)
    return net


@pytest.mark.parametrize("size", [32, 64])
def test_tiny_shapes_and_size(size: int) -> None:
    cfg = _tiny(size)
    net = SpadeUNet(cfg)
    assert 0.5e6 <= count_params(net) <= 1.5e6
    out = net(**_inputs(cfg))
    assert out.shape == (2, 6, size, size)
    assert torch.count_nonzero(out) == 0  # zero-initialized output conv


@pytest.mark.parametrize("size", [64, 256])
def test_base_shapes_on_meta(size: int) -> None:
    cfg = unet_preset("base", size, 3, 6, 6)
    with torch.device("meta"):
        net = SpadeUNet(cfg)
        out = net(**{k: v.to("meta") for k, v in _inputs(cfg, b=1).items()})
    assert out.shape == (1, 6, size, size)


@pytest.mark.parametrize("size", [128, 256])
def test_paper_shapes_on_meta(size: int) -> None:
    cfg = unet_preset("paper", size, 3, 6, 6)
    with torch.device("meta"):
        net = SpadeUNet(cfg)
        out = net(**{k: v.to("meta") for k, v in _inputs(cfg, b=1).items()})
    assert out.shape == (1, 6, size, size)
    assert cfg.model_channels == 256 and cfg.num_res_blocks == 2 and cfg.head_channels == 64
    assert cfg.attention_resolutions == (32, 16, 8) and cfg.resblock_updown
    assert cfg.channel_mult == {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4)}[size]


def test_paper_matches_reference_scale_and_base_is_a_tenth() -> None:
    # REFERENCE: 652 M parameters and 3.42 TFLOP per forward at 256 px (in 3, out 6, cond 6).
    flops = {}
    for name in ("base", "paper"):
        cfg = unet_preset(name, 256, 3, 6, 6)
        with torch.device("meta"):
            net = SpadeUNet(cfg)
            inp = {k: v.to("meta") for k, v in _inputs(cfg, b=1).items()}
        flops[name] = count_flops(net, **inp)
        if name == "paper":
            assert abs(count_params(net) / 652e6 - 1) < 0.01
            assert abs(flops[name] / 3.42e12 - 1) < 0.02
    assert flops["base"] / flops["paper"] <= 0.1


def test_encoder_never_sees_cond(full_net: SpadeUNet) -> None:
    net, cfg = full_net, full_net.config
    acts: list[torch.Tensor] = []
    hooks = [m[-1].register_forward_hook(lambda _m, _i, o: acts.append(o.detach().clone())) for m in net.encoder]
    inp = _inputs(cfg)
    out_a = net(**inp)
    acts_a, acts[:] = list(acts), []
    inp_b = dict(inp, cond=torch.randn_like(inp["cond"]))
    out_b = net(**inp_b)
    for h in hooks:
        h.remove()
    assert len(acts_a) == len(net.encoder) and len(acts) == len(net.encoder)
    for a, b in zip(acts_a, acts):
        assert torch.equal(a, b)
    assert not torch.allclose(out_a, out_b)  # the condition does reach the decoder
    # No SPADE module lives in the encoder; the decoder's res-blocks all have SPADE norms.
    assert not any(isinstance(m, SPADE) for m in net.encoder.modules())
    assert sum(isinstance(m, SPADE) for m in net.decoder.modules()) >= 2 * len(net.decoder)


def test_cond_gradient_does_not_reach_encoder(full_net: SpadeUNet) -> None:
    net, cfg = full_net, full_net.config
    inp = _inputs(cfg)
    cond = inp["cond"].requires_grad_(True)
    skips: list[torch.Tensor] = []
    hooks = [m[-1].register_forward_hook(lambda _m, _i, o: skips.append(o)) for m in net.encoder]
    out = net(**inp)
    for h in hooks:
        h.remove()
    assert len(skips) == len(net.encoder)
    assert not any(_depends_on(s, cond) for s in skips)
    (g,) = torch.autograd.grad(out.sum(), cond)
    assert g.abs().sum() > 0


def _depends_on(t: torch.Tensor, leaf: torch.Tensor) -> bool:
    if not t.requires_grad:
        return False
    (g,) = torch.autograd.grad(t.sum(), leaf, retain_graph=True, allow_unused=True)
    return g is not None and bool(g.abs().sum() > 0)


def test_determinism() -> None:
    cfg = _tiny()
    torch.manual_seed(3)
    a = SpadeUNet(cfg)
    torch.manual_seed(3)
    b = SpadeUNet(cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    _randomize_output(a)
    _randomize_output(b)
    inp = _inputs(cfg, b=1)
    assert torch.equal(a(**inp), b(**inp))
    assert torch.equal(a(**inp), a(**inp))


@pytest.mark.parametrize("which", ["cond", "context", "early", "late", "t"])
def test_every_input_path_changes_output(which: str, full_net: SpadeUNet) -> None:
    net, cfg = full_net, full_net.config
    inp = _inputs(cfg, b=1)
    g = torch.Generator().manual_seed(9)
    other = dict(inp)
    if which == "t":
        other["t"] = (inp["t"] + 500) % 1000
    else:
        other[which] = torch.randn(inp[which].shape, generator=g)
    assert not torch.allclose(net(**inp), net(**other), atol=1e-6)


def test_unconditional_config() -> None:
    cfg = _tiny(cond=0)
    net = SpadeUNet(cfg)
    assert not any(isinstance(m, SPADE) for m in net.modules())
    inp = _inputs(cfg)
    assert "cond" not in inp
    assert net(**inp).shape == (2, 6, 32, 32)
    with pytest.raises(ValueError, match="cond"):
        net(**inp, cond=torch.zeros(2, 6, 32, 32))


def test_cond_any_resolution_and_scalar_t(full_net: SpadeUNet) -> None:
    inp = _inputs(full_net.config)
    cond_small = torch.randn(2, 6, 16, 16)
    cond_up = torch.nn.functional.interpolate(cond_small, size=(32, 32), mode="nearest")
    a = full_net(**dict(inp, t=torch.tensor(10), cond=cond_small))
    b = full_net(**dict(inp, t=torch.tensor([10, 10]), cond=cond_up))
    torch.testing.assert_close(a, b)


def test_input_errors() -> None:
    cfg = _tiny(context_dim=4)
    net = SpadeUNet(cfg)
    x, t = torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    c, ctx = torch.zeros(1, 6, 32, 32), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="needs `cond`"):
        net(x, t, context=ctx)
    with pytest.raises(ValueError, match="needs `context`"):
        net(x, t, c)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(1, 4, 32, 32), t, c, ctx)
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.randn(1, 3, 33, 33), t, c, ctx)
    with pytest.raises(ValueError, match="`cond` must have shape"):
        net(x, t, torch.zeros(1, 5, 32, 32), ctx)
    with pytest.raises(ValueError, match="`early`"):
        net(x, t, c, ctx, early=torch.zeros(1, 2, 32, 32))


def test_config_roundtrip_and_validation() -> None:
    cfg = unet_preset("base", 128, 3, 6, 6, context_dim=512, early_channels=32, late_channels=32)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert UNetConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        UNetConfig.from_dict({**d, "widths": 3})
    with pytest.raises(ValueError, match="attention resolutions"):
        UNetConfig(image_size=64, in_channels=3, out_channels=3, channel_mult=(1, 2), attention_resolutions=(8,))
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(image_size=62, in_channels=3, out_channels=3, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        unet_preset("huge", 256, 3, 6, 6)
    with pytest.raises(ValueError, match="not supported"):
        unet_preset("base", 100, 3, 6, 6)
    assert set(PRESETS) == {"tiny", "base", "paper"}


def test_checkpointing_same_result() -> None:
    torch.manual_seed(0)
    cfg = _tiny()
    a = SpadeUNet(cfg)
    _randomize_output(a)
    b = SpadeUNet(UNetConfig.from_dict({**cfg.to_dict(), "checkpointing": True}))
    b.load_state_dict(a.state_dict())
    inp = _inputs(cfg, b=1)
    la, lb = a(**inp).square().mean(), b(**inp).square().mean()
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    blk = AttentionBlock(64, head_channels=32)
    nn.init.normal_(blk.proj.weight, std=0.1)
    x = torch.randn(2, 64, 4, 4)
    b, c, h, w = x.shape
    qkv = blk.qkv(blk.norm(x)).reshape(b, 3, 2, 32, h * w)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, T)
    att = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / 32**0.5, dim=-1)
    ref = torch.einsum("bhts,bhds->bhdt", att, v).reshape(b, c, h, w)
    torch.testing.assert_close(blk(x), x + blk.proj(ref), atol=1e-5, rtol=1e-5)


def test_group_count() -> None:
    assert group_count(256) == 32
    assert group_count(32) == 8
    assert group_count(96) == 24
    assert group_count(6) == 1


def test_count_flops_linear_on_meta() -> None:
    with torch.device("meta"):
        lin = nn.Linear(10, 7)
        x = torch.randn(3, 10)
    assert count_flops(lin, x) == 2 * 3 * 10 * 7
    assert count_params(lin) == 77


def test_bench_models_script(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_models.py"
    spec = importlib.util.spec_from_file_location("bench_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--size", "64", "--presets", "tiny,base", "--batch", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| tiny | 1.35 |" in out and "base / paper" not in out
    with pytest.raises(SystemExit):
        mod.main(["--measure", "speed"])
