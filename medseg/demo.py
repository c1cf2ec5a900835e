"""The end-to-end demo behind ``medseg demo``: phantom → DICOM → load → segment → labels, volumes, Dice, report.

Everything runs offline with what ships in the package: a seeded phantom study is written as a DICOM series
(:func:`medseg.phantom.demo_study`), loaded back, segmented with the shipped ``phantom-abdomen-ct`` model on the
scan's own grid, and compared with the phantom's exact labels (:func:`medseg.metrics.evaluate`). The labels are
written as NIfTI with their label table and as a DICOM SEG referencing the CT series
(:func:`medseg.io.write_dicom_seg`), which is read back onto the CT's grid to check it; an HTML report
(:func:`medseg.report.write_report`) goes beside them.

Layout written under the demo folder::

    study/ct/                      DICOM series (one file per slice)
    study/labels.nii.gz            the phantom's truth (+ .labels.json)
    study/phantom.json             seed, grid, tumours
    segmentation.nii.gz            the model's labels on the CT's grid (+ segmentation.labels.json)
    segmentation.dcm               the same labels as a BINARY DICOM SEG referencing study/ct/
    results/phantom-<seed>/        pred / ref in the report's results layout
    report.html                    (+ report_metrics.csv, report_stats.csv, report.json)
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
    from medseg.errors import PhantomError
    from medseg.inference import Segmenter
    from medseg.io import load_segmentation, save_volume, write_dicom_seg
    from medseg.io.dicom_seg import SegAlgorithm
    from medseg.metrics import evaluate
    from medseg.phantom import demo_study

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
    segmenter = Segmenter(model, device=device)  # fail early (missing or tampered weights) before writing files
    study = demo_study(folder / "study", seed=seed, shape=shape, overwrite=overwrite)
    t1 = time.perf_counter()
    seg = segmenter.segment(study.image)
    labels_path = save_volume(seg.labels, folder / "segmentation.nii.gz")
    t_seg = time.perf_counter()
    seg_path = write_dicom_seg(seg.labels, study.image, folder / "segmentation.dcm",
                               algorithm=SegAlgorithm.from_card(segmenter.card))
    back = load_segmentation(seg_path, reference=study.image)
    seg_exact = bool(np.array_equal(back.array, seg.labels.array) and back.labels is not None
                     and seg.labels.labels is not None and back.labels.names == seg.labels.labels.names)
    t2 = time.perf_counter()
    truth = study.labels
    if truth.labels is None:
        from medseg.phantom import PHANTOM_LABELS

        truth = truth.with_array(truth.array, labels=PHANTOM_LABELS)
    result = evaluate(seg.labels, truth)
    t3 = time.perf_counter()
    voxel_ml = seg.labels.voxel_volume_ml
    pred_counts = np.bincount(seg.labels.array.ravel(), minlength=256)
    truth_counts = np.bincount(np.asarray(truth.array).astype(np.int64).ravel(), minlength=256)
    assert seg.labels.labels is not None
    rows = []
    for value, lab in seg.labels.labels.items():
        row = result[value]
        rows.append(DemoLabel(value, lab.name, lab.kind, round(float(pred_counts[value] * voxel_ml), 3),
                              round(float(truth_counts[value] * truth.voxel_volume_ml), 3), float(row.dice),
                              float(row.hd95_mm)))
    report_path = None
    if report:
        from medseg.report import write_report

        case = folder / "results" / f"phantom-{seed}"
        case.mkdir(parents=True, exist_ok=True)
        save_volume(seg.labels, case / "pred.nii.gz")
        save_volume(truth, case / "ref.nii.gz")
        save_volume(study.image, case / "image.nii.gz")
        report_path = write_report(folder / "results", folder / "report.html", modality="CT",
                                   title=f"medseg demo: {model} on phantom seed {seed}").html_path
    t4 = time.perf_counter()
    logger.info("demo: %s segmented in %.1f s", model, t_seg - t1)
    seconds = {"study": t1 - t0, "segment": t_seg - t1, "dicom_seg": t2 - t_seg, "evaluate": t3 - t2,
               "report": t4 - t3, "total": t4 - t0}
    return DemoResult(folder, study, seg, labels_path, tuple(rows), tuple(result.lesions), result, report_path,
                      seg_path, seg_exact, seconds, replaced)
