"""Batch runs: workflow recipes and the resumable runner (in-process or on a Dask cluster).

:func:`run_batch` segments every case of a :class:`~medseg.manifest.Manifest` with one model and writes the
**results layout** that :func:`medseg.report.find_cases` reads::

    OUT/
      <case_id>/pred.nii.gz          labels on the scan's own grid (+ pred.labels.json, the label table)
      <case_id>/ref.nii.gz           the reference labels, when the manifest has them (for the report)
      <case_id>/segmentation.dcm     DICOM SEG, for DICOM inputs when asked for
      <case_id>/summary-sr.dcm       DICOM SR (TID 1500) of the SEG's segments' volumes, when asked for
      <case_id>/stats.csv            volume and intensity statistics per label
      <case_id>/metrics.csv          Dice, HD95, ... against the reference, when there is one
      <case_id>/status.json          the case's status record, written LAST
      statistics.csv                 one table over all done cases (case_id first)
      metrics.csv                    one table over all evaluated cases
      report.html                    (+ report_metrics.csv, report_stats.csv, report.json)
      run.json                       the run record

Guarantees:

- every file is written atomically (:mod:`medseg.files`: a temporary name in the same folder, then a rename), and
  a case's ``status.json`` is written after all its outputs, so a case without a complete record is redone and
  nothing partial is ever left under a final name; temporaries a killed run left are removed when a run starts
  and ends;
- a rerun skips a case whose record says ``done`` for the same input sha256, model sha256 and options, and whose
  outputs still have the sha256 it records; every other case is (re)done, failed ones included;
- a failing case (missing file, checksum mismatch, unreadable or truncated DICOM, several series and none
  chosen, a 2D image, a model error) is recorded with its error and the run goes on;
- the model is loaded once per process (per Dask worker); in-process, the next case is read in a background
  thread while the current one is segmented (``prefetch``). The DICOM loader's forked parallel decode of
  compressed series needs a single-threaded process, so the runner says which it wants instead of letting the
  loader find out: ``decode_workers=1`` (serial) when it reads in the prefetch thread or in a Dask worker, the
  loader's automatic choice with ``prefetch=False`` in-process (the choice for few large compressed series);
- privacy: logs, records, CSV/JSON and the report name cases by ``case_id`` only. Patient name, ID and birth
  date are never read, except with ``include_phi=True``, which adds them to the status and run records and to
  ``statistics.csv`` (DICOM SEG objects carry the patient module by design).

Exit status of ``medseg batch`` / ``medseg run`` (:attr:`RunResult.exit_status`): 0 when every case is done
(or skipped as already done), 3 when the run finished with failed cases, 2 for a usage or recipe error.

Workflow recipes (``workflows/*.yaml``, :func:`load_workflow`)::

    name: ct-organs-phantoms
    model: phantom-abdomen-ct                 # a model name, card path or bundle folder
    inputs: {manifest: ../data_manifests/demo-phantoms.json}   # or {folder: studies/}
    outputs: {folder: runs/ct-organs, labels: true, dicom_seg: false, seg_type: binary, dicom_sr: false,
              stats: true, metrics: true, report: true, image: false}
    inference: {device: cpu, fast: false, tta: false, overlap: null, amp: null, torch_threads: null}
    executor: {kind: local, workers: 2, scheduler: null, prefetch: true, retries: 2, memory_limit: 4GiB}
    include_phi: false

A recipe can take its studies from a PACS and push each DICOM SEG back, as ``medseg batch URL --push`` does
(``docs/pacs.md``; the keys are the command's option names)::

    inputs:
      pacs: dicomweb+https://pacs.example.org/dicom-web     # or dimse://AET@HOST:PORT
      query: {ModalitiesInStudy: CT, StudyDate: 20240101-20241231}   # --query Keyword=value
      series: [modality=CT, orientation=axial]               # --series rule=value
      cache: cache/                                          # default OUT/.pacs-cache
      ca_bundle: site-ca.pem                                 # --ca-bundle (HTTPS)
      credentials_file: ~/.medseg-pacs                       # --credentials (a user:password file, chmod 600)
      ae_title: MEDSEG                                       # --ae-title (DIMSE)
      retrieve: get                                          # DIMSE: get (C-GET) or move (C-MOVE)
      ae_port: 11112                                         # --ae-port: our storage SCP for C-MOVE
      timeout: 30                                            # --timeout, seconds per request
    outputs: {folder: runs/pacs, push: true, push_sr: false} # true: back to the source; or a PACS URL
                                                             # push_sr: the DICOM SR summary too (--push-sr)

Credentials never go in a recipe: a ``password``, ``token``, ``user`` or ``credentials`` key anywhere is refused
(use ``MEDSEG_PACS_USER`` + ``MEDSEG_PACS_PASSWORD``, ``MEDSEG_PACS_TOKEN`` or ``credentials_file``).

Relative paths resolve against the recipe's folder; ``medseg run RECIPE --set outputs.folder=/tmp/x`` overrides a
field (the value is read as YAML).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import platform
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medseg.errors import MedsegError, NotVolumetricError, WorkflowError
from medseg.files import atomic_write_text, remove_partials, sha256_file
from medseg.manifest import Case, Manifest, make_manifest, read_manifest, verify_case
from medseg.schema import SchemaReader, read_yaml

if TYPE_CHECKING:  # pragma: no cover
    from medseg.inference import Segmenter
    from medseg.volume import Volume

__all__ = [
    "EXIT_FAILED_CASES",
    "EXIT_OK",
    "EXIT_USAGE",
    "CaseRecord",
    "OutputOptions",
    "PacsSettings",
    "RunEvent",
    "RunOptions",
    "RunResult",
    "Workflow",
    "load_manifest_or_folder",
    "load_workflow",
    "parse_workflow",
    "run_batch",
    "run_workflow",
]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED_CASES = 3

STATUS_NAME = "status.json"
#: Every file the runner may write in a case folder (a redone or failed case loses the ones it did not rewrite,
#: so neither the report nor a reader ever sees an earlier run's output as this run's).
CASE_OUTPUTS = ("pred.nii.gz", "pred.labels.json", "image.nii.gz", "segmentation.dcm", "summary-sr.dcm", "stats.csv",
                "metrics.csv", "ref.nii.gz", "ref.labels.json")
RUN_RECORD_NAME = "run.json"
SR_NAME = "summary-sr.dcm"  # medseg.io.dicom_sr.SR_NAME (not imported here: highdicom loads only when an SR is made)
RECORD_VERSION = 1

SegType = Literal["binary", "labelmap"]


# ---- options --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputOptions:
    """What the runner writes per case (see the module docstring for the layout).

    Attributes
    ----------
    labels : bool
        ``pred.nii.gz`` with its label table (always needed by the statistics, metrics and report; when False the
        labels are still written, this only documents that a caller wants them).
    dicom_seg : bool
        ``segmentation.dcm`` for DICOM inputs (:func:`medseg.io.dicom_seg.write_dicom_seg`, with the model's
        name, version and weights sha256 as the algorithm); non-DICOM inputs get none and their record says why.
    seg_type : {"binary", "labelmap"}
        DICOM SEG type.
    dicom_sr : bool
        ``summary-sr.dcm`` beside each ``segmentation.dcm``: a DICOM SR Measurement Report (TID 1500) of the SEG's
        segments, volume in ml and, for CT, mean HU (:func:`medseg.io.dicom_sr.write_dicom_sr`). Needs
        ``dicom_seg``. A case done by an earlier run without it gets it from its SEG and labels, not resegmented.
    stats : bool
        ``stats.csv`` per case and ``statistics.csv`` over all cases.
    metrics : bool
        ``metrics.csv`` (and ``ref.nii.gz``) for cases with reference labels, and ``metrics.csv`` over them.
    report : bool
        ``report.html`` over all done cases at the end.
    image : bool
        Also write the scan as ``image.nii.gz`` in each case folder (report thumbnails; costs disk).
    """

    labels: bool = True
    dicom_seg: bool = False
    seg_type: SegType = "binary"
    dicom_sr: bool = False
    stats: bool = True
    metrics: bool = True
    report: bool = True
    image: bool = False


@dataclass(frozen=True)
class RunOptions:
    """How a batch runs: model and inference settings, outputs, executor, privacy.

    Attributes
    ----------
    model : str
        Model name, card path or MONAI bundle folder.
    models_dirs : tuple of str
        User folders of cards and bundles.
    device : str or None
        "cpu", "cuda", "cuda:N", "mps"; None picks the best available.
    fast : bool
        The inference preset of ``medseg segment --fast``.
    tta : bool or None
        Mirroring test-time augmentation (``--tta/--no-tta``); None: the model's default (on for nnU-Net folders
        whose checkpoint allows it, as ``nnUNetv2_predict``; off otherwise).
    overlap : float or None
        Sliding-window overlap (None: the card's).
    amp : bool or None
        Mixed precision (None: the preset's choice).
    torch_threads : int or None
        ``torch.set_num_threads`` in every process that segments (None: leave PyTorch's default). CPU results can
        differ in the last bits with the thread count, so runs meant to be byte-identical use the same value.
    outputs : OutputOptions
    executor : {"local", "dask"}
        In-process, or one task per case on a Dask cluster (a LocalCluster of ``workers`` processes, or
        ``scheduler``).
    workers : int
        LocalCluster worker processes.
    scheduler : str or None
        Address of a running Dask scheduler (``tcp://host:8786``); implies ``executor="dask"``.
    prefetch : bool
        In-process: read the next case in a background thread while the current one is segmented.
    retries : int
        Dask: times a case is retried after it raised an unexpected error (a lost worker is always retried, up
        to the scheduler's ``allowed-failures``).
    memory_limit : str
        Dask LocalCluster memory limit per worker (a worker above it is restarted and its case retried).
    include_phi : bool
        Add patient name, ID and birth date to the records and ``statistics.csv``.
    trust_bundle_code : bool
        Run a MONAI bundle's own code (``--trust-bundle-code``; see :class:`medseg.inference.Segmenter`).
    """

    model: str = "phantom-abdomen-ct"
    models_dirs: tuple[str, ...] = ()
    device: str | None = None
    fast: bool = False
    tta: bool | None = None
    overlap: float | None = None
    amp: bool | None = None
    torch_threads: int | None = None
    outputs: OutputOptions = field(default_factory=OutputOptions)
    executor: Literal["local", "dask"] = "local"
    workers: int = 2
    scheduler: str | None = None
    prefetch: bool = True
    retries: int = 2
    memory_limit: str = "4GiB"
    include_phi: bool = False
    trust_bundle_code: bool = False

    def __post_init__(self) -> None:
        if self.executor not in ("local", "dask"):
            raise WorkflowError(f"executor must be 'local' or 'dask', not {self.executor!r}.")
        if self.workers < 1:
            raise WorkflowError(f"workers must be at least 1, not {self.workers}.")
        if self.outputs.dicom_sr and not self.outputs.dicom_seg:
            raise WorkflowError("dicom_sr output (--dicom-sr) summarises each case's DICOM SEG: turn dicom_seg output "
                                "on as well (--dicom-seg).")
        if self.outputs.seg_type not in ("binary", "labelmap"):
            raise WorkflowError(f"seg_type must be 'binary' or 'labelmap', not {self.outputs.seg_type!r}.")
        if self.overlap is not None and not 0.0 <= self.overlap < 1.0:
            raise WorkflowError(f"overlap must be in [0, 1), not {self.overlap}.")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise WorkflowError(f"torch_threads must be at least 1, not {self.torch_threads}.")

    def check_available(self) -> None:
        """Check that this installation can honour the options (DICOM SEG writer, dask.distributed).

        Raises
        ------
        WorkflowError
            Naming what is missing and what to do.
        """
        if self.outputs.dicom_seg:
            try:
                import highdicom  # noqa: F401
            except ImportError:
                raise WorkflowError("DICOM SEG output (dicom_seg / --dicom-seg) needs highdicom: pip install "
                                    "highdicom.") from None
        if self.executor == "dask" or self.scheduler:
            try:
                import distributed  # noqa: F401
            except ImportError:
                raise WorkflowError("the Dask executor needs dask.distributed: pip install 'medseg[dask]'.") from None

    def result_options(self) -> dict[str, Any]:
        """The options that change a case's outputs (recorded, and compared when a rerun decides to skip)."""
        out = asdict(self.outputs)
        out.pop("report")
        out.pop("dicom_sr")  # an extra file from the same labels: a done case gets it without being redone
        return {"device": self.device, "fast": self.fast, "tta": self.tta, "overlap": self.overlap, "amp": self.amp,
                "torch_threads": self.torch_threads, "outputs": out}


# ---- records --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseRecord:
    """The status record of one case (``<case_id>/status.json``).

    Attributes
    ----------
    case_id : str
    state : {"done", "failed", "skipped"}
        "skipped": an earlier run's record matched; the outputs are that run's.
    inputs_sha256 : mapping
        ``{"image": hex, "label": hex}`` as computed for this run.
    outputs : mapping
        File name (relative to the case folder) → sha256.
    timings_s : mapping
        Seconds per stage: verify, read, segment, write, dicom_seg, stats, metrics, total.
    error : str or None
        The failure message (starting with the error type).
    error_type : str or None
    notes : tuple of str
        Things the case did not produce and why (e.g. DICOM SEG for a NIfTI input).
    phi : mapping or None
        Patient name, ID and birth date (only with ``include_phi``).
    model, options, versions, device :
        What produced the outputs (model name, version and sha256; the result options; library versions).
    worker : str or None
        The Dask worker that ran the case.
    run_id : str or None
        The run that wrote the record (a Dask task retried within one run finds its own record: "done").
    model_loads : int
        How many times the process that ran the case had loaded a model until then (1: loaded once, kept).
    push_pending : bool
        A failed case whose outputs were all written but whose push to the PACS failed: the outputs are kept (and
        listed), and a rerun pushes them without segmenting again, so that what the PACS already holds (a SEG
        whose SR push failed) stays the one the case refers to.
    """

    case_id: str
    state: Literal["done", "failed", "skipped"]
    inputs_sha256: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    timings_s: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None
    notes: tuple[str, ...] = ()
    phi: Mapping[str, str] | None = None
    model: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    device: str | None = None
    worker: str | None = None
    run_id: str | None = None
    model_loads: int = 0
    push_pending: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["record_version"] = RECORD_VERSION
        out["notes"] = list(self.notes)
        if self.phi is None:
            out.pop("phi")
        if not self.push_pending:
            out.pop("push_pending")
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaseRecord:
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["notes"] = tuple(kwargs.get("notes") or ())
        return cls(**kwargs)


@dataclass(frozen=True)
class RunEvent:
    """Progress of a run, for a progress bar or JSON log lines.

    ``kind``: "start" (``total`` known), "case" (one case finished: ``record``), "end".
    """

    kind: Literal["start", "case", "end"]
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    record: CaseRecord | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.kind, "total": self.total, "done": self.done, "failed": self.failed,
                               "skipped": self.skipped, "seconds": round(self.seconds, 3)}
        if self.record is not None:
            out.update({"case_id": self.record.case_id, "state": self.record.state, "error": self.record.error,
                        "case_seconds": self.record.timings_s.get("total")})
        return out


@dataclass(frozen=True)
class RunResult:
    """What :func:`run_batch` did.

    Attributes
    ----------
    out_dir : Path
    records : tuple of CaseRecord
        In manifest order.
    run_record : Path
        ``run.json``.
    statistics_csv, metrics_csv, report_html : Path or None
    seconds : float
    """

    out_dir: Path
    records: tuple[CaseRecord, ...]
    run_record: Path
    statistics_csv: Path | None = None
    metrics_csv: Path | None = None
    report_html: Path | None = None
    seconds: float = 0.0

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.records)

    @property
    def failed(self) -> tuple[CaseRecord, ...]:
        return tuple(r for r in self.records if r.state == "failed")

    @property
    def exit_status(self) -> int:
        """0 when every case is done or skipped, 3 when some failed."""
        return EXIT_FAILED_CASES if self.failed else EXIT_OK


# ---- model identity, versions, PHI -----------------------------------------------------------------------------
def _model_identity(card: Any) -> dict[str, Any]:
    """Name, version, kind and the sha256 that identifies the model's behaviour (weights, else the card file)."""
    sha = card.weights.sha256 if card.weights is not None else None
    if sha is None and card.weights is not None and card.weights.path.is_file():
        sha = sha256_file(card.weights.path)
    card_sha = sha256_file(card.source) if card.source is not None and Path(card.source).is_file() else None
    return {"name": card.name, "version": card.version, "kind": card.kind, "weights_sha256": sha,
            "card_sha256": card_sha}


def versions() -> dict[str, str]:
    """Versions of Python, medseg and the libraries that shape the outputs."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("medseg", "numpy", "torch", "monai", "nibabel", "SimpleITK", "pydicom", "highdicom", "dask",
                 "distributed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _read_phi(volume: Volume) -> dict[str, str] | None:
    """Patient name, ID and birth date of a DICOM-sourced volume (only called with ``include_phi``)."""
    if volume.source is None or not volume.source.files:
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(volume.source.files[0], stop_before_pixels=True,
                             specific_tags=["PatientName", "PatientID", "PatientBirthDate"])
    except Exception:  # noqa: BLE001 - PHI is optional extra information; the case itself already loaded
        return None
    return {"patient_name": str(ds.get("PatientName", "")), "patient_id": str(ds.get("PatientID", "")),
            "patient_birth_date": str(ds.get("PatientBirthDate", ""))}


# ---- one case -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Everything a process needs to run cases (picklable: it travels to Dask workers)."""

    out_dir: Path
    options: RunOptions
    model: Mapping[str, Any]
    versions: Mapping[str, str]
    root: Path
    run_id: str = ""
    source: Any = None  # a medseg.pacs.PacsSource: fetch(case) brings the case's images into its cache first
    sink: Any = None  # a medseg.pacs.PacsSink: push(case_id, seg_path, folder) sends a finished case's SEG


_SEGMENTERS: dict[tuple[Any, ...], Any] = {}
_SEGMENTER_LOCK = threading.Lock()
_MODEL_LOADS = [0]  # models loaded by this process (recorded per case: a worker loads its model once)


def _segmenter(options: RunOptions) -> Segmenter:
    """The process's Segmenter for these options, loaded once (per process, so once per Dask worker)."""
    key = (options.model, options.models_dirs, options.device, options.fast, options.tta, options.overlap,
           options.amp, options.torch_threads, options.trust_bundle_code)
    with _SEGMENTER_LOCK:
        if key not in _SEGMENTERS:
            from medseg.inference import InferenceOptions, Segmenter

            if options.torch_threads is not None:
                import torch

                torch.set_num_threads(options.torch_threads)
            base = InferenceOptions.fast(device=options.device) if options.fast else InferenceOptions()
            changes: dict[str, Any] = {"device": options.device}
            if options.overlap is not None:
                changes["overlap"] = options.overlap
            if options.amp is not None:
                changes["amp"] = options.amp
            if options.tta is not None:
                changes["tta"] = options.tta
            _SEGMENTERS.clear()  # one model per process
            _MODEL_LOADS[0] += 1
            _SEGMENTERS[key] = Segmenter(options.model, models_dirs=list(options.models_dirs), options=base,
                                         trust_bundle_code=options.trust_bundle_code, **changes)
        return _SEGMENTERS[key]  # type: ignore[no-any-return]


def _scrub(message: str, plan: _Plan, case: Case) -> str:
    """Error text without the absolute folders (which may hold names chosen by the site) unless include_phi."""
    if plan.options.include_phi:
        return message
    for p, name in ((case.image, "<image>"), (plan.root, "<root>"), (plan.out_dir, "<out>")):
        message = message.replace(str(p), name)
    return message


def _read_record(folder: Path) -> CaseRecord | None:
    p = folder / STATUS_NAME
    if not p.is_file():
        return None
    try:
        return CaseRecord.from_json(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("unreadable status record %s (%s); the case is redone", p.name, exc)
        return None


def _already_done(folder: Path, digests: Mapping[str, str], plan: _Plan) -> CaseRecord | None:
    """The earlier record when it says done for the same inputs, model and options and its outputs are intact."""
    rec = _read_record(folder)
    if rec is None or (rec.state != "done" and not (rec.push_pending and plan.sink is not None)):
        return None
    if (dict(rec.inputs_sha256) != dict(digests) or dict(rec.model) != dict(plan.model)
            or json.loads(json.dumps(rec.options)) != json.loads(json.dumps(plan.options.result_options()))):
        return None
    for name, sha in rec.outputs.items():
        p = folder / name
        if not p.is_file() or sha256_file(p) != sha:
            return None
    return rec


@dataclass
class _Loaded:
    """A case read ahead: its digests and volumes, or the record that says it is already done, or its error."""

    case: Case
    digests: dict[str, str] = field(default_factory=dict)
    image: Any = None
    reference: Any = None
    skipped: CaseRecord | None = None
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _read_case(case: Case, plan: _Plan) -> _Loaded:
    """Verify (sha256), decide whether an earlier run already did it, and load the image (and reference)."""
    from medseg.io import load_volume

    loaded = _Loaded(case)
    try:
        if plan.source is not None:  # a PACS source: retrieve the series into the cache (unless already there)
            t = time.perf_counter()
            case = loaded.case = plan.source.fetch(case)
            loaded.timings["fetch"] = time.perf_counter() - t
        t0 = time.perf_counter()
        loaded.digests = verify_case(case)
        t1 = time.perf_counter()
        loaded.timings["verify"] = t1 - t0
        loaded.skipped = _already_done(plan.out_dir / case.case_id, loaded.digests, plan)
        if loaded.skipped is not None:
            return loaded
        # Explicit, not found out by the loader: no forked decode from the prefetch thread or a Dask worker.
        in_thread = plan.options.executor == "dask" or plan.options.prefetch
        image = load_volume(case.image, series_uid=case.series_uid, decode_workers=1 if in_thread else None)
        if image.array.ndim != 3 or min(image.shape) < 2:
            raise NotVolumetricError(
                f"case {case.case_id}: the image has shape {tuple(image.array.shape)}; a 3D volume with at least 2 "
                "voxels along every axis is expected (a single slice or a 2D image cannot be segmented in 3D)."
            )
        loaded.image = image
        if case.label is not None and plan.options.outputs.metrics:
            loaded.reference = load_volume(case.label)
        loaded.timings["read"] = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - recorded per case by the caller; the run goes on
        loaded.error = exc
    return loaded


def _failed(case: Case, exc: BaseException, plan: _Plan, digests: Mapping[str, str],
            timings: Mapping[str, float], worker: str | None) -> CaseRecord:
    kind = type(exc).__name__
    text = str(exc) if isinstance(exc, MedsegError) else f"internal error: {kind}: {exc}"
    if not isinstance(exc, MedsegError):
        logger.debug("case %s: unexpected error", case.case_id, exc_info=exc)
    return CaseRecord(case.case_id, "failed", dict(digests), {}, dict(timings), _scrub(text, plan, case), kind,
                      model=dict(plan.model), options=plan.options.result_options(), versions=dict(plan.versions),
                      device=plan.options.device, worker=worker, run_id=plan.run_id, model_loads=_MODEL_LOADS[0])


def _write_dicom_seg(labels: Volume, image: Volume, path: Path, plan: _Plan) -> None:
    """DICOM SEG referencing the scan's instances (the writer is atomic itself)."""
    from medseg.io.dicom_seg import SegAlgorithm, write_dicom_seg

    model = plan.model
    algorithm = SegAlgorithm(str(model["name"]), str(model["version"]), model.get("weights_sha256"))
    write_dicom_seg(labels, image, path, seg_type=plan.options.outputs.seg_type, algorithm=algorithm)


def _process(loaded: _Loaded, plan: _Plan, worker: str | None = None) -> CaseRecord:
    """Segment one read case and write its outputs, then its status record (last)."""
    from medseg.io import save_volume

    case = loaded.case
    timings = dict(loaded.timings)
    if loaded.skipped is not None:
        if loaded.skipped.run_id == plan.run_id:  # a Dask retry of a task whose first try had finished
            return loaded.skipped
        folder = plan.out_dir / case.case_id
        try:
            if plan.options.outputs.dicom_sr and not (folder / SR_NAME).is_file():
                _sr_for_done_case(case, folder, plan)  # done by an earlier run without the SR: write it now
            pushed: list[str] = []
            if plan.sink is not None and plan.sink.pushed(folder) is None:
                # done by an earlier run that did not push (or not here, or not the SR): push what is missing now
                _push(case, folder, plan, pushed)
            if loaded.skipped.push_pending:  # the push that failed is done now: so is the case
                record = replace(loaded.skipped, state="done", error=None, error_type=None, push_pending=False,
                                 notes=tuple(pushed), run_id=plan.run_id)
                atomic_write_text(folder / STATUS_NAME, json.dumps(record.to_json(), indent=2) + "\n")
                return record
        except Exception as exc:  # noqa: BLE001 - recorded per case; the run goes on
            return _failed(case, exc, plan, loaded.digests, dict(loaded.timings), worker)
        return replace(loaded.skipped, state="skipped")
    folder = plan.out_dir / case.case_id
    t_start = time.perf_counter()
    written: list[str] = []
    pushing = False
    try:
        if loaded.error is not None:
            raise loaded.error
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATUS_NAME).unlink(missing_ok=True)  # the case is being redone: no record until it is complete
        image = loaded.image
        t = time.perf_counter()
        seg = _segmenter(plan.options).segment(image)
        timings["segment"] = time.perf_counter() - t
        labels = seg.labels
        t = time.perf_counter()
        save_volume(labels, folder / "pred.nii.gz")
        written += ["pred.nii.gz", "pred.labels.json"]
        if plan.options.outputs.image:
            save_volume(image, folder / "image.nii.gz")
            written.append("image.nii.gz")
        timings["write"] = time.perf_counter() - t
        notes: list[str] = []
        if plan.options.outputs.dicom_seg:
            if image.source is not None and image.source.sop_instance_uids:
                t = time.perf_counter()
                _write_dicom_seg(labels, image, folder / "segmentation.dcm", plan)
                written.append("segmentation.dcm")
                timings["dicom_seg"] = time.perf_counter() - t
            else:
                notes.append("no DICOM SEG: the input is not a DICOM series")
        case_stats = None
        if plan.options.outputs.stats:
            from medseg.stats import volume_stats

            t = time.perf_counter()
            case_stats = volume_stats(labels, image)
            atomic_write_text(folder / "stats.csv", case_stats.to_csv())
            written.append("stats.csv")
            timings["stats"] = time.perf_counter() - t
        if plan.options.outputs.dicom_sr and "segmentation.dcm" in written:
            t = time.perf_counter()
            _write_dicom_sr(labels, image, folder, plan, case_stats)
            written.append(SR_NAME)
            timings["dicom_sr"] = time.perf_counter() - t
        if loaded.reference is not None:
            from medseg.metrics import evaluate

            t = time.perf_counter()
            ref = loaded.reference
            if ref.labels is None and labels.labels is not None:
                ref = ref.with_array(ref.array, labels=labels.labels)
            result = evaluate(labels, ref, resample=not labels.same_grid(ref))
            atomic_write_text(folder / "metrics.csv", result.to_csv())
            save_volume(ref, folder / "ref.nii.gz")
            written += ["metrics.csv", "ref.nii.gz"]
            if ref.labels is not None:
                written.append("ref.labels.json")
            timings["metrics"] = time.perf_counter() - t
        if plan.sink is not None:  # last: a case that fails earlier has pushed nothing (one that fails here keeps
            # its outputs, so that the rerun pushes the same SEG, or its SR, without segmenting again)
            t = time.perf_counter()
            pushing = True
            _clear_outputs(folder, keep=written)
            _push(case, folder, plan, notes)
            timings["push"] = time.perf_counter() - t
        phi = _read_phi(image) if plan.options.include_phi else None
        timings["total"] = sum(loaded.timings.get(k, 0.0) for k in ("fetch", "verify", "read")) + (
            time.perf_counter() - t_start)
        _clear_outputs(folder, keep=written)
        outputs = {name: sha256_file(folder / name) for name in written if (folder / name).is_file()}
        record = CaseRecord(case.case_id, "done", loaded.digests, outputs, {k: round(v, 4) for k, v in timings.items()},
                            notes=tuple(notes), phi=phi, model=dict(plan.model),
                            options=plan.options.result_options(), versions=dict(plan.versions),
                            device=seg.device, worker=worker, run_id=plan.run_id, model_loads=_MODEL_LOADS[0])
    except Exception as exc:  # noqa: BLE001 - a failing case is recorded and the run goes on
        timings["total"] = loaded.timings.get("verify", 0.0) + loaded.timings.get("read", 0.0) + (
            time.perf_counter() - t_start)
        record = _failed(case, exc, plan, loaded.digests, {k: round(v, 4) for k, v in timings.items()}, worker)
        if pushing:  # every output is written; only the push failed: keep them, and a rerun pushes them
            kept = {name: sha256_file(folder / name) for name in written if (folder / name).is_file()}
            record = replace(record, outputs=kept, push_pending=True, notes=(
                "outputs kept: only the push failed; a rerun pushes them without segmenting again",))
        else:
            _clear_outputs(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / STATUS_NAME, json.dumps(record.to_json(), indent=2) + "\n")
    except OSError as exc:
        record = _failed(case, WorkflowError(f"cannot write the status record: {exc}"), plan, loaded.digests,
                         record.timings_s, worker)
    log = logger.info if record.state == "done" else logger.warning
    log("case %s %s in %.1f s%s", case.case_id, record.state, record.timings_s.get("total", 0.0),
        f": {record.error}" if record.error else "")
    return record


def _write_dicom_sr(labels: Volume, image: Volume, folder: Path, plan: _Plan, stats: Any = None) -> None:
    """``summary-sr.dcm``: the SEG's segments' volumes (and mean HU) from the case's statistics."""
    from medseg.io.dicom_sr import write_dicom_sr
    from medseg.stats import volume_stats

    model = plan.model
    write_dicom_sr(folder / "segmentation.dcm", stats if stats is not None else volume_stats(labels, image), image,
                   folder / SR_NAME, algorithm_name=str(model["name"]), algorithm_version=str(model["version"]))


def _sr_for_done_case(case: Case, folder: Path, plan: _Plan) -> None:
    """The SR of a case an earlier run finished without one: from its own SEG and labels, not resegmented."""
    from medseg.io import load_volume

    if not (folder / "segmentation.dcm").is_file():
        raise WorkflowError(f"case {case.case_id}: no DICOM SR without a DICOM SEG (a DICOM series input and "
                            "dicom_seg output are needed).")
    image = load_volume(case.image, series_uid=case.series_uid, decode_workers=1)
    saved = load_volume(folder / "pred.nii.gz")
    saved.require_same_grid(image, what=f"case {case.case_id}: pred.nii.gz and its image")
    # the image's own affine (NIfTI stores it in float32): the volumes equal those the case's stats.csv holds
    labels = image.with_array(saved.array, labels=saved.labels)
    _write_dicom_sr(labels, image, folder, plan)


def _push(case: Case, folder: Path, plan: _Plan, notes: list[str]) -> None:
    """Hand the case's SEG (and SR) to the sink (which pushes each once and verifies it); raises when it cannot."""
    seg = folder / "segmentation.dcm"
    if not seg.is_file():
        raise WorkflowError(f"case {case.case_id}: nothing to push: the case has no DICOM SEG (a DICOM series input "
                            "and dicom_seg output are needed).")
    notes.append(plan.sink.push(case.case_id, seg, folder, folder / SR_NAME))


def _clear_outputs(folder: Path, keep: Sequence[str] = ()) -> None:
    for name in CASE_OUTPUTS:
        if name not in keep:
            (folder / name).unlink(missing_ok=True)


def run_case(case: Case, plan: _Plan) -> CaseRecord:
    """Read, segment and write one case in this process (what a Dask task runs)."""
    return _process(_read_case(case, plan), plan)


# ---- executors ------------------------------------------------------------------------------------------------
def _local(cases: Sequence[Case], plan: _Plan) -> Iterator[CaseRecord]:
    """In-process: the next case is read in a background thread while the current one is segmented."""
    if not cases:
        return
    if not plan.options.prefetch:
        for case in cases:
            yield run_case(case, plan)
        return
    ahead: queue.Queue[_Loaded] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def reader() -> None:
        for case in cases:
            if stop.is_set():
                return
            item = _read_case(case, plan)
            while not stop.is_set():
                try:
                    ahead.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue

    thread = threading.Thread(target=reader, name="medseg-prefetch", daemon=True)
    thread.start()
    try:
        for _ in cases:
            yield _process(ahead.get(), plan)
    finally:
        stop.set()
        thread.join(timeout=30)


def _dask_task(case: Case, plan: _Plan) -> dict[str, Any]:
    """A Dask task: one case on a worker (the worker's model is loaded once and kept)."""
    try:
        from distributed import get_worker

        worker = get_worker().name
    except (ImportError, ValueError):
        worker = None
    return _process(_read_case(case, plan), plan, worker=str(worker) if worker is not None else None).to_json()


def _dask(cases: Sequence[Case], plan: _Plan) -> Iterator[CaseRecord]:
    """One task per case on a Dask cluster: a LocalCluster of worker processes, or ``plan.options.scheduler``."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise WorkflowError("the Dask executor needs dask.distributed: pip install 'medseg[dask]'.") from None
    opts = plan.options
    gpu = bool(opts.device and opts.device.startswith("cuda"))
    resources = {"GPU": 1} if gpu else None
    stack = contextlib.ExitStack()
    with stack:
        if opts.scheduler:
            try:
                client = stack.enter_context(Client(opts.scheduler, timeout="20s"))
            except (OSError, TimeoutError) as exc:
                raise WorkflowError(f"cannot reach the Dask scheduler at {opts.scheduler} ({exc}); start one with "
                                    "`dask scheduler` and workers with `dask worker ADDRESS`.") from None
        else:
            cluster = stack.enter_context(LocalCluster(
                n_workers=opts.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                memory_limit=opts.memory_limit, resources=resources, silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        futures = {client.submit(_dask_task, case, plan, key=f"medseg-case-{case.case_id}-{time.time_ns()}",
                                 retries=opts.retries, resources=resources, pure=False): case for case in cases}
        for future in as_completed(futures):
            case = futures[future]
            try:
                yield CaseRecord.from_json(future.result())
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker after repeated worker deaths
                lost = WorkflowError(f"case {case.case_id}: lost on the Dask cluster ({type(exc).__name__}: {exc})")
                record = _failed(case, lost, plan, {}, {}, None)
                folder = plan.out_dir / case.case_id
                if folder.is_dir():
                    atomic_write_text(folder / STATUS_NAME, json.dumps(record.to_json(), indent=2) + "\n")
                yield record


# ---- the run --------------------------------------------------------------------------------------------------
def load_manifest_or_folder(path: str | Path) -> Manifest:
    """A manifest file (JSON, CSV, MSD dataset.json), or a folder of studies (:func:`make_manifest`, no sha256).

    Raises
    ------
    ManifestError
        If the manifest cannot be read or the folder holds no image.
    """
    p = Path(path)
    if p.is_dir():
        return make_manifest(p, checksums=False)
    return read_manifest(p, check_files=False)


def _combine_csv(records: Sequence[CaseRecord], out_dir: Path, name: str, target: str, phi: bool) -> Path | None:
    """One CSV over the cases' ``name`` files, with ``case_id`` first (PHI columns only with include_phi)."""
    header: list[str] | None = None
    rows: list[list[str]] = []
    for rec in records:
        p = out_dir / rec.case_id / name
        if rec.state not in ("done", "skipped") or not p.is_file():
            continue
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            head = next(reader, None)
            if head is None:
                continue
            extra = ["patient_name", "patient_id", "patient_birth_date"] if phi else []
            if header is None:
                header = ["case_id", *extra, *head]
            phi_cells = [str((rec.phi or {}).get(k, "")) for k in extra]
            rows.extend([rec.case_id, *phi_cells, *row] for row in reader)
    if header is None:
        return None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(out_dir / target, buf.getvalue())


def run_batch(
    manifest: Manifest,
    out_dir: str | Path,
    /,
    options: RunOptions | None = None,
    *,
    progress: Callable[[RunEvent], None] | None = None,
    source: Any = None,
    sink: Any = None,
) -> RunResult:
    """Segment every case of a manifest; resumable; failed cases are recorded and the run goes on.

    Parameters
    ----------
    manifest : Manifest
        From :func:`medseg.manifest.read_manifest` (``check_files=False``: each case is checked on its own) or
        :func:`load_manifest_or_folder`.
    out_dir : path
        Results folder (created); see the module docstring for its layout.
    options : RunOptions, optional
    progress : callable, optional
        Called with a :class:`RunEvent` at the start, after every case and at the end.
    source : medseg.pacs.PacsSource, optional
        The PACS the manifest's cases come from (:meth:`~medseg.pacs.PacsSource.manifest`): each case's series is
        retrieved into the source's cache before it is read.
    sink : medseg.pacs.PacsSink, optional
        Push each case's DICOM SEG there, verified and at most once (needs ``outputs.dicom_seg``); a push that
        fails makes the case fail.

    Returns
    -------
    RunResult
        ``exit_status`` is 0 when every case is done or skipped, 3 when some failed.

    Raises
    ------
    WorkflowError
        If an option cannot be honoured (DICOM SEG not available, no Dask) or ``out_dir`` cannot be created.
    MedsegError
        If the model cannot be found or loaded (nothing is run then).

    Examples
    --------
    >>> import tempfile
    >>> from medseg.manifest import make_manifest
    >>> from medseg.phantom import make_phantom, write_phantom_study
    >>> tmp = Path(tempfile.mkdtemp())
    >>> _ = write_phantom_study(make_phantom(3, shape=(40, 36, 24)), tmp / "studies" / "p3", format="nifti")
    >>> result = run_batch(make_manifest(tmp / "studies"), tmp / "out", RunOptions(model="ct-basic"))
    >>> result.exit_status, [r.state for r in result.records], (tmp / "out" / "p3" / "pred.nii.gz").is_file()
    (0, ['done'], True)
    >>> run_batch(make_manifest(tmp / "studies"), tmp / "out", RunOptions(model="ct-basic")).records[0].state
    'skipped'
    """
    options = options or RunOptions()
    if options.scheduler and options.executor != "dask":
        options = replace(options, executor="dask")
    options.check_available()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkflowError(f"{out}: cannot create the results folder ({exc}).") from None
    out = out.resolve()
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    card = _segmenter(options).card if options.executor == "local" else _find_card(options)
    import uuid

    if sink is not None and not options.outputs.dicom_seg:
        raise WorkflowError("pushing to a PACS sends each case's DICOM SEG: turn dicom_seg output on (--dicom-seg).")
    if sink is not None and getattr(sink, "push_sr", False) and not options.outputs.dicom_sr:
        raise WorkflowError("pushing the DICOM SR summary (--push-sr) needs dicom_sr output (--dicom-sr).")
    plan = _Plan(out, options, _model_identity(card), versions(), manifest.root, uuid.uuid4().hex, source, sink)
    for p in remove_partials(out):
        logger.info("removed a temporary file a killed run left: %s", p.relative_to(out))
    cases = manifest.cases
    total = len(cases)
    counts = {"done": 0, "failed": 0, "skipped": 0}
    if progress:
        progress(RunEvent("start", total))
    by_id: dict[str, CaseRecord] = {}
    runner = _dask if options.executor == "dask" else _local
    for record in runner(cases, plan):
        by_id[record.case_id] = record
        counts[record.state] += 1
        if progress:
            progress(RunEvent("case", total, counts["done"], counts["failed"], counts["skipped"], record,
                              time.perf_counter() - t0))
    records = tuple(by_id[c.case_id] for c in cases)
    for p in remove_partials(out):
        logger.info("removed a temporary file a lost worker left: %s", p.relative_to(out))
    stats_path = (_combine_csv(records, out, "stats.csv", "statistics.csv", options.include_phi)
                  if options.outputs.stats else None)
    metrics_path = (_combine_csv(records, out, "metrics.csv", "metrics.csv", options.include_phi)
                    if options.outputs.metrics else None)
    report_path = None
    if options.outputs.report and any(r.state in ("done", "skipped") for r in records):
        from medseg.report import write_report

        report_path = write_report(out, out / "report.html", modality=None,
                                   title=f"medseg batch: {card.name} on {total} case(s)").html_path
    seconds = time.perf_counter() - t0
    run_record = {
        "record_version": RECORD_VERSION,
        "run_id": plan.run_id,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
        "versions": plan.versions,
        "model": plan.model,
        "options": {**asdict(options), "outputs": asdict(options.outputs)},
        "device": next((r.device for r in records if r.device), options.device),
        "counts": {"total": total, **counts},
        "pacs": {"source": source and source.name, "sink": sink and sink.name},
        "cases": [{"case_id": r.case_id, "state": r.state, "timings_s": dict(r.timings_s), "error": r.error,
                   "worker": r.worker, "model_loads": r.model_loads, **({"phi": dict(r.phi)} if r.phi else {})}
                  for r in records],
        "outputs": {"statistics_csv": stats_path and stats_path.name, "metrics_csv": metrics_path and metrics_path.name,
                    "report_html": report_path and report_path.name},
    }
    record_path = atomic_write_text(out / RUN_RECORD_NAME, json.dumps(run_record, indent=2, default=str) + "\n")
    if progress:
        progress(RunEvent("end", total, counts["done"], counts["failed"], counts["skipped"], None, seconds))
    return RunResult(out, records, record_path, stats_path, metrics_path, report_path, seconds)


def _find_card(options: RunOptions) -> Any:
    from medseg.models import find_model

    return find_model(options.model, models_dirs=list(options.models_dirs), trust_code=options.trust_bundle_code)


# ---- workflow recipes -----------------------------------------------------------------------------------------
_TOP = {"name", "description", "model", "models_dirs", "inputs", "outputs", "inference", "executor", "include_phi"}
_SOURCES = ("manifest", "folder", "pacs")
#: The PACS keys of ``inputs`` (``medseg batch``'s option names): study selection, and the connection settings
#: that serve the source and the push destination alike (one set, as on the command line).
_PACS_SELECT = {"query", "series", "cache", "retrieve"}
_PACS_CONNECT = {"ca_bundle", "credentials_file", "ae_title", "ae_port", "timeout"}
_INPUTS = {*_SOURCES, *_PACS_SELECT, *_PACS_CONNECT}
_OUTPUTS = {"folder", "labels", "dicom_seg", "seg_type", "stats", "metrics", "report", "image", "push", "push_sr", "dicom_sr"}
#: Keys that would put a secret into a recipe (recipes are copied, shared and committed): refused anywhere.
_SECRET_KEY = re.compile(r"pass(word|wd|phrase)?|secret|token|api_?key|bearer|authori[sz]ation|auth|login|"
                         r"user(name)?|credentials?", re.IGNORECASE)
_INFERENCE = {"device", "fast", "tta", "overlap", "amp", "torch_threads"}
_EXECUTOR = {"kind", "workers", "scheduler", "prefetch", "retries", "memory_limit"}


@dataclass(frozen=True)
class PacsSettings:
    """A recipe's PACS input and push: what ``medseg batch URL --query ... --push`` says with options.

    Attributes
    ----------
    query, series : tuple of str
        ``Keyword=value`` study filters and ``rule=value`` series rules (as ``--query`` / ``--series``).
    cache : Path or None
        Where series are retrieved (None: ``OUT/.pacs-cache``).
    retrieve : {"get", "move"}
        DIMSE retrieval: C-GET, or C-MOVE to medseg's own storage SCP.
    ca_bundle, credentials_file : Path or None
        PEM file of CA certificates for HTTPS; a ``user:password`` file only its owner can read.
    ae_title : str
        Our DICOM AE title (DIMSE).
    ae_port : int
        The port of medseg's storage SCP for C-MOVE (``retrieve: move``).
    timeout_s : float
        Seconds per PACS request.
    push : bool
        Push each DICOM SEG back to the source PACS.
    push_to : str or None
        Push each DICOM SEG to this PACS instead (any input).
    push_sr : bool
        Push each case's DICOM SR summary after its SEG (``outputs.push_sr``; turns ``dicom_sr`` output on).
    """

    query: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    cache: Path | None = None
    retrieve: Literal["get", "move"] = "get"
    ca_bundle: Path | None = None
    credentials_file: Path | None = None
    ae_title: str = "MEDSEG"
    ae_port: int = 11112
    timeout_s: float = 30.0
    push: bool = False
    push_to: str | None = None
    push_sr: bool = False


@dataclass(frozen=True)
class Workflow:
    """A parsed workflow recipe: which cases, where the results go, and how to run them.

    ``inputs`` is a manifest or folder path, or a PACS URL (a str) when ``pacs`` says how to query it; ``pacs``
    is also set when a folder or manifest's SEGs are pushed to a PACS (``outputs.push: URL``).
    """

    name: str
    inputs: Path | str
    out_dir: Path
    options: RunOptions
    description: str = ""
    source: Path | None = None
    pacs: PacsSettings | None = None


def _set(data: dict[str, Any], assignment: str, source: str) -> None:
    import yaml

    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise WorkflowError(f"{source}: --set needs key=value (e.g. outputs.folder=/tmp/run), got {assignment!r}.")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise WorkflowError(f"{source}: --set {key}: '{part}' is not a section of the recipe.")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise WorkflowError(f"{source}: --set {key}: cannot read {value!r} ({exc}).") from None


def parse_workflow(data: Any, *, source: str | Path = "workflow", base_dir: Path | None = None,
                   overrides: Sequence[str] = ()) -> Workflow:
    """Validate a workflow recipe's parsed YAML (plus ``key=value`` overrides) and build a :class:`Workflow`.

    Raises
    ------
    WorkflowError
        If a field is missing, unknown, of the wrong type or out of range (the message names it).
    """
    import copy

    src = str(source)
    r = SchemaReader(src, WorkflowError)
    _refuse_secrets(data, r, "")
    top_in = dict(r.mapping(data, "(top level)", _TOP))
    top = copy.deepcopy(top_in)
    for assignment in overrides:
        _set(top, assignment, src)
    _refuse_secrets(top, r, "")
    top = dict(r.mapping(top, "(top level)", _TOP))
    base = base_dir or Path.cwd()
    model = r.string(top, "model", "")
    inputs = r.mapping(top.get("inputs"), "inputs", _INPUTS)
    given = [k for k in _SOURCES if k in inputs]
    if len(given) != 1:
        raise r.problem("field 'inputs' needs exactly one of 'manifest' (a JSON/CSV manifest), 'folder' (a folder "
                        "of studies) or 'pacs' (dicomweb+http(s)://HOST[:PORT]/PATH or dimse://AET@HOST:PORT), got "
                        f"{given or 'none'}.")
    key = given[0]
    inp: Path | str
    if key == "pacs":
        inp = _pacs_url(r, inputs["pacs"], "inputs.pacs")
    else:
        inp = Path(r.string(inputs, key, "inputs."))
        inp = inp if inp.is_absolute() else base / inp
    o = r.mapping(top.get("outputs"), "outputs", _OUTPUTS)
    out_dir = Path(r.string(o, "folder", "outputs.", f"runs/{top.get('name', 'batch')}"))
    out_dir = out_dir if out_dir.is_absolute() else base / out_dir
    pacs = _pacs_settings(r, inputs, o, is_pacs=key == "pacs", base=base)
    pushes = pacs is not None and (pacs.push or pacs.push_to is not None)
    if pushes and o.get("dicom_seg") is False:
        raise r.problem("field 'outputs.push' sends each case's DICOM SEG to a PACS: 'outputs.dicom_seg' must be true "
                        "(or left out), not false.")
    push_sr = pacs is not None and pacs.push_sr
    if push_sr and o.get("dicom_sr") is False:
        raise r.problem("field 'outputs.push_sr' sends each case's DICOM SR summary to the PACS: 'outputs.dicom_sr' "
                        "must be true (or left out), not false.")
    outputs = OutputOptions(
        labels=r.boolean(o, "labels", "outputs.", True),
        dicom_seg=r.boolean(o, "dicom_seg", "outputs.", pushes),
        seg_type=r.choice(o, "seg_type", "outputs.", "binary", ("binary", "labelmap")),  # type: ignore[arg-type]
        dicom_sr=r.boolean(o, "dicom_sr", "outputs.", push_sr),
        stats=r.boolean(o, "stats", "outputs.", True),
        metrics=r.boolean(o, "metrics", "outputs.", True),
        report=r.boolean(o, "report", "outputs.", True),
        image=r.boolean(o, "image", "outputs.", False),
    )
    inf = r.mapping(top.get("inference"), "inference", _INFERENCE)
    device = inf.get("device")
    if device is not None and not isinstance(device, str):
        raise r.fail("inference.device", "cpu, cuda, cuda:N, mps or null (best available)", device)
    amp = inf.get("amp")
    if amp is not None and not isinstance(amp, bool):
        raise r.fail("inference.amp", "true, false or null", amp)
    ex = r.mapping(top.get("executor"), "executor", _EXECUTOR)
    scheduler = ex.get("scheduler")
    if scheduler is not None and not isinstance(scheduler, str):
        raise r.fail("executor.scheduler", "a scheduler address like tcp://host:8786", scheduler)
    dirs = top.get("models_dirs") or []
    if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        raise r.fail("models_dirs", "a list of folders", dirs)
    model_path = Path(model)
    if model_path.suffix.lower() in (".yaml", ".yml") or len(model_path.parts) > 1:
        model = str(model_path if model_path.is_absolute() else base / model_path)
    options = RunOptions(
        model=model,
        models_dirs=tuple(str(Path(d) if Path(d).is_absolute() else base / d) for d in dirs),
        device=None if device in (None, "auto") else device,
        fast=r.boolean(inf, "fast", "inference.", False),
        tta=None if inf.get("tta") is None else r.boolean(inf, "tta", "inference.", False),
        overlap=r.optional_number(inf, "overlap", "inference.", None, lo=0.0, hi=0.95),
        amp=amp,
        torch_threads=r.optional_integer(inf, "torch_threads", "inference.", None, lo=1),
        outputs=outputs,
        executor=r.choice(ex, "kind", "executor.", "local", ("local", "dask")),  # type: ignore[arg-type]
        workers=r.integer(ex, "workers", "executor.", 2, lo=1),
        scheduler=scheduler,
        prefetch=r.boolean(ex, "prefetch", "executor.", True),
        retries=r.integer(ex, "retries", "executor.", 2, lo=0),
        memory_limit=r.string(ex, "memory_limit", "executor.", "4GiB"),
        include_phi=r.boolean(top, "include_phi", "", False),
    )
    return Workflow(name=r.string(top, "name", "", "batch"), inputs=inp, out_dir=out_dir, options=options,
                    description=str(top.get("description", "") or ""),
                    source=Path(source) if isinstance(source, Path) else None, pacs=pacs)


def _refuse_secrets(node: Any, r: SchemaReader, where: str) -> None:
    """Refuse any key of the recipe (at any depth) that would hold a password, token or user name."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            name = str(k)
            if name != "credentials_file" and _SECRET_KEY.search(name):
                raise r.problem(f"field '{where}{name}': credentials never go in a recipe (recipes are copied and "
                                "shared, and runs record them). Set MEDSEG_PACS_USER and MEDSEG_PACS_PASSWORD (basic "
                                "auth) or MEDSEG_PACS_TOKEN (bearer token) in the environment, or give "
                                "'inputs.credentials_file: PATH' (one line user:password, readable only by its "
                                "owner).")
            _refuse_secrets(v, r, f"{where}{name}.")
    elif isinstance(node, list):
        for item in node:
            _refuse_secrets(item, r, where)


def _pacs_url(r: SchemaReader, value: Any, where: str) -> str:
    """A PACS address, checked as the source and sink check it (scheme; no password in it)."""
    from medseg.pacs import PacsSink, is_pacs_url

    if not isinstance(value, str) or not is_pacs_url(value):
        raise r.fail(where, "a PACS address: dicomweb+http(s)://HOST[:PORT]/PATH or dimse://AET@HOST:PORT", value)
    try:
        PacsSink(value)  # refuses user:password@ in the URL, without connecting or reading credentials
    except MedsegError as exc:
        raise r.problem(f"field '{where}': {exc}") from None
    return value


def _pacs_settings(r: SchemaReader, inputs: Mapping[str, Any], o: Mapping[str, Any], *, is_pacs: bool,
                   base: Path) -> PacsSettings | None:
    """The PACS keys of ``inputs`` and ``outputs.push``, validated as ``medseg batch`` validates its options."""
    from medseg.pacs import SeriesRules, parse_query

    push_value = o.get("push", False)
    push, push_to = False, None
    if isinstance(push_value, bool):
        push = push_value
        if push and not is_pacs:
            raise r.problem("field 'outputs.push: true' sends the SEGs back to the PACS the studies came from; the "
                            "input is a folder or manifest, so give 'outputs.push: URL' (the PACS to push to).")
    else:
        push_to = _pacs_url(r, push_value, "outputs.push")
    push_sr = r.boolean(o, "push_sr", "outputs.", False)
    if push_sr and not push and push_to is None:
        raise r.problem("field 'outputs.push_sr' pushes each case's DICOM SR summary after its SEG: set 'outputs.push' "
                        "too (true, or the URL of the PACS to push to).")
    if not is_pacs:
        select = sorted(k for k in _PACS_SELECT if k in inputs)
        if select:
            raise r.problem(f"field(s) {', '.join(f'inputs.{k}' for k in select)} select studies in a PACS; the input "
                            "is a folder or manifest (use 'inputs.pacs: URL').")
        if push_to is None:
            connect = sorted(k for k in _PACS_CONNECT if k in inputs)
            if connect:
                raise r.problem(f"field(s) {', '.join(f'inputs.{k}' for k in connect)} configure a PACS connection; "
                                "the recipe neither reads from a PACS ('inputs.pacs') nor pushes to one "
                                "('outputs.push').")
            return None
    query_raw = inputs.get("query") or {}
    if not isinstance(query_raw, Mapping):
        raise r.fail("inputs.query", "a mapping of DICOM keywords to values, e.g. {ModalitiesInStudy: CT, StudyDate: "
                     "20240101-20241231}", query_raw)
    query = []
    for k, v in query_raw.items():
        if isinstance(v, list) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
            v = ",".join(map(str, v))  # a UID list
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise r.fail(f"inputs.query.{k}", "a value (a date range A-B, a UID list as a YAML list)", v)
        query.append(f"{k}={v}")
    series_raw = inputs.get("series") or []
    if isinstance(series_raw, Mapping):
        series_raw = [f"{k}={v}" for k, v in series_raw.items()]
    if not isinstance(series_raw, list) or not all(isinstance(x, str) for x in series_raw):
        raise r.fail("inputs.series", "a list of rules rule=value, e.g. [modality=CT, orientation=axial]", series_raw)
    try:
        parse_query(query)
        SeriesRules.parse(series_raw)
    except MedsegError as exc:
        raise r.problem(f"field 'inputs.query'/'inputs.series': {exc}") from None
    url = str(inputs.get("pacs", "") or "")
    retrieve = r.choice(inputs, "retrieve", "inputs.", "get", ("get", "move"))
    if retrieve == "move" and not url.lower().startswith("dimse"):
        raise r.problem("field 'inputs.retrieve' chooses C-GET or C-MOVE for a DIMSE source (dimse://AET@HOST:PORT); "
                        "DICOMweb retrieves with WADO-RS.")

    def path(k: str) -> Path | None:
        if inputs.get(k) is None:
            return None
        p = Path(r.string(inputs, k, "inputs.")).expanduser()
        return p if p.is_absolute() else base / p

    return PacsSettings(
        query=tuple(query), series=tuple(series_raw), cache=path("cache"), retrieve=retrieve,  # type: ignore[arg-type]
        ca_bundle=path("ca_bundle"), credentials_file=path("credentials_file"),
        ae_title=r.string(inputs, "ae_title", "inputs.", "MEDSEG"),
        ae_port=r.integer(inputs, "ae_port", "inputs.", 11112, lo=1, hi=65535),
        timeout_s=r.number(inputs, "timeout", "inputs.", 30.0, lo=1.0), push=push, push_to=push_to, push_sr=push_sr)


def is_training_recipe(data: Any) -> bool:
    """True for a training recipe (``medseg train``'s: it has ``data`` and ``model`` sections, no ``inputs``)."""
    return isinstance(data, Mapping) and "data" in data and "inputs" not in data


def load_workflow(path: str | Path, *, overrides: Sequence[str] = ()) -> Workflow:
    """Read and validate a YAML workflow recipe; relative paths resolve against the recipe's folder.

    Raises
    ------
    WorkflowError
        If the file is missing, not YAML, or not a valid workflow recipe.
    """
    p = Path(path)
    if not p.is_file():
        raise WorkflowError(f"{p}: no such workflow recipe. Recipes live in workflows/ (e.g. "
                            "workflows/ct-organs-phantoms.yaml).")
    data = read_yaml(p, WorkflowError, what="workflow recipe")
    return parse_workflow(data, source=p, base_dir=p.parent.resolve(), overrides=overrides)


def run_workflow(workflow: Workflow, *, progress: Callable[[RunEvent], None] | None = None) -> RunResult:
    """Run a parsed workflow recipe (:func:`run_batch` on its inputs; a PACS input is queried first, and each
    case is retrieved before it is read and pushed when done, as ``medseg batch URL --push`` does).

    Raises
    ------
    ManifestError, WorkflowError, MedsegError
        As :func:`load_manifest_or_folder` and :func:`run_batch`.
    PacsAuthError, PacsConnectionError, PacsError
        When the PACS refuses our credentials or cannot be queried (nothing is run then).
    """
    source = sink = None
    p = workflow.pacs
    if p is not None:
        from medseg.pacs import open_endpoints

        source, sink = open_endpoints(
            str(workflow.inputs), cache_dir=p.cache or workflow.out_dir / ".pacs-cache", query=p.query,
            series=p.series, push=p.push, push_to=p.push_to, credentials_file=p.credentials_file,
            ca_bundle=None if p.ca_bundle is None else str(p.ca_bundle), ae_title=p.ae_title, timeout_s=p.timeout_s,
            retrieve=p.retrieve, ae_port=p.ae_port, push_sr=p.push_sr)
    workflow.options.check_available()
    manifest = source.manifest() if source is not None else load_manifest_or_folder(workflow.inputs)
    return run_batch(manifest, workflow.out_dir, workflow.options, progress=progress, source=source, sink=sink)
