"""Segmenter: sliding window exactness, devices, options, modality checks, classical cards, the API and the CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, oblique_affine

from medseg import Volume
from medseg.errors import (
    ChannelCountError,
    ModalityMismatchError,
    ModelCardError,
    NotVolumetricError,
    WeightsError,
)
from medseg.models import parse_card

torch = pytest.importorskip("torch")


def card(**changes):
    data = {
        "name": "analytic", "modality": "CT",
        "network": {"name": "UNet", "kwargs": {}},
        "labels": [{"value": 1, "name": "a"}],
        "preprocessing": {"orientation": "RAS", "intensity": {"kind": "none"}},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.5, "blending": "gaussian", "sw_batch_size": 3},
    }
    data.update(changes)
    return parse_card(data)


def identity(x):
    return torch.cat([torch.zeros_like(x), x], dim=1)


def odd(shape=(17, 13, 9), seed=0):
    rng = np.random.default_rng(seed)
    return Volume(rng.normal(size=shape).astype(np.float32), oblique_affine(), modality="CT")


@pytest.mark.parametrize("blending", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(17, 13, 9), (5, 23, 8), (8, 8, 8)])
def test_sliding_window_with_identity_predictor_is_exact(blending, shape) -> None:
    from medseg.inference import Segmenter

    vol = odd(shape)
    seg = Segmenter(card(), network=identity, blending=blending).segment(vol, probabilities=True)
    assert seg.labels.array.shape == shape and seg.labels.array.dtype == np.uint8
    np.testing.assert_array_equal(seg.labels.affine, vol.affine)
    np.testing.assert_allclose(seg.probabilities.array[..., 1], 1 / (1 + np.exp(-vol.array)), atol=1e-6)
    np.testing.assert_array_equal(seg.labels.array, (vol.array > 0).astype(np.uint8))
    assert seg.stats["windows"] > 1 or shape == (8, 8, 8)


def test_fixed_linear_map_over_three_classes_on_anisotropic_grid() -> None:
    """A fixed 1×1×1 linear map: labels = argmax of (0, 2x - 1, -3x - 1) at every voxel, after resampling."""
    from medseg.inference import Segmenter

    affine = oblique_affine(spacing=(0.7, 1.3, 2.9))
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in (17, 13, 9)], indexing="ij"), -1).astype(float)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    raw = xyz @ np.array([0.08, -0.05, 0.04])
    ramp = (3 * (raw - raw.min()) / (raw.max() - raw.min()) - 1.5).astype(np.float32)  # still linear in mm
    vol = Volume(ramp, affine, modality="CT")
    c = card(labels=[{"value": 2, "name": "up"}, {"value": 5, "name": "down"}],
             preprocessing={"orientation": "LPS", "spacing_mm": [1.0, 0.8, 1.9], "intensity": {"kind": "none"}})
    weights = torch.tensor([0.0, 2.0, -3.0]).view(1, 3, 1, 1, 1)
    bias = torch.tensor([0.0, -1.0, -1.0]).view(1, 3, 1, 1, 1)
    seg = Segmenter(c, network=lambda x: x * weights + bias).segment(vol)
    logits = np.stack([np.zeros_like(ramp), 2 * ramp - 1, -3 * ramp - 1], -1)
    expected = np.array([0, 2, 5])[logits.argmax(-1)]
    top2 = np.sort(logits, -1)
    clear = (top2[..., -1] - top2[..., -2]) > 0.02
    core = np.zeros(ramp.shape, bool)
    core[2:-2, 2:-2, 2:-2] = True
    np.testing.assert_array_equal(seg.labels.array[clear & core], expected[clear & core])
    assert set(np.unique(seg.labels.array[core])) == {0, 2, 5}


def test_tta_with_flip_equivariant_predictor_changes_nothing() -> None:
    from medseg.inference import Segmenter

    vol = odd()
    plain = Segmenter(card(), network=identity).segment(vol, probabilities=True)
    tta = Segmenter(card(), network=identity, tta=True).segment(vol, probabilities=True)
    np.testing.assert_allclose(tta.probabilities.array, plain.probabilities.array, atol=1e-6)
    # A predictor that is not flip-equivariant is averaged over the 8 flips.
    shift = lambda x: torch.cat([torch.zeros_like(x), torch.roll(x, 1, dims=2)], dim=1)
    a = Segmenter(card(), network=shift).segment(vol, probabilities=True).probabilities.array
    b = Segmenter(card(), network=shift, tta=True).segment(vol, probabilities=True).probabilities.array
    assert np.abs(a - b).max() > 1e-3


def _unet_card(tmp_path: Path, **changes):
    from test_models import write_card

    from medseg.models import load_card

    return load_card(write_card(tmp_path, **changes))


def _body_ct(shape=(48, 40, 30)) -> Volume:
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    r = np.sqrt((ijk[..., :2] ** 2).sum(-1))
    arr = np.where(r < 0.3, 40.0, -1000.0) + np.where(np.abs(ijk).sum(-1) < 0.35, 100.0, 0.0)
    arr += np.random.default_rng(0).normal(0, 5, shape)
    return Volume(arr.astype(np.int16), oblique_affine(spacing=(1.4, 1.5, 2.0)), modality="CT")


def test_skip_empty_windows_gives_identical_labels_and_skips(tmp_path: Path) -> None:
    from medseg.inference import Segmenter

    c = _unet_card(tmp_path, inference={"patch_size": [16, 16, 16], "overlap": 0.25, "blending": "gaussian"},
                   postprocessing={})
    vol = _body_ct()
    full = Segmenter(c, device="cpu").segment(vol, probabilities=True)
    fast = Segmenter(c, device="cpu", skip_empty=True).segment(vol, probabilities=True)
    assert fast.stats["windows_skipped"] > 0
    assert fast.stats["windows"] + fast.stats["windows_skipped"] == full.stats["windows"]
    np.testing.assert_allclose(fast.probabilities.array, full.probabilities.array, atol=1e-5)
    np.testing.assert_array_equal(fast.labels.array, full.labels.array)


def test_bf16_amp_on_cpu_stays_close(tmp_path: Path) -> None:
    from medseg.inference import Segmenter

    c = _unet_card(tmp_path, inference={"patch_size": [16, 16, 16], "overlap": 0.25}, postprocessing={})
    vol = _body_ct((32, 28, 20))
    a = Segmenter(c, device="cpu").segment(vol).labels.array
    b = Segmenter(c, device="cpu", amp=True).segment(vol).labels.array
    assert (a == b).mean() > 0.95


def test_channels_last_runs_the_same_network(tmp_path: Path) -> None:
    import torch

    from medseg.inference import Segmenter

    c = _unet_card(tmp_path, inference={"patch_size": [16, 16, 16], "overlap": 0.25}, postprocessing={})
    vol = _body_ct((32, 28, 20))
    a = Segmenter(c, device="cpu").segment(vol, probabilities=True)
    seg = Segmenter(c, device="cpu", channels_last=True)
    weights = [p for p in seg._net.parameters() if p.ndim == 5]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights)
    assert not all(p.is_contiguous() for p in weights)  # really another layout
    b = seg.segment(vol, probabilities=True)
    np.testing.assert_allclose(b.probabilities.array, a.probabilities.array, atol=1e-5)
    np.testing.assert_array_equal(b.labels.array, a.labels.array)


def _ball(shape=(40, 36, 30)) -> Volume:
    """A smooth blob (intensity = 1 - r/R) on an oblique, anisotropic grid: the identity predictor's class-1 logit."""
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    r = np.sqrt((ijk**2 * np.array([1.0, 1.3, 0.8])).sum(-1))
    return Volume((0.55 - r).astype(np.float32), oblique_affine(spacing=(0.8, 0.9, 1.3)), modality="CT")


