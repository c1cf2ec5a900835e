"""How good a segmentation is against a reference: overlap and surface metrics per label, lesion-wise detection.

Every distance is measured in world millimetres through the volumes' affine, so anisotropic, flipped and oblique
grids give the same numbers as the shapes they hold. Definitions (docs/metrics.md has the long form):

* Overlap, from voxel counts: Dice = 2|P∩R| / (|P| + |R|), IoU = |P∩R| / |P∪R|, precision = |P∩R| / |P|,
  recall = |P∩R| / |R|.
* Surfaces, as MONAI defines them: the surface of a mask is the mask minus its 6-connected erosion (voxels outside
  the grid count as background); distances go between surface-voxel centres. ``d(P→R)`` is, for every surface
  voxel of P, the distance to the nearest surface voxel of R (and the other way round).
  Hausdorff = max of both directions; HD95 = max of the two one-way 95th percentiles (linear interpolation);
  ASSD = mean of all distances of both directions together; NSD (normalised surface Dice at tolerance τ) =
  (#d(P→R) ≤ τ + #d(R→P) ≤ τ) / (#surface P + #surface R). These equal MONAI's ``compute_hausdorff_distance``,
  ``compute_hausdorff_distance(percentile=95)``, ``compute_average_surface_distance(symmetric=True)`` and
  ``compute_surface_dice`` given the voxel spacing.
* Empty masks, one rule everywhere (:data:`EMPTY_MASK_RULE`): when a label is absent from both masks every score
  takes its best value (Dice, IoU, precision, recall, NSD = 1; distances = 0 mm); when it is absent from exactly
  one, every score takes its worst value (scores = 0; distances = +inf mm). Rows say which side was empty.
* Lesions: connected components with 26-connectivity (faces, edges and corners touch); a reference lesion is
  detected when at least one predicted component overlaps it by one voxel or more, and a predicted component is a
  true positive when it overlaps at least one reference lesion.

All four surface numbers come from one pass per label: crop both masks to their union bounding box, find the two
surfaces, build one KD-tree per surface (scipy ``cKDTree``) and query only the surface voxels that the other
surface does not share (shared voxels are at distance 0).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

import numpy as np

from medseg._masks import bounding_box
from medseg.errors import GridMismatchError, LabelTableError
from medseg.labels import LabelTable, find_row
from medseg.volume import Volume

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "EMPTY_MASK_RULE",
    "LESION_CONNECTIVITY",
    "EvaluationResult",
    "LabelMetrics",
    "LesionDetection",
    "LesionMatch",
    "SurfaceDistances",
    "evaluate",
    "label_array",
    "surface_distances",
]

log = logging.getLogger(__name__)

#: Connectivity of lesion components: 26 = voxels touching by a face, an edge or a corner are one lesion.
LESION_CONNECTIVITY: Final = 26

#: Default tolerance of the normalised surface Dice, in mm.
DEFAULT_NSD_TOLERANCE_MM = 2.0

#: The empty-mask rule, in words (also written into every JSON result).
EMPTY_MASK_RULE = (
    "label absent from both prediction and reference: Dice = IoU = precision = recall = NSD = 1, "
    "Hausdorff = HD95 = ASSD = 0 mm, volume difference 0 mL and 0 %; absent from exactly one: "
    "Dice = IoU = precision = recall = NSD = 0, Hausdorff = HD95 = ASSD = +inf mm "
    "(volume difference % = +inf when only the reference is empty); lesion detection: no lesions on either "
    "side gives precision = recall = F1 = 1, lesions on one side only give 0."
)


# ---- label maps ------------------------------------------------------------------------------------------------
def label_array(volume: Volume, *, what: str = "label map") -> np.ndarray:
    """The voxel array of a label map as non-negative integers (float 0/1 masks are accepted).

    Parameters
    ----------
    volume : Volume
        3D label map, shape (I, J, K).
    what : str
        Name used in error messages (e.g. ``"prediction"``).

    Returns
    -------
    ndarray, shape (I, J, K), dtype uint8, uint16 or int64

    Raises
    ------
    LabelTableError
        If the volume has channels, or holds negative or non-integer values.
    """
    arr = volume.array
    if arr.ndim != 3:
        raise LabelTableError(
            f"The {what} must be a 3D label map (I, J, K); got an array of shape {arr.shape}. "
            "Take the argmax over the channel axis first."
        )
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.rint(arr)):
            raise LabelTableError(
                f"The {what} holds non-integer values (dtype {arr.dtype}); a label map holds integers 0, 1, 2, ... "
                "Threshold or argmax probabilities first."
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise LabelTableError(f"The {what} has dtype {arr.dtype}; a label map holds integers 0, 1, 2, ...")
    lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
    if lo < 0:
        raise LabelTableError(f"The {what} holds negative values (minimum {lo}); labels are 0 (background) or 1..65535.")
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if hi <= 255:
        return arr.astype(np.uint8)
    if hi <= 65535:
        return arr.astype(np.uint16)
    return arr.astype(np.int64)


def _bounding_boxes(arr: np.ndarray) -> list[tuple[slice, ...] | None]:
    """Index v-1 → bounding box of value v (None if absent), found inside the foreground's bounding box."""
    from scipy import ndimage

    fg = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(arr.any(axis=other))
        if idx.size == 0:
            return []
        fg.append(slice(int(idx[0]), int(idx[-1]) + 1))
    boxes = ndimage.find_objects(arr[tuple(fg)])
    return [
        None if b is None else tuple(slice(s.start + f.start, s.stop + f.start) for s, f in zip(b, fg, strict=True))
        for b in boxes
    ]


