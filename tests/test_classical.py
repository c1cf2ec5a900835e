"""ct-basic and the interactive classical tools, on analytic phantoms (anisotropic, flipped, rotated grids) and on
the real samples in tests/data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA, oblique_affine

from medseg import Volume, load_volume
from medseg.classical import (
    CT_BASIC_LABELS,
    REGION_LABELS,
    CtBasicConfig,
    confidence_connected,
    ct_basic,
    otsu_in_box,
    otsu_threshold_in_box,
    region_grow,
    remove_islands,
    watershed_split,
)
from medseg.errors import ModalityMismatchError, NotVolumetricError, RegionError
from medseg.resample import as_orientation, resample_to

BODY, LUNG_L, LUNG_R, AIRWAY, BONE = 1, 2, 3, 4, 5


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(1, int(a.sum()) + int(b.sum())))


# ---------------------------------------------------------------------------------------------------------------
# An analytic chest: shapes defined in RAS world mm (+x = the patient's right), sampled on any grid.
# ---------------------------------------------------------------------------------------------------------------
def _world(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    return xyz[..., 0], xyz[..., 1], xyz[..., 2]


def chest_phantom(
    affine: np.ndarray, shape: tuple[int, int, int], *, seed: int = 0, touching: bool = False
) -> tuple[Volume, dict[str, np.ndarray]]:
    """A small chest CT (HU, noise) and its truth masks. The right lung is bigger than the left one, the airway is
    a trachea with two main bronchi, the spine has a dense cortex around softer marrow, ribs arc around the front,
    and a stomach gas bubble (pure air) sits below the left lung. ``touching`` joins the lungs in front."""
    x, y, z = _world(affine, shape)

    def ell(c: tuple[float, float, float], r: tuple[float, float, float]) -> np.ndarray:
        return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1

    def tube(p0: tuple[float, ...], p1: tuple[float, ...], r: float) -> np.ndarray:
        a, d = np.asarray(p0, np.float32), np.asarray(p1, np.float32) - np.asarray(p0, np.float32)
        t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / float(d @ d), 0, 1)
        return (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2 <= r * r

    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((x / 110) ** 2 + (y / 75) ** 2 <= 1) & (np.abs(z) <= 100)
    hu[body] = 40.0
    hu[body & ((x / 110) ** 2 + (y / 75) ** 2 > 0.8)] = -100.0  # subcutaneous fat
    hu[(np.abs(x) < 140) & (y > -95) & (y < -90)] = 200.0  # the table, apart from the body
    lung_r = ell((48, 0, 25), (40, 50, 70)) & body
    lung_l = ell((-50, 0, 20), (35, 46, 65)) & body
    if touching:
        bridge = ell((0, 30, 25), (30, 12, 40)) & body
        lung_r |= bridge & (x >= 0)
        lung_l |= bridge & (x < 0)
    hu[lung_r | lung_l] = -850.0
    vessels = tube((40, 5, -10), (55, -5, 50), 3) | tube((-42, 5, -10), (-55, -5, 45), 3)
    hu[vessels & (lung_r | lung_l)] = 40.0
    airway = (tube((0, 18, 70), (0, 18, 110), 6.5) | tube((0, 18, 70), (32, 8, 45), 4.5)
              | tube((0, 18, 70), (-32, 8, 42), 4.5)) & body
    hu[airway] = -1000.0
    r2 = (x / 13) ** 2 + ((y + 52) / 13) ** 2
    spine = (r2 <= 1) & body
    hu[spine] = 220.0
    hu[spine & (r2 > 0.6)] = 800.0
    rr = (x / 102) ** 2 + (y / 67) ** 2
    ribs = (np.abs(rr - 1) < 0.07) & ((np.abs(z + 25) < 4) | (np.abs(z - 30) < 4)) & (y > -40) & body
    hu[ribs] = 700.0
    gas = ell((-35, 30, -75), (25, 18, 15)) & body
    hu[gas] = -1000.0
    hu += np.random.default_rng(seed).normal(0, 20, shape).astype(np.float32)
    vol = Volume(np.round(hu).astype(np.int16), affine, modality="CT")
    truth = {"body": body, "lung_left": lung_l, "lung_right": lung_r, "airway": airway,
             "bone": spine | ribs, "gas": gas}
    return vol, truth


def _grid(spacing: tuple[float, float, float], fov_mm=(240.0, 200.0, 216.0)) -> tuple[np.ndarray, tuple[int, ...]]:
    shape = tuple(int(np.ceil(f / s)) | 1 for f, s in zip(fov_mm, spacing))  # odd: not a multiple of the blocks
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing) + np.array([3.0, -7.0, 11.0])
    return aff, shape


@pytest.fixture(scope="module")
def chest() -> tuple[Volume, dict[str, np.ndarray], Volume]:
    """RAS chest on an anisotropic grid fine enough that ct-basic works on 2×2 blocks (1.3 × 0.9 × 5 mm)."""
    vol, truth = chest_phantom(*_grid((1.3, 0.9, 5.0)))
    return vol, truth, ct_basic(vol)


def _check_against_truth(out: Volume, vol: Volume, truth: dict[str, np.ndarray]) -> dict[str, float]:
    assert out.same_grid(vol)
    assert out.array.dtype == np.uint8
    assert out.labels == CT_BASIC_LABELS
    o = out.array
    scores = {
        "body": dice(o > 0, truth["body"]),
        "lung_left": dice(o == LUNG_L, truth["lung_left"]),
        "lung_right": dice(o == LUNG_R, truth["lung_right"]),
        "airway": dice(o == AIRWAY, truth["airway"]),
        "bone": dice(o == BONE, truth["bone"]),
    }
    assert scores["body"] > 0.98, scores
    assert scores["lung_left"] > 0.95, scores
    assert scores["lung_right"] > 0.95, scores
    assert scores["airway"] > 0.6, scores
    assert scores["bone"] > 0.85, scores
    # The stomach bubble is air inside the body, yet not lung.
    assert np.isin(o[truth["gas"]], [LUNG_L, LUNG_R, AIRWAY]).mean() < 0.01
    return scores


def test_ct_basic_matches_phantom_truth(chest):
    vol, truth, out = chest
    _check_against_truth(out, vol, truth)
    # The right lung is built 1.3× bigger than the left: the label called lung_right holds the bigger one.
    ml = {v: float((out.array == v).sum() * vol.voxel_volume_ml) for v in (LUNG_L, LUNG_R)}
    assert ml[LUNG_R] > 1.2 * ml[LUNG_L]


def test_ct_basic_left_is_the_patients_left_in_world_space(chest):
    vol, _, out = chest
    for value, sign in ((LUNG_L, -1), (LUNG_R, 1)):
        centre = vol.world_mm(np.argwhere(out.array == value).mean(axis=0))
        assert sign * centre[0] > 30  # RAS: the patient's left is −x, right is +x


@pytest.mark.parametrize("code", ["LPS", "SLP"])
def test_ct_basic_reoriented_input_gives_the_same_world_labels(chest, code):
    vol, _, out = chest
    moved = as_orientation(vol, code)
    assert moved.orientation == code
    back = resample_to(ct_basic(moved), vol, interpolation="nearest")
    assert back.same_grid(vol)
    agree = float((back.array == out.array).mean())
    assert agree > 0.999, agree
    for value in (LUNG_L, LUNG_R, AIRWAY, BONE):
        a, b = (out.array == value).sum(), (back.array == value).sum()
        assert abs(int(a) - int(b)) <= 0.02 * a, (value, a, b)


def test_ct_basic_on_oblique_flipped_grid():
    aff = oblique_affine(spacing=(2.2, 1.9, 4.0), origin=(-130.0, 120.0, -110.0), angle_deg=20.0, flip=True)
    # Centre the grid on the phantom: choose the shape, then shift the origin so the centre voxel is at (0, 0, 0).
    shape = (121, 125, 57)
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    vol, truth = chest_phantom(aff, shape, seed=3)
    assert vol.is_oblique
    _check_against_truth(ct_basic(vol), vol, truth)


def test_ct_basic_splits_lungs_that_touch_in_front():
    vol, truth = chest_phantom(*_grid((2.2, 2.0, 5.0)), touching=True, seed=5)
    joined = truth["lung_left"] | truth["lung_right"]
    import cc3d

    assert cc3d.connected_components(joined, return_N=True)[1] == 1  # the phantom's lungs are one piece
    _check_against_truth(ct_basic(vol), vol, truth)


def test_ct_basic_without_downsampling_agrees(chest):
    vol, truth, out = chest
    full = ct_basic(vol, config=CtBasicConfig(working_spacing_mm=None))
    _check_against_truth(full, vol, truth)
    for value in (LUNG_L, LUNG_R):
        assert dice(full.array == value, out.array == value) > 0.95


def test_ct_basic_abdomen_only_finds_no_lung():
    vol, truth = chest_phantom(*_grid((2.0, 2.0, 5.0)), seed=7)
    z = vol.world_mm(np.array([[0, 0, k] for k in range(vol.shape[2])]))[:, 2]
    keep = np.flatnonzero(z < -55)  # below both lungs, holding the stomach bubble
    aff = vol.affine.copy()
    aff[:3, 3] = vol.world_mm([0, 0, keep[0]])
    crop = Volume(vol.array[:, :, keep], aff, modality="CT")
    out = ct_basic(crop)
    assert out.same_grid(crop)
    assert not np.isin(out.array, [LUNG_L, LUNG_R, AIRWAY]).any()
    assert dice(out.array > 0, truth["body"][:, :, keep]) > 0.98


def test_ct_basic_refuses_mr_and_non_hu():
    vol, _ = chest_phantom(*_grid((4.0, 4.0, 8.0)))
    with pytest.raises(ModalityMismatchError, match="modality is 'MR'"):
        ct_basic(Volume(vol.array, vol.affine, modality="MR"))
    mr = load_volume(DATA / "totalseg_example" / "example_mr_sm.nii.gz")  # real MR, no modality in NIfTI
    with pytest.raises(ModalityMismatchError, match="needs CT intensities in HU"):
        ct_basic(mr)


def test_ct_basic_refuses_a_single_slice():
    vol, _ = chest_phantom(*_grid((4.0, 4.0, 8.0)))
    one = Volume(vol.array[:, :, 12:13], vol.affine, modality="CT")
    with pytest.raises(NotVolumetricError, match="ct-basic needs a 3D volume"):
        ct_basic(one)


# ---------------------------------------------------------------------------------------------------------------
# Real samples
# ---------------------------------------------------------------------------------------------------------------
TS_BONES = [32, 33, 69, 70, *range(97, 104), *range(109, 116)]  # vertebrae T11-T12, humeri, ribs 6-12


@pytest.fixture(scope="module")
def real_ct() -> tuple[Volume, np.ndarray, dict[str, int], Volume]:
    ct = load_volume(DATA / "totalseg_example" / "example_ct_dicom")
    seg = resample_to(load_volume(DATA / "totalseg_example" / "example_seg_dicom.nii.gz"), ct,
                      interpolation="nearest").array
    names = {v: int(k) for k, v in json.loads((DATA / "totalseg_example" / "classes.json").read_text())["total"].items()}
    return ct, seg, names, ct_basic(ct)


def test_ct_basic_real_ct_lungs_agree_with_totalsegmentator(real_ct):
    """The shared series is upper abdomen below the lung bases: TotalSegmentator's five lung lobes hold no voxel,
    and ct-basic must not call the gas in the stomach and bowel lung either (both lung volumes are 0 mL)."""
    ct, seg, names, out = real_ct
    assert out.same_grid(ct) and out.labels == CT_BASIC_LABELS
    lobes_left = np.isin(seg, [names["lung_upper_lobe_left"], names["lung_lower_lobe_left"]])
    lobes_right = np.isin(seg, [names[f"lung_{p}_lobe_right"] for p in ("upper", "middle", "lower")])
    assert lobes_left.sum() == 0 and lobes_right.sum() == 0
    assert (out.array == LUNG_L).sum() == lobes_left.sum()
    assert (out.array == LUNG_R).sum() == lobes_right.sum()
    stomach = seg == names["stomach"]
    assert (ct.array[stomach] < -500).sum() * ct.voxel_volume_ml > 5  # there is gas to be fooled by
    assert not np.isin(out.array[stomach], [LUNG_L, LUNG_R, AIRWAY]).any()


def test_ct_basic_real_ct_body_and_bone(real_ct):
    ct, seg, names, out = real_ct
    # Every structure TotalSegmentator found lies inside the body.
    assert (out.array[seg > 0] > 0).mean() > 0.995
    # Bone against TotalSegmentator's vertebrae, ribs and humeri (its --fast 3 mm model): measured 0.71.
    d = dice(out.array == BONE, np.isin(seg, TS_BONES))
    assert d > 0.65, d
    # Left/right of the bone that TotalSegmentator splits: the humerus it calls left is at RAS −x, and ct-basic
    # labels bone there.
    left = seg == names["humerus_left"]
    assert ct.world_mm(np.argwhere(left).mean(axis=0))[0] < -100
    assert (out.array[left] == BONE).mean() > 0.6


@pytest.fixture(scope="module")
def lung_bases() -> tuple[Volume, np.ndarray, dict[str, int]]:
    """TotalSegmentator's example CT (sdist, 3 mm): the lung bases at the top, stomach and colon gas beside and
    below them; reference = TotalSegmentator's ``total`` prediction for it."""
    ct = load_volume(DATA / "totalseg_sdist" / "example_ct_sm.nii.gz")
    seg = load_volume(DATA / "totalseg_sdist" / "example_seg.nii.gz")
    assert seg.same_grid(ct)
    names = {v: int(k) for k, v in json.loads((DATA / "totalseg_example" / "classes.json").read_text())["total"].items()}
    return ct, seg.array, names


