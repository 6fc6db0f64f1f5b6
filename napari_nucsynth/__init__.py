"""napari-nucsynth: design nuclei layouts in napari and render synthetic H&E tissue.

The plugin holds no science: every computation is a call into the ``nucsynth`` engine.
"""

__version__ = "0.1.0"
