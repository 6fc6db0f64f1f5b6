"""Every designer edit driven with real mouse and keyboard events (a shown napari window
under a virtual X server): after each action, after Ctrl+Z and after Ctrl+Shift+Z the
instances, classes, centroids and features table agree and equal the expected layout."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from nucsynth.layout import Layout  # noqa: E402


class Driver:
    """Real Qt mouse and key events on the viewer's canvas, at data coordinates (y, x)."""

    def __init__(self, viewer, qtbot) -> None:
        self.viewer, self.qtbot = viewer, qtbot
        self.native = viewer.window._qt_viewer.canvas.native

    def _point(self, layer, yx):
        from qtpy.QtCore import QPointF

        world = np.asarray(yx, float) + np.asarray(layer.translate[-2:], float)
        cy, cx = self.viewer.camera.center[-2:]
        z = self.viewer.camera.zoom
        return QPointF(self.native.width() / 2 + (world[1] - cx) * z, self.native.height() / 2 + (world[0] - cy) * z)

    def _send(self, kind, pos, buttons) -> None:
        from qtpy.QtCore import Qt
        from qtpy.QtGui import QMouseEvent
        from qtpy.QtWidgets import QApplication

        button = Qt.MouseButton.NoButton if kind == QMouseEvent.Type.MouseMove else Qt.MouseButton.LeftButton
        ev = QMouseEvent(kind, pos, self.native.mapToGlobal(pos), button, buttons, Qt.KeyboardModifier.NoModifier)
        QApplication.sendEvent(self.native, ev)
        QApplication.processEvents()

    def drag(self, layer, path) -> None:
        """Press at path[0], move through the rest, release at the end (left button)."""
        from qtpy.QtCore import Qt
        from qtpy.QtGui import QMouseEvent

        left = Qt.MouseButton.LeftButton
        self._send(QMouseEvent.Type.MouseMove, self._point(layer, path[0]), Qt.MouseButton.NoButton)
        self._send(QMouseEvent.Type.MouseButtonPress, self._point(layer, path[0]), left)
        for yx in path[1:]:
            self._send(QMouseEvent.Type.MouseMove, self._point(layer, yx), left)
        self._send(QMouseEvent.Type.MouseButtonRelease, self._point(layer, path[-1]), Qt.MouseButton.NoButton)

    def click(self, layer, yx) -> None:
        self.drag(layer, [yx])

    def key(self, key: str, ctrl: bool = False, shift: bool = False, alt: bool = False) -> None:
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QApplication

        mods = Qt.KeyboardModifier.NoModifier
        if ctrl:
            mods |= Qt.KeyboardModifier.ControlModifier
        if shift:
            mods |= Qt.KeyboardModifier.ShiftModifier
        if alt:
            mods |= Qt.KeyboardModifier.AltModifier
        self.qtbot.keyClick(self.native, getattr(Qt.Key, f"Key_{key}"), mods)
        QApplication.processEvents()

    def undo(self) -> None:
        self.key("Z", ctrl=True)

    def redo(self) -> None:
        self.key("Z", ctrl=True, shift=True)

    def button(self, btn) -> None:
        from qtpy.QtCore import Qt

        assert btn.isEnabled(), f"button {btn.text()!r} is disabled"
        self.qtbot.mouseClick(btn, Qt.MouseButton.LeftButton)


