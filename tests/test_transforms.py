"""Pre-processing from a card and the inverse onto the input grid: exact with analytic predictors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA, oblique_affine

from medseg import Volume
from medseg.labels import LabelTable
from medseg.models import parse_card

torch = pytest.importorskip("torch")


def card(spacing=None, orientation="RAS", intensity=None, crop=False, output="softmax", n_labels=1, patch=8):
    return parse_card({
        "name": "analytic", "modality": "CT", "output": output,
        "network": {"name": "UNet", "kwargs": {}},
        "labels": [{"value": v, "name": f"c{v}"} for v in range(1, n_labels + 1)],
        "preprocessing": {"orientation": orientation, "spacing_mm": spacing,
                          "intensity": intensity or {"kind": "none"}, "crop_foreground": crop,
                          "foreground_threshold": 0.0},
        "inference": {"patch_size": [patch] * 3, "overlap": 0.5, "blending": "gaussian"},
    })


def world_ramp(shape, affine, coef=(0.05, -0.03, 0.02), offset=0.1) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (xyz @ np.asarray(coef) + offset).astype(np.float32)


def identity_scores(prepared):
    """Two-class softmax scores whose class-1 logit is the image itself."""
    from medseg.transforms import to_probabilities

    x = prepared.image
    return to_probabilities(torch.cat([torch.zeros_like(x), x]).clone(), "softmax")


@pytest.mark.parametrize("orientation", ["RAS", "LPI", "SAR", None])
def test_reorientation_only_is_an_exact_permutation(orientation) -> None:
    from medseg.transforms import invert_to_input, label_lookup, prepare

    rng = np.random.default_rng(3)
    arr = rng.normal(size=(17, 13, 9)).astype(np.float32)
    vol = Volume(arr, oblique_affine(), modality="CT")
    c = card(orientation=orientation)
    prepared = prepare(vol, c)
    assert sorted(prepared.image.shape[1:]) == sorted(arr.shape)
    labels, probs = invert_to_input(identity_scores(prepared), prepared, label_lookup(c.labels, "softmax"),
                                    output="softmax", probabilities=True)
    np.testing.assert_allclose(probs[..., 1], 1 / (1 + np.exp(-arr)), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(labels, (arr > 0).astype(np.uint8))


@pytest.mark.parametrize("spacing", [(1.1, 0.9, 1.7), (0.6, 2.5, 1.3)])
@pytest.mark.parametrize("flip", [True, False])
def test_resampling_round_trip_is_exact_for_a_linear_world_ramp(spacing, flip) -> None:
    """A function linear in world mm survives trilinear resampling exactly: any axis, origin or flip mistake fails."""
    from medseg.transforms import invert_to_input, label_lookup, prepare

    affine = oblique_affine(spacing=(0.7, 1.3, 2.9), flip=flip)
    shape = (17, 13, 9)
    ramp = world_ramp(shape, affine)
    vol = Volume(ramp, affine, modality="CT")
    c = card(spacing=spacing)
    prepared = prepare(vol, c)
    # The network grid has the card's spacing and covers the same world region.
    np.testing.assert_allclose(np.linalg.norm(prepared.affine[:3, :3], axis=0), spacing, rtol=1e-5)
    net_ramp = world_ramp(prepared.image.shape[1:], prepared.affine)
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(prepared.image[0].numpy()[inner], net_ramp[inner], atol=2e-3)
    labels, probs = invert_to_input(identity_scores(prepared), prepared, label_lookup(c.labels, "softmax"),
                                    output="softmax", probabilities=True)
    p = probs[..., 1].astype(np.float64)
    logit = np.log(p / (1 - p))
    core = (slice(2, -2),) * 3
    np.testing.assert_allclose(logit[core], ramp[core], atol=2e-3)
    assert labels.shape == shape
    margin = np.abs(ramp) > 5e-3
    np.testing.assert_array_equal(labels[core][margin[core]], (ramp[core] > 0)[margin[core]])


def test_slab_size_does_not_change_the_result() -> None:
    from medseg.transforms import invert_to_input, label_lookup, prepare

    affine = oblique_affine()
    vol = Volume(world_ramp((17, 13, 9), affine), affine, modality="CT")
    c = card(spacing=(1.0, 1.0, 1.0))
    prepared = prepare(vol, c)
    scores = identity_scores(prepared)
    lut = label_lookup(c.labels, "softmax")
    a, pa = invert_to_input(scores, prepared, lut, output="softmax", probabilities=True, slab_bytes=1)
    b, pb = invert_to_input(scores, prepared, lut, output="softmax", probabilities=True, slab_bytes=1 << 30)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pa, pb)


def test_sigmoid_output_is_background_unless_a_probability_exceeds_half() -> None:
    from medseg.transforms import invert_to_input, label_lookup, prepare

    rng = np.random.default_rng(0)
    arr = rng.normal(size=(9, 8, 7)).astype(np.float32)
    vol = Volume(arr, oblique_affine(), modality="CT")
    c = card(output="sigmoid", n_labels=2)
    prepared = prepare(vol, c)
    x = prepared.image
    scores = torch.sigmoid(torch.cat([x, 0.5 * x + 0.3]))
    labels, _ = invert_to_input(scores, prepared, label_lookup(c.labels, "sigmoid"), output="sigmoid")
    l1, l2 = arr, 0.5 * arr + 0.3
    expected = np.where((l1 <= 0) & (l2 <= 0), 0, np.where(l1 >= l2, 1, 2))
    np.testing.assert_array_equal(labels, expected)


def test_foreground_crop_is_undone_with_background_outside() -> None:
    from medseg.transforms import invert_to_input, label_lookup, prepare

    arr = np.full((20, 16, 12), -1.0, dtype=np.float32)
    arr[5:14, 4:11, 3:9] = 1.0
    vol = Volume(arr, oblique_affine(), modality="CT")
    c = card(spacing=(1.0, 1.0, 2.0), crop=True)
    prepared = prepare(vol, c)
    assert prepared.cropped and prepared.image.shape[1] < 20
    # A predictor saying "class 1 everywhere" must still give background outside the crop box.
    x = prepared.image
    scores = torch.softmax(torch.cat([torch.zeros_like(x), torch.full_like(x, 5.0)]), dim=0)
    labels, _ = invert_to_input(scores, prepared, label_lookup(c.labels, "softmax"), output="softmax")
    assert labels[0, 0, 0] == 0 and labels[-1, -1, -1] == 0
    assert labels[7:12, 6:9, 4:7].all()


def test_intensity_normalisations_follow_the_card() -> None:
    from medseg.transforms import prepare

    rng = np.random.default_rng(1)
    arr = rng.normal(100, 300, size=(10, 9, 8)).astype(np.float32)
    vol = Volume(arr, np.diag([0.8, 0.8, 2.5, 1.0]), modality="CT")
    window = prepare(vol, card(intensity={"kind": "ct_window", "a_min": -100, "a_max": 400, "b_min": 0.0,
                                          "b_max": 1.0, "clip": True}))
    np.testing.assert_allclose(window.image[0].numpy(), np.clip((arr + 100) / 500, 0, 1), atol=1e-6)
    assert window.floor == 0.0
    z = prepare(vol, card(intensity={"kind": "zscore"})).image[0].numpy()
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-3
    assert prepare(vol, card(intensity={"kind": "zscore"})).floor is None
    pct = prepare(vol, card(intensity={"kind": "percentile", "lower": 5, "upper": 95, "clip": True})).image
    assert float(pct.min()) == 0.0 and float(pct.max()) == 1.0


def test_real_ct_sample_comes_back_on_its_grid() -> None:
    """MSD spleen crop (real CT): threshold predictor at 1.5 × 1.5 × 2 mm, back on the scan's own grid."""
    from medseg.io import load_volume
    from medseg.transforms import invert_to_input, label_lookup, prepare

    vol = load_volume(DATA / "msd_spleen_crop" / "sub-spleen2_ct.nii.gz", modality="CT")
    c = card(spacing=(1.5, 1.5, 2.0), intensity={"kind": "ct_window", "a_min": -200, "a_max": 300, "clip": True})
    prepared = prepare(vol, c)
    x = prepared.image
    scores = torch.softmax(torch.cat([torch.zeros_like(x), 40 * (x - 0.5)]), dim=0)  # soft threshold at 50 HU
    labels, _ = invert_to_input(scores, prepared, label_lookup(c.labels, "softmax"), output="softmax")
    assert labels.shape == vol.shape
    direct = vol.array > 50
    dice = 2 * (direct & (labels == 1)).sum() / (direct.sum() + (labels == 1).sum())
    assert dice > 0.9, dice


