"""PACS in and out: studies from DICOMweb or DIMSE as batch cases, DICOM SEG pushed back and verified.

Sources (what ``medseg batch SOURCE`` and ``medseg watch SOURCE`` take beside folders and manifests)::

    dicomweb+http://HOST[:PORT]/PATH     QIDO-RS search, WADO-RS retrieval, STOW-RS push (dicomweb-client)
    dicomweb+https://HOST[:PORT]/PATH    the same over TLS (``ca_bundle`` to trust a site's own CA)
    dimse://AET@HOST:PORT                C-FIND, C-GET or C-MOVE, C-STORE (pynetdicom); our AE title is an option

:class:`PacsSource` queries the studies that match a filter (``ModalitiesInStudy=CT``, ``StudyDate=20240101-``,
``StudyInstanceUID=uid1,uid2``), chooses one image series per study with :class:`SeriesRules` (modality,
description pattern, orientation, slice thickness, the rules of MONAI Deploy's series selector) and makes one
:class:`~medseg.manifest.Case` per study. Its ``case_id`` is ``pacs-`` + the first 16 hex digits of the sha256 of
the StudyInstanceUID: no patient data and no UID in ids, folders or logs. The runner calls :meth:`PacsSource.fetch`
before it reads a case: the series is streamed into ``CACHE/<case_id>/`` (one file per instance, in the transfer
syntax the PACS stored, written under a temporary folder name and renamed when complete), and a complete cache is
not fetched again. With ``retrieve="move"`` a DIMSE series comes by C-MOVE to our own storage SCP (our AE title on
``ae_port``, started for each retrieval and always shut down), for a PACS that allows only C-MOVE.

:class:`PacsSink` pushes a case's ``segmentation.dcm`` (and, with ``push_sr``, its ``summary-sr.dcm`` after it)
(STOW-RS or C-STORE) and verifies the PACS's answer: every
SOPInstanceUID sent must come back as stored (Orthanc answers a STOW-RS of an instance it dropped with HTTP 200 and
empty sequences), and the instance must then be found by a query. A verified push is recorded in
``OUT/<case_id>/push.json``; a case that has one is never pushed again (the record is written before the case's
status record, and a rerun checks it first).

Credentials (:func:`resolve_credentials`) never come from the command line and never enter a record: basic auth
from ``MEDSEG_PACS_USER`` + ``MEDSEG_PACS_PASSWORD``, a ``user:password`` file readable only by its owner, or a
bearer token from ``MEDSEG_PACS_TOKEN``. A URL with a password in it is refused. DIMSE has no passwords: access is
by AE title, as the PACS's configuration allows.

:func:`watch` polls a source, runs each new study once it is stable (no new instance for ``stable_s`` seconds) and
records what it did in ``OUT/watch.json``, so that a restart neither repeats nor skips a study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from medseg.errors import MedsegError, MissingDependencyError, WorkflowError
from medseg.files import atomic_write_text
from medseg.manifest import Case, Manifest

if TYPE_CHECKING:  # pragma: no cover
    from medseg.workflow import RunEvent, RunOptions, RunResult

__all__ = [
    "PUSH_RECORD_NAME",
    "WATCH_RECORD_NAME",
    "Credentials",
    "PacsAuthError",
    "PacsConnectionError",
    "PacsError",
    "PacsPushError",
    "PacsSink",
    "PacsSource",
    "SeriesRules",
    "StudyInfo",
    "case_id_for_study",
    "is_pacs_url",
    "open_endpoints",
    "parse_query",
    "resolve_credentials",
    "store_files",
    "watch",
]

logger = logging.getLogger(__name__)

PUSH_RECORD_NAME = "push.json"
WATCH_RECORD_NAME = "watch.json"
_SCHEMES = ("dicomweb+http", "dicomweb+https", "dimse")
# Keywords that must be present and non-blank in every instance a PACS is to store.
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_NON_IMAGE = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC", "OT"}


# ---- errors ---------------------------------------------------------------------------------------------------
class PacsError(MedsegError, OSError):
    """A PACS request that could not be done (the message names the PACS, what was asked and what to do)."""


class PacsAuthError(PacsError, PermissionError):
    """The PACS refused our credentials (HTTP 401/403), or a credentials file is unsafe or unreadable."""


class PacsConnectionError(PacsError, ConnectionError):
    """The PACS could not be reached, or stopped answering (refused, reset, timed out)."""


class PacsPushError(PacsError):
    """A push that the PACS refused, or did not store completely (verified against its answer)."""


# ---- urls, ids, queries ---------------------------------------------------------------------------------------
def is_pacs_url(text: str | os.PathLike[str]) -> bool:
    """True for ``dicomweb+http(s)://...`` and ``dimse://...`` (a path never is)."""
    return isinstance(text, str) and text.split("://", 1)[0].lower() in _SCHEMES and "://" in text


def case_id_for_study(study_uid: str) -> str:
    """The case id of a study: ``pacs-`` + 16 hex digits of the sha256 of its StudyInstanceUID.

    >>> case_id_for_study("1.2.3")
    'pacs-12a5e5bff3d7d2b8'
    """
    return "pacs-" + hashlib.sha256(study_uid.strip().encode("ascii")).hexdigest()[:16]


def parse_query(items: Sequence[str]) -> dict[str, str]:
    """``["ModalitiesInStudy=CT", "StudyDate=20240101-20241231"]`` -> a QIDO-RS / C-FIND filter.

    Values are passed as the standard defines them: date ranges ``A-B``, UID lists separated by commas.

    Raises
    ------
    WorkflowError
        If an item is not ``Keyword=value`` with a DICOM keyword.
    """
    from pydicom.datadict import tag_for_keyword

    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise WorkflowError(f"--query {item!r}: expected Keyword=value, e.g. ModalitiesInStudy=CT or "
                                "StudyDate=20240101-20241231.")
        if tag_for_keyword(key) is None:
            raise WorkflowError(f"--query {item!r}: {key!r} is not a DICOM keyword (e.g. ModalitiesInStudy, StudyDate, "
                                "StudyInstanceUID, AccessionNumber).")
        out[key] = value.strip()
    return out


def _plain_url(url: str) -> str:
    """The URL without userinfo (for messages and records)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# ---- credentials ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """Basic auth or a bearer token; ``repr`` never shows the secret."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def kind(self) -> Literal["none", "basic", "token"]:
        return "token" if self.token else "basic" if self.user is not None else "none"