def assert_consistent(ctrl, expected: Layout | None = None) -> Layout:
    """The three layers and the features table agree with each other (and with ``expected``)."""
    from napari_nucsynth._layers import _pixel_stats, class_names

    inst = np.asarray(ctrl.instances.data)
    feats = ctrl.instances.features
    cls_of = dict(zip(feats["index"].astype(int), feats["class"].astype(int)))
    ids, cen = _pixel_stats(inst)
    assert set(ids.tolist()) <= set(cls_of), "a painted nucleus has no row in the features table"
    lut = np.zeros(int(inst.max(initial=0)) + 1, np.int64)
    for i, c in cls_of.items():
        if i < lut.size:
            lut[i] = c
    assert np.array_equal(np.asarray(ctrl.classes.data), lut[inst]), "classes layer != class of each nucleus"
    pid = ctrl.centroids.features["id"].astype(int).tolist()
    assert sorted(pid) == sorted(cls_of), "one centroid point per nucleus of the features table"
    names = class_names(ctrl.class_set)
    assert [names[cls_of[i]] for i in pid] == list(ctrl.centroids.features["class"]), "point class != nucleus class"
    pos = dict(zip(pid, np.asarray(ctrl.centroids.data)))
    lay = ctrl.layout()
    order = sorted(ids.tolist()) + sorted(set(cls_of) - set(ids.tolist()))  # the Layout's id order
    assert np.allclose(np.reshape([pos[i] for i in order], (-1, 2)), lay.centroids), "points != the layout's centroids"
    for i, c in zip(ids.tolist(), cen):  # every centroid lies near its nucleus' pixels
        assert np.abs(pos[i] - c).max() < 8, f"centroid of nucleus {i} is far from its pixels"
    if expected is not None:
        assert lay.equals(expected), "the layout is not the expected one"
    return lay


@pytest.fixture
def ui(make_napari_viewer, qtbot):
    from napari_nucsynth._designer import DesignerWidget

    viewer = make_napari_viewer(show=True)
    widget = DesignerWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Layout designer")
    return widget, Driver(viewer, qtbot), qtbot


def _wait(designer, qtbot) -> None:
    qtbot.waitUntil(lambda: not designer.busy, timeout=60000)


def _step(drv: Driver, ctrl, before: Layout, after: Layout | None = None) -> Layout:
    """Check the action's result, then Ctrl+Z (back to ``before``) and Ctrl+Shift+Z (again)."""
    got = assert_consistent(ctrl, after)
    drv.undo()
    assert_consistent(ctrl, before)
    drv.redo()
    assert_consistent(ctrl, got)
    return got


