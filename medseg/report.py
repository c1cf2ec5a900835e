"""Reports for machines (CSV, JSON) and for people (one self-contained HTML file with figures).

The input is a *results folder* with one sub-folder per case (docs/metrics.md, "Results folder layout")::

    RESULTS_DIR/
      <case_id>/             the folder name is the case id printed in the report: use pseudonymous ids
        pred.nii.gz          required: predicted label map (+ pred.labels.json, its label table)
        ref.nii.gz           optional: reference label map (+ ref.labels.json)
        image.nii.gz         optional: the scan, for thumbnails and intensity statistics

Any of ``.nii.gz .nii .nrrd .nhdr .mha .mhd`` works for each file, and ``image`` may also be a DICOM folder.
Cases are sorted by id. The HTML embeds every figure as a base64 PNG (matplotlib, Agg backend) and loads nothing
from the network. It names cases by folder name only: no patient name, ID or date is read or written.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from medseg.display import CT_WINDOW_HU, display_slices
from medseg.errors import ResultsLayoutError
from medseg.files import atomic_write_text
from medseg.labels import default_color
from medseg.metrics import (
    DEFAULT_NSD_TOLERANCE_MM,
    EMPTY_MASK_RULE,
    METRIC_COLUMNS,
    EvaluationResult,
    _finite,
    evaluate,
    label_array,
)
from medseg.stats import LabelStats, VolumeStats, volume_stats
from medseg.volume import Volume

__all__ = [
    "CaseFiles",
    "CaseResult",
    "ReportResult",
    "build_report",
    "evaluate_case",
    "find_cases",
    "metrics_csv",
    "render_html",
    "stats_csv",
    "write_report",
]

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# ---- the results folder ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseFiles:
    """Files of one case in a results folder."""

    case_id: str
    pred: Path
    ref: Path | None = None
    image: Path | None = None


def _find(folder: Path, stem: str) -> Path | None:
    hits = [p for p in sorted(folder.iterdir()) if any(p.name.lower() == stem + s for s in _IMAGE_SUFFIXES)]
    if stem == "image" and (folder / "image").is_dir():
        hits.append(folder / "image")
    if len(hits) > 1:
        raise ResultsLayoutError(
            f"{folder}: several '{stem}' files ({', '.join(p.name for p in hits)}); keep exactly one per case."
        )
    return hits[0] if hits else None


def find_cases(results_dir: str | Path) -> list[CaseFiles]:
    """The cases of a results folder (one sub-folder per case holding ``pred.*``, optional ``ref.*``/``image.*``).

    Raises
    ------
    ResultsLayoutError
        If the folder does not exist, holds no case, or a case has two files of one kind.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ResultsLayoutError(f"{root}: not a folder. Expected RESULTS_DIR/<case_id>/pred.nii.gz (+ ref, image).")
    cases = []
    skipped = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):  # .pacs-cache
        pred = _find(sub, "pred")
        if pred is None:
            skipped.append(sub.name)
            continue
        cases.append(CaseFiles(sub.name, pred, _find(sub, "ref"), _find(sub, "image")))
    if skipped:
        log.warning("Skipping %d folder(s) without a pred.* file: %s", len(skipped), ", ".join(skipped))
    if not cases:
        raise ResultsLayoutError(
            f"{root}: no case found. Expected one sub-folder per case holding pred.nii.gz (or .nrrd, .mha), "
            "optionally ref.nii.gz and image.nii.gz; see docs/metrics.md, 'Results folder layout'."
        )
    return cases