def resolve_credentials(credentials_file: str | os.PathLike[str] | None = None,
                        environ: Mapping[str, str] | None = None) -> Credentials:
    """The PACS credentials: a ``user:password`` file, else ``MEDSEG_PACS_USER``/``MEDSEG_PACS_PASSWORD``, else
    ``MEDSEG_PACS_TOKEN`` (read now, not at import), else none.

    Parameters
    ----------
    credentials_file : path, optional
        One line ``user:password``; refused unless only its owner can read it (``chmod 600``).
    environ : mapping, optional
        The environment to read (default: ``os.environ``).

    Raises
    ------
    PacsAuthError
        If the file is readable by group or others, unreadable, or not ``user:password``; or if only one of
        ``MEDSEG_PACS_USER`` and ``MEDSEG_PACS_PASSWORD`` is set.
    """
    env = os.environ if environ is None else environ
    if credentials_file is not None:
        p = Path(credentials_file)
        try:
            mode = p.stat().st_mode
        except OSError as exc:
            raise PacsAuthError(f"{p}: cannot read the credentials file ({exc.strerror}); give a file holding "
                                "user:password.") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PacsAuthError(f"{p}: the credentials file can be read by others (mode {stat.filemode(mode)}); "
                                f"only its owner may read it: chmod 600 {p}.")
        try:
            line = p.read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise PacsAuthError(f"{p}: cannot read the credentials file ({exc}).") from None
        name, sep, secret = (line[0] if line else "").partition(":")
        if not sep or not name:
            raise PacsAuthError(f"{p}: expected one line user:password in the credentials file.")
        return Credentials(user=name, password=secret)
    user, password = env.get("MEDSEG_PACS_USER"), env.get("MEDSEG_PACS_PASSWORD")
    if (user is None) != (password is None):
        raise PacsAuthError("only one of MEDSEG_PACS_USER and MEDSEG_PACS_PASSWORD is set; set both (basic auth), "
                            "or use MEDSEG_PACS_TOKEN or --credentials FILE.")
    if user is not None:
        return Credentials(user=user, password=password)
    token = env.get("MEDSEG_PACS_TOKEN")
    if token:
        return Credentials(token=token)
    return Credentials()


# ---- series selection -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesRules:
    """Which series of a study is segmented (the rules MONAI Deploy's series selector applies).

    Attributes
    ----------
    modalities : tuple of str
        Accepted Modality values (default: CT and MR).
    description : str or None
        A regular expression that SeriesDescription must match (``re.search``, case-insensitive).
    orientation : {"axial", "coronal", "sagittal"} or None
        The slice plane, from ImageOrientationPatient of the series's first instance.
    thickness_mm : (float, float) or None
        SliceThickness range, inclusive.
    min_instances : int
        Series with fewer instances are not volumes.

    Among the series that pass, the one with most instances is chosen (then the lowest SeriesNumber).
    """

    modalities: tuple[str, ...] = ("CT", "MR")
    description: str | None = None
    orientation: Literal["axial", "coronal", "sagittal"] | None = None
    thickness_mm: tuple[float, float] | None = None
    min_instances: int = 2

    @classmethod
    def parse(cls, items: Sequence[str]) -> SeriesRules:
        """``["modality=CT", "description=body|abdomen", "orientation=axial", "thickness=0.5-5"]``.

        Raises
        ------
        WorkflowError
            For an unknown rule or an unreadable value.
        """
        kwargs: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep:
                raise WorkflowError(f"--series {item!r}: expected rule=value (modality=CT, description=REGEX, "
                                    "orientation=axial, thickness=0.5-5, min-instances=10).")
            if key == "modality":
                kwargs["modalities"] = tuple(v.strip().upper() for v in value.split(",") if v.strip())
            elif key == "description":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise WorkflowError(f"--series {item!r}: not a regular expression ({exc}).") from None
                kwargs["description"] = value
            elif key == "orientation":
                if value not in ("axial", "coronal", "sagittal"):
                    raise WorkflowError(f"--series {item!r}: orientation is axial, coronal or sagittal.")
                kwargs["orientation"] = value
            elif key == "thickness":
                lo, _, hi = value.partition("-")
                try:
                    kwargs["thickness_mm"] = (float(lo), float(hi or lo))
                except ValueError:
                    raise WorkflowError(f"--series {item!r}: thickness is a range in mm, e.g. 0.5-5.") from None
            elif key == "min-instances":
                try:
                    kwargs["min_instances"] = int(value)
                except ValueError:
                    raise WorkflowError(f"--series {item!r}: min-instances is a whole number.") from None
            else:
                raise WorkflowError(f"--series {item!r}: unknown rule {key!r}; the rules are modality, description, "
                                    "orientation, thickness, min-instances.")
        return cls(**kwargs)

    def reason_against(self, series: SeriesInfo) -> str | None:
        """Why ``series`` is not eligible, or None."""
        if series.modality.upper() not in self.modalities:
            return f"modality {series.modality or '(none)'} not in {'/'.join(self.modalities)}"
        if series.n_instances < self.min_instances:
            return f"{series.n_instances} instance(s), fewer than {self.min_instances}"
        if self.description and not re.search(self.description, series.description, re.IGNORECASE):
            return f"description does not match {self.description!r}"
        if self.orientation and series.orientation != self.orientation:
            return f"orientation {series.orientation or 'unknown'}, not {self.orientation}"
        if self.thickness_mm:
            lo, hi = self.thickness_mm
            if series.thickness_mm is None or not lo <= series.thickness_mm <= hi:
                return f"slice thickness {series.thickness_mm} mm outside {lo}-{hi} mm"
        return None

    @property
    def needs_instance(self) -> bool:
        return self.orientation is not None or self.thickness_mm is not None


@dataclass(frozen=True)
class SeriesInfo:
    """A series as the PACS describes it (UIDs are never logged)."""

    series_uid: str
    modality: str
    description: str
    number: int | None
    n_instances: int
    orientation: str | None = None
    thickness_mm: float | None = None


@dataclass(frozen=True)
class StudyInfo:
    """A study as the PACS describes it."""

    study_uid: str
    n_instances: int | None

    @property
    def case_id(self) -> str:
        return case_id_for_study(self.study_uid)


def _orientation(iop: Sequence[float] | None) -> str | None:
    if not iop or len(iop) != 6:
        return None
    import numpy as np

    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


