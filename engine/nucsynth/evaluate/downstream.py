"""The downstream protocol and label fidelity: what synthetic data does for a segmenter.

Downstream (the yardstick of NASDM, DiffMix, NuDiff and co-synthesis papers): for each
fraction of the real training split and each seed, train the segmenter on that real subset
alone and on the subset plus the synthetic data, segment the held-out real split, and score
it with :func:`nucsynth.metrics.evaluate_set`. Report: mean and sample standard deviation
over seeds, and the PAIRED difference (real + synthetic minus real, same subset and seed)
with a Student-t confidence interval; a difference whose interval holds 0 is "within noise".
:func:`leakage` tells whether a synthetic set's layouts or generating model saw the
evaluation tiles (from recorded provenance), which the protocol refuses by default.

Fidelity: segment synthesized images with a trained segmenter and compare with the layouts
they were conditioned on; one score per sample (to filter bad samples) and a summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from nucsynth.data.tiling import crop_to_source, source_pairs
from nucsynth.evaluate.segmenter import (
    HoVerSegmenter,
    SegmenterConfig,
    predict_layouts,
    train_segmenter,
    tune_postprocess,
)
from nucsynth.layout import Sample
from nucsynth.metrics import detection_classification, evaluate_set, instance_metrics

__all__ = ["ConcatSamples", "subset_indices", "table_metrics", "downstream", "summarize", "paired_interval", "verdict",
           "paired_differences", "downstream_markdown", "leakage", "fidelity"]


class ConcatSamples(Sequence[Sample]):
    """Several Sequence[Sample] read as one (no copy; all must share a class set)."""

    def __init__(self, *parts: Sequence[Sample]) -> None:
        self.parts = [p for p in parts if len(p)]
        if not self.parts:
            raise ValueError("nothing to concatenate: every part is empty")
        names = {p[0].layout.class_set.name for p in self.parts}
        if len(names) != 1:
            raise ValueError(f"the parts use different class sets {sorted(names)}; they must share one")
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    @property
    def class_set(self) -> Any:
        return self.parts[0][0].layout.class_set

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i %= len(self)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k][i - int(self.offsets[k])]

    def __iter__(self) -> Iterator[Sample]:
        for p in self.parts:
            yield from p


def subset_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """A random subset of ``round(fraction * n)`` (at least 1) of ``range(n)``, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fractions must lie in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * n)))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


class _View(Sequence[Sample]):
    def __init__(self, source: Sequence[Sample], idx: np.ndarray) -> None:
        self.source, self.idx = source, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        return self.source[int(self.idx[i])]


def table_metrics(res: dict[str, Any]) -> dict[str, float]:
    """The table columns of one evaluation: Dice, AJI, DQ, SQ, PQ (per-image means), F_d,
    Acc and F1 per class (``f1_<name>``)."""
    m, d = res["mean"], res["detection"]
    row = {k: float(m[k]) for k in ("dice", "aji", "dq", "sq", "pq")}
    row["f_d"], row["acc"] = float(d["f_d"]), float(d["acc"])
    row.update({f"f1_{name}": float(v) for name, v in d["f1"].items()})
    return row


