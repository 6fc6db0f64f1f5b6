"""Tests of the RRDB point-map encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucsynth.layout import CONSEP_CLASSES, Layout
from nucsynth.nets import RRDBEncoder, SpadeUNet, count_flops, unet_preset


def _points(b: int = 2, size: int = 16, seed: int = 0, classes: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(b, size, size, dtype=torch.long)
    idx = torch.randint(0, size * size, (b, 6), generator=g)
    p.view(b, -1).scatter_(1, idx, torch.randint(1, classes, (b, 6), generator=g))
    return p


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_shapes(stride: int) -> None:
    enc = RRDBEncoder(6, channels=8, blocks=1, growth=4, stride=stride)
    out = enc(_points())
    assert out.shape == (2, 8, 16, 16)


def test_layout_point_map_and_unet_integration() -> None:
    layout = Layout.from_points((32, 32), [[3, 4], [10, 20], [25, 5], [30, 30]], [1, 2, 0, 4], CONSEP_CLASSES)
    pm = torch.from_numpy(layout.point_map()).long()[None]
    assert pm.max() == CONSEP_CLASSES.num_classes + 1  # the unknown-class nucleus
    enc = RRDBEncoder.for_classes(CONSEP_CLASSES.num_classes, channels=8, blocks=1, growth=4, stride=2)
    feats = enc(pm)
    cfg = unet_preset("tiny", 32, 3, 3, 0, early_channels=8, late_channels=8)
    net = SpadeUNet(cfg)
    out = net(torch.randn(1, 3, 32, 32), torch.tensor([5]), early=feats, late=feats)
    assert out.shape == (1, 3, 32, 32)


def test_strided_encoder_keeps_every_point() -> None:
    # Two maps differing only in where a point sits inside one 2x2 cell must differ:
    # folding cells into channels is lossless.
    torch.manual_seed(0)
    enc = RRDBEncoder(4, channels=8, blocks=1, growth=4, stride=2)
    a = torch.zeros(1, 8, 8, dtype=torch.long)
    b = a.clone()
    a[0, 2, 2] = 1
    b[0, 3, 3] = 1
    fa, fb = enc(a), enc(b)
    assert not torch.allclose(fa, fb)
    assert torch.equal(enc(a), fa)  # deterministic


def test_stride_cuts_flops() -> None:
    with torch.device("meta"):
        full = RRDBEncoder(6, 64, 3)
        half = RRDBEncoder(6, 64, 3, stride=2)
        p = torch.zeros(1, 256, 256, dtype=torch.long)
    f1, f2 = count_flops(full, p), count_flops(half, p)
    assert 0.25e12 < f1 < 0.35e12  # the reference's 0.30 TFLOP point encoder at 256 px
    assert f2 < 0.3 * f1


def test_errors() -> None:
    enc = RRDBEncoder(4, channels=8, blocks=1, growth=4, stride=2)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        enc(torch.full((1, 8, 8), 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        enc(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="multiple of stride"):
        enc(torch.zeros(1, 9, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        enc(torch.zeros(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="in_classes"):
        RRDBEncoder(1)
    with pytest.raises(ValueError, match="stride"):
        RRDBEncoder(4, stride=0)


def test_gradients_reach_embedding() -> None:
    enc = RRDBEncoder(6, channels=8, blocks=2, growth=4)
    enc(_points()).square().mean().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0
    assert np.isfinite(enc.conv_first.weight.grad.numpy()).all()
