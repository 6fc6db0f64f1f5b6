"""The structure family: NuDiff stage 1 (Yu et al. 2023), unconditional nuclei structures.

A *structure* is three channels over a patch: the binary nucleus mask (scaled to [-1, 1])
and the HoVer-Net horizontal and vertical maps (already in [-1, 1]). An unconditional
diffusion model (:class:`nucsynth.nets.SpadeUNet` with ``cond_channels = 0``: plain
GroupNorm, no label input) learns their distribution; a sampled structure becomes
instances through the HoVer-Net HV watershed (:func:`nucsynth.postprocess.hv_watershed`,
with the mask channel mapped back to [0, 1] as the nucleus probability).

Stage 2 of NuDiff (structure -> image) is the semantic family conditioned on the same three
channels through SPADE (``SemanticModel.from_preset(..., condition="structure")``).

Diffusion: T = 1000 linear betas, epsilon prediction, learned variance with the
improved-DDPM hybrid loss (as the image model). NuDiff trains with AdamW, lr 1e-4, weight
decay 0.05, batch 4 (:data:`PAPER_TRAINING`; pass them to ``nucsynth train``).

Structures carry no classes: the sampled Layouts have class 0 (unknown) for every nucleus.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from nucsynth.layout import NUCLEUS_CLASSES, ClassSet, Layout
from nucsynth.models.base import ModelFamily, gaussian_diffusion, register_family
from nucsynth.postprocess import SHARP_MAP_PARAMS

__all__ = ["StructureConfig", "StructureModel", "PAPER_TRAINING", "structure_from_layout", "layout_from_structure"]

PRESETS = ("tiny", "base", "paper")
SAMPLERS = ("dpm++2m", "ddim", "ancestral")
CHANNELS = 3  # mask, H, V

# Sampled structures are sharp (a near-binary mask, exact-looking HV ramps), unlike a
# segmenter's smooth predictions for which HoVer-Net's defaults are tuned: with those
# (21 px Sobel, 5 px opening) neighbouring nuclei merge on small canvases. Measured on true
# structures of 32 px CoNSeP crops: median area 198 px (defaults) / 117 px (these) against
# 86 px, and 36 / 55 of 71 nuclei kept.
_SAMPLED_WATERSHED: dict[str, Any] = dict(SHARP_MAP_PARAMS)

#: NuDiff's stage-1 optimisation (Yu et al. 2023): the options to give ``nucsynth train``.
PAPER_TRAINING: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.05, "batch_size": 4, "steps": 200_000}


def structure_from_layout(layout: Layout) -> np.ndarray:
    """float32 (3, H, W): mask in {-1, 1}, then the H and V maps of ``layout``."""
    mask = (layout.inst_map > 0).astype(np.float32)[None] * 2.0 - 1.0
    return np.concatenate([mask, layout.hv_maps()], axis=0)


def layout_from_structure(
    structure: np.ndarray, class_set: ClassSet = NUCLEUS_CLASSES, **watershed: Any
) -> Layout:
    """Instances of one structure (3, H, W) by the HV watershed; ``watershed`` overrides the
    parameters of :func:`nucsynth.postprocess.hv_watershed` (threshold, sobel_ksize, ...)."""
    from nucsynth.postprocess import hv_watershed

    s = np.asarray(structure, dtype=np.float64)
    if s.ndim != 3 or s.shape[0] != CHANNELS:
        raise ValueError(f"a structure must have shape (3, H, W) (mask, H, V), got {s.shape}")
    prob = np.clip((s[0] + 1.0) / 2.0, 0.0, 1.0)  # mask channel: [-1, 1] -> probability
    return hv_watershed(prob, np.clip(s[1:], -1.0, 1.0), class_set=class_set, **watershed)


@dataclass
class StructureConfig:
    """Everything needed to rebuild a structure model: preset, network, diffusion, watershed.

    ``class_set`` is the class set of the Layouts it returns (nuclei get class 0);
    ``watershed`` holds the parameters given to :func:`nucsynth.postprocess.hv_watershed`
    (default: ``SHARP_MAP_PARAMS``, for sharp sampled maps; ``{}`` = the reference defaults).
    """

    preset: str
    image_size: int
    class_set: ClassSet
    network: dict[str, Any]
    schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "eps"
    learned_variance: bool = True
    vb_weight: float = 0.001
    watershed: dict[str, Any] = field(default_factory=lambda: dict(_SAMPLED_WATERSHED))

    @classmethod
    def from_preset(
        cls, name: str = "tiny", image_size: int = 64, class_set: ClassSet = NUCLEUS_CLASSES, **overrides: Any
    ) -> "StructureConfig":
        """Preset ``tiny`` (CPU), ``base`` (default GPU model) or ``paper`` (reference U-Net
        scale) for ``image_size`` px structures; keyword overrides for the other fields."""
        from nucsynth.nets import unet_preset

        if name not in PRESETS:
            raise ValueError(f"unknown structure preset {name!r}; choose one of {list(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown structure config option(s) {sorted(unknown)}")
        learned = bool(overrides.get("learned_variance", True))
        net = unet_preset(name, image_size, in_channels=CHANNELS, out_channels=2 * CHANNELS if learned else CHANNELS,
                          cond_channels=0)
        kw: dict[str, Any] = {"preset": name, "image_size": image_size, "class_set": class_set, "network": net.to_dict()}
        kw.update(overrides)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError on inconsistent fields."""
        from nucsynth.postprocess import hv_watershed
        import inspect

        out = self.network.get("out_channels")
        want = 2 * CHANNELS if self.learned_variance else CHANNELS
        if out != want:
            raise ValueError(f"structure network has {out} output channels; expected {want} "
                             f"(learned_variance={self.learned_variance})")
        if self.network.get("cond_channels", 0) != 0 or self.network.get("in_channels") != CHANNELS:
            raise ValueError("the structure network must take 3 input channels and no condition (cond_channels=0)")
        known = set(inspect.signature(hv_watershed).parameters) - {"prob", "hv", "type_probs", "class_set"}
        bad = set(self.watershed) - known
        if bad:
            raise ValueError(f"unknown watershed parameter(s) {sorted(bad)}; known: {sorted(known)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (stored in checkpoints under ``"model"``)."""
        return {
            "preset": self.preset,
            "image_size": self.image_size,
            "class_set": self.class_set.to_dict(),
            "network": dict(self.network),
            "diffusion": {
                "schedule": self.schedule,
                "timesteps": self.timesteps,
                "prediction": self.prediction,
                "learned_variance": self.learned_variance,
                "vb_weight": self.vb_weight,
            },
            "watershed": dict(self.watershed),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StructureConfig":
        """Inverse of :meth:`to_dict`."""
        diff = dict(d.get("diffusion", {}))
        cfg = cls(
            preset=str(d["preset"]),
            image_size=int(d["image_size"]),
            class_set=ClassSet.from_dict(d["class_set"]),
            network=dict(d["network"]),
            schedule=str(diff.get("schedule", "linear")),
            timesteps=int(diff.get("timesteps", 1000)),
            prediction=str(diff.get("prediction", "eps")),
            learned_variance=bool(diff.get("learned_variance", True)),
            vb_weight=float(diff.get("vb_weight", 0.001)),
            watershed=dict(d.get("watershed", {})),
        )
        cfg.validate()
        return cfg


@register_family
class StructureModel(ModelFamily):
    """Unconditional diffusion over (mask, H, V) structures -> Layouts (NuDiff stage 1)."""

    name = "structure"
    config_type = StructureConfig
    data_maps = ("mask", "hv")
    log_keys = ("mse", "vb")

    def __init__(self, config: StructureConfig | None = None) -> None:
        super().__init__()
        self.config = config or StructureConfig.from_preset("tiny")
        self.diffusion = gaussian_diffusion(self.config)

    @classmethod
    def from_preset(
        cls, name: str = "tiny", image_size: int = 64, class_set: ClassSet = NUCLEUS_CLASSES, **kw: Any
    ) -> "StructureModel":
        """A fresh (untrained) model; see :meth:`StructureConfig.from_preset`. Structures
        are class-free, so any ``class_set`` only names the class set of the output Layouts."""
        return cls(StructureConfig.from_preset(name, image_size, class_set, **kw))

    def build_network(self) -> torch.nn.Module:
        from nucsynth.nets import SpadeUNet, UNetConfig

        return SpadeUNet(UNetConfig.from_dict(self.config.network))

    # ------------------------------------------------------------------ training
    @staticmethod
    def batch_structure(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W) structures of a ``SampleDataset`` batch with maps "mask" and "hv"."""
        for key in ("mask", "hv"):
            if key not in batch:
                raise ValueError(f"a structure batch needs the {key!r} map (SampleDataset maps=('mask', 'hv'))")
        return torch.cat([batch["mask"] * 2.0 - 1.0, batch["hv"]], dim=1)

    def training_loss(self, net, batch, generator, cond_drop=0.0):
        """Hybrid loss at uniformly random timesteps (no condition: ``cond_drop`` is unused)."""
        x0 = self.batch_structure(batch).float()
        b, dev = x0.shape[0], x0.device
        t = self.diffusion.sample_t(b, generator, dev)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(dev)
        xt = self.diffusion.q_sample(x0, t, noise)
        out = net(xt, self.diffusion.model_timesteps(t)).float()
        terms = self.diffusion.training_losses(out, x0, xt, t, noise)
        return terms["loss"], {"mse": float(terms["mse"].detach()), "vb": float(terms["vb"].detach())}

    def preview(self, net, batch, seed=0):
        """As many structures as the batch holds (10 solver steps), drawn as instance maps."""
        from nucsynth.viz import layout_rgb

        x = batch["mask"]
        structs = self._sample_tensor(net, x.shape[0], (x.shape[-2], x.shape[-1]), 10, seed, "dpm++2m", None)
        return np.stack([layout_rgb(self.to_layout(s)) for s in structs.cpu().numpy()])

    # ------------------------------------------------------------------ sampling
    def _sample_tensor(
        self, net: torch.nn.Module, count: int, size: tuple[int, int], steps: int, seed: int | Sequence[int], sampler: str,
        progress: Callable[[int, int], None] | None,
    ) -> torch.Tensor:
        from nucsynth.diffusion import sample
        from nucsynth.diffusion.noise import exact_rows, generators, row_seeds
        from nucsynth.diffusion.windows import windowed

        dev = next(net.parameters()).device
        amp = dev.type == "cuda"

        def net_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                return net(x, t).float()

        was_training = net.training
        net.eval()
        gen = generators(row_seeds(seed, count), dev)  # structure i gets seed + i, alone or in a batch
        try:
            with torch.no_grad():
                # a canvas larger than the training size: overlapping windows of it, denoised together
                model_fn = exact_rows(windowed(net_fn, self.config.image_size), dev)
                return sample(self.diffusion, model_fn, (count, CHANNELS, *size), steps, method=sampler,
                              generator=gen, progress=progress, device=dev)
        finally:
            net.train(was_training)

    def _check_size(self, size: int | tuple[int, int] | None) -> tuple[int, int]:
        if size is None:
            size = self.config.image_size
        hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(v) for v in size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"size must be an int or (H, W), got {size!r}")
        f = 2 ** (len(self.config.network["channel_mult"]) - 1)
        if hw[0] % f or hw[1] % f:
            raise ValueError(f"size {hw} must be a multiple of {f} on both sides for this network")
        return hw  # type: ignore[return-value]

    def sample_structures(
        self,
        count: int,
        size: int | tuple[int, int] | None = None,
        steps: int = 50,
        seed: int | Sequence[int] = 0,
        sampler: str = "dpm++2m",
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """``count`` raw structures float32 (count, 3, H, W) (mask, H, V in about [-1, 1]),
        drawn in one batch; structure i has seed ``seed + i`` (the same alone or in a
        batch). Same seed + arguments + device -> same structures."""
        if self.net is None:
            raise ValueError("this model has no network loaded: use nucsynth.checkpoint.load_checkpoint")
        if int(count) < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        hw = self._check_size(size)
        x = self._sample_tensor(self.net, int(count), hw, int(steps), seed, sampler, progress)
        return x.float().cpu().numpy()

    def to_layout(self, structure: np.ndarray) -> Layout:
        """One structure (3, H, W) -> Layout by the HV watershed (this model's parameters)."""
        return layout_from_structure(structure, self.class_set, **self.config.watershed)

    def sample(
        self,
        count: int,
        size: int | tuple[int, int] | None = None,
        steps: int = 50,
        seed: int | Sequence[int] = 0,
        progress: Callable[[int, int], None] | None = None,
        sampler: str = "dpm++2m",
    ) -> list[Layout]:
        """``count`` new Layouts (size ``size``, default the training size): structures by
        ``steps`` solver steps, then the HV watershed. Nuclei have class 0 (unknown).
        ``progress(i, n)`` after each step; raise in it to cancel."""
        structs = self.sample_structures(count, size, steps, seed, sampler, progress)
        return [self.to_layout(s) for s in structs]
