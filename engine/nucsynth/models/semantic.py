"""The semantic-label family: SDM (Wang et al. 2022), NASDM (Shrivastava & Fletcher 2023)
and DiffMix (Oh & Jeong 2023) rendering.

The network is :class:`nucsynth.nets.SpadeUNet`: the noisy image goes through the encoder,
the label map enters the middle and decoder blocks through SPADE. The condition of a
:class:`~nucsynth.layout.Layout` is its one-hot class channels (background included) plus
one instance-edge channel, so touching nuclei stay separate; the null condition of
classifier-free guidance is an all-zero map. Diffusion: T = 1000 linear betas, epsilon
prediction, learned variance trained with the improved-DDPM hybrid loss.

DiffMix renders an edited label map by partially noising the REAL image of the patch
(``init_image`` + ``strength``, 0.55 in the paper) and denoising under the edited map.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nucsynth.diffusion.noise import row_seeds
from nucsynth.layout import CONSEP_CLASSES, ClassSet, Layout, Sample
from nucsynth.models.base import ModelFamily, gaussian_diffusion, one_pass_size, register_family

__all__ = ["SemanticConfig", "SemanticModel", "to_uint8", "latent_unet_config"]

PRESETS = ("tiny", "base", "paper")
SAMPLERS = ("dpm++2m", "ddim", "ancestral")
# The family's guidance when a checkpoint records none: SDM's s = 1.5 (Wang et al. 2022).
DEFAULT_GUIDANCE = 0.5


def latent_unet_config(name: str, latent_size: int, channels: int, learned_variance: bool, cond_channels: int) -> dict[str, Any]:
    """U-Net config (dict) of a latent model of preset ``name`` on (latent_size) latents.

    - ``tiny``: widths 32/64/64, one res-block per level, convolutional down/up-sampling,
      attention at 1/4 of the latent only (about 1.9 M parameters; the CPU preset, sized so
      a guided 20-step 256 px render costs a small fraction of the pixel ``tiny``'s; see
      docs/models.md);
    - ``base``: widths 128/256/384/512, two res-blocks, attention at 1/2, 1/4, 1/8 (GPU);
    - ``paper``: LDM-4's scale (224 base channels, multipliers 1, 2, 3, 4).
    """
    from nucsynth.nets import UNetConfig

    # name: (base width, multipliers, res-blocks, head width, SPADE hidden, first attended level, res-block up/down)
    table = {
        "tiny": (32, (1, 2, 2), 1, 32, 32, 2, False),
        "base": (128, (1, 2, 3, 4), 2, 64, 64, 1, True),
        "paper": (224, (1, 2, 3, 4), 2, 32, 128, 1, True),
    }
    if name not in table:
        raise ValueError(f"unknown semantic preset {name!r}; choose one of {list(PRESETS)}")
    mc, mult, blocks, head, spade, first_attn, updown = table[name]
    factor = 2 ** (len(mult) - 1)
    if latent_size % factor:
        raise ValueError(f"latent size {latent_size} must be a multiple of {factor} for the {name!r} latent network")
    levels = [latent_size // 2**i for i in range(len(mult))]
    attn = tuple(r for r in levels[first_attn:] if r >= 4)
    return UNetConfig(
        image_size=latent_size, in_channels=channels, out_channels=2 * channels if learned_variance else channels,
        cond_channels=cond_channels, model_channels=mc, channel_mult=mult, num_res_blocks=blocks,
        attention_resolutions=attn, head_channels=head, spade_hidden=spade, resblock_updown=updown,
    ).to_dict()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model output (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3).

    Values are rounded to the nearest level; samplers can overshoot [-1, 1] slightly, so the
    MODEL OUTPUT range is clamped here (this never touches user data).
    """
    y = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return y.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class SemanticConfig:
    """Everything needed to rebuild a semantic model: preset, classes, network, diffusion.

    Build one with :meth:`preset`; ``network`` is a ``UNetConfig`` dict (see
    :func:`nucsynth.nets.unet_preset`).
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
    edges: bool = True
    #: "layout": one-hot classes + edges (SDM/NASDM/DiffMix); "structure": NuDiff stage 2,
    #: the 3 structure channels (mask in [-1, 1], H, V) of nucsynth.models.structure
    condition: str = "layout"
    #: latent diffusion (LDM): None = pixel space; else the autoencoder's record:
    #: {"autoencoder": path as given, "autoencoder_hash": sha256, "factor": f, "channels": z,
    #:  "label_aware": bool, "scale": 1 / std of the training latents (None until fitted)}
    latent: dict[str, Any] | None = None
    #: classifier-free guidance scale that :meth:`SemanticModel.sample` uses when none is
    #: given (engine convention; 0.5 = SDM's 1.5). A model may record the value measured
    #: best for it at export (:func:`nucsynth.checkpoint.export_checkpoint`): the shipped
    #: one renders most like real tissue unguided (docs/models.md).
    guidance: float = DEFAULT_GUIDANCE

    @property
    def latent_factor(self) -> int:
        """Pixels per diffusion position along each side: the autoencoder's f, 1 in pixel space."""
        return int(self.latent["factor"]) if self.latent else 1

    @property
    def cond_channels(self) -> int:
        """One-hot classes with background (K + 1), plus the edge channel; or 3 (structure)."""
        if self.condition == "structure":
            return 3
        return self.class_set.num_classes + 1 + int(self.edges)

    @classmethod
    def from_preset(
        cls,
        name: str = "tiny",
        image_size: int = 64,
        class_set: ClassSet = CONSEP_CLASSES,
        **overrides: Any,
    ) -> "SemanticConfig":
        """The config of preset ``tiny`` (CPU), ``base`` (default GPU model) or ``paper``
        (SDM reference scale) for ``image_size`` px patches; keyword overrides for the
        diffusion fields (``learned_variance``, ``prediction``, ``schedule``, ``edges``...)."""
        from nucsynth.nets import unet_preset

        if name not in PRESETS:
            raise ValueError(f"unknown semantic preset {name!r}; choose one of {list(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)} - {"network"}
        if unknown:
            raise ValueError(f"unknown semantic config option(s) {sorted(unknown)}")
        edges = bool(overrides.get("edges", True))
        condition = str(overrides.get("condition", "layout"))
        if condition not in ("layout", "structure"):
            raise ValueError(f"semantic condition must be 'layout' or 'structure', got {condition!r}")
        learned = bool(overrides.get("learned_variance", True))
        net = unet_preset(
            name,
            image_size,
            in_channels=3,
            out_channels=6 if learned else 3,
            cond_channels=3 if condition == "structure" else class_set.num_classes + 1 + int(edges),
        )
        kw = {"preset": name, "image_size": image_size, "class_set": class_set, "network": net.to_dict()}
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def latent_preset(
        cls,
        name: str,
        image_size: int,
        class_set: ClassSet,
        autoencoder: "str | Path",
        **overrides: Any,
    ) -> "SemanticConfig":
        """A LATENT model (LDM) of preset ``name`` in the space of the trained ``autoencoder``
        (a checkpoint or run folder of the autoencoder family). ``image_size`` is in image
        pixels; the U-Net runs on (image_size / f) latents. Defaults differ from pixel space
        where measurements favoured it: v-prediction, fixed variance (DPM-Solver++ ignores a
        learned one). The latent scale is fitted on the training data when training starts."""
        from nucsynth.models.autoencoder import load_autoencoder, weights_hash

        ae, _ = load_autoencoder([Path(autoencoder)], None)
        f, z = ae.factor, ae.latent_channels
        if image_size % (f * 4):
            raise ValueError(f"latent model: --image-size {image_size} must be a multiple of {4 * f} (autoencoder f = {f})")
        if ae.config.label_aware and ae.class_set.names != class_set.names:
            raise ValueError(f"the label-aware autoencoder {autoencoder} was trained on classes {ae.class_set.names}, "
                             f"the data has {class_set.names}")
        unknown = set(overrides) - {f_.name for f_ in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown semantic config option(s) {sorted(unknown)}")
        condition = str(overrides.get("condition", "layout"))
        if condition not in ("layout", "structure"):
            raise ValueError(f"semantic condition must be 'layout' or 'structure', got {condition!r}")
        if condition == "structure" and ae.config.label_aware:
            raise ValueError("a latent NuDiff stage-2 model (condition 'structure') needs an autoencoder whose decoder "
                             "does not take the layout: train one without --label-aware")
        learned = bool(overrides.pop("learned_variance", False))
        edges = bool(overrides.get("edges", True))
        cond_ch = 3 if condition == "structure" else class_set.num_classes + 1 + int(edges)
        net = latent_unet_config(name, image_size // f, z, learned, cond_ch)
        from nucsynth.checkpoint import find_checkpoint

        ae_ckpt = find_checkpoint(autoencoder)  # a run folder's newest checkpoint, recorded as such
        latent = {"autoencoder": str(ae_ckpt), "autoencoder_hash": weights_hash(ae_ckpt), "factor": f,
                  "channels": z, "label_aware": bool(ae.config.label_aware), "scale": None}
        kw: dict[str, Any] = {"preset": name, "image_size": image_size, "class_set": class_set, "network": net,
                              "prediction": "v", "learned_variance": learned, "latent": latent}
        kw.update(overrides)
        return cls(**kw)

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
            "edges": self.edges,
            "condition": self.condition,
            "latent": None if self.latent is None else dict(self.latent),
            "sampling": {"guidance": self.guidance},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SemanticConfig":
        """Inverse of :meth:`to_dict`."""
        diff = dict(d.get("diffusion", {}))
        return cls(
            preset=str(d["preset"]),
            image_size=int(d["image_size"]),
            class_set=ClassSet.from_dict(d["class_set"]),
            network=dict(d["network"]),
            schedule=str(diff.get("schedule", "linear")),
            timesteps=int(diff.get("timesteps", 1000)),
            prediction=str(diff.get("prediction", "eps")),
            learned_variance=bool(diff.get("learned_variance", True)),
            vb_weight=float(diff.get("vb_weight", 0.001)),
            edges=bool(d.get("edges", True)),
            condition=str(d.get("condition", "layout")),
            latent=None if d.get("latent") is None else dict(d["latent"]),
            guidance=float(dict(d.get("sampling") or {}).get("guidance", DEFAULT_GUIDANCE)),
        )


def _images_tensor(images: Any, n: int, shape: tuple[int, int]) -> torch.Tensor:
    """uint8 image(s) (H, W, 3), (B, H, W, 3) or a list -> float (B, 3, H, W) in [-1, 1]."""
    arrs = [np.asarray(a) for a in images] if isinstance(images, (list, tuple)) else list(np.asarray(images)[None] if np.ndim(images) == 3 else np.asarray(images))
    if len(arrs) == 1 and n > 1:
        arrs = arrs * n
    if len(arrs) != n:
        raise ValueError(f"init_image: got {len(arrs)} images for {n} layouts")
    for a in arrs:
        if a.dtype != np.uint8 or a.shape != (*shape, 3):
            raise ValueError(f"init_image must be uint8 (H, W, 3) matching the layout {shape}; got {a.dtype} {a.shape}")
    t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def _mask_tensor(mask: Any, n: int, shape: tuple[int, int], what: str = "mask") -> torch.Tensor:
    """Mask(s) (H, W), (B, H, W) or a list, 1 = regenerate -> float (B, 1, H, W); ``what``
    names the argument in errors."""
    arrs = [np.asarray(m) for m in mask] if isinstance(mask, (list, tuple)) else list(np.asarray(mask)[None] if np.ndim(mask) == 2 else np.asarray(mask))
    if len(arrs) == 1 and n > 1:
        arrs = arrs * n
    if len(arrs) != n or any(a.shape != shape for a in arrs):
        raise ValueError(f"{what} must be (H, W) = {shape} (one, or one per layout); got {[a.shape for a in arrs]}")
    m = np.stack(arrs).astype(np.float32)
    if m.size and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"{what} values must lie in [0, 1] (1 = regenerate, 0 = keep)")
    return torch.from_numpy(m)[:, None]


def _feathered_blend(image: torch.Tensor, init: torch.Tensor, mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """``image`` inside ``mask`` (B, 1, H, W; 1 = regenerated), ``init`` outside, with a
    ``radius`` px linear ramp just outside the mask so the seam does not show."""
    grown = mask
    weight = mask.clone()
    for r in range(1, radius + 1):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        weight = torch.maximum(weight, grown * (1.0 - r / (radius + 1)))
    return weight * image + (1.0 - weight) * init


@register_family
class SemanticModel(ModelFamily):
    """Label map -> H&E image (SDM / NASDM / DiffMix). See the module docstring."""

    name = "semantic"
    config_type = SemanticConfig
    log_keys = ("mse", "vb")

    def __init__(self, config: SemanticConfig | None = None) -> None:
        super().__init__()
        self.config = config or SemanticConfig.from_preset("tiny")
        self.diffusion = gaussian_diffusion(self.config)
        self._autoencoder: Any = None  # AutoencoderModel of a latent model, loaded on first use

    @classmethod
    def from_preset(cls, name: str = "tiny", image_size: int = 64, class_set: ClassSet = CONSEP_CLASSES,
                    autoencoder: "str | Path | None" = None, **kw: Any) -> "SemanticModel":
        """A fresh (untrained) model of preset ``name``; see :meth:`SemanticConfig.from_preset`,
        or with ``autoencoder`` a latent model (:meth:`SemanticConfig.latent_preset`)."""
        if autoencoder is not None:
            return cls(SemanticConfig.latent_preset(name, image_size, class_set, autoencoder, **kw))
        return cls(SemanticConfig.from_preset(name, image_size, class_set, **kw))

    # ------------------------------------------------------------------ latent space
    @property
    def render_size(self) -> int:
        """Largest canvas side (px) denoised in one pass. Pixel models: the training crop.
        Latent models: ``latent["render_size"]``, by default twice the training crop (a
        latent U-Net trained on 32 x 32 latents denoises 64 x 64 latents in one pass without
        visible loss (docs/models.md), and windows would cost about twice as much)."""
        return one_pass_size(self.config.image_size, self.config.latent if self.is_latent else None)

    @property
    def is_latent(self) -> bool:
        """True for a latent-diffusion model (the U-Net denoises autoencoder latents)."""
        return self.config.latent is not None

    def autoencoder_candidates(self) -> list[Path]:
        """Where this latent model's autoencoder is looked for, in order: ``autoencoder/``
        inside the model's checkpoint folder (a bundled pair), then the recorded path (relative
        paths from the checkpoint folder, then from the working directory)."""
        rec = Path(self.config.latent["autoencoder"])
        places = []
        if self.checkpoint:
            places += [Path(self.checkpoint) / "autoencoder"]
            if not rec.is_absolute():
                places.append(Path(self.checkpoint) / rec)
        places.append(rec)
        return list(dict.fromkeys(places))

    def autoencoder(self, device: "torch.device | str" = "cpu") -> torch.nn.Module:
        """The frozen autoencoder network on ``device`` (loaded once, checked by content hash).

        Raises FileNotFoundError naming the places looked at, ValueError for another
        autoencoder than the one this model was trained with."""
        if not self.is_latent:
            raise ValueError("this is a pixel-space model: it has no autoencoder")
        if self._autoencoder is None:
            from nucsynth.models.autoencoder import load_autoencoder

            self._autoencoder, _ = load_autoencoder(self.autoencoder_candidates(), self.config.latent["autoencoder_hash"])
        net = self._autoencoder.net
        if next(net.parameters()).device != torch.device(device):
            net.to(device)
        return net.eval().requires_grad_(False)

    def _latent_scale(self) -> float:
        scale = self.config.latent.get("scale")
        if scale is None:
            raise ValueError("the latent scale of this model was never fitted (it is fitted when training starts)")
        return float(scale)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, z, H/f, W/f) (posterior mean
        times the unit-variance scale)."""
        net = self.autoencoder(images.device)
        with torch.no_grad():
            mean, _ = net.encode(images.float())
        return mean * self._latent_scale()

    def decode_latents(self, z: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Scaled latents (B, z, h, w) -> images (B, 3, h*f, w*f) in [-1, 1]; ``cond`` is the
        full-resolution condition map a label-aware decoder draws nucleus boundaries from."""
        net = self.autoencoder(z.device)
        with torch.no_grad():
            x = net.decode(z.float() / self._latent_scale(), cond.float() if self.config.latent["label_aware"] else None)
        return x.clamp(-1.0, 1.0)

    def latent_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition maps at image resolution -> at latent resolution by area averaging (soft
        class fractions and edge density per latent position: a nucleus smaller than f px
        is not lost, as it would be by nearest-neighbour resizing)."""
        f = self.config.latent_factor
        return F.avg_pool2d(cond.float(), f) if f > 1 else cond

    def prepare_training(self, dataset: Any) -> None:
        """Fit the latent scale (1 / std of the training latents; LDM) on up to 64 items of
        ``dataset`` before a fresh training run; no-op in pixel space or when fitted."""
        if not self.is_latent or self.config.latent.get("scale") is not None:
            return
        n = min(64, len(dataset))
        items = [dataset[i] for i in range(n)]
        if all("latent" in it for it in items):  # nucsynth.data.latents.LatentDataset
            means = torch.stack([it["latent"] for it in items])
        else:
            images = torch.stack([it["image"] for it in items])
            net = self.autoencoder("cpu")
            with torch.no_grad():
                means = torch.cat([net.encode(images[i : i + 16].float())[0] for i in range(0, n, 16)])
        self.config.latent["scale"] = float(1.0 / means.std().clamp_min(1e-6))

    # ------------------------------------------------------------------ ModelFamily
    @property
    def data_maps(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.config.condition == "structure":
            return ("mask", "hv")
        return ("onehot", "edge") if self.config.edges else ("onehot",)

    def build_network(self) -> torch.nn.Module:
        from nucsynth.nets import SpadeUNet, UNetConfig

        return SpadeUNet(UNetConfig.from_dict(self.config.network))

    def batch_condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The condition map (B, K+2, H, W) of a ``SampleDataset`` batch (structure: (B, 3, H, W))."""
        if self.config.condition == "structure":
            from nucsynth.models.structure import StructureModel

            return StructureModel.batch_structure(batch)
        parts = [batch["onehot"]] + ([batch["edge"]] if self.config.edges else [])
        cond = torch.cat(parts, dim=1)
        if cond.shape[1] != self.config.cond_channels:
            raise ValueError(
                f"batch condition has {cond.shape[1]} channels; the model expects {self.config.cond_channels} "
                f"(class set {self.class_set.name!r}: {self.class_set.num_classes} classes + background + edge)"
            )
        return cond

    def condition(self, layouts: Sequence[Layout]) -> torch.Tensor:
        """The condition maps (B, K+2, H, W) of Layouts (one-hot classes + instance edges),
        or (B, 3, H, W) structures (mask, H, V) with ``condition="structure"``."""
        if self.config.condition == "structure":  # class-free: any class set
            from nucsynth.models.structure import structure_from_layout

            return torch.from_numpy(np.stack([structure_from_layout(lay) for lay in layouts]))
        maps = []
        for lay in layouts:
            lay = lay.to_class_set(self.class_set)  # matched by class name; other classes are refused
            parts = [lay.onehot()] + ([lay.edge_map()[None]] if self.config.edges else [])
            maps.append(np.concatenate(parts, axis=0))
        return torch.from_numpy(np.stack(maps))

    def training_loss(self, net, batch, generator, cond_drop=0.0):
        """Hybrid loss at uniformly random timesteps; ``cond_drop`` of the samples get the
        null (all-zero) condition (classifier-free guidance training)."""
        x0 = batch["image"]
        cond = self.batch_condition(batch).to(x0.dtype)
        if self.is_latent:  # precomputed latents (nucsynth.data.latents) or encode now
            lat = batch["latent"] * self._latent_scale() if "latent" in batch else self.encode_images(x0)
            x0 = lat.to(x0.dtype)
            cond = self.latent_condition(cond).to(x0.dtype)
        b, dev = x0.shape[0], x0.device
        if cond_drop > 0:
            keep = torch.rand(b, generator=generator, device=generator.device).to(dev) >= cond_drop
            cond = cond * keep[:, None, None, None].to(cond.dtype)
        t = self.diffusion.sample_t(b, generator, dev)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(dev)
        xt = self.diffusion.q_sample(x0, t, noise)
        out = net(xt, self.diffusion.model_timesteps(t), cond).float()
        terms = self.diffusion.training_losses(out, x0, xt, t, noise)
        return terms["loss"], {"mse": float(terms["mse"].detach()), "vb": float(terms["vb"].detach())}

    def preview(self, net, batch, seed=0):
        """Samples for the batch's label maps: 10 DPM-Solver++ steps, no guidance."""
        cond = self.batch_condition(batch)
        return to_uint8(self.sample_tensor(net, cond, steps=10, guidance=0.0, seed=seed, sampler="dpm++2m"))

    # ------------------------------------------------------------------ sampling
    def sample_tensor(
        self,
        net: torch.nn.Module,
        cond: torch.Tensor,
        steps: int,
        guidance: float,
        seed: int | Sequence[int],
        sampler: str,
        init_image: torch.Tensor | None = None,
        strength: float | None = None,
        mask: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
        fresh: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] for condition maps ``cond`` (B, K+2, H, W) with
        ``net`` (e.g. the all-zero null condition); :meth:`sample` wraps it for Layouts.
        ``seed``: int s (sample i gets seed s + i) or one seed per sample; each sample has
        its own generator, so it comes out the same alone or in any batch.

        A latent model encodes ``init_image``, denoises latents under the area-averaged
        condition (a latent position is regenerated where any of its f x f pixels is in
        ``mask``; likewise for ``fresh``), decodes (label-aware decoders see the
        full-resolution ``cond``) and, with a mask, blends into ``init_image`` in pixel space
        with a 2 px feathered seam (kept pixels unchanged)."""
        if not self.is_latent:
            return self._denoise(net, cond, steps, guidance, seed, sampler, init_image, strength, mask, progress, fresh)
        dev = next(net.parameters()).device
        cond = cond.to(dev).float()
        f = self.config.latent_factor
        init_z = None if init_image is None else self.encode_images(init_image.to(dev))
        mask_z = None if mask is None else F.max_pool2d(mask.to(dev).float(), f)
        fresh_z = None if fresh is None else F.max_pool2d(fresh.to(dev).float(), f)
        z = self._denoise(net, self.latent_condition(cond), steps, guidance, seed, sampler, init_z, strength, mask_z,
                          progress, fresh_z)
        image = self.decode_latents(z, cond)
        if mask is not None:
            image = _feathered_blend(image, init_image.to(dev).float(), mask.to(dev).float())
        return image

    def _denoise(
        self,
        net: torch.nn.Module,
        cond: torch.Tensor,
        steps: int,
        guidance: float,
        seed: int | Sequence[int],
        sampler: str,
        init_image: torch.Tensor | None = None,
        strength: float | None = None,
        mask: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
        fresh: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The diffusion state (B, C, h, w) denoised under ``cond`` at the state's resolution:
        images in pixel space (C = 3), scaled latents in latent space (C = z, not clipped)."""
        from nucsynth.diffusion import guided, sample
        from nucsynth.diffusion.noise import generators, row_seeds, rows_alone
        from nucsynth.diffusion.windows import windowed
        from nucsynth.nets.blocks import ConditionCache

        dev = next(net.parameters()).device
        cond = cond.to(dev)
        was_training = net.training
        net.eval()
        amp = dev.type == "cuda"

        features = ConditionCache()  # SPADE's gamma/beta: once per distinct condition of this render

        def net_fn(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                return net(x, t, features(c)).float()

        gen = generators(row_seeds(seed, cond.shape[0]), dev)
        channels = int(self.config.latent["channels"]) if self.is_latent else 3
        # a canvas larger than the training size is denoised as overlapping windows of it
        net_fn = windowed(net_fn, self.render_size // self.config.latent_factor)
        model_fn = guided(net_fn, cond, torch.zeros_like(cond[:1]), float(guidance), eps_channels=channels,
                          per_sample=rows_alone(dev))
        shape = (cond.shape[0], channels, cond.shape[2], cond.shape[3])
        try:
            with torch.no_grad():
                return sample(
                    self.diffusion, model_fn, shape, steps, method=sampler, generator=gen,
                    init_image=None if init_image is None else init_image.to(dev),
                    strength=strength, mask=None if mask is None else mask.to(dev),
                    progress=progress, device=dev, clip_x0=not self.is_latent,
                    fresh=None if fresh is None else fresh.to(dev),
                )
        finally:
            net.train(was_training)

    def sample(
        self,
        layouts: Layout | Sequence[Layout],
        steps: int = 20,
        guidance: float | None = None,
        seed: int | Sequence[int] = 0,
        sampler: str = "dpm++2m",
        init_image: Any = None,
        strength: float | None = None,
        mask: Any = None,
        progress: Callable[[int, int], None] | None = None,
        fresh: Any = None,
    ) -> list[Sample]:
        """Render one image per Layout; returns Samples with provenance.

        All layouts are rendered in ONE batch (they must share one canvas size, a multiple
        of the network's down-sampling factor). ``guidance``: classifier-free guidance scale
        in the engine's convention eps_c + s (eps_c - eps_u) (0 = conditional model only,
        one network pass; SDM/DiffMix's s = 1.5 is 0.5 here), computed in one batched pass;
        None = the model's recorded default (``config.guidance``).
        ``sampler``: ``"dpm++2m"`` (good at 10-25 steps), ``"ddim"`` or ``"ancestral"``.
        ``init_image`` (uint8 (H, W, 3), one or one per layout) with ``strength`` in [0, 1]:
        partial noising of that image, then denoising under the layout (DiffMix / SDEdit);
        with ``mask`` (1 = regenerate): only the masked region changes; with ``fresh``
        ((H, W) per layout, 1 = start from pure noise): those pixels keep nothing of the
        image, e.g. the nuclei a DiffMix edit changed (:func:`nucsynth.diffusion.sample`).
        ``progress(i, n)``
        after each step; raise in it to cancel. ``seed``: int s (layout i gets seed s + i)
        or one per layout; a layout rendered alone with its seed gives the pixels it got in
        a batch (on CPU; see :mod:`nucsynth.diffusion.noise`). Same seed + inputs + device
        -> same images.
        """
        if self.net is None:
            raise ValueError("this model has no network loaded: use nucsynth.checkpoint.load_checkpoint")
        lays = [layouts] if isinstance(layouts, Layout) else list(layouts)
        if not lays:
            raise ValueError("sample() needs at least one layout")
        shape = lays[0].shape
        if any(l.shape != shape for l in lays):
            raise ValueError(f"all layouts of one call must share a canvas size; got {sorted({l.shape for l in lays})}")
        f = 2 ** (len(self.config.network["channel_mult"]) - 1) * self.config.latent_factor
        if shape[0] % f or shape[1] % f:
            raise ValueError(f"layout size {shape} must be a multiple of {f} on both sides for this network")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        init = None if init_image is None else _images_tensor(init_image, len(lays), shape)
        m = None if mask is None else _mask_tensor(mask, len(lays), shape)
        fr = None if fresh is None else _mask_tensor(fresh, len(lays), shape, "fresh")
        if init is None and (strength is not None or m is not None or fr is not None):
            raise ValueError("strength, mask and fresh need an init_image (the real image to start from)")
        seeds = row_seeds(seed, len(lays))
        if guidance is None:
            guidance = self.config.guidance
        x = self.sample_tensor(self.net, self.condition(lays), int(steps), float(guidance), seeds, sampler,
                                init, strength, m, progress, fr)
        images = to_uint8(x)
        prov = {
            "model": f"nucsynth.semantic/{self.config.preset}",
            "checkpoint": self.checkpoint,
            "checkpoint_step": self.step,
            "steps": int(steps),
            "guidance": float(guidance),
            "sampler": sampler,
            "strength": None if strength is None else float(strength),
            "masked": m is not None,
            "fresh": fr is not None,
            "batch_size": len(lays),
        }
        return [Sample(lay, img, {**prov, "seed": seeds[i], "batch_index": i})
                for i, (lay, img) in enumerate(zip(lays, images))]
