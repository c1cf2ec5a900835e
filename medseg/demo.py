"""The end-to-end demo behind ``medseg demo``: phantom → DICOM → a one-case batch run → labels, volumes, Dice, report.

Everything runs offline with what ships in the package: a seeded phantom study is written as a DICOM series
(:func:`medseg.phantom.demo_study`) and run as a one-case batch (:func:`medseg.workflow.run_batch`, the runner
that ``medseg batch`` uses): segmented with the shipped ``phantom-abdomen-ct`` model on the scan's own grid,
scored against the phantom's exact labels, with statistics, a status record, a run record, a BINARY DICOM SEG
referencing the CT series (:func:`medseg.io.write_dicom_seg`, read back onto the CT's grid to check it) and the
HTML report.

Layout written under the demo folder::

    study/ct/                      DICOM series (one file per slice)
    study/labels.nii.gz            the phantom's truth (+ .labels.json)
    study/phantom.json             seed, grid, tumours
    segmentation.nii.gz            the model's labels on the CT's grid (+ segmentation.labels.json)
    segmentation.dcm               the same labels as a BINARY DICOM SEG referencing study/ct/ (read back to check)
    results/phantom-<seed>/        the runner's case folder: pred, ref, image, segmentation.dcm, stats.csv, metrics.csv,
                                   status.json
    results/run.json               the run record (+ statistics.csv, metrics.csv)
    results/report.html            (+ report_metrics.csv, report_stats.csv, report.json) unless --no-report
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from medseg.inference import Segmentation
    from medseg.metrics import EvaluationResult, LesionDetection
    from medseg.phantom import DemoStudy

__all__ = ["DEMO_MODEL", "DemoLabel", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)

#: The shipped model the demo runs.
DEMO_MODEL = "phantom-abdomen-ct"


@dataclass(frozen=True)
class DemoLabel:
    """One label of the demo's summary table.

    Attributes
    ----------
    value, name, kind : int, str, str
    volume_ml : float
        Volume of the model's label (mL).
    truth_ml : float
        Volume of the phantom's label (mL).
    dice : float
        Dice against the phantom's truth (empty-mask rule of :mod:`medseg.metrics` when one side is empty).
    hd95_mm : float
        95th-percentile Hausdorff distance (mm; inf when exactly one side is empty).
    """

    value: int
    name: str
    kind: str
    volume_ml: float
    truth_ml: float
    dice: float
    hd95_mm: float


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` wrote and measured.

    Attributes
    ----------
    folder : Path
    study : DemoStudy
        The DICOM study and its loaded CT and truth labels.
    segmentation : Segmentation
        The model's labels on the CT's grid.
    labels_path : Path
        ``segmentation.nii.gz``.
    labels : tuple of DemoLabel
        One row per model label.
    lesions : tuple of LesionDetection
        Lesion-wise detection of the tumour labels.
    evaluation : EvaluationResult
    report_html : Path or None
        The HTML report (None when ``report=False``).
    dicom_seg_path : Path
        ``segmentation.dcm``: the labels as a BINARY DICOM SEG referencing the CT series.
    dicom_seg_round_trip_exact : bool
        True when the SEG, read back onto the CT's grid, equals the labels voxel for voxel (with the same names).
    seconds : dict of str to float
        ``study`` (generate, write and load the DICOM series), ``segment``, ``dicom_seg`` (write and read back the
        SEG), ``evaluate``, ``report``, ``total``.
    replaced_earlier : bool
        True when ``folder`` held an earlier demo (or anything, with ``overwrite``) that was replaced.
    """

    folder: Path
    study: DemoStudy
    segmentation: Segmentation
    labels_path: Path
    labels: tuple[DemoLabel, ...]
    lesions: tuple[LesionDetection, ...]
    evaluation: EvaluationResult
    report_html: Path | None
    dicom_seg_path: Path | None = None
    dicom_seg_round_trip_exact: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    replaced_earlier: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (non-finite numbers become null)."""
        from medseg.metrics import _finite

        img = self.study.image
        return _finite({
            "folder": str(self.folder),
            "dicom_series": str(self.study.study.image_path),
            "truth": str(self.study.study.labels_path),
            "segmentation": str(self.labels_path),
            "report_html": None if self.report_html is None else str(self.report_html),
            "dicom_seg": None if self.dicom_seg_path is None else str(self.dicom_seg_path),
            "dicom_seg_round_trip_exact": self.dicom_seg_round_trip_exact,
            "model": self.segmentation.model,
            "device": self.segmentation.device,
            "grid": {"shape": list(img.shape), "spacing_mm": [round(s, 4) for s in img.spacing_mm],
                     "orientation": img.orientation},
            "on_input_grid": bool(self.segmentation.labels.same_grid(img)),
            "round_trip_exact": self.study.round_trip_exact,
            "labels": [vars(r).copy() for r in self.labels],
            "lesions": [{"name": d.name, "n_ref": d.n_ref, "n_pred": d.n_pred, "detected": d.tp_ref,
                         "false_positives": d.fp, "precision": d.precision, "recall": d.recall, "f1": d.f1}
                        for d in self.lesions],
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "replaced_earlier": self.replaced_earlier,
        })


def run_demo(
    folder: str | os.PathLike[str],
    /,
    *,
    seed: int = 0,
    shape: Sequence[int] = (160, 160, 64),
    model: str = DEMO_MODEL,
    device: str | None = "cpu",
    report: bool = True,
    overwrite: bool = False,
) -> DemoResult:
    """Write a phantom DICOM study, segment it with the shipped model and score it against the phantom's truth.

    Parameters
    ----------
    folder : path
        Demo folder to create (absent, empty, or holding an earlier demo; anything else needs ``overwrite``).
    seed : int
        Phantom seed (the study always has two liver tumours and a kidney tumour).
    shape : 3 ints
        Voxels of the CT along (i, j, k); the field of view stays 400 × 400 × 260 mm.
    model : str
        Model name or card path (default: the shipped ``phantom-abdomen-ct``).
    device : str or None
        "cpu" (default, what the 2-minute budget is measured on), "cuda", or None for the best available.
    report : bool
        Also write the HTML report with CSV and JSON tables.
    overwrite : bool
        Replace an existing non-empty folder. A folder holding an earlier demo (``study/phantom.json`` and
        ``segmentation.nii.gz``) is replaced without it, so ``make demo`` can run again; the result says so.

    Returns
    -------
    DemoResult

    Raises
    ------
    PhantomError
        If the folder holds something other than an earlier demo (without ``overwrite``), or an option is out of
        range.
    MedsegError
        If the model cannot be loaded (e.g. ``ModelNotFoundError``, ``ChecksumMismatchError``).
    """
    from medseg.errors import PhantomError, WorkflowError
    from medseg.files import atomic_path
    from medseg.inference import Segmentation
    from medseg.io import load_segmentation, load_volume, save_volume
    from medseg.manifest import Case, Manifest
    from medseg.metrics import evaluate
    from medseg.models import find_model
    from medseg.phantom import demo_study
    from medseg.workflow import OutputOptions, RunOptions, run_batch

    folder = Path(folder)
    replaced = False
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        earlier = (folder / "study" / "phantom.json").is_file() and (folder / "segmentation.nii.gz").is_file()
        replaced = True
        if not (overwrite or earlier):
            raise PhantomError(f"{folder}: exists, is not empty and holds no earlier demo; choose a new demo folder "
                               "or pass overwrite (--overwrite).")
        logger.info("replacing the earlier demo in %s", folder)
        if folder.is_dir():
            shutil.rmtree(folder)
        else:
            folder.unlink()
    t0 = time.perf_counter()
    card = find_model(model)  # fail early (an unknown model) before writing files
    options = RunOptions(model=model, device=device, outputs=OutputOptions(report=report, image=report, dicom_seg=True))
    study = demo_study(folder / "study", seed=seed, shape=shape, overwrite=overwrite)
    t1 = time.perf_counter()
    case = Case(f"phantom-{seed}", study.study.image_path, study.study.labels_path)
    run = run_batch(Manifest((case,), study.study.folder), folder / "results", options)
    (record,) = run.records
    if record.state == "failed":
        raise WorkflowError(f"demo case {case.case_id} failed: {record.error}")
    case_dir = run.out_dir / case.case_id
    labels = load_volume(case_dir / "pred.nii.gz")
    seg = Segmentation(labels, None, card.name, card, record.device or "cpu", dict(record.timings_s))
    labels_path = save_volume(seg.labels, folder / "segmentation.nii.gz")
    seg_path = folder / "segmentation.dcm"
    with atomic_path(seg_path, keep_suffix=".dcm") as tmp:
        shutil.copyfile(case_dir / "segmentation.dcm", tmp)
    t2 = time.perf_counter()
    back = load_segmentation(seg_path, reference=study.image)
    seg_exact = bool(np.array_equal(back.array, seg.labels.array) and back.labels is not None
                     and seg.labels.labels is not None and back.labels.names == seg.labels.labels.names)
    t3 = time.perf_counter()
    truth = study.labels
    if truth.labels is None:
        from medseg.phantom import PHANTOM_LABELS

        truth = truth.with_array(truth.array, labels=PHANTOM_LABELS)
    result = evaluate(seg.labels, truth)
    voxel_ml = seg.labels.voxel_volume_ml
    pred_counts = np.bincount(seg.labels.array.ravel(), minlength=256)
    truth_counts = np.bincount(np.asarray(truth.array).astype(np.int64).ravel(), minlength=256)
    if seg.labels.labels is None:
        raise WorkflowError(f"{case_dir / 'pred.nii.gz'}: the runner wrote labels without their label table.")
    rows = []
    for value, lab in seg.labels.labels.items():
        row = result[value]
        rows.append(DemoLabel(value, lab.name, lab.kind, round(float(pred_counts[value] * voxel_ml), 3),
                              round(float(truth_counts[value] * truth.voxel_volume_ml), 3), float(row.dice),
                              float(row.hd95_mm)))
    report_path = run.report_html
    timings = record.timings_s
    t4 = time.perf_counter()
    segment_s = float(timings.get("segment", 0.0))
    logger.info("demo: %s segmented in %.1f s", model, segment_s)
    # dicom_seg: the runner's write plus this read back onto the CT's grid
    seconds = {"study": t1 - t0, "segment": segment_s, "dicom_seg": float(timings.get("dicom_seg", 0.0)) + t3 - t2,
               "evaluate": float(timings.get("metrics", 0.0)),
               "report": max(0.0, run.seconds - float(timings.get("total", 0.0))), "total": t4 - t0}
    return DemoResult(folder, study, seg, labels_path, tuple(rows), tuple(result.lesions), result, report_path,
                      seg_path, seg_exact, seconds, replaced)
