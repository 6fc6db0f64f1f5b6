"""The joint family (co-synthesis): config, network inputs/outputs, loss, guidance, sampling
to Samples at the given points, checkpoint round trip. Training on real CoNSeP data is in
test_joint_train.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import load_checkpoint, save_checkpoint
from nucsynth.layout import CONSEP_CLASSES, NUCLEUS_CLASSES, Layout, Sample
from nucsynth.models import get_family
from nucsynth.models.joint import JointConfig, JointModel, JointNet, point_class_hits
from nucsynth.nets.text import prompt_from_layout

from conftest import disk_layout_arrays


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize_zero_params(net: torch.nn.Module) -> None:
    """The heads are zero-initialized: give them weights so outputs depend on the inputs."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.05)


@pytest.fixture(scope="module")
def model() -> JointModel:
    torch.manual_seed(0)
    m = JointModel.from_preset("tiny", 32)
    m.net = m.build_network().eval()
    _randomize_zero_params(m.net)
    return m


def _layout(shape=(32, 32)) -> Layout:
    inst, classes = disk_layout_arrays(shape, centres=((8, 8, 4), (20, 22, 6), (9, 24, 3)), classes=(1, 2, 3))
    return Layout.from_inst_map(inst, classes, CONSEP_CLASSES)


def _batch(lay: Layout, n: int = 4) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    return {
        "image": torch.from_numpy(rng.uniform(-1, 1, (n, 3, *lay.shape)).astype(np.float32)),
        "dist": torch.from_numpy(np.stack([lay.distance_map()[None]] * n)),
        "type_map": torch.from_numpy(np.stack([lay.type_map()] * n).astype(np.int64)),
        "points": torch.from_numpy(np.stack([lay.point_map()] * n).astype(np.int64)),
    }


def test_config_defaults_presets_and_roundtrip():
    cfg = JointConfig.from_preset("tiny", 64)
    assert cfg.loss_weights == (9.0, 1.0, 3.0)
    assert cfg.schedules == {"image": "cosine", "distance": "cosine", "label": "cosine"}
    assert cfg.network["out_channels"] == 3 + 1 + 5 and cfg.network["in_channels"] == cfg.embed_dim
    assert cfg.network["early_channels"] == cfg.network["late_channels"] == cfg.point_channels
    assert cfg.network["context_dim"] == cfg.text_dim and cfg.text_encoder == "builtin"
    assert JointConfig.from_dict(cfg.to_dict()) == cfg
    custom = JointConfig.from_preset("base", 128, NUCLEUS_CLASSES, loss_weights=(1, 1, 1),
                                     schedules={"label": "linear"})
    assert custom.network["out_channels"] == 4 + 2 and custom.schedules["label"] == "linear"
    assert custom.schedules["image"] == "cosine"
    clip = JointConfig.from_preset("tiny", 64, text_encoder="open_clip", text_path="/nowhere")
    assert clip.text_dim == 512 and clip.text_width == 512
    for bad in (dict(name="huge"), dict(colour=1), dict(loss_weights=(1, 2)), dict(text_encoder="open_clip"),
                dict(schedules={"image": "sqrt"}), dict(tissue="moon")):
        with pytest.raises(ValueError):
            JointConfig.from_preset(**{"name": "tiny", "image_size": 64, **bad})
    assert get_family("joint") is JointModel


def test_network_inputs_are_summed_and_heads_start_at_zero():
    torch.manual_seed(0)
    m = JointModel.from_preset("tiny", 32)
    net = m.build_network()
    assert isinstance(net, JointNet)
    lay = _layout()
    b = _batch(lay, 2)
    text = m.text_features(m.prompts_for_points(b["points"]), net)
    out = net(b["image"], b["dist"] * 2 - 1, b["type_map"], torch.tensor([10, 500]), b["points"], text)
    assert out.shape == (2, 9, 32, 32)
    assert torch.count_nonzero(out) == 0  # zero-initialized heads: zero noise, uniform labels
    # the null text (all-zero features) gives an exactly zero context
    assert torch.count_nonzero(net.context(torch.zeros_like(text))) == 0
    assert torch.count_nonzero(net.context(text)) > 0


def test_training_loss_weights_generator_and_drops(model):
    lay = _layout()
    batch = _batch(lay)
    net = model.net
    l1, logs = model.training_loss(net, batch, torch.Generator().manual_seed(1))
    l2, _ = model.training_loss(net, batch, torch.Generator().manual_seed(1))
    l3, _ = model.training_loss(net, batch, torch.Generator().manual_seed(2))
    assert bool(torch.isfinite(l1)) and float(l1.detach()) == float(l2.detach()) != float(l3.detach())
    assert set(logs) == {"image", "distance", "label"} and logs["label"] >= 0
    w = model.config.loss_weights
    assert float(l1.detach()) == pytest.approx(w[0] * logs["image"] + w[1] * logs["distance"] + w[2] * logs["label"], rel=1e-5)
    net.zero_grad()
    l1.backward()
    assert all(p.grad is not None for p in net.parameters())
    # cond_drop = 1 drops every text: the same as giving a batch whose points name no classes
    # is NOT implied, but the loss must differ from the conditional one
    l_drop, _ = model.training_loss(net, batch, torch.Generator().manual_seed(1), cond_drop=1.0)
    assert float(l_drop.detach()) != float(l1.detach())
    with pytest.raises(ValueError, match="points"):
        model.training_loss(net, {k: v for k, v in batch.items() if k != "points"}, torch.Generator())


