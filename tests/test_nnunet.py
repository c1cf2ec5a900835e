"""nnU-Net v2 result folders as models: labels identical to nnU-Net's own predictor, on the input grid; safe loading."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
from conftest import oblique_affine

from medseg.errors import (
    ChannelCountError,
    CheckpointMismatchError,
    ChecksumMismatchError,
    ModelCardError,
    ModelNotFoundError,
    UnsafeCheckpointError,
    WeightsError,
)
from medseg.models import find_model, list_models
from medseg.models.nnunet import is_nnunet_path, load_nnunet_card, load_nnunet_checkpoint
from medseg.volume import Volume

pytest.importorskip("nnunetv2")
torch = pytest.importorskip("torch")

from nnunet_factory import checkpoint, fake_ct, write_fake_nnunet_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two folds, mirroring allowed on all axes, transpose_forward (0, 2, 1)."""
    return write_fake_nnunet_folder(tmp_path_factory.mktemp("nnunet"), folds=(0, 1))


@pytest.fixture(scope="module")
def ct() -> Volume:
    """Anisotropic, oblique, flipped, non-zero origin; a zero margin that nnU-Net crops away."""
    return Volume(fake_ct((37, 45, 29)), oblique_affine(), modality="CT")


def _nnunet_own(root: Path, volume: Volume, work: Path, *, folds: tuple, mirroring: bool,
                checkpoint_name: str = "checkpoint_final.pth") -> Volume:
    """nnU-Net's own runner: initialize_from_trained_model_folder + predict_from_files_sequential on a NIfTI."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from medseg.io import load_volume, save_volume

    (work / "in").mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    save_volume(volume, work / "in" / "case_0000.nii.gz")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(root), use_folds=folds, checkpoint_name=checkpoint_name)
    predictor.predict_from_files_sequential([[str(work / "in" / "case_0000.nii.gz")]], str(work / "out"))
    return load_volume(work / "out" / "case.nii.gz")


def test_folder_card_from_dataset_json(folder: Path) -> None:
    card = load_nnunet_card(folder)
    assert card.kind == "nnunet" and card.source == folder.resolve()
    assert card.labels is not None and card.labels.names == {1: "liver", 2: "spleen", 3: "kidney_tumour"}
    assert card.labels[3].kind == "lesion"
    assert card.modality == ("CT",) and card.channel_names == ("CT",) and card.input_channels == 1
    assert [w.path.parent.name for w in card.ensemble] == ["fold_0", "fold_1"]
    assert card.provenance["nnunet"]["trainer"] == "nnUNetTrainer"
    assert card.network is not None and card.network.name == "PlainConvUNet"
    one = load_nnunet_card(folder / "fold_1")
    assert [w.path.parent.name for w in one.ensemble] == ["fold_1"]
    by_file = load_nnunet_card(folder / "fold_0" / "checkpoint_final.pth")
    assert by_file.ensemble == load_nnunet_card(folder, folds=[0]).ensemble
    assert find_model(str(folder)).kind == "nnunet"
    from medseg.models.registry import describe_model

    shown = describe_model(card)
    assert shown["nnunet"]["configuration"] == "3d_fullres" and len(shown["ensemble"]) == 2
    assert "'nnUNetTrainer' (its code is never imported)" in shown["medseg_runs"]
    assert is_nnunet_path(folder / "fold_0") and not is_nnunet_path(folder.parent)


def test_models_dir_lists_nnunet_results_layout(folder: Path) -> None:
    listing = list_models(models_dirs=[folder.parent.parent])  # nnUNet_results/Dataset901_Fake/Trainer__...
    names = [c.name for c in listing.cards]
    assert "Dataset901_Fake__3d_fullres" in names, listing.problems
    assert find_model("Dataset901_Fake__3d_fullres", models_dirs=[folder.parent.parent]).kind == "nnunet"


@pytest.mark.parametrize("mirroring", [False, True])
def test_labels_equal_nnunet_predictor_on_input_grid(folder: Path, ct: Volume, tmp_path: Path,
                                                      mirroring: bool) -> None:
    """Two folds ensembled, with and without mirroring: every voxel equals nnU-Net's own prediction."""
    from medseg.inference import Segmenter

    result = Segmenter(folder, device="cpu", tta=mirroring).segment(ct)
    assert result.labels.shape == ct.shape and np.array_equal(result.labels.affine, ct.affine)
    assert result.labels.labels is not None and result.labels.labels.names[2] == "spleen"
    theirs = _nnunet_own(folder, ct, tmp_path, folds=(0, 1), mirroring=mirroring)
    assert theirs.shape == ct.shape and np.allclose(theirs.affine, ct.affine, atol=1e-4)
    values = np.unique(result.labels.array)
    assert len(values) >= 2, "a test whose labels are all one value could not fail on geometry"
    np.testing.assert_array_equal(result.labels.array, theirs.array)


