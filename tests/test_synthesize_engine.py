"""The synthesis engine (nucsynth.synthesize): one sampling contract over every family, the
same pixels from the CLI, the engine and the demo, per-sample seeds (a sample re-rendered
alone from its provenance equals its pixels in the store), resume, cancel, and guidance
defaults that fit the model. Tiny untrained checkpoints (32 px) saved by the tests."""

from __future__ import annotations

import dataclasses
import inspect
import threading

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import save_checkpoint
from nucsynth.cli import main
from nucsynth.generate.layouts import random_layout
from nucsynth.io.store import DatasetStore
from nucsynth.layout import CONSEP_CLASSES, Sample
from nucsynth.models.joint import JointModel
from nucsynth.models.semantic import SemanticModel
from nucsynth.models.structure import StructureModel
from nucsynth.threads import SMALL_WORK_POSITIONS
from nucsynth.synthesize import (
    Item,
    SynthesisJob,
    SynthesisOptions,
    clear_synthesizers,
    get_synthesizer,
    learned_null,
    partial_path,
    plan_items,
    FRESH_MARGIN,
    rerender,
)

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _noisy(model):
    """A network with random (not zero-initialized) output layers, so samples differ visibly."""
    torch.manual_seed(0)
    net = model.build_network()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _save(root, name, model, cond_drop=0.2):
    return str(save_checkpoint(root / name, model, _noisy(model), step=1,
                               train_config={"steps": 1, "cond_drop": cond_drop}))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "semantic": _save(root, "semantic", SemanticModel.from_preset("tiny", SIZE, CONSEP_CLASSES)),
        "joint": _save(root, "joint", JointModel.from_preset("tiny", SIZE, CONSEP_CLASSES)),
        "structure": _save(root, "structure", StructureModel.from_preset("tiny", SIZE)),
        "stage2": _save(root, "stage2", SemanticModel.from_preset("tiny", SIZE, CONSEP_CLASSES, condition="structure")),
        "nonull": _save(root, "nonull", SemanticModel.from_preset("tiny", SIZE, CONSEP_CLASSES), cond_drop=0.0),
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A store of 5 generated layouts with random images (the source of semantic / joint jobs)."""
    path = tmp_path_factory.mktemp("src") / "src.zarr"
    rng = np.random.default_rng(0)
    samples = [Sample(random_layout((SIZE, SIZE), CONSEP_CLASSES, density=300, seed=i),
                      rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), {"tile": f"t{i}"}) for i in range(5)]
    store = DatasetStore.create(path, CONSEP_CLASSES)
    store.append(samples)
    store.close()
    return path


def _cli(ckpt, out, *extra):
    return ["synthesize", "--checkpoint", ckpt, "--steps", "2", "--seed", "3", "--batch-size", "2", "--device", "cpu",
            "--out", str(out), *extra]


def _images(path):
    return np.stack([s.image for s in DatasetStore.open(path)])


# ---------------------------------------------------------------------- the contract
@pytest.mark.parametrize("family", ["semantic", "joint"])
def test_every_rendering_family_has_one_sampling_contract(family, ckpts, source):
    """layouts in, Samples out; steps / guidance / seed / sampler / progress by keyword, a
    seed per layout; progress once per solver step."""
    synth = get_synthesizer(ckpts[family], "cpu")
    params = inspect.signature(synth.model.sample).parameters
    assert {"steps", "guidance", "seed", "sampler", "progress"} <= set(params)
    lays = [s.layout for s in DatasetStore.open(source)[:2]]
    if family == "joint":
        from nucsynth.generate.layouts import points_from_labels

        lays = [points_from_labels(l) for l in lays]
    calls = []
    out = synth.model.sample(lays, steps=2, guidance=0.5, seed=[7, 9], sampler="ddim",
                             progress=lambda i, n: calls.append((i, n)))
    assert all(isinstance(s, Sample) for s in out) and [s.provenance["seed"] for s in out] == [7, 9]
    assert calls == [(1, 2), (2, 2)]


# ---------------------------------------------------------------------- identical everywhere
def test_semantic_cli_engine_and_demo_give_the_same_pixels(ckpts, tmp_path, source):
    ckpt = ckpts["semantic"]
    assert main(["demo", "--out", str(tmp_path / "demo"), "-n", "3", "--steps", "2", "--seed", "3", "--batch-size", "2",
                 "--checkpoint", ckpt, "--device", "cpu"]) == 0
    demo_store = tmp_path / "demo" / "demo.zarr"
    assert main(_cli(ckpt, tmp_path / "cli.zarr", "--layouts", str(demo_store))) == 0
    synth = get_synthesizer(ckpt, "cpu")
    opts = synth.resolve(SynthesisOptions(steps=2, seed=3, batch_size=3))
    engine = synth.render(plan_items(synth, opts, list(DatasetStore.open(demo_store))), opts)
    np.testing.assert_array_equal(_images(demo_store), _images(tmp_path / "cli.zarr"))
    np.testing.assert_array_equal(_images(demo_store), np.stack([s.image for s in engine]))


def test_joint_cli_and_engine_give_the_same_pixels(ckpts, tmp_path, source):
    from nucsynth.io.sources import read_layout_source

    assert main(_cli(ckpts["joint"], tmp_path / "j.zarr", "--layouts", str(source), "--limit", "3")) == 0
    synth = get_synthesizer(ckpts["joint"], "cpu")
    opts = synth.resolve(SynthesisOptions(steps=2, seed=3))
    src = read_layout_source(source, limit=3, points=True)
    engine = synth.render(plan_items(synth, opts, src), opts)
    stored = list(DatasetStore.open(tmp_path / "j.zarr"))
    for a, b in zip(stored, engine):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.layout.inst_map, b.layout.inst_map)


def test_structure_cli_and_engine_give_the_same_pixels(ckpts, tmp_path):
    assert main(_cli(ckpts["structure"], tmp_path / "s.zarr", "--count", "3", "--image-checkpoint", ckpts["stage2"])) == 0
    synth = get_synthesizer(ckpts["structure"], "cpu", image_checkpoint=ckpts["stage2"])
    opts = synth.resolve(SynthesisOptions(steps=2, seed=3, batch_size=3))
    engine = synth.render(plan_items(synth, opts, count=3), opts)
    np.testing.assert_array_equal(_images(tmp_path / "s.zarr"), np.stack([s.image for s in engine]))


# ---------------------------------------------------------------------- provenance
@pytest.mark.parametrize("case", ["layout", "balance", "joint", "structure"])
def test_one_sample_rerendered_from_its_provenance_equals_the_store(case, ckpts, tmp_path, source):
    out = tmp_path / f"{case}.zarr"
    if case == "layout":
        args = _cli(ckpts["semantic"], out, "--layouts", str(source), "--limit", "4")
    elif case == "balance":
        args = _cli(ckpts["semantic"], out, "--layouts", str(source), "--limit", "4", "--mode", "balance", "--border", "2")
    elif case == "joint":
        args = _cli(ckpts["joint"], out, "--layouts", str(source), "--limit", "4")
    else:
        args = _cli(ckpts["structure"], out, "--count", "4", "--image-checkpoint", ckpts["stage2"])
    assert main(args) == 0
    stored = DatasetStore.open(out)[3]  # the second sample of the second batch
    p = stored.provenance
    assert len(p["checkpoint_sha256"]) == 64 and p["seed"] == 6 and p["options"]["steps"] == 2
    if case == "balance":
        assert p["strength"] == 0.55 and p["options"]["mode"] == "balance" and p["fresh_margin"] == FRESH_MARGIN
    clear_synthesizers()  # loaded afresh, as another process would
    again = rerender(stored)
    np.testing.assert_array_equal(again.image, stored.image)
    np.testing.assert_array_equal(again.layout.inst_map, stored.layout.inst_map)


def test_rerender_refuses_another_checkpoint(ckpts, tmp_path, source):
    out = tmp_path / "a.zarr"
    assert main(_cli(ckpts["semantic"], out, "--layouts", str(source), "--limit", "1")) == 0
    with pytest.raises(ValueError, match="content hash"):
        rerender(DatasetStore.open(out)[0], checkpoint=ckpts["nonull"])


# ---------------------------------------------------------------------- resume and cancel
def test_cancel_then_resume_equals_an_uninterrupted_job(ckpts, tmp_path, source):
    synth = get_synthesizer(ckpts["semantic"], "cpu")
    opts = synth.resolve(SynthesisOptions(steps=2, seed=1, batch_size=2))
    items = plan_items(synth, opts, list(DatasetStore.open(source)))
    full = SynthesisJob(synth, items, opts, tmp_path / "full.zarr").run()
    assert full.written == 5 and not full.cancelled
    stop = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if p.done >= 2 and p.step == 1:
            stop.set()  # cancel inside the second batch

    out = tmp_path / "out.zarr"
    first = SynthesisJob(synth, items, opts, out).run(progress, stop)
    assert first.cancelled and first.total == 2 and not out.exists() and partial_path(out).exists()
    assert any(p.steps == 2 for p in seen)  # progress per solver step, not per batch
    second = SynthesisJob(synth, items, opts, out).run()
    assert second.skipped == 2 and second.written == 3 and not partial_path(out).exists()
    np.testing.assert_array_equal(_images(out), _images(tmp_path / "full.zarr"))
    with pytest.raises(ValueError, match="--seed"):  # a re-run with other settings is refused, naming them
        stop.clear()
        other = synth.resolve(SynthesisOptions(steps=2, seed=2, batch_size=2))
        job = SynthesisJob(synth, plan_items(synth, other, list(DatasetStore.open(source))), other, tmp_path / "p.zarr")
        job.run(lambda p: stop.set() if p.step else None, stop)  # leaves a partial store
        SynthesisJob(synth, items, opts, tmp_path / "p.zarr").run()


# ---------------------------------------------------------------------- guidance defaults
def test_guidance_default_follows_what_the_model_learned(ckpts, tmp_path, source, capsys):
    assert learned_null({"train": {"steps": 10, "cond_drop": 0.0}}) is False
    assert learned_null({"train": {"steps": 10, "cond_drop": 0.0, "finetune_steps": 5, "finetune_cond_drop": 0.2}})
    assert learned_null({"train": {}}) is None
    assert get_synthesizer(ckpts["semantic"], "cpu").resolve(SynthesisOptions()).guidance == 0.5
    nonull = get_synthesizer(ckpts["nonull"], "cpu")
    assert nonull.resolve(SynthesisOptions()).guidance == 0.0
    with pytest.raises(ValueError, match="null condition"):
        nonull.resolve(SynthesisOptions(guidance=0.5))
    assert main(_cli(ckpts["nonull"], tmp_path / "g.zarr", "--layouts", str(source), "--guidance", "1")) == 2
    assert "null condition" in capsys.readouterr().err


def test_diffmix_renders_the_nuclei_an_edit_changed_from_pure_noise(ckpts, source):
    """Balance / enlarge items carry the pixels their edit changed (grown by FRESH_MARGIN) as
    ``fresh``: there the rendering keeps nothing of the source image, so the nuclei an edit
    removed do not stay visible under the new layout (an unedited item an empty region);
    plain layout renders carry none. A sample's pixels do not depend on its batch."""
    from nucsynth.edit.region import edited_region

    synth = get_synthesizer(ckpts["semantic"], "cpu")
    src = list(DatasetStore.open(source))
    for mode in ("balance", "enlarge"):
        opts = synth.resolve(SynthesisOptions(steps=2, mode=mode, border=2))
        items = plan_items(synth, opts, src)
        assert any(it.fresh.any() for it in items)
        for it, s in zip(items, src):  # unedited patches carry an empty region: same path alone or in a batch
            np.testing.assert_array_equal(it.fresh, edited_region(s.layout, it.layout, margin=FRESH_MARGIN))
            assert it.provenance["fresh_margin"] == FRESH_MARGIN
    opts = synth.resolve(SynthesisOptions(steps=2, mode="layout", strength=0.5))
    assert all(it.fresh is None and "fresh_margin" not in it.provenance for it in plan_items(synth, opts, src))
    opts = synth.resolve(SynthesisOptions(steps=2, mode="balance", border=2))
    item = next(it for it in plan_items(synth, opts, src) if it.fresh.any())
    with_fresh = synth.render([item], opts)[0]
    without = synth.render([dataclasses.replace(item, fresh=None)], opts)[0]
    assert with_fresh.provenance["fresh"] and not without.provenance["fresh"]
    assert not np.array_equal(with_fresh.image, without.image)
    items = plan_items(synth, opts, src)[:3]
    batch = synth.render(items, opts)
    for it, s in zip(items, batch):
        np.testing.assert_array_equal(synth.render([it], opts)[0].image, s.image)