def test_fast_preset_settings_and_the_default_stays_exact() -> None:
    from medseg.inference import InferenceOptions

    preset = InferenceOptions.fast(device="cpu")
    assert preset.amp and preset.skip_empty and preset.sw_batch_size == 2 and preset.resample == "separable"
    assert preset.channels_last and not InferenceOptions().channels_last
    assert preset.inversion == "trilinear"  # nearest-neighbour inversion stays a separate opt-in
    default = InferenceOptions()
    assert default.inversion == "trilinear" and default.resample == "monai" and not default.amp
    assert InferenceOptions.fast(device="cpu", inversion="nearest").inversion == "nearest"
    with pytest.raises(ValueError, match="resample must be 'monai' or 'separable', not 'cubic'"):
        InferenceOptions(resample="cubic")


def test_separable_resample_gives_the_labels_of_monai_resample() -> None:
    from medseg.inference import Segmenter

    c = card(preprocessing={"orientation": "LPS", "spacing_mm": [1.7, 1.5, 2.2], "intensity": {"kind": "none"}})
    vol = _ball()
    a = Segmenter(c, network=identity).segment(vol, probabilities=True)
    b = Segmenter(c, network=identity, resample="separable").segment(vol, probabilities=True)
    np.testing.assert_allclose(b.probabilities.array, a.probabilities.array, atol=1e-5)
    np.testing.assert_array_equal(b.labels.array, a.labels.array)


