"""napari sample data: a generated layout with its procedural image, and tissue rendered by
the shipped default model. Both are made on the fly by the engine (no data files ship).

The rendered sample never runs diffusion on napari's main thread: its layout appears at
once (beside any open layers) and the default model renders it in a worker, with progress
in napari's activity panel; the image slides in under the layout when it is done.
"""

from __future__ import annotations

from typing import Any

from napari_nucsynth._layers import free_origin, layout_to_layers, sample_to_layers, unused_name

__all__ = ["procedural_tissue", "rendered_tissue"]

LayerDataTuple = tuple[Any, dict[str, Any], str]
SIZE = (256, 256)
SEED = 0
_RUNNING: set[Any] = set()  # render jobs of sample data, kept alive until they end


def procedural_tissue() -> list[LayerDataTuple]:
    """A random CoNSeP-like layout (shapes and class mix from real-data statistics) with a
    simple procedural H&E-like image: the image plus the layout's three layers."""
    from nucsynth.generate.tissue import procedural_sample

    out = sample_to_layers(procedural_sample(SIZE, seed=SEED), "procedural")
    return _placed(out)


def _placed(layers: list[LayerDataTuple]) -> list[LayerDataTuple]:
    """The layers moved beside what the current viewer already shows (names made unique)."""
    import napari

    viewer = napari.current_viewer()
    if viewer is None or not len(viewer.layers):
        return layers
    translate = free_origin(viewer)
    base = layers[-1][1]["metadata"]["nucsynth"]["layout"]
    name = unused_name(viewer, base)
    for _, kwargs, _ in layers:
        kwargs["translate"] = translate
        kwargs["name"] = kwargs["name"].replace(base, name, 1)
        kwargs["metadata"]["nucsynth"]["layout"] = name
    return layers


def rendered_tissue(steps: int | None = None) -> list[LayerDataTuple]:
    """A random layout (the default model's patch size and classes) rendered by the default
    semantic model (``$NUCSYNTH_CHECKPOINT``, else the one shipped in the package) with
    ``steps`` sampler steps (default: the engine's).

    In napari the layout's layers are returned at once and the image is added under them by
    a worker when the render ends; without a viewer the render runs here and the image comes
    first in the returned list. Raises FileNotFoundError naming where it looked when no
    default model is installed.
    """
    import napari

    from nucsynth.checkpoint import read_config, resolve_checkpoint
    from nucsynth.generate.layouts import random_layout
    from nucsynth.layout import ClassSet

    ckpt = resolve_checkpoint(None)
    cfg = read_config(ckpt).get("model", {})
    size = int(cfg.get("image_size") or SIZE[0])
    cs = ClassSet.from_dict(cfg["class_set"]) if "class_set" in cfg else None
    layout = random_layout((size, size), seed=SEED, **({"class_set": cs} if cs is not None else {}))
    params = _params(str(ckpt), steps)
    viewer = napari.current_viewer()
    if viewer is None:
        from napari_nucsynth._jobs import run_now

        sample, family = run_now(_render(params, layout, None))
        layers = sample_to_layers(sample, "rendered")
        layers[0][1]["metadata"] = _metadata(sample, params, "rendered", family)
        return layers
    layers = _placed(layout_to_layers(layout, "rendered", over_image=True))
    _start(viewer, params, layout, layers[0][1]["metadata"]["nucsynth"]["layout"], layers[0][1]["translate"])
    return layers


def _params(checkpoint: str, steps: int | None) -> Any:
    from napari_nucsynth._render import RenderParams

    return RenderParams(checkpoint=checkpoint, seed=SEED, **({} if steps is None else {"steps": int(steps)}))


def _metadata(sample: Any, params: Any, name: str, family: str) -> dict[str, Any]:
    from napari_nucsynth._render import render_metadata

    return render_metadata(sample, params, name, family)


def _render(params: Any, layout: Any, cancel: Any):
    """Worker body: the engine renders ``layout`` (progress per step)."""
    from nucsynth.synthesize import get_synthesizer

    from napari_nucsynth._render import render_steps

    synth = get_synthesizer(params.checkpoint)
    sample = yield from render_steps(synth, layout, params, cancel=cancel)
    return None if sample is None else (sample, synth.family)


def _start(viewer: Any, params: Any, layout: Any, name: str, translate: Any) -> None:
    from napari.utils.notifications import show_error

    from napari_nucsynth._jobs import Job

    def done(result: Any) -> None:
        if result is None:
            return
        sample, family = result
        image = viewer.add_image(sample.image, name=f"{name} image", rgb=True, translate=translate,
                                 metadata=_metadata(sample, params, name, family))
        inst = f"{name} instances"
        if inst in viewer.layers:  # under the layout, drawn as outlines, so the tissue shows
            viewer.layers.move(viewer.layers.index(image), viewer.layers.index(inst))
            viewer.layers[inst].contour = 1

    job = Job(f"Rendering sample {name!r}", on_done=done, on_error=lambda e: show_error(f"sample render failed: {e}"),
              on_end=lambda: _RUNNING.discard(job), total=params.steps)
    _RUNNING.add(job)
    job.start(_render, params, layout, job.cancel_event)
