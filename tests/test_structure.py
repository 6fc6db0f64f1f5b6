"""The structure family (NuDiff stage 1): config, structure <-> Layout, loss, sampling,
checkpoint round trip, and the watershed on true structures of real CoNSeP crops. A training
run on real data is scripts/check_structure_joint.py --family structure (figures in
docs/models.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import load_checkpoint, save_checkpoint
from nucsynth.layout import CONSEP_CLASSES, NUCLEUS_CLASSES, Layout
from nucsynth.models import get_family
from nucsynth.models.structure import (
    PAPER_TRAINING,
    StructureConfig,
    StructureModel,
    layout_from_structure,
    structure_from_layout,
)

from conftest import disk_layout_arrays


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize_zero_params(net: torch.nn.Module) -> None:
    """The output head is zero-initialized: give it weights so outputs depend on the input."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)


@pytest.fixture(scope="module")
def model() -> StructureModel:
    torch.manual_seed(0)
    m = StructureModel.from_preset("tiny", 32)
    m.net = m.build_network().eval()
    _randomize_zero_params(m.net)
    return m


def _layout(shape=(48, 48)) -> Layout:
    # two touching discs + one apart: the HV maps must split the touching pair
    inst, classes = disk_layout_arrays(shape, centres=((14, 14, 7), (14, 27, 6), (34, 30, 8)), classes=(1, 1, 1))
    return Layout.from_inst_map(inst, classes, NUCLEUS_CLASSES)


def test_config_presets_roundtrip_and_errors():
    cfg = StructureConfig.from_preset("tiny", 64)
    assert cfg.network["in_channels"] == 3 and cfg.network["cond_channels"] == 0
    assert cfg.network["out_channels"] == 6 and cfg.learned_variance
    assert cfg.schedule == "linear" and cfg.timesteps == 1000
    assert StructureConfig.from_dict(cfg.to_dict()) == cfg
    fixed = StructureConfig.from_preset("base", 128, learned_variance=False, watershed={"threshold": 0.4})
    assert fixed.network["out_channels"] == 3 and fixed.watershed == {"threshold": 0.4}
    assert StructureConfig.from_preset("paper", 256).network["model_channels"] == 256
    assert PAPER_TRAINING["weight_decay"] == 0.05 and PAPER_TRAINING["lr"] == 1e-4
    for bad in (dict(name="huge"), dict(colour=1), dict(watershed={"nope": 1})):
        with pytest.raises(ValueError):
            StructureConfig.from_preset(**{"name": "tiny", "image_size": 64, **bad})
    assert get_family("structure") is StructureModel
    assert StructureModel.data_maps == ("mask", "hv")


def test_true_structure_through_watershed_gives_back_the_nuclei():
    lay = _layout()
    s = structure_from_layout(lay)
    assert s.shape == (3, 48, 48) and s.dtype == np.float32
    assert set(np.unique(s[0])) == {-1.0, 1.0} and np.abs(s[1:]).max() <= 1.0
    out = layout_from_structure(s, NUCLEUS_CLASSES)
    assert out.num_nuclei == 3 and np.all(out.classes == 0)
    # each true nucleus is matched by one recovered nucleus with IoU > 0.8
    for i in range(1, 4):
        t = lay.inst_map == i
        ids, counts = np.unique(out.inst_map[t], return_counts=True)
        j = ids[np.argmax(counts)]
        p = out.inst_map == j
        assert j > 0 and (t & p).sum() / (t | p).sum() > 0.8
    with pytest.raises(ValueError, match="shape"):
        layout_from_structure(s[:2])


def test_training_loss_is_finite_deterministic_and_trains_the_network(model):
    lay = _layout((32, 32))
    s = torch.from_numpy(structure_from_layout(lay))
    batch = {"mask": ((s[:1] + 1) / 2).expand(4, -1, -1, -1).clone(), "hv": s[1:].expand(4, -1, -1, -1).clone()}
    net = model.net
    l1, logs = model.training_loss(net, batch, torch.Generator().manual_seed(1))
    l2, _ = model.training_loss(net, batch, torch.Generator().manual_seed(1))
    l3, _ = model.training_loss(net, batch, torch.Generator().manual_seed(2))
    assert bool(torch.isfinite(l1)) and float(l1.detach()) == float(l2) != float(l3)
    assert set(logs) == {"mse", "vb"} and logs["vb"] >= 0
    net.zero_grad()
    l1.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    np.testing.assert_allclose(
        model.batch_structure(batch)[0].numpy(), s.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="hv"):
        model.training_loss(net, {"mask": batch["mask"]}, torch.Generator())


