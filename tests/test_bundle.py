"""MONAI Model Zoo bundles: medseg's labels must equal those of MONAI's own bundle run, on an oblique input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bundle_factory import CHANNELS, KINDS, ct_like, run_with_monai, write_bundle

from medseg import Volume
from medseg.errors import (
    ChannelCountError,
    ChecksumMismatchError,
    ModelNotFoundError,
    WeightsError,
)


def _input(kind: str, tmp_path: Path) -> tuple[Path, Volume]:
    from medseg.io import load_volume, save_volume

    volume = ct_like(channels=4 if kind == "sigmoid4" else 0)
    path = save_volume(volume, tmp_path / "case.nii.gz")
    return path, load_volume(path)  # both runs read the same (float32-rounded) NIfTI affine


@pytest.mark.parametrize("kind", KINDS)
def test_bundle_labels_equal_monai_bundle_run(kind: str, tmp_path: Path) -> None:
    """Every voxel equal to MONAI's own run (ConfigParser, evaluator, Invertd, SaveImaged) on an anisotropic,
    oblique, flipped scan, for each of the six config shapes of ``bundle_factory``."""
    from medseg.inference import Segmenter

    bundle = write_bundle(tmp_path / f"tiny_{kind}", kind)
    image_path, volume = _input(kind, tmp_path)
    reference, ref_affine = run_with_monai(bundle, image_path, tmp_path / "eval", swin14=kind == "swin14")
    seg = Segmenter(bundle, device="cpu").segment(volume)
    ours = seg.labels.array
    assert ours.shape == volume.shape[:3] == reference.shape
    np.testing.assert_allclose(seg.labels.affine, volume.affine, atol=1e-6)
    np.testing.assert_allclose(ref_affine, volume.affine, atol=1e-4)
    values, counts = np.unique(reference, return_counts=True)
    assert len(values) >= 3 and (counts > 20).all(), f"the random network should predict several labels: {counts}"
    identical = float((ours == reference.astype(ours.dtype)).mean())
    assert identical == 1.0, f"{kind}: only {identical:.6f} of voxels identical"
    if kind == "sigmoid4":
        assert set(values) <= {0, 1, 2, 4}, values
        assert seg.labels.labels is not None and set(seg.labels.labels) >= set(values.tolist()) - {0}


def test_swin14_needs_the_old_patch_merging(tmp_path: Path) -> None:
    """With MONAI 1.6's merging order the same weights give other labels (0.26% of the voxels of this tiny random
    network when measured): the drift fix is what makes the labels equal to MONAI 1.4's."""
    from medseg.inference import Segmenter
    from medseg.models import find_model

    bundle = write_bundle(tmp_path / "swin", "swin14")
    _, volume = _input("swin14", tmp_path)
    card = find_model(bundle)
    assert any("patch merging" in n for n in card.bundle.notes) and any("img_size" in n for n in card.bundle.notes)
    old = Segmenter(card, device="cpu").segment(volume).labels.array
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["monai_version"] = "1.5.0"
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    new = Segmenter(bundle, device="cpu").segment(volume).labels.array
    assert (old != new).any()


def test_multichannel_files_matched_by_name_and_4d_file(tmp_path: Path) -> None:
    """Four scans named after the bundle's channels, given in another order, equal the 4D file's result."""
    from medseg.inference import Segmenter
    from medseg.io import save_volume

    bundle = write_bundle(tmp_path / "brats_like", "sigmoid4")
    _, volume = _input("sigmoid4", tmp_path)
    seg = Segmenter(bundle, device="cpu")
    assert seg.card.channel_names == CHANNELS and seg.card.input_channels == 4
    whole = seg.segment(volume).labels
    paths = {}
    for c, name in enumerate(CHANNELS):
        paths[name] = save_volume(Volume(volume.array[..., c], volume.affine, modality="MR"),
                                  tmp_path / f"case_{name.lower()}.nii.gz")
    shuffled = [paths["FLAIR"], paths["T1"], paths["T1c"], paths["T2"]]
    by_name = seg.segment(shuffled).labels
    np.testing.assert_array_equal(by_name.array, whole.array)
    np.testing.assert_allclose(by_name.affine, whole.affine, atol=1e-6)
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.io import load_volume

    res = CliRunner().invoke(app, ["segment", *map(str, shuffled), "--model", str(bundle), "--device", "cpu",
                                   "--out", str(tmp_path / "cli.nii.gz")])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(load_volume(tmp_path / "cli.nii.gz").array, whole.array)
    with pytest.raises(ChannelCountError, match="takes 4 input channel"):
        seg.segment(shuffled[:3])
    with pytest.raises(ChannelCountError, match="takes 4 input channel.*got 1"):
        seg.segment(Volume(volume.array[..., 0], volume.affine))


def test_stack_channels_resamples_onto_the_first_grid() -> None:
    from medseg.resample import as_orientation, stack_channels

    a = ct_like()
    b = as_orientation(Volume(a.array.astype(np.float32) * 2, a.affine), "LPI")  # same voxels, other axis order
    stacked = stack_channels([a, b])
    assert stacked.shape == a.shape and stacked.array.shape[-1] == 2
    np.testing.assert_allclose(stacked.array[..., 1], a.array * 2.0)


