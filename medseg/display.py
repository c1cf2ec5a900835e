"""Volumes on screen, as radiologists read them: viewer geometry, label colours and names, slice picks.

No viewer is imported here; napari (``medseg_napari``) and the report (matplotlib) both build on these plain
objects, and a notebook can call them too.

**The viewer's world.** A volume goes to a viewer as an array in the order (k', j', i') of its voxels reordered
(exactly, no interpolation) to the L, P, I axes, with positive scale = spacing and translate = position, so
that the viewer's world coordinates are ``(w0, w1, w2) = (-z, -y, -x)`` in RAS mm (inferior, posterior and
the patient's left grow). A viewer drawing axis 0 downward and axis 1 rightward (napari does) then shows

* the axial plane (w1, w2) with anterior at the top and the patient's left on the screen's right,
* the coronal plane (w0, w2) with superior at the top and the patient's left on the screen's right,
* the sagittal plane (w0, w1) with superior at the top and anterior on the screen's left,

every layer in one world, with no camera flip (``../shared/notes/napari-orientation.md`` lists the mirrored
traps this avoids). Oblique or tilted grids are shown on the nearest axis-aligned grid, rotated about the
volume's centre (:attr:`LayerGeometry.oblique_deg` says by how much); :func:`volume_from_layer` always returns
the exact source grid, so computation and export never see the display approximation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.errors import GeometryError, LabelTableError
from medseg.labels import Label, LabelTable, default_color
from medseg.volume import SourceReferences, Volume

__all__ = [
    "CT_WINDOWS",
    "CT_WINDOW_HU",
    "DISPLAY_ORIENTATION",
    "METADATA_KEY",
    "DisplaySlices",
    "LayerGeometry",
    "display_slices",
    "label_colors",
    "label_features",
    "layer_geometry",
    "oblique_angle_deg",
    "orientation_letters",
    "ras_to_world",
    "table_from_features",
    "volume_from_layer",
    "window_limits",
    "world_to_ras",
]

#: Orientation code of the voxel axes the viewer receives (reversed to (k', j', i') array order).
DISPLAY_ORIENTATION = "LPI"
#: Key of the layer metadata entry holding the exact geometry.
METADATA_KEY = "medseg"

#: CT window presets: name → (level, width) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}


def window_limits(name: str) -> tuple[float, float]:
    """(low, high) HU of a CT window preset of :data:`CT_WINDOWS`.

    Raises
    ------
    KeyError
        If ``name`` is not a preset (the message lists them).
    """
    if name not in CT_WINDOWS:
        raise KeyError(f"No CT window {name!r}; presets are {sorted(CT_WINDOWS)}.")
    level, width = CT_WINDOWS[name]
    return (level - width / 2.0, level + width / 2.0)


#: The soft-tissue window (level 40 HU, width 400 HU) as display limits.
CT_WINDOW_HU = window_limits("soft tissue")

# RAS (x, y, z) → viewer world (w0, w1, w2) = (-z, -y, -x): a reversal and a sign flip.
_RAS_TO_WORLD = -np.eye(3)[::-1]


def ras_to_world(xyz: Any) -> np.ndarray:
    """Viewer world coordinates (w0, w1, w2) = (-z, -y, -x) of RAS points (mm), shape (..., 3)."""
    return np.asarray(xyz, dtype=np.float64) @ _RAS_TO_WORLD.T


def world_to_ras(world: Any) -> np.ndarray:
    """RAS points (mm) of viewer world coordinates, shape (..., 3) (the inverse of :func:`ras_to_world`)."""
    return np.asarray(world, dtype=np.float64) @ _RAS_TO_WORLD  # the matrix is its own inverse


def oblique_angle_deg(affine: Any) -> float:
    """Rotation (degrees) between a grid's axes and the nearest axis-aligned grid; 0 for an axis-aligned grid."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    direction = a / np.linalg.norm(a, axis=0)
    nearest = np.zeros((3, 3))
    for col in range(3):
        row = int(np.argmax(np.abs(direction[:, col])))
        nearest[row, col] = np.sign(direction[row, col])
    r = nearest.T @ direction  # rotation from the nearest aligned grid to the true one (reflections cancel)
    if np.linalg.det(r) < 0:  # two columns chose the same row: not a near-permutation
        return 90.0
    cos = (np.trace(r) - 1.0) / 2.0
    return float(math.degrees(math.acos(min(1.0, max(-1.0, cos)))))


