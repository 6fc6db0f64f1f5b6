"""A compact HoVer-Net-style nuclei segmenter: the yardstick of the downstream protocol.

One shared convolutional encoder feeds three U-Net decoders (Graham et al. 2019): the
nucleus-pixel branch (NP, 2 logits), the horizontal/vertical distance branch (HV, 2 maps in
[-1, 1]) and the type branch (TP, K + 1 logits, channel 0 = background). Losses as in
HoVer-Net: cross-entropy + soft Dice for NP and TP, MSE + mean squared gradient error
(MSGE, inside nuclei, 5-tap Sobel) for HV. Predictions go through
:func:`nucsynth.postprocess.hv_watershed` to a Layout.

Weights are stored as ``model.safetensors`` + ``segmenter.json`` (config, class set, training
log) in one folder, written atomically; never pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nucsynth.data.tiling import crop_to_source
from nucsynth.layout import ClassSet, Layout, Sample
from nucsynth.micro_batches import CPU_MICRO_BATCHES, MicroBatches
from nucsynth.postprocess import hv_watershed

__all__ = [
    "SegmenterConfig",
    "PRESETS",
    "segmenter_preset",
    "HoVerSegmenter",
    "segmenter_loss",
    "type_class_weights",
    "patch_sampling_weights",
    "train_segmenter",
    "predict_layouts",
    "predict_batch_maps",
    "tune_postprocess",
    "predict_maps",
    "segment_image",
    "save_segmenter",
    "load_segmenter",
    "DEFAULT_SEGMENTER",
]

CLASS_WEIGHTINGS = ("none", "sqrt", "inverse")
WEIGHTS = "model.safetensors"
CONFIG = "segmenter.json"
FORMAT = "nucsynth-segmenter"


@dataclass
class SegmenterConfig:
    """Architecture and training options of the segmenter (JSON-friendly)."""

    num_classes: int  # K real classes; the TP branch has K + 1 outputs
    widths: tuple[int, ...] = (16, 32, 64)  # encoder channels per level (each level halves H, W)
    blocks: int = 1  # residual blocks per level
    # "separate": one decoder per branch (HoVer-Net); "shared": one decoder whose last layer
    # gives all three branches (about a third of the decoder cost: the CPU preset's choice).
    decoder: str = "separate"
    steps: int = 300
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    crop: int | None = 128  # training crop (None = whole patches)
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"np_ce": 1.0, "np_dice": 1.0, "hv_mse": 1.0, "hv_msge": 1.0, "tp_ce": 1.0, "tp_dice": 1.0}
    )
    # Keyword arguments of nucsynth.postprocess.hv_watershed used at prediction time ({} = its
    # defaults); stored with the weights so that a model is evaluated as it was meant to be.
    postprocess: dict[str, float] = field(default_factory=dict)
    # Type-branch cross-entropy class weights from the training pixels' class frequencies f_c:
    # "none", "sqrt" (w_c ~ f_c^-1/2) or "inverse" (w_c ~ 1/f_c); normalized to mean 1 over pixels.
    class_weighting: str = "none"
    # Patches holding a nucleus of the class set's rare class are drawn this many times as
    # often as the others (1 = uniform sampling).
    rare_boost: float = 1.0
    # Strength of the per-image colour jitter (brightness, contrast, saturation and a
    # per-channel gain, each uniform in +-strength); 0 = geometric augmentation only.
    color_jitter: float = 0.0
    # Strength of the HED stain augmentation (Tellez et al. 2018): each image's haematoxylin,
    # eosin and DAB optical densities scaled by 1 +- strength and shifted by +- strength;
    # 0 = none.
    stain_jitter: float = 0.0
    # On CPU, each batch runs through the network as this many micro-batches on worker
    # threads (nucsynth.micro_batches): the loss stays the whole batch's, and with at most
    # this many threads the weights do not depend on the thread count. On a busy machine it
    # keeps two threads faster than one, where splitting every operation did not. 1 = the
    # whole batch in one pass on torch's intra-op threads (the only way on other devices).
    micro_batches: int = 1

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"blocks (residual blocks per level) must be an integer >= 1, got {self.blocks!r}")
        if not self.widths or min(self.widths) < 4:
            raise ValueError(f"widths must be a non-empty list of channel counts >= 4, got {self.widths}")
        if self.crop is not None and self.crop % (2 ** (len(self.widths) - 1)):
            raise ValueError(f"crop {self.crop} must be divisible by {2 ** (len(self.widths) - 1)} for {len(self.widths)} levels")
        self.postprocess = dict(self.postprocess)
        if self.decoder not in ("separate", "shared"):
            raise ValueError(f"decoder must be 'separate' or 'shared', got {self.decoder!r}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {self.class_weighting!r}")
        if not self.rare_boost >= 1.0:
            raise ValueError(f"rare_boost must be >= 1 (1 = uniform sampling), got {self.rare_boost}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {self.color_jitter}")
        if not 0.0 <= self.stain_jitter < 1.0:
            raise ValueError(f"stain_jitter must be in [0, 1), got {self.stain_jitter}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or \
                not 1 <= self.micro_batches <= self.batch_size:
            raise ValueError(f"micro_batches must be a whole number from 1 to the batch size {self.batch_size}, "
                             f"got {self.micro_batches!r}")
        allowed = _watershed_options()
        unknown = sorted(set(self.postprocess) - allowed)
        if unknown:
            raise ValueError(f"unknown postprocess options {unknown}; hv_watershed accepts {sorted(allowed)}")

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this (padding handles the rest)."""
        return 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegmenterConfig":
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"invalid segmenter config {d}: {e}") from None