def _label_counts(arr: np.ndarray, boxes: list[tuple[slice, ...] | None]) -> dict[int, int]:
    """Voxel count of every value present, counted inside its bounding box (no full-size temporaries)."""
    return {v: int(np.count_nonzero(arr[b] == v)) for v, b in enumerate(boxes, start=1) if b is not None}


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def _box(boxes: list[tuple[slice, ...] | None], value: int) -> tuple[slice, ...] | None:
    return boxes[value - 1] if 0 < value <= len(boxes) else None


# ---- surface distances -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SurfaceDistances:
    """Distances between the surfaces of two masks, both directions, in mm.

    Attributes
    ----------
    pred_to_ref_mm : ndarray, shape (n_pred_surface,)
        For every surface voxel of the prediction, the distance to the nearest reference surface voxel.
    ref_to_pred_mm : ndarray, shape (n_ref_surface,)
        For every surface voxel of the reference, the distance to the nearest prediction surface voxel.
    """

    pred_to_ref_mm: np.ndarray
    ref_to_pred_mm: np.ndarray

    def hausdorff_mm(self) -> float:
        """Largest distance of either direction."""
        return max(float(self.pred_to_ref_mm.max()), float(self.ref_to_pred_mm.max()))

    def hd95_mm(self) -> float:
        """Largest of the two one-way 95th percentiles (linear interpolation, as MONAI and numpy do)."""
        return max(float(np.percentile(self.pred_to_ref_mm, 95)), float(np.percentile(self.ref_to_pred_mm, 95)))

    def assd_mm(self) -> float:
        """Mean of all distances of both directions (average symmetric surface distance)."""
        n = self.pred_to_ref_mm.size + self.ref_to_pred_mm.size
        return float((self.pred_to_ref_mm.sum() + self.ref_to_pred_mm.sum()) / n)

    def nsd(self, tolerance_mm: float) -> float:
        """Normalised surface Dice: fraction of both surfaces within ``tolerance_mm`` of the other.

        Distances and tolerance are compared in float32, as MONAI does, so that a distance equal to the tolerance
        up to rounding counts as within it.
        """
        tol = np.float32(tolerance_mm)
        inside = int(np.count_nonzero(self.pred_to_ref_mm.astype(np.float32) <= tol)) + int(
            np.count_nonzero(self.ref_to_pred_mm.astype(np.float32) <= tol)
        )
        return inside / (self.pred_to_ref_mm.size + self.ref_to_pred_mm.size)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a zero-padded boolean mask (shape (I+2, J+2, K+2)) → shape (I, J, K).

    A voxel is on the surface when it is in the mask and at least one of its 6 face neighbours is not.
    """
    c = mask[1:-1, 1:-1, 1:-1]
    interior = mask[:-2, 1:-1, 1:-1] & mask[2:, 1:-1, 1:-1]
    interior &= mask[1:-1, :-2, 1:-1]
    interior &= mask[1:-1, 2:, 1:-1]
    interior &= mask[1:-1, 1:-1, :-2]
    interior &= mask[1:-1, 1:-1, 2:]
    interior &= c
    return c & ~interior


def _padded(arr: np.ndarray, box: tuple[slice, ...], value: int | None) -> np.ndarray:
    """``arr[box] == value`` (or ``arr[box] != 0`` for ``value=None``) with one voxel of background around it."""
    sub = arr[box]
    out = np.zeros(tuple(n + 2 for n in sub.shape), dtype=bool)
    if value is None:
        np.not_equal(sub, 0, out=out[1:-1, 1:-1, 1:-1])
    else:
        np.equal(sub, value, out=out[1:-1, 1:-1, 1:-1])
    return out


def _one_way(tree: Any, points: np.ndarray, n_total: int) -> np.ndarray:
    """Distances of ``points`` to the tree, padded with zeros up to ``n_total`` (the shared surface voxels)."""
    d = np.zeros(n_total, dtype=np.float64)
    if len(points):
        d[: len(points)] = tree.query(points, k=1, workers=-1)[0]
    return d


def _surface_distances_padded(pm: np.ndarray, rm: np.ndarray, linear: np.ndarray) -> SurfaceDistances | None:
    """Surface distances of two zero-padded masks of one shape; ``linear`` is the 3×3 voxel→mm matrix.

    Returns None when either mask is empty.
    """
    from scipy.spatial import cKDTree

    sp = _surface(pm)
    sr = _surface(rm)
    n_p = int(np.count_nonzero(sp))
    n_r = int(np.count_nonzero(sr))
    if n_p == 0 or n_r == 0:
        return None
    shared = sp & sr
    # Only the translation-free linear part matters for distances; index coordinates stay small and exact.
    p_all = np.argwhere(sp).astype(np.float64) @ linear.T
    r_all = np.argwhere(sr).astype(np.float64) @ linear.T
    p_only = np.argwhere(sp & ~shared).astype(np.float64) @ linear.T
    r_only = np.argwhere(sr & ~shared).astype(np.float64) @ linear.T
    tree_r = cKDTree(r_all, leafsize=32, balanced_tree=False, compact_nodes=False)
    tree_p = cKDTree(p_all, leafsize=32, balanced_tree=False, compact_nodes=False)
    return SurfaceDistances(_one_way(tree_r, p_only, n_p), _one_way(tree_p, r_only, n_r))


def surface_distances(pred: np.ndarray, ref: np.ndarray, *, affine: np.ndarray | None = None) -> SurfaceDistances | None:
    """Surface-to-surface distances between two boolean masks on one grid.

    Parameters
    ----------
    pred, ref : ndarray of bool, shape (I, J, K)
        The two masks.
    affine : ndarray, shape (4, 4) or (3, 3), optional
        Voxel → world (mm) matrix; identity (1 mm isotropic) when omitted.

    Returns
    -------
    SurfaceDistances or None
        None when either mask is empty (the empty-mask rule then decides the metrics).

    Raises
    ------
    ValueError
        If the masks differ in shape.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"Masks must be 3D and of one shape, got {pred.shape} and {ref.shape}.")
    linear = np.eye(3) if affine is None else np.asarray(affine, dtype=np.float64)[:3, :3]
    box = bounding_box(pred | ref)
    if box is None:
        return None
    return _surface_distances_padded(_padded(pred, box, 1), _padded(ref, box, 1), linear)


