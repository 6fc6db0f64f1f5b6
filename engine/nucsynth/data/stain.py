"""Stain normalization of H&E images: Macenko (2009) and Vahadane (2016).

Both methods model an RGB image by the Beer-Lambert law: the optical density (OD) of a
pixel is a non-negative mix of two stain vectors, haematoxylin (H) and eosin (E),

    OD = -ln((I + 1) / 256) = C @ S,    S: (2, 3) unit rows (H, E),  C: (pixels, 2) >= 0.

A normalizer is fitted ONCE on a target image (``fit``), storing the target's stain matrix
``stain_matrix_`` and the 99th percentile of its concentrations ``max_concentrations_``.
``transform`` then estimates the stains of each source image, computes its concentrations,
rescales them so that their 99th percentile matches the target's, and re-renders them with
the target's stains. To normalize many patches of one slide with the slide's own stains
(estimated once), pass ``source=normalizer.estimate(slide_rgb)`` to ``transform``.

- :class:`MacenkoNormalizer` (Macenko et al., ISBI 2009): pixels with OD < ``beta`` in any
  channel are dropped as transparent; the OD plane of the two largest eigenvectors is
  searched for the extreme angles (``alpha`` and ``100 - alpha`` percentiles); the two
  extreme directions are the stains. Concentrations by least squares, as in the paper.
- :class:`VahadaneNormalizer` (Vahadane et al., IEEE TMI 2016, "structure-preserving
  colour normalization"): tissue pixels (Lab luminosity L*/100 < ``luminosity_threshold``)
  are factorized by sparse non-negative matrix factorization, ``min ½‖OD - C S‖² + λ‖C‖₁``
  with ``C, S >= 0`` and ``‖S_j‖ <= 1``, on a random subsample of pixels. We solve it by
  alternating exact minimizations: with two stains the per-pixel non-negative lasso is a
  2-variable quadratic program solved in closed form (vectorized over pixels); the stain
  update is a projected block-coordinate step per stain (non-negative, unit ball).
  Concentrations for ``transform`` are the exact non-negative least squares solution
  (λ = 0) with the stain matrix fixed, again in closed form.

Degenerate estimates: an image showing one stain only (haematoxylin-only or eosin-only
patches, a flat colour) has no second stain to estimate. Its two stain vectors then lie
less than :data:`MIN_STAIN_ANGLE` degrees apart (Macenko: least squares on a near-singular
matrix amplifies noise tens of times), or one stain's 99th-percentile concentration is below
:data:`MIN_CONCENTRATION_RATIO` of the other's (the rescaling would amplify that stain's
noise). :meth:`StainNormalizer.estimate` refuses such images (:class:`DegenerateStainsError`);
``transform`` then renders the image with the TARGET's stains and scale and says so with a
:class:`StainEstimateWarning`; ``fit`` refuses such a target with a message saying why. The
thresholds leave every one of 215 real CoNSeP patches alone (smallest angle 6.9 degrees,
smallest ratio 0.19) and catch one-stain renderings (4 degrees; ratio 0.02).

Stain order: the fitted vectors are labelled by similarity to the standard Ruifrok-Johnston
H and E vectors: the pair assignment maximizing the summed cosine similarity wins, which
reduces to ``(a - b) . (H_ref - E_ref) > 0`` for "a is H". H_ref - E_ref is dominated by the
red channel (haematoxylin absorbs red light, eosin hardly), so this is the "larger red OD is
H" rule made robust to vectors whose red components are close.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, Mapping

import numpy as np
from skimage.color import rgb2lab

__all__ = [
    "REFERENCE_STAINS",
    "rgb_to_od",
    "od_to_rgb",
    "tissue_mask",
    "order_stains",
    "nonneg_lasso_2",
    "sparse_nmf_2",
    "StainNormalizer",
    "DegenerateStainsError",
    "StainEstimateWarning",
    "MIN_STAIN_ANGLE",
    "MIN_CONCENTRATION_RATIO",
    "degenerate_reason",
    "MacenkoNormalizer",
    "VahadaneNormalizer",
    "make_normalizer",
    "normalizer_from_dict",
    "METHODS",
]

# Ruifrok & Johnston (2001) H and E OD vectors (unit length), used to order the two stains
# and to initialize the sparse NMF.
REFERENCE_STAINS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
REFERENCE_STAINS = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=1, keepdims=True)
# Fewer stained pixels than this cannot give a meaningful stain estimate.
_MIN_PIXELS = 50
# Below these the image shows one stain only (see the module doc for how they were chosen).
MIN_STAIN_ANGLE = 5.0  # degrees between the H and E vectors
MIN_CONCENTRATION_RATIO = 0.1  # weaker / stronger stain's 99th-percentile concentration


class DegenerateStainsError(ValueError):
    """An image's two stains cannot be told apart (one stain only, or a flat colour)."""