# tiny: minutes on a laptop CPU; base: a GPU model closer to HoVer-Net's capacity.
def _watershed_options() -> set[str]:
    """Keyword options of hv_watershed that a config may set (not the maps or class set)."""
    import inspect

    names = inspect.signature(hv_watershed).parameters
    return {n for n in names if n not in ("prob", "hv", "type_probs", "class_set")}


# tiny: 4 levels (a 64 px-wide field at the deepest level, enough to see a whole CoNSeP
# nucleus when predicting its HV distances) at the cost of little compute; 96 px crops;
# 1000 steps (about 5 minutes on 2 free CPU cores, several times that on shared ones).
# Its post-processing uses a 7-tap Sobel and smaller marker openings than HoVer-Net's
# defaults, which were tuned for HoVer-Net's smooth, well-trained maps and drop most
# nuclei of a small network's maps (measured on training tiles, docs/metrics.md).
TINY_POSTPROCESS: dict[str, float] = {"threshold": 0.5, "sobel_ksize": 7, "marker_threshold": 0.5, "open_ksize": 3, "marker_min_size": 5}
# quick: the former cpu preset (the downstream tables of docs/metrics.md were made with it,
# and it was the shipped segmenter until the cpu one): one shared decoder (half the cost of
# three per step, measured), batches of 8 crops, and the type branch balanced twice:
# sqrt-inverse pixel-frequency CE weights and patches with a rare nucleus drawn 3x as often
# (without them the "other" class is never predicted). Colour jitter because the held-out
# tiles are stained differently from the training ones. About 10-17 min on 2 cores.
# cpu: the yardstick and the shipped segmenter. As quick, with two residual blocks per
# level, 4000 steps (0.32-0.53 s each on two cores of a shared machine: 21-37 min measured),
# HED stain jitter, and the HV losses weighted 4x (MSE) and 8x (MSGE): in the shared decoder
# the type branch's loss dominated (HV terms 0.07 of 1.2), and merged nuclei were the main
# error (docs/metrics.md).
QUICK: dict[str, Any] = {"widths": (16, 32, 64, 128), "blocks": 1, "decoder": "shared", "steps": 2000, "batch_size": 8,
                         "lr": 2e-3, "crop": 96, "postprocess": TINY_POSTPROCESS, "class_weighting": "sqrt",
                         "rare_boost": 3.0, "color_jitter": 0.1, "micro_batches": CPU_MICRO_BATCHES}
