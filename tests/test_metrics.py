"""medseg.metrics against independent implementations: MONAI (surface metrics), SimpleITK (overlap, Hausdorff),
analytic shapes, anisotropic and oblique grids, real TotalSegmentator masks; empty-mask rule; lesion-wise counts."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from conftest import DATA, oblique_affine

from medseg import Volume
from medseg.errors import GridMismatchError, LabelTableError
from medseg.labels import Label, LabelTable
from medseg.metrics import EvaluationResult, evaluate, result_from_json, surface_distances, to_json_text

SPLEEN_DIR = DATA / "totalseg_example" / "example_seg_v1"


# ---- independent references --------------------------------------------------------------------------------------
def monai_surface(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> dict[str, float]:
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))[None, None]
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "hausdorff_mm": compute_hausdorff_distance(p, r, spacing=sp).item(),
            "hd95_mm": compute_hausdorff_distance(p, r, percentile=95, spacing=sp).item(),
            "assd_mm": compute_average_surface_distance(p, r, symmetric=True, spacing=sp).item(),
            "nsd": compute_surface_dice(p, r, [tolerance_mm], spacing=sp).item(),
        }


def sitk_overlap(pred: Volume, ref: Volume, value: int) -> dict[str, float]:
    import SimpleITK as sitk

    p = sitk.Cast(pred.to_sitk(), sitk.sitkUInt16)
    r = sitk.Cast(ref.to_sitk(), sitk.sitkUInt16)
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(r, p)
    h = sitk.HausdorffDistanceImageFilter()
    h.Execute(r == value, p == value)
    return {"dice": f.GetDiceCoefficient(value), "iou": f.GetJaccardCoefficient(value),
            "hausdorff_mm": h.GetHausdorffDistance()}


def check_against_references(pred: Volume, ref: Volume, value: int = 1, tolerance_mm: float = 2.0) -> None:
    row = evaluate(pred, ref, nsd_tolerance_mm=tolerance_mm)[value]
    p, r = pred.array == value, ref.array == value
    for key, expected in monai_surface(p, r, ref.spacing_mm, tolerance_mm).items():
        assert getattr(row, key) == pytest.approx(expected, abs=1e-3 if key.endswith("_mm") else 1e-6), key
    for key, expected in sitk_overlap(pred, ref, value).items():
        assert getattr(row, key) == pytest.approx(expected, abs=1e-3 if key.endswith("_mm") else 1e-6), key
    tp = np.count_nonzero(p & r)
    assert row.precision == pytest.approx(tp / np.count_nonzero(p), abs=1e-12)
    assert row.recall == pytest.approx(tp / np.count_nonzero(r), abs=1e-12)


def balls(shape, affine, centres_mm, radius_mm) -> np.ndarray:
    """Label map with label i+1 = voxels whose world centre lies within radius of centres_mm[i]."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    xyz = ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    out = np.zeros(len(xyz), dtype=np.uint8)
    for n, c in enumerate(centres_mm):
        out[np.linalg.norm(xyz - np.asarray(c), axis=1) <= radius_mm] = n + 1
    return out.reshape(shape)


ANISO = np.diag([0.8, 1.3, 2.5, 1.0])
ANISO[:3, 3] = (-20.0, 15.0, 40.0)


def test_offset_spheres_anisotropic_match_monai_sitk_and_geometry() -> None:
    shape = (61, 43, 27)
    centre = np.array([4.0, 42.0, 72.0])
    ref = Volume(balls(shape, ANISO, [centre], 12.0), ANISO)
    pred = Volume(balls(shape, ANISO, [centre + [5.0, 0, 0]], 12.0), ANISO)
    check_against_references(pred, ref)
    row = evaluate(pred, ref)[1]
    # Two 12 mm spheres 5 mm apart: the surfaces are at most 5 mm apart (± one voxel of rasterisation).
    assert abs(row.hausdorff_mm - 5.0) <= 1.3
    assert row.ref_ml == pytest.approx(4 / 3 * math.pi * 12.0**3 / 1000, rel=0.03)
    assert row.volume_diff_ml == pytest.approx(row.pred_ml - row.ref_ml)


def test_oblique_flipped_grid_matches_monai_and_sitk() -> None:
    aff = oblique_affine(spacing=(0.9, 1.4, 2.2), origin=(-30.0, 10.0, 5.0))
    shape = (40, 30, 20)
    centre = Volume(np.zeros(shape), aff).world_mm(np.array(shape) / 2)
    ref = Volume(balls(shape, aff, [centre], 9.0), aff)
    pred = Volume(balls(shape, aff, [centre + [3.0, -2.0, 1.0]], 8.0), aff)
    check_against_references(pred, ref, tolerance_mm=1.5)


