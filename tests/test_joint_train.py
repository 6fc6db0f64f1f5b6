"""A `tiny` joint model trained briefly on CPU on real CoNSeP crops: its loss falls clearly,
and its samples for held-out point layouts are scored (points inside a generated nucleus of
their class vs chance; printed).

60 steps are too few for the points to be learned (measured on 2026-11-22, with the label
loss on the whole-chain ELBO scale: 0.059 vs chance 0.052, loss 14.4 -> 2.4), so the hit
rate is printed, not asserted. Nor did an overfit-a-few-patches run fit this test's budget:
300 steps of batch 4 on 4 fixed patches cost ~80 s of CPU and gave 0.27 vs chance 0.12 on
only 15 points (not a reliable margin). The point-following claim is checked by the
400-step run of scripts/check_structure_joint.py --family joint (0.272 vs chance 0.043,
docs/models.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import load_checkpoint
from nucsynth.data.dataset import SampleDataset
from nucsynth.io import read_consep
from nucsynth.layout import Layout
from nucsynth.models.joint import JointModel, point_class_hits
from nucsynth.train import TrainConfig, train


def _subset(consep_dir, tmp_path, tiles=("train_1_", "train_10_", "train_12_", "train_14_")):
    """A folder of links to a few tiles' patches (reading all 432 costs seconds)."""
    sub = tmp_path / "consep"
    for part in ("Images", "Labels"):
        (sub / part).mkdir(parents=True)
        for f in sorted((consep_dir / part).iterdir()):
            if f.name.startswith(tiles):
                (sub / part / f.name).symlink_to(f)
    return sub


@pytest.mark.slow
def test_tiny_joint_learns_points_on_real_consep(consep_dir, tmp_path):
    torch.set_num_threads(1)
    samples = read_consep(_subset(consep_dir, tmp_path))
    held = [s for s in samples if s.provenance["tile"] == "train_14"]
    train_s = [s for s in samples if s.provenance["tile"] != "train_14"]
    assert train_s and held
    cs = train_s[0].layout.class_set
    torch.manual_seed(0)
    model = JointModel.from_preset("tiny", 32, cs)
    ds = SampleDataset(train_s, maps=model.data_maps, size=32, seed=0)
    cfg = TrainConfig(steps=60, batch_size=4, lr=2e-3, warmup=10, ema_decay=0.9, checkpoint_every=0,
                      preview_at_end=False)
    res = train(model, ds, tmp_path / "run", cfg)
    first, last = np.mean(res.losses[:10]), np.mean(res.losses[-10:])

    pix = np.zeros(cs.num_classes + 1)
    for i in range(len(ds)):
        pix += np.bincount(ds[i]["type_map"].numpy().ravel(), minlength=cs.num_classes + 1)
    share = pix / pix.sum()
    trained, _ = load_checkpoint(res.checkpoint)
    lays = []
    for s in held:
        lay = s.layout.crop(112, 112, 32, 32)
        if lay.num_nuclei:
            lays.append(Layout.from_points(lay.shape, lay.centroids, lay.classes, cs))
    maps = trained.sample_maps(lays, steps=10, guidance=0.0, seed=0)
    hits = np.concatenate([point_class_hits(lab, lay) for lab, lay in zip(maps.labels, lays)])
    chance = np.concatenate([share[lay.classes] for lay in lays])
    print(f"\njoint tiny, 60 steps: loss {first:.3f} -> {last:.3f}; {hits.size} held-out points: "
          f"inside a generated nucleus of their class {hits.mean():.3f} vs chance {chance.mean():.3f}")
    assert last < 0.6 * first
    assert hits.size == sum(l.num_nuclei for l in lays) and 0 < chance.mean() < 0.5
