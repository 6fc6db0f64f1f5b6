"""Layout statistics fitted to a user's data: fitting, the JSON file, the generator drawing
from fitted statistics of any class set, the CLI, and the statistics found beside a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import ellipse

from nucsynth.generate.fit import MIN_FIT_NUCLEI, fit_layout_stats, fit_source_stats, write_run_stats
from nucsynth.generate.layouts import nuclei_from_points, points_from_labels, random_layout
from nucsynth.generate.stats import (
    CONSEP_LAYOUT_STATS,
    CONSEP_STATS,
    LAYOUT_STATS_FILE,
    POOLED_STATS,
    LayoutStats,
    StatsError,
    find_layout_stats,
)
from nucsynth.layout import CONSEP_CLASSES, ClassSet, Layout

# A class set nothing in the engine knows by name: no CoNSeP profile matches it.
GLIA = ClassSet("glia", ("astro", "micro"), ((200, 40, 40), (40, 40, 200)))
# Known nuclei: astro = ellipse with semi-axes 9 x 4.5 px (axis ratio 2), micro = disc of radius 4.
_SHAPES = {1: (9.0, 4.5), 2: (4.0, 4.0)}
_STEP = 32  # grid spacing of the centres (px)


def _nucleus_mask(k: int, shape=(40, 40), angle: float = 0.3) -> np.ndarray:
    m = np.zeros(shape, bool)
    a, b = _SHAPES[k]
    m[ellipse(20, 20, b, a, shape=shape, rotation=angle)] = True
    return m


def _grid_layout(seed: int, size: int = 160) -> Layout:
    """Nuclei on a grid of 32 px (centres 16, 48, ... ), class pattern 3:1 micro:astro, plus
    one astro nucleus cut by the left border (counted, but not in the size figures)."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    classes = []
    for i, cy in enumerate(range(16, size, _STEP)):
        for j, cx in enumerate(range(16, size, _STEP)):
            k = 1 if (i + j) % 4 == 0 else 2
            m = _nucleus_mask(k, angle=float(rng.uniform(0, np.pi)) if k == 1 else 0.0)  # discs: one raster
            ys, xs = np.nonzero(m)
            classes.append(k)
            inst[ys - 20 + cy, xs - 20 + cx] = len(classes)
    cut = _nucleus_mask(1, angle=0.0)[:, 20:]  # the right half of an astro nucleus at x = 0
    ys, xs = np.nonzero(cut)
    free = inst[ys + 60, xs] == 0
    classes.append(1)
    inst[ys[free] + 60, xs[free]] = len(classes)
    return Layout.from_inst_map(inst, np.array(classes), GLIA)


@pytest.fixture(scope="module")
def grid_stats() -> LayoutStats:
    return fit_layout_stats([_grid_layout(s) for s in range(3)], info={"what": "grid"})


def test_fit_recovers_known_sizes_shapes_density_and_spacing(grid_stats):
    st = grid_stats
    assert st.class_set == GLIA and st.patches == 3
    astro, micro = st.classes
    n_per_patch = 26  # 25 grid nuclei + the cut one
    assert st.pooled.count == 3 * n_per_patch
    assert (astro.count, micro.count) == (3 * 8, 3 * 18)
    assert astro.share == pytest.approx(24 / 78) and micro.share == pytest.approx(54 / 78)
    # Sizes: exactly the drawn pixel counts (the cut nucleus is not a whole one).
    disc = int(_nucleus_mask(2).sum())
    assert micro.area_quartiles == (disc, disc, disc) and micro.log_area_sigma == pytest.approx(0, abs=1e-12)
    assert micro.log_area_mu == pytest.approx(np.log(disc))
    assert abs(astro.area_quartiles[1] - np.pi * 9 * 4.5) < 0.08 * np.pi * 9 * 4.5
    assert 1.85 <= astro.axis_ratio_quartiles[1] <= 2.15 and micro.axis_ratio_quartiles[1] < 1.15
    assert astro.eccentricity_median == pytest.approx(np.sqrt(1 - 0.25), abs=0.03)
    assert micro.solidity_median > 0.85 and astro.solidity_median > 0.85
    # Density per 256 x 256 px: 26 nuclei on 160 x 160 px.
    assert st.nuclei_per_patch_quartiles == pytest.approx((26 * 65536 / 160**2,) * 3)
    assert st.nuclei_per_patch_sd == pytest.approx(0, abs=1e-9)
    # Spacing: the grid step between whole nuclei.
    assert st.nn_distance_quartiles[1] == pytest.approx(_STEP, abs=0.5)
    assert micro.nn_distance_quartiles == pytest.approx((_STEP,) * 3, abs=0.5)
    cover = 100 * (8 * _nucleus_mask(1).sum() + 17 * disc) / 160**2
    assert st.coverage_quartiles[1] == pytest.approx(cover, rel=0.05)
    assert st.source["what"] == "grid" and st.source["nuclei"] == 78 and not st.notes