# ---- results ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelMetrics:
    """Agreement of one label between prediction and reference.

    Attributes
    ----------
    value, name : int, str
        The label.
    dice, iou, precision, recall : float
        Voxel overlap scores in [0, 1].
    hausdorff_mm, hd95_mm, assd_mm : float
        Surface distances in mm (+inf when exactly one mask is empty).
    nsd : float
        Normalised surface Dice at the result's ``nsd_tolerance_mm``, in [0, 1].
    pred_ml, ref_ml : float
        Volumes in mL.
    volume_diff_ml : float
        ``pred_ml - ref_ml``.
    volume_diff_pct : float
        ``100 * (pred_ml - ref_ml) / ref_ml`` (0 when both are empty, +inf when only the reference is).
    pred_voxels, ref_voxels : int
        Voxel counts.
    pred_empty, ref_empty : bool
        Which side lacks the label (the empty-mask rule then set the scores).
    """

    value: int
    name: str
    dice: float
    iou: float
    precision: float
    recall: float
    hausdorff_mm: float
    hd95_mm: float
    assd_mm: float
    nsd: float
    pred_ml: float
    ref_ml: float
    volume_diff_ml: float
    volume_diff_pct: float
    pred_voxels: int
    ref_voxels: int
    pred_empty: bool
    ref_empty: bool


