"""The default model shipped inside the package: a latent semantic model with its autoencoder."""

from __future__ import annotations

import numpy as np
import torch

from nucsynth.checkpoint import default_checkpoint_dir, load_checkpoint, read_config, resolve_checkpoint
from nucsynth.generate.layouts import random_layout
from nucsynth.models.semantic import SemanticModel


def test_default_is_found_small_complete_and_never_saw_val(monkeypatch):
    monkeypatch.delenv("NUCSYNTH_CHECKPOINT", raising=False)
    path = resolve_checkpoint(None)
    assert path == default_checkpoint_dir()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"shipped model is {size / 2**20:.1f} MB"
    cfg = read_config(path)
    assert cfg["family"] == "semantic" and cfg["model"]["class_set"]["name"] == "consep4"
    assert cfg["model"]["latent"]["autoencoder"] == "autoencoder" and cfg["model"]["latent"]["label_aware"]
    assert cfg["step"] >= 2000  # steps of the latent model (the learning rate is constant after warm-up)
    # trained on the training split of a store split by tile: the val tiles are recorded and unseen
    data = cfg["data"]
    assert data["split"] == "train" and data["count"] == 352
    groups = data["store"]["split_groups"]
    assert len(groups["val"]) == 5 and not set(groups["val"]) & set(groups["train"])
    ae = read_config(path / "autoencoder")
    assert ae["family"] == "autoencoder" and ae["data"]["split"] == "train"


def test_default_renders_256px_tissue_with_nuclei_darker_than_background():
    torch.set_num_threads(1)
    model, _ = load_checkpoint(default_checkpoint_dir())
    assert isinstance(model, SemanticModel) and model.is_latent and model.render_size >= 256
    layouts = [random_layout((256, 256), model.class_set, seed=i) for i in range(2)]
    out = model.sample(layouts, steps=8, guidance=0.5, seed=0)
    assert out[0].image.shape == (256, 256, 3)
    grey = [s.image.astype(float).mean(-1) for s in out]
    inside = np.mean([g[l.inst_map > 0].mean() for g, l in zip(grey, layouts)])
    outside = np.mean([g[l.inst_map == 0].mean() for g, l in zip(grey, layouts)])
    assert outside - inside > 15, (inside, outside)  # hematoxylin-dark nuclei on pink tissue
