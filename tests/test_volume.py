"""Volume geometry, exact conversions (SimpleITK, nibabel, MONAI) and save/load round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import oblique_affine

from medseg import LabelTable, Volume, load_volume, save_volume
from medseg.errors import GeometryError, GridMismatchError, LabelTableError, UnsupportedFormatError
from medseg.resample import as_orientation, resample_to


def all_world_points(vol: Volume) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1).reshape(-1, 3)
    return vol.world_mm(ijk)


def test_derived_geometry(odd_volume):
    np.testing.assert_allclose(odd_volume.spacing_mm, (0.7, 1.3, 2.9))
    np.testing.assert_allclose(odd_volume.origin_mm, (-12.5, 40.25, 7.0))
    d = odd_volume.direction
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-12)
    assert np.linalg.det(d) < 0  # one flipped axis
    assert odd_volume.voxel_volume_ml == pytest.approx(0.7 * 1.3 * 2.9 / 1000)
    assert odd_volume.is_oblique
    np.testing.assert_allclose(odd_volume.voxel_ijk(odd_volume.world_mm([[1, 2, 3]])), [[1, 2, 3]], atol=1e-12)


def test_bad_affines_and_arrays():
    with pytest.raises(GeometryError, match=r"Affine shape must be \(4, 4\), not \(3, 3\)"):
        Volume(np.zeros((2, 2, 2)), np.eye(3))
    with pytest.raises(GeometryError, match="singular"):
        Volume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(GeometryError, match="finite"):
        Volume(np.zeros((2, 2, 2)), np.full((4, 4), np.nan))
    with pytest.raises(GeometryError, match="must be 3D"):
        Volume(np.zeros((2, 2)), np.eye(4))


def test_grid_mismatch_names_both_grids(odd_volume):
    other = Volume(odd_volume.array, np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(GridMismatchError, match=r"(?s)first:.*spacing \(0\.7, 1\.3, 2\.9\).*second:.*spacing \(1, 1, 1\)"
                       r".*resample_to"):
        odd_volume.require_same_grid(other)


def test_sitk_round_trip_is_exact(odd_volume):
    img = odd_volume.to_sitk()
    assert img.GetSize() == (7, 5, 4)
    # ITK index (x, y, z) = our (i, j, k); its physical point is LPS.
    lps = np.array(img.TransformIndexToPhysicalPoint((3, 1, 2)))
    np.testing.assert_allclose(lps * [-1, -1, 1], odd_volume.world_mm([3, 1, 2]), atol=1e-9)
    import SimpleITK as sitk

    assert sitk.GetArrayFromImage(img)[2, 1, 3] == odd_volume.array[3, 1, 2]
    back = Volume.from_sitk(img)
    np.testing.assert_array_equal(back.array, odd_volume.array)
    np.testing.assert_allclose(back.affine, odd_volume.affine, atol=1e-12)


def test_nibabel_round_trip_is_exact(odd_volume):
    img = odd_volume.to_nibabel()
    np.testing.assert_allclose(img.affine, odd_volume.affine, atol=1e-12)
    back = Volume.from_nibabel(img)
    np.testing.assert_array_equal(back.array, odd_volume.array)
    np.testing.assert_allclose(back.affine, odd_volume.affine, atol=1e-12)


def test_metatensor_round_trip_and_monai_transforms(odd_volume):
    from monai.transforms import Orientation, Spacing

    mt = odd_volume.to_metatensor()
    assert tuple(mt.shape) == (1, 7, 5, 4)
    back = Volume.from_metatensor(mt)
    np.testing.assert_array_equal(back.array, odd_volume.array)
    np.testing.assert_allclose(back.affine, odd_volume.affine, atol=1e-12)
    # A MONAI transform runs on it and the world position of every value is kept.
    ras = Volume.from_metatensor(Orientation(axcodes="RAS")(mt))
    assert ras.orientation == "RAS"
    ours = as_orientation(odd_volume, "RAS")
    np.testing.assert_array_equal(ras.array, ours.array)
    np.testing.assert_allclose(ras.affine, ours.affine, atol=1e-9)
    # Spacing (resampling) keeps the centre of the field of view in the same world place.
    res = Volume.from_metatensor(Spacing(pixdim=(1.0, 1.0, 1.0), mode="nearest")(mt.float()))
    centre_in = odd_volume.world_mm((np.array(odd_volume.shape) - 1) / 2)
    centre_out = res.world_mm((np.array(res.shape) - 1) / 2)
    assert np.linalg.norm(centre_in - centre_out) < 1.5


def test_lps_metatensor_is_converted():
    import torch
    from monai.data import MetaTensor

    mt = MetaTensor(torch.zeros(1, 2, 3, 4), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    mt.meta["space"] = "LPS"
    vol = Volume.from_metatensor(mt)
    np.testing.assert_allclose(np.diag(vol.affine), [-2, -3, 4, 1])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_save_load_round_trip_keeps_world_coordinates(tmp_path, odd_volume, suffix):
    big = Volume(np.random.default_rng(0).integers(-1000, 1000, (61, 47, 33)).astype(np.int16),
                 oblique_affine(origin=(-250.3, 180.7, -804.5)))
    for vol in (odd_volume, big):
        path = save_volume(vol, tmp_path / f"v{suffix}")
        back = load_volume(path)
        np.testing.assert_array_equal(back.array, vol.array)
        assert np.max(np.abs(all_world_points(back) - all_world_points(vol))) < 1e-4


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAS", "PIR", "SLA"])
def test_reorientation_keeps_world_positions(odd_volume, orientation):
    re = as_orientation(odd_volume, orientation)
    assert re.orientation == orientation
    back = resample_to(re, odd_volume, interpolation="linear")  # exact reordering, no interpolation
    np.testing.assert_array_equal(back.array, odd_volume.array)


def test_labels_saved_as_integers_with_sidecar(tmp_path):
    table = LabelTable.from_names({1: "liver", 2: "spleen", 300: "tumour"}, lesions=["tumour"])
    arr = np.zeros((6, 5, 4), dtype=np.float64)
    arr[1:3, 1:3, 1:3] = 1
    arr[4, 4, 3] = 300
    vol = Volume(arr, oblique_affine(), labels=table)
    path = save_volume(vol, tmp_path / "seg.nii.gz")
    side = tmp_path / "seg.labels.json"
    data = json.loads(side.read_text())
    assert data["labels"][2] == {"value": 300, "name": "tumour", "color": list(table[300].color), "kind": "lesion"}
    back = load_volume(path)
    assert back.array.dtype == np.uint16  # 300 does not fit uint8
    assert back.labels == table
    np.testing.assert_array_equal(back.array, arr)
    small = save_volume(Volume((arr == 1).astype(np.float32), vol.affine, labels=LabelTable.from_names({1: "liver"})),
                        tmp_path / "liver.nrrd")
    assert load_volume(small).array.dtype == np.uint8


def test_label_errors(tmp_path):
    vol = Volume(np.full((2, 2, 2), 1.5), np.eye(4), labels=LabelTable.from_names({1: "a"}))
    with pytest.raises(LabelTableError, match="hold integers"):
        save_volume(vol, tmp_path / "x.nii.gz")
    assert not list(tmp_path.iterdir())  # nothing partial left behind
    with pytest.raises(LabelTableError, match="appears twice"):
        LabelTable.from_json({"labels": [{"value": 1, "name": "a"}, {"value": 1, "name": "b"}]})
    with pytest.raises(LabelTableError, match="colour must be three integers"):
        LabelTable.from_json({"labels": [{"value": 1, "name": "a", "color": [1, 2]}]})


def test_save_refuses_unknown_suffix(tmp_path, odd_volume):
    with pytest.raises(UnsupportedFormatError, match=r"cannot write '\.png'.*\.nii\.gz"):
        save_volume(odd_volume, tmp_path / "x.png")
