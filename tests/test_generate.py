"""Layout generators, measured statistics and procedural images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from nucsynth.generate import stats as gs
from nucsynth.generate.layouts import nuclei_from_points, nucleus_shape, points_from_labels, random_layout
from nucsynth.generate.tissue import procedural_image, procedural_sample
from nucsynth.layout import CONSEP_CLASSES, LIZARD_CLASSES, NUCLEUS_CLASSES, Layout, LayoutError

ROOT = Path(__file__).resolve().parents[1]


def _grown(inst: np.ndarray) -> np.ndarray:
    """Map of 'pixel has a 4-neighbour with a different nonzero id' (touching nuclei)."""
    a, b = inst[1:, :], inst[:-1, :]
    c, d = inst[:, 1:], inst[:, :-1]
    return np.concatenate([((a != b) & (a > 0) & (b > 0)).ravel(), ((c != d) & (c > 0) & (d > 0)).ravel()])


def _connected(layout: Layout) -> bool:
    for i, sl in enumerate(ndi.find_objects(layout.inst_map), start=1):
        if sl is not None and ndi.label(layout.inst_map[sl] == i)[1] != 1:
            return False
    return True


@pytest.fixture(scope="module")
def layouts() -> list[Layout]:
    return [random_layout((256, 256), seed=s) for s in range(8)]


def test_random_layout_is_valid_and_deterministic(layouts):
    again = random_layout((256, 256), seed=0)
    assert again.equals(layouts[0])
    assert not random_layout((256, 256), seed=1).equals(layouts[0])
    for lay in layouts:
        assert lay.inst_map.dtype == np.int32 and lay.shape == (256, 256)
        assert (lay.areas() > 0).all()  # ids contiguous, every nucleus has pixels
        assert not _grown(lay.inst_map).any()  # a gap between nuclei: no two ids touch
        assert _connected(lay)


def test_random_layout_follows_measured_statistics(layouts):
    n = np.array([lay.num_nuclei for lay in layouts])
    assert abs(n.mean() - gs.NUCLEI_PER_PATCH_MEDIAN) <= 2
    counts = sum(lay.class_counts() for lay in layouts)[1:]
    shares = counts / counts.sum()
    assert np.allclose(shares, gs.default_class_shares(CONSEP_CLASSES), atol=0.08)
    # Median areas per class within 35 % of the measured median (nuclei cut by the border excluded).
    for k, name in enumerate(CONSEP_CLASSES.names, start=1):
        if name == "other":
            continue  # too few per patch for a stable median
        areas = []
        for lay in layouts:
            for i, sl in enumerate(ndi.find_objects(lay.inst_map), start=1):
                if lay.classes[i - 1] == k and sl[0].start > 0 and sl[1].start > 0 and sl[0].stop < 256 and sl[1].stop < 256:
                    areas.append(int((lay.inst_map[sl] == i).sum()))
        med = gs.CONSEP_STATS[name].area_quartiles[1]
        assert 0.65 * med <= np.median(areas) <= 1.35 * med, (name, np.median(areas), med)
    # Spacing: median nearest-neighbour distance close to the measured 17.3 px.
    nn = np.concatenate([cKDTree(lay.centroids).query(lay.centroids, k=2)[0][:, 1] for lay in layouts])
    assert 13 <= np.median(nn) <= 23


def test_clustered_arrangement_groups_classes_more_than_uniform():
    def same_class_share(arr: str) -> float:
        same = []
        for s in range(4):
            lay = random_layout((256, 256), seed=s, arrangement=arr)
            j = cKDTree(lay.centroids).query(lay.centroids, k=2)[1][:, 1]
            same.append(lay.classes[j] == lay.classes)
        return float(np.concatenate(same).mean())

    clustered, uniform = same_class_share("clustered"), same_class_share("uniform")
    assert clustered > uniform + 0.2
    assert clustered > 0.65  # measured on CoNSeP: 0.84


def test_random_layout_options():
    lay = random_layout((128, 96), density=80, class_shares=[0, 0, 1, 0], seed=3)
    assert lay.shape == (128, 96)
    assert set(lay.classes.tolist()) == {3}
    assert lay.num_nuclei == pytest.approx(80 * 128 * 96 / 65536, abs=3)
    assert random_layout((64, 64), density=0).num_nuclei == 0
    liz = random_layout((128, 128), class_set=LIZARD_CLASSES, seed=1)
    assert liz.class_set == LIZARD_CLASSES and liz.num_nuclei > 0
    one = random_layout((128, 128), class_set=NUCLEUS_CLASSES, seed=1)
    assert set(one.classes.tolist()) == {1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_shares": [1, 2]}, "class_shares must be 4"),
        ({"class_shares": [0, 0, 0, 0]}, "positive sum"),
        ({"class_shares": [1, -1, 1, 1]}, "non-negative"),
        ({"density": -1}, "density"),
        ({"density": float("nan")}, "density"),
        ({"arrangement": "spiral"}, "arrangement"),
    ],
)
def test_random_layout_bad_input(kwargs, match):
    with pytest.raises(LayoutError, match=match):
        random_layout((64, 64), **kwargs)
    with pytest.raises(LayoutError, match="shape"):
        random_layout((4, 64))


def test_nucleus_shape_statistics():
    rng = np.random.default_rng(0)
    st = gs.CONSEP_STATS["spindle"]
    masks = [nucleus_shape(st, rng) for _ in range(200)]
    areas = np.array([m.sum() for m in masks])
    assert 0.8 * st.area_quartiles[1] <= np.median(areas) <= 1.2 * st.area_quartiles[1]
    for m in masks[:20]:
        assert ndi.label(m)[1] == 1
        assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()


def test_stats_lookup():
    assert gs.stats_for_class(CONSEP_CLASSES, 3) is gs.CONSEP_STATS["epithelial"]
    assert gs.stats_for_class(LIZARD_CLASSES, LIZARD_CLASSES.index("lymphocyte")) is gs.CONSEP_STATS["inflammatory"]
    assert gs.stats_for_class(NUCLEUS_CLASSES, 1) is gs.POOLED_STATS
    assert gs.stats_for_class(CONSEP_CLASSES, 0) is gs.POOLED_STATS
    assert gs.default_class_shares(CONSEP_CLASSES).sum() == pytest.approx(1)
    assert np.allclose(gs.default_class_shares(LIZARD_CLASSES), 1 / 6)
    assert gs.CONSEP_STATS["inflammatory"].log_axis_ratio_sigma > 0


def test_points_from_labels_round_trip(layouts):
    lay = layouts[1]
    pts = points_from_labels(lay)
    assert pts.inst_map.max() == 0
    assert np.array_equal(pts.centroids, lay.centroids) and np.array_equal(pts.classes, lay.classes)
    grown = nuclei_from_points(pts, seed=4)
    assert np.array_equal(grown.centroids, lay.centroids) and np.array_equal(grown.classes, lay.classes)
    assert (grown.areas() > 0).all()
    yx = np.rint(lay.centroids).astype(int)
    assert np.array_equal(grown.inst_map[yx[:, 0], yx[:, 1]], np.arange(1, lay.num_nuclei + 1))
    assert _connected(grown)
    assert nuclei_from_points(pts, seed=4).equals(grown)


def test_nuclei_from_points_close_points_and_painted_nuclei():
    # Three points 3 px apart: each keeps its own pixel, nothing overlaps (one id per pixel).
    pts = Layout.from_points((40, 40), [[20, 17], [20, 20], [20, 23], [5, 5]], [3, 3, 2, 4])
    out = nuclei_from_points(pts, seed=0)
    assert list(out.inst_map[20, [17, 20, 23]]) == [1, 2, 3] and out.inst_map[5, 5] == 4
    assert (out.areas() > 0).all()
    # A painted nucleus is kept exactly; a point next to it grows around it.
    inst = np.zeros((40, 40), np.int32)
    inst[10:20, 10:20] = 1
    painted = Layout(inst, np.array([3, 2]), np.array([[14.5, 14.5], [15.0, 22.0]]))
    out = nuclei_from_points(painted, seed=1)
    assert np.array_equal(out.inst_map == 1, inst == 1)
    assert out.inst_map[15, 22] == 2


def test_nuclei_from_points_conflicts():
    pts = Layout.from_points((20, 20), [[5.1, 5.0], [4.9, 5.2]], [1, 2])
    with pytest.raises(LayoutError, match="same pixel"):
        nuclei_from_points(pts)
    inst = np.zeros((20, 20), np.int32)
    inst[2:9, 2:9] = 1
    lay = Layout(inst, np.array([2, 3]), np.array([[5.0, 5.0], [4.0, 4.0]]))
    with pytest.raises(LayoutError, match="painted"):
        nuclei_from_points(lay)


def test_procedural_image_nuclei_darker_and_deterministic():
    s = procedural_sample((128, 128), seed=5)
    assert s.image.dtype == np.uint8 and s.image.shape == (128, 128, 3)
    again = procedural_sample((128, 128), seed=5)
    assert np.array_equal(again.image, s.image) and again.layout.equals(s.layout)
    nuc = s.layout.inst_map > 0
    grey = s.image.astype(float).mean(axis=2)
    assert grey[nuc].mean() < grey[~nuc].mean() - 40
    # H&E-like: background pink (red and blue above green), nuclei bluish-purple (blue highest).
    bg = s.image[~nuc].mean(axis=0)
    fg = s.image[nuc].mean(axis=0)
    assert bg[0] > bg[1] and bg[2] > bg[1]
    assert fg[2] > fg[0] > fg[1]
    assert s.provenance["seed"] == 5
    assert not np.array_equal(procedural_image(s.layout, seed=6), s.image)


def test_procedural_image_of_empty_and_point_layouts():
    empty = Layout.from_points((32, 48), np.zeros((0, 2)), np.zeros(0, int))
    img = procedural_image(empty)
    assert img.shape == (32, 48, 3) and img.dtype == np.uint8


def test_measure_script_on_fixture(tmp_path):
    """The measuring script reads a CoNSeP-style folder and prints per-class statistics."""
    from scipy.io import savemat
    from skimage.io import imsave

    (tmp_path / "Labels").mkdir()
    (tmp_path / "Images").mkdir()
    for s in range(2):
        sample = procedural_sample((96, 96), density=120, seed=s)
        lay = sample.layout
        imsave(tmp_path / "Images" / f"train_1_{s:03d}.png", sample.image, check_contrast=False)
        savemat(tmp_path / "Labels" / f"train_1_{s:03d}.mat",
                {"inst_map": lay.inst_map, "inst_type": lay.classes.reshape(-1, 1).astype(np.int32),
                 "type_map": lay.type_map, "inst_centroid": lay.centroids[:, ::-1]})
    script = str(ROOT / "scripts" / "measure_layout_stats.py")
    out = subprocess.run([sys.executable, script, str(tmp_path), "--json", str(tmp_path / "s.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "patches: 2" in out
    for name in CONSEP_CLASSES.names:
        assert name in out
    assert gs.LayoutStats.load(tmp_path / "s.json").patches == 2
    bad = subprocess.run([sys.executable, script, str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_shape_irregularity_matches_measured_solidity():
    from skimage.measure import regionprops

    rng = np.random.default_rng(1)
    sol = [regionprops(nucleus_shape(gs.POOLED_STATS, rng).astype(np.int32))[0].solidity for _ in range(100)]
    assert abs(np.median(sol) - gs.POOLED_STATS.solidity_median) < 0.03
