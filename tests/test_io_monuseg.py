"""MoNuSeg Aperio XML reader: one nucleus per Region on real data, overlap and degenerate rules."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nucsynth.io import FormatError, parse_aperio_xml, read_monuseg, read_source
from nucsynth.layout import NUCLEUS_CLASSES

# Two real files: one plain, one with a degenerate two-vertex Region (the count must hold).
REAL = ("TCGA-B0-5710-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1")


@pytest.mark.realdata
@pytest.mark.parametrize("name", REAL)
def test_real_xml_gives_one_nucleus_per_region(monuseg_dir, name):
    xml = monuseg_dir / "Annotations" / f"{name}.xml"
    n_regions = len(re.findall(r"<Region\b", xml.read_text()))
    (s,) = read_monuseg(xml)
    assert s.layout.num_nuclei == n_regions
    ids = np.unique(s.layout.inst_map)
    assert ids[ids > 0].size == n_regions  # every nucleus has pixels
    assert s.image.shape == (1000, 1000, 3)
    assert s.layout.class_set == NUCLEUS_CLASSES and np.all(s.layout.classes == 1)
    assert s.provenance["tile"] == name and s.provenance["regions"] == n_regions
    assert s.provenance["microns_per_pixel"] == pytest.approx(0.252, abs=0.01)


def _xml(regions: list[list[tuple[float, float]]]) -> str:
    out = ['<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>']
    for k, verts in enumerate(regions, start=1):
        out.append(f'<Region Id="{k}"><Attributes/><Vertices>')
        out += [f'<Vertex X="{x}" Y="{y}"/>' for x, y in verts]
        out.append("</Vertices></Region>")
    out.append("</Regions></Annotation></Annotations>")
    return "\n".join(out)


def make_monuseg(folder: Path, regions, shape=(30, 40)) -> Path:
    (folder / "Annotations").mkdir(parents=True)
    (folder / "Tissue_Images").mkdir()
    (folder / "Annotations" / "img.xml").write_text(_xml(regions))
    Image.fromarray(np.full(shape + (3,), 200, np.uint8)).save(folder / "Tissue_Images" / "img.tif")
    return folder


def test_square_polygon_xy_order(tmp_path):
    # A rectangle x in [10, 20], y in [2, 6]: rows 2..6, columns 10..20 (pixel centres inside/on).
    folder = make_monuseg(tmp_path / "m", [[(10, 2), (20, 2), (20, 6), (10, 6)]])
    (s,) = read_monuseg(folder)
    ys, xs = np.nonzero(s.layout.inst_map == 1)
    assert ys.min() >= 2 and ys.max() <= 6 and xs.min() >= 10 and xs.max() <= 20
    assert xs.max() - xs.min() > ys.max() - ys.min()  # wider than tall: X is the column
    np.testing.assert_allclose(s.layout.centroids[0], (ys.mean(), xs.mean()))


def test_overlap_later_region_wins_and_degenerate_keeps_a_pixel(tmp_path):
    big = [(2, 2), (20, 2), (20, 20), (2, 20)]
    inner = [(8, 8), (12, 8), (12, 12), (8, 12)]
    covered = [(9, 9), (11, 9), (11, 11), (9, 11)]  # entirely inside the later "inner"
    line = [(30, 25), (31, 25)]  # two vertices: no area
    folder = make_monuseg(tmp_path / "m", [big, covered, inner, line])
    (s,) = read_monuseg(folder)
    assert s.layout.num_nuclei == 4
    inst = s.layout.inst_map
    assert inst[10, 10] in (2, 3) and inst[9, 12] == 3  # inner (later) overwrote big; covered keeps one pixel
    assert all((inst == i).any() for i in range(1, 5))
    assert inst[25, 30] == 4 or inst[25, 31] == 4


def test_bad_xml_inputs(tmp_path):
    folder = make_monuseg(tmp_path / "m", [[(1, 1), (5, 1), (5, 5)]])
    xml = folder / "Annotations" / "img.xml"
    text = xml.read_text()
    xml.write_text(text[: len(text) // 2])
    with pytest.raises(FormatError, match=r"img\.xml.*truncated"):
        read_monuseg(folder)
    xml.write_text(text.replace('X="5"', 'X="five"'))
    with pytest.raises(FormatError, match=r"img\.xml.*numeric"):
        read_monuseg(folder)
    xml.write_text("<Foo/>")
    with pytest.raises(FormatError, match=r"img\.xml.*Annotations"):
        parse_aperio_xml(xml)
    xml.write_text(text)
    (folder / "Tissue_Images" / "img.tif").unlink()
    with pytest.raises(FormatError, match=r"img\.xml.*no image"):
        read_monuseg(folder)


def test_read_source_detects_monuseg(tmp_path):
    folder = make_monuseg(tmp_path / "m", [[(1, 1), (5, 1), (5, 5)]])
    (s,) = read_source(folder)
    assert s.provenance["format"] == "monuseg"


def _xml_raw(vertex_lines: list[list[str]]) -> str:
    """Regions given by raw <Vertex .../> attribute text (to write what a broken file holds)."""
    out = ['<Annotations><Annotation Id="1"><Regions>']
    for k, verts in enumerate(vertex_lines, start=1):
        out.append(f'<Region Id="{10 * k}"><Vertices>')
        out += [f"<Vertex {v}/>" for v in verts]
        out.append("</Vertices></Region>")
    out.append("</Regions></Annotation></Annotations>")
    return "\n".join(out)


GOOD = ['X="2" Y="2"', 'X="8" Y="2"', 'X="8" Y="8"', 'X="2" Y="8"']


@pytest.mark.parametrize("bad", ['X="nan" Y="5"', 'X="12" Y="inf"', 'X="12"', 'X="" Y="4"', 'X="1e999" Y="3"', 'X="a" Y="3"'])
def test_unusable_vertices_are_refused_or_skipped_never_phantom_nuclei(tmp_path, bad):
    xml = tmp_path / "a.xml"
    xml.write_text(_xml_raw([GOOD, ['X="12" Y="12"', bad, 'X="15" Y="15"'], [v.replace('"2"', '"20"').replace('"8"', '"26"') for v in GOOD]]))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(FormatError, match=r"a\.xml: Region 2 \(Id 20\): a vertex has a missing.*bad_vertices='skip'"):
        read_monuseg(xml)
    with pytest.warns(UserWarning, match=r"a\.xml: left out 1 region\(s\).*Region 2 \(Id 20\)"):
        (s,) = read_monuseg(xml, bad_vertices="skip")
    assert s.layout.num_nuclei == 2 and s.layout.areas().tolist() == [49, 49]  # pixel centres 2..8
    assert s.provenance["regions"] == 2
    with pytest.raises(ValueError, match="bad_vertices must be"):
        parse_aperio_xml(xml, bad_vertices="drop")
