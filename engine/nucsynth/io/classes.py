"""Class sets of the raw datasets and the explicit class merges between them.

A merge is never applied silently: readers take a ``merge_classes`` option and record the
merge they applied in each Sample's provenance (``"class_merge"``).

- ``"consep7"``: the original 7 CoNSeP classes (Graham et al. 2019) to the 4 classes the
  HoVer-Net paper evaluates: 1 other -> other, 2 inflammatory -> inflammatory,
  3 healthy epithelial + 4 dysplastic/malignant epithelial -> epithelial,
  5 fibroblast + 6 muscle + 7 endothelial -> spindle-shaped.
- ``"glysac"``: the 10 raw GLySAC nucleus types (Doan et al. 2022) to the 3 classes used
  for training and evaluation (other, lymphocyte, epithelial): raw ids 1, 2, 9, 10 ->
  other; 4, 5, 6, 7 -> lymphocyte; 3, 8 -> epithelial. This is the grouping used by
  published GLySAC pipelines; check it against the type table shipped with your copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from nucsynth.layout import CONSEP_CLASSES, ClassSet

__all__ = ["CONSEP7_CLASSES", "GLYSAC_CLASSES", "ClassMerge", "MERGES", "get_merge", "custom_merge"]

CONSEP7_CLASSES = ClassSet(
    "consep7",
    ("other", "inflammatory", "healthy epithelial", "malignant epithelial", "fibroblast", "muscle", "endothelial"),
    ((255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 128, 255), (255, 255, 0), (255, 128, 0), (128, 64, 0)),
    rare=1,
)
GLYSAC_CLASSES = ClassSet(
    "glysac3",
    ("other", "lymphocyte", "epithelial"),
    ((255, 0, 0), (0, 255, 0), (0, 0, 255)),
    rare=1,
)


@dataclass(frozen=True)
class ClassMerge:
    """Maps raw class ids ``1..len(lut)-1`` to ids of ``target`` (``lut[raw] = merged``)."""

    name: str
    lut: tuple[int, ...]
    target: ClassSet

    @property
    def max_source_id(self) -> int:
        """The largest raw class id this merge knows."""
        return len(self.lut) - 1

    def apply(self, classes: np.ndarray) -> np.ndarray:
        """Merged class ids; raw ids must lie in 0..max_source_id (checked by the caller)."""
        return np.asarray(self.lut, np.int64)[np.asarray(classes, np.int64)]


MERGES: dict[str, ClassMerge] = {
    "consep7": ClassMerge("consep7", (0, 1, 2, 3, 3, 4, 4, 4), CONSEP_CLASSES),
    "glysac": ClassMerge("glysac", (0, 1, 1, 3, 2, 2, 2, 2, 3, 1, 1), GLYSAC_CLASSES),
}


def get_merge(name: str) -> ClassMerge:
    """The named merge, or a ValueError listing the known ones."""
    try:
        return MERGES[name]
    except KeyError:
        raise ValueError(f"unknown class merge {name!r}; known merges: {sorted(MERGES)}") from None


def custom_merge(mapping: Mapping[int, int], target: ClassSet) -> ClassMerge:
    """A merge from an explicit ``{raw id: target id}`` mapping (0 stays 0)."""
    if not mapping:
        raise ValueError("a class mapping needs at least one entry")
    top = max(int(k) for k in mapping)
    lut = [0] * (top + 1)
    for raw, new in mapping.items():
        if int(raw) < 1 or not 0 <= int(new) <= target.num_classes:
            raise ValueError(
                f"class mapping {raw}->{new}: raw ids must be >= 1 and targets in 0..{target.num_classes}"
            )
        lut[int(raw)] = int(new)
    return ClassMerge(f"custom->{target.name}", tuple(lut), target)