# ---- DICOM JSON helpers ---------------------------------------------------------------------------------------
def _jv(item: Mapping[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute (``tag`` as 8 hex digits), or None."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _jvs(item: Mapping[str, Any], tag: str) -> list[Any]:
    return list((item.get(tag) or {}).get("Value") or [])


_T = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
      "Modality": "00080060", "SeriesDescription": "0008103E", "SeriesNumber": "00200011",
      "NumberOfStudyRelatedInstances": "00201208", "NumberOfSeriesRelatedInstances": "00201209",
      "ImageOrientationPatient": "00200037", "SliceThickness": "00180050"}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---- transports -----------------------------------------------------------------------------------------------
class _Transport:
    """What a source and a sink need from a PACS."""

    name: str

    def studies(self, filters: Mapping[str, str]) -> list[StudyInfo]:
        raise NotImplementedError

    def series(self, study_uid: str, *, with_instance: bool) -> list[SeriesInfo]:
        raise NotImplementedError

    def instances(self, study_uid: str, series_uid: str) -> list[str]:
        raise NotImplementedError

    def retrieve(self, study_uid: str, series_uid: str, folder: Path) -> int:
        raise NotImplementedError

    def store(self, datasets: Sequence[Any]) -> set[str]:
        """Send the datasets; return the SOPInstanceUIDs the PACS says it stored."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _http_error(exc: Exception, name: str, what: str) -> PacsError:
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return PacsAuthError(f"{name}: the PACS refused our credentials for {what} (HTTP {code}); check "
                                 "MEDSEG_PACS_USER / MEDSEG_PACS_PASSWORD, MEDSEG_PACS_TOKEN or --credentials FILE.")
        if code == 404:
            return PacsError(f"{name}: {what}: not found on the PACS (HTTP 404); it may have been deleted since the "
                             "query, or the URL's path is not the DICOMweb root.")
        return PacsError(f"{name}: {what}: the PACS answered HTTP {code} ({exc.response.reason}).")
    if isinstance(exc, requests.exceptions.SSLError):  # before ConnectionError, its base class
        reason = re.search(r"certificate verify failed: ([^(]+)", str(exc))
        return PacsConnectionError(
            f"{name}: {what}: the PACS's TLS certificate could not be verified"
            f"{f' ({reason.group(1).strip()})' if reason else ''}. If the site signs its certificates with its own "
            "certificate authority, pass --ca-bundle PEM (ca_bundle: in a recipe) holding that CA's certificate; "
            "if a bundle was given, it does not hold the CA that signed this certificate.")
    if isinstance(exc, requests.Timeout):
        return PacsConnectionError(f"{name}: {what}: no answer within the timeout; is the PACS overloaded or down?")
    if isinstance(exc, requests.ConnectionError):
        return PacsConnectionError(f"{name}: {what}: cannot connect to the PACS ({type(exc).__name__}); is it "
                                   "running and reachable? A rerun completes the cases that failed.")
    return PacsError(f"{name}: {what}: {type(exc).__name__}: {exc}")


class _DicomWeb(_Transport):
    def __init__(self, url: str, credentials: Credentials, ca_bundle: str | None, timeout_s: float,
                 attempts: int = 3) -> None:
        try:
            from dicomweb_client.api import DICOMwebClient
            from dicomweb_client.session_utils import create_session
        except ImportError:
            raise MissingDependencyError("DICOMweb sources need dicomweb-client: pip install 'medseg[pacs]'.") from None
        self.name = _plain_url(url)
        http_url = url.split("+", 1)[1]
        session = create_session()
        if credentials.kind == "basic":
            session.auth = (credentials.user or "", credentials.password or "")
        elif credentials.kind == "token":
            session.headers["Authorization"] = f"Bearer {credentials.token}"
        if ca_bundle is not None:
            if not Path(ca_bundle).is_file():
                raise PacsError(f"{ca_bundle}: no such CA bundle file (a PEM file of the certificates to trust).")
            session.verify = str(ca_bundle)
        self._timeout = timeout_s
        original = session.request

        def request(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self._timeout)
            if ca_bundle is not None:  # per request: requests lets REQUESTS_CA_BUNDLE override session.verify
                kwargs.setdefault("verify", str(ca_bundle))
            return original(*args, **kwargs)

        session.request = request  # type: ignore[method-assign]
        self.client = DICOMwebClient(http_url, session=session)
        # dicomweb-client retries failed requests (any exception, and HTTP 429/408/503/504) with exponential waits.
        self.client.set_http_retry_params(retry=attempts > 1, max_attempts=max(1, attempts),
                                          wait_exponential_multiplier=500)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        import requests

        try:
            return fn()
        except requests.RequestException as exc:
            raise _http_error(exc, self.name, what) from None

    def _search(self, what: str, fn: Callable[..., list[dict[str, Any]]], uid_tag: str, **kwargs: Any
                ) -> list[dict[str, Any]]:
        """All results of a QIDO-RS search, page by page (``offset``), stopping at an empty page or at a page with
        nothing new: a server that ignores ``offset`` (Orthanc with some filters) would otherwise loop for ever."""
        results: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            page = self._call(what, lambda: fn(offset=len(results) or None, **kwargs))
            new = [item for item in page if str(_jv(item, uid_tag)) not in seen]
            if not new:
                return results
            seen.update(str(_jv(item, uid_tag)) for item in new)
            results.extend(new)

    def studies(self, filters: Mapping[str, str]) -> list[StudyInfo]:
        found = self._search("search for studies", self.client.search_for_studies, _T["StudyInstanceUID"],
                             search_filters=dict(filters), fields=["NumberOfStudyRelatedInstances"])
        out = []
        for item in found:
            uid = _jv(item, _T["StudyInstanceUID"])
            if uid:
                out.append(StudyInfo(str(uid), _int(_jv(item, _T["NumberOfStudyRelatedInstances"]))))
        return out

    def series(self, study_uid: str, *, with_instance: bool) -> list[SeriesInfo]:
        found = self._search("search for series", self.client.search_for_series, _T["SeriesInstanceUID"],
                             study_instance_uid=study_uid,
                             fields=["NumberOfSeriesRelatedInstances", "SeriesDescription"])
        out = []
        for item in found:
            uid = str(_jv(item, _T["SeriesInstanceUID"]) or "")
            info = SeriesInfo(uid, str(_jv(item, _T["Modality"]) or ""), str(_jv(item, _T["SeriesDescription"]) or ""),
                              _int(_jv(item, _T["SeriesNumber"])),
                              _int(_jv(item, _T["NumberOfSeriesRelatedInstances"])) or 0)
            if with_instance and info.modality.upper() not in _NON_IMAGE:
                sops = self.instances(study_uid, uid)
                if sops:
                    meta = self._instance_metadata(study_uid, uid, sops[0])
                    info = SeriesInfo(info.series_uid, info.modality, info.description, info.number, info.n_instances,
                                      _orientation([float(v) for v in _jvs(meta, _T["ImageOrientationPatient"])]),
                                      _float(_jv(meta, _T["SliceThickness"])))
            out.append(info)
        return out

    def _instance_metadata(self, study_uid: str, series_uid: str, sop_uid: str) -> dict[str, Any]:
        return dict(self._call("read instance metadata", lambda: self.client.retrieve_instance_metadata(
            study_uid, series_uid, sop_uid)))

    def instances(self, study_uid: str, series_uid: str) -> list[str]:
        found = self._search("search for instances", self.client.search_for_instances, _T["SOPInstanceUID"],
                             study_instance_uid=study_uid, series_instance_uid=series_uid)
        return [str(u) for u in (_jv(i, _T["SOPInstanceUID"]) for i in found) if u]

    def retrieve(self, study_uid: str, series_uid: str, folder: Path) -> int:
        def run() -> int:
            n = 0
            # ("application/dicom", "*"): the transfer syntax the PACS stored (no transcoding, no JPEG 2000 failure).
            for ds in self.client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),)):
                ds.save_as(folder / f"{n:05d}.dcm", enforce_file_format=True)
                n += 1
            return n

        return int(self._call("retrieve the series (WADO-RS)", run))

    def store(self, datasets: Sequence[Any]) -> set[str]:
        answer = self._call("store (STOW-RS)", lambda: self.client.store_instances(list(datasets)))
        stored = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}
        failed = [str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("FailedSOPSequence", [])]
        if failed:
            logger.warning("%s: the PACS refused %d instance(s) of a STOW-RS request", self.name, len(failed))
        return stored


def _qr_model(kind: Literal["Find", "Get", "Move"]) -> Any:
    """pynetdicom's Study Root Query/Retrieve SOP class (its module defines them at import, unseen by mypy)."""
    from pynetdicom import sop_class

    return getattr(sop_class, f"StudyRootQueryRetrieveInformationModel{kind}")


def _storage_contexts() -> tuple[list[str], list[str]]:
    """The storage SOP classes and transfer syntaxes we accept when a PACS sends us a series (C-GET, C-MOVE)."""
    from pydicom.uid import (
        JPEG2000,
        CTImageStorage,
        EnhancedCTImageStorage,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        MRImageStorage,
        RLELossless,
    )

    return ([CTImageStorage, MRImageStorage, EnhancedCTImageStorage],
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEG2000, JPEGLSLossless,
             JPEGLosslessSV1, RLELossless])


