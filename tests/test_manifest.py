"""Manifests: JSON, CSV, MSD dataset.json; paths stay inside the root; sha256 in chunks; make and check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medseg.errors import ManifestError
from medseg.files import sha256_path
from medseg.manifest import read_manifest, verify_case

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "missing.json")
    (tmp_path / "m.json").write_text(json.dumps([{"image": "a.nii.gz", "label": "b.nii.gz"}]))
    with pytest.raises(ManifestError, match=r"case 0: image file .*a\.nii\.gz does not exist"):
        read_manifest(tmp_path / "m.json")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(ManifestError, match="lists no cases"):
        read_manifest(tmp_path / "e.json")
    (tmp_path / "x.json").write_text(json.dumps([{"label": "a.nii.gz"}]))
    with pytest.raises(ManifestError, match="case 0 needs an 'image' path"):
        read_manifest(tmp_path / "x.json")
    (tmp_path / "d.json").write_text(json.dumps([{"case_id": "a", "image": "1.nii"}, {"case_id": "a", "image": "2"}]))
    with pytest.raises(ManifestError, match=r"case id\(s\) \['a'\] appear more than once"):
        read_manifest(tmp_path / "d.json", check_files=False)
    (tmp_path / "s.json").write_text(json.dumps([{"case_id": "../up", "image": "1.nii"}]))
    with pytest.raises(ManifestError, match="case_id '../up' must start with a letter"):
        read_manifest(tmp_path / "s.json", check_files=False)


def test_manifest_paths_stay_inside_their_root_and_checksums_hold(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "img.nii.gz").write_bytes(b"image")
    (root / "lab.nii.gz").write_bytes(b"label")
    (tmp_path / "secret.nii.gz").write_bytes(b"outside")
    m = root / "m.json"
    m.write_text(json.dumps([{"image": "../secret.nii.gz", "label": "lab.nii.gz"}]))
    with pytest.raises(ManifestError, match=r"leaves the manifest's root"):
        read_manifest(m)
    m.write_text(json.dumps([{"image": str(tmp_path / "secret.nii.gz"), "label": "lab.nii.gz"}]))
    with pytest.raises(ManifestError, match=r"leaves the manifest's root"):
        read_manifest(m)
    (root / "link.nii.gz").symlink_to(tmp_path / "secret.nii.gz")
    m.write_text(json.dumps([{"image": "link.nii.gz", "label": "lab.nii.gz"}]))
    with pytest.raises(ManifestError, match=r"leaves the manifest's root"):
        read_manifest(m)
    # A manifest elsewhere names its root; paths resolve inside it; recorded checksums are checked.
    other = tmp_path / "manifests"
    other.mkdir()
    good = hashlib.sha256(b"image").hexdigest()
    m2 = other / "m.json"
    m2.write_text(json.dumps({"root": "../data", "cases": [{"case_id": "c1", "image": "img.nii.gz",
                                                              "label": "lab.nii.gz", "image_sha256": good,
                                                              "site": "A"}]}))
    (case,) = read_manifest(m2).cases
    assert (case.case_id, case.image, case.label) == ("c1", root / "img.nii.gz", root / "lab.nii.gz")
    assert case.sha256 == {"image": good} and case.extra == {"site": "A"}
    m2.write_text(json.dumps({"root": "../data", "cases": [{"image": "img.nii.gz", "label": "lab.nii.gz",
                                                              "image_sha256": "0" * 64}]}))
    with pytest.raises(ManifestError, match=r"has sha256 .* the manifest records 0{64}"):
        read_manifest(m2)
    # Without check_files the runner checks each case itself, so one bad case does not stop a run.
    (case,) = read_manifest(m2, check_files=False).cases
    with pytest.raises(ManifestError, match="the file changed since the manifest was written"):
        verify_case(case)


def test_csv_and_msd_dataset_json(tmp_path: Path) -> None:
    for name in ("imagesTr/la_003.nii.gz", "labelsTr/la_003.nii.gz", "imagesTs/la_010.nii.gz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    msd = {"name": "Task02_Heart", "training": [{"image": "./imagesTr/la_003.nii.gz",
                                                  "label": "./labelsTr/la_003.nii.gz"}],
           "test": ["./imagesTs/la_010.nii.gz"], "numTraining": 1}
    (tmp_path / "dataset.json").write_text(json.dumps(msd))
    m = read_manifest(tmp_path / "dataset.json")
    assert [(c.case_id, c.label is not None, c.extra["split"]) for c in m.cases] == [
        ("la_003", True, "training"), ("la_010", False, "test")]
    (tmp_path / "m.csv").write_text("case_id,image,label,site\nh1,imagesTr/la_003.nii.gz,,B\n")
    (case,) = read_manifest(tmp_path / "m.csv").cases
    assert (case.case_id, case.label, case.extra) == ("h1", None, {"site": "B"})
    (tmp_path / "bad.csv").write_text("path,label\nx,y\n")
    with pytest.raises(ManifestError, match="needs a header row with an 'image' column"):
        read_manifest(tmp_path / "bad.csv")


def test_folder_sha256_covers_every_file(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "1.dcm").write_bytes(b"a")
    (tmp_path / "s" / "2.dcm").write_bytes(b"b")
    before = sha256_path(tmp_path / "s")
    (tmp_path / "s" / "2.dcm").write_bytes(b"c")
    assert sha256_path(tmp_path / "s") != before
    (tmp_path / "s" / "2.dcm").write_bytes(b"b")
    (tmp_path / "s" / ".hidden").write_bytes(b"ignored")
    assert sha256_path(tmp_path / "s") == before


def test_shipped_sample_manifest_is_valid() -> None:
    m = read_manifest(ROOT / "data_manifests" / "sample-data.json")  # every sha256 checked; no path leaves root
    assert len(m) == 6 and all(c.image.exists() and c.label is not None and c.label.exists() for c in m.cases)
    assert m.cases[0].case_id == "msd-spleen2"
