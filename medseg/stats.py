"""How big each organ and each tumour is: volumes, intensity statistics, centroids, extents, lesion counts.

Definitions (docs/metrics.md has the long form):

* volume = voxel count × |det(affine[:3, :3])| / 1000, in mL;
* intensities over the label's voxels, in the image's units (HU for CT): mean, population standard deviation
  (ddof = 0), median, 5th / 95th percentiles (linear interpolation), min, max;
* centroid = mean RAS world position (mm) of the label's voxel centres;
* extent = size (mm) along world x, y, z of the smallest axis-aligned box holding every voxel of the label (the
  voxels' full extent, not their centres: one voxel of 0.7 × 0.7 × 3 mm has extent (0.7, 0.7, 3));
* components and lesions: connected components with 26-connectivity (faces, edges and corners touch);
* longest axis of a lesion = the largest distance (mm) between two of its voxel centres (3D maximum Feret
  diameter); 0 for a single voxel.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from medseg.labels import find_row
from medseg.metrics import (
    LESION_CONNECTIVITY,
    _bounding_boxes,
    _finite,
    _is_lesion,
    _label_counts,
    _label_name,
    _resolve_labels,
    label_array,
)
from medseg.volume import Volume

__all__ = ["LabelStats", "LesionStats", "VolumeStats", "longest_axis_mm", "volume_stats"]

log = logging.getLogger(__name__)

_NAN3 = (math.nan, math.nan, math.nan)


@dataclass(frozen=True)
class LabelStats:
    """Statistics of one label.

    Attributes
    ----------
    value, name, kind : int, str, str
        The label (kind from the label table: ``"organ"``, ``"lesion"`` or ``"other"``).
    voxels : int
        Voxel count.
    volume_ml : float
        Volume in mL.
    centroid_mm : tuple of 3 float
        RAS world centroid (nan when the label is absent).
    extent_mm : tuple of 3 float
        Size along world x, y, z of the axis-aligned box holding the label's voxels (0 when absent).
    n_components : int
        26-connected components.
    intensity_mean, intensity_std, intensity_median, intensity_p5, intensity_p95, intensity_min, intensity_max : float
        Image values over the label (nan without an image or when the label is absent).
    """

    value: int
    name: str
    kind: str
    voxels: int
    volume_ml: float
    centroid_mm: tuple[float, float, float]
    extent_mm: tuple[float, float, float]
    n_components: int
    intensity_mean: float = math.nan
    intensity_std: float = math.nan
    intensity_median: float = math.nan
    intensity_p5: float = math.nan
    intensity_p95: float = math.nan
    intensity_min: float = math.nan
    intensity_max: float = math.nan


@dataclass(frozen=True)
class LesionStats:
    """One lesion (26-connected component) of a lesion label.

    Attributes
    ----------
    value, name : int, str
        The label.
    lesion_id : int
        1..n, in cc3d's scan order (i fastest ... k slowest of the cropped label).
    voxels : int
    volume_ml : float
    centroid_mm : tuple of 3 float
        RAS world centroid.
    longest_axis_mm : float
        Largest distance between two voxel centres of the lesion.
    intensity_mean : float
        Mean image value over the lesion (nan without an image).
    """

    value: int
    name: str
    lesion_id: int
    voxels: int
    volume_ml: float
    centroid_mm: tuple[float, float, float]
    longest_axis_mm: float
    intensity_mean: float = math.nan


@dataclass(frozen=True)
class VolumeStats:
    """Per-label and per-lesion statistics of one segmentation.

    Attributes
    ----------
    labels : tuple of LabelStats
    lesions : tuple of LesionStats
        Rows of the lesion labels, by label then lesion id.
    intensity_unit : str or None
        ``"HU"`` for CT images, None when unknown or without an image.
    """

    labels: tuple[LabelStats, ...]
    lesions: tuple[LesionStats, ...]
    intensity_unit: str | None = None

    def __getitem__(self, key: int | str) -> LabelStats:
        """The row of a label by value or name.

        Raises
        ------
        KeyError
            If no row has that value or name.
        """
        return find_row(self.labels, key)  # type: ignore[no-any-return]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become null)."""
        return _finite(
            {
                "intensity_unit": self.intensity_unit,
                "lesion_connectivity": LESION_CONNECTIVITY,
                "labels": [asdict(r) for r in self.labels],
                "lesions": [asdict(r) for r in self.lesions],
            }
        )

    def to_csv(self) -> str:
        """One CSV row per label; tuples become ``x y z``."""
        return _csv([asdict(r) for r in self.labels], [f.name for f in fields(LabelStats)])

    def lesions_to_csv(self) -> str:
        """One CSV row per lesion."""
        return _csv([asdict(r) for r in self.lesions], [f.name for f in fields(LesionStats)])


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, tuple | list):
        return " ".join(str(_cell(x)) for x in v)
    return v


