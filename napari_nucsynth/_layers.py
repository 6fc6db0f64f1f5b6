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
deleting a point deletes its nucleus, erasing a nucleus' last pixel deletes it. Each edit
is one step of the layout's own undo history (Ctrl+Z / Ctrl+Shift+Z on its layers), edits
the layout cannot hold are refused, and lost or renamed layers can be rebuilt
(:meth:`LayoutLayers.recover`).
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass
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
    "broken_layouts",
    "remove_layers",
    "free_origin",
    "unused_name",
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


def instance_colormap() -> Any:
    """One colour (white) for every nucleus id: instance layers show outlines, not random
    colours that could be read as classes (the classes layer carries the class colours)."""
    from napari.utils.colormaps import CyclicLabelColormap

    return CyclicLabelColormap(colors=np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))


def point_size(layout: Layout) -> float:
    """Centroid marker diameter (px): 0.3x the median nucleus diameter, 1.5..6 px (4 px for
    a point layout), so markers sit inside their nuclei at any image size and leave most of
    each nucleus visible."""
    areas = layout.areas()
    areas = areas[areas > 0]
    if areas.size == 0:
        return 4.0
    return float(np.clip(0.3 * 2.0 * np.sqrt(np.median(areas) / np.pi), 1.5, 6.0))