@pytest.mark.parametrize("orientation", ["RAS", "LPI"])
def test_ct_basic_real_lung_bases_against_totalsegmentator(lung_bases, orientation):
    """Regression pin: lung Dice 0.966 (left 0.958, right 0.970) against TotalSegmentator's lobes, measured with
    ``pytest tests/test_classical.py -k lung_bases``; before the interior-density and mediastinum rules, colon gas
    was called lung and the colon's splenic flexure airway (Dice 0.36, left lung 0.0)."""
    ct, seg, names = lung_bases
    vol = as_orientation(ct, orientation)
    out = resample_to(ct_basic(vol), ct)  # exact reorientation back onto the reference grid
    o = out.array
    left = np.isin(seg, [names["lung_upper_lobe_left"], names["lung_lower_lobe_left"]])
    right = np.isin(seg, [names[f"lung_{p}_lobe_right"] for p in ("upper", "middle", "lower")])
    assert left.sum() > 1000 and right.sum() > 1000
    assert dice(np.isin(o, [LUNG_L, LUNG_R]), left | right) >= 0.90
    assert dice(o == LUNG_L, left) >= 0.90
    assert dice(o == LUNG_R, right) >= 0.90
    gas = np.isin(seg, [names["colon"], names["stomach"]]) & (ct.array < -500)
    assert gas.sum() * ct.voxel_volume_ml > 20  # there is gas to be fooled by
    assert not np.isin(o[gas], [LUNG_L, LUNG_R, AIRWAY]).any()
    assert not (o == AIRWAY).any()  # the trachea is far above the lung bases


