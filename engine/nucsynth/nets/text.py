"""Text prompts and text encoders for the joint co-synthesis model.

Prompts follow the co-synthesis template (Min, Oh, Jeong):
``"high-quality histopathology {tissue} tissue image including nuclei types of {types}"``
where ``{types}`` are the class names present in the layout, in class-id order, joined by
``" and "`` (``"none"`` for a layout without classified nuclei).

Two encoders map prompts to vectors (B, dim) for the U-Net's ``context`` input:

- :class:`BuiltinPromptEncoder`: offline, no downloaded weights. It parses the templated
  prompt into a multi-hot vector of the classes present + a one-hot tissue vector, then a
  learned linear projection (trained with the model).
- :class:`OpenClipTextEncoder`: a frozen pathology CLIP text tower loaded from a local
  path: QuiltNet (Ikezogwo et al. 2023; open_clip format) or PLIP (Huang et al. 2023;
  transformers CLIP format, mapped to open_clip keys). open_clip is imported only when this
  encoder is built (the ``clip`` extra).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._torchvision import import_torchvision
from ..layout import ClassSet, Layout

__all__ = [
    "PROMPT_TEMPLATE",
    "DEFAULT_TISSUES",
    "prompt_from_layout",
    "format_prompt",
    "parse_prompt",
    "BuiltinPromptEncoder",
    "OpenClipTextEncoder",
    "plip_to_open_clip",
    "resolve_weights_path",
]

PROMPT_TEMPLATE = "high-quality histopathology {tissue} tissue image including nuclei types of {types}"
_NO_TYPES = "none"
_PROMPT_RE = re.compile(
    r"^\s*high-quality histopathology (?P<tissue>.+?) tissue image including nuclei types of (?P<types>.+?)\s*\.?\s*$",
    re.IGNORECASE,
)

# PanNuke's 19 tissues (Gamper et al. 2020), Lizard's colon, EndoNuke's endometrium.
DEFAULT_TISSUES: tuple[str, ...] = (
    "adrenal gland", "bile duct", "bladder", "breast", "cervix", "colon", "endometrium", "esophagus",
    "head and neck", "kidney", "liver", "lung", "ovarian", "pancreatic", "prostate", "skin", "stomach",
    "testis", "thyroid", "uterus",
)


def format_prompt(tissue: str, class_ids: Iterable[int], class_set: ClassSet) -> str:
    """The templated prompt for ``tissue`` and the classes ``class_ids`` (1-based; 0 ignored)."""
    ids = sorted({int(c) for c in class_ids if int(c) != 0})
    bad = [c for c in ids if not 1 <= c <= class_set.num_classes]
    if bad:
        raise ValueError(f"class ids {bad} are outside the class set {class_set.name!r} (1..{class_set.num_classes})")
    if not tissue.strip():
        raise ValueError("the tissue name of a prompt must not be empty")
    types = " and ".join(class_set.names[c - 1] for c in ids) if ids else _NO_TYPES
    return PROMPT_TEMPLATE.format(tissue=tissue.strip(), types=types)


def prompt_from_layout(layout: Layout, tissue: str = "colon") -> str:
    """The prompt describing ``layout``: its tissue and the nucleus classes present in it,
    named from ``layout.class_set`` in class-id order (nuclei of unknown class are not named)."""
    return format_prompt(tissue, layout.classes.tolist(), layout.class_set)


def parse_prompt(prompt: str, class_set: ClassSet) -> tuple[str, frozenset[int]]:
    """Inverse of :func:`format_prompt`: (tissue in lower case, set of class ids).

    Raises ValueError naming the template when the prompt does not follow it, and the
    known class names when a type is not one of them.
    """
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(
            f"prompt {prompt!r} does not follow the template {PROMPT_TEMPLATE!r} "
            f"(types: class names of {class_set.name!r} joined by ' and ', or {_NO_TYPES!r})"
        )
    tissue = " ".join(m["tissue"].lower().split())
    types = m["types"].strip()
    if types.lower() == _NO_TYPES:
        return tissue, frozenset()
    lookup = {n.lower(): i + 1 for i, n in enumerate(class_set.names)}
    ids = set()
    for name in re.split(r"\s*(?:,\s*and\s+|,\s*|\s+and\s+)\s*", types):
        key = name.strip().lower()
        if key not in lookup:
            raise ValueError(
                f"prompt {prompt!r}: {name!r} is not a nucleus type of {class_set.name!r}; "
                f"known types: {list(class_set.names)}"
            )
        ids.add(lookup[key])
    return tissue, frozenset(ids)


class BuiltinPromptEncoder(nn.Module):
    """Offline prompt encoder: (multi-hot classes, one-hot tissue) -> learned linear -> (B, dim).

    ``forward(prompts)`` parses templated prompts (see :func:`parse_prompt`);
    :meth:`encode_sets` takes tissues and class-id sets directly. The projection is
    trained with the model that uses the embedding.
    """

    def __init__(self, class_set: ClassSet, tissues: Sequence[str] = DEFAULT_TISSUES, dim: int = 256) -> None:
        super().__init__()
        tissues = tuple(" ".join(t.lower().split()) for t in tissues)
        if not tissues or len(set(tissues)) != len(tissues) or not all(tissues):
            raise ValueError(f"BuiltinPromptEncoder: tissues must be non-empty and unique, got {tissues}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"BuiltinPromptEncoder: dim must be a positive integer, got {dim!r}")
        self.class_set, self.tissues, self.dim = class_set, tissues, dim
        self.proj = nn.Linear(class_set.num_classes + len(tissues), dim)

    def to_dict(self) -> dict[str, Any]:
        """Constructor arguments as JSON (the weights live in ``state_dict``)."""
        return {"class_set": self.class_set.to_dict(), "tissues": list(self.tissues), "dim": self.dim}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuiltinPromptEncoder":
        """Inverse of :meth:`to_dict` (fresh weights; load the state dict afterwards)."""
        return cls(ClassSet.from_dict(d["class_set"]), tuple(d["tissues"]), int(d["dim"]))

    def features(self, tissues: Sequence[str], class_sets: Sequence[Iterable[int]]) -> Tensor:
        """The un-projected (B, K + T) multi-hot/one-hot features."""
        if len(tissues) != len(class_sets):
            raise ValueError(f"BuiltinPromptEncoder: {len(tissues)} tissues but {len(class_sets)} class sets")
        k = self.class_set.num_classes
        feats = torch.zeros(len(tissues), k + len(self.tissues))
        for i, (tissue, ids) in enumerate(zip(tissues, class_sets)):
            key = " ".join(tissue.lower().split())
            if key not in self.tissues:
                raise ValueError(f"BuiltinPromptEncoder: unknown tissue {tissue!r}; known tissues: {list(self.tissues)}")
            for c in ids:
                c = int(c)
                if c == 0:
                    continue
                if not 1 <= c <= k:
                    raise ValueError(f"BuiltinPromptEncoder: class id {c} is outside 1..{k} of {self.class_set.name!r}")
                feats[i, c - 1] = 1.0
            feats[i, k + self.tissues.index(key)] = 1.0
        return feats

    def encode_sets(self, tissues: Sequence[str], class_sets: Sequence[Iterable[int]]) -> Tensor:
        """Embed tissues + sets of class ids directly -> (B, dim)."""
        w = self.proj.weight
        return self.proj(self.features(tissues, class_sets).to(device=w.device, dtype=w.dtype))

    def forward(self, prompts: Sequence[str]) -> Tensor:
        """Embed templated prompts -> (B, dim)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        parsed = [parse_prompt(p, self.class_set) for p in prompts]
        return self.encode_sets([t for t, _ in parsed], [c for _, c in parsed])


