"""Whole-image evaluation: tiles rebuilt from overlapping patches, or pooled per tile."""

from __future__ import annotations

import numpy as np
import pytest

from nucsynth.data.tiling import tile_sample
from nucsynth.evaluate import stitch as T
from nucsynth.generate.tissue import procedural_sample
from nucsynth.layout import Sample
from nucsynth.metrics import evaluate_set, instance_metrics


def _same_nuclei(a, b) -> bool:
    """Equal instance partitions (ids may differ) and the same class per nucleus."""
    m = instance_metrics(a.inst_map, b.inst_map)
    if not (m["pq"] == 1.0 and m["n_true"] == m["n_pred"]):
        return False
    ca = {tuple(np.argwhere(a.inst_map == i + 1)[0]): c for i, c in enumerate(a.classes)}
    return all(b.classes[b.inst_map[y, x] - 1] == c for (y, x), c in ca.items())


@pytest.fixture(scope="module")
def tile() -> Sample:
    s = procedural_sample((160, 160), seed=4)
    return Sample(s.layout, s.image, {"source": "/data/t_1.png", "tile": "t_1"})


def _grid(tile: Sample, size: int, stride: int) -> list[Sample]:
    return [p for _, _, p in tile_sample(tile, size, stride, pad="none")]


def test_recorded_offsets_rebuild_the_tile_exactly(tile):
    patches = _grid(tile, 64, 48)  # 3 x 3 windows, 16 px shared; nuclei cut by every border
    assert len(patches) == 9
    grid = T.tile_geometry(patches)
    assert grid.shape == (160, 160) and grid.stride == 48
    whole = T.assemble_tile(patches, grid)
    assert np.array_equal(whole.image, tile.image)
    assert _same_nuclei(tile.layout, whole.layout)


def test_abutting_patches_rejoin_the_nuclei_they_cut(tile):
    patches = _grid(tile, 80, 80)  # 2 x 2 windows sharing no pixel: prepare's default
    whole = T.assemble_tile(patches, T.tile_geometry(patches))
    assert _same_nuclei(tile.layout, whole.layout)  # joined by the recorded source ids
    cut = [Sample(p.layout, p.image, {k: v for k, v in p.provenance.items() if k != "source_ids"}) for p in patches]
    older = T.assemble_tile(cut, T.tile_geometry(cut))  # a store written before the record
    assert older.layout.num_nuclei > tile.layout.num_nuclei


def test_grid_found_from_pixels_when_origins_are_not_recorded(tile):
    patches = [Sample(p.layout, p.image, {"tile": "t_1"}) for p in _grid(tile, 64, 48)]
    assert T.recorded_offsets(patches) is None
    grid = T.infer_grid([p.image for p in patches])
    assert grid.stride == 48 and grid.residual == 0.0 and grid.shape == (160, 160)
    whole = T.assemble_tile(patches, grid)
    assert np.array_equal(whole.image, tile.image) and _same_nuclei(tile.layout, whole.layout)


def test_patches_that_share_no_pixels_are_refused_with_the_reason():
    ims = [procedural_sample((64, 64), seed=s).image for s in range(4)]
    with pytest.raises(ValueError, match=r"do not overlap on a regular 2x2 grid: the best stride \(\d+ px\) leaves"):
        T.infer_grid(ims)
    with pytest.raises(ValueError, match="r x r patches"):
        T.infer_grid(ims[:3])


def test_tile_groups_order_patches_by_their_number():
    s = procedural_sample((16, 16), seed=0)
    src = [Sample(s.layout, s.image, {"tile": t, "source": f"/x/{t}_{k:03d}.jpg"})
           for t, k in (("b", 1), ("a", 10), ("a", 2), ("b", 0))]
    assert T.tile_groups(src) == {"a": [2, 1], "b": [3, 0]}
    assert T.tile_groups([s]) == {"procedural": [0]}  # no tile: the source image groups
    with pytest.raises(ValueError, match="sample 0 has neither 'tile' nor 'source'"):
        T.tile_groups([Sample(s.layout, s.image, {})])


