"""Fake trained nnU-Net v2 result folders: hand-written plans.json and dataset.json, and random-weight checkpoints
with the key layout nnU-Net's trainer writes (network_weights, optimizer_state, logging with numpy scalars, ...).

Used by tests/test_nnunet.py and benchmarks/bench_nnunet.py. Needs nnunetv2 (for the network class).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_tumour": 3}


def plans_json(*, reader: str = "SimpleITKIO", transpose_forward: Sequence[int] = (0, 2, 1),
               patch_size: Sequence[int] = (16, 32, 24), spacing: Sequence[float] = (3.0, 1.5, 2.0),
               features: Sequence[int] = (8, 16, 32)) -> dict[str, Any]:
    """A plans.json for a 3-stage PlainConvUNet 3d_fullres configuration (spacing and patch in transposed order)."""
    n = len(features)
    backward = [int(np.argsort(transpose_forward)[i]) for i in range(3)]
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset901_Fake",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [40, 60, 50],
        "image_reader_writer": reader,
        "transpose_forward": list(transpose_forward),
        "transpose_backward": backward,
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch_size),
                "median_image_size_in_voxels": [40, 60, 50],
                "spacing": list(spacing),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": n,
                        "features_per_stage": list(features),
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n,
                        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                        "n_conv_per_stage": [2] * n,
                        "n_conv_per_stage_decoder": [2] * (n - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": True,
            },
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1800.0, "mean": 60.0, "median": 55.0, "min": -1000.0, "percentile_00_5": -850.0,
                  "percentile_99_5": 1200.0, "std": 180.0},
        },
    }


def dataset_json(labels: dict[str, int] | None = None) -> dict[str, Any]:
    return {"channel_names": {"0": "CT"}, "labels": dict(labels or LABELS), "numTraining": 12,
            "file_ending": ".nii.gz", "name": "Fake", "description": "random weights, for tests"}


def checkpoint(network: Any, plans: dict[str, Any], dataset: dict[str, Any], fold: int | str,
               **extra: Any) -> dict[str, Any]:
    """The dict nnU-Net's trainer saves, with numpy scalars in the training log as a real one has."""
    import torch

    opt = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    ckpt = {
        "network_weights": network.state_dict(),
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [np.float64(0.41), np.float64(0.52)],
            "ema_fg_dice": [np.float64(0.41), np.float64(0.42)],
            "dice_per_class_or_region": [[np.float64(0.3), np.float64(0.5), np.float64(0.4)]] * 2,
            "train_losses": [np.float64(-0.2), np.float32(-0.3)],
            "val_losses": [np.float64(-0.1), np.float64(-0.25)],
            "lrs": [0.01, 0.0099],
            "epoch_start_timestamps": [1.7e9, 1.7e9 + 60],
            "epoch_end_timestamps": [1.7e9 + 59, 1.7e9 + 119],
        },
        "_best_ema": np.float64(0.42),
        "current_epoch": 2,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    ckpt.update(extra)
    return ckpt


def write_fake_nnunet_folder(base: Path, *, folds: Sequence[int | str] = (0,), seed: int = 0,
                             trainer: str = "nnUNetTrainer", mirroring_axes: tuple[int, ...] | None = (0, 1, 2),
                             checkpoint_name: str = "checkpoint_final.pth", labels: dict[str, int] | None = None,
                             **plans_kwargs: Any) -> Path:
    """``base/Dataset901_Fake/<trainer>__nnUNetPlans__3d_fullres`` with one random-weight checkpoint per fold."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans, dataset = plans_json(**plans_kwargs), dataset_json(labels)
    root = base / "Dataset901_Fake" / f"{trainer}__nnUNetPlans__3d_fullres"
    root.mkdir(parents=True, exist_ok=True)
    (root / "plans.json").write_text(json.dumps(plans, indent=2))
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (root / "dataset_fingerprint.json").write_text(json.dumps({"spacings": [[3.0, 1.5, 2.0]]}))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, len(dataset["labels"]), allow_init=True, deep_supervision=False)
        ckpt = checkpoint(net, plans, dataset, fold, trainer_name=trainer,
                          inference_allowed_mirroring_axes=mirroring_axes)
        (root / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(ckpt, root / f"fold_{fold}" / checkpoint_name)
    return root


def fake_ct(shape: Sequence[int] = (37, 45, 29), seed: int = 3) -> np.ndarray:
    """A CT-like int16 array: air, a body with organ-like blobs, and a zero margin (a reconstruction circle)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    ct = np.full(tuple(shape), -1000.0)
    body = i**2 / 0.8 + j**2 / 0.6 < 0.8
    ct[body] = 40.0
    for _ in range(5):
        c = rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(0.15, 0.35)
        ct[((i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2 < r**2) & body] = rng.uniform(-100, 300)
    ct += rng.normal(0, 15, ct.shape)
    ct[:2] = 0.0  # outside the reconstruction: nnU-Net crops to the non-zero box
    return ct.astype(np.int16)