def test_wrong_inputs_are_refused() -> None:
    from medseg.errors import ChannelCountError, NotVolumetricError
    from medseg.transforms import prepare

    with pytest.raises(NotVolumetricError, match="needs a 3D volume with at least 2 voxels along every axis"):
        prepare(Volume(np.zeros((64, 64, 1), np.float32), np.eye(4)), card())
    with pytest.raises(ChannelCountError, match=r"takes 1 input channel\(s\), but got a 4D image with 3 volumes"):
        prepare(Volume(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), card())


def test_label_lookup_widens_to_uint16() -> None:
    from medseg.labels import LabelTable
    from medseg.transforms import label_lookup

    assert label_lookup(LabelTable.from_names({1: "a", 7: "b"}), "softmax").tolist() == [0, 1, 7]
    assert label_lookup(LabelTable.from_names({1: "a", 300: "b"}), "softmax").dtype == np.uint16


def _prepared_on(image: np.ndarray, affine: np.ndarray, vol: Volume):
    from medseg.transforms import Prepared

    return Prepared(torch.from_numpy(image)[None], affine, vol.shape, vol.affine, None)


def test_oblique_network_grid_uses_general_trilinear_sampling() -> None:
    """A network grid rotated against the input grid (not reachable with MONAI's Spacing, but allowed)."""
    from medseg.transforms import invert_to_input, label_lookup

    in_aff = oblique_affine(spacing=(0.9, 1.1, 1.6))
    vol = Volume(np.zeros((15, 13, 11), np.float32), in_aff)
    net_aff = oblique_affine(spacing=(0.8, 0.8, 0.8), angle_deg=-31.0, flip=False, origin=(-20.0, 20.0, -10.0))
    net_shape = (48, 48, 40)
    centre = vol.world_mm((np.array(vol.shape) - 1) / 2)
    net_aff[:3, 3] = centre - net_aff[:3, :3] @ ((np.array(net_shape) - 1) / 2)  # centred on the input
    ramp_net = world_ramp(net_shape, net_aff)
    prepared = _prepared_on(ramp_net, net_aff, vol)
    lut = label_lookup(card().labels, "softmax")
    scores = torch.softmax(torch.cat([torch.zeros_like(prepared.image), prepared.image]), dim=0)
    _, probs = invert_to_input(scores, prepared, lut, output="softmax", probabilities=True)
    p = probs[..., 1].astype(np.float64)
    ijk_net = vol.world_mm(np.stack(np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij"), -1))
    idx = ijk_net @ np.linalg.inv(net_aff)[:3, :3].T + np.linalg.inv(net_aff)[:3, 3]
    ok = np.all((idx > 0) & (idx < np.array(net_shape) - 1), axis=-1)
    assert ok.mean() > 0.8
    np.testing.assert_allclose(np.log(p / (1 - p))[ok], world_ramp(vol.shape, in_aff)[ok], atol=1e-3)


def test_separable_and_general_interpolation_agree() -> None:
    from medseg.transforms import invert_to_input, label_lookup

    rng = np.random.default_rng(5)
    vol = Volume(np.zeros((19, 14, 9), np.float32), oblique_affine(spacing=(0.7, 1.3, 2.9)))
    net_aff = vol.affine @ np.array([[0, 1.7, 0, 2.3], [-1.4, 0, 0, 15.2], [0, 0, 0.6, -1.1], [0, 0, 0, 1.0]])
    scores = torch.softmax(torch.from_numpy(rng.normal(size=(4, 12, 14, 36)).astype(np.float32)), dim=0)
    lut = label_lookup(LabelTable.from_names({1: "a", 2: "b", 3: "c"}), "softmax")
    prepared = _prepared_on(np.zeros((12, 14, 36), np.float32), net_aff, vol)
    la, pa = invert_to_input(scores, prepared, lut, output="softmax", probabilities=True)
    tiny = np.eye(4)
    tiny[:3, :3] = np.array([[1, -1e-6, 0], [1e-6, 1, 0], [0, 0, 1]])  # forces the general path
    lb, pb = invert_to_input(scores, _prepared_on(np.zeros((12, 14, 36), np.float32), net_aff @ tiny, vol), lut,
                             output="softmax", probabilities=True)
    np.testing.assert_allclose(pa, pb, atol=1e-4)
    assert (la == lb).mean() > 0.999


@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
@pytest.mark.parametrize("cropped", [False, True])
def test_boundary_only_argmax_equals_dense_interpolation(output, cropped, monkeypatch) -> None:
    """Labels-only inversion interpolates exactly only in cells whose corners disagree; it must equal the dense
    separable interpolation (used when probabilities are asked for) everywhere."""
    from medseg.transforms import Prepared, _labels_axis_aligned, invert_to_input, label_lookup

    vol = Volume(np.zeros((41, 37, 23), np.float32), oblique_affine(spacing=(0.7, 0.8, 1.1)))
    net_aff = vol.affine @ np.array([[0, 1.9, 0, -1.3], [-2.1, 0, 0, 38.0], [0, 0, 1.6, 0.4], [0, 0, 0, 1.0]])
    n = (20, 23, 15)
    ii = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in n], indexing="ij"), 0)
    centres = [(-0.4, 0.2, 0.1), (0.45, -0.3, -0.2), (0.0, 0.5, 0.4)]
    logits = [np.zeros(n)] + [4 - 12 * ((ii - np.array(c)[:, None, None, None]) ** 2).sum(0) for c in centres]
    scores = torch.from_numpy(np.stack(logits).astype(np.float32))
    scores = torch.softmax(scores, 0) if output == "softmax" else torch.sigmoid(scores[1:])
    table = LabelTable.from_names({2: "a", 4: "b", 9: "c"})
    prepared = Prepared(torch.zeros(1, *n), net_aff, vol.shape, vol.affine, None, cropped=cropped)
    lut = label_lookup(table, output)
    import medseg.transforms as T

    used = []

    def spy(*args, **kwargs):
        out = _labels_axis_aligned(*args, **kwargs, max_boundary_fraction=1.0)  # always the sparse path
        used.append(out is not None)
        return out

    monkeypatch.setattr(T, "_labels_axis_aligned", spy)
    sparse, _ = invert_to_input(scores, prepared, lut, output=output, slab_bytes=1 << 16)
    assert used == [True]
    dense, _ = invert_to_input(scores, prepared, lut, output=output, probabilities=True)
    assert set(np.unique(dense)) == {0, 2, 4, 9}
    np.testing.assert_array_equal(sparse, dense)


