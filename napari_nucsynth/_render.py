"""Render dock: layout -> synthetic H&E through a trained model, without freezing napari.

The engine's ``model.sample(..., progress=callback)`` runs in a helper thread; a generator
(:func:`render_steps`) turns its progress callbacks into yielded ``(step, total)`` pairs
(:func:`napari_nucsynth._jobs.engine_steps`), run by a :class:`napari_nucsynth._jobs.Job`:
napari's activity panel shows the progress, the UI stays responsive, and Cancel returns at
once (the engine stops at its next network pass). Layers are touched only in the
main-thread handlers. Before a render the dock estimates its time from the speed measured
on this device (the first render measures it) and warns when it is long.

Modes: ``render`` (from noise), ``restyle`` (DiffMix / SDEdit: partially noise an image,
then denoise under the layout; ``strength`` in [0, 1]) and ``region`` (re-render only what
the user edited since the last render: the difference of the two layouts, dilated, is
the mask of the engine's masked re-rendering; outside it the last render is kept).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Generator

import numpy as np

from napari_nucsynth._jobs import Job, engine_steps
from nucsynth.edit.region import edited_region
from nucsynth.layout import Layout, Sample
from nucsynth.synthesize import DIFFMIX_STRENGTH, SAMPLERS, SynthesisOptions, option_fields

__all__ = [
    "MODES",
    "RenderParams",
    "render_steps",
    "edited_region",
    "available_devices",
    "SpeedLog",
    "RenderWidget",
]

MODES = ("render", "restyle", "region")
LONG_RENDER_S = 120.0  # estimates above this get a warning before the render starts
_DEFAULTS = {f.name: f.default for f in option_fields()}


@dataclass
class RenderParams:
    """What a render needs besides the layout (all of it is kept in the layer metadata).
    Defaults are the engine's (:class:`nucsynth.synthesize.SynthesisOptions`); ``guidance``
    None = the model's own default; ``strength`` is used by mode ``restyle`` only."""

    checkpoint: str
    mode: str = "render"
    steps: int = _DEFAULTS["steps"]
    guidance: float | None = _DEFAULTS["guidance"]
    seed: int = _DEFAULTS["seed"]
    strength: float = DIFFMIX_STRENGTH
    sampler: str = _DEFAULTS["sampler"]
    threads: int = 0  # CPU threads; 0 = the engine's policy

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"render mode must be one of {MODES}, got {self.mode!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = automatic), got {self.threads}")
        self.options()  # the engine checks the rest

    def options(self) -> SynthesisOptions:
        """The engine's options for this render (strength only for ``restyle``)."""
        return SynthesisOptions(steps=self.steps, sampler=self.sampler, guidance=self.guidance, seed=self.seed,
                                strength=self.strength if self.mode == "restyle" else None)


def available_devices() -> list[str]:
    """The torch devices of this machine the engine can use: "cpu", "cuda:N", "mps"."""
    import torch

    out = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out + ["cpu"]


class SpeedLog:
    """Seconds per sampler step per megapixel, measured by the renders of this session, per
    (checkpoint, device); turns a planned render into a time estimate."""

    def __init__(self) -> None:
        self._rate: dict[tuple[str, str], float] = {}

    def record(self, checkpoint: str, device: str, pixels: int, seconds_per_step: float) -> None:
        """Remember one measured step time (``pixels`` = H x W of the canvas)."""
        if pixels > 0 and seconds_per_step > 0:
            self._rate[(checkpoint, device)] = seconds_per_step / (pixels / 1e6)

    def estimate(self, checkpoint: str, device: str, pixels: int, steps: int) -> float | None:
        """Seconds a render of ``steps`` steps on ``pixels`` would take, or None if unmeasured."""
        rate = self._rate.get((checkpoint, device))
        return None if rate is None else rate * pixels / 1e6 * steps


SPEED = SpeedLog()