def test_ct_basic_msd_abdomen_crop_runs_without_lungs():
    ct = load_volume(DATA / "msd_spleen_crop" / "sub-spleen2_ct.nii.gz")  # float32 HU, no modality tag
    spleen = load_volume(DATA / "msd_spleen_crop" / "sub-spleen2_ct_seg-manual.nii.gz").array > 0
    out = ct_basic(ct)
    assert out.same_grid(ct)
    assert not np.isin(out.array, [LUNG_L, LUNG_R, AIRWAY]).any()
    assert (out.array[spleen] > 0).mean() > 0.99  # the manual spleen lies in the body
    assert 0 < (out.array == BONE).sum() * ct.voxel_volume_ml < 200  # ribs, not the contrast-filled organs


# ---------------------------------------------------------------------------------------------------------------
# Interactive tools
# ---------------------------------------------------------------------------------------------------------------
def _spheres(
    affine: np.ndarray, shape: tuple[int, int, int], spheres: list[tuple[tuple[float, float, float], float]],
    *, inside: float = 60.0, outside: float = -100.0, noise: float = 8.0, seed: int = 0,
) -> tuple[Volume, list[np.ndarray]]:
    x, y, z = _world(affine, shape)
    masks = [(x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r * r for c, r in spheres]
    arr = np.full(shape, outside, dtype=np.float32)
    for m in masks:
        arr[m] = inside
    arr += np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32)
    return Volume(arr, affine, modality="CT"), masks


