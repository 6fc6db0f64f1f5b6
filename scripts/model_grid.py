"""The picture in docs/models.md: held-out patches beside their layouts rendered by a model.

Columns: the real `val` patch (never seen in training), its layout (class colours), the
model's rendering of that layout from noise, the DiffMix-balanced layout (abundant nuclei
replaced by rare-class shapes from the TRAINING split's pool) and its DiffMix rendering
(the real image noised to strength 0.55, then denoised under the edited layout; the changed
nuclei start from pure noise, as in ``nucsynth synthesize --mode balance``).

    python scripts/model_grid.py --store runs/consep.zarr [--checkpoint CKPT] [--out docs/images/model_grid.png]
"""

from __future__ import annotations

import nucsynth  # noqa: F401  first: the engine sets OpenMP's passive wait before torch loads (a spinning pool collapses on a busy CPU)

import argparse
import warnings

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--checkpoint", default=None, help="model (default: the shipped default)")
    p.add_argument("--out", default="docs/images/model_grid.png")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's recorded guidance")
    p.add_argument("--strength", type=float, default=0.55)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint
    from nucsynth.edit.balance import BalanceWarning, balance_layout, collect_rare_pool
    from nucsynth.io.store import DatasetStore
    from nucsynth.synthesize import changed_pixels
    from nucsynth.viz import layout_rgb, save_png

    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(resolve_checkpoint(args.checkpoint))
    store = DatasetStore.open(args.store)
    pool = collect_rare_pool([store[int(i)].layout for i in store.indices("train")])
    val = [store[int(i)] for i in store.indices("val")]
    rare = store.class_set.rare
    # patches with many nuclei first (balancing needs abundant nuclei away from the border)
    val.sort(key=lambda s: -int(s.layout.inst_map.max()))
    picks = val[:: max(1, len(val) // args.rows)][: args.rows]
    rows = []
    for k, s in enumerate(picks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BalanceWarning)
            balanced = balance_layout(s.layout, pool, target_share=0.3, seed=args.seed + k)
        plain = model.sample([s.layout], steps=args.steps, guidance=args.guidance, seed=args.seed + k)[0].image
        mixed = model.sample([balanced], steps=args.steps, guidance=args.guidance, seed=args.seed + k,
                             init_image=s.image, strength=args.strength, fresh=changed_pixels(s.layout, balanced))[0].image
        n_rare = int((balanced.classes == rare).sum())
        print(f"row {k}: {balanced.num_nuclei} nuclei, {n_rare} of class {store.class_set.names[rare - 1]!r} after balancing")
        gap = np.full((s.image.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([s.image, gap, layout_rgb(s.layout), gap, plain, gap,
                                    layout_rgb(balanced), gap, mixed], axis=1))
    sep = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    print(save_png(grid, args.out))


if __name__ == "__main__":
    main()
