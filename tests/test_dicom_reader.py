"""Every file of a DICOM folder is accounted for; damaged files are named; multi-volume data is split; syntaxes."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pydicom
import pytest
from dicom_factory import fieldmap_pixels, make_philips_fieldmap, make_slice, slice_pixels, write_series

from medseg import load_volume
from medseg.errors import (
    DuplicateSlicesError,
    InconsistentSeriesError,
    MedsegError,
    MultipleVolumesError,
    UnreadableFileError,
)
from medseg.io import list_volumes, scan_folder


def expected_array(n: int) -> np.ndarray:
    return np.stack([slice_pixels(k) for k in range(n)]).transpose(2, 1, 0).astype(np.int16) - 1024


def damage_header(path, keyword: str) -> None:
    """Rename the element ``keyword`` to an unknown private-looking tag: the value is gone, the file parses."""
    data = bytearray(path.read_bytes())
    tag = pydicom.datadict.tag_for_keyword(keyword)
    raw = int(tag >> 16).to_bytes(2, "little") + int(tag & 0xFFFF).to_bytes(2, "little")
    at = data.index(raw, 132)
    data[at + 1] ^= 0x10  # group 0x0020 -> 0x1020 and the like
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("end", [0, -1])
def test_damaged_end_slice_is_named_or_skipped_with_a_record(tmp_path, caplog, end):
    """An end slice that drops out of the series leaves no gap: it must still be reported, never dropped."""
    paths = write_series(tmp_path, 6, origin=(0, 0, 0))
    victim = paths[end]
    damage_header(victim, "SeriesInstanceUID")  # now a one-slice series of its own beside the others
    with pytest.raises(InconsistentSeriesError, match=rf"{victim}: a one-slice series .* slice of that series "
                       r"whose header .* is damaged.*--skip-unreadable"):
        load_volume(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medseg.io.dicom"):
        vol = load_volume(tmp_path, skip_unreadable=True)
    assert vol.shape == (32, 24, 5)
    assert [s.path for s in vol.source.skipped] == [str(victim)]
    assert "one-slice series" in vol.source.skipped[0].reason
    assert any(str(victim) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    contents = scan_folder(tmp_path, skip_unreadable=True)
    assert [s.path for s in contents.skipped] == [str(victim)]


@pytest.mark.parametrize("damage", ["pixel tag", "dicm marker", "truncated pixels", "sop class length"])
def test_damaged_first_slice_is_never_set_aside_as_another_object(tmp_path, damage):
    paths = write_series(tmp_path, 5, origin=(0, 0, 0))
    victim = paths[0]  # the lowest slice
    data = bytearray(victim.read_bytes())
    if damage == "pixel tag":
        at = data.rindex(b"\xe0\x7f\x10\x00")
        data[at + 2] ^= 0x01  # (7FE0,0011): no pixel data any more
        match = "without pixel data: the header is damaged"
    elif damage == "dicm marker":
        data[129] ^= 0x04
        match = "'DICM' marker at byte 128"
    elif damage == "truncated pixels":
        data = data[:-100]
        match = "pixel data is truncated"
    else:
        at = data.index(b"\x02\x00\x02\x00UI")  # MediaStorageSOPClassUID's length swallows the next byte
        data[at + 6] += 1
        match = "damaged|corrupt|truncated"
    victim.write_bytes(bytes(data))
    with pytest.raises(MedsegError, match=rf"{victim}: .*({match})"):
        load_volume(tmp_path)
    vol = load_volume(tmp_path, skip_unreadable=True)
    assert vol.shape[2] == 4 and vol.source.skipped[0].path == str(victim)


def test_unknown_vr_in_a_header_is_an_unreadable_file_error(tmp_path):
    """pydicom's NotImplementedError for an unknown VR ('WI') must not escape: it names the file."""
    paths = write_series(tmp_path, 3)
    data = bytearray(paths[1].read_bytes())
    at = data.index(b"\x20\x00\x0e\x00UI")  # SeriesInstanceUID, explicit VR
    data[at + 4 : at + 6] = b"WI"
    paths[1].write_bytes(bytes(data))
    with pytest.raises(UnreadableFileError, match=rf"{paths[1]}: corrupt DICOM header \(NotImplementedError"):
        load_volume(tmp_path)


