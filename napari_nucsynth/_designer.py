"""Designer dock: make and edit nuclei layouts, watch and fix the class balance.

Every computation is a call into the engine (``nucsynth.generate`` and ``nucsynth.edit``);
the layers are handled by :class:`napari_nucsynth._layers.LayoutLayers`. Results of the
DiffMix editors (Balance, Enlarge) and of the random generator (when the canvas already
holds nuclei) arrive as a *proposal*: a new set of layers beside the layout that the user
keeps (it replaces the layout) or discards.
"""

from __future__ import annotations

import warnings
from functools import wraps
from typing import Any, Callable

import numpy as np
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QProgressBar,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_nucsynth._bars import ClassBars
from napari_nucsynth._jobs import Job
from napari_nucsynth._layers import (
    LayoutLayers,
    adopt_renamed,
    broken_layouts,
    class_names,
    find_layout_names,
    free_origin,
    layers_to_layout,
    remove_layers,
    role_of,
)
from napari_nucsynth._widgets import with_shortcut
from nucsynth.layout import (
    CONSEP_CLASSES,
    LIZARD_CLASSES,
    NUCLEUS_CLASSES,
    PANNUKE_CLASSES,
    ClassSet,
    Layout,
    relabel_contiguous,
)

__all__ = ["DesignerWidget", "CLASS_SETS", "PROPOSAL", "proposal_summary"]

CLASS_SETS: dict[str, ClassSet] = {cs.name: cs for cs in (CONSEP_CLASSES, PANNUKE_CLASSES, LIZARD_CLASSES, NUCLEUS_CLASSES)}
PROPOSAL = "proposal"  # suffix of the layout name of a pending proposal
GAP = 16.0  # px between layouts placed side by side


def proposal_summary(before: Layout, after: Layout) -> str:
    """One line: nuclei per class of ``after`` with their change from ``before``."""
    b, a = before.class_counts(), after.class_counts()
    total = max(int(a.sum()), 1)
    parts = []
    for k, name in enumerate(class_names(after.class_set)):
        if k == 0 and a[0] == 0 and b[0] == 0:
            continue
        d = int(a[k]) - int(b[k])
        parts.append(f"{name} {int(a[k])} ({a[k] / total:.0%}{f', {d:+d}' if d else ''})")
    return ", ".join(parts)


def _balance_message(report: Any, class_set: ClassSet) -> str:
    """What a balancing run achieved, in the dock's own terms."""
    rare = class_set.names[report.rare_class - 1]
    want = "as many as fit" if report.target_share is None else f"target {report.target_share:.0%}"
    txt = (f"balanced: {rare} {report.rare_before} -> {report.rare_after} of {report.num_nuclei} nuclei "
           f"({report.share_before:.0%} -> {report.share_after:.0%}, {want})")
    if not report.reached:
        txt += (f". Target not reached ({report.no_fit} nuclei had no {rare} shape small enough, "
                f"{report.candidates} were away from the border): raise 'Balance: share picked', lower "
                f"'Balance: border (px)', or open more layouts with small {rare} nuclei (their shapes join the pool)")
    return txt


def _notify_errors(method: Callable) -> Callable:
    """Run a button action; a bad input becomes a napari notification, not a traceback."""

    @wraps(method)
    def run(self: "DesignerWidget", *args: Any) -> Any:
        try:
            return method(self)
        except (ValueError, FileNotFoundError) as e:
            self._tell(str(e), error=True)
            return None

    return run