class _Receiver:
    """Writes the instances a PACS sends us (C-GET sub-operations, or C-STOREs to our SCP after a C-MOVE) into
    ``folder`` as ``00000.dcm, 00001.dcm, ...``; an instance of another study or series is refused and counted."""

    def __init__(self, folder: Path, study_uid: str, series_uid: str) -> None:
        self.folder, self.study_uid, self.series_uid = folder, study_uid, series_uid
        self.received = 0
        self.foreign = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            if (str(ds.get("StudyInstanceUID", "")) != self.study_uid
                    or str(ds.get("SeriesInstanceUID", "")) != self.series_uid):
                with self._lock:
                    self.foreign += 1
                return 0xC212  # not an instance of the series asked for
            with self._lock:
                n = self.received
                self.received += 1
            ds.save_as(self.folder / f"{n:05d}.dcm", enforce_file_format=True)
            return 0x0000
        except Exception as exc:  # noqa: BLE001 - answered to the PACS as a failure, reported by the caller
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            return 0xC211

    def check(self, name: str, how: str) -> None:
        """Raise when an instance could not be written or did not belong to the series."""
        if self.errors:
            raise PacsError(f"{name}: {how}: cannot write a received instance ({self.errors[0]}).")
        if self.foreign:
            raise PacsError(f"{name}: {how}: the PACS sent {self.foreign} instance(s) of another study or series; "
                            "they were refused. Is another retrieval sending to the same AE title and port?")


