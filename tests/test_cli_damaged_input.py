"""Every ``medseg`` command given a damaged input exits 2 with one line on stderr naming the file, no traceback.

The walk covers every registered command (a new command without a case here fails the completeness test).
Damaged inputs: a DICOM series with a truncated slice, a truncated gzip NIfTI, broken YAML recipes and model
cards, a broken JSON manifest, a results folder with a truncated prediction, output folders under a file.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
import typer
from dicom_factory import write_series
from typer.testing import CliRunner

from medseg.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    paths = write_series(root / "ct", 4)
    paths[0].write_bytes(paths[0].read_bytes()[:-50])  # truncated pixel data in the first file
    raw = gzip.decompress((data_dir / "totalseg_example" / "example_seg_mr.nii.gz").read_bytes())
    nifti = root / "labels.nii.gz"
    nifti.write_bytes(gzip.compress(raw)[:4000])
    (root / "recipe.yaml").write_text("model: [unclosed\n  : :\n")
    (root / "cards").mkdir()
    (root / "cards" / "card.yaml").write_text("name: [unclosed\n")
    (root / "manifest.json").write_text('{"cases": [ {"case_id": ')
    (root / "results" / "case1").mkdir(parents=True)
    (root / "results" / "case1" / "pred.nii.gz").write_bytes(gzip.compress(raw)[:4000])
    (root / "a_file").write_text("not a folder")
    return {"root": root, "slice": paths[0], "series": root / "ct", "nifti": nifti, "recipe": root / "recipe.yaml",
            "card": root / "cards" / "card.yaml", "manifest": root / "manifest.json",
            "pred": root / "results" / "case1" / "pred.nii.gz", "file": root / "a_file",
            "good_labels": data_dir / "totalseg_example" / "example_seg_mr.nii.gz"}


# command path -> (arguments, which damaged file the message must name)
CASES: dict[str, list[tuple[list[str], str]]] = {
    "info": [(["{series}"], "slice"), (["{nifti}"], "nifti")],
    "convert": [(["{series}", "{root}/out.nii.gz"], "slice"), (["{nifti}", "{root}/out.nrrd"], "nifti")],
    "segment": [(["{series}", "--model", "phantom-abdomen-ct", "--out", "{root}/seg.nii.gz"], "slice")],
    "train": [(["{recipe}"], "recipe")],
    "demo": [(["{file}"], "file")],
    "phantom": [(["{file}/study"], "file")],
    "evaluate": [(["{nifti}", "{nifti}"], "nifti")],
    "stats": [(["{nifti}"], "nifti"), (["{good_labels}", "--image", "{series}"], "slice")],
    "report": [(["{root}/results", "--out", "{root}/report.html"], "pred")],
    "batch": [(["{manifest}", "--model", "phantom-abdomen-ct", "--out", "{root}/batch"], "manifest")],
    "run": [(["{recipe}"], "recipe")],
    # a credentials file that others can read is refused before any PACS is contacted
    "watch": [(["dicomweb+http://127.0.0.1:9/dicom-web", "--model", "ct-basic", "--out", "{root}/watch",
                "--credentials", "{file}"], "file")],
    "models show": [(["{card}"], "card")],
    "manifest make": [(["{series}", "--out", "{root}/m.json"], "slice")],
    "manifest check": [(["{manifest}"], "manifest")],
}
#: Listing commands that name a damaged entry on stderr, go on listing the rest, and exit 2.
LISTINGS: dict[str, tuple[list[str], str]] = {"models list": (["--models-dir", "{root}/cards"], "card")}


def command_paths(group: Any, prefix: str = "") -> list[str]:
    out = []
    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        out.extend(command_paths(cmd, full + " ") if hasattr(cmd, "commands") else [full])
    return out


def test_every_command_has_a_damaged_input_case():
    commands = set(command_paths(typer.main.get_command(app)))  # type: ignore[arg-type]
    missing = commands - set(CASES) - set(LISTINGS)
    assert not missing, f"add a damaged-input case for: {sorted(missing)}"


def _run(command: str, args: list[str], damaged: dict[str, Path]):
    argv = command.split() + [a.format(**{k: str(v) for k, v in damaged.items()}) for a in args]
    return runner.invoke(app, argv)


@pytest.mark.parametrize(("command", "case"), [(c, i) for c, cases in CASES.items() for i in range(len(cases))])
def test_damaged_input_exits_2_with_one_line_naming_the_file(command, case, damaged):
    args, which = CASES[command][case]
    res = _run(command, args, damaged)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert len(lines) == 1, res.stderr
    assert damaged[which].name in lines[0], lines[0]
    assert "Traceback" not in res.output and "Traceback" not in res.stderr


def test_listing_commands_name_the_damaged_entry_and_go_on(damaged):
    for command, (args, which) in LISTINGS.items():
        res = _run(command, args, damaged)
        assert res.exit_code == 2, res.output
        assert "ct-basic" in res.stdout  # the shipped models are still listed
        assert any(damaged[which].name in line and "skipped" in line for line in res.stderr.splitlines())
        assert "Traceback" not in res.stderr