def _brute_nearest(net_labels: np.ndarray, net_aff: np.ndarray, vol: Volume) -> np.ndarray:
    """Label of the network voxel centre nearest in mm to every input voxel centre (first in C order on ties)."""
    def centres(shape, affine):
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
        return ijk @ affine[:3, :3].T + affine[:3, 3]

    src, dst = centres(vol.shape, vol.affine), centres(net_labels.shape, net_aff)
    d = ((src[:, None, :] - dst[None, :, :]) ** 2).sum(-1)
    return net_labels.reshape(-1)[np.argmin(d, axis=1)].reshape(vol.shape)


@pytest.mark.parametrize("oblique", [False, True])
def test_nearest_inversion_takes_the_nearest_network_voxel(oblique) -> None:
    """Fast-mode inversion: argmax on the network grid, then the label of the nearest network voxel centre (in mm),
    on a permuted, flipped, anisotropic grid (and on a rotated one, through the general path)."""
    from medseg.transforms import Prepared, invert_nearest, label_lookup

    rng = np.random.default_rng(3)
    vol = Volume(np.zeros((13, 11, 9), np.float32), oblique_affine(spacing=(0.7, 0.9, 1.3)))
    if oblique:
        net_aff = oblique_affine(spacing=(1.1, 1.2, 1.4), angle_deg=-23.0, flip=False, origin=(-9.0, 3.0, -4.0))
        net_aff[:3, 3] = vol.affine[:3, :3] @ np.array([6.0, 5.0, 4.0]) + vol.affine[:3, 3] - net_aff[:3, :3] @ [4, 4, 3]
    else:
        net_aff = vol.affine @ np.array([[0, 1.37, 0, 0.61], [-1.53, 0, 0, 10.27], [0, 0, 1.71, 0.33], [0, 0, 0, 1]])
    shape = (9, 9, 7)
    scores = torch.from_numpy(rng.normal(size=(4, *shape)).astype(np.float32))
    lut = label_lookup(LabelTable.from_names({2: "a", 5: "b", 7: "c"}), "softmax")
    net_labels = lut[scores.numpy().argmax(0)]
    prepared = Prepared(torch.zeros(1, *shape), net_aff, vol.shape, vol.affine, None)
    got = invert_nearest(scores, prepared, lut, output="softmax", slab_bytes=1 << 12)
    expected = _brute_nearest(net_labels, net_aff, vol)
    if oblique:  # outside the grid the border label is per axis, not the Euclidean nearest: compare inside only
        q = np.stack(np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij"), -1) @ (
            np.linalg.inv(net_aff) @ vol.affine)[:3, :3].T + (np.linalg.inv(net_aff) @ vol.affine)[:3, 3]
        inside = ((q > -0.5) & (q < np.array(shape) - 0.5)).all(-1)
        assert inside.mean() > 0.3
        np.testing.assert_array_equal(got[inside], expected[inside])
    else:
        np.testing.assert_array_equal(got, expected)
    assert got.dtype == lut.dtype and got.shape == vol.shape


