"""napari writers: a layout (and its image) to QuPath GeoJSON or to a NucSynth dataset store.

Select the layers of one layout (its instances layer at least; the centroids layer keeps
point-only nuclei; an RGB image layer of the same size makes it a Sample) and save. The
Layout is read back by :func:`napari_nucsynth._layers.layout_from_parts`; the files are
written by ``nucsynth.io``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_nucsynth._layers import class_set_of, layout_from_parts, role_of
from nucsynth.layout import NUCLEUS_CLASSES, Layout, Sample

__all__ = ["write_geojson", "write_store", "layout_from_layer_data"]

FullLayerData = tuple[Any, dict[str, Any], str]


def _pick(layer_data: Sequence[FullLayerData], kind: str, role: str) -> list[FullLayerData]:
    of_kind = [d for d in layer_data if d[2] == kind]
    tagged = [d for d in of_kind if role_of(d[1].get("metadata", {})) == role]
    return tagged or ([] if role == "centroids" else [d for d in of_kind if role_of(d[1].get("metadata", {})) is None])


def layout_from_layer_data(layer_data: Sequence[FullLayerData]) -> tuple[Layout, np.ndarray | None, dict[str, Any]]:
    """The Layout, the RGB image (or None) and the image's provenance held by saved layers.

    The instance layer is the one tagged ``instances`` (else the only plain labels layer);
    without a NucSynth class set the nuclei are saved with unknown class (0) under the
    single-class ``nucleus`` set.
    """
    inst = _pick(layer_data, "labels", "instances")
    if len(inst) != 1:
        names = [d[1].get("name") for d in inst]
        raise ValueError(
            "select the layers of exactly one layout (its instances layer, optionally its centroids "
            f"and image); found {len(inst)} instance layers {names}"
        )
    data, attrs, _ = inst[0]
    class_set = class_set_of(attrs.get("metadata", {})) or NUCLEUS_CLASSES
    feats = attrs.get("features") if class_set_of(attrs.get("metadata", {})) else None
    pts = _pick(layer_data, "points", "centroids")
    pdata, pfeats = (np.asarray(pts[0][0]), pts[0][1].get("features")) if len(pts) == 1 else (None, None)
    layout = layout_from_parts(np.asarray(data), feats, pdata, pfeats, class_set, what=f"layer {attrs.get('name')!r}")
    images = [d for d in layer_data if d[2] == "image"]
    if len(images) > 1:
        raise ValueError(f"select at most one image layer, got {[d[1].get('name') for d in images]}")
    image, prov = None, {}
    if images:
        img, iattrs, _ = images[0]
        image = np.asarray(img)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image layer {iattrs.get('name')!r} must be RGB uint8 (H, W, 3), got {image.shape} {image.dtype}"
            )
        if image.shape[:2] != layout.shape:
            raise ValueError(
                f"image layer {iattrs.get('name')!r} is {image.shape[:2]} but the layout is {layout.shape}"
            )
        prov = _provenance(iattrs.get("metadata", {}))
    return layout, image, prov


def _provenance(metadata: dict[str, Any]) -> dict[str, Any]:
    meta = metadata.get("nucsynth", {}) if isinstance(metadata, dict) else {}
    prov = dict(meta.get("provenance", {}))
    prov.pop("source_ids", None)  # the layers may have been edited: their nuclei are not the source's
    for key in ("model", "seed", "family", "mode", "steps", "guidance", "strength"):
        if key in meta:
            prov[key] = meta[key]
    return prov


def write_geojson(path: str, layer_data: list[FullLayerData]) -> list[str]:
    """Write the selected layout as QuPath GeoJSON (one polygon per nucleus with its class)."""
    from nucsynth.io import write_geojson as engine_write_geojson

    layout, image, prov = layout_from_layer_data(layer_data)
    target = layout if image is None else Sample(layout, image, prov)
    engine_write_geojson(target, path)
    return [str(path)]


def write_store(path: str, layer_data: list[FullLayerData]) -> list[str]:
    """Write the selected layout and its image as a one-patch NucSynth dataset store.

    An existing NucSynth store at ``path`` is replaced (napari asked first); any other
    existing folder or file is refused.
    """
    from nucsynth.io.store import DatasetStore

    from napari_nucsynth._reader import format_of

    layout, image, prov = layout_from_layer_data(layer_data)
    if image is None:
        raise ValueError(
            "a dataset store holds images with their labels: select the layout's image layer too "
            "(or save the layout alone as GeoJSON)"
        )
    p = Path(path)
    if p.exists() and format_of(p) != "store":
        raise FileExistsError(f"{p} exists and is not a NucSynth dataset store; refusing to replace it")
    store = DatasetStore.create(p, layout.class_set, attrs={"written_by": "napari-nucsynth"}, overwrite=True)
    store.append([Sample(layout, image, prov)])
    return [str(p)]
