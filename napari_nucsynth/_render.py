"""Render dock: layout -> synthetic H&E through a trained model, without freezing napari.

The engine's ``model.sample(..., progress=callback)`` runs in a helper thread; a generator
(:func:`render_steps`) turns its progress callbacks into yielded ``(step, total)`` pairs, so
napari's ``thread_worker`` drives it, the UI stays responsive, and cancelling stops the
engine between two sampler steps. Layers are touched only in the main-thread handlers.

Modes: ``render`` (from noise), ``restyle`` (DiffMix / SDEdit: partially noise an image,
then denoise under the layout; ``strength`` in [0, 1]) and ``region`` (re-render only what
the user edited since the last render: the difference of the two layouts, dilated, is
the mask of the engine's masked re-rendering; outside it the last render is kept).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Generator

import numpy as np

from nucsynth.edit.region import edited_region
from nucsynth.layout import Layout, Sample

__all__ = [
    "MODES",
    "RenderParams",
    "RenderCancelled",
    "engine_steps",
    "render_steps",
    "edited_region",
    "load_model",
    "RenderWidget",
]

MODES = ("render", "restyle", "region")
SAMPLERS = ("dpm++2m", "ddim", "ancestral")


class RenderCancelled(Exception):
    """Raised inside the engine's progress callback to stop a render between steps."""


@dataclass
class RenderParams:
    """What a render needs besides the layout (all of it is kept in the layer metadata)."""

    checkpoint: str
    mode: str = "render"
    steps: int = 20
    guidance: float = 0.5
    seed: int = 0
    strength: float = 0.55
    sampler: str = "dpm++2m"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"render mode must be one of {MODES}, got {self.mode!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")


_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def load_model(checkpoint: str | Path, device: Any = None) -> Any:
    """The model family of ``checkpoint`` on ``device`` (default: the engine's pick), cached."""
    from nucsynth.checkpoint import find_checkpoint, load_checkpoint
    from nucsynth.device import pick_device

    dev = pick_device(None if device is None else str(device))
    path = str(find_checkpoint(checkpoint).resolve())
    key = (path, str(dev))
    with _MODELS_LOCK:
        if key not in _MODELS:
            model, _ = load_checkpoint(path, dev)
            _MODELS.clear()  # keep one model in memory
            _MODELS[key] = model
        return _MODELS[key]


def _lower_thread_priority() -> None:
    """On Linux, nice the calling (engine) thread a little, so the UI thread wins when both
    want the same core: the viewer stays responsive while a render computes."""
    if sys.platform != "linux":  # elsewhere a thread id is not a valid PRIO_PROCESS target
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 5))
    except OSError:
        pass


def engine_steps(
    call: Callable[[Callable[[int, int], None]], Any], cancel: threading.Event | None = None
) -> Generator[tuple[int, int], None, Any]:
    """Run ``call(progress)`` (an engine function taking a ``progress(i, n)`` callback) in a
    helper thread; yield each ``(i, n)`` it reports and return its result, or None when
    ``cancel`` was set (the engine stops after its current step). Its errors are re-raised
    here. Closing the generator early cancels the engine too."""
    cancel = cancel or threading.Event()
    events: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def progress(i: int, n: int) -> None:
        if cancel.is_set():
            raise RenderCancelled()
        events.put((int(i), int(n)))

    def run() -> None:
        _lower_thread_priority()
        try:
            outcome["result"] = call(progress)
        except RenderCancelled:
            outcome["cancelled"] = True
        except BaseException as e:  # handed to the consumer's thread below
            outcome["error"] = e
        finally:
            events.put(None)

    thread = threading.Thread(target=run, name="nucsynth-engine", daemon=True)
    thread.start()
    try:
        while True:
            item = events.get()
            if item is None:
                break
            yield item
    finally:
        if thread.is_alive():  # the consumer stopped early: stop the engine too
            cancel.set()
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    if outcome.get("cancelled"):
        return None
    return outcome["result"]


