"""The batch runner: bad cases recorded, resumable after SIGKILL, Dask byte-identical, no PHI, recipes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medseg.cli import app
from medseg.errors import WorkflowError
from medseg.files import sha256_path
from medseg.manifest import Manifest, make_manifest
from medseg.workflow import OutputOptions, RunOptions, load_workflow, parse_workflow, run_batch

ROOT = Path(__file__).resolve().parents[1]
MEDSEG = [str(Path(sys.executable).with_name("medseg"))]
runner = CliRunner()

# Patient data put into the phantom studies; none of it may appear outside DICOM outputs.
PHI = {"PatientName": "DOE^JANE^Q", "PatientID": "MRN-8675309", "PatientBirthDate": "19610412"}
SHAPE = (40, 36, 24)


def _phantom_studies(folder: Path, seeds: list[int], *, phi: bool = False) -> Path:
    """DICOM phantom studies ``folder/p<seed>/ct/`` (+ labels.nii.gz), optionally with patient data in them."""
    import pydicom

    from medseg.phantom import make_phantom, write_phantom_study

    for seed in seeds:
        study = write_phantom_study(make_phantom(seed, shape=SHAPE), folder / f"p{seed}")
        if phi:
            for f in sorted(study.image_path.iterdir()):
                ds = pydicom.dcmread(f)
                for key, value in PHI.items():
                    setattr(ds, key, value)
                ds.save_as(f)
    return folder


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _phantom_studies(tmp_path_factory.mktemp("studies"), [11, 12, 13], phi=True)


def _labels(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(out.glob("*/pred.nii.gz"))}


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]


# ---- bad cases ---------------------------------------------------------------------------------------------------
def test_bad_cases_are_recorded_and_the_run_exits_3_with_the_count(studies: Path, tmp_path: Path) -> None:
    """Good cases complete; truncated slice, two series, single 2D slice, missing file and checksum mismatch fail."""
    data = tmp_path / "data"
    shutil.copytree(studies, data)
    # a truncated slice inside a series
    shutil.copytree(data / "p11", data / "truncated")
    victim = sorted((data / "truncated" / "ct").iterdir())[10]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # a folder with two series and none chosen
    (data / "two-series").mkdir()
    for seed in (11, 12):
        for f in (data / f"p{seed}" / "ct").iterdir():
            shutil.copy(f, data / "two-series" / f"{seed}-{f.name}")
    # a single 2D slice
    (data / "slice2d").mkdir()
    shutil.copy(sorted((data / "p11" / "ct").iterdir())[5], data / "slice2d" / "one.dcm")
    cases = [{"case_id": "good-11", "image": "p11/ct", "label": "p11/labels.nii.gz"},
             {"case_id": "good-12", "image": "p12/ct", "image_sha256": sha256_path(data / "p12" / "ct")},
             {"case_id": "truncated", "image": "truncated/ct"},
             {"case_id": "two-series", "image": "two-series"},
             {"case_id": "slice2d", "image": "slice2d"},
             {"case_id": "missing", "image": "p99/ct"},
             {"case_id": "badsum", "image": "p13/ct", "image_sha256": "0" * 64}]
    manifest = data / "manifest.json"
    manifest.write_text(json.dumps({"root": ".", "cases": cases}))
    out = tmp_path / "out"
    res = runner.invoke(app, ["batch", str(manifest), "--model", "ct-basic", "--out", str(out), "--quiet"])
    assert res.exit_code == 3, res.output
    assert "5 case(s) failed" in res.output
    records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/status.json")}
    assert {k: v["state"] for k, v in records.items()} == {
        "good-11": "done", "good-12": "done", "truncated": "failed", "two-series": "failed", "slice2d": "failed",
        "missing": "failed", "badsum": "failed"}
    why = {k: v["error"] for k, v in records.items() if v["state"] == "failed"}
    assert "IM00011.dcm" in why["truncated"] and records["truncated"]["error_type"] == "UnreadableFileError"
    assert records["two-series"]["error_type"] == "MultipleSeriesError"
    assert "3D volume" in why["slice2d"] and records["slice2d"]["error_type"] == "NotVolumetricError"
    assert "does not exist" in why["missing"]
    assert "the manifest records 0000" in why["badsum"]
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"total": 7, "done": 2, "failed": 5, "skipped": 0}
    assert (out / "good-11" / "metrics.csv").is_file() and (out / "statistics.csv").is_file()
    from medseg.report import find_cases  # the report reads the runner's layout: the done cases

    assert [c.case_id for c in find_cases(out)] == ["good-11", "good-12"] and (out / "report.html").is_file()
    assert not _partials(out)


# ---- kill and rerun ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(studies: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted in-process-executor run of the shipped network model (1 PyTorch thread), in a subprocess."""
    out = tmp_path_factory.mktemp("reference") / "out"
    subprocess.run([*MEDSEG, "batch", str(studies), "--model", "phantom-abdomen-ct", "--device", "cpu",
                    "--torch-threads", "1", "--out", str(out), "--quiet", "--no-report"], check=True, timeout=600)
    return out


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_identical_labels_and_no_partial_files(studies: Path, reference_run: Path,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [*MEDSEG, "batch", str(studies), "--model", "phantom-abdomen-ct", "--device", "cpu", "--torch-threads", "1",
           "--out", str(out), "--quiet", "--no-report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/status.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name for p in out.glob("*/status.json")}
    assert 1 <= len(done_before) < 3
    assert not (out / "run.json").exists()
    # Nothing partial under a final name: every pred.nii.gz there is complete (loads) even without a record.
    from medseg.io import load_volume

    for p in out.glob("*/pred.nii.gz"):
        assert load_volume(p).shape == SHAPE
    rerun = subprocess.run([*cmd, "--log-json"], capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr
    events = [json.loads(line) for line in rerun.stdout.splitlines()]
    states = {e["case_id"]: e["state"] for e in events if e["event"] == "case"}
    assert {k for k, v in states.items() if v == "skipped"} == done_before
    assert set(states) == {"p11", "p12", "p13"} and set(states.values()) <= {"skipped", "done"}
    assert _labels(out) == _labels(reference_run) and len(_labels(out)) == 3
    assert not _partials(out)


# ---- Dask ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dask_localcluster_matches_in_process_and_survives_a_killed_worker(studies: Path, reference_run: Path,
                                                                          tmp_path: Path) -> None:
    """A real LocalCluster of 2 worker processes; one worker process is SIGKILLed mid-run."""
    from distributed import Client, LocalCluster

    manifest = make_manifest(studies, checksums=False)
    options = RunOptions(model="phantom-abdomen-ct", device="cpu", torch_threads=1,
                         outputs=OutputOptions(report=False), executor="dask")
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit="2GiB") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)  # worker address -> process id
        names = {addr: str(info["name"]) for addr, info in client.scheduler_info()["workers"].items()}
        killed: list[str] = []

        def kill_one_when_the_first_case_is_done() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                done = list(out.glob("*/status.json"))
                if done:
                    first = json.loads(done[0].read_text())["worker"]
                    # SIGKILL the other worker process: it is busy with another case
                    addr = next(a for a, name in names.items() if name != first)
                    os.kill(pids[addr], signal.SIGKILL)
                    killed.append(names[addr])
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_one_when_the_first_case_is_done)
        watcher.start()
        result = run_batch(manifest, out, replace_options(options, scheduler=cluster.scheduler_address))
        watcher.join()
    assert killed, "no worker was killed"
    assert result.exit_status == 0 and [r.state for r in result.records] == ["done"] * 3
    assert _labels(out) == _labels(reference_run)
    assert not _partials(out)
    # Every case ran on a worker of this cluster. Whether the killed worker's case and the last one go to the
    # survivor or to the nanny's restarted worker is a race, so the spread over both is not asserted here.
    assert {r.worker for r in result.records} <= set(names.values()) and killed[0] in names.values()
    assert all(r.model_loads == 1 for r in result.records)  # each worker process loaded the model once
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["done"] == 3 and run["options"]["executor"] == "dask"


