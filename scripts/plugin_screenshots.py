"""Regenerate the screenshots of docs/plugin.md from a real napari viewer.

Each dock is used for real (a random layout balanced in the designer, a render, a small
batch, the rendered sample data under its layout's outlines) and the whole window is
captured. Needs a display: run it under a virtual X server,

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/plugin_screenshots.py

Options: ``--checkpoint`` (default: the shipped model / $NUCSYNTH_CHECKPOINT), ``--out``
(default docs/images), ``--size`` (layout size in px, default 128).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _wait(app, cond, timeout: float = 900.0) -> None:
    t0 = time.time()
    while not cond():
        app.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout:
            raise TimeoutError("the dock did not finish in time")


def _settle(app, seconds: float = 1.0) -> None:
    """Let Qt lay out and paint the window (docks included) before a capture."""
    t0 = time.time()
    while time.time() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def _save(viewer, path: Path) -> None:
    """Screenshot of the whole window, quantized to keep the PNG small."""
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    _settle(QApplication.instance())

    rgba = viewer.screenshot(canvas_only=False, flash=False)
    img = Image.fromarray(np.asarray(rgba)[..., :3]).quantize(colors=192, method=Image.Quantize.MEDIANCUT)
    img.save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_nucsynth._batch import BatchWidget
    from napari_nucsynth._designer import DesignerWidget
    from napari_nucsynth._render import RenderWidget
    from nucsynth.checkpoint import resolve_checkpoint

    ckpt = str(resolve_checkpoint(args.checkpoint))
    args.out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True, title="NucSynth")
    viewer.window._qt_window.resize(1500, 950)
    app = QApplication.instance()

    # 1. designer: a random layout, rare class raised to 20 % by DiffMix balancing
    designer = DesignerWidget(viewer)
    dw = viewer.window.add_dock_widget(designer, name="Layout designer", area="right")
    designer.height_spin.setValue(args.size)
    designer.width_spin.setValue(args.size)
    designer.seed_spin.setValue(2)
    designer.density_spin.setValue(60.0)
    designer.random_btn.click()
    _wait(app, lambda: not designer.busy)
    designer.set_target(1, 0.2)
    designer.balance_btn.click()
    _wait(app, lambda: not designer.busy)
    designer.select_class(1)
    viewer.reset_view()
    from qtpy.QtWidgets import QScrollArea

    designer.findChild(QScrollArea).ensureWidgetVisible(designer.keep_btn)  # the proposal's counts and Keep
    _save(viewer, args.out / "designer.png")
    designer.keep_btn.click()
    viewer.window.remove_dock_widget(dw)

    # 2. render: the balanced layout rendered beside itself
    render = RenderWidget(viewer)
    dw = viewer.window.add_dock_widget(render, name="Render tissue", area="right")
    render.ckpt_edit.setText(ckpt)
    render._describe_checkpoint()
    render.steps_spin.setValue(20)
    render.seed_spin.setValue(1)
    render.run_btn.click()
    _wait(app, lambda: not render.running)
    viewer.layers["design classes"].visible = True
    viewer.reset_view()
    _save(viewer, args.out / "render.png")
    viewer.window.remove_dock_widget(dw)

    # 3. batch: a few generated layouts rendered into a store, with the per-class summary
    batch = BatchWidget(viewer)
    viewer.window.add_dock_widget(batch, name="Batch synthesis", area="right")
    with tempfile.TemporaryDirectory() as tmp:
        batch.ckpt_edit.setText(ckpt)
        batch.out_edit.setText(str(Path(tmp) / "synthetic.zarr"))
        batch.count_spin.setValue(4)
        batch.size_spin.setValue(args.size)
        batch.density_spin.setValue(60.0)
        batch.steps_spin.setValue(10)
        batch.mode_combo.setCurrentText("balance")
        batch.run_btn.click()
        _wait(app, lambda: not batch.running)
        viewer.layers.clear()
        viewer.open(batch.out_edit.text(), plugin="napari-nucsynth")  # the store, as stacks
        viewer.reset_view()
        _save(viewer, args.out / "batch.png")
    viewer.layers.clear()

    # 4. sample data: tissue rendered by the default model under its layout's outlines
    from napari_nucsynth._sample_data import _RUNNING

    viewer.open_sample("napari-nucsynth", "rendered")
    _wait(app, lambda: not _RUNNING)
    viewer.reset_view()
    _save(viewer, args.out / "sample.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