@dataclass(frozen=True)
class LesionMatch:
    """One reference lesion, or one false-positive predicted component.

    Attributes
    ----------
    status : {"detected", "missed", "false_positive"}
    ref_id : int or None
        Component number of the reference lesion (1..n, cc3d order), None for a false positive.
    pred_ids : tuple of int
        Predicted components overlapping the reference lesion (the false positive itself for ``false_positive``).
    ref_ml, pred_ml : float
        Volume of the reference lesion and of the union of ``pred_ids``, mL.
    dice : float
        Dice between the reference lesion and the union of ``pred_ids`` (0 for missed and false positives).
    centroid_mm : tuple of 3 float
        RAS world centroid of the reference lesion (of the predicted component for a false positive).
    split : bool
        The reference lesion is overlapped by two or more predicted components.
    merged : bool
        A predicted component overlapping this lesion also overlaps another reference lesion.
    """

    status: str
    ref_id: int | None
    pred_ids: tuple[int, ...]
    ref_ml: float
    pred_ml: float
    dice: float
    centroid_mm: tuple[float, float, float]
    split: bool
    merged: bool


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise detection of one lesion label.

    Attributes
    ----------
    value, name : int, str
        The label.
    n_ref, n_pred : int
        Reference lesions and predicted components (26-connectivity).
    tp_ref : int
        Reference lesions overlapped by at least one predicted component (detected).
    fn : int
        Reference lesions no predicted component overlaps (missed).
    tp_pred : int
        Predicted components overlapping at least one reference lesion.
    fp : int
        Predicted components overlapping no reference lesion.
    n_split : int
        Reference lesions overlapped by two or more predicted components.
    n_merged : int
        Predicted components overlapping two or more reference lesions.
    precision, recall, f1 : float
        ``tp_pred / n_pred``, ``tp_ref / n_ref`` and their harmonic mean (empty-mask rule when a count is 0).
    fp_ml : float
        Total volume of the false-positive components, mL.
    lesions : tuple of LesionMatch
        One row per reference lesion, then one per false-positive component.
    """

    value: int
    name: str
    n_ref: int
    n_pred: int
    tp_ref: int
    fn: int
    tp_pred: int
    fp: int
    n_split: int
    n_merged: int
    precision: float
    recall: float
    f1: float
    fp_ml: float
    lesions: tuple[LesionMatch, ...] = ()


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as null (the empty flags and the rule say why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple | list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


METRIC_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(LabelMetrics))


@dataclass(frozen=True)
class EvaluationResult:
    """Per-label metrics (and lesion-wise detection) of one prediction against one reference.

    Attributes
    ----------
    labels : tuple of LabelMetrics
        One row per evaluated label, by value.
    lesions : tuple of LesionDetection
        One entry per lesion label (kind ``"lesion"`` in a label table, or named in ``lesion_labels``).
    nsd_tolerance_mm : float
        Tolerance of the NSD column.
    spacing_mm : tuple of 3 float
        Voxel size of the reference grid.
    resampled : bool
        True when the prediction was resampled onto the reference grid first.
    """

    labels: tuple[LabelMetrics, ...]
    lesions: tuple[LesionDetection, ...]
    nsd_tolerance_mm: float
    spacing_mm: tuple[float, float, float]
    resampled: bool = False
    empty_mask_rule: str = field(default=EMPTY_MASK_RULE, repr=False)

    def __getitem__(self, key: int | str) -> LabelMetrics:
        """The row of a label by value or name.

        Raises
        ------
        KeyError
            If no row has that value or name.
        """
        return find_row(self.labels, key, what="evaluated label")  # type: ignore[no-any-return]

    def lesion(self, key: int | str) -> LesionDetection:
        """The lesion-wise result of a label by value or name.

        Raises
        ------
        KeyError
            If the label was not evaluated lesion-wise.
        """
        for row in self.lesions:
            if row.value == key or row.name == key:
                return row
        raise KeyError(f"No lesion-wise result for {key!r}; lesion labels: {[r.name for r in self.lesions]}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become null)."""
        return _finite(
            {
                "nsd_tolerance_mm": self.nsd_tolerance_mm,
                "spacing_mm": list(self.spacing_mm),
                "resampled": self.resampled,
                "empty_mask_rule": self.empty_mask_rule,
                "labels": [asdict(r) for r in self.labels],
                "lesions": [asdict(r) for r in self.lesions],
            }
        )

    def to_csv(self) -> str:
        """One CSV row per label (columns: :data:`METRIC_COLUMNS` plus ``nsd_tolerance_mm``); inf written as inf."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*METRIC_COLUMNS, "nsd_tolerance_mm"])
        for row in self.labels:
            writer.writerow([_csv_cell(getattr(row, c)) for c in METRIC_COLUMNS] + [self.nsd_tolerance_mm])
        return buf.getvalue()

    def lesions_to_csv(self) -> str:
        """One CSV row per lesion (reference lesions and false-positive components) of every lesion label."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        cols = [f.name for f in fields(LesionMatch)]
        writer.writerow(["value", "name", *cols])
        for det in self.lesions:
            for les in det.lesions:
                writer.writerow([det.value, det.name] + [_csv_cell(getattr(les, c)) for c in cols])
        return buf.getvalue()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    if isinstance(value, tuple):
        return " ".join(str(_csv_cell(v)) for v in value)
    return value