def layout_to_layers(
    layout: Layout,
    name: str = "layout",
    selected_class: int = 1,
    translate: tuple[float, float] = (0.0, 0.0),
    over_image: bool = False,
) -> list[LayerDataTuple]:
    """The three LayerData tuples (instances, classes, centroids) of ``layout``.

    Nucleus ids are ``1..N`` as in the Layout; ``selected_class`` is the class new points
    get (the centroid layer's ``feature_defaults``); ``translate`` (y, x) places the layers
    in the world (e.g. beside another layout). ``over_image``: the layout lies on its
    image, so the fills are faint and the tissue shows through (the controller draws the
    instances as outlines once bound, see :class:`LayoutLayers`).
    """
    cs = layout.class_set
    names = layer_names(name)
    ids = np.arange(1, layout.num_nuclei + 1)
    inst_kwargs = {
        "name": names["instances"],
        "features": _instance_features(ids, layout.classes),
        "metadata": _meta("instances", name, cs),
        "colormap": instance_colormap(),
        "opacity": 0.35 if over_image else 0.8,
    }
    cls_kwargs = {
        "name": names["classes"],
        "colormap": class_colormap(cs),
        "metadata": _meta("classes", name, cs),
        "opacity": 0.3 if over_image else 0.5,
    }
    pt_kwargs = {
        "name": names["centroids"],
        "features": _point_features(ids, layout.classes, cs),
        "feature_defaults": {"id": 0, "class": class_names(cs)[selected_class]},
        "face_color": "class",
        "face_color_cycle": class_colour_cycle(cs),
        "border_color": "white",
        "border_width": 0.1,
        "size": point_size(layout),
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
    """An image layer ``"<name> image"`` followed by the layout's three layers (faint, so
    the tissue shows)."""
    img_kwargs = {"name": f"{name} image", "rgb": True, "metadata": {META: {"role": "image", "layout": name,
                  "provenance": _jsonable(sample.provenance)}}}
    return [(sample.image, img_kwargs, "image"), *layout_to_layers(sample.layout, name, over_image=True)]


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
    """Ids present in ``inst`` (sorted, > 0) and their centres of mass (y, x); memory is
    linear in pixels and nuclei, never in the largest id."""
    flat = np.asarray(inst).ravel()
    top = int(flat.max(initial=0))
    if top <= 4 * flat.size + 1024:  # small ids: count directly
        uniq, inv = np.arange(top + 1), flat.astype(np.intp)
    else:
        uniq, inv = np.unique(flat, return_inverse=True)
    count = np.bincount(inv, minlength=uniq.size)
    ys, xs = np.indices(inst.shape, dtype=np.float64)
    sy = np.bincount(inv, weights=ys.ravel(), minlength=uniq.size)
    sx = np.bincount(inv, weights=xs.ravel(), minlength=uniq.size)
    keep = (uniq > 0) & (count > 0)
    ids = uniq[keep].astype(np.int64)
    cen = np.stack([sy[keep] / count[keep], sx[keep] / count[keep]], axis=1) if ids.size else np.zeros((0, 2))
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
    relabelled = _lookup(inst, {int(i): k for k, i in enumerate(ids.tolist(), start=1)})
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
    return Layout(relabelled, np.asarray(classes, np.int64), allc, class_set)


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
_OWNER: "weakref.WeakKeyDictionary[Any, LayoutLayers]" = weakref.WeakKeyDictionary()  # layer -> its controller
HISTORY = 100  # undo steps kept per layout


@dataclass(frozen=True)
class _State:
    """One undoable state of a layout: the instance map in layer ids (never written to once
    stored) and, per nucleus id, its class and centroid (y, x)."""

    inst: np.ndarray
    cls: dict[int, int]
    pos: dict[int, tuple[float, float]]

    def same_as(self, other: "_State") -> bool:
        return (
            self.cls == other.cls
            and self.pos == other.pos
            and (self.inst is other.inst or np.array_equal(self.inst, other.inst))
        )


def _ids_with_pixels(inst: np.ndarray) -> set[int]:
    ids = np.unique(inst)
    return set(ids[ids > 0].tolist())


def _write_labels(layer: Any, new: np.ndarray, owned: np.ndarray | None) -> np.ndarray:
    """Make the Labels ``layer`` show ``new`` (H, W); returns the array the layer now holds.

    When the layer still holds ``owned`` (an array this controller gave it earlier) with the
    same shape and dtype, it is overwritten in place and re-drawn: half the time of
    assigning a new array, which also re-computes the viewer's dimensions (measured on
    256 px layouts). Any other array (a file's, a read-only one, another layer's) is never
    written to: the layer gets a copy of ``new``."""
    old = layer.data
    if old is owned and isinstance(old, np.ndarray) and old.shape == new.shape and old.dtype == new.dtype:
        old[...] = new
        layer.refresh()
        return old
    layer.data = new.copy()
    return layer.data


def _lookup(inst: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """``table[id]`` at every pixel (0 on background and ids not in ``table``), in memory
    linear in the pixels and nuclei, never in the largest id."""
    top = int(inst.max(initial=0))
    if top <= 4 * inst.size + 1024:
        lut = np.zeros(top + 1, np.int32)
        for i, v in table.items():
            if 0 < i <= top:
                lut[i] = v
        return lut[inst]
    uniq, inv = np.unique(inst, return_inverse=True)
    vals = np.array([table.get(int(u), 0) if u > 0 else 0 for u in uniq], np.int32)
    return vals[inv].reshape(inst.shape)


def remove_layers(viewer: Any, layers: Iterable[Any]) -> None:
    """Remove ``layers`` (objects or names) from ``viewer``, those still in it.

    napari runs a full garbage collection after each removed layer, which takes about a
    second in a process holding torch; the objects that exist now are frozen meanwhile
    (``gc.freeze``), so each of those collections only sees new objects, and Python's own
    collector frees the removed layers' leftovers later.
    """
    import gc

    gc.freeze()
    try:
        for layer in list(layers):
            if layer in viewer.layers:
                viewer.layers.remove(layer)
    finally:
        gc.unfreeze()


def free_origin(viewer: Any, gap: float = 16.0) -> tuple[float, float]:
    """Where a new layout goes in ``viewer``'s world: right of every layer, ``gap`` px apart
    (the origin when the viewer is empty), so nothing lands on top of open layers."""
    right = [float(ly.extent.world[1][-1]) for ly in viewer.layers if ly.ndim >= 2]
    return (0.0, max(right) + gap) if right else (0.0, 0.0)


def unused_name(viewer: Any, base: str) -> str:
    """``base``, or ``base 1``, ``base 2``... : a layout name none of whose layers exist."""
    name, i = base, 1
    while any(f"{name} {r}" in viewer.layers for r in (*ROLES, "image")):
        name, i = f"{base} {i}", i + 1
    return name


def _undo_key(layer: Any) -> None:
    ctrl = _OWNER.get(layer)
    if ctrl is not None:
        ctrl.undo()


def _redo_key(layer: Any) -> None:
    ctrl = _OWNER.get(layer)
    if ctrl is not None:
        ctrl.redo()


class LayoutLayers:
    """The three layers of one layout in a viewer, kept consistent while the user edits.

    Build it with :meth:`show` (adds or updates the layers) or :meth:`attach` (binds layers
    already in the viewer, e.g. opened by the reader). The model is a table of nuclei keyed
    by their layer id (class, centroid) plus the instance map; every edit (a stroke, a
    point added, moved or deleted, a re-class, a whole new layout) is one step of the
    layout's own undo history, reached by Ctrl+Z / Ctrl+Shift+Z on any of the three layers
    (napari's per-layer paint history is replaced: it would replay old strokes onto a new
    layout). An edit the layout cannot hold (a class outside the class set, a changed canvas
    shape) is refused: the layers go back to the model and :attr:`notice` says why.
    """

    changed = Signal()  # emitted after any edit, undo or redo (counts, classes, positions)
    notice = Signal(str)  # a message for the user (an edit that was refused, nothing to undo)

    def __init__(self, viewer: Any, name: str, class_set: ClassSet) -> None:
        self.viewer = viewer
        self.name = name
        self.class_set = class_set
        self._selected_class = 1
        self._updating = False
        self._dragging = False
        self._pending_move = False
        self._pending_classes = False
        self._undo: deque[_State] = deque(maxlen=HISTORY)
        self._redo: deque[_State] = deque(maxlen=HISTORY)
        self._shown: list[np.ndarray | None] = [None, None]  # the arrays this controller gave instances, classes
        names = layer_names(name)
        self.instances = viewer.layers[names["instances"]]
        self.classes = viewer.layers[names["classes"]]
        self.centroids = viewer.layers[names["centroids"]]
        self._from_layout(layers_to_layout(self.instances, self.centroids, self.class_set))
        self._publish()
        self.instances.contour = 1  # outlines: the tissue under a layout stays visible
        self.instances.opacity = max(self.instances.opacity, 0.8)
        for role in ROLES:
            self._connect(role)

    def _connect(self, role: str) -> None:
        from app_model.types import KeyCode, KeyMod

        layer = getattr(self, role)
        if role == "instances":
            layer.events.paint.connect(self._on_instances_edit)
            layer.events.data.connect(self._on_instances_edit)
            layer.events.set_data.connect(self._on_instances_edit)
        elif role == "classes":
            layer.events.paint.connect(self._on_classes_edit)
            layer.events.labels_update.connect(self._on_classes_written)
        else:
            layer.events.data.connect(self._on_points_edit)
            layer.mouse_drag_callbacks.append(self._drag_guard)
        layer.bind_key(KeyMod.CtrlCmd | KeyCode.KeyZ, _undo_key, overwrite=True)
        layer.bind_key(KeyMod.CtrlCmd | KeyMod.Shift | KeyCode.KeyZ, _redo_key, overwrite=True)
        _OWNER[layer] = self

    def layers(self) -> tuple[Any, Any, Any]:
        """The (instances, classes, centroids) layers."""
        return self.instances, self.classes, self.centroids

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
        """Show ``layout`` as the layers called ``name``: update them if present (one undo
        step), else add them (at ``translate`` (y, x), default the origin)."""
        names = layer_names(name)
        existing = [n for n in names.values() if n in viewer.layers]
        if len(existing) == 3:
            ctrl = cls.attach(viewer, name)
            if ctrl.class_set != layout.class_set:
                ctrl = cls._rebuild(viewer, layout, name, selected_class, translate)
            else:
                ctrl.set_layout(layout)
                if translate is not None:
                    for layer in ctrl.layers():
                        if not np.allclose(layer.translate[-2:], translate):  # each move re-slices the viewer
                            layer.translate = translate
            ctrl.selected_class = selected_class
            return ctrl
        return cls._rebuild(viewer, layout, name, selected_class, translate)

    @classmethod
    def _rebuild(
        cls, viewer: Any, layout: Layout, name: str, selected_class: int, translate: tuple[float, float] | None
    ) -> "LayoutLayers":
        remove_layers(viewer, _layers_of(viewer, name).values())  # also a partial or renamed set
        for data, kwargs, kind in layout_to_layers(layout, name, selected_class, translate or (0.0, 0.0)):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
        ctrl = cls.attach(viewer, name)  # a dock may have bound the new layers already
        ctrl.selected_class = selected_class
        return ctrl

    @classmethod
    def attach(cls, viewer: Any, name: str) -> "LayoutLayers":
        """The controller of the layers called ``name`` (created on first use)."""
        names = layer_names(name)
        missing = [n for n in names.values() if n not in viewer.layers]
        if missing:
            raise ValueError(f"layout {name!r}: layers {missing} are not in the viewer (Repair layers rebuilds them)")
        inst = viewer.layers[names["instances"]]
        if inst in _OWNER and _OWNER[inst].viewer is viewer:
            return _OWNER[inst]
        cs = class_set_of(inst)
        if cs is None:
            raise ValueError(f"layer {inst.name!r} carries no nucsynth class set in its metadata")
        return cls(viewer, name, cs)

    @classmethod
    def recover(cls, viewer: Any, name: str) -> "LayoutLayers":
        """Rebuild the layout ``name`` whose layers were deleted or renamed, from what is
        left: its live controller if one exists, else its instances layer (with the
        centroids, if present), else its centroids as a point layout.

        Raises ValueError when none of the three layers is left.
        """
        found = _layers_of(viewer, name)
        owner = next((_OWNER[ly] for ly in found.values() if ly in _OWNER and _OWNER[ly].viewer is viewer), None)
        if owner is not None:
            owner.repair()
            return owner
        if "instances" in found:
            layout = layers_to_layout(found["instances"], found.get("centroids"))
        elif "centroids" in found:
            pts = found["centroids"]
            cs = class_set_of(pts)
            shape = found["classes"].data.shape if "classes" in found else _extent(np.asarray(pts.data))
            layout = layout_from_parts(np.zeros(shape, np.int32), None, np.asarray(pts.data), pts.features, cs,
                                       what=f"layer {pts.name!r}")
        else:
            raise ValueError(f"layout {name!r}: neither its instances nor its centroids layer is left to rebuild from")
        translate = tuple(float(t) for t in next(iter(found.values())).translate[-2:])
        return cls._rebuild(viewer, layout, name, 1, translate)

    # ------------------------------------------------------------------ model
    def _state(self) -> _State:
        return _State(self._inst, dict(self._cls), dict(self._pos))

    def _from_layout(self, layout: Layout) -> None:
        n = layout.num_nuclei
        self._inst = layout.inst_map.copy()
        self._cls = {i + 1: int(c) for i, c in enumerate(layout.classes)}
        self._pos = {i + 1: (float(p[0]), float(p[1])) for i, p in enumerate(layout.centroids[:n])}
        self._has_pixels = _ids_with_pixels(self._inst)
        self._show_inst()

    def _show_inst(self) -> None:
        self._updating = True
        try:
            self._shown[0] = _write_labels(self.instances, self._inst, self._shown[0])  # painted on in place
        finally:
            self._updating = False

    def _apply(self, state: _State) -> None:
        """Make the model and the three layers ``state``."""
        self._inst = state.inst
        self._cls = dict(state.cls)
        self._pos = dict(state.pos)
        self._has_pixels = _ids_with_pixels(self._inst)
        self._show_inst()
        self._forget_napari_history()
        self._publish()

    def _commit(self, before: _State) -> None:
        """One undo step from ``before`` to the model (if it changed), shown in the layers."""
        if not self._state().same_as(before):
            self._undo.append(before)
            self._redo.clear()
        self._forget_napari_history()
        self._publish()

    def _refuse(self, why: str) -> None:
        """Put the layers back to the model and say why."""
        self._apply(self._state())
        self.notice.emit(why)

    def _forget_napari_history(self) -> None:
        for layer in (self.instances, self.classes):
            reset = getattr(layer, "_reset_history", None)  # napari's paint history (replaced by ours)
            if reset is not None:
                reset()

    def _next_id(self) -> int:
        used = max(self._cls, default=0)
        return max(used, int(self._inst.max(initial=0))) + 1

    def _publish(self, classes_map: bool = True) -> None:
        """Push the model to the features tables, the class layer and the points."""
        ids = np.array(sorted(self._cls), np.int64)
        cls = np.array([self._cls[i] for i in ids], np.int64)
        pos = np.array([self._pos[i] for i in ids], np.float64).reshape(-1, 2)
        self._updating = True
        try:
            self.instances.features = _instance_features(ids, cls)
            if classes_map:
                self._shown[1] = _write_labels(self.classes, _lookup(self._inst, self._cls), self._shown[1])
            if not np.array_equal(np.asarray(self.centroids.data).reshape(-1, 2), pos):
                self.centroids.data = pos  # setting points re-draws them all: only when they moved
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
        remove_layers(self.viewer, self.layers())

    def new_nucleus_label(self) -> int:
        """Select a fresh id on the instance layer (the next stroke paints a new nucleus)."""
        nid = self._next_id()
        self.instances.selected_label = nid
        return nid

    def layout(self) -> Layout:
        """The current Layout: nuclei with pixels get ids 1..M in increasing layer id, then
        point-only nuclei follow (increasing layer id)."""
        px = sorted(self._has_pixels)
        pt = [i for i in sorted(self._cls) if i not in self._has_pixels]
        order = px + pt
        new_id = {i: k for k, i in enumerate(px, start=1)}
        inst = _lookup(self._inst, new_id)
        classes = np.array([self._cls.get(i, 0) for i in order], np.int64)
        cen = np.array([self._pos[i] for i in order], np.float64).reshape(-1, 2)
        h, w = inst.shape
        cen[:, 0] = cen[:, 0].clip(-0.5, h - 0.5)
        cen[:, 1] = cen[:, 1].clip(-0.5, w - 0.5)
        return Layout(inst, classes, cen, self.class_set)

    def set_layout(self, layout: Layout) -> None:
        """Replace the shown layout (same layers, new data): one undo step."""
        if layout.class_set != self.class_set:
            raise ValueError(
                f"layout has class set {layout.class_set.name!r}, layers show {self.class_set.name!r}"
            )
        before = self._state()
        self._from_layout(layout)
        self._commit(before)

    @property
    def can_undo(self) -> bool:
        """Whether there is an edit to undo."""
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        """Whether there is an undone edit to redo."""
        return bool(self._redo)

    def undo(self) -> bool:
        """Go back one edit (Ctrl+Z on any of the layout's layers); False if there is none."""
        if not self._undo:
            self.notice.emit(f"nothing to undo in layout {self.name!r}")
            return False
        self._redo.append(self._state())
        self._apply(self._undo.pop())
        return True

    def redo(self) -> bool:
        """Redo the last undone edit (Ctrl+Shift+Z); False if there is none."""
        if not self._redo:
            self.notice.emit(f"nothing to redo in layout {self.name!r}")
            return False
        self._undo.append(self._state())
        self._apply(self._redo.pop())
        return True

    def class_counts(self) -> np.ndarray:
        """Nuclei per class (index 0 = unknown) in the current layout."""
        cls = np.fromiter(self._cls.values(), np.int64, len(self._cls))
        return np.bincount(cls, minlength=self.class_set.num_classes + 1)

    def set_class(self, ids: Iterable[int], k: int) -> None:
        """Give nuclei ``ids`` (layer ids) class ``k``: one undo step."""
        if not 0 <= int(k) <= self.class_set.num_classes:
            raise ValueError(f"class {k} is outside 0..{self.class_set.num_classes}")
        ids = [int(i) for i in ids]
        missing = [i for i in ids if i not in self._cls]
        if missing:
            raise ValueError(f"no nucleus with id {missing[0]} in layout {self.name!r}")
        before = self._state()
        for i in ids:
            self._cls[i] = int(k)
        self._commit(before)

    def selected_point_ids(self) -> list[int]:
        """Layer ids of the nuclei whose centroid points are selected."""
        idx = sorted(self.centroids.selected_data)
        return [int(self.centroids.features["id"].iloc[i]) for i in idx]

    # ------------------------------------------------------------------ repair
    def problems(self) -> list[str]:
        """What is wrong with this layout's layers (deleted or renamed); empty when whole."""
        names = layer_names(self.name)
        out = []
        for role, layer in zip(ROLES, self.layers()):
            if layer not in self.viewer.layers:
                out.append(f"{role} layer deleted")
            elif layer.name != names[role]:
                out.append(f"{role} layer renamed to {layer.name!r}")
        return out

    def repair(self) -> None:
        """Re-add deleted layers from the model and give renamed ones their names back."""
        names = layer_names(self.name)
        tuples = dict(zip(ROLES, layout_to_layers(self.layout(), self.name, self._selected_class)))
        translate = next((ly.translate for ly in self.layers() if ly in self.viewer.layers), (0.0, 0.0))
        for role, layer in zip(ROLES, self.layers()):
            if layer not in self.viewer.layers:
                data, kwargs, kind = tuples[role]
                kwargs["translate"] = tuple(translate)
                if role == "instances":
                    data = self._inst.copy()  # layer ids, as the model holds them
                setattr(self, role, getattr(self.viewer, f"add_{kind}")(data, **kwargs))
                self._connect(role)
            elif layer.name != names[role]:
                if names[role] in self.viewer.layers:  # a stranger took the name: it keeps its layer, renamed
                    self.viewer.layers[names[role]].name = f"{names[role]} (other)"
                layer.name = names[role]
        self._publish()

    # ------------------------------------------------------------------ event handlers
    def _on_instances_edit(self, event: Any = None) -> None:
        if self._updating:
            return
        inst = _after_paint(self.instances.data, event)
        if inst.shape != self._inst.shape:
            self._refuse(f"layer {self.instances.name!r} must stay {self._inst.shape}; got {inst.shape}: restored")
            return
        if np.array_equal(inst, self._inst):
            return
        if inst.min(initial=0) < 0:
            self._refuse(f"layer {self.instances.name!r}: nucleus ids must be >= 0; the edit was undone")
            return
        before = self._state()
        diff = inst != self._inst
        touched = set(np.unique(inst[diff]).tolist()) | set(np.unique(self._inst[diff]).tolist())
        ids, cen = _pixel_stats(inst)
        present = set(ids.tolist())
        for i in self._has_pixels - present:  # erased to the last pixel: delete
            self._cls.pop(i, None)
            self._pos.pop(i, None)
        for i, c in zip(ids.tolist(), cen):
            if i not in self._cls:
                self._cls[i] = self._selected_class
            if i in touched or i not in self._pos:  # untouched nuclei keep their given centroid
                self._pos[i] = (float(c[0]), float(c[1]))
        self._has_pixels = present
        self._inst = inst.astype(np.int32, copy=True)
        self._commit(before)

    def _on_classes_edit(self, event: Any = None) -> None:
        """Painting class k over nuclei re-classes them; paint off nuclei is undone; a class
        outside the class set is refused."""
        if self._updating:
            return
        painted = _after_paint(self.classes.data, event)
        if not np.array_equal(painted, np.asarray(self.classes.data)):
            # a programmatic paint announces itself before writing: act once it is written
            self._pending_classes = True
            return
        if painted.shape != self._inst.shape:
            self._refuse(f"layer {self.classes.name!r} must stay {self._inst.shape}; got {painted.shape}: restored")
            return
        expected = _lookup(self._inst, self._cls)
        diff = (painted != expected) & (self._inst > 0)
        k = self.class_set.num_classes
        values = painted[diff]
        bad = np.unique(values[(values < 0) | (values > k)])
        if bad.size:
            self._refuse(
                f"class {int(bad[0])} is not in the class set {self.class_set.name!r} "
                f"(0 = {UNKNOWN}, 1..{k} = {', '.join(self.class_set.names)}): the stroke was undone"
            )
            return
        before = self._state()
        if diff.any():
            touched = self._inst[diff]
            for i in np.unique(touched):
                vals = values[touched == i]
                self._cls[int(i)] = int(np.bincount(vals).argmax())  # the majority of the stroke
        self._commit(before)  # also puts back paint that fell off the nuclei

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
        """Bring the model in line with the points: new, deleted and moved nuclei (one step)."""
        pts = np.asarray(self.centroids.data, np.float64).reshape(-1, 2)
        feats = self.centroids.features
        pid = np.asarray(feats["id"], np.int64) if "id" in feats else np.zeros(len(pts), np.int64)
        try:
            pcls = _class_ids_of_points(self.centroids, self.class_set)
        except ValueError as e:
            self._refuse(f"{e}: the points were put back")
            return
        bad = pcls[(pcls < 0) | (pcls > self.class_set.num_classes)]
        if bad.size:
            self._refuse(f"point class {int(bad[0])} is outside 0..{self.class_set.num_classes}: the points were put back")
            return
        before = self._state()
        seen: set[int] = set()
        inst = self._inst.copy()
        inst_changed = False
        refused: list[int] = []
        h, w = inst.shape
        for p, i, c in zip(pts, pid.tolist(), pcls.tolist()):
            p = (float(np.clip(p[0], -0.5, h - 0.5)), float(np.clip(p[1], -0.5, w - 0.5)))
            if i <= 0 or i not in self._cls or i in seen:  # a new point: a nucleus with no pixels
                i = self._next_id()
                self._cls[i] = c
                self._pos[i] = p
            elif not np.allclose(p, self._pos[i]):
                if i in self._has_pixels:
                    dy, dx = (int(v) for v in np.rint(np.subtract(p, self._pos[i])))
                    if shift_nucleus(inst, i, dy, dx):
                        inst_changed = True
                        self._pos[i] = (self._pos[i][0] + dy, self._pos[i][1] + dx)
                    elif dy or dx:
                        refused.append(i)
                else:
                    self._pos[i] = p
            seen.add(i)
        for i in set(self._cls) - seen:  # deleted points delete their nuclei
            if i in self._has_pixels:
                inst[inst == i] = 0
                inst_changed = True
            self._cls.pop(i)
            self._pos.pop(i)
        if inst_changed:
            self._inst = inst
            self._has_pixels = _ids_with_pixels(inst)
            self._show_inst()
        self._commit(before)  # a refused move puts its point back on the nucleus
        if refused:
            self.notice.emit(
                f"nuclei {refused} not moved: they would leave the canvas or overlap another nucleus"
            )


def _layers_of(viewer: Any, name: str) -> dict[str, Any]:
    """The layers of layout ``name`` in ``viewer`` by role, found by their metadata (so
    renamed ones too) or, failing that, by their stable names."""
    found: dict[str, Any] = {}
    for layer in viewer.layers:
        meta = getattr(layer, "metadata", {}).get(META)
        if isinstance(meta, dict) and meta.get("layout") == name and meta.get("role") in ROLES:
            found.setdefault(meta["role"], layer)
    for role, n in layer_names(name).items():
        if role not in found and n in viewer.layers:
            found[role] = viewer.layers[n]
    return found


def broken_layouts(layers: Iterable[Any]) -> dict[str, list[str]]:
    """Layouts (by name) whose three layers are not all present under their stable names,
    with what is wrong: a role missing, or a layer renamed."""
    seen: dict[str, dict[str, str]] = {}
    for layer in layers:
        meta = getattr(layer, "metadata", {}).get(META)
        if isinstance(meta, dict) and meta.get("role") in ROLES and meta.get("layout"):
            seen.setdefault(meta["layout"], {})[meta["role"]] = layer.name
    out: dict[str, list[str]] = {}
    for name, roles in seen.items():
        names = layer_names(name)
        issues = [f"{r} layer deleted" for r in ROLES if r not in roles]
        issues += [f"{r} layer renamed to {roles[r]!r}" for r in ROLES if r in roles and roles[r] != names[r]]
        if issues:
            out[name] = issues
    return out


def _extent(points: np.ndarray) -> tuple[int, int]:
    """The smallest canvas (H, W) that holds ``points`` (y, x)."""
    if not len(points):
        raise ValueError("no points to size a canvas from")
    top = np.ceil(np.asarray(points, np.float64)[:, -2:].max(axis=0) + 1).astype(int)
    return int(max(top[0], 1)), int(max(top[1], 1))


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
