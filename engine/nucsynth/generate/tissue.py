"""Simple procedural H&E-like images for tests, fixtures and sample data.

The image is built in optical-density space and converted by the Beer-Lambert law,
``I = 255 * 10 ** -(c_H * h + c_E * e + r)``, with the standard haematoxylin and eosin
stain vectors ``h`` and ``e`` of Ruifrok & Johnston (2001) (``skimage.color.rgb_from_hed``)
and a small neutral residual ``r``. Eosin (pink) fills the stroma with a fibrous texture;
haematoxylin (purple-blue) fills the nuclei with a chromatin texture and a darker rim.
Concentrations are calibrated so that mean colours resemble CoNSeP (background about
(222, 189, 223), nuclei about (120-170, 85-130, 160-195) in RGB). It is not a model of real
tissue; it only has the properties tests rely on: nuclei are clearly darker than the
background, colours are H&E-like, and the same seed gives the same image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb_from_hed

from nucsynth.generate.layouts import random_layout
from nucsynth.generate.stats import arrangement_for_class
from nucsynth.layout import CONSEP_CLASSES, ClassSet, Layout, Sample

__all__ = ["procedural_image", "procedural_sample", "H_VECTOR", "E_VECTOR"]

H_VECTOR = rgb_from_hed[0] / np.linalg.norm(rgb_from_hed[0])
E_VECTOR = rgb_from_hed[1] / np.linalg.norm(rgb_from_hed[1])
_RESIDUAL_OD = 0.02
# Haematoxylin concentration of nuclei per arrangement profile: lymphocytes are dense and
# dark, epithelial nuclei vesicular and paler (measured CoNSeP means, see module docstring).
_NUCLEUS_H = {"clump": 0.52, "gland": 0.34, "stream": 0.38, "scatter": 0.42}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    sd = n.std()
    return (n - n.mean()) / sd if sd > 0 else n


def _stroma_eosin(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Eosin concentration of the stroma: wavy fibres, looser areas and a few pale gaps."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = rng.uniform(0, math.pi)
    warp = _smooth_noise(rng, shape, 14.0)
    period = rng.uniform(6.0, 9.0)
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period + 3.0 * warp
    fibres = 0.5 + 0.5 * np.sin(phase)
    breaks = 1.0 / (1.0 + np.exp(-2.0 * _smooth_noise(rng, shape, 3.0)))  # fibres fade in and out
    density = np.clip(0.75 + 0.35 * _smooth_noise(rng, shape, 20.0), 0.1, 1.0)
    return density * (0.05 + 0.16 * fibres * breaks + 0.04 * breaks)


def procedural_image(layout: Layout, seed: int = 0) -> np.ndarray:
    """An H&E-like RGB uint8 image (H, W, 3) that follows ``layout``'s nuclei.

    Point-only nuclei (no pixels) are not drawn. Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    shape = layout.shape
    inst = layout.inst_map
    c_e = _stroma_eosin(rng, shape)
    c_h = np.full(shape, 0.05) + 0.02 * _smooth_noise(rng, shape, 2.0)
    if layout.num_nuclei:
        base = np.array(
            [_NUCLEUS_H[arrangement_for_class(layout.class_set, int(c))] for c in layout.classes]
        ) * rng.uniform(0.85, 1.15, size=layout.num_nuclei)
        level = np.concatenate([[0.0], base])[inst]
        inside = inst > 0
        chromatin = 1.0 + 0.22 * _smooth_noise(rng, shape, 0.8) + 0.1 * _smooth_noise(rng, shape, 2.5)
        # The nuclear membrane: pixels of a nucleus next to a pixel of another id stain darker.
        rim = inside & ((ndi.grey_erosion(inst, size=3) != inst) | (ndi.grey_dilation(inst, size=3) != inst))
        nuclear_h = level * chromatin + 0.1 * rim
        # Slightly soft nuclear borders, as after the optics of a scanner.
        soft = ndi.gaussian_filter(inside.astype(np.float64), 0.6)
        c_h = c_h * (1 - soft) + ndi.gaussian_filter(np.where(inside, nuclear_h, 0.0), 0.6)
        c_e = c_e * (1 - 0.5 * soft) + 0.06 * soft
    od = c_h[..., None] * H_VECTOR + c_e[..., None] * E_VECTOR + _RESIDUAL_OD
    od = od + 0.008 * rng.standard_normal(od.shape)
    rgb = 255.0 * np.power(10.0, -np.maximum(od, 0.0))
    return np.rint(rgb).astype(np.uint8)


def procedural_sample(
    shape: tuple[int, int] = (256, 256),
    class_set: ClassSet = CONSEP_CLASSES,
    seed: int = 0,
    density: float | None = None,
    class_shares=None,
) -> Sample:
    """A random layout (:func:`random_layout`) with its procedural image, as a Sample."""
    layout = random_layout(shape, class_set=class_set, density=density, class_shares=class_shares, seed=seed)
    image = procedural_image(layout, seed=seed)
    prov = {"source": "procedural", "generator": "nucsynth.generate.tissue.procedural_sample", "seed": int(seed)}
    return Sample(layout, image, prov)