def test_every_edit_is_one_undoable_step_with_real_events(ui) -> None:
    from nucsynth.edit.enlarge import shift_nucleus

    d, drv, qtbot = ui
    viewer = d.viewer
    d.height_spin.setValue(96)
    d.width_spin.setValue(96)
    drv.button(d.new_btn)
    ctrl = d.ctrl
    empty = assert_consistent(ctrl)
    viewer.reset_view()
    # Random layout on the empty canvas: one step
    d.seed_spin.setValue(2)
    d.density_spin.setValue(120)
    drv.button(d.random_btn)
    _wait(d, qtbot)
    viewer.layers.selection.active = ctrl.instances
    lay = _step(drv, ctrl, empty)
    assert lay.num_nuclei > 3
    free = np.argwhere(_free_area(lay.inst_map, 5))[0]  # a spot with no nucleus within 5 px

    # paint a new nucleus of class 3 with a mouse stroke
    d.select_class(3)
    drv.button(d.paint_btn)
    ctrl.instances.brush_size = 3
    drv.drag(ctrl.instances, [tuple(free), tuple(free + (0, 2))])
    painted = assert_consistent(ctrl)
    assert painted.num_nuclei == lay.num_nuclei + 1 and painted.class_counts()[3] == lay.class_counts()[3] + 1
    assert np.array_equal(painted.inst_map[lay.inst_map > 0] > 0, np.ones((lay.inst_map > 0).sum(), bool))
    lay = _step(drv, ctrl, lay, painted)

    # erase a whole nucleus (fill with 0), then undo with another class selected in the palette
    victim = int(np.argmax(lay.classes != 1)) + 1
    vclass = int(lay.classes[victim - 1])
    ctrl.instances.mode = "fill"
    ctrl.instances.selected_label = 0
    drv.click(ctrl.instances, tuple(np.argwhere(lay.inst_map == victim)[0]))
    erased = assert_consistent(ctrl)
    assert erased.num_nuclei == lay.num_nuclei - 1 and vclass not in [] and (erased.inst_map > 0).sum() < (
        lay.inst_map > 0).sum()
    d.select_class(1)
    drv.undo()
    back = assert_consistent(ctrl, lay)
    assert back.classes[victim - 1] == vclass  # its own class, not the palette's
    drv.redo()
    lay = assert_consistent(ctrl, erased)

    # place a point: a nucleus with no pixels, of the selected class
    d.select_class(2)
    drv.button(d.point_btn)
    drv.click(ctrl.centroids, tuple(free + (0, 20)) if free[1] + 20 < 96 else tuple(free - (0, 20)))
    placed = assert_consistent(ctrl)
    assert placed.num_nuclei == lay.num_nuclei + 1 and placed.classes[-1] == 2 and placed.areas()[-1] == 0
    lay = _step(drv, ctrl, lay, placed)

    # drag a nucleus' point by (2, 3) px: the nucleus moves (select mode)
    target = _movable(lay, 2, 3)
    ctrl.centroids.mode = "select"
    ctrl.centroids.selected_data = set()
    c = lay.centroids[target - 1]
    drv.drag(ctrl.centroids, [tuple(c), tuple(c + (1, 1.5)), tuple(c + (2, 3))])
    inst = lay.inst_map.copy()
    assert shift_nucleus(inst, target, 2, 3)
    cen = lay.centroids.copy()
    cen[target - 1] += (2, 3)  # the nucleus and its centroid move by whole pixels
    moved = lay.replace(inst_map=inst, centroids=cen)
    lay = _step(drv, ctrl, lay, moved)

    # delete a nucleus: click its point, press Delete
    drv.click(ctrl.centroids, tuple(lay.centroids[0]))
    assert len(ctrl.centroids.selected_data) == 1
    drv.key("Delete")
    deleted = assert_consistent(ctrl)
    assert deleted.num_nuclei == lay.num_nuclei - 1 and not (np.asarray(ctrl.instances.data) == 1).any()
    lay = _step(drv, ctrl, lay, deleted)

    # re-class by filling class 4 on the classes layer
    viewer.layers.selection.active = ctrl.classes
    ctrl.classes.mode = "fill"
    ctrl.classes.selected_label = 4
    k = int(np.argmax(lay.classes != 4)) + 1
    drv.click(ctrl.classes, tuple(np.argwhere(lay.inst_map == k)[0]))
    expected = lay.replace(classes=np.where(np.arange(1, lay.num_nuclei + 1) == k, 4, lay.classes))
    lay = _step(drv, ctrl, lay, expected)

    # a class outside the set is refused at the edit, the layers stay as they were
    ctrl.classes.selected_label = 7
    drv.click(ctrl.classes, tuple(np.argwhere(lay.inst_map == k)[0]))
    assert_consistent(ctrl, lay)
    assert "class 7 is not in the class set" in d.status.text()
    drv.undo()  # the refused edit is not a step: Ctrl+Z undoes the re-class
    assert_consistent(ctrl, expected.replace(classes=np.where(np.arange(1, lay.num_nuclei + 1) == k,
                                                              int(_prev_class(ctrl, lay, k)), lay.classes)))
    drv.redo()
    lay = assert_consistent(ctrl, lay)

    # Points from labels, then Nuclei from points: one step each
    viewer.layers.selection.active = ctrl.instances
    drv.button(d.points_btn)
    _wait(d, qtbot)
    pts = _step(drv, ctrl, lay)
    assert pts.areas().sum() == 0 and pts.num_nuclei == lay.num_nuclei
    drv.button(d.nuclei_btn)
    _wait(d, qtbot)
    grown = _step(drv, ctrl, pts)
    assert (grown.areas() > 0).all()