def replace_options(options: RunOptions, **changes: object) -> RunOptions:
    from dataclasses import replace

    return replace(options, **changes)  # type: ignore[arg-type]


# ---- privacy ------------------------------------------------------------------------------------------------------
def test_patient_data_appears_in_no_log_record_csv_json_or_report(studies: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    res = runner.invoke(app, ["batch", str(studies), "--model", "ct-basic", "--out", str(out), "--log-json",
                              "--dicom-seg"])
    assert res.exit_code == 0, res.output
    import pydicom

    assert pydicom.dcmread(out / "p11" / "segmentation.dcm").PatientID == PHI["PatientID"]  # SEG: by design
    texts = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".dcm"}
    assert {"run.json", "statistics.csv", "metrics.csv", "report.html", "p11/status.json"} <= set(texts)
    everything = b"\n".join(texts.values()) + res.output.encode() + caplog.text.encode()
    for value in PHI.values():
        for form in {value, value.replace("^", " "), "DOE^JANE", "8675309"}:  # long enough not to occur by chance
            assert form.encode() not in everything, form
    # The positive control: with --include-phi the same values do appear (so the search above can fail).
    out2 = tmp_path / "out2"
    res = runner.invoke(app, ["batch", str(studies), "--model", "ct-basic", "--out", str(out2), "--quiet",
                              "--include-phi", "--no-report"])
    assert res.exit_code == 0, res.output
    assert b"MRN-8675309" in (out2 / "statistics.csv").read_bytes()
    assert json.loads((out2 / "p11" / "status.json").read_text())["phi"]["patient_birth_date"] == "19610412"


