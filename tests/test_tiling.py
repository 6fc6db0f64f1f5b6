import numpy as np
import pytest

from nucsynth.data.tiling import change_magnification, crop_to_source, rescale_sample, tile_sample, tile_starts
from nucsynth.layout import CONSEP_CLASSES, Layout, Sample

from conftest import disk_layout_arrays


def _sample(shape=(70, 90), seed=0) -> Sample:
    """Discs with distinct classes on a random image whose nuclei pixels are dark."""
    rng = np.random.default_rng(seed)
    centres = [(8, 10, 6), (30, 45, 9), (60, 85, 7), (35, 5, 5), (66, 20, 4), (15, 70, 8)]
    inst, _ = disk_layout_arrays(shape, centres, (1, 2, 3, 4, 2, 3))
    classes = np.array([1, 2, 3, 4, 2, 3])
    img = rng.integers(150, 256, shape + (3,), dtype=np.uint8)
    img[inst > 0] = rng.integers(0, 90, (int((inst > 0).sum()), 3), dtype=np.uint8)
    lay = Layout.from_inst_map(inst, classes, CONSEP_CLASSES)
    return Sample(lay, img, {"source": "/data/x/slide_7.png", "format": "folder"})


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two instance maps describe the same nuclei up to id renaming."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(set(pairs[0])) == pairs.shape[1] == len(set(pairs[1])) and np.array_equal(a == 0, b == 0)


def test_tile_starts_cover_and_none_policy():
    assert tile_starts(100, 32, 32, "reflect") == [0, 32, 64, 96]
    assert tile_starts(96, 32, 32, "constant") == [0, 32, 64]
    assert tile_starts(100, 32, 32, "none") == [0, 32, 64, 68]
    assert tile_starts(100, 32, 16, "none")[-1] == 68
    assert tile_starts(20, 32, 32, "none") == []
    with pytest.raises(ValueError, match="pad must be one of"):
        tile_starts(10, 4, 4, "wrap")


