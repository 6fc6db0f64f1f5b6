"""Training items for latent models with the autoencoder's latents computed once.

A latent model's training step would otherwise run the (frozen) autoencoder encoder on
every batch; on a CPU that is about a fifth of the step. :class:`LatentDataset` encodes every
source patch once in each of the rotations/flips the augmentation can draw (8 for square
patches), keeps the posterior means in memory (float32: 352 CoNSeP patches at 256 px with
f = 4 and 4 channels take 184 MB) and serves random crops aligned to the latent grid. The
latent of a transformed patch is the encoding of the transformed IMAGE, never a rotated
latent (a convolutional encoder is not rotation-equivariant), so an item's latent is the encoding
of its rotated/flipped patch, cropped on the latent grid (away from the patch border this
equals encoding the cropped image; at the border it sees the real neighbourhood).

Items are those of :class:`~nucsynth.data.dataset.SampleDataset` (``"image"`` and the
requested maps, for previews and the condition) plus ``"latent"`` (z, h/f, w/f): the
UNSCALED posterior mean.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from nucsynth.data.dataset import Augmentation, SampleDataset, _maps, image_to_tensor
from nucsynth.layout import Sample

__all__ = ["LatentDataset"]

_VARIANTS = [(k, flip) for k in range(4) for flip in (False, True)]


class LatentDataset(SampleDataset):
    """:class:`SampleDataset` whose items also carry the precomputed autoencoder latent.

    ``encode(images)`` maps float (B, 3, H, W) in [-1, 1] to (B, z, H/f, W/f); ``factor``
    is f. ``size`` (the crop, in image pixels) and the canvas must be multiples of f; crops
    start on the latent grid. ``progress(done, total)`` is called while encoding.
    """

    def __init__(
        self,
        source: Sequence[Sample],
        encode: Callable[[torch.Tensor], torch.Tensor],
        factor: int,
        maps: Sequence[str] = ("onehot", "edge"),
        size: int | tuple[int, int] | None = None,
        augment: bool = True,
        seed: int = 0,
        batch: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__(source, maps=maps, size=size, augment=augment, seed=seed)
        self.factor = int(factor)
        if self.size is not None and (self.size[0] % self.factor or self.size[1] % self.factor):
            raise ValueError(f"latent training: crop size {self.size} must be a multiple of the autoencoder factor {self.factor}")
        self.variants = _VARIANTS if augment else [(0, False)]
        self.latents = self._encode_all(encode, batch, progress)

    def _encode_all(self, encode: Callable[[torch.Tensor], torch.Tensor], batch: int,
                    progress: Callable[[int, int], None] | None) -> list[dict[tuple[int, bool], torch.Tensor]]:
        out: list[dict[tuple[int, bool], torch.Tensor]] = [dict() for _ in range(len(self.source))]
        jobs = [(i, v) for i in range(len(self.source)) for v in self.variants]
        for start in range(0, len(jobs), batch):
            chunk = jobs[start : start + batch]
            images = [Augmentation(k, flip).apply(self._checked(i)).image for i, (k, flip) in chunk]
            shapes = {im.shape for im in images}
            with torch.no_grad():
                if len(shapes) == 1:  # one batched pass
                    z = list(encode(torch.stack([image_to_tensor(im) for im in images])).float().cpu())
                else:  # mixed canvas sizes: one pass each
                    z = [encode(image_to_tensor(im)[None]).float().cpu()[0] for im in images]
            for (i, variant), zi in zip(chunk, z):
                out[i][variant] = zi.clone()
            if progress is not None:
                progress(min(start + batch, len(jobs)), len(jobs))
        return out

    def _checked(self, i: int) -> Sample:
        sample = self.source[i]
        h, w = sample.layout.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"patch {i} is {h}x{w} px: latent training needs sides that are multiples of {self.factor}")
        return sample

    def augmentation(self, index: int, shape: tuple[int, int]) -> Augmentation:
        """As :meth:`SampleDataset.augmentation`, with the crop origin snapped down to the latent grid."""
        aug = super().augmentation(index, shape)
        if aug.crop is None:
            return aug
        y0, x0, h, w = aug.crop
        f = self.factor
        return Augmentation(aug.k, aug.flip, (y0 - y0 % f, x0 - x0 % f, h, w))

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.source)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index %= n
        sample = self.source[index]
        aug = self.augmentation(index, sample.layout.shape)
        z = self.latents[index][(aug.k, aug.flip)]
        if aug.crop is not None:
            y0, x0, h, w = (v // self.factor for v in aug.crop)
            z = z[:, y0 : y0 + h, x0 : x0 + w]
        sample = aug.apply(sample)
        item: dict[str, Any] = {"image": image_to_tensor(sample.image), "latent": z.contiguous()}
        item.update(_maps(sample.layout, self.maps))
        return item
