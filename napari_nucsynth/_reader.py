"""napari reader: CoNSeP/HoVer-Net ``.mat``, MoNuSeg XML, QuPath GeoJSON and NucSynth stores.

Every format is read by ``nucsynth.io``; this module only turns the Samples and Layouts it
returns into layers (:mod:`napari_nucsynth._layers`). A dataset store with one patch opens
as an editable layout; a larger store opens as lazy stacks (images, instances, classes) to
browse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from napari_nucsynth._layers import META, class_colormap, layout_to_layers, sample_to_layers

__all__ = ["get_reader", "read_paths", "format_of", "store_layers"]

LayerDataTuple = tuple[Any, dict[str, Any], str]
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")  # an image beside a GeoJSON, same stem


def _is_store(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
    except (OSError, ValueError):
        return False
    return isinstance(attrs, dict) and "nucsynth_store" in attrs


def _head(path: Path) -> str:
    try:
        with path.open("r", encoding="utf-8", errors="ignore") as f:
            return f.read(4096)
    except OSError:
        return ""


def format_of(path: str | Path) -> str | None:
    """Which NucSynth format ``path`` holds ("consep", "monuseg", "geojson", "store"), or None."""
    p = Path(path)
    if p.is_dir():
        return "store" if _is_store(p) else None
    suffix = p.suffix.lower()
    if suffix == ".mat":
        return "consep"
    if suffix == ".xml" and "<Annotation" in _head(p):  # MoNuSeg / Aperio ImageScope XML
        return "monuseg"
    if suffix == ".geojson" or (suffix == ".json" and '"Feature' in _head(p)):
        return "geojson"
    return None


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerDataTuple]] | None:
    """The napari reader hook: a reader function if every path is a NucSynth format."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(format_of(p) is None for p in paths):
        return None
    return read_paths


def read_paths(path: str | Sequence[str]) -> list[LayerDataTuple]:
    """Layers of every file in ``path`` (one path or a list)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out: list[LayerDataTuple] = []
    for p in paths:
        out.extend(_read_one(Path(p)))
    return out


def _names(stem: str, n: int) -> list[str]:
    return [stem] if n == 1 else [f"{stem} {i}" for i in range(n)]


def _read_one(path: Path) -> list[LayerDataTuple]:
    fmt = format_of(path)
    if fmt == "consep":
        from nucsynth.io.consep import read_consep_file

        return sample_to_layers(read_consep_file(path), path.stem)
    if fmt == "monuseg":
        from nucsynth.io import read_monuseg

        samples = read_monuseg(path)
        return [t for s, n in zip(samples, _names(path.stem, len(samples))) for t in sample_to_layers(s, n)]
    if fmt == "geojson":
        from nucsynth.io import read_geojson
        from nucsynth.layout import Sample

        image = next((c for c in (path.with_suffix(e) for e in _IMAGE_SUFFIXES) if c.is_file()), None)
        got = read_geojson(path, image=image)
        return sample_to_layers(got, path.stem) if isinstance(got, Sample) else layout_to_layers(got, path.stem)
    if fmt == "store":
        return store_layers(path)
    raise ValueError(f"{path}: not a format NucSynth reads (.mat, .xml, .geojson, or a NucSynth .zarr store)")


def store_layers(path: str | Path) -> list[LayerDataTuple]:
    """Layers of a dataset store: an editable layout for one patch, else lazy stacks."""
    from nucsynth.io.store import DatasetStore

    path = Path(path)
    store = DatasetStore.open(path)
    name = path.name[:-5] if path.name.endswith(".zarr") else path.name
    if len(store) == 0:
        raise ValueError(f"{path}: the dataset store is empty (no patches to show)")
    if len(store) == 1:
        return sample_to_layers(store[0], name)
    return _stack_layers(store, name)


def _stack_layers(store: Any, name: str) -> list[LayerDataTuple]:
    import dask.array as da

    cs = store.class_set

    def type_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        i = block_info[None]["chunk-location"][0] if block_info else 0
        return store[i].layout.type_map()[None]

    inst = store.inst_maps.rechunk((1, *store.inst_maps.shape[1:]))
    classes = da.map_blocks(type_block, inst, dtype=np.int32)
    meta = {"store": str(store.path), "layout": name, "class_set": cs.to_dict()}
    return [
        (store.images, {"name": f"{name} images", "rgb": True, "metadata": {META: {**meta, "role": "stack-image"}}}, "image"),
        (inst, {"name": f"{name} instances", "opacity": 0.9, "metadata": {META: {**meta, "role": "stack-instances"}}},
         "labels"),
        (classes, {"name": f"{name} classes", "colormap": class_colormap(cs), "opacity": 0.5,
                   "metadata": {META: {**meta, "role": "stack-classes"}}}, "labels"),
    ]
