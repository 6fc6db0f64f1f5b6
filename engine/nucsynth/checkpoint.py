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
checkpoints under ``<run>/checkpoints/step_<N>``; passing the run folder loads the newest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from nucsynth.models.base import ModelFamily, get_family

if TYPE_CHECKING:
    import torch

__all__ = [
    "CheckpointError",
    "FORMAT",
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


# ---------------------------------------------------------------------- atomic writing
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an older one if present."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


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
) -> Path:
    """Write a checkpoint folder atomically (temp folder, fsync, rename) and return its path.

    ``net`` holds the raw weights and ``ema`` the EMA weights (if ``ema`` is None the raw
    weights are also written as the EMA file, so sampling always finds ``ema.safetensors``).
    ``raw_weights=False`` writes only the EMA weights (a compact checkpoint for sampling).
    ``data`` is the provenance of the training data; ``train_config`` the training options.
    """
    import torch

    from nucsynth import __version__

    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
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
        write_json_atomic(tmp / CONFIG, config)
        mode = 0o666 & ~_umask()  # temp-file writers create 0600 files; checkpoints are shared
        for f in tmp.iterdir():
            os.chmod(f, mode)
            _fsync_file(f)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path``: the folder itself, or a run folder's newest."""
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
        return runs[-1]
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


def load_weights(net: "torch.nn.Module", path: Path, device: str = "cpu") -> None:
    """Load a safetensors state dict into ``net`` (strict), with an error naming the file."""
    state = _load_tensors(path, device)
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
    opt_state = _optimizer_from_files(_load_tensors(ckpt / OPTIMIZER, "cpu"), meta)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer state does not fit this model: {e}") from None
    return state, _load_tensors(ckpt / RNG, "cpu")


def export_checkpoint(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """A compact copy of a checkpoint for sampling: ``config.json`` + ``ema.safetensors``.

    ``src`` may be a run folder (its newest checkpoint is taken). The weights are validated
    against the config before anything is written; ``dst`` is written atomically and an
    existing one is replaced only with ``overwrite``.
    """
    ckpt = find_checkpoint(src)
    model, net = load_checkpoint(ckpt)  # validates config and weights
    cfg = read_config(ckpt)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it")
    save_checkpoint(dst, model, net, step=int(cfg.get("step", 0)), train_config=cfg.get("train"),
                    data=cfg.get("data"), raw_weights=False)
    return dst


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
