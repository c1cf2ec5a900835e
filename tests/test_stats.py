"""medseg.stats on real samples (recorded volumes and HU), against SimpleITK's label statistics, and on analytic
shapes on an oblique grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import DATA, oblique_affine

from medseg import Volume, load_volume
from medseg.errors import GridMismatchError, LabelTableError
from medseg.labels import Label, LabelTable
from medseg.stats import longest_axis_mm, volume_stats


@pytest.mark.parametrize(("case", "volume_mm3"), [("brain1", 16412.66), ("breast1", 132.43)])
def test_pyradiomics_voxel_volume(case: str, volume_mm3: float) -> None:
    seg = load_volume(DATA / "pyradiomics" / f"{case}_label.nrrd")
    row = volume_stats(seg)[1]
    assert row.volume_ml * 1000 == pytest.approx(volume_mm3, rel=1e-4)  # PROVENANCE.md, pyradiomics VoxelVolume


def test_dcmqi_liver_volume_and_hu() -> None:
    seg = load_volume(DATA / "dicom_seg_example" / "liver_seg.nrrd")
    image = load_volume(DATA / "dicom_seg_example" / "ct_3slice")
    stats = volume_stats(seg, image)
    row = stats[1]
    assert row.voxels == 107098 and round(row.volume_ml, 2) == 70.36  # PROVENANCE.md
    assert round(row.intensity_mean, 1) == 37.3 and stats.intensity_unit == "HU"
    values = image.array[seg.array == 1].astype(np.float64)
    assert row.intensity_std == pytest.approx(values.std())
    assert (row.intensity_p5, row.intensity_median, row.intensity_p95) == pytest.approx(
        tuple(np.percentile(values, [5, 50, 95]))
    )
    assert (row.intensity_min, row.intensity_max) == (values.min(), values.max())


def test_msd_spleen_volume_and_hu() -> None:
    seg = load_volume(DATA / "msd_spleen_crop" / "sub-spleen2_ct_seg-manual.nii.gz")
    image = load_volume(DATA / "msd_spleen_crop" / "sub-spleen2_ct.nii.gz", modality="CT")
    row = volume_stats(seg, image)[1]
    assert row.voxels == 96672 and round(row.volume_ml, 2) == 305.44
    assert round(row.intensity_mean, 1) == 85.6


def test_brain_lesions_match_simpleitk_label_shape_statistics() -> None:
    import SimpleITK as sitk

    seg = load_volume(DATA / "pyradiomics" / "brain1_label.nrrd")
    image = load_volume(DATA / "pyradiomics" / "brain1_image.nrrd")
    stats = volume_stats(seg, image, lesion_labels=[1])
    row = stats[1]
    assert row.n_components == 2 and len(stats.lesions) == 2  # PROVENANCE.md: 2 connected components
    cc = sitk.ConnectedComponent(seg.to_sitk() > 0, True)  # fully connected = 26-connectivity
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.ComputeFeretDiameterOn()
    shape.Execute(cc)
    itk = sorted(
        (shape.GetNumberOfPixels(lab), shape.GetFeretDiameter(lab), shape.GetCentroid(lab)) for lab in shape.GetLabels()
    )
    ours = sorted((les.voxels, les.longest_axis_mm, les.centroid_mm) for les in stats.lesions)
    for (n_itk, feret, c_lps), (n, longest, c_ras) in zip(itk, ours, strict=True):
        assert n == n_itk
        assert longest == pytest.approx(feret, abs=1e-6)
        assert np.allclose(c_ras, (-c_lps[0], -c_lps[1], c_lps[2]), atol=1e-6)  # LPS → RAS
    inten = sitk.LabelIntensityStatisticsImageFilter()
    inten.Execute(sitk.Cast(seg.to_sitk(), sitk.sitkUInt8), image.to_sitk())
    n = row.voxels
    assert row.intensity_mean == pytest.approx(inten.GetMean(1))
    assert row.intensity_std * math.sqrt(n / (n - 1)) == pytest.approx(inten.GetStandardDeviation(1))  # ITK: n-1
    assert (row.intensity_min, row.intensity_max) == (inten.GetMinimum(1), inten.GetMaximum(1))
    assert row.volume_ml * 1000 == pytest.approx(inten.GetPhysicalSize(1))
    c = inten.GetCentroid(1)
    assert np.allclose(row.centroid_mm, (-c[0], -c[1], c[2]), atol=1e-6)


def test_sphere_on_oblique_grid() -> None:
    aff = oblique_affine(spacing=(0.6, 0.9, 1.7), origin=(-40.0, 12.0, 3.0))
    shape = (70, 50, 30)
    grid = Volume(np.zeros(shape, np.uint8), aff)
    centre = grid.world_mm(np.array(shape) / 2 - 0.3)
    ijk = np.indices(shape).reshape(3, -1).T
    inside = np.linalg.norm(grid.world_mm(ijk) - centre, axis=1) <= 10.0
    arr = inside.reshape(shape).astype(np.uint8) * 3
    arr[1, 1, 1] = 5  # a single voxel
    image = Volume(np.arange(arr.size, dtype=np.float32).reshape(shape), aff, modality="MR")
    table = LabelTable([Label(3, "ball", (1, 2, 3)), Label(5, "dot", (4, 5, 6), "lesion"), Label(7, "gone", (7, 8, 9))])
    stats = volume_stats(grid.with_array(arr, labels=table), image)
    ball, dot, gone = stats["ball"], stats["dot"], stats[7]
    assert ball.volume_ml == pytest.approx(4 / 3 * math.pi * 1000 / 1000, rel=0.02)
    assert np.allclose(ball.centroid_mm, centre, atol=0.05)
    assert ball.extent_mm[2] == pytest.approx(20.0, abs=2.5)
    assert ball.intensity_mean == pytest.approx(image.array[arr == 3].mean(), rel=1e-6)
    assert stats.intensity_unit is None
    assert dot.voxels == 1 and np.allclose(dot.centroid_mm, grid.world_mm([1, 1, 1]))
    assert np.allclose(dot.extent_mm, np.abs(aff[:3, :3]) @ np.ones(3))  # one voxel's world box
    assert dot.intensity_mean == image.array[1, 1, 1]
    assert gone.voxels == 0 and gone.n_components == 0 and math.isnan(gone.centroid_mm[0])
    assert [les.name for les in stats.lesions] == ["dot"] and stats.lesions[0].longest_axis_mm == 0.0
    data = json.loads(json.dumps(stats.to_json(), allow_nan=False))
    assert data["labels"][2]["centroid_mm"] == [None, None, None]
    assert stats.to_csv().splitlines()[0].startswith("value,name,kind,voxels,volume_ml")


def test_longest_axis_flat_and_large_lesions() -> None:
    # A flat 60×60 square in one slice (3600 points > the convex-hull threshold): the diagonal.
    ii, jj = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    flat = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size)], axis=1)
    assert longest_axis_mm(flat, np.diag([0.5, 2.0, 3.0])) == pytest.approx(math.hypot(59 * 0.5, 59 * 2.0))
    line = np.stack([np.arange(3000), np.zeros(3000), np.zeros(3000)], axis=1)
    assert longest_axis_mm(line, np.eye(3)) == pytest.approx(2999.0)


def test_lesion_rows_26_connectivity() -> None:
    arr = np.zeros((10, 10, 10), np.uint8)
    arr[2, 2, 2] = arr[3, 3, 3] = 1  # corner-touching: one lesion
    arr[7:9, 7:9, 7] = 1
    seg = Volume(arr, np.diag([1.0, 2.0, 3.0, 1.0]), labels=LabelTable([Label(1, "met", (9, 9, 9), "lesion")]))
    stats = volume_stats(seg)
    assert stats["met"].n_components == 2
    lesions = sorted(stats.lesions, key=lambda r: r.voxels)
    assert [les.voxels for les in lesions] == [2, 4]
    assert lesions[0].longest_axis_mm == pytest.approx(math.sqrt(1 + 4 + 9))
    assert lesions[1].longest_axis_mm == pytest.approx(math.sqrt(1 + 4))


def test_errors() -> None:
    seg = Volume(np.zeros((4, 5, 6), np.uint8), np.eye(4))
    other = Volume(np.zeros((4, 5, 6)), np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(GridMismatchError, match=r"(?s)segmentation and the image are not on the same voxel grid"):
        volume_stats(seg, other)
    with pytest.raises(LabelTableError, match="non-integer"):
        volume_stats(Volume(np.full((4, 5, 6), 0.25), np.eye(4)))
    with pytest.raises(LabelTableError, match="No label named 'spleen'"):
        volume_stats(seg, labels=["spleen"])


def test_cli_stats(tmp_path) -> None:
    from typer.testing import CliRunner

    import medseg
    from medseg.cli import app

    assert medseg.volume_stats is volume_stats
    seg = DATA / "dicom_seg_example" / "liver_seg.nrrd"
    out = tmp_path / "s.csv"
    res = CliRunner().invoke(app, ["stats", str(seg), "--image", str(DATA / "dicom_seg_example" / "ct_3slice"),
                                   "--json", "--csv", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert round(data["labels"][0]["volume_ml"], 2) == 70.36 and data["intensity_unit"] == "HU"
    assert out.read_text().splitlines()[1].startswith("1,label_1,organ,107098")
    res = CliRunner().invoke(app, ["stats", str(seg), "--image", str(DATA / "pyradiomics" / "brain1_image.nrrd")])
    assert res.exit_code == 2 and "not on the same voxel grid" in res.output
