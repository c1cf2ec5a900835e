"""Model Zoo bundle layouts for tests: configs like the public zoo's, tiny random-weight networks.

Each kind reproduces one shape of config that changed labels silently in earlier designs
(``../shared/notes/real-models.md``):

- ``unet``: UNet, softmax, ``Invertd`` (bilinear) then argmax (spleen-like), JSON;
- ``argmax_first``: SegResNet, argmax *before* ``Invertd(nearest)``, ``padding_mode: replicate``, pixdim and
  weight file picked by expressions, evaluator ``amp`` (wholeBody-like), YAML;
- ``simple``: SimpleInferer, ``"transforms": "$@a + @b + @c"``, DivisiblePadd (segmentation_template-like), JSON;
- ``crop``: CropForegroundd after resampling (pediatric-like), YAML (``.yml``);
- ``sigmoid4``: four input channels, sigmoid, threshold and brats' ``$lambda`` label mapping {1, 2, 4}, JSON;
- ``swin14``: SwinUNETR with ``img_size``, ``monai_version: 1.4.0`` (weights trained before MONAI 1.5), JSON.

``run_with_monai`` is the reference: MONAI's ConfigParser on the bundle's own inference config, running its
evaluator with its loader, Invertd and writer, as ``python -m monai.bundle run`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import oblique_affine

from medseg import Volume

KINDS = ("unet", "argmax_first", "simple", "crop", "sigmoid4", "swin14")
CHANNELS = ("T1c", "T1", "T2", "FLAIR")


def ct_like(shape=(37, 30, 19), affine=None, seed=1, channels: int = 0) -> Volume:
    """A body-like blob in air with organ-like intensities, on an oblique anisotropic flipped grid."""
    rng = np.random.default_rng(seed)
    affine = oblique_affine(spacing=(1.1, 0.9, 2.6)) if affine is None else affine
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    r = np.sqrt((ijk ** 2).sum(-1))
    arr = np.where(r < 0.8, 40.0, -1000.0) + np.where(np.abs(ijk[..., 0] - 0.2) + np.abs(ijk[..., 1]) < 0.4, 80, 0)
    if channels:
        arr = np.stack([np.where(r < 0.8, 300.0 + 100 * c, 0.0) + 60 * ijk[..., c % 3] + rng.normal(0, 20, shape)
                        for c in range(channels)], -1)
        return Volume(arr.astype(np.float32), affine, modality="MR")
    arr = arr + rng.normal(0, 25, size=shape)
    return Volume(arr.astype(np.int16), affine, modality="CT")


def _balance(net: torch.nn.Module, x: torch.Tensor, scale: float = 20.0) -> None:
    """Random weights made to use every class: the last layer re-centred on ``x`` and sharpened."""
    net.eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.InstanceNorm3d)) and m.running_mean is not None:
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        last = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))
                and m.bias is not None][-1]
        out = net(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        last.bias -= out.mean(dim=(0, 2, 3, 4))
        last.weight *= scale
        last.bias *= scale


def _common(pre: Any, post: list[Any], *, net: dict[str, Any], inferer: dict[str, Any], amp: bool = False,
            load_path: str = "$@bundle_root + '/models/model.pt'", loader_top: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": [],
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": net,
        "network": "$@network_def.to(@device)",
        "preprocessing": pre if isinstance(pre, dict) else {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": amp},
        "run": ["$@evaluator.run()"],
    }
    loader = {"_target_": "CheckpointLoader", "load_path": load_path, "load_dict": {"model": "@network"}}
    if loader_top:  # wholeBody: a top-level checkpointloader called in "initialize"
        config["checkpointloader"] = loader
        config["initialize"] = ["$@checkpointloader(@evaluator)"]
    else:
        config["handlers"].insert(0, loader)
    return config


def _save(x: Any) -> dict[str, Any]:
    return {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
            "separate_folder": False, "resample": False, "output_dtype": "$np.uint8"}


SCALE = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -200, "a_max": 300, "b_min": 0.0,
         "b_max": 1.0, "clip": True}


def write_bundle(root: Path, kind: str, *, seed: int = 0, meta_extra: dict[str, Any] | None = None) -> Path:
    """Write a bundle of ``kind`` (see module docstring) with random weights; return its folder."""
    from monai.networks.nets import SegResNet, SwinUNETR, UNet

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.manual_seed(seed)
    in_ch, n_out = 1, 3
    channel_names: list[str] = ["image"]
    outputs = {"0": "background", "1": "liver", "2": "liver tumor"}
    monai_version = "1.6.1"
    weights_name = "model.pt"
    amp = False
    loader_top = False
    load_path = "$@bundle_root + '/models/model.pt'"
    fmt = "json"
    extra: dict[str, Any] = {}
    base_pre = [{"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.25, 2.0], "mode": "bilinear"}]
    invert_soft = [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
                   {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                    "nearest_interp": False, "to_tensor": True},
                   {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, _save(None)]
    sw = {"_target_": "SlidingWindowInferer", "roi_size": [24, 24, 16], "sw_batch_size": 2, "overlap": 0.5,
          "mode": "gaussian"}
    unet = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16], "strides": [2, 2],
            "num_res_units": 0, "norm": "batch"}
    if kind == "unet":
        net_cfg = {"_target_": "UNet", **unet}
        pre: Any = [*base_pre, SCALE, {"_target_": "EnsureTyped", "keys": "image"}]
        post = invert_soft
        inferer = sw
    elif kind == "argmax_first":
        fmt, amp, loader_top = "yaml", True, True
        n_out = 5
        outputs = {"0": "background", "1": "spleen", "2": "kidney_right", "3": "kidney_left", "4": "liver"}
        net_cfg = {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": n_out,
                   "init_filters": 8, "blocks_down": [1, 2], "blocks_up": [1], "dropout_prob": 0.2}
        extra = {"displayable_configs": {"highres": False, "sw_overlap": 0.25, "sw_batch_size": 1},
                 "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [1.6, 1.3, 2.2]",
                 "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
                 "image_key": "image"}
        weights_name = "model_lowres.pt"
        load_path = "$@bundle_root + '/models/' + @modelname"
        pre = [{"_target_": "LoadImaged", "keys": "@image_key"}, {"_target_": "EnsureTyped", "keys": "@image_key"},
               {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
               {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
               {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
               {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
               {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0}]
        post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
                 "nearest_interp": True, "to_tensor": True}, _save(None)]
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": [32, 16, 32],
                   "sw_batch_size": "@displayable_configs#sw_batch_size",
                   "overlap": "@displayable_configs#sw_overlap", "padding_mode": "replicate", "mode": "gaussian",
                   "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"}
    elif kind == "simple":
        net_cfg = {"_target_": "UNet", **unet}
        extra = {"pre_load": base_pre[:2], "pre_geom": base_pre[2:],
                 "pre_int": [SCALE, {"_target_": "DivisiblePadd", "keys": "image", "k": 4}]}
        pre = {"_target_": "Compose", "transforms": "$@pre_load + @pre_geom + @pre_int"}
        post = invert_soft
        inferer = {"_target_": "SimpleInferer"}
    elif kind == "crop":
        fmt = "yml"
        net_cfg = {"_target_": "UNet", **unet}
        pre = [*base_pre, SCALE, {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
                                  "margin": 1, "allow_smaller": True}]
        post = invert_soft
        inferer = sw
    elif kind == "sigmoid4":
        in_ch, n_out = 4, 3
        channel_names = list(CHANNELS)
        outputs = {"0": "TC", "1": "WT", "2": "ET"}
        net_cfg = {"_target_": "SegResNet", "blocks_down": [1, 1], "blocks_up": [1], "init_filters": 8,
                   "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2}
        pre = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
               {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
               {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.25, 2.0], "mode": "bilinear"},
               {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]
        post = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                 "meta_keys": "pred_meta_dict", "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: torch.where(x[[2]] > 0, 4, "
                 "torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))"}, _save(None)]
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": [24, 24, 16], "sw_batch_size": 1,
                   "overlap": 0.5}
        amp = True
    elif kind == "swin14":
        monai_version = "1.4.0"
        net_cfg = {"_target_": "SwinUNETR", "img_size": [32, 32, 32], "in_channels": 1, "out_channels": 3,
                   "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "norm_name": "batch",
                   "use_checkpoint": False}
        pre = [*base_pre, SCALE]
        post = invert_soft
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 1,
                   "overlap": 0.25, "mode": "gaussian"}
    else:  # pragma: no cover
        raise ValueError(kind)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in net_cfg.items() if k not in ("_target_",
                                                                                              "img_size")}
    cls = {"UNet": UNet, "SegResNet": SegResNet, "SwinUNETR": SwinUNETR}[net_cfg["_target_"]]
    if kind == "swin14":
        kwargs["downsample"] = patch_merging_v14_reference()
    net = cls(**kwargs)
    roi = [32, 32, 32] if kind == "swin14" else [32, 16, 32] if kind == "argmax_first" else [24, 24, 16]
    x = torch.rand(1, in_ch, *roi) * (1.0 if kind != "argmax_first" else 2.0) - (0.0 if kind != "argmax_first"
                                                                                 else 1.0)
    _balance(net, x, scale=20.0 if kind != "sigmoid4" else 4.0)
    if kind == "sigmoid4":
        with torch.no_grad():
            last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.bias is not None][-1]
            last.bias += 0.5  # some voxels above 0.5 in several channels: the lambda's order matters
    torch.save(net.state_dict(), root / "models" / weights_name)
    meta = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0", "monai_version": monai_version, "name": f"Tiny {kind} test bundle",
        "license": "Apache-2.0 (test fixture)",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield" if in_ch == 1 else "magnitude",
                                 "modality": "CT" if in_ch == 1 else "MR", "num_channels": in_ch,
                                 "channel_def": {str(i): n for i, n in enumerate(channel_names)}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": n_out,
                                 "channel_def": outputs}},
        },
        **(meta_extra or {}),
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    config = _common(pre, post, net=net_cfg, inferer=inferer, amp=amp, load_path=load_path, loader_top=loader_top)
    config.update(extra)
    if fmt == "json":
        (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    else:
        import yaml

        (root / "configs" / f"inference.{fmt}").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def patch_merging_v14_reference() -> Any:
    """SwinUNETR's 3D PatchMerging as written in MONAI 1.4 (x0..x7 below are 1.4's lines, two duplicated)."""
    import torch.nn.functional as F
    from monai.networks.nets.swin_unetr import PatchMergingV2

    class PatchMerging14(PatchMergingV2):
        def forward(self, x):
            _, d, h, w, _ = x.size()
            if (h % 2 == 1) or (w % 2 == 1) or (d % 2 == 1):
                x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
            x0 = x[:, 0::2, 0::2, 0::2, :]
            x1 = x[:, 1::2, 0::2, 0::2, :]
            x2 = x[:, 0::2, 1::2, 0::2, :]
            x3 = x[:, 0::2, 0::2, 1::2, :]
            x4 = x[:, 1::2, 0::2, 1::2, :]
            x5 = x[:, 0::2, 1::2, 0::2, :]
            x6 = x[:, 0::2, 0::2, 1::2, :]
            x7 = x[:, 1::2, 1::2, 1::2, :]
            x = torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)
            return self.reduction(self.norm(x))

    return PatchMerging14


def config_path(bundle: Path) -> Path:
    return next(p for p in sorted((bundle / "configs").glob("inference.*")))


def run_with_monai(bundle: Path, image: Path, out_dir: Path, *, swin14: bool = False) -> tuple[np.ndarray, Any]:
    """The bundle's own inference config through monai.bundle.ConfigParser (what `monai.bundle run` does).

    ``swin14``: the MONAI 1.4 behaviour this MONAI no longer has (img_size removed from SwinUNETR, the 1.4 patch
    merging of :func:`patch_merging_v14_reference`), edited into the config before anything is instantiated.
    """
    import nibabel as nib
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_path(bundle)))
    parser["bundle_root"] = str(bundle)
    parser["datalist"] = [str(image)]
    parser["output_dir"] = str(out_dir)
    if swin14:
        net = dict(parser["network_def"])
        net.pop("img_size")
        net["downsample"] = patch_merging_v14_reference()
        parser["network_def"] = net
    if "initialize" in parser.get():
        for i in range(len(parser["initialize"])):
            parser.get_parsed_content(f"initialize#{i}")
    parser.get_parsed_content("evaluator").run()
    files = sorted(out_dir.rglob("*_seg.nii.gz"))
    assert len(files) == 1, files
    img = nib.load(files[0])
    return np.asarray(img.dataobj).squeeze(), img.affine
