"""A real Orthanc (Debian's orthanc + orthanc-dicomweb) for the PACS tests and benchmarks/bench_pacs.py.

Orthanc 1.10 listens on every interface, so it runs inside a private network namespace that this process enters
(``unshare(CLONE_NEWNET)`` on the calling thread, ``lo`` brought up): Orthanc and every client started from this
thread share that namespace and nothing is reachable from outside. :func:`private_network` leaves it again.
Recipe and traps: ``../shared/notes/orthanc.md`` (TCP_NODELAY, readiness polling, bulk-delete to wipe).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CLONE_NEWNET = 0x40000000
USER, PASSWORD = "medseg-test", "s3cret-for-tests"
HTTP_PORT, DICOM_PORT, AET = 8042, 4242, "ORTHANC"
OUR_AET = "MEDSEG"


def why_not() -> str | None:
    """Why Orthanc cannot run here (None when it can)."""
    if not Path(ORTHANC).is_file():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/ensure-system-packages)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing: cannot bring up loopback in a private network namespace"
    return None


@contextmanager
def private_network() -> Iterator[None]:
    """Run the calling thread (and what it starts) in a new network namespace with only ``lo``, up.

    Raises
    ------
    PermissionError
        When the machine does not allow creating one (no CAP_SYS_ADMIN and no user namespaces).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise PermissionError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        try:
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:  # pragma: no cover
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace failed")
    finally:
        os.close(original)


class Orthanc:
    """One Orthanc process with its own storage; stop()/start() keep the storage (a server restart)."""

    def __init__(self, folder: Path, *, auth: bool = True, extra: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medseg-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": HTTP_PORT, "DicomPort": DICOM_PORT, "DicomAet": AET, "RemoteAccessAllowed": True,
            "AuthenticationEnabled": auth, "RegisteredUsers": {USER: PASSWORD} if auth else {},
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"medseg": [OUR_AET, "127.0.0.1", 11112]}, "DicomCheckModalityHost": False,
            "StableAge": 1, "HttpServerThreads": 4, "ConcurrentJobs": 2, "StorageCompression": False,
            **(extra or {}),  # e.g. more DicomModalities (not SslEnabled: 1.10.1 crashes at the first TLS handshake)
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=1))

    @property
    def dicomweb(self) -> str:
        return f"dicomweb+http://127.0.0.1:{HTTP_PORT}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://{AET}@127.0.0.1:{DICOM_PORT}"

    def start(self, timeout_s: float = 20.0) -> None:
        env = {**os.environ, "TCP_NODELAY": "1"}
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - kept open for the process's lifetime
        self.proc = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.folder / 'orthanc.log'}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        import base64
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}{path}", data=data, method=method)
        if self.auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as answer:
            raw = answer.read()
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def wipe(self) -> None:
        ids = self.get("/studies")
        if ids:
            self._request("POST", "/tools/bulk-delete", {"Resources": ids})

    def seg_series(self) -> dict[str, list[str]]:
        """StudyInstanceUID -> the SeriesInstanceUIDs of its SEG series."""
        out: dict[str, list[str]] = {}
        for sid in self.get("/studies"):
            study = self.get(f"/studies/{sid}")
            uid = study["MainDicomTags"]["StudyInstanceUID"]
            out[uid] = []
            for series_id in study["Series"]:
                series = self.get(f"/series/{series_id}")
                if series["MainDicomTags"].get("Modality") == "SEG":
                    out[uid].append(series["MainDicomTags"]["SeriesInstanceUID"])
        return out

    def seg_files(self) -> dict[str, list[bytes]]:
        """StudyInstanceUID -> the DICOM files of its SEG instances, as Orthanc stores them."""
        import base64
        import urllib.request

        out: dict[str, list[bytes]] = {}
        for sid in self.get("/studies"):
            study = self.get(f"/studies/{sid}")
            files = out.setdefault(study["MainDicomTags"]["StudyInstanceUID"], [])
            for series_id in study["Series"]:
                series = self.get(f"/series/{series_id}")
                if series["MainDicomTags"].get("Modality") != "SEG":
                    continue
                for iid in series["Instances"]:
                    req = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}/instances/{iid}/file")
                    if self.auth:
                        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                        req.add_header("Authorization", "Basic " + token)
                    with urllib.request.urlopen(req, timeout=10) as answer:
                        files.append(answer.read())
        return out

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])