def result_from_json(data: dict[str, Any]) -> EvaluationResult:
    """Rebuild an :class:`EvaluationResult` from :meth:`EvaluationResult.to_json` output (null → +inf/nan).

    Raises
    ------
    ValueError
        If ``data`` is not such a dict.
    """

    def num(row: dict[str, Any], key: str) -> float:
        v = row[key]
        if v is not None:
            return float(v)
        # null: set by the empty-mask rule (inf) unless both sides are empty.
        return math.inf

    try:
        labels = tuple(
            LabelMetrics(
                **{  # type: ignore[arg-type]
                    f.name: (num(row, f.name) if f.type in ("float", float) else row[f.name])
                    for f in fields(LabelMetrics)
                }
            )
            for row in data["labels"]
        )
        lesions = tuple(
            LesionDetection(
                **{k: v for k, v in det.items() if k != "lesions"},
                lesions=tuple(
                    LesionMatch(
                        **{
                            **les,
                            "pred_ids": tuple(les["pred_ids"]),
                            "centroid_mm": tuple(les["centroid_mm"]),
                        }
                    )
                    for les in det["lesions"]
                ),
            )
            for det in data.get("lesions", [])
        )
        return EvaluationResult(
            labels=labels,
            lesions=lesions,
            nsd_tolerance_mm=float(data["nsd_tolerance_mm"]),
            spacing_mm=tuple(data["spacing_mm"]),  # type: ignore[arg-type]
            resampled=bool(data.get("resampled", False)),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"Not an evaluation result ({type(exc).__name__}: {exc}).") from None


# ---- the evaluation --------------------------------------------------------------------------------------------
def _resolve_labels(
    keys: Sequence[int | str] | None, tables: Sequence[LabelTable | None], present: set[int], what: str
) -> list[int]:
    if keys is None:
        values = set(present)
        for t in tables:
            if t is not None:
                values |= set(t)
        return sorted(values)
    out: list[int] = []
    for key in keys:
        if isinstance(key, str) and not key.isdigit():
            for t in tables:
                if t is not None and key in t.names.values():
                    out.append(t.value_of(key))
                    break
            else:
                known = sorted({n for t in tables if t is not None for n in t.names.values()})
                raise LabelTableError(f"No label named {key!r} in the {what} label tables; names there: {known}.")
        else:
            v = int(key)
            if not 1 <= v <= 65535:
                raise LabelTableError(f"Label values are 1..65535 (0 is background), not {v}.")
            out.append(v)
    return sorted(set(out))