def _centred(spacing, shape, **kw) -> np.ndarray:
    aff = oblique_affine(spacing=spacing, **kw)
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return aff


@pytest.fixture(scope="module")
def two_blobs() -> tuple[Volume, list[np.ndarray]]:
    """Two separate 12 mm and 8 mm spheres on an oblique, flipped, anisotropic (0.7, 1.3, 2.9) mm grid."""
    shape = (81, 47, 25)
    return _spheres(_centred((0.7, 1.3, 2.9), shape), shape, [((-10.0, 5.0, 0.0), 12.0), ((16.0, -12.0, 5.0), 8.0)])


def _seed_of(vol: Volume, mask: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.round(np.argwhere(mask).mean(axis=0)))  # type: ignore[return-value]


def test_region_grow_fills_one_sphere_with_its_analytic_volume(two_blobs):
    vol, (big, small) = two_blobs
    out = region_grow(vol, _seed_of(vol, big), lower=20, upper=120)
    assert out.same_grid(vol) and out.labels == REGION_LABELS and out.array.dtype == np.uint8
    region = out.array == 1
    assert dice(region, big) > 0.99
    assert not (region & small).any()
    ml = region.sum() * vol.voxel_volume_ml
    assert ml == pytest.approx(4 / 3 * np.pi * 12**3 / 1000, rel=0.05)  # 7.24 mL
    both = region_grow(vol, [_seed_of(vol, big), _seed_of(vol, small)], lower=20, upper=120, connectivity="full")
    assert dice(both.array == 1, big | small) > 0.98


