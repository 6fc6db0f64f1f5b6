"""Inception-v3 as used by FID and IS, with its weights read from a local file only.

The network is torchvision's ``Inception3`` architecture carrying the weights of the
TensorFlow Inception graph of 2015-12-05 that Heusel et al. (2017) used for FID, ported to
PyTorch as ``pt_inception-2015-12-05-6726825d.pth`` (the file pytorch-fid and
torch-fidelity use). That graph differs from torchvision's ImageNet model in a few places,
reproduced here so that the ported weights give the reference features:

- 1008 output classes (the TF graph's label space) and no auxiliary head;
- the average pools inside Mixed_5b-5d, Mixed_6b-6e and Mixed_7b exclude the zero padding
  from the mean (``count_include_pad=False``);
- Mixed_7c pools its pool branch with a 3x3 max pool (stride 1) instead of an average.

Input: RGB in [0, 1], any size; it is resized to 299x299 (bilinear, ``align_corners=False``,
no antialiasing, as pytorch-fid does) and mapped to [-1, 1]. Output: the 2048-d pool3
features (FID) and the 1008 logits computed WITHOUT the final bias, as the original
Inception Score code did (it multiplied pool3 by the softmax weights only).

Weights are never downloaded. They are looked up (1) at the path given by the caller, else
(2) at ``$NUCSYNTH_INCEPTION_WEIGHTS``, else (3) in torch hub's checkpoint folder
(``~/.cache/torch/hub/checkpoints/`` by default; ``$TORCH_HOME`` moves it). Files are read
with ``torch.load(weights_only=True)`` or safetensors: never arbitrary pickle.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "WEIGHTS_FILE",
    "WEIGHTS_ENV",
    "WEIGHTS_URL",
    "INPUT_SIZE",
    "FEATURE_DIM",
    "NUM_CLASSES",
    "build_fid_inception",
    "find_inception_weights",
    "load_fid_inception",
    "resize_for_inception",
]

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SAFETENSORS = "pt_inception-2015-12-05.safetensors"
WEIGHTS_ENV = "NUCSYNTH_INCEPTION_WEIGHTS"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008

# Layers from the input to the 8x8x2048 map before global pooling, in order.
_TRUNK = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
)


def _torchvision_inception() -> Any:
    """torchvision.models.inception, imported through the engine's CPU-safe torchvision import."""
    try:
        from .._torchvision import import_torchvision

        import_torchvision()
        from torchvision.models import inception
    except ImportError as e:
        raise ImportError(
            "FID and IS need torchvision for the Inception-v3 architecture: pip install torchvision "
            "(the version matching your torch)"
        ) from e
    return inception


def _avg_pool_no_pad(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


@lru_cache(maxsize=1)
def _fid_classes() -> dict[str, type]:
    """The FID-specific Inception blocks and network, as subclasses of torchvision's."""
    tvi = _torchvision_inception()

    class FIDInceptionA(tvi.InceptionA):
        def _forward(self, x: Tensor) -> list[Tensor]:
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_no_pad(x))]

    class FIDInceptionC(tvi.InceptionC):
        def _forward(self, x: Tensor) -> list[Tensor]:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
                bd = m(bd)
            return [self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_no_pad(x))]

    class FIDInceptionE(tvi.InceptionE):
        pool = staticmethod(_avg_pool_no_pad)

        def _forward(self, x: Tensor) -> list[Tensor]:
            t = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            return [self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))]

    class FIDInceptionEMax(FIDInceptionE):
        pool = staticmethod(_max_pool)

    class FIDInceptionV3(tvi.Inception3):
        """Inception-v3 with the FID blocks; ``forward(x in [0,1]) -> (pool3 (B,2048), logits (B,1008))``."""

        def __init__(self) -> None:
            blocks = [tvi.BasicConv2d, FIDInceptionA, tvi.InceptionB, FIDInceptionC, tvi.InceptionD,
                      FIDInceptionE, tvi.InceptionAux]
            super().__init__(num_classes=NUM_CLASSES, aux_logits=False, transform_input=False,
                             inception_blocks=blocks, init_weights=False)
            self.Mixed_7c = FIDInceptionEMax(2048)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            x = resize_for_inception(x) * 2.0 - 1.0
            for name in _TRUNK:
                x = getattr(self, name)(x)
            feats = torch.flatten(self.avgpool(x), 1)
            return feats, F.linear(feats, self.fc.weight)

    return {"FIDInceptionV3": FIDInceptionV3}