class DesignerWidget(QWidget):
    """The layout designer dock.

    Long actions (Random layout, Points from labels, Nuclei from points, Balance, Enlarge)
    run in a worker (:class:`napari_nucsynth._jobs.Job`): a progress bar in napari's
    activity panel, a busy cursor, the action buttons disabled until the result is shown.
    ``busy`` tells whether one is running.
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.ctrl: LayoutLayers | None = None
        self.proposal: LayoutLayers | None = None
        self.job: Job | None = None
        self._targets: dict[str, list[float]] = {}
        self._stats: Any = None  # LayoutStats of the generator; None = the built-in CoNSeP ones
        self._wanted_visible: dict[Any, bool] = {}  # layer -> visibility still to apply (see _set_visible)
        self._toggling = False
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        inner = QWidget()
        scroll.setWidget(inner)
        outer.addWidget(scroll)
        root = QVBoxLayout(inner)  # scrolls instead of squeezing on short screens
        root.addWidget(self._layout_group())
        root.addWidget(self._palette_group())
        root.addWidget(self._generate_group())
        root.addWidget(self._balance_group())
        self.busy_bar = QProgressBar()
        self.busy_bar.setRange(0, 0)  # an indeterminate bar while a worker runs
        self.busy_bar.setVisible(False)
        root.addWidget(self.busy_bar)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        root.addStretch(1)
        self._bind_shortcuts()
        self._action_buttons = [self.new_btn, self.from_image_btn, self.random_btn, self.points_btn,
                                self.nuclei_btn, self.balance_btn, self.enlarge_btn, self.keep_btn,
                                self.discard_btn, self.undo_btn, self.redo_btn, self.repair_btn]
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._check_layers)
        self._on_layers_changed()

    # ------------------------------------------------------------------ building the UI
    def _layout_group(self) -> QGroupBox:
        box = QGroupBox("Layout")
        form = QFormLayout(box)
        self.layout_combo = QComboBox()
        self.layout_combo.setToolTip("the layout this dock edits (layouts opened from files appear here too)")
        self.layout_combo.currentTextChanged.connect(self._on_layout_chosen)
        form.addRow("Edit", self.layout_combo)
        row = QHBoxLayout()
        self.undo_btn = QPushButton("Undo")
        self.undo_btn.setToolTip("undo the last edit of the layout: instances, classes and centroids together "
                                 "(Ctrl+Z on any of its layers)")
        self.undo_btn.clicked.connect(self.undo)
        self.redo_btn = QPushButton("Redo")
        self.redo_btn.setToolTip("redo the last undone edit (Ctrl+Shift+Z on any of the layout's layers)")
        self.redo_btn.clicked.connect(self.redo)
        self.repair_btn = QPushButton("Repair layers")
        self.repair_btn.setToolTip("rebuild a layout whose instances, classes or centroids layer was deleted or "
                                   "renamed, from the layers that are left")
        self.repair_btn.clicked.connect(self.repair)
        for b in (self.undo_btn, self.redo_btn, self.repair_btn):
            row.addWidget(b)
        form.addRow(row)
        self.name_edit = QLineEdit("design")
        self.name_edit.setToolTip("base name of the next new layout (its layers are '<name> instances', ...)")
        form.addRow("New name", self.name_edit)
        size = QHBoxLayout()
        self.height_spin = QSpinBox(minimum=16, maximum=8192, value=256)
        self.width_spin = QSpinBox(minimum=16, maximum=8192, value=256)
        for spin in (self.height_spin, self.width_spin):
            spin.setToolTip("canvas size of a new layout, in pixels")
        size.addWidget(self.height_spin)
        size.addWidget(QLabel("x"))
        size.addWidget(self.width_spin)
        form.addRow("Size (H x W)", size)
        self.class_set_combo = QComboBox()
        self.class_set_combo.addItems(list(CLASS_SETS))
        self.class_set_combo.setToolTip("the classes of a new layout (a model renders the class set it was trained on)")
        form.addRow("Class set", self.class_set_combo)
        self.new_btn = QPushButton("New empty canvas")
        self.new_btn.setToolTip("an empty layout of the size and class set above, placed beside the open layers")
        self.new_btn.clicked.connect(self.new_canvas)
        form.addRow(self.new_btn)
        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        form.addRow("Image", self.image_combo)
        form.addRow("Its labels", self.labels_combo)
        self.from_image_btn = QPushButton("Start from image")
        self.from_image_btn.setToolTip("a layout over the chosen image; the chosen labels layer (if any) gives its nuclei")
        self.from_image_btn.clicked.connect(self.start_from_image)
        form.addRow(self.from_image_btn)
        row = QHBoxLayout()
        self.patch_spin = QSpinBox(minimum=0, maximum=10_000_000, value=0)
        self.patch_spin.setToolTip("the patch of the opened multi-patch store or dataset (follows its slider)")
        self.open_patch_btn = QPushButton("Open patch for editing")
        self.open_patch_btn.setToolTip("an editable layout (with its image) of this patch of the opened store or "
                                       "dataset, placed beside the open layers")
        self.open_patch_btn.clicked.connect(self.open_patch)
        row.addWidget(self.patch_spin)
        row.addWidget(self.open_patch_btn)
        form.addRow("Patch", row)
        self.viewer.dims.events.current_step.connect(self._follow_slider)
        return box

    def _palette_group(self) -> QGroupBox:
        box = QGroupBox("Class palette")
        v = QVBoxLayout(box)
        self.palette = QWidget()
        self.palette_grid = QGridLayout(self.palette)
        self.palette_group = QButtonGroup(self)
        self.palette_group.setExclusive(True)
        self.palette_group.idClicked.connect(self._on_class_clicked)
        v.addWidget(self.palette)
        row = QHBoxLayout()
        self.paint_btn = QPushButton("Paint new nucleus")
        self.paint_btn.setToolTip("paint mode on the instances layer with a fresh id, in the selected class")
        self.paint_btn.clicked.connect(self.paint_new_nucleus)
        self.point_btn = QPushButton("Place points")
        self.point_btn.setToolTip("add mode on the centroids layer: each click adds a nucleus (a point, no pixels yet)")
        self.point_btn.clicked.connect(self.place_points)
        self.assign_btn = QPushButton("Class -> selected points")
        self.assign_btn.setToolTip("give the nuclei of the selected centroid points the selected class")
        self.assign_btn.clicked.connect(self.assign_selected)
        for b in (self.paint_btn, self.point_btn, self.assign_btn):
            row.addWidget(b)
        v.addLayout(row)
        self.stroke_check = QCheckBox("each stroke paints a new nucleus")
        self.stroke_check.setChecked(True)
        v.addWidget(self.stroke_check)
        return box

    def _generate_group(self) -> QGroupBox:
        box = QGroupBox("Generate")
        form = QFormLayout(box)
        self.seed_spin = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.seed_spin.setToolTip("the same seed and settings give the same layout, balance or enlargement")
        form.addRow("Seed", self.seed_spin)
        self.stats_edit = QLineEdit()
        self.stats_edit.setPlaceholderText("built-in CoNSeP statistics")
        self.stats_edit.setToolTip("layout statistics file (nucsynth stats, or layout_stats.json beside a trained "
                                   "model): nucleus sizes, shapes, density and class mix of your data; empty: CoNSeP")
        self.stats_edit.editingFinished.connect(self.load_layout_stats)
        form.addRow("Statistics", self.stats_edit)
        self.density_spin = QDoubleSpinBox(minimum=0.0, maximum=1000.0, value=38.5, decimals=1)
        self.density_spin.setToolTip("nuclei per 256 x 256 px (default: the statistics' median; CoNSeP: 38.5)")
        form.addRow("Density", self.density_spin)
        self.arrangement_combo = QComboBox()
        self.arrangement_combo.addItems(["clustered", "uniform"])
        self.arrangement_combo.setToolTip("clustered: nuclei in groups as in tissue; uniform: spread evenly")
        form.addRow("Arrangement", self.arrangement_combo)
        self.random_btn = QPushButton("Random layout")
        self.random_btn.setToolTip("a random layout with the target shares as class mix (a proposal when the "
                                   "layout already holds nuclei)")
        self.random_btn.clicked.connect(self.random_layout)
        form.addRow(self.random_btn)
        row = QHBoxLayout()
        self.points_btn = QPushButton("Points from labels")
        self.points_btn.setToolTip("replace every nucleus by its centroid point (a point layout)")
        self.points_btn.clicked.connect(self.points_from_labels)
        self.nuclei_btn = QPushButton("Nuclei from points")
        self.nuclei_btn.setToolTip("grow a nucleus of its class' measured shape at every point without pixels")
        self.nuclei_btn.clicked.connect(self.nuclei_from_points)
        row.addWidget(self.points_btn)
        row.addWidget(self.nuclei_btn)
        form.addRow(row)
        return box

    def _balance_group(self) -> QGroupBox:
        box = QGroupBox("Class balance")
        v = QVBoxLayout(box)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["class", "nuclei", "share", "target"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        v.addWidget(self.table)
        self.bars = ClassBars()
        v.addWidget(self.bars)
        form = QFormLayout()
        self.pick_spin = QDoubleSpinBox(minimum=0.05, maximum=1.0, value=0.8, singleStep=0.05)
        self.pick_spin.setToolTip("DiffMix: share of the abundant nuclei picked as places for rare shapes")
        self.border_spin = QSpinBox(minimum=0, maximum=512, value=30)
        self.border_spin.setToolTip("DiffMix: nuclei whose centre is closer than this to the edge are not replaced")
        self.fraction_spin = QDoubleSpinBox(minimum=0.0, maximum=1.0, value=0.5, singleStep=0.1)
        self.fraction_spin.setToolTip("DiffMix: share of the nuclei that Enlarge moves")
        self.shift_spin = QSpinBox(minimum=1, maximum=20, value=3)
        self.shift_spin.setToolTip("DiffMix: largest shift of a moved nucleus, in x and in y")
        form.addRow("Balance: share picked", self.pick_spin)
        form.addRow("Balance: border (px)", self.border_spin)
        form.addRow("Enlarge: share moved", self.fraction_spin)
        form.addRow("Enlarge: max shift (px)", self.shift_spin)
        v.addLayout(form)
        row = QHBoxLayout()
        self.balance_btn = QPushButton("Balance")
        self.balance_btn.setToolTip("DiffMix: replace abundant nuclei by rare-class shapes up to the rare target share")
        self.balance_btn.clicked.connect(self.balance)
        self.enlarge_btn = QPushButton("Enlarge")
        self.enlarge_btn.setToolTip("DiffMix: move a share of the nuclei by a few pixels (a new label map)")
        self.enlarge_btn.clicked.connect(self.enlarge)
        row.addWidget(self.balance_btn)
        row.addWidget(self.enlarge_btn)
        v.addLayout(row)
        self.proposal_label = QLabel("")
        self.proposal_label.setWordWrap(True)
        self.proposal_label.setToolTip("the pending proposal: nuclei per class (change from the layout); "
                                       "its changes are outlined in yellow")
        v.addWidget(self.proposal_label)
        row = QHBoxLayout()
        self.keep_btn = QPushButton("Keep proposal")
        self.keep_btn.setToolTip("replace the layout by the proposal (one step: Ctrl+Z brings the layout back)")
        self.keep_btn.clicked.connect(self.keep_proposal)
        self.discard_btn = QPushButton("Discard proposal")
        self.discard_btn.setToolTip("remove the proposal's layers; the layout stays as it is")
        self.discard_btn.clicked.connect(self.discard_proposal)
        row.addWidget(self.keep_btn)
        row.addWidget(self.discard_btn)
        v.addLayout(row)
        self._update_proposal_buttons()
        return box

    def _bind_shortcuts(self) -> None:
        """Keyboard shortcuts of the designer's actions (docs/plugin.md lists them)."""
        for button, keys in ((self.random_btn, "Alt+R"), (self.balance_btn, "Alt+B"), (self.enlarge_btn, "Alt+E"),
                             (self.keep_btn, "Ctrl+Return"), (self.discard_btn, "Alt+X"),
                             (self.paint_btn, "Alt+N"), (self.point_btn, "Alt+O"), (self.new_btn, "Alt+Shift+N")):
            with_shortcut(button, keys)

    # ------------------------------------------------------------------ jobs
    @property
    def busy(self) -> bool:
        """Whether an action is running in a worker."""
        return self.job is not None and self.job.running

    def _run(self, desc: str, on_done: Callable[[Any], None], func: Callable[..., Any], *args: Any,
             **kwargs: Any) -> None:
        """Run ``func(*args, **kwargs)`` in a worker; ``on_done(result)`` runs on the main thread."""
        if self.busy:
            raise ValueError(f"wait: {self.job.desc} is still running")

        def done(result: Any) -> None:
            try:
                on_done(result)
            except (ValueError, FileNotFoundError) as e:
                self._tell(str(e), error=True)

        self.job = Job(desc, on_done=done, on_error=lambda e: self._tell(f"{desc} failed: {e}", error=True),
                       on_end=lambda: self._set_busy(False))
        self._set_busy(True)
        self.status.setText(f"{desc}...")
        self.job.start(func, *args, **kwargs)

    def _set_busy(self, busy: bool) -> None:
        self.busy_bar.setVisible(busy)
        for b in self._action_buttons:
            b.setEnabled(not busy)
        if not busy:
            self._update_proposal_buttons()
            self._update_history_buttons()
            self._check_layers()

    # ------------------------------------------------------------------ layers / layouts
    def _on_layers_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            adopt_renamed(event.value)
            event.value.events.name.connect(self._check_layers)
            if role_of(event.value) == "stack-instances":
                event.value.contour = 1  # outlines over the stacked tissue
        if self.proposal is not None and self.proposal.instances not in self.viewer.layers:
            self._drop_proposal_layers()
        names = [n for n in find_layout_names(self.viewer.layers) if not n.endswith(f" {PROPOSAL}")]
        names = [n for n in names if all(f"{n} {r}" in self.viewer.layers for r in ("instances", "classes", "centroids"))]
        current = self.layout_combo.currentText()
        self.layout_combo.blockSignals(True)
        self.layout_combo.clear()
        self.layout_combo.addItems(names)
        if current in names:
            self.layout_combo.setCurrentText(current)
        self.layout_combo.blockSignals(False)
        if self.ctrl is not None and all(ly not in self.viewer.layers for ly in self.ctrl.layers()):
            self._unbind()
        if self.layout_combo.currentText() and (self.ctrl is None or self.ctrl.name != self.layout_combo.currentText()):
            if self.ctrl is None or not self.ctrl.problems():
                self._on_layout_chosen(self.layout_combo.currentText())
        elif self.ctrl is None:
            self._refresh_balance()
        self._refresh_image_combos()
        self._check_layers()

    def _check_layers(self, event: Any = None) -> None:
        """Enable Repair when a layout lost or renamed a layer, and say what is wrong."""
        broken = broken_layouts(self.viewer.layers)
        if self.ctrl is not None and self.ctrl.problems():
            broken.setdefault(self.ctrl.name, self.ctrl.problems())
        self.repair_btn.setEnabled(bool(broken) and not self.busy)
        if broken:
            self.status.setText("; ".join(f"layout {n!r}: {', '.join(p)}" for n, p in broken.items())
                                + ". Repair layers rebuilds them.")

    def _refresh_image_combos(self) -> None:
        from napari.layers import Image, Labels

        for combo, kind, extra in ((self.image_combo, Image, []), (self.labels_combo, Labels, ["(none)"])):
            current = combo.currentText()
            combo.clear()
            combo.addItems(extra + [ly.name for ly in self.viewer.layers if isinstance(ly, kind) and ly.ndim == 2
                                    and role_of(ly) not in ("classes", "centroids")])
            if current:
                combo.setCurrentText(current)

    def _on_layout_chosen(self, name: str) -> None:
        if not name:
            return
        self.bind(LayoutLayers.attach(self.viewer, name))

    def _unbind(self) -> None:
        if self.ctrl is None:
            return
        self.ctrl.changed.disconnect(self._on_changed)
        self.ctrl.notice.disconnect(self._tell)
        try:
            self.ctrl.instances.events.paint.disconnect(self._after_stroke)
        except (TypeError, ValueError):
            pass
        self.ctrl = None

    def bind(self, ctrl: LayoutLayers) -> None:
        """Make ``ctrl`` the layout this dock edits."""
        if self.ctrl is ctrl:
            return
        self._unbind()
        self.ctrl = ctrl
        ctrl.changed.connect(self._on_changed)
        ctrl.notice.connect(self._tell)
        ctrl.instances.events.paint.connect(self._after_stroke)
        if self.layout_combo.currentText() != ctrl.name:
            self.layout_combo.blockSignals(True)
            if self.layout_combo.findText(ctrl.name) < 0:
                self.layout_combo.addItem(ctrl.name)
            self.layout_combo.setCurrentText(ctrl.name)
            self.layout_combo.blockSignals(False)
        self._build_palette(ctrl.class_set)
        self._on_changed()

    def _on_changed(self) -> None:
        self._refresh_balance()
        self._update_history_buttons()

    def _update_history_buttons(self) -> None:
        ctrl = self.ctrl
        self.undo_btn.setEnabled(ctrl is not None and ctrl.can_undo and not self.busy)
        self.redo_btn.setEnabled(ctrl is not None and ctrl.can_redo and not self.busy)

    def _show_new(self, layout: Layout, name: str, translate: tuple[float, float] | None = None) -> LayoutLayers:
        ctrl = LayoutLayers.show(self.viewer, layout, name, selected_class=self._palette_class(),
                                 translate=free_origin(self.viewer, GAP) if translate is None else translate)
        self._on_layers_changed()
        self.bind(ctrl)
        return ctrl

    def _require(self) -> LayoutLayers:
        if self.ctrl is None:
            raise ValueError("no layout to edit: make a new canvas, start from an image, or open a file")
        problems = self.ctrl.problems()
        if problems:
            raise ValueError(f"layout {self.ctrl.name!r}: {', '.join(problems)}; press Repair layers first")
        return self.ctrl

    def _tell(self, text: str, error: bool = False) -> None:
        from napari.utils.notifications import show_error, show_info

        self.status.setText(text)
        (show_error if error else show_info)(text)

    # ------------------------------------------------------------------ stores
    def _stack(self) -> Any:
        """The instances stack of an opened multi-patch store or dataset (the selected one
        if several), or None."""
        stacks = [ly for ly in self.viewer.layers if role_of(ly) == "stack-instances"]
        active = self.viewer.layers.selection.active
        return active if active in stacks else (stacks[-1] if stacks else None)

    def _follow_slider(self, event: Any = None) -> None:
        step = self.viewer.dims.current_step
        if self._stack() is not None and len(step) > 2:
            self.patch_spin.setValue(int(step[0]))

    @_notify_errors
    def open_patch(self) -> None:
        """Open patch ``Patch`` of the opened store or dataset as an editable layout."""
        from napari_nucsynth._layers import META, sample_to_layers, unused_name
        from napari_nucsynth._reader import read_patch

        stack = self._stack()
        if stack is None:
            raise ValueError("open a store or dataset of several patches first (File > Open): its patches show as a "
                             "stack, and Open patch makes one of them editable")
        meta = stack.metadata[META]
        i = self.patch_spin.value()
        sample = read_patch(meta, i)
        name = unused_name(self.viewer, f"{meta['layout']} #{i}")
        translate = free_origin(self.viewer, GAP)
        for data, kwargs, kind in sample_to_layers(sample, name):
            getattr(self.viewer, f"add_{kind}")(data, **{**kwargs, "translate": translate})
        self._on_layers_changed()
        self.bind(LayoutLayers.attach(self.viewer, name))
        self._tell(f"patch {i} of {meta.get('store') or meta.get('source')} opened as {name!r}: "
                   f"{sample.layout.num_nuclei} nuclei")

    # ------------------------------------------------------------------ history / repair
    @_notify_errors
    def undo(self) -> None:
        """Undo the layout's last edit (as Ctrl+Z on its layers)."""
        self._require().undo()

    @_notify_errors
    def redo(self) -> None:
        """Redo the layout's last undone edit (as Ctrl+Shift+Z on its layers)."""
        self._require().redo()

    @_notify_errors
    def repair(self) -> None:
        """Rebuild every layout whose layers were deleted or renamed."""
        broken = broken_layouts(self.viewer.layers)
        if self.ctrl is not None and self.ctrl.problems():
            broken.setdefault(self.ctrl.name, self.ctrl.problems())
        if not broken:
            raise ValueError("every layout has its three layers: nothing to repair")
        for name in broken:
            ctrl = LayoutLayers.recover(self.viewer, name)
            if self.ctrl is None or self.ctrl.name == name:
                self.ctrl = None if self.ctrl is ctrl else self.ctrl
                self.bind(ctrl)
        self._on_layers_changed()
        self._tell(f"repaired {', '.join(repr(n) for n in broken)}")
    # ------------------------------------------------------------------ palette
    def _build_palette(self, cs: ClassSet) -> None:
        for b in self.palette_group.buttons():
            self.palette_group.removeButton(b)
            self.palette_grid.removeWidget(b)
            b.deleteLater()
        names = class_names(cs)
        colours = [(150, 150, 150), *cs.colours]
        for k, (name, rgb) in enumerate(zip(names, colours)):
            if k == 0:
                continue
            b = QPushButton(name)
            b.setCheckable(True)
            fg = "black" if sum(rgb) > 380 else "white"
            b.setStyleSheet(
                f"QPushButton {{ background-color: rgb{tuple(rgb)}; color: {fg}; }}"
                "QPushButton:checked { border: 3px solid white; font-weight: bold; }"
            )
            self.palette_group.addButton(b, k)
            self.palette_grid.addWidget(b, (k - 1) // 3, (k - 1) % 3)
            b.show()  # shown now, so the scrolled dock lays the grown grid out at once
        self.palette.adjustSize()
        selected = self.ctrl.selected_class if self.ctrl else 1
        btn = self.palette_group.button(selected or 1)
        if btn is not None:
            btn.setChecked(True)

    def _palette_class(self) -> int:
        k = self.palette_group.checkedId()
        return k if k > 0 else 1

    def _on_class_clicked(self, k: int) -> None:
        if self.ctrl is not None:
            self.ctrl.selected_class = k

    def select_class(self, k: int) -> None:
        """Pick class ``k`` in the palette (as a click would)."""
        btn = self.palette_group.button(k)
        if btn is None:
            raise ValueError(f"class {k} is not in the palette")
        btn.setChecked(True)
        self._on_class_clicked(k)

    @_notify_errors
    def paint_new_nucleus(self) -> None:
        """Select the instance layer in paint mode with a fresh nucleus id."""
        ctrl = self._require()
        self.viewer.layers.selection.active = ctrl.instances
        ctrl.instances.mode = "paint"
        ctrl.new_nucleus_label()

    @_notify_errors
    def place_points(self) -> None:
        """Select the centroid layer in add mode (each click adds a nucleus of the selected class)."""
        ctrl = self._require()
        self.viewer.layers.selection.active = ctrl.centroids
        ctrl.centroids.mode = "add"

    @_notify_errors
    def assign_selected(self) -> None:
        """Give the nuclei of the selected points the selected class."""
        ctrl = self._require()
        ids = ctrl.selected_point_ids()
        if not ids:
            raise ValueError("no points selected: select centroids (Points layer, select mode) first")
        ctrl.set_class(ids, self._palette_class())

    def _after_stroke(self, event: Any) -> None:
        """With "each stroke paints a new nucleus", move to a fresh id after painting one."""
        ctrl = self.ctrl
        if ctrl is None or not self.stroke_check.isChecked():
            return
        painted = {int(getattr(a, "new_value", -1)) for a in (event.value or []) if hasattr(a, "new_value")}
        if ctrl.instances.selected_label in painted and ctrl.instances.selected_label > 0:
            ctrl.new_nucleus_label()

    # ------------------------------------------------------------------ making layouts
    @_notify_errors
    def new_canvas(self) -> None:
        """An empty layout of the chosen size and class set."""
        cs = CLASS_SETS[self.class_set_combo.currentText()]
        shape = (self.height_spin.value(), self.width_spin.value())
        name = self._new_name()
        self._show_new(Layout.from_points(shape, np.zeros((0, 2)), np.zeros(0, np.int64), cs), name)
        self._tell(f"new {shape[0]} x {shape[1]} canvas {name!r} ({cs.name})")

    def _new_name(self) -> str:
        base = self.name_edit.text().strip() or "design"
        if base.endswith(f" {PROPOSAL}"):
            raise ValueError(f"layout names may not end with {PROPOSAL!r}")
        name, i = base, 1
        while any(f"{name} {r}" in self.viewer.layers for r in ("instances", "classes", "centroids")):
            name, i = f"{base} {i}", i + 1
        return name

    @_notify_errors
    def start_from_image(self) -> None:
        """A layout over an opened image: its labels layer (if chosen) gives the nuclei."""
        img_name = self.image_combo.currentText()
        if not img_name or img_name not in self.viewer.layers:
            raise ValueError("open an image first (File > Open) and choose it in the Image box")
        image = self.viewer.layers[img_name]
        shape = tuple(image.data.shape[:2])
        lab_name = self.labels_combo.currentText()
        cs = CLASS_SETS[self.class_set_combo.currentText()]
        if lab_name and lab_name != "(none)":
            labels = self.viewer.layers[lab_name]
            inst = np.asarray(labels.data)
            if inst.shape != shape:
                raise ValueError(f"labels {lab_name!r} are {inst.shape} but image {img_name!r} is {shape}")
            if role_of(labels) == "instances":
                layout = layers_to_layout(labels)
                cs = layout.class_set
            else:
                new, old_ids = relabel_contiguous(inst)
                classes = np.zeros(old_ids.size, np.int64)
                feats = labels.features
                if "class" in feats and "index" in feats:
                    lut = dict(zip(feats["index"].astype(int), feats["class"].astype(int)))
                    classes = np.array([lut.get(int(i), 0) for i in old_ids], np.int64)
                    classes[classes > cs.num_classes] = 0
                layout = Layout.from_inst_map(new, classes, cs)
        else:
            layout = Layout.from_points(shape, np.zeros((0, 2)), np.zeros(0, np.int64), cs)
        name = self._new_name()
        self._show_new(layout, name, translate=tuple(float(t) for t in image.translate[-2:]))
        self._tell(f"layout {name!r} over {img_name!r}: {layout.num_nuclei} nuclei")

    def _targets_for(self, cs: ClassSet) -> list[float]:
        if cs.name not in self._targets:
            from nucsynth.generate.stats import default_class_shares

            self._targets[cs.name] = [float(s) for s in default_class_shares(cs, self._stats)]
        return self._targets[cs.name]

    @_notify_errors
    def load_layout_stats(self) -> None:
        """Use the statistics file named in the Statistics field (empty: the built-in CoNSeP
        ones) for Random layout and Nuclei from points; the density and the target shares
        become the statistics' median density and class mix."""
        from nucsynth.generate.stats import CONSEP_LAYOUT_STATS, LayoutStats

        path = self.stats_edit.text().strip()
        stats = LayoutStats.load(path) if path else None
        if stats == self._stats:
            return
        self._stats = stats
        self._targets.clear()  # the target mix follows the statistics
        self.density_spin.setValue((stats or CONSEP_LAYOUT_STATS).nuclei_per_patch_median)
        self._refresh_balance()
        self._tell(f"layout statistics: {(stats or CONSEP_LAYOUT_STATS).describe()}")

    @_notify_errors
    def random_layout(self) -> None:
        """A random layout with the target shares as class mix (a proposal if the canvas is not empty)."""
        from nucsynth.generate.layouts import random_layout

        if self.ctrl is None:
            cs = CLASS_SETS[self.class_set_combo.currentText()]
            shape = (self.height_spin.value(), self.width_spin.value())
            before = None
        else:
            before = self._require().layout()
            cs, shape = before.class_set, before.shape
        targets = self._targets_for(cs)
        seed = self.seed_spin.value()
        kwargs = dict(class_set=cs, density=self.density_spin.value(), stats=self._stats,
                      class_shares=targets if sum(targets) > 0 else None, seed=seed,
                      arrangement=self.arrangement_combo.currentText())
        name = self._new_name() if before is None else None

        def done(lay: Layout) -> None:
            if before is None:
                self._show_new(lay, name)
            elif before.num_nuclei == 0:
                self._require().set_layout(lay)
            else:
                self._propose(before, lay, f"random layout (seed {seed})")
                return
            self._tell(f"random layout: {lay.num_nuclei} nuclei")

        self._run("Random layout", done, random_layout, shape, **kwargs)

    @_notify_errors
    def points_from_labels(self) -> None:
        """Replace every nucleus by its centroid point (a point layout): one undo step."""
        from nucsynth.generate.layouts import points_from_labels

        ctrl = self._require()

        def done(lay: Layout) -> None:
            ctrl.set_layout(lay)
            self._tell("nuclei replaced by their centroid points")

        self._run("Points from labels", done, points_from_labels, ctrl.layout())

    @_notify_errors
    def nuclei_from_points(self) -> None:
        """Grow a plausible nucleus (shape from its class statistics) at every point without
        pixels: one undo step."""
        from nucsynth.generate.layouts import nuclei_from_points

        ctrl = self._require()
        before = ctrl.layout()

        def done(after: Layout) -> None:
            ctrl.set_layout(after)
            grown = int(((before.areas() == 0) & (after.areas() > 0)).sum())
            self._tell(f"grew {grown} nuclei from points")

        self._run("Nuclei from points", done, nuclei_from_points, before, seed=self.seed_spin.value(), stats=self._stats)

    # ------------------------------------------------------------------ balance panel
    def _refresh_balance(self) -> None:
        ctrl = self.ctrl
        if ctrl is None:
            self.table.setRowCount(0)
            self.bars.set_data([], [], [], [])
            return
        cs = ctrl.class_set
        counts = ctrl.class_counts()
        total = max(int(counts.sum()), 1)
        targets = self._targets_for(cs)
        self.table.setRowCount(cs.num_classes)
        rows_h = cs.num_classes * self.table.verticalHeader().defaultSectionSize()
        self.table.setFixedHeight(self.table.horizontalHeader().height() + rows_h + 6)
        for k in range(1, cs.num_classes + 1):
            item = QTableWidgetItem(cs.names[k - 1])
            item.setBackground(QColor(*cs.colours[k - 1]))
            item.setForeground(QColor("black" if sum(cs.colours[k - 1]) > 380 else "white"))
            self.table.setItem(k - 1, 0, item)
            self.table.setItem(k - 1, 1, QTableWidgetItem(str(int(counts[k]))))
            self.table.setItem(k - 1, 2, QTableWidgetItem(f"{counts[k] / total:.1%}"))
            spin = self.table.cellWidget(k - 1, 3)
            if not isinstance(spin, QDoubleSpinBox):
                spin = QDoubleSpinBox(minimum=0.0, maximum=1.0, singleStep=0.05, decimals=3)
                spin.valueChanged.connect(lambda v, k=k: self._set_target(k, v))
                self.table.setCellWidget(k - 1, 3, spin)
            spin.blockSignals(True)
            spin.setValue(targets[k - 1])
            spin.blockSignals(False)
        unknown = int(counts[0])
        self.table.setToolTip(f"{int(counts.sum())} nuclei" + (f", {unknown} of unknown class" if unknown else ""))
        self.bars.set_data(cs.names, cs.colours, [c / total for c in counts[1:]], targets)

    def _set_target(self, k: int, value: float) -> None:
        if self.ctrl is None:
            return
        self._targets_for(self.ctrl.class_set)[k - 1] = float(value)
        self._refresh_balance()

    def set_target(self, k: int, share: float) -> None:
        """Set the target share of class ``k`` (as editing its table cell would)."""
        spin = self.table.cellWidget(k - 1, 3)
        if spin is None:
            raise ValueError(f"class {k} has no target cell (is a layout bound?)")
        spin.setValue(share)

    def counts(self) -> dict[str, int]:
        """Nuclei per class name as the table shows them."""
        return {self.table.item(r, 0).text(): int(self.table.item(r, 1).text()) for r in range(self.table.rowCount())}

    def _pool_layouts(self, layout: Layout) -> list[Layout]:
        """This layout and every other open layout of the same class set (their rare-class
        shapes make the balancing pool)."""
        layouts = [layout]
        for name in find_layout_names(self.viewer.layers):
            if self.ctrl is not None and name != self.ctrl.name and not name.endswith(PROPOSAL):
                try:
                    other = LayoutLayers.attach(self.viewer, name).layout()
                except ValueError:  # a layout with a missing layer: not a pool source
                    continue
                if other.class_set == layout.class_set:
                    layouts.append(other)
        return layouts

    @_notify_errors
    def balance(self) -> None:
        """DiffMix balancing map up to the rare class' target share, as a proposal."""
        ctrl = self._require()
        cs = ctrl.class_set
        if cs.rare is None:
            raise ValueError(f"class set {cs.name!r} names no rare class to balance")
        layout = ctrl.layout()
        target = self._targets_for(cs)[cs.rare - 1]
        args = (layout, self._pool_layouts(layout), target, self.seed_spin.value(), self.border_spin.value(),
                self.pick_spin.value())
        self._run("Balance", lambda got: self._propose(layout, got[0], _balance_message(got[1], cs), got[2]),
                  _balance, *args)

    @_notify_errors
    def enlarge(self) -> None:
        """DiffMix enlarging map (a share of nuclei shifted by a few pixels), as a proposal."""
        ctrl = self._require()
        layout = ctrl.layout()
        args = (layout, self.fraction_spin.value(), self.shift_spin.value(), self.seed_spin.value())
        self._run("Enlarge", lambda got: self._propose(layout, got[0], "enlarged", got[1]), _enlarge, *args)

    # ------------------------------------------------------------------ proposals
    def _propose(self, before: Layout, layout: Layout, what: str, changed: np.ndarray | None = None) -> None:
        """Show ``layout`` as the proposal beside the layout, the nuclei it changed outlined
        in yellow. The proposal's layers are made once per layout and reused (hidden when
        kept or discarded): making napari layers is the slowest step of a proposal."""
        ctrl = self._require()
        name = f"{ctrl.name} {PROPOSAL}"
        if self.proposal is not None and self.proposal.name != name:
            self.discard_proposal()  # one proposal at a time
        w = ctrl.instances.data.shape[1]
        ty, tx = (float(t) for t in ctrl.instances.translate[-2:])
        self.proposal = LayoutLayers.show(self.viewer, layout, name, translate=(ty, tx + w + GAP))
        n_changed = 0
        if changed is not None:
            ids = np.unique(layout.inst_map[changed])
            n_changed = int((ids > 0).sum())
            self.proposal.instances.colormap = _outline_colormap(ids[ids > 0])
        self._set_visible(self.proposal.layers(), True)
        self._update_proposal_buttons()
        note = "" if changed is None else f"; {n_changed} changed nuclei outlined in yellow"
        self.proposal_label.setText(f"Proposal: {proposal_summary(before, layout)}{note}")
        self._tell(f"{what}. Proposal {name!r} beside the layout. Keep it or discard it.")

    def _set_visible(self, layers: tuple[Any, ...], visible: bool) -> None:
        """Show or hide ``layers``, one toggle per event-loop turn: each toggle re-draws the
        canvas (30-100 ms on a busy CPU), and three in a row froze the viewer for a Keep or a
        proposal. A later wish for a layer replaces an earlier one not yet applied."""
        from qtpy.QtCore import QTimer

        for layer in layers:
            self._wanted_visible.pop(layer, None)
            self._wanted_visible[layer] = visible
        if not self._toggling:
            self._toggling = True
            QTimer.singleShot(0, self._toggle_one)

    def _toggle_one(self) -> None:
        from qtpy.QtCore import QTimer

        while self._wanted_visible:
            layer = next(iter(self._wanted_visible))
            visible = self._wanted_visible.pop(layer)
            if layer in self.viewer.layers and layer.visible != visible:
                layer.visible = visible
                break
        if self._wanted_visible:
            QTimer.singleShot(0, self._toggle_one)
        else:
            self._toggling = False

    @property
    def settling(self) -> bool:
        """Whether layer visibility changes are still being applied (one per event-loop turn)."""
        return bool(self._wanted_visible)

    def _update_proposal_buttons(self) -> None:
        live = self.proposal is not None and self.proposal.instances in self.viewer.layers
        self.keep_btn.setEnabled(live and not self.busy)
        self.discard_btn.setEnabled(live and not self.busy)
        if not live:
            self.proposal_label.setText("")

    @_notify_errors
    def keep_proposal(self) -> None:
        """Replace the layout by the proposal (one undo step) and remove the proposal's layers."""
        ctrl, prop = self._require(), self.proposal
        if prop is None:
            raise ValueError("no proposal to keep")
        ctrl.set_layout(prop.layout())
        self.discard_proposal()
        self._tell(f"kept the proposal: {ctrl.layout().num_nuclei} nuclei in {ctrl.name!r} (Ctrl+Z brings back the "
                   "layout before)")

    @_notify_errors
    def discard_proposal(self) -> None:
        """Remove the proposal's layers."""
        if self.proposal is not None:
            prop, self.proposal = self.proposal, None
            self._set_visible(prop.layers(), False)  # hidden, and reused by the next proposal
        self._update_proposal_buttons()

    def _drop_proposal_layers(self) -> None:
        """The user deleted a proposal layer: the proposal is gone."""
        prop, self.proposal = self.proposal, None
        remove_layers(self.viewer, prop.layers())
        self._update_proposal_buttons()


# ---------------------------------------------------------------------- worker bodies (no layers here)
def _balance(layout: Layout, pool_from: list[Layout], target: float, seed: int, border: int,
             pick: float) -> tuple[Layout, Any, np.ndarray]:
    from nucsynth.edit.balance import balance_layout_report
    from nucsynth.edit.pool import rare_pool
    from nucsynth.edit.region import edited_region

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report says whether the target was reached
        out, report = balance_layout_report(layout, rare_pool(pool_from, seed=seed), target_share=target, seed=seed,
                                            border=border, pick_fraction=pick)
    return out, report, edited_region(layout, out, margin=0)


def _enlarge(layout: Layout, fraction: float, max_shift: int, seed: int) -> tuple[Layout, np.ndarray]:
    from nucsynth.edit.enlarge import enlarge_layout
    from nucsynth.edit.region import edited_region

    out = enlarge_layout(layout, fraction=fraction, max_shift=max_shift, seed=seed)
    return out, edited_region(layout, out, margin=0)


def _outline_colormap(changed_ids: np.ndarray) -> Any:
    """Instance outlines: white, the ``changed_ids`` yellow."""
    from napari.utils.colormaps import DirectLabelColormap

    colours: dict[int | None, Any] = {0: np.zeros(4), None: np.ones(4)}
    colours.update({int(i): np.array([1.0, 0.85, 0.0, 1.0]) for i in changed_ids})
    return DirectLabelColormap(color_dict=colours)