def test_nearest_inversion_tie_goes_to_the_lower_network_index() -> None:
    """Input spacing half the network spacing: every other input centre is half-way between two network centres."""
    from medseg.transforms import Prepared, invert_nearest, label_lookup

    vol = Volume(np.zeros((10, 6, 4), np.float32), oblique_affine(spacing=(0.5, 0.5, 0.5)))
    net_aff = vol.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    values = np.arange(5 * 3 * 2).reshape(5, 3, 2)  # one class per network voxel: argmax = its index
    scores = torch.nn.functional.one_hot(torch.from_numpy(values), 31).permute(3, 0, 1, 2).float()
    lut = label_lookup(LabelTable.from_names({v: f"c{v}" for v in range(1, 31)}), "softmax")
    got = invert_nearest(scores, Prepared(torch.zeros(1, 5, 3, 2), net_aff, vol.shape, vol.affine, None), lut,
                         output="softmax")
    i, j, k = np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij")
    np.testing.assert_array_equal(got, values[i // 2, j // 2, k // 2])  # centre 2n+1 → n, not n+1


@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
def test_nearest_inversion_outside_a_crop_is_background(output) -> None:
    from medseg.transforms import Prepared, invert_nearest, label_lookup

    vol = Volume(np.zeros((12, 10, 8), np.float32), oblique_affine(spacing=(1.0, 1.0, 1.0)))
    shift = np.eye(4)
    shift[:3, 3] = [3, 2, 1]
    n = (5, 4, 4)
    logits = torch.full((2, *n), -5.0)
    logits[1] = 5.0  # class 1 everywhere inside the crop
    scores = torch.sigmoid(logits[1:]) if output == "sigmoid" else torch.softmax(logits, 0)
    lut = label_lookup(LabelTable.from_names({3: "x"}), output)
    got = invert_nearest(scores, Prepared(torch.zeros(1, *n), vol.affine @ shift, vol.shape, vol.affine, None,
                                          cropped=True), lut, output=output)
    expected = np.zeros(vol.shape, np.uint8)
    expected[3:8, 2:6, 1:5] = 3
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("spacing", "orientation", "flip"), [
    ((1.0, 0.8, 1.9), "LPS", True), ((1.5, 1.5, 2.0), "RAS", False), ((0.5, 0.5, 0.5), "SAR", True),
    (None, "LPI", True),
])
@pytest.mark.parametrize("order", ["C", "F"])
def test_separable_resample_equals_monai_resample(spacing, orientation, flip, order) -> None:
    """Fast-mode resampling: MONAI plans the grid, three 1-D interpolations execute it: equal up to rounding.
    Fortran-ordered arrays (how NIfTI data arrive) are resampled in their memory order, without a copy."""
    from medseg.transforms import prepare

    rng = np.random.default_rng(1)
    arr = np.asarray((100 * rng.normal(size=(21, 17, 9))).astype(np.int16), order=order)
    vol = Volume(arr, oblique_affine(spacing=(0.7, 1.3, 2.9), flip=flip))
    assert vol.to_metatensor().is_contiguous() == (order == "C")
    c = card(spacing=spacing, orientation=orientation)
    a = prepare(vol, c)
    b = prepare(vol, c, resample="separable")
    assert a.image.shape == b.image.shape
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-9)
    np.testing.assert_allclose(b.image.numpy(), a.image.numpy(), atol=1e-3)  # HU-scale values, float32 rounding
    assert float((a.image - b.image).abs().max()) > 0 or spacing is None  # really a different computation


