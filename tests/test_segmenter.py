"""The HoVer-Net-style segmenter: shapes, losses, determinism, storage and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nucsynth.evaluate import segmenter as S
from nucsynth.generate.tissue import procedural_sample
from nucsynth.layout import CONSEP_CLASSES, NUCLEUS_CLASSES


def tiny_config(**kw) -> S.SegmenterConfig:
    d = dict(widths=(8, 16), blocks=1, steps=1, batch_size=2, crop=32, lr=5e-3)
    d.update(kw)
    return S.SegmenterConfig(num_classes=4, **d)


@pytest.fixture(scope="module")
def samples():
    return [procedural_sample((48, 48), seed=s) for s in range(4)]


def test_forward_shapes_and_padding_of_odd_sizes():
    net = S.HoVerSegmenter(tiny_config(widths=(8, 16, 32)))
    out = net(torch.zeros(2, 3, 64, 64))
    assert out["np"].shape == (2, 2, 64, 64) and out["hv"].shape == (2, 2, 64, 64) and out["tp"].shape == (2, 5, 64, 64)
    assert out["hv"].abs().max() <= 1
    img = np.zeros((50, 70, 3), np.uint8)
    lays = S.predict_layouts(net, [img], CONSEP_CLASSES)
    assert lays[0].shape == (50, 70)


def test_loss_terms_vanish_for_a_perfect_prediction(samples):
    from nucsynth.data.dataset import SampleDataset

    item = SampleDataset(samples, maps=("mask", "hv", "type_map"), augment=False)[0]
    batch = {k: v[None] for k, v in item.items()}
    big = 50.0  # logits far apart: softmax one-hot
    out = {
        "np": big * torch.cat([1 - batch["mask"], batch["mask"]], 1),
        "hv": batch["hv"].clone(),
        "tp": big * torch.nn.functional.one_hot(batch["type_map"], 5).permute(0, 3, 1, 2).float(),
    }
    _, terms = S.segmenter_loss(out, batch, tiny_config().loss_weights)
    assert terms["hv_mse"] == 0 and terms["hv_msge"] == 0
    assert terms["np_ce"] < 1e-6 and terms["tp_ce"] < 1e-6
    assert terms["np_dice"] < 1e-3
    bad = dict(out, hv=torch.zeros_like(out["hv"]))
    _, worse = S.segmenter_loss(bad, batch, tiny_config().loss_weights)
    assert worse["hv_mse"] > 0 and worse["hv_msge"] > 0


def test_training_is_deterministic_for_a_seed(samples):
    state = torch.random.get_rng_state()
    a, log_a = S.train_segmenter(samples, tiny_config(), seed=3)
    b, log_b = S.train_segmenter(samples, tiny_config(), seed=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert log_a == log_b
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    init3, init4 = S._build(tiny_config(), 3), S._build(tiny_config(), 4)
    assert not torch.equal(init3.stem[0].weight, init4.stem[0].weight)


def test_training_refuses_mismatched_classes(samples):
    with pytest.raises(ValueError, match="classes"):
        S.train_segmenter(samples, S.SegmenterConfig(num_classes=2, widths=(8, 16), steps=1))
    with pytest.raises(ValueError, match="unknown segmenter preset"):
        S.segmenter_preset("huge", 4)


@pytest.mark.slow
def test_training_lowers_the_loss(samples):
    net, log = S.train_segmenter(samples, tiny_config(steps=30), seed=0)
    first = np.mean([r["loss"] for r in log[:5]])
    last = np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.8 * first  # measured 3.92 -> 2.58


def test_save_and_load_round_trip(tmp_path, samples):
    net = S._build(tiny_config(), 0).eval()
    path = S.save_segmenter(tmp_path / "seg", net, CONSEP_CLASSES, {"note": "x"})
    net2, cs, extra = S.load_segmenter(path)
    assert cs == CONSEP_CLASSES and extra == {"note": "x"}
    imgs = [s.image for s in samples[:2]]
    p1 = S.predict_layouts(net, imgs, CONSEP_CLASSES)
    p2 = S.predict_layouts(net2, imgs, CONSEP_CLASSES)
    assert all(x.equals(y) for x, y in zip(p1, p2))
    with pytest.raises(ValueError, match="classes"):
        S.predict_layouts(net2, imgs, NUCLEUS_CLASSES)
    with pytest.raises(FileNotFoundError, match="no segmenter"):
        S.load_segmenter(tmp_path / "missing")
    (path / "segmenter.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        S.load_segmenter(path)


def test_postprocess_options_travel_with_the_model(tmp_path, samples):
    tiny = S.segmenter_preset("tiny", 4)
    assert tiny.postprocess == S.TINY_POSTPROCESS and tiny.postprocess is not S.PRESETS["tiny"]["postprocess"]
    with pytest.raises(ValueError, match="unknown postprocess options \\['sobel'\\]"):
        tiny_config(postprocess={"sobel": 7})
    # threshold 1.01: no pixel can be a nucleus; stored with the weights, overridable per call.
    net = S._build(tiny_config(postprocess={"threshold": 1.01, "min_size": 0}), 0).eval()
    net2, _, _ = S.load_segmenter(S.save_segmenter(tmp_path / "seg", net, CONSEP_CLASSES))
    assert net2.config.postprocess == {"threshold": 1.01, "min_size": 0}
    imgs = [s.image for s in samples[:2]]
    assert all(lay.inst_map.max() == 0 for lay in S.predict_layouts(net2, imgs, CONSEP_CLASSES))
    assert any(lay.inst_map.max() > 0 for lay in S.predict_layouts(net2, imgs, CONSEP_CLASSES, threshold=0.0))


def _make_store(path: Path, samples) -> Path:
    from nucsynth.io.store import DatasetStore

    store = DatasetStore.create(path, CONSEP_CLASSES)
    store.append(samples[:3], splits="train")
    store.append(samples[3:], splits="val")
    return path


def test_cli_train_and_evaluate(tmp_path, samples, capsys):
    from nucsynth.cli import main

    store = _make_store(tmp_path / "data.zarr", samples)
    out = tmp_path / "model"
    rc = main(["segmenter", "train", "--data", str(store), "--out", str(out), "--steps", "1",
               "--batch-size", "2", "--crop", "32", "--device", "cpu"])
    assert rc == 0 and (out / "model.safetensors").is_file()
    res = tmp_path / "eval.json"
    rc = main(["segmenter", "evaluate", "--model", str(out), "--data", str(store), "--json", str(res), "--device", "cpu"])
    assert rc == 0
    got = json.loads(res.read_text())
    assert got["n_images"] == 1 and set(got["mean"]) >= {"dice", "aji", "pq"}
    assert "PQ" in capsys.readouterr().out
    assert main(["segmenter", "evaluate", "--model", str(out), "--data", str(store), "--split", "nope"]) == 2
