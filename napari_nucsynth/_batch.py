"""Batch dock: synthesize a dataset into a zarr store, resumably, with progress and cancel.

Everything but the widgets is ``nucsynth.synthesize``, the engine behind ``nucsynth
synthesize``: layouts come from a source (``nucsynth.io.sources.read_layout_source``: a
NucSynth store or any file/folder ``nucsynth.io`` reads) or from the layout generator
(``nucsynth.generate.layouts.random_layout``, seed + i per layout, drawn from the layout
statistics beside the checkpoint, else the built-in CoNSeP ones); the options (mode
``layout`` / ``balance`` / ``enlarge``, steps, guidance, ...) and their defaults are
:class:`nucsynth.synthesize.SynthesisOptions`; :class:`nucsynth.synthesize.SynthesisJob`
renders in batches into a hidden partial store, so a cancelled or killed run continues
where it stopped when run again with the same settings (other settings are refused,
naming the difference), and gives the same samples as an uninterrupted run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

from napari_nucsynth._jobs import Job, engine_steps
from nucsynth.synthesize import MODES as BATCH_MODES
from nucsynth.synthesize import SAMPLERS, SynthesisOptions, option_fields

__all__ = ["BatchParams", "batch_steps", "BatchWidget", "SOURCES", "BATCH_MODES"]

SOURCES = ("generator", "store or file")
_DEFAULTS = {f.name: f.default for f in option_fields()}


@dataclass
class BatchParams:
    """What a batch needs besides the synthesis options: checkpoint, output, layout source."""

    checkpoint: str
    out: str
    source: str = "generator"
    source_path: str = ""
    count: int = 8
    size: int = 256
    density: float | None = None  # nuclei per 256 px; None: the median of the model's layout statistics
    options: SynthesisOptions = field(default_factory=SynthesisOptions)
    threads: int = 0  # CPU threads; 0 = the engine's policy

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = automatic), got {self.threads}")
        for name in ("count", "size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.checkpoint:
            raise ValueError("choose a checkpoint folder (no default model is installed)")
        if not self.out:
            raise ValueError("choose an output store path (.zarr)")
        if self.source != "generator" and not self.source_path:
            raise ValueError("choose a source store or file, or use the generator")


def batch_steps(
    params: BatchParams, cancel: threading.Event | None = None
) -> Generator[tuple[int, int], None, dict[str, Any] | None]:
    """Yield ``(done, 1000)`` (thousandths of the job) while synthesizing; return a summary
    ({"written", "skipped", "total", "out", "notes", "class_counts", "class_names"}), or None
    if cancelled (what was rendered stays in the partial store; run again to continue)."""
    from nucsynth.io.store import DatasetStore
    from nucsynth.synthesize import SynthesisJob, get_synthesizer, plan_items
    from nucsynth.threads import set_threads

    cancel = cancel or threading.Event()
    set_threads(params.threads or None)
    synth = get_synthesizer(params.checkpoint)
    cs = synth.class_set
    opts = params.options
    if synth.family == "structure":
        source, has_images = None, False
    elif params.source == "generator":
        from nucsynth.generate.layouts import random_layout

        stats, stats_origin = synth.layout_stats  # beside the checkpoint, else CoNSeP
        source = [random_layout((params.size, params.size), class_set=cs, density=params.density, seed=opts.seed + i,
                                stats=stats) for i in range(params.count)]
        has_images = False
    else:
        from nucsynth.io.sources import read_layout_source

        source = read_layout_source(params.source_path, limit=params.count)
        has_images = all(getattr(e, "image", None) is not None for e in source.items)
    opts = synth.resolve(opts, has_images=has_images)
    if synth.family == "structure":
        items = plan_items(synth, opts, count=params.count, size=(params.size, params.size))
    else:
        items = plan_items(synth, opts, source)
        if params.source == "generator":
            for it in items:
                it.provenance.update(layout_generator="random_layout", layout_stats=stats_origin)
    job = SynthesisJob(synth, items, opts, params.out, attrs={"written_by": "napari-nucsynth"})

    def call(progress: Any) -> Any:
        return job.run(progress=lambda p: progress(int(1000 * p.fraction), 1000), cancel=cancel)

    result = yield from engine_steps(call, cancel)
    if result is None or result.cancelled:
        return None
    store = DatasetStore.open(result.out)
    counts = store.class_counts().tolist()
    store.close()
    return {"written": result.written, "skipped": result.skipped, "total": result.total, "out": str(result.out),
            "notes": list(result.notes), "class_counts": counts, "class_names": ["unknown", *cs.names]}


# ---------------------------------------------------------------------- the dock
from qtpy.QtWidgets import (  # noqa: E402  (the engine part above is usable without Qt)
    QComboBox,
    QDoubleSpinBox,
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

from napari_nucsynth._widgets import optional_spin, optional_value, threads_spin  # noqa: E402
from nucsynth.threads import available_cpus  # noqa: E402


class BatchWidget(QWidget):
    """The batch dock. ``job`` is the running :class:`~napari_nucsynth._jobs.Job` (None when
    idle); the option widgets start at the engine's defaults (``SynthesisOptions``)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.job: Job | None = None
        self.summary: dict[str, Any] | None = None
        self.last_error: str | None = None
        helps = {f.name: f.metadata["help"] for f in option_fields()}
        root = QVBoxLayout(self)
        form = QFormLayout()
        self.ckpt_edit = QLineEdit()
        self.ckpt_edit.setToolTip("a checkpoint folder; preselected: the default model")
        form.addRow("Checkpoint", self.ckpt_edit)
        self.source_combo = QComboBox()
        self.source_combo.addItems(list(SOURCES))
        self.source_combo.setToolTip("random layouts from the generator, or the layouts of a store / dataset")
        form.addRow("Layouts from", self.source_combo)
        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("a .zarr store, a CoNSeP folder, MoNuSeg XML, ...")
        form.addRow("Source path", self.source_edit)
        self.count_spin = QSpinBox(minimum=1, maximum=1_000_000, value=8)
        self.count_spin.setToolTip("samples to make (the first N of a source)")
        form.addRow("Samples (N)", self.count_spin)
        self.size_spin = QSpinBox(minimum=16, maximum=4096, value=256)
        form.addRow("Generator size (px)", self.size_spin)
        self.density_spin = optional_spin(0.0, 1000.0, None, 1.0, "model's statistics",
                                          "nuclei per 256 x 256 px; lowest: the median of the layout statistics "
                                          "beside the checkpoint (layout_stats.json), else CoNSeP's 38.5")
        form.addRow("Generator density", self.density_spin)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(BATCH_MODES))
        self.mode_combo.setCurrentText(_DEFAULTS["mode"])
        self.mode_combo.setToolTip(helps["mode"])
        form.addRow("Mode", self.mode_combo)
        self.target_spin = optional_spin(0.0, 1.0, _DEFAULTS["target_share"], 0.05, "as many as fit",
                                         helps["target_share"])
        form.addRow("Balance: rare target share", self.target_spin)
        self.steps_spin = QSpinBox(minimum=1, maximum=1000, value=_DEFAULTS["steps"])
        self.steps_spin.setToolTip(helps["steps"])
        form.addRow("Steps", self.steps_spin)
        self.guidance_spin = optional_spin(0.0, 20.0, _DEFAULTS["guidance"], 0.1, "model default", helps["guidance"])
        form.addRow("Guidance", self.guidance_spin)
        self.seed_spin = QSpinBox(minimum=0, maximum=2**31 - 1, value=_DEFAULTS["seed"])
        self.seed_spin.setToolTip(helps["seed"])
        form.addRow("Seed", self.seed_spin)
        self.strength_spin = optional_spin(0.01, 1.0, _DEFAULTS["strength"], 0.05, "default", helps["strength"])
        form.addRow("Strength", self.strength_spin)
        self.sampler_combo = QComboBox()
        self.sampler_combo.addItems(list(SAMPLERS))
        self.sampler_combo.setCurrentText(_DEFAULTS["sampler"])
        self.sampler_combo.setToolTip(helps["sampler"])
        form.addRow("Sampler", self.sampler_combo)
        self.batch_spin = QSpinBox(minimum=1, maximum=256, value=_DEFAULTS["batch_size"])
        self.batch_spin.setToolTip(helps["batch_size"])
        form.addRow("Batch size", self.batch_spin)
        self.threads_spin = threads_spin(available_cpus())
        form.addRow("CPU threads", self.threads_spin)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("output store, e.g. synthetic.zarr")
        self.out_edit.setToolTip("the store to write; running again with the same settings continues a stopped run")
        form.addRow("Output store", self.out_edit)
        root.addLayout(form)
        row = QHBoxLayout()
        self.run_btn = QPushButton("Run batch")
        self.run_btn.setToolTip("synthesize into the output store (progress also in napari's activity panel)")
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("stop now; what was rendered is kept and the same run continues from it")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.run_btn)
        row.addWidget(self.cancel_btn)
        root.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        root.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        root.addStretch(1)
        self._preselect_checkpoint()

    def _preselect_checkpoint(self) -> None:
        from nucsynth.checkpoint import resolve_checkpoint

        try:
            self.ckpt_edit.setText(str(resolve_checkpoint(None)))
        except (FileNotFoundError, ValueError):
            self.ckpt_edit.setPlaceholderText("no default model installed: a checkpoint folder")

    @property
    def running(self) -> bool:
        """Whether a batch is in progress."""
        return self.job is not None and self.job.running

    def options(self) -> SynthesisOptions:
        """The synthesis options as set in the dock (unset ones: the engine's defaults)."""
        return SynthesisOptions(
            steps=self.steps_spin.value(), sampler=self.sampler_combo.currentText(),
            guidance=optional_value(self.guidance_spin), seed=self.seed_spin.value(),
            batch_size=self.batch_spin.value(), mode=self.mode_combo.currentText(),
            strength=optional_value(self.strength_spin), target_share=optional_value(self.target_spin),
        )

    def params(self) -> BatchParams:
        """The batch as set in the dock."""
        return BatchParams(
            checkpoint=self.ckpt_edit.text().strip(), out=self.out_edit.text().strip(),
            source=self.source_combo.currentText(), source_path=self.source_edit.text().strip(),
            count=self.count_spin.value(), size=self.size_spin.value(), density=optional_value(self.density_spin),
            options=self.options(), threads=self.threads_spin.value(),
        )

    def _tell(self, text: str, error: bool = False) -> None:
        from napari.utils.notifications import show_error, show_info

        self.status.setText(text)
        if error:
            self.last_error = text
        (show_error if error else show_info)(text)

    def run(self) -> None:
        """Start the batch (the Run button)."""
        if self.running:
            return
        try:
            params = self.params()
            from nucsynth.checkpoint import read_config

            read_config(params.checkpoint)
        except (FileNotFoundError, FileExistsError, ValueError) as e:
            self._tell(str(e), error=True)
            return
        self.summary = None
        self.job = Job(f"Batch into {Path(params.out).name}", on_done=self._on_done,
                       on_error=lambda e: self._tell(f"batch failed: {e}", error=True),
                       on_progress=lambda item: self.progress.setValue(item[0]), on_end=self._on_end, total=1000)
        self._set_running(True)
        self.status.setText(f"synthesizing {params.count} samples into {params.out}...")
        self.job.start(batch_steps, params, self.job.cancel_event)

    def cancel(self) -> None:
        """Stop now (what is written stays; run again with the same settings to continue)."""
        if self.job is not None:
            self.job.cancel()

    def _on_done(self, summary: dict[str, Any] | None) -> None:
        if summary is None:
            self.status.setText("batch cancelled; run again to continue")
            return
        self.summary = summary
        per_class = ", ".join(f"{n} {c}" for n, c in zip(summary["class_names"], summary["class_counts"]) if c)
        self.progress.setValue(1000)
        notes = f" ({'; '.join(summary['notes'])})" if summary["notes"] else ""
        self.status.setText(
            f"{summary['out']}: {summary['total']} samples ({summary['written']} new, {summary['skipped']} already "
            f"there). Nuclei per class: {per_class or 'none'}{notes}"
        )

    def _on_end(self) -> None:
        if self.job is not None and self.job.cancelled:
            self.status.setText("batch cancelled; run again with the same settings to continue")
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.run_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
