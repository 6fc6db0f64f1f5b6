"""Layout <-> napari layers: round trip and live consistency (ViewerModel, no Qt)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.components import ViewerModel  # noqa: E402

from conftest import disk_layout_arrays  # noqa: E402
from napari_nucsynth._layers import (  # noqa: E402
    LayoutLayers,
    layer_names,
    layers_to_layout,
    layout_to_layers,
)
from nucsynth.layout import CONSEP_CLASSES, Layout  # noqa: E402


@pytest.fixture
def layout() -> Layout:
    inst, cls = disk_layout_arrays()
    return Layout.from_inst_map(inst, cls, CONSEP_CLASSES)


@pytest.fixture
def ctrl(layout: Layout) -> LayoutLayers:
    return LayoutLayers.show(ViewerModel(), layout, "d")


def test_layer_data_tuples_round_trip(layout: Layout) -> None:
    viewer = ViewerModel()
    for data, kwargs, kind in layout_to_layers(layout, "x"):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    names = layer_names("x")
    assert [ly.name for ly in viewer.layers] == list(names.values())
    inst, classes, pts = (viewer.layers[n] for n in names.values())
    assert inst.data.dtype == np.int32
    assert list(inst.features["class"]) == [1, 2, 3]
    assert np.array_equal(classes.data, layout.type_map())
    # class colours are the ClassSet's: class 2 (inflammatory) is green, 0 transparent
    assert np.allclose(classes.colormap.map(np.array([2]))[0], [0, 1, 0, 1])
    assert classes.colormap.map(np.array([0]))[0][3] == 0
    assert np.allclose(pts.face_color[0], [1, 0, 0, 1])
    back = layers_to_layout(inst, pts)
    assert back.equals(layout)


def test_show_updates_layers_in_place(ctrl: LayoutLayers, layout: Layout) -> None:
    viewer = ctrl.viewer
    first = viewer.layers["d instances"]
    again = LayoutLayers.show(viewer, layout.flip(1), "d")
    assert len(viewer.layers) == 3 and viewer.layers["d instances"] is first
    assert again is ctrl
    assert again.layout().equals(layout.flip(1))


def test_paint_new_nucleus_takes_selected_class(ctrl: LayoutLayers) -> None:
    ctrl.selected_class = 4
    counts = []
    ctrl.changed.connect(lambda: counts.append(ctrl.class_counts().tolist()))
    nid = ctrl.new_nucleus_label()
    ctrl.instances.brush_size = 5
    ctrl.instances.paint((40, 8), nid)
    assert counts[-1] == [0, 1, 1, 1, 1]
    assert ctrl.classes.data[40, 8] == 4
    assert list(ctrl.centroids.features["class"])[-1] == "spindle"
    assert np.allclose(ctrl.centroids.data[-1], (40, 8), atol=0.6)
    lay = ctrl.layout()
    assert lay.num_nuclei == 4 and lay.classes[-1] == 4


def test_erasing_a_nucleus_deletes_it(ctrl: LayoutLayers) -> None:
    ctrl.instances.fill((30, 30), 0)
    assert ctrl.class_counts().tolist() == [0, 1, 0, 1, 0]
    assert len(ctrl.centroids.data) == 2
    assert not (ctrl.classes.data == 2).any()


def test_added_point_is_a_point_nucleus_of_selected_class(ctrl: LayoutLayers) -> None:
    ctrl.selected_class = 1
    ctrl.centroids.add([[42, 42]])
    lay = ctrl.layout()
    assert lay.num_nuclei == 4
    assert lay.classes[-1] == 1 and np.allclose(lay.centroids[-1], (42, 42))
    assert lay.areas()[-1] == 0  # no pixels yet: a point layout entry


def test_moving_a_point_moves_its_nucleus(ctrl: LayoutLayers, layout: Layout) -> None:
    data = ctrl.centroids.data.copy()
    data[1] += (4, -3)
    ctrl.centroids.data = data
    lay = ctrl.layout()
    assert np.allclose(lay.centroids[1], layout.centroids[1] + (4, -3))
    assert lay.areas()[1] == layout.areas()[1]
    assert np.allclose(ctrl.centroids.data[1], lay.centroids[1])


def test_deleting_a_point_deletes_its_nucleus(ctrl: LayoutLayers) -> None:
    ctrl.centroids.selected_data = {0}
    ctrl.centroids.remove_selected()
    lay = ctrl.layout()
    assert lay.num_nuclei == 2 and lay.classes.tolist() == [2, 3]
    assert not (ctrl.instances.data == 1).any()


def test_painting_the_class_layer_reclasses_touched_nuclei(ctrl: LayoutLayers) -> None:
    ctrl.classes.fill((30, 30), 4)  # nucleus 2 (inflammatory) -> spindle
    assert ctrl.layout().classes.tolist() == [1, 4, 3]
    ctrl.classes.brush_size = 3
    ctrl.classes.paint((45, 2), 2)  # background: no nucleus there, the paint is undone
    assert ctrl.classes.data[45, 2] == 0
    assert ctrl.layout().classes.tolist() == [1, 4, 3]


def test_undo_and_redo_restore_the_whole_layout(ctrl: LayoutLayers, layout: Layout) -> None:
    ctrl.selected_class = 3
    ctrl.instances.brush_size = 4
    ctrl.instances.paint((44, 44), ctrl.new_nucleus_label())
    painted = ctrl.layout()
    assert ctrl.class_counts()[3] == 2
    ctrl.selected_class = 1
    ctrl.instances.fill((30, 30), 0)  # erase nucleus 2 (inflammatory) with "other" selected
    assert ctrl.class_counts().tolist() == [0, 1, 0, 2, 0]
    assert ctrl.undo()  # it comes back in its own class, not the palette's
    assert ctrl.layout().equals(painted) and ctrl.classes.data[30, 30] == 2
    assert ctrl.undo()
    assert ctrl.layout().equals(layout)
    assert ctrl.redo() and ctrl.layout().equals(painted)
    assert list(ctrl.instances.features["class"]) == list(painted.classes)


def test_undo_after_a_new_layout_never_replays_old_strokes(ctrl: LayoutLayers, layout: Layout) -> None:
    ctrl.instances.brush_size = 3
    ctrl.instances.paint((44, 8), 0)  # a stroke of the eraser on background
    ctrl.instances.paint((10, 12), 0)  # and one that erases part of nucleus 1
    erased = ctrl.layout()
    ctrl.set_layout(layout.flip(1))  # e.g. Keep of a proposal
    assert ctrl.undo() and ctrl.layout().equals(erased)
    assert ctrl.redo() and ctrl.layout().equals(layout.flip(1))


def test_a_class_outside_the_class_set_is_refused(ctrl: LayoutLayers, layout: Layout) -> None:
    notes = []
    ctrl.notice.connect(notes.append)
    ctrl.classes.fill((30, 30), 7)  # consep4 has classes 1..4
    assert notes and "class 7 is not in the class set 'consep4'" in notes[0]
    assert ctrl.layout().equals(layout)
    assert np.array_equal(ctrl.classes.data, layout.type_map())
    assert not ctrl.can_undo  # nothing happened
    ctrl.classes.fill((30, 30), 4)  # later edits still work
    assert ctrl.layout().classes.tolist() == [1, 4, 3]


def test_deleted_and_renamed_layers_are_repaired(ctrl: LayoutLayers, layout: Layout) -> None:
    from napari_nucsynth._layers import broken_layouts

    viewer = ctrl.viewer
    viewer.layers.remove(ctrl.classes)
    ctrl.centroids.name = "my points"
    assert broken_layouts(viewer.layers) == {"d": ["classes layer deleted", "centroids layer renamed to 'my points'"]}
    assert LayoutLayers.recover(viewer, "d") is ctrl
    assert broken_layouts(viewer.layers) == {}
    assert [ly.name for ly in viewer.layers] == ["d instances", "d centroids", "d classes"]
    assert np.array_equal(viewer.layers["d classes"].data, layout.type_map())
    ctrl.classes.fill((30, 30), 4)  # the new classes layer is bound
    assert ctrl.layout().classes.tolist() == [1, 4, 3]


def test_layers_without_a_controller_are_rebuilt_from_what_is_left(layout: Layout) -> None:
    viewer = ViewerModel()
    for data, kwargs, kind in layout_to_layers(layout, "r"):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    viewer.layers.remove("r instances")
    ctrl = LayoutLayers.recover(viewer, "r")  # from the centroids: a point layout
    lay = ctrl.layout()
    assert lay.num_nuclei == 3 and lay.classes.tolist() == [1, 2, 3] and lay.areas().sum() == 0
    assert np.allclose(lay.centroids, layout.centroids)


def test_layers_without_class_set_give_clear_error() -> None:
    viewer = ViewerModel()
    layer = viewer.add_labels(np.zeros((8, 8), np.int32), name="plain")
    with pytest.raises(ValueError, match="class set"):
        layers_to_layout(layer)


def test_a_move_onto_another_nucleus_is_refused(ctrl: LayoutLayers, layout: Layout) -> None:
    notes = []
    ctrl.notice.connect(notes.append)
    data = ctrl.centroids.data.copy()
    data[0] = layout.centroids[1]  # drop nucleus 1 onto nucleus 2
    ctrl.centroids.data = data
    assert ctrl.layout().equals(layout)
    assert np.allclose(ctrl.centroids.data[0], layout.centroids[0])
    assert notes and "not moved" in notes[0]


def test_layout_writes_never_touch_an_array_it_did_not_give(make_napari_viewer) -> None:
    """The controller overwrites its own label arrays in place (fast), but the array of a
    file or another layer it adopted is replaced by a copy, never written to."""
    from napari_nucsynth._layers import LayoutLayers
    from nucsynth.generate.layouts import random_layout

    viewer = make_napari_viewer()
    a, b = random_layout((64, 64), seed=1), random_layout((64, 64), seed=2)
    ctrl = LayoutLayers.show(viewer, a, "t")
    users = np.asarray(ctrl.instances.data).copy()
    users.flags.writeable = False  # e.g. an array a reader handed over
    ctrl.instances.data = users  # the user replaces the layer's data
    ctrl = LayoutLayers.attach(viewer, "t")
    ctrl.set_layout(b)
    assert not np.array_equal(users, b.inst_map) and ctrl.instances.data is not users
    own = ctrl.instances.data
    ctrl.set_layout(a)  # now the controller's own array: written in place
    assert ctrl.instances.data is own and np.array_equal(own, a.inst_map)
    assert ctrl.layout().equals(a)
