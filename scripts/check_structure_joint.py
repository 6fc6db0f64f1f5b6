"""Train a `tiny` structure or joint model on real CoNSeP patches (CPU) and print its figures.

    python scripts/check_structure_joint.py --family joint --data ../shared/data/consep256/Train
    python scripts/check_structure_joint.py --family structure --data ../shared/data/consep256/Train

Patches are split BY TILE (every fourth tile held out). Both families train with the one
training loop (nucsynth.train) on random crops with rotations/flips.

- joint: the loss of the first and last 20 steps; then, for point layouts taken from held-out
  crops (their true centroids and classes), the share of points that fall inside a generated
  nucleus of the given class (generated label at the point = the point's class), against
  chance = the share of pixels of each point's class in the training crops.
- structure: the median nucleus area of the sampled structures after the HV watershed,
  against the median area of the nuclei in the training crops.
"""

from __future__ import annotations

import nucsynth  # noqa: F401  first: the engine sets OpenMP's passive wait before torch loads (a spinning pool collapses on a busy CPU)

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _split_by_tile(samples: list, holdout_every: int = 4) -> tuple[list, list]:
    tiles = sorted({str(s.provenance.get("tile")) for s in samples})  # "train_10" for train_10_003
    held = set(tiles[::holdout_every])
    train = [s for s in samples if str(s.provenance.get("tile")) not in held]
    test = [s for s in samples if str(s.provenance.get("tile")) in held]
    return train, test


def _train(model, samples, args, out: Path):
    from nucsynth.data.dataset import SampleDataset
    from nucsynth.train import TrainConfig, train

    ds = SampleDataset(samples, maps=model.data_maps, size=args.size, augment=True, seed=args.seed)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=20, ema_decay=args.ema,
                      checkpoint_every=0, preview_at_end=False, seed=args.seed)
    t0 = time.perf_counter()
    res = train(model, ds, out, cfg)
    print(f"trained {args.steps} steps (batch {args.batch}, {args.size} px) in {time.perf_counter() - t0:.0f} s")
    first, last = float(np.mean(res.losses[:20])), float(np.mean(res.losses[-20:]))
    print(f"loss: first 20 steps {first:.4f}, last 20 steps {last:.4f} (ratio {last / first:.3f})")
    return ds, res


def _joint(args, train_s, test_s, out: Path) -> None:
    from nucsynth.checkpoint import load_checkpoint
    from nucsynth.layout import Layout
    from nucsynth.models.joint import JointModel, point_class_hits

    cs = train_s[0].layout.class_set
    torch.manual_seed(args.seed)
    ds, res = _train(JointModel.from_preset("tiny", args.size, cs), train_s, args, out)
    pix = np.zeros(cs.num_classes + 1)
    for i in range(len(ds)):
        pix += np.bincount(ds[i]["type_map"].numpy().ravel(), minlength=cs.num_classes + 1)
    share = pix / pix.sum()
    model, _ = load_checkpoint(res.checkpoint)
    rng = np.random.default_rng(args.seed)
    lays = []
    for s in test_s:
        y0, x0 = (int(v) for v in rng.integers(0, 256 - args.size + 1, 2))
        lay = s.layout.crop(y0, x0, args.size, args.size)
        if lay.num_nuclei:
            lays.append(Layout.from_points(lay.shape, lay.centroids, lay.classes, cs))
        if len(lays) == args.eval_patches:
            break
    hits, chance = [], []
    for start in range(0, len(lays), 16):
        batch = lays[start : start + 16]
        maps = model.sample_maps(batch, steps=args.sample_steps, guidance=args.guidance, seed=start)
        for lab, lay in zip(maps.labels, batch):
            hits.append(point_class_hits(lab, lay))
            chance.append(share[lay.classes])
    h, c = np.concatenate(hits), np.concatenate(chance)
    print(f"joint: {h.size} points in {len(lays)} held-out {args.size} px crops; "
          f"point inside a generated nucleus of its class: {h.mean():.3f}; chance {c.mean():.3f}")
    for k in range(1, cs.num_classes + 1):
        sel = np.concatenate([l.classes for l in lays]) == k
        if sel.any():
            print(f"  class {k} {cs.names[k - 1]}: {int(sel.sum())} points, hit rate {h[sel].mean():.3f}, chance {share[k]:.3f}")


def _structure(args, train_s, out: Path) -> None:
    from nucsynth.checkpoint import load_checkpoint
    from nucsynth.models.structure import StructureModel

    torch.manual_seed(args.seed)
    ds, res = _train(StructureModel.from_preset("tiny", args.size), train_s, args, out)
    from nucsynth.data.dataset import SampleDataset

    crops = SampleDataset(train_s, maps=("inst_map",), size=args.size, augment=True, seed=args.seed)
    areas = [np.bincount(crops[i]["inst_map"].numpy().ravel())[1:] for i in range(len(crops))]
    true_med = float(np.median(np.concatenate(areas)))
    model, _ = load_checkpoint(res.checkpoint)
    lays = model.sample(args.eval_patches, steps=args.sample_steps, seed=args.seed)
    gen = np.concatenate([l.areas() for l in lays]) if lays else np.zeros(0)
    gen = gen[gen > 0]
    med = float(np.median(gen)) if gen.size else float("nan")
    print(f"structure: {len(lays)} sampled {args.size} px structures, {gen.size} nuclei "
          f"({gen.size / len(lays):.1f} per patch; training crops {np.mean([a.size for a in areas]):.1f}); "
          f"median area {med:.0f} px vs training crops {true_med:.0f} px (ratio {med / true_med:.2f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=("joint", "structure"), required=True)
    p.add_argument("--data", type=Path, required=True, help="CoNSeP folder (Images/ + Labels/)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--eval-patches", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nucsynth.io import read_consep

    samples = read_consep(args.data)
    train_s, test_s = _split_by_tile(samples)
    print(f"{len(samples)} CoNSeP patches: {len(train_s)} for training, {len(test_s)} held out (by tile)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.family == "joint":
            _joint(args, train_s, test_s, Path(tmp) / "run")
        else:
            _structure(args, train_s, Path(tmp) / "run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