def test_region_grow_errors(two_blobs):
    vol, (big, _) = two_blobs
    with pytest.raises(RegionError, match=r"seed \(i, j, k\) = \(81, 0, 0\) lies outside the volume"):
        region_grow(vol, (81, 0, 0), lower=0, upper=100)
    with pytest.raises(RegionError, match="lies outside the volume"):
        region_grow(vol, [(1, 1, 1), (-1, 2, 2)], lower=0, upper=100)
    with pytest.raises(RegionError, match="no seed lies inside the window"):
        region_grow(vol, _seed_of(vol, big), lower=500, upper=900)
    with pytest.raises(RegionError, match="must not exceed upper"):
        region_grow(vol, _seed_of(vol, big), lower=100, upper=0)
    with pytest.raises(RegionError, match="whole numbers"):
        region_grow(vol, (1.5, 2, 3), lower=0, upper=100)
    with pytest.raises(RegionError, match="seed_ijk must be"):
        region_grow(vol, (1, 2), lower=0, upper=100)
    with pytest.raises(RegionError, match="needs a scalar volume"):
        region_grow(Volume(np.zeros((4, 4, 4, 2)), np.eye(4)), (1, 1, 1), lower=0, upper=1)


def test_confidence_connected_learns_the_window(two_blobs):
    vol, (big, small) = two_blobs
    out = confidence_connected(vol, _seed_of(vol, big), multiplier=3.0, iterations=3, initial_radius_mm=4.0)
    assert out.same_grid(vol)
    assert dice(out.array == 1, big) > 0.97
    assert not (out.array[small]).any()
    with pytest.raises(RegionError, match="multiplier must be > 0"):
        confidence_connected(vol, _seed_of(vol, big), multiplier=0)
    with pytest.raises(RegionError, match="outside the volume"):
        confidence_connected(vol, (0, 47, 0))


def test_otsu_in_box(two_blobs):
    vol, (big, _) = two_blobs
    ijk = np.argwhere(big)
    lo, hi = ijk.min(axis=0) - 2, ijk.max(axis=0) + 3
    box = tuple((int(max(a, 0)), int(min(b, n))) for a, b, n in zip(lo, hi, vol.shape))
    t = otsu_threshold_in_box(vol, box)
    assert -90 < t < 50  # between the classes at −100 and +60 HU (noise sd 8)
    out = otsu_in_box(vol, box)
    assert out.same_grid(vol) and out.labels == REGION_LABELS
    assert dice(out.array == 1, big) > 0.98
    sl = tuple(slice(a, b) for a, b in box)
    assert out.array.sum() == out.array[sl].sum()  # nothing outside the box
    dark = otsu_in_box(vol, box, foreground="dark").array
    assert not (dark[sl] & out.array[sl]).any() and (dark[sl] | out.array[sl]).all()
    one_slice = ((box[0][0], box[0][1]), (box[1][0], box[1][1]), (12, 13))
    assert otsu_in_box(vol, one_slice).array[:, :, 12].sum() > 0


def test_otsu_in_box_errors(two_blobs):
    vol, _ = two_blobs
    with pytest.raises(RegionError, match="box is empty along j"):
        otsu_in_box(vol, ((0, 10), (5, 5), (0, 3)))
    with pytest.raises(RegionError, match="reaches outside the volume"):
        otsu_in_box(vol, ((0, 10), (0, 10), (20, 26)))
    with pytest.raises(RegionError, match=r"box_ijk must be \(\(i_start"):
        otsu_in_box(vol, (0, 10, 0, 10, 0, 3))
    flat = vol.with_array(np.full(vol.shape, 7.0, dtype=np.float32))
    with pytest.raises(RegionError, match="two intensity classes"):
        otsu_in_box(flat, ((0, 10), (0, 10), (0, 3)))
    with pytest.raises(RegionError, match="foreground must be"):
        otsu_in_box(vol, ((0, 10), (0, 10), (0, 3)), foreground="grey")  # type: ignore[arg-type]