def test_surface_distances_use_the_affine_not_just_spacing() -> None:
    """Two voxels one index apart along j are 3 mm apart when j has 3 mm spacing, even on a rotated grid."""
    p = np.zeros((5, 5, 5), bool)
    r = np.zeros((5, 5, 5), bool)
    p[2, 1, 2] = True
    r[2, 3, 2] = True
    aff = oblique_affine(spacing=(1.0, 3.0, 0.5))
    d = surface_distances(p, r, affine=aff)
    assert d is not None
    assert d.hausdorff_mm() == pytest.approx(6.0)
    sheared = np.eye(4)
    sheared[0, 1] = 1.0  # j axis points along (1, 1, 0): one step = sqrt(2) mm
    d2 = surface_distances(p, r, affine=sheared)
    assert d2 is not None and d2.hausdorff_mm() == pytest.approx(2 * math.sqrt(2))


@pytest.fixture(scope="module")
def totalseg() -> dict[str, Volume]:
    from medseg import load_volume

    return {n: load_volume(SPLEEN_DIR / f"{n}.nii.gz") for n in ("spleen", "liver", "kidney_left", "kidney_right")}


def test_real_spleen_vs_shifted_and_eroded(totalseg: dict[str, Volume]) -> None:
    from scipy import ndimage

    spleen = totalseg["spleen"]
    assert spleen.array.dtype == np.float64  # float 0/1 masks are accepted as label maps
    moved = np.roll(spleen.array, (2, -1, 1), axis=(0, 1, 2))
    moved[:2], moved[:, -1:], moved[:, :, :1] = 0, 0, 0  # a shift, not a wrap-around (the spleen meets the edge)
    shifted = spleen.with_array(moved)
    eroded = spleen.with_array(ndimage.binary_erosion(spleen.array > 0, iterations=2).astype(np.float64))
    check_against_references(shifted, spleen)
    assert evaluate(shifted, spleen)[1].hausdorff_mm <= 3.0 * math.sqrt(6) + 1e-9  # shift of (2, 1, 1) voxels
    check_against_references(eroded, spleen, tolerance_mm=3.0)


def test_real_liver_vs_spleen_and_kidneys(totalseg: dict[str, Volume]) -> None:
    check_against_references(totalseg["spleen"], totalseg["liver"])
    check_against_references(totalseg["kidney_left"], totalseg["kidney_right"], tolerance_mm=5.0)
    row = evaluate(totalseg["spleen"], totalseg["liver"])[1]
    assert row.ref_voxels == 41602 and row.pred_voxels == 9677  # PROVENANCE.md
    assert row.ref_ml == pytest.approx(41602 * 27 / 1000)


