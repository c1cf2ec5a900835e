"""C-MOVE retrieval to medseg's own storage SCP, the DICOM SR summary push, and verified pushes, against a real
Orthanc (and, for the verification of a push, a fake STOW-RS endpoint) in a private network namespace.

This module's Orthanc also lets unknown AE titles query and move (``DicomAlwaysAllowFind`` / ``Move``), so that a
C-MOVE whose destination Orthanc does not know can be asked for; the destination ``MEDSEG`` at 127.0.0.1:11112 is
registered by ``tests/orthanc_server.py``. Orthanc and this process share the namespace: Orthanc connects to
127.0.0.1:11112, where the storage SCP of a ``--retrieve move`` run listens.
"""

from __future__ import annotations

import base64
import csv
import json
import socket
import threading
import time
import urllib.request
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar

import orthanc_server as osrv
import pydicom
import pytest
from pacs_fixtures import ENV, _check_pushed_segs, _local_folder, _study_uid, _upload
from typer.testing import CliRunner

from medseg.cli import app
from medseg.io.dicom_sr import SR_NAME
from medseg.manifest import make_manifest
from medseg.pacs import PUSH_RECORD_NAME, PacsError, PacsSink, PacsSource, case_id_for_study
from medseg.workflow import OutputOptions, RunOptions, run_batch

runner = CliRunner()
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def orthanc_options() -> dict[str, Any]:
    return {"extra": {"DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True}}


def _port_free(port: int) -> bool:
    """Nothing listens on ``port`` (a connection is refused, and a listener may bind it)."""
    with socket.socket() as c:
        if c.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def _files_of(server: osrv.Orthanc, modality: str) -> dict[str, list[bytes]]:
    """StudyInstanceUID -> the files of its instances of ``modality``, as Orthanc stores them."""
    out: dict[str, list[bytes]] = {}
    token = base64.b64encode(f"{osrv.USER}:{osrv.PASSWORD}".encode()).decode()
    for sid in server.get("/studies"):
        study = server.get(f"/studies/{sid}")
        files = out.setdefault(study["MainDicomTags"]["StudyInstanceUID"], [])
        for series_id in study["Series"]:
            series = server.get(f"/series/{series_id}")
            if series["MainDicomTags"].get("Modality") != modality:
                continue
            for iid in series["Instances"]:
                req = urllib.request.Request(f"http://127.0.0.1:{osrv.HTTP_PORT}/instances/{iid}/file")
                req.add_header("Authorization", "Basic " + token)
                with urllib.request.urlopen(req, timeout=10) as answer:
                    files.append(answer.read())
    return out


def _check_pushed_srs(server: osrv.Orthanc, out: Path, local: Path) -> None:
    """One SR per study in Orthanc: its volumes (and mean HU) equal the case's stats.csv, it references the pushed
    SEG's SOPInstanceUID and segment numbers, it is in the source's study, and push.json records it verified."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segs, srs = _files_of(server, "SEG"), _files_of(server, "SR")
    for study in sorted(local.iterdir()):
        study_uid = _study_uid(study)
        [seg_raw], [sr_raw] = segs[study_uid], srs[study_uid]
        seg = pydicom.dcmread(BytesIO(seg_raw))
        (out / "pushed-sr.dcm").write_bytes(sr_raw)
        sr = hd.sr.srread(out / "pushed-sr.dcm")
        assert sr.StudyInstanceUID == study_uid and sr.SOPClassUID == SR_CLASS
        assert sr.SeriesInstanceUID not in (seg.SeriesInstanceUID, pydicom.dcmread(
            next(iter(sorted(study.iterdir()))), stop_before_pixels=True).SeriesInstanceUID)
        folder = out / case_id_for_study(study_uid)
        with open(folder / "stats.csv", newline="") as f:
            rows = {int(r["value"]): r for r in csv.DictReader(f)}
        numbers = {int(s.SegmentNumber): int(s.SegmentDescription.split()[-1]) for s in seg.SegmentSequence}
        groups = sr.content.get_volumetric_roi_measurement_groups()
        assert len(groups) == len(numbers) > 0
        seen = set()
        for g in groups:
            ref = g.referenced_segment
            assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
            assert ref.referenced_sop_class_uid == seg.SOPClassUID
            [number] = ref.referenced_segment_numbers
            seen.add(number)
            row = rows[numbers[number]]
            [volume] = g.get_measurements(name=codes.SCT.Volume)
            assert volume.unit.value == "ml" and volume.value == pytest.approx(float(row["volume_ml"]), rel=1e-12)
            [hu] = g.get_measurements(name=codes.DCM.AttenuationCoefficient)
            assert hu.unit.value == "[hnsf'U]"
            assert hu.value == pytest.approx(float(row["intensity_mean"]), rel=1e-12)
        assert seen == set(numbers)
        record = json.loads((folder / PUSH_RECORD_NAME).read_text())
        assert record["sr"]["verified"] and record["sr"]["sop_instance_uids"] == [sr.SOPInstanceUID]
        assert pydicom.dcmread(folder / SR_NAME).SOPInstanceUID == sr.SOPInstanceUID  # the case's own SR


# ---- C-MOVE --------------------------------------------------------------------------------------------------
def test_dimse_c_move_to_our_storage_scp_in_and_c_store_out(pacs: osrv.Orthanc, phantoms: Path,
                                                            tmp_path: Path) -> None:
    """The DIMSE acceptance test with --retrieve move: Orthanc sends the series to our SCP (MEDSEG at
    127.0.0.1:11112, as its DicomModalities say); a SEG per study is pushed by C-STORE with the local run's labels."""
    local = _local_folder(tmp_path, phantoms, [22], dcmqi=False)
    _upload(pacs, local / "p22")
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", pacs.dimse, "--ae-title", osrv.OUR_AET, "--retrieve", "move", "--ae-port",
                                 "11112", "--model", "ct-basic", "--device", "cpu", "--out", str(out), "--push",
                                 "--quiet", "--no-report", "--series", "modality=CT"], env={})
    assert result.exit_code == 0, result.output
    local_out = tmp_path / "local-out"
    assert run_batch(make_manifest(local, checksums=False), local_out,
                     RunOptions(model="ct-basic", device="cpu", outputs=OutputOptions(report=False))).exit_status == 0
    _check_pushed_segs(pacs, out, local, local_out)
    cid = case_id_for_study(_study_uid(local / "p22"))
    cached = sorted((out / ".pacs-cache" / cid).iterdir())
    assert len(cached) == len(list((local / "p22").iterdir()))  # every instance arrived, one file each
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in cached} == {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (local / "p22").iterdir()}
    record = json.loads((out / cid / "status.json").read_text())
    assert any("dimse://ORTHANC@127.0.0.1:4242 and verified" in n for n in record["notes"])
    assert _port_free(11112), "the storage SCP is still listening after the run"


