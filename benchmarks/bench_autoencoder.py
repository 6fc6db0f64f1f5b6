"""Autoencoder reconstruction quality on held-out patches (the model issue's first figure).

For every patch of a split (default: ``val``, which the shipped autoencoder never saw), the
image is encoded, the posterior mean decoded (a label-aware decoder also gets the patch's
layout) and compared with the source image (the CoNSeP JPEG):

- PSNR (dB) over all pixels and channels, per patch, then the mean;
- SSIM (scikit-image, Gaussian window, RGB), per patch, then the mean;
- colour error inside nuclei: per nucleus, |mean RGB of the reconstruction - mean RGB of
  the source| averaged over channels, in grey levels (0-255), then the mean over nuclei.

Targets: PSNR >= 29 dB, SSIM >= 0.85, nucleus colour error < 5 grey levels.

    python benchmarks/bench_autoencoder.py --store runs/consep.zarr --checkpoint runs/ae [--split val] [--threads 2]
"""

from __future__ import annotations

import nucsynth  # noqa: F401  first: the engine sets OpenMP's passive wait before torch loads (a spinning pool collapses on a busy CPU)

import argparse
import json
import time

import numpy as np


def nucleus_colour_error(rec: np.ndarray, real: np.ndarray, inst_map: np.ndarray) -> np.ndarray:
    """Per-nucleus mean absolute difference of mean RGB (grey levels), shape (N,)."""
    ids = inst_map.ravel()
    n = int(ids.max())
    if n == 0:
        return np.zeros(0)
    counts = np.bincount(ids, minlength=n + 1)[1:]
    errs = []
    for c in range(3):
        s_rec = np.bincount(ids, weights=rec[..., c].ravel().astype(np.float64), minlength=n + 1)[1:]
        s_real = np.bincount(ids, weights=real[..., c].ravel().astype(np.float64), minlength=n + 1)[1:]
        errs.append(np.abs(s_rec - s_real) / np.maximum(counts, 1))
    return np.mean(errs, axis=0)[counts > 0]


def reconstruction_figures(real: np.ndarray, rec: np.ndarray, inst_map: np.ndarray) -> tuple[float, float, np.ndarray]:
    """PSNR (dB), SSIM and per-nucleus colour errors of one reconstruction (uint8 RGB)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    return (peak_signal_noise_ratio(real, rec, data_range=255),
            structural_similarity(real, rec, channel_axis=-1, data_range=255),
            nucleus_colour_error(rec, real, inst_map))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--checkpoint", required=True, help="autoencoder checkpoint or run folder")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    import torch

    from nucsynth.checkpoint import load_checkpoint
    from nucsynth.data.dataset import image_to_tensor
    from nucsynth.io.store import DatasetStore
    from nucsynth.models.semantic import to_uint8

    torch.set_num_threads(args.threads)
    model, net = load_checkpoint(args.checkpoint)
    store = DatasetStore.open(args.store)
    idx = store.indices(args.split)[: args.limit]
    psnr, ssim, colour = [], [], []
    t0 = time.perf_counter()
    for i in idx:
        s = store[int(i)]
        x = image_to_tensor(s.image)[None]
        cond = None
        if model.config.label_aware:
            cond = torch.from_numpy(np.concatenate([s.layout.onehot(), s.layout.edge_map()[None]]))[None].float()
        rec = to_uint8(model.reconstruct(net, x, cond))[0]
        figs = reconstruction_figures(s.image, rec, s.layout.inst_map)
        psnr.append(figs[0])
        ssim.append(figs[1])
        colour.append(figs[2])
    col = np.concatenate(colour) if colour else np.zeros(0)
    out = {
        "checkpoint": str(args.checkpoint), "step": model.step, "split": args.split, "patches": len(idx),
        "label_aware": bool(model.config.label_aware),
        "psnr_db": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
        "nucleus_colour_error": float(col.mean()) if col.size else None, "nuclei": int(col.size),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=1))
    print(f"PSNR {out['psnr_db']:.2f} dB (target >= 29)  SSIM {out['ssim']:.3f} (target >= 0.85)  "
          f"nucleus colour error {out['nucleus_colour_error']:.2f} grey levels (target < 5)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