class StainEstimateWarning(UserWarning):
    """An image's own stains could not be estimated; the target's stains were used instead."""


def _stain_angle(stains: np.ndarray) -> float:
    """Angle in degrees between the two (unit) stain vectors."""
    s = np.asarray(stains, np.float64)
    cos = float(s[0] @ s[1]) / max(float(np.linalg.norm(s[0]) * np.linalg.norm(s[1])), 1e-12)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def degenerate_reason(stains: np.ndarray, max_concentrations: np.ndarray | None = None) -> str | None:
    """Why a stain estimate cannot be used (one line), or None when it can.

    ``stains`` (2, 3) rows H, E; ``max_concentrations`` (2,) their 99th percentiles.
    """
    angle = _stain_angle(stains)
    if not np.isfinite(angle) or angle < MIN_STAIN_ANGLE:
        return (f"its two stain vectors are {angle:.1f} degrees apart (< {MIN_STAIN_ANGLE:g}): it shows one stain "
                "or one colour only")
    if max_concentrations is not None:
        m = np.asarray(max_concentrations, np.float64)
        top = float(m.max())
        ratio = float(m.min()) / top if top > 0 else 0.0
        if not ratio >= MIN_CONCENTRATION_RATIO:
            weak = "haematoxylin" if m[0] < m[1] else "eosin"
            return (f"{weak} is nearly absent (its 99th-percentile concentration is {ratio:.2f} x the other "
                    f"stain's, < {MIN_CONCENTRATION_RATIO:g})")
    return None


def _check_rgb(rgb: Any, what: str = "image") -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"{what} must be RGB (H, W, 3) or a stack (N, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (0-255), got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    return arr


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln((I + 1) / 256)`` (float32, same shape); white (255) is OD 0."""
    return -np.log((np.asarray(rgb, np.float32) + 1.0) / 256.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, rounded to uint8.

    A re-rendered OD can be negative (brighter than white) or darker than 0 after the
    concentration rescaling; such values are outside the displayable range and are
    saturated at 255 / 0, which is the physical meaning of the model (no light gain).
    """
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def tissue_mask(rgb: np.ndarray, luminosity_threshold: float = 0.8) -> np.ndarray:
    """Boolean mask of stained pixels: Lab luminosity L*/100 below the threshold."""
    arr = _check_rgb(rgb)
    return rgb2lab(arr.reshape(-1, 1, 3))[:, 0, 0].reshape(arr.shape[:-1]) / 100.0 < luminosity_threshold


def order_stains(stains: np.ndarray) -> np.ndarray:
    """Rows (2, 3) normalized to unit length and ordered H then E (see module doc)."""
    s = np.asarray(stains, np.float64)
    s = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    if np.dot(s[0] - s[1], REFERENCE_STAINS[0] - REFERENCE_STAINS[1]) < 0:
        s = s[::-1]
    return np.ascontiguousarray(s)


def nonneg_lasso_2(od: np.ndarray, stains: np.ndarray, lam: float = 0.0) -> np.ndarray:
    """Exact ``argmin_{c >= 0} ½‖x - c S‖² + lam * sum(c)`` for every row x of ``od`` (n, 3).

    With two stains this is a 2-variable convex quadratic program: the unconstrained
    stationary point is the answer when it is non-negative, otherwise the optimum lies on
    an axis (one stain only, closed form) or at 0; we pick the feasible candidate of lowest
    objective. ``lam = 0`` gives non-negative least squares. Returns (n, 2) float32.
    """
    s = np.asarray(stains, np.float64)
    g = s @ s.T
    b = od.astype(np.float64, copy=False) @ s.T - lam
    b0, b1 = b[:, 0], b[:, 1]
    # One stain only (the other at 0), clipped at 0: objective -½ b+² / G_jj.
    c0 = np.maximum(b0, 0) / g[0, 0]
    c1 = np.maximum(b1, 0) / g[1, 1]
    use0 = c0 * np.maximum(b0, 0) >= c1 * np.maximum(b1, 0)
    out = np.zeros((od.shape[0], 2))
    out[use0, 0] = c0[use0]
    out[~use0, 1] = c1[~use0]
    det = g[0, 0] * g[1, 1] - g[0, 1] ** 2
    if det > 1e-10 * g[0, 0] * g[1, 1]:
        both0 = (g[1, 1] * b0 - g[0, 1] * b1) / det
        both1 = (g[0, 0] * b1 - g[0, 1] * b0) / det
        ok = (both0 >= 0) & (both1 >= 0)  # convex: an interior stationary point is the optimum
        out[ok, 0] = both0[ok]
        out[ok, 1] = both1[ok]
    return out.astype(np.float32)