def test_c_move_to_an_ae_title_the_pacs_does_not_know_fails_clearly(pacs: osrv.Orthanc, phantoms: Path,
                                                                    tmp_path: Path) -> None:
    _upload(pacs, phantoms / "p21" / "ct")
    source = PacsSource(pacs.dimse, cache_dir=tmp_path / "cache", ae_title="STRANGER", retrieve="move",
                        ae_port=11112, timeout_s=10)
    [case] = source.manifest().cases
    with pytest.raises(PacsError, match=r"C-MOVE .*AE title 'STRANGER' failed before any instance arrived.*does not "
                                        r"know that AE title as a move destination.*must have it configured as a "
                                        r"destination \(AE title 'STRANGER', this host's address, port 11112\)"):
        source.fetch(case)
    assert _port_free(11112), "the storage SCP was not shut down after the failed move"
    assert not list((tmp_path / "cache").glob(".*partial")) and not (tmp_path / "cache" / case.case_id).exists()
    # in a batch: that case fails with the message, the run goes on and says so
    result = run_batch(source.manifest(), tmp_path / "out", RunOptions(model="ct-basic", device="cpu",
                                                                       outputs=OutputOptions(report=False)),
                       source=source)
    [rec] = result.records
    assert rec.state == "failed" and "'STRANGER'" in (rec.error or "") and rec.error_type == "PacsError"