def test_prompts_from_points_and_layouts(model):
    lay = _layout()
    pts = torch.from_numpy(lay.point_map()[None].astype(np.int64))
    assert model.prompts_for_points(pts) == [prompt_from_layout(lay, "colon")]
    feats = model.text_features(["high-quality histopathology colon tissue image including nuclei types of other"])
    assert feats.shape == (1, model.config.text_width) and feats[0, 0] == 1 and feats[0, 1:4].sum() == 0
    with pytest.raises(ValueError, match="template"):
        model.text_features(["a picture of cells"])


def test_sample_nuclei_sit_at_the_points_deterministically(model):
    lay = _layout()
    pts = Layout.from_points(lay.shape, lay.centroids, lay.classes, CONSEP_CLASSES)
    calls = []
    a = model.sample([pts, lay], steps=3, guidance=1.0, seed=4, progress=lambda i, n: calls.append((i, n)))
    b = model.sample([pts, lay], steps=3, guidance=1.0, seed=4)
    c = model.sample([pts, lay], steps=3, guidance=1.0, seed=5)
    assert calls[-1] == (3, 3) and len(a) == 2
    assert all(isinstance(s, Sample) and s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8 for s in a)
    np.testing.assert_array_equal(a[0].image, b[0].image)
    assert a[0].layout.equals(b[0].layout)
    assert not np.array_equal(a[0].image, c[0].image)
    # a full layout is used only for its centroids and classes: same output as its points
    np.testing.assert_array_equal(model.sample([lay, lay], steps=3, guidance=1.0, seed=4)[0].image, a[0].image)
    for s in a:
        out = s.layout
        assert out.num_nuclei == 3
        # every nucleus with pixels covers its own point
        for i, (y, x) in enumerate(np.rint(lay.centroids).astype(int), start=1):
            if (out.inst_map == i).any():
                assert out.inst_map[y, x] == i
    assert a[0].provenance["prompt"] == prompt_from_layout(lay) and a[0].provenance["seed"] == 4
    kept = model.sample(pts, steps=2, seed=4, class_source="points")[0]
    np.testing.assert_array_equal(kept.layout.classes, lay.classes)


def test_guidance_options_and_maps(model):
    lay = _layout()
    m0 = model.sample_maps(lay, steps=2, guidance=0.0, seed=1)
    m1 = model.sample_maps(lay, steps=2, guidance=2.0, seed=1)
    m2 = model.sample_maps(lay, steps=2, guidance=2.0, seed=1, guide_points=True)
    assert m0.labels.shape == (1, 32, 32) and m0.labels.min() >= 0 and m0.labels.max() <= 4
    assert m0.distance.min() >= 0 and m0.distance.max() <= 1
    assert not np.array_equal(m0.images, m1.images) and not np.array_equal(m1.images, m2.images)
    other = model.sample_maps(lay, prompts="high-quality histopathology colon tissue image including nuclei types of spindle",
                              steps=2, guidance=2.0, seed=1)
    assert not np.array_equal(other.images, m1.images)


def test_point_class_hits():
    lay = _layout()
    hits = point_class_hits(lay.type_map(), lay)
    assert hits.tolist() == [True, True, True]
    assert point_class_hits(np.zeros(lay.shape, np.int64), lay).tolist() == [False] * 3


def test_sample_input_errors(model):
    lay = _layout()
    with pytest.raises(ValueError, match="at least one"):
        model.sample([])
    with pytest.raises(ValueError, match="class set"):
        model.sample(Layout.from_inst_map(lay.inst_map, [1, 1, 1], NUCLEUS_CLASSES))
    with pytest.raises(ValueError, match="multiple"):
        model.sample(Layout.from_points((30, 30), [[5.0, 5.0]], [1], CONSEP_CLASSES))
    with pytest.raises(ValueError, match="prompts"):
        model.sample([lay, lay], prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match="class_source"):
        model.sample(lay, class_source="guess")
    with pytest.raises(ValueError, match="guidance"):
        model.sample(lay, guidance=-1)
    with pytest.raises(ValueError, match="network"):
        JointModel.from_preset("tiny", 32).sample(lay)


def test_preview_and_checkpoint_roundtrip(model, tmp_path):
    lay = _layout()
    imgs = model.preview(model.net, _batch(lay, 2), seed=0)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8
    path = save_checkpoint(tmp_path / "ckpt", model, model.net, step=3)
    loaded, net = load_checkpoint(path)
    assert isinstance(loaded, JointModel) and loaded.config == model.config and loaded.step == 3
    for a, b in zip(model.net.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    x = loaded.sample(lay, steps=2, seed=9)[0]
    y = model.sample(lay, steps=2, seed=9)[0]
    np.testing.assert_array_equal(x.image, y.image)
    assert x.layout.equals(y.layout) and x.provenance["checkpoint"] == str(path)


def test_label_loss_is_the_whole_chain_elbo_not_one_step():
    """The label term is T x the per-step KL (the ELBO estimate of the whole chain). A fresh
    network predicts uniform labels, whose ELBO is about log(K+1) nats per pixel, the scale of
    the noise MSEs (1 at init). The bare per-step KL is ~1e-3 nats: with it the label head
    barely trains and the generated labels ignore the points."""
    torch.manual_seed(0)
    m = JointModel.from_preset("tiny", 32)
    net = m.build_network()
    batch = _batch(_layout(), 8)
    logs = [m.training_loss(net, batch, torch.Generator().manual_seed(s))[1] for s in range(6)]
    label = float(np.mean([l["label"] for l in logs]))
    k1 = np.log(m.config.num_labels)
    assert 0.5 * k1 < label < 2.0 * k1
    assert np.mean([l["image"] for l in logs]) == pytest.approx(1.0, abs=0.05)
