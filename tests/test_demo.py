"""The end-to-end demo: phantom DICOM study → shipped model → labels on the CT's grid, volumes, Dice, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.demo import run_demo
from medseg.errors import PhantomError


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # A coarse study (5 × 5 × 6.5 mm) keeps the test quick; `medseg demo` uses 160 × 160 × 64.
    return run_demo(tmp_path_factory.mktemp("d") / "demo", seed=3, shape=(80, 80, 40))


def test_demo_writes_labels_on_the_ct_grid(demo) -> None:  # type: ignore[no-untyped-def]
    from medseg.io import load_volume

    assert demo.labels_path.name == "segmentation.nii.gz" and demo.labels_path.is_file()
    written = load_volume(demo.labels_path)
    assert written.same_grid(demo.study.image) and written.shape == (80, 80, 40)
    assert np.array_equal(written.array, demo.segmentation.labels.array)
    assert written.labels is not None and written.labels.names[5] == "liver_tumour"
    assert demo.report_html is not None and demo.report_html.read_text().startswith("<!DOCTYPE html>")
    assert demo.dicom_seg_path is not None and demo.dicom_seg_path.name == "segmentation.dcm"
    assert demo.dicom_seg_round_trip_exact is True
    seg = load_volume(demo.dicom_seg_path)  # the SEG's own frame grid: put it on the CT's by world position
    from medseg.resample import resample_to

    assert np.array_equal(resample_to(seg, demo.study.image, interpolation="nearest").array,
                          demo.segmentation.labels.array)


def test_demo_scores_against_the_phantom_truth(demo) -> None:  # type: ignore[no-untyped-def]
    rows = {r.name: r for r in demo.labels}
    assert list(rows) == ["liver", "spleen", "kidney_left", "kidney_right", "liver_tumour", "kidney_tumour"]
    for organ in ("liver", "spleen", "kidney_left", "kidney_right"):
        assert rows[organ].dice >= 0.85, (organ, rows[organ].dice)
        assert rows[organ].truth_ml > 0
        assert rows[organ].volume_ml == pytest.approx(rows[organ].truth_ml, rel=0.25)
    # the demo study always has two liver tumours and a kidney tumour
    assert {d.name: d.n_ref for d in demo.lesions} == {"liver_tumour": 2, "kidney_tumour": 1}
    data = demo.to_json()
    json.dumps(data, allow_nan=False)
    assert data["on_input_grid"] is True and data["dicom_seg"].endswith("segmentation.dcm")
    assert data["dicom_seg_round_trip_exact"] is True
    assert set(data["seconds"]) == {"study", "segment", "dicom_seg", "evaluate", "report", "total"}


def test_demo_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(PhantomError, match="holds no earlier demo"):
        run_demo(tmp_path)
    assert (tmp_path / "x.txt").read_text() == "keep me"


@pytest.mark.slow
def test_cli_demo_json_full_size(tmp_path: Path) -> None:
    """What `make demo` runs (160 × 160 × 64 study): every organ's Dice ≥ 0.90, labels on the CT's grid."""
    from typer.testing import CliRunner

    from medseg.cli import app

    res = CliRunner().invoke(app, ["demo", str(tmp_path / "demo"), "--json", "--no-report"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["on_input_grid"] is True and data["report_html"] is None
    for row in data["labels"]:
        if row["kind"] == "organ":
            assert row["dice"] >= 0.90, row
    # a second run replaces the earlier demo
    res = CliRunner().invoke(app, ["demo", str(tmp_path / "demo"), "--json", "--no-report"])
    assert res.exit_code == 0 and json.loads(res.stdout)["replaced_earlier"] is True


def test_cli_demo_refuses_a_foreign_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app

    (tmp_path / "notes.txt").write_text("x")
    res = CliRunner().invoke(app, ["demo", str(tmp_path)])
    assert res.exit_code == 2 and "holds no earlier demo" in res.output
