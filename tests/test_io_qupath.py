"""QuPath's object model in GeoJSON exports ("Export objects -> All objects"): detections and
cells are nuclei (cells by their nucleus geometry), annotations are regions drawn by hand,
point annotations (counting tool, MultiPoint) are nuclei given by their centre, and derived
classes keep their full name. Every file is built here in QuPath's documented layout."""

from __future__ import annotations

import json
import tracemalloc
import warnings

import numpy as np
import pytest

from nucsynth.io import FormatError
from nucsynth.io.geojson import SkippedObjectsWarning, read_geojson, read_qupath


def _square(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _feat(geom, props, **extra):
    return {"type": "Feature", "id": f"id-{len(json.dumps(geom))}", "geometry": geom, "properties": props, **extra}


def _qupath_export(old_style: bool = False) -> dict:
    """Every kind of object QuPath writes, with the region annotation written LAST."""
    def cls(*names):
        if not old_style:
            return {"names": list(names), "color": [200, 10, 10]}
        node = {"name": names[0], "colorRGB": -3670016}
        for n in names[1:]:  # older exports: the leaf's name with a parentClass chain
            node = {"name": n, "colorRGB": -16776961, "parentClass": node}
        return node

    key = "object_type" if old_style else "objectType"
    return {"type": "FeatureCollection", "features": [
        # a cell: its geometry is the whole cell; the nucleus is nucleusGeometry
        _feat(_square(2, 2, 14, 14), {key: "cell", "classification": cls("Tumor", "Positive"),
                                      "measurements": {"Nucleus: Area": 36}},
              nucleusGeometry=_square(5, 5, 11, 11)),
        _feat(_square(20, 2, 34, 14), {key: "cell", "classification": cls("Tumor", "Negative")},
              nucleusGeometry=_square(24, 5, 30, 10)),
        _feat(_square(4, 20, 9, 26), {key: "detection", "classification": cls("Stroma")}),
        # the counting tool: one annotation holding several points of one class
        _feat({"type": "MultiPoint", "coordinates": [[20.5, 20.5], [30.5, 24.5]]},
              {key: "annotation", "classification": cls("Immune cells")}),
        _feat(_square(0, 0, 40, 40), {key: "tile"}),
        # a hand-drawn tissue region covering everything, last in the file
        _feat(_square(1, 1, 39, 39), {key: "annotation", "name": "Tumour area", "classification": cls("Region*")}),
    ]}


def _write(tmp_path, doc, name="export.geojson"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize("old_style", [False, True])
def test_all_objects_export_reads_to_the_nuclei_qupath_shows(tmp_path, old_style):
    p = _write(tmp_path, _qupath_export(old_style))
    with pytest.warns(SkippedObjectsWarning, match=r"5 nuclei .*skipped: 1 annotations, 1 other objects"):
        lay = read_geojson(p, shape=(40, 40))
    assert lay.num_nuclei == 5
    names = [lay.class_set.names[c - 1] for c in lay.classes]
    assert names == ["Tumor: Positive", "Tumor: Negative", "Stroma", "Immune cells", "Immune cells"]
    # nuclei keep their own pixels: the region written last overwrote nothing
    assert lay.areas().tolist() == [36, 30, 30, 0, 0]
    ys, xs = np.nonzero(lay.inst_map == 1)  # the nucleus of the first cell, not the cell
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (5, 10, 5, 10)
    np.testing.assert_allclose(lay.centroids[3:], [[20, 20], [24, 30]])  # points, (y, x), pixel centres
    got = read_qupath(p, shape=(40, 40))
    assert got.summary["cells"] == 2 and got.summary["detections"] == 1 and got.summary["points"] == 2
    assert got.summary["skipped annotations"] == 1 and got.summary["skipped other objects"] == 1


def test_old_and_new_derived_class_layouts_agree(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedObjectsWarning)
        new = read_geojson(_write(tmp_path, _qupath_export(False), "n.geojson"), shape=(40, 40))
        old = read_geojson(_write(tmp_path, _qupath_export(True), "o.geojson"), shape=(40, 40))
    assert new.class_set.names == old.class_set.names
    np.testing.assert_array_equal(new.classes, old.classes)
    np.testing.assert_array_equal(new.inst_map, old.inst_map)


def test_annotations_as_regions_or_as_nuclei_on_request(tmp_path):
    p = _write(tmp_path, _qupath_export())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read_qupath reports through its summary, never by warning
        got = read_qupath(p, shape=(40, 40), annotations="regions")
    assert got.summary_text() == ("5 nuclei (1 detections, 2 cells, 2 points); 1 annotations read as regions; "
                                  "not nuclei, skipped: 1 other objects")
    with pytest.warns(SkippedObjectsWarning, match=r"regions; not nuclei, skipped: 1 other objects$"):
        assert read_geojson(p, shape=(40, 40), annotations="regions").num_nuclei == 5
    assert got.result.num_nuclei == 5
    (region,) = got.regions
    assert region.name == "Tumour area" and region.class_name == "Region*"
    assert region.mask((40, 40)).sum() == 38 * 38
    as_nuclei = read_qupath(p, shape=(40, 40), annotations="nuclei").result
    # drawn last, it covers the three earlier nuclei, which keep one pixel each (see _polygons)
    assert as_nuclei.num_nuclei == 6 and as_nuclei.areas()[-1] == 38 * 38 - 3
    with pytest.raises(ValueError, match="annotations must be one of"):
        read_qupath(p, annotations="keep")


def test_only_hand_drawn_annotations_say_how_to_read_them(tmp_path):
    doc = {"type": "FeatureCollection", "features": [
        _feat(_square(2, 2, 8, 8), {"objectType": "annotation", "classification": {"name": "Tumor"}}),
        _feat(_square(12, 2, 18, 8), {"objectType": "annotation"})]}
    p = _write(tmp_path, doc)
    with pytest.raises(FormatError, match=r"export\.geojson: holds 2 annotations and no detections.*annotations='nuclei'"):
        read_geojson(p)
    lay = read_geojson(p, annotations="nuclei")
    assert lay.num_nuclei == 2 and lay.classes.tolist() == [1, 0]


def test_multipoint_annotation_is_a_point_layout(tmp_path):
    doc = {"type": "FeatureCollection", "features": [
        _feat({"type": "MultiPoint", "coordinates": [[3.5, 4.5], [10.5, 2.5], [7.5, 7.5]]},
              {"objectType": "annotation", "classification": {"name": "Lymphocyte"}}),
        _feat({"type": "MultiPoint", "coordinates": [[1.5, 1.5]]}, {"objectType": "annotation"})]}
    lay = read_geojson(_write(tmp_path, doc), shape=(12, 12))
    assert lay.num_nuclei == 4 and lay.inst_map.max() == 0
    np.testing.assert_allclose(lay.centroids, [[4, 3], [2, 10], [7, 7], [1, 1]])
    assert lay.classes.tolist() == [1, 1, 1, 0] and lay.class_set.names == ("Lymphocyte",)


def test_slide_coordinates_without_a_canvas_are_refused_cheaply(tmp_path):
    doc = {"type": "FeatureCollection", "features": [
        _feat(_square(2, 2, 8, 8), {"objectType": "detection"}),
        _feat({"type": "Point", "coordinates": [152000.5, 98000.5]}, {"objectType": "detection"})]}
    p = _write(tmp_path, doc)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=r"x=152000.5, y=98000.5\) in the file.*slide coordinates: give the image or the canvas"):
            read_geojson(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
    with pytest.raises(FormatError, match="off the 16x16 canvas"):
        read_geojson(p, shape=(16, 16))


def test_geojson_with_byte_order_mark(tmp_path):
    p = tmp_path / "bom.geojson"
    doc = {"type": "FeatureCollection", "features": [_feat(_square(2, 2, 6, 6), {"objectType": "detection"})]}
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    assert read_geojson(p).num_nuclei == 1
