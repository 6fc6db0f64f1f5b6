"""Pictures of layouts and samples for people: class overlays and PNG overview sheets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from nucsynth.layout import Layout, Sample

__all__ = ["layout_rgb", "overlay", "overview_sheet", "save_png"]


def layout_rgb(layout: Layout, background: tuple[int, int, int] = (24, 24, 24)) -> np.ndarray:
    """uint8 (H, W, 3): every nucleus filled with its class colour, edges darkened.

    Nuclei of unknown class (0) are drawn light grey.
    """
    lut = np.array([background, *layout.class_set.colours], np.uint8)
    rgb = lut[np.where(layout.inst_map > 0, np.maximum(layout.type_map(), 0), 0)]
    unknown = (layout.inst_map > 0) & (layout.type_map() == 0)
    rgb[unknown] = (200, 200, 200)
    edges = (layout.edge_map() > 0) & (layout.inst_map > 0)
    rgb[edges] = (rgb[edges] * 0.45).astype(np.uint8)
    return rgb


def overlay(sample: Sample, alpha: float = 0.35) -> np.ndarray:
    """uint8 (H, W, 3): the sample image with nuclei outlines in their class colours."""
    lay = sample.layout
    out = sample.image.copy()
    edge = (lay.edge_map() > 0) & (lay.inst_map > 0)
    colours = layout_rgb(lay)
    out[edge] = ((1 - alpha) * colours[edge] + alpha * out[edge]).astype(np.uint8)
    return out


def overview_sheet(samples: Sequence[Sample], columns: int = 4, gap: int = 4) -> np.ndarray:
    """One uint8 image: for each sample, its layout picture beside its tissue image."""
    if not samples:
        raise ValueError("overview_sheet needs at least one sample")
    h = max(s.layout.shape[0] for s in samples)
    w = max(s.layout.shape[1] for s in samples)
    cell_w = 2 * w + gap
    columns = max(1, min(columns, len(samples)))
    rows = -(-len(samples) // columns)
    sheet = np.full((rows * (h + gap) + gap, columns * (cell_w + gap) + gap, 3), 255, np.uint8)
    for i, s in enumerate(samples):
        r, c = divmod(i, columns)
        y = gap + r * (h + gap)
        x = gap + c * (cell_w + gap)
        sh, sw = s.layout.shape
        sheet[y : y + sh, x : x + sw] = layout_rgb(s.layout)
        sheet[y : y + sh, x + w + gap : x + w + gap + sw] = s.image
    return sheet


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB uint8 image as PNG atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
