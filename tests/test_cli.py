"""`medseg info` and `medseg convert`: thin shells, JSON output, exit code 2 with one clear line on bad input."""

from __future__ import annotations

import json

import numpy as np
from dicom_factory import write_series
from typer.testing import CliRunner

from medseg import load_volume
from medseg.cli import app

runner = CliRunner()


def test_info_json_on_real_series(data_dir):
    res = runner.invoke(app, ["info", str(data_dir / "totalseg_example" / "example_ct_dicom"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["shape"] == [512, 512, 20]
    assert data["spacing_mm"] == [0.976562, 0.976562, 2.0]
    assert data["orientation"] == "LPS" and data["modality"] == "CT"
    assert data["series"][0]["slices"] == 20 and data["series"][0]["series_uid"].startswith("fallback:")
    assert "Test^" not in res.stdout


def test_info_lists_several_series_and_chooses(tmp_path):
    write_series(tmp_path, 3, series_uid="1.2.3.4", description="soft")
    write_series(tmp_path, 4, series_uid="1.2.3.5", description="bone", names=["a", "b", "c", "d"])
    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 0
    assert "1.2.3.4" in res.stdout and "1.2.3.5" in res.stdout and "--series-uid" in res.stdout
    res = runner.invoke(app, ["info", str(tmp_path), "--series-uid", "1.2.3.5", "--json"])
    assert json.loads(res.stdout)["shape"] == [32, 24, 4]
    assert "TEST-ID-123" not in res.stdout  # no patient IDs in output


def test_convert_dicom_to_nifti_keeps_the_grid(tmp_path, data_dir):
    src = data_dir / "dicom_seg_example" / "ct_3slice"
    out = tmp_path / "ct.nii.gz"
    res = runner.invoke(app, ["convert", str(src), str(out)])
    assert res.exit_code == 0, res.output
    a, b = load_volume(src), load_volume(out)
    assert a.same_grid(b)
    np.testing.assert_array_equal(a.array, b.array)


def test_bad_input_exit_code_2_one_line(tmp_path):
    res = runner.invoke(app, ["info", str(tmp_path / "missing.nii.gz")])
    assert res.exit_code == 2
    assert "missing.nii.gz: no such file" in res.stderr
    assert "Traceback" not in res.stderr
    (tmp_path / "x.txt").write_text("hello")
    res = runner.invoke(app, ["convert", str(tmp_path / "x.txt"), str(tmp_path / "y.nii.gz")])
    assert res.exit_code == 2 and "unsupported file type" in res.stderr
    assert not (tmp_path / "y.nii.gz").exists()
