"""medseg.report: radiological orientation of thumbnails, the results-folder layout, self-contained HTML, CSV, JSON."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from medseg import Volume, load_volume, save_volume
from medseg.errors import ResultsLayoutError
from medseg.labels import Label, LabelTable
from medseg.report import find_cases, write_report

RAS = np.diag([0.8, 1.1, 2.5, 1.0])
RAS[:3, 3] = (-10.0, -20.0, 30.0)


def _write_case(root: Path, case_id: str, *, ref: bool = True, image: bool = True, shift: int = 1) -> None:
    """A small multi-label case with an organ and two tumours, on an anisotropic grid."""
    d = root / case_id
    d.mkdir(parents=True)
    shape = (30, 24, 12)
    r = np.zeros(shape, np.uint8)
    r[4:26, 4:20, 2:10] = 1
    r[8:12, 8:12, 4:7] = 2
    r[18:21, 14:17, 5:7] = 2
    p = np.roll(r, shift, axis=0)
    p[1:3, 1:3, 1:3] = 2  # a false-positive lesion
    table = LabelTable([Label(1, "liver", (200, 120, 60)), Label(2, "tumour", (255, 0, 0), "lesion")])
    save_volume(Volume(p, RAS, labels=table), d / "pred.nii.gz")
    if ref:
        save_volume(Volume(r, RAS, labels=table), d / "ref.nii.gz")
    if image:
        img = np.random.default_rng(0).normal(60, 10, shape).astype(np.float32) - 1000 * (r == 0)
        save_volume(Volume(img, RAS, modality="CT"), d / "image.nii.gz")


def test_report_is_self_contained_with_every_figure(tmp_path: Path) -> None:
    root = tmp_path / "results"
    _write_case(root, "case_b", shift=2)
    _write_case(root, "case_a")
    _write_case(root, "case_c", ref=False, image=False)
    out = tmp_path / "out" / "report.html"
    result = write_report(root, out, modality="CT")
    assert (result.n_cases, result.n_evaluated) == (3, 2)
    page = out.read_text()
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # Dice strip/box plot, volume scatter + Bland–Altman, one thumbnail per case.
    assert len(images) == 2 + 3
    for _, b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing fetched from the network
    assert page.index("case_a") < page.index("case_b") < page.index("case_c")
    assert "tumour" in page and "Bland" in page

    rows = list(csv.DictReader(io.StringIO(result.csv_paths[0].read_text())))
    assert [(r["case_id"], r["name"]) for r in rows] == [
        ("case_a", "liver"), ("case_a", "tumour"), ("case_b", "liver"), ("case_b", "tumour")
    ]
    assert float(rows[0]["dice"]) < 1.0 and float(rows[0]["dice"]) > float(rows[2]["dice"])
    stats_rows = list(csv.DictReader(io.StringIO(result.csv_paths[1].read_text())))
    assert {r["case_id"] for r in stats_rows} == {"case_a", "case_b", "case_c"}
    data = json.loads(result.json_path.read_text())
    les = data["cases"][0]["evaluation"]["lesions"][0]
    assert (les["n_ref"], les["fp"], les["tp_ref"]) == (2, 1, 2)
    assert data["cases"][2]["evaluation"] is None
    assert data["cases"][0]["stats"]["intensity_unit"] == "HU"
    assert not list(out.parent.glob("*.partial"))


def test_report_never_shows_patient_identity(tmp_path: Path) -> None:
    """The dcmqi CT has PatientName JANCT000 / PatientID 99000: neither may reach the report."""
    case = tmp_path / "results" / "anon01"
    case.mkdir(parents=True)
    shutil.copytree(DATA / "dicom_seg_example" / "ct_3slice", case / "image")
    seg = load_volume(DATA / "dicom_seg_example" / "liver_seg.nrrd")
    save_volume(seg.with_array(seg.array.astype(np.uint8)), case / "pred.nrrd")
    out = tmp_path / "r.html"
    write_report(tmp_path / "results", out)
    for path in (out, out.with_name("r.json"), out.with_name("r_stats.csv")):
        text = path.read_text()
        assert "JANCT000" not in text and "99000" not in text and "20030417" not in text
    assert "anon01" in out.read_text()
    stats = json.loads(out.with_name("r.json").read_text())["cases"][0]["stats"]
    assert round(stats["labels"][0]["volume_ml"], 2) == 70.36 and stats["intensity_unit"] == "HU"


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ResultsLayoutError, match="not a folder"):
        find_cases(tmp_path / "missing")
    (tmp_path / "empty" / "case1").mkdir(parents=True)
    with pytest.raises(ResultsLayoutError, match="no case found"):
        find_cases(tmp_path / "empty")
    _write_case(tmp_path / "dup", "case1", image=False)
    shutil.copy(tmp_path / "dup" / "case1" / "pred.nii.gz", tmp_path / "dup" / "case1" / "pred.nrrd")
    with pytest.raises(ResultsLayoutError, match="several 'pred' files"):
        find_cases(tmp_path / "dup")
    with pytest.raises(ResultsLayoutError, match="ending in .html"):
        write_report(tmp_path / "dup", tmp_path / "report.pdf")
    assert not (tmp_path / "report.pdf").exists()


def test_cli_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app

    _write_case(tmp_path / "res", "c1", image=False)
    out = tmp_path / "rep.html"
    res = CliRunner().invoke(app, ["report", str(tmp_path / "res"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.exists() and (tmp_path / "rep_metrics.csv").exists() and (tmp_path / "rep.json").exists()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing"), "--out", str(out)])
    assert res.exit_code == 2 and "not a folder" in res.output
