"""One synthesis engine behind every front-end (CLI, demo, napari docks, sample data).

Three pieces, used in this order::

    from nucsynth.synthesize import SynthesisOptions, get_synthesizer, plan_items, SynthesisJob
    from nucsynth.io.sources import read_layout_source

    synth = get_synthesizer("runs/semantic")                 # loaded once per checkpoint (cached)
    opts = synth.resolve(SynthesisOptions(steps=20, mode="balance", seed=3))
    items = plan_items(synth, opts, read_layout_source("data.zarr", split="train"))
    samples = synth.render(items[:4], opts, progress=lambda i, n: ...)   # in memory
    result = SynthesisJob(synth, items, opts, "out.zarr").run(progress=print)  # into a store

- :class:`SynthesisOptions`: every option with its default, declared ONCE (the CLI flags of
  ``nucsynth synthesize`` / ``nucsynth demo`` and the docks' defaults are generated from its
  fields: :func:`add_option_arguments`, :func:`option_fields`).
- :class:`Synthesizer` (:func:`get_synthesizer`): a checkpoint loaded on a device, for any
  family: ``semantic`` renders layouts (from noise, or from a source image partially noised
  with ``strength``, or only a masked region), ``joint`` renders from the layouts' points,
  ``structure`` generates layouts and renders them with its NuDiff stage-2 image checkpoint.
  :meth:`Synthesizer.resolve` fills the model-dependent defaults (guidance: the one the
  checkpoint records, else the family's, or 0 and refused above 0 for a model that never
  learned the null condition; strength:
  0.55 for DiffMix balance / enlarge when the source has images) and refuses options the
  family cannot use.
- :func:`plan_items`: the :class:`Item` list of a job: the edited layouts (DiffMix balance
  with the rare-pool rule of :mod:`nucsynth.edit.pool`, or enlarge), each with its own seed
  (``seed + index``), its source image when it is rendered from one, and its provenance.
- :class:`SynthesisJob`: batches of ``batch_size`` items rendered and appended to a dataset
  store, progress per solver step, cancel between steps, and resume: the store is built in
  ``.NAME.partial`` beside the output and renamed into place when complete; running the
  same job again continues from what the partial store holds (different settings are
  refused, naming the difference). With a dask executor (:mod:`nucsynth.distributed`) the
  batches are rendered by workers and written here, in order, by one writer.

Reproducibility: every sample has its own seed and generator and, on CPU, the network sees it
alone (:mod:`nucsynth.diffusion.noise`), so a sample's pixels do not depend on its batch, on
the batch size or on which worker rendered it. They do depend on the device and on the
number of CPU threads (float reductions are split differently), both recorded in each
sample's provenance with the checkpoint's content hash and every option;
:func:`rerender` renders one stored sample again from that record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from nucsynth.edit.region import edited_region
from nucsynth.layout import ClassSet, Layout, Sample
from nucsynth.outputs import partial_path

__all__ = [
    "FAMILIES",
    "MODES",
    "SAMPLERS",
    "DIFFMIX_STRENGTH",
    "FRESH_MARGIN",
    "changed_pixels",
    "SynthesisOptions",
    "option_fields",
    "add_option_arguments",
    "options_from_args",
    "Item",
    "Synthesizer",
    "get_synthesizer",
    "clear_synthesizers",
    "checkpoint_sha256",
    "learned_null",
    "plan_items",
    "Progress",
    "JobResult",
    "JobCancelled",
    "SynthesisJob",
    "partial_path",
    "rerender",
]

FAMILIES = ("semantic", "joint", "structure")
MODES = ("layout", "balance", "enlarge")
SAMPLERS = ("dpm++2m", "ddim", "ancestral")
CLASS_SOURCES = ("label", "points")
DIFFMIX_STRENGTH = 0.55  # DiffMix: the real image noised to 55 % of the chain
# px around the nuclei an edit changed that are rendered from pure noise, not from the noised
# source image: at strength 0.55 the removed nuclei otherwise stay visible (docs/models.md)
FRESH_MARGIN = 4
SETTINGS_ATTR = "synthesis"  # store attribute: the settings a job's store was made with


# ---------------------------------------------------------------------- options
def _opt(default: Any, help: str, *, families: Sequence[str] = FAMILIES, choices: Sequence[Any] | None = None,
         kind: type | None = None) -> Any:
    return field(default=default, metadata={"help": help, "families": tuple(families),
                                            "choices": None if choices is None else tuple(choices), "kind": kind})


@dataclass(frozen=True)
class SynthesisOptions:
    """Every synthesis option and its default, declared once.

    ``None`` means "the model's default" (filled by :meth:`Synthesizer.resolve`). Field
    metadata carries the help text, the families an option applies to and its choices, from
    which the CLI flags are generated (:func:`add_option_arguments`).
    """

    steps: int = _opt(20, "solver steps for a full chain", kind=int)
    sampler: str = _opt("dpm++2m", "solver: dpm++2m (10-25 steps), ddim (>= 50) or ancestral (>= 100)",
                        choices=SAMPLERS, kind=str)
    guidance: float | None = _opt(None, "classifier-free guidance scale s in eps_c + s (eps_c - eps_u) "
                                  "(default: the model's: the value its checkpoint records, else semantic 0.5 = SDM/DiffMix's "
                                  "1.5, joint 1.0; "
                                  "0 for a model that never learned the null condition)", kind=float)
    seed: int = _opt(0, "seed: sample i of a job gets seed + i (edits use it too)", kind=int)
    batch_size: int = _opt(4, "samples rendered at once (bounds memory; an interrupted job loses at most one batch)",
                           kind=int)
    mode: str = _opt("layout", "semantic: render the layouts as they are (layout), DiffMix-balanced (balance) "
                     "or -enlarged (enlarge)", families=("semantic",), choices=MODES, kind=str)
    strength: float | None = _opt(None, f"semantic: partial noising of the source image, 0-1 (default: "
                                  f"{DIFFMIX_STRENGTH} for balance / enlarge when the source has images, "
                                  "else from pure noise)", families=("semantic",), kind=float)
    target_share: float | None = _opt(None, "balance: share of the rare class to reach per patch "
                                      "(default: replace as many nuclei as fit)", families=("semantic",), kind=float)
    border: int = _opt(30, "balance: nuclei with a centroid closer than this to the edge are kept (px, DiffMix: 30)",
                       families=("semantic",), kind=int)
    pool_size: int = _opt(64, "balance: least number of rare-class shapes to paste from: the source's own, topped "
                          "up with shapes drawn from the rare class' statistics (0 = the source's only)",
                          families=("semantic",), kind=int)
    enlarge_fraction: float = _opt(0.5, "enlarge: share of nuclei moved", families=("semantic",), kind=float)
    max_shift: int = _opt(3, "enlarge: largest shift in px", families=("semantic",), kind=int)
    prompt: str | None = _opt(None, "joint: one text prompt for every layout (default: each layout's templated prompt)",
                              families=("joint",), kind=str)
    class_source: str = _opt("label", "joint: nucleus classes from the generated label (label) or the given points",
                             families=("joint",), choices=CLASS_SOURCES, kind=str)

    def __post_init__(self) -> None:
        checks = [
            (int(self.steps) >= 1, f"steps must be at least 1, got {self.steps}"),
            (int(self.batch_size) >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.strength is None or 0.0 < float(self.strength) <= 1.0, f"strength must be in (0, 1], got {self.strength}"),
            (self.guidance is None or float(self.guidance) >= -1.0,
             f"guidance must be >= -1 (0 = conditional model only), got {self.guidance}"),
            (self.target_share is None or 0.0 < float(self.target_share) <= 1.0,
             f"target_share must be in (0, 1], got {self.target_share}"),
            (int(self.border) >= 0, f"border must be >= 0 px, got {self.border}"),
            (int(self.pool_size) >= 0, f"pool_size must be >= 0, got {self.pool_size}"),
            (0.0 <= float(self.enlarge_fraction) <= 1.0, f"enlarge_fraction must be in [0, 1], got {self.enlarge_fraction}"),
            (int(self.max_shift) >= 0, f"max_shift must be >= 0 px, got {self.max_shift}"),
        ]
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            checks.append((choices is None or value in choices, f"{f.name} must be one of {list(choices or ())}, got {value!r}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every option."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SynthesisOptions":
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown synthesis option(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> "SynthesisOptions":
        """A copy with some options changed (validated)."""
        return dataclasses.replace(self, **changes)


def option_fields(family: str | None = None) -> list[dataclasses.Field]:
    """The option fields (``name``, ``default``, ``metadata["help" | "choices" | "families"]``),
    those of one family when given: what a widget shows and its defaults."""
    return [f for f in dataclasses.fields(SynthesisOptions) if family is None or family in f.metadata["families"]]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option_arguments(parser: Any, only: Iterable[str] | None = None) -> None:
    """Add one CLI flag per option (``--steps``, ``--target-share``, ...; or only those named
    in ``only``) to an argparse parser; defaults show in the help and stay None in the
    namespace, so :func:`options_from_args` knows which ones the user set."""
    keep = None if only is None else set(only)
    for f in option_fields():
        if keep is not None and f.name not in keep:
            continue
        md = f.metadata
        fams = "" if set(md["families"]) == set(FAMILIES) else f" [{'/'.join(md['families'])}]"
        default = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(_flag(f.name), dest=f.name, type=md["kind"], default=None, choices=md["choices"],
                            help=f"{md['help']}{default}{fams}")


def options_from_args(args: Any, **overrides: Any) -> SynthesisOptions:
    """SynthesisOptions from an argparse namespace: the flags the user gave, the rest default."""
    kw = {f.name: getattr(args, f.name) for f in option_fields() if getattr(args, f.name, None) is not None}
    kw.update(overrides)
    return SynthesisOptions(**kw)


# ---------------------------------------------------------------------- checkpoints
_HASHES: dict[tuple[str, ...], str] = {}


def checkpoint_sha256(path: str | Path) -> str:
    """Content hash of a checkpoint: SHA-256 over its ``config.json`` and weight files (in a
    fixed order), so two copies of one model have one hash wherever they lie. Cached per
    file size and modification time."""
    from nucsynth.checkpoint import CONFIG, EMA, MODEL, content_sha256, find_checkpoint

    ckpt = find_checkpoint(path)
    files = [ckpt / n for n in (CONFIG, EMA, MODEL) if (ckpt / n).is_file()]
    key = tuple(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    if key not in _HASHES:
        _HASHES[key] = content_sha256(*(part for f in files for part in (f.name.encode(), f)))
    return _HASHES[key]


def learned_null(config: Mapping[str, Any]) -> bool | None:
    """Whether a checkpoint's network learned the null condition of classifier-free guidance,
    from the training record in its config: some training steps dropped the condition
    (``cond_drop`` / ``finetune_cond_drop`` > 0; for the joint family also its ``text_drop``).
    None when the checkpoint carries no training record (e.g. built by hand)."""
    train = config.get("train") or {}
    if not train:
        return None
    drops = []
    if int(train.get("steps", 1) or 0) > 0:
        drops.append(float(train.get("cond_drop", 0.0) or 0.0))
    if int(train.get("finetune_steps", 0) or 0) > 0:
        drops.append(float(train.get("finetune_cond_drop", 0.0) or 0.0))
    if config.get("family") == "joint":
        drops.append(float((config.get("model") or {}).get("text_drop", 0.0) or 0.0))
    return any(d > 0 for d in drops)


def refuse_unlearned_guidance(guidance: float, learned: bool | None, where: Any) -> None:
    """ValueError when ``guidance`` is not 0 but the network at ``where`` never learned the
    null condition (``learned`` is :func:`learned_null` of its config; None = unknown)."""
    if guidance != 0.0 and learned is False:
        raise ValueError(f"guidance {guidance} needs a model that learned the null condition; {where} was trained "
                         "with the condition always given (cond_drop 0): use guidance 0, or train with "
                         "--cond-drop / --finetune-steps")


# ---------------------------------------------------------------------- items
@dataclass
class Item:
    """One sample to make: its position in the job, its seed, the layout to render (None:
    the structure family generates it, on a canvas of ``size``), the source image it starts
    from (partial noising), an optional mask (1 = re-render), the pixels rendered from pure
    noise although the rest starts from the source image (``fresh``: where an edit changed
    the source's layout) and its provenance."""

    index: int
    seed: int
    layout: Layout | None = None
    size: tuple[int, int] | None = None
    init_image: np.ndarray | None = None
    mask: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    fresh: np.ndarray | None = None

    def digest(self, h: Any) -> None:
        """Feed what makes this item's pixels into hash ``h``."""
        h.update(f"{self.index}:{self.seed}:{self.size}".encode())
        for arr in ((self.layout.inst_map, self.layout.classes, self.layout.centroids) if self.layout is not None else ()):
            h.update(np.ascontiguousarray(arr).tobytes())
        for arr in (self.init_image, self.mask):
            h.update(b"-" if arr is None else np.ascontiguousarray(arr).tobytes())
        if self.fresh is not None:  # (absent from the digest of items without, as before it existed)
            h.update(b"fresh" + np.packbits(np.asarray(self.fresh, bool)).tobytes())


def _items_sha256(items: Sequence[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        it.digest(h)
    return h.hexdigest()


# ---------------------------------------------------------------------- the synthesizer
class Synthesizer:
    """A checkpoint loaded on a device, rendering :class:`Item` lists for any family.

    Build with :func:`get_synthesizer` (cached). ``model`` is the family
    (:mod:`nucsynth.models`); for a ``structure`` checkpoint ``image_model`` is the NuDiff
    stage-2 semantic model that renders its layouts.
    """

    def __init__(self, model: Any, checkpoint: Path, device: Any, image_model: Any = None,
                 image_checkpoint: Path | None = None) -> None:
        from nucsynth.checkpoint import read_config

        self.model = model
        self.checkpoint = Path(checkpoint)
        self.sha256 = checkpoint_sha256(checkpoint)
        self.config = read_config(checkpoint)
        self.device = device
        self.image_model = image_model
        self.image_checkpoint = None if image_checkpoint is None else Path(image_checkpoint)
        self.image_sha256 = None if image_checkpoint is None else checkpoint_sha256(image_checkpoint)
        self.image_config = None if image_checkpoint is None else read_config(image_checkpoint)

    @property
    def family(self) -> str:
        """The checkpoint's family: ``semantic``, ``joint`` or ``structure``."""
        return str(self.model.name)

    @property
    def class_set(self) -> ClassSet:
        """The classes of the Samples this synthesizer makes."""
        return (self.image_model or self.model).class_set if self.family == "structure" else self.model.class_set

    @property
    def image_size(self) -> int | None:
        """The training patch size (px) of the model that renders the images."""
        return (self.image_model if self.family == "structure" else self.model).image_size

    @property
    def render_size(self) -> int | None:
        """The largest canvas side (px) the image model denoises in one pass (windows beyond)."""
        return (self.image_model if self.family == "structure" else self.model).render_size

    @property
    def layout_stats(self) -> tuple[Any, str]:
        """``(LayoutStats, origin)`` for generating new layouts for this model: the
        ``layout_stats.json`` beside its checkpoint (its folder or its run folder; written by
        ``nucsynth train``) else the built-in CoNSeP statistics; ``origin`` (the file, or
        ``"builtin:consep"``) is what provenance records."""
        if not hasattr(self, "_layout_stats"):
            from nucsynth.generate.stats import find_layout_stats

            stats, path = find_layout_stats(self.checkpoint)
            self._layout_stats = (stats, "builtin:consep" if path is None else str(path))
        return self._layout_stats

    def _renderer(self) -> tuple[Any, Mapping[str, Any], Path]:
        if self.family == "structure":
            return self.image_model, self.image_config or {}, self.image_checkpoint  # type: ignore[return-value]
        return self.model, self.config, self.checkpoint

    def learned_null(self) -> bool | None:
        """Whether the rendering network learned the null condition (see :func:`learned_null`)."""
        _, cfg, _ = self._renderer()
        return learned_null(cfg)

    def default_guidance(self) -> float:
        """The guidance the rendering model records (``config.guidance`` of a semantic model;
        else the family's ``sample`` default), 0 for a model that never learned the null
        condition."""
        model, _, _ = self._renderer()
        if self.learned_null() is False:
            return 0.0
        recorded = getattr(model.config, "guidance", None)
        if recorded is not None:
            return float(recorded)
        param = inspect.signature(model.sample).parameters.get("guidance")
        return 0.0 if param is None else float(param.default)

    def in_model_classes(self, items: Sequence[Union[Sample, Layout]], class_map: str | Mapping[str, str] | None = None,
                         what: str = "--layouts") -> list[Union[Sample, Layout]]:
        """``items`` (Samples or Layouts) with their classes in the model's class set, matched
        by class name, ``class_map`` ("dead=other,connective=spindle") for other names. A class
        set naming classes the model does not know is refused here, before any sampling."""
        from nucsynth.layout import LayoutError, parse_class_map

        try:
            mapping = parse_class_map(class_map) if isinstance(class_map, str) else class_map
        except LayoutError as e:
            raise ValueError(f"--class-map: {e}") from None
        out: list[Union[Sample, Layout]] = []
        for it in items:
            lay = it.layout if isinstance(it, Sample) else it
            try:
                new = lay.to_class_set(self.class_set, mapping or None)
            except LayoutError as e:
                raise ValueError(f"{what}: {e} (--class-map)") from None
            out.append(it if new is lay else Sample(new, it.image, it.provenance) if isinstance(it, Sample) else new)
        return out

    def resolve(self, options: SynthesisOptions, has_images: bool = True) -> SynthesisOptions:
        """``options`` with the model's defaults filled in (guidance; strength for DiffMix
        modes when the source has images), after refusing options this family cannot use."""
        for f in option_fields():
            value, fams = getattr(options, f.name), f.metadata["families"]
            if self.family not in fams and value != f.default:
                raise ValueError(f"{_flag(f.name)} ({f.metadata['help'].split(':')[0]}) does not apply to checkpoint "
                                 f"{self.checkpoint}, a {self.family!r} model; it is for {' / '.join(fams)} checkpoints")
        guidance = options.guidance
        model, _, where = self._renderer()
        if guidance is None:
            guidance = self.default_guidance()
        else:
            refuse_unlearned_guidance(float(guidance), self.learned_null(), where)
        strength = options.strength
        if strength is None and options.mode != "layout" and has_images:
            strength = DIFFMIX_STRENGTH
        if strength is not None and not has_images:
            raise ValueError(f"strength {strength} partially noises the source's images, but the source has none")
        return options.replace(guidance=float(guidance), strength=strength)

    def _diffusion_state(self, canvas: tuple[int, int]) -> tuple[int, tuple[int, int], int]:
        """(f, (h, w), window) of the image model's diffusion on ``canvas`` px: latent models
        diffuse at 1/f of the image, windows of the training size beyond it."""
        model = self.image_model if self.family == "structure" else self.model
        f = int(getattr(model.config, "latent_factor", 1) or 1)
        return f, (canvas[0] // f, canvas[1] // f), int(model.render_size or max(canvas)) // f

    def network_positions(self, items: Sequence[Item]) -> int:
        """Positions of the diffusion state a network call sees when rendering ``items`` as one
        batch (batch x height x width, windows for large canvases): the work size of
        :func:`nucsynth.threads.threads_for_work`."""
        shape = items[0].layout.shape if items[0].layout is not None else items[0].size
        if shape is None:  # nothing to render (render refuses it)
            return 0
        _, (h, w), window = self._diffusion_state(tuple(shape))
        return len(items) * min(h, window) * min(w, window)

    def memory_estimate(self, canvas: tuple[int, int], batch: int, guidance: float) -> int:
        """Estimated peak bytes of rendering ``batch`` canvases of ``canvas`` px (see
        :func:`nucsynth.diffusion.windows.estimate_bytes`): canvases larger than the training
        size are denoised as windows of it, so this grows with the canvas' pixels only."""
        from nucsynth.diffusion.windows import estimate_bytes

        model = self.image_model if self.family == "structure" else self.model
        cfg = model.config
        f, state, window = self._diffusion_state(canvas)
        latent = getattr(cfg, "latent", None) or {}
        channels = int(latent.get("channels", 0)) or (3 if self.family != "joint" else int(cfg.out_channels))
        cond = int(getattr(cfg, "cond_channels", 0) or 0)
        est = estimate_bytes(cfg.network, state, batch, channels, cond, window, guided=guidance != 0)
        return est + 4 * batch * canvas[0] * canvas[1] * 3 * f * f if f > 1 else est  # + decoded images

    def check_memory(self, items: Sequence[Item], options: SynthesisOptions) -> None:
        """Refuse, before any work, a batch whose canvas this device cannot hold."""
        from nucsynth.diffusion.windows import check_memory

        shape = items[0].layout.shape if items[0].layout is not None else items[0].size
        if shape is None:
            return
        from nucsynth.device import feature_cache_budget

        need = self.memory_estimate(tuple(shape), len(items), float(options.guidance or 0.0))
        # + what the networks may keep of condition features (nets.blocks.ConditionCache)
        need += feature_cache_budget(self.device)
        check_memory(need, self.device, f"rendering {len(items)} canvas(es) of {shape[0]}x{shape[1]} px")

    def provenance(self, options: SynthesisOptions) -> dict[str, Any]:
        """What every sample of this synthesizer records besides its own seed and source."""
        import torch

        from nucsynth import __version__

        prov = {"family": self.family, "checkpoint": str(self.checkpoint), "checkpoint_sha256": self.sha256,
                "options": options.to_dict(), "device": str(self.device), "torch_threads": torch.get_num_threads(),
                "nucsynth_version": __version__}
        if self.image_checkpoint is not None:
            prov.update(image_checkpoint=str(self.image_checkpoint), image_checkpoint_sha256=self.image_sha256)
        return prov

    def render(self, items: Sequence[Item], options: SynthesisOptions,
               progress: Callable[[int, int], None] | None = None) -> list[Sample]:
        """Render ``items`` in one call (one batch); ``options`` must be resolved.
        ``progress(i, n)`` after each solver step; raise in it to cancel. A small render runs
        on one CPU thread (:func:`nucsynth.threads.threads_for_work`), which its provenance
        records."""
        from nucsynth.threads import threads_for_work

        if not items:
            return []
        if options.guidance is None:
            raise ValueError("options are not resolved: call Synthesizer.resolve(options) first")
        self.check_memory(items, options)
        with threads_for_work(self.network_positions(items)):
            return self._render(items, options, progress)

    def _render(self, items: Sequence[Item], o: SynthesisOptions,
                progress: Callable[[int, int], None] | None) -> list[Sample]:
        seeds = [it.seed for it in items]
        if self.family == "semantic":
            use_init = o.strength is not None or any(it.mask is not None for it in items)
            if use_init and any(it.init_image is None for it in items):
                raise ValueError("strength / mask need every item's source image")
            kw: dict[str, Any] = {}
            if use_init:
                kw["init_image"] = [it.init_image for it in items]
                kw["strength"] = o.strength
            if any(it.mask is not None for it in items):
                kw["mask"] = [np.ones(it.layout.shape, np.float32) if it.mask is None else it.mask for it in items]
            if o.strength is not None and any(it.fresh is not None for it in items):
                kw["fresh"] = [np.zeros(it.layout.shape, np.float32) if it.fresh is None else it.fresh for it in items]
            out = self.model.sample([it.layout for it in items], steps=o.steps, guidance=o.guidance, seed=seeds,
                                    sampler=o.sampler, progress=progress, **kw)
        elif self.family == "joint":
            out = self.model.sample([it.layout for it in items], prompts=o.prompt, steps=o.steps, guidance=o.guidance,
                                    seed=seeds, sampler=o.sampler, class_source=o.class_source, progress=progress)
        elif self.family == "structure":
            sizes = {it.size for it in items}
            if len(sizes) != 1 or None in sizes:
                raise ValueError(f"structure items of one batch need one canvas size, got {sorted(map(str, sizes))}")
            size = sizes.pop()

            def phase(k: int) -> Callable[[int, int], None] | None:
                return None if progress is None else (lambda i, n: progress(k * n + i, 2 * n))

            lays = self.model.sample(len(items), size=size, steps=o.steps, seed=seeds, sampler=o.sampler,
                                     progress=phase(0))
            lays = [Layout(l.inst_map, l.classes, l.centroids, self.class_set) for l in lays]
            out = self.image_model.sample(lays, steps=o.steps, guidance=o.guidance, seed=seeds, sampler=o.sampler,
                                          progress=phase(1))
        else:
            raise ValueError(f"checkpoint {self.checkpoint} holds a {self.family!r} model; synthesis knows {list(FAMILIES)}")
        base = self.provenance(o)
        samples = []
        for it, s in zip(items, out):
            prov = {k: v for k, v in s.provenance.items() if k not in ("batch_index", "batch_size")}
            samples.append(Sample(s.layout, s.image, {**prov, **base, **it.provenance, "index": it.index, "seed": it.seed}))
        return samples


_CACHE: dict[tuple[Any, ...], Synthesizer] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2  # a model and its stage-2 image model, or two models side by side


def get_synthesizer(checkpoint: str | Path | None = None, device: Any = None,
                    image_checkpoint: str | Path | None = None, text_encoder: str | Path | None = None) -> Synthesizer:
    """The synthesizer of ``checkpoint`` (default: ``$NUCSYNTH_CHECKPOINT``, then the shipped
    model) on ``device`` (default: the best available), loaded once and cached by content
    hash and device. ``image_checkpoint``: a structure checkpoint's NuDiff stage-2 image model
    (a semantic checkpoint with condition ``structure``). ``text_encoder``: a local PLIP /
    QuiltNet folder or file for a joint model built on an open_clip text tower (its recorded
    path otherwise)."""
    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint
    from nucsynth.device import pick_device

    dev = pick_device(None if device is None else str(device))
    ckpt = resolve_checkpoint(checkpoint)
    img = None if image_checkpoint is None else resolve_checkpoint(image_checkpoint)
    key = (checkpoint_sha256(ckpt), str(ckpt.resolve()), str(dev), None if img is None else checkpoint_sha256(img),
           None if text_encoder is None else str(text_encoder))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE[key] = _CACHE.pop(key)  # most recently used last
            return _CACHE[key]
        model, _ = load_checkpoint(ckpt, device=dev)
        if model.name not in FAMILIES:
            raise ValueError(f"checkpoint {ckpt} holds a {model.name!r} model, which does not synthesize images; "
                             f"synthesis needs one of {list(FAMILIES)}")
        if text_encoder is not None:
            if model.name != "joint" or getattr(model.config, "text_encoder", None) != "open_clip":
                raise ValueError(f"--text-encoder applies to a joint model with an open_clip text tower; "
                                 f"{ckpt} holds a {model.name!r} model" + (" with the built-in encoder" if model.name == "joint" else ""))
            model.config.text_path = str(text_encoder)
        image_model = None
        if model.name == "structure":
            if img is None:
                raise ValueError("a structure model makes layouts without images: give the NuDiff stage-2 image "
                                 "checkpoint (--image-checkpoint), a semantic model trained with condition 'structure' "
                                 "(nucsynth train --family semantic --condition structure)")
            image_model, _ = load_checkpoint(img, device=dev)
            condition = image_model.config_dict().get("condition")
            if image_model.name != "semantic" or condition != "structure":
                what = f"a {image_model.name!r} model" + (f" with condition {condition!r}" if condition else "")
                raise ValueError(f"--image-checkpoint {img} holds {what}; NuDiff stage 2 needs a 'semantic' model "
                                 "trained with condition 'structure' (nucsynth train --family semantic --condition structure)")
        elif img is not None:
            raise ValueError(f"--image-checkpoint is for a structure checkpoint; {ckpt} holds a {model.name!r} model")
        synth = Synthesizer(model, ckpt, dev, image_model, img)
        _CACHE[key] = synth
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        return synth


def clear_synthesizers() -> None:
    """Forget every cached synthesizer (frees their models)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# ---------------------------------------------------------------------- planning
def _edited(layouts: list[Layout], options: SynthesisOptions) -> tuple[list[Layout], dict[str, Any]]:
    """The layouts to render for the mode, and a summary of the edit."""
    o = options
    if o.mode == "layout":
        return layouts, {}
    if o.mode == "enlarge":
        from nucsynth.edit import enlarge_layout

        return [enlarge_layout(l, fraction=o.enlarge_fraction, max_shift=o.max_shift, seed=o.seed + i)
                for i, l in enumerate(layouts)], {}
    from nucsynth.edit import BalanceWarning, balance_dataset
    from nucsynth.edit.pool import rare_pool

    pool = rare_pool(layouts, seed=o.seed, least=o.pool_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BalanceWarning)  # per-patch shortfalls are normal; the summary says
        out, reports = balance_dataset(layouts, rare_pool=pool, target_share=o.target_share, seed=o.seed, border=o.border)
    return out, {"balance_reached": sum(bool(r.reached) for r in reports), "balance_pool": len(pool)}


def plan_items(synth: Synthesizer, options: SynthesisOptions, source: Any = None, *, count: int | None = None,
               size: tuple[int, int] | None = None, summary: dict[str, Any] | None = None) -> list[Item]:
    """The items of a job, in order; item i has seed ``options.seed + i``.

    ``source``: a :class:`nucsynth.io.sources.LayoutSource`, or a list of Samples / Layouts
    (semantic: rendered per ``options.mode``; joint: their points); ``count`` and ``size``
    (structure: new layouts). ``options`` must be resolved. ``summary`` (a dict) receives
    what the edit reached (balance).
    """
    from nucsynth.generate.layouts import points_from_labels

    o = options
    if synth.family == "structure":
        if count is None or int(count) < 1:
            raise ValueError("a structure checkpoint generates new layouts: give a count of at least 1")
        hw = size or (synth.model.image_size, synth.model.image_size)
        return [Item(i, o.seed + i, None, tuple(hw), provenance={"mode": "structure"}) for i in range(int(count))]
    if source is None:
        raise ValueError(f"a {synth.family} checkpoint renders layouts: give a layout source")
    if count is not None or size is not None and synth.family != "joint":
        raise ValueError("count and size are for a structure checkpoint")
    entries = list(getattr(source, "items", source))
    provs = list(getattr(source, "provenance", [{} for _ in entries]))
    if not entries:
        raise ValueError("the layout source holds no layouts")
    layouts = [e.layout if isinstance(e, Sample) else e for e in entries]
    images = [e.image if isinstance(e, Sample) else None for e in entries]
    layouts = synth.in_model_classes(layouts)  # type: ignore[assignment]  (matched by class name)
    if synth.family == "joint":
        return [Item(i, o.seed + i, points_from_labels(l), provenance={"mode": "points", **p})
                for i, (l, p) in enumerate(zip(layouts, provs))]
    edited, info = _edited(layouts, o)
    if summary is not None:
        summary.update(info)
    if o.strength is not None and any(im is None for im in images):
        raise ValueError("partial noising (strength) starts from each source image, but the source has none")
    if o.strength is None:
        return [Item(i, o.seed + i, l, provenance={"mode": o.mode, **p}) for i, (l, p) in enumerate(zip(edited, provs))]
    if o.mode == "layout":
        return [Item(i, o.seed + i, l, init_image=images[i], provenance={"mode": o.mode, **p})
                for i, (l, p) in enumerate(zip(edited, provs))]
    return [Item(i, o.seed + i, new, init_image=images[i], fresh=changed_pixels(old, new),
                 provenance={"mode": o.mode, **p, "fresh_margin": FRESH_MARGIN})
            for i, (old, new, p) in enumerate(zip(layouts, edited, provs))]


def changed_pixels(source: Layout, edited: Layout) -> np.ndarray:
    """bool (H, W): where ``edited`` differs from ``source`` (:func:`nucsynth.edit.edited_region`),
    grown by :data:`FRESH_MARGIN` px (all False for an unedited patch, which still renders
    on the same path so that its pixels do not depend on its batch). A DiffMix rendering
    starts these pixels from pure noise, so the image shows the edited nuclei and not the
    ones they replaced."""
    return edited_region(source, edited, margin=FRESH_MARGIN)


# ---------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Progress:
    """Where a job is: ``done`` of ``total`` samples written, and inside the batch in
    flight (samples ``batch_start``..``batch_stop``) solver step ``step`` of ``steps``."""

    done: int
    total: int
    batch_start: int = 0
    batch_stop: int = 0
    step: int = 0
    steps: int = 0
    elapsed: float = 0.0

    @property
    def fraction(self) -> float:
        """Share of the job's work done, 0-1."""
        inflight = (self.batch_stop - self.batch_start) * (self.step / self.steps if self.steps else 0.0)
        return min(1.0, (self.done + inflight) / self.total) if self.total else 1.0

    def __str__(self) -> str:
        eta = ""
        if 0.0 < self.fraction < 1.0 and self.elapsed > 0:
            eta = f", about {_duration(self.elapsed * (1 - self.fraction) / self.fraction)} left"
        step = f" step {self.step}/{self.steps} of samples {self.batch_start}-{self.batch_stop - 1}," if self.steps else ""
        return f"{self.done}/{self.total} samples written,{step} {100 * self.fraction:.0f}%{eta}"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


@dataclass
class JobResult:
    """What a job did: ``written`` new samples, ``skipped`` already in the store from an
    earlier run, ``total`` in the store, ``cancelled``, ``seconds``, ``notes`` (what was
    found and cleaned up)."""

    out: Path
    written: int
    skipped: int
    total: int
    cancelled: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class JobCancelled(Exception):
    """Raised from a progress callback to stop a job between solver steps."""


def _settings_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """Names of the settings that differ (options one by one)."""
    diff = []
    for k in sorted(set(have) | set(want)):
        if k == "options":
            ho, wo = dict(have.get(k) or {}), dict(want.get(k) or {})
            diff += [_flag(n) for n in sorted(set(ho) | set(wo)) if ho.get(n) != wo.get(n)]
        elif have.get(k) != want.get(k):
            diff.append({"items_sha256": "the layouts (source, split, limit, edits)", "count": "the number of samples",
                         "checkpoint_sha256": "the checkpoint", "image_checkpoint_sha256": "the image checkpoint",
                         "family": "the model family"}.get(k, k))
    return diff


class SynthesisJob:
    """Render ``items`` into the dataset store ``out`` in batches, resumably (module doc).

    ``overwrite``: replace an existing ``out`` (the old store stays until the new one is
    complete) and restart a partial store made with other settings. ``attrs``: extra store
    attributes. ``executor``: None (render here) or an object with
    ``map(batches) -> iterator of (batch number, samples)`` (:mod:`nucsynth.distributed`).
    """

    def __init__(self, synth: Synthesizer, items: Sequence[Item], options: SynthesisOptions, out: str | Path, *,
                 overwrite: bool = False, attrs: Mapping[str, Any] | None = None, executor: Any = None) -> None:
        if not items:
            raise ValueError("a synthesis job needs at least one item")
        if options.guidance is None:
            raise ValueError("options are not resolved: call Synthesizer.resolve(options) first")
        shapes = sorted({tuple(it.layout.shape) if it.layout is not None else tuple(it.size or ()) for it in items})
        if len(shapes) > 1:
            raise ValueError(f"a store holds patches of one size; the layouts of this job have sizes {shapes[:4]}"
                             f"{' ...' if len(shapes) > 4 else ''}: tile the source first (nucsynth prepare)")
        self.synth, self.items, self.options = synth, list(items), options
        self.out = Path(out)
        self.overwrite = overwrite
        self.attrs = dict(attrs or {})
        self.executor = executor

    def settings(self) -> dict[str, Any]:
        """What must match for a re-run to continue a partial store."""
        return {"family": self.synth.family, "checkpoint_sha256": self.synth.sha256,
                "image_checkpoint_sha256": self.synth.image_sha256, "options": self.options.to_dict(),
                "count": len(self.items), "items_sha256": _items_sha256(self.items)}

    def batches(self, start: int = 0) -> list[tuple[int, list[Item]]]:
        """(batch number, items) from item ``start`` on, ``batch_size`` items each."""
        b = self.options.batch_size
        return [(k // b, self.items[k : k + b]) for k in range(start, len(self.items), b)]

    def _clean_leftovers(self, notes: list[str]) -> None:
        """Deal with the hidden temporary folders that killed runs left beside ``out`` and
        beside its partial store (:func:`nucsynth.outputs.tidy`); the resumable
        ``.partial`` store itself is kept."""
        from nucsynth.outputs import tidy

        for path in (self.out, partial_path(self.out)):
            notes += tidy(path, report=None)

    def _open(self, notes: list[str]) -> Any:
        """The partial store to write into: continued when its settings match, else new."""
        import shutil

        from nucsynth.io.store import DatasetStore

        partial = partial_path(self.out)
        want = self.settings()
        if partial.exists():
            try:
                store = DatasetStore.open(partial, mode="a")
                have = store.attrs.get(SETTINGS_ATTR) or {}
            except ValueError as e:  # damaged beyond opening (a busy store raises OSError: not caught)
                store, have = None, {"unreadable": str(e)}
            diff = _settings_diff(have, want) if store is not None else ["(unreadable partial store)"]
            if not diff:
                if len(store) > len(self.items):
                    raise ValueError(f"{partial} holds {len(store)} samples, more than this job's {len(self.items)}")
                if len(store):
                    notes.append(f"continuing {self.out}: {len(store)} of {len(self.items)} samples were already rendered")
                return store
            if store is not None:
                store.close()
            if not self.overwrite:
                raise ValueError(f"{self.out} was started with other settings ({', '.join(diff)} differ; its partial "
                                 f"store is {partial}): re-run with the same settings to continue, or pass --overwrite "
                                 "to start again")
            shutil.rmtree(partial)
            notes.append(f"removed the partial store of a run with other settings ({', '.join(diff)} differed)")
        mode = self.options.mode if self.synth.family == "semantic" else {"joint": "points"}.get(self.synth.family,
                                                                                             self.synth.family)
        attrs = {**self.options.to_dict(), **self.attrs, SETTINGS_ATTR: want, "checkpoint": str(self.synth.checkpoint),
                 "checkpoint_sha256": self.synth.sha256, "family": self.synth.family, "mode": mode,
                 "count": len(self.items)}
        if self.synth.image_checkpoint is not None:
            attrs.update(image_checkpoint=str(self.synth.image_checkpoint), image_checkpoint_sha256=self.synth.image_sha256)
        return DatasetStore.create(partial, self.synth.class_set, attrs=attrs)

    def _complete_out(self) -> bool:
        """True when ``out`` already holds this job, complete (nothing to do); raises when it
        holds something else and ``overwrite`` is off."""
        from nucsynth.io.store import DatasetStore

        if not self.out.exists():
            return False
        try:
            store = DatasetStore.open(self.out)
            diff = _settings_diff(store.attrs.get(SETTINGS_ATTR) or {}, self.settings())
            complete = not diff and len(store) == len(self.items)
            store.close()
        except (ValueError, OSError):
            diff, complete = ["(not a dataset store)"], False
        if complete and not self.overwrite:
            return True
        if not self.overwrite:
            raise FileExistsError(f"{self.out} already exists and was made with other settings ({', '.join(diff)} "
                                  "differ); pass --overwrite to replace it, or choose another output")
        return False

    def run(self, progress: Callable[[Progress], None] | None = None,
            cancel: threading.Event | Callable[[], bool] | None = None) -> JobResult:
        """Render what the store does not hold yet; returns a :class:`JobResult`.

        ``progress(Progress)`` after every solver step and every written batch. ``cancel``
        (an Event, or a function returning True to stop) is checked at every step: the job
        stops there, keeps what it wrote, and the same job run again continues.
        """
        from nucsynth.io.store import move_into_place

        t0 = time.perf_counter()
        notes: list[str] = []
        self._clean_leftovers(notes)
        total = len(self.items)
        if self._complete_out():
            return JobResult(self.out, 0, total, total, notes=notes + [f"{self.out} is already complete"])
        store = self._open(notes)
        start = len(store)
        stopped = (cancel.is_set if isinstance(cancel, threading.Event) else cancel) or (lambda: False)
        done = start

        def report(**kw: Any) -> None:
            if progress is not None:
                progress(Progress(done, total, elapsed=time.perf_counter() - t0, **kw))

        def step_fn(items: list[Item]) -> Callable[[int, int], None]:
            def fn(i: int, n: int) -> None:
                if stopped():
                    raise JobCancelled()
                report(batch_start=items[0].index, batch_stop=items[-1].index + 1, step=i, steps=n)
            return fn

        report()
        try:
            if self.executor is None:
                results: Iterator[tuple[int, list[Sample]]] = (
                    (k, self.synth.render(b, self.options, step_fn(b))) for k, b in self.batches(start))
            else:
                results = self.executor.map(self, self.batches(start), stopped)
            for _, samples in results:
                store.append(samples, splits="synthetic")
                done += len(samples)
                report()
        except JobCancelled:
            return JobResult(self.out, done - start, start, done, cancelled=True,
                             seconds=time.perf_counter() - t0, notes=notes)
        finally:
            store.close()
        if done != total:  # an executor stopped early (cancelled)
            return JobResult(self.out, done - start, start, done, cancelled=True,
                             seconds=time.perf_counter() - t0, notes=notes)
        move_into_place(partial_path(self.out), self.out, overwrite=self.overwrite)
        return JobResult(self.out, done - start, start, total, seconds=time.perf_counter() - t0, notes=notes)


# ---------------------------------------------------------------------- re-rendering
def rerender(sample: Sample, checkpoint: str | Path | None = None, device: Any = None,
             source_image: np.ndarray | None = None) -> Sample:
    """Render one stored sample again from its provenance: the same checkpoint (by content
    hash: ``checkpoint`` may point at a copy elsewhere), options, seed and thread count; for
    a sample rendered from a source image (``strength``) that image is read from the
    recorded source (or given as ``source_image``). On the same device the pixels equal the
    stored ones."""
    import torch

    prov = sample.provenance
    for key in ("checkpoint_sha256", "options", "seed", "family"):
        if key not in prov:
            raise ValueError(f"this sample's provenance has no {key!r}: it was not made by nucsynth.synthesize")
    synth = get_synthesizer(checkpoint or prov["checkpoint"], device or prov.get("device"),
                            image_checkpoint=prov.get("image_checkpoint"))
    if synth.sha256 != prov["checkpoint_sha256"]:
        raise ValueError(f"checkpoint {synth.checkpoint} has content hash {synth.sha256[:12]}..., the sample was made "
                         f"by {prov['checkpoint_sha256'][:12]}...: pass the checkpoint it was made with")
    options = SynthesisOptions.from_dict(prov["options"])
    item = Item(int(prov.get("index", 0)), int(prov["seed"]), provenance={})
    if synth.family == "semantic":
        item.layout = sample.layout
        if options.strength is not None:
            margin = prov.get("fresh_margin")  # set when the edited nuclei were rendered from pure noise
            image, source_layout = _source_sample(prov) if source_image is None or margin is not None else (None, None)
            item.init_image = source_image if source_image is not None else image
            if item.init_image is None:
                raise ValueError(f"source {prov['source']} has no images: pass source_image")
            if margin is not None:
                item.fresh = edited_region(synth.in_model_classes([source_layout])[0], sample.layout, margin=int(margin))
    elif synth.family == "joint":
        from nucsynth.io.sources import read_layout_source

        src = read_layout_source(prov["source"], points=True, size=sample.layout.shape if str(prov["source"]).lower()
                                 .endswith(".csv") else None, class_set=synth.class_set)
        item.layout = src.items[int(prov.get("source_index", 0))]
    else:
        item.size = sample.layout.shape
    threads = torch.get_num_threads()
    if prov.get("torch_threads"):
        torch.set_num_threads(int(prov["torch_threads"]))
    try:
        out = synth.render([item], options)[0]
    finally:
        torch.set_num_threads(threads)
    return Sample(out.layout, out.image, {**prov, **{k: out.provenance[k] for k in ("device", "torch_threads")}})


def _source_sample(prov: Mapping[str, Any]) -> tuple[np.ndarray | None, Layout]:
    """(image or None, layout) of the source patch a sample was rendered from (``source``
    and ``source_index`` of its provenance)."""
    from nucsynth.io.sources import read_layout_source

    if not prov.get("source"):
        raise ValueError("this sample was rendered from a source patch and its provenance names no source: "
                         "pass source_image (and keep the source for an edited layout)")
    src = read_layout_source(prov["source"])
    index = int(prov.get("source_index", 0))
    entry = src.items[index]
    return src.images[index], entry.layout if isinstance(entry, Sample) else entry
