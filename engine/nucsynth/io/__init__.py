"""Readers for the nucleus datasets users arrive with, and the zarr dataset store.

Every reader returns :class:`~nucsynth.layout.Sample` objects (RGB uint8 image + Layout +
provenance) with centroids in the engine's (y, x) order, and raises :class:`FormatError`
(a ``ValueError``) naming the file and the problem on malformed input. The coordinate
convention and class mapping of each format are in its module doc and docs/formats.md.
"""

from nucsynth.io.errors import FormatError
from nucsynth.io.classes import CONSEP7_CLASSES, GLYSAC_CLASSES, MERGES, ClassMerge, custom_merge, get_merge
from nucsynth.io.consep import read_consep, read_consep_file
from nucsynth.io.monuseg import parse_aperio_xml, read_monuseg, read_monuseg_file
from nucsynth.io.pannuke import read_pannuke
from nucsynth.io.lizard import read_lizard, read_lizard_file
from nucsynth.io.geojson import QuPathRead, SkippedObjectsWarning, read_geojson, read_qupath, write_geojson
from nucsynth.io.folder import read_folder
from nucsynth.io.detect import FORMATS, detect_format, read_source
from nucsynth.io.store import DatasetStore

__all__ = [
    "FormatError",
    "DatasetStore",
    "FORMATS",
    "detect_format",
    "read_source",
    "read_consep",
    "read_consep_file",
    "read_monuseg",
    "read_monuseg_file",
    "parse_aperio_xml",
    "read_pannuke",
    "read_lizard",
    "read_lizard_file",
    "read_geojson",
    "read_qupath",
    "QuPathRead",
    "SkippedObjectsWarning",
    "write_geojson",
    "read_folder",
    "CONSEP7_CLASSES",
    "GLYSAC_CLASSES",
    "MERGES",
    "ClassMerge",
    "custom_merge",
    "get_merge",
]
