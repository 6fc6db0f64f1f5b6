import numpy as np
import pytest

from nucsynth.layout import (
    CONSEP_CLASSES,
    NUCLEUS_CLASSES,
    ClassSet,
    Layout,
    LayoutError,
    Sample,
    relabel_contiguous,
    transform_hv,
)

from conftest import disk_layout_arrays


def _irregular_layout() -> Layout:
    # Asymmetric shapes so that transforms are not accidentally symmetric.
    inst = np.zeros((20, 24), np.int32)
    inst[2:6, 3:10] = 1
    inst[6:9, 3:5] = 1
    inst[10:17, 12:15] = 2
    inst[10:12, 15:21] = 2
    inst[3:5, 15:17] = 3
    inst[14:19, 2:8] = 4
    inst[16:19, 8:10] = 4  # touches nothing
    return Layout.from_inst_map(inst, [1, 2, 3, 4], CONSEP_CLASSES)


def test_hv_hand_computed():
    inst = np.zeros((5, 7), np.int32)
    inst[1:4, 1:6] = 1  # a 3 x 5 rectangle; centre of mass (2, 3)
    hv = Layout.from_inst_map(inst, [2]).hv_maps()
    # x offsets -2..2 -> normalized -1, -0.5, 0, 0.5, 1; y offsets -1..1 -> -1, 0, 1
    np.testing.assert_allclose(hv[0, 2, 1:6], [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(hv[1, 1:4, 3], [-1, 0, 1])
    assert hv[:, 0].sum() == 0 and hv[:, :, 0].sum() == 0


def test_hv_asymmetric_sides_normalized_separately():
    inst = np.zeros((3, 6), np.int32)
    inst[1, 0:4] = 1  # x = 0..3, com 1.5 -> offsets -1.5 -0.5 0.5 1.5
    inst[1, 4] = 1    # now x = 0..4, com 2 -> offsets -2..2
    hv = Layout.from_inst_map(inst, [1]).hv_maps()
    np.testing.assert_allclose(hv[0, 1, :5], [-1, -0.5, 0, 0.5, 1])


@pytest.mark.parametrize("op,k", [("rot90", 1), ("rot90", 2), ("rot90", 3), ("flip0", 1), ("flip1", 1)])
def test_derive_then_transform_equals_transform_then_derive(op, k):
    lay = _irregular_layout()
    moved = lay.rot90(k) if op == "rot90" else lay.flip(int(op[-1]))
    np.testing.assert_allclose(moved.hv_maps(), transform_hv(lay.hv_maps(), op, k), atol=1e-6)
    f = (lambda a: np.rot90(a, k)) if op == "rot90" else (lambda a: np.flip(a, int(op[-1])))
    np.testing.assert_array_equal(moved.type_map(), f(lay.type_map()))
    np.testing.assert_array_equal(moved.edge_map(), f(lay.edge_map()))
    np.testing.assert_allclose(moved.distance_map(), f(lay.distance_map()), atol=1e-6)
    # Point maps round centroids to pixels, so half-pixel centroids may land one pixel off.
    a, b = np.argwhere(moved.point_map()), np.argwhere(f(lay.point_map()))
    assert len(a) == len(b) and np.abs(np.sort(a, 0) - np.sort(b, 0)).max() <= 1
    # centroids follow the pixels
    np.testing.assert_allclose(moved.centroids, Layout.from_inst_map(moved.inst_map, moved.classes).centroids, atol=1e-9)


def test_derived_maps_basic():
    inst, classes = disk_layout_arrays()
    lay = Layout.from_inst_map(inst, classes)
    assert lay.num_nuclei == 3
    oh = lay.onehot()
    assert oh.shape == (5, 48, 48)
    np.testing.assert_array_equal(oh.sum(0), 1)
    np.testing.assert_array_equal(oh.argmax(0), lay.type_map())
    assert lay.onehot(background=False).shape == (4, 48, 48)
    e = lay.edge_map()
    assert e[10, 12] == 0 and e[10, 12 + 5] == 1 and e[10, 12 + 6] == 1  # inner and outer edge ring
    d = lay.distance_map()
    assert d[30, 30] == pytest.approx(1.0) and d[0, 0] == 0 and 0 <= d.min() and d.max() <= 1
    pm = lay.point_map()
    assert pm[10, 12] == 1 and pm[30, 30] == 2 and pm[12, 36] == 3 and (pm > 0).sum() == 3
    np.testing.assert_array_equal(lay.class_counts(), [0, 1, 1, 1, 0])


def test_unknown_class_point_map_marker():
    lay = Layout.from_points((8, 8), [[2, 2]], [0], NUCLEUS_CLASSES)
    assert lay.point_map()[2, 2] == 2  # K + 1 for unknown


def test_relabel_and_crop():
    inst = np.zeros((6, 6), np.int32)
    inst[0:2, 0:2] = 7
    inst[4:6, 4:6] = 3
    new, old = relabel_contiguous(inst)
    assert new[0, 0] == 2 and new[5, 5] == 1 and old.tolist() == [3, 7]
    lay = Layout.from_inst_map(new, [2, 3])
    c = lay.crop(0, 0, 3, 3)
    assert c.num_nuclei == 1 and c.classes.tolist() == [3]


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(inst_map=-np.ones((4, 4)), classes=[1], centroids=[[1, 1]]), "negative"),
        (dict(inst_map=np.full((4, 4), 1.5), classes=[1], centroids=[[1, 1]]), "whole numbers"),
        (dict(inst_map=np.ones((4, 4)), classes=[9], centroids=[[1, 1]]), "outside the class set"),
        (dict(inst_map=np.ones((4, 4)), classes=[1], centroids=[[1, 10]]), "off the"),
        (dict(inst_map=np.ones((4, 4)), classes=[1], centroids=[[np.nan, 1]]), "NaN"),
        (dict(inst_map=np.zeros((0, 4)), classes=[], centroids=np.zeros((0, 2))), "empty"),
        (dict(inst_map=np.full((4, 4), 2), classes=[1], centroids=[[1, 1]]), "only 1 classes"),
        (dict(inst_map=np.ones((4,)), classes=[1], centroids=[[1, 1]]), "dimension"),
    ],
)
def test_layout_validation(kwargs, msg):
    with pytest.raises(LayoutError, match=msg):
        Layout(**kwargs)


def test_gappy_ids_rejected_with_hint():
    inst = np.zeros((4, 4), np.int32)
    inst[0, 0] = 2
    with pytest.raises(LayoutError, match="relabel_contiguous"):
        Layout.from_inst_map(inst, [1, 1])


def test_sample_validation():
    inst, classes = disk_layout_arrays()
    lay = Layout.from_inst_map(inst, classes)
    Sample(lay, np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(LayoutError, match="must match"):
        Sample(lay, np.zeros((40, 48, 3), np.uint8))
    with pytest.raises(LayoutError, match="uint8"):
        Sample(lay, np.zeros((48, 48, 3), np.float32))
    with pytest.raises(LayoutError, match="RGB"):
        Sample(lay, np.zeros((48, 48), np.uint8))


def test_classset_roundtrip_and_errors():
    assert ClassSet.from_dict(CONSEP_CLASSES.to_dict()) == CONSEP_CLASSES
    assert CONSEP_CLASSES.index("other") == 1
    with pytest.raises(LayoutError, match="colours"):
        ClassSet("x", ("a", "b"), ((0, 0, 0),))
    with pytest.raises(LayoutError, match="rare"):
        ClassSet("x", ("a",), ((0, 0, 0),), rare=2)
