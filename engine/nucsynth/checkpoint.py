"""Checkpoints: a folder of safetensors tensors and JSON, written atomically, never pickle.

A checkpoint folder holds::

    config.json          family, model config (preset, network, diffusion, class set),
                         training step, training config, data provenance, versions
    ema.safetensors      EMA weights (used for sampling)
    model.safetensors    raw weights (resume; optional in a shipped checkpoint)
    optimizer.safetensors + optimizer.json   optimizer state tensors / param groups
    rng.safetensors      RNG states (torch CPU, CUDA, the training generator)
    train_state.json     step, epoch, learning-rate schedule, world size

Only ``config.json`` and one weights file are needed to sample: :func:`load_checkpoint`
rebuilds the family and its network from the JSON alone. A training run folder keeps its
checkpoints under ``<run>/checkpoints/step_<N>``; passing the run folder loads the newest
INTACT one (:func:`latest_intact`; a damaged newer one is skipped with a warning naming it).

Integrity: ``config.json`` records the SHA-256 of every other file (``"checksums"``); a
file that is missing, truncated (shorter than its safetensors header says) or differs from
its checksum is refused with an error naming it, and so are weights holding NaN or inf.
The folder is written under a hidden temporary name and put in place in one step
(:mod:`nucsynth.outputs`); temporary folders of killed writes are removed by the next
write into the same folder (:func:`tidy_checkpoints`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from nucsynth import outputs

from nucsynth.models.base import ModelFamily, get_family

if TYPE_CHECKING:
    import torch

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "FORMAT",
    "checkpoint_problem",
    "latest_intact",
    "tidy_checkpoints",
    "save_checkpoint",
    "load_checkpoint",
    "load_training_state",
    "read_config",
    "find_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "export_checkpoint",
    "default_checkpoint_dir",
    "cache_checkpoint_dir",
    "write_json_atomic",
    "content_sha256",
]

FORMAT = "nucsynth-checkpoint"
FORMAT_VERSION = 1
CONFIG = "config.json"
EMA = "ema.safetensors"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG = "rng.safetensors"
TRAIN_STATE = "train_state.json"
ENV_VAR = "NUCSYNTH_CHECKPOINT"
DEFAULT_NAME = "default_semantic"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or of an unknown family."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older intact one."""


# ---------------------------------------------------------------------- atomic writing
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    outputs.fsync_dir(path.parent)


def content_sha256(*parts: bytes | Path) -> str:
    """SHA-256 (hex) over ``parts`` in order: bytes as given, files by their content
    (streamed). The engine's one content hash: a checkpoint's per-file checksums, its
    content hash for caching and provenance (:func:`nucsynth.synthesize.checkpoint_sha256`)
    and the weights hash a latent model names its autoencoder by."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (bytes, bytearray)):
            h.update(part)
        else:
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return content_sha256(path)


def tidy_checkpoints(folder: str | Path, report: outputs.Report | None = None) -> list[str]:
    """Remove the temporary folders that killed checkpoint writes left in ``folder``
    (those of running processes are kept); returns one line per leftover."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = {lo.output for lo in outputs.leftovers_in(folder)}
    return [line for out in sorted(names) for line in outputs.tidy(out, remove=True, report=report)]