HV_WEIGHTED_LOSS: dict[str, float] = {"np_ce": 1.0, "np_dice": 1.0, "hv_mse": 4.0, "hv_msge": 8.0, "tp_ce": 1.0, "tp_dice": 1.0}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"widths": (16, 32, 64, 128), "blocks": 1, "steps": 1000, "batch_size": 4, "lr": 2e-3, "crop": 96,
             "postprocess": TINY_POSTPROCESS, "micro_batches": CPU_MICRO_BATCHES},
    "quick": QUICK,
    "cpu": {**QUICK, "blocks": 2, "steps": 4000, "stain_jitter": 0.1, "loss_weights": HV_WEIGHTED_LOSS},
    "base": {"widths": (32, 64, 128, 256, 512), "blocks": 2, "steps": 20000, "batch_size": 16, "lr": 1e-3, "crop": 256,
             "class_weighting": "sqrt", "rare_boost": 3.0, "color_jitter": 0.1},
}


def segmenter_preset(name: str, num_classes: int, **overrides: Any) -> SegmenterConfig:
    """The config of preset ``name`` (a key of :data:`PRESETS`: "tiny", "quick", "cpu" or
    "base") with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown segmenter preset {name!r}; choose one of {sorted(PRESETS)}")
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
    d.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("micro_batches") is None and "batch_size" in d:
        d["micro_batches"] = min(d.get("micro_batches", 1), d["batch_size"])  # a smaller batch than the preset's
    return SegmenterConfig(num_classes=num_classes, **d)


# ---------------------------------------------------------------------------- network
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), _norm(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x + self.body(x))


class _Decoder(nn.Module):
    """Upsampling path with skip connections from the shared encoder, then a 1x1 head."""

    def __init__(self, widths: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        for hi, lo in zip(widths[::-1][:-1], widths[::-1][1:]):
            self.ups.append(nn.ModuleDict({
                "reduce": nn.Conv2d(hi, lo, 1),
                "fuse": nn.Sequential(nn.Conv2d(2 * lo, lo, 3, padding=1), _norm(lo), nn.SiLU(), _ResBlock(lo)),
            }))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, feats[::-1][1:]):
            x = F.interpolate(up["reduce"](x), size=skip.shape[-2:], mode="nearest")
            x = up["fuse"](torch.cat([x, skip], 1))
        return self.head(x)


class HoVerSegmenter(nn.Module):
    """Shared encoder + NP / HV / TP decoders. ``forward(image (B,3,H,W) in [-1, 1])`` returns
    ``{"np": (B,2,H,W) logits, "hv": (B,2,H,W) in [-1, 1], "tp": (B,K+1,H,W) logits}``."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, padding=1), _norm(w[0]), nn.SiLU())
        self.levels = nn.ModuleList()
        for i, c in enumerate(w):
            down = nn.Identity() if i == 0 else nn.Sequential(nn.Conv2d(w[i - 1], c, 3, stride=2, padding=1), _norm(c), nn.SiLU())
            self.levels.append(nn.Sequential(down, *[_ResBlock(c) for _ in range(config.blocks)]))
        k1 = config.num_classes + 1
        if config.decoder == "shared":
            self.decoder = _Decoder(w, 2 + 2 + k1)
        else:
            self.np_branch = _Decoder(w, 2)
            self.hv_branch = _Decoder(w, 2)
            self.tp_branch = _Decoder(w, k1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, h = [], self.stem(x)
        for level in self.levels:
            h = level(h)
            feats.append(h)
        if self.config.decoder == "shared":
            y = self.decoder(feats)
            return {"np": y[:, :2], "hv": torch.tanh(y[:, 2:4]), "tp": y[:, 4:]}
        return {"np": self.np_branch(feats), "hv": torch.tanh(self.hv_branch(feats)), "tp": self.tp_branch(feats)}


# ---------------------------------------------------------------------------- losses
def _soft_dice(prob: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """1 - mean over channels of the soft Dice (batch pooled), channels = dim 1."""
    inter = (prob * onehot).sum((0, 2, 3))
    total = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1.0 - ((2 * inter + eps) / (total + eps)).mean()


def _sobel_5(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """5x5 Sobel kernels (d/dx, d/dy), normalized as HoVer-Net's gradient loss does."""
    deriv = torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0], device=device)
    smooth = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    kx = smooth[:, None] * deriv[None, :]
    kx = kx / kx.abs().sum()
    return kx, kx.t().contiguous()


def _hv_gradients(hv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kx, ky = _sobel_5(hv.device)
    gh = F.conv2d(F.pad(hv[:, :1], (2, 2, 2, 2), mode="replicate"), kx[None, None])
    gv = F.conv2d(F.pad(hv[:, 1:], (2, 2, 2, 2), mode="replicate"), ky[None, None])
    return gh, gv


def segmenter_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], weights: dict[str, float],
                   class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """HoVer-Net's loss: NP CE + Dice, HV MSE + MSGE (inside nuclei), TP CE + Dice.

    ``batch`` holds "mask" (B,1,H,W), "hv" (B,2,H,W) and "type_map" (B,H,W) int64.
    ``class_weights`` (K+1,) weights the type branch's cross-entropy per class (background
    first), e.g. from :func:`type_class_weights`; ``None`` = unweighted.
    """
    mask = batch["mask"][:, 0].long()
    k1 = out["tp"].shape[1]
    terms = {
        "np_ce": F.cross_entropy(out["np"], mask),
        "np_dice": _soft_dice(out["np"].softmax(1), F.one_hot(mask, 2).permute(0, 3, 1, 2).float()),
        "hv_mse": F.mse_loss(out["hv"], batch["hv"]),
        "tp_ce": _weighted_ce(out["tp"], batch["type_map"], class_weights),
        "tp_dice": _soft_dice(out["tp"].softmax(1), F.one_hot(batch["type_map"], k1).permute(0, 3, 1, 2).float()),
    }
    ph, pv = _hv_gradients(out["hv"])
    th, tv = _hv_gradients(batch["hv"])
    focus = batch["mask"]
    terms["hv_msge"] = (focus * ((ph - th) ** 2 + (pv - tv) ** 2)).sum() / (focus.sum() + 1e-8)
    total = sum(weights.get(k, 0.0) * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """Per-pixel CE weighted by the target's class, divided by the pixel count (not by the
    summed weights as torch's weighted mean does): a batch without rare pixels then weighs
    as much as its pixels, and one with rare pixels more."""
    if class_weights is None:
        return F.cross_entropy(logits, target)
    return (F.cross_entropy(logits, target, reduction="none") * class_weights.to(logits.device)[target]).mean()


# ---------------------------------------------------------------------------- training
def type_class_weights(source: Sequence[Sample], mode: str) -> np.ndarray:
    """(K+1,) float64 cross-entropy weights of background and classes 1..K from the pixel
    frequencies ``f_c`` of the source's type maps: ``f_c^-1/2`` ("sqrt") or ``f_c^-1``
    ("inverse"), normalized so that their mean over the source's pixels is 1; a class with
    no pixel gets the largest weight of the present ones. "none" gives ones."""
    if mode not in CLASS_WEIGHTINGS:
        raise ValueError(f"class weighting must be one of {CLASS_WEIGHTINGS}, got {mode!r}")
    k1 = source[0].layout.class_set.num_classes + 1
    if mode == "none":
        return np.ones(k1)
    counts = np.zeros(k1)
    for s in source:
        counts += np.bincount(s.layout.type_map().ravel(), minlength=k1)[:k1]
    freq = counts / counts.sum()
    present = freq > 0
    w = np.zeros(k1)
    w[present] = freq[present] ** (-0.5 if mode == "sqrt" else -1.0)
    w[~present] = w[present].max()
    return w / float((w * freq).sum())


def patch_sampling_weights(source: Sequence[Sample], rare_boost: float) -> np.ndarray:
    """(N,) probabilities of drawing each patch: ``rare_boost`` times more for patches that
    hold a nucleus of the class set's rare class (uniform when there is none or boost 1)."""
    n = len(source)
    rare = source[0].layout.class_set.rare
    w = np.ones(n)
    if rare is not None and rare_boost != 1.0:
        has = np.array([bool((s.layout.classes == rare).any()) for s in source])
        w[has] = rare_boost
    return w / w.sum()


def _color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and per-channel gain of images in [-1, 1]
    (B, 3, H, W), each factor uniform in 1 +- ``strength`` (brightness: +- strength)."""
    b = x.shape[0]

    def draw(*shape: int) -> torch.Tensor:
        return ((torch.rand(b, *shape, generator=gen) * 2 - 1) * strength).to(x.device)

    y = (x + 1) / 2
    y = y * (1 + draw(3, 1, 1))  # stain/scanner colour balance
    mean = y.mean((1, 2, 3), keepdim=True)
    y = (y - mean) * (1 + draw(1, 1, 1)) + mean + draw(1, 1, 1)
    gray = y.mean(1, keepdim=True)
    y = gray + (y - gray) * (1 + draw(1, 1, 1))
    return y.clamp(0, 1) * 2 - 1


def _stain_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """HED stain augmentation of images in [-1, 1] (B, 3, H, W) (Tellez et al. 2018): in
    scikit-image's colour deconvolution (Ruifrok & Johnston), each image's three stain
    optical densities become ``c * alpha + beta``, alpha uniform in 1 +- ``strength`` and
    beta in +- ``strength``, per image and stain."""
    from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

    b = x.shape[0]
    to_hed = torch.as_tensor(hed_from_rgb, dtype=x.dtype, device=x.device)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=x.dtype, device=x.device)
    alpha = (1 + (torch.rand(b, 1, 3, generator=gen) * 2 - 1) * strength).to(x.device, x.dtype)
    beta = ((torch.rand(b, 1, 3, generator=gen) * 2 - 1) * strength).to(x.device, x.dtype)
    rgb = ((x + 1) / 2).clamp_min(1e-6).permute(0, 2, 3, 1).reshape(b, -1, 3)  # (B, HW, 3)
    # skimage's rgb2hed in natural-log optical density units, not clipped at 0: exactly invertible
    hed = (-torch.log(rgb)) @ to_hed
    rgb = torch.exp(-((hed * alpha + beta) @ to_rgb)).clamp(0, 1)
    return (rgb.reshape(b, *x.shape[2:], 3).permute(0, 3, 1, 2) * 2 - 1).contiguous()


def _build(config: SegmenterConfig, seed: int) -> HoVerSegmenter:
    # Initialize from a fixed seed without leaving the global RNG changed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HoVerSegmenter(config)


def train_segmenter(
    source: Sequence[Sample],
    config: SegmenterConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    checkpoint: Callable[[int, HoVerSegmenter], None] | None = None,
    checkpoint_every: int = 0,
) -> tuple[HoVerSegmenter, list[dict[str, float]]]:
    """Train a segmenter on ``source`` (any Sequence[Sample]: a list, a store, a view).

    Batches are drawn with a ``torch.Generator`` seeded by ``seed`` and augmented by
    :class:`nucsynth.data.dataset.SampleDataset` (rot/flip + crop, HV signs exact), so a
    fixed seed on a fixed device gives the same weights. On CPU with ``config.micro_batches``
    > 1 each batch runs as micro-batches on worker threads
    (:class:`nucsynth.micro_batches.MicroBatches`), and the weights are also the same for
    any thread count up to ``micro_batches``. Returns (net in eval mode, log of losses every
    step). ``progress(step, steps, loss)`` is called after each step, and
    ``checkpoint(step, net)`` every ``checkpoint_every`` steps (0 = never; the net stays in
    training mode: copy what you keep).
    """
    from nucsynth.data.dataset import SampleDataset
    from nucsynth.device import inference_memory_format

    if len(source) == 0:
        raise ValueError("the training source holds no samples")
    class_set = source[0].layout.class_set
    if class_set.num_classes != config.num_classes:
        raise ValueError(f"the data has {class_set.num_classes} classes ({class_set.name!r}) but the config {config.num_classes}")
    dev = torch.device(device)
    crop = config.crop
    h, w = source[0].layout.shape
    if crop is not None and (crop > h or crop > w):
        crop = None  # patches smaller than the crop are used whole (then padded)
    data = SampleDataset(source, maps=("mask", "hv", "type_map"), size=crop, augment=True, seed=seed)
    class_weights = None
    if config.class_weighting != "none":
        class_weights = torch.from_numpy(type_class_weights(source, config.class_weighting)).float().to(dev)
    draw_p = torch.from_numpy(patch_sampling_weights(source, config.rare_boost))
    # The device's convolution layout (CPU: channels-last; a two-block cpu training step took
    # 0.90-1.01x the CPU time of NCHW on one thread and 0.92x on two, measured).
    fmt = inference_memory_format(dev)
    net = _build(config, seed).to(dev, memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    gen = torch.Generator().manual_seed(seed)
    log: list[dict[str, float]] = []
    per_epoch = max(1, len(data) // config.batch_size)
    with MicroBatches.for_device(config.micro_batches, dev) as micro:
        forward = micro.wrap(net)
        for step in range(config.steps):
            data.set_epoch(step // per_epoch)
            idx = torch.multinomial(draw_p, config.batch_size, replacement=True, generator=gen).tolist()
            items = [data[i] for i in idx]
            batch = {k: torch.stack([it[k] for it in items]).to(dev) for k in items[0]}
            if config.stain_jitter > 0:
                batch["image"] = _stain_jitter(batch["image"], config.stain_jitter, gen)
            if config.color_jitter > 0:
                batch["image"] = _color_jitter(batch["image"], config.color_jitter, gen)
            image, pad = _pad_to(batch["image"], config.multiple)
            image = image.contiguous(memory_format=fmt)
            out = {k: _unpad(v, pad) for k, v in forward(image).items()}
            loss, terms = segmenter_loss(out, batch, config.loss_weights, class_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            terms["loss"] = float(loss.detach())
            log.append(terms)
            if progress is not None:
                progress(step + 1, config.steps, terms["loss"])
            if checkpoint is not None and checkpoint_every > 0 and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
                checkpoint(step + 1, net)
    return net.eval(), log


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x, (h, w)


def _unpad(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x[..., : size[0], : size[1]]


# ---------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict_batch_maps(
    net: HoVerSegmenter,
    images: Sequence[np.ndarray],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[dict[str, np.ndarray]]:
    """Network maps of uint8 RGB images (H, W, 3), a batch of equal-sized images at a time:
    one ``{"prob": (H, W), "hv": (2, H, W), "type": (K+1, H, W)}`` per image (float32)."""
    from nucsynth.data.dataset import image_to_tensor

    dev = torch.device(device)
    net = net.to(dev).eval()
    out: list[dict[str, np.ndarray]] = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        shapes = {np.asarray(im).shape for im in chunk}
        if len(shapes) != 1:
            raise ValueError(f"images of one batch must share a shape, got {sorted(shapes)}")
        for im in chunk:
            a = np.asarray(im)
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise ValueError(f"images must be uint8 (H, W, 3), got {a.dtype} {a.shape}")
        x = torch.stack([image_to_tensor(np.asarray(im)) for im in chunk]).to(dev)
        x, size = _pad_to(x, net.config.multiple)
        with torch.no_grad():
            res = {k: _unpad(v, size).float().cpu() for k, v in net(x).items()}
        prob = res["np"].softmax(1)[:, 1].numpy()
        tp = res["tp"].softmax(1).numpy()
        hv = res["hv"].numpy()
        out += [{"prob": prob[j], "hv": hv[j], "type": tp[j]} for j in range(len(chunk))]
    return out


def predict_layouts(
    net: HoVerSegmenter,
    images: Sequence[np.ndarray],
    class_set: ClassSet,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    **watershed_params: Any,
) -> list[Layout]:
    """Segment uint8 RGB images (H, W, 3) -> Layouts via the HV watershed.

    Its parameters are the model's ``config.postprocess``, updated by ``watershed_params``.
    """
    if class_set.num_classes != net.config.num_classes:
        raise ValueError(f"class set {class_set.name!r} has {class_set.num_classes} classes, the segmenter {net.config.num_classes}")
    params = {**net.config.postprocess, **watershed_params}
    maps = predict_batch_maps(net, images, batch_size, device)
    return [hv_watershed(m["prob"], m["hv"], m["type"], class_set=class_set, **params) for m in maps]


# Candidate values of each post-processing option searched by tune_postprocess.
# The two-block cpu model chose the largest values of the first grid for sobel_ksize,
# open_ksize and min_size: the grid now reaches past them (Sobel up to OpenCV's 31).
TUNE_GRID: dict[str, tuple[float, ...]] = {
    "threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "marker_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    "sobel_ksize": (5, 7, 9, 11, 15, 21, 25, 31),
    "open_ksize": (1, 3, 5, 7),
    "marker_min_size": (3, 5, 10, 20),
    "min_size": (5, 10, 20, 30, 50),
    "blur_ksize": (1, 3, 5),
}


def tune_postprocess(
    net: HoVerSegmenter,
    samples: Sequence[Sample],
    grid: dict[str, Sequence[float]] | None = None,
    passes: int = 2,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], float]:
    """Choose the HV-watershed options that maximize the mean per-patch PQ on ``samples``
    (use TRAINING patches: tuning on the evaluation split would leak it).

    Coordinate search: starting from the model's ``config.postprocess``, each option in
    turn takes its best value of ``grid`` (default :data:`TUNE_GRID`) with the others
    fixed, ``passes`` times over. The network runs once; only the watershed is repeated.
    Returns (options, their PQ).
    """
    from nucsynth.metrics import evaluate_set

    grid = TUNE_GRID if grid is None else grid
    unknown = sorted(set(grid) - _watershed_options())
    if unknown:
        raise ValueError(f"unknown postprocess options {unknown}; hv_watershed accepts {sorted(_watershed_options())}")
    items = list(samples)
    if not items:
        raise ValueError("no samples to tune on")
    cs = items[0].layout.class_set
    maps = predict_batch_maps(net, [s.image for s in items], device=device)
    truths = [crop_to_source(s.layout, s.provenance) for s in items]  # padding is not scored

    def score(params: dict[str, float]) -> float:
        preds = [crop_to_source(hv_watershed(m["prob"], m["hv"], m["type"], class_set=cs, **params), s.provenance)
                 for m, s in zip(maps, items)]
        return float(evaluate_set(truths, preds)["mean"]["pq"])

    best = dict(net.config.postprocess)
    best_pq = score(best)
    for _ in range(passes):
        for name, values in grid.items():
            for v in values:
                trial = {**best, name: v}
                if trial == best:
                    continue
                pq = score(trial)
                if pq > best_pq:
                    best, best_pq = trial, pq
            if log is not None:
                log(f"{name} = {best.get(name, 'default')}: PQ {best_pq:.4f}")
    return best, best_pq


def _starts(n: int, window: int, stride: int) -> list[int]:
    """Window origins covering 0..n (the last one flush with the end)."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window, stride))
    return starts + [n - window]


def _taper(size: int, ramp: int) -> np.ndarray:
    """1-D blending weight: linear ramps of ``ramp`` px at both ends (never 0), 1 inside."""
    w = np.ones(size, np.float32)
    if ramp > 0:
        r = (np.arange(min(ramp, size // 2)) + 1) / (ramp + 1)
        w[: r.size], w[size - r.size :] = r, r[::-1]
    return w


@torch.no_grad()
def predict_maps(net: HoVerSegmenter, image: np.ndarray, window: int = 256, overlap: int = 64,
                 device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Network maps of one uint8 RGB image (H, W, 3) of any size, from overlapping
    ``window`` px windows (``overlap`` px shared) blended with weights that fall off
    linearly towards each window's edge (edge pixels see the least context).

    Returns ``{"prob": (H, W) nucleus probability, "hv": (2, H, W), "type": (K+1, H, W)
    class probabilities}`` as float32 arrays.
    """
    from nucsynth.data.dataset import image_to_tensor

    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {a.dtype} {a.shape}")
    if window < net.config.multiple or not 0 <= overlap < window:
        raise ValueError(f"need window >= {net.config.multiple} and 0 <= overlap < window, got {window} and {overlap}")
    dev = torch.device(device)
    net = net.to(dev).eval()
    h, w = a.shape[:2]
    k1 = net.config.num_classes + 1
    acc = np.zeros((1 + 2 + k1, h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    stride = window - overlap
    for y0 in _starts(h, window, stride):
        for x0 in _starts(w, window, stride):
            crop = a[y0 : y0 + window, x0 : x0 + window]
            x, size = _pad_to(image_to_tensor(crop)[None].to(dev), net.config.multiple)
            res = {k: _unpad(v, size)[0].float().cpu() for k, v in net(x).items()}
            maps = torch.cat([res["np"].softmax(0)[1:], res["hv"], res["tp"].softmax(0)]).numpy()
            ch, cw = crop.shape[:2]
            wt = _taper(ch, overlap // 2)[:, None] * _taper(cw, overlap // 2)[None, :]
            acc[:, y0 : y0 + ch, x0 : x0 + cw] += maps * wt
            wsum[y0 : y0 + ch, x0 : x0 + cw] += wt
    acc /= wsum
    return {"prob": acc[0], "hv": acc[1:3], "type": acc[3:]}


def segment_image(net: HoVerSegmenter, image: np.ndarray, class_set: ClassSet, window: int = 256, overlap: int = 64,
                  device: str | torch.device = "cpu", **watershed_params: Any) -> Layout:
    """Segment one image of any size: :func:`predict_maps` then ONE HV watershed over the
    whole image (HoVer-Net's whole-image inference), with the model's post-processing
    options updated by ``watershed_params``."""
    if class_set.num_classes != net.config.num_classes:
        raise ValueError(f"class set {class_set.name!r} has {class_set.num_classes} classes, the segmenter {net.config.num_classes}")
    m = predict_maps(net, image, window, overlap, device)
    return hv_watershed(m["prob"], m["hv"], m["type"], class_set=class_set, **{**net.config.postprocess, **watershed_params})


# ---------------------------------------------------------------------------- storage
def save_segmenter(directory: str | Path, net: HoVerSegmenter, class_set: ClassSet, extra: dict[str, Any] | None = None,
                   overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` + ``segmenter.json`` as the folder ``directory``.

    An existing ``directory`` is refused (FileExistsError) unless ``overwrite``; with it the
    old folder stays in place until the new one is complete (:func:`nucsynth.outputs.staged`).
    """
    from safetensors.torch import save_file

    from nucsynth import outputs

    with outputs.staged(directory, overwrite) as tmp:
        tmp.mkdir()
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        meta = {"format": FORMAT, "config": net.config.to_dict(), "class_set": class_set.to_dict(), "extra": extra or {}}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1))
    return Path(directory)


# The segmenter shipped with the package (the cpu preset trained on the CoNSeP training
# tiles; its figures and the command that made it are in docs/benchmarks.md).
DEFAULT_SEGMENTER = Path(__file__).resolve().parent.parent / "assets" / "default_segmenter"


def load_segmenter(directory: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[HoVerSegmenter, ClassSet, dict[str, Any]]:
    """Load a folder written by :func:`save_segmenter` (``None``: the shipped
    :data:`DEFAULT_SEGMENTER`): (net in eval mode, class set, extra)."""
    from safetensors.torch import load_file

    d = DEFAULT_SEGMENTER if directory is None else Path(directory)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"no segmenter at {d}: expected {CONFIG} and {WEIGHTS} in that folder")
    try:
        meta = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / CONFIG} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / CONFIG} is not a segmenter description (format {meta.get('format')!r})")
    net = HoVerSegmenter(SegmenterConfig.from_dict(meta["config"]))
    try:
        net.load_state_dict(load_file(str(d / WEIGHTS)))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"weights in {d / WEIGHTS} do not fit the described segmenter: {e}") from None
    return net.to(torch.device(device)).eval(), ClassSet.from_dict(meta["class_set"]), meta.get("extra", {})