class _Dimse(_Transport):
    def __init__(self, url: str, ae_title: str, timeout_s: float, retrieve: Literal["get", "move"] = "get",
                 ae_port: int = 11112) -> None:
        try:
            import pynetdicom  # noqa: F401
        except ImportError:
            raise MissingDependencyError("DIMSE sources need pynetdicom: pip install 'medseg[pacs]'.") from None
        parts = urlsplit(url)
        if not parts.username or not parts.hostname or not parts.port:
            raise WorkflowError(f"{url}: a DIMSE source is dimse://AET@HOST:PORT (the PACS's AE title, host and port).")
        self.called, self.host, self.port = parts.username, parts.hostname, parts.port
        self.ae_title = ae_title
        self.timeout_s = timeout_s
        self.retrieve_with, self.ae_port = retrieve, ae_port
        self.name = f"dimse://{self.called}@{self.host}:{self.port}"

    def _assoc(self, contexts: Sequence[Any], *, roles: Sequence[Any] = (), handlers: Sequence[Any] = ()) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for ctx in contexts:
            if isinstance(ctx, tuple):
                ae.add_requested_context(*ctx)
            else:
                ae.add_requested_context(ctx)
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called, ext_neg=list(roles) or None,
                                 evt_handlers=list(handlers) or None)
        except (OSError, RuntimeError) as exc:
            raise PacsConnectionError(f"{self.name}: cannot connect ({exc}).") from None
        if not assoc.is_established:
            if assoc.is_rejected:
                raise PacsAuthError(f"{self.name}: the PACS rejected the association from AE title {self.ae_title!r}; "
                                    "ask its administrator to register this AE title (host and port), or give "
                                    "--ae-title.")
            raise PacsConnectionError(f"{self.name}: no association (the PACS did not answer or aborted); is it "
                                      "running? A rerun completes the cases that failed.")
        return assoc

    def _find(self, level: str, keys: Mapping[str, str], want: Sequence[str]) -> list[Any]:
        from pydicom import Dataset

        FIND = _qr_model("Find")

        q = Dataset()
        q.QueryRetrieveLevel = level
        for kw in want:
            setattr(q, kw, "")
        for kw, value in keys.items():
            setattr(q, kw, value.replace(",", "\\") if kw.endswith("UID") else value)
        assoc = self._assoc([FIND])
        out = []
        try:
            for status, identifier in assoc.send_c_find(q, FIND):
                if status is None:
                    raise PacsConnectionError(f"{self.name}: C-FIND ({level}): the association ended without an "
                                              "answer.")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    out.append(identifier)
                elif code != 0x0000:
                    raise PacsError(f"{self.name}: C-FIND ({level}) failed with status 0x{code:04X}.")
        finally:
            assoc.release()
        return out

    def studies(self, filters: Mapping[str, str]) -> list[StudyInfo]:
        found = self._find("STUDY", filters, ["StudyInstanceUID", "NumberOfStudyRelatedInstances"])
        return [StudyInfo(str(ds.StudyInstanceUID), _int(ds.get("NumberOfStudyRelatedInstances")))
                for ds in found if str(ds.get("StudyInstanceUID", "")).strip()]

    def series(self, study_uid: str, *, with_instance: bool) -> list[SeriesInfo]:
        found = self._find("SERIES", {"StudyInstanceUID": study_uid},
                           ["SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
                            "NumberOfSeriesRelatedInstances"])
        out = []
        for ds in found:
            info = SeriesInfo(str(ds.SeriesInstanceUID), str(ds.get("Modality", "")),
                              str(ds.get("SeriesDescription", "")), _int(ds.get("SeriesNumber")),
                              _int(ds.get("NumberOfSeriesRelatedInstances")) or 0)
            if with_instance and info.modality.upper() not in _NON_IMAGE:
                first = self._find("IMAGE", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": info.series_uid},
                                   ["SOPInstanceUID", "ImageOrientationPatient", "SliceThickness"])[:1]
                if first:
                    iop = first[0].get("ImageOrientationPatient")
                    info = SeriesInfo(info.series_uid, info.modality, info.description, info.number, info.n_instances,
                                      _orientation([float(v) for v in iop] if iop else None),
                                      _float(first[0].get("SliceThickness")))
            out.append(info)
        return out

    def instances(self, study_uid: str, series_uid: str) -> list[str]:
        found = self._find("IMAGE", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid},
                           ["SOPInstanceUID"])
        return [str(ds.SOPInstanceUID) for ds in found]

    def retrieve(self, study_uid: str, series_uid: str, folder: Path) -> int:
        from pydicom import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        receiver = _Receiver(folder, study_uid, series_uid)
        if self.retrieve_with == "move":
            return self._move(q, receiver)
        return self._get(q, receiver)

    def _get(self, q: Any, receiver: _Receiver) -> int:
        from pynetdicom import build_role, evt

        GET = _qr_model("Get")
        storage, syntaxes = _storage_contexts()
        # One presentation context per (storage class, transfer syntax): the PACS sends in the syntax it stored.
        contexts: list[Any] = [GET] + [(cls, [ts]) for cls in storage for ts in syntaxes]
        roles = [build_role(cls, scp_role=True) for cls in storage]
        assoc = self._assoc(contexts, roles=roles, handlers=[(evt.EVT_C_STORE, receiver.on_store)])
        final: int | None = None
        try:
            for status, _identifier in assoc.send_c_get(q, GET):
                if status is None:
                    raise PacsConnectionError(f"{self.name}: C-GET: the association ended before the series was "
                                              "complete.")
                final = int(status.Status)
        finally:
            assoc.release()
        receiver.check(self.name, "C-GET")
        if final not in (0x0000, None) and final not in (0xFF00,):
            raise PacsError(f"{self.name}: C-GET of the series ended with status 0x{final:04X} after "
                            f"{receiver.received} instance(s).")
        return receiver.received

    def _move(self, q: Any, receiver: _Receiver) -> int:
        """C-MOVE the series to our own storage SCP (our AE title, ``ae_port`` on every interface of this host),
        which runs only for the duration of the retrieval and is shut down on every path."""
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        MOVE = _qr_model("Move")
        storage, syntaxes = _storage_contexts()
        scp = AE(ae_title=self.ae_title)
        scp.acse_timeout = scp.dimse_timeout = scp.network_timeout = self.timeout_s
        for cls in storage:
            scp.add_supported_context(cls, syntaxes)
        scp.add_supported_context(Verification)
        # Another retrieval of ours (a Dask worker on this host) may hold the port: wait for it, up to the timeout.
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                server = scp.start_server(("", self.ae_port), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, receiver.on_store)])
                assert server is not None  # block=False returns the running server
                break
            except OSError as exc:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise PacsError(f"{self.name}: C-MOVE: cannot listen on port {self.ae_port} for the series the PACS "
                                f"sends to AE title {self.ae_title!r} ({exc.strerror or exc}; waited "
                                f"{self.timeout_s:g} s); is another DICOM receiver using it? Give a free port with "
                                "--ae-port (and register it on the PACS).") from None
        last: Any = None
        try:
            assoc = self._assoc([MOVE])
            try:
                for status, _identifier in assoc.send_c_move(q, self.ae_title, MOVE):
                    if status is None:
                        raise PacsConnectionError(f"{self.name}: C-MOVE: the association ended before the series was "
                                                  "complete.")
                    last = status
            finally:
                assoc.release()
        finally:
            server.shutdown()
        receiver.check(self.name, "C-MOVE")
        final = int(last.Status) if last is not None else None
        failed = _int(last.get("NumberOfFailedSuboperations")) if last is not None else None
        completed = _int(last.get("NumberOfCompletedSuboperations")) if last is not None else None
        destination = (f"The PACS must have it configured as a destination (AE title {self.ae_title!r}, this host's "
                       f"address, port {self.ae_port}) and a firewall must let it connect to that port; ask its "
                       "administrator, or use --retrieve get.")
        if final not in (0x0000, 0xB000):
            code = "no final status" if final is None else f"status 0x{final:04X}"
            comment = str(last.get("ErrorComment", "") or "") if last is not None else ""
            code += f": {comment}" if comment else ""
            if final == 0xA801:
                raise PacsError(f"{self.name}: C-MOVE refused: the PACS does not know the move destination AE title "
                                f"{self.ae_title!r} ({code}). {destination}")
            if receiver.received == 0:
                raise PacsError(f"{self.name}: C-MOVE of the series to AE title {self.ae_title!r} failed before any "
                                f"instance arrived ({code}): the PACS does not know that AE title as a move "
                                f"destination, or cannot reach it. {destination}")
            raise PacsError(f"{self.name}: C-MOVE of the series to AE title {self.ae_title!r} ended with {code} after "
                            f"{receiver.received} instance(s); rerun to retry.")
        if failed:
            raise PacsError(f"{self.name}: C-MOVE: the PACS reports {failed} failed sub-operation(s) (instances it "
                            f"could not send to AE title {self.ae_title!r}); {receiver.received} arrived. Rerun to "
                            "retry.")
        if completed is not None and completed != receiver.received:
            raise PacsError(f"{self.name}: C-MOVE: the PACS reports {completed} instance(s) sent, "
                            f"{receiver.received} arrived at our storage SCP; rerun to retry.")
        return receiver.received

    def store(self, datasets: Sequence[Any]) -> set[str]:
        contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
        assoc = self._assoc([(cls, [ts]) for cls, ts in contexts])
        stored: set[str] = set()
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if status is None or "Status" not in status:
                    raise PacsConnectionError(f"{self.name}: C-STORE: the association ended without an answer.")
                code = int(status.Status)
                if code in (0x0000, 0xB000, 0xB006, 0xB007):
                    stored.add(str(ds.SOPInstanceUID))
                else:
                    logger.warning("%s: C-STORE answered status 0x%04X", self.name, code)
        finally:
            assoc.release()
        return stored


@dataclass(frozen=True)
class _Endpoint:
    """Where a PACS is and how we talk to it (picklable; the connection is made in each process)."""

    url: str
    credentials: Credentials = field(default_factory=Credentials)
    ca_bundle: str | None = None
    ae_title: str = "MEDSEG"
    timeout_s: float = 30.0
    attempts: int = 3
    retrieve: Literal["get", "move"] = "get"
    ae_port: int = 11112

    def __post_init__(self) -> None:
        if not is_pacs_url(self.url):
            raise WorkflowError(f"{self.url!r}: not a PACS address; use dicomweb+http(s)://HOST[:PORT]/PATH or "
                                "dimse://AET@HOST:PORT.")
        parts = urlsplit(self.url)
        if parts.password is not None or (parts.username and not self.url.lower().startswith("dimse")):
            raise PacsAuthError(f"{_plain_url(self.url)}: credentials do not go in the URL (they would end up in shell "
                                "histories and process lists); use MEDSEG_PACS_USER / MEDSEG_PACS_PASSWORD, "
                                "MEDSEG_PACS_TOKEN or --credentials FILE.")
        if not re.fullmatch(r"[ -~]{1,16}", self.ae_title) or self.ae_title.strip() != self.ae_title:
            raise WorkflowError(f"--ae-title {self.ae_title!r}: an AE title is 1-16 printable ASCII characters.")
        if self.retrieve not in ("get", "move"):
            raise WorkflowError(f"--retrieve {self.retrieve!r}: DIMSE retrieval is 'get' (C-GET) or 'move' (C-MOVE to "
                                "our own storage SCP).")
        if self.retrieve == "move" and not self.url.lower().startswith("dimse"):
            raise WorkflowError(f"{_plain_url(self.url)}: --retrieve move is DIMSE C-MOVE; a DICOMweb source "
                                "retrieves with WADO-RS (use dimse://AET@HOST:PORT, or leave --retrieve get).")
        if not 1 <= int(self.ae_port) <= 65535:
            raise WorkflowError(f"--ae-port {self.ae_port}: a TCP port is 1-65535 (default 11112).")

    @property
    def name(self) -> str:
        return _plain_url(self.url) if not self.url.lower().startswith("dimse") else self.url

    def connect(self) -> _Transport:
        if self.url.lower().startswith("dimse"):
            return _Dimse(self.url, self.ae_title, self.timeout_s, self.retrieve, self.ae_port)
        return _DicomWeb(self.url, self.credentials, self.ca_bundle, self.timeout_s, self.attempts)


