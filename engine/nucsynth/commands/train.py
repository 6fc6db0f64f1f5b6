"""``nucsynth train``: train a model family on a dataset store (or any readable source).

Single process: ``nucsynth train --family semantic --preset tiny --data STORE --out RUN``.
Several GPUs: ``torchrun --nproc_per_node 4 -m nucsynth.cli train ...`` (DDP, rank 0 writes;
``--batch-size`` is per process). ``--resume`` continues RUN exactly where its newest
checkpoint left off; options given with ``--resume`` (e.g. more ``--steps`` or a
``--finetune-steps`` stage) override the stored ones.

NuDiff (two stages): ``--family structure`` trains stage 1 (structures); ``--family
semantic --condition structure`` trains stage 2 (the image from a structure), the pair that
``nucsynth synthesize --checkpoint STAGE1 --image-checkpoint STAGE2 --count N`` uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

NAME = "train"
HELP = "Train a model (semantic, structure, joint) on a dataset store; resumable, DDP under torchrun."

# CLI option -> TrainConfig field (options left unset keep the config's default, or on
# --resume the value stored in the run).
_TRAIN_OPTIONS = {
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "warmup": "warmup",
    "weight_decay": "weight_decay",
    "ema": "ema_decay",
    "grad_clip": "grad_clip",
    "cond_drop": "cond_drop",
    "finetune_steps": "finetune_steps",
    "finetune_lr": "finetune_lr",
    "finetune_cond_drop": "finetune_cond_drop",
    "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints",
    "preview_every": "preview_every",
    "seed": "seed",
    "device": "device",
    "workers": "num_workers",
    "micro_batches": "micro_batches",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth train``."""
    p.add_argument("--family", default=None, help="model family: semantic (default), structure, joint")
    p.add_argument("--preset", default=None, choices=("tiny", "base", "paper"), help="network size (default: tiny)")
    p.add_argument("--data", type=Path, help="training data: a dataset store (.zarr) or any readable source folder")
    p.add_argument("--split", default="train", help="split of a store to train on (default: train; 'all' = every patch)")
    p.add_argument("--out", type=Path, required=True, help="run folder (log.csv, checkpoints/, previews/)")
    p.add_argument("--image-size", type=int, default=None, help="training crop size in px (default: 64)")
    p.add_argument("--prediction", choices=("eps", "v"), default=None,
                   help="what the network predicts (default: the family's; semantic: eps as in SDM)")
    p.add_argument("--condition", choices=("layout", "structure"), default=None,
                   help="semantic: what the image is conditioned on: layout (default; one-hot classes + edges, "
                        "SDM/NASDM) or structure (mask + HV maps: NuDiff stage 2, the image model of "
                        "'synthesize --image-checkpoint')")
    p.add_argument("--label-aware", action="store_true",
                   help="autoencoder: the decoder also takes the layout (SPADE), so nucleus boundaries stay pixel-exact")
    p.add_argument("--autoencoder", type=Path, default=None,
                   help="semantic: train a LATENT model in the space of this trained autoencoder (checkpoint or run "
                        "folder of 'train --family autoencoder'); --image-size stays in image pixels")
    p.add_argument("--text-encoder", default=None,
                   help="joint: 'builtin' (default: an offline prompt encoder trained with the model) or the local "
                        "folder / weights file of a frozen open_clip text tower (PLIP, QuiltNet)")
    p.add_argument("--finetune-decoder", type=Path, default=None,
                   help="autoencoder: continue training only the decoder of this trained autoencoder (frozen "
                        "encoder: latent models trained on it stay valid; point them at the result with "
                        "export_checkpoint(..., autoencoder=...))")
    p.add_argument("--precompute-latents", action="store_true",
                   help="latent model: encode every training patch once in all 8 rotations/flips before training "
                        "(pays off on long runs; default: encode each batch as it comes)")
    p.add_argument("--no-augment", action="store_true", help="no random rotations/flips/crops (centre crops)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    g = p.add_argument_group("optimisation (defaults: nucsynth.train.TrainConfig)")
    g.add_argument("--steps", type=int, help="stage-1 steps (default 1000)")
    g.add_argument("--batch-size", type=int, help="batch size per process (default 8)")
    g.add_argument("--lr", type=float, help="stage-1 learning rate (default 1e-4)")
    g.add_argument("--warmup", type=int, help="linear warm-up steps (default 100)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--ema", type=float, help="EMA decay (default 0.999; 0.9999 for long runs)")
    g.add_argument("--grad-clip", type=float, help="gradient-norm clip, 0 = off (default 1.0)")
    g.add_argument("--cond-drop", type=float, help="stage-1 condition dropout (default 0: condition always given)")
    g.add_argument("--finetune-steps", type=int, help="stage-2 steps with condition dropout (default 0)")
    g.add_argument("--finetune-lr", type=float, help="stage-2 learning rate (default 2e-5)")
    g.add_argument("--finetune-cond-drop", type=float, help="stage-2 condition dropout (default 0.2)")
    g.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps, 0 = end only (default 500)")
    g.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept (default 2)")
    g.add_argument("--preview-every", type=int, help="preview PNG every N steps, 0 = end only (default 0)")
    g.add_argument("--seed", type=int, help="seed of weights, data order, augmentation and noise (default 0)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    g.add_argument("--micro-batches", type=int,
                   help="on CPU, run each batch through the network as N micro-batches on worker threads (same "
                        "weights for any --threads up to N; 1 = one pass; default 2 for a new run, the run's own "
                        "with --resume)")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, opt) for opt, field in _TRAIN_OPTIONS.items() if getattr(args, opt) is not None}