@dataclass(frozen=True)
class LayerGeometry:
    """A volume ready for a viewer layer, with what it takes to go back to the exact source grid.

    Attributes
    ----------
    data : ndarray, shape (K', J', I')
        The voxels reordered to :data:`DISPLAY_ORIENTATION` and reversed to (k', j', i') order (a view).
    scale : tuple of 3 float
        Spacing (mm) along the data axes.
    translate : tuple of 3 float
        World position (mm) of voxel (0, 0, 0) of ``data``.
    affine : ndarray, shape (4, 4)
        The source volume's RAS affine (exact, possibly oblique).
    display_affine : ndarray, shape (4, 4)
        The exact RAS affine of the reordered voxels (i', j', k').
    shape : tuple of 3 int
        The source volume's shape (I, J, K).
    oblique_deg : float
        How far the source grid is rotated from the grid the viewer draws (0 for axis-aligned scans).
    source : SourceReferences or None
    modality : str or None
    """

    data: np.ndarray
    scale: tuple[float, float, float]
    translate: tuple[float, float, float]
    affine: np.ndarray
    display_affine: np.ndarray
    shape: tuple[int, int, int]
    oblique_deg: float
    source: SourceReferences | None = field(default=None, repr=False)
    modality: str | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        """Layer metadata: ``{"medseg": {...}}`` with the exact geometry and the source references."""
        return {
            METADATA_KEY: {
                "affine": self.affine,
                "display_affine": self.display_affine,
                "shape": self.shape,
                "oblique_deg": self.oblique_deg,
                "source": self.source,
                "modality": self.modality,
            }
        }

    def kwargs(self, **extra: Any) -> dict[str, Any]:
        """Keyword arguments of a layer: scale, translate, metadata, and ``extra``."""
        return {"scale": self.scale, "translate": self.translate, "metadata": self.metadata, **extra}

    def world_of_ijk(self, ijk: Any) -> np.ndarray:
        """Viewer world coordinates of source voxel indices (i, j, k), shape (..., 3), on the drawn grid."""
        ijk = np.asarray(ijk, dtype=np.float64)
        # source ijk → reordered ijk: a signed permutation and a shift (the reordering only permutes and flips)
        t = np.linalg.inv(self.display_affine) @ self.affine
        reordered = ijk @ t[:3, :3].T + t[:3, 3]
        return np.asarray(self.translate) + reordered[..., ::-1] * np.asarray(self.scale)


def layer_geometry(volume: Volume) -> LayerGeometry:
    """The viewer geometry of a volume in the radiological convention of this module.

    Parameters
    ----------
    volume : Volume, shape (I, J, K)
        Scan or label map on any grid (oblique included).

    Returns
    -------
    LayerGeometry

    Raises
    ------
    GeometryError
        If the volume has channels.
    """
    from medseg.resample import as_orientation

    if volume.array.ndim != 3:
        raise GeometryError(f"A viewer layer needs a 3D volume (I, J, K), not shape {volume.array.shape}.")
    lpi = as_orientation(volume, DISPLAY_ORIENTATION)
    data = lpi.array.transpose(2, 1, 0)
    spacing = np.asarray(lpi.spacing_mm)[::-1]
    # Centre-preserving: an oblique grid is drawn axis-aligned, rotated about its centre voxel.
    centre = (np.asarray(lpi.shape, dtype=np.float64) - 1.0) / 2.0
    centre_world = ras_to_world(lpi.world_mm(centre))
    translate = centre_world - spacing * centre[::-1]
    return LayerGeometry(
        data=data,
        scale=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        translate=tuple(float(t) for t in translate),  # type: ignore[arg-type]
        affine=volume.affine,
        display_affine=lpi.affine,
        shape=volume.shape,
        oblique_deg=oblique_angle_deg(volume.affine),
        source=volume.source,
        modality=volume.modality,
    )