def test_a_slice_whose_rescale_contradicts_the_series_is_named(tmp_path):
    paths = write_series(tmp_path, 5)
    ds = pydicom.dcmread(paths[2])
    ds.RescaleIntercept = -1025
    ds.save_as(paths[2], enforce_file_format=True)
    with pytest.raises(InconsistentSeriesError, match=rf"{paths[2]}: its rescale slope/intercept 1/-1025 contradicts "
                       r"the 4 other slices .*\(1/-1024\)"):
        load_volume(tmp_path)


def test_per_slice_rescale_throughout_a_series_is_applied(tmp_path):
    """Scanners that rescale every slice differently (PET-like) are not damaged: no file stands out."""
    for k in range(4):
        make_slice((0, 0, 2.0 * k), index=k, slope=1.0 + 0.5 * k, intercept=-1024.0).save_as(
            tmp_path / f"s{k}", enforce_file_format=True)
    vol = load_volume(tmp_path)
    stored = np.stack([slice_pixels(k) for k in range(4)]).transpose(2, 1, 0)
    np.testing.assert_allclose(vol.array, stored * (1.0 + 0.5 * np.arange(4)) - 1024.0)


def test_localizer_beside_the_series_is_set_aside_and_listed(tmp_path, data_dir):
    write_series(tmp_path / "ct", 4)
    scout = make_slice((0, 0, 0), iop=(1, 0, 0, 0, 0, -1), rows=40, cols=40, series_uid="1.2.3.99",
                       description="topogram")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.save_as(tmp_path / "scout", enforce_file_format=True)
    shutil.copy(data_dir / "dicom_seg_example" / "liver.dcm", tmp_path / "seg")
    (tmp_path / "notes.txt").write_text("not DICOM")
    vol = load_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, expected_array(4))
    contents = scan_folder(tmp_path)
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in ((f.path, f.reason) for f in contents.set_aside)}
    assert set(reasons) == {"scout", "seg", "notes.txt"}
    assert "localizer" in reasons["scout"] and "Segmentation Storage" in reasons["seg"]
    assert reasons["notes.txt"] == "not a DICOM file" and contents.skipped == ()
    assert load_volume(tmp_path, series_uid="1.2.3.99").shape == (40, 40, 1)  # still loadable when chosen


def test_several_damaged_files_are_all_named(tmp_path):
    paths = write_series(tmp_path, 6)
    for p in (paths[1], paths[4]):
        p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(UnreadableFileError, match=rf"{paths[4]}: .*truncated\. \(1 more damaged file: {paths[1]}\)"):
        load_volume(tmp_path)


def test_big_endian_and_deflated_files_load(tmp_path):
    for syntax in ("ExplicitVRBigEndian", "DeflatedExplicitVRLittleEndian"):
        folder = tmp_path / syntax
        paths = write_series(folder, 3)
        for p in paths:
            ds = pydicom.dcmread(p)
            stored = ds.pixel_array
            ds.file_meta.TransferSyntaxUID = getattr(pydicom.uid, syntax)
            if syntax == "ExplicitVRBigEndian":
                ds.PixelData = stored.astype(">i2").tobytes()
                pydicom.dcmwrite(p, ds, implicit_vr=False, little_endian=False, force_encoding=True)
            else:
                ds.save_as(p, enforce_file_format=True)
        vol = load_volume(folder)
        np.testing.assert_array_equal(vol.array, expected_array(3))
        np.testing.assert_allclose(vol.spacing_mm, (0.6, 0.8, 2.0))


@pytest.mark.parametrize("signed", [False, True])
def test_only_bits_stored_are_kept(tmp_path, signed):
    """12 bits stored in 16 allocated with the 4 high bits set: unsigned 4095 (not 65535), signed -1 and 2047."""
    pixels = np.zeros((24, 32), np.uint16)
    pixels[0, :3] = [0xFFFF, 0xF7FF, 0x0800]  # 12-bit values 4095, 2047, 2048 under garbage high bits
    ds = make_slice((0, 0, 0), modality="MR", intercept=0.0)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    vol = load_volume(tmp_path / "a.dcm")
    expected = [-1, 2047, -2048] if signed else [4095, 2047, 2048]
    assert vol.array[:3, 0, 0].tolist() == expected
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian  # decoded by pydicom: masked the same way
    ds.PixelData = pixels.astype(">u2").tobytes()
    pydicom.dcmwrite(tmp_path / "be.dcm", ds, implicit_vr=False, little_endian=False, force_encoding=True)
    assert load_volume(tmp_path / "be.dcm").array[:3, 0, 0].tolist() == expected


