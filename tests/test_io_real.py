"""Real samples load with the geometry recorded in tests/data/PROVENANCE.md."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg import load_volume
from medseg.resample import resample_to

TS = "totalseg_example"


@pytest.fixture(scope="module")
def ts_ct(data_dir):
    return load_volume(data_dir / TS / "example_ct_dicom")


@pytest.fixture(scope="module")
def ts_seg(data_dir):
    return load_volume(data_dir / TS / "example_seg_dicom.nii.gz")


def test_totalseg_ct_series_geometry(ts_ct):
    # JPEG 2000, blank UIDs, no extensions, InstanceNumber running head→feet.
    assert ts_ct.shape == (512, 512, 20)
    np.testing.assert_allclose(ts_ct.spacing_mm, (0.9765625, 0.9765625, 2.0))
    # PROVENANCE (ITK, LPS): origin (-249.512, -437.512, -804.5), identity direction → RAS flips x and y.
    np.testing.assert_allclose(ts_ct.origin_mm, (249.51171875, 437.51171875, -804.5))
    np.testing.assert_allclose(ts_ct.direction, np.diag([-1.0, -1.0, 1.0]))
    assert ts_ct.modality == "CT"
    assert (ts_ct.array.min(), ts_ct.array.max()) == (-1024, 1839)  # HU (rescale 1/-1024 applied)
    assert ts_ct.source.series_instance_uid is None  # blanked in the source
    assert len(ts_ct.source.files) == 20
    # Slices run inferior → superior: the first file in slice order is the lowest z (-804.5).
    assert ts_ct.source.files[0].endswith("016592")


def test_totalseg_seg_is_the_same_world_grid(ts_ct, ts_seg):
    # Same voxel centres, y axis stored reversed: not the same array layout, the same set of world points.
    assert not ts_seg.same_grid(ts_ct)
    ct_points = ts_ct.world_mm(np.array([[0, 0, 0], [511, 511, 19], [17, 300, 5]]))
    seg_idx = ts_seg.voxel_ijk(ct_points)
    np.testing.assert_allclose(seg_idx, np.round(seg_idx), atol=1e-6)  # lands exactly on seg voxel centres
    np.testing.assert_allclose(seg_idx[:2], [[0, 511, 0], [511, 0, 19]], atol=1e-6)
    on_ct = resample_to(ts_seg, ts_ct, interpolation="nearest")
    np.testing.assert_array_equal(on_ct.array, np.flip(ts_seg.array, axis=1))


def test_totalseg_liver_hu_and_spleen_volume(ts_ct, ts_seg, data_dir):
    names = json.loads((data_dir / TS / "classes.json").read_text())["total"]
    assert names["5"] == "liver" and names["1"] == "spleen"
    seg = resample_to(ts_seg, ts_ct, interpolation="nearest")
    liver_hu = ts_ct.array[seg.array == 5].mean()
    assert 60 < liver_hu < 120  # ≈ 89.3 HU; a naive array overlay gives ≈ -75
    naive = ts_ct.array[ts_seg.array == 5].mean()
    assert naive < 0
    spleen_ml = (seg.array == 1).sum() * seg.voxel_volume_ml
    assert spleen_ml == pytest.approx(249.2, abs=0.1)


def test_dcmqi_three_slice_ct(data_dir):
    vol = load_volume(data_dir / "dicom_seg_example" / "ct_3slice")
    assert vol.shape == (512, 512, 3)
    np.testing.assert_allclose(vol.spacing_mm, (0.810547, 0.810547, 1.0), atol=1e-6)
    # Files are in descending z (01 = -126.69); slice 0 must be the lowest, -128.69.
    assert vol.origin_mm[2] == pytest.approx(-128.69, abs=1e-4)
    assert vol.source.files[0].endswith("03.dcm")
    assert vol.source.series_instance_uid == "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
    label = load_volume(data_dir / "dicom_seg_example" / "liver_seg.nrrd")
    assert label.same_grid(vol)
    assert (label.array == 1).sum() * label.voxel_volume_ml == pytest.approx(70.36, abs=0.01)
    assert vol.array[label.array == 1].mean() == pytest.approx(37.3, abs=0.05)


@pytest.mark.parametrize(
    ("name", "shape", "spacing", "origin_lps", "direction_lps"),
    [
        ("brain1", (256, 256, 25), (0.78125, 0.78125, 6.5), (-99.609, 99.609, -78.0), (1, -1, 1)),
        ("breast1", (45, 120, 21), (0.66406, 0.66406, 2.1), (-116.543, -48.145, 9.45), (1, 1, 1)),
    ],
)
def test_pyradiomics_nrrd_pairs(data_dir, name, shape, spacing, origin_lps, direction_lps):
    image = load_volume(data_dir / "pyradiomics" / f"{name}_image.nrrd")
    label = load_volume(data_dir / "pyradiomics" / f"{name}_label.nrrd")
    for vol in (image, label):
        assert vol.shape == shape
        np.testing.assert_allclose(vol.spacing_mm, spacing, atol=1e-5)
        np.testing.assert_allclose(vol.origin_mm, np.array(origin_lps) * [-1, -1, 1], atol=1e-3)
        np.testing.assert_allclose(vol.direction, np.diag(direction_lps) @ np.diag([-1, -1, 1]), atol=1e-9)
    assert label.same_grid(image)


def test_lps_stored_mr_nifti(data_dir):
    mr = load_volume(data_dir / TS / "example_mr_sm.nii.gz")
    assert mr.shape == (117, 91, 20) and mr.orientation == "LPS"
    np.testing.assert_allclose(mr.spacing_mm, (3, 3, 3), atol=1e-5)
    assert mr.array.dtype == np.int16 and (mr.array.min(), mr.array.max()) == (-47, 833)
    seg = load_volume(data_dir / TS / "example_seg_mr.nii.gz")
    assert seg.same_grid(mr)
    assert (seg.array == 5).sum() * seg.voxel_volume_ml == pytest.approx(498.96, abs=0.01)


def test_msd_spleen_crop(data_dir):
    ct = load_volume(data_dir / "msd_spleen_crop" / "sub-spleen2_ct.nii.gz", modality="ct")
    seg = load_volume(data_dir / "msd_spleen_crop" / "sub-spleen2_ct_seg-manual.nii.gz")
    assert ct.modality == "CT" and ct.orientation == "RAS" and ct.shape == (164, 166, 26)
    np.testing.assert_allclose(ct.spacing_mm, (0.7949, 0.7949, 5.0), atol=1e-4)
    np.testing.assert_allclose(ct.origin_mm, (-406.2, -406.2, 0.0), atol=0.01)
    assert ct.array.dtype == np.float32
    assert seg.same_grid(ct)
    spleen = seg.array == 1
    assert spleen.sum() == 96672
    assert spleen.sum() * seg.voxel_volume_ml == pytest.approx(305.44, abs=0.01)
    assert ct.array[spleen].mean() == pytest.approx(85.6, abs=0.05)


def test_matches_simpleitk_series_reader(data_dir):
    import SimpleITK as sitk

    from medseg.io.convert import volume_from_sitk

    folder = data_dir / "dicom_seg_example" / "ct_3slice"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    ref = volume_from_sitk(reader.Execute())
    ours = load_volume(folder)
    assert ours.same_grid(ref, atol_mm=1e-4)
    np.testing.assert_array_equal(ours.array, ref.array)