def test_nearest_inversion_changes_only_boundaries() -> None:
    from medseg.inference import Segmenter

    c = card(preprocessing={"orientation": "LPS", "spacing_mm": [1.7, 1.5, 2.2], "intensity": {"kind": "none"}})
    vol = _ball()
    exact = Segmenter(c, network=identity).segment(vol).labels.array
    near = Segmenter(c, network=identity, inversion="nearest").segment(vol).labels.array
    assert near.shape == vol.shape
    differ = near != exact
    assert 0 < differ.sum() and differ.mean() < 0.02
    x, y = near == 1, exact == 1
    assert 2 * (x & y).sum() / (x.sum() + y.sum()) > 0.9  # a small blob (radius ~8 network voxels): 0.93 here
    # Every changed voxel sits at a class boundary of the exact labels (its 3×3×3 neighbourhood holds both classes).
    from scipy import ndimage

    boundary = ndimage.maximum_filter(exact, size=3) != ndimage.minimum_filter(exact, size=3)
    assert boundary[differ].all()


def test_nearest_inversion_with_probabilities_uses_the_exact_inverse() -> None:
    from medseg.inference import Segmenter

    c = card(preprocessing={"orientation": "LPS", "spacing_mm": [1.7, 1.5, 2.2], "intensity": {"kind": "none"}})
    vol = _ball((20, 18, 15))
    exact = Segmenter(c, network=identity).segment(vol, probabilities=True)
    near = Segmenter(c, network=identity, inversion="nearest").segment(vol, probabilities=True)
    np.testing.assert_array_equal(near.labels.array, exact.labels.array)
    np.testing.assert_allclose(near.probabilities.array, exact.probabilities.array)
    with pytest.raises(ValueError, match="inversion must be 'trilinear' or 'nearest', not 'linear'"):
        Segmenter(c, network=identity, inversion="linear")


def test_segmenter_loads_once_and_segments_many(tmp_path: Path) -> None:
    from medseg.inference import Segmenter

    c = _unet_card(tmp_path, inference={"patch_size": [16, 16, 16]})
    seg = Segmenter(c)
    assert seg.device == "cpu"
    net = seg._net
    for shape in [(20, 18, 10), (11, 25, 9)]:
        out = seg.segment(_body_ct(shape))
        assert out.labels.shape == shape and out.labels.labels == c.labels
    assert seg._net is net


def test_stitching_falls_back_to_the_host_on_cuda_oom(caplog: pytest.LogCaptureFixture) -> None:
    from medseg.inference import stitch_with_fallback

    calls = []

    def run(device):
        calls.append(str(device))
        if torch.device(device).type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="medseg.inference"):
        result, where = stitch_with_fallback(run, torch.device("meta"))
    assert result == "ok" and str(where) == "cpu" and calls == ["meta", "cpu"]
    assert "retrying with stitching on the host" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of memory"):
        stitch_with_fallback(lambda d: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("out of memory")), "cpu")


def test_devices_and_options_are_checked() -> None:
    from medseg.errors import DeviceError
    from medseg.inference import Segmenter, choose_device

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="'cuda' was requested but it is not available here"):
            choose_device("cuda")
        assert choose_device().type in ("cpu", "mps")
    with pytest.raises(DeviceError, match="Unknown device 'gpu0'"):
        choose_device("gpu0")
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['overlapp'\]"):
        Segmenter(card(), network=identity, overlapp=0.5)


