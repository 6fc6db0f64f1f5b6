"""napari sample data: a generated layout with its procedural image, and tissue rendered by
the shipped default model. Both are made on the fly by the engine (no data files ship)."""

from __future__ import annotations

from typing import Any

from napari_nucsynth._layers import sample_to_layers

__all__ = ["procedural_tissue", "rendered_tissue"]

LayerDataTuple = tuple[Any, dict[str, Any], str]
SIZE = (256, 256)
SEED = 0


def procedural_tissue() -> list[LayerDataTuple]:
    """A random CoNSeP-like layout (shapes and class mix from real-data statistics) with a
    simple procedural H&E-like image: the image plus the layout's three layers."""
    from nucsynth.generate.tissue import procedural_sample

    return sample_to_layers(procedural_sample(SIZE, seed=SEED), "procedural")


def rendered_tissue(steps: int = 20) -> list[LayerDataTuple]:
    """A random layout (the model's patch size) rendered by the default semantic model
    (``$NUCSYNTH_CHECKPOINT``, else the one shipped in the package) in ``steps`` sampler
    steps: the rendered image plus the layout's three layers.

    Raises FileNotFoundError naming where it looked when no default model is installed.
    """
    from nucsynth.checkpoint import resolve_checkpoint
    from nucsynth.generate.layouts import random_layout
    from nucsynth.layout import Sample

    from napari_nucsynth._render import RenderParams, load_model, render_metadata, render_steps

    ckpt = resolve_checkpoint(None)
    model = load_model(ckpt)
    size = int(model.image_size or SIZE[0])
    layout = random_layout((size, size), class_set=model.class_set, seed=SEED)
    params = RenderParams(checkpoint=str(ckpt), seed=SEED, steps=steps)
    steps = render_steps(model, layout, params)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        sample: Sample = done.value
    layers = sample_to_layers(sample, "rendered")
    layers[0][1]["metadata"] = render_metadata(sample, params, "rendered", model.name)
    return layers