def _load_data(path: Path, split: str) -> tuple[Any, dict[str, Any]]:
    """The training samples and their provenance."""
    from nucsynth.data.dataset import split_source
    from nucsynth.io import read_source
    from nucsynth.io.store import DatasetStore

    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    try:
        store = DatasetStore.open(path)
    except (ValueError, FileNotFoundError, OSError):
        store = None
    if store is not None:
        prov: dict[str, Any] = {"path": str(path), "kind": "store", "split": split, "store": store.attrs}
        if split == "all":
            return store, {**prov, "count": len(store)}
        idx = store.indices(split)
        if len(idx) == 0:
            raise ValueError(f"store {path} has no patches in split {split!r}; splits present: {sorted(set(store.splits))}")
        return split_source(store, idx), {**prov, "count": int(len(idx))}
    samples = read_source(path)
    if not samples:
        raise ValueError(f"--data {path} holds no samples")
    return samples, {"path": str(path), "kind": "source", "count": len(samples)}


def _build_model(args: argparse.Namespace, class_set: Any) -> Any:
    from nucsynth.models.base import get_family

    cls = get_family(args.family)
    options = {} if args.prediction is None else {"prediction": args.prediction}
    if args.condition is not None:
        if cls.name != "semantic":
            raise ValueError(f"--condition applies to the semantic family (NuDiff stage 2: --condition structure); "
                             f"the {cls.name!r} family has no such option")
        options["condition"] = args.condition
    if args.finetune_decoder is not None:
        if cls.name != "autoencoder" or args.label_aware or args.autoencoder is not None:
            raise ValueError("--finetune-decoder goes with --family autoencoder alone (the source sets the rest)")
        return cls.decoder_finetune(args.finetune_decoder)
    if args.label_aware:
        if cls.name != "autoencoder":
            raise ValueError(f"--label-aware applies to the autoencoder family, not {cls.name!r}")
        options["label_aware"] = True
    if args.autoencoder is not None:
        if cls.name != "semantic":
            raise ValueError(f"--autoencoder applies to the semantic family (a latent model), not {cls.name!r}")
        options["autoencoder"] = args.autoencoder
    if getattr(args, "text_encoder", None) is not None:
        if cls.name != "joint":
            raise ValueError(f"--text-encoder applies to the joint family (its text prompt), not {cls.name!r}")
        if args.text_encoder != "builtin":
            if not Path(args.text_encoder).exists():
                raise FileNotFoundError(f"--text-encoder {args.text_encoder}: no text encoder weights there "
                                        "(a PLIP / QuiltNet folder or weights file, or 'builtin')")
            options.update(text_encoder="open_clip", text_path=str(args.text_encoder))
    return cls.from_preset(args.preset, args.image_size, class_set, **options)


# Model options a resumed run cannot change: option -> (attribute, where the run stored it).
_MODEL_OPTIONS = {"--family": "family", "--preset": "preset", "--image-size": "image_size",
                  "--prediction": "prediction", "--condition": "condition"}


def _resume_differences(args: argparse.Namespace, saved: dict[str, Any], provenance: dict[str, Any]) -> list[str]:
    """What differs between the run being resumed (its checkpoint config) and this command:
    model options given on the command line and the training data. Empty when none."""
    diffs = []
    stored_model = {"family": saved.get("family"), **saved.get("model", {})}
    if stored_model.get("family") == "semantic":
        stored_model.setdefault("condition", "layout")
    if isinstance(stored_model.get("diffusion"), dict) and "prediction" in stored_model["diffusion"]:
        stored_model.setdefault("prediction", stored_model["diffusion"]["prediction"])
    for opt, attr in _MODEL_OPTIONS.items():
        given = getattr(args, attr, None)
        if given is not None and attr in stored_model and given != stored_model[attr]:
            diffs.append(f"{opt} {given} (the run used {stored_model[attr]})")
    old = saved.get("data", {})
    for key, what in (("kind", "kind of data"), ("split", "--split"), ("count", "number of patches"),
                      ("augment", "augmentation")):
        if key in old and key in provenance and old[key] != provenance[key]:
            diffs.append(f"{what} {provenance[key]} (the run used {old[key]})")
    if old.get("kind") == "store" and provenance.get("kind") == "store":
        made_then, made_now = old.get("store", {}).get("created"), provenance.get("store", {}).get("created")
        if made_then and made_now and "id" in made_then and "id" in made_now:
            other = made_then["id"] != made_now["id"]
        else:  # stores of older releases carry no id: their creation record and path
            other = made_then != made_now or Path(old.get("path", "")).resolve() != Path(provenance["path"]).resolve()
        if other:
            diffs.append(f"--data {provenance['path']} is another store (created {made_now.get('created_at')}; "
                         f"the run used {old.get('path')}, created {made_then.get('created_at')})")
    elif old.get("kind") == "source" and old.get("path") and Path(old["path"]).resolve() != Path(provenance["path"]).resolve():
        diffs.append(f"--data {provenance['path']} (the run used {old['path']})")
    return diffs


