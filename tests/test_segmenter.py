"""The HoVer-Net-style segmenter: shapes, losses, determinism, storage and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nucsynth.evaluate import segmenter as S
from nucsynth.generate.tissue import procedural_sample
from nucsynth.layout import CONSEP_CLASSES, NUCLEUS_CLASSES, Sample


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


def test_training_in_micro_batches_gives_the_same_weights_on_one_thread_or_two(samples):
    from nucsynth.threads import set_threads

    cfg = tiny_config(steps=3, batch_size=4, micro_batches=2)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            set_threads(threads)
            runs.append(S.train_segmenter(samples, cfg, seed=5))
            assert torch.get_num_threads() == threads  # the workers' count is not left behind
    finally:
        set_threads(before)
    (a, log_a), (b, log_b) = runs
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert log_a == log_b
    # One pass over the whole batch trains the same model up to float rounding.
    whole, log_whole = S.train_segmenter(samples, tiny_config(steps=1, batch_size=4), seed=5)
    assert log_whole[0]["loss"] == pytest.approx(log_a[0]["loss"], rel=1e-5)


def test_micro_batches_are_validated_and_presets_fit_them_to_a_smaller_batch():
    for bad in (0, 3, True):
        with pytest.raises(ValueError, match="micro_batches must be a whole number from 1 to the batch size 2"):
            tiny_config(micro_batches=bad)
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        tiny_config(batch_size=0)
    assert S.segmenter_preset("cpu", 4).micro_batches == S.CPU_MICRO_BATCHES == 2
    assert S.segmenter_preset("cpu", 4, batch_size=1).micro_batches == 1
    assert S.segmenter_preset("base", 4).micro_batches == 1  # the GPU preset: one pass
    assert S.SegmenterConfig.from_dict({"num_classes": 4}).micro_batches == 1  # configs saved before the field


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
    assert S.load_segmenter(out)[0].config.micro_batches == 2  # the cpu preset's, recorded with the weights
    assert "2 micro-batches per batch" in capsys.readouterr().err
    res = tmp_path / "eval.json"
    rc = main(["segmenter", "evaluate", "--model", str(out), "--data", str(store), "--json", str(res), "--device", "cpu"])
    assert rc == 0
    got = json.loads(res.read_text())
    assert got["n_images"] == 1 and set(got["mean"]) >= {"dice", "aji", "pq"}
    assert "PQ" in capsys.readouterr().out
    assert main(["segmenter", "evaluate", "--model", str(out), "--data", str(store), "--split", "nope"]) == 2
    assert json.loads((out / "segmenter.json").read_text())["extra"]["preset"] == "cpu"  # the default preset
    deeper = tmp_path / "deeper"
    assert main(["segmenter", "train", "--data", str(store), "--out", str(deeper), "--steps", "1", "--batch-size", "2",
                 "--crop", "32", "--blocks", "2", "--stain-jitter", "0.05", "--device", "cpu"]) == 0
    net2, _, _ = S.load_segmenter(deeper)
    assert net2.config.stain_jitter == 0.05
    assert net2.config.blocks == 2 and all(len(level) == 3 for level in net2.levels[1:])  # down-sampling + 2 blocks
    assert net2.config.micro_batches == 2
    assert main(["segmenter", "train", "--data", str(store), "--out", str(tmp_path / "bad"), "--steps", "1",
                 "--blocks", "0", "--device", "cpu"]) == 2
    assert main(["segmenter", "train", "--data", str(store), "--out", str(tmp_path / "bad"), "--steps", "1",
                 "--batch-size", "2", "--micro-batches", "3", "--device", "cpu"]) == 2
    assert "micro_batches must be a whole number from 1 to the batch size 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    one_pass = tmp_path / "one_pass"
    assert main(["segmenter", "train", "--data", str(store), "--out", str(one_pass), "--steps", "1", "--batch-size", "2",
                 "--crop", "32", "--micro-batches", "1", "--device", "cpu"]) == 0
    assert S.load_segmenter(one_pass)[0].config.micro_batches == 1
    # tune on the training split, then score per patch and per tile, and record a real-image reference
    tuned, ref = tmp_path / "tuned", tmp_path / "with_ref"
    assert main(["segmenter", "tune", "--model", str(out), "--data", str(store), "--every", "1", "--out", str(tuned),
                 "--device", "cpu"]) == 0
    meta = json.loads((tuned / "segmenter.json").read_text())
    tuning = meta["extra"]["postprocess_tuning"]
    assert tuning["patches"] == 3 and tuning["before"] == S.TINY_POSTPROCESS and 0 <= tuning["pq"] <= 1
    res2 = tmp_path / "eval2.json"
    assert main(["segmenter", "evaluate", "--model", str(tuned), "--data", str(store), "--whole", "--empty-score", "1",
                 "--with-reference", str(ref), "--json", str(res2), "--device", "cpu"]) == 0
    got = json.loads(res2.read_text())
    assert got["empty"] == 1.0 and got["whole"]["mode"] == "tile-pooled" and got["whole"]["n_tiles"] == 1
    assert set(S.load_segmenter(ref)[2]["fidelity_reference"]) == {"pq", "f_d", "f1_mean", "score"}
    assert "no nucleus in truth and prediction, scored 1" in capsys.readouterr().out
    assert main(["segmenter", "tune", "--model", str(out), "--data", str(store), "--out", str(tuned)]) == 2  # exists


def test_evaluate_maps_the_model_classes_onto_an_instance_only_store(tmp_path, samples, capsys):
    """A CoNSeP-class model scored on an instance-only store (MoNuSeg): refused before any
    work unless --class-map says how its classes read there; instance figures then equal
    those against the same nuclei with their CoNSeP classes."""
    from nucsynth.cli import main
    from nucsynth.io.store import DatasetStore

    store = _make_store(tmp_path / "data.zarr", samples)
    model = tmp_path / "model"
    assert main(["segmenter", "train", "--data", str(store), "--out", str(model), "--steps", "1",
                 "--batch-size", "2", "--crop", "32", "--device", "cpu"]) == 0
    plain = DatasetStore.create(tmp_path / "plain.zarr", NUCLEUS_CLASSES)
    plain.append([Sample(s.layout.to_class_set(NUCLEUS_CLASSES, {n: "nucleus" for n in CONSEP_CLASSES.names}), s.image,
                         s.provenance) for s in samples[3:]], splits="val")
    plain.close()
    capsys.readouterr()
    assert main(["segmenter", "evaluate", "--model", str(model), "--data", str(tmp_path / "plain.zarr")]) == 2
    assert "(--class-map)" in capsys.readouterr().err
    every = ",".join(f"{n}=nucleus" for n in CONSEP_CLASSES.names)
    for data, extra, name in ((store, [], "four.json"), (tmp_path / "plain.zarr", ["--class-map", every], "one.json")):
        assert main(["segmenter", "evaluate", "--model", str(model), "--data", str(data), "--device", "cpu",
                     "--json", str(tmp_path / name), *extra]) == 0
    four, one = (json.loads((tmp_path / n).read_text()) for n in ("four.json", "one.json"))
    assert one["mean"] == four["mean"] and list(one["detection"]["f1"]) == ["nucleus"]


def test_the_shipped_segmenter_loads_and_carries_its_reference():
    net, cs, extra = S.load_segmenter()
    assert cs.name == "consep4" and net.config.decoder == "shared" and extra["split"] == "train"
    assert set(extra["fidelity_reference"]) == {"pq", "f_d", "f1_mean", "score"}
    assert (S.DEFAULT_SEGMENTER / "model.safetensors").stat().st_size < 8_000_000  # a few MB
    lay = S.predict_layouts(net, [procedural_sample((64, 64), seed=0).image], cs)[0]
    assert lay.shape == (64, 64)
    # it was trained with the cpu preset (the yardstick), its post-processing tuned, in one
    # pass per batch: it predates micro-batches, which change the weights only by rounding
    cpu = S.segmenter_preset("cpu", 4, postprocess=net.config.postprocess, micro_batches=1)
    assert net.config.to_dict() == cpu.to_dict() and extra["preset"] == "cpu"


def test_the_cpu_preset_is_the_deeper_hv_weighted_quick_preset():
    quick, cpu = S.segmenter_preset("quick", 4), S.segmenter_preset("cpu", 4)
    assert (cpu.blocks, quick.blocks) == (2, 1) and cpu.steps > quick.steps
    assert cpu.stain_jitter > 0 and quick.stain_jitter == 0
    assert cpu.loss_weights["hv_mse"] > 1 and cpu.loss_weights["hv_msge"] > 1 and quick.loss_weights["hv_msge"] == 1
    assert S.PRESETS["cpu"]["loss_weights"] is not cpu.loss_weights  # a preset is copied, never shared


def test_the_cli_offers_every_preset():
    """The commands list the presets literally (importing the segmenter at argument-parsing
    time would load torch): they must not drift from PRESETS."""
    import argparse

    from nucsynth.commands import evaluate, segmenter

    for module, path in ((segmenter, ("train",)), (evaluate, ("downstream",))):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[path[0]]
        preset = next(a for a in sub._actions if a.dest == "preset")
        assert sorted(preset.choices) == sorted(S.PRESETS) and preset.default == "cpu"


@pytest.mark.realdata
def test_the_shipped_segmenter_finds_nuclei_of_every_class_on_held_out_tiles(consep_dir):
    """The 5 held-out tiles of `nucsynth prepare`'s default split, which the shipped model
    never saw (measured: PQ 0.306, F_d 0.677, F1 other 0.200, inflammatory 0.592,
    epithelial 0.481, spindle 0.520; docs/metrics.md)."""
    from nucsynth.io import read_source
    from nucsynth.metrics import evaluate_set

    val = ("train_2", "train_9", "train_13", "train_19", "train_27")
    held = [s for s in read_source(consep_dir) if s.provenance["tile"] in val]
    assert len(held) == 80
    net, cs, _ = S.load_segmenter()
    res = evaluate_set([s.layout for s in held], S.predict_layouts(net, [s.image for s in held], cs))
    assert res["mean"]["pq"] > 0.29 and res["detection"]["f_d"] > 0.65
    assert all(v > 0 for v in res["detection"]["f1"].values()), res["detection"]["f1"]


# ---------------------------------------------------------------------------- the cpu yardstick
def test_class_weights_follow_pixel_frequencies(samples):
    w = S.type_class_weights(samples, "sqrt")
    counts = sum(np.bincount(s.layout.type_map().ravel(), minlength=5)[:5] for s in samples)
    freq = counts / counts.sum()
    assert (w * freq).sum() == pytest.approx(1.0)  # mean weight over pixels is 1
    present = freq > 0
    expect = freq[present] ** -0.5
    assert np.allclose(w[present] / w[present][0], expect / expect[0])  # w_c ~ f_c^-1/2
    assert np.allclose(S.type_class_weights(samples, "none"), 1.0)
    inv = S.type_class_weights(samples, "inverse")
    assert np.allclose((inv * freq)[present], (inv * freq)[present][0])  # every class weighs the same
    with pytest.raises(ValueError, match="class weighting must be one of"):
        S.type_class_weights(samples, "log")


def test_weighted_type_loss_counts_rare_pixels_more():
    logits = torch.zeros(1, 5, 2, 2)
    target = torch.tensor([[[0, 0], [0, 1]]])
    plain = S._weighted_ce(logits, target, None)
    w = torch.tensor([1.0, 4.0, 1.0, 1.0, 1.0])
    assert float(S._weighted_ce(logits, target, w)) == pytest.approx(float(plain) * (3 + 4) / 4)


def test_patches_with_a_rare_nucleus_are_drawn_more_often(samples):
    from nucsynth.layout import Layout, Sample

    rare = CONSEP_CLASSES.rare
    common = [s.layout.classes.copy() for s in samples]
    for c in common:
        c[c == rare] = rare + 1
    common[1][0] = rare  # only the second patch holds a rare nucleus
    samples = [Sample(Layout(s.layout.inst_map, c, s.layout.centroids), s.image) for s, c in zip(samples, common)]
    has = np.array([False, True, False, False])
    p = S.patch_sampling_weights(samples, 3.0)
    assert p.sum() == pytest.approx(1.0) and np.allclose(p[has], 3 * p[~has][0])
    assert np.allclose(S.patch_sampling_weights(samples, 1.0), 1 / len(samples))
    with pytest.raises(ValueError, match="rare_boost must be >= 1"):
        tiny_config(rare_boost=0.5)


def test_colour_jitter_is_seeded_and_keeps_the_range():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    a = S._color_jitter(x, 0.2, torch.Generator().manual_seed(1))
    b = S._color_jitter(x, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(S._color_jitter(x.clamp(-1, 1), 0.0, torch.Generator()), x, atol=1e-6)


def test_stain_jitter_is_seeded_exact_at_zero_and_moves_the_stains():
    from skimage.color import rgb2hed

    x = torch.rand(3, 3, 8, 8) * 1.6 - 0.8  # away from black, where the densities explode
    assert torch.allclose(S._stain_jitter(x, 0.0, torch.Generator()), x, atol=1e-5)  # deconvolution round trip
    a = S._stain_jitter(x, 0.1, torch.Generator().manual_seed(1))
    b = S._stain_jitter(x, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.min() >= -1 and a.max() <= 1
    # each image's stain densities scaled and shifted by one (alpha, beta) per stain
    to_rgb = lambda t: ((t[0].permute(1, 2, 0).numpy() + 1) / 2).astype(np.float64)  # noqa: E731
    before, after = rgb2hed(to_rgb(x)).reshape(-1, 3), rgb2hed(to_rgb(a)).reshape(-1, 3)
    for c in range(3):
        slope, _ = np.polyfit(before[:, c], after[:, c], 1)
        assert 0.85 < slope < 1.15 and abs(slope - 1) > 1e-4
    with pytest.raises(ValueError, match="stain_jitter must be in"):
        tiny_config(stain_jitter=1.5)


def test_shared_decoder_is_cheaper_and_trains_deterministically(samples):
    sep = S.HoVerSegmenter(tiny_config(widths=(8, 16, 32)))
    shared = S.HoVerSegmenter(tiny_config(widths=(8, 16, 32), decoder="shared"))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(shared) < 0.7 * n(sep)  # one decoder instead of three
    out = shared(torch.zeros(1, 3, 32, 32))
    assert out["np"].shape == (1, 2, 32, 32) and out["hv"].shape == (1, 2, 32, 32) and out["tp"].shape == (1, 5, 32, 32)
    cfg = tiny_config(decoder="shared", class_weighting="sqrt", rare_boost=3.0, color_jitter=0.1, stain_jitter=0.1,
                      steps=2)
    seen = []
    a, log_a = S.train_segmenter(samples, cfg, seed=1, checkpoint=lambda step, net: seen.append(step), checkpoint_every=1)
    b, log_b = S.train_segmenter(samples, cfg, seed=1)
    assert log_a == log_b and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert seen == [1]  # every step but the last (the final model is the caller's to save)
    with pytest.raises(ValueError, match="decoder must be"):
        tiny_config(decoder="two")


def test_whole_image_prediction_blends_windows(samples):
    net = S._build(tiny_config(widths=(8, 16)), 0).eval()
    img = np.concatenate([samples[0].image, samples[1].image], 1)  # 48 x 96
    one = S.predict_maps(net, img, window=96, overlap=0)
    tiled = S.predict_maps(net, img, window=48, overlap=16)
    for m in (one, tiled):
        assert m["prob"].shape == (48, 96) and m["hv"].shape == (2, 48, 96) and m["type"].shape == (5, 48, 96)
        assert np.allclose(m["type"].sum(0), 1, atol=1e-5) and 0 <= m["prob"].min() and m["prob"].max() <= 1
    # a window covering the image is the plain network pass
    ref = S.predict_batch_maps(net, [img])[0]
    assert np.allclose(one["prob"], ref["prob"], atol=1e-6) and np.allclose(one["hv"], ref["hv"], atol=1e-6)
    lay = S.segment_image(net, img, CONSEP_CLASSES, window=48, overlap=16, threshold=0.0)
    assert lay.shape == (48, 96)
    with pytest.raises(ValueError, match="overlap < window"):
        S.predict_maps(net, img, window=48, overlap=48)
    assert S._starts(100, 48, 32) == [0, 32, 52] and S._starts(40, 48, 32) == [0]


def test_tuning_improves_or_keeps_the_training_pq(monkeypatch, samples):
    """With maps that are the truth itself, the search must find options scoring at least
    the starting ones, and report the PQ they reach."""
    from nucsynth.metrics import evaluate_set

    truth = {id(s.image): s for s in samples}

    def exact_maps(net, images, batch_size=8, device="cpu"):
        out = []
        for im in images:
            lay = truth[id(im)].layout
            tp = np.eye(5, dtype=np.float32)[lay.type_map()].transpose(2, 0, 1)
            out.append({"prob": (lay.inst_map > 0).astype(np.float32), "hv": lay.hv_maps(), "type": tp})
        return out

    monkeypatch.setattr(S, "predict_batch_maps", exact_maps)
    net = S._build(tiny_config(postprocess={"marker_threshold": 0.1, "open_ksize": 9}), 0)
    start = evaluate_set([s.layout for s in samples],
                         [S.hv_watershed(**{"prob": m["prob"], "hv": m["hv"], "type_probs": m["type"]}, **net.config.postprocess)
                          for m in exact_maps(None, [s.image for s in samples])])["mean"]["pq"]
    best, pq = S.tune_postprocess(net, samples, grid={"marker_threshold": (0.1, 0.5), "open_ksize": (3, 9)}, passes=1)
    assert pq >= start and pq > 0.8 and best["open_ksize"] == 3
    with pytest.raises(ValueError, match="unknown postprocess options"):
        S.tune_postprocess(net, samples, grid={"sobel": (3,)})
