"""nucsynth: the headless engine of NucSynth.

Synthesizes H&E tissue together with pixel-exact nuclei labels. The data contract lives in
:mod:`nucsynth.layout`; readers and the dataset store in :mod:`nucsynth.io`.
The engine never imports Qt or napari.
"""

# The OpenMP wait policy must be in the environment before torch loads its runtime.
from nucsynth.threads import configure_environment as _configure_environment

_configure_environment()

from nucsynth.layout import (  # noqa: E402
    CONSEP_CLASSES,
    LIZARD_CLASSES,
    NUCLEUS_CLASSES,
    PANNUKE_CLASSES,
    ClassSet,
    Layout,
    LayoutError,
    Sample,
)

__version__ = "0.1.0"

__all__ = [
    "ClassSet",
    "Layout",
    "LayoutError",
    "Sample",
    "CONSEP_CLASSES",
    "LIZARD_CLASSES",
    "NUCLEUS_CLASSES",
    "PANNUKE_CLASSES",
    "__version__",
]
