"""The data contract: ClassSet, Layout and Sample, and the maps derived from a Layout.

A Layout is what a user designs and what every model is conditioned on:

- ``inst_map``: int32 (H, W), 0 background, nuclei 1..N;
- ``classes``: int64 (N,), class of nucleus ``i + 1`` (0 = unknown / any class);
- ``centroids``: float64 (N, 2) in (y, x) = (row, col) order, pixel centres at integers.

A nucleus may have a centroid and no pixels (a *point layout*, the input of the joint
family); every id present in ``inst_map`` must be ``<= N``. Derived maps (type map, one-hot
channels, edges, HV maps, distance map, point map) are computed on demand and never stored.

Geometric transforms (``rot90``, ``flip``) act on a Layout; ``transform_hv`` applies the
same transform to already derived HV maps, fixing their signs, so that deriving then
transforming equals transforming then deriving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "ClassSet",
    "Layout",
    "Sample",
    "LayoutError",
    "ClassSetMismatch",
    "class_lut",
    "parse_class_map",
    "CONSEP_CLASSES",
    "NUCLEUS_CLASSES",
    "PANNUKE_CLASSES",
    "LIZARD_CLASSES",
    "transform_hv",
    "relabel_contiguous",
]


class LayoutError(ValueError):
    """A Layout, Sample or ClassSet was built from invalid data."""


class ClassSetMismatch(LayoutError):
    """Two class sets name different classes and no mapping says how one maps onto the other."""


Colour = tuple[int, int, int]


@dataclass(frozen=True)
class ClassSet:
    """The nucleus classes of a dataset.

    ``names[k - 1]`` is the name of class ``k`` (class 0 is "unknown / any" and has no entry).
    ``rare`` is the class that DiffMix balancing raises (1-based), or ``None``.
    """

    name: str
    names: tuple[str, ...]
    colours: tuple[Colour, ...]
    rare: int | None = None

    def __post_init__(self) -> None:
        if len(self.names) == 0:
            raise LayoutError(f"ClassSet {self.name!r}: needs at least one class name")
        if len(set(self.names)) != len(self.names):
            raise LayoutError(f"ClassSet {self.name!r}: class names must be unique, got {self.names}")
        if len(self.colours) != len(self.names):
            raise LayoutError(
                f"ClassSet {self.name!r}: {len(self.names)} names but {len(self.colours)} colours"
            )
        for c in self.colours:
            if len(c) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in c):
                raise LayoutError(f"ClassSet {self.name!r}: colour {c!r} is not an RGB triple of 0-255 ints")
        if self.rare is not None and not 1 <= self.rare <= len(self.names):
            raise LayoutError(
                f"ClassSet {self.name!r}: rare class {self.rare} is outside 1..{len(self.names)}"
            )

    @property
    def num_classes(self) -> int:
        """Number of real classes K (class ids 1..K; 0 is unknown)."""
        return len(self.names)

    def index(self, name: str) -> int:
        """The 1-based id of the class called ``name``."""
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise LayoutError(f"ClassSet {self.name!r} has no class {name!r}; classes: {self.names}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (stored in zarr attributes and checkpoints)."""
        return {"name": self.name, "names": list(self.names), "colours": [list(c) for c in self.colours], "rare": self.rare}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClassSet":
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                name=str(d["name"]),
                names=tuple(str(n) for n in d["names"]),
                colours=tuple(tuple(int(v) for v in c) for c in d["colours"]),  # type: ignore[misc]
                rare=None if d.get("rare") is None else int(d["rare"]),
            )
        except KeyError as e:
            raise LayoutError(f"class set description lacks the key {e.args[0]!r}: {dict(d)}") from None