def test_json_round_trip(grid_stats, tmp_path):
    for st in (grid_stats, CONSEP_LAYOUT_STATS):
        again = LayoutStats.from_dict(json.loads(json.dumps(st.to_dict())))
        assert again == st and again.source == st.source
    path = grid_stats.save(tmp_path / "s.json")
    loaded = LayoutStats.load(path)
    assert loaded == grid_stats and loaded.class_set == GLIA
    with pytest.raises(FileExistsError, match="--overwrite"):
        grid_stats.save(path)
    # Fitting is deterministic: the same data gives the same file, byte for byte.
    fit_layout_stats([_grid_layout(s) for s in range(3)], info={"what": "grid"}).save(tmp_path / "t.json")
    assert (tmp_path / "t.json").read_bytes() == path.read_bytes()


def _broken(change) -> dict:
    d = CONSEP_LAYOUT_STATS.to_dict()
    change(d)
    return d


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("pooled"), "missing 'pooled'"),
    (lambda d: d.update(format="something-else"), "not layout statistics"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["classes"][2].update(area_quartiles=[300.0, 200.0, 400.0]), r"classes\[2\].*increasing order"),
    (lambda d: d["classes"][0].update(share=1.5), r"classes\[0\].*'share' must be a number >= 0.0 and <= 1.0"),
    (lambda d: d["classes"][1].update(log_area_sigma=-0.1), r"classes\[1\].*'log_area_sigma'"),
    (lambda d: d["classes"][1].update(axis_ratio_quartiles=[0.5, 1.2, 1.4]), "axis_ratio_quartiles"),
    (lambda d: d["pooled"].update(nn_same_class="high"), r"pooled.*'nn_same_class'"),
    (lambda d: d["classes"][3].update(count=-2), "'count' must be a whole number"),
    (lambda d: d.update(nuclei_per_patch_mean=float("nan")), "nuclei_per_patch_mean"),
    (lambda d: d["classes"].pop(), "3 class entries for the 4 classes"),
    (lambda d: d["classes"][0].update(name="dead"), "class 1 is 'other' in the class set"),
    (lambda d: d["class_set"].update(names=["a", "a", "b", "c"]), "class_set.*unique"),
    (lambda d: d.update(classes={}), "'classes' must be a list"),
])
def test_invalid_statistics_are_refused_with_one_clear_line(change, match, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(change)))
    with pytest.raises(StatsError, match=match) as e:
        LayoutStats.load(path)
    msg = str(e.value)
    assert msg.startswith(f"layout statistics {path}") and "\n" not in msg


