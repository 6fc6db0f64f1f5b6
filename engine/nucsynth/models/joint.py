"""The joint family: image + distance map + semantic label from points and a prompt
(co-synthesis with a context-conditioned joint diffusion model; Min, Oh, Jeong, ECCV 2024).

One network (:class:`JointNet`) denoises a triple u = (image i, distance map d, label l):

- i (3 channels, [-1, 1]) and d (1 channel: ``Layout.distance_map`` scaled from [0, 1] to
  [-1, 1]) by Gaussian diffusion with epsilon prediction;
- l (K+1 classes, background included) by multinomial diffusion (Hoogeboom et al. 2021,
  :class:`nucsynth.diffusion.MultinomialDiffusion`); the network emits x0 logits.

Each output has its own schedule (cosine by default, T = 1000); all three share the
timestep of a training sample and, when sampling, the SAME respaced step set (chosen on the
image process), so one network call per step advances all three.

Inputs are embedded and SUMMED: conv3x3(noisy image) + conv3x3(noisy distance map) +
Embedding(current label) gives ``embed_dim`` channels, the input of the U-Net
(:class:`nucsynth.nets.SpadeUNet`, no SPADE condition). Conditions:

- the point map (class index at each nucleus centroid, ``Layout.point_map``) is encoded by
  RRDB blocks (:class:`nucsynth.nets.RRDBEncoder`); its features are added after the U-Net's
  input conv (``early``) and concatenated before its output conv (``late``);
- the text prompt ("high-quality histopathology {tissue} tissue image including nuclei types
  of {types}") becomes the U-Net's ``context`` vector: by default through the built-in
  offline encoder (:class:`nucsynth.nets.BuiltinPromptEncoder`, trained with the model), or
  through a frozen CLIP text tower loaded from a local path
  (:class:`nucsynth.nets.OpenClipTextEncoder`, PLIP or QuiltNet). The null text is the
  all-zero feature vector and gives an exactly zero context.

Heads: the U-Net's output conv is zero-initialized; its channels are the three heads
(3 image-noise, 1 distance-noise, K+1 label-logit channels), so a fresh network predicts
zero noise and uniform labels. Loss: 9 * L_image + 1 * L_distance + 3 * L_label (MSE of
the noise, MSE of the noise, and T x the per-step multinomial KL: the ELBO estimate of the
whole label chain, on the scale of the MSEs), configurable.

Guidance (classifier-free, one batched pass; ours: out_c + s (out_c - out_u), co-synthesis'
w = s + 1): the null condition drops the text, and with ``guide_points`` also the points.
It applies to the noise channels and to the label logits alike. Training drops the text of
``max(cond_drop, text_drop)`` of the samples and the points of ``point_drop`` of them.

Instances: the point-marker watershed (:func:`nucsynth.postprocess.point_watershed`) on the
generated distance map inside the generated nuclei mask (label > 0), one marker per given
point, so nucleus i of the output is grown from point i. Its class is the majority class of
the generated label map inside it (what the generated image shows) or, for a nucleus with
no labelled pixels, the point's class (``class_source="label"``, the default); with
``class_source="points"`` every nucleus keeps the class of its point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from nucsynth.layout import CONSEP_CLASSES, ClassSet, Layout, Sample
from nucsynth.models.base import ModelFamily, register_family

__all__ = ["JointConfig", "JointNet", "JointModel", "JointMaps", "point_class_hits"]

PRESETS = ("tiny", "base", "paper")
SAMPLERS = ("dpm++2m", "ddim", "ancestral")
TEXT_ENCODERS = ("builtin", "open_clip")
CLASS_SOURCES = ("label", "points")
OUTPUTS = ("image", "distance", "label")

# Per preset: summed input embedding width, point encoder (channels, RRDB blocks, dense-block
# growth, stride: s x s cells folded into channels, see nucsynth.nets.rrdb),
# built-in text embedding width.
_PRESET_PARTS = {
    "tiny": dict(embed_dim=32, point_channels=16, point_blocks=1, point_growth=16, point_stride=2, text_dim=64),
    "base": dict(embed_dim=64, point_channels=32, point_blocks=2, point_growth=32, point_stride=2, text_dim=256),
    "paper": dict(embed_dim=128, point_channels=64, point_blocks=3, point_growth=32, point_stride=1, text_dim=512),
}


@dataclass
class JointConfig:
    """Everything needed to rebuild a joint model (JSON through ``to_dict``/``from_dict``).

    ``network`` is the U-Net's ``UNetConfig`` dict (in_channels = ``embed_dim``,
    out_channels = 3 + 1 + K + 1). ``text_encoder``: ``"builtin"`` (offline, trained with
    the model) or ``"open_clip"`` (frozen, weights at ``text_path``; ``text_dim`` must be the
    tower's feature width, 512 for ViT-B-32). ``tissue``: the tissue named in the prompts of
    training patches. ``schedules``: one per output (image, distance, label).
    """

    preset: str
    image_size: int
    class_set: ClassSet
    network: dict[str, Any]
    embed_dim: int = 32
    point_channels: int = 16
    point_blocks: int = 1
    point_growth: int = 16
    point_stride: int = 2
    text_encoder: str = "builtin"
    text_dim: int = 64
    text_path: str | None = None
    text_arch: str = "ViT-B-32-quickgelu"
    tissue: str = "colon"
    tissues: tuple[str, ...] = ()
    schedules: dict[str, str] = field(default_factory=lambda: {k: "cosine" for k in OUTPUTS})
    timesteps: int = 1000
    loss_weights: tuple[float, float, float] = (9.0, 1.0, 3.0)
    text_drop: float = 0.1
    point_drop: float = 0.0

    def __post_init__(self) -> None:
        from nucsynth.nets.text import DEFAULT_TISSUES

        if not self.tissues:
            self.tissues = DEFAULT_TISSUES
        self.tissues = tuple(str(t) for t in self.tissues)
        self.loss_weights = tuple(float(w) for w in self.loss_weights)  # type: ignore[assignment]
        self.schedules = {**{k: "cosine" for k in OUTPUTS}, **dict(self.schedules)}

    @property
    def num_labels(self) -> int:
        """K + 1: the label classes, background included."""
        return self.class_set.num_classes + 1

    @property
    def out_channels(self) -> int:
        """3 image-noise + 1 distance-noise + (K + 1) label-logit channels."""
        return 4 + self.num_labels

    @property
    def text_width(self) -> int:
        """Width of the text features fed to the network (before its projection)."""
        if self.text_encoder == "builtin":
            return self.class_set.num_classes + len(self.tissues)
        return self.text_dim

    def validate(self) -> None:
        """Raise ValueError on inconsistent fields."""
        from nucsynth.diffusion.schedules import SCHEDULES

        checks = [
            (self.preset in PRESETS, f"unknown joint preset {self.preset!r}; choose one of {list(PRESETS)}"),
            (self.text_encoder in TEXT_ENCODERS, f"text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}"),
            (self.text_encoder != "open_clip" or bool(self.text_path),
             "text_encoder='open_clip' needs text_path: a local PLIP / QuiltNet weights file or folder"),
            (set(self.schedules) == set(OUTPUTS) and all(v in SCHEDULES for v in self.schedules.values()),
             f"schedules must map {OUTPUTS} to one of {SCHEDULES}, got {self.schedules}"),
            (len(self.loss_weights) == 3 and all(w >= 0 for w in self.loss_weights) and sum(self.loss_weights) > 0,
             f"loss_weights must be 3 non-negative numbers (image, distance, label), got {self.loss_weights}"),
            (0.0 <= self.text_drop <= 1.0 and 0.0 <= self.point_drop <= 1.0, "text_drop and point_drop must lie in [0, 1]"),
            (self.tissue.lower() in [t.lower() for t in self.tissues],
             f"tissue {self.tissue!r} is not one of the encoder's tissues {list(self.tissues)}"),
            (self.network.get("in_channels") == self.embed_dim, "network in_channels must equal embed_dim"),
            (self.network.get("out_channels") == self.out_channels,
             f"network out_channels must be {self.out_channels} (3 + 1 + {self.num_labels})"),
            (self.network.get("cond_channels", 0) == 0, "the joint network takes no SPADE condition"),
            (self.network.get("context_dim") == self.text_dim, "network context_dim must equal text_dim"),
            (self.network.get("early_channels") == self.point_channels == self.network.get("late_channels"),
             "network early/late channels must equal point_channels"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"joint config: {msg}")

    @classmethod
    def from_preset(
        cls, name: str = "tiny", image_size: int = 64, class_set: ClassSet = CONSEP_CLASSES, **overrides: Any
    ) -> "JointConfig":
        """Preset ``tiny`` (CPU tests), ``base`` (default GPU model) or ``paper`` (reference
        width) for ``image_size`` px patches; keyword overrides for the other fields (e.g.
        ``text_encoder="open_clip", text_path=..., text_dim=512``, ``loss_weights``)."""
        from nucsynth.nets import unet_preset

        if name not in PRESETS:
            raise ValueError(f"unknown joint preset {name!r}; choose one of {list(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)} - {"network"}
        if unknown:
            raise ValueError(f"unknown joint config option(s) {sorted(unknown)}")
        parts = {**_PRESET_PARTS[name], **{k: v for k, v in overrides.items() if k in _PRESET_PARTS[name]}}
        if overrides.get("text_encoder") == "open_clip" and "text_dim" not in overrides:
            parts["text_dim"] = 512  # ViT-B-32 text towers (PLIP, QuiltNet)
        net = unet_preset(
            name, image_size, in_channels=parts["embed_dim"], out_channels=4 + class_set.num_classes + 1,
            cond_channels=0, context_dim=parts["text_dim"], early_channels=parts["point_channels"],
            late_channels=parts["point_channels"],
        )
        kw: dict[str, Any] = {"preset": name, "image_size": image_size, "class_set": class_set,
                              "network": net.to_dict(), **parts}
        kw.update({k: v for k, v in overrides.items() if k not in parts})
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (stored in checkpoints under ``"model"``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["class_set"] = self.class_set.to_dict()
        d["network"] = dict(self.network)
        d["tissues"] = list(self.tissues)
        d["loss_weights"] = list(self.loss_weights)
        d["schedules"] = dict(self.schedules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JointConfig":
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"joint config has unknown keys {sorted(unknown)}")
        kw = dict(d)
        kw["class_set"] = ClassSet.from_dict(d["class_set"])
        cfg = cls(**kw)
        cfg.validate()
        return cfg


class JointNet(nn.Module):
    """The joint denoiser: summed input embeddings -> U-Net with point features early and
    late and the text as context -> [image noise (3), distance noise (1), label logits (K+1)].

    ``forward(image, dist, label, t, points, text)``: noisy image (B, 3, H, W), noisy distance
    map (B, 1, H, W), current labels (B, H, W) int in 0..K, original timesteps t (B,), point
    map (B, H, W) int (``Layout.point_map``), text features (B, F) (zeros = null text).
    """

    def __init__(self, config: JointConfig) -> None:
        super().__init__()
        from nucsynth.nets import BuiltinPromptEncoder, RRDBEncoder, SpadeUNet, UNetConfig

        self.config = c = config
        e = c.embed_dim
        self.image_in = nn.Conv2d(3, e, 3, padding=1)
        self.dist_in = nn.Conv2d(1, e, 3, padding=1)
        self.label_in = nn.Embedding(c.num_labels, e)
        self.points = RRDBEncoder.for_classes(c.class_set.num_classes, c.point_channels, c.point_blocks,
                                              growth=c.point_growth, stride=c.point_stride)
        # builtin: the encoder's learned projection lives here (trained and saved with the
        # model); open_clip: the frozen tower's features go straight to the U-Net's context layer.
        self.text = BuiltinPromptEncoder(c.class_set, c.tissues, c.text_dim) if c.text_encoder == "builtin" else None
        self.unet = SpadeUNet(UNetConfig.from_dict(c.network))

    def context(self, text: Tensor) -> Tensor:
        """Context vectors (B, text_dim) of text features; all-zero features -> zero context."""
        if text.ndim != 2 or text.shape[1] != self.config.text_width:
            raise ValueError(f"JointNet: text features must be (B, {self.config.text_width}), got {tuple(text.shape)}")
        if self.text is None:
            return text
        given = (text.abs().sum(dim=1, keepdim=True) > 0).to(text.dtype)
        return self.text.proj(text) * given

    def forward(self, image: Tensor, dist: Tensor, label: Tensor, t: Tensor, points: Tensor, text: Tensor) -> Tensor:
        h = self.image_in(image) + self.dist_in(dist) + self.label_in(label.long()).permute(0, 3, 1, 2)
        feats = self.points(points)
        return self.unet(h, t, context=self.context(text.to(h.dtype)), early=feats, late=feats)


@dataclass
class JointMaps:
    """Raw outputs of :meth:`JointModel.sample_maps` for a batch of B point layouts."""

    images: np.ndarray  # uint8 (B, H, W, 3)
    distance: np.ndarray  # float32 (B, H, W) in [0, 1]
    labels: np.ndarray  # int64 (B, H, W) in 0..K (0 = background)
    prompts: list[str]


def point_class_hits(labels: np.ndarray, layout: Layout) -> np.ndarray:
    """bool (N,): whether each point of ``layout`` lies on a pixel of ``labels`` (H, W)
    labelled with the point's own class (a generated nucleus of the given class)."""
    if layout.num_nuclei == 0:
        return np.zeros(0, bool)
    h, w = labels.shape
    yx = np.rint(layout.centroids).astype(np.int64)
    y, x = yx[:, 0].clip(0, h - 1), yx[:, 1].clip(0, w - 1)
    return labels[y, x] == layout.classes


@register_family
class JointModel(ModelFamily):
    """Points + prompt -> image, distance map and label -> instances at the points."""

    name = "joint"
    config_type = JointConfig
    data_maps = ("dist", "type_map", "points")
    log_keys = ("image", "distance", "label")

    def __init__(self, config: JointConfig | None = None) -> None:
        super().__init__()
        from nucsynth.diffusion import GaussianDiffusion, MultinomialDiffusion, make_betas

        self.config = c = config or JointConfig.from_preset("tiny")
        c.validate()
        self.image_diffusion = GaussianDiffusion(make_betas(c.schedules["image"], c.timesteps))
        self.dist_diffusion = GaussianDiffusion(make_betas(c.schedules["distance"], c.timesteps))
        self.label_diffusion = MultinomialDiffusion(c.num_labels, make_betas(c.schedules["label"], c.timesteps))
        self._clip: Any = None

    @classmethod
    def from_preset(cls, name: str = "tiny", image_size: int = 64, class_set: ClassSet = CONSEP_CLASSES, **kw: Any) -> "JointModel":
        """A fresh (untrained) model; see :meth:`JointConfig.from_preset`."""
        return cls(JointConfig.from_preset(name, image_size, class_set, **kw))

    def build_network(self) -> torch.nn.Module:
        return JointNet(self.config)

    # ------------------------------------------------------------------ text
    def _clip_encoder(self) -> Any:
        if self._clip is None:
            from nucsynth.nets import OpenClipTextEncoder

            enc = OpenClipTextEncoder(self.config.text_path, arch=self.config.text_arch)  # type: ignore[arg-type]
            if enc.dim != self.config.text_dim:
                raise ValueError(f"text encoder at {self.config.text_path} gives {enc.dim}-d features; "
                                 f"this model was built for text_dim={self.config.text_dim}")
            self._clip = enc
        return self._clip

    def text_features(self, prompts: Sequence[str], net: torch.nn.Module | None = None) -> Tensor:
        """Text features (B, F) of templated prompts for the ``text`` input of ``net``
        (default: the loaded network), on its device."""
        from nucsynth.nets.text import parse_prompt

        net = getattr(net, "module", net) if net is not None else self.net  # unwrap DDP
        if net is None:
            raise ValueError("this model has no network loaded: use nucsynth.checkpoint.load_checkpoint")
        device = next(net.parameters()).device
        if self.config.text_encoder == "builtin":
            parsed = [parse_prompt(p, self.class_set) for p in prompts]
            return net.text.features([t for t, _ in parsed], [c for _, c in parsed]).to(device)
        for p in prompts:
            parse_prompt(p, self.class_set)  # same template check as the built-in encoder
        return self._clip_encoder()(list(prompts)).float().to(device)

    def prompts_for_points(self, points: Tensor) -> list[str]:
        """The templated prompt of each point map (B, H, W): the configured tissue and the
        classes present (unknown-class points, K+1, are not named)."""
        from nucsynth.nets.text import format_prompt

        k = self.class_set.num_classes
        out = []
        for p in points.detach().cpu().numpy():
            ids = [int(v) for v in np.unique(p) if 1 <= v <= k]
            out.append(format_prompt(self.config.tissue, ids, self.class_set))
        return out

    # ------------------------------------------------------------------ training
    def training_loss(self, net, batch, generator, cond_drop=0.0):
        """Weighted sum of the image-noise MSE, the distance-noise MSE and the label KL at a
        shared random timestep; drops the text of max(cond_drop, text_drop) of the samples
        and the points of point_drop of them (classifier-free guidance training)."""
        for key in ("image",) + self.data_maps:
            if key not in batch:
                raise ValueError(f"a joint batch needs the {key!r} map (SampleDataset maps={self.data_maps})")
        x_img = batch["image"].float()
        x_dist = batch["dist"].float() * 2.0 - 1.0
        x_lab = batch["type_map"].long()
        points = batch["points"].long()
        b, dev = x_img.shape[0], x_img.device
        gdev = generator.device

        t = self.image_diffusion.sample_t(b, generator, dev)
        n_img = torch.randn(x_img.shape, generator=generator, device=gdev).to(dev)
        n_dist = torch.randn(x_dist.shape, generator=generator, device=gdev).to(dev)
        xt_img = self.image_diffusion.q_sample(x_img, t, n_img)
        xt_dist = self.dist_diffusion.q_sample(x_dist, t, n_dist)
        xt_lab = self.label_diffusion.q_sample(x_lab, t, generator)

        text = self.text_features(self.prompts_for_points(points), net).to(dev)
        drop_text = max(float(cond_drop), self.config.text_drop)
        keep_text = torch.rand(b, generator=generator, device=gdev).to(dev) >= drop_text
        keep_pts = torch.rand(b, generator=generator, device=gdev).to(dev) >= self.config.point_drop
        text = text * keep_text[:, None].to(text.dtype)
        points = points * keep_pts[:, None, None].long()

        out = net(xt_img, xt_dist, xt_lab, self.image_diffusion.model_timesteps(t), points, text).float()
        l_img = ((out[:, :3] - n_img) ** 2).mean()
        l_dist = ((out[:, 3:4] - n_dist) ** 2).mean()
        # The per-step KL (nats per pixel) times T is the ELBO estimate of the whole chain
        # (uniform t; Hoogeboom et al.'s kl / p(t)). Unscaled, it is ~1e-3 nats, ~100x below
        # the image term, and the network learns to ignore the points in its labels.
        kl = self.label_diffusion.training_losses(out[:, 4:], x_lab, xt_lab, t)["loss"].float()
        l_lab = kl * self.label_diffusion.num_timesteps
        w = self.config.loss_weights
        loss = w[0] * l_img + w[1] * l_dist + w[2] * l_lab
        return loss, {"image": float(l_img.detach()), "distance": float(l_dist.detach()), "label": float(l_lab.detach())}

    def preview(self, net, batch, seed=0):
        """Images for the batch's point maps and prompts (10 solver steps, no guidance)."""
        points = batch["points"].long()
        maps = self._sample_maps(net, points, self.prompts_for_points(points), 10, 0.0, seed, "dpm++2m", False, None)
        return maps.images

    # ------------------------------------------------------------------ sampling
    def _sample_maps(
        self,
        net: torch.nn.Module,
        points: Tensor,
        prompts: list[str],
        steps: int,
        guidance: float,
        seed: int | Sequence[int],
        sampler: str,
        guide_points: bool,
        progress: Callable[[int, int], None] | None,
    ) -> JointMaps:
        from nucsynth.diffusion import Stepper, guided
        from nucsynth.diffusion.noise import generators, randn, row_seeds, rows_alone
        from nucsynth.diffusion.windows import windowed
        from nucsynth.diffusion.sampling import DEFAULT_SPACING
        from nucsynth.models.semantic import to_uint8

        dev = next(net.parameters()).device
        amp = dev.type == "cuda"
        b, (h, w) = points.shape[0], points.shape[-2:]
        points = points.to(dev)
        # one prompt at a time on CPU: a row's features then do not depend on its batch
        text = (torch.cat([self.text_features([p], net) for p in prompts]) if dev.type == "cpu"
                else self.text_features(prompts, net))
        cond = {"points": points, "text": text}
        null = {"points": torch.zeros_like(points[:1]) if guide_points else points, "text": torch.zeros_like(text[:1])}

        def net_fn(x: Tensor, t: Tensor, c: Mapping[str, Tensor]) -> Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                return net(x[:, :3], x[:, 3:4], x[:, 4].long(), t, c["points"], c["text"]).float()

        # a canvas larger than the training size: overlapping windows of it, denoised together
        net_win = windowed(net_fn, self.config.image_size)
        model_fn = guided(net_win, cond, null, float(guidance), eps_channels=self.config.out_channels,
                          per_sample=rows_alone(dev))
        img_p = self.image_diffusion.respaced(int(steps), DEFAULT_SPACING[sampler])
        ts = img_p.timesteps.tolist()  # ONE step set for all three outputs
        dist_p = self.dist_diffusion.respaced(ts)
        lab_p = self.label_diffusion.respaced(ts)
        st_img, st_dist = Stepper(img_p, sampler), Stepper(dist_p, sampler)
        gen = generators(row_seeds(seed, b), dev)  # layout i gets seed + i, alone or in a batch
        x_img = randn((b, 3, h, w), gen, dev)
        x_dist = randn((b, 1, h, w), gen, dev)
        x_lab = lab_p.sample_prior((b, h, w), gen, dev)
        n = len(ts)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                for k, i in enumerate(range(n - 1, -1, -1), start=1):
                    t = torch.full((b,), int(ts[i]), dtype=torch.long, device=dev)
                    out = model_fn(torch.cat([x_img, x_dist, x_lab[:, None].float()], dim=1), t)
                    x_img = st_img.step(out[:, :3], x_img, i, gen)
                    x_dist = st_dist.step(out[:, 3:4], x_dist, i, gen)
                    x_lab = lab_p.step(out[:, 4:], x_lab, i, gen, argmax_final=True)
                    if progress is not None:
                        progress(k, n)
        finally:
            net.train(was_training)
        dist = ((x_dist[:, 0].float().clamp(-1, 1) + 1.0) / 2.0).cpu().numpy()
        return JointMaps(to_uint8(x_img), dist, x_lab.long().cpu().numpy(), list(prompts))

    def _check_layouts(self, point_layouts: Layout | Sequence[Layout]) -> list[Layout]:
        lays = [point_layouts] if isinstance(point_layouts, Layout) else list(point_layouts)
        if not lays:
            raise ValueError("sample() needs at least one point layout")
        shape = lays[0].shape
        if any(l.shape != shape for l in lays):
            raise ValueError(f"all point layouts of one call must share a canvas size; got {sorted({l.shape for l in lays})}")
        f = 2 ** (len(self.config.network["channel_mult"]) - 1) * self.config.point_stride
        if shape[0] % f or shape[1] % f:
            raise ValueError(f"canvas size {shape} must be a multiple of {f} on both sides for this network")
        # Classes are matched by name (any order); a set naming other classes is refused.
        return [lay.to_class_set(self.class_set) for lay in lays]

    def _prompts(self, prompts: str | Sequence[str] | None, lays: list[Layout]) -> list[str]:
        from nucsynth.nets.text import prompt_from_layout

        if prompts is None:
            return [prompt_from_layout(l, self.config.tissue) for l in lays]
        if isinstance(prompts, str):
            return [prompts] * len(lays)
        out = list(prompts)
        if len(out) != len(lays):
            raise ValueError(f"got {len(out)} prompts for {len(lays)} point layouts (give one, or one per layout)")
        return out

    def sample_maps(
        self,
        point_layouts: Layout | Sequence[Layout],
        prompts: str | Sequence[str] | None = None,
        steps: int = 20,
        guidance: float = 1.0,
        seed: int | Sequence[int] = 0,
        progress: Callable[[int, int], None] | None = None,
        sampler: str = "dpm++2m",
        guide_points: bool = False,
    ) -> JointMaps:
        """The raw generated maps (image, distance map, label) for point layouts; see
        :meth:`sample` for the arguments."""
        if self.net is None:
            raise ValueError("this model has no network loaded: use nucsynth.checkpoint.load_checkpoint")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if float(guidance) < 0:
            raise ValueError(f"guidance must be >= 0 (0 = conditional model), got {guidance}")
        lays = self._check_layouts(point_layouts)
        texts = self._prompts(prompts, lays)
        points = torch.from_numpy(np.stack([l.point_map() for l in lays]).astype(np.int64))
        return self._sample_maps(self.net, points, texts, int(steps), float(guidance), seed, sampler,
                                 bool(guide_points), progress)

    def sample(
        self,
        point_layouts: Layout | Sequence[Layout],
        prompts: str | Sequence[str] | None = None,
        steps: int = 20,
        guidance: float = 1.0,
        seed: int | Sequence[int] = 0,
        progress: Callable[[int, int], None] | None = None,
        sampler: str = "dpm++2m",
        guide_points: bool = False,
        class_source: str = "label",
    ) -> list[Sample]:
        """Generate one Sample per point layout (its centroids and classes are the points).

        ``prompts``: templated prompts (one for all, or one per layout); default: each
        layout's own (``prompt_from_layout`` with the configured tissue). ``guidance``: scale
        s of out_c + s (out_c - out_u) on the text (co-synthesis' w = s + 1; 0 = one pass
        without guidance); ``guide_points`` also drops the points in the null pass.
        ``sampler``: the Gaussian outputs' solver (``dpm++2m``, ``ddim``, ``ancestral``); the
        label is sampled ancestrally on the same steps (most probable class at the last).
        The nuclei of each Sample are the point-marker watershed's: nucleus i is grown from
        point i; ``class_source`` ``"label"`` (majority of the generated label, else the
        point's class) or ``"points"`` (the given classes). ``progress(i, n)`` after each
        step; raise in it to cancel. ``seed``: int s (layout i gets s + i) or one per
        layout: a layout sampled alone with its seed gives what it got in a batch (CPU).
        Same seed + inputs + device -> same Samples.
        """
        from nucsynth.postprocess import point_watershed

        if class_source not in CLASS_SOURCES:
            raise ValueError(f"class_source must be one of {CLASS_SOURCES}, got {class_source!r}")
        from nucsynth.diffusion.noise import row_seeds

        lays = self._check_layouts(point_layouts)
        seeds = row_seeds(seed, len(lays))
        maps = self.sample_maps(lays, prompts, steps, guidance, seeds, progress, sampler, guide_points)
        prov = {
            "model": f"nucsynth.joint/{self.config.preset}",
            "checkpoint": self.checkpoint,
            "checkpoint_step": self.step,
            "steps": int(steps),
            "guidance": float(guidance),
            "guide_points": bool(guide_points),
            "sampler": sampler,
            "class_source": class_source,
            "batch_size": len(lays),
        }
        out = []
        for i, lay in enumerate(lays):
            points = Layout.from_points(lay.shape, lay.centroids, lay.classes, lay.class_set)
            label = maps.labels[i]
            inst = point_watershed(maps.distance[i], label > 0, points,
                                   label_map=label if class_source == "label" else None)
            out.append(Sample(inst, maps.images[i], {**prov, "seed": seeds[i], "prompt": maps.prompts[i],
                                                     "batch_index": i}))
        return out

