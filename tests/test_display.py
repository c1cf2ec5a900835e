"""medseg.display (viewer geometry in the radiological convention, label colours and names, slice picks) and
medseg.io.detect_format (the non-raising format check a viewer's reader needs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, oblique_affine

from medseg import Volume, load_volume, save_volume
from medseg.display import (
    CT_WINDOWS,
    display_slices,
    label_colors,
    label_features,
    layer_geometry,
    oblique_angle_deg,
    orientation_letters,
    ras_to_world,
    table_from_features,
    volume_from_layer,
    window_limits,
    world_to_ras,
)
from medseg.errors import GeometryError, LabelTableError
from medseg.io import detect_format
from medseg.labels import Label, LabelTable
from medseg.resample import as_orientation

RAS = np.diag([0.8, 1.1, 2.5, 1.0])
RAS[:3, 3] = (-10.0, -20.0, 30.0)


def _marker_volume() -> Volume:
    arr = np.zeros((12, 10, 8), np.int16)
    arr[0, 9, 7] = 5  # smallest x (patient left), largest y (anterior), largest z (superior)
    return Volume(arr, RAS)


@pytest.mark.parametrize("code", ["RAS", "LPS", "PIL", "SRA", "LAS"])
def test_layer_world_is_minus_reversed_ras_and_draws_radiologically(code: str) -> None:
    vol = as_orientation(_marker_volume(), code)
    g = layer_geometry(vol)
    # every voxel's drawn world position is the library's RAS position mapped by ras_to_world
    ijk = np.argwhere(np.ones(vol.shape, bool))
    assert np.allclose(g.world_of_ijk(ijk), ras_to_world(vol.world_mm(ijk)))
    assert np.allclose(world_to_ras(ras_to_world(vol.world_mm(ijk))), vol.world_mm(ijk))
    assert all(s > 0 for s in g.scale)
    # data index -> world with scale and translate (what a viewer does) agrees too
    kji = np.argwhere(g.data == 5)[0]
    world = np.asarray(g.translate) + kji * np.asarray(g.scale)
    assert np.allclose(world_to_ras(world), vol.world_mm(np.argwhere(vol.array == 5)[0]))
    # axial plane = data axes (1, 2): the anterior, left marker is in row 0 (top) and the last column (right)
    assert (kji[1], kji[2]) == (0, g.data.shape[2] - 1)
    # coronal (0, 2): superior marker in row 0 (top); sagittal (0, 1): anterior in column 0 (left)
    assert kji[0] == 0
    back = volume_from_layer(g.data, g.metadata)
    assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine)
    assert g.oblique_deg == 0.0


def test_oblique_grid_is_drawn_axis_aligned_and_goes_back_exactly() -> None:
    arr = np.arange(7 * 5 * 4, dtype=np.int16).reshape(7, 5, 4)
    vol = Volume(arr, oblique_affine(angle_deg=23.0))
    g = layer_geometry(vol)
    assert 20.0 < g.oblique_deg < 30.0
    assert oblique_angle_deg(np.diag([-1.0, 2.0, 3.0, 1.0])) == 0.0
    back = volume_from_layer(np.ascontiguousarray(g.data), g.metadata)
    assert np.array_equal(back.array, arr) and np.allclose(back.affine, vol.affine)
    # the drawn grid keeps the centre voxel where it is
    centre = (np.array(vol.shape) - 1) / 2
    assert np.allclose(g.world_of_ijk(centre), ras_to_world(vol.world_mm(centre)))


def test_volume_from_layer_refuses_foreign_layers() -> None:
    with pytest.raises(GeometryError, match="not made by medseg"):
        volume_from_layer(np.zeros((2, 3, 4)), {})
    g = layer_geometry(_marker_volume())
    with pytest.raises(GeometryError, match="does not fit its source grid"):
        volume_from_layer(np.zeros((2, 3, 4)), g.metadata)


def test_orientation_letters_of_the_three_planes() -> None:
    assert orientation_letters((1, 2)) == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    assert orientation_letters((0, 2)) == {"top": "S", "bottom": "I", "left": "R", "right": "L"}
    assert orientation_letters((0, 1)) == {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    with pytest.raises(ValueError, match="two different world axes"):
        orientation_letters((1, 1))


def test_label_colours_and_features_round_trip() -> None:
    table = LabelTable([Label(1, "liver", (221, 130, 101)), Label(5, "liver_tumour", (255, 230, 0), "lesion")])
    colours = label_colors(table, hidden=[5], values=[7])
    assert colours[0][3] == 0.0 and colours[5][3] == 0.0 and colours[1] == pytest.approx((221 / 255, 130 / 255,
                                                                                             101 / 255, 1.0))
    assert None in colours and 7 in colours
    features = label_features(table)
    assert features["index"] == [0, 1, 5] and features["name"] == ["background", "liver", "liver_tumour"]
    assert table_from_features(features, label_colors(table)) == table
    with pytest.raises(LabelTableError, match="'index' and 'name'"):
        table_from_features({"name": ["a"]})


def test_window_presets() -> None:
    assert window_limits("soft tissue") == (-160.0, 240.0)
    assert set(CT_WINDOWS) >= {"soft tissue", "lung", "bone", "liver"}
    with pytest.raises(KeyError, match="presets are"):
        window_limits("brain")


def test_display_slices_orientation_matches_world_geometry() -> None:
    # RAS+ (nibabel, MONAI, medseg): x grows toward the patient's Right, y Anterior, z Superior.
    vol = _marker_volume()
    point = vol.world_mm([0, 9, 7])
    views = [display_slices(vol, point)]
    for code in ("LPS", "PIL", "SRA"):  # the same voxels stored in other axis orders
        views.append(display_slices(as_orientation(vol, code), point))
    for v in views:
        rows, cols = np.nonzero(v.axial == 5)
        assert (rows.tolist(), cols.tolist()) == ([0], [v.axial.shape[1] - 1])
        rows, cols = np.nonzero(v.coronal == 5)
        assert (rows.tolist(), cols.tolist()) == ([0], [v.coronal.shape[1] - 1])
        assert np.array_equal(v.axial, views[0].axial) and np.array_equal(v.coronal, views[0].coronal)
    left, right, bottom, top = views[0].axial_extent_mm
    assert (right - left, bottom - top) == pytest.approx((12 * 0.8, 10 * 1.1))


def test_the_totalsegmentator_liver_sits_on_its_hu_in_display_order() -> None:
    """The labels NIfTI (LAS) and the DICOM series (LPS) land on one drawn grid: mean HU under liver ≈ +89."""
    ct = load_volume(DATA / "totalseg_example" / "example_ct_dicom")
    seg = load_volume(DATA / "totalseg_example" / "example_seg_dicom.nii.gz")
    gi, gs = layer_geometry(ct), layer_geometry(seg)
    assert np.allclose(gi.translate, gs.translate) and np.allclose(gi.scale, gs.scale)
    liver = gs.data == 5
    assert float(gi.data[liver].mean()) == pytest.approx(89.3, abs=0.5)
    assert float(gi.data[np.flip(liver, axis=1)].mean()) < -60  # the front-back flipped overlay


def test_detect_format_never_raises(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    assert detect_format(text) is None
    assert detect_format(tmp_path / "missing.nii.gz") is None
    assert detect_format(tmp_path) is None  # a folder without DICOM
    corrupt = tmp_path / "broken.dcm"
    corrupt.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    assert detect_format(corrupt) == "dicom"  # named, so that loading it can say what is wrong
    assert detect_format(tmp_path / "x") is None
    save_volume(Volume(np.zeros((2, 3, 4), np.int16), RAS), tmp_path / "a.nrrd")
    assert detect_format(tmp_path / "a.nrrd") == "nrrd"
    assert detect_format(DATA / "totalseg_example" / "example_ct_dicom") == "dicom-folder"
    assert detect_format(DATA / "dicom_seg_example" / "liver.dcm") == "dicom-seg"
    assert detect_format(DATA / "dicom_seg_example" / "ct_3slice" / "01.dcm") == "dicom"
    assert detect_format(DATA / "totalseg_example" / "example_mr_sm.nii.gz") == "nifti"
    assert detect_format(DATA / "pyradiomics" / "brain1_image.nrrd") == "nrrd"
    assert detect_format(object()) is None  # type: ignore[arg-type]


def test_segment_reports_window_progress_and_stops_on_cancel() -> None:
    """Progress and cancel hooks of Segmenter.segment (with an analytic network: exact window counts)."""
    torch = pytest.importorskip("torch")
    from medseg.errors import SegmentationCancelledError
    from medseg.inference import Segmenter
    from medseg.models import parse_card

    card = parse_card({
        "name": "analytic", "modality": "CT", "network": {"name": "UNet", "kwargs": {}},
        "labels": [{"value": 1, "name": "a"}],
        "preprocessing": {"orientation": "RAS", "intensity": {"kind": "none"}},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.5, "blending": "constant", "sw_batch_size": 2},
    })
    seen: list[tuple[int, int]] = []
    vol = Volume(np.random.default_rng(0).normal(size=(17, 13, 9)).astype(np.float32), RAS, modality="CT")
    seg = Segmenter(card, network=lambda x: torch.cat([torch.zeros_like(x), x], dim=1))
    plain = seg.segment(vol)
    hooked = seg.segment(vol, progress=lambda d, t: seen.append((d, t)), cancel=lambda: False)
    assert np.array_equal(plain.labels.array, hooked.labels.array)
    total = seen[-1][1]
    assert total == 4 * 3 * 2  # windows of 8 every 4 voxels over 17, 13, 9: 4 x 3 x 2
    assert seen[-1][0] == total and [d for d, _ in seen] == sorted(d for d, _ in seen)
    calls = [0]

    def cancel() -> bool:
        calls[0] += 1
        return calls[0] > 2

    with pytest.raises(SegmentationCancelledError, match="cancelled"):
        seg.segment(vol, cancel=cancel)
    assert calls[0] == 3