def _csv(rows: list[dict[str, Any]], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_cell(r[c]) for c in cols])
    return buf.getvalue()


def longest_axis_mm(ijk: np.ndarray, linear: np.ndarray) -> float:
    """Largest distance (mm) between two of the given voxel centres.

    Parameters
    ----------
    ijk : ndarray, shape (N, 3)
        Voxel indices.
    linear : ndarray, shape (3, 3)
        The affine's linear part (voxel → mm).

    Returns
    -------
    float
        0 for fewer than two voxels.
    """
    if len(ijk) < 2:
        return 0.0
    pts = np.asarray(ijk, dtype=np.float64) @ np.asarray(linear, dtype=np.float64).T
    if len(pts) > 2000:
        from scipy.spatial import ConvexHull, QhullError

        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # flat lesion (one slice): the hull of its plane
            centred = pts - pts.mean(axis=0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            try:
                pts = pts[ConvexHull(centred @ vt[:2].T).vertices]
            except QhullError:  # collinear
                proj = centred @ vt[0]
                pts = pts[[int(np.argmin(proj)), int(np.argmax(proj))]]
    best = 0.0
    for start in range(0, len(pts), 1024):
        chunk = pts[start : start + 1024]
        d2 = ((chunk[:, None, :] - pts[None, :, :]) ** 2).sum(axis=-1)
        best = max(best, float(d2.max()))
    return math.sqrt(best)


def _intensity(values: np.ndarray) -> dict[str, float]:
    v = values.astype(np.float64, copy=False)
    p5, median, p95 = np.percentile(v, [5, 50, 95])
    return {
        "intensity_mean": float(v.mean()),
        "intensity_std": float(v.std()),
        "intensity_median": float(median),
        "intensity_p5": float(p5),
        "intensity_p95": float(p95),
        "intensity_min": float(v.min()),
        "intensity_max": float(v.max()),
    }


def volume_stats(
    seg: Volume,
    image: Volume | None = None,
    *,
    labels: Sequence[int | str] | None = None,
    lesion_labels: Sequence[int | str] | None = None,
) -> VolumeStats:
    """Per-label (and per-lesion) volume, intensity and shape statistics of a label map.

    Parameters
    ----------
    seg : Volume
        Label map, shape (I, J, K), integer (or 0/1 float) values.
    image : Volume, optional
        The image the segmentation belongs to, on the same grid, shape (I, J, K); gives intensity statistics
        (HU for CT).
    labels : sequence of int or str, optional
        Labels to report. Default: every non-zero value present plus every value of ``seg.labels`` (absent labels
        get a row with 0 voxels).
    lesion_labels : sequence of int or str, optional
        Labels that get one row per lesion. Default: labels of kind ``"lesion"`` in ``seg.labels``.

    Returns
    -------
    VolumeStats

    Raises
    ------
    GridMismatchError
        If ``image`` is not on the segmentation's grid (the message names both grids).
    LabelTableError
        If ``seg`` holds non-integer or negative values, or a label name is unknown.
    GeometryError
        If ``image`` has channels.
    """
    import cc3d

    arr = label_array(seg, what="segmentation")
    img: np.ndarray | None = None
    unit: str | None = None
    if image is not None:
        seg.require_same_grid(image, what="the segmentation and the image")
        if image.array.ndim != 3:
            from medseg.errors import GeometryError

            raise GeometryError(f"The image must be 3D (I, J, K) for intensity statistics, not {image.array.shape}.")
        img = image.array
        unit = "HU" if (image.modality or "").upper() == "CT" else None
    tables = (seg.labels,)
    boxes = _bounding_boxes(arr)
    counts = _label_counts(arr, boxes)
    present = set(counts)
    values = _resolve_labels(labels, tables, present, "segmentation")
    if lesion_labels is None:
        lesion_values = {v for v in values if _is_lesion(v, tables)}
    else:
        lesion_values = set(_resolve_labels(lesion_labels, tables, present, "segmentation"))
    linear = seg.affine[:3, :3]
    voxel_extent = np.abs(linear) @ np.ones(3)  # world size of one voxel along x, y, z
    voxel_ml = seg.voxel_volume_ml
    rows: list[LabelStats] = []
    lesion_rows: list[LesionStats] = []
    for v in sorted(set(values) | lesion_values):
        name = _label_name(v, tables)
        kind = seg.labels[v].kind if seg.labels is not None and v in seg.labels else "organ"
        n = counts.get(v, 0)
        box = boxes[v - 1] if 0 < v <= len(boxes) else None
        if n == 0 or box is None:
            if v in values:
                rows.append(LabelStats(v, name, kind, 0, 0.0, _NAN3, (0.0, 0.0, 0.0), 0))
            continue
        mask = arr[box] == v
        offset = np.array([s.start for s in box], dtype=np.float64)
        idx = np.nonzero(mask)
        ijk = np.stack(idx, axis=1).astype(np.float64) + offset
        world = ijk @ linear.T + seg.affine[:3, 3]
        centroid = tuple(float(c) for c in world.mean(axis=0))
        extent = tuple(float(e) for e in (world.max(axis=0) - world.min(axis=0) + voxel_extent))
        cc, n_cc = cc3d.connected_components(mask, connectivity=LESION_CONNECTIVITY, return_N=True)
        inten: dict[str, float] = {}
        values_in = None
        if img is not None:
            values_in = img[box][mask]
            inten = _intensity(values_in)
        if v in values:
            rows.append(
                LabelStats(v, name, kind, n, n * voxel_ml, centroid, extent, int(n_cc), **inten)  # type: ignore[arg-type]
            )
        if v in lesion_values:
            lab = cc[idx]
            order = np.argsort(lab, kind="stable")
            bounds = np.searchsorted(lab[order], np.arange(1, n_cc + 2))
            for lesion_id in range(1, n_cc + 1):
                sel = order[bounds[lesion_id - 1] : bounds[lesion_id]]
                les_ijk = ijk[sel]
                les_world = world[sel]
                lesion_rows.append(
                    LesionStats(
                        value=v,
                        name=name,
                        lesion_id=lesion_id,
                        voxels=len(sel),
                        volume_ml=len(sel) * voxel_ml,
                        centroid_mm=tuple(float(c) for c in les_world.mean(axis=0)),  # type: ignore[arg-type]
                        longest_axis_mm=longest_axis_mm(_outline(les_ijk), linear),
                        intensity_mean=float(values_in[sel].astype(np.float64).mean())
                        if values_in is not None
                        else math.nan,
                    )
                )
    return VolumeStats(labels=tuple(rows), lesions=tuple(lesion_rows), intensity_unit=unit)


def _outline(ijk: np.ndarray) -> np.ndarray:
    """The voxels of a component that have a face neighbour outside it (the farthest pair is among them)."""
    if len(ijk) <= 64:
        return ijk
    idx = ijk.astype(np.int64)
    lo = idx.min(axis=0)
    shape = idx.max(axis=0) - lo + 3
    m = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    local = idx - lo + 1
    m[local[:, 0], local[:, 1], local[:, 2]] = True
    from medseg.metrics import _surface

    surf = _surface(m)
    return np.argwhere(surf).astype(np.float64) + lo
