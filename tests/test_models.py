"""Model cards, the registry, MONAI networks by name, and safe weight loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.errors import (
    CheckpointMismatchError,
    ChecksumMismatchError,
    ModelCardError,
    ModelNotFoundError,
    UnknownNetworkError,
    UnsafeCheckpointError,
    WeightsError,
)
from medseg.models import find_model, list_models, load_card, parse_card
from medseg.models.registry import shipped_dir

UNET_KW = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
           "num_res_units": 0}


def card_dict(**changes) -> dict:
    card = {
        "name": "tiny-ct",
        "version": "0.1",
        "modality": "CT",
        "network": {"name": "UNet", "kwargs": dict(UNET_KW)},
        "labels": [{"value": 1, "name": "liver", "color": [200, 100, 50], "kind": "organ"},
                   {"value": 2, "name": "liver_tumor", "kind": "lesion"}],
        "preprocessing": {"orientation": "RAS", "spacing_mm": [1.5, 1.5, 2.0],
                          "intensity": {"kind": "ct_window", "a_min": -200, "a_max": 300, "clip": True}},
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.25, "blending": "gaussian", "sw_batch_size": 2},
        "postprocessing": {"largest_component": True, "min_component_ml": 0.1, "fill_holes": True},
        "weights": {"file": "tiny.pt"},
        "provenance": {"trained_by": "tests", "metrics": {"dice": 0.5}},
    }
    card.update(changes)
    return card


def write_card(folder: Path, *, seed: int = 0, sha: bool = True, **changes) -> Path:
    """A card with random UNet weights next to it; returns the card path."""
    import torch
    from monai.networks.nets import UNet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    kw = card_dict(**changes)["network"]["kwargs"]
    net = UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    torch.save(net.state_dict(), folder / "tiny.pt")
    data = card_dict(**changes)
    if sha:
        from medseg.files import sha256_file

        data["weights"]["sha256"] = sha256_file(folder / "tiny.pt")
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- cards ------------------------------------------------------------------------------------------------
def test_card_parses_every_section(tmp_path: Path) -> None:
    card = load_card(write_card(tmp_path))
    assert card.name == "tiny-ct" and card.modality == ("CT",) and card.kind == "network"
    assert card.network is not None and card.network.name == "UNet"
    assert card.labels is not None and card.labels[2].kind == "lesion" and card.labels[1].color == (200, 100, 50)
    assert card.preprocessing.spacing_mm == (1.5, 1.5, 2.0)
    assert card.preprocessing.intensity.a_min == -200.0
    assert card.inference.patch_size == (16, 16, 16) and card.inference.sw_batch_size == 2
    assert card.postprocessing.min_component_ml == 0.1 and card.postprocessing.fill_holes
    assert card.weights is not None and card.weights.path == tmp_path / "tiny.pt"
    assert card.out_channels == 3 and card.input_channels == 1
    summary = card.summary()
    json.dumps(summary)
    assert summary["provenance"]["metrics"]["dice"] == 0.5


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"name": None}, "missing required field 'name'"),
        ({"lables": []}, r"unknown field\(s\) in '\(top level\)': 'lables' \(did you mean 'labels'\?\)"),
        ({"network": {"name": "Unte", "kwargs": {}}}, "unknown network 'Unte' \\(did you mean 'UNet'"),
        ({"network": {"name": "SegResNett"}}, "did you mean 'SegResNet'"),
        ({"labels": []}, "field 'labels': expected a non-empty list"),
        ({"labels": [{"value": 1, "name": "a"}, {"value": 1, "name": "b"}]}, "Label value 1 appears twice"),
        ({"labels": [{"value": 1, "name": "a", "kind": "tumour"}]}, "kind must be one of"),
        ({"preprocessing": {"spacing_mm": [1, 2]}}, r"preprocessing.spacing_mm': expected three floats"),
        ({"preprocessing": {"spacing_mm": [1, -2, 1]}}, "expected positive values"),
        ({"preprocessing": {"orientation": "RAX"}}, "three-letter code like RAS"),
        ({"preprocessing": {"intensity": {"kind": "ct_window", "a_min": 100, "a_max": 0}}}, "a value above a_min"),
        ({"preprocessing": {"intensity": {"kind": "hist"}}}, r"intensity.kind': expected one of"),
        ({"inference": {"patch_size": [16, 16, 16.5]}}, "three ints"),
        ({"inference": {"overlap": 1.0}}, r"overlap': expected a number in \[0.0, 0.95\]"),
        ({"inference": {"blending": "linear"}}, "one of \\['gaussian', 'constant'\\]"),
        ({"weights": {"file": "x.pt", "sha256": "abc"}}, "64 hexadecimal characters"),
        ({"modality_check": "ignore"}, "one of \\['error', 'warn'\\]"),
        ({"network": {"name": "UNet", "kwargs": {**UNET_KW, "out_channels": 2}}},
         "out_channels is 2 but 2 labels with output 'softmax' need 3 channels"),
    ],
)
def test_bad_cards_say_which_field(changes: dict, match: str) -> None:
    data = card_dict(**changes)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ModelCardError, match=match):
        parse_card(data, source="bad.yaml")


def test_unknown_network_is_also_a_lookup_error() -> None:
    with pytest.raises(LookupError, match="Supported MONAI networks: UNet"):
        parse_card(card_dict(network={"name": "ResNet50"}))
    assert issubclass(UnknownNetworkError, ModelCardError)


def test_card_file_that_is_not_yaml(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ModelCardError, match="broken.yaml: cannot read the model card as YAML"):
        load_card(p)
    with pytest.raises(ModelNotFoundError, match="no such model card"):
        load_card(tmp_path / "missing.yaml")


# ---- networks --------------------------------------------------------------------------------------------
NETS = {
    "UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]},
    "BasicUNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": [4, 4, 8, 8, 16, 4]},
    "SegResNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 8, "blocks_down": [1, 1],
                  "blocks_up": [1]},
    "DynUNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                "upsample_kernel_size": [2, 2], "filters": [4, 8, 8]},
    "UNETR": {"in_channels": 1, "out_channels": 2, "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 48,
              "mlp_dim": 96, "num_heads": 4},
    "SwinUNETR": {"in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [1, 1, 1, 1],
                  "num_heads": [1, 1, 1, 1], "norm_name": "batch"},
    "AttentionUnet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]},
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_networks_build_by_name_and_keep_shape(name: str) -> None:
    import torch

    from medseg.models.networks import build_network

    net = build_network(name.lower(), NETS[name])
    assert type(net).__name__ == name and not net.training
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 32, 32, 32))
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert tuple(out.shape) == (1, 2, 32, 32, 32)


def test_network_with_wrong_kwargs_shows_signature() -> None:
    from medseg.models.networks import build_network

    with pytest.raises(ModelCardError, match=r"cannot build UNet from network.kwargs .*Its signature is UNet\(self"):
        build_network("UNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "chanels": [4, 8]})


# ---- weights ---------------------------------------------------------------------------------------------
class _Payload:  # a pickled object in a checkpoint
    def __reduce__(self):
        return (print, ("this would run at load time",))


def _tiny_net():
    from medseg.models.networks import build_network

    return build_network("UNet", UNET_KW)


def test_sha256_mismatch_is_refused_before_loading(tmp_path: Path) -> None:
    from medseg.models.weights import load_weights

    card = load_card(write_card(tmp_path))
    with open(tmp_path / "tiny.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumMismatchError, match=r"tiny.pt: sha256 is [0-9a-f]{64} but the model card expects"):
        load_weights(_tiny_net(), card.weights.path, sha256=card.weights.sha256)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    import torch

    from medseg.models.weights import load_weights

    p = tmp_path / "evil.pt"
    torch.save({"state_dict": _tiny_net().state_dict(), "extra": _Payload()}, p)
    with pytest.raises(UnsafeCheckpointError, match="holds pickled Python objects, which medseg refuses"):
        load_weights(_tiny_net(), p)


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    import torch

    from medseg.models.networks import build_network
    from medseg.models.weights import load_weights

    other = build_network("UNet", {**UNET_KW, "channels": [4, 8, 16], "strides": [2, 2]})
    p = tmp_path / "other.pt"
    torch.save(other.state_dict(), p)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing keys: .+unexpected keys: model\.1\.submodule"):
        load_weights(_tiny_net(), p)
    wrong = {k: torch.zeros(1) for k in _tiny_net().state_dict()}
    torch.save(wrong, p)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches: model.0.conv.bias: checkpoint \(1,\) vs network \(4,\)"):
        load_weights(_tiny_net(), p)


def test_wrapped_and_dataparallel_state_dicts_load(tmp_path: Path) -> None:
    import torch

    from medseg.models.weights import load_weights

    src = _tiny_net()
    p = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, p)
    net = load_weights(_tiny_net(), p)
    for k, v in src.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    torch.save([1, 2, 3], p)
    with pytest.raises(WeightsError, match="expected a state dict"):
        load_weights(_tiny_net(), p)
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_weights(_tiny_net(), p)


def test_torchscript_weights_load_as_a_module(tmp_path: Path) -> None:
    import torch

    from medseg.files import sha256_file
    from medseg.models.weights import is_torchscript, load_weights

    net = _tiny_net()
    p = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 1, 16, 16, 16)), str(p))
    assert is_torchscript(p) and not is_torchscript(write_card(tmp_path / "c").parent / "tiny.pt")
    module = load_weights(None, p, sha256=sha256_file(p))
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), net(x).numpy(), atol=1e-6)


# ---- registry --------------------------------------------------------------------------------------------
def test_shipped_ct_basic_card_is_listed() -> None:
    listing = list_models()
    card = {c.name: c for c in listing.cards}["ct-basic"]
    assert card.kind == "classical" and card.function == "ct_basic" and card.origin == "shipped"
    assert card.source == shipped_dir() / "ct-basic.yaml"
    from medseg.classical import CT_BASIC_LABELS

    assert card.labels == CT_BASIC_LABELS


def test_user_folder_cards_are_found_by_name_and_broken_ones_reported(tmp_path: Path) -> None:
    write_card(tmp_path / "models")
    (tmp_path / "models" / "broken.yaml").write_text("name: broken\nnetwork: {name: Unet3000}\nlabels: {1: a}\n")
    listing = list_models(models_dirs=[tmp_path / "models"])
    assert [c.name for c in listing.cards][:1] == ["tiny-ct"]
    assert listing.cards[0].origin == "user"
    assert len(listing.problems) == 1 and "broken.yaml" in listing.problems[0]
    card = find_model("tiny-ct", models_dirs=[tmp_path / "models"])
    assert card.weights is not None and card.weights.path == tmp_path / "models" / "tiny.pt"
    with pytest.raises(ModelNotFoundError, match="No model named 'tiny-cd' \\(did you mean 'tiny-ct'"):
        find_model("tiny-cd", models_dirs=[tmp_path / "models"])
    with pytest.raises(ModelNotFoundError, match="--models-dir must be an existing folder"):
        list_models(models_dirs=[tmp_path / "nope"])


def test_weights_file_alone_is_not_a_model(tmp_path: Path) -> None:
    write_card(tmp_path)
    with pytest.raises(ModelNotFoundError, match="tiny.pt: not a model card. A weights file alone"):
        find_model(tmp_path / "tiny.pt")


def test_shipped_weights_are_found_next_to_shipped_cards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A later issue ships phantom-abdomen-ct weights beside its card: the card's relative path must resolve there."""
    from medseg.inference import Segmenter
    from medseg.models import registry

    fake_shipped = tmp_path / "shipped"
    write_card(fake_shipped, name="phantom-abdomen-ct")
    monkeypatch.setattr(registry, "shipped_dir", lambda: fake_shipped)
    card = find_model("phantom-abdomen-ct")
    assert card.origin == "shipped" and card.weights.path == fake_shipped / "tiny.pt"
    assert Segmenter(card).card.name == "phantom-abdomen-ct"  # sha256 checked and weights loaded