def test_c_move_with_our_port_taken_is_a_clear_error(pacs: osrv.Orthanc, phantoms: Path, tmp_path: Path) -> None:
    _upload(pacs, phantoms / "p21" / "ct")
    source = PacsSource(pacs.dimse, cache_dir=tmp_path / "cache", retrieve="move", ae_port=11112, timeout_s=1)
    [case] = source.manifest().cases
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("", 11112))
        taken.listen()
        with pytest.raises(PacsError, match=r"cannot listen on port 11112 .*waited 1 s.*--ae-port"):
            source.fetch(case)
    # a port that is freed while we wait (another retrieval of ours finishing) is taken, and the move completes
    patient = PacsSource(pacs.dimse, cache_dir=tmp_path / "cache", retrieve="move", ae_port=11112, timeout_s=10)
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("", 11112))
    taken.listen()
    timer = threading.Timer(1.0, taken.close)
    timer.start()
    t0 = time.monotonic()
    try:
        patient.fetch(case)
    finally:
        timer.join()
    assert time.monotonic() - t0 >= 1.0
    assert len(list((tmp_path / "cache" / case.case_id).iterdir())) == len(list((phantoms / "p21" / "ct").iterdir()))


def test_two_c_move_retrievals_at_once_take_turns_on_our_port(pacs: osrv.Orthanc, phantoms: Path,
                                                               tmp_path: Path) -> None:
    """Two retrievals on one host (Dask workers) share --ae-port: the second waits for the first's SCP to close."""
    for seed in (21, 23):
        _upload(pacs, phantoms / f"p{seed}" / "ct")
    source = PacsSource(pacs.dimse, cache_dir=tmp_path / "cache", retrieve="move", ae_port=11112, timeout_s=20)
    cases = source.manifest().cases
    errors: list[BaseException] = []

    def fetch(case: Any) -> None:
        try:
            source.fetch(case)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for case, seed in zip(sorted(cases, key=lambda c: c.case_id), sorted((21, 23), key=lambda s: case_id_for_study(
            _study_uid(phantoms / f"p{s}" / "ct"))), strict=True):
        assert len(list((tmp_path / "cache" / case.case_id).iterdir())) == len(list(
            (phantoms / f"p{seed}" / "ct").iterdir()))


def test_retrieve_options_are_checked() -> None:
    with pytest.raises(ValueError, match="--retrieve move is DIMSE C-MOVE"):
        PacsSource("dicomweb+http://127.0.0.1:8042/dicom-web", retrieve="move")
    with pytest.raises(ValueError, match="--retrieve 'fetch'"):
        PacsSource("dimse://ORTHANC@127.0.0.1:4242", retrieve="fetch")  # type: ignore[arg-type]
    result = runner.invoke(app, ["batch", "/nonexistent", "--model", "ct-basic", "--out", "/tmp/x", "--push-sr"])
    assert result.exit_code == 2 and "--push-sr" in result.output and "--push" in result.output, result.output


# ---- DICOM SR ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sr_round_trips_through_stow_rs_and_a_rerun_does_not_duplicate_it(pacs: osrv.Orthanc, phantoms: Path,
                                                                          tmp_path: Path) -> None:
    local = _local_folder(tmp_path, phantoms, [21, 23], dcmqi=False)
    for study in local.iterdir():
        _upload(pacs, study)
    out = tmp_path / "out"
    args = ["batch", pacs.dicomweb, "--model", "ct-basic", "--device", "cpu", "--out", str(out), "--push",
            "--push-sr", "--quiet", "--no-report"]
    result = runner.invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    _check_pushed_srs(pacs, out, local)
    before = pacs.instance_count()
    again = runner.invoke(app, args, env=ENV)
    assert again.exit_code == 0, again.output
    assert pacs.instance_count() == before
    assert all(len(v) == 1 for v in _files_of(pacs, "SR").values())
    assert [c["state"] for c in json.loads((out / "run.json").read_text())["cases"]] == ["skipped", "skipped"]


