"""PACS in and out against a real Orthanc (Debian's packages) in a private network namespace.

The module enters a network namespace of its own (``tests/orthanc_server.py``) and starts one Orthanc for all its
tests; each test wipes it first. Skipped, with the reason, where Orthanc is not installed or the machine does not
allow a network namespace.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import orthanc_server as osrv
import pytest
from pacs_fixtures import (  # the fixtures (orthanc, pacs, phantoms) come through tests/conftest.py
    CRED,
    ENV,
    TOTALSEG_CT,
    _check_pushed_segs,
    _local_folder,
    _study_uid,
    _upload,
)
from typer.testing import CliRunner

from medseg.cli import app
from medseg.errors import WorkflowError
from medseg.manifest import make_manifest
from medseg.pacs import (
    Credentials,
    PacsAuthError,
    PacsConnectionError,
    PacsPushError,
    PacsSink,
    PacsSource,
    SeriesInfo,
    SeriesRules,
    case_id_for_study,
    open_endpoints,
    parse_query,
    resolve_credentials,
    store_files,
    watch,
)
from medseg.workflow import OutputOptions, RunOptions, run_batch

runner = CliRunner()


# ---- no server needed ------------------------------------------------------------------------------------------
def test_case_ids_are_a_hash_of_the_study_uid_and_hold_no_uid() -> None:
    cid = case_id_for_study("1.2.840.113619.2.55.3")
    assert cid == case_id_for_study(" 1.2.840.113619.2.55.3 ") and cid.startswith("pacs-") and len(cid) == 21
    assert "113619" not in cid and cid != case_id_for_study("1.2.840.113619.2.55.4")


def test_query_and_series_rules_parse_and_name_what_is_wrong() -> None:
    assert parse_query(["ModalitiesInStudy=CT", "StudyDate=20240101-20241231"]) == {
        "ModalitiesInStudy": "CT", "StudyDate": "20240101-20241231"}
    with pytest.raises(WorkflowError, match="'ModalityInStudy' is not a DICOM keyword"):
        parse_query(["ModalityInStudy=CT"])
    with pytest.raises(WorkflowError, match="expected Keyword=value"):
        parse_query(["CT"])
    rules = SeriesRules.parse(["modality=CT", "description=body", "orientation=axial", "thickness=1-5"])
    ok = SeriesInfo("1", "CT", "CT Body 3.0", 2, 20, "axial", 3.0)
    assert rules.reason_against(ok) is None
    assert "modality MR" in str(rules.reason_against(SeriesInfo("1", "MR", "body", 2, 20, "axial", 3.0)))
    assert "orientation coronal" in str(rules.reason_against(SeriesInfo("1", "CT", "body", 2, 20, "coronal", 3.0)))
    assert "thickness 0.6 mm" in str(rules.reason_against(SeriesInfo("1", "CT", "body", 2, 20, "axial", 0.6)))
    assert "does not match" in str(rules.reason_against(SeriesInfo("1", "CT", "head", 2, 20, "axial", 3.0)))
    with pytest.raises(WorkflowError, match="unknown rule 'kernel'"):
        SeriesRules.parse(["kernel=B30f"])


def test_credentials_from_env_token_or_an_owner_only_file(tmp_path: Path) -> None:
    assert resolve_credentials(environ=ENV) == CRED
    assert resolve_credentials(environ={"MEDSEG_PACS_TOKEN": "tok"}).kind == "token"
    assert "s3cret" not in repr(resolve_credentials(environ=ENV))
    with pytest.raises(PacsAuthError, match="only one of MEDSEG_PACS_USER and MEDSEG_PACS_PASSWORD"):
        resolve_credentials(environ={"MEDSEG_PACS_USER": "u"})
    f = tmp_path / "pacs.cred"
    f.write_text("alice:pa:ss\n")
    f.chmod(0o644)
    with pytest.raises(PacsAuthError, match=r"can be read by others \(mode -rw-r--r--\).*chmod 600"):
        resolve_credentials(f, environ={})
    f.chmod(0o600)
    assert resolve_credentials(f, environ=ENV) == Credentials("alice", "pa:ss")


def test_a_password_in_the_url_is_refused() -> None:
    with pytest.raises(PacsAuthError, match="credentials do not go in the URL"):
        PacsSource("dicomweb+http://bob:secret@pacs.example/dicom-web")
    with pytest.raises(WorkflowError, match="not a PACS URL"):
        open_endpoints("/data/studies", cache_dir="/tmp/c", query=["ModalitiesInStudy=CT"])
    with pytest.raises(WorkflowError, match="give --push-to URL"):
        open_endpoints("/data/studies", cache_dir="/tmp/c", push=True)


# ---- acceptance ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dicomweb_batch_pushes_one_seg_per_study_equal_to_the_local_run(pacs: osrv.Orthanc, phantoms: Path,
                                                                       tmp_path: Path) -> None:
    """STOW-RS in, `medseg batch dicomweb+http://... --push` (QIDO, WADO-RS, STOW-RS), rerun pushes nothing."""
    local = _local_folder(tmp_path, phantoms, [21], dcmqi=True)
    for study in local.iterdir():
        _upload(pacs, study)
    out = tmp_path / "out"
    args = ["batch", pacs.dicomweb, "--model", "phantom-abdomen-ct", "--device", "cpu", "--torch-threads", "1",
            "--out", str(out), "--push", "--query", "ModalitiesInStudy=CT", "--quiet", "--no-report"]
    result = runner.invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    local_out = tmp_path / "local-out"
    local_run = run_batch(make_manifest(local, checksums=False), local_out, RunOptions(model="phantom-abdomen-ct", device="cpu", torch_threads=1,
                                                outputs=OutputOptions(report=False)))
    assert local_run.exit_status == 0
    _check_pushed_segs(pacs, out, local, local_out)
    run = json.loads((out / "run.json").read_text())
    assert run["pacs"] == {"source": pacs.dicomweb, "sink": pacs.dicomweb}
    assert osrv.PASSWORD not in (out / "run.json").read_text()
    assert all(c["timings_s"]["fetch"] > 0 and c["timings_s"]["push"] > 0 for c in run["cases"])
    # a rerun finds every case done and pushed: nothing is pushed again
    before = pacs.instance_count()
    again = runner.invoke(app, args, env=ENV)
    assert again.exit_code == 0, again.output
    assert pacs.instance_count() == before and all(len(v) == 1 for v in pacs.seg_series().values())
    assert [c["state"] for c in json.loads((out / "run.json").read_text())["cases"]] == ["skipped", "skipped"]


@pytest.mark.slow
def test_dimse_c_find_c_get_in_and_c_store_out(pacs: osrv.Orthanc, phantoms: Path, tmp_path: Path) -> None:
    """The DICOMweb acceptance through DIMSE: C-FIND + C-GET in, C-STORE out, same model, same kinds of study."""
    local = _local_folder(tmp_path, phantoms, [22], dcmqi=True)
    for study in local.iterdir():
        _upload(pacs, study)
    out = tmp_path / "out"
    args = ["batch", pacs.dimse, "--ae-title", osrv.OUR_AET, "--model", "phantom-abdomen-ct", "--device", "cpu",
            "--torch-threads", "1", "--out", str(out), "--push", "--quiet", "--no-report",
            "--query", "ModalitiesInStudy=CT", "--series", "modality=CT", "--series", "orientation=axial"]
    result = runner.invoke(app, args, env={})
    assert result.exit_code == 0, result.output
    local_out = tmp_path / "local-out"
    assert run_batch(make_manifest(local, checksums=False), local_out,
                     RunOptions(model="phantom-abdomen-ct", device="cpu", torch_threads=1,
                                outputs=OutputOptions(report=False))).exit_status == 0
    _check_pushed_segs(pacs, out, local, local_out)
    run = json.loads((out / "run.json").read_text())
    assert run["pacs"] == {"source": pacs.dimse, "sink": pacs.dimse}
    record = json.loads((out / case_id_for_study(_study_uid(local / "p22")) / "status.json").read_text())
    assert any("dimse://ORTHANC@127.0.0.1:4242 and verified" in n for n in record["notes"])
    # a rerun finds every case done and pushed: nothing is stored again
    before = pacs.instance_count()
    again = runner.invoke(app, args, env={})
    assert again.exit_code == 0, again.output
    assert pacs.instance_count() == before and all(len(v) == 1 for v in pacs.seg_series().values())


def test_wrong_password_is_a_clear_error_and_exit_2(pacs: osrv.Orthanc, tmp_path: Path) -> None:
    result = runner.invoke(app, ["batch", pacs.dicomweb, "--model", "ct-basic", "--out", str(tmp_path / "o"),
                                 "--push"], env={**ENV, "MEDSEG_PACS_PASSWORD": "wrong"})
    assert result.exit_code == 2, result.output
    assert "refused our credentials" in result.output and "HTTP 401" in result.output
    assert "Traceback" not in result.output and "wrong" not in result.output
    cred = tmp_path / "cred"
    cred.write_text(f"{osrv.USER}:{osrv.PASSWORD}\n")
    cred.chmod(0o640)
    result = runner.invoke(app, ["batch", pacs.dicomweb, "--model", "ct-basic", "--out", str(tmp_path / "o"),
                                 "--credentials", str(cred)], env={})
    assert result.exit_code == 2 and "can be read by others" in result.output, result.output


def test_blank_uid_series_is_refused_with_the_missing_uids_named_and_nothing_stored(pacs: osrv.Orthanc) -> None:
    files = sorted(TOTALSEG_CT.iterdir())
    with pytest.raises(PacsPushError, match=r"nothing was sent: SOPClassUID blank or missing in 20 of 20 file\(s\).*"
                                            r"SOPInstanceUID blank.*StudyInstanceUID blank.*SeriesInstanceUID blank"):
        store_files(PacsSink(pacs.dicomweb, CRED), files)
    assert pacs.instance_count() == 0
    # sent anyway, Orthanc answers HTTP 200 and drops them: the answer's verification catches it
    with pytest.raises(PacsPushError, match="references 0 of the 20 instance"):
        store_files(PacsSink(pacs.dicomweb, CRED), files, check_uids=False)
    assert pacs.instance_count() == 0


def test_server_stopped_mid_run_records_failed_cases_and_a_rerun_completes_them(pacs: osrv.Orthanc, phantoms: Path,
                                                                               tmp_path: Path) -> None:
    for seed in (21, 22, 23):
        _upload(pacs, phantoms / f"p{seed}" / "ct")
    source = PacsSource(pacs.dicomweb, cache_dir=tmp_path / "cache", credentials=CRED, timeout_s=5, attempts=1)
    sink = PacsSink(pacs.dicomweb, CRED, timeout_s=5, attempts=1)
    options = RunOptions(model="ct-basic", device="cpu", prefetch=False,
                         outputs=OutputOptions(dicom_seg=True, report=False))
    out = tmp_path / "out"

    def stop_after_first(ev: object) -> None:
        if getattr(ev, "kind", "") == "case" and getattr(ev, "done", 0) == 1:
            pacs.stop()

    first = run_batch(source.manifest(), out, options, source=source, sink=sink, progress=stop_after_first)
    states = [r.state for r in first.records]
    assert states.count("done") == 1 and states.count("failed") == 2, states
    assert all("PacsConnectionError" == r.error_type and "cannot connect" in (r.error or "")
               for r in first.failed)
    pacs.start()
    second = run_batch(source.manifest(), out, options, source=source, sink=sink)
    assert sorted(r.state for r in second.records) == ["done", "done", "skipped"]
    segs = pacs.seg_series()
    assert len(segs) == 3 and all(len(v) == 1 for v in segs.values()), segs


def test_watch_runs_a_new_study_once_and_a_restart_does_not_redo_it(pacs: osrv.Orthanc, phantoms: Path,
                                                                   tmp_path: Path) -> None:
    source = PacsSource(pacs.dicomweb, cache_dir=tmp_path / "cache", credentials=CRED)
    sink = PacsSink(pacs.dicomweb, CRED)
    options = RunOptions(model="ct-basic", device="cpu", outputs=OutputOptions(dicom_seg=True, report=False))
    out = tmp_path / "out"
    stop = threading.Event()
    polls: list[int] = []
    done = threading.Event()

    def on_poll(n: int, results: list) -> None:
        polls.append(n)
        if any(r.count("done") for r in results):
            done.set()
            stop.set()

    thread = threading.Thread(target=watch, args=(source, out, options), daemon=True,
                              kwargs={"sink": sink, "interval_s": 0.3, "stable_s": 0.5, "stop": stop,
                                      "on_poll": on_poll})
    thread.start()
    try:
        while not polls:  # watch is polling an empty PACS; now a study arrives
            threading.Event().wait(0.05)
        _upload(pacs, phantoms / "p23" / "ct")
        assert done.wait(120), "watch did not run the new study"
    finally:
        stop.set()
        thread.join(30)
    study_uid = _study_uid(phantoms / "p23" / "ct")
    assert [len(v) for v in pacs.seg_series().values()] == [1]
    state = json.loads((out / "watch.json").read_text())["studies"][case_id_for_study(study_uid)]
    assert state["done"] is True
    # restarted: two polls, nothing run, nothing pushed
    before = pacs.instance_count()
    assert watch(source, out, options, sink=sink, interval_s=0.1, stable_s=0.0, max_polls=2) == []
    assert pacs.instance_count() == before


def test_a_study_deleted_after_the_query_fails_its_case_only(pacs: osrv.Orthanc, phantoms: Path,
                                                              tmp_path: Path) -> None:
    _upload(pacs, phantoms / "p21" / "ct")
    source = PacsSource(pacs.dicomweb, cache_dir=tmp_path / "cache", credentials=CRED)
    manifest = source.manifest()
    pacs.wipe()
    result = run_batch(manifest, tmp_path / "out", RunOptions(model="ct-basic", device="cpu",
                                                             outputs=OutputOptions(dicom_seg=True, report=False)),
                       source=source)
    [record] = result.records
    assert record.state == "failed" and "no series of the study" in (record.error or ""), record.error
    assert not list((tmp_path / "cache").glob(".*partial"))


def test_unreachable_pacs_is_a_clear_error(tmp_path: Path) -> None:
    source = PacsSource("dicomweb+http://127.0.0.1:9/dicom-web", cache_dir=tmp_path, timeout_s=2, attempts=2)
    with pytest.raises(PacsConnectionError, match="cannot connect to the PACS"):
        source.manifest()


def test_watch_cli_polls_and_a_wrong_password_exits_2(pacs: osrv.Orthanc, tmp_path: Path) -> None:
    args = ["watch", pacs.dicomweb, "--model", "ct-basic", "--out", str(tmp_path / "w"), "--push", "--interval", "0",
            "--max-polls", "2"]
    result = runner.invoke(app, args, env={**ENV, "MEDSEG_PACS_PASSWORD": "wrong"})
    assert result.exit_code == 2 and "refused our credentials" in result.output, result.output
    result = runner.invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "w" / "watch.json").read_text()) == {"studies": {}}
    result = runner.invoke(app, ["watch", str(tmp_path), "--model", "ct-basic", "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "medseg watch polls a PACS" in result.output, result.output


def test_a_folder_batch_pushes_to_a_pacs_with_push_to_and_a_done_case_is_pushed_without_resegmenting(
        pacs: osrv.Orthanc, phantoms: Path, tmp_path: Path) -> None:
    local = _local_folder(tmp_path, phantoms, [21], dcmqi=False)
    _upload(pacs, local / "p21")
    out = tmp_path / "out"
    base = ["batch", str(local), "--model", "ct-basic", "--device", "cpu", "--out", str(out), "--quiet", "--no-report",
            "--dicom-seg"]
    assert runner.invoke(app, base, env=ENV).exit_code == 0
    assert pacs.seg_series() == {_study_uid(local / "p21"): []}
    result = runner.invoke(app, [*base, "--push-to", pacs.dicomweb], env=ENV)
    assert result.exit_code == 0, result.output
    [seg] = pacs.seg_files()[_study_uid(local / "p21")]
    assert seg == (out / "p21" / "segmentation.dcm").read_bytes()  # the SEG of the first run, not a new one
    assert json.loads((out / "run.json").read_text())["cases"][0]["state"] == "skipped"