# ---- resuming, options, recipes --------------------------------------------------------------------------------------
def test_rerun_skips_done_cases_and_redoes_changed_ones(tmp_path: Path) -> None:
    from medseg.phantom import make_phantom, write_phantom_study

    for seed in (1, 2):
        write_phantom_study(make_phantom(seed, shape=(32, 30, 20)), tmp_path / "in" / f"n{seed}", format="nifti")
    manifest = make_manifest(tmp_path / "in")
    options = RunOptions(model="ct-basic", outputs=OutputOptions(report=False))
    first = run_batch(manifest, tmp_path / "out", options)
    assert [r.state for r in first.records] == ["done", "done"]
    assert [r.state for r in run_batch(manifest, tmp_path / "out", options).records] == ["skipped", "skipped"]
    # an output changed behind the runner's back → that case is redone
    (tmp_path / "out" / "n1" / "stats.csv").write_text("edited")
    assert [r.state for r in run_batch(manifest, tmp_path / "out", options).records] == ["done", "skipped"]
    # other result options → every case is redone
    changed = RunOptions(model="ct-basic", outputs=OutputOptions(report=False, stats=False))
    assert [r.state for r in run_batch(manifest, tmp_path / "out", changed).records] == ["done", "done"]
    assert not (tmp_path / "out" / "n1" / "stats.csv").exists()  # no earlier run's output is left to mislead
    # a case that now fails loses its earlier outputs (the report must not show a stale prediction)
    (tmp_path / "in" / "n2" / "ct.nii.gz").write_bytes(b"broken")
    broken = run_batch(make_manifest(tmp_path / "in", checksums=False), tmp_path / "out", changed)
    assert [r.state for r in broken.records] == ["skipped", "failed"]
    assert sorted(p.name for p in (tmp_path / "out" / "n2").iterdir()) == ["status.json"]
    write_phantom_study(make_phantom(2, shape=(32, 30, 20)), tmp_path / "in" / "n2", format="nifti", overwrite=True)
    # a temporary file a killed writer left is removed when a run starts
    (tmp_path / "out" / "n2" / ".pred.nii.gz.1234abcd.partial.nii.gz").write_bytes(b"half")
    run_batch(manifest, tmp_path / "out", changed)
    assert not _partials(tmp_path / "out")


def test_dicom_seg_for_dicom_inputs_reads_back_as_the_labels(studies: Path, tmp_path: Path) -> None:
    from medseg.io import load_segmentation, load_volume
    from medseg.phantom import make_phantom, write_phantom_study

    write_phantom_study(make_phantom(4, shape=(30, 28, 20)), tmp_path / "nifti" / "n4", format="nifti")
    cases = (*make_manifest(studies, checksums=False).cases[:1], *make_manifest(tmp_path / "nifti").cases)
    manifest = Manifest(cases, Path(os.path.commonpath([studies, tmp_path])))
    options = RunOptions(model="ct-basic", outputs=OutputOptions(dicom_seg=True, seg_type="labelmap", report=False))
    result = run_batch(manifest, tmp_path / "out", options)
    assert result.exit_status == 0
    dicom_case, nifti_case = result.records
    assert "segmentation.dcm" in dicom_case.outputs and "segmentation.dcm" not in nifti_case.outputs
    assert nifti_case.notes == ("no DICOM SEG: the input is not a DICOM series",)
    pred = load_volume(tmp_path / "out" / "p11" / "pred.nii.gz")
    seg = load_segmentation(tmp_path / "out" / "p11" / "segmentation.dcm", reference=pred)
    assert (seg.array == pred.array).all() and seg.labels is not None and pred.labels is not None
    present = {v: name for v, name in pred.labels.names.items() if (pred.array == v).any()}
    assert seg.labels.names == present  # a SEG holds the segments that are there


