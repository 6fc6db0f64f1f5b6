"""The image autoencoder family: the first stage of latent diffusion (LDM, Rombach et al. 2022).

``nucsynth train --family autoencoder`` trains a :class:`~nucsynth.nets.KLAutoencoder`
(f = 4) on the user's own images with pixel + structural losses, since no pretrained
perceptual network (LPIPS/VGG) can be assumed:

    loss = L1(x_hat, x) + ssim_weight * (1 - SSIM(x_hat, x)) + kl_weight * KL(q(z|x) || N(0, I))

with ``kl_weight`` 1e-6 as in LDM (the latent stays close to a deterministic code). With
``label_aware`` the decoder also takes the layout's condition map (one-hot classes + edges,
the semantic family's condition) through SPADE, so nucleus boundaries can be drawn at full
resolution. A latent semantic model (:mod:`nucsynth.models.semantic`, option
``autoencoder``) names its autoencoder by content hash (:func:`weights_hash`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from nucsynth.layout import CONSEP_CLASSES, ClassSet
from nucsynth.models.base import ModelFamily, register_family

__all__ = ["AutoencoderFamilyConfig", "AutoencoderModel", "ssim", "weights_hash", "load_autoencoder", "same_encoder"]


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004; Gaussian 11x11 window, sigma 1.5,
    K1 = 0.01, K2 = 0.03) of image batches (B, C, H, W) with values spanning ``data_range``
    (2.0 for [-1, 1]); computed per channel over valid windows, returned as a scalar tensor
    (differentiable: used as a training loss)."""
    c = x.shape[1]
    w = _gaussian_window(size, sigma, c, x.device).to(x.dtype)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean()