# ---- the source -----------------------------------------------------------------------------------------------
class _Connected:
    """The connection settings a source and a sink share, as one :class:`_Endpoint` (and its display name)."""

    url: str
    credentials: Credentials
    ca_bundle: str | None
    ae_title: str
    timeout_s: float
    attempts: int
    retrieve: Literal["get", "move"] = "get"  # a source's; a sink never retrieves
    ae_port: int = 11112

    @property
    def endpoint(self) -> _Endpoint:
        return _Endpoint(self.url, self.credentials, self.ca_bundle, self.ae_title, self.timeout_s, self.attempts,
                         self.retrieve, self.ae_port)

    @property
    def name(self) -> str:
        return self.endpoint.name


@dataclass(frozen=True)
class PacsSource(_Connected):
    """Studies in a PACS as batch cases (see the module docstring).

    Parameters
    ----------
    url : str
        ``dicomweb+http(s)://HOST[:PORT]/PATH`` or ``dimse://AET@HOST:PORT``.
    query : mapping
        QIDO-RS / C-FIND study filter (:func:`parse_query`).
    rules : SeriesRules
    cache_dir : path
        Where series are retrieved (``CACHE/<case_id>/``).
    credentials : Credentials
    ca_bundle : str, optional
        PEM file of CA certificates for HTTPS.
    ae_title : str
        Our AE title for DIMSE.
    timeout_s : float
        Per request (HTTP) or per network operation (DIMSE).
    attempts : int
        DICOMweb: tries per request (waits of 1, 2, 4 ... s between them) before a case fails.
    retrieve : {"get", "move"}
        DIMSE: C-GET, or C-MOVE to our own storage SCP (``ae_title`` at ``ae_port`` on this host, started for each
        retrieval), for a PACS that allows only C-MOVE. The PACS must know ``ae_title`` as a move destination.
    ae_port : int
        The port of our storage SCP for C-MOVE (default 11112).
    """

    url: str
    query: Mapping[str, str] = field(default_factory=dict)
    rules: SeriesRules = field(default_factory=SeriesRules)
    cache_dir: Path = Path(".pacs-cache")
    credentials: Credentials = field(default_factory=Credentials)
    ca_bundle: str | None = None
    ae_title: str = "MEDSEG"
    timeout_s: float = 30.0
    attempts: int = 3
    retrieve: Literal["get", "move"] = "get"
    ae_port: int = 11112

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).resolve())
        self.endpoint  # noqa: B018 - checks the URL now

    def studies(self) -> list[StudyInfo]:
        """The studies that match the query (raises PacsAuthError / PacsConnectionError at once: nothing to run)."""
        return self.endpoint.connect().studies(self.query)

    def choose_series(self, transport: _Transport, study: StudyInfo) -> SeriesInfo:
        """The series :attr:`rules` choose in a study.

        Raises
        ------
        PacsError
            If no series passes the rules (each series and the reason are listed, without UIDs).
        """
        candidates = transport.series(study.study_uid, with_instance=self.rules.needs_instance)
        ok, why = [], []
        for s in candidates:
            reason = self.rules.reason_against(s)
            if reason is None:
                ok.append(s)
            else:
                why.append(f"series {s.number if s.number is not None else '?'} ({s.modality}, "
                           f"{s.n_instances} instances): {reason}")
        if not ok:
            raise PacsError(f"case {study.case_id}: no series of the study passes the series rules "
                            f"({'; '.join(why) or 'the study has no series'}); change --series.")
        ok.sort(key=lambda s: (-s.n_instances, s.number if s.number is not None else 1 << 30))
        return ok[0]

    def manifest(self, studies: Sequence[StudyInfo] | None = None) -> Manifest:
        """One case per study (images not fetched yet: :meth:`fetch` does that when the runner reads the case).

        Raises
        ------
        PacsAuthError, PacsConnectionError, PacsError
            When the PACS cannot be queried (wrong password, down, no such path).
        """
        found = self.studies() if studies is None else list(studies)
        cases = [Case(s.case_id, self.cache_dir / s.case_id, extra={"pacs_study_uid": s.study_uid}) for s in found]
        return Manifest(tuple(cases), self.cache_dir, description=f"studies from {self.name}")

    def _marker(self, case_id: str) -> Path:
        return self.cache_dir / f"{case_id}.complete.json"

    def _complete(self, case_id: str) -> bool:
        """True when ``CACHE/<case_id>/`` holds every file its completion marker lists."""
        try:
            listed = json.loads(self._marker(case_id).read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        folder = self.cache_dir / case_id
        return bool(listed) and all((folder / name).is_file() for name in listed)

    def fetch(self, case: Case) -> Case:
        """Retrieve the case's series into ``CACHE/<case_id>/`` (unless already complete) and return the case.

        Raises
        ------
        PacsError
            If the study or series is no longer in the PACS, no series passes the rules, or the retrieval
            delivered fewer instances than the PACS lists.
        PacsConnectionError, PacsAuthError
        """
        study_uid = str(case.extra.get("pacs_study_uid", ""))
        folder = self.cache_dir / case.case_id
        if self._complete(case.case_id):
            return case
        self._marker(case.case_id).unlink(missing_ok=True)
        transport = self.endpoint.connect()
        try:
            series = self.choose_series(transport, StudyInfo(study_uid, None))
            expected = transport.instances(study_uid, series.series_uid)
            if not expected:
                raise PacsError(f"case {case.case_id}: the chosen series has no instance on the PACS any more (deleted "
                                "since the query?).")
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f".{case.case_id}.{uuid.uuid4().hex[:8]}.partial"
            tmp.mkdir()
            try:
                n = transport.retrieve(study_uid, series.series_uid, tmp)
                if n < len(expected):
                    raise PacsError(f"case {case.case_id}: the PACS delivered {n} of the {len(expected)} instances "
                                    "it lists for the series; rerun to retry.")
                names = sorted(p.name for p in tmp.iterdir())
                if folder.exists():
                    shutil.rmtree(folder)
                os.replace(tmp, folder)
                atomic_write_text(self._marker(case.case_id), json.dumps({"files": names}) + "\n")
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            transport.close()
        logger.info("case %s: %d instance(s) retrieved from %s", case.case_id, len(expected), self.name)
        return case


# ---- pushing --------------------------------------------------------------------------------------------------
def _uid_problems(datasets: Sequence[Any], names: Sequence[str]) -> list[str]:
    problems = []
    for kw in _REQUIRED_UIDS:
        bad = [n for ds, n in zip(datasets, names, strict=True) if not str(ds.get(kw, "") or "").strip()]
        if bad:
            problems.append(f"{kw} blank or missing in {len(bad)} of {len(names)} file(s) (e.g. {bad[0]})")
    return problems


def store_files(endpoint: PacsSink | PacsSource | str, files: Sequence[str | os.PathLike[str]], *,
                check_uids: bool = True) -> list[str]:
    """Store DICOM files in a PACS (STOW-RS or C-STORE) and verify that it stored every one.

    Parameters
    ----------
    endpoint : PacsSink, PacsSource or URL
    files : paths
        DICOM files (a series, a SEG).
    check_uids : bool
        Refuse, before sending anything, files with a blank or missing SOPClassUID, SOPInstanceUID,
        StudyInstanceUID or SeriesInstanceUID (a PACS cannot file them; Orthanc's STOW-RS drops them and still
        answers HTTP 200). With False the files are sent and the answer's verification catches the drop.

    Returns
    -------
    list of str
        The SOPInstanceUIDs stored.

    Raises
    ------
    PacsPushError
        If a UID is missing (the message names which, in how many files), or the PACS's answer does not reference
        every instance sent, or a stored instance cannot be found afterwards.
    PacsAuthError, PacsConnectionError
    """
    import pydicom

    if isinstance(endpoint, str):
        endpoint = PacsSink(endpoint)
    paths = [Path(f) for f in files]
    datasets = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(p))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
            raise PacsPushError(f"{p}: not a readable DICOM file ({type(exc).__name__}); nothing was sent.") from None
    if not datasets:
        raise PacsPushError("no file to store; nothing was sent.")
    if check_uids:
        problems = _uid_problems(datasets, [p.name for p in paths])
        if problems:
            raise PacsPushError(f"{paths[0].parent}: refused, nothing was sent: {'; '.join(problems)}. A PACS cannot "
                                "file instances without these UIDs; repair the series (medseg segment --repair-uids "
                                "writes a fixed copy) and send that.")
    sent = [str(ds.get("SOPInstanceUID", "") or "") for ds in datasets]
    transport = endpoint.endpoint.connect()
    try:
        stored = transport.store(datasets)
        missing = [u for u in sent if not u or u not in stored]
        if missing:
            raise PacsPushError(f"{transport.name}: the PACS's answer references {len(sent) - len(missing)} of the "
                                f"{len(sent)} instance(s) sent; {len(missing)} were not stored (blank UIDs: "
                                f"{sum(1 for u in missing if not u)}). The push is not complete.")
        by_series: dict[tuple[str, str], set[str]] = {}
        for ds in datasets:
            by_series.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), set()).add(
                str(ds.SOPInstanceUID))
        for (study, series), uids in by_series.items():
            found = set(transport.instances(study, series))
            if not uids <= found:
                raise PacsPushError(f"{transport.name}: the PACS acknowledged the push but lists only "
                                    f"{len(uids & found)} of the {len(uids)} instance(s) afterwards.")
    finally:
        transport.close()
    return sent


