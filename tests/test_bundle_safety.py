"""Bundles are code: hostile configs are refused before any of them runs (a marker file must not appear)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import ct_like, write_bundle
from typer.testing import CliRunner

from medseg.cli import app
from medseg.errors import UnsafeBundleError, UnsupportedBundleError
from medseg.models.bundle_safety import check_expression, check_target

runner = CliRunner()

ALLOWED = [
    "[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
    "@bundle_root + '/models/' + @modelname",
    "torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "np.uint8",
    "numpy.float32",
    "@pre_load + @pre_geom + @pre_int",
    "lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))",
    "len(@labels) + 1",
    "list(range(1, 14))",
    "torch.load(@arch_ckpt_path, map_location=torch.device('cpu'))",
    "-(2 ** 3) // 2 if not @flag and @n >= 2 else {'a': (1, 2)}['a'][0:1]",
]
REFUSED = [
    ("__import__('os').system('touch x')", "dunder"),
    ("open('x', 'w').write('1')", "calls the method 'write' of a computed value"),
    ("open('x', 'w')", "calls 'open'"),
    ("@network_def.to(@device)", "calls '@network_def.to'"),
    ("@network_def.__class__", "dunder"),
    ("[i for i in range(3)]", "ListComp"),
    ("exec('import os')", "calls 'exec'"),
    ("torch.load(@p, weights_only=False)", "without weights_only=True"),
    ("getattr(torch, 'load')", "calls 'getattr'"),
    ("lambda x: os.system(x)", "calls 'os.system'"),
    ("torch.hub.load('a', 'b')", "calls 'torch.hub.load'"),
    ("import os", "not a single Python expression"),
    ("monai.utils.set_determinism(0)", "calls 'monai.utils.set_determinism'"),
    ("(lambda: 0).__code__", "dunder"),
    ("(x := 1)", "NamedExpr"),
]


@pytest.mark.parametrize("expr", ALLOWED)
def test_expressions_real_bundles_use_are_allowed(expr: str) -> None:
    check_expression(expr, where="k", source="cfg")


@pytest.mark.parametrize(("expr", "why"), REFUSED)
def test_other_expressions_are_refused_naming_key_and_expression(expr: str, why: str) -> None:
    with pytest.raises(UnsafeBundleError, match=r"cfg: key 'net#k': the expression .* " + why.replace("(", r"\(")
                       .replace(")", r"\)").replace("*", r"\*")):
        check_expression(expr, where="net#k", source="cfg")


def test_targets_only_from_monai_transforms_networks_inferers() -> None:
    assert check_target("Spacingd", where="k", source="c") == "monai.transforms.Spacingd"
    assert check_target("monai.networks.nets.UNet", where="k", source="c") == "monai.networks.nets.UNet"
    assert check_target("SlidingWindowInferer", where="k", source="c") == "monai.inferers.SlidingWindowInferer"
    for bad in ("os.system", "shutil.copyfile", "scripts.net.MyNet", "CheckpointLoader", "download_url",
                "evil.UNet", "TorchVisiond", "$@x"):
        with pytest.raises(UnsafeBundleError, match=r"key 'k#_target_'"):
            check_target(bad, where="k", source="c")


def _hostile(tmp_path: Path, how: str) -> tuple[Path, Path]:
    """A bundle that would create ``marker`` if anything of it ran."""
    bundle = write_bundle(tmp_path / "models" / f"hostile_{how}", "unet")
    marker = tmp_path / f"MARKER_{how}"
    cfg_path = bundle / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    pre = cfg["preprocessing"]["transforms"]
    if how == "import":
        pre[3]["pixdim"] = f"$__import__('pathlib').Path({str(marker)!r}).touch() or [1.5, 1.25, 2.0]"
    elif how == "import_unused":  # in a section medseg never parses: still refused, never run
        cfg["run"] = [f"$__import__('pathlib').Path({str(marker)!r}).touch()"]
    elif how == "target":
        pre.insert(1, {"_target_": "shutil.copyfile", "src": str(cfg_path), "dst": str(marker)})
    elif how == "scripts":
        (bundle / "scripts").mkdir()
        (bundle / "scripts" / "__init__.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
        (bundle / "scripts" / "transforms.py").write_text(
            "from monai.transforms import MapTransform\n\n\n"
            "class Offsetd(MapTransform):\n"
            "    def __call__(self, data):\n"
            "        d = dict(data)\n"
            "        for k in self.keys:\n"
            "            d[k] = d[k] + 0.0\n"
            "        return d\n")
        pre.insert(4, {"_target_": "scripts.transforms.Offsetd", "keys": "image"})
    cfg_path.write_text(json.dumps(cfg))
    return bundle, marker


@pytest.mark.parametrize("how", ["import", "import_unused", "target", "scripts"])
def test_hostile_bundles_refused_by_list_show_segment(tmp_path: Path, how: str) -> None:
    from medseg.io import save_volume

    bundle, marker = _hostile(tmp_path, how)
    scan = save_volume(ct_like(), tmp_path / "case.nii.gz")
    res = runner.invoke(app, ["models", "list", "--models-dir", str(tmp_path / "models"), "--json"])
    assert res.exit_code == 2, res.output  # the rest is listed, the refused bundle named, and the status says so
    listing = json.loads(res.stdout)
    assert "ct-basic" in [m["name"] for m in listing["models"]]
    assert bundle.name not in [m["name"] for m in listing["models"]]
    assert any(bundle.name in p and "trust-bundle-code" in p for p in listing["problems"]), listing["problems"]
    res = runner.invoke(app, ["models", "show", str(bundle)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "error:" in res.output and ("_target_" in res.output or "expression" in res.output)
    res = runner.invoke(app, ["segment", str(scan), "--model", str(bundle), "--out", str(tmp_path / "o.nii.gz")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    if how == "scripts":
        assert "scripts/ package" in res.output
    assert not marker.exists()
    assert not (tmp_path / "o.nii.gz").exists()


def test_trusted_scripts_bundle_runs_under_its_own_module_name(tmp_path: Path) -> None:
    from medseg.inference import Segmenter
    from medseg.io import load_volume, save_volume
    from medseg.models import find_model
    from medseg.models.bundle import scripts_module_name

    bundle, marker = _hostile(tmp_path, "scripts")
    scan = save_volume(ct_like(), tmp_path / "case.nii.gz")
    res = runner.invoke(app, ["segment", str(scan), "--model", str(bundle), "--out", str(tmp_path / "o.nii.gz"),
                              "--trust-bundle-code", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert marker.exists()
    assert scripts_module_name(bundle) in sys.modules and "scripts" not in sys.modules
    ours = load_volume(tmp_path / "o.nii.gz").array
    # The scripts transform adds 0.0: the labels are those of the same bundle without it.
    plain = write_bundle(tmp_path / "plain", "unet")
    expected = Segmenter(find_model(plain), device="cpu").segment(load_volume(scan)).labels.array
    np.testing.assert_array_equal(ours, expected)


def test_interactive_and_multi_input_bundles_refused_clearly(tmp_path: Path) -> None:
    from medseg.models import find_model

    bundle = write_bundle(tmp_path / "deepedit_like", "unet")
    cfg_path = bundle / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["preprocessing"]["transforms"].insert(2, {"_target_": "AddGuidanceFromPointsDeepEditd", "ref_image": "image",
                                                  "guidance": "guidance", "label_names": {"spleen": 1}})
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedBundleError, match="interactive or prompted bundle.*AddGuidanceFromPoints"):
        find_model(bundle)
    bundle = write_bundle(tmp_path / "two_inputs", "unet")
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["inputs"]["label_prompt"] = {"type": "array"}
    meta_path.write_text(json.dumps(meta))
    res = runner.invoke(app, ["models", "show", str(bundle)])
    assert res.exit_code == 2 and "takes 2 inputs (image, label_prompt)" in res.output
    assert "Traceback" not in res.output


def test_models_show_prints_what_medseg_runs(tmp_path: Path) -> None:
    from medseg.models.weights import sha256_file

    bundle = write_bundle(tmp_path / "wb", "argmax_first")
    res = runner.invoke(app, ["models", "show", str(bundle)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["source"] == str(bundle.resolve()) and info["licence"].startswith("Apache-2.0")
    assert info["versions"]["monai_version (bundle)"] == "1.6.1"
    assert info["labels"][0]["name"] == "spleen" and info["channel_names"] == ["image"]
    assert info["weights"]["file"].endswith("model_lowres.pt")
    assert info["weights"]["sha256"] == sha256_file(bundle / "models" / "model_lowres.pt")
    runs = " ".join(info["medseg_runs"]["runs"])
    assert "Invertd: replaced" in runs and "AsDiscreted" in runs and "padding" not in info["medseg_runs"]
    skipped = " ".join(info["medseg_runs"]["does_not_run"])
    assert "LoadImaged" in skipped and "SaveImaged" in skipped and "evaluator" in skipped


def test_dints_arch_file_loads_weights_only_with_numpy_allowed(tmp_path: Path) -> None:
    """DiNTS' architecture file holds numpy arrays; the config loads it with ``$torch.load(..., map_location=
    torch.device('cuda'))``. Through medseg's checked config it loads weights-only with numpy's types allowed, on
    the CPU; a file holding another pickled object is still refused."""
    import pickle

    import torch

    from medseg.models.bundle import bundle_parser
    from medseg.models.bundle_safety import select_config

    arch = tmp_path / "search_code.pt"
    torch.save({"node_a": np.ones((3, 2)), "arch_code_a": np.array([1, 0]), "code_c": np.int64(3)}, arch)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(arch)  # what plain torch.load says
    raw = {"arch_ckpt_path": str(arch),
           "arch_ckpt": "$torch.load(@arch_ckpt_path, map_location=torch.device('cuda'))",
           "node_a": "$torch.from_numpy(@arch_ckpt['node_a'])"}
    safe = select_config(raw, ["node_a"], source="cfg")
    node_a = bundle_parser(safe.config).get_parsed_content("node_a")
    assert isinstance(node_a, torch.Tensor) and node_a.shape == (3, 2)
    evil = tmp_path / "evil.pt"
    torch.save({"x": Path("/tmp")}, evil)
    raw["arch_ckpt_path"] = str(evil)
    with pytest.raises(RuntimeError, match="Failed to evaluate") as info:
        bundle_parser(select_config(raw, ["node_a"], source="cfg").config).get_parsed_content("node_a")
    assert "Weights only load failed" in str(info.value.__cause__)


def test_listing_evaluates_nothing(tmp_path: Path) -> None:
    """An allowed expression that would fail if evaluated (1/0) does not disturb listing or showing the card."""
    from medseg.models import list_models

    bundle = write_bundle(tmp_path / "models" / "lazy", "unet")
    cfg_path = bundle / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["preprocessing"]["transforms"][3]["pixdim"] = "$[1 / 0, 1.0, 1.0]"
    cfg_path.write_text(json.dumps(cfg))
    listing = list_models(models_dirs=[tmp_path / "models"])
    assert "lazy" in [c.name for c in listing.cards] and not listing.problems
    from medseg.errors import ModelCardError
    from medseg.inference import Segmenter

    with pytest.raises(ModelCardError, match="cannot build 'preprocessing'.*ZeroDivisionError"):
        Segmenter(bundle, device="cpu")


def test_batch_runner_refuses_then_trusts_the_scripts_bundle(tmp_path: Path) -> None:
    """--trust-bundle-code reaches the batch runner too."""
    from medseg.io import save_volume

    bundle, marker = _hostile(tmp_path, "scripts")
    cases = tmp_path / "cases"
    cases.mkdir()
    save_volume(ct_like(), cases / "case1.nii.gz")
    res = runner.invoke(app, ["batch", str(cases), "--model", str(bundle), "--out", str(tmp_path / "out"),
                              "--device", "cpu", "--quiet", "--no-report", "--no-stats"])
    assert res.exit_code != 0 and "trust-bundle-code" in res.output and not marker.exists()
    res = runner.invoke(app, ["batch", str(cases), "--model", str(bundle), "--out", str(tmp_path / "out2"),
                              "--device", "cpu", "--quiet", "--no-report", "--no-stats", "--trust-bundle-code"])
    assert res.exit_code == 0, res.output
    assert marker.exists() and list((tmp_path / "out2").rglob("pred.nii.gz"))