@pytest.mark.parametrize("reader", ["NibabelIOWithReorient", "SimpleITKIOWithReorient"])
def test_reorienting_readers_match_nnunet(tmp_path: Path, ct: Volume, reader: str) -> None:
    """Plans whose reader reorients to RAS first (TotalSegmentator-style canonical input)."""
    from medseg.inference import Segmenter

    root = write_fake_nnunet_folder(tmp_path / "r", folds=(0,), reader=reader, transpose_forward=(2, 0, 1), seed=5)
    ours = Segmenter(root / "fold_0", device="cpu", tta=False).segment(ct)
    theirs = _nnunet_own(root, ct, tmp_path / "w", folds=(0,), mirroring=False)
    assert len(np.unique(ours.labels.array)) >= 2
    np.testing.assert_array_equal(ours.labels.array, theirs.array)


def test_probabilities_on_input_grid(folder: Path, ct: Volume) -> None:
    from medseg.inference import Segmenter

    result = Segmenter(folder / "fold_0", device="cpu", tta=False).segment(ct, probabilities=True)
    assert result.probabilities is not None
    probs = result.probabilities.array
    assert probs.shape == (*ct.shape, 4)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-3)
    np.testing.assert_array_equal(np.argmax(probs, axis=-1), result.labels.array)


