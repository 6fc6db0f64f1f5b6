"""A torch Dataset over Samples with geometric augmentation that keeps HV signs right.

Each item is a dict of tensors: ``"image"`` float32 (3, H, W) in [-1, 1] and one entry per
requested map (see :data:`MAPS`). Augmentation acts on the *Layout* and the image together
(a random element of the 8 rotations/flips of the square, then an optional random crop to
``size``) and the maps are derived AFTER it, so HV maps, edges and distance maps are exact
by construction; no map is ever rotated by hand.

Randomness is drawn from a generator seeded by ``(seed, epoch, index)``: an item does not
depend on worker processes, on the order of access or on other items. Call
:meth:`SampleDataset.set_epoch` before each epoch (in the main process, before the
DataLoader's iterator is created; with ``persistent_workers=True`` workers keep the epoch
they were started with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, overload

import numpy as np
import torch
from torch.utils.data import Dataset

from nucsynth.layout import ClassSet, Layout, Sample

__all__ = ["MAPS", "Augmentation", "SampleDataset", "SourceView", "split_source", "image_to_tensor"]

# name -> (dtype, description); float maps carry a channel axis, integer maps do not.
MAPS: dict[str, str] = {
    "onehot": "float32 (K+1, H, W) one-hot classes, channel 0 = background",
    "edge": "float32 (1, H, W) instance edges (4-neighbour)",
    "hv": "float32 (2, H, W) HoVer-Net horizontal and vertical maps",
    "mask": "float32 (1, H, W) nucleus (1) / background (0)",
    "dist": "float32 (1, H, W) per-nucleus normalized distance map",
    "points": "int64 (H, W) class id at each centroid pixel (K+1 for unknown class)",
    "type_map": "int64 (H, W) class of each pixel",
    "inst_map": "int64 (H, W) instance ids 1..N",
}


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def _maps(layout: Layout, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The requested derived maps of ``layout`` as tensors."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "onehot":
            a = layout.onehot()
        elif name == "edge":
            a = layout.edge_map()[None]
        elif name == "hv":
            a = layout.hv_maps()
        elif name == "mask":
            a = (layout.inst_map > 0).astype(np.float32)[None]
        elif name == "dist":
            a = layout.distance_map()[None]
        elif name == "points":
            a = layout.point_map().astype(np.int64)
        elif name == "type_map":
            a = layout.type_map().astype(np.int64)
        else:  # "inst_map" (names are validated in SampleDataset.__init__)
            a = layout.inst_map.astype(np.int64)
        out[name] = torch.from_numpy(np.ascontiguousarray(a))
    return out


@dataclass(frozen=True)
class Augmentation:
    """One draw: ``k`` quarter turns (counter-clockwise), then a horizontal flip if
    ``flip``, then the crop window ``(y0, x0, h, w)`` (``None`` = the whole canvas)."""

    k: int = 0
    flip: bool = False
    crop: tuple[int, int, int, int] | None = None

    def apply(self, sample: Sample) -> Sample:
        """The transformed Sample (layout and image together)."""
        layout, image = sample.layout, sample.image
        if self.k:
            layout, image = layout.rot90(self.k), np.rot90(image, self.k)
        if self.flip:
            layout, image = layout.flip(1), np.flip(image, 1)
        if self.crop is not None:
            y0, x0, h, w = self.crop
            layout, image = layout.crop(y0, x0, h, w), image[y0 : y0 + h, x0 : x0 + w]
        return Sample(layout, np.ascontiguousarray(image), sample.provenance)


def _size_pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in pair):
        raise ValueError(f"size must be None, a positive int or a pair (h, w) of positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])


class SampleDataset(Dataset):
    """Items for training from any ``Sequence[Sample]`` (a list, a DatasetStore, a view).

    ``maps``: names from :data:`MAPS`. ``size``: crop every item to (h, w) (random window
    when ``augment``, the centre otherwise); ``None`` keeps the whole canvas. ``augment``:
    random rotation/flip (+ random crop). Quarter turns are used only when they keep the
    output shape (square samples or a square ``size``); otherwise rotations are limited to
    0 and 180 degrees (still with random flips).
    """

    def __init__(
        self,
        source: Sequence[Sample],
        maps: Sequence[str] = ("onehot", "edge"),
        size: int | tuple[int, int] | None = None,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        if isinstance(maps, str):
            maps = (maps,)
        unknown = [m for m in maps if m not in MAPS]
        if unknown:
            raise ValueError(f"unknown map(s) {unknown}; available: {sorted(MAPS)}")
        if len(set(maps)) != len(maps):
            raise ValueError(f"maps are listed more than once: {list(maps)}")
        if len(source) == 0:
            raise ValueError("the source holds no samples")
        self.source = source
        self.maps = tuple(maps)
        self.size = _size_pair(size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of an epoch (items are a function of seed, epoch, index)."""
        self.epoch = int(epoch)

    @property
    def class_set(self) -> ClassSet:
        """The source's class set (that of its first sample when the source has none)."""
        cs = getattr(self.source, "class_set", None)
        return cs if isinstance(cs, ClassSet) else self.source[0].layout.class_set

    def __len__(self) -> int:
        return len(self.source)

    def augmentation(self, index: int, shape: tuple[int, int]) -> Augmentation:
        """The augmentation of item ``index`` in the current epoch for a canvas ``shape``."""
        h, w = shape
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k, flip = 0, False
        if self.augment:
            square_out = (self.size[0] == self.size[1]) if self.size is not None else (h == w)
            k = int(rng.integers(4)) if square_out else 2 * int(rng.integers(2))
            flip = bool(rng.integers(2))
        if k % 2:
            h, w = w, h
        crop = None
        if self.size is not None:
            th, tw = self.size
            if th > h or tw > w:
                raise ValueError(f"item {index}: sample is {h}x{w} px, smaller than the crop size {th}x{tw}")
            if self.augment:
                y0, x0 = int(rng.integers(h - th + 1)), int(rng.integers(w - tw + 1))
            else:
                y0, x0 = (h - th) // 2, (w - tw) // 2
            crop = (y0, x0, th, tw)
        return Augmentation(k, flip, crop)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.source)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index %= n
        sample = self.source[index]
        sample = self.augmentation(index, sample.layout.shape).apply(sample)
        item = {"image": image_to_tensor(sample.image)}
        item.update(_maps(sample.layout, self.maps))
        return item


class SourceView(Sequence[Sample]):
    """A read-only view of some samples of a source, by index (e.g. one split of a store)."""

    def __init__(self, source: Sequence[Sample], indices: Sequence[int] | np.ndarray) -> None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError(f"indices must be a 1-D array of integers, got shape {idx.shape} dtype {idx.dtype}")
        n = len(source)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"indices must lie in 0..{n - 1} for a source of {n} samples, got {idx.min()}..{idx.max()}")
        self.source = source
        self.indices = idx.astype(np.int64)

    @property
    def class_set(self) -> ClassSet | None:
        """The underlying source's class set, when it has one."""
        return getattr(self.source, "class_set", None)

    def __len__(self) -> int:
        return int(self.indices.size)

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice):
            return [self.source[int(j)] for j in self.indices[i]]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a view of {n} samples")
        return self.source[int(self.indices[i])]

    def __iter__(self) -> Iterator[Sample]:
        return (self.source[int(j)] for j in self.indices)


def split_source(source: Sequence[Sample], indices: Sequence[int] | np.ndarray) -> SourceView:
    """A view of ``source`` holding ``source[i]`` for ``i`` in ``indices`` (order kept).

    With a DatasetStore: ``split_source(store, store.indices("train"))``.
    """
    return SourceView(source, indices)