def test_unreadable_statistics_files(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(StatsError, match="not a JSON file"):
        LayoutStats.load(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LayoutStats.load(tmp_path / "none.json")
    with pytest.raises(StatsError, match="expected a JSON object"):
        LayoutStats.from_dict([1, 2])


def test_fit_refuses_what_it_cannot_fit():
    with pytest.raises(StatsError, match="no patches"):
        fit_layout_stats([])
    empty = Layout.from_inst_map(np.zeros((32, 32), np.int32), np.zeros(0, np.int64), GLIA)
    with pytest.raises(StatsError, match="no whole nucleus"):
        fit_layout_stats([empty])
    other = random_layout((64, 64), seed=0)  # CoNSeP classes
    with pytest.raises(StatsError, match="patch 1 has classes"):
        fit_layout_stats([_grid_layout(0), other])
    with pytest.raises(StatsError, match="item 0 of the source is a str"):
        fit_layout_stats(["not a layout"])


def test_a_rare_class_borrows_the_pooled_size_and_says_so():
    lay = _grid_layout(0)
    classes = np.full(lay.num_nuclei, 2)
    classes[:MIN_FIT_NUCLEI - 1] = 1  # fewer whole astro nuclei than can be fitted
    st = fit_layout_stats([Layout(lay.inst_map, classes, lay.centroids, GLIA)])
    astro = st.classes[0]
    assert astro.count == MIN_FIT_NUCLEI - 1 and astro.area_quartiles == st.pooled.area_quartiles
    assert any("'astro'" in n and "pooled size and shape" in n for n in st.notes)


def test_generator_draws_from_fitted_statistics_of_a_new_class_set(grid_stats):
    lays = [random_layout((256, 256), stats=grid_stats, seed=s) for s in range(6)]
    assert all(l.class_set == GLIA for l in lays)  # the statistics' own class set by default
    n = np.array([l.num_nuclei for l in lays])
    assert abs(n.mean() - grid_stats.nuclei_per_patch_median) <= 3
    counts = sum(l.class_counts() for l in lays)[1:]
    assert counts[0] / counts.sum() == pytest.approx(grid_stats.class_shares(GLIA)[0], abs=0.08)
    # Sizes per class follow the fitted ones: astro ~127 px, micro ~49 px (whole nuclei only).
    from skimage.measure import regionprops

    for k, fitted in enumerate(grid_stats.classes, start=1):
        areas = [p.area for l in lays for p in regionprops(l.inst_map)
                 if l.classes[p.label - 1] == k and min(p.bbox[:2]) > 0 and p.bbox[2] < 256 and p.bbox[3] < 256]
        assert 0.75 * fitted.area_quartiles[1] <= np.median(areas) <= 1.25 * fitted.area_quartiles[1], (k, np.median(areas))
    # Deterministic; the class set may be given explicitly; nuclei grown from points use it too.
    assert random_layout((256, 256), GLIA, stats=grid_stats, seed=0).equals(lays[0])
    grown = nuclei_from_points(points_from_labels(lays[0]), seed=1, stats=grid_stats)
    micro = grown.areas()[grown.classes == 2]
    assert np.median(micro) <= 1.3 * grid_stats.classes[1].area_quartiles[1]


def test_default_statistics_are_the_consep_constants():
    assert random_layout((128, 128), seed=4).equals(random_layout((128, 128), seed=4, stats=CONSEP_LAYOUT_STATS))
    assert random_layout((64, 64), seed=0).class_set == CONSEP_CLASSES
    assert CONSEP_LAYOUT_STATS.nucleus(CONSEP_CLASSES, 2) is CONSEP_STATS["inflammatory"]
    # A class of another set takes the fitted class of the same name, else the pooled figures.
    mixed = ClassSet("mixed", ("micro", "neuron"), ((1, 2, 3), (4, 5, 6)))
    st = fit_layout_stats([_grid_layout(0)])
    assert st.nucleus(mixed, 1) is st.classes[1] and st.nucleus(mixed, 2) is st.pooled
    assert np.allclose(st.class_shares(mixed), 0.5)  # not every class is known: equal shares
    assert CONSEP_LAYOUT_STATS.nucleus(GLIA, 1) is POOLED_STATS
    with pytest.raises(ValueError, match="stats must be a LayoutStats"):
        random_layout((64, 64), stats={"format": "nucsynth-layout-stats"})


def test_fitted_on_generated_layouts_gives_back_the_statistics(grid_stats):
    """Closing the loop: layouts generated from statistics, measured again, give them back."""
    again = fit_layout_stats([random_layout((256, 256), stats=grid_stats, seed=s) for s in range(6)])
    for fitted, measured in zip(grid_stats.classes, again.classes):
        assert measured.area_quartiles[1] == pytest.approx(fitted.area_quartiles[1], rel=0.2)
        assert measured.axis_ratio_quartiles[1] == pytest.approx(fitted.axis_ratio_quartiles[1], rel=0.15)


# ---------------------------------------------------------------------- stores, CLI, models
def _store(path: Path) -> Path:
    from nucsynth.io.store import DatasetStore

    rng = np.random.default_rng(0)
    with DatasetStore.create(path, GLIA) as store:
        from nucsynth.layout import Sample

        samples = [Sample(_grid_layout(s), rng.integers(0, 256, (160, 160, 3), np.uint8), {}) for s in range(4)]
        store.append(samples, splits=["train", "train", "train", "val"])
    return path


def test_fit_a_store_split_and_write_beside_a_run(tmp_path, grid_stats):
    store = _store(tmp_path / "d.zarr")
    st = fit_source_stats(store)  # the train split by default
    assert st.patches == 3 and st == grid_stats
    assert st.source["split"] == "train" and st.source["kind"] == "store"
    assert fit_source_stats(store, "all").patches == 4
    with pytest.raises(ValueError, match=r"no patches in split 'test' \(its splits: \['train', 'val'\]\)"):
        fit_source_stats(store, "test")
    from nucsynth.data.dataset import split_source
    from nucsynth.io.store import DatasetStore

    view = split_source(DatasetStore.open(store), [0, 1, 2])
    path, msg = write_run_stats(view, tmp_path / "run", {"split": "train"})
    assert path == tmp_path / "run" / LAYOUT_STATS_FILE and LayoutStats.load(path) == grid_stats
    assert "3 patches" in msg
    path.write_text(path.read_text())  # a resumed run keeps the file it has
    assert write_run_stats([], tmp_path / "run", keep=True)[0] == path
    none, msg = write_run_stats([], tmp_path / "run2")
    assert none is None and "built-in CoNSeP" in msg and not (tmp_path / "run2").exists()


def test_stats_command(tmp_path, capsys, grid_stats):
    from nucsynth.cli import main

    store = _store(tmp_path / "d.zarr")
    out = tmp_path / "s.json"
    assert main(["stats", str(store), "--out", str(out)]) == 0
    assert LayoutStats.load(out) == grid_stats
    assert "astro" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["stats", str(store), "--split", "val", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and out.read_bytes() == before
    assert main(["stats", str(store), "--split", "nope", "--out", str(tmp_path / "t.json")]) == 2
    assert "no patches in split 'nope'" in capsys.readouterr().err and not (tmp_path / "t.json").exists()
    assert main(["stats", str(store), "--out", str(store / "s.json")]) == 2
    assert "inside the STORE input" in capsys.readouterr().err
    assert main(["stats", str(store), "--split", "val", "--out", str(out), "--overwrite"]) == 0
    assert LayoutStats.load(out).patches == 1


def test_statistics_found_beside_a_checkpoint(tmp_path, grid_stats):
    ckpt = tmp_path / "run" / "checkpoints" / "step_5"
    ckpt.mkdir(parents=True)
    assert find_layout_stats(ckpt) == (CONSEP_LAYOUT_STATS, None)
    grid_stats.save(tmp_path / "run" / LAYOUT_STATS_FILE)
    st, where = find_layout_stats(ckpt)
    assert st == grid_stats and where == tmp_path / "run" / LAYOUT_STATS_FILE
    (ckpt / LAYOUT_STATS_FILE).write_text("[]")  # the checkpoint's own file comes first, and is checked
    with pytest.raises(StatsError, match="step_5/layout_stats.json: expected a JSON object"):
        find_layout_stats(ckpt)


def test_demo_uses_the_statistics_beside_its_checkpoint(tmp_path, one_torch_thread):
    """A checkpoint with layout_stats.json renders layouts drawn from them, and says so."""
    from nucsynth.checkpoint import default_checkpoint_dir
    from nucsynth.cli import main
    from nucsynth.io.store import DatasetStore

    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    shutil.copytree(default_checkpoint_dir(), ckpt)
    (ckpt / LAYOUT_STATS_FILE).unlink(missing_ok=True)  # the shipped model's own; this test brings its own
    # Statistics of the model's own classes with a distinctive density: 4 nuclei per 256 px.
    d = CONSEP_LAYOUT_STATS.to_dict()
    d["nuclei_per_patch_quartiles"] = [4.0, 4.0, 4.0]
    (tmp_path / "run" / LAYOUT_STATS_FILE).write_text(json.dumps(d))
    out = tmp_path / "demo"
    assert main(["demo", "--checkpoint", str(ckpt), "--out", str(out), "-n", "2", "--size", "128",
                 "--steps", "2", "--threads", "1"]) == 0
    store = DatasetStore.open(out / "demo.zarr")
    assert [s.layout.num_nuclei for s in store] == [1, 1]  # round(4 * 128^2 / 256^2)
    assert store.provenance(0)["layout_stats"] == str(tmp_path / "run" / LAYOUT_STATS_FILE)


def test_fitted_on_real_consep_equals_the_documented_constants(consep_dir):
    """The built-in constants are what fitting measures on the 432 real CoNSeP patches
    (equal to the digits they are written with)."""
    st = fit_source_stats(consep_dir)
    assert st.patches == 432 and st.class_set.names == CONSEP_CLASSES.names and not st.notes
    ref = CONSEP_LAYOUT_STATS
    for got, want in [*zip(st.classes, ref.classes), (st.pooled, ref.pooled)]:
        assert got.count == want.count, got.name
        assert got.share == pytest.approx(want.share, abs=5e-5), got.name
        assert got.area_quartiles == pytest.approx(want.area_quartiles, abs=0.051), got.name
        assert (got.log_area_mu, got.log_area_sigma) == pytest.approx((want.log_area_mu, want.log_area_sigma), abs=5e-4)
        assert got.axis_ratio_quartiles == pytest.approx(want.axis_ratio_quartiles, abs=0.0051), got.name
        assert got.eccentricity_median == pytest.approx(want.eccentricity_median, abs=5e-4), got.name
        assert got.solidity_median == pytest.approx(want.solidity_median, abs=5e-4), got.name
        assert got.nn_distance_quartiles == pytest.approx(want.nn_distance_quartiles, abs=0.051), got.name
        assert got.nn_same_class == pytest.approx(want.nn_same_class, abs=5e-4), got.name
    assert st.nuclei_per_patch_mean == pytest.approx(ref.nuclei_per_patch_mean, abs=0.051)
    assert st.nuclei_per_patch_sd == pytest.approx(ref.nuclei_per_patch_sd, abs=0.051)
    assert st.nuclei_per_patch_quartiles == pytest.approx(ref.nuclei_per_patch_quartiles, abs=0.051)
    assert st.nn_distance_quartiles == pytest.approx(ref.nn_distance_quartiles, abs=0.051)
    assert st.nn_distance_p01 == pytest.approx(ref.nn_distance_p01, abs=0.051)
    assert st.coverage_quartiles == pytest.approx(ref.coverage_quartiles, abs=0.051)


def test_batch_dock_generator_uses_the_statistics_beside_its_checkpoint(tmp_path, one_torch_thread):
    """The batch dock's generator pool follows the same rule as the demo (engine part, no Qt)."""
    pytest.importorskip("qtpy")
    from napari_nucsynth._batch import BatchParams, batch_steps
    from nucsynth.checkpoint import default_checkpoint_dir
    from nucsynth.io.store import DatasetStore
    from nucsynth.synthesize import SynthesisOptions

    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    shutil.copytree(default_checkpoint_dir(), ckpt)
    (ckpt / LAYOUT_STATS_FILE).unlink(missing_ok=True)  # the shipped model's own; this test brings its own
    d = CONSEP_LAYOUT_STATS.to_dict()
    d["nuclei_per_patch_quartiles"] = [4.0, 4.0, 4.0]
    (ckpt / LAYOUT_STATS_FILE).write_text(json.dumps(d))  # in the checkpoint folder itself
    run = batch_steps(BatchParams(checkpoint=str(ckpt), out=str(tmp_path / "b.zarr"), count=2, size=128,
                                  options=SynthesisOptions(steps=2, seed=0)))
    for _ in run:
        pass
    store = DatasetStore.open(tmp_path / "b.zarr")
    assert [s.layout.num_nuclei for s in store] == [1, 1]
    assert store.provenance(1)["layout_stats"] == str(ckpt / LAYOUT_STATS_FILE)


def test_exported_model_carries_its_layout_statistics(tmp_path, grid_stats):
    from nucsynth.checkpoint import default_checkpoint_dir, export_checkpoint, load_checkpoint

    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    shutil.copytree(default_checkpoint_dir(), ckpt)
    (ckpt / LAYOUT_STATS_FILE).unlink(missing_ok=True)  # the shipped model's own; this test brings its own
    export_checkpoint(tmp_path / "run", tmp_path / "plain")  # no statistics: none invented
    assert find_layout_stats(tmp_path / "plain") == (CONSEP_LAYOUT_STATS, None)
    grid_stats.save(tmp_path / "run" / LAYOUT_STATS_FILE)
    dst = export_checkpoint(tmp_path / "run", tmp_path / "shipped")
    assert find_layout_stats(dst) == (grid_stats, dst / LAYOUT_STATS_FILE)
    load_checkpoint(dst)  # still a valid checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "run", "shipped"]  # no temporary left
    (tmp_path / "run" / LAYOUT_STATS_FILE).write_text("{}")
    with pytest.raises(StatsError, match="missing"):
        export_checkpoint(tmp_path / "run", tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