# ----------------------------------------------------------------------------- open_clip

def _import_open_clip() -> Any:
    try:
        import_torchvision()
        import open_clip
    except ImportError as e:
        raise ImportError(
            "the CLIP text encoder needs open_clip_torch and torchvision: "
            "pip install 'napari-nucsynth[clip]' (or pip install open_clip_torch torchvision)"
        ) from e
    return open_clip


_WEIGHT_FILES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin",
)
_OBTAIN = (
    "download PLIP (https://huggingface.co/vinid/plip, transformers format) or QuiltNet "
    "(https://huggingface.co/wisdomik/QuiltNet-B-32, open_clip format) yourself and pass the "
    "folder or weights file with --text-encoder PATH"
)


def _hub_cache_dirs() -> list[Path]:
    """Where the Hugging Face hub keeps downloaded repositories (HF_HUB_CACHE, HF_HOME/hub,
    ~/.cache/huggingface/hub), in that order of precedence."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def resolve_weights_path(path: str | Path) -> Path:
    """A local weights file/folder: ``path`` itself if it exists, else, for a repository id
    such as ``vinid/plip`` or ``wisdomik/QuiltNet-B-32``, the newest snapshot of it in the
    Hugging Face cache (nothing is downloaded). Raises FileNotFoundError naming every place
    looked at and how to obtain the weights."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    looked = [str(p)]
    parts = str(path).strip("/").split("/")
    if len(parts) == 2 and all(parts):
        for cache in _hub_cache_dirs():
            snaps = cache / f"models--{parts[0]}--{parts[1]}" / "snapshots"
            looked.append(str(snaps))
            found = sorted(snaps.glob("*"), key=lambda q: q.stat().st_mtime) if snaps.is_dir() else []
            if found:
                return found[-1]
    raise FileNotFoundError(f"text encoder weights not found (looked at: {', '.join(looked)}); {_OBTAIN}")


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if len(found) == 1:
        return path / found[0]
    raise FileNotFoundError(
        f"text encoder folder {path} holds no single weights file (looked for {list(_WEIGHT_FILES)}, "
        f"found {found or 'none'}); {_OBTAIN}"
    )


