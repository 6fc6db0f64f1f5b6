"""Layout <-> napari layers, in one place.

A :class:`nucsynth.layout.Layout` is shown as three layers that share a base name:

- ``"<name> instances"``: a Labels layer (int32) with the instance map and a ``features``
  table (``index`` = nucleus id, ``class`` = class id), drawn as contours;
- ``"<name> classes"``: a Labels layer with the type map and a fixed
  ``DirectLabelColormap`` (0 transparent, class k in the ClassSet's colour);
- ``"<name> centroids"``: a Points layer with features ``id`` (nucleus id) and ``class``
  (class *name*, so napari colours it categorically from the ClassSet colours).

Every layer carries ``metadata["nucsynth"] = {"role", "layout", "class_set"}`` so that a
layout can be read back from the layers alone (:func:`layers_to_layout`).

:class:`LayoutLayers` binds the three layers of one layout and keeps them consistent while
the user edits any of them: painting a new nucleus gives it the selected class, painting
over the class layer re-classes the nuclei touched, adding a point adds a nucleus (a point
with no pixels yet), dragging a point moves its nucleus
(``nucsynth.edit.enlarge.shift_nucleus``: never onto another nucleus or off the canvas),
deleting a point deletes its nucleus, erasing a nucleus' last pixel deletes it.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import numpy as np
import pandas as pd
from psygnal import Signal

from nucsynth.edit.enlarge import shift_nucleus
from nucsynth.layout import ClassSet, Layout, Sample

__all__ = [
    "ROLES",
    "UNKNOWN",
    "layer_names",
    "class_colormap",
    "class_colour_cycle",
    "layout_to_layers",
    "sample_to_layers",
    "layers_to_layout",
    "layout_from_parts",
    "class_set_of",
    "role_of",
    "adopt_renamed",
    "find_layout_names",
    "LayoutLayers",
]

META = "nucsynth"
ROLES = ("instances", "classes", "centroids")
UNKNOWN = "unknown"  # name shown for class 0 (unknown / any class)
_UNKNOWN_RGBA = (0.6, 0.6, 0.6, 1.0)
LayerDataTuple = tuple[Any, dict[str, Any], str]


def layer_names(name: str) -> dict[str, str]:
    """The stable layer names of the layout called ``name``, by role."""
    return {role: f"{name} {role}" for role in ROLES}


def _meta(role: str, name: str, class_set: ClassSet) -> dict[str, Any]:
    return {META: {"role": role, "layout": name, "class_set": class_set.to_dict()}}


def class_names(class_set: ClassSet) -> list[str]:
    """Class names indexed by class id (index 0 is :data:`UNKNOWN`)."""
    return [UNKNOWN, *class_set.names]


def class_colormap(class_set: ClassSet) -> Any:
    """A DirectLabelColormap: 0 transparent, class k in its ClassSet colour, others grey."""
    from napari.utils.colormaps import DirectLabelColormap

    colours: dict[int | None, Any] = {0: np.zeros(4), None: np.array(_UNKNOWN_RGBA)}
    for k, rgb in enumerate(class_set.colours, start=1):
        colours[k] = np.array([*(c / 255 for c in rgb), 1.0])
    return DirectLabelColormap(color_dict=colours)


def class_colour_cycle(class_set: ClassSet) -> dict[str, tuple[float, ...]]:
    """Class name -> RGBA, the categorical colour map of the centroid Points layer."""
    cycle = {UNKNOWN: _UNKNOWN_RGBA}
    for n, rgb in zip(class_set.names, class_set.colours):
        cycle[n] = (*(c / 255 for c in rgb), 1.0)
    return cycle


def _instance_features(ids: np.ndarray, classes: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"index": np.asarray(ids, np.int64), "class": np.asarray(classes, np.int64)})


def _point_features(ids: np.ndarray, classes: np.ndarray, class_set: ClassSet) -> pd.DataFrame:
    names = class_names(class_set)
    return pd.DataFrame(
        {
            "id": np.asarray(ids, np.int64),
            "class": pd.Categorical([names[int(c)] for c in classes], categories=names),
        }
    )


def layout_to_layers(
    layout: Layout, name: str = "layout", selected_class: int = 1, translate: tuple[float, float] = (0.0, 0.0)
) -> list[LayerDataTuple]:
    """The three LayerData tuples (instances, classes, centroids) of ``layout``.

    Nucleus ids are ``1..N`` as in the Layout; ``selected_class`` is the class new points
    get (the centroid layer's ``feature_defaults``); ``translate`` (y, x) places the layers
    in the world (e.g. beside another layout).
    """
    cs = layout.class_set
    names = layer_names(name)
    ids = np.arange(1, layout.num_nuclei + 1)
    inst_kwargs = {
        "name": names["instances"],
        "features": _instance_features(ids, layout.classes),
        "metadata": _meta("instances", name, cs),
        "opacity": 0.9,
    }
    cls_kwargs = {
        "name": names["classes"],
        "colormap": class_colormap(cs),
        "metadata": _meta("classes", name, cs),
        "opacity": 0.5,
    }
    pt_kwargs = {
        "name": names["centroids"],
        "features": _point_features(ids, layout.classes, cs),
        "feature_defaults": {"id": 0, "class": class_names(cs)[selected_class]},
        "face_color": "class",
        "face_color_cycle": class_colour_cycle(cs),
        "border_color": "white",
        "border_width": 0.1,
        "size": max(3.0, min(layout.shape) / 64),
        "metadata": _meta("centroids", name, cs),
    }
    for kw in (inst_kwargs, cls_kwargs, pt_kwargs):
        kw["translate"] = tuple(float(t) for t in translate)
    return [
        (layout.inst_map.copy(), inst_kwargs, "labels"),
        (layout.type_map(), cls_kwargs, "labels"),
        (layout.centroids.copy(), pt_kwargs, "points"),
    ]


def sample_to_layers(sample: Sample, name: str = "sample") -> list[LayerDataTuple]:
    """An image layer ``"<name> image"`` followed by the layout's three layers."""
    img_kwargs = {"name": f"{name} image", "rgb": True, "metadata": {META: {"role": "image", "layout": name,
                  "provenance": _jsonable(sample.provenance)}}}
    return [(sample.image, img_kwargs, "image"), *layout_to_layers(sample.layout, name)]


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out[str(k)] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return out


# ---------------------------------------------------------------------- reading back
def class_set_of(layer: Any) -> ClassSet | None:
    """The ClassSet a nucsynth layer (or a layer's metadata dict) carries, or None."""
    meta = (layer if isinstance(layer, dict) else getattr(layer, "metadata", {})).get(META)
    return ClassSet.from_dict(meta["class_set"]) if meta and "class_set" in meta else None


def _class_ids(values: Any, n: int, class_set: ClassSet) -> np.ndarray:
    """Class ids from a ``class`` feature column holding class names or ids."""
    if values is None or n == 0:
        return np.zeros(n, np.int64)
    lookup = {name: k for k, name in enumerate(class_names(class_set))}
    out = []
    for v in values:
        if isinstance(v, str):
            if v not in lookup:
                raise ValueError(f"point class {v!r} is not in the class set {list(class_set.names)}")
            out.append(lookup[v])
        else:
            out.append(int(v))
    return np.asarray(out, np.int64)


def _class_ids_of_points(points: Any, class_set: ClassSet) -> np.ndarray:
    """Class ids of the centroid points."""
    return _class_ids(points.features.get("class"), len(points.data), class_set)


def _pixel_stats(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids present in ``inst`` (sorted, > 0) and their centres of mass (y, x)."""
    flat = inst.ravel().astype(np.int64)
    n = int(flat.max()) if flat.size else 0
    count = np.bincount(flat, minlength=n + 1)
    ys, xs = np.indices(inst.shape, dtype=np.float64)
    sy = np.bincount(flat, weights=ys.ravel(), minlength=n + 1)
    sx = np.bincount(flat, weights=xs.ravel(), minlength=n + 1)
    ids = np.flatnonzero(count)
    ids = ids[ids > 0]
    cen = np.stack([sy[ids] / count[ids], sx[ids] / count[ids]], axis=1) if ids.size else np.zeros((0, 2))
    return ids, cen


def layers_to_layout(instances: Any, centroids: Any | None = None, class_set: ClassSet | None = None) -> Layout:
    """Read a Layout back from an instance Labels layer and (optionally) its centroid Points.

    Classes come from the instance layer's ``features`` (``index``, ``class``), else from
    the points' ``class`` feature, else 0 (unknown). Nuclei with pixels get ids 1..M in
    increasing order of their layer id and their centre of mass as centroid; points with no
    pixels (a point layout) follow as ids M+1.. with the point as centroid.
    """
    class_set = class_set or class_set_of(instances) or (class_set_of(centroids) if centroids is not None else None)
    if class_set is None:
        raise ValueError(
            f"layer {instances.name!r} carries no class set (metadata['nucsynth']['class_set']); "
            "pass class_set= explicitly"
        )
    return layout_from_parts(
        np.asarray(instances.data),
        instances.features,
        None if centroids is None else np.asarray(centroids.data),
        None if centroids is None else centroids.features,
        class_set,
        what=f"layer {instances.name!r}",
    )


def layout_from_parts(
    inst: np.ndarray,
    inst_features: Any,
    points: np.ndarray | None,
    point_features: Any,
    class_set: ClassSet,
    what: str = "labels",
) -> Layout:
    """The Layout held by layer data: an instance map with its features table and optional
    centroid points with theirs (see :func:`layers_to_layout`)."""
    inst = np.asarray(inst)
    if inst.ndim != 2:
        raise ValueError(f"{what} must be 2D (H, W), got shape {inst.shape}")
    if inst.dtype.kind not in "iub":
        raise ValueError(f"{what} must hold integer labels, got dtype {inst.dtype}")
    if inst.size and inst.min() < 0:
        raise ValueError(f"{what} holds negative labels; nucleus ids must be >= 0")
    cls_of: dict[int, int] = {}
    pt_ids = np.zeros(0, np.int64)
    pt_pos = np.zeros((0, 2))
    if points is not None and len(points):
        pt_pos = np.asarray(points, np.float64)[:, -2:]
        feats = pd.DataFrame(point_features) if point_features is not None else pd.DataFrame()
        pt_cls = _class_ids(feats.get("class"), len(pt_pos), class_set)
        pt_ids = np.asarray(feats["id"], np.int64) if "id" in feats else np.zeros(len(pt_pos), np.int64)
        cls_of.update({int(i): int(c) for i, c in zip(pt_ids, pt_cls) if i > 0})
    feats = pd.DataFrame(inst_features) if inst_features is not None else pd.DataFrame()
    if "class" in feats and "index" in feats:
        cls_of.update({int(i): int(c) for i, c in zip(feats["index"], feats["class"])})
    ids, cen = _pixel_stats(inst)
    lut = np.zeros(int(inst.max()) + 1 if inst.size else 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    classes = [cls_of.get(int(i), 0) for i in ids]
    cents = [cen]
    present = set(ids.tolist())
    for p, i in zip(pt_pos, pt_ids):
        if int(i) not in present:
            classes.append(cls_of.get(int(i), 0) if i > 0 else 0)
            cents.append(p[None])
    h, w = inst.shape
    allc = np.concatenate(cents)
    allc[:, 0] = allc[:, 0].clip(-0.5, h - 0.5)  # a point dropped on the canvas edge stays valid
    allc[:, 1] = allc[:, 1].clip(-0.5, w - 0.5)
    return Layout(lut[inst], np.asarray(classes, np.int64), allc, class_set)


def find_layout_names(layers: Iterable[Any]) -> list[str]:
    """Base names of the layouts whose instance layer is among ``layers``."""
    out = []
    for layer in layers:
        meta = getattr(layer, "metadata", {}).get(META)
        if meta and meta.get("role") == "instances" and meta.get("layout") not in out:
            out.append(meta["layout"])
    return out


def role_of(layer: Any) -> str | None:
    """The nucsynth role of a layer ("instances", "classes", "centroids", "image"), or None."""
    meta = (layer if isinstance(layer, dict) else getattr(layer, "metadata", {})).get(META)
    return meta.get("role") if isinstance(meta, dict) else None


def adopt_renamed(layer: Any) -> None:
    """Keep a layout's layer names stable when napari de-duplicated them on insertion.

    napari names a second "x instances" "x instances [1]"; that layer (and its siblings)
    becomes the layout "x [1]", named "x [1] instances".
    """
    meta = getattr(layer, "metadata", {}).get(META)
    if not isinstance(meta, dict) or meta.get("role") not in (*ROLES, "image"):
        return
    role, base = meta["role"], meta.get("layout", "")
    expected = f"{base} {role}"
    prefix = expected + " "
    if layer.name == expected or not layer.name.startswith(prefix):
        return
    suffix = layer.name[len(prefix):]
    new_base = f"{base} {suffix}"
    layer.metadata = {**layer.metadata, META: {**meta, "layout": new_base}}
    layer.name = f"{new_base} {role}"


# ---------------------------------------------------------------------- live binding
_BOUND: "weakref.WeakKeyDictionary[Any, LayoutLayers]" = weakref.WeakKeyDictionary()


class LayoutLayers:
    """The three layers of one layout in a viewer, kept consistent while the user edits.

    Build it with :meth:`show` (adds or updates the layers) or :meth:`attach` (binds layers
    already in the viewer, e.g. opened by the reader). The model is a table of nuclei keyed
    by their layer id: class, centroid, and whether the nucleus has pixels.
    """

    changed = Signal()  # emitted after any edit (counts, classes, positions)
    notice = Signal(str)  # a message for the user (an edit that was refused)

    def __init__(self, viewer: Any, name: str, class_set: ClassSet) -> None:
        self.viewer = viewer
        self.name = name
        self.class_set = class_set
        self._selected_class = 1
        self._updating = False
        self._dragging = False
        self._pending_move = False
        self._pending_classes = False
        names = layer_names(name)
        self.instances = viewer.layers[names["instances"]]
        self.classes = viewer.layers[names["classes"]]
        self.centroids = viewer.layers[names["centroids"]]
        self._load_model()
        self.instances.events.paint.connect(self._on_instances_edit)
        self.instances.events.data.connect(self._on_instances_edit)
        self.instances.events.set_data.connect(self._on_instances_edit)  # undo / redo
        self.classes.events.paint.connect(self._on_classes_edit)
        self.classes.events.labels_update.connect(self._on_classes_written)
        self.centroids.events.data.connect(self._on_points_edit)
        self.centroids.mouse_drag_callbacks.append(self._drag_guard)
        _BOUND[self.instances] = self

    # ------------------------------------------------------------------ construction
    @classmethod
    def show(
        cls,
        viewer: Any,
        layout: Layout,
        name: str = "layout",
        selected_class: int = 1,
        translate: tuple[float, float] | None = None,
    ) -> "LayoutLayers":
        """Show ``layout`` as the layers called ``name``: update them if present, else add
        (at ``translate`` (y, x), default the origin)."""
        names = layer_names(name)
        existing = [n for n in names.values() if n in viewer.layers]
        if len(existing) == 3:
            ctrl = cls.attach(viewer, name)
            if ctrl.class_set != layout.class_set:
                ctrl = cls._rebuild(viewer, layout, name, selected_class, translate)
            else:
                ctrl.set_layout(layout)
                if translate is not None:
                    for layer in (ctrl.instances, ctrl.classes, ctrl.centroids):
                        layer.translate = translate
            ctrl.selected_class = selected_class
            return ctrl
        for n in existing:  # a partial set (the user deleted one): rebuild all three
            viewer.layers.remove(n)
        return cls._rebuild(viewer, layout, name, selected_class, translate)

    @classmethod
    def _rebuild(
        cls, viewer: Any, layout: Layout, name: str, selected_class: int, translate: tuple[float, float] | None
    ) -> "LayoutLayers":
        for n in layer_names(name).values():
            if n in viewer.layers:
                viewer.layers.remove(n)
        for data, kwargs, kind in layout_to_layers(layout, name, selected_class, translate or (0.0, 0.0)):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
        viewer.layers[layer_names(name)["instances"]].contour = 1
        ctrl = cls.attach(viewer, name)  # a dock may have bound the new layers already
        ctrl.selected_class = selected_class
        return ctrl

    @classmethod
    def attach(cls, viewer: Any, name: str) -> "LayoutLayers":
        """The controller of the layers called ``name`` (created on first use)."""
        names = layer_names(name)
        missing = [n for n in names.values() if n not in viewer.layers]
        if missing:
            raise ValueError(f"layout {name!r}: layers {missing} are not in the viewer")
        inst = viewer.layers[names["instances"]]
        if inst in _BOUND and _BOUND[inst].viewer is viewer:
            return _BOUND[inst]
        cs = class_set_of(inst)
        if cs is None:
            raise ValueError(f"layer {inst.name!r} carries no nucsynth class set in its metadata")
        return cls(viewer, name, cs)

    # ------------------------------------------------------------------ model
    def _load_model(self) -> None:
        lay = layers_to_layout(self.instances, self.centroids, self.class_set)
        self._write(lay)

    def _write(self, layout: Layout) -> None:
        """Make the three layers show ``layout`` exactly (ids 1..N)."""
        n = layout.num_nuclei
        self._cls = {i + 1: int(c) for i, c in enumerate(layout.classes)}
        self._pos = {i + 1: layout.centroids[i].copy() for i in range(n)}
        areas = layout.areas()
        self._has_pixels = {i + 1 for i in range(n) if areas[i] > 0}
        self._updating = True
        try:
            self.instances.data = layout.inst_map.copy()
            self._last_inst = layout.inst_map.copy()
        finally:
            self._updating = False
        self._publish(classes_map=True)

    def _next_id(self) -> int:
        used = max(self._cls, default=0)
        return max(used, int(self._last_inst.max()) if self._last_inst.size else 0) + 1

    def _publish(self, classes_map: bool = True) -> None:
        """Push the model to the features tables, the class layer and the points."""
        ids = np.array(sorted(self._cls), np.int64)
        cls = np.array([self._cls[i] for i in ids], np.int64)
        pos = np.array([self._pos[i] for i in ids]).reshape(-1, 2)
        self._updating = True
        try:
            self.instances.features = _instance_features(ids, cls)
            if classes_map:
                lut = np.zeros(int(max(ids.max(initial=0), self._last_inst.max(initial=0))) + 1, np.int32)
                lut[ids] = cls
                self.classes.data = lut[self._last_inst]
            self.centroids.data = pos
            self.centroids.features = _point_features(ids, cls, self.class_set)
            self._set_point_defaults()
            self.centroids.refresh_colors()
        finally:
            self._updating = False
        self.changed.emit()

    def _set_point_defaults(self) -> None:
        self.centroids.feature_defaults = {"id": 0, "class": class_names(self.class_set)[self._selected_class]}

    # ------------------------------------------------------------------ public API
    @property
    def selected_class(self) -> int:
        """The class new nuclei and new points get (1..K, or 0 for unknown)."""
        return self._selected_class

    @selected_class.setter
    def selected_class(self, k: int) -> None:
        if not 0 <= int(k) <= self.class_set.num_classes:
            raise ValueError(f"class {k} is outside 0..{self.class_set.num_classes} of {self.class_set.name!r}")
        self._selected_class = int(k)
        self._updating = True
        try:
            self._set_point_defaults()
            self.centroids.current_face_color = class_colour_cycle(self.class_set)[class_names(self.class_set)[int(k)]]
            if k > 0:
                self.classes.selected_label = int(k)
        finally:
            self._updating = False

    def remove(self) -> None:
        """Remove this layout's layers from the viewer."""
        for layer in (self.instances, self.classes, self.centroids):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def new_nucleus_label(self) -> int:
        """Select a fresh id on the instance layer (the next stroke paints a new nucleus)."""
        nid = self._next_id()
        self.instances.selected_label = nid
        return nid

    def layout(self) -> Layout:
        """The current Layout (ids relabelled 1..N)."""
        return layers_to_layout(self.instances, self.centroids, self.class_set)

    def set_layout(self, layout: Layout) -> None:
        """Replace the shown layout (same layers, new data)."""
        if layout.class_set != self.class_set:
            raise ValueError(
                f"layout has class set {layout.class_set.name!r}, layers show {self.class_set.name!r}"
            )
        self._write(layout)

    def class_counts(self) -> np.ndarray:
        """Nuclei per class (index 0 = unknown) in the current layout."""
        cls = np.fromiter(self._cls.values(), np.int64, len(self._cls))
        return np.bincount(cls, minlength=self.class_set.num_classes + 1)

    def set_class(self, ids: Iterable[int], k: int) -> None:
        """Give nuclei ``ids`` (layer ids) class ``k``."""
        if not 0 <= int(k) <= self.class_set.num_classes:
            raise ValueError(f"class {k} is outside 0..{self.class_set.num_classes}")
        for i in ids:
            if int(i) not in self._cls:
                raise ValueError(f"no nucleus with id {i} in layout {self.name!r}")
            self._cls[int(i)] = int(k)
        self._publish()

    def selected_point_ids(self) -> list[int]:
        """Layer ids of the nuclei whose centroid points are selected."""
        idx = sorted(self.centroids.selected_data)
        return [int(self.centroids.features["id"].iloc[i]) for i in idx]

    # ------------------------------------------------------------------ event handlers
    def _on_instances_edit(self, event: Any = None) -> None:
        if self._updating:
            return
        inst = _after_paint(self.instances.data, event)
        if inst.shape == self._last_inst.shape and np.array_equal(inst, self._last_inst):
            return
        ids, cen = _pixel_stats(inst)
        present = set(ids.tolist())
        for i in list(self._has_pixels - present):  # erased to the last pixel: delete
            self._has_pixels.discard(i)
            self._cls.pop(i, None)
            self._pos.pop(i, None)
        for i, c in zip(ids.tolist(), cen):
            if i not in self._cls:
                self._cls[i] = self._selected_class
            self._has_pixels.add(i)
            self._pos[i] = c
        self._last_inst = inst.copy()
        self._publish()

    def _on_classes_edit(self, event: Any = None) -> None:
        """Painting class k over nuclei re-classes them; paint off nuclei is undone."""
        if self._updating:
            return
        painted = _after_paint(self.classes.data, event)
        if not np.array_equal(painted, np.asarray(self.classes.data)):
            # a programmatic paint announces itself before writing: act once it is written
            self._pending_classes = True
            return
        ids = np.array(sorted(self._cls), np.int64)
        lut = np.zeros(int(max(ids.max(initial=0), self._last_inst.max(initial=0))) + 1, np.int64)
        lut[ids] = [self._cls[i] for i in ids]
        expected = lut[self._last_inst]
        diff = (painted != expected) & (self._last_inst > 0)
        if diff.any():
            touched = self._last_inst[diff]
            values = painted[diff]
            for i in np.unique(touched):
                vals = values[touched == i]
                self._cls[int(i)] = int(np.bincount(vals).argmax())  # the majority of the stroke
        self._publish(classes_map=True)

    def _on_classes_written(self, event: Any = None) -> None:
        if self._pending_classes and not self._updating:
            self._pending_classes = False
            self._on_classes_edit()

    def _drag_guard(self, layer: Any, event: Any):
        """Defer nucleus moves until the mouse is released (one move per drag)."""
        self._dragging = True
        yield
        while event.type == "mouse_move":
            yield
        self._dragging = False
        if self._pending_move:
            self._pending_move = False
            self._reconcile_points()

    def _on_points_edit(self, event: Any) -> None:
        if self._updating:
            return
        action = str(getattr(event, "action", "changed"))
        if action.endswith("ing"):  # adding / removing / changing: wait for the result
            return
        if action == "changed" and self._dragging:
            self._pending_move = True
            return
        self._reconcile_points()

    def _reconcile_points(self) -> None:
        """Bring the model in line with the points: new, deleted and moved nuclei."""
        pts = np.asarray(self.centroids.data, np.float64).reshape(-1, 2)
        feats = self.centroids.features
        pid = np.asarray(feats["id"], np.int64) if "id" in feats else np.zeros(len(pts), np.int64)
        pcls = _class_ids_of_points(self.centroids, self.class_set)
        seen: set[int] = set()
        inst = np.asarray(self.instances.data).copy()
        inst_changed = False
        refused: list[int] = []
        h, w = inst.shape
        for p, i, c in zip(pts, pid.tolist(), pcls.tolist()):
            p = np.array([np.clip(p[0], -0.5, h - 0.5), np.clip(p[1], -0.5, w - 0.5)])
            if i <= 0 or i not in self._cls or i in seen:  # a new point: a nucleus with no pixels
                i = self._next_id()
                self._cls[i] = c
                self._pos[i] = p
            elif not np.allclose(p, self._pos[i]):
                if i in self._has_pixels:
                    dy, dx = (int(v) for v in np.rint(p - self._pos[i]))
                    if shift_nucleus(inst, i, dy, dx):
                        inst_changed = True
                    elif dy or dx:
                        refused.append(i)
                else:
                    self._pos[i] = p
            seen.add(i)
        for i in list(set(self._cls) - seen):  # deleted points delete their nuclei
            if i in self._has_pixels:
                inst[inst == i] = 0
                inst_changed = True
            self._cls.pop(i)
            self._pos.pop(i)
            self._has_pixels.discard(i)
        if inst_changed:
            self._updating = True
            try:
                self.instances.data = inst
            finally:
                self._updating = False
            ids, cen = _pixel_stats(inst)
            for i, c in zip(ids.tolist(), cen):
                self._pos[i] = c
            self._has_pixels = set(ids.tolist()) & set(self._cls)
            self._last_inst = inst.copy()
        self._publish()  # a refused move puts its point back on the nucleus
        if refused:
            self.notice.emit(
                f"nuclei {refused} not moved: they would leave the canvas or overlap another nucleus"
            )


def _after_paint(data: Any, event: Any) -> np.ndarray:
    """The labels after a paint event.

    napari emits ``paint`` before writing a programmatic edit and after a mouse stroke, so
    the event's history atoms are replayed forward on a copy (idempotent either way).
    """
    arr = np.asarray(data)
    atoms = getattr(event, "value", None) if getattr(event, "type", "") == "paint" else None
    if not atoms:
        return arr
    out = arr.copy()
    for atom in atoms:
        if hasattr(atom, "slice_key"):  # a mask-based atom (paint, fill, polygon)
            region = out[atom.slice_key]
            if atom.mask is None:
                region[...] = atom.new_value
            else:
                region[atom.mask] = atom.new_value
        else:  # the (indices, old_values, new_values) form of data_setitem
            indices, _, new = atom
            out[indices] = new
    return out
