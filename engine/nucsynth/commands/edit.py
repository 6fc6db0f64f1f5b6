"""``nucsynth edit SOURCE OUT --mode balance|enlarge|gradmix``: edited label maps to a store.

- ``balance``: DiffMix balancing maps (abundant nuclei replaced by rare-class shapes);
- ``enlarge``: DiffMix enlarging maps (nuclei shifted by a few pixels, no overlaps);
- ``gradmix``: the GradMix baseline: balancing maps whose rare nuclei are also blended into
  the image pixels.

``balance`` and ``enlarge`` edit labels only. Each output sample keeps the SOURCE image
unchanged as the input of partial-noise synthesis (``nucsynth synthesize --mode
balance|enlarge`` noises that image and re-renders it under the edited map); their
provenance says ``"image_matches_labels": false``. ``gradmix`` images do match their labels.
The rare-class pool comes from ``--pool`` (default: SOURCE itself). A store SOURCE keeps
each patch's split (``--split`` edits only one split); other sources are written as
"train". OUT is built under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

NAME = "edit"
HELP = "Make DiffMix balancing/enlarging label maps (or GradMix images) from a dataset into a store."

MODES = ("balance", "enlarge", "gradmix")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth edit``."""
    p.add_argument("source", type=Path, help="dataset store or any source `nucsynth prepare` reads")
    p.add_argument("out", type=Path, help="output zarr store (a folder)")
    p.add_argument("--mode", choices=MODES, required=True, help="balance, enlarge (labels only) or gradmix (pixels too)")
    p.add_argument("--seed", type=int, default=0, help="seed; patch i uses seed + i (default: 0)")
    p.add_argument("--split", default=None,
                   help="split of a store SOURCE to edit (default: its train split when it has one; 'all' = every patch)")
    p.add_argument("--only-changed", action="store_true", help="write only patches the edit changed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    b = p.add_argument_group("balance / gradmix")
    b.add_argument("--target-share", type=float, default=None,
                   help="stop when the rare class is this share of a patch's nuclei (default: as many as fit)")
    b.add_argument("--rare-class", type=int, default=None, help="class id to raise (default: the class set's rare class)")
    b.add_argument("--pool", type=Path, default=None, help="source of rare-class nuclei (default: SOURCE)")
    b.add_argument("--class-map", default=None,
                   help="how --pool classes named differently from SOURCE's map onto them, e.g. "
                        "'dead=other,neoplastic=epithelial' (same-named classes match by name in any order)")
    b.add_argument("--border", type=int, default=30, help="skip nuclei this close to the border, px (default: 30)")
    b.add_argument("--pick-fraction", type=float, default=0.8, help="share of abundant nuclei tried (default: 0.8)")
    b.add_argument("--dilate", type=int, default=2, help="dilation of the replaced nucleus, px (default: 2)")
    b.add_argument("--area-ratio", type=float, default=2.3, help="dilated target area / rare area, at least (default: 2.3)")
    b.add_argument("--ring-width", type=int, default=4, help="gradmix: blended ring around pasted nuclei, px (default: 4)")
    e = p.add_argument_group("enlarge")
    e.add_argument("--fraction", type=float, default=0.5, help="share of nuclei moved (default: 0.5)")
    e.add_argument("--max-shift", type=int, default=3, help="largest shift in x and y, px (default: 3)")


def _read(path: Path, split: str | None) -> tuple[list, list[str]]:
    """Samples of ``path`` and their split labels (a store keeps its splits)."""
    from nucsynth.io.detect import detect_format, read_source
    from nucsynth.io.store import DatasetStore

    if detect_format(path) == "store":
        store = DatasetStore.open(path)
        labels = [str(s) for s in store.splits]
        idx = range(len(store)) if split is None else store.indices(split).tolist()
        if split is not None and not idx:
            raise ValueError(f"{path}: no patch in split {split!r} (splits: {sorted(set(labels))})")
        return [store[int(i)] for i in idx], [labels[int(i)] for i in idx]
    if split is not None:
        raise ValueError(f"--split needs a dataset store SOURCE; {path} is not a store")
    samples = read_source(path)
    return samples, ["train"] * len(samples)


def _check(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    if args.target_share is not None and not 0.0 <= args.target_share <= 1.0:
        raise ValueError(f"--target-share must be in [0, 1], got {args.target_share}")
    if not 0.0 <= args.fraction <= 1.0:
        raise ValueError(f"--fraction must be in [0, 1], got {args.fraction}")
    if args.max_shift < 1:
        raise ValueError(f"--max-shift must be >= 1 px, got {args.max_shift}")
    if args.mode == "enlarge" and (args.pool is not None or args.target_share is not None):
        raise ValueError("--pool and --target-share apply to --mode balance or gradmix, not enlarge")
    if args.class_map is not None and args.pool is None:
        raise ValueError("--class-map maps the classes of --pool onto SOURCE's; give --pool too")


def _pool_in(pool: list, class_set: Any, args: argparse.Namespace) -> list:
    """The --pool samples with classes in SOURCE's class set, matched by name (+ --class-map),
    so that a pool's "dead" never becomes SOURCE's "other"; refused when a class has no match."""
    from nucsynth.layout import LayoutError, Sample, parse_class_map

    mapping = parse_class_map(args.class_map) if args.class_map else None
    out = []
    for s in pool:
        try:
            lay = s.layout.to_class_set(class_set, mapping)
        except LayoutError as e:
            raise ValueError(f"--pool {args.pool}: {e} (--class-map)") from None
        out.append(s if lay is s.layout else Sample(lay, s.image, s.provenance))
    return out


def _counts(samples: list, k: int) -> np.ndarray:
    return sum((s.layout.class_counts() for s in samples), np.zeros(k + 1, np.int64))


def _edit(samples: list, pool_samples: list, args: argparse.Namespace) -> tuple[list, list[bool]]:
    """Edited samples and whether each changed."""
    from nucsynth.edit.balance import balance_layout_report, collect_rare_pool
    from nucsynth.edit.enlarge import enlarge_layout
    from nucsynth.edit.gradmix import collect_rare_patches, gradmix_balance
    from nucsynth.layout import Sample

    opts = dict(border=args.border, pick_fraction=args.pick_fraction, dilate=args.dilate, area_ratio=args.area_ratio)
    out, changed = [], []
    if args.mode == "balance":
        pool = collect_rare_pool(pool_samples, args.rare_class)
        if not pool:
            raise ValueError(f"{args.pool or args.source}: no whole rare-class nucleus to take shapes from (use --pool)")
    elif args.mode == "gradmix":
        patches = collect_rare_patches(pool_samples, args.rare_class, margin=args.ring_width)
        if not patches:
            raise ValueError(f"{args.pool or args.source}: no whole rare-class nucleus to take from (use --pool)")
    for i, s in enumerate(samples):
        seed = args.seed + i
        prov = dict(s.provenance, edit=args.mode, edit_seed=seed)
        prov.pop("source_ids", None)  # the edited nuclei are not the source's (nucsynth.data.tiling)
        if args.mode == "balance":
            lay, rep = balance_layout_report(s.layout, pool, args.target_share, seed, rare_class=args.rare_class, **opts)
            prov.update(target_share=args.target_share, rare_before=rep.rare_before, rare_after=rep.rare_after,
                        image_matches_labels=False)
            new = Sample(lay, s.image, prov)
        elif args.mode == "enlarge":
            lay = enlarge_layout(s.layout, args.fraction, args.max_shift, seed)
            prov.update(fraction=args.fraction, max_shift=args.max_shift, image_matches_labels=False)
            new = Sample(lay, s.image, prov)
        else:
            g = gradmix_balance(s, patches, args.target_share, seed, ring_width=args.ring_width,
                                rare_class=args.rare_class, **opts)
            g_prov = dict(g.provenance, image_matches_labels=True)
            g_prov.pop("source_ids", None)
            new = Sample(g.layout, g.image, g_prov)
        out.append(new)
        changed.append(not new.layout.equals(s.layout))
    return out, changed


def run(args: argparse.Namespace) -> int:
    """Run ``nucsynth edit``; returns the exit code."""
    import shutil

    from nucsynth.io.store import DatasetStore, move_into_place, temporary_path

    _check(args)
    from nucsynth.io.sources import store_split

    samples, splits = _read(args.source, store_split(args.source, args.split))
    if not samples:
        raise ValueError(f"{args.source}: the source holds no samples")
    cs = samples[0].layout.class_set
    pool_samples = samples if args.pool is None else _pool_in(_read(args.pool, None)[0], cs, args)
    edited, changed = _edit(samples, pool_samples, args)
    keep = [i for i in range(len(edited)) if changed[i] or not args.only_changed]
    attrs = {
        "source": str(args.source), "edit": args.mode, "seed": args.seed,
        # labels-only edits keep the source images under changed labels (refused for segmenters)
        "images_match_labels": args.mode == "gradmix",
        "command": "nucsynth edit " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else "nucsynth edit",
    }
    tmp = temporary_path(args.out, "editing")
    try:
        store = DatasetStore.create(tmp, cs, attrs=attrs)
        store.append([edited[i] for i in keep], splits=[splits[i] for i in keep])
        move_into_place(tmp, args.out, args.overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    before, after = _counts(samples, cs.num_classes), _counts(edited, cs.num_classes)
    print(f"wrote {args.out}: {len(keep)} patches ({sum(changed)} of {len(samples)} changed by --mode {args.mode})")
    print(f"{'class':>14} {'before':>8} {'after':>8}")
    for k in range(0 if before[0] or after[0] else 1, cs.num_classes + 1):
        name = "unknown" if k == 0 else cs.names[k - 1]
        print(f"{name:>14} {int(before[k]):>8} {int(after[k]):>8}")
    if args.mode != "enlarge":
        rare = args.rare_class or cs.rare
        tot = max(int(after.sum()), 1)
        want = "as many as fit" if args.target_share is None else f"target {args.target_share:.1%} per patch"
        print(f"rare class {cs.names[rare - 1]!r}: {before[rare] / tot:.1%} -> {after[rare] / tot:.1%} of all nuclei ({want})")
    return 0