def _label_name(value: int, tables: Sequence[LabelTable | None]) -> str:
    for t in tables:
        if t is not None and value in t:
            return t[value].name
    return f"label_{value}"


def _is_lesion(value: int, tables: Sequence[LabelTable | None]) -> bool:
    for t in tables:
        if t is not None and value in t:
            return t[value].kind == "lesion"
    return False


def _label_metrics(
    value: int,
    name: str,
    p_arr: np.ndarray,
    r_arr: np.ndarray,
    p_box: tuple[slice, ...] | None,
    r_box: tuple[slice, ...] | None,
    n_p: int,
    n_r: int,
    linear: np.ndarray,
    voxel_ml: float,
    tolerance_mm: float,
) -> LabelMetrics:
    pred_ml, ref_ml = n_p * voxel_ml, n_r * voxel_ml
    diff_ml = pred_ml - ref_ml
    pred_empty, ref_empty = n_p == 0, n_r == 0
    common = {
        "value": value, "name": name, "pred_ml": pred_ml, "ref_ml": ref_ml, "volume_diff_ml": diff_ml,
        "pred_voxels": n_p, "ref_voxels": n_r, "pred_empty": pred_empty, "ref_empty": ref_empty,
    }
    if pred_empty and ref_empty:
        return LabelMetrics(dice=1.0, iou=1.0, precision=1.0, recall=1.0, hausdorff_mm=0.0, hd95_mm=0.0,
                            assd_mm=0.0, nsd=1.0, volume_diff_pct=0.0, **common)  # type: ignore[arg-type]
    pct = math.inf if ref_empty else 100.0 * diff_ml / ref_ml
    if pred_empty or ref_empty:
        return LabelMetrics(dice=0.0, iou=0.0, precision=0.0, recall=0.0, hausdorff_mm=math.inf, hd95_mm=math.inf,
                            assd_mm=math.inf, nsd=0.0, volume_diff_pct=pct, **common)  # type: ignore[arg-type]
    box = _union_box(p_box, r_box)
    assert box is not None
    pm = _padded(p_arr, box, value)
    rm = _padded(r_arr, box, value)
    tp = int(np.count_nonzero(pm & rm))
    dist = _surface_distances_padded(pm, rm, linear)
    assert dist is not None
    return LabelMetrics(
        dice=2.0 * tp / (n_p + n_r),
        iou=tp / (n_p + n_r - tp),
        precision=tp / n_p,
        recall=tp / n_r,
        hausdorff_mm=dist.hausdorff_mm(),
        hd95_mm=dist.hd95_mm(),
        assd_mm=dist.assd_mm(),
        nsd=dist.nsd(tolerance_mm),
        volume_diff_pct=pct,
        **common,  # type: ignore[arg-type]
    )


def _rate(num: int, den: int, *, nothing_anywhere: bool) -> float:
    """``num / den``; a zero denominator follows the empty-mask rule (1 if both sides are empty, else 0)."""
    if den == 0:
        return 1.0 if nothing_anywhere else 0.0
    return num / den