def sparse_nmf_2(
    od: np.ndarray, init: np.ndarray, lam: float = 0.1, iterations: int = 40, tol: float = 1e-5
) -> np.ndarray:
    """Sparse NMF of OD pixels (n, 3) into two stains: returns S (2, 3) with unit rows.

    Minimizes ``½‖OD - C S‖² / n + lam * ‖C‖₁ / n`` with C, S >= 0 and ‖S_j‖ <= 1 by
    alternating the exact per-pixel solution for C (:func:`nonneg_lasso_2`) and one
    projected block-coordinate step per stain (the dictionary update of Mairal et al.'s
    online dictionary learning, applied to the full batch). Stops when S moves less than
    ``tol``.
    """
    s = np.maximum(np.asarray(init, np.float64), 0)
    s /= np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    x = od.astype(np.float64, copy=False)
    for _ in range(iterations):
        c = nonneg_lasso_2(x, s, lam).astype(np.float64)
        a = c.T @ c  # (2, 2)
        bt = c.T @ x  # (2, 3)
        prev = s.copy()
        for j in range(2):
            if a[j, j] <= 1e-12:
                continue  # stain unused by every pixel: keep it (it cannot be improved by C)
            u = s[j] + (bt[j] - a[j] @ s) / a[j, j]
            u = np.maximum(u, 0)
            s[j] = u / max(1.0, float(np.linalg.norm(u)))
        if np.abs(s - prev).max() < tol:
            break
    return order_stains(s)


