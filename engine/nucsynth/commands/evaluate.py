"""``nucsynth evaluate``: the downstream segmenter protocol, label fidelity, image quality
and the choice of patches to label.

    nucsynth evaluate downstream --real STORE [--synthetic STORE] --fractions 0.1,1.0 --seeds 3 --out DIR
                                 [--tune-every 8] [--subsets subsets.json] [--allow-leakage]
    nucsynth evaluate fidelity STORE [--model SEGMENTER_DIR] [--real STORE] [--out DIR] [--min-score 0.5]
    nucsynth evaluate quality REAL SYNTH [--metrics fid,is,fsd] [--inception-weights PATH] [--out REPORT.json]
    nucsynth evaluate subsets --data STORE --fractions 0.1,0.2,0.5 --out subsets.json

``downstream`` trains the segmenter on each fraction of the real store's training split
(with and without the synthetic store), evaluates on the held-out split, and writes
``downstream.json`` (every run, summary, paired differences) and ``downstream.md`` (mean ±
std over seeds, paired difference with its confidence interval). Each finished run is
journaled in ``DIR/.downstream.json.partial``: run the same command again after an
interruption and it resumes after the last finished run. A synthetic store whose
layouts or generating model saw the held-out tiles is refused unless ``--allow-leakage``.
``fidelity`` segments the store's images (with the shipped segmenter by default), compares
with their layouts, scores relative to the same segmenter on real images, and writes
``fidelity.json``. ``quality`` computes FID / IS / FSD of a synthetic set against a real one
(:func:`nucsynth.evaluate.image_quality.image_quality_report`). ``subsets`` chooses the
labelled subsets by k-means (:mod:`nucsynth.evaluate.subsets`) for ``downstream --subsets``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nucsynth.commands.segmenter import json_safe, load_split, write_json

NAME = "evaluate"
HELP = "Evaluate synthetic data: downstream segmenter protocol (real vs real+synthetic), label fidelity, FID/IS/FSD."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Sub-commands ``downstream``, ``fidelity`` and ``quality``."""
    sub = p.add_subparsers(dest="action", required=True)
    d = sub.add_parser("downstream", help="train the segmenter on real fractions with/without synthetic data")
    d.add_argument("--real", type=Path, required=True, help="real dataset store (.zarr) with train and held-out splits")
    d.add_argument("--synthetic", type=Path, help="synthetic dataset store added to every real fraction")
    d.add_argument("--fractions", default="0.1,1.0", help="comma-separated fractions of the real training split (default 0.1,1.0)")
    d.add_argument("--seeds", type=int, default=3, help="number of seeds 0..N-1 per fraction (default 3)")
    d.add_argument("--train-split", default="train", help="real training split (default: train)")
    d.add_argument("--test-split", default="val", help="held-out real split (default: val)")
    d.add_argument("--synthetic-split", default="all", help="split of the synthetic store to use (default: all)")
    d.add_argument("--preset", default="cpu", choices=("tiny", "quick", "cpu", "base"),
                   help="segmenter preset (default: cpu; quick: the one of the published downstream tables, 2.8x faster)")
    d.add_argument("--subsets", type=Path, help="subsets.json from 'nucsynth evaluate subsets' (k-means labelled subsets "
                   "of the training split; default: a random subset per fraction and seed)")
    d.add_argument("--allow-leakage", action="store_true", help="use a synthetic set even if its layouts or generating "
                   "model saw the test split's tiles, or do not record what they saw (refused by default)")
    d.add_argument("--tune-every", type=int, default=8,
                   help="tune each run's watershed options on every N-th patch of its real training subset, as "
                        "'segmenter tune' does (default 8; 0 = the preset's options)")
    d.add_argument("--steps", type=int, help="training steps per run (preset default)")
    d.add_argument("--batch-size", type=int, help="batch size (preset default)")
    d.add_argument("--crop", type=int, help="training crop in px (preset default)")
    d.add_argument("--micro-batches", type=int,
                   help="on CPU, run each batch as N micro-batches on worker threads (same weights for any --threads up to N; "
                        "1 = one pass per batch, as segmenters trained before micro-batches; preset default)")
    d.add_argument("--out", type=Path, required=True, help="folder for downstream.json and downstream.md")
    d.add_argument("--overwrite", action="store_true", help="replace downstream.json / downstream.md in --out")
    d.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    f = sub.add_parser("fidelity", help="segment synthesized samples and compare with their layouts")
    f.add_argument("store", type=Path, help="store of synthesized samples (image + the layout it was conditioned on)")
    f.add_argument("--model", type=Path, help="segmenter folder (nucsynth segmenter train; default: the shipped one)")
    f.add_argument("--real", type=Path, help="real store to score the same segmenter on, for relative scores "
                   "(default: the reference recorded with the model)")
    f.add_argument("--real-split", default="val", help="split of --real (default: val)")
    f.add_argument("--split", default="all", help="split to score (default: all)")
    f.add_argument("--out", type=Path, help="folder for fidelity.json (default: print the summary only)")
    f.add_argument("--overwrite", action="store_true", help="replace fidelity.json in --out")
    f.add_argument("--min-score", type=float, help="list the samples scoring below this value")
    f.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    k = sub.add_parser("subsets", help="choose the patches to label: k-means on image features (NuDiff), for --subsets")
    k.add_argument("--data", type=Path, required=True, help="dataset store (.zarr)")
    k.add_argument("--split", default="train", help="split to choose from (default: train)")
    k.add_argument("--fractions", default="0.1,0.2,0.5", help="comma-separated fractions (default 0.1,0.2,0.5)")
    k.add_argument("--clusters", type=int, default=6, help="k-means clusters (default 6, as NuDiff)")
    k.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    k.add_argument("--out", type=Path, required=True, help="JSON file to write (indices within the split)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    q = sub.add_parser("quality", help="FID, IS and FSD of a synthetic set against a real one")
    q.add_argument("real", type=Path, help="real data: a dataset store or any source 'nucsynth prepare' reads")
    q.add_argument("synth", type=Path, help="synthetic data: a dataset store or any readable source")
    q.add_argument("--metrics", default="fid,is,fsd", help="comma-separated subset of fid,is,fsd (default: all; fsd needs no weights)")
    q.add_argument("--inception-weights", type=Path, help="pt_inception-2015-12-05-6726825d.pth (file or folder; default: "
                   "$NUCSYNTH_INCEPTION_WEIGHTS, else torch hub's checkpoint folder)")
    q.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    q.add_argument("--batch-size", type=int, default=32, help="images per Inception batch (default 32)")
    q.add_argument("--splits", type=int, default=10, help="IS splits (default 10, lowered to the set size)")
    q.add_argument("--fsd-statistics", choices=("area", "instance"), default="area", help="FSD label statistics (default: area)")
    q.add_argument("--out", type=Path, help="write the report here as JSON")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _fractions(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--fractions must be comma-separated numbers in (0, 1], got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise ValueError(f"--fractions must be comma-separated numbers in (0, 1], got {text!r}")
    return vals


def _downstream(args: argparse.Namespace) -> int:
    from nucsynth.device import pick_device
    from nucsynth.evaluate.downstream import downstream, downstream_markdown
    from nucsynth.evaluate.segmenter import segmenter_preset

    fractions = _fractions(args.fractions)
    _check_outputs(args, [args.out / "downstream.json", args.out / "downstream.md"], {"--real": args.real, "--synthetic": args.synthetic})
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.tune_every < 0:
        raise ValueError(f"--tune-every must be >= 0 (0 = the preset's post-processing), got {args.tune_every}")
    train = load_split(args.real, args.train_split)
    test = load_split(args.real, args.test_split)
    synthetic = load_split(args.synthetic, args.synthetic_split) if args.synthetic is not None else None
    cs = train[0].layout.class_set
    if synthetic is not None:  # classes matched by name (any order); other classes refused before training
        from nucsynth.layout import Sample

        synthetic = [Sample(s.layout.to_class_set(cs), s.image, s.provenance) for s in synthetic]
    leaks: list[str] = []
    if synthetic is not None:
        leaks = _leakage(args, synthetic, test)
        if leaks and not args.allow_leakage:
            raise ValueError(f"the synthetic set may have seen the test split ({args.test_split}): {leaks[0]}"
                             + (f" (and {len(leaks) - 1} more)" if len(leaks) > 1 else "")
                             + "; use one made without those tiles, or pass --allow-leakage to report it anyway")
    subsets = _read_subsets(args.subsets, args, len(train)) if args.subsets is not None else None
    config = segmenter_preset(args.preset, cs.num_classes, steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                              micro_batches=args.micro_batches)
    device = pick_device(args.device)
    journal = _downstream_journal(args, config, str(device), subsets, len(train), len(test),
                                  None if synthetic is None else len(synthetic))
    completed = journal.load()
    if completed:
        print(f"resuming: {len(completed)} run(s) finished earlier, kept from {journal.path}", file=sys.stderr)
    result = downstream(train, test, config, synthetic, fractions, list(range(args.seeds)), device=str(device),
                        log=lambda m: print(m, file=sys.stderr, flush=True), subsets=subsets,
                        completed=completed, on_run=journal.append, tune_every=args.tune_every)
    result = {
        "real": str(args.real), "synthetic": None if args.synthetic is None else str(args.synthetic),
        "train_split": args.train_split, "test_split": args.test_split, "test_patches": len(test),
        "leakage": leaks, "subsets_file": None if args.subsets is None else str(args.subsets),
        "segmenter": config.to_dict(), **result,
    }
    from nucsynth import outputs

    write_json(args.out / "downstream.json", result, overwrite=args.overwrite)
    md = downstream_markdown(result)
    outputs.write_text(args.out / "downstream.md", md, overwrite=args.overwrite)
    journal.remove()
    print(md)
    return 0


def _downstream_journal(args: argparse.Namespace, config: Any, device: str, subsets: Any, n_train: int, n_test: int,
                        n_synthetic: int | None) -> Any:
    """The journal of finished runs that lets an interrupted ``downstream`` resume: every
    setting a run's result depends on. Fractions and seeds are not among them: each run is
    keyed by its own, so a resumed call may also ask for more seeds or fractions."""
    import torch

    from nucsynth import outputs

    settings = {
        "real": str(args.real.resolve()), "train_split": args.train_split, "test_split": args.test_split,
        "train_patches": n_train, "test_patches": n_test,
        "synthetic": None if args.synthetic is None else str(args.synthetic.resolve()),
        "synthetic_split": args.synthetic_split, "synthetic_patches": n_synthetic,
        "subsets": None if subsets is None else {str(k): [int(i) for i in v] for k, v in subsets.items()},
        "segmenter": config.to_dict(), "tune_every": args.tune_every, "device": device,
        "threads": torch.get_num_threads(),
    }
    return outputs.Journal(outputs.partial_path(args.out / "downstream.json"), settings, _upgrade_journal_settings)


def _upgrade_journal_settings(have: dict[str, Any]) -> dict[str, Any]:
    """Settings of an earlier version's journal as this one records them: its segmenter
    config with the fields added since at their defaults (e.g. ``micro_batches`` 1, the one
    pass those runs trained with), so that ``--micro-batches 1`` resumes such a journal."""
    from nucsynth.evaluate.segmenter import SegmenterConfig

    seg = have.get("segmenter")
    if not isinstance(seg, dict):
        return have
    try:
        return {**have, "segmenter": json.loads(json.dumps(SegmenterConfig.from_dict(seg).to_dict()))}
    except ValueError:  # not a config this version reads: it stays different, and the journal is refused
        return have


def _leakage(args: argparse.Namespace, synthetic: Any, test: Any) -> list[str]:
    """Problems found by :func:`nucsynth.evaluate.downstream.leakage` for the synthetic store."""
    from nucsynth.evaluate.downstream import leakage
    from nucsynth.io.store import DatasetStore

    eval_tiles = {str(s.provenance.get("tile")) for s in test if s.provenance.get("tile")}
    store = DatasetStore.open(args.synthetic)
    idx = range(len(store)) if args.synthetic_split == "all" else store.indices(args.synthetic_split).tolist()
    return leakage([store.provenance(int(i)) for i in idx], eval_tiles)


def _read_subsets(path: Path, args: argparse.Namespace, n_train: int) -> dict[float, list[int]]:
    """The subsets of a ``nucsynth evaluate subsets`` file, checked against the training split."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        subsets = {float(k): [int(i) for i in v] for k, v in doc["subsets"].items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--subsets {path} is not a subsets file written by 'nucsynth evaluate subsets': {e}") from None
    if doc.get("split") != args.train_split or int(doc.get("n", -1)) != n_train:
        raise ValueError(f"--subsets {path} chose from {doc.get('n')} patches of split {doc.get('split')!r}; "
                         f"the training split {args.train_split!r} of {args.real} has {n_train}")
    return subsets


def _subsets(args: argparse.Namespace) -> int:
    from nucsynth.evaluate.subsets import kmeans_subsets, patch_features

    fractions = _fractions(args.fractions)
    _check_outputs(args, [args.out], {"--data": args.data})
    data = load_split(args.data, args.split)
    if args.clusters < 1 or args.clusters > len(data):
        raise ValueError(f"--clusters must be in 1..{len(data)} (the patches of split {args.split!r}), got {args.clusters}")
    feats = patch_features([s.image for s in data])
    chosen = kmeans_subsets(feats, fractions, k=args.clusters, seed=args.seed)
    doc = {"method": "kmeans", "features": "H&E optical density statistics + gradient (nucsynth.evaluate.subsets)",
           "clusters": args.clusters, "seed": args.seed, "data": str(args.data), "split": args.split, "n": len(data),
           "subsets": {f"{f:g}": idx.tolist() for f, idx in chosen.items()}}
    write_json(args.out, doc, overwrite=args.overwrite)
    print(f"wrote {args.out}: " + ", ".join(f"{f:g}: {len(i)} patches" for f, i in chosen.items())
          + f" of {len(data)} ({args.split}), k-means with {args.clusters} clusters")
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from nucsynth.device import pick_device
    from nucsynth.evaluate.downstream import fidelity
    from nucsynth.evaluate.segmenter import load_segmenter

    if args.out is not None:
        _check_outputs(args, [args.out / "fidelity.json"], {"STORE": args.store, "--model": args.model, "--real": args.real})
    device = pick_device(args.device)
    net, class_set, extra = load_segmenter(args.model, device)
    data = load_split(args.store, args.split)
    from nucsynth.layout import Sample

    # Predictions carry the segmenter's class ids, so the truth is brought into the segmenter's
    # class set by name (any order; other classes are refused here, before any prediction).
    data = [Sample(s.layout.to_class_set(class_set), s.image, s.provenance) for s in data]
    if args.real is not None:
        reference = fidelity(load_split(args.real, args.real_split), net, device=str(device))["summary"]
        ref_from = f"{args.real} ({args.real_split})"
    else:
        reference = extra.get("fidelity_reference")
        ref_from = str(extra.get("fidelity_reference_data", "the model's record"))
    res: dict[str, Any] = fidelity(data, net, device=str(device), reference=reference)
    s = res["summary"]
    print(f"{res['n_samples']} samples: score {s['score']:.4f}  PQ {s['pq']:.4f}  F_d {s['f_d']:.4f}  F1 mean {s['f1_mean']:.4f}")
    if "relative" in res:
        r, ref = res["relative"], res["reference"]
        print(f"relative to real images ({ref_from}: score {ref['score']:.4f}): score {r['score']:.3f}  PQ {r['pq']:.3f}  "
              f"F_d {r['f_d']:.3f}  F1 mean {r['f1_mean']:.3f}  (1 = as faithful as real tissue)")
        res["reference_data"] = ref_from
    else:
        print("no real-image reference (pass --real STORE): absolute scores depend on the segmenter")
    if args.min_score is not None:
        bad = [r["index"] for r in res["per_sample"] if r["score"] < args.min_score]
        res["below_min_score"] = bad
        print(f"{len(bad)} samples score below {args.min_score}: {bad}")
    if args.out is not None:
        write_json(args.out / "fidelity.json", json_safe({"store": str(args.store), "model": str(args.model or "shipped"), **res}),
                   overwrite=args.overwrite)
    return 0


def _metrics(text: str) -> tuple[str, ...]:
    from nucsynth.evaluate.image_quality import QUALITY_METRICS

    vals = tuple(dict.fromkeys(v.strip().lower() for v in text.split(",") if v.strip()))
    if not vals or any(v not in QUALITY_METRICS for v in vals):
        raise ValueError(f"--metrics must be a comma-separated subset of {','.join(QUALITY_METRICS)}, got {text!r}")
    return vals


def _open_source(path: Path) -> Any:
    """A dataset store opened lazily (images read a batch at a time), else any readable source."""
    from nucsynth.io import read_source
    from nucsynth.io.store import DatasetStore

    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    data = DatasetStore.open(path) if (path / "zarr.json").is_file() else read_source(path)
    if len(data) == 0:
        raise ValueError(f"{path} holds no samples")
    return data


def _quality(args: argparse.Namespace) -> int:
    from nucsynth.evaluate.image_quality import image_quality_report

    metrics = _metrics(args.metrics)
    if args.out is not None:
        _check_outputs(args, [args.out], {"REAL": args.real, "SYNTH": args.synth})
    if args.batch_size < 1 or args.splits < 1:
        raise ValueError(f"--batch-size and --splits must be >= 1, got {args.batch_size} and {args.splits}")
    device = None
    if "fid" in metrics or "is" in metrics:
        from nucsynth.device import pick_device
        from nucsynth.evaluate.inception import find_inception_weights

        find_inception_weights(args.inception_weights)  # fail before reading any data
        device = pick_device(args.device)
    real, synth = _open_source(args.real), _open_source(args.synth)
    rep = image_quality_report(real, synth, metrics=metrics, weights=args.inception_weights, device=device,
                               batch_size=args.batch_size, splits=args.splits, fsd_kind=args.fsd_statistics)
    rep = {"real": str(args.real), "synth": str(args.synth), "metrics": list(metrics), **rep}
    parts = [f"{rep['n_real']} real vs {rep['n_synth']} synthetic"]
    if "fid" in rep:
        parts.append(f"FID {rep['fid']:.3f}")
    if "is_synth" in rep:
        parts.append(f"IS real {rep['is_real']:.3f} ± {rep['is_real_std']:.3f}, synthetic {rep['is_synth']:.3f} ± {rep['is_synth_std']:.3f}")
    if "fsd" in rep:
        parts.append(f"FSD ({rep['fsd_statistics']}) {rep['fsd']:.4f}")
    print(": ".join(parts[:1]) + ": " + "  ".join(parts[1:]))
    if "inception_weights" in rep:
        print(f"Inception weights {rep['inception_weights']} (sha256 {rep['inception_weights_sha256'][:12]}...) on {rep['device']}")
    if args.out is not None:
        write_json(args.out, rep, overwrite=args.overwrite)
        print(f"report written to {args.out}")
    return 0


def _check_outputs(args: argparse.Namespace, files: list[Path], inputs: dict[str, Path | None]) -> None:
    """Refuse, before any work, result files that exist (without --overwrite), that cannot
    be written, or that would replace an input."""
    from nucsynth import outputs

    for f in files:
        outputs.check_not_input(f, inputs)
        outputs.check_output(f, args.overwrite)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``downstream`` / ``fidelity`` / ``quality`` / ``subsets``."""
    return {"downstream": _downstream, "fidelity": _fidelity, "quality": _quality, "subsets": _subsets}[args.action](args)
