"""DICOM series discovery, sorting, validation and decoding (synthetic series written by dicom_factory)."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from dicom_factory import (
    make_enhanced_ct,
    make_slice,
    recompress_jpeg_baseline,
    recompress_with_sitk,
    slice_pixels,
    write_series,
)

from medseg import load_volume
from medseg.errors import (
    DuplicateSlicesError,
    GantryTiltError,
    InconsistentSeriesError,
    MedsegError,
    MissingSlicesError,
    MultipleSeriesError,
    NoImageSeriesError,
    NonUniformSpacingError,
    NotVolumetricError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from medseg.io import list_series


def expected_array(n: int) -> np.ndarray:
    """(I, J, K) array the loader must return: HU = stored - 1024, slice k = index k along the normal."""
    return np.stack([slice_pixels(k) for k in range(n)]).transpose(2, 1, 0).astype(np.int16) - 1024


def test_sorts_by_position_not_instance_number_or_name(tmp_path):
    names = ["b", "e", "a", "d", "c"]  # neither names nor InstanceNumbers follow position
    write_series(tmp_path, 5, names=names)
    vol = load_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, expected_array(5))
    assert vol.array.dtype == np.int16
    # LPS (-10, 20, 30) is RAS (10, -20, 30); i along LPS +x = RAS -x with 0.6 mm columns.
    np.testing.assert_allclose(vol.origin_mm, (10.0, -20.0, 30.0))
    np.testing.assert_allclose(vol.spacing_mm, (0.6, 0.8, 2.0))
    assert vol.orientation == "LPS"
    assert vol.modality == "CT"
    assert vol.source is not None and vol.source.files[0].endswith("/b")


def test_descending_positions_and_oblique_orientation(tmp_path):
    c, s = np.cos(0.4), np.sin(0.4)
    iop = (c, s, 0.0, 0.0, 0.0, -1.0)  # rows tilted in the axial plane, columns running feet-ward (coronal-ish)
    write_series(tmp_path, 4, iop=iop, step=-3.0, origin=(1.0, 2.0, 3.0))
    vol = load_volume(tmp_path)
    # Slices were written with decreasing distance along the normal: the loader must reverse them.
    np.testing.assert_array_equal(vol.array, expected_array(4)[:, :, ::-1])
    normal = np.cross(iop[:3], iop[3:])
    lowest = np.array([1.0, 2.0, 3.0]) + 3 * -3.0 * normal
    np.testing.assert_allclose(vol.origin_mm, lowest * [-1, -1, 1], atol=1e-9)
    assert vol.is_oblique


def test_blank_uids_use_fallback_key_and_subfolders(tmp_path):
    write_series(tmp_path / "a" / "b", 3, series_uid="", sop_uid="", study_uid="")
    vol = load_volume(tmp_path)
    assert vol.shape == (32, 24, 3)
    [info] = list_series(tmp_path)
    assert info.key.startswith("fallback:") and info.series_instance_uid == ""
    assert load_volume(tmp_path, series_uid=info.key).same_grid(vol)


def test_non_image_objects_and_other_files_are_ignored(tmp_path, data_dir):
    shutil.copytree(data_dir / "dicom_seg_example" / "ct_3slice", tmp_path / "ct")
    shutil.copy(data_dir / "dicom_seg_example" / "liver.dcm", tmp_path / "liver_seg")  # a DICOM SEG object
    (tmp_path / "README.txt").write_text("not dicom")
    vol = load_volume(tmp_path)
    assert vol.shape == (512, 512, 3)


def test_several_series_listed_with_how_to_choose(tmp_path):
    write_series(tmp_path, 3, series_uid="1.2.3.4", description="axial soft tissue")
    write_series(tmp_path, 4, series_uid="1.2.3.5", description="bone kernel", names=["x1", "x2", "x3", "x4"])
    with pytest.raises(MultipleSeriesError, match=r"(?s)2 image series.*1\.2\.3\.5.*bone kernel.*CT.*slices=4.*"
                       r"1\.2\.3\.4.*axial soft tissue.*slices=3.*series_uid"):
        load_volume(tmp_path)
    assert load_volume(tmp_path, series_uid="1.2.3.5").shape[2] == 4
    with pytest.raises(MultipleSeriesError, match="no series '9.9'"):
        load_volume(tmp_path, series_uid="9.9")


def test_no_image_series(tmp_path, data_dir):
    shutil.copy(data_dir / "dicom_seg_example" / "liver.dcm", tmp_path / "seg.dcm")
    with pytest.raises(NoImageSeriesError, match="no DICOM image series"):
        load_volume(tmp_path)


def test_missing_slices_name_the_gap(tmp_path):
    paths = write_series(tmp_path, 6, origin=(0, 0, 0))
    paths[3].unlink()  # z = 6 mm is gone
    with pytest.raises(MissingSlicesError, match=r"between 4\.00 mm \(IM0004\) and 8\.00 mm \(IM0002\) \(1 missing\)"):
        load_volume(tmp_path)


def test_non_uniform_spacing(tmp_path):
    write_series(tmp_path, 4, positions=[(0, 0, 0), (0, 0, 2), (0, 0, 4), (0, 0, 7)])
    with pytest.raises(NonUniformSpacingError, match=r"not uniform.*4\.00→7\.00 mm \(gap 3\.000; IM0002, IM0001\)"):
        load_volume(tmp_path)


def test_one_slice_contradicting_its_series_is_named(tmp_path):
    write_series(tmp_path, 3)
    make_slice((0, 0, 50), iop=(0, 1, 0, 0, 0, -1)).save_as(tmp_path / "sag", enforce_file_format=True)
    with pytest.raises(InconsistentSeriesError, match=r"/sag: its orientation \[0, 1, 0, 0, 0, -1\] contradicts the "
                       r"3 other slices .*\[1, 0, 0, 0, 1, 0\].*--skip-unreadable"):
        load_volume(tmp_path)
    (tmp_path / "sag").unlink()
    make_slice((0, 0, 50), rows=10, cols=10).save_as(tmp_path / "small", enforce_file_format=True)
    with pytest.raises(InconsistentSeriesError, match=r"/small: its image size \(rows×columns\) '10×10' contradicts"):
        load_volume(tmp_path)


def test_mixed_sizes_in_one_series(tmp_path):
    write_series(tmp_path, 3)
    write_series(tmp_path, 3, rows=10, cols=10, origin=(0, 0, 50), names=["s1", "s2", "s3"])
    with pytest.raises(InconsistentSeriesError, match=r"image size \(rows×columns\): 24×32 \(3 slices\), 10×10 "
                       r"\(3 slices\) \(e\.g\. 10×10 in s1, s2, s3\)"):
        load_volume(tmp_path)


def test_duplicate_positions(tmp_path):
    write_series(tmp_path, 3, origin=(0, 0, 0))
    make_slice((0, 0, 2.0), index=7).save_as(tmp_path / "dup", enforce_file_format=True)
    with pytest.raises(DuplicateSlicesError, match=r"2 different slices at the same position 2\.000 mm"):
        load_volume(tmp_path)


def test_same_instance_twice_is_kept_once(tmp_path):
    paths = write_series(tmp_path, 3)
    (tmp_path / "copy").mkdir()
    shutil.copy(paths[1], tmp_path / "copy" / "again")
    np.testing.assert_array_equal(load_volume(tmp_path).array, expected_array(3))


def test_gantry_tilt_is_refused(tmp_path):
    tilt = np.tan(np.radians(15))
    write_series(tmp_path, 4, positions=[(0, k * 2.0 * tilt, k * 2.0) for k in range(4)])
    with pytest.raises(GantryTiltError, match=r"gantry tilt ≈ 15\.00°"):
        load_volume(tmp_path)


def test_truncated_file_is_named(tmp_path):
    paths = write_series(tmp_path, 3)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 500])
    with pytest.raises(UnreadableFileError, match=rf"{paths[1].name}.*truncated"):
        load_volume(tmp_path)


def test_unsupported_format_lists_supported(tmp_path):
    p = tmp_path / "scan.png"
    p.write_bytes(b"\x89PNG....")
    with pytest.raises(UnsupportedFormatError, match=r"scan\.png.*NIfTI.*NRRD.*MetaImage"):
        load_volume(p)


def test_missing_path(tmp_path):
    with pytest.raises(UnreadableFileError, match="no such file"):
        load_volume(tmp_path / "nope.nii.gz")


def test_single_slice_loads_as_one_slice_volume(tmp_path):
    [path] = write_series(tmp_path, 1)
    vol = load_volume(path)
    assert vol.shape == (32, 24, 1)
    assert vol.spacing_mm[2] == pytest.approx(2.0)  # SliceThickness stands in for the slice step
    with pytest.raises(NotVolumetricError, match="needs a 3D volume"):
        vol.require_3d("Segmentation")


def test_enhanced_multiframe_matches_single_frame_series(tmp_path):
    make_enhanced_ct(tmp_path / "enhanced.dcm", 4, step=2.5, origin=(5.0, -7.0, 12.0))
    vol = load_volume(tmp_path / "enhanced.dcm")
    write_series(tmp_path / "classic", 4, step=2.5, origin=(5.0, -7.0, 12.0))
    ref = load_volume(tmp_path / "classic")
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-9)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless", "JPEGLosslessSV1"])
def test_lossless_compressed_syntaxes_decode_exactly(tmp_path, syntax):
    paths = write_series(tmp_path, 3)
    for p in paths:
        if syntax in ("JPEGLosslessSV1", "JPEG2000Lossless"):  # openjpeg via pydicom refuses tiny images
            recompress_with_sitk(p, "JPEG" if syntax == "JPEGLosslessSV1" else "JPEG2000")
        else:
            ds = pydicom.dcmread(p)
            ds.compress(getattr(pydicom.uid, syntax))
            ds.save_as(p, enforce_file_format=True)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    np.testing.assert_array_equal(load_volume(tmp_path).array, expected_array(3))


def test_jpeg_baseline_decodes(tmp_path):
    paths = write_series(tmp_path, 3, intercept=0.0)
    decoded = [recompress_jpeg_baseline(p) for p in paths]
    vol = load_volume(tmp_path)
    # Lossy: decoders may differ by one grey level (IDCT rounding); positions and order must not.
    np.testing.assert_allclose(vol.array, np.stack(decoded).transpose(2, 1, 0), atol=1)


def test_mr_comes_back_as_stored_ct_rescaled(tmp_path):
    write_series(tmp_path / "mr", 3, modality="MR", slope=2.0, intercept=5.0)
    mr = load_volume(tmp_path / "mr")
    np.testing.assert_array_equal(mr.array, expected_array(3) + 1024)
    write_series(tmp_path / "ct", 3, slope=2.0, intercept=5.0)
    ct = load_volume(tmp_path / "ct")
    assert ct.array.dtype == np.float32
    np.testing.assert_allclose(ct.array, (expected_array(3) + 1024) * 2.0 + 5.0)


def test_medseg_error_family_subclasses_builtins():
    assert issubclass(MissingSlicesError, ValueError) and issubclass(MissingSlicesError, MedsegError)
    assert issubclass(UnreadableFileError, OSError)


def test_parallel_decode_equals_serial_and_names_bad_files(tmp_path, data_dir, monkeypatch):
    from medseg.io import dicom

    src = data_dir / "totalseg_example" / "example_ct_dicom"  # 20 JPEG 2000 slices
    seen = {}
    real = dicom._parallel_decode

    def spy(frames, workers=None):
        result = real(frames, workers)
        seen["decoded"] = len(result)
        return {} if seen.get("force_serial") else result

    monkeypatch.setattr(dicom, "_parallel_decode", spy)
    parallel = load_volume(src)
    assert seen["decoded"] == 20  # the worker processes decoded every slice
    seen["force_serial"] = True
    serial = load_volume(src)
    np.testing.assert_array_equal(parallel.array, serial.array)
    monkeypatch.setattr(dicom, "_parallel_decode", real)
    # A slice whose JPEG 2000 stream is cut short is named, whichever path decodes it.
    shutil.copytree(src, tmp_path / "s")
    victim = sorted((tmp_path / "s").iterdir())[7]
    ds = pydicom.dcmread(victim)
    from pydicom.encaps import encapsulate, generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    ds.save_as(victim)
    with pytest.raises(UnreadableFileError, match=rf"{victim.name}.*cannot decode pixel data"):
        load_volume(tmp_path / "s")
