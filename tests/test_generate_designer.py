"""The designer's Random layout draws from a layout statistics file (napari under a virtual X server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nucsynth.generate.stats import CONSEP_LAYOUT_STATS

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


def test_random_layout_from_a_statistics_file(designer, tmp_path, monkeypatch) -> None:
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
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