def test_a_checkpoint_carries_the_guidance_it_renders_with(ckpts, tmp_path, source):
    """export_checkpoint(guidance=g) records g; every front-end's default (None) and
    sample() without guidance then use it; a checkpoint without the record keeps the
    family's 0.5; impossible values are refused before anything is written."""
    from nucsynth.checkpoint import export_checkpoint, load_checkpoint, read_config

    dst = export_checkpoint(ckpts["semantic"], tmp_path / "unguided", guidance=0.0)
    assert read_config(dst)["model"]["sampling"] == {"guidance": 0.0}
    synth = get_synthesizer(dst, "cpu")
    assert synth.resolve(SynthesisOptions()).guidance == 0.0
    lay = DatasetStore.open(source)[0].layout
    model, _ = load_checkpoint(dst)
    default, unguided = model.sample([lay], steps=2, seed=1)[0], model.sample([lay], steps=2, guidance=0.0, seed=1)[0]
    assert default.provenance["guidance"] == 0.0
    np.testing.assert_array_equal(default.image, unguided.image)
    guided = model.sample([lay], steps=2, guidance=0.5, seed=1)[0].image
    assert not np.array_equal(guided, default.image)  # the record changes what users get
    old = read_config(ckpts["semantic"])["model"]
    old.pop("sampling")  # a checkpoint written before the record existed
    assert SemanticModel.from_config_dict(old).config.guidance == 0.5
    assert export_checkpoint(dst, tmp_path / "again").exists()  # re-exporting keeps the record
    assert read_config(tmp_path / "again")["model"]["sampling"] == {"guidance": 0.0}
    with pytest.raises(ValueError, match="null condition"):
        export_checkpoint(ckpts["nonull"], tmp_path / "bad1", guidance=0.5)
    with pytest.raises(ValueError, match=">= -1"):
        export_checkpoint(ckpts["semantic"], tmp_path / "bad2", guidance=-2.0)
    with pytest.raises(ValueError, match="semantic"):
        export_checkpoint(ckpts["joint"], tmp_path / "bad3", guidance=1.0)
    assert not any((tmp_path / n).exists() for n in ("bad1", "bad2", "bad3"))


