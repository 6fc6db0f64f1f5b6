"""Batch dock: synthesize a dataset into a zarr store, resumably, with progress and cancel.

Layouts come from a source (a NucSynth store or any file/folder ``nucsynth.io`` reads) or
from the layout generator (``nucsynth.generate.layouts.random_layout``, seed + i per
layout). The mode is the one of ``nucsynth synthesize``: ``layout`` (as they are),
``balance`` or ``enlarge`` (DiffMix maps, ``nucsynth.edit``), rendered from the source's real
image partially noised to ``strength`` when the source has images.

Resuming: the output store is appended batch by batch (the store commits its patch count
last, so a crash loses at most the batch in flight); running again with the same settings
skips the patches already there. Batch ``b`` (patches ``b*B .. b*B+B-1``) is rendered with
seed ``seed + b*B``, so a resumed run gives the same patches as an uninterrupted one.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from napari_nucsynth._jobs import engine_steps
from napari_nucsynth._render import SAMPLERS, load_model
from nucsynth.layout import Layout, Sample

__all__ = ["BatchParams", "batch_steps", "BatchWidget", "SOURCES", "BATCH_MODES"]

SOURCES = ("generator", "store or file")
BATCH_MODES = ("layout", "balance", "enlarge")
SETTINGS_KEY = "batch_settings"  # store attribute holding the settings a store was made with


@dataclass
class BatchParams:
    """Everything that defines a batch (stored in the output store to check resumes)."""

    checkpoint: str
    out: str
    source: str = "generator"
    source_path: str = ""
    count: int = 8
    size: int = 256
    density: float = 38.5
    mode: str = "layout"
    steps: int = 20
    guidance: float = 0.5
    seed: int = 0
    strength: float = 0.55
    sampler: str = "dpm++2m"
    batch_size: int = 4
    target_share: float = 0.2
    enlarge_fraction: float = 0.5
    max_shift: int = 3

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.mode not in BATCH_MODES:
            raise ValueError(f"mode must be one of {BATCH_MODES}, got {self.mode!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name in ("count", "steps", "batch_size", "size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if not self.checkpoint:
            raise ValueError("choose a checkpoint folder (no default model is installed)")
        if not self.out:
            raise ValueError("choose an output store path (.zarr)")
        if self.source != "generator" and not self.source_path:
            raise ValueError("choose a source store or file, or use the generator")

    def settings(self) -> dict[str, Any]:
        """The settings that must match for a resume (everything but the count)."""
        d = asdict(self)
        d.pop("count")
        d.pop("out")
        return d


def _source_samples(params: BatchParams, class_set: Any) -> list[Sample] | list[Layout]:
    """The first ``count`` source samples (with images) or generated layouts."""
    if params.source == "generator":
        from nucsynth.generate.layouts import random_layout

        return [random_layout((params.size, params.size), class_set=class_set, density=params.density,
                              seed=params.seed + i) for i in range(params.count)]
    from nucsynth.io import read_source
    from nucsynth.io.store import DatasetStore

    path = Path(params.source_path)
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    try:
        store = DatasetStore.open(path)
    except (ValueError, OSError):
        store = None
    if store is not None:
        return [store[i] for i in range(min(params.count, len(store)))]
    return read_source(path)[: params.count]


def _edited(layouts: Sequence[Layout], params: BatchParams) -> list[Layout]:
    """The layouts to render for the mode (one per source layout, deterministic)."""
    if params.mode == "layout":
        return list(layouts)
    if params.mode == "enlarge":
        from nucsynth.edit.enlarge import enlarge_layout

        return [enlarge_layout(lay, fraction=params.enlarge_fraction, max_shift=params.max_shift, seed=params.seed + i)
                for i, lay in enumerate(layouts)]
    from nucsynth.edit.balance import balance_dataset

    from napari_nucsynth._designer import rare_pool

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-patch shortfalls are normal; the summary shows the result
        out, _ = balance_dataset(list(layouts), rare_pool=rare_pool(list(layouts), seed=params.seed),
                                 target_share=params.target_share, seed=params.seed)
    return out


def _open_output(params: BatchParams, class_set: Any) -> Any:
    """The output store: created, or reopened for a resume when its settings match."""
    from nucsynth.io.store import DatasetStore

    from napari_nucsynth._reader import format_of

    out = Path(params.out)
    if not out.exists():
        return DatasetStore.create(out, class_set, attrs={SETTINGS_KEY: params.settings()})
    if format_of(out) != "store":
        raise FileExistsError(f"{out} exists and is not a NucSynth dataset store; choose another output path")
    store = DatasetStore.open(out, class_set, mode="a")
    made_with = store.attrs.get(SETTINGS_KEY)
    if made_with != params.settings():
        diff = sorted(k for k in params.settings() if (made_with or {}).get(k) != params.settings()[k])
        raise ValueError(f"{out} was made with other settings ({', '.join(diff)} differ); "
                         "resume with the same settings or choose another output path")
    return store


def batch_steps(
    params: BatchParams, cancel: threading.Event | None = None
) -> Generator[tuple[int, int], None, dict[str, Any] | None]:
    """Yield ``(done, total)`` in thousandths while synthesizing; return a summary
    ({"written", "skipped", "class_counts", "class_names", "out"}), or None if cancelled."""
    cancel = cancel or threading.Event()
    model = load_model(params.checkpoint)
    if not hasattr(model, "sample"):
        raise ValueError(f"checkpoint {params.checkpoint} holds a {model.name!r} model, which does not render layouts")
    cs = model.class_set
    source = _source_samples(params, cs)
    if not source:
        raise ValueError(f"source {params.source_path or 'generator'} gave no layouts")
    src_layouts = [s.layout if isinstance(s, Sample) else s for s in source]
    bad = [i for i, lay in enumerate(src_layouts) if lay.class_set != cs]
    if bad:
        raise ValueError(f"source layouts {bad[:5]} use class set {src_layouts[bad[0]].class_set.name!r}; "
                         f"the model renders {cs.name!r}")
    layouts = _edited(src_layouts, params)
    images = [s.image if isinstance(s, Sample) else None for s in source]
    use_init = params.mode != "layout" and all(im is not None for im in images)
    store = _open_output(params, cs)
    total, start0 = len(layouts), len(store)
    yield (int(1000 * start0 / total), 1000)
    for start in range(start0, total, params.batch_size):
        stop = min(start + params.batch_size, total)
        batch = layouts[start:stop]
        kwargs: dict[str, Any] = {}
        if use_init:
            kwargs = {"init_image": images[start:stop], "strength": params.strength}

        def call(progress: Any, batch: list[Layout] = batch, start: int = start, kwargs: dict = kwargs) -> Any:
            return model.sample(batch, steps=params.steps, guidance=params.guidance, seed=params.seed + start,
                                sampler=params.sampler, progress=progress, **kwargs)

        steps = engine_steps(call, cancel)
        try:
            while True:
                i, n = next(steps)
                yield (int(1000 * (start + (stop - start) * i / max(n, 1)) / total), 1000)
        except StopIteration as done:
            out = done.value
        if out is None:
            return None
        store.append([Sample(o.layout, o.image, {**o.provenance, "mode": params.mode, "index": start + j})
                      for j, o in enumerate(out)], splits="synthetic")
        yield (int(1000 * stop / total), 1000)
    counts = np.asarray(store.class_counts())
    return {"written": total - start0, "skipped": start0, "total": len(store), "out": str(store.path),
            "class_counts": counts.tolist(), "class_names": ["unknown", *cs.names]}


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


class BatchWidget(QWidget):
    """The batch dock. ``worker`` is the running thread worker (None when idle)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self._cancel: threading.Event | None = None
        self.summary: dict[str, Any] | None = None
        self.last_error: str | None = None
        root = QVBoxLayout(self)
        form = QFormLayout()
        self.ckpt_edit = QLineEdit()
        form.addRow("Checkpoint", self.ckpt_edit)
        self.source_combo = QComboBox()
        self.source_combo.addItems(list(SOURCES))
        form.addRow("Layouts from", self.source_combo)
        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("a .zarr store, a CoNSeP folder, MoNuSeg XML, ...")
        form.addRow("Source path", self.source_edit)
        self.count_spin = QSpinBox(minimum=1, maximum=1_000_000, value=8)
        form.addRow("Samples (N)", self.count_spin)
        self.size_spin = QSpinBox(minimum=16, maximum=4096, value=256)
        form.addRow("Generator size (px)", self.size_spin)
        self.density_spin = QDoubleSpinBox(minimum=0.0, maximum=1000.0, value=38.5, decimals=1)
        form.addRow("Generator density", self.density_spin)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(BATCH_MODES))
        form.addRow("Mode", self.mode_combo)
        self.target_spin = QDoubleSpinBox(minimum=0.0, maximum=1.0, value=0.2, singleStep=0.05)
        form.addRow("Balance: rare target share", self.target_spin)
        self.steps_spin = QSpinBox(minimum=1, maximum=1000, value=20)
        form.addRow("Steps", self.steps_spin)
        self.guidance_spin = QDoubleSpinBox(minimum=0.0, maximum=20.0, value=0.5, singleStep=0.1)
        form.addRow("Guidance", self.guidance_spin)
        self.seed_spin = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        form.addRow("Seed", self.seed_spin)
        self.strength_spin = QDoubleSpinBox(minimum=0.01, maximum=1.0, value=0.55, singleStep=0.05)
        form.addRow("Strength", self.strength_spin)
        self.batch_spin = QSpinBox(minimum=1, maximum=256, value=4)
        form.addRow("Batch size", self.batch_spin)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("output store, e.g. synthetic.zarr")
        form.addRow("Output store", self.out_edit)
        root.addLayout(form)
        row = QHBoxLayout()
        self.run_btn = QPushButton("Run batch")
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel")
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
        return self.worker is not None

    def params(self) -> BatchParams:
        """The batch as set in the dock."""
        return BatchParams(
            checkpoint=self.ckpt_edit.text().strip(), out=self.out_edit.text().strip(),
            source=self.source_combo.currentText(), source_path=self.source_edit.text().strip(),
            count=self.count_spin.value(), size=self.size_spin.value(), density=self.density_spin.value(),
            mode=self.mode_combo.currentText(), steps=self.steps_spin.value(), guidance=self.guidance_spin.value(),
            seed=self.seed_spin.value(), strength=self.strength_spin.value(), batch_size=self.batch_spin.value(),
            target_share=self.target_spin.value(),
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

            from napari_nucsynth._reader import format_of

            read_config(params.checkpoint)
            if Path(params.out).exists() and format_of(params.out) != "store":
                raise FileExistsError(f"{params.out} exists and is not a NucSynth dataset store; choose another output path")
        except (FileNotFoundError, FileExistsError, ValueError) as e:
            self._tell(str(e), error=True)
            return
        from napari.qt.threading import create_worker

        self.summary = None
        self._cancel = threading.Event()
        worker = create_worker(batch_steps, params, self._cancel, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(lambda item: self.progress.setValue(item[0]))
        worker.returned.connect(self._on_done)
        worker.errored.connect(lambda e: self._tell(f"batch failed: {e}", error=True))
        worker.aborted.connect(lambda: self.status.setText("batch cancelled; run again to resume"))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_running(True)
        self.status.setText(f"synthesizing {params.count} samples into {params.out}...")
        worker.start()

    def cancel(self) -> None:
        """Stop after the current sampler step (what is written stays; run again to resume)."""
        if self._cancel is not None:
            self._cancel.set()
        if self.worker is not None:
            self.worker.quit()

    def _on_done(self, summary: dict[str, Any] | None) -> None:
        if summary is None:
            self.status.setText("batch cancelled; run again to resume")
            return
        self.summary = summary
        per_class = ", ".join(f"{n} {c}" for n, c in zip(summary["class_names"], summary["class_counts"]) if c)
        self.progress.setValue(1000)
        self.status.setText(
            f"{summary['out']}: {summary['total']} samples ({summary['written']} new, {summary['skipped']} already "
            f"there). Nuclei per class: {per_class or 'none'}"
        )

    def _on_finished(self) -> None:
        self.worker = None
        self._cancel = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.run_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
