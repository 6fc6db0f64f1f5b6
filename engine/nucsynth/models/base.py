"""What every model family provides, and the registry that finds a family by name.

A *family* (semantic, structure, joint) is a small class that knows how to build its
network from a JSON-friendly config, compute its training loss on a batch from
:class:`nucsynth.data.dataset.SampleDataset`, and sample. The training loop
(:mod:`nucsynth.train`) and the checkpoint format (:mod:`nucsynth.checkpoint`) only talk to
this interface, so one loop and one checkpoint format serve every family.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so that `import nucsynth.models` stays cheap
    import torch

    from nucsynth.diffusion import GaussianDiffusion
    from nucsynth.layout import ClassSet

__all__ = ["ModelFamily", "gaussian_diffusion", "register_family", "one_pass_size", "get_family", "family_names", "KNOWN_FAMILY_MODULES"]

# Families shipped with the engine: name -> module that registers it when imported.
KNOWN_FAMILY_MODULES: dict[str, str] = {
    "semantic": "nucsynth.models.semantic",
    "structure": "nucsynth.models.structure",
    "joint": "nucsynth.models.joint",
    "autoencoder": "nucsynth.models.autoencoder",
}

_REGISTRY: dict[str, type["ModelFamily"]] = {}


class ModelFamily(ABC):
    """Base class of a model family.

    Subclasses set ``name`` (the registry key stored in checkpoints) and ``config_type`` (a
    config dataclass with ``to_dict`` / ``from_dict`` and a ``class_set`` field, kept in
    ``self.config``), and implement :meth:`from_preset`, :meth:`build_network`,
    :meth:`training_loss` and :meth:`preview`. ``net`` is the network used by sampling
    methods; :func:`nucsynth.checkpoint.load_checkpoint` sets it (EMA weights by default).
    """

    name: ClassVar[str] = ""
    #: the family's config dataclass (``from_dict``, ``to_dict``, ``class_set``)
    config_type: ClassVar[Any] = None
    config: Any
    #: maps requested from ``SampleDataset`` for a training batch (besides "image")
    data_maps: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.net: "torch.nn.Module | None" = None
        #: where the weights came from (a checkpoint path) and at which step; for provenance
        self.checkpoint: str | None = None
        self.step: int | None = None

    # ------------------------------------------------------------------ config
    @classmethod
    @abstractmethod
    def from_preset(cls, name: str, image_size: int, class_set: "ClassSet", **options: Any) -> "ModelFamily":
        """A fresh model of preset ``name`` (tiny / base / paper) for ``image_size`` px
        patches of ``class_set`` (what ``nucsynth train --family F --preset P`` builds)."""

    @classmethod
    def from_config_dict(cls, d: Mapping[str, Any]) -> "ModelFamily":
        """Rebuild the family (without weights) from :meth:`config_dict`'s output."""
        return cls(cls.config_type.from_dict(d))  # type: ignore[call-arg]

    def config_dict(self) -> dict[str, Any]:
        """JSON-friendly config: everything needed to rebuild the network and sampler."""
        return self.config.to_dict()

    @property
    def class_set(self) -> "ClassSet":
        """The classes of the model's training data and of the Layouts it returns."""
        return self.config.class_set

    @property
    def preset(self) -> str | None:
        """Name of the preset this config came from, if any."""
        return self.config_dict().get("preset")

    @property
    def image_size(self) -> int | None:
        """Training patch size (pixels) of this model, if fixed by its config."""
        return self.config_dict().get("image_size")

    # ------------------------------------------------------------------ training
    @abstractmethod
    def build_network(self) -> "torch.nn.Module":
        """A freshly initialized network for this config (deterministic under torch.manual_seed)."""

    @abstractmethod
    def training_loss(
        self,
        net: "torch.nn.Module",
        batch: Mapping[str, "torch.Tensor"],
        generator: "torch.Generator",
        cond_drop: float = 0.0,
    ) -> tuple["torch.Tensor", dict[str, float]]:
        """Scalar loss of one batch and a dict of extra figures to log.

        All randomness (timesteps, noise, condition dropout) must come from ``generator`` so
        that a resumed run continues exactly. ``cond_drop`` is the fraction of samples whose
        condition is replaced by the null condition (classifier-free guidance training);
        families without a droppable condition ignore it.
        """

    @abstractmethod
    def preview(
        self, net: "torch.nn.Module", batch: Mapping[str, "torch.Tensor"], seed: int = 0
    ) -> np.ndarray:
        """A quick look at what the model makes for the conditions of ``batch``:
        uint8 (B, H, W, 3) images (few sampler steps; used for the training previews)."""

    @property
    def render_size(self) -> int | None:
        """Largest canvas side (px) denoised in one network pass; larger canvases are rendered
        as overlapping windows of this size. Default: the training patch size."""
        return self.image_size

    def prepare_training(self, dataset: Any) -> None:
        """Called once by :func:`nucsynth.train.train` before the first step of a FRESH run
        (not on resume), on every rank: fit data-dependent constants that the config then
        stores (e.g. a latent model's latent scale). Default: nothing."""

    def describe(self) -> str:
        """One line for logs: family, preset and size."""
        return f"{self.name} (preset {self.preset}, image size {self.image_size})"


def gaussian_diffusion(config: Any) -> "GaussianDiffusion":
    """The Gaussian diffusion process a family config describes (fields ``schedule``,
    ``timesteps``, ``prediction``, ``learned_variance``, ``vb_weight``)."""
    from nucsynth.diffusion import GaussianDiffusion, make_betas

    return GaussianDiffusion(
        make_betas(config.schedule, config.timesteps), prediction=config.prediction,
        learned_variance=config.learned_variance, vb_weight=config.vb_weight,
    )


def one_pass_size(image_size: int, latent: Mapping[str, Any] | None = None) -> int:
    """Largest canvas side (px) a model trained on ``image_size`` px crops denoises in one
    pass (larger canvases go through overlapping windows): the crop for pixel models, the
    config's ``latent["render_size"]`` (default twice the crop) for latent ones. Works on a
    checkpoint's ``config.json`` ``model`` section too (no weights needed)."""
    if not latent:
        return int(image_size)
    return int(latent.get("render_size") or 2 * int(image_size))


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make ``cls`` findable by :func:`get_family` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"model family {cls.__qualname__} has no name")
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"model family name {cls.name!r} is already taken by {other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def get_family(name: str) -> type[ModelFamily]:
    """The family class registered as ``name`` (importing the engine's module for it if needed)."""
    if name not in _REGISTRY and name in KNOWN_FAMILY_MODULES:
        try:
            importlib.import_module(KNOWN_FAMILY_MODULES[name])
        except ModuleNotFoundError as e:
            if e.name != KNOWN_FAMILY_MODULES[name]:
                raise
    if name not in _REGISTRY:
        raise ValueError(f"unknown model family {name!r}; available: {family_names()}")
    return _REGISTRY[name]


def family_names() -> list[str]:
    """Names of the families that can be built here (shipped ones that import, plus registered)."""
    names = set(_REGISTRY)
    for name, mod in KNOWN_FAMILY_MODULES.items():
        if name in names:
            continue
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        names.add(name)
    return sorted(n for n in names if n in _REGISTRY)
