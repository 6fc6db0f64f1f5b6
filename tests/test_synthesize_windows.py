"""Large canvases (nucsynth.diffusion.windows): overlapping windows of the training size,
denoised jointly, with no seam, in memory bounded by the window, refused up front when the
machine cannot hold the canvas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucsynth.diffusion import windows as W
from nucsynth.generate.layouts import random_layout
from nucsynth.layout import CONSEP_CLASSES
from nucsynth.models.semantic import SemanticModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    """A tiny 32 px model with large random weights: its zero padding makes strong border
    artefacts, so windows that do not blend well show seams plainly."""
    m = SemanticModel.from_preset("tiny", 32, CONSEP_CLASSES)
    torch.manual_seed(0)
    net = m.build_network().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    m.net = net
    return m


@pytest.mark.parametrize("size,window,overlap", [(96, 32, 8), (100, 32, 8), (32, 32, 8), (40, 32, 0), (1000, 64, 16)])
def test_windows_cover_the_canvas_with_at_least_the_overlap(size, window, overlap):
    starts = W.window_starts(size, window, overlap)
    assert starts[0] == 0 and starts[-1] + window == max(size, window)
    assert all(b - a <= window - overlap for a, b in zip(starts, starts[1:]))  # shared >= overlap
    origins, weights = W.blend_weights((size, size), (min(window, size),) * 2, overlap)
    total = torch.zeros(size, size)
    for (y0, x0), wmap in zip(origins, weights):
        total[y0 : y0 + wmap.shape[-2], x0 : x0 + wmap.shape[-1]] += wmap[0]
    assert total.min() > 0  # every pixel is predicted


def test_a_canvas_of_one_window_is_untouched(model):
    net_fn = lambda x, t, c: model.net(x, t, c)  # noqa: E731
    x, c, t = torch.randn(2, 3, 32, 32), torch.rand(2, 6, 32, 32), torch.tensor([300, 300])
    with torch.no_grad():
        assert torch.equal(W.windowed(net_fn, 32)(x, t, c), net_fn(x, t, c))


def test_no_seam_across_window_borders(model, monkeypatch):
    """The gradient across window borders is not larger than inside windows; the same
    measurement on hard tiles (no overlap) sees the seams, so it can fail."""
    lay = random_layout((96, 96), CONSEP_CLASSES, seed=3)
    blended = model.sample(lay, steps=3, guidance=0.0, seed=0)[0].image
    monkeypatch.setattr(W.windowed, "__defaults__", (0.0, W.WINDOWS_PER_CALL))  # hard tiles
    tiled = model.sample(lay, steps=3, guidance=0.0, seed=0)[0].image
    chance = max(W.seam_ratio(blended, 32, shift=s) for s in (-9, -6, -4, 4, 6, 9))  # not borders
    assert W.seam_ratio(blended, 32) <= max(1.0, chance)
    hard_chance = max(W.seam_ratio(tiled, 32, 0.0, shift=s) for s in (-9, -6, -4, 4, 6, 9))
    assert W.seam_ratio(tiled, 32, overlap=0.0) > 2.0 * max(1.0, hard_chance)


def test_large_canvas_is_refused_up_front_with_the_estimate(model, monkeypatch, tmp_path):
    from nucsynth.checkpoint import save_checkpoint
    from nucsynth.synthesize import SynthesisOptions, get_synthesizer, plan_items

    path = save_checkpoint(tmp_path / "m", model, model.net, step=1, train_config={"steps": 1, "cond_drop": 0.2})
    synth = get_synthesizer(path, "cpu")
    small, big = synth.memory_estimate((256, 256), 1, 0.5), synth.memory_estimate((4096, 4096), 1, 0.5)
    assert big < 300 * small  # grows with pixels (256x), not with attention over the whole canvas
    monkeypatch.setattr(W, "available_bytes", lambda device: 64 << 20)  # a machine with 64 MiB free
    opts = synth.resolve(SynthesisOptions(steps=1))
    items = plan_items(synth, opts, [random_layout((2048, 2048), CONSEP_CLASSES, seed=0)])
    with pytest.raises(ValueError, match=r"2048x2048 px needs about .* GiB .* only 0\.1 GiB is free"):
        synth.render(items, opts, progress=lambda i, n: pytest.fail("sampling started"))