def test_bad_inputs(caplog: pytest.LogCaptureFixture) -> None:
    from medseg.inference import Segmenter

    seg = Segmenter(card(), network=identity)
    mr = Volume(np.zeros((9, 9, 9), np.float32), np.eye(4), modality="MR")
    with pytest.raises(ModalityMismatchError, match="is for CT scans but the volume is MR"):
        seg.segment(mr)
    with caplog.at_level(logging.WARNING, logger="medseg.inference"):
        Segmenter(card(modality_check="warn"), network=identity).segment(mr)
    assert "Running anyway" in caplog.text
    with pytest.raises(NotVolumetricError, match="at least 2 voxels along every axis"):
        seg.segment(Volume(np.zeros((32, 32, 1), np.float32), np.eye(4), modality="CT"))
    with pytest.raises(ChannelCountError, match="4D image with 2 volumes"):
        seg.segment(Volume(np.zeros((9, 9, 9, 2), np.float32), np.eye(4), modality="CT"))
    with pytest.raises(WeightsError, match="names no weights file"):
        Segmenter(card())
    wrong = Segmenter(card(), network=lambda x: torch.cat([x, x, x], dim=1))
    with pytest.raises(ModelCardError, match="returned 3 channels but its 1 labels with output 'softmax' need 2"):
        wrong.segment(odd())


def test_uint16_labels_for_large_values() -> None:
    from medseg.inference import Segmenter

    seg = Segmenter(card(labels=[{"value": 300, "name": "big"}]), network=identity).segment(odd())
    assert seg.labels.array.dtype == np.uint16 and set(np.unique(seg.labels.array)) == {0, 300}


# ---- classical cards ---------------------------------------------------------------------------------------
def test_classical_card_runs_ct_basic_on_a_real_scan() -> None:
    from medseg.classical import ct_basic
    from medseg.inference import Segmenter
    from medseg.io import load_volume

    vol = load_volume(DATA / "totalseg_example" / "example_ct_dicom")
    seg = Segmenter("ct-basic").segment(vol)
    direct = ct_basic(vol)
    assert seg.device == "classical" and seg.model == "ct-basic"
    np.testing.assert_array_equal(seg.labels.array, direct.array)
    np.testing.assert_array_equal(seg.labels.affine, vol.affine)
    assert seg.labels.labels.names[1] == "body" and (seg.labels.array == 1).sum() > 1000