def volume_from_layer(
    data: np.ndarray,
    metadata: Mapping[str, Any],
    *,
    labels: LabelTable | None = None,
    modality: str | None = None,
) -> Volume:
    """The exact source-grid Volume of a layer's data made by :func:`layer_geometry`.

    Parameters
    ----------
    data : ndarray, shape (K', J', I')
        Layer data (e.g. an edited Labels layer).
    metadata : mapping
        The layer's metadata holding :data:`METADATA_KEY`.
    labels : LabelTable, optional
        Label table to attach.
    modality : str, optional
        Modality to record (default: the one in the metadata).

    Returns
    -------
    Volume, shape (I, J, K)
        On the source affine, with the source references; the array may be a view of ``data``.

    Raises
    ------
    GeometryError
        If the metadata is missing or does not fit the data's shape.
    """
    from medseg.resample import reorient_to

    info = metadata.get(METADATA_KEY) if isinstance(metadata, Mapping) else None
    if not info or "display_affine" not in info:
        raise GeometryError(
            f"The layer carries no '{METADATA_KEY}' geometry in its metadata; it was not made by medseg. "
            "Open the image with the medseg reader (File > Open with Plugin > medseg) or add it as a medseg layer."
        )
    shape = tuple(int(n) for n in info["shape"])
    arr = np.asarray(data).transpose(2, 1, 0)
    if sorted(arr.shape) != sorted(shape):
        raise GeometryError(f"Layer data of shape {np.asarray(data).shape} does not fit its source grid {shape}.")
    displayed = Volume(arr, info["display_affine"])
    template = Volume(np.broadcast_to(np.uint8(0), shape), info["affine"])
    exact = reorient_to(displayed, template)
    if exact is None:
        raise GeometryError(f"Layer data of shape {np.asarray(data).shape} does not map back onto its source grid.")
    return Volume(exact.array, info["affine"], modality=modality if modality is not None else info.get("modality"),
                  labels=labels, source=info.get("source"))


# ---- label tables <-> viewer colours and features ------------------------------------------------------------------
def label_colors(
    table: LabelTable | None,
    *,
    hidden: Iterable[int] = (),
    values: Iterable[int] = (),
) -> dict[int | None, tuple[float, float, float, float]]:
    """RGBA colours (0..1) per label value, for a direct label colormap.

    Background (0) and ``hidden`` labels are transparent; ``None`` maps values the table lacks to grey. Values in
    ``values`` that the table lacks get :func:`medseg.labels.default_color`.
    """
    hide = {int(v) for v in hidden}
    out: dict[int | None, tuple[float, float, float, float]] = {0: (0.0, 0.0, 0.0, 0.0), None: (0.6, 0.6, 0.6, 1.0)}
    colours: dict[int, tuple[int, int, int]] = {int(v): default_color(int(v)) for v in values if int(v) > 0}
    if table is not None:
        colours.update({v: lab.color for v, lab in table.items()})
    for v, rgb in colours.items():
        out[v] = (rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0, 0.0 if v in hide else 1.0)
    return out


def label_features(table: LabelTable | None) -> dict[str, list[Any]]:
    """Columns of a layer ``features`` table: ``index`` (the label value, 0 first), ``name`` and ``kind``."""
    rows = [(0, "background", "other")]
    if table is not None:
        rows += [(v, lab.name, lab.kind) for v, lab in table.items()]
    return {"index": [r[0] for r in rows], "name": [r[1] for r in rows], "kind": [r[2] for r in rows]}


def table_from_features(
    features: Mapping[str, Sequence[Any]],
    colors: Mapping[Any, Sequence[float]] | None = None,
) -> LabelTable:
    """The label table behind a layer's ``features`` (and its colours, RGBA 0..1).

    Raises
    ------
    LabelTableError
        If the features lack ``index`` and ``name`` columns or hold an invalid label.
    """
    if "index" not in features or "name" not in features:
        raise LabelTableError(
            f"Layer features need 'index' and 'name' columns to give a label table; they have {list(features)}."
        )
    kinds = list(features["kind"]) if "kind" in features else None
    out = []
    for row, (value, name) in enumerate(zip(features["index"], features["name"], strict=True)):
        v = int(value)
        if v == 0:
            continue
        rgba = colors.get(v) if colors is not None else None
        rgb = tuple(round(float(c) * 255) for c in rgba[:3]) if rgba is not None else default_color(v)
        kind = str(kinds[row]) if kinds is not None else "organ"
        out.append(Label(v, str(name), rgb, kind if kind in ("organ", "lesion", "other") else "organ"))  # type: ignore[arg-type]
    return LabelTable(out)


