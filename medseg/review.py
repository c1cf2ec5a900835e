"""Reviewing a segmentation: per-label numbers kept up to date edit by edit, and a record of what was changed.

:class:`LabelTally` holds, per label value, the voxel count, the sums that give the mean and standard deviation of
the image under it, the voxels added and removed against a proposal (the AI's labels), and a bounding box that
holds every voxel of the label. :meth:`LabelTally.apply_change` updates all of it from the changed voxels alone
(their old and new values), so a paint stroke, an undo or a tool's result costs time in proportion to the voxels it
changed, never a recount of the volume. :func:`review_record` turns a tally, the edit log and the review statuses
into the JSON record an export writes.

The arrays may be in any axis order (a viewer's display order included) as long as labels, image and proposal
share it.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from medseg.errors import GridMismatchError, LabelTableError
from medseg.labels import LabelTable

__all__ = [
    "REVIEW_STATUSES",
    "EditRecord",
    "LabelReviewRow",
    "LabelTally",
    "ReviewStatus",
    "instance_seams",
    "new_edit",
    "review_record",
]

_CHUNK = 1 << 22

ReviewStatus = Literal["not started", "in progress", "done", "flagged"]
REVIEW_STATUSES: tuple[str, ...] = ("not started", "in progress", "done", "flagged")


@dataclass(frozen=True)
class EditRecord:
    """One entry of the edit log.

    Attributes
    ----------
    tool : str
        "paint", "fill", "erase", "region_grow", "watershed_split", "remove_islands", "model", ...
    action : {"apply", "undo", "redo"}
    label : int or None
        The label the edit was made with (None when several).
    voxels_changed : int
        Voxels whose value changed.
    changes : mapping of str to list of int
        ``{"<value>": [voxels gained, voxels lost]}`` per label value touched.
    time : str
        UTC time, ISO 8601.
    """

    tool: str
    action: str
    label: int | None
    voxels_changed: int
    changes: Mapping[str, list[int]]
    time: str


@dataclass(frozen=True)
class LabelReviewRow:
    """What the review table shows for one label."""

    value: int
    name: str
    kind: str
    voxels: int
    volume_ml: float
    change_ml: float
    added_ml: float
    removed_ml: float
    voxels_added: int
    voxels_removed: int
    intensity_mean: float
    intensity_std: float


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class LabelTally:
    """Per-label counts, intensity sums and change against a proposal, updated from changed voxels only.

    Parameters
    ----------
    labels : ndarray of int, shape (A, B, C)
        The label array being edited (not copied; the tally only reads it at construction).
    voxel_volume_ml : float
        Volume of one voxel (mL).
    image : ndarray, shape (A, B, C), optional
        Intensities (HU for CT) in the same axis order; gives mean ± SD per label.
    proposal : ndarray of int, shape (A, B, C), optional
        The labels edits are measured against (the AI proposal); kept by reference, never written.
    n_values : int, optional
        Number of label values to track (default: enough for the arrays' dtype up to uint16, or their maximum).

    Raises
    ------
    GridMismatchError
        If the arrays' shapes differ.
    LabelTableError
        If labels hold negative values or values above 65535.
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        voxel_volume_ml: float,
        image: np.ndarray | None = None,
        proposal: np.ndarray | None = None,
        n_values: int | None = None,
    ) -> None:
        import scipy.ndimage as ndi

        for other, what in ((image, "image"), (proposal, "proposal")):
            if other is not None and other.shape != labels.shape:
                raise GridMismatchError(f"The {what} has shape {other.shape}; the labels have {labels.shape}.")
        if labels.size and (np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0):
            raise LabelTableError("Label arrays hold values 0..65535; this one holds negative values.")
        top = int(labels.max()) if labels.size else 0
        if proposal is not None and proposal.size:
            top = max(top, int(proposal.max()))
        if top > 65535:
            raise LabelTableError(f"Label arrays hold values 0..65535; this one holds {top}.")
        size = n_values if n_values is not None else (256 if labels.dtype.itemsize == 1 and top < 256 else 65536)
        self.shape = labels.shape
        self.voxel_volume_ml = float(voxel_volume_ml)
        self.image = image
        self.proposal = proposal
        flat = labels.ravel()
        self.counts = np.bincount(flat, minlength=size).astype(np.int64)
        self.sums: np.ndarray = np.zeros(size)
        self.sumsq: np.ndarray = np.zeros(size)
        if image is not None:
            img_flat = image.ravel()
            for start in range(0, flat.size, _CHUNK):  # chunks: float64 weights of a whole CT would be 8 B/voxel
                lab = flat[start:start + _CHUNK]
                img = img_flat[start:start + _CHUNK].astype(np.float64)
                self.sums += np.bincount(lab, weights=img, minlength=size)
                self.sumsq += np.bincount(lab, weights=img * img, minlength=size)
        self.added = np.zeros(size, dtype=np.int64)
        self.removed = np.zeros(size, dtype=np.int64)
        if proposal is not None:
            differ = flat != proposal.ravel()
            if differ.any():
                self.added += np.bincount(flat[differ], minlength=size)
                self.removed += np.bincount(proposal.ravel()[differ], minlength=size)
        # conservative boxes: they grow with edits and are never shrunk (they always hold the label)
        self.boxes: dict[int, list[list[int]]] = {}
        for v, sl in enumerate(ndi.find_objects(labels.astype(np.int32, copy=False) if labels.dtype.kind == "b"
                                                else labels), start=1):
            if sl is not None:
                self.boxes[v] = [[s.start, s.stop] for s in sl]

    # ---- updates -----------------------------------------------------------------------------------------------
    def apply_change(self, index: tuple[np.ndarray, ...] | np.ndarray, old: np.ndarray,
                     new: np.ndarray) -> dict[int, list[int]]:
        """Account for voxels at ``index`` going from ``old`` to ``new`` values.

        Parameters
        ----------
        index : tuple of 3 int arrays, or int array of flat indices
            The voxels (same length as ``old`` and ``new``).
        old, new : ndarray of int
            Their values before and after the edit (unchanged voxels are ignored).

        Returns
        -------
        dict
            ``{value: [voxels gained, voxels lost]}`` for every label value that changed.
        """
        old = np.asarray(old).ravel()
        new = np.asarray(new).ravel()
        flat = np.asarray(index) if not isinstance(index, tuple) else np.ravel_multi_index(index, self.shape)
        flat = np.asarray(flat, dtype=np.int64).ravel()
        changed = old != new
        if not changed.any():
            return {}
        flat, old, new = flat[changed], old[changed].astype(np.int64), new[changed].astype(np.int64)
        size = len(self.counts)
        lost = np.bincount(old, minlength=size)
        gained = np.bincount(new, minlength=size)
        self.counts += gained - lost
        if self.image is not None:
            vals = self.image.ravel()[flat].astype(np.float64)
            self.sums += np.bincount(new, weights=vals, minlength=size) - np.bincount(old, weights=vals, minlength=size)
            self.sumsq += (np.bincount(new, weights=vals * vals, minlength=size)
                           - np.bincount(old, weights=vals * vals, minlength=size))
        if self.proposal is not None:
            ai = self.proposal.ravel()[flat].astype(np.int64)
            # leaving ``old``: an added voxel of old goes away, or a proposal voxel of old is removed
            was_added = old != ai
            self.added -= np.bincount(old[was_added], minlength=size)
            self.removed += np.bincount(old[~was_added], minlength=size)
            # entering ``new``: a voxel added to new, or a removed proposal voxel of new comes back
            is_added = new != ai
            self.added += np.bincount(new[is_added], minlength=size)
            self.removed -= np.bincount(new[~is_added], minlength=size)
        ijk = np.unravel_index(flat, self.shape)
        for v in np.unique(new):
            if v == 0:
                continue
            sel = new == v
            lo = [int(a[sel].min()) for a in ijk]
            hi = [int(a[sel].max()) + 1 for a in ijk]
            box = self.boxes.get(int(v))
            self.boxes[int(v)] = [[lo[d], hi[d]] if box is None else [min(box[d][0], lo[d]), max(box[d][1], hi[d])]
                                  for d in range(len(self.shape))]
        touched = np.flatnonzero((gained > 0) | (lost > 0))
        return {int(v): [int(gained[v]), int(lost[v])] for v in touched}

    # ---- reading -----------------------------------------------------------------------------------------------
    def volume_ml(self, value: int) -> float:
        """Current volume of a label (mL)."""
        return float(self.counts[value]) * self.voxel_volume_ml

    def box(self, value: int) -> tuple[slice, ...] | None:
        """A box (slices) holding every voxel of ``value``, or None if it was never present."""
        b = self.boxes.get(int(value))
        return None if b is None or self.counts[value] == 0 else tuple(slice(lo, hi) for lo, hi in b)

    def row(self, value: int, table: LabelTable | None = None) -> LabelReviewRow:
        """The review row of one label."""
        n = int(self.counts[value])
        mean = sd = math.nan
        if self.image is not None and n > 0:
            mean = float(self.sums[value] / n)
            sd = float(math.sqrt(max(0.0, self.sumsq[value] / n - mean * mean)))
        lab = table.get(value) if table is not None else None
        ml = self.voxel_volume_ml
        return LabelReviewRow(
            value=int(value), name=lab.name if lab else f"label_{value}", kind=lab.kind if lab else "organ",
            voxels=n, volume_ml=n * ml,
            change_ml=float(self.added[value] - self.removed[value]) * ml,
            added_ml=float(self.added[value]) * ml, removed_ml=float(self.removed[value]) * ml,
            voxels_added=int(self.added[value]), voxels_removed=int(self.removed[value]),
            intensity_mean=mean, intensity_std=sd,
        )

    def rows(self, table: LabelTable | None = None) -> list[LabelReviewRow]:
        """Rows for every label of ``table`` and every other non-zero value present."""
        values = set(table or ()) | {int(v) for v in np.flatnonzero(self.counts) if v > 0}
        return [self.row(v, table) for v in sorted(values)]

    def lesion_count(self, labels: np.ndarray, value: int) -> int:
        """26-connected components of ``value`` in ``labels``, counted inside the label's box only."""
        import cc3d

        box = self.box(value)
        if box is None:
            return 0
        _, n = cc3d.connected_components(labels[box] == value, connectivity=26, return_N=True)
        return int(n)


