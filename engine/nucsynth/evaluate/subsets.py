"""Which patches to label: NuDiff's k-means labelled subsets (Yu et al.).

NuDiff trains with 10/20/50% of the patches labelled, chosen by clustering patch features
with k-means (K = 6) and keeping the patches nearest the cluster centres, so that a small
labelled set still covers the kinds of tissue present. A choice made BEFORE labelling can
only look at the images, so the features here are image statistics: the haematoxylin and
eosin optical densities (``skimage.color.rgb2hed``: mean, spread and a 16-bin histogram of
each) and the mean gradient magnitude (texture), standardized per feature.

Each cluster contributes in proportion to its size (largest remainders), its members
nearest the centre first; the random subsets of
:func:`nucsynth.evaluate.downstream.subset_indices` stay available for comparison.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["patch_features", "kmeans_subsets", "HIST_BINS"]

HIST_BINS = 16
# Histogram spans of the H and E optical densities of rgb2hed: about the 99.5th percentile
# of each on the CoNSeP training patches (0.125 and 0.040), rounded up.
_OD_RANGES = ((0.0, 0.15), (0.0, 0.05))


def patch_features(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 2 * (2 + HIST_BINS) + 1) float64 features of uint8 RGB images (H, W, 3).

    Per image: mean and std of the H and E optical densities, a normalized histogram of
    each (over ``[0, 0.15]`` and ``[0, 0.05]``), and the mean Sobel gradient magnitude of
    the grey image.
    """
    from skimage.color import rgb2gray, rgb2hed
    from skimage.filters import sobel

    if len(images) == 0:
        raise ValueError("no images to describe")
    rows = []
    for i, im in enumerate(images):
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"image {i} must be uint8 (H, W, 3), got {a.dtype} {a.shape}")
        hed = rgb2hed(a)
        feats: list[float] = []
        for c in (0, 1):  # haematoxylin, eosin
            ch = hed[..., c]
            hist, _ = np.histogram(ch, bins=HIST_BINS, range=_OD_RANGES[c])
            feats += [float(ch.mean()), float(ch.std())] + (hist / ch.size).tolist()
        feats.append(float(sobel(rgb2gray(a)).mean()))
        rows.append(feats)
    return np.asarray(rows, np.float64)


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over clusters in proportion to ``sizes`` (largest remainders), never
    more than a cluster holds."""
    share = sizes / sizes.sum() * total
    out = np.floor(share).astype(np.int64)
    for j in np.argsort(-(share - out), kind="stable"):
        if out.sum() >= total:
            break
        if out[j] < sizes[j]:
            out[j] += 1
    return np.minimum(out, sizes)


def kmeans_subsets(features: np.ndarray, fractions: Sequence[float], k: int = 6, seed: int = 0) -> dict[float, np.ndarray]:
    """NuDiff's labelled subsets: ``{fraction: sorted indices}`` of ``round(fraction * N)``
    (at least 1) patches chosen by k-means on standardized ``features`` (N, F).

    K-means (``scipy.cluster.vq.kmeans2``, k-means++ start, seeded) gives ``k`` clusters;
    each contributes in proportion to its size, its patches nearest the centre first.
    Deterministic for a given seed.
    """
    from scipy.cluster.vq import kmeans2

    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, F) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinite values")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of patches), got {k}")
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"fractions must lie in (0, 1], got {f}")
    std = x.std(0)
    z = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
    centres, labels = kmeans2(z, k, iter=50, minit="++", seed=np.random.default_rng(seed))
    dist = np.linalg.norm(z - centres[labels], axis=1)
    members = [np.flatnonzero(labels == c) for c in range(k)]
    members = [m[np.argsort(dist[m], kind="stable")] for m in members]
    sizes = np.array([m.size for m in members])
    out: dict[float, np.ndarray] = {}
    for f in fractions:
        total = max(1, int(round(f * n)))
        take = _allocate(sizes, total)
        out[float(f)] = np.sort(np.concatenate([m[:t] for m, t in zip(members, take)]))
    return out