# The 4 merged HoVer-Net CoNSeP classes (Graham et al. 2019); "other" is the rare one.
CONSEP_CLASSES = ClassSet(
    "consep4",
    ("other", "inflammatory", "epithelial", "spindle"),
    ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)),
    rare=1,
)
# Instance-only data (MoNuSeg): one class.
NUCLEUS_CLASSES = ClassSet("nucleus", ("nucleus",), ((0, 200, 255),))
# PanNuke (Gamper et al. 2020): channel order of masks.npy, background channel excluded.
PANNUKE_CLASSES = ClassSet(
    "pannuke5",
    ("neoplastic", "inflammatory", "connective", "dead", "epithelial"),
    ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)),
    rare=4,
)
# Lizard (Graham et al. 2021): class ids 1..6 of its label files.
LIZARD_CLASSES = ClassSet(
    "lizard6",
    ("neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective"),
    ((255, 128, 0), (0, 0, 255), (0, 255, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0)),
    rare=5,
)


ClassMap = Mapping[Any, Any]  # source class (name or 1-based id) -> target class (name, id, or 0 = unknown)


def _class_ref(cs: ClassSet, ref: Any, side: str, allow_unknown: bool) -> int:
    """The id in ``cs`` of a class given by name (any case) or by id; 0 only if ``allow_unknown``."""
    if isinstance(ref, (int, np.integer)) or (isinstance(ref, str) and ref.strip().isdigit()):
        k = int(ref)
        lo = 0 if allow_unknown else 1
        if not lo <= k <= cs.num_classes:
            raise LayoutError(f"class mapping: {side} class id {k} is outside {lo}..{cs.num_classes} of "
                              f"{cs.name!r} {list(cs.names)}")
        return k
    name = str(ref).strip().lower()
    if allow_unknown and name == "unknown":
        return 0
    lookup = {n.strip().lower(): i for i, n in enumerate(cs.names, start=1)}
    if name not in lookup:
        raise LayoutError(f"class mapping: {side} class {ref!r} is not in {cs.name!r} {list(cs.names)}")
    return lookup[name]


def class_lut(source: ClassSet, target: ClassSet, mapping: ClassMap | None = None) -> np.ndarray:
    """How class ids of ``source`` translate to ``target``: int64 (K_source + 1,), ``lut[k]``
    is the target id of source class k (``lut[0] = 0``: unknown stays unknown).

    Classes are matched by NAME (case and surrounding spaces ignored), never by position,
    so the same classes listed in another order translate exactly. ``mapping`` names the
    target class of source classes (keys: source class name or 1-based id; values: target
    class name, id, or 0 / ``"unknown"``); it overrides the name match and may merge
    classes. Raises :class:`ClassSetMismatch` naming every source class that has neither a
    same-named target class nor a mapping entry, and :class:`LayoutError` for a mapping
    entry naming a class that does not exist.
    """
    lut = np.zeros(source.num_classes + 1, np.int64)
    lookup = {n.strip().lower(): i for i, n in enumerate(target.names, start=1)}
    explicit = {_class_ref(source, k, "source", False): _class_ref(target, v, "target", True)
                for k, v in (mapping or {}).items()}
    missing = []
    for k, name in enumerate(source.names, start=1):
        if k in explicit:
            lut[k] = explicit[k]
        elif name.strip().lower() in lookup:
            lut[k] = lookup[name.strip().lower()]
        else:
            missing.append(name)
    if missing:
        example = ",".join(f"{m}={target.names[0]}" for m in missing[:2])
        raise ClassSetMismatch(
            f"class set {source.name!r} {list(source.names)} does not match {target.name!r} {list(target.names)}: "
            f"no class of {target.name!r} is called {missing}; give a class mapping (e.g. {example!r}, "
            f"or NAME=unknown)"
        )
    return lut


def parse_class_map(text: str) -> dict[str, str]:
    """A class mapping from text ``"dead=other, connective=spindle"`` (source=target pairs).

    Raises :class:`LayoutError` for an entry without exactly one ``=`` or with an empty side,
    and for a source class given twice.
    """
    out: dict[str, str] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = [p.strip() for p in item.split("=")]
        if len(parts) != 2 or not all(parts):
            raise LayoutError(f"class mapping entry {item!r}: expected SOURCE=TARGET (e.g. 'dead=other')")
        if parts[0].lower() in {k.lower() for k in out}:
            raise LayoutError(f"class mapping: source class {parts[0]!r} is given twice")
        out[parts[0]] = parts[1]
    if not out:
        raise LayoutError(f"class mapping {text!r} holds no SOURCE=TARGET entry")
    return out


