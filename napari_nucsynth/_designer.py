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
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_nucsynth._bars import ClassBars
from napari_nucsynth._layers import (
    LayoutLayers,
    adopt_renamed,
    class_names,
    find_layout_names,
    layers_to_layout,
    role_of,
)
from nucsynth.layout import (
    CONSEP_CLASSES,
    LIZARD_CLASSES,
    NUCLEUS_CLASSES,
    PANNUKE_CLASSES,
    ClassSet,
    Layout,
    relabel_contiguous,
)

__all__ = ["DesignerWidget", "CLASS_SETS", "PROPOSAL", "rare_pool"]

CLASS_SETS: dict[str, ClassSet] = {cs.name: cs for cs in (CONSEP_CLASSES, PANNUKE_CLASSES, LIZARD_CLASSES, NUCLEUS_CLASSES)}
PROPOSAL = "proposal"  # suffix of the layout name of a pending proposal
_POOL_SHAPES = 64  # the least number of rare-class shapes offered to DiffMix balancing


def rare_pool(layouts: list[Layout], seed: int = 0, least: int = _POOL_SHAPES) -> list[np.ndarray]:
    """Rare-class nucleus shapes for DiffMix balancing: those of ``layouts``
    (``nucsynth.edit.balance.collect_rare_pool``), topped up to ``least`` with shapes drawn
    from the rare class' statistics measured on real data (``nucsynth.generate``)."""
    from nucsynth.edit.balance import collect_rare_pool
    from nucsynth.generate.layouts import nucleus_shape
    from nucsynth.generate.stats import stats_for_class

    pool = collect_rare_pool(layouts)
    cs = layouts[0].class_set
    if len(pool) < least and cs.rare is not None:
        rng = np.random.default_rng(seed)
        stats = stats_for_class(cs, cs.rare)
        pool += [nucleus_shape(stats, rng) for _ in range(least - len(pool))]
    return pool


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
    """The layout designer dock."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.ctrl: LayoutLayers | None = None
        self.proposal: LayoutLayers | None = None
        self._targets: dict[str, list[float]] = {}
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
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        root.addStretch(1)
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._on_layers_changed)
        self._on_layers_changed()

    # ------------------------------------------------------------------ building the UI
    def _layout_group(self) -> QGroupBox:
        box = QGroupBox("Layout")
        form = QFormLayout(box)
        self.layout_combo = QComboBox()
        self.layout_combo.currentTextChanged.connect(self._on_layout_chosen)
        form.addRow("Edit", self.layout_combo)
        self.name_edit = QLineEdit("design")
        form.addRow("New name", self.name_edit)
        size = QHBoxLayout()
        self.height_spin = QSpinBox(minimum=16, maximum=8192, value=256)
        self.width_spin = QSpinBox(minimum=16, maximum=8192, value=256)
        size.addWidget(self.height_spin)
        size.addWidget(QLabel("x"))
        size.addWidget(self.width_spin)
        form.addRow("Size (H x W)", size)
        self.class_set_combo = QComboBox()
        self.class_set_combo.addItems(list(CLASS_SETS))
        form.addRow("Class set", self.class_set_combo)
        self.new_btn = QPushButton("New empty canvas")
        self.new_btn.clicked.connect(self.new_canvas)
        form.addRow(self.new_btn)
        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        form.addRow("Image", self.image_combo)
        form.addRow("Its labels", self.labels_combo)
        self.from_image_btn = QPushButton("Start from image")
        self.from_image_btn.clicked.connect(self.start_from_image)
        form.addRow(self.from_image_btn)
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
        self.paint_btn.clicked.connect(self.paint_new_nucleus)
        self.point_btn = QPushButton("Place points")
        self.point_btn.clicked.connect(self.place_points)
        self.assign_btn = QPushButton("Class -> selected points")
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
        form.addRow("Seed", self.seed_spin)
        self.density_spin = QDoubleSpinBox(minimum=0.0, maximum=1000.0, value=38.5, decimals=1)
        self.density_spin.setToolTip("nuclei per 256 x 256 px (CoNSeP median: 38.5)")
        form.addRow("Density", self.density_spin)
        self.arrangement_combo = QComboBox()
        self.arrangement_combo.addItems(["clustered", "uniform"])
        form.addRow("Arrangement", self.arrangement_combo)
        self.random_btn = QPushButton("Random layout")
        self.random_btn.clicked.connect(self.random_layout)
        form.addRow(self.random_btn)
        row = QHBoxLayout()
        self.points_btn = QPushButton("Points from labels")
        self.points_btn.clicked.connect(self.points_from_labels)
        self.nuclei_btn = QPushButton("Nuclei from points")
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
        self.fraction_spin = QDoubleSpinBox(minimum=0.0, maximum=1.0, value=0.5, singleStep=0.1)
        self.shift_spin = QSpinBox(minimum=1, maximum=20, value=3)
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
        row = QHBoxLayout()
        self.keep_btn = QPushButton("Keep proposal")
        self.keep_btn.clicked.connect(self.keep_proposal)
        self.discard_btn = QPushButton("Discard proposal")
        self.discard_btn.clicked.connect(self.discard_proposal)
        row.addWidget(self.keep_btn)
        row.addWidget(self.discard_btn)
        v.addLayout(row)
        self._update_proposal_buttons()
        return box

    # ------------------------------------------------------------------ layers / layouts
    def _on_layers_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            adopt_renamed(event.value)
        if self.proposal is not None and self.proposal.instances not in self.viewer.layers:
            self.proposal = None
            self._update_proposal_buttons()
        names = [n for n in find_layout_names(self.viewer.layers) if not n.endswith(f" {PROPOSAL}")]
        names = [n for n in names if all(f"{n} {r}" in self.viewer.layers for r in ("instances", "classes", "centroids"))]
        current = self.layout_combo.currentText()
        self.layout_combo.blockSignals(True)
        self.layout_combo.clear()
        self.layout_combo.addItems(names)
        if current in names:
            self.layout_combo.setCurrentText(current)
        self.layout_combo.blockSignals(False)
        if self.ctrl is not None and self.ctrl.instances not in self.viewer.layers:
            self.ctrl = None
        if self.layout_combo.currentText() and (self.ctrl is None or self.ctrl.name != self.layout_combo.currentText()):
            self._on_layout_chosen(self.layout_combo.currentText())
        elif not names:
            self._refresh_balance()
        self._refresh_image_combos()

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

    def bind(self, ctrl: LayoutLayers) -> None:
        """Make ``ctrl`` the layout this dock edits."""
        if self.ctrl is ctrl:
            return
        if self.ctrl is not None:
            self.ctrl.changed.disconnect(self._refresh_balance)
            self.ctrl.notice.disconnect(self._tell)
            try:
                self.ctrl.instances.events.paint.disconnect(self._after_stroke)
            except (TypeError, ValueError):
                pass
        self.ctrl = ctrl
        ctrl.changed.connect(self._refresh_balance)
        ctrl.notice.connect(self._tell)
        ctrl.instances.events.paint.connect(self._after_stroke)
        if self.layout_combo.currentText() != ctrl.name:
            self.layout_combo.blockSignals(True)
            if self.layout_combo.findText(ctrl.name) < 0:
                self.layout_combo.addItem(ctrl.name)
            self.layout_combo.setCurrentText(ctrl.name)
            self.layout_combo.blockSignals(False)
        self._build_palette(ctrl.class_set)
        self._refresh_balance()

    def _show_new(self, layout: Layout, name: str) -> LayoutLayers:
        ctrl = LayoutLayers.show(self.viewer, layout, name, selected_class=self._palette_class())
        self._on_layers_changed()
        self.bind(ctrl)
        return ctrl

    def _require(self) -> LayoutLayers:
        if self.ctrl is None:
            raise ValueError("no layout to edit: make a new canvas, start from an image, or open a file")
        return self.ctrl

    def _tell(self, text: str, error: bool = False) -> None:
        from napari.utils.notifications import show_error, show_info

        self.status.setText(text)
        (show_error if error else show_info)(text)

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
        self._show_new(layout, name)
        for layer in (self.ctrl.instances, self.ctrl.classes, self.ctrl.centroids):
            layer.translate = image.translate[-2:]
        self._tell(f"layout {name!r} over {img_name!r}: {layout.num_nuclei} nuclei")

    def _targets_for(self, cs: ClassSet) -> list[float]:
        if cs.name not in self._targets:
            from nucsynth.generate.stats import default_class_shares

            self._targets[cs.name] = [float(s) for s in default_class_shares(cs)]
        return self._targets[cs.name]

    @_notify_errors
    def random_layout(self) -> None:
        """A random layout with the target shares as class mix (a proposal if the canvas is not empty)."""
        from nucsynth.generate.layouts import random_layout

        if self.ctrl is None:
            cs = CLASS_SETS[self.class_set_combo.currentText()]
            shape = (self.height_spin.value(), self.width_spin.value())
        else:
            cs, shape = self.ctrl.class_set, self.ctrl.layout().shape
        targets = self._targets_for(cs)
        shares = targets if sum(targets) > 0 else None
        lay = random_layout(shape, class_set=cs, density=self.density_spin.value(), class_shares=shares,
                            seed=self.seed_spin.value(), arrangement=self.arrangement_combo.currentText())
        if self.ctrl is None:
            self._show_new(lay, self._new_name())
        elif self.ctrl.layout().num_nuclei == 0:
            self.ctrl.set_layout(lay)
        else:
            self._propose(lay, f"random layout (seed {self.seed_spin.value()})")
            return
        self._tell(f"random layout: {lay.num_nuclei} nuclei")

    @_notify_errors
    def points_from_labels(self) -> None:
        """Replace every nucleus by its centroid point (a point layout)."""
        from nucsynth.generate.layouts import points_from_labels

        ctrl = self._require()
        ctrl.set_layout(points_from_labels(ctrl.layout()))
        self._tell("nuclei replaced by their centroid points")

    @_notify_errors
    def nuclei_from_points(self) -> None:
        """Grow a plausible nucleus (shape from its class statistics) at every point without pixels."""
        from nucsynth.generate.layouts import nuclei_from_points

        ctrl = self._require()
        before = ctrl.layout()
        after = nuclei_from_points(before, seed=self.seed_spin.value())
        ctrl.set_layout(after)
        grown = int(((before.areas() == 0) & (after.areas() > 0)).sum())
        self._tell(f"grew {grown} nuclei from points")

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

    def _rare_pool(self, layout: Layout) -> list[np.ndarray]:
        """Rare-class shapes of this and every other open layout of the same class set."""
        layouts = [layout]
        for name in find_layout_names(self.viewer.layers):
            if self.ctrl is not None and name != self.ctrl.name and not name.endswith(PROPOSAL):
                other = LayoutLayers.attach(self.viewer, name).layout()
                if other.class_set == layout.class_set:
                    layouts.append(other)
        return rare_pool(layouts, seed=self.seed_spin.value())

    @_notify_errors
    def balance(self) -> None:
        """DiffMix balancing map up to the rare class' target share, as a proposal."""
        from nucsynth.edit.balance import balance_layout_report

        ctrl = self._require()
        cs = ctrl.class_set
        if cs.rare is None:
            raise ValueError(f"class set {cs.name!r} names no rare class to balance")
        layout = ctrl.layout()
        target = self._targets_for(cs)[cs.rare - 1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, report = balance_layout_report(layout, self._rare_pool(layout), target_share=target,
                                                seed=self.seed_spin.value())
        self._propose(out, f"balanced: {report}")

    @_notify_errors
    def enlarge(self) -> None:
        """DiffMix enlarging map (a share of nuclei shifted by a few pixels), as a proposal."""
        from nucsynth.edit.enlarge import enlarge_layout

        ctrl = self._require()
        out = enlarge_layout(ctrl.layout(), fraction=self.fraction_spin.value(), max_shift=self.shift_spin.value(),
                             seed=self.seed_spin.value())
        self._propose(out, "enlarged")

    # ------------------------------------------------------------------ proposals
    def _propose(self, layout: Layout, what: str) -> None:
        ctrl = self._require()
        w = ctrl.instances.data.shape[1]
        ty, tx = (float(t) for t in ctrl.instances.translate[-2:])
        name = f"{ctrl.name} {PROPOSAL}"
        self.proposal = LayoutLayers.show(self.viewer, layout, name, translate=(ty, tx + w + 8))
        self._update_proposal_buttons()
        counts = layout.class_counts()
        self._tell(f"{what}. Proposal {name!r} beside the layout: "
                   + ", ".join(f"{n} {c}" for n, c in zip(layout.class_set.names, counts[1:]))
                   + ". Keep it or discard it.")

    def _update_proposal_buttons(self) -> None:
        live = self.proposal is not None and self.proposal.instances in self.viewer.layers
        self.keep_btn.setEnabled(live)
        self.discard_btn.setEnabled(live)

    @_notify_errors
    def keep_proposal(self) -> None:
        """Replace the layout by the proposal (and remove the proposal's layers)."""
        ctrl, prop = self._require(), self.proposal
        if prop is None:
            raise ValueError("no proposal to keep")
        ctrl.set_layout(prop.layout())
        self.discard_proposal()
        self._tell(f"kept the proposal: {ctrl.layout().num_nuclei} nuclei in {ctrl.name!r}")

    @_notify_errors
    def discard_proposal(self) -> None:
        """Remove the proposal's layers."""
        if self.proposal is not None:
            prop, self.proposal = self.proposal, None
            prop.remove()
        self._update_proposal_buttons()