def test_multilabel_map_gives_the_binary_results(totalseg: dict[str, Volume]) -> None:
    ref_arr = np.zeros(totalseg["liver"].shape, np.uint8)
    pred_arr = np.zeros_like(ref_arr)
    for v, name in enumerate(("liver", "spleen", "kidney_left", "kidney_right"), start=1):
        ref_arr[totalseg[name].array > 0] = v
        pred_arr[np.roll(totalseg[name].array, (1, 0, -1), axis=(0, 1, 2)) > 0] = v
    table = LabelTable.from_names({1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"})
    ref = Volume(ref_arr, totalseg["liver"].affine, labels=table)
    pred = Volume(pred_arr, totalseg["liver"].affine)
    result = evaluate(pred, ref, labels=["spleen", 4])
    assert [r.name for r in result.labels] == ["spleen", "kidney_right"]
    for row in result.labels:
        single = evaluate(Volume((pred_arr == row.value).astype(np.uint8), ref.affine),
                          Volume((ref_arr == row.value).astype(np.uint8), ref.affine))[1]
        for key in ("dice", "iou", "hausdorff_mm", "hd95_mm", "assd_mm", "nsd", "pred_ml", "ref_ml"):
            assert getattr(row, key) == pytest.approx(getattr(single, key), abs=1e-9), (row.name, key)
    check_against_references(pred, ref, value=2)


# ---- the empty-mask rule -----------------------------------------------------------------------------------------
def test_empty_mask_rule() -> None:
    arr_ref = np.zeros((9, 8, 7), np.uint8)
    arr_pred = np.zeros_like(arr_ref)
    arr_ref[2:5, 2:5, 2:5] = 1  # 1 only in ref
    arr_pred[5:8, 1:4, 1:4] = 2  # 2 only in pred
    table = LabelTable.from_names({1: "a", 2: "b", 3: "c"})  # 3 in neither
    result = evaluate(Volume(arr_pred, ANISO), Volume(arr_ref, ANISO, labels=table))
    a, b, c = result["a"], result["b"], result["c"]
    assert a.pred_empty and not a.ref_empty
    assert (a.dice, a.iou, a.precision, a.recall, a.nsd) == (0, 0, 0, 0, 0)
    assert a.hausdorff_mm == a.hd95_mm == a.assd_mm == math.inf
    assert a.volume_diff_pct == pytest.approx(-100.0)
    assert b.ref_empty and (b.dice, b.nsd) == (0, 0) and b.hd95_mm == math.inf and b.volume_diff_pct == math.inf
    assert c.pred_empty and c.ref_empty
    assert (c.dice, c.iou, c.precision, c.recall, c.nsd, c.hd95_mm, c.assd_mm) == (1, 1, 1, 1, 1, 0, 0)
    # JSON stays strict (inf → null) and reads back.
    text = to_json_text(result)
    data = json.loads(text)
    assert data["labels"][0]["hd95_mm"] is None and "empty_mask_rule" in data
    back = result_from_json(data)
    assert back["a"].hd95_mm == math.inf and back["c"].dice == 1.0 and back["a"].ref_ml == a.ref_ml
    csv_text = result.to_csv()
    assert csv_text.splitlines()[0].startswith("value,name,dice,iou")
    assert ",inf," in csv_text.splitlines()[1]


# ---- inputs ------------------------------------------------------------------------------------------------------
def test_grid_mismatch_names_both_grids_and_resample_option() -> None:
    arr = np.zeros((10, 8, 6), np.uint8)
    arr[3:7, 2:6, 1:5] = 1
    ref = Volume(arr, ANISO)
    moved = ANISO.copy()
    moved[:3, 3] += (0.8, 0.0, 0.0)  # one voxel along i
    pred = Volume(np.roll(arr, -1, axis=0), moved)  # same world voxels, other grid
    with pytest.raises(GridMismatchError, match=r"(?s)not on the same voxel grid.*first:.*second:.*resample_to"):
        evaluate(pred, ref)
    result = evaluate(pred, ref, resample=True)
    assert result.resampled and result[1].dice == pytest.approx(1.0) and result[1].hausdorff_mm == 0.0


def test_flipped_copy_resamples_exactly() -> None:
    from medseg.resample import as_orientation

    ref = Volume(balls((20, 16, 12), ANISO, [(0.0, 25.0, 55.0)], 6.0), ANISO)
    pred = as_orientation(ref, "LPI")
    assert not pred.same_grid(ref)
    row = evaluate(pred, ref, resample=True)[1]
    assert (row.dice, row.hausdorff_mm, row.nsd) == (1.0, 0.0, 1.0)


def test_bad_inputs() -> None:
    ref = Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(LabelTableError, match="non-integer values"):
        evaluate(Volume(np.full((4, 4, 4), 0.5), np.eye(4)), ref)
    with pytest.raises(LabelTableError, match="negative values"):
        evaluate(Volume(np.full((4, 4, 4), -1, np.int16), np.eye(4)), ref)
    with pytest.raises(LabelTableError, match="3D label map"):
        evaluate(Volume(np.zeros((4, 4, 4, 2)), np.eye(4)), ref)
    with pytest.raises(LabelTableError, match="No label named 'liver'"):
        evaluate(ref, ref, labels=["liver"])
    with pytest.raises(ValueError, match="nsd_tolerance_mm"):
        evaluate(ref, ref, nsd_tolerance_mm=-1.0)


# ---- lesion-wise -------------------------------------------------------------------------------------------------
LESION_TABLE = LabelTable([Label(1, "liver", (200, 100, 50)), Label(2, "tumour", (250, 0, 0), "lesion")])


def lesion_case(ref_boxes, pred_boxes, shape=(40, 30, 20)) -> EvaluationResult:
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    ref[1:39, 1:29, 1:19] = 1
    pred[1:39, 1:29, 1:19] = 1
    for arr, boxes in ((ref, ref_boxes), (pred, pred_boxes)):
        for box in boxes:
            arr[tuple(slice(a, b) for a, b in box)] = 2
    return evaluate(Volume(pred, ANISO), Volume(ref, ANISO, labels=LESION_TABLE))


def test_lesion_split_merged_missed_false_positive() -> None:
    big = ((5, 15), (5, 15), (5, 10))
    split = lesion_case([big], [((5, 9), (5, 15), (5, 10)), ((11, 15), (5, 15), (5, 10))]).lesion("tumour")
    assert (split.n_ref, split.n_pred, split.tp_ref, split.fn, split.tp_pred, split.fp) == (1, 2, 1, 0, 2, 0)
    assert (split.n_split, split.n_merged) == (1, 0) and split.lesions[0].split
    assert split.lesions[0].pred_ids == (1, 2) and split.lesions[0].dice == pytest.approx(2 * 400 / (500 + 400))

    merged = lesion_case([((5, 9), (5, 15), (5, 10)), ((11, 15), (5, 15), (5, 10))], [big]).lesion("tumour")
    assert (merged.n_ref, merged.n_pred, merged.tp_ref, merged.fn, merged.fp) == (2, 1, 2, 0, 0)
    assert (merged.n_split, merged.n_merged) == (0, 1) and all(r.merged for r in merged.lesions)
    assert (merged.precision, merged.recall, merged.f1) == (1.0, 1.0, 1.0)

    small = ((25, 28), (20, 23), (12, 14))
    missed = lesion_case([big, small], [big]).lesion("tumour")
    assert (missed.n_ref, missed.tp_ref, missed.fn, missed.fp) == (2, 1, 1, 0)
    assert missed.recall == 0.5 and missed.precision == 1.0 and missed.f1 == pytest.approx(2 / 3)
    assert [r.status for r in missed.lesions] == ["detected", "missed"]
    assert missed.lesions[0].dice == 1.0

    fp = lesion_case([big], [big, small]).lesion("tumour")
    assert (fp.n_pred, fp.tp_pred, fp.fp, fp.fn) == (2, 1, 1, 0) and fp.precision == 0.5
    voxel_ml = float(np.prod(np.diag(ANISO)[:3])) / 1000
    assert fp.fp_ml == pytest.approx(3 * 3 * 2 * voxel_ml)
    fp_row = fp.lesions[-1]
    assert fp_row.status == "false_positive" and fp_row.pred_ml == pytest.approx(fp.fp_ml)
    expected_centroid = Volume(np.zeros((1, 1, 1)), ANISO).world_mm([26.0, 21.0, 12.5])
    assert np.allclose(fp_row.centroid_mm, expected_centroid)


def test_lesions_touching_at_a_corner_are_one_lesion() -> None:
    result = lesion_case([((5, 7), (5, 7), (5, 7)), ((7, 9), (7, 9), (7, 9))], [((5, 7), (5, 7), (5, 7))])
    det = result.lesion(2)
    assert (det.n_ref, det.tp_ref, det.fn) == (1, 1, 0)  # 26-connectivity: the corner joins them


def test_no_lesions_anywhere_follows_the_empty_rule() -> None:
    det = lesion_case([], []).lesion("tumour")
    assert (det.n_ref, det.n_pred, det.precision, det.recall, det.f1) == (0, 0, 1.0, 1.0, 1.0)
    only_pred = lesion_case([], [((5, 7), (5, 7), (5, 7))]).lesion("tumour")
    assert (only_pred.precision, only_pred.recall, only_pred.f1, only_pred.fp) == (0.0, 0.0, 0.0, 1)


def test_cli_evaluate(tmp_path) -> None:
    from typer.testing import CliRunner

    import medseg
    from medseg.cli import app

    assert medseg.evaluate is evaluate
    spleen, liver = SPLEEN_DIR / "spleen.nii.gz", SPLEEN_DIR / "liver.nii.gz"
    out = tmp_path / "m.csv"
    res = CliRunner().invoke(app, ["evaluate", str(spleen), str(liver), "--json", "--csv", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["labels"][0]["dice"] == 0.0 and data["labels"][0]["ref_voxels"] == 41602
    assert out.read_text().startswith("value,name,dice")
    other = DATA / "pyradiomics" / "breast1_label.nrrd"
    res = CliRunner().invoke(app, ["evaluate", str(other), str(liver)])
    assert res.exit_code == 2 and "not on the same voxel grid" in res.output and "--resample" in res.output
