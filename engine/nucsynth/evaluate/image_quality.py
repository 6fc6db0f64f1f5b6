"""Image-quality distances between a real and a synthetic set.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to Inception-v3 pool3
  features (the standard 2015-12-05 TF weights, see :mod:`nucsynth.evaluate.inception`).
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over the 1008-class softmax of the
  same network, averaged over splits.
- FSD, our Frechet Segmentation Distance for label maps: Frechet distance between Gaussians
  fitted to per-patch label statistics (class area fractions, optionally nuclei densities
  and sizes). No network and no weights are involved. See docs/image-quality.md.
- Segmenter feature distance: a Frechet distance on globally pooled features of any
  encoder the caller passes (e.g. our segmenter's encoder). It is NOT FID and is reported
  under its own name; its values are comparable only for the same encoder weights.

All Frechet distances are computed in float64. The trace of the matrix square root is
computed exactly from symmetric eigendecompositions (or, with fewer samples than feature dimensions, from
the singular values of the n1 x n2 cross-Gram matrix) rather than with
``scipy.linalg.sqrtm``, which takes minutes on a 2048x2048 matrix on a small CPU; the
sqrtm route of pytorch-fid is kept as ``method="sqrtm"`` and tested to agree.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..layout import Layout

__all__ = [
    "gaussian_stats",
    "frechet_distance",
    "frechet_distance_features",
    "inception_outputs",
    "inception_score_from_logits",
    "fid",
    "inception_score",
    "label_statistics",
    "fsd",
    "segmenter_feature_distance",
    "image_quality_report",
    "QUALITY_METRICS",
    "FSD_KINDS",
]

QUALITY_METRICS = ("fid", "is", "fsd")
FSD_KINDS = ("area", "instance")
Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------- Frechet distance

def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of ``features`` (N, D), in float64 (N >= 2)."""
    f = _as_features(features, "features")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _as_features(f: Any, what: str) -> np.ndarray:
    a = np.asarray(f, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (samples, dimensions), got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{what}: a Gaussian needs at least 2 samples, got {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contain NaN or infinite values")
    return a


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # tiny negative eigenvalues are rounding


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    # S1 S2 = R1 (R1 R2) R2 is similar to (R1 R2)(R1 R2)^T with Ri = Si^(1/2), so its
    # eigenvalues are the squared singular values of R1 R2 and tr (S1 S2)^(1/2) is their sum.
    # Unlike sqrt(eig(S1 S2)), this does not turn rounding noise in zero eigenvalues of
    # singular covariances into sqrt(noise).
    return float(np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    # pytorch-fid's procedure: sqrtm of the product; if it is not finite (near-singular
    # covariances), add eps to both diagonals; a significant imaginary part is an error.
    from scipy.linalg import sqrtm

    covmean = sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(s1.shape[0]) * eps
        covmean = sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm of the covariance product has an imaginary diagonal component up to "
                             f"{np.max(np.abs(covmean.imag)):.3g}: the covariances are too ill-conditioned")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
    method: str = "eigh", eps: float = 1e-6,
) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, in float64.

    ``method="eigh"`` (default) takes the trace of the square root exactly from symmetric
    eigendecompositions (the singular values of S1^(1/2) S2^(1/2));
    ``method="sqrtm"`` follows pytorch-fid (``scipy.linalg.sqrtm``; ``eps`` added to the
    diagonals when the result is not finite; the real part kept when the imaginary part is
    negligible). Both agree to rounding on well-conditioned covariances.
    """
    m1, m2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"means must be (D,) and covariances (D, D) with one D: got {m1.shape}, {s1.shape}, "
                         f"{m2.shape}, {s2.shape}")
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    else:
        raise ValueError(f"unknown method {method!r}: expected 'eigh' or 'sqrtm'")
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D).

    With fewer samples than dimensions (the usual case for small sets and 2048-d Inception
    features) the covariances have rank < D, and tr (S1 S2)^(1/2) equals the sum of the
    singular values of A1 A2^T / sqrt((N1-1)(N2-1)) (A = centred features), which is exact
    and costs an N1 x N2 SVD instead of D x D decompositions.
    """
    f1, f2 = _as_features(features1, "features1"), _as_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    n1, n2, d = f1.shape[0], f2.shape[0], f1.shape[1]
    if min(n1, n2) >= d:
        return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a1, a2 = f1 - mu1, f2 - mu2
    c1, c2 = n1 - 1.0, n2 - 1.0
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() / c1 + (a2 * a2).sum() / c2 - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------- image input

def _image_source(images: Any) -> Any:
    """An indexable (N, H, W, 3) source: a DatasetStore's lazy images, an array, or a list."""
    if hasattr(images, "images") and not isinstance(images, np.ndarray):
        return images.images  # a DatasetStore: read lazily, a batch at a time
    return images


def _as_image(img: Any, i: int) -> np.ndarray:
    a = np.asarray(getattr(img, "image", img))  # a Sample or an array
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image {i}: expected RGB (H, W, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"image {i}: expected uint8 (0-255), got {a.dtype}; convert explicitly")
    return a


def _image_batches(images: Any, batch_size: int) -> Iterator[list[np.ndarray]]:
    src = _image_source(images)
    n = len(src)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if hasattr(src, "ndim") and getattr(src, "ndim", 0) == 4:
            block = np.asarray(src[start:stop])
            yield [_as_image(block[k], start + k) for k in range(stop - start)]
        else:
            yield [_as_image(src[i], i) for i in range(start, stop)]


def _to_tensor(batch: list[np.ndarray], device: torch.device, scale: str, resize: Callable[[Tensor], Tensor] | None) -> Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [0, 1] ("unit") or [-1, 1] ("symmetric")."""
    ts = [torch.from_numpy(np.ascontiguousarray(b)).to(device).permute(2, 0, 1).float().div_(255.0) for b in batch]
    if len({t.shape for t in ts}) > 1:
        if resize is None:
            raise ValueError(f"images of different sizes in one set ({sorted({tuple(t.shape[1:]) for t in ts})}): "
                             "this encoder needs one image size")
        ts = [resize(t[None])[0] for t in ts]
    x = torch.stack(ts)
    return x * 2.0 - 1.0 if scale == "symmetric" else x


def _count(images: Any) -> int:
    return len(_image_source(images))


# ----------------------------------------------------------------------------- FID / IS

def _resolve_device(device: "torch.device | str | None") -> torch.device:
    from ..device import pick_device

    return device if isinstance(device, torch.device) else pick_device(device)


@torch.inference_mode()
def inception_outputs(
    images: Any, net: nn.Module, batch_size: int = 32, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pool3 features (N, 2048) and unbiased logits (N, 1008), float64, of uint8 RGB images.

    ``images``: a DatasetStore, an (N, H, W, 3) uint8 array (numpy or dask), or a sequence of
    arrays / Samples (sizes may differ). ``net``: from :func:`load_fid_inception`; it runs
    on the device its parameters are on, in eval mode, batch by batch.
    """
    from .inception import resize_for_inception

    device = next(net.parameters()).device
    net.eval()
    feats, logits, done, n = [], [], 0, _count(images)
    for batch in _image_batches(images, batch_size):
        f, lg = net(_to_tensor(batch, device, "unit", resize_for_inception))
        feats.append(f.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
        done += len(batch)
        if progress is not None:
            progress(done, n)
    if not feats:
        raise ValueError("no images given")
    return np.concatenate(feats), np.concatenate(logits)


def inception_score_from_logits(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits`` consecutive splits) from class logits (N, C):
    per split exp(mean_x KL(p(y|x) || p(y))), with p(y) the split's mean prediction."""
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2 or lg.shape[1] < 2:
        raise ValueError(f"logits must be (samples, classes) with >= 2 classes, got shape {lg.shape}")
    if not 1 <= splits <= lg.shape[0]:
        raise ValueError(f"splits must be in 1..{lg.shape[0]} (the number of images), got {splits}")
    from scipy.special import logsumexp

    logp = lg - logsumexp(lg, axis=1, keepdims=True)
    scores = []
    for part in np.array_split(logp, splits):
        p = np.exp(part)
        log_py = logsumexp(part, axis=0) - np.log(part.shape[0])  # log of the split's mean p(y), no underflow
        scores.append(float(np.exp((p * (part - log_py)).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def fid(
    real_images: Any, synth_images: Any, weights: str | os.PathLike[str] | None = None,
    device: "torch.device | str | None" = None, batch_size: int = 32,
) -> float:
    """FID between two image sets (uint8 RGB; see :func:`inception_outputs` for accepted
    forms) with the standard Inception weights from a local file (see
    :func:`nucsynth.evaluate.inception.find_inception_weights`)."""
    from .inception import load_fid_inception

    net, _ = load_fid_inception(weights, _resolve_device(device))
    f_real, _ = inception_outputs(real_images, net, batch_size)
    f_synth, _ = inception_outputs(synth_images, net, batch_size)
    return frechet_distance_features(f_real, f_synth)


def inception_score(
    images: Any, weights: str | os.PathLike[str] | None = None, splits: int = 10,
    device: "torch.device | str | None" = None, batch_size: int = 32,
) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of an image set, 1008-class head of the FID
    Inception weights (logits without the final bias, as in the original IS code)."""
    from .inception import load_fid_inception

    net, _ = load_fid_inception(weights, _resolve_device(device))
    _, logits = inception_outputs(images, net, batch_size)
    return inception_score_from_logits(logits, splits)


# ----------------------------------------------------------------------------- FSD

def _layout_of(item: Any) -> Layout:
    lay = getattr(item, "layout", item)
    if not isinstance(lay, Layout):
        raise ValueError(f"expected a Layout or Sample, got {type(item).__name__}")
    return lay


def label_statistics(layout: Layout, kind: str = "area") -> np.ndarray:
    """The FSD statistics vector of one label map (float64).

    ``kind="area"``: K+1 values, the fraction of the canvas covered by nuclei of class
    0 (unknown), 1, ..., K (background is the remainder and so is left out).
    ``kind="instance"``: those K+1 values, then nuclei per 10,000 px for class 0..K, then the
    25/50/75 % quantiles of the equivalent diameter sqrt(4 area / pi) in px over all nuclei
    (zeros when there is none): 2(K+1) + 3 values.
    """
    if kind not in FSD_KINDS:
        raise ValueError(f"unknown FSD statistics {kind!r}: expected one of {FSD_KINDS}")
    k1 = layout.class_set.num_classes + 1
    h, w = layout.shape
    areas = layout.areas().astype(np.float64)
    fractions = np.bincount(layout.classes, weights=areas, minlength=k1)[:k1] / (h * w)
    if kind == "area":
        return fractions
    density = layout.class_counts()[:k1] * (1e4 / (h * w))
    diam = np.sqrt(4.0 * areas[areas > 0] / np.pi)
    sizes = np.quantile(diam, [0.25, 0.5, 0.75]) if diam.size else np.zeros(3)
    return np.concatenate([fractions, density, sizes])


def _statistics(layouts: Iterable[Any], kind: str, what: str) -> tuple[np.ndarray, int]:
    rows, k = [], None
    for i, item in enumerate(layouts):
        lay = _layout_of(item)
        kk = lay.class_set.num_classes
        if k is not None and kk != k:
            raise ValueError(f"{what} label map {i} has {kk} classes but the earlier ones have {k}")
        k = kk
        rows.append(label_statistics(lay, kind))
    if len(rows) < 2:
        raise ValueError(f"{what}: FSD needs at least 2 label maps, got {len(rows)}")
    return np.stack(rows), int(k)


def fsd(real_layouts: Iterable[Any], synth_layouts: Iterable[Any], kind: str = "area") -> float:
    """Frechet Segmentation Distance between two sets of label maps (Layouts, Samples or a
    DatasetStore): Frechet distance between Gaussians fitted to :func:`label_statistics`
    of each patch. Both sets must use class sets with the same number of classes."""
    a, ka = _statistics(real_layouts, kind, "real")
    b, kb = _statistics(synth_layouts, kind, "synthetic")
    if ka != kb:
        raise ValueError(f"the real label maps have {ka} classes and the synthetic ones {kb}: FSD compares one class set")
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# ----------------------------------------------------------------------------- segmenter features

def _pool(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        if out.ndim == 2:
            return out
        if out.ndim == 4:
            return out.mean(dim=(2, 3))
        raise ValueError(f"encoder output must be (B, C) or (B, C, H, W), got shape {tuple(out.shape)}")
    if isinstance(out, (list, tuple)) and out:
        return torch.cat([_pool(o) for o in out], dim=1)
    raise ValueError(f"encoder output must be a tensor or a list/tuple of tensors, got {type(out).__name__}")


@torch.inference_mode()
def _encoder_features(images: Any, encoder: nn.Module, batch_size: int, scale: str) -> np.ndarray:
    params = list(encoder.parameters()) + list(encoder.buffers())
    device = params[0].device if params else torch.device("cpu")
    out = [_pool(encoder(_to_tensor(b, device, scale, None))).double().cpu().numpy()
           for b in _image_batches(images, batch_size)]
    if not out:
        raise ValueError("no images given")
    return np.concatenate(out)


def segmenter_feature_distance(
    real_images: Any, synth_images: Any, encoder: nn.Module, batch_size: int = 16, input_range: str = "symmetric"
) -> float:
    """Frechet distance between Gaussians fitted to globally average-pooled features of
    ``encoder`` (any torch module; output (B, C, H, W), (B, C), or a list of those, pooled
    and concatenated) on two image sets. Offline, but NOT FID: values depend on the encoder
    and its weights and are comparable only between runs with the same encoder.

    Images are uint8 RGB, fed at their own size as float in [-1, 1] (``input_range=
    "symmetric"``, the engine's training convention) or [0, 1] (``"unit"``). The encoder runs
    on its own device, in eval mode (its training flag is restored afterwards).
    """
    if input_range not in ("symmetric", "unit"):
        raise ValueError(f"input_range must be 'symmetric' ([-1, 1]) or 'unit' ([0, 1]), got {input_range!r}")
    was_training = encoder.training
    encoder.eval()
    try:
        fa = _encoder_features(real_images, encoder, batch_size, input_range)
        fb = _encoder_features(synth_images, encoder, batch_size, input_range)
    finally:
        encoder.train(was_training)
    return frechet_distance_features(fa, fb)


# ----------------------------------------------------------------------------- report

def image_quality_report(
    real: Sequence[Any],
    synth: Sequence[Any],
    metrics: Sequence[str] = QUALITY_METRICS,
    weights: str | os.PathLike[str] | None = None,
    device: "torch.device | str | None" = None,
    batch_size: int = 32,
    splits: int = 10,
    fsd_kind: str = "area",
    encoder: nn.Module | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Image-quality figures of a synthetic set against a real one, as a JSON-ready dict.

    ``real``/``synth``: DatasetStores or sequences of Samples (FSD needs layouts; FID/IS/the
    segmenter distance need images). ``metrics``: any of "fid", "is", "fsd". Inception
    outputs of each set are computed once and shared by FID and IS; IS is given for both
    sets (``splits`` is lowered to the set size when the set is smaller). ``encoder`` adds
    ``segmenter_feature_distance``. ``progress(done, total)`` counts images through Inception.

    Keys: n_real, n_synth, and per metric: fid; is_real, is_real_std, is_real_splits and the same for is_synth;
    fsd, fsd_statistics; segmenter_feature_distance; plus inception_weights,
    inception_weights_sha256 and device whenever Inception was used.
    """
    unknown = [m for m in metrics if m not in QUALITY_METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}: expected a non-empty selection of {QUALITY_METRICS}")
    out: dict[str, Any] = {"n_real": len(real), "n_synth": len(synth)}
    if "fsd" in metrics:
        out["fsd"] = fsd(real, synth, fsd_kind)
        out["fsd_statistics"] = fsd_kind
    if "fid" in metrics or "is" in metrics:
        from ..device import describe_device
        from .inception import load_fid_inception

        dev = _resolve_device(device)
        net, info = load_fid_inception(weights, dev)
        total = out["n_real"] + out["n_synth"]
        shifted = (lambda k: (lambda d, n: progress(k + d, total))) if progress is not None else (lambda k: None)
        f_real, lg_real = inception_outputs(real, net, batch_size, shifted(0))
        f_synth, lg_synth = inception_outputs(synth, net, batch_size, shifted(out["n_real"]))
        if "fid" in metrics:
            out["fid"] = frechet_distance_features(f_real, f_synth)
        if "is" in metrics:
            for name, lg in (("real", lg_real), ("synth", lg_synth)):
                k = min(splits, len(lg))
                out[f"is_{name}"], out[f"is_{name}_std"] = inception_score_from_logits(lg, k)
                out[f"is_{name}_splits"] = k
        out.update(inception_weights=info["path"], inception_weights_sha256=info["sha256"], device=describe_device(dev))
    if encoder is not None:
        out["segmenter_feature_distance"] = segmenter_feature_distance(real, synth, encoder, batch_size)
    return out
