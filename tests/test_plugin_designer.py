"""The designer dock driven through its real widgets (napari viewer under a virtual X server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui


@pytest.fixture
def designer(make_napari_viewer, qtbot):
    from napari_nucsynth._designer import DesignerWidget

    viewer = make_napari_viewer()
    widget = DesignerWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Layout designer")
    widget.qtbot = qtbot
    return widget


def click(designer, btn) -> None:
    """Click, then wait for the action's worker (if any) and its layer updates to finish."""
    btn.click()
    designer.qtbot.waitUntil(lambda: not designer.busy and not designer.settling, timeout=60000)


def test_paint_updates_counts_and_bars(designer) -> None:
    designer.height_spin.setValue(64)
    designer.width_spin.setValue(64)
    designer.new_btn.click()
    ctrl = designer.ctrl
    assert ctrl is not None and designer.counts() == {"other": 0, "inflammatory": 0, "epithelial": 0, "spindle": 0}
    designer.select_class(3)
    designer.paint_btn.click()
    assert designer.viewer.layers.selection.active is ctrl.instances
    first = ctrl.instances.selected_label
    ctrl.instances.brush_size = 6
    ctrl.instances.paint((20, 20), first)
    assert designer.counts()["epithelial"] == 1
    assert designer.bars.shares[2] == pytest.approx(1.0)
    # one stroke = one nucleus: the next stroke paints a new id of the newly selected class
    assert ctrl.instances.selected_label != first
    designer.select_class(1)
    ctrl.instances.paint((45, 45), ctrl.instances.selected_label)
    assert designer.counts() == {"other": 1, "inflammatory": 0, "epithelial": 1, "spindle": 0}
    assert designer.bars.shares[0] == pytest.approx(0.5)


def test_balance_gives_a_proposal_at_the_target_share(designer) -> None:
    designer.class_set_combo.setCurrentText("consep4")
    designer.seed_spin.setValue(3)
    click(designer, designer.random_btn)
    ctrl = designer.ctrl
    base = ctrl.layout()
    assert base.num_nuclei > 20
    designer.set_target(1, 0.25)
    click(designer, designer.balance_btn)
    prop = designer.proposal
    assert prop is not None and prop.name == f"{ctrl.name} proposal"
    assert designer.keep_btn.isEnabled()
    got = prop.layout()
    share = (got.classes == 1).mean()
    assert share >= 0.25
    assert ctrl.layout().equals(base)  # the user's layout is untouched until "Keep"
    assert prop.instances.translate[1] > base.shape[1]  # beside, not over the layout
    click(designer, designer.keep_btn)
    assert designer.proposal is None and not designer.viewer.layers[f"{ctrl.name} proposal instances"].visible
    assert (ctrl.layout().classes == 1).mean() == pytest.approx(share)
    assert designer.counts()["other"] == int((got.classes == 1).sum())


def test_points_and_nuclei_both_ways_and_discard(designer) -> None:
    click(designer, designer.random_btn)
    ctrl = designer.ctrl
    n = ctrl.layout().num_nuclei
    click(designer, designer.points_btn)
    assert ctrl.layout().areas().sum() == 0 and ctrl.layout().num_nuclei == n
    click(designer, designer.nuclei_btn)
    lay = ctrl.layout()
    assert lay.num_nuclei == n and (lay.areas() > 0).all()
    click(designer, designer.enlarge_btn)
    assert designer.proposal is not None
    click(designer, designer.discard_btn)
    assert designer.proposal is None and ctrl.layout().equals(lay)


def test_bad_input_is_a_notification(designer, monkeypatch) -> None:
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    designer.balance_btn.click()  # no layout yet
    assert shown and "no layout" in shown[0]