def test_missing_nnunetv2_is_a_clear_error(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from medseg.errors import MissingDependencyError
    from medseg.inference import Segmenter

    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'medseg\[nnunet\]'"):
        Segmenter(folder, device="cpu")


def test_channel_count_checked(folder: Path, ct: Volume) -> None:
    from medseg.inference import Segmenter

    two = Volume(np.stack([ct.array, ct.array], axis=-1), ct.affine, modality="CT")
    with pytest.raises(ChannelCountError, match="takes 1 channel"):
        Segmenter(folder / "fold_0", device="cpu", tta=False).segment(two)


# ---- safe loading ----------------------------------------------------------------------------------------------
def _net_and_jsons(root: Path):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = json.loads((root / "plans.json").read_text())
    dataset = json.loads((root / "dataset.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                 4, allow_init=True, deep_supervision=False)
    return net, plans, dataset


def test_trained_checkpoint_loads_weights_only(folder: Path) -> None:
    ckpt = load_nnunet_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    assert isinstance(ckpt["_best_ema"], np.floating) and ckpt["trainer_name"] == "nnUNetTrainer"
    with pytest.raises(Exception, match="Weights only load failed"):  # what plain weights_only=True does
        torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)


def test_checkpoint_with_pickled_object_refused(tmp_path: Path, folder: Path) -> None:
    root = tmp_path / "Dataset902_Bad" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (root / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (root / name).write_text((folder / name).read_text())
    net, plans, dataset = _net_and_jsons(root)
    ckpt = checkpoint(net, plans, dataset, 0)
    ckpt["init_args"]["output_folder"] = pathlib.PurePosixPath("/somewhere")  # an object beyond the allow-list
    torch.save(ckpt, root / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(UnsafeCheckpointError, match="PurePosixPath.*refuses to load"):
        load_nnunet_checkpoint(root / "fold_0" / "checkpoint_final.pth")
    from medseg.inference import Segmenter

    with pytest.raises(UnsafeCheckpointError, match="checkpoint_final.pth"):
        Segmenter(root, device="cpu")


def test_sha256sums_checked(tmp_path: Path, folder: Path) -> None:
    from medseg.inference import Segmenter

    root = write_fake_nnunet_folder(tmp_path, folds=(0,), seed=9)
    (root / "SHA256SUMS").write_text("0" * 64 + "  fold_0/checkpoint_final.pth\n")
    assert load_nnunet_card(root).weights.sha256 == "0" * 64  # type: ignore[union-attr]
    with pytest.raises(ChecksumMismatchError, match="SHA256SUMS records"):
        Segmenter(root, device="cpu")


def test_plans_naming_other_classes_refused(tmp_path: Path, folder: Path) -> None:
    from medseg.inference import Segmenter

    root = write_fake_nnunet_folder(tmp_path, folds=(0,), seed=2)
    plans = json.loads((root / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    (root / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelCardError, match="'nonlin' = 'os.system' is not a torch.nn"):
        Segmenter(root, device="cpu")
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "subprocess.Popen"
    (root / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelCardError, match="'subprocess.Popen' is not a class of dynamic_network_architectures"):
        Segmenter(root, device="cpu")


def test_checkpoint_of_another_network_reported(tmp_path: Path) -> None:
    from medseg.inference import Segmenter

    root = write_fake_nnunet_folder(tmp_path, folds=(0,), features=(8, 16, 32))
    other = write_fake_nnunet_folder(tmp_path / "other", folds=(0,), features=(4, 8, 16))
    (root / "fold_0" / "checkpoint_final.pth").write_bytes((other / "fold_0" / "checkpoint_final.pth").read_bytes())
    with pytest.raises(CheckpointMismatchError, match="does not fit the network plans.json describes"):
        Segmenter(root, device="cpu")


def test_folder_errors_name_the_file(tmp_path: Path, folder: Path) -> None:
    root = tmp_path / "Dataset903_X" / "nnUNetTrainer__nnUNetPlans__3d_lowres"
    root.mkdir(parents=True)
    (root / "plans.json").write_text((folder / "plans.json").read_text())
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(ModelCardError, match=r"dataset.json: cannot read"):
        load_nnunet_card(root)
    (root / "dataset.json").write_text((folder / "dataset.json").read_text())
    with pytest.raises(ModelCardError, match=r"no configuration '3d_lowres'.*\['3d_fullres'\]"):
        load_nnunet_card(root)
    good = tmp_path / "Dataset903_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    root.rename(good)
    with pytest.raises(WeightsError, match="no fold_N/checkpoint_final.pth"):
        load_nnunet_card(good)
    with pytest.raises(ModelNotFoundError, match="not an nnU-Net v2 result folder"):
        load_nnunet_card(tmp_path)


def test_batch_mirrors_nnunet_folders_as_nnunet_does_unless_told_not_to(tmp_path: Path) -> None:
    # `medseg batch` and recipes leave tta to the model (None) unless --tta/--no-tta or `tta:` says otherwise, so a
    # batch run of an nnU-Net folder gives the labels of `medseg segment` and nnUNetv2_predict (mirroring on).
    from medseg.workflow import RunOptions, _segmenter, parse_workflow

    folder = write_fake_nnunet_folder(tmp_path / "results", mirroring_axes=(0, 1, 2))
    assert _segmenter(RunOptions(model=str(folder), device="cpu"))._nnunet.mirror_axes == (0, 1, 2)
    assert _segmenter(RunOptions(model=str(folder), device="cpu", tta=False))._nnunet.mirror_axes is None
    recipe = {"model": str(folder), "inputs": {"folder": str(tmp_path)}, "outputs": {"folder": str(tmp_path / "o")}}
    assert parse_workflow(recipe).options.tta is None
    assert parse_workflow({**recipe, "inference": {"tta": False}}).options.tta is False