def review_record(
    tally: LabelTally,
    *,
    table: LabelTable | None,
    statuses: Mapping[int, str],
    edits: Sequence[EditRecord],
    reviewer: str,
    started: str,
    model: Mapping[str, Any] | None = None,
    files: Mapping[str, str] | None = None,
    finished: str | None = None,
) -> dict[str, Any]:
    """The JSON-ready record of a review.

    Parameters
    ----------
    tally : LabelTally
        The tally of the reviewed labels against the proposal.
    table : LabelTable or None
    statuses : mapping of int to str
        Review status per label value (one of :data:`REVIEW_STATUSES`; missing labels are "not started").
    edits : sequence of EditRecord
        The edit log, in order (undo and redo included).
    reviewer : str
        Who reviewed (free text the reviewer typed; not read from the scan).
    started, finished : str
        ISO 8601 times (``finished`` defaults to now).
    model : mapping, optional
        ``{"name", "version", "weights_sha256"}`` of the model that made the proposal.
    files : mapping, optional
        What the export wrote (kind → path).

    Returns
    -------
    dict
        ``reviewer``, ``started``, ``finished``, ``model``, ``files``, ``labels`` (per label: status, voxels,
        mL, voxels and mL added and removed against the proposal) and ``edits``.

    Raises
    ------
    ValueError
        If a status is not one of :data:`REVIEW_STATUSES`.
    """
    bad = {v: s for v, s in statuses.items() if s not in REVIEW_STATUSES}
    if bad:
        raise ValueError(f"Review statuses must be one of {REVIEW_STATUSES}; got {bad}.")
    labels = []
    for row in tally.rows(table):
        labels.append({
            "value": row.value, "name": row.name, "kind": row.kind,
            "status": statuses.get(row.value, "not started"),
            "voxels": row.voxels, "volume_ml": round(row.volume_ml, 4),
            "voxels_added": row.voxels_added, "voxels_removed": row.voxels_removed,
            "ml_added": round(row.added_ml, 4), "ml_removed": round(row.removed_ml, 4),
        })
    return {
        "reviewer": reviewer,
        "started": started,
        "finished": finished or _now(),
        "model": dict(model) if model else None,
        "voxel_volume_ml": tally.voxel_volume_ml,
        "files": dict(files or {}),
        "labels": labels,
        "edits": [asdict(e) for e in edits],
    }