# ---- thumbnails ------------------------------------------------------------------------------------------------
def _colour(value: int, *tables: Any) -> tuple[float, float, float]:
    for t in tables:
        if t is not None and value in t:
            return tuple(c / 255 for c in t[value].color)  # type: ignore[return-value]
    return tuple(c / 255 for c in default_color(value))  # type: ignore[return-value]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnail(image: Volume | None, pred: Volume, ref: Volume | None, names: dict[int, str]) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    p_arr = label_array(pred, what="prediction")
    fg = p_arr > 0
    r_arr = None
    if ref is not None:
        r_arr = label_array(ref, what="reference")
        fg = fg | (r_arr > 0)
    centre_ijk = np.argwhere(fg).mean(axis=0) if fg.any() else (np.array(pred.shape) - 1) / 2
    point = pred.world_mm(centre_ijk)
    p_view = display_slices(pred.with_array(p_arr), point)
    r_view = display_slices(ref.with_array(r_arr), point) if ref is not None and r_arr is not None else None
    if image is not None:
        i_view = display_slices(image, point)
        lo, hi = (
            CT_WINDOW_HU
            if (image.modality or "").upper() == "CT"
            else tuple(np.percentile(image.array[:: max(1, image.array.size // 200000)], [1, 99]))
        )
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 4.2))
    values = sorted(set(np.unique(p_view.axial).tolist() + np.unique(p_view.coronal).tolist()) - {0})
    if r_view is not None:
        values = sorted(set(values) | set(np.unique(r_view.axial).tolist() + np.unique(r_view.coronal).tolist()) - {0})
    for ax, which, title in ((axes[0], "axial", "axial (A up, patient L right)"),
                             (axes[1], "coronal", "coronal (S up, patient L right)")):
        extent = getattr(p_view, f"{which}_extent_mm")
        if image is not None:
            ax.imshow(getattr(i_view, which), cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
        else:
            ax.imshow(np.zeros(getattr(p_view, which).shape), cmap="gray", vmin=0, vmax=1, extent=extent)
        ny, nx = getattr(p_view, which).shape
        x = np.linspace(extent[0], extent[1], nx + 1)[:-1] + (extent[1] - extent[0]) / nx / 2
        y = np.linspace(extent[3], extent[2], ny + 1)[:-1] + (extent[2] - extent[3]) / ny / 2
        for v in values:
            colour = _colour(int(v), pred.labels, ref.labels if ref is not None else None)
            for view, style in ((p_view, "solid"), (r_view, "dashed")):
                if view is None:
                    continue
                m = (getattr(view, which) == v).astype(float)
                if m.any():
                    ax.contour(x, y, m, levels=[0.5], colors=[colour], linewidths=1.2, linestyles=style)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.01, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=9, va="center")
        ax.text(0.97, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=9, va="center")
    handles = [Line2D([], [], color=_colour(int(v), pred.labels, ref.labels if ref is not None else None),
                      label=names.get(int(v), f"label_{v}")) for v in values]
    handles.append(Line2D([], [], color="black", linestyle="solid", label="prediction"))
    if r_view is not None:
        handles.append(Line2D([], [], color="black", linestyle="dashed", label="reference"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False,
                   labelcolor="black")
    fig.subplots_adjust(bottom=0.14)
    return _png(fig)


# ---- per case --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseResult:
    """Everything the report shows about one case.

    Attributes
    ----------
    case_id : str
    evaluation : EvaluationResult or None
        None when the case has no reference.
    stats : VolumeStats
        Of the prediction (with intensities when the case has an image).
    thumbnail_png : str
        Base64 PNG: axial and coronal slices with contours (empty string when thumbnails are off).
    """

    case_id: str
    evaluation: EvaluationResult | None
    stats: VolumeStats
    thumbnail_png: str = ""


def evaluate_case(
    files: CaseFiles,
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    modality: str | None = None,
    resample: bool = False,
    thumbnails: bool = True,
) -> CaseResult:
    """Load one case, evaluate it against its reference (if any), compute statistics, draw its thumbnail.

    Raises
    ------
    MedsegError
        Whatever loading or evaluating raises (unreadable file, grid mismatch, ...), with the file named.
    """
    from medseg.io import load_volume

    pred = load_volume(files.pred)
    ref = load_volume(files.ref) if files.ref is not None else None
    image = load_volume(files.image, modality=modality) if files.image is not None else None
    if ref is not None and not pred.same_grid(ref) and resample:
        from medseg.resample import resample_to

        pred = resample_to(pred, ref, interpolation="nearest")
    evaluation = (
        evaluate(pred, ref, nsd_tolerance_mm=nsd_tolerance_mm, resample=resample) if ref is not None else None
    )
    if image is not None and not image.same_grid(pred) and resample:
        from medseg.resample import resample_to

        image = resample_to(image, pred, interpolation="linear")
    stats = volume_stats(pred, image)
    names = {r.value: r.name for r in stats.labels}
    if evaluation is not None:
        names.update({r.value: r.name for r in evaluation.labels})
    thumb = _thumbnail(image, pred, ref, names) if thumbnails else ""
    return CaseResult(files.case_id, evaluation, stats, thumb)


# ---- tables ----------------------------------------------------------------------------------------------------
def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, tuple | list):
        return " ".join(str(_cell(x)) for x in v)
    return v


def metrics_csv(cases: Sequence[CaseResult]) -> str:
    """One row per (case, label) of the evaluated cases: ``case_id`` then the metric columns."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", *METRIC_COLUMNS, "nsd_tolerance_mm"])
    for case in cases:
        if case.evaluation is None:
            continue
        for row in case.evaluation.labels:
            w.writerow([case.case_id] + [_cell(getattr(row, c)) for c in METRIC_COLUMNS]
                       + [case.evaluation.nsd_tolerance_mm])
    return buf.getvalue()


def stats_csv(cases: Sequence[CaseResult]) -> str:
    """One row per (case, label) of the predictions' statistics: ``case_id`` then :class:`LabelStats` columns."""
    cols = [f.name for f in fields(LabelStats)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", *cols])
    for case in cases:
        for row in case.stats.labels:
            w.writerow([case.case_id] + [_cell(getattr(row, c)) for c in cols])
    return buf.getvalue()


def cases_json(cases: Sequence[CaseResult]) -> dict[str, Any]:
    """All cases as one JSON-ready dict (non-finite numbers become null)."""
    return _finite(
        {
            "empty_mask_rule": EMPTY_MASK_RULE,
            "cases": [
                {
                    "case_id": c.case_id,
                    "evaluation": c.evaluation.to_json() if c.evaluation is not None else None,
                    "stats": c.stats.to_json(),
                }
                for c in cases
            ],
        }
    )


# ---- figures across cases --------------------------------------------------------------------------------------
def _label_rows(cases: Sequence[CaseResult]) -> dict[str, list[tuple[str, Any]]]:
    by_label: dict[str, list[tuple[str, Any]]] = {}
    for case in cases:
        if case.evaluation is None:
            continue
        for row in case.evaluation.labels:
            if row.ref_empty and row.pred_empty:
                continue  # the rule's 1.0 would only flatter the plots
            by_label.setdefault(row.name, []).append((case.case_id, row))
    return by_label


def _dice_figure(by_label: dict[str, list[tuple[str, Any]]]) -> str:
    import matplotlib.pyplot as plt

    names = sorted(by_label)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.6))
    data = [[r.dice for _, r in by_label[n]] for n in names]
    ax.boxplot(data, showfliers=False, widths=0.5)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=14, alpha=0.8, zorder=3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title("Dice per label across cases (box: quartiles; dots: cases)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _volume_figures(by_label: dict[str, list[tuple[str, Any]]]) -> str:
    import matplotlib.pyplot as plt

    fig, (sc, ba) = plt.subplots(1, 2, figsize=(10.0, 4.2))
    all_ref: list[float] = []
    all_pred: list[float] = []
    for n, name in enumerate(sorted(by_label)):
        rows = [r for _, r in by_label[name]]
        ref = np.array([r.ref_ml for r in rows])
        pred = np.array([r.pred_ml for r in rows])
        colour = f"C{n % 10}"
        sc.scatter(ref, pred, s=18, color=colour, label=name)
        ba.scatter((ref + pred) / 2, pred - ref, s=18, color=colour, label=name)
        all_ref.extend(ref)
        all_pred.extend(pred)
    r, p = np.array(all_ref), np.array(all_pred)
    hi = float(max(r.max(initial=0), p.max(initial=0))) * 1.05 or 1.0
    sc.plot([0, hi], [0, hi], color="grey", lw=1, ls="--", label="identity")
    sc.set_xlim(0, hi)
    sc.set_ylim(0, hi)
    sc.set_xlabel("reference volume (mL)")
    sc.set_ylabel("predicted volume (mL)")
    sc.set_title("Predicted vs reference volume", fontsize=10)
    diff = p - r
    if diff.size:
        mean, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
        for y, style, text in ((mean, "-", f"mean {mean:+.1f} mL"), (mean + 1.96 * sd, "--", f"+1.96 SD {mean + 1.96 * sd:+.1f}"),
                               (mean - 1.96 * sd, "--", f"−1.96 SD {mean - 1.96 * sd:+.1f}")):
            ba.axhline(y, color="grey", ls=style, lw=1)
            ba.text(1.0, y, " " + text, transform=ba.get_yaxis_transform(), fontsize=7, va="center")
    ba.axhline(0, color="black", lw=0.5)
    ba.set_xlabel("mean of predicted and reference (mL)")
    ba.set_ylabel("predicted − reference (mL)")
    ba.set_title("Bland–Altman (all labels)", fontsize=10)
    sc.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _png(fig)


# ---- HTML ------------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc} h3{font-size:15px}
table{border-collapse:collapse;font-size:12px;margin:6px 0 12px} th,td{border:1px solid #ddd;padding:3px 7px;
text-align:right} th{background:#f3f3f3} td.l,th.l{text-align:left} .note{color:#555;font-size:12px}
img{max-width:100%} .case{margin-bottom:30px} .swatch{display:inline-block;width:10px;height:10px;margin-right:4px}
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def render_html(cases: Sequence[CaseResult], *, title: str = "medseg report") -> str:
    """The self-contained HTML report of evaluated cases (figures embedded, nothing loaded from the network)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>")]
    n_eval = sum(c.evaluation is not None for c in cases)
    tol = next((c.evaluation.nsd_tolerance_mm for c in cases if c.evaluation is not None), None)
    parts.append(f"<p class='note'>{len(cases)} case(s), {n_eval} with a reference. Distances in mm, volumes in mL"
                 + (f", NSD at {tol:g} mm" if tol is not None else "") + ". Empty-mask rule: "
                 + html.escape(EMPTY_MASK_RULE) + "</p>")
    by_label = _label_rows(cases)
    if by_label:
        parts.append("<h2>Summary across cases</h2>")
        rows = []
        for name in sorted(by_label):
            ms = [r for _, r in by_label[name]]
            dice = np.array([r.dice for r in ms])
            hd95 = np.array([r.hd95_mm for r in ms])
            finite = hd95[np.isfinite(hd95)]
            rows.append([html.escape(name), len(ms), _fmt(float(dice.mean())), _fmt(float(dice.std())),
                         _fmt(float(np.median(dice))), _fmt(float(np.median(finite))) if finite.size else "–",
                         int((~np.isfinite(hd95)).sum())])
        parts.append(_table(["label", "cases", "Dice mean", "Dice SD", "Dice median", "HD95 median (mm)",
                             "one side empty"], rows))
        parts.append("<p class='note'>Rows where a label is absent from both prediction and reference are left out "
                     "of the summary and the figures.</p>")
        parts.append(_img(_dice_figure(by_label), "Dice per label across cases"))
        parts.append("<br>" + _img(_volume_figures(by_label), "Volume scatter and Bland-Altman plot"))
    parts.append("<h2>Cases</h2>")
    for case in cases:
        parts.append(f"<div class='case'><h3>{html.escape(case.case_id)}</h3>")
        if case.evaluation is not None:
            ev = case.evaluation
            parts.append(_table(
                ["label", "Dice", "IoU", "precision", "recall", "HD (mm)", "HD95 (mm)", "ASSD (mm)",
                 f"NSD@{ev.nsd_tolerance_mm:g}mm", "pred mL", "ref mL", "Δ mL", "Δ %"],
                [[html.escape(r.name), _fmt(r.dice), _fmt(r.iou), _fmt(r.precision), _fmt(r.recall),
                  _fmt(r.hausdorff_mm, 2), _fmt(r.hd95_mm, 2), _fmt(r.assd_mm, 2), _fmt(r.nsd), _fmt(r.pred_ml, 2),
                  _fmt(r.ref_ml, 2), _fmt(r.volume_diff_ml, 2), _fmt(r.volume_diff_pct, 1)] for r in ev.labels]))
            if ev.lesions:
                parts.append(_table(
                    ["lesion label", "ref lesions", "pred lesions", "detected", "missed", "false pos.", "split",
                     "merged", "precision", "recall", "F1", "FP mL"],
                    [[html.escape(d.name), d.n_ref, d.n_pred, d.tp_ref, d.fn, d.fp, d.n_split, d.n_merged,
                      _fmt(d.precision), _fmt(d.recall), _fmt(d.f1), _fmt(d.fp_ml, 2)] for d in ev.lesions]))
        unit = case.stats.intensity_unit or "image units"
        parts.append(_table(
            ["label (prediction)", "mL", "components", f"mean ({unit})", "SD", "p5", "p95", "extent x×y×z (mm)"],
            [[html.escape(r.name), _fmt(r.volume_ml, 2), r.n_components, _fmt(r.intensity_mean, 1),
              _fmt(r.intensity_std, 1), _fmt(r.intensity_p5, 1), _fmt(r.intensity_p95, 1),
              " × ".join(_fmt(e, 1) for e in r.extent_mm)] for r in case.stats.labels]))
        if case.thumbnail_png:
            parts.append(_img(case.thumbnail_png, f"{case.case_id}: axial and coronal slices with contours"))
            parts.append("<div class='note'>Solid: prediction; dashed: reference. Slices through the centre of the "
                         "labelled voxels.</div>")
        parts.append("</div>")
    parts.append("<p class='note'>Written by medseg. Definitions: docs/metrics.md.</p></body></html>")
    return "".join(parts)


# ---- the whole report ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote.

    Attributes
    ----------
    html_path : Path
    csv_paths : tuple of Path
        ``<stem>_metrics.csv`` (when a case has a reference) and ``<stem>_stats.csv`` beside the HTML.
    json_path : Path
        ``<stem>.json`` beside the HTML: every case's evaluation and statistics.
    n_cases, n_evaluated : int
    """

    html_path: Path
    csv_paths: tuple[Path, ...]
    json_path: Path
    n_cases: int
    n_evaluated: int


def build_report(
    results_dir: str | Path,
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    modality: str | None = None,
    resample: bool = False,
    thumbnails: bool = True,
) -> list[CaseResult]:
    """Evaluate every case of a results folder (see the module docstring for its layout).

    Raises
    ------
    ResultsLayoutError
        If the folder holds no case.
    MedsegError
        If a case cannot be loaded or evaluated; the message starts with the case id.
    """
    from medseg.errors import MedsegError

    out = []
    for files in find_cases(results_dir):
        log.info("Case %s", files.case_id)
        try:
            out.append(evaluate_case(files, nsd_tolerance_mm=nsd_tolerance_mm, modality=modality,
                                     resample=resample, thumbnails=thumbnails))
        except MedsegError as exc:
            raise type(exc)(f"case {files.case_id}: {exc}") from None
    return out


def write_report(
    results_dir: str | Path,
    out_html: str | Path,
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    modality: str | None = None,
    resample: bool = False,
    title: str = "medseg report",
) -> ReportResult:
    """Evaluate a results folder and write the HTML report plus CSV and JSON tables beside it.

    Parameters
    ----------
    results_dir : path
        ``RESULTS_DIR/<case_id>/pred.*`` (+ optional ``ref.*``, ``image.*``).
    out_html : path
        The HTML file to write; ``<stem>_metrics.csv``, ``<stem>_stats.csv`` and ``<stem>.json`` go beside it.
    nsd_tolerance_mm : float
        NSD tolerance in mm.
    modality : str, optional
        Modality of image files that do not record one (NIfTI): ``"CT"`` gives HU and a soft-tissue window.
    resample : bool
        Resample predictions (nearest) and images (linear) onto the reference / prediction grid when they differ.

    Returns
    -------
    ReportResult

    Raises
    ------
    ResultsLayoutError
        If the folder holds no case, or ``out_html`` does not end in .html.
    MedsegError
        If a case cannot be loaded or evaluated (nothing is written then).
    """
    out = Path(out_html)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ResultsLayoutError(f"{out}: the report is an HTML file; give a path ending in .html.")
    cases = build_report(results_dir, nsd_tolerance_mm=nsd_tolerance_mm, modality=modality, resample=resample)
    page = render_html(cases, title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_paths = []
    n_eval = sum(c.evaluation is not None for c in cases)
    if n_eval:
        p = out.with_name(out.stem + "_metrics.csv")
        atomic_write_text(p, metrics_csv(cases))
        csv_paths.append(p)
    p = out.with_name(out.stem + "_stats.csv")
    atomic_write_text(p, stats_csv(cases))
    csv_paths.append(p)
    json_path = out.with_name(out.stem + ".json")
    atomic_write_text(json_path, json.dumps(cases_json(cases), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out, page)
    return ReportResult(out, tuple(csv_paths), json_path, len(cases), n_eval)
