"""PACS recipes, HTTPS with a site CA, bearer tokens and the Dask executor, against a real Orthanc.

The Orthanc of ``tests/pacs_fixtures.py`` runs in this module's private network namespace; a second one beside it
serves HTTPS with a certificate from a throwaway CA made here (``openssl``), and a small reverse proxy in this
process stands in for a PACS gateway that takes bearer tokens (Orthanc has none built in).
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orthanc_server as osrv
import pytest
import yaml
from pacs_fixtures import CRED, ENV, _check_pushed_segs, _local_folder, _upload
from typer.testing import CliRunner

from medseg.cli import app
from medseg.errors import WorkflowError
from medseg.manifest import make_manifest
from medseg.pacs import PacsSink, store_files
from medseg.workflow import OutputOptions, RunOptions, load_workflow, parse_workflow, run_batch

runner = CliRunner()
NO_CREDENTIALS = {"MEDSEG_PACS_USER": None, "MEDSEG_PACS_PASSWORD": None, "MEDSEG_PACS_TOKEN": None}


def _local_run(local: Path, out: Path) -> Path:
    result = run_batch(make_manifest(local, checksums=False), out,
                       RunOptions(model="ct-basic", device="cpu", outputs=OutputOptions(report=False)))
    assert result.exit_status == 0
    return out


def _texts_under(folder: Path) -> Iterator[tuple[Path, bytes]]:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            yield p, p.read_bytes()


# ---- recipes: parsing (no server) ------------------------------------------------------------------------------
def _recipe(tmp: Path, inputs: dict[str, Any], outputs: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    return {"name": "t", "model": "ct-basic", "inputs": inputs,
            "outputs": {"folder": str(tmp / "out"), **(outputs or {})}, **top}


def test_recipe_pacs_inputs_and_push_parse_as_the_batch_options(tmp_path: Path) -> None:
    data = _recipe(tmp_path, {"pacs": "dicomweb+http://pacs.example:8042/dicom-web",
                              "query": {"ModalitiesInStudy": "CT", "StudyDate": "20240101-20241231",
                                        "StudyInstanceUID": ["1.2.3", "1.2.4"]},
                              "series": ["modality=CT", "orientation=axial"], "cache": "cache",
                              "ca_bundle": "ca.pem", "credentials_file": "~/pacs.cred", "timeout": 12},
                   {"push": True})
    wf = parse_workflow(data, source="r.yaml", base_dir=tmp_path)
    assert wf.inputs == "dicomweb+http://pacs.example:8042/dicom-web"
    p = wf.pacs
    assert p is not None
    assert p.query == ("ModalitiesInStudy=CT", "StudyDate=20240101-20241231", "StudyInstanceUID=1.2.3,1.2.4")
    assert p.series == ("modality=CT", "orientation=axial")
    assert (p.cache, p.ca_bundle) == (tmp_path / "cache", tmp_path / "ca.pem")
    assert p.credentials_file == Path("~/pacs.cred").expanduser() and p.timeout_s == 12.0
    assert (p.push, p.push_to, p.retrieve) == (True, None, "get")
    assert wf.options.outputs.dicom_seg  # push turns DICOM SEG on
    # a folder input pushing to another PACS
    folder = tmp_path / "studies"
    wf = parse_workflow(_recipe(tmp_path, {"folder": str(folder)}, {"push": "dimse://ORTHANC@pacs.example:4242"}),
                        base_dir=tmp_path)
    assert wf.inputs == folder and wf.pacs is not None and wf.pacs.push_to == "dimse://ORTHANC@pacs.example:4242"
    wf = parse_workflow(_recipe(tmp_path, {"pacs": "dimse://ORTHANC@pacs.example:4242", "retrieve": "move",
                                           "ae_title": "MEDSEG2", "ae_port": 11113}), base_dir=tmp_path)
    assert wf.pacs is not None and (wf.pacs.retrieve, wf.pacs.ae_title, wf.pacs.push) == ("move", "MEDSEG2", False)
    assert wf.pacs.ae_port == 11113 and not wf.pacs.push_sr
    assert not wf.options.outputs.dicom_seg and not wf.options.outputs.dicom_sr
    wf = parse_workflow(_recipe(tmp_path, {"pacs": "dicomweb+http://h/dicom-web", "retrieve": "get"},
                                {"push": True, "push_sr": True}), base_dir=tmp_path)
    assert wf.pacs is not None and wf.pacs.push_sr  # pushing the SR turns SEG and SR output on
    assert wf.options.outputs.dicom_seg and wf.options.outputs.dicom_sr
    # the shipped example recipe (a placeholder URL) parses, and --set points it at another PACS
    shipped = Path(__file__).resolve().parents[1] / "workflows" / "pacs-phantoms.yaml"
    wf = load_workflow(shipped, overrides=["inputs.pacs=dimse://PACS@10.0.0.5:104"])
    assert wf.inputs == "dimse://PACS@10.0.0.5:104" and wf.pacs is not None and wf.pacs.push


@pytest.mark.parametrize(("inputs", "outputs", "match"), [
    ({"pacs": "dicomweb+http://h/dicom-web", "password": "x"}, {}, (r"field 'inputs.password': credentials never go "
     r"in a recipe.*MEDSEG_PACS_USER and MEDSEG_PACS_PASSWORD.*MEDSEG_PACS_TOKEN.*credentials_file")),
    ({"pacs": "dicomweb+http://h/dicom-web", "token": "x"}, {}, r"field 'inputs.token': credentials never go"),
    ({"pacs": "dicomweb+http://h/dicom-web", "user": "bob"}, {}, r"field 'inputs.user': credentials never go"),
    ({"pacs": "dicomweb+http://h/dicom-web"}, {"push": True, "credentials": {"user": "u"}},
     r"field 'outputs.credentials': credentials never go"),
    ({"pacs": "dicomweb+http://bob:pw@h/dicom-web"}, {}, r"field 'inputs.pacs':.*credentials do not go in the URL"),
    ({"pacs": "dicomweb+http://h/dicom-web", "qurey": {}}, {}, (r"unknown field\(s\) in 'inputs': 'qurey' \(did you "
     r"mean 'query'\?\)")),
    ({"pacs": "http://h/dicom-web"}, {}, r"field 'inputs.pacs': expected a PACS address"),
    ({"pacs": "dicomweb+http://h/dicom-web", "query": {"ModalityInStudy": "CT"}}, {},
     r"'ModalityInStudy' is not a DICOM keyword"),
    ({"pacs": "dicomweb+http://h/dicom-web", "series": ["kernel=B30f"]}, {}, r"unknown rule 'kernel'"),
    ({"pacs": "dicomweb+http://h/dicom-web", "retrieve": "move"}, {}, (r"'inputs.retrieve' chooses C-GET or C-MOVE "
     r"for a DIMSE source")),
    ({"pacs": "dimse://A@h:104", "retrieve": "fetch"}, {}, (r"field 'inputs.retrieve': expected one of \['get', "
     r"'move'\]")),
    ({"folder": "studies"}, {"push": True}, r"'outputs.push: true' sends the SEGs back.*give 'outputs.push: URL'"),
    ({"folder": "studies", "query": {"ModalitiesInStudy": "CT"}}, {}, r"inputs.query select studies in a PACS"),
    ({"folder": "studies", "ca_bundle": "ca.pem"}, {}, r"inputs.ca_bundle configure a PACS connection"),
    ({"folder": "studies", "pacs": "dicomweb+http://h/dicom-web"}, {}, (r"exactly one of 'manifest'.*got "
     r"\['folder', 'pacs'\]")),
    ({"pacs": "dicomweb+http://h/dicom-web"}, {"push": True, "dicom_seg": False},
     r"'outputs.dicom_seg' must be true"),
])
def test_recipe_pacs_fields_are_refused_with_the_field_named(tmp_path: Path, inputs: dict[str, Any],
                                                             outputs: dict[str, Any], match: str) -> None:
    with pytest.raises(WorkflowError, match=match):
        parse_workflow(_recipe(tmp_path, inputs, outputs), source="r.yaml", base_dir=tmp_path)


def test_a_secret_given_with_set_is_refused_too(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"field 'inputs.password': credentials never go in a recipe"):
        parse_workflow(_recipe(tmp_path, {"pacs": "dicomweb+http://h/dicom-web"}), base_dir=tmp_path,
                       overrides=["inputs.password=hunter2"])


# ---- recipes against Orthanc ------------------------------------------------------------------------------------
def test_a_recipe_pulls_the_phantom_studies_and_pushes_a_seg_per_study(pacs: osrv.Orthanc, phantoms: Path,
                                                                       tmp_path: Path) -> None:
    local = _local_folder(tmp_path, phantoms, [21, 22], dcmqi=False)
    for study in local.iterdir():
        _upload(pacs, study)
    recipe = tmp_path / "recipes" / "pacs.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({
        "name": "pacs-test", "model": "ct-basic",
        "inputs": {"pacs": pacs.dicomweb, "query": {"ModalitiesInStudy": "CT"},
                   "series": ["modality=CT", "orientation=axial"], "cache": "../cache", "timeout": 20},
        "outputs": {"folder": "../out", "push": True, "report": False},
        "inference": {"device": "cpu"}}))
    result = runner.invoke(app, ["run", str(recipe), "--quiet"], env={**NO_CREDENTIALS, **ENV})
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())  # retrieved into the recipe's cache
    _check_pushed_segs(pacs, out, local, _local_run(local, tmp_path / "local-out"))
    run = json.loads((out / "run.json").read_text())
    assert run["pacs"] == {"source": pacs.dicomweb, "sink": pacs.dicomweb} and run["counts"]["done"] == 2
    # a rerun of the recipe pushes nothing twice; a wrong password is exit 2 with the clear message
    before = pacs.instance_count()
    again = runner.invoke(app, ["run", str(recipe), "--quiet"], env={**NO_CREDENTIALS, **ENV})
    assert again.exit_code == 0 and pacs.instance_count() == before, again.output
    wrong = runner.invoke(app, ["run", str(recipe)], env={**ENV, "MEDSEG_PACS_PASSWORD": "wrong"})
    assert wrong.exit_code == 2 and "refused our credentials" in wrong.output, wrong.output
    assert "Traceback" not in wrong.output


# ---- a gateway in front of Orthanc (HTTPS, bearer tokens) ----------------------------------------------------
class _Gateway(ThreadingHTTPServer):
    """A PACS gateway in front of Orthanc: HTTPS with ``context``; with ``token``, answers 401 unless
    ``Authorization: Bearer <token>`` and forwards with Orthanc's basic auth (else the client's own header)."""

    daemon_threads = True

    def __init__(self, upstream_port: int, *, token: str | None = None, context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _GatewayHandler)
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.token, self.upstream_port = token, upstream_port
        self.basic = "Basic " + base64.b64encode(f"{osrv.USER}:{osrv.PASSWORD}".encode()).decode()
        self.accepted = self.refused = 0


class _GatewayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Gateway

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status, reason)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _forward(self) -> None:
        body = self._body()
        if self.server.token is not None and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self.server.refused += 1
            self._answer(401, "Unauthorized", [("WWW-Authenticate", 'Bearer realm="pacs"')], b"bearer token needed")
            return
        self.server.accepted += 1
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
        if self.server.token is not None:
            headers["Authorization"] = self.server.basic
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            answer = conn.getresponse()
            self._answer(answer.status, answer.reason, answer.getheaders(), answer.read())
        finally:
            conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def _serving(server: _Gateway) -> Iterator[_Gateway]:
    """Serve in a thread (the socket was bound on this thread, inside the fixture's network namespace)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# ---- HTTPS with the site's CA ------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca_and_server_cert(folder: Path) -> tuple[Path, Path]:
    """A throwaway CA (ca.pem) and a certificate it signs for 127.0.0.1 (server.pem: key + certificate)."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=medseg test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
             "/CN=127.0.0.1", cwd=folder)
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                    "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "server.crt", "-days", "2", "-extfile", "ext.cnf", cwd=folder)
    pem = folder / "server.pem"
    pem.write_bytes((folder / "server.key").read_bytes() + (folder / "server.crt").read_bytes())
    return folder / "ca.pem", pem


@pytest.fixture
def https_gateway(pacs: osrv.Orthanc, tmp_path: Path) -> Iterator[tuple[_Gateway, Path]]:
    """HTTPS in front of Orthanc, with a certificate for 127.0.0.1 from a throwaway CA (returned as ca.pem).

    Not Orthanc's own ``SslEnabled``: Debian 12's Orthanc 1.10.1 with its libcivetweb 1.15 and OpenSSL 3 crashes
    (SIGSEGV, a null call in a civetweb worker) at the first TLS handshake.
    """
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing: cannot make a test CA")
    ca, pem = _make_ca_and_server_cert(tmp_path / "tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    with _serving(_Gateway(osrv.HTTP_PORT, context=context)) as server:
        yield server, ca


def test_https_with_ca_bundle_pushes_and_without_it_is_a_clear_certificate_error(
        pacs: osrv.Orthanc, https_gateway: tuple[_Gateway, Path], phantoms: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import requests.certs

    # as on many hosts: the public CAs through the environment, which requests lets override a session's verify
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    gateway, ca = https_gateway
    url = f"dicomweb+https://127.0.0.1:{gateway.server_address[1]}/dicom-web"
    local = _local_folder(tmp_path, phantoms, [23], dcmqi=False)
    store_files(PacsSink(url, CRED, ca_bundle=str(ca)), sorted((local / "p23").iterdir()))  # STOW-RS over HTTPS
    assert pacs.instance_count() == len(list((local / "p23").iterdir()))
    base = ["batch", url, "--model", "ct-basic", "--device", "cpu", "--push", "--quiet", "--no-report",
            "--timeout", "10"]
    env = {**NO_CREDENTIALS, **ENV}
    # without the site's CA: exit 2, one line naming the URL and --ca-bundle, no traceback, nothing run
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "no-ca")], env=env)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert url in text and "TLS certificate could not be verified (unable to get local issuer certificate)" in text
    assert "pass --ca-bundle PEM" in text and "Traceback" not in text, text
    assert not (tmp_path / "no-ca" / "run.json").exists()
    # another CA's bundle is no better
    other, _ = _make_ca_and_server_cert(tmp_path / "other-ca")
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "other"), "--ca-bundle", str(other)], env=env)
    assert result.exit_code == 2 and "TLS certificate could not be verified" in result.output, result.output
    # a missing CA file is named
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "gone"), "--ca-bundle", str(tmp_path / "nope.pem")],
                           env=env)
    assert result.exit_code == 2, result.output
    assert "nope.pem: no such CA bundle file" in " ".join(result.output.split()), result.output
    # with it: pulled over HTTPS, segmented, SEG pushed and verified
    out = tmp_path / "out"
    result = runner.invoke(app, [*base, "--out", str(out), "--ca-bundle", str(ca)], env=env)
    assert result.exit_code == 0, result.output
    _check_pushed_segs(pacs, out, local, _local_run(local, tmp_path / "local-out"))
    assert json.loads((out / "run.json").read_text())["pacs"]["sink"] == url
    # a recipe's ca_bundle (relative to the recipe) does the same; without it the recipe run is the same exit 2
    recipe = tmp_path / "tls" / "recipe.yaml"
    body = {"name": "tls", "model": "ct-basic", "inputs": {"pacs": url, "ca_bundle": "ca.pem", "timeout": 10},
            "outputs": {"folder": "../recipe-out", "report": False}, "inference": {"device": "cpu"}}
    recipe.write_text(yaml.safe_dump(body))
    result = runner.invoke(app, ["run", str(recipe), "--quiet"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "recipe-out" / "run.json").read_text())["counts"]["done"] == 1
    result = runner.invoke(app, ["run", str(recipe), "--set", "inputs.ca_bundle=null"], env=env)
    assert result.exit_code == 2 and "pass --ca-bundle PEM (ca_bundle: in a recipe)" in " ".join(
        result.output.split()), result.output


# ---- bearer tokens -------------------------------------------------------------------------------------------
@pytest.fixture
def gateway(pacs: osrv.Orthanc) -> Iterator[_Gateway]:
    with _serving(_Gateway(osrv.HTTP_PORT, token="tok-7f3a9c1e5b2d")) as server:
        yield server


def test_a_bearer_token_pulls_and_pushes_and_never_lands_in_the_records(
        pacs: osrv.Orthanc, gateway: _Gateway, phantoms: Path, tmp_path: Path) -> None:
    local = _local_folder(tmp_path, phantoms, [21], dcmqi=False)
    _upload(pacs, local / "p21")
    url = f"dicomweb+http://127.0.0.1:{gateway.server_address[1]}/dicom-web"
    base = ["batch", url, "--model", "ct-basic", "--device", "cpu", "--push", "--no-report", "--timeout", "10"]
    # a wrong token: the clear auth error, exit 2, nothing run, the token not echoed
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "bad")], env={**NO_CREDENTIALS,
                                                                         "MEDSEG_PACS_TOKEN": "tok-wrong-0000"})
    assert bad.exit_code == 2, bad.output
    assert "refused our credentials" in bad.output and "HTTP 401" in bad.output and "MEDSEG_PACS_TOKEN" in bad.output
    assert "tok-wrong-0000" not in bad.output and "Traceback" not in bad.output
    assert gateway.refused >= 1 and gateway.accepted == 0
    # the right token: pulled and pushed through the gateway, verbose logs on
    out = tmp_path / "out"
    good = runner.invoke(app, ["--verbose", *base, "--out", str(out)],
                         env={**NO_CREDENTIALS, "MEDSEG_PACS_TOKEN": gateway.token})
    assert good.exit_code == 0, good.output
    assert gateway.accepted > 0
    _check_pushed_segs(pacs, out, local, _local_run(local, tmp_path / "local-out"))
    assert gateway.token not in good.output
    leaked = [p for p, data in _texts_under(out) if gateway.token.encode() in data]
    assert not leaked, leaked
    assert (out / "run.json").is_file() and any(out.rglob("status.json")) and any(out.rglob("push.json"))


# ---- the Dask executor from a PACS -------------------------------------------------------------------------------
def test_dask_executor_pulls_segments_and_pushes_from_a_pacs(pacs: osrv.Orthanc, phantoms: Path,
                                                             tmp_path: Path) -> None:
    """`medseg batch dicomweb+http://... --executor dask --workers 2 --push`: cases are retrieved, segmented and
    pushed on the workers (a LocalCluster started in this namespace); one SEG per study, equal to the local run."""
    local = _local_folder(tmp_path, phantoms, [21, 22, 23], dcmqi=False)
    for study in local.iterdir():
        _upload(pacs, study)
    out = tmp_path / "out"
    args = ["batch", pacs.dicomweb, "--model", "ct-basic", "--device", "cpu", "--out", str(out), "--push",
            "--executor", "dask", "--workers", "2", "--quiet", "--no-report"]
    result = runner.invoke(app, args, env={**NO_CREDENTIALS, **ENV})
    assert result.exit_code == 0, result.output
    _check_pushed_segs(pacs, out, local, _local_run(local, tmp_path / "local-out"))
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["executor"] == "dask" and run["counts"]["done"] == 3
    assert all(c["worker"] is not None and c["timings_s"]["fetch"] > 0 and c["timings_s"]["push"] > 0
               for c in run["cases"])
    assert osrv.PASSWORD not in (out / "run.json").read_text()
    before = pacs.instance_count()
    again = runner.invoke(app, args, env={**NO_CREDENTIALS, **ENV})
    assert again.exit_code == 0 and pacs.instance_count() == before, again.output
    assert [c["state"] for c in json.loads((out / "run.json").read_text())["cases"]] == ["skipped"] * 3