def render_steps(
    synth: Any,
    layout: Layout,
    params: RenderParams,
    init_image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    cancel: threading.Event | None = None,
) -> Generator[tuple[int, int], None, Sample | None]:
    """Yield ``(step, total)`` while ``synth`` (a :class:`nucsynth.synthesize.Synthesizer`)
    renders ``layout``; return the Sample, or None when ``cancel`` was set.

    By family: ``semantic`` renders the layout (every mode); ``joint`` generates image and
    nuclei from the layout's centroids and classes (mode ``render``; the Sample's layout is
    the model's); ``structure`` generates a new layout of the canvas size and renders it with
    its stage-2 image model (mode ``render``). The sample equals item 0 of ``nucsynth
    synthesize`` with the same checkpoint, layout and options.
    """
    from nucsynth.generate.layouts import points_from_labels
    from nucsynth.synthesize import Item

    family = synth.family
    if family in ("joint", "structure") and params.mode != "render":
        raise ValueError(f"a {family!r} model only supports mode 'render' (restyle and region need a semantic model)")
    if params.mode in ("restyle", "region") and init_image is None:
        raise ValueError(f"mode {params.mode!r} needs an image to start from")
    if params.mode == "region" and mask is None:
        raise ValueError("mode 'region' needs the mask of the edited region")
    opts = synth.resolve(params.options(), has_images=params.mode == "restyle")
    if family == "structure":
        item = Item(0, opts.seed, None, size=layout.shape)
    elif family == "joint":
        item = Item(0, opts.seed, points_from_labels(layout))
    else:
        item = Item(0, opts.seed, layout, init_image=init_image if params.mode != "render" else None,
                    mask=None if mask is None else mask.astype(np.float32))
    return (yield from engine_steps(lambda progress: synth.render([item], opts, progress)[0], cancel))