def _as_int_array(a: Any, what: str, ndim: int) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != ndim:
        raise LayoutError(f"{what} must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise LayoutError(f"{what} contains NaN or infinite values")
        if not np.all(arr == np.round(arr)):
            raise LayoutError(f"{what} must hold whole numbers, got non-integer values")
    elif arr.dtype.kind not in "iub":
        raise LayoutError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise LayoutError(f"{what} has negative values (min {arr.min()}); ids and classes must be >= 0")
    return arr


def _centroids_of(inst_map: np.ndarray, n: int) -> np.ndarray:
    """Centre of mass (y, x) of ids 1..n; NaN rows for ids with no pixels."""
    flat = inst_map.ravel()
    at = np.flatnonzero(flat)  # nuclei pixels only: the same sums in the same order, ~2x faster
    ids = flat[at]
    width = inst_map.shape[1]
    count = np.bincount(ids, minlength=n + 1)[1 : n + 1].astype(np.float64)
    sy = np.bincount(ids, weights=(at // width).astype(np.float64), minlength=n + 1)[1 : n + 1]
    sx = np.bincount(ids, weights=(at % width).astype(np.float64), minlength=n + 1)[1 : n + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([sy / count, sx / count], axis=1)


@dataclass(frozen=True, eq=False)
class Layout:
    """Nuclei of one patch: instance map, class per nucleus, centroids (y, x) and ClassSet.

    Build it with :meth:`from_inst_map` (centroids computed) or :meth:`from_points`
    (a point layout with no pixels); the constructor validates everything.
    """

    inst_map: np.ndarray
    classes: np.ndarray
    centroids: np.ndarray
    class_set: ClassSet = CONSEP_CLASSES

    def __post_init__(self) -> None:
        inst = _as_int_array(self.inst_map, "inst_map", 2)
        if inst.size == 0:
            raise LayoutError(f"inst_map is empty (shape {inst.shape}); a layout needs at least 1x1 pixels")
        if inst.size and inst.max() > np.iinfo(np.int32).max:
            raise LayoutError("inst_map ids exceed the int32 range")
        classes = _as_int_array(self.classes, "classes", 1).astype(np.int64)
        n = classes.shape[0]
        if inst.max() > n:
            raise LayoutError(
                f"inst_map holds id {int(inst.max())} but only {n} classes were given: "
                "nucleus i+1 needs classes[i] (relabel ids to be contiguous first)"
            )
        if n and classes.max() > self.class_set.num_classes:
            bad = sorted(set(classes[classes > self.class_set.num_classes].tolist()))
            raise LayoutError(
                f"classes {bad} are outside the class set {self.class_set.name!r} "
                f"(0 = unknown, 1..{self.class_set.num_classes} = {list(self.class_set.names)})"
            )
        cen = np.asarray(self.centroids, dtype=np.float64).reshape(-1, 2) if np.size(self.centroids) else np.zeros((0, 2))
        if cen.shape != (n, 2):
            raise LayoutError(f"centroids must have shape ({n}, 2) for {n} nuclei, got {np.shape(self.centroids)}")
        if not np.all(np.isfinite(cen)):
            raise LayoutError("centroids contain NaN or infinite values")
        h, w = inst.shape
        off = (cen[:, 0] < -0.5) | (cen[:, 0] > h - 0.5) | (cen[:, 1] < -0.5) | (cen[:, 1] > w - 0.5)
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise LayoutError(
                f"centroid of nucleus {i + 1} at (y={cen[i, 0]:.2f}, x={cen[i, 1]:.2f}) is off the "
                f"{h}x{w} canvas ({int(off.sum())} off in all)"
            )
        object.__setattr__(self, "inst_map", inst.astype(np.int32, copy=False))
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "centroids", cen)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_inst_map(
        cls,
        inst_map: np.ndarray,
        classes: Sequence[int] | np.ndarray | None = None,
        class_set: ClassSet = CONSEP_CLASSES,
    ) -> "Layout":
        """Layout from an instance map with ids 1..N (N = max id); centroids = centres of mass.

        ``classes`` defaults to 0 (unknown) for every nucleus. Ids with no pixels get their
        centroid... nowhere, so they are not allowed here: relabel with
        :func:`relabel_contiguous` first if ids have gaps.
        """
        inst = _as_int_array(inst_map, "inst_map", 2)
        n = int(inst.max()) if inst.size else 0
        if n > np.iinfo(np.int32).max:
            raise LayoutError(f"inst_map holds id {n}, beyond the int32 range; relabel ids to 1..N first")
        inst = inst.astype(np.int32)
        if n > inst.size:  # more ids than pixels: cannot be contiguous (and n-sized tables would be huge)
            raise LayoutError(
                f"inst_map holds id {n} in {inst.size} pixels, so ids are not contiguous 1..N; "
                "use nucsynth.layout.relabel_contiguous first"
            )
        cls_arr = np.zeros(n, np.int64) if classes is None else np.asarray(classes)
        cen = _centroids_of(inst, n)
        missing = np.flatnonzero(np.isnan(cen[:, 0]))
        if missing.size:
            raise LayoutError(
                f"inst_map ids {(missing[:5] + 1).tolist()} have no pixels (ids must be contiguous 1..{n}); "
                "use nucsynth.layout.relabel_contiguous first"
            )
        return cls(inst, cls_arr, cen, class_set)

    @classmethod
    def from_points(
        cls,
        shape: tuple[int, int],
        centroids: np.ndarray,
        classes: Sequence[int] | np.ndarray,
        class_set: ClassSet = CONSEP_CLASSES,
    ) -> "Layout":
        """A point layout: nuclei given only by centroid (y, x) and class, no pixels yet."""
        if len(shape) != 2 or min(shape) < 1:
            raise LayoutError(f"canvas shape must be (H, W) with H, W >= 1, got {shape}")
        return cls(np.zeros(shape, np.int32), np.asarray(classes), np.asarray(centroids, float), class_set)

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> tuple[int, int]:
        """Canvas size (H, W)."""
        return tuple(self.inst_map.shape)  # type: ignore[return-value]

    @property
    def num_nuclei(self) -> int:
        """N, the number of nuclei (ids 1..N)."""
        return int(self.classes.shape[0])

    def class_counts(self) -> np.ndarray:
        """Nuclei per class, index 0 = unknown, 1..K the classes."""
        return np.bincount(self.classes, minlength=self.class_set.num_classes + 1)

    def areas(self) -> np.ndarray:
        """Pixel area of nuclei 1..N."""
        return np.bincount(self.inst_map.ravel(), minlength=self.num_nuclei + 1)[1:]

    def replace(self, **changes: Any) -> "Layout":
        """A new validated Layout with some fields replaced."""
        d = {"inst_map": self.inst_map, "classes": self.classes, "centroids": self.centroids, "class_set": self.class_set}
        d.update(changes)
        return Layout(**d)

    def equals(self, other: "Layout") -> bool:
        """Exact equality of all fields."""
        return (
            self.class_set == other.class_set
            and np.array_equal(self.inst_map, other.inst_map)
            and np.array_equal(self.classes, other.classes)
            and np.array_equal(self.centroids, other.centroids)
        )

    def to_class_set(self, target: ClassSet, mapping: ClassMap | None = None) -> "Layout":
        """This layout with its classes expressed in ``target`` (matched by name, see
        :func:`class_lut`); ``self`` when the class sets are already equal. Raises
        :class:`ClassSetMismatch` when a class has no counterpart and no mapping entry."""
        if self.class_set == target and not mapping:
            return self
        lut = class_lut(self.class_set, target, mapping)
        return Layout(self.inst_map, lut[self.classes], self.centroids, target)

    # ------------------------------------------------------------------ derived maps
    def type_map(self) -> np.ndarray:
        """int32 (H, W): class of each pixel (0 background or unknown class)."""
        lut = np.concatenate([[0], self.classes]).astype(np.int32)
        return lut[self.inst_map]

    def onehot(self, background: bool = True) -> np.ndarray:
        """float32 (K+1, H, W) one-hot class channels (channel 0 = background), or (K, H, W)."""
        k = self.class_set.num_classes
        out = np.zeros((k + 1,) + self.shape, np.float32)
        np.put_along_axis(out, self.type_map()[None].astype(np.int64), 1.0, axis=0)
        return out if background else out[1:]

    def edge_map(self) -> np.ndarray:
        """float32 (H, W): 1 where a 4-neighbour has another instance id (background is id 0)."""
        m = self.inst_map
        e = np.zeros(m.shape, bool)
        dy = m[1:, :] != m[:-1, :]
        dx = m[:, 1:] != m[:, :-1]
        e[1:, :] |= dy
        e[:-1, :] |= dy
        e[:, 1:] |= dx
        e[:, :-1] |= dx
        return e.astype(np.float32)

    def hv_maps(self) -> np.ndarray:
        """float32 (2, H, W): HoVer-Net horizontal (x) and vertical (y) maps.

        For each nucleus, the x (and y) offset of each pixel from the nucleus' centre of mass,
        negative and positive sides normalized separately to [-1, 0] and [0, 1]; 0 outside
        nuclei. Unlike the HoVer-Net code we use the exact (not rounded) centre of mass, so
        flips and rotations map the maps onto each other exactly (see :func:`transform_hv`).
        """
        h, w = self.shape
        out = np.zeros((2, h, w), np.float32)
        inst = self.inst_map
        for i, sl in enumerate(ndi.find_objects(inst), start=1):
            if sl is None:
                continue
            mask = inst[sl] == i
            yy, xx = np.nonzero(mask)
            yy = yy + sl[0].start
            xx = xx + sl[1].start
            for ch, coords in ((0, xx), (1, yy)):
                off = coords - coords.mean()
                neg, pos = off < 0, off > 0
                if neg.any():
                    off[neg] /= -off[neg].min()
                if pos.any():
                    off[pos] /= off[pos].max()
                out[ch, yy, xx] = off
        return out

    def distance_map(self) -> np.ndarray:
        """float32 (H, W): per-nucleus normalized distance map of the co-synthesis method.

        Inside nucleus i: ``1 - d / max(d)`` with d the Euclidean distance to its centroid, so
        1 at the centroid falling to 0 at the farthest pixel; 0 on background. (Storing
        1 - normalized distance keeps background and nucleus borders both near 0.)
        """
        h, w = self.shape
        out = np.zeros((h, w), np.float32)
        inst = self.inst_map
        for i, sl in enumerate(ndi.find_objects(inst), start=1):
            if sl is None:
                continue
            mask = inst[sl] == i
            yy, xx = np.nonzero(mask)
            cy, cx = self.centroids[i - 1]
            d = np.hypot(yy + sl[0].start - cy, xx + sl[1].start - cx)
            dmax = d.max()
            out[yy + sl[0].start, xx + sl[1].start] = 1.0 - d / dmax if dmax > 0 else 1.0
        return out

    def point_map(self) -> np.ndarray:
        """int32 (H, W): class id at each nucleus' (rounded) centroid pixel, 0 elsewhere.

        Nuclei of unknown class (0) are written as K+1 so that they still mark a point.
        """
        k = self.class_set.num_classes
        out = np.zeros(self.shape, np.int32)
        if self.num_nuclei:
            h, w = self.shape
            yx = np.rint(self.centroids).astype(np.int64)
            yx[:, 0] = yx[:, 0].clip(0, h - 1)  # centroids lie within [-0.5, H-0.5]
            yx[:, 1] = yx[:, 1].clip(0, w - 1)
            out[yx[:, 0], yx[:, 1]] = np.where(self.classes == 0, k + 1, self.classes)
        return out

    # ------------------------------------------------------------------ transforms
    def rot90(self, k: int = 1) -> "Layout":
        """Rotate by k * 90 degrees counter-clockwise (as ``np.rot90`` on (H, W))."""
        k %= 4
        cen = self.centroids.copy()
        h, w = self.shape
        for _ in range(k):
            cen = np.stack([w - 1 - cen[:, 1], cen[:, 0]], axis=1)
            h, w = w, h
        return self.replace(inst_map=np.ascontiguousarray(np.rot90(self.inst_map, k)), centroids=cen)

    def flip(self, axis: int) -> "Layout":
        """Mirror along axis 0 (vertical flip, rows reversed) or 1 (horizontal flip)."""
        if axis not in (0, 1):
            raise LayoutError(f"flip axis must be 0 (rows) or 1 (columns), got {axis}")
        cen = self.centroids.copy()
        cen[:, axis] = self.shape[axis] - 1 - cen[:, axis]
        return self.replace(inst_map=np.ascontiguousarray(np.flip(self.inst_map, axis)), centroids=cen)

    def crop(self, y0: int, x0: int, h: int, w: int) -> "Layout":
        """The window [y0:y0+h, x0:x0+w]; nuclei cut by the border keep their visible part,
        ids are relabelled contiguous and centroids recomputed from the visible pixels."""
        sub = self.inst_map[y0 : y0 + h, x0 : x0 + w]
        if sub.shape != (h, w):
            raise LayoutError(f"crop window ({y0}, {x0}, {h}, {w}) exceeds the {self.shape} canvas")
        new, old_ids = relabel_contiguous(sub)
        classes = self.classes[old_ids - 1] if old_ids.size else np.zeros(0, np.int64)
        return Layout.from_inst_map(new, classes, self.class_set)


def relabel_contiguous(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel ids present in ``inst_map`` to 1..N in increasing order of the old id.

    Returns the new int32 map and ``old_ids`` (N,) with ``old_ids[i]`` the old id of new id i+1.
    """
    inst = _as_int_array(inst_map, "inst_map", 2)
    top = int(inst.max()) if inst.size else 0
    if top <= 4 * inst.size + 1024:  # a lookup table no larger than a few maps: fastest
        old = np.unique(inst)
        old = old[old != 0]
        lut = np.zeros(top + 1, np.int32)
        lut[old] = np.arange(1, old.size + 1, dtype=np.int32)
        return lut[inst], old.astype(np.int64)
    # Huge ids (e.g. 2**31 - 1 in a small map): memory must follow the pixels, not the largest id.
    vals, inverse = np.unique(inst, return_inverse=True)
    new = inverse.reshape(inst.shape).astype(np.int32)
    if vals[0] != 0:
        new += 1
        return new, vals.astype(np.int64)
    return new, vals[1:].astype(np.int64)


def transform_hv(hv: np.ndarray, op: str, k: int = 1) -> np.ndarray:
    """Apply a geometric transform to HV maps (2, H, W) and fix their signs.

    ``op`` is ``"rot90"`` (k quarter turns counter-clockwise), ``"flip0"`` (rows reversed)
    or ``"flip1"`` (columns reversed). Mirroring x negates H; a quarter turn maps
    (H, V) -> (V, -H).
    """
    h, v = hv[0], hv[1]
    if op == "flip1":
        return np.stack([-np.flip(h, 1), np.flip(v, 1)])
    if op == "flip0":
        return np.stack([np.flip(h, 0), -np.flip(v, 0)])
    if op == "rot90":
        out = hv
        for _ in range(k % 4):
            h, v = out[0], out[1]
            out = np.stack([np.rot90(v), -np.rot90(h)])
        return np.ascontiguousarray(out)
    raise LayoutError(f"unknown transform {op!r}; expected 'rot90', 'flip0' or 'flip1'")


@dataclass(frozen=True, eq=False)
class Sample:
    """A Layout with its RGB uint8 image (H, W, 3) and provenance (source, model, seed, ...)."""

    layout: Layout
    image: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        img = np.asarray(self.image)
        if img.size == 0:
            raise LayoutError(f"image is empty (shape {img.shape})")
        if img.ndim != 3 or img.shape[2] != 3:
            raise LayoutError(f"image must be RGB with shape (H, W, 3), got {img.shape}")
        if img.dtype != np.uint8:
            raise LayoutError(f"image must be uint8 (0-255), got {img.dtype}; convert explicitly, nothing is clipped here")
        if img.shape[:2] != self.layout.shape:
            raise LayoutError(f"image is {img.shape[:2]} but its layout is {self.layout.shape}: they must match")
        object.__setattr__(self, "image", img)
