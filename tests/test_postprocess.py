"""HV watershed and point-marker watershed: building blocks, hand-made layouts, real CoNSeP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from scipy import ndimage as ndi

from conftest import disk_layout_arrays
from nucsynth import metrics as M
from nucsynth import postprocess as P
from nucsynth.layout import CONSEP_CLASSES, Layout

SHARP = P.SHARP_MAP_PARAMS  # for exact maps (docs/metrics.md)


def touching_discs() -> Layout:
    inst, classes = disk_layout_arrays(
        shape=(64, 64), centres=((20, 20, 9), (20, 36, 9), (45, 30, 8), (48, 50, 6)), classes=(2, 3, 3, 4)
    )
    return Layout.from_inst_map(inst, classes)


def load_layouts(folder: Path, step: int) -> list[Layout]:
    out = []
    for path in sorted((folder / "Labels").glob("*.mat"))[::step]:
        d = sio.loadmat(path)
        out.append(Layout.from_inst_map(d["inst_map"].astype(np.int32), d["inst_type"].ravel()))
    return out


# ---------------------------------------------------------------------------- building blocks
def test_components_equal_scipy_label_with_small_objects_removed():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.55, 0.7):
        mask = rng.random((61, 47)) < density
        ref, n_ref = ndi.label(mask)  # 4-connected, raster order
        sizes = np.bincount(ref.ravel())
        for min_size in (1, 3, 6):
            keep = sizes >= min_size
            keep[0] = False
            expect = np.zeros_like(ref)
            expect[keep[ref]] = np.cumsum(keep)[ref][keep[ref]]
            got, n = P.components(mask, min_size)
            assert got.dtype == np.int32 and n == int(keep.sum())
            assert np.array_equal(got, expect)
    empty, n = P.components(np.zeros((5, 4), bool), 3)
    assert n == 0 and not empty.any()


def test_fill_holes_equals_scipy():
    rng = np.random.default_rng(1)
    for density in (0.5, 0.7, 0.85):
        mask = rng.random((50, 66)) < density
        assert np.array_equal(P.fill_holes(mask), ndi.binary_fill_holes(mask))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert P.fill_holes(ring)[4, 4] and not P.fill_holes(ring)[0, 0]


def _reference_flood(energy, markers, blobs):
    from skimage.segmentation import watershed

    from nucsynth.layout import relabel_contiguous

    return relabel_contiguous(watershed(energy, markers=markers, mask=blobs > 0))[0]


def test_flood_equals_watershed_including_odd_markers():
    rng = np.random.default_rng(2)
    energy = ndi.gaussian_filter(rng.random((40, 40)), 2)
    blob_mask = np.zeros((40, 40), bool)
    blob_mask[2:18, 2:18] = blob_mask[22:38, 5:20] = blob_mask[25:35, 25:38] = blob_mask[3:9, 30:36] = True
    blobs = ndi.label(blob_mask)[0]
    markers = np.zeros((40, 40), np.int32)
    markers[5, 5], markers[14, 14] = 1, 2  # blob 1: two markers -> watershed
    markers[30, 10] = 3  # blob 3: one marker -> flooded whole
    markers[20, 20] = 4  # outside every blob: vanishes, ids after it shift down
    markers[30, 30] = 5  # blob 4... and the same id also in another blob:
    markers[5, 33] = 5
    markers[6, 33] = 6  # second marker in the small blob
    got = P.flood(energy, markers, blobs)
    assert np.array_equal(got, _reference_flood(energy, markers, blobs))
    assert got.max() == 5  # marker 4 vanished
    assert not P.flood(energy, np.zeros_like(markers), blobs).any()


def test_majority_class_ignores_background_and_breaks_ties_low():
    inst = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 0, 2, 2, 3]])
    types = np.array([[0, 0, 4, 2, 3, 1], [0, 4, 1, 3, 2, 0]])
    assert P.majority_class(inst, types, 4).tolist() == [4, 2, 0]


# ---------------------------------------------------------------------------- HV watershed
def test_hv_watershed_separates_touching_discs_and_assigns_classes():
    lay = touching_discs()
    assert M.touching_instances(lay.inst_map).size >= 2
    out = P.hv_watershed((lay.inst_map > 0).astype(np.float32), lay.hv_maps(), lay.onehot())
    assert out.num_nuclei == lay.num_nuclei
    r = M.pq(lay.inst_map, out.inst_map)
    assert r["tp"] == lay.num_nuclei and r["pq"] > 0.9
    # classes follow the matched truth (onehot as type probabilities, and as a class map)
    ov = M.overlap_table(lay.inst_map, out.inst_map)
    match = ov.inter.argmax(1)
    assert out.classes[match].tolist() == lay.classes.tolist()
    again = P.hv_watershed((lay.inst_map > 0).astype(np.float32), lay.hv_maps(), lay.type_map())
    assert again.classes.tolist() == out.classes.tolist()
    assert P.hv_watershed((lay.inst_map > 0).astype(np.float32), lay.hv_maps()).classes.tolist() == [0] * 4


def test_hv_watershed_drops_small_objects_and_handles_empty_input():
    lay = touching_discs()
    prob = (lay.inst_map > 0).astype(np.float32)
    prob[2:4, 2:5] = 1.0  # a 6 px speck, below min_size
    out = P.hv_watershed(prob, lay.hv_maps())
    assert out.inst_map[2:4, 2:5].max() == 0
    empty = P.hv_watershed(np.zeros((32, 32)), np.zeros((2, 32, 32)))
    assert empty.num_nuclei == 0 and empty.inst_map.max() == 0


def test_hv_watershed_threshold_is_exposed():
    lay = touching_discs()
    prob = (lay.inst_map > 0) * 0.6
    assert P.hv_watershed(prob, lay.hv_maps(), threshold=0.5).num_nuclei == 4
    assert P.hv_watershed(prob, lay.hv_maps(), threshold=0.7).num_nuclei == 0


def test_hv_watershed_refuses_bad_input():
    with pytest.raises(ValueError, match="hv must have shape"):
        P.hv_watershed(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        P.hv_watershed(np.full((8, 8), np.nan), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="type_probs must have shape"):
        P.hv_watershed(np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="sobel ksize must be an odd integer between 3 and 31, got 33"):
        P.hv_watershed(np.zeros((8, 8)), np.zeros((2, 8, 8)), sobel_ksize=33)
    with pytest.raises(ValueError, match="opening ksize must be an odd integer >= 1, got 4"):
        P.hv_watershed(np.zeros((8, 8)), np.zeros((2, 8, 8)), open_ksize=4)


# ---------------------------------------------------------------------------- point watershed
def test_point_watershed_recovers_touching_discs_in_point_order():
    lay = touching_discs()
    order = np.array([2, 0, 3, 1])  # points in another order than the ids
    pts = Layout.from_points(lay.shape, lay.centroids[order], lay.classes[order])
    out = P.point_watershed(lay.distance_map(), lay.inst_map > 0, pts)
    ov = M.overlap_table(lay.inst_map, out.inst_map)
    assert ov.inter.argmax(0).tolist() == order.tolist()  # nucleus i is the one at point i
    assert out.classes.tolist() == lay.classes[order].tolist()
    assert np.allclose(out.centroids, lay.centroids[order], atol=1.0)
    assert np.array_equal(out.inst_map > 0, lay.inst_map > 0)
    cc = ndi.label(lay.inst_map > 0)[0]
    assert M.mdice(lay.inst_map, out.inst_map) > 0.97
    assert M.mdice(lay.inst_map, cc) < 0.85


def test_point_watershed_classes_from_label_map_snapping_and_empty_points():
    lay = touching_discs()
    mask = lay.inst_map > 0
    pts = np.vstack([lay.centroids, [[20.0, 20.0 - 10.0]], [[2.0, 60.0]]])  # 1 px off disc 1, far off
    points = Layout.from_points(lay.shape, pts[[0, 1, 2, 3, 5]], [1, 1, 1, 1, 2])
    out = P.point_watershed(lay.distance_map(), mask, points, label_map=lay.type_map())
    assert out.classes.tolist() == [2, 3, 3, 4, 2]  # label map wins; the empty one keeps its class
    assert (out.inst_map == 5).sum() == 0 and np.allclose(out.centroids[4], (2.0, 60.0))
    near = Layout.from_points(lay.shape, pts[[4]], [1])
    snapped = P.point_watershed(lay.distance_map(), mask, near)
    comp = ndi.label(mask)[0]
    assert np.array_equal(snapped.inst_map == 1, comp == comp[20, 20])  # floods its whole component
    far = P.point_watershed(lay.distance_map(), mask, near, snap_radius=0.5)
    assert far.inst_map.max() == 0


def test_point_watershed_refuses_bad_shapes():
    lay = touching_discs()
    pts = Layout.from_points(lay.shape, lay.centroids, lay.classes)
    with pytest.raises(ValueError, match="mask"):
        P.point_watershed(lay.distance_map(), np.ones((5, 5), bool), pts)
    with pytest.raises(ValueError, match="label_map"):
        P.point_watershed(lay.distance_map(), lay.inst_map > 0, pts, label_map=np.zeros((3, 3), int))


# ---------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_hv_watershed_on_truth_maps_of_real_consep(consep_dir):
    truths = load_layouts(consep_dir, step=12)  # 36 patches over the tiles
    ref, sharp = [], []
    for lay in truths:
        prob, hv = (lay.inst_map > 0).astype(np.float32), lay.hv_maps()
        ref.append(P.hv_watershed(prob, hv, lay.onehot()))
        sharp.append(P.hv_watershed(prob, hv, lay.onehot(), **SHARP))
    # a patch without nuclei, in truth and after the watershed, scores 1 here: the watershed did
    # nothing wrong on it (HoVer-Net's convention, 0, would measure the data, not the watershed)
    s_ref, s_sharp = M.evaluate_set(truths, ref, empty=1.0), M.evaluate_set(truths, sharp, empty=1.0)
    # Reference defaults on exact maps: small nuclei lose their marker (measured 0.89).
    assert s_ref["aggregate"]["pq"] >= 0.85
    assert s_sharp["mean"]["pq"] >= 0.95 and s_sharp["aggregate"]["pq"] >= 0.95
    assert s_sharp["detection"]["acc"] >= 0.99  # majority class recovers the true classes


@pytest.mark.realdata
def test_hv_watershed_shortcuts_equal_the_plain_steps_on_real_consep(consep_dir):
    # components / fill_holes / flood on real (and noisy) maps give exactly what scipy's
    # label + hole filling and one skimage watershed over all blobs give.
    rng = np.random.default_rng(0)
    for lay in load_layouts(consep_dir, step=24):
        prob, hv = (lay.inst_map > 0).astype(np.float32), lay.hv_maps()
        noisy = (np.clip(prob + rng.normal(0, 0.2, prob.shape), 0, 1), hv + rng.normal(0, 0.1, hv.shape))
        for pr, h in ((prob, hv), noisy):
            for params in ({}, SHARP):
                blobs, energy, markers = P.hv_energy(pr, h, **params)
                assert np.array_equal(blobs > 0, P.components(pr >= 0.5, params.get("min_size", 10))[0] > 0)
                assert np.array_equal(P.flood(energy, markers, blobs), _reference_flood(energy, markers, blobs))
        assert np.array_equal(P.fill_holes(lay.inst_map > 0), ndi.binary_fill_holes(lay.inst_map > 0))


@pytest.mark.realdata
def test_point_watershed_on_real_consep_beats_connected_components(consep_dir):
    truths = load_layouts(consep_dir, step=12)
    ours, cc, ours_touch, cc_touch = [], [], [], []
    for lay in truths:
        pts = Layout.from_points(lay.shape, lay.centroids, lay.classes)
        out = P.point_watershed(lay.distance_map(), lay.inst_map > 0, pts)
        comp = ndi.label(lay.inst_map > 0)[0]
        d_ours = M.mdice(lay.inst_map, out.inst_map, per_instance=True)
        d_cc = M.mdice(lay.inst_map, comp, per_instance=True)
        touch = M.touching_instances(lay.inst_map) - 1  # ids are contiguous: row = id - 1
        ours += list(d_ours)
        cc += list(d_cc)
        ours_touch += list(d_ours[touch])
        cc_touch += list(d_cc[touch])
    assert np.mean(ours) >= 0.97
    assert np.mean(ours_touch) >= 0.95 and np.mean(ours_touch) > np.mean(cc_touch) + 0.3
