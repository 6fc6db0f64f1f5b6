"""``nucsynth segmenter``: train and evaluate the compact HoVer-Net-style segmenter.

    nucsynth segmenter train --data STORE [--preset cpu] --out DIR [--split train] [--checkpoint-every N]
    nucsynth segmenter tune --model DIR --data STORE [--split train] --out TUNED_DIR
    nucsynth segmenter evaluate --model DIR --data STORE [--split val] [--whole] [--empty-score 0] [--json OUT.json]

The model folder holds ``model.safetensors`` + ``segmenter.json``
(:mod:`nucsynth.evaluate.segmenter`). Training prints progress with the time left; the
wall and CPU time are recorded with the model. ``tune`` picks the HV-watershed options
that maximize PQ on training patches (:func:`nucsynth.evaluate.segmenter.tune_postprocess`).
Evaluation prints Dice, AJI, PQ, F_d,
accuracy and per-class F1 (:func:`nucsynth.metrics.evaluate_set`) per patch, the number of
empty patches and how they were scored, and with ``--whole`` the whole-image figures
(:func:`nucsynth.evaluate.stitch.evaluate_tiles`) that published results are given in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

NAME = "segmenter"
HELP = "Train / evaluate the HoVer-Net-style nuclei segmenter (NP, HV and type branches + HV watershed)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Sub-commands ``train`` and ``evaluate``."""
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a segmenter on a store split")
    t.add_argument("--data", type=Path, required=True, help="dataset store (.zarr)")
    t.add_argument("--split", default="train", help="split to train on (default: train; 'all' = every patch)")
    t.add_argument("--preset", default="cpu", choices=("tiny", "quick", "cpu", "base"),
                   help="tiny: seconds, for tests; quick: 10-17 min on 2 cores; cpu: the yardstick, 21-37 min on 2 cores "
                        "(default); base: a GPU model")
    t.add_argument("--out", type=Path, required=True, help="model folder to write (never the --data store)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (the old one stays until the new one is written)")
    t.add_argument("--steps", type=int, help="training steps (preset default)")
    t.add_argument("--batch-size", type=int, help="batch size (preset default)")
    t.add_argument("--lr", type=float, help="AdamW learning rate (preset default)")
    t.add_argument("--crop", type=int, help="training crop in px (preset default)")
    t.add_argument("--blocks", type=int, help="residual blocks per encoder level (preset default)")
    t.add_argument("--stain-jitter", type=float,
                   help="HED stain augmentation strength: stain densities x (1 +- s) +- s (preset default)")
    t.add_argument("--micro-batches", type=int,
                   help="on CPU, run each batch as N micro-batches on worker threads (same weights for any --threads up to N; "
                        "1 = one pass per batch, as segmenters trained before micro-batches; preset default)")
    t.add_argument("--seed", type=int, default=0, help="seed of weights, batches and augmentation (default 0)")
    t.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    t.add_argument("--checkpoint-every", type=int, default=0,
                   help="also write the model every N steps to OUT.checkpoints/step_N (default 0: never)")
    u = sub.add_parser("tune", help="choose the HV-watershed options that maximize PQ on training patches")
    u.add_argument("--model", type=Path, required=True, help="model folder written by 'segmenter train'")
    u.add_argument("--data", type=Path, required=True, help="dataset store (.zarr)")
    u.add_argument("--split", default="train", help="split to tune on (default: train; never the evaluation split)")
    u.add_argument("--every", type=int, default=8, help="use every N-th patch of the split (default 8)")
    u.add_argument("--out", type=Path, required=True, help="model folder to write: the same weights, tuned options")
    u.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    u.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    e = sub.add_parser("evaluate", help="segment a store split and score it against its labels")
    e.add_argument("--model", type=Path, required=True, help="model folder written by 'segmenter train'")
    e.add_argument("--data", type=Path, required=True, help="dataset store (.zarr)")
    e.add_argument("--split", default="val", help="split to evaluate (default: val; 'all' = every patch)")
    e.add_argument("--json", type=Path, help="also write the full results (per class, per image) as JSON")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    e.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    e.add_argument("--whole", action="store_true",
                   help="also score whole images: each tile's patches reassembled (or pooled when they cannot be placed)")
    e.add_argument("--with-reference", type=Path, metavar="OUT_DIR",
                   help="also write a copy of the model that records its label-fidelity scores on these real patches "
                        "('evaluate fidelity' then scores synthetic images relative to them)")
    e.add_argument("--class-map", default=None,
                   help="the model's classes in the store's, where names differ: e.g. 'other=nucleus,inflammatory=nucleus,"
                        "epithelial=nucleus,spindle=nucleus' to score a CoNSeP model on instance-only MoNuSeg "
                        "(default: matched by name)")
    e.add_argument("--empty-score", choices=("0", "1", "nan"), default="0",
                   help="per-patch score of a patch with no nucleus in truth and prediction: 0 (HoVer-Net, default), "
                        "1 (nothing to find, nothing found), nan (left out of the means)")