@dataclass(frozen=True)
class PacsSink(_Connected):
    """Where each case's DICOM SEG (and, with ``push_sr``, its DICOM SR summary) is pushed, verified, once.

    Parameters
    ----------
    url : str
        ``dicomweb+http(s)://...`` or ``dimse://AET@HOST:PORT``.
    credentials, ca_bundle, ae_title, timeout_s, attempts :
        As for :class:`PacsSource`.
    push_sr : bool
        Also push the case's ``summary-sr.dcm`` (:func:`medseg.io.dicom_sr.write_dicom_sr`) after its SEG.
    """

    url: str
    credentials: Credentials = field(default_factory=Credentials)
    ca_bundle: str | None = None
    ae_title: str = "MEDSEG"
    timeout_s: float = 30.0
    attempts: int = 3
    push_sr: bool = False

    def __post_init__(self) -> None:
        self.endpoint  # noqa: B018 - checks the URL now

    def _record(self, folder: Path) -> dict[str, Any] | None:
        p = folder / PUSH_RECORD_NAME
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("destination") == self.name else None

    def pushed(self, folder: Path) -> dict[str, Any] | None:
        """The case's verified push record for this destination, if it holds all this sink pushes (SEG, SR)."""
        record = self._record(folder)
        if record is None or (self.push_sr and not isinstance(record.get("sr"), dict)):
            return None
        return record

    def push(self, case_id: str, seg_path: Path, folder: Path, sr_path: Path | None = None) -> str:
        """Push the case's SEG (then its SR) unless this destination already holds a verified push of it; return a
        note.

        Raises
        ------
        PacsPushError, PacsAuthError, PacsConnectionError
            The case is then recorded as failed, and a rerun pushes what is missing.
        """
        record = self._record(folder)
        notes = []
        if record is not None:
            notes.append(f"SEG already pushed to {self.name} at {record.get('time')}; not pushed again")
        else:
            t0 = time.perf_counter()
            uids = store_files(self, [seg_path])
            record = {"destination": self.name, "sop_instance_uids": uids, "seg_sha256": _sha256(seg_path),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 3),
                      "verified": True}
            atomic_write_text(folder / PUSH_RECORD_NAME, json.dumps(record, indent=2) + "\n")
            logger.info("case %s: SEG pushed to %s and verified", case_id, self.name)
            notes.append(f"SEG pushed to {self.name} and verified")
        if self.push_sr:
            if isinstance(record.get("sr"), dict):
                notes.append(f"SR already pushed to {self.name}; not pushed again")
            else:
                if sr_path is None or not Path(sr_path).is_file():
                    raise PacsPushError(f"case {case_id}: no DICOM SR to push (the case has no "
                                        f"{Path(sr_path or 'summary-sr.dcm').name}); it is written with the SEG when "
                                        "the SR is asked for (--push-sr or --dicom-sr).")
                _check_sr_references(case_id, Path(sr_path), record)
                t0 = time.perf_counter()
                sr_uids = store_files(self, [Path(sr_path)])
                record["sr"] = {"sop_instance_uids": sr_uids, "sr_sha256": _sha256(Path(sr_path)),
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "seconds": round(time.perf_counter() - t0, 3), "verified": True}
                atomic_write_text(folder / PUSH_RECORD_NAME, json.dumps(record, indent=2) + "\n")
                logger.info("case %s: SR pushed to %s and verified", case_id, self.name)
                notes.append(f"SR pushed to {self.name} and verified")
        return "; ".join(notes)