def test_sr_round_trips_through_c_store(pacs: osrv.Orthanc, phantoms: Path, tmp_path: Path) -> None:
    local = _local_folder(tmp_path, phantoms, [22], dcmqi=False)
    _upload(pacs, local / "p22")
    out = tmp_path / "out"
    args = ["batch", pacs.dimse, "--ae-title", osrv.OUR_AET, "--model", "ct-basic", "--device", "cpu", "--out",
            str(out), "--push", "--push-sr", "--quiet", "--no-report"]
    result = runner.invoke(app, args, env={})
    assert result.exit_code == 0, result.output
    _check_pushed_srs(pacs, out, local)
    record = json.loads((out / case_id_for_study(_study_uid(local / "p22")) / "status.json").read_text())
    assert any("SR pushed to dimse://ORTHANC@127.0.0.1:4242 and verified" in n for n in record["notes"])
    before = pacs.instance_count()
    assert runner.invoke(app, args, env={}).exit_code == 0
    assert pacs.instance_count() == before


def test_a_recipe_retrieves_by_c_move_and_pushes_seg_and_sr(pacs: osrv.Orthanc, phantoms: Path,
                                                             tmp_path: Path) -> None:
    """`medseg run recipe.yaml` with inputs.retrieve: move, inputs.ae_port and outputs.push_sr: the same run as
    `medseg batch dimse://... --retrieve move --ae-port 11112 --push --push-sr`."""
    import yaml

    local = _local_folder(tmp_path, phantoms, [22], dcmqi=False)
    _upload(pacs, local / "p22")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "move-sr", "model": "ct-basic",
        "inputs": {"pacs": pacs.dimse, "ae_title": osrv.OUR_AET, "retrieve": "move", "ae_port": 11112,
                   "series": ["modality=CT"]},
        "outputs": {"folder": "out", "push": True, "push_sr": True, "report": False},
        "inference": {"device": "cpu"}}))
    result = runner.invoke(app, ["run", str(recipe), "--quiet"], env={})
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    local_out = tmp_path / "local-out"
    assert run_batch(make_manifest(local, checksums=False), local_out,
                     RunOptions(model="ct-basic", device="cpu", outputs=OutputOptions(report=False))).exit_status == 0
    _check_pushed_segs(pacs, out, local, local_out)
    _check_pushed_srs(pacs, out, local)
    assert _port_free(11112), "the storage SCP is still listening after the run"
    # push_sr with dicom_sr: false, or without a push, is refused before anything runs
    for outputs, message in (({"push": True, "push_sr": True, "dicom_sr": False}, "outputs.dicom_sr"),
                             ({"push_sr": True}, "set 'outputs.push' too")):
        recipe.write_text(yaml.safe_dump({"name": "bad", "model": "ct-basic", "inputs": {"pacs": pacs.dimse},
                                          "outputs": {"folder": "bad", **outputs}}))
        bad = runner.invoke(app, ["run", str(recipe)], env={})
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output
        assert not (tmp_path / "bad").exists()


def test_a_case_done_without_an_sr_gets_one_pushed_later_without_resegmenting(pacs: osrv.Orthanc, phantoms: Path,
                                                                               tmp_path: Path) -> None:
    """First --push (SEG only), then --push --push-sr: the SR is written from the case's SEG and labels and
    pushed; the SEG is not pushed again and the case is not segmented again."""
    local = _local_folder(tmp_path, phantoms, [21], dcmqi=False)
    _upload(pacs, local / "p21")
    out = tmp_path / "out"
    args = ["batch", pacs.dicomweb, "--model", "ct-basic", "--device", "cpu", "--out", str(out), "--push",
            "--quiet", "--no-report"]
    assert runner.invoke(app, args, env=ENV).exit_code == 0
    folder = out / case_id_for_study(_study_uid(local / "p21"))
    seg_bytes = (folder / "segmentation.dcm").read_bytes()
    assert not (folder / SR_NAME).exists() and _files_of(pacs, "SR") == {_study_uid(local / "p21"): []}
    result = runner.invoke(app, [*args, "--push-sr"], env=ENV)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["cases"][0]["state"] == "skipped"
    assert (folder / "segmentation.dcm").read_bytes() == seg_bytes
    assert [len(v) for v in pacs.seg_series().values()] == [1]
    _check_pushed_srs(pacs, out, local)


