"""napari sample data: a generated layout with its procedural image, and tissue rendered by
the shipped default model. Both are made on the fly by the engine (no data files ship)."""

from __future__ import annotations

from typing import Any

from napari_nucsynth._layers import sample_to_layers

__all__ = ["procedural_tissue"]

LayerDataTuple = tuple[Any, dict[str, Any], str]
SIZE = (256, 256)
SEED = 0


def procedural_tissue() -> list[LayerDataTuple]:
    """A random CoNSeP-like layout (shapes and class mix from real-data statistics) with a
    simple procedural H&E-like image: the image plus the layout's three layers."""
    from nucsynth.generate.tissue import procedural_sample

    return sample_to_layers(procedural_sample(SIZE, seed=SEED), "procedural")