def discard_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted folder
    that looks complete: it is first renamed to a hidden temporary name."""
    aside = outputs.temporary_path(path, "deleting")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _tensors_for_saving(state: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """CPU, contiguous, unshared copies (safetensors refuses tensors sharing memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            t = t.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[k] = t
    return out


def _save_tensors(path: Path, tensors: Mapping[str, "torch.Tensor"]) -> None:
    from safetensors.torch import save_file

    save_file(_tensors_for_saving(tensors), str(path), metadata={"format": FORMAT})


def _json_friendly(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_friendly(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_friendly(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        return x.item()
    return x


def _optimizer_to_files(optimizer: "torch.optim.Optimizer") -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and the rest (JSON)."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = _json_friendly(val)
    meta = {"param_groups": _json_friendly(sd["param_groups"]), "scalars": scalars, "type": type(optimizer).__name__}
    return tensors, meta


def _optimizer_from_files(tensors: Mapping[str, "torch.Tensor"], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        # JSON turned tuples (e.g. Adam's betas) into lists; the optimizer expects tuples.
        groups.append({k: (v if k == "params" or not isinstance(v, list) else tuple(v)) for k, v in g.items()})
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    directory: str | Path,
    model: ModelFamily,
    net: "torch.nn.Module",
    *,
    ema: "torch.nn.Module | None" = None,
    step: int = 0,
    optimizer: "torch.optim.Optimizer | None" = None,
    rng: Mapping[str, "torch.Tensor"] | None = None,
    train_state: Mapping[str, Any] | None = None,
    train_config: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    raw_weights: bool = True,
    bundle: Mapping[str, Path] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (temp folder, fsync, rename) and return its path.

    ``net`` holds the raw weights and ``ema`` the EMA weights (if ``ema`` is None the raw
    weights are also written as the EMA file, so sampling always finds ``ema.safetensors``).
    ``raw_weights=False`` writes only the EMA weights (a compact checkpoint for sampling).
    ``data`` is the provenance of the training data; ``train_config`` the training options.
    ``bundle`` maps sub-folder names to finished checkpoint folders that are MOVED inside
    this one before it is renamed into place (e.g. a latent model's ``autoencoder``), so
    the pair appears at once or not at all.
    """
    import torch

    from nucsynth import __version__

    final = Path(directory)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise outputs.OutputError(outputs.describe_os_error(e, final)) from None
    tidy_checkpoints(final.parent, report=None)
    tmp = outputs.temporary_path(final, "writing")
    try:
        tmp.mkdir()
        files = {"ema": EMA}
        _save_tensors(tmp / EMA, (ema if ema is not None else net).state_dict())
        if raw_weights:
            _save_tensors(tmp / MODEL, net.state_dict())
            files["model"] = MODEL
        if optimizer is not None:
            tensors, meta = _optimizer_to_files(optimizer)
            _save_tensors(tmp / OPTIMIZER, tensors)
            write_json_atomic(tmp / OPTIMIZER_JSON, meta)
            files["optimizer"] = OPTIMIZER
        if rng is not None:
            _save_tensors(tmp / RNG, rng)
            files["rng"] = RNG
        if train_state is not None:
            write_json_atomic(tmp / TRAIN_STATE, _json_friendly(dict(train_state)))
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": model.name,
            "model": model.config_dict(),
            "step": int(step),
            "train": _json_friendly(dict(train_config or {})),
            "data": _json_friendly(dict(data or {})),
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"nucsynth": __version__, "torch": torch.__version__},
        }
        config["checksums"] = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        write_json_atomic(tmp / CONFIG, config)
        mode = 0o666 & ~outputs.current_umask()  # temp-file writers create 0600 files; checkpoints are shared
        for f in tmp.iterdir():
            os.chmod(f, mode)
            _fsync_file(f)
        for name, folder in (bundle or {}).items():
            os.replace(folder, tmp / name)
        outputs.fsync_dir(tmp)
        outputs.replace_path(tmp, final, overwrite=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, outputs.OutputError):
            raise
        raise outputs.OutputError(outputs.describe_os_error(e, final)
                                  + f" (no checkpoint was written at {final})", e.errno) from None
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        os_error = outputs.as_os_error(e)  # safetensors reports a full disk as its own error type
        if os_error is not None:
            raise outputs.OutputError(outputs.describe_os_error(os_error, final)
                                      + f" (no checkpoint was written at {final})", os_error.errno) from None
        raise
    return final


# ---------------------------------------------------------------------- finding and reading
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints ``<run>/checkpoints/step_*`` of a run folder, oldest first."""
    base = Path(run_dir) / "checkpoints"
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / CONFIG).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_", 1)[1]) if p.name.split("_", 1)[1].isdigit() else -1)


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable judging from its header and size, or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is truncated ({size} bytes, its header alone needs {8 + n})"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{path.name} cannot be read ({type(e).__name__}: {e})"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{path.name} is truncated ({size} of {need} bytes)"
    return None


def checkpoint_problem(path: str | Path, resume: bool = False, full: bool = True) -> str | None:
    """Why the checkpoint folder ``path`` cannot be used, or None if it is intact.

    Checks that the config reads, that the files it lists (and, for ``resume``, every file
    an exact resume needs) are present and not truncated and, with ``full``, that each
    matches the SHA-256 recorded at save time (checkpoints of older releases have none).
    """
    ckpt = Path(path)
    try:
        cfg = read_config(ckpt)
    except (CheckpointError, FileNotFoundError) as e:
        return str(e)
    need = set(cfg.get("files", {EMA: EMA}).values()) if isinstance(cfg.get("files"), dict) else {EMA}
    if resume:
        need |= {MODEL, EMA, OPTIMIZER, OPTIMIZER_JSON, RNG, TRAIN_STATE}
    for name in sorted(need):
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if name.endswith(".safetensors"):
            why = _safetensors_problem(f)
            if why:
                return why
    sums = cfg.get("checksums") or {}
    if full:
        for name, digest in sorted(sums.items()):
            f = ckpt / name
            if f.is_file() and _sha256(f) != digest:
                return f"{name} differs from its recorded SHA-256 (damaged)"
    return None


def latest_intact(run_dir: str | Path, resume: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of a run folder and the newer damaged ones skipped
    (path, why), newest first. ``(None, skipped)`` when none is intact."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        why = checkpoint_problem(ckpt, resume=resume)
        if why is None:
            return ckpt, skipped
        skipped.append((ckpt, why))
    return None, skipped


def describe_skipped(skipped: list[tuple[Path, str]]) -> str:
    """One sentence naming the damaged checkpoints that were passed over."""
    return "; ".join(f"skipped {p.name}: {why}" for p, why in skipped)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path``: the folder itself, or a run folder's newest
    intact one (damaged newer ones are skipped with a :class:`CheckpointWarning`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p} does not exist")
    if p.is_file():
        if p.name == CONFIG or p.suffix == ".safetensors":
            return p.parent
        raise CheckpointError(f"{p} is a file; a checkpoint is a folder holding {CONFIG} and {EMA}")
    if (p / CONFIG).is_file():
        return p
    runs = list_checkpoints(p)
    if runs:
        best, skipped = latest_intact(p)
        if best is None:
            raise CheckpointError(f"no intact checkpoint in {p}: {describe_skipped(skipped)}")
        if skipped:
            warnings.warn(f"{p}: using {best.name}; {describe_skipped(skipped)}", CheckpointWarning, stacklevel=2)
        return best
    raise CheckpointError(
        f"{p} is not a checkpoint: it has no {CONFIG} (and no checkpoints/step_* folders of a training run)"
    )


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint (validated: format and family present)."""
    ckpt = find_checkpoint(path)
    cfg_path = ckpt / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint config {cfg_path} cannot be read as JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a nucsynth checkpoint config (expected \"format\": \"{FORMAT}\")")
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format version {cfg.get('format_version')}; this nucsynth reads up to {FORMAT_VERSION}"
        )
    for key in ("family", "model"):
        if key not in cfg:
            raise CheckpointError(f"checkpoint config {cfg_path} lacks the key {key!r}")
    return cfg


def _load_tensors(path: Path, device: str) -> dict[str, "torch.Tensor"]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {e}") from None


def _verify(path: Path) -> None:
    """Refuse a file that is truncated or differs from the SHA-256 in its config.json."""
    if path.suffix == ".safetensors" and path.is_file():
        why = _safetensors_problem(path)
        if why:
            raise CheckpointError(f"checkpoint file {path} is corrupt: {why}")
    cfg_path = path.parent / CONFIG
    try:
        sums = json.loads(cfg_path.read_text(encoding="utf-8")).get("checksums") or {}
    except (OSError, ValueError, AttributeError):
        return  # read_config reports a bad config; a file loaded on its own has none
    digest = sums.get(path.name) if isinstance(sums, dict) else None
    if digest is not None and path.is_file() and _sha256(path) != digest:
        raise CheckpointError(f"checkpoint file {path} is corrupt: it differs from the SHA-256 recorded when it was saved")


def _refuse_non_finite(state: Mapping[str, "torch.Tensor"], path: Path) -> None:
    import torch

    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint file {path} holds non-finite values (NaN or inf) in {len(bad)} of "
                              f"{len(state)} tensors (first: {bad[0]!r}); the run diverged or the file is damaged: "
                              "use an earlier checkpoint")


def load_weights(net: "torch.nn.Module", path: Path, device: str = "cpu") -> None:
    """Load a safetensors state dict into ``net`` (strict), with an error naming the file.

    Refuses a damaged file (truncated, checksum mismatch) and weights holding NaN or inf.
    """
    _verify(path)
    state = _load_tensors(path, device)
    _refuse_non_finite(state, path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit the network of its config: {e}") from None


def build_family(cfg: Mapping[str, Any], where: str | Path = "<config>") -> ModelFamily:
    """The model family described by a checkpoint config (no weights)."""
    try:
        cls = get_family(str(cfg["family"]))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {where}: {e}") from None
    try:
        return cls.from_config_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {where}: its {cls.name!r} model config is invalid: {e}") from None


def load_checkpoint(
    path: str | Path, device: "str | torch.device" = "cpu", weights: str = "ema"
) -> tuple[ModelFamily, "torch.nn.Module"]:
    """Rebuild a model family and its network from a checkpoint folder (or a run folder).

    ``weights``: ``"ema"`` (default, for sampling; falls back to the raw weights only if the
    checkpoint has no EMA file) or ``"model"`` (raw weights). The network is in eval mode on
    ``device``; the returned family has ``.net`` set to it, ``.checkpoint`` and ``.step``.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = find_checkpoint(path)
    cfg = read_config(ckpt)
    model = build_family(cfg, ckpt)
    order = [EMA, MODEL] if weights == "ema" else [MODEL]
    file = next((ckpt / f for f in order if (ckpt / f).is_file()), None)
    if file is None:
        raise CheckpointError(f"checkpoint {ckpt} has no weights file (looked for {', '.join(order)})")
    net = model.build_network()
    load_weights(net, file, "cpu")
    net.to(device).eval()
    model.net = net
    model.checkpoint = str(ckpt)
    model.step = int(cfg.get("step", 0))
    return model, net


def load_training_state(
    path: str | Path,
    net: "torch.nn.Module",
    ema: "torch.nn.Module",
    optimizer: "torch.optim.Optimizer",
) -> tuple[dict[str, Any], dict[str, "torch.Tensor"]]:
    """Restore raw + EMA weights and the optimizer from a checkpoint for resuming.

    Returns (train_state JSON, RNG state tensors). Everything needed for an exact resume
    must be present; a checkpoint saved for sampling only gives a clear error.
    """
    ckpt = find_checkpoint(path)
    for f in (MODEL, EMA, OPTIMIZER, OPTIMIZER_JSON, RNG, TRAIN_STATE):
        if not (ckpt / f).is_file():
            raise CheckpointError(f"checkpoint {ckpt} cannot resume training: {f} is missing")
    device = next(net.parameters()).device
    load_weights(net, ckpt / MODEL, str(device))
    load_weights(ema, ckpt / EMA, str(device))
    try:
        meta = json.loads((ckpt / OPTIMIZER_JSON).read_text(encoding="utf-8"))
        state = json.loads((ckpt / TRAIN_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer or training state JSON is corrupt: {e}") from None
    for f in (OPTIMIZER, RNG, OPTIMIZER_JSON, TRAIN_STATE):
        _verify(ckpt / f)
    opt_tensors = _load_tensors(ckpt / OPTIMIZER, "cpu")
    _refuse_non_finite(opt_tensors, ckpt / OPTIMIZER)
    opt_state = _optimizer_from_files(opt_tensors, meta)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer state does not fit this model: {e}") from None
    return state, _load_tensors(ckpt / RNG, "cpu")


def export_checkpoint(src: str | Path, dst: str | Path, overwrite: bool = False, half: bool = False,
                      autoencoder: str | Path | None = None, guidance: float | None = None) -> Path:
    """A compact copy of a checkpoint for sampling: ``config.json`` + ``ema.safetensors``.

    ``src`` may be a run folder (its newest checkpoint is taken). The weights are validated
    against the config before anything is written; ``dst`` is written atomically and an
    existing one is replaced only with ``overwrite``. ``half``: store the weights as
    float16 (half the size; they are loaded back into float32 networks). The layout
    statistics beside ``src`` (``layout_stats.json`` of the checkpoint or of its run
    folder) are copied into ``dst``. A LATENT model
    gets its autoencoder bundled as ``dst/autoencoder`` (exported the same way) and its
    record points there, with the bundled copy's content hash. ``autoencoder`` bundles
    another autoencoder instead, e.g. a decoder fine-tuned with ``train --finetune-decoder``:
    it must have the recorded autoencoder's encoder bit for bit (the same latent space),
    else ``ValueError``. ``guidance``: record the classifier-free guidance scale the model
    renders with when none is given (semantic family; e.g. the value
    ``benchmarks/bench_realism.py --guidance`` measured most realistic); None keeps the
    recorded one. ``ValueError`` below -1, or above 0 for a model that never learned the
    null condition.
    """
    import torch

    ckpt = find_checkpoint(src)
    model, net = load_checkpoint(ckpt)  # validates config and weights
    cfg = read_config(ckpt)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it")
    if guidance is not None:
        _record_guidance(model, cfg, float(guidance), ckpt)
    bundle: dict[str, Path] = {}
    if getattr(model, "is_latent", False):
        from nucsynth.models.autoencoder import weights_hash

        recorded = model.autoencoder("cpu")  # loads and checks the recorded autoencoder
        ae_src = model._autoencoder.checkpoint
        if autoencoder is not None:
            from nucsynth.models.autoencoder import same_encoder

            other, other_net = load_checkpoint(autoencoder)
            if other.name != "autoencoder" or not same_encoder(recorded, other_net):
                raise ValueError(f"{autoencoder} does not share the encoder of the autoencoder this latent model was "
                                 f"trained with ({ae_src}): its latents would mean something else")
            ae_src = other.checkpoint
        ae_tmp = outputs.temporary_path(dst, "autoencoder")
        bundle["autoencoder"] = export_checkpoint(ae_src, ae_tmp, half=half)
        model.config.latent = {**model.config.latent, "autoencoder": "autoencoder",
                               "autoencoder_hash": weights_hash(ae_tmp)}
    elif autoencoder is not None:
        raise ValueError("autoencoder= applies to latent models only")
    from nucsynth.generate.stats import LAYOUT_STATS_FILE, find_layout_stats

    stats_file = find_layout_stats(ckpt)[1]  # the run's layout statistics travel with the model (checked)
    if stats_file is not None:
        bundle[LAYOUT_STATS_FILE] = outputs.temporary_path(dst, "stats")
        shutil.copyfile(stats_file, bundle[LAYOUT_STATS_FILE])
    if half:
        net = net.to(torch.float16)
    try:
        save_checkpoint(dst, model, net, step=int(cfg.get("step", 0)), train_config=cfg.get("train"),
                        data=cfg.get("data"), raw_weights=False, bundle=bundle)
    finally:
        for left in bundle.values():  # what was not moved into dst (an error on the way)
            if left.is_dir():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
    return dst


def _record_guidance(model: ModelFamily, cfg: Mapping[str, Any], guidance: float, where: Path) -> None:
    """Set the default guidance of ``model`` (a family whose config has one), after checks."""
    from nucsynth.synthesize import learned_null, refuse_unlearned_guidance

    if not hasattr(model.config, "guidance"):
        raise ValueError(f"guidance= applies to models that record a default guidance (semantic); {where} is a "
                         f"{model.name!r} model")
    if not math.isfinite(guidance) or guidance < -1.0:
        raise ValueError(f"guidance must be a number >= -1 (0 = conditional model only), got {guidance}")
    refuse_unlearned_guidance(guidance, learned_null(cfg), where)
    model.config.guidance = guidance


# ---------------------------------------------------------------------- default resolution
def default_checkpoint_dir() -> Path:
    """The default semantic checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / DEFAULT_NAME


def cache_checkpoint_dir() -> Path:
    """Where a user may place a default checkpoint: ``$XDG_CACHE_HOME/nucsynth/checkpoints/...``."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "nucsynth" / "checkpoints" / DEFAULT_NAME


def resolve_checkpoint(path: str | Path | None = None) -> Path:
    """The checkpoint to use: ``path`` if given, else ``$NUCSYNTH_CHECKPOINT``, else the
    default shipped in the package, else the user cache. An explicitly named place that
    does not hold a checkpoint is an error (no silent fallback to another model)."""
    if path is not None:
        return find_checkpoint(path)
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return find_checkpoint(env)
        except (FileNotFoundError, CheckpointError) as e:
            raise CheckpointError(f"${ENV_VAR} is set to {env!r} but: {e}") from None
    looked = [f"${ENV_VAR} (not set)"]
    for cand in (default_checkpoint_dir(), cache_checkpoint_dir()):
        if (cand / CONFIG).is_file():
            return cand
        looked.append(str(cand))
    raise FileNotFoundError(
        "no checkpoint given and no default found; looked at: " + "; ".join(looked)
        + ". Pass --checkpoint PATH or train one with `nucsynth train`."
    )
