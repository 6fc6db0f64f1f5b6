"""Format detection and the one entry point :func:`read_source` over every reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from nucsynth.io.errors import FormatError
from nucsynth.layout import Sample

__all__ = ["FORMATS", "detect_format", "read_source"]

FORMATS = ("consep", "monuseg", "pannuke", "lizard", "geojson", "folder", "store")


def _mat_keys(path: Path) -> set[str]:
    import scipy.io as sio

    try:
        return {name for name, _, _ in sio.whosmat(path)}
    except Exception as e:
        raise FormatError(path, f"cannot read the .mat file (truncated or not a .mat file): {e}") from None


def _mat_format(path: Path) -> str:
    keys = _mat_keys(path)
    if {"id", "class"} <= keys:
        return "lizard"
    if "inst_map" in keys:
        return "consep"
    raise FormatError(path, f"a .mat with neither CoNSeP (inst_map) nor Lizard (inst_map, id, class) keys: {sorted(keys)}")


def detect_format(path: str | Path) -> str:
    """The format of ``path`` (one of :data:`FORMATS`), from its layout; FormatError if unknown."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_file():
        suf = p.suffix.lower()
        if suf == ".xml":
            return "monuseg"
        if suf in (".geojson", ".json"):
            return "geojson"
        if suf == ".mat":
            return _mat_format(p)
        raise FormatError(p, "cannot tell the format of this file (known files: .xml MoNuSeg, .geojson/.json QuPath, .mat CoNSeP/Lizard)")
    if (p / "zarr.json").is_file():
        return "store"
    for labels in (p / "Labels", p / "Lizard_Labels" / "Labels"):
        mats = sorted(labels.glob("*.mat")) if labels.is_dir() else []
        if mats:
            return _mat_format(mats[0])
    if (p / "Annotations").is_dir() or any(p.glob("*.xml")):
        return "monuseg"
    if (p / "images").is_dir() and (p / "labels").is_dir():
        return "folder"
    if (p / "masks.npy").is_file() or any(p.rglob("masks.npy")):
        return "pannuke"
    raise FormatError(
        p,
        "cannot tell the format: expected Images/+Labels/*.mat (CoNSeP, Lizard), Annotations/*.xml (MoNuSeg), "
        "images.npy+masks.npy (PanNuke), images/+labels/ (plain folder) or a dataset store",
    )


def _readers() -> dict[str, Callable[..., Any]]:
    from nucsynth.io.consep import read_consep
    from nucsynth.io.folder import read_folder
    from nucsynth.io.geojson import read_geojson
    from nucsynth.io.lizard import read_lizard
    from nucsynth.io.monuseg import read_monuseg
    from nucsynth.io.pannuke import read_pannuke

    def store(path: Path, **kw: Any) -> list[Sample]:
        from nucsynth.io.store import DatasetStore

        return list(DatasetStore.open(path, **kw))

    def geojson(path: Path, **kw: Any) -> list[Sample]:
        if kw.get("image") is None:
            raise ValueError(f"{path}: reading GeoJSON as a source needs its image (option image=...)")
        return [read_geojson(path, **kw)]

    return {"consep": read_consep, "monuseg": read_monuseg, "pannuke": read_pannuke, "lizard": read_lizard,
            "geojson": geojson, "folder": read_folder, "store": store}


def read_source(path: str | Path, fmt: str | None = None, **options: Any) -> list[Sample]:
    """Read any supported source; ``fmt`` (one of :data:`FORMATS`) skips auto-detection.

    ``options`` go to the format's reader (e.g. ``merge_classes`` for CoNSeP).
    """
    p = Path(path)
    if fmt is None:
        fmt = detect_format(p)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    try:
        return _readers()[fmt](p, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"option not understood by the {fmt} reader: {e}") from None
        raise