def test_sample_is_deterministic_and_returns_layouts(model):
    a = model.sample_structures(2, steps=3, seed=5)
    b = model.sample_structures(2, steps=3, seed=5)
    c = model.sample_structures(2, steps=3, seed=6)
    assert a.shape == (2, 3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    calls = []
    lays = model.sample(2, size=(32, 64), steps=3, seed=5, progress=lambda i, n: calls.append((i, n)))
    assert len(lays) == 2 and all(isinstance(l, Layout) and l.shape == (32, 64) for l in lays)
    assert calls[-1] == (3, 3)
    assert all(np.all(l.classes == 0) and l.class_set == NUCLEUS_CLASSES for l in lays)


def test_sample_input_errors(model):
    with pytest.raises(ValueError, match="count"):
        model.sample(0)
    with pytest.raises(ValueError, match="multiple"):
        model.sample(1, size=31)
    with pytest.raises(ValueError, match="sampler"):
        model.sample(1, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        model.sample(1, steps=0)
    with pytest.raises(ValueError, match="network"):
        StructureModel.from_preset("tiny", 32).sample(1)


def test_preview_draws_structures(model):
    imgs = model.preview(model.net, {"mask": torch.zeros(2, 1, 32, 32)}, seed=0)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8


def test_checkpoint_roundtrip(model, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", model, model.net, step=7)
    loaded, net = load_checkpoint(path)
    assert isinstance(loaded, StructureModel) and loaded.config == model.config and loaded.step == 7
    for a, b in zip(model.net.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(loaded.sample_structures(1, steps=2, seed=3), model.sample_structures(1, steps=2, seed=3))
    # a structure model for another output class set keeps it
    other = StructureModel.from_preset("tiny", 32, CONSEP_CLASSES)
    assert StructureModel.from_config_dict(other.config_dict()).class_set == CONSEP_CLASSES


def test_stage2_semantic_model_conditioned_on_structures(model, tmp_path):
    from nucsynth.models.semantic import SemanticConfig, SemanticModel

    cfg = SemanticConfig.from_preset("tiny", 32, CONSEP_CLASSES, condition="structure")
    assert cfg.cond_channels == 3 and cfg.network["cond_channels"] == 3
    assert SemanticConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="condition"):
        SemanticConfig.from_preset("tiny", 32, condition="points")
    torch.manual_seed(0)
    stage2 = SemanticModel(cfg)
    stage2.net = stage2.build_network().eval()
    _randomize_zero_params(stage2.net)
    assert stage2.data_maps == ("mask", "hv")
    lay = _layout((32, 32))
    np.testing.assert_array_equal(stage2.condition([lay])[0].numpy(), structure_from_layout(lay))
    s = torch.from_numpy(structure_from_layout(lay))[None].expand(2, -1, -1, -1)
    batch = {"image": torch.zeros(2, 3, 32, 32), "mask": (s[:, :1] + 1) / 2, "hv": s[:, 1:]}
    loss, _ = stage2.training_loss(stage2.net, batch, torch.Generator().manual_seed(0), cond_drop=0.2)
    assert bool(torch.isfinite(loss))
    # the two stages end to end: sampled structures -> Layouts -> images; labels kept exactly
    lays = model.sample(2, steps=2, seed=1)
    out = stage2.sample(lays, steps=2, guidance=2.0, seed=1)
    assert [o.image.shape for o in out] == [(32, 32, 3)] * 2
    assert all(o.layout.equals(l) for o, l in zip(out, lays))
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "s2", stage2, stage2.net))
    assert loaded.config.condition == "structure"


def test_default_watershed_keeps_small_touching_nuclei_of_sharp_structures():
    """Sampled structures are sharp; HoVer-Net's defaults (tuned for smooth predictions)
    merge or drop small touching nuclei on a 32 px canvas (here: 4 nuclei -> 1), which makes
    sampled nuclei look several times too large. The model's default parameters keep them."""
    inst, _ = disk_layout_arrays((32, 32), centres=((8, 8, 4), (8, 16, 4), (20, 12, 5), (24, 24, 4)),
                                 classes=(1, 1, 1, 1))
    lay = Layout.from_inst_map(inst, np.zeros(4, np.int64), NUCLEUS_CLASSES)
    s = structure_from_layout(lay)
    out = StructureModel.from_preset("tiny", 32).to_layout(s)
    assert sorted(out.areas().tolist()) == sorted(lay.areas().tolist())
    assert layout_from_structure(s).num_nuclei < lay.num_nuclei  # the reference defaults


def test_true_structures_of_real_crops_keep_their_nucleus_size(consep_dir):
    """On true structures of 32 px CoNSeP crops the model's watershed gives back nuclei of
    the right size (the yardstick of the sampled ones: median area within x2 of the data)."""
    from nucsynth.data.dataset import SampleDataset
    from nucsynth.io import read_consep

    samples = [s for s in read_consep(consep_dir) if s.provenance["tile"] in ("train_1", "train_10")]
    ds = SampleDataset(samples, maps=("mask", "hv", "inst_map"), size=32, augment=True, seed=0)
    m = StructureModel.from_preset("tiny", 32)
    true, got = [], []
    for i in range(len(ds)):
        item = ds[i]
        true.append(np.bincount(item["inst_map"].numpy().ravel())[1:])
        s = m.batch_structure({k: v[None] for k, v in item.items()})[0].numpy()
        got.append(m.to_layout(s).areas())
    t, g = np.concatenate(true), np.concatenate(got)
    t, g = t[t > 0], g[g > 0]
    assert 0.8 < np.median(g) / np.median(t) < 1.5
    assert g.size > 0.7 * t.size