def _dataset(model: Any, source: Any, size: int, augment: bool, seed: int, precompute: bool) -> Any:
    """Training items; with ``precompute`` a latent model gets its autoencoder's latents
    computed once up front (otherwise the model encodes each batch)."""
    from nucsynth.data.dataset import SampleDataset

    if precompute and not getattr(model, "is_latent", False):
        raise ValueError("--precompute-latents applies to latent models (train --family semantic --autoencoder AE)")
    if not precompute:
        return SampleDataset(source, maps=model.data_maps, size=size, augment=augment, seed=seed)
    import torch

    from nucsynth.data.latents import LatentDataset

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def encode(images: Any) -> Any:
        return model.autoencoder(device).encode(images.to(device))[0]

    def report(done: int, total: int) -> None:
        if done == total or done % 256 < 8:
            print(f"encoding training patches with the autoencoder: {done}/{total}", file=sys.stderr, flush=True)

    return LatentDataset(source, encode, model.config.latent_factor, maps=model.data_maps, size=size,
                         augment=augment, seed=seed, progress=report)


def run(args: argparse.Namespace) -> int:
    """Train; returns the exit code."""
    import torch

    from nucsynth.checkpoint import build_family, describe_skipped, latest_intact, list_checkpoints, read_config
    from nucsynth.train import TrainConfig, train

    if args.data is None:
        raise ValueError("--data is required (a dataset store or a readable source folder)")
    if args.image_size is not None and args.image_size < 8:
        raise ValueError(f"--image-size must be at least 8 px, got {args.image_size}")
    source, provenance = _load_data(args.data, args.split)
    provenance["augment"] = not args.no_augment
    class_set = getattr(source, "class_set", None) or source[0].layout.class_set
    if args.resume:
        runs = list_checkpoints(args.out)
        if not runs:
            raise FileNotFoundError(f"--resume: {args.out} holds no checkpoints")
        ckpt, skipped = latest_intact(args.out, resume=True)
        if ckpt is None:
            raise ValueError(f"--resume: no intact checkpoint in {args.out}: {describe_skipped(skipped)}")
        if skipped:
            print(f"nucsynth train: resuming from {ckpt.name}, the newest intact checkpoint; "
                  f"{describe_skipped(skipped)}", file=sys.stderr)
        saved = read_config(ckpt)
        diffs = _resume_differences(args, saved, provenance)
        if diffs:
            raise ValueError(f"--resume: the run in {args.out} cannot continue with other data or model settings: "
                             + "; ".join(diffs) + " (use the run's own settings, or a new --out)")
        model = build_family(saved, ckpt)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{**{k: v for k, v in saved.get("train", {}).items() if k in fields}, **_given(args)})
    else:
        args.family, args.preset = args.family or "semantic", args.preset or "tiny"
        args.image_size = args.image_size or 64
        model = _build_model(args, class_set)
        given = _given(args)
        if "micro_batches" not in given:  # a new run; a resumed one keeps its own count
            from nucsynth.micro_batches import CPU_MICRO_BATCHES

            given["micro_batches"] = min(CPU_MICRO_BATCHES, given.get("batch_size", TrainConfig.batch_size))
        cfg = TrainConfig(**given)
    import os

    if int(os.environ.get("RANK", "0")) == 0:  # one writer under torchrun
        from nucsynth.generate.fit import write_run_stats

        info = {k: provenance[k] for k in ("path", "kind", "split") if k in provenance}
        print(write_run_stats(source, args.out, info, keep=args.resume)[1], file=sys.stderr)
    size = model.image_size or args.image_size or 64
    dataset = _dataset(model, source, size, not args.no_augment, cfg.seed, args.precompute_latents)
    print(f"nucsynth train: {model.describe()} on {provenance['count']} patches from {args.data}, "
          f"{cfg.total_steps} steps, batch {cfg.batch_size}"
          + (f" in {cfg.micro_batches} micro-batches on CPU" if cfg.micro_batches > 1 else ""), file=sys.stderr)

    def report(step: int, total: int, logs: dict[str, float]) -> None:
        if step == 1 or step % 50 == 0 or step == total:
            print(f"step {step}/{total}  loss {logs['loss']:.4f}  lr {logs['lr']:.2e}  "
                  f"grad {logs['grad_norm']:.3f}  {logs['time']:.0f}s", file=sys.stderr, flush=True)

    result = train(model, dataset, args.out, cfg, resume=args.resume, data=provenance, progress=report)
    print(f"nucsynth train: done at step {result.step}; checkpoint {result.checkpoint}", file=sys.stderr)
    return 0
