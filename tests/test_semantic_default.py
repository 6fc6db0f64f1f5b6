"""The default semantic checkpoint shipped inside the package."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import default_checkpoint_dir, load_checkpoint, read_config, resolve_checkpoint
from nucsynth.generate.layouts import random_layout
from nucsynth.models.semantic import SemanticModel


def test_default_is_found_small_and_complete(monkeypatch):
    monkeypatch.delenv("NUCSYNTH_CHECKPOINT", raising=False)
    path = resolve_checkpoint(None)
    assert path == default_checkpoint_dir()
    assert (path / "ema.safetensors").stat().st_size <= 10 * 2**20
    cfg = read_config(path)
    assert cfg["family"] == "semantic" and cfg["model"]["class_set"]["name"] == "consep4"
    assert cfg["data"]["count"] == 432 and cfg["step"] == cfg["train"]["steps"]


def test_default_renders_nuclei_darker_than_background():
    torch.set_num_threads(1)
    model, _ = load_checkpoint(default_checkpoint_dir())
    assert isinstance(model, SemanticModel)
    layouts = [random_layout((64, 64), model.class_set, seed=i) for i in range(3)]
    out = model.sample(layouts, steps=8, guidance=0.5, seed=0)
    grey = [s.image.astype(float).mean(-1) for s in out]
    inside = np.mean([g[l.inst_map > 0].mean() for g, l in zip(grey, layouts)])
    outside = np.mean([g[l.inst_map == 0].mean() for g, l in zip(grey, layouts)])
    assert outside - inside > 15, (inside, outside)  # hematoxylin-dark nuclei on pink tissue