def test_keep_of_a_proposal_is_one_step_and_never_replays_old_strokes(ui) -> None:
    d, drv, qtbot = ui
    viewer = d.viewer
    d.height_spin.setValue(96)
    d.width_spin.setValue(96)
    d.density_spin.setValue(120)
    d.border_spin.setValue(8)  # DiffMix's 30 px border leaves little of a 96 px canvas
    d.seed_spin.setValue(3)
    drv.button(d.random_btn)
    _wait(d, qtbot)
    ctrl = d.ctrl
    viewer.reset_view()
    viewer.layers.selection.active = ctrl.instances
    # an eraser stroke first (the napari paint history that used to be replayed after Keep)
    lay = ctrl.layout()
    ctrl.instances.mode = "erase"
    ctrl.instances.brush_size = 3
    spot = np.argwhere(lay.inst_map > 0)[len(np.argwhere(lay.inst_map > 0)) // 2]
    drv.drag(ctrl.instances, [tuple(spot), tuple(spot + (0, 2))])
    erased = assert_consistent(ctrl)
    assert not erased.equals(lay)
    for button, kind in ((d.balance_btn, "balance"), (d.enlarge_btn, "enlarge"), (d.random_btn, "random")):
        d.set_target(1, 0.3)
        drv.button(button)
        _wait(d, qtbot)
        prop = d.proposal
        assert prop is not None, kind
        proposed = assert_consistent(prop)
        assert "changed nuclei outlined" in d.proposal_label.text() or kind == "random"
        assert "Proposal:" in d.proposal_label.text()
        before = assert_consistent(ctrl)
        drv.button(d.keep_btn)
        qtbot.waitUntil(lambda: not d.settling, timeout=5000)
        assert d.proposal is None and not viewer.layers[f"{ctrl.name} proposal instances"].visible
        viewer.layers.selection.active = ctrl.instances
        _step(drv, ctrl, before, proposed)
    drv.undo()
    drv.undo()
    drv.undo()
    assert_consistent(ctrl, erased)
    drv.undo()
    assert_consistent(ctrl, lay)


def test_keyboard_shortcuts_drive_the_designer(ui) -> None:
    """Alt+R random layout, Alt+B balance, Alt+X discard, Ctrl+Return keep, typed on the
    canvas; Ctrl+Z then brings back the layout before the kept proposal."""
    d, drv, qtbot = ui
    d.height_spin.setValue(96)
    d.width_spin.setValue(96)
    d.density_spin.setValue(120)
    d.border_spin.setValue(8)
    d.seed_spin.setValue(3)
    assert "(Alt+R)" in d.random_btn.toolTip() and "(Ctrl+Return)" in d.keep_btn.toolTip()
    window = d.viewer.window._qt_window
    window.activateWindow()  # Qt delivers a window's shortcuts while it is the active one
    qtbot.waitUntil(lambda: window.isActiveWindow(), timeout=5000)
    drv.key("R", alt=True)
    qtbot.waitUntil(lambda: d.ctrl is not None and not d.busy, timeout=60000)  # the shortcut's job ran
    ctrl = d.ctrl
    assert ctrl is not None and ctrl.layout().num_nuclei > 0
    base = assert_consistent(ctrl)
    d.set_target(1, 0.3)
    for discard in (True, False):
        drv.key("B", alt=True)
        qtbot.waitUntil(lambda: d.proposal is not None and not d.busy, timeout=60000)
        proposed = assert_consistent(d.proposal)
        if discard:
            drv.key("X", alt=True)
            qtbot.waitUntil(lambda: d.proposal is None and not d.settling, timeout=5000)
            assert_consistent(ctrl, base)
    drv.key("Return", ctrl=True)
    qtbot.waitUntil(lambda: d.proposal is None and not d.settling, timeout=5000)
    assert_consistent(ctrl, proposed)
    viewer = d.viewer
    viewer.layers.selection.active = ctrl.instances
    drv.undo()
    assert_consistent(ctrl, base)


def _free_area(inst: np.ndarray, r: int) -> np.ndarray:
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(inst > 0, iterations=r)
    free = ~near
    free[:r + 2], free[-r - 2:], free[:, :r + 2], free[:, -r - 22:] = False, False, False, False
    return free


def _movable(lay: Layout, dy: int, dx: int) -> int:
    from nucsynth.edit.enlarge import shift_nucleus

    for i in range(1, lay.num_nuclei + 1):
        if lay.areas()[i - 1] > 0 and shift_nucleus(lay.inst_map.copy(), i, dy, dx):
            return i
    raise AssertionError("no nucleus can move")


def _prev_class(ctrl, lay: Layout, k: int) -> int:
    return int(ctrl.layout().classes[k - 1])