def test_evaluate_tiles_stitched_and_pooled(tile):
    patches = _grid(tile, 64, 48)
    perfect = T.evaluate_tiles(patches, lambda ims: [tile.layout for _ in ims])
    assert perfect["mode"] == "stitched" and perfect["n_tiles"] == 1 and perfect["mean"]["pq"] == 1.0
    # Separate crops (not on a grid, origins not recorded): pooled per tile.
    crops = [Sample(s.layout, s.image, {"tile": f"t{s_i // 4}", "source": f"/x/t_{s_i:03d}.png"})
             for s_i, s in enumerate(procedural_sample((48, 48), seed=k) for k in range(8))]
    truth = {id(c.image): c.layout for c in crops}
    pooled = T.evaluate_tiles(crops, lambda ims: [truth[id(im)] for im in ims])
    assert pooled["mode"] == "tile-pooled" and "cannot be reassembled" in pooled["reason"]
    assert pooled["n_tiles"] == 2 and pooled["mean"]["pq"] == 1.0 and pooled["mean"]["dice"] == 1.0
    # pooled PQ of a tile = PQ from its summed counts, not the mean of its patches' PQs
    empty = [Sample(c.layout.__class__.from_inst_map(np.zeros((48, 48), np.int32)), c.image, c.provenance) for c in crops]
    half = T.evaluate_tiles(crops, lambda ims: [truth[id(im)] if k % 2 == 0 else empty[0].layout for k, im in enumerate(ims)])
    res0 = evaluate_set([c.layout for c in crops[:4]], [c.layout if k % 2 == 0 else empty[0].layout for k, c in enumerate(crops[:4])])
    n_true = [c.layout.num_nuclei for c in crops[:4]]
    found = n_true[0] + n_true[2]
    assert half["per_tile"][0]["pq"] == pytest.approx(found / (found + (n_true[1] + n_true[3]) / 2))
    assert res0["mean"]["pq"] == pytest.approx(0.5)


def test_padded_tiles_are_scored_on_their_source_pixels(tile):
    """A 150 px image cut into 64 px patches with mirrored padding: the stitched tile is
    segmented whole, but only its 150 x 150 source pixels are scored (patch figures too)."""
    from nucsynth.data.tiling import source_pairs

    src = Sample(tile.layout.crop(0, 0, 150, 150), tile.image[:150, :150], dict(tile.provenance))
    patches = [p for _, _, p in tile_sample(src, 64, pad="reflect")]
    whole = T.tile_samples(patches)[0]
    assert whole.layout.shape == (192, 192) and whole.provenance["source_shape"] == [150, 150]
    # A segmenter that finds every nucleus of the source and a fake one in the padding.
    def segment(images):
        out = []
        for im in images:
            m = np.pad(src.layout.inst_map, ((0, im.shape[0] - 150), (0, im.shape[1] - 150)))
            m[170:180, 170:180] = m.max() + 1
            out.append(src.layout.__class__.from_inst_map(m, np.r_[src.layout.classes, 1], src.layout.class_set))
        return out
    res = T.evaluate_tiles(patches, segment)
    assert res["mode"] == "stitched" and res["mean"]["pq"] == 1.0 and res["per_tile"][0]["n_pred"] == src.layout.num_nuclei
    truths, _ = source_pairs(patches, [p.layout for p in patches])
    assert sum(t.num_nuclei for t in truths) < sum(p.layout.num_nuclei for p in patches)  # twins not counted


@pytest.mark.realdata
def test_consep_release_patches_are_separate_crops(consep_dir):
    """The 16 patches of a CoNSeP 256 px tile are not cut on a grid: the tile cannot be
    rebuilt, so whole-image figures on this release are per-tile pooled (docs/metrics.md)."""
    from nucsynth.io import read_source

    patches = [s for s in read_source(consep_dir) if s.provenance["tile"] == "train_13"]
    order = T.tile_groups(patches)["train_13"]
    with pytest.raises(ValueError, match="do not overlap"):
        T.infer_grid([patches[i].image for i in order])


@pytest.mark.realdata
def test_monuseg_image_rebuilt_from_overlapping_patches(monuseg_dir):
    from nucsynth.io.monuseg import read_monuseg_file

    image = read_monuseg_file(sorted((monuseg_dir / "Annotations").glob("*.xml"))[0])
    image = Sample(image.layout, image.image, {**image.provenance, "tile": "m0"})
    patches = [p for _, _, p in tile_sample(image, 256, 192, pad="none")]
    whole = T.tile_samples(patches)
    assert len(whole) == 1
    h, w = whole[0].layout.shape
    assert np.array_equal(whole[0].image, image.image[:h, :w])
    crop = image.layout.crop(0, 0, h, w)
    assert _same_nuclei(crop, whole[0].layout)