def new_edit(tool: str, action: str, label: int | None, changes: Mapping[int, Sequence[int]]) -> EditRecord:
    """An :class:`EditRecord` stamped now, from :meth:`LabelTally.apply_change`'s answer."""
    voxels = sum(int(g) for v, (g, _l) in changes.items())
    return EditRecord(tool=tool, action=action, label=label, voxels_changed=voxels,
                      changes={str(v): [int(g), int(lost)] for v, (g, lost) in changes.items()}, time=_now())



def instance_seams(instances: np.ndarray) -> np.ndarray:
    """Voxels to clear so that numbered instances (e.g. :func:`medseg.classical.watershed_split`'s) stop touching.

    A voxel of instance ``a`` that has a voxel of a lower-numbered instance among its 26 neighbours is a seam
    voxel; clearing every seam voxel leaves no two instances 26-connected, so lesion counting (26-connected
    components) sees each instance as its own lesion.

    Parameters
    ----------
    instances : ndarray of int, shape (A, B, C)
        0 = background, 1..N = instances.

    Returns
    -------
    ndarray of bool, shape (A, B, C)
    """
    import scipy.ndimage as ndi

    inst = np.asarray(instances)
    if not inst.any():
        return np.zeros(inst.shape, dtype=bool)
    big = int(inst.max()) + 1  # background counts as "higher than any instance"; cval must stay exact in float
    work = np.where(inst > 0, inst, big).astype(np.int32 if big < 2**31 else np.int64)
    lowest = ndi.minimum_filter(work, size=3, mode="constant", cval=big)
    return (inst > 0) & (lowest < work)