def load_split(path: Path, split: str) -> Sequence[Any]:
    """The samples of one split of a store (``'all'`` = the whole store)."""
    from nucsynth.data.dataset import split_source
    from nucsynth.io.store import DatasetStore

    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    store = DatasetStore.open(path)
    idx = None if split == "all" else store.indices(split)
    if idx is not None and len(idx) == 0:
        raise ValueError(f"store {path} has no patches in split {split!r}; splits present: {sorted(set(store.splits.tolist()))}")
    _refuse_unmatched_images(store, path, idx)
    return store if idx is None else split_source(store, idx)


def _refuse_unmatched_images(store: Any, path: Path, idx: Any) -> None:
    """A labels-only edit (``nucsynth edit --mode balance|enlarge``) keeps the source images
    under changed labels: a segmenter trained or scored on such pairs learns or measures
    nonsense, so they are refused (the store's mark, or any patch's provenance)."""
    rows = range(len(store)) if idx is None else idx
    marked = store.attrs.get("images_match_labels") is False
    bad = [int(i) for i in rows if marked or store.provenance(int(i)).get("image_matches_labels") is False]
    if bad:
        raise ValueError(f"{path}: {len(bad)} patch(es) hold labels edited without their images (nucsynth edit "
                         "--mode balance / enlarge), so images and labels do not match; render them first "
                         f"(nucsynth synthesize --layouts {path} --out RENDERED.zarr) and use that store")


def _class_translation(model: Any, store: Any, class_map: str | None) -> Any:
    """A function taking predicted Layouts (the model's classes) to the store's class set,
    by name or by ``--class-map``; raises ValueError naming the unmatched classes."""
    from nucsynth.layout import LayoutError, class_lut, parse_class_map

    mapping = parse_class_map(class_map) if class_map else None
    try:
        class_lut(model, store, mapping)
    except LayoutError as e:
        raise ValueError(f"the model's classes cannot be scored against the store's: {e} (--class-map)") from None
    return lambda layouts: [lay.to_class_set(store, mapping) for lay in layouts]