def test_watch_retrieves_by_c_move_and_pushes_seg_and_sr(pacs: osrv.Orthanc, phantoms: Path, tmp_path: Path) -> None:
    local = _local_folder(tmp_path, phantoms, [23], dcmqi=False)
    _upload(pacs, local / "p23")
    out = tmp_path / "w"
    result = runner.invoke(app, ["watch", pacs.dimse, "--ae-title", osrv.OUR_AET, "--retrieve", "move", "--model",
                                 "ct-basic", "--device", "cpu", "--out", str(out), "--push", "--push-sr", "--interval",
                                 "0", "--stable", "0", "--max-polls", "2"], env={})
    assert result.exit_code == 0, result.output
    _check_pushed_srs(pacs, out, local)
    assert [len(v) for v in pacs.seg_series().values()] == [1]
    assert _port_free(11112)


# ---- verified pushes against a PACS that drops what it is sent ---------------------------------------------------
class _FakeStow(BaseHTTPRequestHandler):
    """A DICOMweb endpoint that answers STOW-RS with HTTP 200 and references only the instances whose SOP class is
    not in ``drop`` (what Orthanc does for instances it silently drops), and lists what it kept (QIDO-RS)."""

    drop: ClassVar[set[str]] = set()
    kept: ClassVar[dict[str, list[str]]] = {}  # SeriesInstanceUID -> SOPInstanceUIDs

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        referenced = []
        for part in message.iter_parts():
            ds = pydicom.dcmread(BytesIO(part.get_payload(decode=True)))
            if str(ds.SOPClassUID) in self.drop:
                continue
            self.kept.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
            referenced.append({"00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                               "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}})
        self._json({"00081199": {"vr": "SQ", "Value": referenced}} if referenced else {"00081199": {"vr": "SQ"}})

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        series = parts[parts.index("series") + 1] if "series" in parts else ""
        self._json([{"00080018": {"vr": "UI", "Value": [u]}} for u in self.kept.get(series, [])])


@pytest.fixture
def fake_stow(pacs: osrv.Orthanc) -> Any:  # pacs: inside the private network namespace
    _FakeStow.drop, _FakeStow.kept = set(), {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeStow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"dicomweb+http://127.0.0.1:{server.server_address[1]}/dicom-web", _FakeStow
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("dropped", ["SEG", "SR"])
def test_a_push_the_pacs_answers_200_but_does_not_reference_fails_the_case(
        fake_stow: Any, phantoms: Path, tmp_path: Path, dropped: str) -> None:
    url, handler = fake_stow
    handler.drop = {SEG_CLASS if dropped == "SEG" else SR_CLASS}
    local = _local_folder(tmp_path, phantoms, [21], dcmqi=False)
    sink = PacsSink(url, push_sr=True, timeout_s=5, attempts=1)
    result = run_batch(make_manifest(local, checksums=False), tmp_path / "out",
                       RunOptions(model="ct-basic", device="cpu",
                                  outputs=OutputOptions(dicom_seg=True, dicom_sr=True, report=False)), sink=sink)
    [rec] = result.records
    assert rec.state == "failed" and rec.error_type == "PacsPushError", rec
    assert "references 0 of the 1 instance(s) sent" in (rec.error or "")
    record = tmp_path / "out" / "p21" / PUSH_RECORD_NAME
    if dropped == "SEG":
        assert not record.exists() and handler.kept == {}
    else:  # the SEG was stored and verified; the SR was not: recorded as such, and a rerun pushes only the SR
        pushed = json.loads(record.read_text())
        assert pushed["verified"] and "sr" not in pushed
        [seg_uids] = handler.kept.values()
        assert seg_uids == pushed["sop_instance_uids"]
        handler.drop = set()
        again = run_batch(make_manifest(local, checksums=False), tmp_path / "out",
                          RunOptions(model="ct-basic", device="cpu",
                                     outputs=OutputOptions(dicom_seg=True, dicom_sr=True, report=False)), sink=sink)
        assert [r.state for r in again.records] == ["done"]
        assert "sr" in json.loads(record.read_text())
        assert sorted(len(v) for v in handler.kept.values()) == [1, 1]  # one SEG, one SR: the SEG not twice