def render_steps(
    model: Any,
    layout: Layout,
    params: RenderParams,
    init_image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    cancel: threading.Event | None = None,
) -> Generator[tuple[int, int], None, Sample | Layout | None]:
    """Yield ``(step, total)`` while the engine works on ``layout``; return the result, or
    None when ``cancel`` was set.

    By family: ``semantic`` renders the layout (a Sample; every mode); ``joint`` generates
    image and nuclei from the layout's centroids and classes (a Sample whose layout is the
    model's; mode ``render``); ``structure`` generates a new layout of the canvas size
    (a Layout, no image; mode ``render``).
    """
    family = getattr(model, "name", "")
    if family in ("joint", "structure") and params.mode != "render":
        raise ValueError(f"a {family!r} model only supports mode 'render' (restyle and region need a semantic model)")
    kwargs: dict[str, Any] = {}
    if params.mode in ("restyle", "region"):
        if init_image is None:
            raise ValueError(f"mode {params.mode!r} needs an image to start from")
        kwargs["init_image"] = init_image
    if params.mode == "restyle":
        kwargs["strength"] = params.strength
    if params.mode == "region":
        if mask is None:
            raise ValueError("mode 'region' needs the mask of the edited region")
        kwargs["mask"] = mask

    def call(progress: Callable[[int, int], None]) -> Sample | Layout:
        if family == "structure":
            raw = model.sample_structures(1, size=layout.shape, steps=params.steps, seed=params.seed,
                                          sampler=params.sampler, progress=progress)
            return model.to_layout(raw[0])
        return model.sample(layout, steps=params.steps, guidance=params.guidance, seed=params.seed,
                            sampler=params.sampler, progress=progress, **kwargs)[0]

    return (yield from engine_steps(call, cancel))