def _mask(vol: Volume, masks: list[np.ndarray]) -> Volume:
    return vol.with_array(np.any(masks, axis=0).astype(np.uint8), labels=REGION_LABELS)


@pytest.mark.parametrize(
    "spacing",
    [(1.0, 1.0, 1.0), (0.7, 1.3, 2.9), (2.9, 0.7, 1.3)],
    ids=["isotropic", "anisotropic", "anisotropic-permuted"],
)
def test_watershed_split_separates_touching_spheres(spacing):
    # Two overlapping spheres (10 and 8 mm, centres 15 mm apart) and a separate 6 mm one, on oblique grids.
    shape = tuple(int(np.ceil(s0 / s)) for s0, s in zip((70.0, 60.0, 48.0), spacing))
    centres = [((-12.0, 0.0, 0.0), 10.0), ((3.0, 0.0, 0.0), 8.0), ((12.0, 18.0, 10.0), 6.0)]
    vol, masks = _spheres(_centred(spacing, shape, angle_deg=30.0), shape, centres)
    out = watershed_split(_mask(vol, masks), min_distance_mm=5.0)
    assert out.same_grid(vol) and out.array.dtype == np.uint16
    assert sorted(out.labels.names.values()) == ["lesion_1", "lesion_2", "lesion_3"]
    assert all(lab.kind == "lesion" for lab in out.labels.values())
    assert set(np.unique(out.array)) == {0, 1, 2, 3}
    # Each sphere's centre is in its own instance, and most of each sphere (outside the overlap) is one instance.
    inst = [int(out.array[tuple(np.round(vol.voxel_ijk(c)).astype(int))]) for c, _ in centres]
    assert len(set(inst)) == 3 and 0 not in inst
    only = [masks[i] & ~np.any([m for j, m in enumerate(masks) if j != i], axis=0) for i in range(3)]
    for i in range(3):
        assert (out.array[only[i]] == inst[i]).mean() > 0.9


def test_watershed_split_keeps_one_round_object_whole():
    shape = (61, 41, 17)
    vol, masks = _spheres(_centred((0.7, 1.3, 2.9), shape), shape, [((0.0, 0.0, 0.0), 11.0)])
    out = watershed_split(_mask(vol, masks), min_distance_mm=4.0)
    assert set(np.unique(out.array)) == {0, 1}
    assert (out.array > 0).sum() == masks[0].sum()


def test_watershed_split_empty_and_errors(two_blobs):
    vol, _ = two_blobs
    empty = watershed_split(vol.with_array(np.zeros(vol.shape, np.uint8)), min_distance_mm=3.0)
    assert not empty.array.any() and len(empty.labels) == 0 and empty.same_grid(vol)
    with pytest.raises(RegionError, match="min_distance_mm must be > 0"):
        watershed_split(vol.with_array(np.zeros(vol.shape, np.uint8)), min_distance_mm=0.0)
    with pytest.raises(RegionError, match="integers or booleans"):
        watershed_split(vol, min_distance_mm=3.0)


def test_remove_islands_uses_millilitres_per_label():
    # 0.5 × 0.5 × 4 mm voxels = 0.001 mL: a 10×10×10 block is 1 mL, a 5×5×5 block 0.125 mL.
    aff = _centred((0.5, 0.5, 4.0), (40, 40, 30), angle_deg=15.0)
    arr = np.zeros((40, 40, 30), dtype=np.uint8)
    arr[2:12, 2:12, 2:12] = 1
    arr[20:25, 20:25, 20:25] = 1
    arr[30:38, 2:10, 2:10] = 2  # 0.512 mL of another label, touching nothing
    arr[14:16, 14:16, 14:16] = 2  # 0.008 mL
    vol = Volume(arr, aff, labels=REGION_LABELS.__class__.from_names({1: "organ", 2: "lesion"}))
    out = remove_islands(vol, min_ml=0.1)
    assert out.same_grid(vol) and out.labels == vol.labels and out.array.dtype == np.uint8
    assert (out.array == 1).sum() == 1000 + 125 and (out.array == 2).sum() == 512
    out = remove_islands(vol, min_ml=0.6)
    assert (out.array == 1).sum() == 1000 and (out.array == 2).sum() == 0
    # The same voxel counts on a grid with 8× bigger voxels are 8× the mL: the 0.125 mL block becomes 1 mL.
    big = Volume(arr, _centred((1.0, 1.0, 8.0), (40, 40, 30)))
    assert (remove_islands(big, min_ml=0.6).array == 1).sum() == 1125
    boolean = remove_islands(Volume(arr > 0, aff), min_ml=0.6)
    assert boolean.array.dtype == np.bool_ and boolean.array.sum() == 1000


