"""``nucsynth prepare SOURCE STORE``: any supported source -> a dataset store of patches.

Steps: read the source (:func:`nucsynth.io.read_source`, format auto-detected or
``--format``), optionally rescale (``--scale``) and stain-normalize each source image to a
target (``--stain``, ``--stain-target``; fitted once), cut patches
(:func:`nucsynth.data.tiling.tile_sample`), split train/val BY SOURCE TILE (provenance
``"tile"``, else the source image) so that all patches of a tile land in the same split,
and write the store. The store is built under a hidden temporary name and put in place
at the end (:func:`nucsynth.outputs.staged`): STORE is never left half-written, an existing
STORE is replaced only with ``--overwrite`` and stays until the new one is complete, a
full disk or a read-only folder gives one line naming STORE, and the partial stores of
killed runs on the same STORE are removed (and reported) by the next run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

NAME = "prepare"
HELP = "Read a dataset (CoNSeP, MoNuSeg, PanNuke, Lizard, GeoJSON, folder) into a patch store with a train/val split."

_MERGES = {"auto": True, "none": False, "consep7": "consep7", "glysac": "glysac"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth prepare``."""
    from nucsynth.data.tiling import PAD_POLICIES
    from nucsynth.io.detect import FORMATS

    p.add_argument("source", type=Path, help="dataset folder or file")
    p.add_argument("store", type=Path, help="output zarr store (a folder)")
    p.add_argument("--format", dest="fmt", choices=[f for f in FORMATS], default=None, help="source format (default: detected)")
    p.add_argument("--image", type=Path, default=None, help="the image of a GeoJSON source")
    p.add_argument("--patch-size", type=int, default=256, help="patch side in px (default: 256)")
    p.add_argument("--stride", type=int, default=None, help="step between patches (default: the patch size)")
    p.add_argument("--pad", choices=PAD_POLICIES, default="reflect", help="how edge patches are filled: reflect (image and labels mirrored), constant (white, no nuclei), "
                   "none (only whole windows); padding is never scored (default: reflect)")
    p.add_argument("--scale", type=float, default=1.0, help="rescale sources first, e.g. 0.5 for 40x -> 20x (default: 1)")
    p.add_argument("--stain", choices=("none", "macenko", "vahadane"), default="none", help="stain normalization (default: none)")
    p.add_argument("--stain-target", type=Path, default=None, help="target image for --stain")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of source tiles for validation (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    p.add_argument("--merge-classes", choices=sorted(_MERGES), default=None,
                   help="CoNSeP-style class merge: auto (7->4 when the labels hold 7 classes), none, consep7, glysac")
    p.add_argument("--source-bits", type=int, default=None,
                   help="true bit depth (9-16) of 16-bit source images, scaled to 8 bits; without it they are refused")
    p.add_argument("--bad-vertices", choices=("error", "skip"), default=None,
                   help="MoNuSeg: Regions with a missing/NaN/infinite vertex are refused (error, default) or left out (skip)")
    p.add_argument("--annotations", choices=("skip", "nuclei"), default=None,
                   help="GeoJSON: QuPath annotations are regions and skipped (default), or nuclei drawn by hand")
    p.add_argument("--overwrite", action="store_true", help="replace an existing STORE")


# Reader options of the command line: option -> (reader keyword, formats that take it).
_FORMAT_OPTIONS = {
    "--source-bits": ("source_bits", ("consep", "monuseg", "folder", "geojson")),
    "--bad-vertices": ("bad_vertices", ("monuseg",)),
    "--annotations": ("annotations", ("geojson",)),
}


def split_groups(groups: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign each distinct group (source tile) to "train" or "val".

    ``round(val_fraction * n_groups)`` groups go to validation, at least one when
    ``val_fraction > 0`` and there are two or more groups, never all of them; the choice is
    a seeded permutation of the sorted group names (deterministic).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    names = sorted(set(groups))
    n_val = int(round(val_fraction * len(names)))
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(n_val, 1), len(names) - 1)
    else:
        n_val = 0
    order = np.random.default_rng(seed).permutation(len(names))
    val = {names[i] for i in order[:n_val]}
    return {g: ("val" if g in val else "train") for g in names}


def group_of(prov: dict[str, Any]) -> str:
    """The split group of a source sample: its tile, else its source image's name."""
    if prov.get("tile"):
        return str(prov["tile"])
    if prov.get("source"):
        return Path(str(prov["source"])).stem
    raise ValueError("a source sample has neither a 'tile' nor a 'source' in its provenance; cannot split by tile")


def _reader_options(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.merge_classes is not None:
        if fmt != "consep":
            raise ValueError(f"--merge-classes applies to CoNSeP-style .mat sources, not {fmt!r}")
        opts["merge_classes"] = _MERGES[args.merge_classes]
    if args.image is not None:
        if fmt != "geojson":
            raise ValueError(f"--image applies to GeoJSON sources, not {fmt!r}")
        opts["image"] = args.image
    for option, (key, formats) in _FORMAT_OPTIONS.items():
        value = getattr(args, key, None)
        if value is not None:
            if fmt not in formats:
                raise ValueError(f"{option} applies to {', '.join(formats)} sources, not {fmt!r}")
            opts[key] = value
    return opts


def _check_args(args: argparse.Namespace) -> None:
    if args.patch_size < 1:
        raise ValueError(f"--patch-size must be >= 1, got {args.patch_size}")
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be >= 1, got {args.stride}")
    if not (np.isfinite(args.scale) and args.scale > 0):
        raise ValueError(f"--scale must be a positive number, got {args.scale}")
    if args.stain != "none" and args.stain_target is None:
        raise ValueError(f"--stain {args.stain} needs --stain-target IMAGE (the colour reference)")
    if args.stain == "none" and args.stain_target is not None:
        raise ValueError("--stain-target given without --stain macenko|vahadane")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    from nucsynth import outputs

    outputs.check_not_input(args.store, {"SOURCE": args.source}, "STORE")
    outputs.check_output(args.store, args.overwrite, "STORE")  # also tidies what killed runs left


def _patches(samples: list, args: argparse.Namespace, normalizer: Any, bar: Any, skipped: list[str]) -> Iterator:
    """Yield the patches of every source sample (rescaled and stain-normalized first)."""
    from nucsynth.data.tiling import rescale_sample, tile_sample
    from nucsynth.layout import Sample

    for s in samples:
        if args.scale != 1.0:
            s = rescale_sample(s, args.scale)
        if normalizer is not None:
            s = Sample(s.layout, normalizer.transform(s.image), dict(s.provenance, stain=args.stain))
        tiles = tile_sample(s, args.patch_size, args.stride, pad=args.pad)
        if not tiles:
            skipped.append(str(s.provenance.get("source")))
        for _, _, patch in tiles:
            yield patch
        bar.update(1)


def run(args: argparse.Namespace) -> int:
    """Run ``nucsynth prepare``; returns the exit code."""
    from tqdm import tqdm

    from nucsynth.io.detect import detect_format, read_source
    from nucsynth import outputs
    from nucsynth.io.store import DatasetStore

    _check_args(args)
    fmt = args.fmt or detect_format(args.source)
    print(f"nucsynth prepare: reading {args.source} as {fmt}", file=sys.stderr)
    samples = read_source(args.source, fmt, **_reader_options(args, fmt))
    if not samples:
        raise ValueError(f"{args.source}: the source holds no samples")
    class_set = samples[0].layout.class_set
    for s in samples:
        if s.layout.class_set != class_set:
            raise ValueError(f"{s.provenance.get('source')}: class set {s.layout.class_set.name!r} differs from {class_set.name!r}")

    normalizer = None
    if args.stain != "none":
        from nucsynth.data.stain import make_normalizer
        from nucsynth.io._common import read_image

        normalizer = make_normalizer(args.stain).fit(read_image(args.stain_target))

    splits = split_groups([group_of(s.provenance) for s in samples], args.val_fraction, args.seed)
    attrs = {
        "source": str(args.source), "format": fmt, "patch_size": args.patch_size,
        "stride": args.stride or args.patch_size, "pad": args.pad, "scale": args.scale,
        "stain": normalizer.to_dict() if normalizer is not None else None,
        "stain_target": str(args.stain_target) if args.stain_target else None,
        "val_fraction": args.val_fraction, "seed": args.seed,
        "split_groups": {k: sorted(g for g, v in splits.items() if v == k) for k in ("train", "val")},
    }
    skipped: list[str] = []
    with outputs.staged(args.store, args.overwrite, purpose="preparing", option="STORE") as tmp:
        store = DatasetStore.create(tmp, class_set, attrs=attrs)
        with tqdm(total=len(samples), desc="prepare", unit="image", file=sys.stderr, disable=None) as bar:
            # tile_sample keeps the source's "tile" in every patch: the split follows the tile.
            store.append(_patches(samples, args, normalizer, bar, skipped), splits=lambda p: splits[group_of(p.provenance)])
        if len(store) == 0:
            raise ValueError(f"no patch of {args.patch_size} px could be cut with --pad none (sources are smaller)")
        store.close()
    _print_summary(DatasetStore.open(args.store), skipped)
    return 0


def _print_summary(store: Any, skipped: list[str]) -> None:
    cs = store.class_set
    splits = store.splits
    print(f"wrote {store.path}: {len(store)} patches of {store.patch_shape}, {store.num_nuclei} nuclei, classes {cs.name!r}")
    for name in sorted(set(splits.tolist())):
        idx = store.indices(name)
        counts = store.class_counts(name)
        per = ", ".join(f"{n} {int(c)}" for n, c in zip(cs.names, counts[1:]))
        unk = f", unknown {int(counts[0])}" if counts[0] else ""
        print(f"  {name}: {idx.size} patches; nuclei per class: {per}{unk}")
    if skipped:
        print(f"  {len(skipped)} source image(s) gave no patch (smaller than the patch size with --pad none)")