def test_shipped_workflow_recipes_parse() -> None:
    recipes = sorted((ROOT / "workflows").glob("*.yaml"))
    batch = [p for p in recipes if not p.name.startswith("train-")]
    assert len(batch) >= 2
    from medseg.pacs import is_pacs_url

    for p in batch:
        wf = load_workflow(p)
        if wf.pacs is not None and isinstance(wf.inputs, str):  # a PACS input (workflows/pacs-phantoms.yaml)
            assert is_pacs_url(wf.inputs) and wf.options.outputs.dicom_seg, wf.inputs
        else:
            assert isinstance(wf.inputs, Path) and wf.inputs.exists(), wf.inputs
    assert any(load_workflow(p).pacs is not None for p in batch)
    import yaml

    from medseg.workflow import is_training_recipe

    trains = [p for p in recipes if p.name.startswith("train-")]
    assert trains and all(is_training_recipe(yaml.safe_load(p.read_text())) for p in trains)  # `medseg run` trains
    assert not any(is_training_recipe(yaml.safe_load(p.read_text())) for p in batch)
    wf = load_workflow(ROOT / "workflows" / "evaluate-phantoms.yaml",
                       overrides=["outputs.folder=/tmp/elsewhere", "executor.kind=dask", "inference.fast=true"])
    assert (wf.out_dir, wf.options.executor, wf.options.fast) == (Path("/tmp/elsewhere"), "dask", True)


def test_workflow_recipe_errors_name_the_field(tmp_path: Path) -> None:
    good = {"model": "ct-basic", "inputs": {"folder": "."}}
    with pytest.raises(WorkflowError, match=r"'ouputs' \(did you mean 'outputs'\?\)"):
        parse_workflow({**good, "ouputs": {}}, source="w.yaml")
    with pytest.raises(WorkflowError, match="w.yaml: field 'inputs' needs exactly one of 'manifest'"):
        parse_workflow({"model": "ct-basic", "inputs": {}}, source="w.yaml")
    with pytest.raises(WorkflowError, match=r"field 'executor.kind': expected one of \['local', 'dask'\]"):
        parse_workflow({**good, "executor": {"kind": "slurm"}}, source="w.yaml")
    with pytest.raises(WorkflowError, match="--set needs key=value"):
        parse_workflow(good, source="w.yaml", overrides=["outputs.folder"])
    (tmp_path / "w.yaml").write_text("model: ct-basic\ninputs: {folder: nowhere}\noutputs: {stats: maybe}\n")
    res = runner.invoke(app, ["run", str(tmp_path / "w.yaml")])
    assert res.exit_code == 2 and "field 'outputs.stats': expected true or false" in res.output
    assert "Traceback" not in res.output


def test_cli_user_errors_print_one_line_and_no_traceback(tmp_path: Path) -> None:
    """`medseg evaluate P R --nsd-tolerance -1` used to print a traceback."""
    from medseg.io import save_volume
    from medseg.phantom import make_phantom

    p = make_phantom(0, shape=(20, 18, 12))
    save_volume(p.labels, tmp_path / "l.nii.gz")
    proc = subprocess.run([*MEDSEG, "evaluate", str(tmp_path / "l.nii.gz"), str(tmp_path / "l.nii.gz"),
                           "--nsd-tolerance", "-1"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nsd_tolerance_mm (--nsd-tolerance) must be a finite number >= 0" in proc.stderr
    res = runner.invoke(app, ["batch", str(tmp_path / "nothing"), "--model", "ct-basic", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "manifest not found" in res.output
    for command in ("batch", "run"):
        assert "Exit status: 0 every case done, 3 finished with failed cases" in " ".join(
            runner.invoke(app, [command, "--help"], terminal_width=200).output.split())


def test_manifest_make_and_check_cli(studies: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(studies, data)
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["manifest", "make", str(data), "--out", str(out)])
    assert res.exit_code == 0 and "3 case(s), 3 with reference labels" in res.output
    m = json.loads(out.read_text())
    assert [c["case_id"] for c in m["cases"]] == ["p11", "p12", "p13"] and all("image_sha256" in c for c in m["cases"])
    assert runner.invoke(app, ["manifest", "check", str(out)]).exit_code == 0
    # break it three ways: every problem is listed, not just the first
    victim = sorted((data / "p12" / "ct").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-100])
    (data / "p13" / "labels.nii.gz").unlink()
    m["cases"].append(dict(m["cases"][0]))
    out.write_text(json.dumps(m))
    res = runner.invoke(app, ["manifest", "check", str(out), "--json"])
    assert res.exit_code == 3
    kinds = sorted((p["case_id"], p["kind"]) for p in json.loads(res.stdout)["problems"])
    assert kinds == [("p11", "duplicate-id"), ("p12", "checksum"), ("p13", "missing-file")]