def test_bundle_card_is_read_without_evaluating(tmp_path: Path) -> None:
    from medseg.models import find_model, list_models

    bundle = write_bundle(tmp_path / "models" / "tiny_argmax_first", "argmax_first")
    card = find_model("tiny_argmax_first", models_dirs=[tmp_path / "models"])
    assert card.kind == "bundle" and card.origin == "bundle" and card.bundle.config_path.suffix == ".yaml"
    assert card.labels is not None and card.labels.names[4] == "liver"
    assert card.modality == ("CT",) and card.channel_names == ("image",)
    assert card.bundle.inferer == "SlidingWindowInferer" and card.bundle.network == "SegResNet"
    assert "Invertd" in card.bundle.postprocessing and card.bundle.preprocessing[0] == "LoadImaged"
    assert "dataloader" in card.bundle.safe.ignored and "evaluator" in card.bundle.safe.ignored
    names = [c.name for c in list_models(models_dirs=[tmp_path / "models"]).cards]
    assert names[0] == "tiny_argmax_first" and "ct-basic" in names
    from medseg.inference import Segmenter

    seg = Segmenter(bundle, device="cpu")
    assert seg._bundle.weights.name == "model_lowres.pt" and seg._bundle.amp is True
    assert seg.weights_sha256 is not None and len(seg.weights_sha256) == 64


def test_bundle_md5_from_large_files_is_checked(tmp_path: Path) -> None:
    from medseg.inference import Segmenter

    bundle = write_bundle(tmp_path / "b", "unet")
    (bundle / "large_files.yml").write_text("large_files:\n  - path: models/model.pt\n    url: https://example\n"
                                            "    hash_val: 0123456789abcdef0123456789abcdef\n    hash_type: md5\n")
    with pytest.raises(WeightsError, match="md5 is .* but the bundle's large_files.yml records 0123"):
        Segmenter(bundle, device="cpu")


def test_bundle_sha256_is_checked_when_given(tmp_path: Path) -> None:
    from dataclasses import replace

    from medseg.inference import Segmenter
    from medseg.models import find_model

    card = find_model(write_bundle(tmp_path / "b", "unet"))
    bad = replace(card, weights=replace(card.weights, sha256="0" * 64))
    with pytest.raises(ChecksumMismatchError, match="sha256 is .* but the model card expects 0000"):
        Segmenter(bad, device="cpu")


def test_labels_override_file(tmp_path: Path) -> None:
    from medseg.models import find_model

    bundle = write_bundle(tmp_path / "b", "sigmoid4")
    card = find_model(bundle)
    assert card.labels is None and "label values" in card.bundle.label_source  # channel_def names channels
    (bundle / "medseg.yaml").write_text("labels: {1: necrosis, 2: edema, 4: enhancing tumour}\n"
                                        "channel_names: [T1c, T1, T2, FLAIR]\n")
    card = find_model(bundle)
    assert card.labels.names == {1: "necrosis", 2: "edema", 4: "enhancing tumour"}
    assert card.labels[4].kind == "lesion" and card.bundle.label_source == "medseg.yaml"


@pytest.mark.parametrize(("text", "message"), [
    ("label: {1: liver}\n", r"medseg.yaml: unknown field\(s\) in 'the file': 'label' \(did you mean 'labels'\?\)"),
    ("labels: {one: liver}\n", r"medseg.yaml: field 'labels': expected label values mapped to names"),
    ("labels: [liver]\n", r"medseg.yaml: field 'labels': expected a mapping"),
    ("channel_names: T1c\n", r"medseg.yaml: field 'channel_names': expected a list of names"),
])
def test_labels_override_file_errors_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    from medseg.errors import ModelCardError
    from medseg.models import find_model

    bundle = write_bundle(tmp_path / "b", "sigmoid4")
    (bundle / "medseg.yaml").write_text(text)
    with pytest.raises(ModelCardError, match=message):
        find_model(bundle)


def test_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    from medseg.models import find_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a MONAI bundle"):
        find_model(tmp_path / "empty")


def test_nearest_inversion_ties_fall_as_in_monai(tmp_path: Path) -> None:
    """Input spacing exactly half the bundle's pixdim on every axis (LPS-like signs): half of the input voxel
    centres lie half-way between two network voxels, and MONAI's float arithmetic decides each tie. The slab
    inversion repeats that arithmetic (``affine_grid``'s base grid and product), so every voxel still agrees."""
    from medseg.inference import Segmenter
    from medseg.io import load_volume, save_volume

    bundle = write_bundle(tmp_path / "ties", "argmax_first")
    affine = np.diag([-0.8, -0.65, 1.1, 1.0])
    affine[:3, 3] = [30.0, -12.0, 5.5]
    path = save_volume(ct_like(shape=(40, 34, 26), affine=affine), tmp_path / "case.nii.gz")
    reference, _ = run_with_monai(bundle, path, tmp_path / "eval")
    ours = Segmenter(bundle, device="cpu").segment(load_volume(path)).labels.array
    assert len(np.unique(reference)) >= 3
    assert float((ours == reference).mean()) == 1.0


def test_slab_grid_is_affine_grid_bit_for_bit() -> None:
    import torch.nn.functional as F

    from medseg.bundle_inference import _linspace_from_neg_one

    torch.manual_seed(0)
    theta = torch.randn(1, 3, 4, dtype=torch.float64)
    d, h, w = 37, 29, 23
    full = F.affine_grid(theta, [1, 1, d, h, w], align_corners=False)
    parts = []
    for d0 in range(0, d, 5):
        d1 = min(d, d0 + 5)
        base = torch.empty((1, d1 - d0, h, w, 4), dtype=torch.float64)
        base[..., 0].copy_(_linspace_from_neg_one(w, False, torch.float64))
        base[..., 1].copy_(_linspace_from_neg_one(h, False, torch.float64).unsqueeze(-1))
        base[..., 2].copy_(_linspace_from_neg_one(d, False, torch.float64)[d0:d1].unsqueeze(-1).unsqueeze(-1))
        base[..., 3].fill_(1)
        parts.append(base.view(1, -1, 4).bmm(theta.transpose(1, 2)).view(1, d1 - d0, h, w, 3))
    assert torch.equal(torch.cat(parts, 1), full)