def _check_sr_references(case_id: str, sr_path: Path, record: Mapping[str, Any]) -> None:
    """The SR must measure the SEG that this destination holds (not a newer SEG of a redone case)."""
    import pydicom

    ds = pydicom.dcmread(sr_path, stop_before_pixels=True)
    referenced = {str(item.ReferencedSOPInstanceUID) for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                  for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    pushed = set(record.get("sop_instance_uids") or [])
    if not pushed & referenced:
        raise PacsPushError(f"case {case_id}: its DICOM SR measures a SEG that is not the one pushed earlier to this "
                            "PACS (the case was redone after its SEG was pushed); not pushed. Delete the case's "
                            f"{PUSH_RECORD_NAME} to push the new SEG and its SR, or remove the old SEG from the PACS "
                            "first.")


def _sha256(p: Path) -> str:
    from medseg.files import sha256_file

    return sha256_file(p)


# ---- watch mode -----------------------------------------------------------------------------------------------
@dataclass
class _WatchState:
    """``OUT/watch.json``: per case, the last instance count seen, since when, and whether it was run."""

    path: Path
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _WatchState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(path, dict(data.get("studies", {})))
        except (OSError, ValueError, AttributeError):
            return cls(path)

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"studies": self.studies}, indent=2, sort_keys=True) + "\n")


def watch(
    source: PacsSource,
    out_dir: str | Path,
    /,
    options: RunOptions,
    *,
    sink: PacsSink | None = None,
    interval_s: float = 30.0,
    stable_s: float = 60.0,
    max_polls: int | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[RunEvent], None] | None = None,
    on_poll: Callable[[int, list[RunResult]], None] | None = None,
) -> list[RunResult]:
    """Poll ``source``; run each new stable study once (segment, write, push); survive restarts.

    A study is stable when the PACS has listed the same number of instances for it for at least ``stable_s``
    seconds. A study is done once its case is done (its record in ``OUT/watch.json`` says so, and the runner's
    status record and ``push.json`` make a rerun skip it); a failed case is retried at the next poll.

    Parameters
    ----------
    source : PacsSource
    out_dir : path
        The results folder (the runner's layout, plus ``watch.json``).
    options : RunOptions
        As for :func:`medseg.workflow.run_batch` (``--push`` needs ``outputs.dicom_seg``).
    sink : PacsSink, optional
    interval_s, stable_s : float
        Seconds between polls; seconds without a new instance before a study is run.
    max_polls : int, optional
        Stop after this many polls (default: run until ``stop`` is set or the process is interrupted).
    stop : threading.Event, optional
    progress : callable, optional
        The runner's progress callback.
    on_poll : callable, optional
        Called after every poll with its number and the runs of this call so far.

    Returns
    -------
    list of RunResult
        One per poll that ran cases.

    Raises
    ------
    PacsAuthError
        At the first poll when the PACS refuses our credentials (later polls log connection errors and go on).
    """
    from medseg.workflow import run_batch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _WatchState.load(out / WATCH_RECORD_NAME)
    results: list[RunResult] = []
    polls = 0
    while not (stop is not None and stop.is_set()):
        polls += 1
        now = time.time()
        try:
            studies = source.studies()
        except PacsConnectionError as exc:
            if polls == 1 and not state.studies:
                raise
            logger.warning("watch: poll %d: %s", polls, exc)
            studies = None
        if studies is not None:
            ready = []
            for s in studies:
                entry = state.studies.setdefault(s.case_id, {"instances": s.n_instances, "since": now, "done": False})
                if entry.get("done"):
                    continue
                if entry.get("instances") != s.n_instances:
                    entry.update(instances=s.n_instances, since=now)
                elif now - float(entry.get("since", now)) >= stable_s:
                    ready.append(s)
            state.save()
            if ready:
                logger.info("watch: poll %d: %d stable new stud(y/ies)", polls, len(ready))
                result = run_batch(source.manifest(ready), out, options, progress=progress, source=source, sink=sink)
                for record in result.records:
                    if record.state in ("done", "skipped"):
                        state.studies[record.case_id]["done"] = True
                        state.studies[record.case_id]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                state.save()
                results.append(result)
        if on_poll is not None:
            on_poll(polls, results)
        if max_polls is not None and polls >= max_polls:
            break
        if stop is not None:
            stop.wait(interval_s)
        else:
            time.sleep(interval_s)
    return results


def open_endpoints(
    inputs: str,
    *,
    cache_dir: str | os.PathLike[str],
    query: Sequence[str] = (),
    series: Sequence[str] = (),
    push: bool = False,
    push_to: str | None = None,
    credentials_file: str | os.PathLike[str] | None = None,
    ca_bundle: str | None = None,
    ae_title: str = "MEDSEG",
    timeout_s: float = 30.0,
    retrieve: Literal["get", "move"] = "get",
    ae_port: int = 11112,
    push_sr: bool = False,
) -> tuple[PacsSource | None, PacsSink | None]:
    """The source and sink that ``medseg batch`` / ``medseg watch`` options describe.

    Parameters
    ----------
    inputs : str
        A PACS URL (a source), or a folder / manifest (no source; ``push_to`` may still name a sink).
    cache_dir : path
        Where the source retrieves series.
    query, series : sequence of str
        ``Keyword=value`` study filters (:func:`parse_query`) and series rules (:meth:`SeriesRules.parse`).
    push : bool
        Push each SEG back to the source PACS (needs a PACS source).
    push_to : str, optional
        Push to this PACS instead (any source).
    credentials_file, ca_bundle, ae_title, timeout_s :
        As for :class:`PacsSource` (one set of credentials serves source and sink).
    retrieve, ae_port :
        DIMSE retrieval by C-GET or C-MOVE to our storage SCP at ``ae_port`` (:class:`PacsSource`).
    push_sr : bool
        Push each case's DICOM SR summary after its SEG (needs ``push`` or ``push_to``).

    Raises
    ------
    WorkflowError
        For PACS options without a PACS, or unreadable filters and rules.
    PacsAuthError
        For an unsafe credentials file or a URL holding a password.
    """
    is_url = is_pacs_url(inputs)
    if not is_url and (query or series):
        raise WorkflowError(f"{inputs}: --query and --series select studies in a PACS; the input is not a PACS URL "
                            "(dicomweb+http(s)://HOST[:PORT]/PATH or dimse://AET@HOST:PORT).")
    if push and not is_url and push_to is None:
        raise WorkflowError(f"{inputs}: --push sends the SEGs back to the PACS they came from; the input is a folder "
                            "or manifest, so give --push-to URL.")
    if push_sr and not push and push_to is None:
        raise WorkflowError("--push-sr pushes each case's DICOM SR after its SEG: give --push (back to the source "
                            "PACS) or --push-to URL as well (--dicom-sr writes the SR without pushing it).")
    if not is_url and (retrieve != "get" or ae_port != 11112):
        raise WorkflowError(f"{inputs}: --retrieve and --ae-port choose how studies are retrieved from a DIMSE PACS; "
                            "the input is not a PACS URL.")
    credentials = resolve_credentials(credentials_file)
    common = {"credentials": credentials, "ca_bundle": ca_bundle, "ae_title": ae_title, "timeout_s": timeout_s}
    source = (PacsSource(inputs, parse_query(query), SeriesRules.parse(series), Path(cache_dir),
                         retrieve=retrieve, ae_port=ae_port, **common)  # type: ignore[arg-type]
              if is_url else None)
    target = push_to if push_to is not None else (inputs if push else None)
    sink = PacsSink(target, push_sr=push_sr, **common) if target is not None else None  # type: ignore[arg-type]
    return source, sink
