"""``nucsynth synthesize``: render layouts with a trained model into a dataset store.

What it renders depends on the checkpoint's family:

- ``semantic`` (SDM / NASDM / DiffMix): ``--layouts`` label maps, by ``--mode``:

  - ``layout``: render each source layout as it is (from pure noise; with ``--strength``
    the source image is partially noised instead, SDEdit-style);
  - ``balance``: DiffMix balancing maps (abundant nuclei swapped for rare-class shapes from
    the source's own rare pool), rendered from the REAL image of each patch partially
    noised to ``--strength`` (default 0.55, as in DiffMix);
  - ``enlarge``: DiffMix enlarging maps (nuclei shifted without overlaps), rendered the same way.

- ``joint`` (co-synthesis): ``--layouts`` is a point source, one nucleus per point: a CSV
  file (header ``y,x,class`` or ``x,y,class``; pixel coordinates, class id or name; one
  canvas of ``--size H,W``, default the model's training size), a GeoJSON file (QuPath
  points, or polygons whose centroids are taken) or a dataset store / readable source (the
  centroids of its nuclei). ``--prompt`` gives one prompt for all (default: each layout's
  own templated prompt). Image, nuclei and labels come from the model.

- ``structure`` (NuDiff stage 1): ``--count N`` new layouts of ``--size H,W`` (default the
  model's training size). A store holds images, so the image comes from NuDiff stage 2:
  ``--image-checkpoint``, a semantic checkpoint trained with ``condition="structure"``
  (``nucsynth train --family semantic --condition structure``), renders each layout.

The output store is built under a temporary name and renamed into place when complete; an
existing ``--out`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

NAME = "synthesize"
HELP = ("Render layouts (semantic: as they are, DiffMix-balanced or -enlarged; joint: from points; "
        "structure: --count new ones) with a trained model into a store.")

MODES = ("layout", "balance", "enlarge")
DIFFMIX_STRENGTH = 0.55
POINT_SUFFIXES = {".csv": "csv", ".geojson": "geojson", ".json": "geojson"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth synthesize``."""
    p.add_argument("--checkpoint", default=None, help="checkpoint or run folder (default: $NUCSYNTH_CHECKPOINT, then the shipped model)")
    p.add_argument("--layouts", type=Path, default=None,
                   help="semantic: a dataset store or any readable source; joint: points as CSV (y,x,class), "
                        "GeoJSON, or a store's centroids; not for structure")
    p.add_argument("--split", default=None, help="only this split of a store (default: all patches)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N source patches")
    p.add_argument("--mode", choices=MODES, default="layout", help="layout (default), balance or enlarge (semantic only)")
    p.add_argument("--count", type=int, default=None, help="structure: how many new layouts to generate")
    p.add_argument("--size", default=None,
                   help="H,W canvas in px of structure layouts and of CSV / GeoJSON points (default: the model's training size)")
    p.add_argument("--prompt", default=None,
                   help="joint: one prompt for every layout (default: each layout's own templated prompt)")
    p.add_argument("--class-source", choices=("label", "points"), default=None,
                   help="joint: nucleus classes from the generated label (default) or the given points")
    p.add_argument("--image-checkpoint", default=None,
                   help="structure: the NuDiff stage-2 semantic checkpoint (condition 'structure') rendering the images")
    p.add_argument("--steps", type=int, default=20, help="solver steps for a full chain (default: 20)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale s in eps_c + s (eps_c - eps_u) (default: the model's, semantic 0.5 = "
                        "SDM/DiffMix's 1.5, joint 1.0)")
    p.add_argument("--sampler", choices=("dpm++2m", "ddim", "ancestral"), default="dpm++2m", help="(default: dpm++2m)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"semantic: partial noising of the real image, 0-1 (default: {DIFFMIX_STRENGTH} for "
                        "balance/enlarge, none for layout)")
    p.add_argument("--target-share", type=float, default=None,
                   help="balance: share of the rare class to reach per patch (default: replace as many as fit)")
    p.add_argument("--border", type=int, default=30,
                   help="balance: nuclei with a centroid closer than this to the edge are kept (default 30 px, as DiffMix)")
    p.add_argument("--enlarge-fraction", type=float, default=0.5, help="enlarge: share of nuclei moved (default 0.5)")
    p.add_argument("--max-shift", type=int, default=3, help="enlarge: largest shift in px (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of edits and sampling (default: 0)")
    p.add_argument("--batch-size", type=int, default=4, help="patches rendered at once (default: 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--class-map", default=None,
                   help="how classes of --layouts named differently from the model's map onto them, e.g. "
                        "'dead=other,connective=spindle' (same-named classes match by name in any order)")
    p.add_argument("--out", type=Path, required=True, help="output dataset store (.zarr)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out store")


# ---------------------------------------------------------------------- sources
def _read_layout_source(path: Path, split: str | None, limit: int | None) -> list[Any]:
    from nucsynth.io import read_source
    from nucsynth.io.store import DatasetStore

    if not path.exists():
        raise FileNotFoundError(f"--layouts {path} does not exist")
    try:
        store = DatasetStore.open(path)
    except (ValueError, FileNotFoundError, OSError):
        store = None
    if store is not None:
        idx = range(len(store)) if split is None else store.indices(split)
        if split is not None and len(idx) == 0:
            raise ValueError(f"store {path} has no patches in split {split!r}")
        idx = list(idx)[:limit] if limit else list(idx)
        return [store[int(i)] for i in idx]
    if split is not None:
        raise ValueError(f"--split only applies to a dataset store; {path} is not one")
    samples = read_source(path)
    return samples[:limit] if limit else samples


def _in_model_classes(samples: Sequence[Any], model: Any, args: argparse.Namespace) -> list[Any]:
    """``samples`` with classes in the model's class set, matched by name (+ ``--class-map``);
    a class set naming other classes is refused here, before any sampling."""
    from nucsynth.layout import LayoutError, Sample, parse_class_map

    mapping = parse_class_map(args.class_map) if args.class_map else None
    out = []
    for s in samples:
        try:
            lay = s.layout.to_class_set(model.class_set, mapping)
        except LayoutError as e:
            raise ValueError(f"--layouts {args.layouts}: {e} (--class-map)") from None
        out.append(s if lay is s.layout else Sample(lay, s.image, s.provenance))
    return out


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"H,W"`` (or one number for a square) -> (H, W); None stays None."""
    if text is None:
        return None
    parts = [s.strip() for s in str(text).replace("x", ",").split(",")]
    try:
        hw = [int(s) for s in parts]
    except ValueError:
        raise ValueError(f"--size must be H,W in pixels (e.g. 256,256), got {text!r}") from None
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"--size must be H,W with both at least 1 px, got {text!r}")
    return hw[0], hw[1]


def _class_id(value: str, class_set: Any, where: str) -> int:
    """A CSV class cell: an id 0..K or a class name of ``class_set`` (any case)."""
    v = value.strip()
    if v.lstrip("-").isdigit():
        k = int(v)
        if not 0 <= k <= class_set.num_classes:
            raise ValueError(f"{where}: class id {k} is outside 0..{class_set.num_classes} "
                             f"(class set {class_set.name!r}: {list(class_set.names)})")
        return k
    lookup = {n.lower(): i for i, n in enumerate(class_set.names, start=1)}
    if v.lower() not in lookup:
        raise ValueError(f"{where}: class {v!r} is neither an id 0..{class_set.num_classes} nor one of "
                         f"{list(class_set.names)}")
    return lookup[v.lower()]


def read_points_csv(path: Path, shape: tuple[int, int], class_set: Any) -> Any:
    """A point Layout of canvas ``shape`` from a CSV file with a header naming the columns
    ``y``, ``x`` and ``class`` (any order, e.g. ``y,x,class`` or ``x,y,class``): pixel
    coordinates (row y down, column x right; floats allowed) and a class id (0 = unknown)
    or name of ``class_set``. A point off the canvas is an error, never clipped."""
    from nucsynth.layout import Layout

    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text CSV file") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if not {"y", "x", "class"} <= set(header):
        raise ValueError(f"{path}: the first line must name the columns y, x and class "
                         f"(e.g. 'y,x,class' or 'x,y,class'); got {header}")
    iy, ix, ic = header.index("y"), header.index("x"), header.index("class")
    cen, cls = [], []
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        where = f"{path} line {reader.line_num}"
        if len(row) < len(header):
            raise ValueError(f"{where}: expected {len(header)} values ({','.join(header)}), got {len(row)}")
        try:
            y, x = float(row[iy]), float(row[ix])
        except ValueError:
            raise ValueError(f"{where}: y and x must be numbers, got {row[iy]!r}, {row[ix]!r}") from None
        if not (0 <= y <= shape[0] - 1 and 0 <= x <= shape[1] - 1):
            raise ValueError(f"{where}: point (y={y}, x={x}) lies outside the {shape[0]}x{shape[1]} canvas "
                             "(set the canvas with --size H,W)")
        cen.append((y, x))
        cls.append(_class_id(row[ic], class_set, where))
    if not cen:
        raise ValueError(f"{path} holds no points (expected a header y,x,class and one line per nucleus)")
    return Layout.from_points(shape, np.asarray(cen, float), np.asarray(cls, np.int64), class_set)


def _read_points(args: argparse.Namespace, model: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """Point layouts for a joint model and the provenance of each (source, tile)."""
    from nucsynth.generate.layouts import points_from_labels
    from nucsynth.io import read_geojson

    path: Path | None = args.layouts
    if path is None:
        raise ValueError("a joint checkpoint needs point layouts: --layouts POINTS.csv (y,x,class), "
                         "POINTS.geojson or a dataset store (its nuclei centroids)")
    if not path.exists():
        raise FileNotFoundError(f"--layouts {path} does not exist")
    size = parse_size(args.size)
    kind = POINT_SUFFIXES.get(path.suffix.lower()) if path.is_file() else None
    if kind is not None:
        if args.split is not None or args.limit is not None:
            raise ValueError(f"--split and --limit apply to a dataset store; {path} is one {kind.upper()} canvas")
        if kind == "csv":
            lay = read_points_csv(path, size or (model.image_size,) * 2, model.class_set)
        else:
            lay = points_from_labels(read_geojson(path, shape=size, class_set=model.class_set))
        return [lay], [{"source": str(path), "source_tile": path.stem}]
    if size is not None:
        raise ValueError(f"--size sets the canvas of CSV / GeoJSON points; {path} brings its own patch size")
    samples = _in_model_classes(_read_layout_source(path, args.split, args.limit), model, args)
    return ([points_from_labels(s.layout) for s in samples],
            [{"source": s.provenance.get("source"), "source_tile": s.provenance.get("tile")} for s in samples])


def _edit(samples: Sequence[Any], args: argparse.Namespace) -> list[Any]:
    """The layouts to render for the chosen mode (one per source sample)."""
    lays = [s.layout for s in samples]
    if args.mode == "layout":
        return lays
    if args.mode == "enlarge":
        from nucsynth.edit import enlarge_layout

        return [enlarge_layout(l, fraction=args.enlarge_fraction, max_shift=args.max_shift, seed=args.seed + i)
                for i, l in enumerate(lays)]
    from nucsynth.edit import BalanceWarning, balance_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BalanceWarning)  # the reports below say what was reached
        out, reports = balance_dataset(lays, target_share=args.target_share, seed=args.seed, border=args.border)
    reached = sum(bool(r.reached) for r in reports)
    print(f"balance: target reached in {reached}/{len(reports)} patches", file=sys.stderr)
    return out


# ---------------------------------------------------------------------- checks
def _check_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    parse_size(args.size)
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")


# Options that only some families take: option -> (attribute, families, what it is for).
_FAMILY_OPTIONS = {
    "--layouts": ("layouts", ("semantic", "joint"), "the layouts (semantic) or points (joint) to render"),
    "--count": ("count", ("structure",), "how many new layouts a structure model generates"),
    "--size": ("size", ("structure", "joint"), "the canvas of generated layouts and of CSV / GeoJSON points"),
    "--prompt": ("prompt", ("joint",), "the text prompt of the joint model"),
    "--image-checkpoint": ("image_checkpoint", ("structure",), "the NuDiff stage-2 image model of a structure model"),
    "--strength": ("strength", ("semantic",), "partial noising of a real image"),
    "--class-source": ("class_source", ("joint",), "where the joint model's nucleus classes come from"),
    "--split": ("split", ("semantic", "joint"), "the split of a source store"),
    "--limit": ("limit", ("semantic", "joint"), "how many source patches to use"),
}


def _check_family(family: str, args: argparse.Namespace, ckpt: Path) -> None:
    """Refuse options the checkpoint's family cannot use, naming what it needs instead."""
    for opt, (attr, families, what) in _FAMILY_OPTIONS.items():
        if getattr(args, attr) is not None and family not in families:
            raise ValueError(f"{opt} ({what}) does not apply to checkpoint {ckpt}, a {family!r} model; "
                             f"it is for {' / '.join(families)} checkpoints")
    if family != "semantic" and args.mode != "layout":
        raise ValueError(f"--mode {args.mode} (DiffMix) needs a 'semantic' checkpoint; {ckpt} holds a {family!r} model")
    if family == "semantic" and args.layouts is None:
        raise ValueError("a semantic checkpoint renders label maps: give --layouts (a dataset store or a readable source)")
    if family == "structure" and args.count is None:
        raise ValueError("a structure checkpoint generates new layouts: give --count N (and --size H,W)")
    if family == "structure" and args.image_checkpoint is None:
        raise ValueError("a structure model makes layouts without images and a store holds images: give "
                         "--image-checkpoint, a semantic checkpoint trained with condition 'structure' "
                         "(nucsynth train --family semantic --condition structure)")


def _guidance(model: Any, args: argparse.Namespace) -> float:
    """--guidance, else the default of the model's own ``sample``."""
    if args.guidance is not None:
        return float(args.guidance)
    return float(inspect.signature(model.sample).parameters["guidance"].default)


# ---------------------------------------------------------------------- per family
def _semantic_batches(model: Any, args: argparse.Namespace, attrs: dict[str, Any]) -> tuple[int, Iterator[list[Any]]]:
    samples = _in_model_classes(_read_layout_source(args.layouts, args.split, args.limit), model, args)
    if not samples:
        raise ValueError(f"--layouts {args.layouts} holds no samples")
    layouts = _edit(samples, args)
    strength = args.strength if args.strength is not None else (None if args.mode == "layout" else DIFFMIX_STRENGTH)
    guidance = _guidance(model, args)
    attrs.update(strength=strength, guidance=guidance)

    def batches() -> Iterator[list[Any]]:
        for start in range(0, len(layouts), args.batch_size):
            src = samples[start : start + args.batch_size]
            init = [s.image for s in src] if strength is not None else None
            out = model.sample(layouts[start : start + args.batch_size], steps=args.steps, guidance=guidance,
                               seed=args.seed + start, sampler=args.sampler, init_image=init, strength=strength)
            yield [_with_provenance(o, {"mode": args.mode, "source_index": start + i,
                                        "source": s.provenance.get("source"), "source_tile": s.provenance.get("tile")})
                   for i, (o, s) in enumerate(zip(out, src))]

    return len(layouts), batches()


def _joint_batches(model: Any, args: argparse.Namespace, attrs: dict[str, Any]) -> tuple[int, Iterator[list[Any]]]:
    layouts, sources = _read_points(args, model)
    if not layouts:
        raise ValueError(f"--layouts {args.layouts} holds no patches")
    guidance = _guidance(model, args)
    class_source = args.class_source or "label"
    attrs.update(guidance=guidance, prompt=args.prompt, class_source=class_source)

    def batches() -> Iterator[list[Any]]:
        for start in range(0, len(layouts), args.batch_size):
            out = model.sample(layouts[start : start + args.batch_size], prompts=args.prompt, steps=args.steps,
                               guidance=guidance, seed=args.seed + start, sampler=args.sampler,
                               class_source=class_source)
            yield [_with_provenance(o, {"mode": "points", "source_index": start + i, **sources[start + i]})
                   for i, o in enumerate(out)]

    return len(layouts), batches()


def _structure_batches(model: Any, args: argparse.Namespace, attrs: dict[str, Any]) -> tuple[int, Iterator[list[Any]]]:
    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint

    img_ckpt = resolve_checkpoint(args.image_checkpoint)
    image_model, _ = load_checkpoint(img_ckpt, device=next(model.net.parameters()).device)
    condition = image_model.config_dict().get("condition")
    if image_model.name != "semantic" or condition != "structure":
        what = f"a {image_model.name!r} model" + (f" with condition {condition!r}" if condition else "")
        raise ValueError(f"--image-checkpoint {img_ckpt} holds {what}; NuDiff stage 2 needs a 'semantic' model "
                         "trained with condition 'structure' (nucsynth train --family semantic --condition structure)")
    size = parse_size(args.size) or (model.image_size, model.image_size)
    guidance = _guidance(image_model, args)
    attrs.update(image_checkpoint=str(img_ckpt), count=args.count, size=list(size), guidance=guidance)

    def batches() -> Iterator[list[Any]]:
        for start in range(0, args.count, args.batch_size):
            n = min(args.batch_size, args.count - start)
            lays = model.sample(n, size=size, steps=args.steps, seed=args.seed + start, sampler=args.sampler)
            out = image_model.sample(lays, steps=args.steps, guidance=guidance, seed=args.seed + start,
                                     sampler=args.sampler)
            yield [_with_provenance(o, {"mode": "structure", "index": start + i, "structure_checkpoint": model.checkpoint,
                                        "structure_checkpoint_step": model.step,
                                        "structure_model": f"nucsynth.structure/{model.preset}"})
                   for i, o in enumerate(out)]

    return args.count, batches()


_FAMILIES = {"semantic": _semantic_batches, "joint": _joint_batches, "structure": _structure_batches}


def run(args: argparse.Namespace) -> int:
    """Synthesize; returns the exit code."""
    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint
    from nucsynth.device import pick_device
    from nucsynth.io.store import DatasetStore, move_into_place, temporary_path

    _check_args(args)
    device = pick_device(args.device)
    ckpt = resolve_checkpoint(args.checkpoint)
    model, _ = load_checkpoint(ckpt, device=device)
    if model.name not in _FAMILIES:
        raise ValueError(f"checkpoint {ckpt} holds a {model.name!r} model; synthesize knows {sorted(_FAMILIES)}")
    _check_family(model.name, args, ckpt)
    attrs: dict[str, Any] = {"created_by": "nucsynth synthesize", "checkpoint": str(ckpt), "family": model.name,
                             "mode": args.mode if model.name == "semantic" else ("points" if model.name == "joint" else "structure"),
                             "source": None if args.layouts is None else str(args.layouts), "seed": args.seed,
                             "steps": args.steps, "sampler": args.sampler}
    total, batches = _FAMILIES[model.name](model, args, attrs)
    print(f"nucsynth synthesize: {total} patches, {model.name} model {ckpt} ({attrs['mode']}) on {device}",
          file=sys.stderr)

    tmp = temporary_path(args.out)
    t0 = time.perf_counter()
    done = 0
    try:
        store = DatasetStore.create(tmp, model.class_set, attrs=attrs)
        for out in batches:
            store.append(out, splits="synthetic")
            done += len(out)
            print(f"  {done}/{total} patches", file=sys.stderr, flush=True)
        move_into_place(tmp, args.out, overwrite=args.overwrite)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {done} samples to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _with_provenance(out: Any, extra: dict[str, Any]) -> Any:
    from nucsynth.layout import Sample

    return Sample(out.layout, out.image, {**out.provenance, **extra})