def render_metadata(sample: Sample, params: RenderParams, layout_name: str, family: str) -> dict[str, Any]:
    """The layer metadata of a rendered image: model, seed and every parameter."""
    prov = {k: v for k, v in sample.provenance.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {
        "nucsynth": {
            "role": "render",
            "layout": layout_name,
            "family": family,
            "model": prov.get("model"),
            "checkpoint": params.checkpoint,
            "seed": params.seed,
            **{k: v for k, v in asdict(params).items() if k not in ("checkpoint", "seed")},
            "provenance": prov,
        }
    }


# ---------------------------------------------------------------------- the dock
from qtpy.QtWidgets import (  # noqa: E402  (the engine part above is usable without Qt)
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_nucsynth._layers import LayoutLayers, find_layout_names, role_of  # noqa: E402


class RenderWidget(QWidget):
    """The render dock. ``worker`` is the running thread worker (None when idle)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self._cancel: threading.Event | None = None
        self._rendered: dict[str, Layout] = {}  # layout name -> the layout of its last render
        self.last_error: str | None = None
        root = QVBoxLayout(self)
        form = QFormLayout()
        self.ckpt_edit = QLineEdit()
        self.ckpt_edit.editingFinished.connect(self._describe_checkpoint)
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.ckpt_edit)
        row.addWidget(browse)
        form.addRow("Checkpoint", row)
        self.family_label = QLabel("")
        form.addRow("Family", self.family_label)
        self.device_label = QLabel("")
        form.addRow("Device", self.device_label)
        self.layout_combo = QComboBox()
        form.addRow("Layout", self.layout_combo)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(MODES))
        self.mode_combo.setToolTip("render: from noise; restyle: start from the image below (DiffMix); "
                                   "region: re-render only what changed since the last render")
        form.addRow("Mode", self.mode_combo)
        self.image_combo = QComboBox()
        form.addRow("Restyle image", self.image_combo)
        self.steps_spin = QSpinBox(minimum=1, maximum=1000, value=20)
        form.addRow("Steps", self.steps_spin)
        self.guidance_spin = QDoubleSpinBox(minimum=0.0, maximum=20.0, value=0.5, singleStep=0.1)
        form.addRow("Guidance", self.guidance_spin)
        self.seed_spin = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        form.addRow("Seed", self.seed_spin)
        self.strength_spin = QDoubleSpinBox(minimum=0.01, maximum=1.0, value=0.55, singleStep=0.05)
        form.addRow("Strength", self.strength_spin)
        self.sampler_combo = QComboBox()
        self.sampler_combo.addItems(list(SAMPLERS))
        form.addRow("Sampler", self.sampler_combo)
        root.addLayout(form)
        row = QHBoxLayout()
        self.run_btn = QPushButton("Render")
        self.run_btn.clicked.connect(self.render)
        self.region_btn = QPushButton("Re-render region")
        self.region_btn.clicked.connect(self.rerender_region)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        for b in (self.run_btn, self.region_btn, self.cancel_btn):
            row.addWidget(b)
        root.addLayout(row)
        self.progress = QProgressBar()
        root.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        root.addStretch(1)
        self._preselect_checkpoint()
        self._show_device()
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._refresh_combos)
        self._refresh_combos()

    # ------------------------------------------------------------------ setup
    def _preselect_checkpoint(self) -> None:
        from nucsynth.checkpoint import resolve_checkpoint

        try:
            self.ckpt_edit.setText(str(resolve_checkpoint(None)))
        except (FileNotFoundError, ValueError) as e:
            self.ckpt_edit.setPlaceholderText("no default model installed: choose a checkpoint folder")
            self.status.setText(str(e))
        self._describe_checkpoint()

    def _show_device(self) -> None:
        from nucsynth.device import describe_device, pick_device

        self.device_label.setText(describe_device(pick_device()))

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Checkpoint folder", self.ckpt_edit.text())
        if path:
            self.ckpt_edit.setText(path)
            self._describe_checkpoint()

    def _describe_checkpoint(self) -> None:
        from nucsynth.checkpoint import read_config

        text = self.ckpt_edit.text().strip()
        if not text:
            self.family_label.setText("-")
            return
        try:
            cfg = read_config(text)
        except (FileNotFoundError, ValueError) as e:
            self.family_label.setText("(not a checkpoint)")
            self.family_label.setToolTip(str(e))
            return
        model = cfg.get("model", {})
        self.family_label.setText(f"{cfg['family']} ({model.get('preset', '?')}, {model.get('image_size', '?')} px, "
                                  f"step {cfg.get('step', '?')})")

    def _refresh_combos(self, event: Any = None) -> None:
        from napari.layers import Image

        for combo, items in (
            (self.layout_combo, [n for n in find_layout_names(self.viewer.layers) if not n.endswith(" proposal")]),
            (self.image_combo, [ly.name for ly in self.viewer.layers if isinstance(ly, Image) and ly.rgb]),
        ):
            current = combo.currentText()
            combo.clear()
            combo.addItems(items)
            if current in items:
                combo.setCurrentText(current)

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        """Whether a render is in progress."""
        return self.worker is not None

    def _tell(self, text: str, error: bool = False) -> None:
        from napari.utils.notifications import show_error, show_info

        self.status.setText(text)
        if error:
            self.last_error = text
        (show_error if error else show_info)(text)

    def params(self, mode: str | None = None) -> RenderParams:
        """The parameters as set in the dock."""
        return RenderParams(
            checkpoint=self.ckpt_edit.text().strip(),
            mode=mode or self.mode_combo.currentText(),
            steps=self.steps_spin.value(),
            guidance=self.guidance_spin.value(),
            seed=self.seed_spin.value(),
            strength=self.strength_spin.value(),
            sampler=self.sampler_combo.currentText(),
        )

    def output_name(self, layout_name: str) -> str:
        """The render layer of a layout (updated by later renders; rename it to keep it)."""
        return f"{layout_name} render"

    # ------------------------------------------------------------------ actions
    def render(self) -> None:
        """Render the chosen layout with the dock's mode (the Render button)."""
        self._start(self.params())

    def rerender_region(self) -> None:
        """Re-render only the region edited since the layout's last render."""
        self._start(self.params("region"))

    def cancel(self) -> None:
        """Stop the running render after its current step."""
        if self._cancel is not None:
            self._cancel.set()
        if self.worker is not None:
            self.worker.quit()
        self.status.setText("cancelling...")

    def _start(self, params: RenderParams) -> None:
        if self.running:
            return
        try:
            job = self._prepare(params)
        except (FileNotFoundError, ValueError) as e:
            self._tell(str(e), error=True)
            return
        from napari.qt.threading import create_worker

        ctrl, layout, init, mask = job
        self._cancel = threading.Event()
        self.progress.setRange(0, params.steps)
        self.progress.setValue(0)
        worker = create_worker(self._job, params, layout, init, mask, self._cancel,
                               _start_thread=False, _ignore_errors=True)  # errors go to _on_error
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda sample: self._on_done(sample, ctrl, layout, params))
        worker.errored.connect(self._on_error)
        worker.aborted.connect(lambda: self.status.setText("render cancelled"))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_running(True)
        self.status.setText(f"rendering {ctrl.name!r} ({params.mode}, {params.steps} steps, seed {params.seed})...")
        worker.start()

    def _prepare(self, params: RenderParams) -> tuple[LayoutLayers, Layout, np.ndarray | None, np.ndarray | None]:
        """Check everything on the main thread (fast, clear errors) before any work starts."""
        from nucsynth.checkpoint import find_checkpoint, read_config

        if not params.checkpoint:
            raise ValueError("choose a checkpoint folder first (no default model is installed)")
        find_checkpoint(params.checkpoint)
        read_config(params.checkpoint)
        name = self.layout_combo.currentText()
        if not name:
            raise ValueError("no layout to render: make one in the Layout designer or open a file")
        ctrl = LayoutLayers.attach(self.viewer, name)
        layout = ctrl.layout()
        init = mask = None
        if params.mode == "restyle":
            img = self.image_combo.currentText()
            if not img:
                raise ValueError("mode 'restyle' needs an RGB image layer to start from")
            init = np.asarray(self.viewer.layers[img].data)
            if init.shape[:2] != layout.shape or init.dtype != np.uint8:
                raise ValueError(f"image {img!r} is {init.shape} {init.dtype}; restyle needs uint8 RGB of {layout.shape}")
        elif params.mode == "region":
            out = self.output_name(name)
            if name not in self._rendered or out not in self.viewer.layers:
                raise ValueError(f"render {name!r} once before re-rendering a region")
            mask = edited_region(self._rendered[name], layout)
            if not mask.any():
                raise ValueError("nothing was edited since the last render")
            init = np.asarray(self.viewer.layers[out].data)
        return ctrl, layout, init, mask

    @staticmethod
    def _job(params: RenderParams, layout: Layout, init: Any, mask: Any, cancel: threading.Event):
        """Worker body: load the model (cached), then render step by step."""
        yield (0, params.steps)
        model = load_model(params.checkpoint)
        made = yield from render_steps(model, layout, params, init, mask, cancel)
        return None if made is None else (made, getattr(model, "name", "?"))

    # ------------------------------------------------------------------ worker handlers (main thread)
    def _on_progress(self, item: tuple[int, int]) -> None:
        i, n = item
        self.progress.setRange(0, n)
        self.progress.setValue(i)

    def _on_done(self, result: Any, ctrl: LayoutLayers, layout: Layout, params: RenderParams) -> None:
        if result is None:
            self.status.setText("render cancelled")
            return
        made, family = result
        self._place(made, family, ctrl, layout, params)

    def _place(self, result: Sample | Layout, family: str, ctrl: LayoutLayers, layout: Layout,
               params: RenderParams) -> None:
        name = self.output_name(ctrl.name)
        ty, tx = (float(t) for t in ctrl.instances.translate[-2:])
        translate = (ty, tx + layout.shape[1] + 8)  # beside the layout, never over it
        made = result.layout if isinstance(result, Sample) else result
        if isinstance(result, Sample):
            meta = render_metadata(result, params, ctrl.name, family)
            existing = self.viewer.layers[name] if name in self.viewer.layers else None
            if existing is not None and role_of(existing) == "render":
                existing.data = result.image
                existing.metadata = meta
                existing.translate = translate
            else:
                self.viewer.add_image(result.image, name=name, rgb=True, metadata=meta, translate=translate)
            self._rendered[ctrl.name] = made
        if not made.equals(layout):  # families that make their own nuclei (joint, structure)
            LayoutLayers.show(self.viewer, made, f"{name} labels", translate=translate)
        self.progress.setValue(self.progress.maximum())
        self.status.setText(f"{family} model: {ctrl.name!r} done, seed {params.seed}")

    def _on_error(self, exc: BaseException) -> None:
        self._tell(f"render failed: {exc}", error=True)

    def _on_finished(self) -> None:
        self.worker = None
        self._cancel = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.run_btn.setEnabled(not running)
        self.region_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