# Which way each world axis grows, as the letter of the side it grows toward (w0, w1, w2) = (I, P, L).
_GROWS = ("I", "P", "L")
_OPPOSITE = {"I": "S", "S": "I", "P": "A", "A": "P", "L": "R", "R": "L"}


def orientation_letters(displayed: Sequence[int]) -> dict[str, str]:
    """Patient directions at the edges of a 2D view drawing world axes ``displayed`` = (rows, columns).

    Returns ``{"top", "bottom", "left", "right"}`` letters; e.g. the axial view ``(1, 2)`` gives
    A / P / R / L.

    Raises
    ------
    ValueError
        If ``displayed`` is not two different axes of 0, 1, 2.
    """
    if len(displayed) != 2 or len(set(displayed)) != 2 or not set(displayed) <= {0, 1, 2}:
        raise ValueError(f"displayed must name two different world axes of 0, 1, 2, not {tuple(displayed)}.")
    rows, cols = _GROWS[displayed[0]], _GROWS[displayed[1]]
    return {"top": _OPPOSITE[rows], "bottom": rows, "left": _OPPOSITE[cols], "right": cols}


# ---- slice picks for static figures ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DisplaySlices:
    """An axial and a coronal slice ready for ``imshow(origin="upper")``, in radiological orientation.

    Attributes
    ----------
    axial : ndarray, shape (rows, cols) or (rows, cols, C)
        Row 0 is anterior, column 0 is the patient's right (patient left on the image's right).
    coronal : ndarray, shape (rows, cols) or (rows, cols, C)
        Row 0 is superior, column 0 is the patient's right.
    axial_extent_mm, coronal_extent_mm : tuple of 4 float
        ``imshow`` extents (left, right, bottom, top) in mm, so pixels get their true aspect.
    """

    axial: np.ndarray
    coronal: np.ndarray
    axial_extent_mm: tuple[float, float, float, float]
    coronal_extent_mm: tuple[float, float, float, float]


def display_slices(volume: Volume, point_mm: Sequence[float] | np.ndarray) -> DisplaySlices:
    """Axial and coronal slices through a world point, oriented as radiologists read them.

    The volume is reordered (exactly, no interpolation) to LPS voxel axes: i runs to the patient's left, j to
    posterior, k to superior. The axial slice at the point's k is shown with i as columns and j as rows (anterior
    up, patient left on the image's right); the coronal slice at the point's j with i as columns and k as rows,
    superior up. Oblique scans use their closest axis-aligned orientation.

    Parameters
    ----------
    volume : Volume
        Image or label map, shape (I, J, K) or (I, J, K, C).
    point_mm : sequence of 3 float
        RAS world point the slices go through (clipped into the volume).

    Returns
    -------
    DisplaySlices
    """
    from medseg.resample import as_orientation

    v = as_orientation(volume, "LPS")
    ijk = np.clip(np.rint(v.voxel_ijk(np.asarray(point_mm, dtype=np.float64))), 0, np.array(v.shape) - 1).astype(int)
    si, sj, sk = v.spacing_mm
    n_i, n_j, n_k = v.shape
    axial = np.swapaxes(v.array[:, :, ijk[2]], 0, 1)  # (J, I): rows posterior-ward, columns leftward
    coronal = np.swapaxes(v.array[:, ijk[1], ::-1], 0, 1)  # (K reversed, I): row 0 superior
    return DisplaySlices(
        axial=axial,
        coronal=coronal,
        axial_extent_mm=(-0.5 * si, (n_i - 0.5) * si, (n_j - 0.5) * sj, -0.5 * sj),
        coronal_extent_mm=(-0.5 * si, (n_i - 0.5) * si, (n_k - 0.5) * sk, -0.5 * sk),
    )
