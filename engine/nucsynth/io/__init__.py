"""Readers for the nucleus datasets users arrive with, and the zarr dataset store.

Every reader returns :class:`~nucsynth.layout.Sample` objects (RGB uint8 image + Layout +
provenance) with centroids in the engine's (y, x) order, and raises :class:`FormatError`
(a ``ValueError``) naming the file and the problem on malformed input. See docs/formats.md.
"""

from nucsynth.io.errors import FormatError
from nucsynth.io.consep import read_consep, read_consep_file
from nucsynth.io.store import DatasetStore

__all__ = ["FormatError", "DatasetStore", "read_consep", "read_consep_file"]