@pytest.mark.parametrize("pad", ["reflect", "constant", "none"])
def test_tiles_cover_the_image_and_reassemble(pad):
    s = _sample()
    tiles = tile_sample(s, 32, pad=pad)
    h, w = s.layout.shape
    img = np.zeros((h + 32, w + 32, 3), np.uint8)
    inst = np.zeros((h + 32, w + 32), np.int64)
    seen = np.zeros((h + 32, w + 32), bool)
    offset = 0
    for y0, x0, p in tiles:
        assert p.image.shape == (32, 32, 3) and p.layout.shape == (32, 32)
        assert p.provenance["y0"] == y0 and p.provenance["x0"] == x0 and p.provenance["size"] == [32, 32]
        assert p.provenance["tile"] == "slide_7" and p.provenance["source"] == "/data/x/slide_7.png"
        # Ids contiguous in each patch, classes follow their nuclei.
        ids = np.unique(p.layout.inst_map)
        assert np.array_equal(ids[ids > 0], np.arange(1, p.layout.num_nuclei + 1))
        padded_types = np.pad(s.layout.type_map(), ((0, 32), (0, 32)), mode="reflect" if pad == "reflect" else "constant")
        assert np.array_equal(p.layout.type_map(), padded_types[y0 : y0 + 32, x0 : x0 + 32])
        img[y0 : y0 + 32, x0 : x0 + 32] = p.image
        m = p.layout.inst_map
        inst[y0 : y0 + 32, x0 : x0 + 32] = np.where(m > 0, m + offset, 0)
        seen[y0 : y0 + 32, x0 : x0 + 32] = True
        offset += p.layout.num_nuclei
    assert seen[:h, :w].all()  # every pixel covered, whatever the policy
    assert np.array_equal(img[:h, :w], s.image)
    if pad != "none":
        # Non-overlapping tiles: the partition into (nucleus, tile) pieces equals the original
        # nuclei intersected with the tile grid.
        grid = (np.arange(h)[:, None] // 32) * 100 + np.arange(w)[None, :] // 32
        pieces = np.where(s.layout.inst_map > 0, s.layout.inst_map * 10000 + grid, 0)
        assert _same_partition(inst[:h, :w], pieces)
    if pad == "constant":  # padded with glass: no nuclei there
        assert (inst[h:, :] == 0).all() and (inst[:, w:] == 0).all()
    if pad == "reflect":  # labels mirrored with the image: the pad holds the mirrored nuclei
        mirrored = np.pad(s.layout.inst_map, ((0, 32), (0, 32)), mode="reflect")[: img.shape[0], : img.shape[1]]
        covered = seen.copy()
        assert np.array_equal(inst[covered] > 0, mirrored[covered] > 0)


def test_reflect_padding_labels_agree_with_the_image():
    s = _sample()  # nuclei pixels dark (< 90), background bright (>= 150)
    for _, _, p in tile_sample(s, 32, pad="reflect"):
        labelled = p.layout.inst_map > 0
        assert (p.image[labelled] < 90).all() and (p.image[~labelled] >= 150).all()
    # A nucleus touching the border continues into its mirror as one nucleus; one two
    # pixels away gets a mirrored twin of its own id and its class.
    inst = np.zeros((40, 40), np.int32)
    inst[10:14, 37:40] = 1
    inst[20:24, 35:38] = 2
    lay = Layout.from_inst_map(inst, [1, 4], CONSEP_CLASSES)
    img = np.full((40, 40, 3), 200, np.uint8)
    (_, _, first), (_, x0, last) = tile_sample(Sample(lay, img, {}), (40, 32), pad="reflect")
    assert x0 == 32 and last.provenance["source_shape"] == [40, 40]
    m = last.layout.inst_map
    touching, near = m[11, 5], m[21, 4]
    assert touching > 0 and near > 0 and touching != near
    assert set(np.unique(m[10:14, 5:10])) == {touching}  # 3 px + 2 mirrored px, one nucleus
    twin = m[21, 9]
    assert twin > 0 and twin not in (touching, near) and m[21, 7] == 0
    assert last.layout.classes[twin - 1] == 4 and last.layout.classes[near - 1] == 4
    assert last.layout.num_nuclei == 3


def test_crop_to_source_scores_only_source_pixels():
    from nucsynth.data.tiling import source_extent, source_pairs
    from nucsynth.metrics import evaluate_set

    s = _sample()
    tiles = [p for _, _, p in tile_sample(s, 32, pad="reflect")]
    last = tiles[-1]  # rows 64..95, columns 64..95 of a 70 x 90 image
    assert source_extent(last.provenance, (32, 32)) == (6, 26)
    assert source_extent(tiles[0].provenance, (32, 32)) is None
    assert crop_to_source(last.layout, last.provenance).shape == (6, 26)
    # A prediction right on the source pixels and wrong in the padding scores as perfect.
    preds = []
    for p in tiles:
        m = p.layout.inst_map.copy()
        ext = source_extent(p.provenance, (32, 32))
        if ext is not None:
            m[ext[0]:, :] = 0
            m[:, ext[1]:] = 0
            m[ext[0] + 1 :, ext[1] + 1 :] = m.max() + 1  # a fake nucleus in the padding
        preds.append(Layout.from_inst_map(m, np.r_[p.layout.classes, 1][: m.max()], CONSEP_CLASSES))
    truths, cut = source_pairs(tiles, preds)
    res = evaluate_set(truths, cut)
    assert res["aggregate"]["pq"] == pytest.approx(1.0) and res["detection"]["f_d"] == pytest.approx(1.0)
    assert evaluate_set([p.layout for p in tiles], preds)["aggregate"]["pq"] < 1.0  # uncropped, it would not
    # No record (older stores, rendered images): nothing is cut; a patch off its source is refused.
    assert crop_to_source(last.layout, {}) is last.layout
    with pytest.raises(ValueError, match="outside its"):
        source_extent({"source_shape": [70, 90], "y0": 70, "x0": 0}, (32, 32))
    with pytest.raises(ValueError, match="2 samples but 1 predictions"):
        source_pairs(tiles[:2], preds[:1])


def test_reflect_and_constant_padding_values():
    s = _sample()
    last = tile_sample(s, 32, pad="constant", fill=200)[-1]
    y0, x0, p = last
    h, w = s.layout.shape
    assert (p.image[h - y0 :, :] == 200).all() and (p.image[:, w - x0 :] == 200).all()
    assert (p.layout.inst_map[h - y0 :, :] == 0).all()
    y0, x0, p = tile_sample(s, 32, pad="reflect")[-1]
    ref = np.pad(s.image, ((0, y0 + 32 - h), (0, x0 + 32 - w), (0, 0)), mode="reflect")
    assert np.array_equal(p.image, ref[y0:, x0:])


def test_nuclei_counts_and_classes_consistent():
    s = _sample()
    tiles = tile_sample(s, 32, pad="reflect")
    # Each nucleus appears in as many tiles as it has visible pieces in the grid; classes kept.
    expected = {}
    for i, c in enumerate(s.layout.classes, start=1):
        ys, xs = np.nonzero(s.layout.inst_map == i)
        expected[i] = (len(set(zip(ys // 32, xs // 32))), c)
    total = sum(n for n, _ in expected.values())
    on_source = [crop_to_source(p.layout, p.provenance) for _, _, p in tiles]  # mirrored twins left out
    assert sum(lay.num_nuclei for lay in on_source) == total
    per_class = np.zeros(5, int)
    for n, c in expected.values():
        per_class[c] += n
    assert np.array_equal(sum(lay.class_counts() for lay in on_source), per_class)
    # Cut nuclei keep their visible part with the centroid of the visible pixels.
    for y0, x0, p in tiles:
        for j in range(p.layout.num_nuclei):
            yy, xx = np.nonzero(p.layout.inst_map == j + 1)
            assert np.allclose(p.layout.centroids[j], [yy.mean(), xx.mean()])


def test_overlapping_stride_and_rectangular_size():
    s = _sample()
    tiles = tile_sample(s, (40, 30), stride=(20, 15), pad="none")
    assert {y for y, _, _ in tiles} == {0, 20, 30} and max(x for _, x, _ in tiles) == 60
    for y0, x0, p in tiles:
        assert np.array_equal(p.image, s.image[y0 : y0 + 40, x0 : x0 + 30])
        sub = s.layout.inst_map[y0 : y0 + 40, x0 : x0 + 30]
        assert _same_partition(p.layout.inst_map, sub)


def test_tiling_bad_input():
    s = _sample()
    with pytest.raises(ValueError, match="size"):
        tile_sample(s, 0)
    with pytest.raises(ValueError, match="stride"):
        tile_sample(s, 16, stride=(4, 0))
    with pytest.raises(ValueError, match="pad"):
        tile_sample(s, 16, pad="mirror")
    assert tile_sample(s, 128, pad="none") == []
    # An image smaller than the tile is padded to one full tile.
    (y0, x0, p), = tile_sample(s, 128, pad="reflect")
    assert p.layout.shape == (128, 128) and p.layout.num_nuclei > s.layout.num_nuclei  # with mirrored twins
    assert crop_to_source(p.layout, p.provenance).num_nuclei == s.layout.num_nuclei


def test_rescale_halves_and_keeps_classes():
    s = _sample((80, 96))
    s.provenance["magnification"] = 40
    half = change_magnification(s, 40, 20)
    assert half.image.shape == (40, 48, 3) and half.layout.shape == (40, 48)
    assert half.provenance["magnification"] == 20.0 and half.provenance["scale"] == 0.5
    assert half.layout.num_nuclei == s.layout.num_nuclei
    assert np.array_equal(half.layout.classes, s.layout.classes)
    # Labels nearest: areas shrink by about 4; centroids scale (pixel centres at (i+0.5)/f - 0.5).
    assert np.allclose(half.layout.areas(), s.layout.areas() / 4, rtol=0.35)
    assert np.allclose(half.layout.centroids, (s.layout.centroids + 0.5) * 0.5 - 0.5, atol=0.8)
    # Anti-aliased image: the dark nuclei stay dark, the mean colour is kept.
    assert abs(half.image.mean() - s.image.mean()) < 3
    assert half.image[half.layout.inst_map > 0].mean() < 100
    # Upsampling: nearest labels exactly replicate pixels.
    up = rescale_sample(s, 2.0)
    assert np.array_equal(up.layout.inst_map[::2, ::2] > 0, s.layout.inst_map > 0)
    assert np.array_equal(up.layout.classes, s.layout.classes)


def test_rescale_drops_vanishing_nuclei_and_relabels():
    inst = np.zeros((40, 40), np.int32)
    inst[5:15, 5:15] = 1
    inst[20, 21] = 2  # a single pixel that a factor of 0.25 does not sample
    inst[25:35, 25:35] = 3
    lay = Layout.from_inst_map(inst, [2, 1, 3], CONSEP_CLASSES)
    s = Sample(lay, np.full((40, 40, 3), 128, np.uint8))
    small = rescale_sample(s, 0.25)
    assert small.layout.num_nuclei == 2
    assert np.array_equal(small.layout.classes, [2, 3])
    assert set(np.unique(small.layout.inst_map)) == {0, 1, 2}
    with pytest.raises(ValueError, match="positive"):
        rescale_sample(s, 0)


@pytest.mark.realdata
def test_real_consep_patch_tiles_and_rescales(consep_dir):
    from nucsynth.io.consep import read_consep_file

    s = read_consep_file(consep_dir / "Labels" / "train_10_005.mat")
    tiles = tile_sample(s, 64)
    assert len(tiles) == 16
    inst = np.zeros(s.layout.shape, np.int64)
    offset = 0
    for y0, x0, p in tiles:
        m = p.layout.inst_map
        inst[y0 : y0 + 64, x0 : x0 + 64] = np.where(m > 0, m + offset, 0)
        offset += p.layout.num_nuclei
        assert np.array_equal(p.image, s.image[y0 : y0 + 64, x0 : x0 + 64])
    grid = (np.arange(256)[:, None] // 64) * 10 + np.arange(256)[None, :] // 64
    assert _same_partition(inst, np.where(s.layout.inst_map > 0, s.layout.inst_map * 100 + grid, 0))
    # 40x -> 20x: nearly every nucleus survives (only specks vanish), classes follow them.
    half = change_magnification(s, 40, 20)
    assert half.layout.num_nuclei >= 0.9 * s.layout.num_nuclei
    big = s.layout.areas() >= 16
    assert np.array_equal(half.layout.class_counts()[1:] >= np.bincount(s.layout.classes[big], minlength=5)[1:], [True] * 4)