@dataclass
class AutoencoderFamilyConfig:
    """Preset, classes (for the label-aware decoder's condition), network and loss weights."""

    preset: str
    image_size: int
    class_set: ClassSet
    network: dict[str, Any]
    label_aware: bool = False
    kl_weight: float = 1e-6
    ssim_weight: float = 0.5
    #: decoder fine-tuning: {"checkpoint": path, "hash": content hash} of the autoencoder whose
    #: weights start the run; its encoder stays frozen (the latent space does not change)
    finetune_decoder_of: dict[str, str] | None = None

    @property
    def cond_channels(self) -> int:
        """Condition channels of a label-aware decoder: K + 1 one-hot classes + 1 edge map."""
        return self.class_set.num_classes + 2 if self.label_aware else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (stored in checkpoints under ``"model"``)."""
        return {
            "preset": self.preset, "image_size": self.image_size, "class_set": self.class_set.to_dict(),
            "network": dict(self.network), "label_aware": self.label_aware,
            "loss": {"kl_weight": self.kl_weight, "ssim_weight": self.ssim_weight},
            "finetune_decoder_of": None if self.finetune_decoder_of is None else dict(self.finetune_decoder_of),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderFamilyConfig":
        """Inverse of :meth:`to_dict`."""
        loss = dict(d.get("loss", {}))
        return cls(
            preset=str(d["preset"]), image_size=int(d["image_size"]), class_set=ClassSet.from_dict(d["class_set"]),
            network=dict(d["network"]), label_aware=bool(d.get("label_aware", False)),
            kl_weight=float(loss.get("kl_weight", 1e-6)), ssim_weight=float(loss.get("ssim_weight", 0.5)),
            finetune_decoder_of=None if d.get("finetune_decoder_of") is None else dict(d["finetune_decoder_of"]),
        )


@register_family
class AutoencoderModel(ModelFamily):
    """Image <-> latent autoencoder (first stage of the latent path); see the module docstring."""

    name = "autoencoder"
    config_type = AutoencoderFamilyConfig
    log_keys = ("l1", "ssim", "kl")

    def __init__(self, config: AutoencoderFamilyConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else AutoencoderModel.from_preset("tiny").config
        self._start_weights: dict[str, torch.Tensor] | None = None  # decoder fine-tuning: where a new run starts

    @classmethod
    def from_preset(cls, name: str = "tiny", image_size: int = 128, class_set: ClassSet = CONSEP_CLASSES,
                    label_aware: bool = False, latent_channels: int = 4, **loss: Any) -> "AutoencoderModel":
        """A fresh autoencoder of preset ``name`` (see :func:`nucsynth.nets.autoencoder_preset`)
        trained on ``image_size`` px crops; ``label_aware`` adds the SPADE decoder condition."""
        from nucsynth.nets.autoencoder import autoencoder_preset

        unknown = set(loss) - {"kl_weight", "ssim_weight"}
        if unknown:
            raise ValueError(f"unknown autoencoder option(s) {sorted(unknown)}")
        cond = class_set.num_classes + 2 if label_aware else 0
        net = autoencoder_preset(name, cond_channels=cond, latent_channels=latent_channels)
        if image_size % net.factor:
            raise ValueError(f"autoencoder image_size {image_size} must be a multiple of its factor {net.factor}")
        return cls(AutoencoderFamilyConfig(name, image_size, class_set, net.to_dict(), label_aware, **loss))

    @classmethod
    def decoder_finetune(cls, autoencoder: "str | Path") -> "AutoencoderModel":
        """A run that continues training only the DECODER of a trained ``autoencoder`` (its
        config, weights to start from, frozen encoder): a better decoder for the same latent
        space, so latent models trained on it stay valid (LDM-style decoder fine-tuning)."""
        from nucsynth.checkpoint import find_checkpoint, load_checkpoint

        ckpt = find_checkpoint(autoencoder)
        source, _ = load_checkpoint(ckpt)
        if not isinstance(source, AutoencoderModel):
            raise ValueError(f"{autoencoder} is a {source.name!r} checkpoint, not an autoencoder")
        cfg = AutoencoderFamilyConfig.from_dict(source.config.to_dict())
        cfg.finetune_decoder_of = {"checkpoint": str(ckpt), "hash": weights_hash(ckpt)}
        model = cls(cfg)
        model._start_weights = source.net.state_dict()
        return model

    @property
    def factor(self) -> int:
        """Down-sampling factor f of the latent."""
        return 2 ** (len(self.config.network["channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels z of the latent."""
        return int(self.config.network["latent_channels"])

    @property
    def data_maps(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("onehot", "edge") if self.config.label_aware else ()

    def build_network(self) -> torch.nn.Module:
        """A fresh network; in a decoder fine-tuning run (:meth:`decoder_finetune`) the encoder
        is frozen (``requires_grad`` off, so the optimizer never changes it) and a new run
        starts from the source autoencoder's weights (a resumed or loaded one gets its own)."""
        from nucsynth.nets.autoencoder import AutoencoderConfig, KLAutoencoder

        net = KLAutoencoder(AutoencoderConfig.from_dict(self.config.network))
        if self._start_weights is not None:
            net.load_state_dict(self._start_weights)
        if self.config.finetune_decoder_of is not None:
            for name, p in net.named_parameters():
                p.requires_grad_(name.startswith("dec_"))
        return net

    def batch_condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The decoder's condition (B, K+2, H, W) of a batch, or None for a plain decoder."""
        if not self.config.label_aware:
            return None
        return torch.cat([batch["onehot"], batch["edge"]], dim=1)

    def training_loss(self, net, batch, generator, cond_drop=0.0):
        """L1 + SSIM + KL of one batch (``cond_drop`` is ignored: the layout is always known)."""
        x = batch["image"]
        cond = self.batch_condition(batch)
        frozen = self.config.finetune_decoder_of is not None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            mean, logvar = net.encode(x) if not hasattr(net, "module") else net.module.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        z = (mean + torch.exp(0.5 * logvar) * noise).to(x.dtype)
        dec = net.decode if not hasattr(net, "module") else net.module.decode
        rec = dec(z, None if cond is None else cond.to(x.dtype)).float()
        l1 = (rec - x.float()).abs().mean()
        s = ssim(rec, x.float())
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = l1 + self.config.ssim_weight * (1.0 - s) + self.config.kl_weight * kl
        return loss, {"l1": float(l1.detach()), "ssim": float(s.detach()), "kl": float(kl.detach())}

    @torch.no_grad()
    def reconstruct(self, net: torch.nn.Module, images: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the posterior mean of ``images`` (B, 3, H, W) in [-1, 1]; returns (B, 3, H, W)."""
        was = net.training
        net.eval()
        try:
            mean, _ = net.encode(images)
            return net.decode(mean.to(images.dtype), cond).float()
        finally:
            net.train(was)

    def preview(self, net, batch, seed=0):
        """Reconstructions of the batch's images (posterior mean), uint8 (B, H, W, 3)."""
        from nucsynth.models.semantic import to_uint8

        return to_uint8(self.reconstruct(net, batch["image"], self.batch_condition(batch)))


def weights_hash(checkpoint: str | Path) -> str:
    """Content hash (sha256 hex) of a checkpoint's sampling weights (``ema.safetensors``,
    else ``model.safetensors``) and its model config: what a latent model records to name
    its autoencoder."""
    import json

    from nucsynth.checkpoint import EMA, MODEL, content_sha256, find_checkpoint, read_config

    ckpt = find_checkpoint(checkpoint)
    weights = ckpt / EMA if (ckpt / EMA).exists() else ckpt / MODEL
    return content_sha256(json.dumps(read_config(ckpt).get("model", {}), sort_keys=True).encode(), weights)


def same_encoder(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two autoencoder networks have bit-identical encoders (the same latent space)."""
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith("enc_")]
    return keys == [k for k in sb if k.startswith("enc_")] and all(torch.equal(sa[k], sb[k]) for k in keys)


def load_autoencoder(candidates: list[Path], expected_hash: str | None, device: str = "cpu") -> tuple[AutoencoderModel, Path]:
    """Load the first existing autoencoder checkpoint of ``candidates`` whose content hash is
    ``expected_hash`` (any, if None). Raises ``FileNotFoundError`` naming every place looked
    at when none exists, ``ValueError`` when one exists with another hash."""
    from nucsynth.checkpoint import load_checkpoint

    seen = []
    for path in candidates:
        if not Path(path).exists():
            seen.append(f"{path} (missing)")
            continue
        got = weights_hash(path)
        if expected_hash is not None and got != expected_hash:
            raise ValueError(
                f"autoencoder {path} has content hash {got[:12]}..., but this latent model was trained with "
                f"{expected_hash[:12]}...: a latent model only works with its own autoencoder"
            )
        model, _ = load_checkpoint(path, device=device)
        if not isinstance(model, AutoencoderModel):
            raise ValueError(f"{path} is a {model.name!r} checkpoint, not an autoencoder")
        return model, Path(path)
    raise FileNotFoundError("this latent model's autoencoder was not found; looked at: " + "; ".join(seen))
