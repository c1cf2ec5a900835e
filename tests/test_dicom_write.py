"""write_dicom_series: lossless, geometry-exact round trips through medseg.load_volume, valid DICOM."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import oblique_affine
from pydicom.uid import UID

from medseg import LabelTable, Volume, load_volume
from medseg.errors import DicomWriteError, MedsegError, UnreadableFileError
from medseg.io import write_dicom_series
from medseg.io.dicom_write import TRANSFER_SYNTAXES
from medseg.resample import reorient_to

SYNTAXES = list(TRANSFER_SYNTAXES)
SHAPE = (33, 40, 5)  # i ≠ j ≠ k; ≥ 32 in-plane for JPEG 2000


def _affine(name: str) -> np.ndarray:
    if name == "ras":
        a = np.diag([0.7, 1.3, 2.9, 1.0])
        a[:3, 3] = (-12.5, 40.25, 7.0)
        return a
    if name == "lps":
        return np.diag([-0.8, -0.8, 2.5, 1.0])
    if name == "flipped":  # RPS: j flipped only (left-handed)
        a = np.diag([0.9, -1.1, 3.0, 1.0])
        a[:3, 3] = (5.0, -3.0, -100.0)
        return a
    if name == "oblique":  # rotated, anisotropic, one flipped axis (left-handed)
        return oblique_affine()
    if name == "oblique-rh":  # rotated, anisotropic, right-handed
        return oblique_affine(spacing=(0.6, 0.9, 4.0), flip=False)
    raise AssertionError(name)


def _values(shape: tuple[int, ...] = SHAPE, lo: int = -1024, hi: int = 3071, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi + 1, size=shape).astype(np.int16)


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("geometry", ["ras", "lps", "flipped", "oblique", "oblique-rh"])
def test_round_trip_is_exact(tmp_path: Path, geometry: str, syntax: str) -> None:
    volume = Volume(_values(), _affine(geometry), modality="CT")
    written = write_dicom_series(volume, tmp_path / "series", transfer_syntax=syntax, seed=1)
    back = load_volume(tmp_path / "series")

    assert back.modality == "CT"
    assert back.array.dtype == np.int16
    assert back.source is not None and back.source.series_instance_uid == written.series_instance_uid
    if np.linalg.det(volume.affine[:3, :3]) > 0:
        # right-handed: same array, same affine
        np.testing.assert_array_equal(back.array, volume.array)
        np.testing.assert_allclose(back.affine, volume.affine, atol=1e-4)
    else:
        # left-handed: readers stack along row × column, so k comes back reversed — same voxels in world space
        np.testing.assert_array_equal(back.array, volume.array[:, :, ::-1])
        expected = volume.affine.copy()
        expected[:3, 2] *= -1
        expected[:3, 3] = volume.world_mm([0, 0, volume.shape[2] - 1])
        np.testing.assert_allclose(back.affine, expected, atol=1e-4)
    exact = reorient_to(back, volume)
    assert exact is not None
    np.testing.assert_array_equal(exact.array, volume.array)


def test_transfer_syntax_is_recorded(tmp_path: Path) -> None:
    for syntax, uid in TRANSFER_SYNTAXES.items():
        written = write_dicom_series(Volume(_values(), _affine("ras"), modality="CT"), tmp_path / syntax,
                                     transfer_syntax=syntax)  # type: ignore[arg-type]
        assert written.transfer_syntax_uid == uid
        assert pydicom.dcmread(written.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == uid


def test_file_names_and_order_do_not_matter(tmp_path: Path) -> None:
    volume = Volume(_values(), _affine("oblique-rh"), modality="CT")
    written = write_dicom_series(volume, tmp_path / "series", seed=2)
    shuffled = tmp_path / "shuffled"
    (shuffled / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n, f in enumerate(rng.permutation(np.array(written.files, dtype=object))):
        target = shuffled / ("sub" if n % 2 else "") / f"{rng.integers(1 << 30):x}"  # no extension
        shutil.copy(f, target)
    back = load_volume(shuffled)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-4)


def test_one_series_with_valid_unique_uids(tmp_path: Path) -> None:
    written = write_dicom_series(Volume(_values(), _affine("lps"), modality="CT"), tmp_path / "s")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in written.files]
    assert {h.SeriesInstanceUID for h in headers} == {written.series_instance_uid}
    assert {h.StudyInstanceUID for h in headers} == {written.study_instance_uid}
    assert {h.FrameOfReferenceUID for h in headers} == {written.frame_of_reference_uid}
    sops = [h.SOPInstanceUID for h in headers]
    assert len(set(sops)) == len(sops) == SHAPE[2]
    assert sops == list(written.sop_instance_uids)
    assert [h.file_meta.MediaStorageSOPInstanceUID for h in headers] == sops
    for uid in [*sops, written.series_instance_uid, written.study_instance_uid, written.frame_of_reference_uid]:
        assert UID(uid).is_valid, uid
    assert len({written.series_instance_uid, written.study_instance_uid, written.frame_of_reference_uid}) == 3


def test_seed_makes_files_deterministic(tmp_path: Path) -> None:
    volume = Volume(_values(), _affine("ras"), modality="CT")
    a = write_dicom_series(volume, tmp_path / "a", seed=7)
    b = write_dicom_series(volume, tmp_path / "b", seed=7)
    c = write_dicom_series(volume, tmp_path / "c", seed=8)
    d = write_dicom_series(volume, tmp_path / "d")
    e = write_dicom_series(volume, tmp_path / "e")
    assert a.sop_instance_uids == b.sop_instance_uids
    assert [f.read_bytes() for f in a.files] == [f.read_bytes() for f in b.files]
    assert a.series_instance_uid != c.series_instance_uid and a.study_instance_uid != c.study_instance_uid
    assert d.series_instance_uid != e.series_instance_uid
    assert not set(d.sop_instance_uids) & set(e.sop_instance_uids)


def test_given_uids_are_used_and_checked(tmp_path: Path) -> None:
    volume = Volume(_values(), _affine("ras"), modality="CT")
    w = write_dicom_series(volume, tmp_path / "a", study_instance_uid="1.2.3.4", series_instance_uid="1.2.3.5")
    h = pydicom.dcmread(w.files[0], stop_before_pixels=True)
    assert (h.StudyInstanceUID, h.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.5")
    with pytest.raises(DicomWriteError, match="series_instance_uid '1.2.03' is not a valid DICOM UID"):
        write_dicom_series(volume, tmp_path / "b", series_instance_uid="1.2.03")
    assert not (tmp_path / "b").exists()


def test_ct_storage_layouts(tmp_path: Path) -> None:
    # scanner-like: unsigned 12 bits with intercept -1024
    w = write_dicom_series(Volume(_values(), _affine("ras"), modality="CT"), tmp_path / "a")
    h = pydicom.dcmread(w.files[0], stop_before_pixels=True)
    assert (h.BitsStored, h.PixelRepresentation, float(h.RescaleIntercept), float(h.RescaleSlope)) == (12, 0, -1024, 1)
    # values below -1024 (e.g. padding -2000): signed 16 bits, no intercept
    arr = _values(lo=-2000, hi=5000)
    w = write_dicom_series(Volume(arr, _affine("ras"), modality="CT"), tmp_path / "b", transfer_syntax="jpeg-ls-lossless")
    h = pydicom.dcmread(w.files[0], stop_before_pixels=True)
    assert (h.BitsStored, h.PixelRepresentation, float(h.RescaleIntercept)) == (16, 1, 0)
    np.testing.assert_array_equal(load_volume(tmp_path / "b").array, arr)
    # int32 values beyond int16 but within a 16-bit range: unsigned with the minimum as intercept
    arr32 = _values(lo=0, hi=3000).astype(np.int32) + 40000
    w = write_dicom_series(Volume(arr32, _affine("ras"), modality="CT"), tmp_path / "c", transfer_syntax="rle-lossless")
    np.testing.assert_array_equal(load_volume(tmp_path / "c").array, arr32)
    # integral floats are fine
    w = write_dicom_series(Volume(_values().astype(np.float32), _affine("ras"), modality="CT"), tmp_path / "d")
    np.testing.assert_array_equal(load_volume(tmp_path / "d").array, _values())


def test_mr_is_stored_as_given(tmp_path: Path) -> None:
    arr = _values(lo=0, hi=60000).astype(np.uint16)
    volume = Volume(arr, _affine("oblique-rh"), modality="MR")
    w = write_dicom_series(volume, tmp_path / "mr", transfer_syntax="jpeg2000-lossless")
    h = pydicom.dcmread(w.files[0], stop_before_pixels=True)
    assert h.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and "RescaleIntercept" not in h
    back = load_volume(tmp_path / "mr")
    assert back.modality == "MR"
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-4)


def test_required_attributes_present(tmp_path: Path) -> None:
    """Type 1 and 2 attributes of the CT Image IOD modules (PS3.3 A.3) are all there; type 1 are non-empty."""
    w = write_dicom_series(Volume(_values(), _affine("oblique"), modality="CT"), tmp_path / "s")
    h = pydicom.dcmread(w.files[0])
    type1 = [
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "FrameOfReferenceUID",
        "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SamplesPerPixel",
        "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
        "PixelRepresentation", "PixelData", "ImageType", "RescaleIntercept", "RescaleSlope",
    ]
    type2 = [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
        "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "PatientPosition",
        "PositionReferenceIndicator", "Manufacturer", "InstanceNumber", "SliceThickness", "KVP", "AcquisitionNumber",
    ]
    for keyword in type1:
        assert keyword in h and h[keyword].value not in (None, ""), keyword
    for keyword in type2:
        assert keyword in h, keyword
    assert h.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize(("modality", "syntax"), [("CT", "explicit-vr-little-endian"), ("CT", "jpeg2000-lossless"),
                                                  ("MR", "rle-lossless")])
def test_validates_with_dciodvfy(tmp_path: Path, modality: str, syntax: str) -> None:
    arr = _values() + (1024 if modality == "MR" else 0)
    w = write_dicom_series(Volume(arr, _affine("oblique"), modality=modality), tmp_path / "s",
                           transfer_syntax=syntax)  # type: ignore[arg-type]
    out = subprocess.run(["dciodvfy", str(w.files[2])], capture_output=True, text=True, check=False)
    report = out.stdout + out.stderr
    assert ("CTImage" if modality == "CT" else "MRImage") in report
    assert "Error" not in report, report


def test_refuses_what_it_cannot_write(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = Volume(_values(), _affine("ras"), modality="CT")
    with pytest.raises(DicomWriteError, match="non-integer float32 values"):
        write_dicom_series(good.with_array(good.array.astype(np.float32) + 0.5), tmp_path / "a")
    with pytest.raises(DicomWriteError, match="label map"):
        write_dicom_series(Volume((good.array > 0).astype(np.uint8), good.affine,
                                  labels=LabelTable.from_names({1: "x"})), tmp_path / "a")
    with pytest.raises(DicomWriteError, match="modality is 'PT'"):
        write_dicom_series(Volume(good.array, good.affine, modality="PT"), tmp_path / "a")
    with pytest.raises(DicomWriteError, match="more than the 16 bits"):
        write_dicom_series(good.with_array(good.array.astype(np.int32) * 100), tmp_path / "a")
    with pytest.raises(DicomWriteError, match="holds a 3D volume"):
        write_dicom_series(Volume(np.zeros((*SHAPE, 2), np.int16), good.affine, modality="CT"), tmp_path / "a")
    with pytest.raises(DicomWriteError, match="at least 32×32"):
        write_dicom_series(Volume(_values((33, 20, 3)), good.affine, modality="CT"), tmp_path / "a",
                           transfer_syntax="jpeg2000-lossless")
    with pytest.raises(DicomWriteError, match="Unknown transfer syntax 'jpeg'"):
        write_dicom_series(good, tmp_path / "a", transfer_syntax="jpeg")  # type: ignore[arg-type]
    sheared = good.affine.copy()
    sheared[0, 1] = 0.3
    with pytest.raises(DicomWriteError, match="not orthogonal"):
        write_dicom_series(Volume(good.array, sheared, modality="CT"), tmp_path / "a")
    tilted = good.affine.copy()
    tilted[1, 2] = 0.5  # slices shifted along y as k grows: a gantry tilt
    with pytest.raises(DicomWriteError, match="not normal to its i-j plane"):
        write_dicom_series(Volume(good.array, tilted, modality="CT"), tmp_path / "a")
    with pytest.raises(DicomWriteError, match="parent folder .* does not exist"):
        write_dicom_series(good, tmp_path / "missing" / "a")
    assert not any(tmp_path.iterdir())
    with caplog.at_level("WARNING"):
        write_dicom_series(Volume(good.array, good.affine), tmp_path / "none")
    assert "no modality; writing it as CT" in caplog.text
    assert load_volume(tmp_path / "none").modality == "CT"


def test_existing_folder_and_overwrite(tmp_path: Path) -> None:
    first = Volume(_values(seed=1), _affine("ras"), modality="CT")
    second = Volume(_values(seed=2), _affine("lps"), modality="CT")
    (tmp_path / "empty").mkdir()
    write_dicom_series(first, tmp_path / "empty")  # an empty folder is fine
    np.testing.assert_array_equal(load_volume(tmp_path / "empty").array, first.array)
    with pytest.raises(DicomWriteError, match="exists and is not empty.*overwrite=True"):
        write_dicom_series(second, tmp_path / "empty")
    write_dicom_series(second, tmp_path / "empty", overwrite=True)
    back = load_volume(tmp_path / "empty")  # only the new series is there
    np.testing.assert_array_equal(back.array, second.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.io.dicom_write as dw

    real = dw._write_slice
    calls = {"n": 0}

    def flaky(path: Path, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dw, "_write_slice", flaky)
    with pytest.raises(UnreadableFileError, match=r"series: could not write the DICOM series \(OSError"):
        write_dicom_series(Volume(_values(), _affine("ras"), modality="CT"), tmp_path / "series")
    assert list(tmp_path.iterdir()) == []
    assert issubclass(DicomWriteError, MedsegError) and issubclass(DicomWriteError, ValueError)