class StainNormalizer(ABC):
    """Common machinery: fit a target once, transform many images (see module doc)."""

    method: str = ""

    def __init__(self, percentile: float = 99.0, max_pixels: int = 20000, seed: int = 0) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if max_pixels < _MIN_PIXELS:
            raise ValueError(f"max_pixels must be >= {_MIN_PIXELS}, got {max_pixels}")
        self.percentile = float(percentile)
        self.max_pixels = int(max_pixels)
        self.seed = int(seed)
        self.stain_matrix_: np.ndarray | None = None
        self.max_concentrations_: np.ndarray | None = None

    # -- method-specific parts
    @abstractmethod
    def _tissue(self, rgb: np.ndarray, od: np.ndarray) -> np.ndarray:
        """Boolean (n,) mask of the pixels (n, 3) that carry stain."""

    @abstractmethod
    def _stains(self, od_tissue: np.ndarray) -> np.ndarray:
        """Stain matrix (2, 3), rows H then E, from tissue OD pixels."""

    @abstractmethod
    def concentrations(self, od: np.ndarray, stains: np.ndarray) -> np.ndarray:
        """Stain concentrations (n, 2) of OD pixels (n, 3) for a fixed stain matrix."""

    def params(self) -> dict[str, Any]:
        """Constructor arguments (stored by :meth:`to_dict`)."""
        return {"percentile": self.percentile, "max_pixels": self.max_pixels, "seed": self.seed}

    # -- shared logic
    def _tissue_od(self, rgb: np.ndarray, what: str) -> np.ndarray:
        """OD of (a seeded random subsample of) the tissue pixels, (n, 3) float32."""
        pix = rgb.reshape(-1, 3)
        if pix.shape[0] > self.max_pixels:
            idx = np.random.default_rng(self.seed).choice(pix.shape[0], self.max_pixels, replace=False)
            pix = pix[np.sort(idx)]
        od = rgb_to_od(pix)
        keep = self._tissue(pix, od)
        if int(keep.sum()) < _MIN_PIXELS:
            raise ValueError(
                f"{what}: only {int(keep.sum())} stained pixels found (need {_MIN_PIXELS}); "
                "is it blank glass or not an H&E image?"
            )
        return od[keep]

    def _estimate(self, arr: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        od = self._tissue_od(arr, what)
        stains = self._stains(od)
        reason = degenerate_reason(stains)  # before the concentrations: a singular matrix has none
        if reason is None:
            maxc = np.percentile(self.concentrations(od, stains), self.percentile, axis=0).astype(np.float64)
            reason = degenerate_reason(stains, maxc)
        if reason is not None:
            raise DegenerateStainsError(f"{what}: {reason}")
        return stains, maxc

    def estimate(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stain matrix (2, 3) (rows H, E) and 99th-percentile concentrations (2,) of ``rgb``.

        Raises ValueError when the image has too few stained pixels, and
        :class:`DegenerateStainsError` (a ValueError) when it shows one stain only.
        """
        return self._estimate(_check_rgb(rgb), "image")

    def fit(self, target_rgb: np.ndarray) -> "StainNormalizer":
        """Learn the target's stain matrix and concentration scale (an image or a stack).

        A target showing one stain only or one flat colour is refused with a ValueError that
        says which (a normalization target needs both haematoxylin and eosin).
        """
        try:
            stains, maxc = self._estimate(_check_rgb(target_rgb, "target image"), "target image")
        except DegenerateStainsError as e:
            raise DegenerateStainsError(f"{e}; pick a target image with both haematoxylin and eosin") from None
        self.stain_matrix_ = stains
        self.max_concentrations_ = maxc
        return self

    def transform(
        self, rgb: np.ndarray, source: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """Normalize ``rgb`` (uint8 (H, W, 3) or (N, H, W, 3)) to the fitted target.

        ``source`` = (stain matrix, max concentrations) of the image's slide, as returned
        by :meth:`estimate`; by default they are estimated from ``rgb`` itself. An image whose
        stains cannot be estimated (blank glass, one stain only, one colour) is re-rendered
        with the target's own stains and scale, with a :class:`StainEstimateWarning` saying
        why (blank glass stays near white; a one-stain patch keeps its colours when its stain
        is the target's).
        """
        if self.stain_matrix_ is None or self.max_concentrations_ is None:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit(target_rgb) first")
        arr = _check_rgb(rgb)
        if source is None:
            try:
                src_s, src_max = self.estimate(arr)
            except ValueError as e:
                warnings.warn(f"{e}; normalized with the target's stains instead", StainEstimateWarning, stacklevel=2)
                src_s, src_max = self.stain_matrix_, self.max_concentrations_
        else:
            src_s, src_max = (np.asarray(v, np.float64) for v in source)
            if src_s.shape != (2, 3) or src_max.shape != (2,):
                raise ValueError(f"source must be (stain matrix (2, 3), max concentrations (2,)), got {src_s.shape}, {src_max.shape}")
            reason = degenerate_reason(src_s)
            if reason is not None:
                raise DegenerateStainsError(f"source stains: {reason}")
        od = rgb_to_od(arr.reshape(-1, 3))
        conc = self.concentrations(od, src_s)
        conc *= (self.max_concentrations_ / np.maximum(src_max, 1e-6)).astype(np.float32)
        out = od_to_rgb(conc @ self.stain_matrix_.astype(np.float32))
        return out.reshape(arr.shape)

    def fit_transform(self, target_rgb: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """``fit(target_rgb).transform(rgb)``."""
        return self.fit(target_rgb).transform(rgb)

    # -- serialization (stored in a prepared store's attributes)
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly state: method, parameters and the fitted target."""
        if self.stain_matrix_ is None or self.max_concentrations_ is None:
            raise ValueError(f"{type(self).__name__} is not fitted: nothing to store")
        return {
            "method": self.method,
            "params": self.params(),
            "stain_matrix": self.stain_matrix_.tolist(),
            "max_concentrations": self.max_concentrations_.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StainNormalizer":
        """Rebuild a fitted normalizer from :meth:`to_dict` output."""
        if cls is StainNormalizer:
            return normalizer_from_dict(d)
        try:
            method, params = d["method"], dict(d.get("params", {}))
            stains = np.asarray(d["stain_matrix"], np.float64)
            maxc = np.asarray(d["max_concentrations"], np.float64)
        except KeyError as e:
            raise ValueError(f"stain normalizer description lacks the key {e.args[0]!r}") from None
        if method != cls.method:
            raise ValueError(f"description is for method {method!r}, not {cls.method!r}")
        if stains.shape != (2, 3) or maxc.shape != (2,) or not np.all(np.isfinite(stains)) or np.any(maxc <= 0):
            raise ValueError(
                f"invalid fitted state: stain_matrix must be finite (2, 3) and max_concentrations "
                f"(2,) > 0, got {stains.shape} and {maxc.tolist()}"
            )
        try:
            obj = cls(**params)
        except TypeError as e:
            raise ValueError(f"invalid {cls.method} parameters {params}: {e}") from None
        obj.stain_matrix_ = stains
        obj.max_concentrations_ = maxc
        return obj


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. 2009: stains from the extreme angles in the OD eigen-plane."""

    method = "macenko"

    def __init__(self, beta: float = 0.15, alpha: float = 1.0, percentile: float = 99.0,
                 max_pixels: int = 100000, seed: int = 0) -> None:
        super().__init__(percentile, max_pixels, seed)
        if beta < 0 or not 0 <= alpha < 50:
            raise ValueError(f"need beta >= 0 and 0 <= alpha < 50, got beta={beta}, alpha={alpha}")
        self.beta = float(beta)
        self.alpha = float(alpha)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "beta": self.beta, "alpha": self.alpha}

    def _tissue(self, rgb: np.ndarray, od: np.ndarray) -> np.ndarray:
        return np.all(od > self.beta, axis=1)

    def _stains(self, od: np.ndarray) -> np.ndarray:
        _, vecs = np.linalg.eigh(np.cov(od.T.astype(np.float64)))
        plane = vecs[:, [2, 1]]  # the two largest eigenvectors (eigh sorts ascending)
        plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # orient into the positive OD octant
        proj = od @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, [self.alpha, 100 - self.alpha])
        v = np.stack([plane @ [np.cos(lo), np.sin(lo)], plane @ [np.cos(hi), np.sin(hi)]])
        return order_stains(v)

    def concentrations(self, od: np.ndarray, stains: np.ndarray) -> np.ndarray:
        """Least squares (as the paper): ``C = OD S^T (S S^T)^-1``."""
        s = np.asarray(stains, np.float64)
        return (od @ (s.T @ np.linalg.inv(s @ s.T))).astype(np.float32)


class VahadaneNormalizer(StainNormalizer):
    """Vahadane et al. 2016: stains by sparse NMF of tissue OD pixels (see module doc)."""

    method = "vahadane"

    def __init__(self, lam: float = 0.1, luminosity_threshold: float = 0.8, iterations: int = 40,
                 percentile: float = 99.0, max_pixels: int = 4096, seed: int = 0) -> None:
        super().__init__(percentile, max_pixels, seed)
        if lam < 0 or not 0 < luminosity_threshold <= 1 or iterations < 1:
            raise ValueError(
                f"need lam >= 0, 0 < luminosity_threshold <= 1, iterations >= 1; got {lam}, "
                f"{luminosity_threshold}, {iterations}"
            )
        self.lam = float(lam)
        self.luminosity_threshold = float(luminosity_threshold)
        self.iterations = int(iterations)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "lam": self.lam, "luminosity_threshold": self.luminosity_threshold,
                "iterations": self.iterations}

    def _tissue(self, rgb: np.ndarray, od: np.ndarray) -> np.ndarray:
        return tissue_mask(rgb.reshape(-1, 1, 3), self.luminosity_threshold).ravel()

    def _stains(self, od: np.ndarray) -> np.ndarray:
        return sparse_nmf_2(od, REFERENCE_STAINS, self.lam, self.iterations)

    def concentrations(self, od: np.ndarray, stains: np.ndarray) -> np.ndarray:
        """Exact non-negative least squares with the stains fixed (closed form, 2 stains)."""
        return nonneg_lasso_2(od, stains, 0.0)


METHODS: dict[str, type[StainNormalizer]] = {"macenko": MacenkoNormalizer, "vahadane": VahadaneNormalizer}


def make_normalizer(method: str, **params: Any) -> StainNormalizer:
    """An unfitted normalizer by name: ``"macenko"`` or ``"vahadane"``."""
    key = str(method).lower()
    if key not in METHODS:
        raise ValueError(f"unknown stain normalization method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[key](**params)


def normalizer_from_dict(d: Mapping[str, Any]) -> StainNormalizer:
    """Rebuild a fitted normalizer of any method from its :meth:`StainNormalizer.to_dict`."""
    method = d.get("method") if isinstance(d, Mapping) else None
    if method not in METHODS:
        raise ValueError(f"stain normalizer description has unknown method {method!r}; expected one of {sorted(METHODS)}")
    return METHODS[method].from_dict(d)