def test_options_a_family_cannot_use_are_refused(ckpts):
    with pytest.raises(ValueError, match="--mode"):
        get_synthesizer(ckpts["joint"], "cpu").resolve(SynthesisOptions(mode="balance"))
    with pytest.raises(ValueError, match="--prompt"):
        get_synthesizer(ckpts["semantic"], "cpu").resolve(SynthesisOptions(prompt="x"))
    with pytest.raises(ValueError, match="steps must be at least 1"):
        SynthesisOptions(steps=0)


def test_labels_only_edits_are_refused_for_segmenters_until_rendered(ckpts, tmp_path, source):
    from nucsynth.commands.segmenter import load_split

    edited = tmp_path / "edited.zarr"
    assert main(["edit", str(source), str(edited), "--mode", "enlarge", "--seed", "1"]) == 0
    assert DatasetStore.open(edited).attrs["images_match_labels"] is False
    with pytest.raises(ValueError, match="do not match"):
        load_split(edited, "all")
    rendered = tmp_path / "rendered.zarr"
    assert main(_cli(ckpts["semantic"], rendered, "--layouts", str(edited))) == 0
    assert len(load_split(rendered, "synthetic")) == 5  # rendered images show the edited labels


def test_a_small_render_runs_on_one_thread_whatever_the_setting(ckpts):
    """A render too small to split across threads runs on one (faster, measured), so its
    pixels do not depend on --threads; the setting is restored and provenance tells."""
    synth = get_synthesizer(ckpts["semantic"], device="cpu")
    options = synth.resolve(SynthesisOptions(steps=2))
    small = [Item(0, 3, random_layout((16, 16), CONSEP_CLASSES, seed=0))]
    large = [Item(0, 3, random_layout((SIZE, SIZE), CONSEP_CLASSES, seed=0))]
    assert synth.network_positions(small) == 16 * 16 < SMALL_WORK_POSITIONS <= synth.network_positions(large)
    images = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        sample = synth.render(small, options)[0]
        assert torch.get_num_threads() == n
        assert sample.provenance["torch_threads"] == 1
        images[n] = sample.image
        assert synth.render(large, options)[0].provenance["torch_threads"] == n
    np.testing.assert_array_equal(images[1], images[2])


def test_rendered_samples_drop_the_record_of_source_padding(ckpts, tmp_path):
    """A rendered image has no padding and its own nuclei: the source patch's
    ``source_shape`` and ``source_ids`` (nucsynth.data.tiling) must not reach it, or an
    evaluation would cut or stitch it as if it were the real patch; where it came from stays."""
    from nucsynth.data.tiling import tile_sample

    rng = np.random.default_rng(1)
    big = Sample(random_layout((40, 40), CONSEP_CLASSES, density=300, seed=0),
                 rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), {"source": "/x/s_1.png"})
    store = DatasetStore.create(tmp_path / "padded.zarr", CONSEP_CLASSES)
    store.append([p for _, _, p in tile_sample(big, SIZE, pad="reflect")])
    store.close()
    assert "source_ids" in DatasetStore.open(tmp_path / "padded.zarr")[3].provenance
    assert main(_cli(ckpts["semantic"], tmp_path / "out.zarr", "--layouts", str(tmp_path / "padded.zarr"))) == 0
    for s in DatasetStore.open(tmp_path / "out.zarr"):
        assert "source_shape" not in s.provenance and "source_ids" not in s.provenance
        assert s.provenance["source_tile"] == "s_1"