def test_remove_islands_errors():
    vol = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(RegionError, match="integers or booleans"):
        remove_islands(vol, min_ml=1.0)
    ok = vol.with_array(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(RegionError, match="min_ml must be ≥ 0"):
        remove_islands(ok, min_ml=-1.0)
    with pytest.raises(RegionError, match="connectivity must be 6, 18 or 26"):
        remove_islands(ok, min_ml=1.0, connectivity=8)  # type: ignore[arg-type]



@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_ct_basic_on_the_abdominal_phantom(orientation):
    """medseg.phantom's abdomen has lung bases at the top (not in its label map) and bowel gas: ct-basic finds two
    lungs, each on the side of the phantom's own organs (liver: patient right, spleen: patient left), no lung in
    the bowel, and every organ inside the body."""
    from medseg.phantom import make_phantom

    ph = make_phantom(2, shape=(112, 104, 36), orientation=orientation)
    out = ct_basic(ph.image)
    assert out.same_grid(ph.image)
    table = ph.label_table

    def x_of(mask: np.ndarray) -> float:
        return float(ph.image.world_mm(np.argwhere(mask).mean(axis=0))[0])

    liver_x = x_of(ph.labels.array == table.value_of("liver"))
    spleen_x = x_of(ph.labels.array == table.value_of("spleen"))
    assert liver_x > 0 > spleen_x  # the phantom's own sides, in RAS
    assert np.sign(x_of(out.array == LUNG_R)) == np.sign(liver_x)
    assert np.sign(x_of(out.array == LUNG_L)) == np.sign(spleen_x)
    for value in (LUNG_L, LUNG_R):
        assert (out.array == value).sum() * ph.image.voxel_volume_ml > 100
    organs = ph.labels.array > 0
    assert (out.array[organs] > 0).mean() > 0.99  # every organ inside the body
    assert not np.isin(out.array[organs], [LUNG_L, LUNG_R, AIRWAY]).any()
    assert (out.array == BONE).sum() * ph.image.voxel_volume_ml > 5  # the spine and ribs


# ---------------------------------------------------------------------------------------------------------------
# ct-basic's fast paths against the plain rules they replace (small random arrays, odd shapes, edges)
# ---------------------------------------------------------------------------------------------------------------
def _blocks_up(m: np.ndarray, f: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    big = m.repeat(f[0], axis=0).repeat(f[1], axis=1).repeat(f[2], axis=2)
    return big[: shape[0], : shape[1], : shape[2]]


@pytest.mark.parametrize(("shape", "f", "layout"), [
    ((13, 10, 7), (2, 3, 1), "C"),   # partial blocks along i and j
    ((12, 8, 6), (2, 2, 2), "F"),    # Fortran order, as NIfTI data is kept
    ((9, 12, 10), (3, 2, 2), "flipped"),
])
def test_input_grid_labels_equal_the_blockwise_refinement(shape, f, layout):
    """Only boundary blocks are re-thresholded; the result must equal refining every block of every region."""
    from medseg.classical.ct_basic import _dilate, _erode, _to_input_grid

    rng = np.random.default_rng(sum(shape))
    coarse = tuple(-(-n // fi) for n, fi in zip(shape, f))
    # Patches of one code each (body alone, body and bone, a lung or the airway in the body, ...) and bare bits.
    codes = np.array([0, 1, 3, 5, 9, 17, 19, 17, 25, 13, 29, 2, 4, 8, 16], dtype=np.uint8)
    code = _blocks_up(rng.choice(codes, (5, 5, 5)), (2, 2, 2), coarse)
    hu = rng.integers(-1100, 500, shape).astype(np.int16)
    if layout == "F":
        hu = np.asfortranarray(hu)
    elif layout == "flipped":
        hu = hu[::-1, :, ::-1]
    limits = {"body_min_hu": -500.0, "bone_min_hu": 200.0, "airway_max_hu": -925.0, "lung_max_hu": -400.0}
    out = _to_input_grid(code, hu, f, shape, **limits)

    def refined(bit: int, rule: np.ndarray) -> np.ndarray:
        m = (code >> bit) & 1 != 0
        return _blocks_up(_erode(m, (1, 1, 1)), f, shape) | (_blocks_up(_dilate(m, (1, 1, 1)), f, shape) & rule)

    body = refined(0, hu > limits["body_min_hu"])
    bone = refined(1, hu > limits["bone_min_hu"])
    expected = np.where(body, np.where(bone, BONE, BODY), 0).astype(np.uint8)
    taken = np.zeros(shape, dtype=bool)
    for bit, value, max_hu in ((2, AIRWAY, limits["airway_max_hu"]), (3, LUNG_L, limits["lung_max_hu"]),
                               (4, LUNG_R, limits["lung_max_hu"])):
        fine = refined(bit, (hu < max_hu) & body) & ~taken
        expected[fine] = value
        taken |= fine
    assert out.shape == shape and out.dtype == np.uint8 and out.flags.c_contiguous
    assert len(np.unique(expected)) == 6  # every label occurs
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("axial", [0, 1, 2])
def test_fill_holes_in_plane_equals_scipy_slice_by_slice(axial):
    import scipy.ndimage as ndi

    from medseg.classical.ct_basic import _fill_holes_in_plane

    rng = np.random.default_rng(axial)
    m = rng.random((11, 9, 8)) < 0.55  # many holes, many pixels on the slice edges
    m[:, :, 0] = False  # an empty slice whichever the axis
    expected = np.stack([ndi.binary_fill_holes(np.take(m, k, axis=axial), ndi.generate_binary_structure(2, 1))
                         for k in range(m.shape[axial])], axis=axial)
    np.testing.assert_array_equal(_fill_holes_in_plane(m, axial), expected)


def test_work_in_the_bounding_box_equals_the_whole_array_at_the_volume_edge():
    """A mask cut by the volume's edge on one side: closing and in-plane hole filling inside its grown bounding
    box give what they give on the whole array."""
    from medseg._masks import bounding_box
    from medseg.classical.ct_basic import _dilate, _erode, _fill_holes_in_plane

    rng = np.random.default_rng(1)
    m = np.zeros((30, 26, 14), dtype=bool)
    m[0:12, 5:20, 3:11] = rng.random((12, 15, 8)) < 0.7  # touches i = 0 only
    r = (2, 1, 1)
    box = bounding_box(m, [ri + 1 for ri in r])
    assert box is not None
    assert box[0].start == 0 and box[1].start > 0 and box[2].stop < m.shape[2]
    whole = _fill_holes_in_plane(_erode(_dilate(m, r), r), 2)
    part = np.zeros_like(m)
    part[box] = _fill_holes_in_plane(_erode(_dilate(m[box], r), r), 2)
    np.testing.assert_array_equal(part, whole)
    assert bounding_box(np.zeros((3, 4, 5), dtype=bool), (1, 1, 1)) is None


def test_ct_basic_statistics_helpers_equal_numpy_and_scipy():
    import cc3d
    import scipy.ndimage as ndi

    from medseg.classical.ct_basic import _block_mean, _label_medians, _mean_index

    rng = np.random.default_rng(2)
    values = rng.normal(0, 300, (20, 17, 9)).astype(np.float32)
    lab = cc3d.connected_components(rng.random(values.shape) < 0.3, connectivity=6)
    assert lab.max() > 10
    sizes = np.bincount(lab.ravel())
    index = np.array([1, int(np.argmax(sizes[1:])) + 1, int(lab.max())])  # odd and even counts among them
    assert len(set(sizes[index] % 2)) == 2
    np.testing.assert_array_equal(_label_medians(values, lab, index), ndi.median(values, lab, index))
    m = lab == index[1]
    whole = np.zeros((25, 17, 30), dtype=bool)  # m is the box [3:23, 0:17, 7:16] of it
    whole[3:23, :, 7:16] = m
    np.testing.assert_array_equal(_mean_index(m, (3, 0, 7)), np.argwhere(whole).mean(axis=0))
    # Integer HU take the exact float32 sum; the result equals the mean of the float32 blocks.
    hu = rng.integers(-32768, 32767, (8, 6, 9), dtype=np.int16)
    np.testing.assert_array_equal(_block_mean(hu, (2, 3, 3)), _block_mean(hu.astype(np.float32), (2, 3, 3)))