def downstream(
    train: Sequence[Sample],
    test: Sequence[Sample],
    config: SegmenterConfig,
    synthetic: Sequence[Sample] | None = None,
    fractions: Sequence[float] = (0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    subsets: dict[float, Sequence[int]] | None = None,
    confidence: float = 0.95,
    completed: Sequence[dict[str, Any]] = (),
    on_run: Callable[[dict[str, Any]], None] | None = None,
    tune_every: int = 8,
) -> dict[str, Any]:
    """Run the protocol; returns ``{"runs": [...], "summary": [...], "paired": [...]}``.

    Each run: fraction, seed, setting ("real" or "real+synthetic"), the number of training
    patches and :func:`table_metrics` on ``test``. Subsets are drawn per (fraction, seed)
    (:func:`subset_indices`) unless ``subsets`` gives the indices of each fraction (e.g.
    the k-means subsets of :mod:`nucsynth.evaluate.subsets`, then shared by all seeds); a
    subset is shared by both settings, and the segmenter's seed is the run's seed.

    Post-processing: with ``tune_every`` > 0 each trained segmenter's watershed options are
    tuned (:func:`~nucsynth.evaluate.segmenter.tune_postprocess`) on every ``tune_every``-th
    patch of the run's REAL subset (at least 8 patches when the subset has them; the same
    patches for both settings, never the test split), as the yardstick is used elsewhere;
    the row records them under "postprocess". 0 keeps the preset's options.
    ``summary``: :func:`summarize`; ``paired``: :func:`paired_differences`.

    Resuming: ``completed`` holds rows of an earlier, interrupted call with the same data
    and settings; a (fraction, seed, setting) found there is taken as is instead of trained
    again (each run depends only on its own subset and seed, so the result equals an
    uninterrupted call's). ``on_run(row)`` is called after each newly trained run, e.g. to
    journal it.
    """
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"the protocol needs training and test patches, got {len(train)} and {len(test)}")
    if not seeds:
        raise ValueError("give at least one seed")
    if tune_every < 0:
        raise ValueError(f"tune_every must be >= 0 (0 = no tuning), got {tune_every}")
    class_set = train[0].layout.class_set
    test_samples = list(test)
    truths = [crop_to_source(s.layout, s.provenance) for s in test_samples]  # padding is not scored
    settings = ["real"] + (["real+synthetic"] if synthetic is not None and len(synthetic) else [])
    runs: list[dict[str, Any]] = []
    if subsets is not None:
        missing = [f for f in fractions if float(f) not in {float(k) for k in subsets}]
        if missing:
            raise ValueError(f"the given subsets have no fraction {missing}; they hold {sorted(float(k) for k in subsets)}")
        subsets = {float(k): np.asarray(v, np.int64) for k, v in subsets.items()}
        for f, idx in subsets.items():
            if idx.size == 0 or idx.min() < 0 or idx.max() >= len(train):
                raise ValueError(f"subset of fraction {f} holds indices outside 0..{len(train) - 1} (the training split)")
    done = {(float(r["fraction"]), int(r["seed"]), str(r["setting"])): dict(r) for r in completed}
    for fraction in fractions:
        for seed in seeds:
            chosen = subsets[float(fraction)] if subsets is not None else subset_indices(len(train), fraction, seed)
            real = _View(train, chosen)
            for setting in settings:
                if (float(fraction), int(seed), setting) in done:
                    runs.append(done[(float(fraction), int(seed), setting)])
                    if log is not None:
                        log(f"fraction {fraction} seed {seed} {setting}: done in an earlier run, kept")
                    continue
                data = real if setting == "real" else ConcatSamples(real, synthetic)  # type: ignore[arg-type]
                net, _ = train_segmenter(data, config, seed=seed, device=device)
                post = dict(net.config.postprocess)
                if tune_every:
                    step = max(1, min(tune_every, len(real) // 8))
                    post, _ = tune_postprocess(net, [real[i] for i in range(0, len(real), step)], device=device)
                preds = predict_layouts(net, [s.image for s in test_samples], class_set, device=device, **post)
                row = {"fraction": float(fraction), "seed": int(seed), "setting": setting, "train_patches": len(data),
                       "postprocess": post}
                res = evaluate_set(truths, [crop_to_source(p, s.provenance) for p, s in zip(preds, test_samples)])
                row.update(table_metrics(res))
                row["empty_patches"] = res["n_empty"]
                runs.append(row)
                if on_run is not None:
                    on_run(row)
                if log is not None:
                    log(f"fraction {fraction} seed {seed} {setting}: PQ {row['pq']:.4f} Dice {row['dice']:.4f}")
    return {"runs": runs, "summary": summarize(runs), "paired": paired_differences(runs, confidence),
            "subsets": "given" if subsets is not None else "random", "tune_every": tune_every}


_NOT_METRICS = ("fraction", "seed", "setting", "train_patches", "empty_patches", "postprocess")


def _metric_keys(runs: list[dict[str, Any]]) -> list[str]:
    return [k for k in runs[0] if k not in _NOT_METRICS]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (fraction, setting): ``{metric: {"mean", "std", "n"}}`` over seeds, where std is
    the SAMPLE standard deviation (ddof 1; NaN with one seed) and NaN values are skipped."""
    out = []
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["fraction"], r["setting"]), []).append(r)
    for (fraction, setting), rows in groups.items():
        row: dict[str, Any] = {"fraction": fraction, "setting": setting, "seeds": len(rows)}
        for k in _metric_keys(runs):
            vals = np.array([r[k] for r in rows], float)
            vals = vals[~np.isnan(vals)]
            row[k] = {"mean": float(vals.mean()) if vals.size else float("nan"),
                      "std": float(vals.std(ddof=1)) if vals.size > 1 else float("nan"), "n": int(vals.size)}
        out.append(row)
    return out


def paired_interval(diffs: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of paired differences with its two-sided Student-t confidence interval.

    Returns ``{"mean", "low", "high", "n"}`` (NaN values skipped; ``low``/``high`` NaN with
    fewer than 2 values). The t interval assumes roughly normal differences: with 3 seeds
    it is wide, which is the honest answer about 3 seeds.
    """
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = np.asarray(diffs, float)
    d = d[~np.isnan(d)]
    nan = float("nan")
    if d.size == 0:
        return {"mean": nan, "low": nan, "high": nan, "n": 0}
    m = float(d.mean())
    if d.size < 2:
        return {"mean": m, "low": nan, "high": nan, "n": 1}
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return {"mean": m, "low": m - half, "high": m + half, "n": int(d.size)}


def verdict(interval: dict[str, float]) -> str:
    """"better" / "worse" when the interval excludes 0, "within noise" when it holds 0,
    "n/a" when it is undefined (one seed, or no value)."""
    lo, hi = interval["low"], interval["high"]
    if np.isnan(lo) or np.isnan(hi):
        return "n/a"
    return "better" if lo > 0 else "worse" if hi < 0 else "within noise"


def paired_differences(runs: list[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per fraction: (real + synthetic) minus real for every metric, paired by seed (the
    same real subset and segmenter seed), as :func:`paired_interval` plus its verdict.
    Empty when there is no real + synthetic setting."""
    out = []
    by_key = {(r["fraction"], r["seed"], r["setting"]): r for r in runs}
    for fraction in dict.fromkeys(r["fraction"] for r in runs):
        seeds = [s for (f, s, st) in by_key if f == fraction and st == "real" and (f, s, "real+synthetic") in by_key]
        if not seeds:
            continue
        row: dict[str, Any] = {"fraction": fraction, "pairs": len(seeds), "confidence": confidence}
        for k in _metric_keys(runs):
            diffs = [by_key[(fraction, s, "real+synthetic")][k] - by_key[(fraction, s, "real")][k] for s in seeds]
            iv = paired_interval(diffs, confidence)
            row[k] = {**iv, "verdict": verdict(iv)}
        out.append(row)
    return out


def _title(k: str) -> str:
    return k.replace("f1_", "F1 ") if k.startswith("f1_") else k.upper() if len(k) <= 3 else k.capitalize()


def downstream_markdown(result: dict[str, Any]) -> str:
    """The summary as Markdown: mean ± sample std over seeds per (fraction, setting), then
    the paired differences (real + synthetic minus real) with their confidence interval
    and whether each is within noise."""
    summary = result["summary"]
    keys = [k for k in summary[0] if k not in ("fraction", "setting", "seeds")]
    head = ["fraction", "training data", "seeds"] + [_title(k) for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in summary:
        cells = [f"{row['fraction']:g}", row["setting"], str(row["seeds"])]
        for k in keys:
            m, s = row[k]["mean"], row[k]["std"]
            cells.append("n/a" if np.isnan(m) else f"{m:.4f}" if np.isnan(s) else f"{m:.4f} ± {s:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean ± sample standard deviation over seeds; per-patch means, a patch with no nucleus in truth "
                 "and prediction scoring 0 (HoVer-Net's convention).")
    if result.get("tune_every"):
        lines.append(f"Each run's watershed options were tuned on its real training subset (every "
                     f"{result['tune_every']}-th patch, at least 8; the same patches for both settings).")
    paired = result.get("paired") or []
    if paired:
        conf = paired[0]["confidence"]
        lines += ["", f"Paired difference, real + synthetic minus real (same subset and seed), mean "
                  f"[{conf:.0%} Student-t interval]:", ""]
        lines.append("| fraction | pairs | " + " | ".join(_title(k) for k in keys) + " |")
        lines.append("|" + " --- |" * (len(keys) + 2))
        for row in paired:
            cells = [f"{row['fraction']:g}", str(row["pairs"])]
            for k in keys:
                iv = row[k]
                if np.isnan(iv["mean"]):
                    cells.append("n/a")
                elif np.isnan(iv["low"]):
                    cells.append(f"{iv['mean']:+.4f} (one pair: no interval)")
                else:
                    cells.append(f"{iv['mean']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}] {iv['verdict']}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "\"within noise\": the interval holds 0, so these seeds cannot tell the two settings apart."]
    return "\n".join(lines) + "\n"


def model_training_tiles(checkpoint: str | Path) -> set[str] | None:
    """The source tiles a diffusion checkpoint was trained on, from its recorded data
    provenance (a store's ``split_groups`` and the split trained on); ``None`` when the
    record cannot tell (trained on a folder, or a store without recorded split groups)."""
    from nucsynth.checkpoint import read_config

    data = read_config(checkpoint).get("data") or {}
    groups = (data.get("store") or {}).get("split_groups") if data.get("kind") == "store" else None
    if not isinstance(groups, dict):
        return None
    split = data.get("split")
    if split == "all":
        return {str(t) for tiles in groups.values() for t in tiles}
    if split not in groups:
        return None
    return {str(t) for t in groups[split]}


def leakage(provenances: Sequence[dict[str, Any]], eval_tiles: set[str]) -> list[str]:
    """Why a synthetic set may have seen the evaluation tiles; empty when it provably has not.

    ``provenances``: one dict per synthetic sample (as ``nucsynth synthesize`` records them).
    A sample leaks when its source layout came from an evaluation tile (``source_tile`` or
    ``tile``), or when a checkpoint that generated it (every ``*checkpoint`` entry) was
    trained on an evaluation tile or does not record which tiles it saw.
    """
    problems: dict[str, str] = {}
    models: dict[str, set[str] | None] = {}
    for i, prov in enumerate(provenances):
        tile = prov.get("source_tile", prov.get("tile"))
        if tile is not None and str(tile) in eval_tiles:
            problems.setdefault(f"layout:{tile}", f"sample {i} was drawn from the layout of evaluation tile {tile!r}")
        for key, value in prov.items():
            if not key.endswith("checkpoint") or not isinstance(value, str):
                continue
            if value not in models:
                try:
                    models[value] = model_training_tiles(value)
                except (OSError, ValueError) as e:
                    problems.setdefault(f"model:{value}", f"the {key} {value} cannot be read to check what it saw: {e}")
                    models[value] = set()
                    continue
                seen = models[value]
                if seen is None:
                    problems[f"model:{value}"] = (f"the {key} {value} does not record which tiles it was trained on "
                                                  "(trained on a folder, or a store without split groups)")
                elif seen & eval_tiles:
                    problems[f"model:{value}"] = (f"the {key} {value} was trained on evaluation tiles "
                                                  f"{sorted(seen & eval_tiles)}")
    return list(problems.values())


FIDELITY_KEYS = ("pq", "f_d", "f1_mean", "score")


def fidelity(samples: Sequence[Sample], net: HoVerSegmenter, device: str = "cpu", radius: float = 12.0,
             batch_size: int = 8, reference: dict[str, float] | None = None, **watershed_params: Any) -> dict[str, Any]:
    """Label fidelity of synthesized samples: segment each image, compare with its layout.

    Per sample: ``pq`` (instances), ``f_d`` and ``f1_mean`` (mean of the defined per-class
    F_c of that image; NaN if no class is defined) and ``score`` = PQ x F_d x (F1 mean if
    defined, else 1), in [0, 1], usable to filter samples; an image whose layout and
    segmentation are both empty agrees fully (PQ and F_d 1). Summary: means of the
    per-sample values and the set-level :func:`evaluate_set` table.

    A small segmenter scores even real tissue far below 1, so absolute values say more
    about the segmenter than about the images. ``reference`` (the summary of this function
    on REAL images with their true labels, same segmenter) adds ``relative``: each summary
    value divided by the real one (1 = as faithful as real tissue).
    """
    items = list(samples)
    if not items:
        raise ValueError("no samples to score")
    class_set = items[0].layout.class_set
    per: list[dict[str, Any]] = []
    preds = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        preds += predict_layouts(net, [s.image for s in chunk], class_set, batch_size=batch_size, device=device, **watershed_params)
    truths, preds = source_pairs(items, preds)  # real patches: their padding is not scored
    for i, (t, p) in enumerate(zip(truths, preds)):
        inst = instance_metrics(t.inst_map, p.inst_map, empty=1.0)
        det = detection_classification(t, p, radius)
        f1 = [v for v in det["f1"].values() if not np.isnan(v)]
        f1_mean = float(np.mean(f1)) if f1 else float("nan")
        f_d = 1.0 if np.isnan(det["f_d"]) else det["f_d"]  # no nuclei on either side: agreement
        score = inst["pq"] * f_d * (f1_mean if f1 else 1.0)
        per.append({"index": i, "pq": inst["pq"], "f_d": f_d, "f1_mean": f1_mean, "score": float(score),
                    "n_layout": t.num_nuclei, "n_segmented": p.num_nuclei})
    res = evaluate_set(truths, preds, radius=radius)
    summary = {k: float(np.nanmean([r[k] for r in per])) if not all(np.isnan(r[k]) for r in per) else float("nan")
               for k in FIDELITY_KEYS}
    out: dict[str, Any] = {"per_sample": per, "summary": summary, "table": table_metrics(res), "n_samples": len(items)}
    if reference is not None:
        missing = [k for k in FIDELITY_KEYS if k not in reference]
        if missing:
            raise ValueError(f"the real-image reference lacks {missing}; it must hold {list(FIDELITY_KEYS)}")
        out["reference"] = {k: float(reference[k]) for k in FIDELITY_KEYS}
        out["relative"] = {k: (summary[k] / reference[k] if reference[k] > 0 else float("nan")) for k in FIDELITY_KEYS}
    return out
