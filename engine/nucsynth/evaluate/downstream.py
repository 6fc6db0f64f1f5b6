"""The downstream protocol and label fidelity: what synthetic data does for a segmenter.

Downstream (the yardstick of NASDM, DiffMix, NuDiff and co-synthesis papers): for each
fraction of the real training split and each seed, train the segmenter on that real subset
alone and on the subset plus the synthetic data, segment the held-out real split, and score
it with :func:`nucsynth.metrics.evaluate_set`; report mean and spread over seeds.

Fidelity: segment synthesized images with a trained segmenter and compare with the layouts
they were conditioned on; one score per sample (to filter bad samples) and a summary.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from nucsynth.evaluate.segmenter import HoVerSegmenter, SegmenterConfig, predict_layouts, train_segmenter
from nucsynth.layout import Sample
from nucsynth.metrics import detection_classification, evaluate_set, instance_metrics

__all__ = ["ConcatSamples", "subset_indices", "table_metrics", "downstream", "downstream_markdown", "fidelity"]


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
) -> dict[str, Any]:
    """Run the protocol; returns ``{"runs": [...], "summary": [...]}``.

    Each run: fraction, seed, setting ("real" or "real+synthetic"), the number of training
    patches and :func:`table_metrics` on ``test``. Subsets are drawn per (fraction, seed)
    and shared by both settings; the segmenter's seed is the run's seed. Summary rows: mean
    and standard deviation (population, over seeds; NaN values skipped) per (fraction,
    setting).
    """
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"the protocol needs training and test patches, got {len(train)} and {len(test)}")
    if not seeds:
        raise ValueError("give at least one seed")
    class_set = train[0].layout.class_set
    test_samples = list(test)
    truths = [s.layout for s in test_samples]
    settings = ["real"] + (["real+synthetic"] if synthetic is not None and len(synthetic) else [])
    runs: list[dict[str, Any]] = []
    for fraction in fractions:
        for seed in seeds:
            real = _View(train, subset_indices(len(train), fraction, seed))
            for setting in settings:
                data = real if setting == "real" else ConcatSamples(real, synthetic)  # type: ignore[arg-type]
                net, _ = train_segmenter(data, config, seed=seed, device=device)
                preds = predict_layouts(net, [s.image for s in test_samples], class_set, device=device)
                row = {"fraction": float(fraction), "seed": int(seed), "setting": setting, "train_patches": len(data)}
                row.update(table_metrics(evaluate_set(truths, preds)))
                runs.append(row)
                if log is not None:
                    log(f"fraction {fraction} seed {seed} {setting}: PQ {row['pq']:.4f} Dice {row['dice']:.4f}")
    return {"runs": runs, "summary": _summarize(runs)}


def _summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = [k for k in runs[0] if k not in ("fraction", "seed", "setting", "train_patches")]
    out = []
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["fraction"], r["setting"]), []).append(r)
    for (fraction, setting), rows in groups.items():
        row: dict[str, Any] = {"fraction": fraction, "setting": setting, "seeds": len(rows)}
        for k in keys:
            vals = np.array([r[k] for r in rows], float)
            vals = vals[~np.isnan(vals)]
            row[k] = {"mean": float(vals.mean()) if vals.size else float("nan"),
                      "std": float(vals.std()) if vals.size else float("nan")}
        out.append(row)
    return out


def downstream_markdown(result: dict[str, Any]) -> str:
    """The summary as a Markdown table: mean ± std over seeds, one row per (fraction, setting)."""
    summary = result["summary"]
    keys = [k for k in summary[0] if k not in ("fraction", "setting", "seeds")]
    head = ["fraction", "training data", "seeds"] + [k.replace("f1_", "F1 ") if k.startswith("f1_") else k.upper() if len(k) <= 3 else k.capitalize() for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in summary:
        cells = [f"{row['fraction']:g}", row["setting"], str(row["seeds"])]
        for k in keys:
            m, s = row[k]["mean"], row[k]["std"]
            cells.append("n/a" if np.isnan(m) else f"{m:.4f} ± {s:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fidelity(samples: Sequence[Sample], net: HoVerSegmenter, device: str = "cpu", radius: float = 12.0,
             batch_size: int = 8, **watershed_params: Any) -> dict[str, Any]:
    """Label fidelity of synthesized samples: segment each image, compare with its layout.

    Per sample: ``pq`` (instances), ``f_d`` and ``f1_mean`` (mean of the defined per-class
    F_c of that image; NaN if no class is defined) and ``score`` = PQ x F_d x (F1 mean if
    defined, else 1), in [0, 1], usable to filter samples. Summary: means of the per-sample
    values and the set-level :func:`evaluate_set` table.
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
    for i, (s, p) in enumerate(zip(items, preds)):
        inst = instance_metrics(s.layout.inst_map, p.inst_map)
        det = detection_classification(s.layout, p, radius)
        f1 = [v for v in det["f1"].values() if not np.isnan(v)]
        f1_mean = float(np.mean(f1)) if f1 else float("nan")
        f_d = 1.0 if np.isnan(det["f_d"]) else det["f_d"]  # no nuclei on either side: agreement
        score = inst["pq"] * f_d * (f1_mean if f1 else 1.0)
        per.append({"index": i, "pq": inst["pq"], "f_d": f_d, "f1_mean": f1_mean, "score": float(score),
                    "n_layout": s.layout.num_nuclei, "n_segmented": p.num_nuclei})
    res = evaluate_set([s.layout for s in items], preds, radius=radius)
    summary = {k: float(np.nanmean([r[k] for r in per])) if not all(np.isnan(r[k]) for r in per) else float("nan")
               for k in ("pq", "f_d", "f1_mean", "score")}
    return {"per_sample": per, "summary": summary, "table": table_metrics(res), "n_samples": len(items)}

