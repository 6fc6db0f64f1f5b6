"""Plugin reader, writers, sample data and manifest (no Qt needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.components import ViewerModel  # noqa: E402

from napari_nucsynth._layers import LayoutLayers, layer_names, layers_to_layout  # noqa: E402
from napari_nucsynth._reader import format_of, get_reader  # noqa: E402
from napari_nucsynth._sample_data import procedural_tissue  # noqa: E402
from napari_nucsynth._writer import write_geojson, write_store  # noqa: E402
from nucsynth.layout import CONSEP_CLASSES  # noqa: E402


def _add(viewer: ViewerModel, tuples) -> None:
    for data, kwargs, kind in tuples:
        getattr(viewer, f"add_{kind}")(data, **kwargs)


def _full(viewer: ViewerModel, names: list[str]):
    """The (data, attributes, type) triples napari hands a writer."""
    return [(viewer.layers[n].data, viewer.layers[n]._get_state(), viewer.layers[n]._type_string) for n in names]


@pytest.fixture
def viewer_with_sample() -> ViewerModel:
    viewer = ViewerModel()
    _add(viewer, procedural_tissue())
    return viewer


def test_sample_data_is_an_image_and_a_layout(viewer_with_sample: ViewerModel) -> None:
    names = [ly.name for ly in viewer_with_sample.layers]
    assert names == ["procedural image", *layer_names("procedural").values()]
    lay = layers_to_layout(viewer_with_sample.layers["procedural instances"], viewer_with_sample.layers["procedural centroids"])
    assert lay.num_nuclei > 10 and lay.class_set == CONSEP_CLASSES
    assert set(np.unique(lay.classes)) <= {1, 2, 3, 4}


def test_store_round_trip_keeps_classes_and_colours(viewer_with_sample: ViewerModel, tmp_path: Path) -> None:
    v = viewer_with_sample
    ctrl = LayoutLayers.attach(v, "procedural")
    ctrl.set_class([1, 2], 1)  # make the rare class present
    before = ctrl.layout()
    out = tmp_path / "one.zarr"
    assert write_store(str(out), _full(v, ["procedural image", *layer_names("procedural").values()])) == [str(out)]
    assert format_of(out) == "store"
    reader = get_reader(str(out))
    assert reader is not None
    v2 = ViewerModel()
    _add(v2, reader(str(out)))
    back = layers_to_layout(v2.layers["one instances"], v2.layers["one centroids"])
    assert back.equals(before)
    assert np.array_equal(v2.layers["one image"].data, v.layers["procedural image"].data)
    for k in range(1, 5):
        assert np.allclose(v2.layers["one classes"].colormap.map(np.array([k])),
                           v.layers["procedural classes"].colormap.map(np.array([k])))
    # saving again replaces the store; a folder that is not a store is never replaced
    write_store(str(out), _full(v, ["procedural image", "procedural instances"]))
    other = tmp_path / "mine"
    other.mkdir()
    with pytest.raises(FileExistsError, match="not a NucSynth dataset store"):
        write_store(str(other), _full(v, ["procedural image", "procedural instances"]))


def test_saved_layers_do_not_claim_the_source_nuclei(viewer_with_sample: ViewerModel, tmp_path: Path) -> None:
    """A patch opened from a store and saved again keeps where its pixels came from
    (source_shape, the padding record) but not source_ids: the user may have edited the
    nuclei, and stitching must not join them by ids that no longer hold."""
    from nucsynth.io.store import DatasetStore

    v = viewer_with_sample
    meta = v.layers["procedural image"].metadata.setdefault("nucsynth", {})
    meta["provenance"] = {"tile": "t_1", "y0": 0, "x0": 0, "size": [256, 256], "source_shape": [200, 256],
                          "source_ids": [1, 2, 3]}
    out = tmp_path / "saved.zarr"
    write_store(str(out), _full(v, ["procedural image", "procedural instances"]))
    prov = DatasetStore.open(out)[0].provenance
    assert prov["source_shape"] == [200, 256] and prov["tile"] == "t_1" and "source_ids" not in prov


def test_store_writer_needs_an_image(viewer_with_sample: ViewerModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="select the layout's image layer"):
        write_store(str(tmp_path / "x.zarr"), _full(viewer_with_sample, ["procedural instances"]))
    assert not (tmp_path / "x.zarr").exists()


def test_multi_patch_store_opens_as_stacks(tmp_path: Path) -> None:
    from nucsynth.generate.tissue import procedural_sample
    from nucsynth.io.store import DatasetStore

    store = DatasetStore.create(tmp_path / "s.zarr", CONSEP_CLASSES)
    samples = [procedural_sample((64, 64), seed=s) for s in range(3)]
    store.append(samples)
    v = ViewerModel()
    _add(v, get_reader(str(tmp_path / "s.zarr"))(str(tmp_path / "s.zarr")))
    assert v.layers["s images"].data.shape == (3, 64, 64, 3)
    cls = np.asarray(v.layers["s classes"].data[2])
    assert np.array_equal(cls, samples[2].layout.type_map())


def test_geojson_round_trip_keeps_classes(viewer_with_sample: ViewerModel, tmp_path: Path) -> None:
    v = viewer_with_sample
    before = layers_to_layout(v.layers["procedural instances"], v.layers["procedural centroids"])
    out = tmp_path / "cells.geojson"
    write_geojson(str(out), _full(v, list(layer_names("procedural").values())))
    assert format_of(out) == "geojson"
    v2 = ViewerModel()
    _add(v2, get_reader(str(out))(str(out)))
    back = layers_to_layout(v2.layers["cells instances"], v2.layers["cells centroids"])
    assert back.num_nuclei == before.num_nuclei
    assert np.array_equal(np.sort(back.classes), np.sort(before.classes))
    # polygons are rasterised back: nearly the same pixels per class
    agree = (back.type_map() == before.type_map()).mean()
    assert agree > 0.97
    # with the image beside it (same stem) the GeoJSON opens as image + layout
    from PIL import Image

    Image.fromarray(v.layers["procedural image"].data).save(tmp_path / "cells.png")
    v3 = ViewerModel()
    _add(v3, get_reader(str(out))(str(out)))
    assert np.array_equal(v3.layers["cells image"].data, v.layers["procedural image"].data)


def test_reader_declines_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "notes.xml").write_text("<html></html>")
    (tmp_path / "a.json").write_text('{"a": 1}')
    (tmp_path / "plain").mkdir()
    for p in ("notes.xml", "a.json", "plain", "x.png"):
        assert get_reader(str(tmp_path / p)) is None


@pytest.mark.realdata
def test_reader_opens_consep_mat(consep_dir: Path) -> None:
    mat = sorted((consep_dir / "Labels").glob("*.mat"))[0]
    v = ViewerModel()
    _add(v, get_reader(str(mat))(str(mat)))
    assert v.layers[f"{mat.stem} image"].data.shape[:2] == v.layers[f"{mat.stem} instances"].data.shape
    lay = layers_to_layout(v.layers[f"{mat.stem} instances"], v.layers[f"{mat.stem} centroids"])
    assert lay.class_set.name == "consep4" and lay.num_nuclei > 0


@pytest.mark.realdata
def test_reader_opens_monuseg_xml(monuseg_dir: Path) -> None:
    xml = sorted((monuseg_dir / "Annotations").glob("*.xml"))[0]
    regions = xml.read_text(errors="ignore").count("<Region ")
    v = ViewerModel()
    _add(v, get_reader(str(xml))(str(xml)))
    lay = layers_to_layout(v.layers[f"{xml.stem} instances"], v.layers[f"{xml.stem} centroids"])
    assert 0.9 * regions <= lay.num_nuclei <= regions


def test_manifest_validates_on_the_installed_package() -> None:
    npe2 = shutil.which("npe2", path=str(Path(sys.executable).parent))
    assert npe2, "npe2 is not installed next to this python"
    res = subprocess.run([npe2, "validate", "napari-nucsynth"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout


def test_rendered_sample_data_uses_the_default_model(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from nucsynth.checkpoint import resolve_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is fastest on one thread
    try:
        _check_rendered_sample(monkeypatch, resolve_checkpoint)
    finally:
        torch.set_num_threads(threads)


def _check_rendered_sample(monkeypatch, resolve_checkpoint) -> None:
    monkeypatch.delenv("NUCSYNTH_CHECKPOINT", raising=False)
    try:
        ckpt = resolve_checkpoint(None)
    except FileNotFoundError as e:
        pytest.skip(f"no default model installed: {e}")
    from napari_nucsynth._sample_data import rendered_tissue

    v = ViewerModel()
    _add(v, rendered_tissue(steps=4))
    img = v.layers["rendered image"]
    meta = img.metadata["nucsynth"]
    assert meta["role"] == "render" and meta["checkpoint"] == str(ckpt) and meta["seed"] == 0
    lay = layers_to_layout(v.layers["rendered instances"], v.layers["rendered centroids"])
    assert img.data.shape == (*lay.shape, 3) and lay.num_nuclei > 0


@pytest.mark.gui
def test_rendered_sample_data_renders_off_the_main_thread(make_napari_viewer, qtbot, monkeypatch) -> None:
    """In napari the layout appears at once, beside the open layers, and the image is added
    under it by a worker: the sample-data call itself runs no diffusion."""
    torch = pytest.importorskip("torch")
    import time

    from nucsynth.checkpoint import resolve_checkpoint

    monkeypatch.delenv("NUCSYNTH_CHECKPOINT", raising=False)
    try:
        resolve_checkpoint(None)
    except FileNotFoundError as e:
        pytest.skip(f"no default model installed: {e}")
    from napari_nucsynth._sample_data import _RUNNING, rendered_tissue

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 50, 3), np.uint8), name="open", rgb=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        tuples = rendered_tissue(steps=2)
        assert [k for _, _, k in tuples] == ["labels", "labels", "points"]  # no image yet: it renders in a worker
        assert _RUNNING and time.perf_counter() - t0 < 5
        _add(viewer, tuples)
        assert viewer.layers["rendered instances"].translate[1] >= 50  # beside what was open
        qtbot.waitUntil(lambda: not _RUNNING, timeout=120000)
    finally:
        torch.set_num_threads(threads)
    names = [ly.name for ly in viewer.layers]
    assert names.index("rendered image") < names.index("rendered instances")
    img = viewer.layers["rendered image"]
    assert img.metadata["nucsynth"]["role"] == "render" and img.data.shape[:2] == viewer.layers["rendered instances"].data.shape
    assert viewer.layers["rendered instances"].contour == 1  # outlines over the tissue


def _folder_dataset(root: Path, n: int) -> list:
    """``n`` procedural samples written as an images/ + labels/ folder with a class table."""
    import tifffile
    from PIL import Image

    from nucsynth.generate.tissue import procedural_sample

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = ["image,id,class"]
    samples = [procedural_sample((48, 48), seed=s) for s in range(n)]
    for k, s in enumerate(samples):
        Image.fromarray(s.image).save(root / "images" / f"p{k}.png")
        tifffile.imwrite(root / "labels" / f"p{k}.tif", s.layout.inst_map)
        rows += [f"p{k},{i + 1},{CONSEP_CLASSES.names[c - 1]}" for i, c in enumerate(s.layout.classes) if c > 0]
    (root / "classes.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return samples


def test_a_dataset_folder_opens_and_any_patch_reads_back(tmp_path: Path) -> None:
    from napari_nucsynth._reader import read_patch

    samples = _folder_dataset(tmp_path / "ds", 6)
    assert format_of(tmp_path / "ds") == "folder"
    reader = get_reader(str(tmp_path / "ds"))
    assert reader is not None  # a folder napari offers to NucSynth is read, not refused
    v = ViewerModel()
    _add(v, reader(str(tmp_path / "ds")))
    assert [ly.name for ly in v.layers] == ["ds images", "ds instances", "ds classes"]
    assert v.layers["ds images"].data.shape == (6, 48, 48, 3)
    got = read_patch(v.layers["ds instances"].metadata["nucsynth"], 3)
    assert np.array_equal(got.image, samples[3].image) and np.array_equal(got.layout.inst_map, samples[3].layout.inst_map)


def test_reader_layers_show_the_tissue(tmp_path: Path) -> None:
    """Opened layouts look like the designer's: one outline colour (class colours only on
    the classes layer), faint fills over the image, centroid markers inside the nuclei."""
    from napari_nucsynth._reader import read_paths

    _folder_dataset(tmp_path / "two", 2)
    tuples = read_paths(str(tmp_path / "two"))
    kinds = {kw["name"]: (kw, kind) for _, kw, kind in tuples}
    inst, _ = kinds["two p0 instances"]
    assert inst["opacity"] <= 0.4 and kinds["two p0 classes"][0]["opacity"] <= 0.4
    assert np.allclose(inst["colormap"].map(np.array([1, 2, 17])), 1.0)  # every nucleus the same white
    assert 1.5 <= kinds["two p0 centroids"][0]["size"] <= 6.0


def test_a_read_error_is_one_line_in_napari(tmp_path: Path, monkeypatch) -> None:
    from napari_nucsynth._reader import read_paths

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
                   '{"type": "Polygon", "coordinates": "oops"}}]}', encoding="utf-8")
    assert get_reader(str(bad)) is not None
    with pytest.raises(ValueError):
        read_paths(str(bad))
    assert len(shown) == 1 and str(bad) in shown[0] and "\n" not in shown[0]