def test_start_from_an_opened_image_and_its_labels(designer) -> None:
    from conftest import disk_layout_arrays

    inst, _ = disk_layout_arrays()
    viewer = designer.viewer
    viewer.add_image(np.zeros((*inst.shape, 3), np.uint8), name="tissue", rgb=True, translate=(0, 100))
    viewer.add_labels(inst * 5, name="nuclei")  # ids with gaps, no classes
    designer.image_combo.setCurrentText("tissue")
    designer.labels_combo.setCurrentText("nuclei")
    designer.name_edit.setText("real")
    designer.from_image_btn.click()
    ctrl = designer.ctrl
    assert ctrl.name == "real" and tuple(ctrl.instances.translate) == (0, 100)
    lay = ctrl.layout()
    assert lay.num_nuclei == 3 and lay.classes.tolist() == [0, 0, 0]  # unknown until classed
    assert designer.counts() == {"other": 0, "inflammatory": 0, "epithelial": 0, "spindle": 0}
    ctrl.centroids.selected_data = {0, 1}
    designer.select_class(2)
    designer.assign_btn.click()
    assert designer.counts()["inflammatory"] == 2


def test_open_any_patch_of_a_multi_patch_dataset_for_editing(designer, tmp_path) -> None:
    from test_plugin_io import _folder_dataset

    from napari_nucsynth._reader import read_paths

    samples = _folder_dataset(tmp_path / "ds", 6)
    viewer = designer.viewer
    for data, kwargs, kind in read_paths(str(tmp_path / "ds")):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    viewer.dims.set_current_step(0, 4)  # the slider on patch 4
    assert designer.patch_spin.value() == 4
    designer.open_patch_btn.click()
    ctrl = designer.ctrl
    assert ctrl.name == "ds #4" and "ds #4 image" in viewer.layers
    lay = ctrl.layout()
    assert np.array_equal(lay.inst_map > 0, samples[4].layout.inst_map > 0)
    assert sorted(lay.classes.tolist()) == sorted(samples[4].layout.classes.tolist())
    assert ctrl.instances.translate[1] > 48  # beside the stacks, not over them


def test_a_deleted_layer_is_reported_and_repaired(designer, monkeypatch) -> None:
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    click(designer, designer.random_btn)
    ctrl = designer.ctrl
    before = ctrl.layout()
    viewer = designer.viewer
    viewer.layers.remove(ctrl.classes)
    assert designer.repair_btn.isEnabled() and "classes layer deleted" in designer.status.text()
    designer.balance_btn.click()  # refused with the reason, nothing half-done
    assert shown and "Repair layers" in shown[-1] and designer.proposal is None
    designer.repair_btn.click()
    assert not designer.repair_btn.isEnabled()
    assert f"{ctrl.name} classes" in viewer.layers and designer.ctrl is ctrl
    assert ctrl.layout().equals(before)
    assert (viewer.layers[f"{ctrl.name} classes"].data == before.type_map()).all()


def test_random_layout_from_a_statistics_file(designer, tmp_path, monkeypatch) -> None:
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    from nucsynth.generate.stats import CONSEP_LAYOUT_STATS

    d = CONSEP_LAYOUT_STATS.to_dict()
    d["nuclei_per_patch_quartiles"] = [8.0, 8.0, 8.0]
    for i, entry in enumerate(d["classes"]):  # only epithelial nuclei in "our" data
        entry["share"] = 1.0 if entry["name"] == "epithelial" else 0.0
    (tmp_path / "s.json").write_text(json.dumps(d))
    designer.stats_edit.setText(str(tmp_path / "s.json"))
    designer.load_layout_stats()
    assert designer.density_spin.value() == 8.0 and not shown
    designer.random_btn.click()
    designer.qtbot.waitUntil(lambda: not designer.busy, timeout=60000)
    lay = designer.ctrl.layout()
    h, w = lay.shape
    assert set(lay.classes.tolist()) == {3}
    assert lay.num_nuclei == pytest.approx(8 * h * w / 65536, abs=1)
    # A broken file is one notification and changes nothing; an empty field is CoNSeP again.
    d["classes"][0]["share"] = 2.0
    (tmp_path / "bad.json").write_text(json.dumps(d))
    designer.stats_edit.setText(str(tmp_path / "bad.json"))
    designer.load_layout_stats()
    assert shown and "classes[0]: 'share'" in shown[-1] and designer.density_spin.value() == 8.0
    designer.stats_edit.setText("")
    designer.load_layout_stats()
    assert designer.density_spin.value() == 38.5
    assert np.allclose(designer._targets_for(lay.class_set), [s.share for s in CONSEP_LAYOUT_STATS.classes], atol=1e-3)