def json_safe(x: Any) -> Any:
    """NaN -> None (strict JSON), numpy scalars -> Python numbers, recursively."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def write_json(path: Path, obj: Any, overwrite: bool = False, option: str = "--out") -> None:
    """Write JSON (NaN as null) to a result file; an existing one only with ``overwrite``
    (:func:`nucsynth.outputs.write_json`: the old file stays until the new one is complete)."""
    from nucsynth import outputs

    outputs.write_json(path, json_safe(obj), overwrite, option)


def summary_line(res: dict[str, Any]) -> str:
    m, a, d = res["mean"], res["aggregate"], res["detection"]
    f1 = " ".join(f"{k}={v:.3f}" for k, v in d["f1"].items())
    return (f"Dice {m['dice']:.4f}  AJI {m['aji']:.4f}  DQ {m['dq']:.4f}  SQ {m['sq']:.4f}  PQ {m['pq']:.4f} "
            f"(pooled {a['pq']:.4f})  F_d {d['f_d']:.4f}  acc {d['acc']:.4f}  F1: {f1}")


def _train(args: argparse.Namespace) -> int:
    from nucsynth import outputs

    outputs.check_not_input(args.out, {"--data": args.data})  # never replace the training data
    outputs.check_output(args.out, args.overwrite)  # before training, not after
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.checkpoint_every:
        outputs.check_output(args.out.with_name(f"{args.out.name}.checkpoints"), args.overwrite)
    import torch

    from nucsynth.device import pick_device
    from nucsynth.evaluate.segmenter import save_segmenter, segmenter_preset, train_segmenter

    # Read the split into memory once: every step draws random patches, and decoding them
    # from the store each time would cost more than the tiny network's forward pass.
    data = list(load_split(args.data, args.split))
    class_set = data[0].layout.class_set
    config = segmenter_preset(args.preset, class_set.num_classes, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, crop=args.crop, blocks=args.blocks,
                              stain_jitter=args.stain_jitter, micro_batches=args.micro_batches)
    device = pick_device(args.device)
    threads = torch.get_num_threads()  # set by the --threads option every command has
    every = max(1, config.steps // 50)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    extra = {"data": str(args.data.resolve()), "split": args.split, "count": len(data), "seed": args.seed,
             "preset": args.preset, "threads": threads, "device": str(device)}

    def progress(step: int, steps: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            wall = time.perf_counter() - wall0
            left = wall / step * (steps - step)
            print(f"step {step}/{steps}  loss {loss:.4f}  {_minutes(wall)} elapsed, about {_minutes(left)} left",
                  file=sys.stderr, flush=True)

    def checkpoint(step: int, net: Any) -> None:
        path = args.out.with_name(f"{args.out.name}.checkpoints") / f"step_{step:06d}"
        save_segmenter(path, net, class_set, {**extra, "step": step, "wall_s": time.perf_counter() - wall0}, overwrite=True)
        print(f"checkpoint {path}", file=sys.stderr, flush=True)

    print(f"training the {args.preset} segmenter on {len(data)} patches of {args.data} ({args.split}), {config.steps} steps, "
          f"{device}, {threads} thread(s){_micro_batch_note(config, device)}", file=sys.stderr, flush=True)
    net, log = train_segmenter(data, config, seed=args.seed, device=device, progress=progress,
                               checkpoint=checkpoint, checkpoint_every=args.checkpoint_every)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    extra.update({"loss_first": log[0]["loss"], "loss_last": log[-1]["loss"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)})
    save_segmenter(args.out, net, class_set, extra, overwrite=args.overwrite)
    print(f"segmenter written to {args.out} (loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f}; {_minutes(wall)} wall, "
          f"{_minutes(cpu)} of CPU time)")
    return 0


def _micro_batch_note(config: Any, device: Any) -> str:
    """How a batch runs, for the start line: micro-batches on CPU, one pass elsewhere."""
    if device.type != "cpu" or config.micro_batches == 1:
        return ""
    return f", {config.micro_batches} micro-batches per batch on worker threads"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _evaluate(args: argparse.Namespace) -> int:
    from nucsynth import outputs

    if args.json is not None:
        outputs.check_not_input(args.json, {"--data": args.data, "--model": args.model}, "--json")
        outputs.check_output(args.json, args.overwrite, "--json")  # before the work, not after
    if args.with_reference is not None:
        outputs.check_not_input(args.with_reference, {"--data": args.data, "--model": args.model}, "--with-reference")
        outputs.check_output(args.with_reference, args.overwrite, "--with-reference")
    from nucsynth.data.tiling import source_pairs
    from nucsynth.device import pick_device
    from nucsynth.evaluate.segmenter import load_segmenter, predict_layouts
    from nucsynth.metrics import evaluate_set

    device = pick_device(args.device)
    net, class_set, _ = load_segmenter(args.model, device)
    data = load_split(args.data, args.split)
    samples = list(data)
    in_store_classes = _class_translation(class_set, samples[0].layout.class_set, args.class_map)  # before the work
    empty = float(args.empty_score)
    preds = in_store_classes(predict_layouts(net, [s.image for s in samples], class_set, device=device))
    res = evaluate_set(*source_pairs(samples, preds), empty=empty)
    print(f"patch protocol, {len(samples)} patches of {args.data} ({args.split}): {summary_line(res)}")
    print(f"  {res['n_empty']} patch(es) with no nucleus in truth and prediction, scored {args.empty_score} "
          f"({res['n_empty_truth']} with no true nucleus)")
    out = {"model": str(args.model), "data": str(args.data), "split": args.split, "protocol": "patch", **res}
    if args.whole:
        from nucsynth.evaluate.segmenter import segment_image
        from nucsynth.evaluate.stitch import evaluate_tiles

        def segment(images: list) -> list:
            return in_store_classes([segment_image(net, im, class_set, device=device) for im in images])

        whole = evaluate_tiles(samples, segment, empty=empty)
        m, d = whole["mean"], whole["detection"]
        f1 = " ".join(f"{k}={v:.3f}" for k, v in d["f1"].items())
        print(f"whole-image protocol ({whole['mode']}, {whole['n_tiles']} tiles): Dice {m['dice']:.4f}  DQ {m['dq']:.4f}  "
              f"SQ {m['sq']:.4f}  PQ {m['pq']:.4f}  F_d {d['f_d']:.4f}  acc {d['acc']:.4f}  F1: {f1}")
        print(f"  {whole['reason']}")
        out["whole"] = whole
    if args.with_reference is not None:
        from nucsynth.evaluate.downstream import fidelity
        from nucsynth.evaluate.segmenter import save_segmenter

        ref = fidelity(samples, net, device=str(device))["summary"]
        _, _, extra = load_segmenter(args.model)
        extra = {**extra, "fidelity_reference": ref,
                 "fidelity_reference_data": f"{args.data} ({args.split}, {len(samples)} patches)"}
        save_segmenter(args.with_reference, net, class_set, extra, overwrite=args.overwrite)
        print(f"model with its real-image fidelity reference (score {ref['score']:.4f}) written to {args.with_reference}")
    if args.json is not None:
        write_json(args.json, out, overwrite=args.overwrite, option="--json")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from nucsynth import outputs

    outputs.check_not_input(args.out, {"--data": args.data, "--model": args.model})
    outputs.check_output(args.out, args.overwrite)
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    from nucsynth.device import pick_device
    from nucsynth.evaluate.segmenter import load_segmenter, save_segmenter, tune_postprocess

    device = pick_device(args.device)
    net, class_set, extra = load_segmenter(args.model, device)
    data = load_split(args.data, args.split)
    samples = [data[i] for i in range(0, len(data), args.every)]
    before = dict(net.config.postprocess)
    best, pq = tune_postprocess(net, samples, device=device, log=lambda m: print(m, file=sys.stderr, flush=True))
    net.config.postprocess = best
    extra = {**extra, "postprocess_tuning": {"data": str(args.data), "split": args.split, "patches": len(samples),
                                             "before": before, "pq": pq}}
    save_segmenter(args.out, net, class_set, extra, overwrite=args.overwrite)
    print(f"post-processing tuned on {len(samples)} patches of {args.data} ({args.split}): PQ {pq:.4f} with {best}; "
          f"written to {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``train`` / ``tune`` / ``evaluate``."""
    return {"train": _train, "tune": _tune, "evaluate": _evaluate}[args.action](args)
