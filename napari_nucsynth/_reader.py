"""napari reader: every layout source the engine reads (``nucsynth.io.sources``): CoNSeP /
Lizard ``.mat`` files and folders, MoNuSeg XML, QuPath GeoJSON, PanNuke, plain image+label
folders and NucSynth stores.

Formats are told apart by the engine (:func:`nucsynth.io.sources.source_kind`); this module
only turns what it reads into layers (:mod:`napari_nucsynth._layers`): one editable layout
(image + instances + classes + centroids) per patch for a few patches, lazy browse-only
stacks (images, instances, classes) for a store or dataset of many; the Layout designer's
*Open patch* makes any patch of a stack an editable layout. An error while reading is shown
in napari's notification as the engine's one-line message (what, where, what was expected)
before napari reports the failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from napari_nucsynth._layers import META, class_colormap, instance_colormap, layout_to_layers, sample_to_layers

__all__ = ["get_reader", "read_paths", "format_of", "store_layers", "source_layers", "read_patch", "MAX_LAYOUTS"]

LayerDataTuple = tuple[Any, dict[str, Any], str]
MAX_LAYOUTS = 4  # more patches than this open as browse-only stacks


def _head(path: Path) -> str:
    try:
        with path.open("r", encoding="utf-8", errors="ignore") as f:
            return f.read(4096)
    except OSError:
        return ""


def format_of(path: str | Path) -> str | None:
    """What NucSynth reads at ``path`` ("store", "consep", "lizard", "monuseg", "geojson",
    "folder", "pannuke"), or None when it is not a NucSynth format (another reader's file,
    a point CSV that needs a canvas size, a missing path)."""
    from nucsynth.io.sources import source_kind

    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file() and suffix == ".json" and '"Feature' not in _head(p):  # any JSON is not GeoJSON
        return None
    if p.is_file() and suffix == ".xml" and "<Annotation" not in _head(p):  # MoNuSeg / ImageScope XML only
        return None
    try:
        kind = source_kind(p)
    except (ValueError, OSError):
        return None
    return None if kind == "csv" else kind


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerDataTuple]] | None:
    """The napari reader hook: a reader function if every path is a NucSynth format."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(format_of(p) is None for p in paths):
        return None
    return read_paths


def read_paths(path: str | Sequence[str]) -> list[LayerDataTuple]:
    """Layers of every path in ``path`` (one path or a list); a failure is also shown as a
    one-line napari notification."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out: list[LayerDataTuple] = []
    for p in paths:
        try:
            out.extend(_read_one(Path(p)))
        except (ValueError, OSError) as e:
            _notify(str(e) if str(Path(p)) in str(e) else f"{p}: {e}")
            raise
    return out


def _notify(text: str) -> None:
    try:
        from napari.utils.notifications import show_error
    except ImportError:  # pragma: no cover - napari is what calls this reader
        return
    show_error(text.splitlines()[0] if text else "could not read the file")


def _read_one(path: Path) -> list[LayerDataTuple]:
    kind = format_of(path)
    if kind is None:
        raise ValueError(f"{path}: not a format NucSynth reads (CoNSeP/Lizard .mat, MoNuSeg .xml, QuPath .geojson, "
                         "PanNuke, an images/+labels/ folder or a NucSynth .zarr store)")
    if kind == "store":
        return store_layers(path)
    return source_layers(path)


def _stem(path: Path) -> str:
    return path.name[:-5] if path.name.endswith(".zarr") else (path.stem if path.is_file() else path.name)


def source_layers(path: str | Path) -> list[LayerDataTuple]:
    """Layers of any layout source but a store: an editable layout per patch, or stacks
    when there are more than :data:`MAX_LAYOUTS` patches of one size."""
    from nucsynth.io.sources import read_layout_source
    from nucsynth.layout import Sample

    path = Path(path)
    src = read_layout_source(path)
    stem = _stem(path)
    items = src.items
    shapes = {(s.layout if isinstance(s, Sample) else s).shape for s in items}
    if len(items) > MAX_LAYOUTS and len(shapes) == 1 and all(isinstance(s, Sample) for s in items):
        return _stack_layers(np.stack([s.image for s in items]), np.stack([s.layout.inst_map for s in items]),
                             np.stack([s.layout.type_map() for s in items]), items[0].layout.class_set, stem,
                             {"source": str(path)})
    out: list[LayerDataTuple] = []
    for i, (item, prov) in enumerate(zip(items, src.provenance)):
        name = stem if len(items) == 1 else f"{stem} {prov.get('source_tile') or i}"
        out += sample_to_layers(item, name) if isinstance(item, Sample) else layout_to_layers(item, name)
    return out


def store_layers(path: str | Path) -> list[LayerDataTuple]:
    """Layers of a dataset store: an editable layout for one patch, else lazy stacks."""
    import dask.array as da

    from nucsynth.io.store import DatasetStore

    path = Path(path)
    store = DatasetStore.open(path)
    name = _stem(path)
    if len(store) == 0:
        raise ValueError(f"{path}: the dataset store is empty (no patches to show)")
    if len(store) == 1:
        return sample_to_layers(store[0], name)

    def type_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        i = block_info[None]["chunk-location"][0] if block_info else 0
        return store[i].layout.type_map()[None]

    inst = store.inst_maps.rechunk((1, *store.inst_maps.shape[1:]))
    classes = da.map_blocks(type_block, inst, dtype=np.int32)
    return _stack_layers(store.images, inst, classes, store.class_set, name, {"store": str(store.path)})


def _stack_layers(images: Any, inst: Any, classes: Any, cs: Any, name: str, where: dict[str, str]
                  ) -> list[LayerDataTuple]:
    """Browse-only stacks (patch index first): images, instance outlines, faint classes."""
    meta = {**where, "layout": name, "class_set": cs.to_dict()}
    return [
        (images, {"name": f"{name} images", "rgb": True, "metadata": {META: {**meta, "role": "stack-image"}}}, "image"),
        (inst, {"name": f"{name} instances", "opacity": 0.35, "colormap": instance_colormap(),
                "metadata": {META: {**meta, "role": "stack-instances"}}}, "labels"),
        (classes, {"name": f"{name} classes", "colormap": class_colormap(cs), "opacity": 0.3,
                   "metadata": {META: {**meta, "role": "stack-classes"}}}, "labels"),
    ]


def read_patch(meta: dict[str, Any], index: int) -> Any:
    """Patch ``index`` (a Sample) of the store or source a stack layer's metadata names."""
    if "store" in meta:
        from nucsynth.io.store import DatasetStore

        store = DatasetStore.open(meta["store"])
        if not 0 <= index < len(store):
            raise ValueError(f"{meta['store']} holds patches 0..{len(store) - 1}; got {index}")
        return store[index]
    from nucsynth.io.sources import read_layout_source

    src = read_layout_source(meta["source"], limit=index + 1)
    if index >= len(src):
        raise ValueError(f"{meta['source']} holds patches 0..{len(src) - 1}; got {index}")
    return src.items[index]
