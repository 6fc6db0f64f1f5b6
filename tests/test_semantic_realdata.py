"""A `tiny` semantic model trained on real CoNSeP crops learns to follow its label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import load_checkpoint
from nucsynth.data.dataset import SampleDataset
from nucsynth.io.consep import read_consep_file
from nucsynth.models.semantic import SemanticModel, to_uint8
from nucsynth.train import TrainConfig, read_log, train

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _contrast(images, layouts) -> float:
    """Mean grey level of background minus that inside nuclei (> 0: nuclei darker)."""
    bg, fg = [], []
    for img, lay in zip(images, layouts):
        grey = np.asarray(img, float).mean(-1)
        nuc = lay.inst_map > 0
        if nuc.any() and (~nuc).any():
            fg.append(grey[nuc].mean())
            bg.append(grey[~nuc].mean())
    return float(np.mean(bg) - np.mean(fg))


def test_tiny_model_on_real_patches_follows_label_maps(consep_dir: Path, tmp_path):
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two
    mats = sorted((consep_dir / "Labels").glob("*.mat"))[::9]  # 48 patches across all tiles
    samples = [read_consep_file(m) for m in mats]
    model = SemanticModel.from_preset("tiny", 64)
    data = SampleDataset(samples, maps=model.data_maps, size=64, augment=True, seed=0)
    cfg = TrainConfig(steps=100, batch_size=4, lr=2e-3, warmup=10, ema_decay=0.95, cond_drop=0.2,
                      checkpoint_every=0, preview_at_end=False, seed=0)
    train(model, data, tmp_path / "run", cfg)

    losses = [r["loss"] for r in read_log(tmp_path / "run")]
    assert np.mean(losses[-20:]) < 0.4 * np.mean(losses[:10]), (np.mean(losses[:10]), np.mean(losses[-20:]))

    trained, net = load_checkpoint(tmp_path / "run")
    picks = samples[1::8][:6]  # held-in tiles, but centre crops the run saw only partly
    layouts = [s.layout.crop(96, 96, 64, 64) for s in picks]
    real = [s.image[96:160, 96:160] for s in picks]
    made = [s.image for s in trained.sample(layouts, steps=6, guidance=0.0, seed=1)]
    cond = trained.condition(layouts)
    null = to_uint8(trained.sample_tensor(net, torch.zeros_like(cond), steps=6, guidance=0.0, seed=1, sampler="dpm++2m"))

    c_real, c_made, c_null = _contrast(real, layouts), _contrast(made, layouts), _contrast(null, layouts)
    print(f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-20:]):.3f}; contrast real {c_real:.1f} "
          f"generated {c_made:.1f} null map {c_null:.1f}")
    assert c_real > 10  # sanity: in the real patches nuclei are darker (hematoxylin)
    assert c_made > 0.4 * c_real, (c_real, c_made, c_null)
    assert c_made > c_null + 0.25 * c_real, (c_real, c_made, c_null)
