"""Batch synthesis: resumable stores (headless) and the dock driven through its widgets."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("torch")

from test_plugin_render import one_torch_thread, tiny_checkpoint  # noqa: E402,F401  (shared fixtures)

from napari_nucsynth._batch import BatchParams, batch_steps  # noqa: E402
from nucsynth.synthesize import SynthesisOptions, partial_path  # noqa: E402


def _drain(gen):
    seen = []
    try:
        while True:
            seen.append(next(gen))
    except StopIteration as done:
        return done.value, seen


def _params(ckpt: Path, out: Path, source: str = "generator", source_path: str = "", count: int = 3,
            **options) -> BatchParams:
    opts = dict(steps=2, batch_size=2, seed=5, mode="layout")
    opts.update(options)
    return BatchParams(checkpoint=str(ckpt), out=str(out), source=source, source_path=source_path, count=count,
                       size=32, options=SynthesisOptions(**opts))


def test_batch_is_resumable_and_deterministic(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from nucsynth.io.store import DatasetStore

    whole, seen = _drain(batch_steps(_params(tiny_checkpoint, tmp_path / "whole.zarr")))
    assert whole["written"] == 3 and whole["skipped"] == 0 and seen[-1] == (1000, 1000)
    ref = DatasetStore.open(tmp_path / "whole.zarr")
    assert whole["class_counts"] == ref.class_counts().tolist() and sum(whole["class_counts"]) > 0

    # interrupt after the first batch is written, then resume
    cancel = threading.Event()
    gen = batch_steps(_params(tiny_checkpoint, tmp_path / "part.zarr"), cancel)
    for done, _ in gen:
        if done > 700:  # the first batch (2 of 3) is in the store, the second in flight
            cancel.set()
    assert len(DatasetStore.open(partial_path(tmp_path / "part.zarr"))) == 2
    resumed, _ = _drain(batch_steps(_params(tiny_checkpoint, tmp_path / "part.zarr")))
    assert resumed["skipped"] == 2 and resumed["written"] == 1 and resumed["total"] == 3
    part = DatasetStore.open(tmp_path / "part.zarr")
    for i in range(3):
        assert np.array_equal(part[i].image, ref[i].image)
        assert part[i].layout.equals(ref[i].layout)

    # other settings on an unfinished store are refused, naming what differs
    cancel = threading.Event()
    for done, _ in batch_steps(_params(tiny_checkpoint, tmp_path / "other.zarr"), cancel):
        if done > 700:
            cancel.set()
    with pytest.raises(ValueError, match="seed"):
        _drain(batch_steps(_params(tiny_checkpoint, tmp_path / "other.zarr", seed=6)))


def test_balance_mode_from_a_store_starts_from_its_images(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from nucsynth.generate.tissue import procedural_sample
    from nucsynth.io.store import DatasetStore
    from nucsynth.layout import CONSEP_CLASSES

    src = DatasetStore.create(tmp_path / "src.zarr", CONSEP_CLASSES)
    src.append([procedural_sample((32, 32), seed=s, class_shares=[0.2, 0.3, 0.3, 0.2]) for s in range(2)])
    summary, _ = _drain(batch_steps(_params(tiny_checkpoint, tmp_path / "bal.zarr", source="store or file",
                                            source_path=str(tmp_path / "src.zarr"), mode="enlarge", count=2)))
    out = DatasetStore.open(tmp_path / "bal.zarr")
    assert len(out) == 2 and summary["total"] == 2
    assert out[0].provenance["options"]["strength"] == pytest.approx(0.55) and out[0].provenance["mode"] == "enlarge"


@pytest.mark.gui
def test_batch_dock_runs_and_summarises(make_napari_viewer, qtbot, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from napari_nucsynth._batch import BatchWidget

    viewer = make_napari_viewer()
    dock = BatchWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Batch")
    dock.ckpt_edit.setText(str(tiny_checkpoint))
    dock.out_edit.setText(str(tmp_path / "gui.zarr"))
    dock.count_spin.setValue(2)
    dock.size_spin.setValue(32)
    dock.steps_spin.setValue(2)
    dock.run_btn.click()
    assert dock.running and not dock.run_btn.isEnabled()
    qtbot.waitUntil(lambda: not dock.running, timeout=120000)
    assert dock.summary is not None and dock.summary["total"] == 2
    assert "Nuclei per class" in dock.status.text() and dock.progress.value() == 1000
    dock.out_edit.setText(str(tmp_path))  # an existing folder that is not a store
    dock.run_btn.click()
    qtbot.waitUntil(lambda: not dock.running, timeout=60000)
    assert dock.last_error and "already exists" in dock.last_error