def lesion_detection(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    *,
    affine: np.ndarray,
    value: int = 1,
    name: str = "lesion",
) -> LesionDetection:
    """Lesion-wise detection between two boolean masks on one grid (26-connected components).

    Parameters
    ----------
    pred_mask, ref_mask : ndarray of bool, shape (I, J, K)
    affine : ndarray, shape (4, 4)
        Voxel → RAS world (mm); gives volumes and centroids.
    value, name : int, str
        The label, for the result.

    Returns
    -------
    LesionDetection
    """
    import cc3d

    affine = np.asarray(affine, dtype=np.float64)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    box = bounding_box(pred_mask | ref_mask)
    if box is None:
        return LesionDetection(value, name, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 1.0, 1.0, 0.0, ())
    offset = np.array([s.start for s in box], dtype=np.float64)
    ref_cc, n_ref = cc3d.connected_components(
        np.ascontiguousarray(ref_mask[box]), connectivity=LESION_CONNECTIVITY, return_N=True
    )
    pred_cc, n_pred = cc3d.connected_components(
        np.ascontiguousarray(pred_mask[box]), connectivity=LESION_CONNECTIVITY, return_N=True
    )
    ref_size = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)
    pred_size = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    both = (ref_cc > 0) & (pred_cc > 0)
    pairs = ref_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both]
    keys, counts = np.unique(pairs, return_counts=True)
    overlap: dict[tuple[int, int], int] = {
        (int(k // (n_pred + 1)), int(k % (n_pred + 1))): int(c) for k, c in zip(keys, counts, strict=True)
    }
    ref_to_pred: dict[int, list[int]] = {i: [] for i in range(1, n_ref + 1)}
    pred_to_ref: dict[int, list[int]] = {j: [] for j in range(1, n_pred + 1)}
    for r, p in overlap:
        ref_to_pred[r].append(p)
        pred_to_ref[p].append(r)

    def centroids(cc: np.ndarray, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros((0, 3))
        idx = np.nonzero(cc)
        lab = cc[idx]
        sums = np.stack([np.bincount(lab, weights=i, minlength=n + 1)[1:] for i in idx], axis=1)
        ijk = sums / np.bincount(lab, minlength=n + 1)[1:, None] + offset
        return ijk @ affine[:3, :3].T + affine[:3, 3]

    ref_c, pred_c = centroids(ref_cc, n_ref), centroids(pred_cc, n_pred)
    rows: list[LesionMatch] = []
    for r in range(1, n_ref + 1):
        ps = sorted(ref_to_pred[r])
        inter = sum(overlap[(r, p)] for p in ps)
        p_vox = int(sum(pred_size[p] for p in ps))
        rows.append(
            LesionMatch(
                status="detected" if ps else "missed",
                ref_id=r,
                pred_ids=tuple(ps),
                ref_ml=float(ref_size[r]) * voxel_ml,
                pred_ml=p_vox * voxel_ml,
                dice=2.0 * inter / (ref_size[r] + p_vox),
                centroid_mm=tuple(float(v) for v in ref_c[r - 1]),  # type: ignore[arg-type]
                split=len(ps) >= 2,
                merged=any(len(pred_to_ref[p]) >= 2 for p in ps),
            )
        )
    fp_ids = [p for p in range(1, n_pred + 1) if not pred_to_ref[p]]
    for p in fp_ids:
        rows.append(
            LesionMatch(
                status="false_positive", ref_id=None, pred_ids=(p,), ref_ml=0.0,
                pred_ml=float(pred_size[p]) * voxel_ml, dice=0.0,
                centroid_mm=tuple(float(v) for v in pred_c[p - 1]),  # type: ignore[arg-type]
                split=False, merged=False,
            )
        )
    tp_ref = sum(1 for r in ref_to_pred if ref_to_pred[r])
    tp_pred = n_pred - len(fp_ids)
    nothing = n_ref == 0 and n_pred == 0
    precision = _rate(tp_pred, n_pred, nothing_anywhere=nothing)
    recall = _rate(tp_ref, n_ref, nothing_anywhere=nothing)
    if n_ref == 0 and n_pred == 0:
        f1 = 1.0
    else:
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return LesionDetection(
        value=value,
        name=name,
        n_ref=int(n_ref),
        n_pred=int(n_pred),
        tp_ref=tp_ref,
        fn=int(n_ref) - tp_ref,
        tp_pred=tp_pred,
        fp=len(fp_ids),
        n_split=sum(1 for r in ref_to_pred if len(ref_to_pred[r]) >= 2),
        n_merged=sum(1 for p in pred_to_ref if len(pred_to_ref[p]) >= 2),
        precision=precision,
        recall=recall,
        f1=f1,
        fp_ml=float(sum(pred_size[p] for p in fp_ids)) * voxel_ml,
        lesions=tuple(rows),
    )


def evaluate(
    pred: Volume,
    ref: Volume,
    *,
    labels: Sequence[int | str] | None = None,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    lesion_labels: Sequence[int | str] | None = None,
    resample: bool = False,
) -> EvaluationResult:
    """Per-label overlap, surface and volume agreement of a predicted label map with a reference.

    Parameters
    ----------
    pred, ref : Volume
        Label maps, shape (I, J, K), integer (or 0/1 float) values; the grid of ``ref`` is the one measured on.
    labels : sequence of int or str, optional
        Label values or names to evaluate. Default: every non-zero value present in either map plus every value
        of either label table (labels absent from both get the "both empty" row).
    nsd_tolerance_mm : float
        Tolerance of the normalised surface Dice, mm (default 2 mm).
    lesion_labels : sequence of int or str, optional
        Labels to evaluate lesion-wise as well. Default: the labels whose kind is ``"lesion"`` in the reference's
        (else the prediction's) label table.
    resample : bool
        When the grids differ, resample the prediction onto the reference grid (nearest neighbour) instead of
        raising.

    Returns
    -------
    EvaluationResult
        Rows by label value; see the module docstring for definitions and the empty-mask rule.

    Raises
    ------
    GridMismatchError
        If the grids differ and ``resample`` is False (the message names both grids).
    LabelTableError
        If a map holds non-integer or negative values, or a label name is unknown.
    OptionError
        If ``nsd_tolerance_mm`` is negative or not finite (also a ``ValueError``).
    """
    if not math.isfinite(nsd_tolerance_mm) or nsd_tolerance_mm < 0:
        from medseg.errors import OptionError

        raise OptionError(f"nsd_tolerance_mm (--nsd-tolerance) must be a finite number >= 0 (mm), not "
                          f"{nsd_tolerance_mm}.")
    resampled = False
    if not pred.same_grid(ref):
        if not resample:
            try:
                ref.require_same_grid(pred, what="the reference and the prediction")
            except GridMismatchError as exc:
                raise GridMismatchError(
                    f"{exc}\nOr let evaluate() do it: resample=True (CLI: --resample) puts the prediction on the "
                    "reference grid (nearest neighbour)."
                ) from None
        from medseg.resample import resample_to

        log.info("Resampling the prediction onto the reference grid (nearest neighbour).")
        pred = resample_to(pred, ref, interpolation="nearest")
        resampled = True
    p_arr = label_array(pred, what="prediction")
    r_arr = label_array(ref, what="reference")
    tables = (ref.labels, pred.labels)
    p_boxes = _bounding_boxes(p_arr)
    r_boxes = _bounding_boxes(r_arr)
    p_counts = _label_counts(p_arr, p_boxes)
    r_counts = _label_counts(r_arr, r_boxes)
    present = set(p_counts) | set(r_counts)
    values = _resolve_labels(labels, tables, present, "prediction/reference")
    linear = ref.affine[:3, :3]
    voxel_ml = ref.voxel_volume_ml
    rows = []
    for v in values:
        n_p = p_counts.get(v, 0)
        n_r = r_counts.get(v, 0)
        rows.append(
            _label_metrics(v, _label_name(v, tables), p_arr, r_arr, _box(p_boxes, v), _box(r_boxes, v),
                           n_p, n_r, linear, voxel_ml, nsd_tolerance_mm)
        )
    if lesion_labels is None:
        lesion_values = [v for v in values if _is_lesion(v, tables)]
    else:
        lesion_values = _resolve_labels(lesion_labels, tables, present, "prediction/reference")
    detections = []
    for v in lesion_values:
        box = _union_box(_box(p_boxes, v), _box(r_boxes, v))
        if box is None:
            detections.append(LesionDetection(v, _label_name(v, tables), 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 1.0, 1.0, 0.0))
            continue
        sub_aff = ref.affine.copy()
        sub_aff[:3, 3] = ref.world_mm([s.start for s in box])
        detections.append(
            lesion_detection(p_arr[box] == v, r_arr[box] == v, affine=sub_aff, value=v, name=_label_name(v, tables))
        )
    return EvaluationResult(
        labels=tuple(rows),
        lesions=tuple(detections),
        nsd_tolerance_mm=float(nsd_tolerance_mm),
        spacing_mm=ref.spacing_mm,
        resampled=resampled,
    )


def to_json_text(result: EvaluationResult) -> str:
    """The result as strict JSON text (no NaN/Infinity tokens)."""
    return json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n"