def test_philips_style_two_volume_enhanced_file(tmp_path):
    path = tmp_path / "IM_0007"
    make_philips_fieldmap(path)
    with pytest.raises(MultipleVolumesError, match=r"IM_0007: holds 2 volumes at the same slice positions \(0: 32 "
                       r"slices, frame type ORIGINAL\\PRIMARY\\M_FFE.*1: 32 slices, frame type .*B0 MAP.*volume=N"):
        load_volume(path)
    infos = list_volumes(path)
    assert [(v.index, v.n_slices) for v in infos] == [(0, 32), (1, 32)]
    magnitude, fieldmap = load_volume(path, volume=0), load_volume(path, volume=1)
    assert magnitude.same_grid(fieldmap) and magnitude.shape == (32, 24, 32)
    # Slice k (ascending along the normal) holds the pixels written for index k; MR values as stored.
    for k in (0, 17, 31):
        np.testing.assert_array_equal(magnitude.array[:, :, k], fieldmap_pixels(0, k).T)
        np.testing.assert_array_equal(fieldmap.array[:, :, k], fieldmap_pixels(1, k).T)
    assert magnitude.is_oblique
    with pytest.raises(MultipleVolumesError, match=r"no volume 2; it holds 2"):
        load_volume(path, volume=2)


def test_uneven_repeats_stay_duplicate_slices(tmp_path):
    write_series(tmp_path, 3, origin=(0, 0, 0))
    make_slice((0, 0, 2.0), index=7).save_as(tmp_path / "dup", enforce_file_format=True)
    make_slice((0, 0, 2.0), index=8).save_as(tmp_path / "dup2", enforce_file_format=True)
    with pytest.raises(DuplicateSlicesError, match=r"3 different slices at the same position 2\.000 mm"):
        load_volume(tmp_path)


def test_cli_info_lists_set_aside_skipped_and_volumes(tmp_path, data_dir, caplog):
    from typer.testing import CliRunner

    from medseg.cli import app

    runner = CliRunner()
    paths = write_series(tmp_path / "ct", 5)
    shutil.copy(data_dir / "dicom_seg_example" / "liver.dcm", tmp_path / "ct" / "seg.dcm")
    paths[0].write_bytes(paths[0].read_bytes()[:-10])
    res = runner.invoke(app, ["info", str(tmp_path / "ct")])
    assert res.exit_code == 2 and str(paths[0]) in res.output and "Traceback" not in res.output
    with caplog.at_level(logging.WARNING, logger="medseg.io.dicom"):
        res = runner.invoke(app, ["info", str(tmp_path / "ct"), "--skip-unreadable", "--json"])
    assert res.exit_code == 0, res.output
    warned = [r for r in caplog.records if str(paths[0]) in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warned) == 1  # named once, though info reads the folder more than once
    data = json.loads(res.stdout[res.stdout.index("{"):])
    assert data["shape"] == [32, 24, 4]
    assert [s["path"] for s in data["skipped"]] == [str(paths[0])] and "truncated" in data["skipped"][0]["reason"]
    assert [s["path"] for s in data["set_aside"]] == [str(tmp_path / "ct" / "seg.dcm")]
    make_philips_fieldmap(tmp_path / "fm.dcm")
    res = runner.invoke(app, ["info", str(tmp_path / "fm.dcm"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [v["slices"] for v in data["volumes"]] == [32, 32] and "shape" not in data
    out = tmp_path / "fieldmap.nii.gz"
    res = runner.invoke(app, ["convert", str(tmp_path / "fm.dcm"), str(out), "--volume", "1"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(load_volume(out).array, load_volume(tmp_path / "fm.dcm", volume=1).array)


def test_series_info_carries_the_series_number_as_stored() -> None:
    from pathlib import Path

    from medseg.io import list_series

    data = Path(__file__).parent / "data"
    (ct,) = list_series(data / "dicom_seg_example" / "ct_3slice")
    stored = pydicom.dcmread(data / "dicom_seg_example" / "ct_3slice" / "01.dcm", stop_before_pixels=True).SeriesNumber
    assert ct.series_number == int(stored)
    (blank,) = list_series(data / "totalseg_example" / "example_ct_dicom")  # SeriesNumber present but empty
    assert blank.series_number is None