def resize_for_inception(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 3, 299, 299), bilinear, ``align_corners=False`` (no-op at 299)."""
    if tuple(x.shape[-2:]) == (INPUT_SIZE, INPUT_SIZE):
        return x
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


def build_fid_inception() -> nn.Module:
    """The FID Inception-v3 architecture with random weights (eval mode); its ``state_dict``
    has the key format of ``pt_inception-2015-12-05-6726825d.pth``."""
    return _fid_classes()["FIDInceptionV3"]().eval()


def _cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _in_folder(folder: Path) -> Path:
    for name in (WEIGHTS_FILE, WEIGHTS_SAFETENSORS):
        if (folder / name).is_file():
            return folder / name
    return folder / WEIGHTS_FILE


def _how_to_obtain() -> str:
    return (
        f"FID/IS need the Inception-v3 weights file {WEIGHTS_FILE} (the ported TF 2015-12-05 "
        f"graph used by pytorch-fid and torch-fidelity; nothing is downloaded here). Get it from "
        f"{WEIGHTS_URL} and pass its path (--inception-weights PATH / weights=PATH), or set "
        f"{WEIGHTS_ENV}=PATH, or put it at {_cache_path()}"
    )


def find_inception_weights(weights: str | os.PathLike[str] | None = None) -> Path:
    """The weights file to use: ``weights`` (a file, or a folder holding the standard file name)
    if given, else ``$NUCSYNTH_INCEPTION_WEIGHTS`` if set, else torch hub's checkpoint folder.

    An explicitly given path or environment variable that does not exist is an error (it is
    not silently replaced by the cache). Raises FileNotFoundError naming every place looked
    at, the expected file name and where to obtain it.
    """
    if weights is not None and str(weights) != "":
        places = [(Path(weights).expanduser(), "the weights argument")]
    elif os.environ.get(WEIGHTS_ENV):
        places = [(Path(os.environ[WEIGHTS_ENV]).expanduser(), f"${WEIGHTS_ENV}")]
    else:
        places = [(_cache_path(), f"torch hub's checkpoint folder (no weights argument, ${WEIGHTS_ENV} not set)")]
    looked = []
    for path, what in places:
        candidate = _in_folder(path) if path.is_dir() else path
        if candidate.is_file():
            return candidate
        looked.append(f"{candidate} ({what})")
    raise FileNotFoundError(f"Inception-v3 weights not found; looked at: {'; '.join(looked)}. {_how_to_obtain()}")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, which we never do; keep only the cause.
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0].split(" Please use")[0]
        raise ValueError(
            f"{path}: could not read Inception weights as a plain tensor state dict (loading with "
            f"weights_only=True refuses arbitrary pickled objects; the file may also be corrupt): {detail}"
        ) from e
    except Exception as e:  # corrupt/truncated files raise assorted errors
        raise ValueError(f"{path}: could not read Inception weights ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(sd).__name__}")
    return sd


def _check_keys(net: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    expected = net.state_dict()
    fc = sd.get("fc.weight")
    if fc is not None and tuple(fc.shape) != (NUM_CLASSES, FEATURE_DIM):
        hint = (" (these look like torchvision's 1000-class ImageNet weights, not the FID weights)"
                if tuple(fc.shape) == (1000, FEATURE_DIM) else "")
        raise ValueError(f"{path}: fc.weight has shape {tuple(fc.shape)}, expected "
                         f"({NUM_CLASSES}, {FEATURE_DIM}){hint}. {_how_to_obtain()}")
    # BatchNorm counters are bookkeeping only; old checkpoints lack them.
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing keys, e.g. {missing[:3]}" if missing else "",
                 f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}" if unexpected else "",
                 f"wrong shapes: {wrong[:3]}" if wrong else ""]
        raise ValueError(f"{path}: not FID Inception-v3 weights: {'; '.join(p for p in parts if p)}. {_how_to_obtain()}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_fid_inception(
    weights: str | os.PathLike[str] | None = None, device: "torch.device | str | None" = None
) -> tuple[nn.Module, dict[str, str]]:
    """The FID Inception-v3 network (eval mode, on ``device``; default
    :func:`nucsynth.device.pick_device`) and ``{"path", "sha256"}`` of the weights used.

    The standard file's name carries the first 8 hex digits of its SHA-256 (``6726825d``);
    the returned digest lets reports state which weights produced a score.
    Raises FileNotFoundError (see :func:`find_inception_weights`) or ValueError for a file
    that is not a state dict of this architecture.
    """
    from ..device import pick_device

    path = find_inception_weights(weights)
    sd = _read_state_dict(path)
    net = build_fid_inception()
    _check_keys(net, sd, path)
    net.load_state_dict(sd, strict=False)  # strictness checked above, counters excepted
    dev = device if isinstance(device, torch.device) else pick_device(device)
    return net.to(dev).eval(), {"path": str(path), "sha256": _sha256(path)}
