"""A tiny MONAI bundle in Model Zoo layout: medseg must give the labels MONAI's own bundle machinery gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import oblique_affine

from medseg import Volume
from medseg.errors import ChecksumMismatchError, ModelCardError, ModelNotFoundError

torch = pytest.importorskip("torch")

NET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16], "strides": [2, 2],
       "num_res_units": 0, "norm": "batch"}
PIXDIM = [1.5, 1.25, 2.0]
ROI = [24, 24, 16]


def write_bundle(root: Path, *, seed: int = 0, crop: bool = False) -> Path:
    """Model Zoo layout: configs/inference.json, configs/metadata.json, models/model.pt (random weights)."""
    from monai.networks.nets import UNet

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.manual_seed(seed)
    net = UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in NET.items()})
    net.eval()
    with torch.no_grad():
        # Random weights, made to use all classes: non-trivial batch-norm statistics, and the last layer
        # re-centred and scaled on a CT-like input so that each class wins somewhere (many near-ties too).
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        last = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d)][-1]
        v = ct_like()
        x = torch.from_numpy(np.clip((v.array.astype(np.float32) + 200) / 500, 0, 1))[None, None, :32, :24, :16]
        last.bias -= net(x).mean(dim=(0, 2, 3, 4))
        last.weight *= 20
        last.bias *= 20
    torch.save(net.state_dict(), root / "models" / "model.pt")
    meta = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "name": "Tiny test bundle",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": ROI, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3, "spatial_shape": ROI,
                                 "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": {"0": "background", "1": "liver", "2": "liver tumor"}}},
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    pre = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": PIXDIM, "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -200, "a_max": 300, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    config = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": [],
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "UNet", **NET},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ROI, "sw_batch_size": 2, "overlap": 0.5,
                    "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "separate_folder": False, "resample": False, "output_dtype": "$np.uint8"},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }
    if crop:
        pre.insert(4, {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"})
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return root


def ct_like(shape=(37, 30, 19), affine=None, seed=1) -> Volume:
    """A body-like blob in air with organ-like intensities, on an oblique anisotropic flipped grid."""
    rng = np.random.default_rng(seed)
    affine = oblique_affine(spacing=(1.1, 0.9, 2.6)) if affine is None else affine
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    r = np.sqrt((ijk ** 2).sum(-1))
    arr = np.where(r < 0.9, 40.0, -1000.0) + np.where(np.abs(ijk[..., 0] - 0.2) + np.abs(ijk[..., 1]) < 0.4, 80, 0)
    arr = arr + rng.normal(0, 25, size=shape)
    return Volume(arr.astype(np.int16), affine, modality="CT")


def run_bundle_with_monai(bundle: Path, image_path: Path, out_dir: Path) -> np.ndarray:
    """The bundle's own inference.json through monai.bundle.ConfigParser (what `monai.bundle run` does)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["datalist"] = [str(image_path)]
    parser["output_dir"] = str(out_dir)
    parser.get_parsed_content("evaluator").run()
    files = sorted(out_dir.glob("*_seg.nii.gz"))
    assert len(files) == 1, files
    import nibabel as nib

    img = nib.load(files[0])
    return np.asarray(img.dataobj).squeeze(), img.affine


def test_bundle_matches_monai_bundle_machinery(tmp_path: Path) -> None:
    from medseg.inference import Segmenter
    from medseg.io import save_volume

    bundle = write_bundle(tmp_path / "tiny_liver_bundle")
    volume = ct_like()
    image_path = save_volume(volume, tmp_path / "case.nii.gz")
    reference, ref_affine = run_bundle_with_monai(bundle, image_path, tmp_path / "eval")

    seg = Segmenter(bundle).segment(image_path)
    ours = seg.labels.array
    assert ours.shape == volume.shape == reference.shape
    np.testing.assert_allclose(seg.labels.affine, volume.affine, atol=1e-5)
    np.testing.assert_allclose(ref_affine, volume.affine, atol=1e-4)
    counts = np.bincount(reference.ravel().astype(int), minlength=3)
    assert (counts > 50).all(), f"the random network should predict every class, got {counts}"
    identical = float((ours == reference).mean())
    assert identical == 1.0, f"only {identical:.6f} of voxels identical"
    assert seg.labels.labels.names == {1: "liver", 2: "liver tumor"}
    assert seg.labels.labels[2].kind == "lesion" and seg.labels.labels[1].kind == "organ"


def test_bundle_card_from_metadata_and_config(tmp_path: Path) -> None:
    from medseg.models import find_model, list_models

    bundle = write_bundle(tmp_path / "models" / "tiny_liver_bundle")
    card = find_model("tiny_liver_bundle", models_dirs=[tmp_path / "models"])
    assert card.kind == "bundle" and card.origin == "bundle"
    assert card.preprocessing.spacing_mm == tuple(PIXDIM)
    assert card.preprocessing.orientation == "RAS"
    assert card.preprocessing.intensity.kind == "ct_window" and card.preprocessing.intensity.a_min == -200
    assert card.inference.patch_size == tuple(ROI) and card.inference.overlap == 0.5
    assert card.inference.blending == "gaussian" and card.inference.sw_batch_size == 2
    assert card.modality == ("CT",) and card.channel_names == ("image",)
    assert card.weights is not None and card.weights.path == (bundle / "models" / "model.pt").resolve()
    names = [c.name for c in list_models(models_dirs=[tmp_path / "models"]).cards]
    assert names[0] == "tiny_liver_bundle" and "ct-basic" in names


def test_bundle_with_unsupported_preprocessing_is_refused(tmp_path: Path) -> None:
    from medseg.models import find_model

    bundle = write_bundle(tmp_path / "b", crop=True)
    with pytest.raises(ModelCardError, match="CropForegroundd.*not one medseg reproduces"):
        find_model(bundle)


def test_bundle_sha256_is_checked_when_given(tmp_path: Path) -> None:
    from dataclasses import replace

    from medseg.inference import Segmenter
    from medseg.models import find_model

    card = find_model(write_bundle(tmp_path / "b"))
    bad = replace(card, weights=replace(card.weights, sha256="0" * 64))
    with pytest.raises(ChecksumMismatchError, match="sha256 is .* but the model card expects 0000"):
        Segmenter(bad)


def test_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    from medseg.models import find_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a MONAI bundle"):
        find_model(tmp_path / "empty")