def test_classical_card_uses_the_function_of_medseg_classical(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg import classical
    from medseg.inference import Segmenter
    from medseg.labels import LabelTable

    table = LabelTable.from_names({1: "bright"})
    monkeypatch.setattr(classical, "ct_basic", lambda v: v.with_array((v.array > 0).astype(np.uint8), labels=table))
    vol = odd()
    seg = Segmenter("ct-basic").segment(vol)
    np.testing.assert_array_equal(seg.labels.array, vol.array > 0)
    assert seg.labels.labels == table


@pytest.mark.parametrize("function", ["os.system", "__import__", "Volume", "nonexistent"])
def test_classical_card_refuses_other_functions(function: str) -> None:
    from medseg.inference import Segmenter

    c = parse_card({"name": "x", "kind": "classical", "function": function})
    with pytest.raises(ModelCardError, match="is not a function of medseg.classical"):
        Segmenter(c)


# ---- API and CLI -------------------------------------------------------------------------------------------
def test_segment_api_takes_a_path_and_returns_a_segmentation(tmp_path: Path) -> None:
    import medseg
    from medseg.io import save_volume

    c = _unet_card(tmp_path / "m", inference={"patch_size": [16, 16, 16]})
    path = save_volume(_body_ct((20, 18, 12)), tmp_path / "ct.nii.gz")
    result = medseg.segment(path, model=c, probabilities=True, overlap=0.5)
    assert isinstance(result, medseg.Segmentation)
    assert result.labels.shape == (20, 18, 12) and result.probabilities.array.shape == (20, 18, 12, 3)
    np.testing.assert_allclose(result.probabilities.array.sum(-1), 1.0, atol=1e-5)
    summary = result.summary()
    assert [lab["name"] for lab in summary["labels"]] == ["liver", "liver_tumor"]


def test_cli_segment_writes_labels_and_sidecar(tmp_path: Path) -> None:
    import json

    from test_models import write_card
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.io import load_volume, save_volume

    write_card(tmp_path / "models", inference={"patch_size": [16, 16, 16]})
    vol = _body_ct((20, 18, 12))
    src = save_volume(vol, tmp_path / "ct.nrrd")
    runner = CliRunner()
    res = runner.invoke(app, ["segment", str(src), "--model", "tiny-ct", "--models-dir", str(tmp_path / "models"),
                              "--out", str(tmp_path / "seg.mha"), "--overlap", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["model"] == "tiny-ct" and out["device"] == "cpu"
    written = load_volume(tmp_path / "seg.mha")
    assert written.same_grid(vol) and written.labels is not None and written.labels.names[2] == "liver_tumor"
    res = runner.invoke(app, ["models", "list", "--json", "--models-dir", str(tmp_path / "models")])
    assert res.exit_code == 0 and [m["name"] for m in json.loads(res.stdout)["models"]][:2] == ["tiny-ct", "ct-basic"]
    res = runner.invoke(app, ["models", "show", "tiny-ct", "--models-dir", str(tmp_path / "models")])
    assert res.exit_code == 0 and json.loads(res.stdout)["network"]["name"] == "UNet"
    # Bad input: exit 2, one line, no output file.
    mr = save_volume(Volume(np.zeros((8, 8, 8), np.int16), np.eye(4), modality="MR"), tmp_path / "mr.nii.gz")
    res = runner.invoke(app, ["segment", str(tmp_path / "mr.nii.gz"), "--model", "ct-basic", "--out",
                              str(tmp_path / "mr_seg.nii.gz")])
    assert mr.exists()
    assert res.exit_code == 2 and not (tmp_path / "mr_seg.nii.gz").exists()
    res = runner.invoke(app, ["models", "show", "ct-basci"])
    assert res.exit_code == 2 and "did you mean 'ct-basic'" in res.output


@pytest.mark.gpu
def test_cuda_fp16_matches_cpu(tmp_path: Path) -> None:
    from medseg.inference import Segmenter

    c = _unet_card(tmp_path, inference={"patch_size": [16, 16, 16]}, postprocessing={})
    vol = _body_ct()
    cpu = Segmenter(c, device="cpu").segment(vol).labels.array
    gpu = Segmenter(c, device="cuda", amp=True).segment(vol)
    assert gpu.device.startswith("cuda")
    assert (gpu.labels.array == cpu).mean() > 0.99
    host = Segmenter(c, device="cuda", stitch_device="host").segment(vol).labels.array
    assert (host == cpu).mean() > 0.999


def test_import_medseg_stays_free_of_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, medseg; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert medseg.Segmenter.__name__ == 'Segmenter' and callable(medseg.segment); "
            "assert 'torch' not in sys.modules; import medseg.models; medseg.models.list_models(); "
            "assert 'torch' not in sys.modules, 'torch imported by the registry'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_multichannel_card_refuses_a_single_channel_scan() -> None:
    from medseg.inference import Segmenter

    c = card(input_channels=2, channel_names=["t1", "t2"])
    seg = Segmenter(c, network=lambda x: x)
    with pytest.raises(ChannelCountError, match=r"takes 2 input channel\(s\) \(t1, t2\), but got a single-channel"):
        seg.segment(odd())
    two = Volume(np.random.default_rng(0).normal(size=(9, 8, 7, 2)).astype(np.float32), oblique_affine(),
                 modality="CT")
    out = seg.segment(two, probabilities=True)  # channel 0 is background, channel 1 "a": argmax of (x0, x1)
    np.testing.assert_array_equal(out.labels.array, (two.array[..., 1] > two.array[..., 0]).astype(np.uint8))


def test_cli_fast_preset_is_built_for_the_requested_device(tmp_path: Path, monkeypatch) -> None:
    """`--fast --device X` builds the preset for X (windows per call and channels-last depend on the device), and
    the help no longer promises the nearest-neighbour inversion the preset does not use."""
    import torch
    from typer.testing import CliRunner

    from medseg import inference
    from medseg.cli import app
    from medseg.io import save_volume

    asked: list[str | None] = []

    def fake_choose(requested=None):
        asked.append(requested)
        return torch.device("cpu")

    monkeypatch.setattr(inference, "choose_device", fake_choose)
    src = save_volume(_body_ct((20, 18, 12)), tmp_path / "ct.nii.gz")
    runner = CliRunner()
    res = runner.invoke(app, ["segment", str(src), "--model", "ct-basic", "--out", str(tmp_path / "s.nii.gz"),
                              "--fast", "--device", "cuda:1"])
    assert res.exit_code == 0, res.output
    assert asked and asked[0] == "cuda:1"
    import typer

    params = {p.name: p for p in typer.main.get_command(app).commands["segment"].params}  # type: ignore[attr-defined]
    help_text = params["fast"].help
    assert "nearest" not in help_text.lower() and "exact trilinear inversion" in help_text