def _load_state_dict(file: Path) -> dict[str, Tensor]:
    """Tensors from a safetensors or torch file (``weights_only``: never unpickles code)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(file))
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: say which one
        raise ValueError(f"cannot read text encoder weights from {file}: {e}") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{file} does not hold a state dict (got {type(sd).__name__})")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


def plip_to_open_clip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map the text tower of a transformers ``CLIPModel`` state dict (PLIP) to open_clip keys.

    q/k/v projections are fused into ``attn.in_proj_*`` (in that order), the text
    projection (a bias-free Linear, (out, in)) is transposed to open_clip's (in, out) matrix.
    Vision keys are dropped (only the text tower is used).
    """
    out: dict[str, Tensor] = {}
    layer_names = {
        "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    }
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, v in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = v
        elif key == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif key == "logit_scale":
            out["logit_scale"] = v
        elif key.startswith("text_model.encoder.layers."):
            rest = key[len("text_model.encoder.layers."):]
            idx, sub = rest.split(".", 1)
            m = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", sub)
            if m:
                qkv.setdefault((int(idx), m[2]), {})[m[1]] = v
                continue
            module, param = sub.rsplit(".", 1)
            if module in layer_names:
                out[f"transformer.resblocks.{idx}.{layer_names[module]}.{param}"] = v
    for (idx, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"PLIP weights: layer {idx} lacks some of the q/k/v {param}s (has {sorted(parts)})")
        out[f"transformer.resblocks.{idx}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


class OpenClipTextEncoder:
    """Frozen CLIP text tower (QuiltNet or PLIP) from a local path -> normalized (B, dim) features.

    ``path``: a weights file (``.safetensors``, ``.bin``, ``.pt``) or a folder holding one
    (e.g. a downloaded Hugging Face repository), or a repository id (``vinid/plip``) already
    in the local Hugging Face cache (see :func:`resolve_weights_path`). The format is detected from the keys:
    open_clip (QuiltNet) or transformers CLIP (PLIP, mapped with :func:`plip_to_open_clip`).
    ``arch``: the open_clip architecture (both PLIP and QuiltNet-B-32 are
    ``ViT-B-32-quickgelu``). Not an ``nn.Module``: its weights are frozen and stay out of
    the owning model's checkpoints (store ``path`` and ``arch`` instead). Features of
    repeated prompts are cached.
    """

    def __init__(self, path: str | Path, arch: str = "ViT-B-32-quickgelu", device: str | torch.device = "cpu") -> None:
        self.path, self.arch = resolve_weights_path(path), arch
        file = _weights_file(self.path)
        sd = _load_state_dict(file)
        if any(k.startswith("text_model.") for k in sd):
            sd = plip_to_open_clip(sd)
        if "token_embedding.weight" not in sd or "text_projection" not in sd:
            raise ValueError(
                f"text encoder weights {file} hold no CLIP text tower (missing keys 'token_embedding.weight' / "
                f"'text_projection'); expected QuiltNet (open_clip) or PLIP (transformers CLIP) weights"
            )
        open_clip = _import_open_clip()
        model = open_clip.create_model(arch, pretrained=None)
        model.visual = None  # the image tower is never used; free its memory
        wanted = set(model.state_dict())
        missing = sorted(wanted - set(sd))
        if missing:
            raise ValueError(
                f"text encoder weights {file} do not fit open_clip {arch!r}: {len(missing)} missing keys, "
                f"e.g. {missing[:5]}; expected QuiltNet (open_clip) or PLIP (transformers CLIP) weights"
            )
        try:
            model.load_state_dict({k: sd[k] for k in wanted}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"text encoder weights {file} do not fit open_clip {arch!r}: {e}") from e
        model.eval().requires_grad_(False)
        self.model = model.to(device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.dim = int(model.text_projection.shape[1])
        self._cache: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        """Device of the text tower (features are returned there)."""
        return self.model.token_embedding.weight.device

    def to(self, device: str | torch.device) -> "OpenClipTextEncoder":
        """Move the text tower to ``device`` (in place; returns self)."""
        self.model.to(device)
        self._cache.clear()
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str] | str) -> Tensor:
        """L2-normalized text features (B, dim) of ``prompts``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            tokens = self.tokenizer(todo).to(self.device)
            feats = self.model.encode_text(tokens, normalize=True).float()
            self._cache.update(zip(todo, feats))
        return torch.stack([self._cache[p] for p in prompts])
