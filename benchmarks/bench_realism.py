"""Realism of rendered tissue, judged by a segmenter trained on REAL training tiles.

For the same held-out `val` layouts (never seen by the models or the segmenter), each model
renders one image per layout (``--steps`` DPM-Solver++ steps, guidance ``--guidance``, seed =
the patch's index). Two figures per model:

- segmenter-feature distance: Frechet distance between Gaussians fitted to the segmenter
  encoder's pooled features of the rendered images and of the real `val` images (lower =
  closer to real tissue; comparable only with the same segmenter);
- layout recovery: the segmenter's mean per-patch PQ on the rendered images against the
  layouts they were rendered from, divided by its PQ on the real `val` images against their
  truth (1.0 = the rendering is as readable as real tissue).

The floor of the distance: the same figure for as many REAL patches of other tiles (the
``--reference-split``, every k-th patch). A Frechet distance between few samples is biased
upwards by its covariance estimates, so with 8 patches real tissue itself scores about 2.5
against real `val` tissue; use 40 or more patches before reading ratios (docs/models.md).

Targets (model issue): feature distance of the new model <= 0.5 x that of the baseline (the
former 64 px pixel-space default), recovery >= 0.8.

    python benchmarks/bench_realism.py --store runs/consep.zarr [--checkpoint NEW] --baseline OLD \
        [--segmenter DIR] [--limit 40] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import nucsynth  # noqa: F401  first: the engine sets OpenMP's passive wait before torch loads (a spinning pool collapses on a busy CPU)

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np


def segmenter_encoder(seg):
    """The shared encoder of a HoVer-style segmenter as a feature extractor (all its levels)."""
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seg = seg

        def forward(self, x):  # noqa: D102
            feats, h = [], self.seg.stem(x)
            for level in self.seg.levels:
                h = level(h)
                feats.append(h)
            return feats

    return Encoder()


def recovered(seg, seg_classes, samples, images) -> dict:
    """How well the segmenter reads the layouts of ``samples`` (the real images' truth, or
    the layouts the images were rendered from) back from ``images``: mean per-patch PQ, and
    the classification accuracy and per-class F1 of the paired nuclei over all patches."""
    from nucsynth.evaluate.segmenter import predict_layouts
    from nucsynth.metrics import detection_classification, pq

    pred = predict_layouts(seg, images, seg_classes)
    dc = detection_classification([s.layout for s in samples], pred)
    return {"pq": float(np.mean([pq(s.layout.inst_map, p.inst_map)["pq"] for s, p in zip(samples, pred)])),
            "acc": dc["acc"], "f1": dc["f1"]}


def _f1_text(r: dict) -> str:
    return ", ".join(f"{name} {v:.3f}" for name, v in r["f1"].items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--checkpoint", default=None, help="model to judge (default: the shipped default)")
    p.add_argument("--baseline", default=None, help="model to compare with (e.g. the former default)")
    p.add_argument("--segmenter", default=None, help="segmenter folder (default: the shipped one)")
    p.add_argument("--split", default="val")
    p.add_argument("--reference-split", default="train",
                   help="real patches of other tiles whose distance to the real split is the floor ('' = skip)")
    p.add_argument("--limit", type=int, default=40, help="val patches used (every k-th, for spread; fewer than 40 bias the distance upwards)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--cache", default=None, help="folder keeping the renderings (keyed by checkpoint content hash "
                   "and settings), so the segmenter side can be re-run without rendering again")
    args = p.parse_args()

    import torch

    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint
    from nucsynth.evaluate.image_quality import segmenter_feature_distance
    from nucsynth.evaluate.segmenter import load_segmenter
    from nucsynth.io.store import DatasetStore
    from nucsynth.synthesize import checkpoint_sha256

    torch.set_num_threads(args.threads)
    store = DatasetStore.open(args.store)
    idx = store.indices(args.split)
    idx = idx[:: max(1, len(idx) // args.limit)][: args.limit]
    real = [store[int(i)] for i in idx]
    models = {"model": args.checkpoint, **({"baseline": args.baseline} if args.baseline else {})}
    rendered: dict[str, tuple[str, bool, list[np.ndarray], float]] = {}
    for name, ckpt in models.items():  # render first (the slow part; cached with --cache)
        path = resolve_checkpoint(ckpt)
        model, _ = load_checkpoint(path)
        key = f"{checkpoint_sha256(path)[:16]}-{args.split}-{'_'.join(map(str, idx))}-s{args.steps}-g{args.guidance}"
        cached = Path(args.cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz" if args.cache else None
        t0 = time.perf_counter()
        if cached is not None and cached.exists():
            with np.load(cached) as z:
                images, secs = list(z["images"]), float(z["seconds"])
        else:
            images = [model.sample([s.layout], steps=args.steps, guidance=args.guidance, seed=int(i))[0].image
                      for s, i in zip(real, idx)]
            secs = time.perf_counter() - t0
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(cached, images=np.stack(images), seconds=secs)
        rendered[name] = (str(path), bool(getattr(model, "is_latent", False)), images, secs)
        print(f"{name}: rendered {len(images)} patches, {secs / len(real):.1f} s per patch", flush=True)

    seg, seg_classes, _ = load_segmenter(args.segmenter)
    encoder = segmenter_encoder(seg)
    real_images = [s.image for s in real]

    def recovery(images: list[np.ndarray]) -> dict:
        return recovered(seg, seg_classes, real, images)

    on_real = recovery(real_images)
    out: dict = {"patches": [int(i) for i in idx], "split": args.split, "steps": args.steps, "guidance": args.guidance,
                 "segmenter": args.segmenter or "shipped", "pq_real": on_real["pq"], "class_real": on_real, "models": {}}
    print(f"real: PQ {on_real['pq']:.3f}, class accuracy {on_real['acc']:.3f}, F1 {_f1_text(on_real)}", flush=True)
    if args.reference_split:
        ref = store.indices(args.reference_split)
        ref = ref[:: max(1, len(ref) // len(real))][: len(real)]
        floor = segmenter_feature_distance(real_images, [store[int(i)].image for i in ref], encoder)
        out["feature_distance_floor"] = {"split": args.reference_split, "patches": len(ref), "distance": floor}
        print(f"floor: {len(ref)} real {args.reference_split} patches: feature distance {floor:.4f}", flush=True)
    for name, (path, latent, images, secs) in rendered.items():
        fd = segmenter_feature_distance(real_images, images, encoder)
        r = recovery(images)
        out["models"][name] = {"checkpoint": path, "latent": latent, "feature_distance": fd, "pq_rendered": r["pq"],
                               "recovery": r["pq"] / out["pq_real"], "class_rendered": r,
                               "seconds_per_patch": secs / len(real)}
        print(f"{name}: feature distance {fd:.4f}, PQ on rendered {r['pq']:.3f} = {r['pq'] / out['pq_real']:.2f} x real "
              f"({out['pq_real']:.3f}); class accuracy {r['acc']:.3f}, F1 {_f1_text(r)}", flush=True)
    if "baseline" in out["models"]:
        r = out["models"]["model"]["feature_distance"] / out["models"]["baseline"]["feature_distance"]
        out["feature_distance_ratio"] = r
        print(f"feature distance model / baseline = {r:.3f} (target <= 0.5)")
    print(f"layout recovery {out['models']['model']['recovery']:.2f} x real (target >= 0.8)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