def test_separable_resample_without_geometry_changes_nothing() -> None:
    from medseg.transforms import prepare

    vol = Volume(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), oblique_affine())
    b = prepare(vol, card(orientation=None), resample="separable")
    np.testing.assert_array_equal(b.image[0].numpy(), vol.array)
    np.testing.assert_allclose(b.affine, vol.affine)


@pytest.mark.parametrize("clip", [True, False])
def test_in_place_ct_window_is_bit_identical_to_monai_and_leaves_the_scan_alone(clip) -> None:
    import torch
    from monai.transforms import ScaleIntensityRange

    from medseg.transforms import _scale_range_in_place, prepare

    x = torch.from_numpy(np.random.default_rng(3).normal(0, 600, (1, 23, 19, 11)).astype(np.float32))
    t = ScaleIntensityRange(a_min=-175.0, a_max=250.0, b_min=0.0, b_max=1.0, clip=clip, dtype=np.float32)
    expected = torch.as_tensor(t(x.clone()))
    got = _scale_range_in_place(x, t)
    assert got.data_ptr() == x.data_ptr() and torch.equal(got, expected)
    # Without a resample the network sees the caller's own float32 array: it must not be scaled in place.
    arr = (600 * np.random.default_rng(4).normal(size=(9, 8, 7))).astype(np.float32)
    before = arr.copy()
    vol = Volume(arr, np.eye(4))
    c = card(orientation=None, intensity={"kind": "ct_window", "a_min": -175, "a_max": 250, "clip": clip})
    out = prepare(vol, c)
    np.testing.assert_array_equal(arr, before)
    np.testing.assert_array_equal(out.image[0].numpy(), np.asarray(t(torch.from_numpy(before[None])))[0])