def render_metadata(sample: Sample, params: RenderParams, layout_name: str, family: str) -> dict[str, Any]:
    """The layer metadata of a rendered image: model, seed and every parameter."""
    prov = {k: v for k, v in sample.provenance.items() if isinstance(v, (str, int, float, bool, type(None), dict))}
    return {
        "nucsynth": {
            "role": "render",
            "layout": layout_name,
            "family": family,
            "model": prov.get("model"),
            "checkpoint": params.checkpoint,
            "checkpoint_sha256": prov.get("checkpoint_sha256"),
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
from napari_nucsynth._widgets import optional_spin, optional_value, threads_spin, with_shortcut  # noqa: E402
from nucsynth.models.base import one_pass_size  # noqa: E402
from nucsynth.threads import available_cpus  # noqa: E402


class RenderWidget(QWidget):
    """The render dock. ``job`` is the running :class:`~napari_nucsynth._jobs.Job` (None
    when idle); ``running`` tells whether one is in progress."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.job: Job | None = None
        self._rendered: dict[str, Layout] = {}  # layout name -> the layout of its last render
        self.last_error: str | None = None
        self.estimate_s: float | None = None  # the estimate shown for the next render
        root = QVBoxLayout(self)
        form = QFormLayout()
        self.ckpt_edit = QLineEdit()
        self.ckpt_edit.setToolTip("a checkpoint folder (config.json + weights); preselected: the default model")
        self.ckpt_edit.editingFinished.connect(self._describe_checkpoint)
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.ckpt_edit)
        row.addWidget(browse)
        form.addRow("Checkpoint", row)
        self.family_label = QLabel("")
        form.addRow("Family", self.family_label)
        self.device_combo = QComboBox()
        self.device_combo.setToolTip("where the engine computes: a GPU (CUDA, Apple MPS) is many times faster "
                                     "than the CPU")
        self.device_combo.currentTextChanged.connect(self._show_device)
        form.addRow("Device", self.device_combo)
        self.threads_spin = threads_spin(available_cpus())
        form.addRow("CPU threads", self.threads_spin)
        self.device_label = QLabel("")
        self.device_label.setWordWrap(True)
        form.addRow("", self.device_label)
        self.layout_combo = QComboBox()
        self.layout_combo.setToolTip("the layout to render (from the designer or a file)")
        self.layout_combo.currentTextChanged.connect(self._update_estimate)
        form.addRow("Layout", self.layout_combo)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(MODES))
        self.mode_combo.setToolTip("render: from noise; restyle: start from the image below (DiffMix); "
                                   "region: re-render only what changed since the last render")
        form.addRow("Mode", self.mode_combo)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("restyle: the RGB image partially noised to 'strength', then denoised under the layout")
        form.addRow("Restyle image", self.image_combo)
        self.steps_spin = QSpinBox(minimum=1, maximum=1000, value=_DEFAULTS["steps"])
        self.steps_spin.setToolTip("sampler steps: more is slower and (up to a point) better")
        self.steps_spin.valueChanged.connect(self._update_estimate)
        form.addRow("Steps", self.steps_spin)
        self.guidance_spin = optional_spin(0.0, 20.0, _DEFAULTS["guidance"], 0.1, "model default",
                                           "classifier-free guidance, engine convention eps_c + s (eps_c - eps_u); "
                                           "0 = off (one network pass per step instead of two); model default: "
                                           "the family's, 0 for a model that never learned the null condition")
        form.addRow("Guidance", self.guidance_spin)
        self.seed_spin = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.seed_spin.setToolTip("same seed, layout, model and settings give the same image")
        form.addRow("Seed", self.seed_spin)
        self.strength_spin = QDoubleSpinBox(minimum=0.01, maximum=1.0, value=DIFFMIX_STRENGTH, singleStep=0.05)
        self.strength_spin.setToolTip("restyle: how far the image is noised (0.55 = DiffMix)")
        form.addRow("Strength", self.strength_spin)
        self.sampler_combo = QComboBox()
        self.sampler_combo.addItems(list(SAMPLERS))
        self.sampler_combo.setCurrentText(_DEFAULTS["sampler"])
        self.sampler_combo.setToolTip("dpm++2m: few steps suffice; ddim; ancestral: the slowest")
        form.addRow("Sampler", self.sampler_combo)
        root.addLayout(form)
        self.estimate_label = QLabel("")
        self.estimate_label.setWordWrap(True)
        root.addWidget(self.estimate_label)
        row = QHBoxLayout()
        self.run_btn = QPushButton("Render")
        self.run_btn.setToolTip("render the chosen layout beside it (progress also in napari's activity panel)")
        self.run_btn.clicked.connect(self.render)
        self.region_btn = QPushButton("Re-render region")
        self.region_btn.setToolTip("re-render only what was edited since this layout's last render")
        self.region_btn.clicked.connect(self.rerender_region)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("stop the render now (also from napari's activity panel)")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        for button, keys in ((self.run_btn, "Alt+Return"), (self.region_btn, "Alt+Shift+Return"),
                             (self.cancel_btn, "Alt+Backspace")):
            with_shortcut(button, keys)
        for b in (self.run_btn, self.region_btn, self.cancel_btn):
            row.addWidget(b)
        root.addLayout(row)
        self.progress = QProgressBar()
        root.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        root.addStretch(1)
        self._fill_devices()
        self._preselect_checkpoint()
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

    def _fill_devices(self) -> None:
        self.device_combo.blockSignals(True)
        self.device_combo.addItems(available_devices())  # the engine's pick (a GPU if any) first
        self.device_combo.blockSignals(False)
        self._show_device()

    def _show_device(self, *_: Any) -> None:
        from nucsynth.device import describe_device, pick_device

        try:
            self.device_label.setText(describe_device(pick_device(self.device())))
        except ValueError as e:
            self.device_label.setText(str(e))
        self._update_estimate()

    def device(self) -> str:
        """The chosen device ("cpu", "cuda:0", "mps")."""
        return self.device_combo.currentText() or "cpu"

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Checkpoint folder", self.ckpt_edit.text())
        if path:
            self.ckpt_edit.setText(path)
            self._describe_checkpoint()

    def _checkpoint_config(self) -> dict[str, Any] | None:
        from nucsynth.checkpoint import read_config

        text = self.ckpt_edit.text().strip()
        if not text:
            return None
        try:
            return read_config(text)
        except (FileNotFoundError, ValueError):
            return None

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
        self._update_estimate()

    def _refresh_combos(self, event: Any = None) -> None:
        from napari.layers import Image

        for combo, items in (
            (self.layout_combo, [n for n in find_layout_names(self.viewer.layers) if not n.endswith(" proposal")]),
            (self.image_combo, [ly.name for ly in self.viewer.layers if isinstance(ly, Image) and ly.rgb]),
        ):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(items)
            if current in items:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self._update_estimate()

    def _layout_shape(self) -> tuple[int, int] | None:
        name = self.layout_combo.currentText()
        layer = f"{name} instances"
        if not name or layer not in self.viewer.layers:
            return None
        return tuple(self.viewer.layers[layer].data.shape[-2:])  # type: ignore[return-value]

    def _update_estimate(self, *_: Any) -> None:
        """Size and time of the planned render, from the speed measured on this device."""
        shape = self._layout_shape()
        cfg = self._checkpoint_config()
        if shape is None or cfg is None:
            self.estimate_label.setText("")
            self.estimate_s = None
            return
        h, w = shape
        model = cfg.get("model", {})
        lines = []
        if model.get("image_size"):
            one = one_pass_size(int(model["image_size"]), model.get("latent"))
            if h > one or w > one:
                lines.append(f"the model renders up to {one} x {one} px in one pass; this {h} x {w} layout goes "
                             f"through overlapping windows (at least {h * w / one ** 2:.1f}x the work per step)")
        est = SPEED.estimate(self.ckpt_edit.text().strip(), self.device(), h * w, self.steps_spin.value())
        self.estimate_s = est
        if est is None:
            lines.append(f"{h} x {w} px, {self.steps_spin.value()} steps: the time is measured on the first step")
        else:
            long = est > LONG_RENDER_S
            lines.append(f"{h} x {w} px, {self.steps_spin.value()} steps: about {_duration(est)} on {self.device()}"
                         + (" - long: fewer steps, a smaller layout or a GPU would be faster" if long else ""))
        self.estimate_label.setText("; ".join(lines))

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        """Whether a render is in progress."""
        return self.job is not None and self.job.running

    @property
    def worker(self) -> Any:
        """The running thread worker (None when idle)."""
        return self.job.worker if self.running else None

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
            guidance=optional_value(self.guidance_spin),
            seed=self.seed_spin.value(),
            strength=self.strength_spin.value(),
            sampler=self.sampler_combo.currentText(),
            threads=self.threads_spin.value(),
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
        """Stop the running render now; the dock is idle when this returns."""
        if self.job is not None:
            self.job.cancel()

    def _start(self, params: RenderParams) -> None:
        if self.running:
            return
        try:
            ctrl, layout, init, mask = self._prepare(params)
        except (FileNotFoundError, ValueError) as e:
            self._tell(str(e), error=True)
            return
        self._update_estimate()
        self.progress.setRange(0, params.steps)
        self.progress.setValue(0)
        clock = {"t0": time.perf_counter(), "first": None}
        device = self.device()
        self.job = Job(
            f"Rendering {ctrl.name!r}",
            on_done=lambda result: self._on_done(result, ctrl, layout, params),
            on_error=self._on_error,
            on_progress=lambda item: self._on_progress(item, clock, params, layout, device),
            on_end=self._on_end,
            total=params.steps,
        )
        self._set_running(True)
        msg = f"rendering {ctrl.name!r} ({params.mode}, {params.steps} steps, seed {params.seed})"
        if self.estimate_s is not None:
            msg += f", about {_duration(self.estimate_s)}"
            if self.estimate_s > LONG_RENDER_S:
                self._tell(f"this render will take about {_duration(self.estimate_s)} on {device}; Cancel stops it")
        self.status.setText(msg + "...")
        self.job.start(self._job, params, layout, init, mask, device, self.job.cancel_event)

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
        problems = ctrl.problems()
        if problems:
            raise ValueError(f"layout {name!r}: {', '.join(problems)}; repair it in the Layout designer first")
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
    def _job(params: RenderParams, layout: Layout, init: Any, mask: Any, device: str, cancel: threading.Event):
        """Worker body: load the checkpoint (cached by the engine), then render step by step."""
        from nucsynth.synthesize import get_synthesizer
        from nucsynth.threads import set_threads

        yield (0, params.steps)
        set_threads(params.threads or None)
        synth = get_synthesizer(params.checkpoint, device)
        made = yield from render_steps(synth, layout, params, init, mask, cancel)
        return None if made is None else (made, synth.family)

    # ------------------------------------------------------------------ worker handlers (main thread)
    def _on_progress(self, item: tuple[int, int], clock: dict[str, Any], params: RenderParams, layout: Layout,
                     device: str) -> None:
        i, n = item
        self.progress.setRange(0, n)
        self.progress.setValue(i)
        now = time.perf_counter()
        if i == 0:
            clock["t0"] = now  # the model is loaded: steps start now
            return
        per_step = (now - clock["t0"]) / i
        SPEED.record(params.checkpoint, device, layout.shape[0] * layout.shape[1], per_step)
        self.status.setText(f"rendering: step {i}/{n}, about {_duration(per_step * (n - i))} left")

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
        self._update_estimate()

    def _on_error(self, exc: BaseException) -> None:
        self._tell(f"render failed: {exc}", error=True)

    def _on_end(self) -> None:
        if self.job is not None and self.job.cancelled:
            self.status.setText("render cancelled")
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.run_btn.setEnabled(not running)
        self.region_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        self.device_combo.setEnabled(not running)


def _duration(seconds: float) -> str:
    """'45 s', '3.5 min' or '1.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
