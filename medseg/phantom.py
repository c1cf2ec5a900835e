"""Seeded synthetic abdominal CT scans with exact organ and tumour labels.

A phantom is built from analytic shapes in millimetres (modelled with x toward the patient's left, y anterior, z
superior, then placed in RAS+ world space, where the patient's right is +x), so the same seed gives the same
anatomy at any shape, spacing or orientation:

- body outline (an ellipse whose size varies along z, flatter at the back), subcutaneous fat, abdominal wall
  muscle, visceral fat, ribs in the upper part;
- spine (vertebral bodies with cortex, cancellous bone and discs, arch, spinous process, canal), paraspinal and
  psoas muscles, aorta and inferior vena cava;
- lungs at the top (superior), above the diaphragm domes, and the lower heart between them;
- liver on the patient's RIGHT (RAS +x), gallbladder, stomach, spleen on the LEFT (RAS −x), both kidneys
  (posterior, beside the spine; cortex and medulla), bowel loops with gas;
- 0–3 hypodense liver tumours of varied size and an optional, partly exophytic kidney tumour.

Intensities are realistic portal-venous HU whose ranges overlap between organs (liver ≈ 60, spleen ≈ 50,
muscle ≈ 45, tumours ≈ 20, kidney cortex ≈ 150, fat ≈ −100, lung ≈ −850, bone 300–1000), with Gaussian noise and
partial-volume edges: each shape is a signed distance field and a voxel takes the fraction of the shape that the
plane through the voxel covers within the voxel's width along the surface normal. A voxel is labelled where its
centre lies inside the shape. The phantom is computed on a canonical axis-aligned (LAS) grid and reoriented exactly
(:func:`medseg.resample.as_orientation`), so RAS, LPS and flipped variants hold the same world-space values.

Label values: 1 liver, 2 spleen, 3 kidney_left, 4 kidney_right, 5 liver_tumour (lesion), 6 kidney_tumour
(lesion). Everything else (body, fat, muscle, bone, lung, vessels, bowel, gallbladder) is background 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.errors import MedsegError, PhantomError
from medseg.labels import Label, LabelTable
from medseg.volume import Volume

__all__ = [
    "DEFAULT_FOV_MM",
    "PHANTOM_LABELS",
    "DemoStudy",
    "Phantom",
    "PhantomLesion",
    "PhantomStudy",
    "demo_study",
    "make_phantom",
    "write_phantom_study",
]

log = logging.getLogger(__name__)

#: The label table of every phantom (organs, then lesions).
PHANTOM_LABELS = LabelTable(
    [
        Label(1, "liver", (221, 130, 101), "organ"),
        Label(2, "spleen", (157, 108, 162), "organ"),
        Label(3, "kidney_left", (185, 102, 83), "organ"),
        Label(4, "kidney_right", (212, 126, 151), "organ"),
        Label(5, "liver_tumour", (255, 230, 0), "lesion"),
        Label(6, "kidney_tumour", (0, 200, 255), "lesion"),
    ]
)

#: Field of view (mm) along world x, y, z when no spacing is given: spacing = FOV / shape.
DEFAULT_FOV_MM = (400.0, 400.0, 260.0)

_HU_MIN, _HU_MAX = -1024, 3071
_AIR, _FAT, _MUSCLE, _VISCERAL = -1000.0, -100.0, 45.0, -90.0
_AXIS_OF_LETTER = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}

XYZ = tuple[Any, Any, Any]  # broadcastable world x, y, z coordinate arrays (mm)
Field = tuple[np.ndarray, np.ndarray]  # (signed distance mm, negative inside; voxel width mm along the normal)


#: Smallest fraction of a kidney tumour's sphere that must lie inside the body's interior (where it is painted).
KIDNEY_TUMOUR_MIN_INSIDE = 0.75


@dataclass(frozen=True)
class PhantomLesion:
    """One tumour of a phantom: its label, centre (RAS mm) and radius (mm) as placed."""

    label: int
    centre_mm: tuple[float, float, float]
    radius_mm: float
    mean_hu: float


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT and its ground-truth labels, on the same grid.

    Attributes
    ----------
    image : Volume
        CT in HU, int16, shape (I, J, K), modality "CT".
    labels : Volume
        uint8 label map on the image's grid, with ``labels.labels == label_table``.
    label_table : LabelTable
        :data:`PHANTOM_LABELS`.
    seed : int
    lesions : tuple of PhantomLesion
        Tumours as placed (liver tumours, then the kidney tumour).
    """

    image: Volume
    labels: Volume
    label_table: LabelTable
    seed: int
    lesions: tuple[PhantomLesion, ...]


# ---- signed distance fields ---------------------------------------------------------------------------------


def _frac(d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre is at signed distance d from a surface, width w."""
    return np.clip(0.5 - d / w, 0.0, 1.0)


def _inter(*fields: Field) -> Field:
    d, w = fields[0]
    for d2, w2 in fields[1:]:
        take = d2 > d
        d, w = np.where(take, d2, d), np.where(take, w2, w)
    return d, w


def _union(*fields: Field) -> Field:
    d, w = fields[0]
    for d2, w2 in fields[1:]:
        take = d2 < d
        d, w = np.where(take, d2, d), np.where(take, w2, w)
    return d, w


def _minus(field: Field, cut: Field) -> Field:
    return _inter(field, (-cut[0], cut[1]))


def _rotation(z_deg: float = 0.0, y_deg: float = 0.0) -> np.ndarray:
    """Rotation about y then z; columns are the shape's local axes in world coordinates."""
    a, b = np.radians(z_deg), np.radians(y_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rz @ ry


def _ellipsoid(
    xyz: XYZ,
    spacing: np.ndarray,
    centre: Sequence[float],
    radii: Sequence[float],
    rot: np.ndarray | None = None,
) -> Field:
    """Approximate signed distance (mm) to an ellipsoid; a radius of inf makes an elliptic cylinder.

    Uses d = k0 (k0 − 1) / k1 with k0 = |p / r|, k1 = |p / r²| (exact on the surface's normal direction to first
    order). ``xyz`` are broadcastable world coordinate arrays.
    """
    p = [xyz[0] - centre[0] + 1e-3, xyz[1] - centre[1], xyz[2] - centre[2]]
    if rot is not None:
        p = [rot[0, a] * p[0] + rot[1, a] * p[1] + rot[2, a] * p[2] for a in range(3)]
    u = [p[a] / radii[a] for a in range(3)]
    g = [u[a] / radii[a] for a in range(3)]
    k0 = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
    k1 = np.sqrt(g[0] * g[0] + g[1] * g[1] + g[2] * g[2])
    d = k0 * (k0 - 1.0) / k1
    if rot is not None:
        g = [rot[a, 0] * g[0] + rot[a, 1] * g[1] + rot[a, 2] * g[2] for a in range(3)]
    w = (np.abs(g[0]) * spacing[0] + np.abs(g[1]) * spacing[1] + np.abs(g[2]) * spacing[2]) / k1
    return d.astype(np.float32, copy=False), np.broadcast_to(w, d.shape).astype(np.float32)


def _slab_z(z: Any, z0: float, period: float, half: float, sz: float) -> np.ndarray:
    """Signed distance (along z) to periodic slabs of half-thickness ``half`` centred at z0 + n·period."""
    return np.abs(np.mod(z - z0 + period / 2, period) - period / 2) - half


# ---- anatomy ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipsoid:
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    rot: np.ndarray | None = None

    def field(self, xyz: XYZ, spacing: np.ndarray) -> Field:
        return _ellipsoid(xyz, spacing, self.centre, self.radii, self.rot)

    def bounds(self, margin: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
        r = np.asarray(self.radii, dtype=np.float64)
        if self.rot is not None:
            r = np.where(np.isfinite(r), r, 1e9)
            ext = np.abs(self.rot) @ r  # half-extent of the rotated bounding box (upper bound)
        else:
            ext = r
        c = np.asarray(self.centre)
        return c - ext - margin, c + ext + margin


class _Anatomy:
    """Every shape and HU value of one phantom, drawn from the seed (independent of the grid)."""

    def __init__(self, rng: np.random.Generator, *, scale: float, liver_tumours: int | None,
                 kidney_tumour: bool | None) -> None:
        def j(sd: float = 0.05) -> float:  # multiplicative jitter
            return float(1.0 + rng.normal(0.0, sd))

        def mm(v: float, sd: float = 4.0) -> float:  # position in mm, scaled, jittered
            return float(scale * (v + rng.normal(0.0, sd)))

        s = scale
        self.scale = s
        # body
        self.A = 165.0 * s * j(0.05)
        self.B_ant = 120.0 * s * j(0.05)
        self.B_post = 112.0 * s * j(0.03)
        self.fat_t = float(s * rng.uniform(10.0, 28.0))
        self.muscle_t = float(s * rng.uniform(9.0, 14.0))
        self.organ_margin = self.fat_t + self.muscle_t + 8.0 * s  # organs stay inside the ribs
        self.rib_z0, self.rib_period = mm(-30.0, 3.0), 26.0 * s * j(0.05)
        # spine and muscles (cylinders along z)
        inf = float("inf")
        self.vert_body = _Ellipsoid((0.0, -40.0 * s, 0.0), (22.0 * s, 18.0 * s, inf))
        self.vert_cancellous = _Ellipsoid((0.0, -40.0 * s, 0.0), (19.0 * s, 15.0 * s, inf))
        self.canal = _Ellipsoid((0.0, -68.0 * s, 0.0), (9.0 * s, 8.0 * s, inf))
        self.arch = _Ellipsoid((0.0, -70.0 * s, 0.0), (16.0 * s, 14.0 * s, inf))
        self.spinous = _Ellipsoid((0.0, -88.0 * s, 0.0), (5.0 * s, 11.0 * s, inf))
        self.disc_z0, self.disc_period = mm(0.0, 8.0), 32.0 * s * j(0.04)
        self.paraspinal = [_Ellipsoid((sx * 31.0 * s, -84.0 * s, 0.0), (20.0 * s, 14.0 * s, inf)) for sx in (-1, 1)]
        self.psoas = [_Ellipsoid((sx * 38.0 * s, -32.0 * s, -150.0 * s), (17.0 * s, 17.0 * s, 130.0 * s))
                      for sx in (-1, 1)]
        self.aorta = _Ellipsoid((17.0 * s, -8.0 * s, 0.0), (11.5 * s, 11.5 * s, inf))
        self.ivc = _Ellipsoid((-24.0 * s, -8.0 * s, 0.0), (13.0 * s, 10.0 * s, inf))
        # thorax
        self.dome_r = _Ellipsoid((-60.0 * s, 0.0, -10.0 * s), (125.0 * s, 135.0 * s, mm(85.0, 3.0)))
        self.dome_l = _Ellipsoid((60.0 * s, 0.0, -15.0 * s), (125.0 * s, 135.0 * s, mm(78.0, 3.0)))
        self.lung_r = _Ellipsoid((-72.0 * s, 0.0, 150.0 * s), (64.0 * s, 90.0 * s, 200.0 * s))
        self.lung_l = _Ellipsoid((72.0 * s, 0.0, 150.0 * s), (62.0 * s, 90.0 * s, 200.0 * s))
        self.heart = _Ellipsoid((15.0 * s, 28.0 * s, 128.0 * s), (58.0 * s, 48.0 * s, 55.0 * s), _rotation(20.0))
        # abdominal organs
        self.liver_right = _Ellipsoid((mm(-65.0), mm(20.0), mm(0.0)), (80.0 * s * j(), 85.0 * s * j(), 76.0 * s * j()))
        self.liver_left = _Ellipsoid((mm(28.0), mm(52.0), mm(30.0)), (62.0 * s * j(), 40.0 * s * j(), 36.0 * s * j()))
        self.gallbladder = _Ellipsoid((mm(-42.0), mm(52.0), mm(-38.0)), (15.0 * s, 17.0 * s, 28.0 * s),
                                      _rotation(30.0, 15.0))
        self.stomach = _Ellipsoid((mm(48.0), mm(38.0), mm(28.0)), (45.0 * s, 35.0 * s, 40.0 * s), _rotation(-25.0))
        self.spleen = _Ellipsoid((mm(86.0), mm(-42.0), mm(32.0)), (27.0 * s * j(), 55.0 * s * j(), 46.0 * s * j()),
                                 _rotation(35.0 + rng.normal(0, 5)))
        self.kidneys: dict[int, _Ellipsoid] = {}
        self.medullas: dict[int, _Ellipsoid] = {}
        self.hila: dict[int, _Ellipsoid] = {}
        for value, side, z in ((3, 1.0, -40.0), (4, -1.0, -55.0)):  # 3 = left (model +x = RAS −x), 4 = right
            rot = _rotation(-side * 25.0, side * 12.0)
            c = (mm(side * 72.0), mm(-45.0), mm(z))
            r = (27.0 * s * j(), 22.0 * s * j(), 54.0 * s * j())
            self.kidneys[value] = _Ellipsoid(c, r, rot)
            self.medullas[value] = _Ellipsoid(c, (r[0] - 8.0 * s, r[1] - 7.0 * s, r[2] - 9.0 * s), rot)
            medial = rot @ np.array([-side * (r[0] - 2.0 * s), 0.0, 0.0])
            self.hila[value] = _Ellipsoid(tuple(np.asarray(c) + medial), (10.0 * s, 9.0 * s, 14.0 * s))
        # bowel loops in the lower anterior abdomen (some with gas)
        self.bowel: list[tuple[_Ellipsoid, float, bool]] = []
        for _ in range(16):
            c = (float(s * rng.uniform(-95, 95)), float(s * rng.uniform(-5, 80)), float(s * rng.uniform(-135, -25)))
            r = (float(s * rng.uniform(12, 26)), float(s * rng.uniform(12, 26)), float(s * rng.uniform(12, 26)))
            self.bowel.append((_Ellipsoid(c, r, _rotation(float(rng.uniform(0, 180)))),
                               float(rng.normal(35, 8)), bool(rng.random() < 0.35)))
        # intensities (HU), per-organ means drawn from the seed
        self.hu = {
            "liver": float(rng.normal(60, 6)),
            "spleen": float(rng.normal(50, 6)),
            "cortex": float(rng.normal(150, 10)),
            "medulla": float(rng.normal(100, 10)),
            "lung": float(rng.normal(-850, 20)),
            "heart": float(rng.normal(110, 10)),
            "aorta": float(rng.normal(160, 12)),
            "ivc": float(rng.normal(125, 10)),
            "cortical": float(rng.normal(950, 40)),
            "cancellous": float(rng.normal(330, 40)),
            "disc": float(rng.normal(90, 8)),
            "rib": float(rng.normal(650, 50)),
            "gallbladder": float(rng.normal(10, 4)),
            "stomach": float(rng.normal(20, 5)),
            "csf": 10.0,
        }
        # tumours: counts and sizes drawn here; centres placed by rejection sampling in world space
        n_liver = int(rng.integers(0, 4)) if liver_tumours is None else liver_tumours
        self.lesions: list[PhantomLesion] = []
        liver_lo, liver_hi = self._liver_bounds()
        for _ in range(n_liver):
            radius = float(s * np.exp(rng.uniform(np.log(5.0), np.log(22.0))))
            hu = float(np.clip(rng.normal(20, 10), -5, 45))
            for _attempt in range(200):
                pts = rng.uniform(liver_lo, liver_hi, size=(64, 3))
                d, _ = self.liver_field((pts[:, 0], pts[:, 1], pts[:, 2]), np.ones(3))
                ok = d < -(radius + 3.0 * s)
                ok &= np.all(
                    [np.linalg.norm(pts - les.centre_mm, axis=1) > radius + les.radius_mm + 4.0 * s
                     for les in self.lesions] or [np.ones(len(pts), bool)], axis=0
                )
                if ok.any():
                    centre = pts[int(np.flatnonzero(ok)[0])]
                    self.lesions.append(PhantomLesion(5, tuple(float(v) for v in centre), radius, hu))  # type: ignore[arg-type]
                    break
                radius *= 0.9
            else:  # pragma: no cover - the liver always holds a 5 mm sphere
                log.warning("could not place a liver tumour of radius %.1f mm", radius)
        with_kidney = bool(rng.random() < 0.4) if kidney_tumour is None else kidney_tumour
        if with_kidney:
            value = int(rng.choice([3, 4]))
            k = self.kidneys[value]
            side = 1.0 if value == 3 else -1.0
            pole = float(rng.choice([-1.0, 1.0]))
            radius = float(s * rng.uniform(10.0, 18.0))
            centre = self._kidney_tumour_centre(k, side, pole, radius)
            self.lesions.append(PhantomLesion(6, tuple(float(v) for v in centre), radius,  # type: ignore[arg-type]
                                              float(np.clip(rng.normal(45, 12), 15, 80))))

    def _kidney_tumour_centre(self, kidney: _Ellipsoid, side: float, pole: float, radius: float) -> np.ndarray:
        """Centre of a kidney tumour at the drawn pole, lateral and partly exophytic, moved toward the kidney's
        centre until at least :data:`KIDNEY_TUMOUR_MIN_INSIDE` of its sphere lies inside the body's interior
        (only that part is painted: a placement against the body wall would leave a sliver, not a tumour).

        Deterministic (no draws), so the rest of the anatomy is unchanged.
        """
        assert kidney.rot is not None
        g = np.linspace(-1.0, 1.0, 15)
        unit = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
        unit = unit[np.sum(unit * unit, axis=1) <= 1.0] * radius  # a lattice filling the sphere
        best, best_inside = None, -1.0
        # lateral at either pole first, then toward the front of the kidney (the interior is deeper there)
        directions = [(side, 0.0, pole), (side, 0.0, -pole), (side, 1.0, pole), (side, 1.0, -pole),
                      (0.0, 1.0, pole), (0.0, 1.0, -pole)]
        for t in (1.0, 0.8, 0.6, 0.4, 0.2):
            for lat, ant, p in directions:
                local = np.array([lat * 0.55 * kidney.radii[0], ant * 0.6 * kidney.radii[1],
                                  p * 0.6 * kidney.radii[2]]) * t
                centre = np.asarray(kidney.centre) + kidney.rot @ local
                pts = unit + centre
                d, _ = self.interior((pts[:, 0], pts[:, 1], pts[:, 2]), np.ones(3))
                inside = float(np.mean(d < 0))
                if inside >= KIDNEY_TUMOUR_MIN_INSIDE:
                    return centre
                if inside > best_inside:
                    best, best_inside = centre, inside
        log.warning("kidney tumour of radius %.1f mm: at best %.0f %% inside the body", radius, 100 * best_inside)
        assert best is not None
        return best

    # fields (xyz: broadcastable world coordinate arrays; sp: spacing for partial-volume widths)
    def body(self, xyz: XYZ, sp: np.ndarray) -> Field:
        x, y, z = xyz
        a = self.A * (1.0 - 0.05 * ((z + 30.0 * self.scale) / (130.0 * self.scale)) ** 2)
        b = np.where(y >= 0, np.float32(self.B_ant), np.float32(self.B_post)) * np.float32(
            1.0 + 0.04 * np.tanh((z - 40.0 * self.scale) / 50.0)
        )
        px = x + 1e-3
        rho = np.sqrt((px / a) ** 2 + (y / b) ** 2)
        r = np.sqrt(px * px + y * y)
        d = r * (1.0 - 1.0 / rho)
        w = (np.abs(px) * sp[0] + np.abs(y) * sp[1]) / r
        return d.astype(np.float32, copy=False), np.broadcast_to(w, d.shape).astype(np.float32)

    def interior(self, xyz: XYZ, sp: np.ndarray) -> Field:
        d, w = self.body(xyz, sp)
        return d + np.float32(self.organ_margin), w

    def liver_field(self, xyz: XYZ, sp: np.ndarray) -> Field:
        liver = _union(self.liver_right.field(xyz, sp), self.liver_left.field(xyz, sp))
        liver = _inter(liver, self.interior(xyz, sp), _union(self.dome_r.field(xyz, sp), self.dome_l.field(xyz, sp)))
        for cut in (self.kidneys[4], self.gallbladder, self.ivc, self.vert_body, self.stomach):
            d, w = cut.field(xyz, sp)
            liver = _minus(liver, (d - np.float32(4.0 * self.scale), w))  # keep 4 mm away
        return liver

    def _liver_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo1, hi1 = self.liver_right.bounds(0.0)
        lo2, hi2 = self.liver_left.bounds(0.0)
        return np.minimum(lo1, lo2), np.maximum(hi1, hi2)


# ---- painting on the canonical grid --------------------------------------------------------------------------


class _Canvas:
    """HU and labels on the canonical grid (model coordinates: x toward the patient's left).

    Stored (z, y, x) C-order so a z slice is contiguous.
    """

    def __init__(self, shape_xyz: tuple[int, int, int], spacing: np.ndarray, origin: np.ndarray) -> None:
        self.shape = shape_xyz
        self.spacing = spacing
        self.origin = origin
        self.coords = [(origin[a] + np.arange(shape_xyz[a]) * spacing[a]).astype(np.float32) for a in range(3)]
        nx, ny, nz = shape_xyz
        self.hu = np.empty((nz, ny, nx), dtype=np.float32)
        self.lab = np.zeros((nz, ny, nx), dtype=np.uint8)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, slice, slice], XYZ] | None:
        """Index box (z, y, x slices) covering world [lo, hi] and its broadcastable x, y, z coordinates."""
        sl = []
        for a in range(3):
            i0 = int(np.clip(np.floor((lo[a] - self.origin[a]) / self.spacing[a]), 0, self.shape[a]))
            i1 = int(np.clip(np.ceil((hi[a] - self.origin[a]) / self.spacing[a]) + 1, 0, self.shape[a]))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        x = self.coords[0][sl[0]][None, None, :]
        y = self.coords[1][sl[1]][None, :, None]
        z = self.coords[2][sl[2]][:, None, None]
        return (sl[2], sl[1], sl[0]), (x, y, z)

    def paint(self, sl: tuple[slice, slice, slice], field: Field, hu: float | np.ndarray,
              label: int | None = None) -> None:
        d, w = field
        f = _frac(d, w)
        view = self.hu[sl]
        view += f * (np.asarray(hu, dtype=np.float32) - view)
        if label is not None:
            self.lab[sl][d <= 0] = label


def _paint_shape(canvas: _Canvas, shape: _Ellipsoid, hu: float, label: int | None = None, *,
                 clip: _Anatomy | None = None, extra: list[_Ellipsoid] | None = None) -> None:
    b = canvas.box(*shape.bounds())
    if b is None:
        return
    sl, xyz = b
    field = shape.field(xyz, canvas.spacing)
    if clip is not None:
        field = _inter(field, clip.interior(xyz, canvas.spacing))
    canvas.paint(sl, field, hu, label)


def _paint_body(canvas: _Canvas, anat: _Anatomy) -> None:
    """Air, subcutaneous fat, abdominal wall, visceral fat and ribs, slice by slice (z)."""
    sp = canvas.spacing
    x = canvas.coords[0][None, :]
    y = canvas.coords[1][:, None]
    fat_map = (anat.fat_t * (1.0 + 0.35 * np.clip(y / anat.B_ant, 0.0, 1.0))).astype(np.float32)  # thicker belly
    wall = fat_map + np.float32(anat.muscle_t)
    rib_depth = wall + np.float32(4.5 * anat.scale)
    anterior_midline = (np.abs(x) < 30.0 * anat.scale) & (y > 0)
    air, fat, mus, vis, rib = (np.float32(v) for v in (_AIR, _FAT, _MUSCLE, _VISCERAL, anat.hu["rib"]))
    for k, z in enumerate(canvas.coords[2]):
        d, w = anat.body((x, y, np.float32(z)), sp)
        f_in = _frac(d + wall, w)
        inner = mus + f_in * (vis - mus)
        f_m = _frac(d + fat_map, w)
        inner = fat + f_m * (inner - fat)
        f_b = _frac(d, w)
        out = canvas.hu[k]
        np.multiply(f_b, inner - air, out=out)
        out += air
        if z > anat.rib_z0:
            dz = float(_slab_z(np.float64(z), anat.rib_z0, anat.rib_period, 5.0 * anat.scale, sp[2]))
            d_rib = np.maximum(np.abs(d + rib_depth) - np.float32(4.5 * anat.scale), np.float32(dz))
            w_rib = np.where(np.float32(dz) > np.abs(d + rib_depth) - 4.5 * anat.scale, np.float32(sp[2]), w)
            f_r = _frac(d_rib, w_rib)
            f_r[anterior_midline] = 0.0
            out += f_r * (rib - out)


def _paint_spine(canvas: _Canvas, anat: _Anatomy) -> None:
    s, sp, hu = anat.scale, canvas.spacing, anat.hu
    for shape in anat.paraspinal:
        _paint_shape(canvas, shape, _MUSCLE, clip=anat)
    for shape in anat.psoas:
        _paint_shape(canvas, shape, _MUSCLE, clip=anat)
    lo, hi = anat.vert_body.bounds()
    lo2, hi2 = anat.spinous.bounds()
    b = canvas.box(np.minimum(lo, lo2), np.maximum(hi, hi2))
    if b is None:
        return
    sl, xyz = b
    z = xyz[2]
    canvas.paint(sl, anat.vert_body.field(xyz, sp), hu["cortical"])
    canc = anat.vert_cancellous.field(xyz, sp)
    canvas.paint(sl, canc, hu["cancellous"])
    dz = _slab_z(z, anat.disc_z0, anat.disc_period, 4.0 * s, sp[2]).astype(np.float32)
    disc = _inter(anat.vert_body.field(xyz, sp), (np.broadcast_to(dz, canc[0].shape), np.full_like(canc[1], sp[2])))
    canvas.paint(sl, disc, hu["disc"])
    arch = _inter(_union(anat.arch.field(xyz, sp), anat.spinous.field(xyz, sp)),
                  (np.broadcast_to(xyz[1] + np.float32(64.0 * s), canc[0].shape).astype(np.float32),
                   np.full_like(canc[1], sp[1])))  # posterior to y = −64 mm
    arch = _inter(arch, (np.broadcast_to(-_slab_z(z, anat.disc_z0, anat.disc_period, 4.0 * s, sp[2]), canc[0].shape)
                         .astype(np.float32), np.full_like(canc[1], sp[2])))  # gaps at the discs
    canvas.paint(sl, arch, hu["cortical"] * 0.7)
    canvas.paint(sl, anat.canal.field(xyz, sp), hu["csf"])


def _paint(canvas: _Canvas, anat: _Anatomy) -> None:
    sp, hu = canvas.spacing, anat.hu
    _paint_body(canvas, anat)
    # thorax: lungs above the diaphragm domes, heart between them
    for lung, dome in ((anat.lung_r, anat.dome_r), (anat.lung_l, anat.dome_l)):
        b = canvas.box(*lung.bounds())
        if b is not None:
            sl, xyz = b
            field = _minus(_inter(lung.field(xyz, sp), anat.interior(xyz, sp)),
                           _union(anat.dome_r.field(xyz, sp), anat.dome_l.field(xyz, sp)))
            canvas.paint(sl, field, hu["lung"])
    _paint_shape(canvas, anat.heart, hu["heart"], clip=anat)
    # bowel, stomach, vessels, spine (background)
    for shape, value, gas in anat.bowel:
        _paint_shape(canvas, shape, value, clip=anat)
        if gas:
            core = _Ellipsoid(shape.centre, tuple(0.6 * r for r in shape.radii), shape.rot)  # type: ignore[arg-type]
            _paint_shape(canvas, core, -750.0, clip=anat)
    _paint_shape(canvas, anat.stomach, hu["stomach"], clip=anat)
    _paint_shape(canvas, anat.aorta, hu["aorta"])
    _paint_shape(canvas, anat.ivc, hu["ivc"])
    _paint_spine(canvas, anat)
    # labelled organs
    b = canvas.box(*anat._liver_bounds())
    if b is not None:
        sl, xyz = b
        canvas.paint(sl, anat.liver_field(xyz, sp), hu["liver"], 1)
    _paint_shape(canvas, anat.gallbladder, hu["gallbladder"], clip=anat)
    b = canvas.box(*anat.spleen.bounds())
    if b is not None:
        sl, xyz = b
        field = _inter(anat.spleen.field(xyz, sp), anat.interior(xyz, sp), anat.dome_l.field(xyz, sp))
        canvas.paint(sl, field, hu["spleen"], 2)
    for value, kidney in anat.kidneys.items():
        b = canvas.box(*kidney.bounds())
        if b is None:
            continue
        sl, xyz = b
        field = _minus(_inter(kidney.field(xyz, sp), anat.interior(xyz, sp)), anat.hila[value].field(xyz, sp))
        canvas.paint(sl, field, hu["cortex"], value)
        canvas.paint(sl, _minus(anat.medullas[value].field(xyz, sp), anat.hila[value].field(xyz, sp)), hu["medulla"])
    # tumours: liver tumours inside the liver, the kidney tumour inside the body (it may bulge out of the kidney)
    for les in anat.lesions:
        shape = _Ellipsoid(les.centre_mm, (les.radius_mm,) * 3)
        b = canvas.box(*shape.bounds())
        if b is None:
            continue
        sl, xyz = b
        field = shape.field(xyz, sp)
        field = _inter(field, anat.liver_field(xyz, sp) if les.label == 5 else anat.interior(xyz, sp))
        canvas.paint(sl, field, les.mean_hu, les.label)


def _grid(shape: Sequence[int], spacing_mm: Sequence[float] | None, orientation: str
          ) -> tuple[str, tuple[int, int, int], np.ndarray]:
    code = str(orientation).upper()
    if len(code) != 3 or any(c not in _AXIS_OF_LETTER for c in code) or \
            sorted(_AXIS_OF_LETTER[c] for c in code) != [0, 1, 2]:
        raise PhantomError(
            f"orientation must be three letters naming each of L/R, A/P, S/I once (e.g. 'LPS', 'RAS', 'RAI'), "
            f"not {orientation!r}."
        )
    shape_t = tuple(int(n) for n in shape)
    if len(shape_t) != 3 or any(n < 2 for n in shape_t) or any(n > 2048 for n in shape_t):
        raise PhantomError(f"shape must be three sizes in 2..2048 voxels, not {tuple(shape)!r}.")
    canon_shape = [0, 0, 0]
    canon_spacing = np.zeros(3)
    for a, letter in enumerate(code):
        w = _AXIS_OF_LETTER[letter]
        canon_shape[w] = shape_t[a]
        if spacing_mm is None:
            canon_spacing[w] = DEFAULT_FOV_MM[w] / shape_t[a]
        else:
            sp = tuple(float(v) for v in spacing_mm)
            if len(sp) != 3 or not all(np.isfinite(v) and 0.05 <= v <= 50.0 for v in sp):
                raise PhantomError(f"spacing_mm must be three sizes in 0.05..50 mm, not {tuple(spacing_mm)!r}.")
            canon_spacing[w] = sp[a]
    return code, tuple(canon_shape), canon_spacing  # type: ignore[return-value]


def make_phantom(
    seed: int = 0,
    *,
    shape: Sequence[int] = (192, 192, 80),
    spacing_mm: Sequence[float] | None = None,
    orientation: str = "LPS",
    body_scale: float = 1.0,
    liver_tumours: int | None = None,
    kidney_tumour: bool | None = None,
    noise_hu: float = 12.0,
) -> Phantom:
    """A seeded synthetic abdominal CT with its organ and tumour labels.

    Parameters
    ----------
    seed : int
        Fixes the anatomy (sizes, positions, HU means, tumours) and the noise. The same seed gives the same
        anatomy in world space whatever the grid.
    shape : 3 ints
        Voxels along the output axes (i, j, k).
    spacing_mm : 3 floats, optional
        Voxel size (mm) along (i, j, k); anisotropic is fine. Default: :data:`DEFAULT_FOV_MM` (400 × 400 × 260 mm
        along x, y, z) divided by the shape.
    orientation : str
        Orientation code of the output axes, e.g. "LPS" (as DICOM series load), "RAS" (as NIfTI tools like), or any
        flips and permutations ("RAI", "LAS", "SAR", ...). The grid is centred on world (0, 0, 0).
    body_scale : float
        Scales the whole body (0.5–1.5; 1 ≈ an adult with a 33 cm wide abdomen).
    liver_tumours : int, optional
        0–3 liver tumours; random (from the seed) when None.
    kidney_tumour : bool, optional
        Whether to add a kidney tumour; random (40 %) when None.
    noise_hu : float
        Standard deviation of the Gaussian noise (HU), 0–100.

    Returns
    -------
    Phantom
        ``image`` (int16 HU, modality CT) and ``labels`` (uint8, :data:`PHANTOM_LABELS`) on the same grid.

    Raises
    ------
    PhantomError
        If an option is out of range (the message says which and the allowed range).
    """
    from medseg.resample import as_orientation

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, not {seed!r}.")
    if not 0.5 <= float(body_scale) <= 1.5:
        raise PhantomError(f"body_scale must be in 0.5..1.5, not {body_scale!r}.")
    if liver_tumours is not None and (not isinstance(liver_tumours, (int, np.integer)) or not 0 <= liver_tumours <= 3):
        raise PhantomError(f"liver_tumours must be 0..3 (or None for a random count), not {liver_tumours!r}.")
    if not 0.0 <= float(noise_hu) <= 100.0:
        raise PhantomError(f"noise_hu must be in 0..100 HU, not {noise_hu!r}.")
    code, canon_shape, canon_spacing = _grid(shape, spacing_mm, orientation)
    rng = np.random.default_rng(int(seed))
    anat = _Anatomy(rng, scale=float(body_scale), liver_tumours=None if liver_tumours is None else int(liver_tumours),
                    kidney_tumour=kidney_tumour)
    origin = -(np.asarray(canon_shape, dtype=np.float64) - 1.0) / 2.0 * canon_spacing
    canvas = _Canvas(canon_shape, canon_spacing, origin)
    _paint(canvas, anat)
    # noise and rounding, slice by slice; noise comes from its own stream so the anatomy never depends on the grid
    noise_rng = np.random.default_rng([int(seed), 1])
    image_zyx = np.empty(canvas.hu.shape, dtype=np.int16)
    sigma = np.float32(noise_hu)
    for k in range(canvas.hu.shape[0]):
        sl = canvas.hu[k]
        if sigma > 0:
            sl += sigma * noise_rng.standard_normal(sl.shape, dtype=np.float32)
        np.clip(np.rint(sl, out=sl), _HU_MIN, _HU_MAX, out=sl)
        image_zyx[k] = sl
    # The anatomy is modelled with x toward the patient's LEFT (DICOM's convention); RAS+ has the patient's RIGHT
    # at +x, so the canonical grid's i axis points to -x (checked against the real TotalSegmentator CT, whose liver
    # centroid lies at x = +76 mm RAS). Without this flip every phantom would be mirrored: liver on the left.
    affine = np.diag([-canon_spacing[0], canon_spacing[1], canon_spacing[2], 1.0])
    affine[:3, 3] = origin * np.array([-1.0, 1.0, 1.0])
    # (z, y, x) C-order transposed is (x, y, z) Fortran-order: RAS voxel axes, no copy
    image = as_orientation(Volume(image_zyx.T, affine, modality="CT"), code)
    labels = as_orientation(Volume(canvas.lab.T, affine, labels=PHANTOM_LABELS), code)
    image = Volume(np.asfortranarray(image.array), image.affine, modality="CT")
    labels = Volume(np.asfortranarray(labels.array), labels.affine, labels=PHANTOM_LABELS)
    log.info("phantom seed %d: %s, %d lesions", seed, image.describe_grid(), len(anat.lesions))
    # lesion centres were drawn in the model frame (x toward the patient's left): report them in RAS
    lesions = tuple(
        PhantomLesion(les.label, (-les.centre_mm[0], les.centre_mm[1], les.centre_mm[2]), les.radius_mm, les.mean_hu)
        for les in anat.lesions
    )
    return Phantom(image=image, labels=labels, label_table=PHANTOM_LABELS, seed=int(seed), lesions=lesions)


# ---- writing ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomStudy:
    """Files of a written phantom study.

    Attributes
    ----------
    folder : Path
    image_path : Path
        DICOM series folder (``ct/``) or NIfTI file (``ct.nii.gz``).
    labels_path : Path
        ``labels.nii.gz`` (its label table sidecar is ``labels.labels.json``).
    info_path : Path
        ``phantom.json``: seed, grid and the tumours as placed.
    """

    folder: Path
    image_path: Path
    labels_path: Path
    info_path: Path


def write_phantom_study(
    phantom: Phantom,
    folder: str | os.PathLike[str],
    *,
    format: Literal["dicom", "nifti"] = "dicom",
    transfer_syntax: str = "explicit-vr-little-endian",
    overwrite: bool = False,
) -> PhantomStudy:
    """Write a phantom as a study folder: the CT (DICOM series or NIfTI), the labels (NIfTI + label table).

    Layout: ``folder/ct/`` (DICOM, one file per slice) or ``folder/ct.nii.gz``; ``folder/labels.nii.gz`` with
    ``folder/labels.labels.json``; ``folder/phantom.json``. Everything is written into a temporary sibling folder
    and renamed into place, so ``folder`` never holds a partial study.

    The labels are on the phantom's grid. A DICOM series of a left-handed grid (e.g. orientation "RAI") reads back
    with its slices reversed (see :mod:`medseg.io.dicom_write`): the same world grid, so compare through world
    coordinates (:func:`medseg.resample.resample_to`).

    Parameters
    ----------
    phantom : Phantom
    folder : path
        Study folder to create (parents are created).
    format : {"dicom", "nifti"}
    transfer_syntax : str
        For DICOM: one of :data:`medseg.io.dicom_write.TRANSFER_SYNTAXES`.
    overwrite : bool
        Replace an existing non-empty folder.

    Returns
    -------
    PhantomStudy

    Raises
    ------
    PhantomError
        If ``format`` is unknown or the folder exists and is not empty (without ``overwrite``).
    DicomWriteError, UnreadableFileError
        If writing fails; nothing is left behind.
    """
    from medseg.io import save_volume, write_dicom_series

    folder = Path(folder)
    if format not in ("dicom", "nifti"):
        raise PhantomError(f"format must be 'dicom' or 'nifti', not {format!r}.")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise PhantomError(f"{folder}: exists and is not an empty folder; choose a new folder or overwrite=True (--overwrite).")
    tmp = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise PhantomError(f"{folder}: cannot create the study folder ({exc.strerror or exc}: "
                           f"{exc.filename or folder.parent}); choose a folder whose parents are folders.") from None
    try:
        if format == "dicom":
            write_dicom_series(phantom.image, tmp / "ct", transfer_syntax=transfer_syntax,  # type: ignore[arg-type]
                               series_description=f"medseg phantom seed {phantom.seed}", seed=phantom.seed)
            image_name = "ct"
        else:
            save_volume(phantom.image, tmp / "ct.nii.gz")
            image_name = "ct.nii.gz"
        save_volume(phantom.labels, tmp / "labels.nii.gz")
        info = {
            "seed": phantom.seed,
            "format": format,
            "shape": list(phantom.image.shape),
            "spacing_mm": list(phantom.image.spacing_mm),
            "orientation": phantom.image.orientation,
            "affine": phantom.image.affine.tolist(),
            "labels": phantom.label_table.to_json()["labels"],
            "lesions": [
                {"label": les.label, "centre_mm": list(les.centre_mm), "radius_mm": les.radius_mm,
                 "mean_hu": les.mean_hu}
                for les in phantom.lesions
            ],
        }
        (tmp / "phantom.json").write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            if overwrite and (not folder.is_dir() or any(folder.iterdir())):
                old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(folder, old)
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink()
            else:
                folder.rmdir()
        os.replace(tmp, folder)
    except MedsegError:
        raise
    except OSError as exc:
        from medseg.errors import UnreadableFileError

        raise UnreadableFileError(f"{folder}: could not write the phantom study ({exc}).") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return PhantomStudy(folder, folder / image_name, folder / "labels.nii.gz", folder / "phantom.json")


@dataclass(frozen=True)
class DemoStudy:
    """A phantom study written as DICOM and loaded back, for the ``medseg demo`` command.

    Attributes
    ----------
    study : PhantomStudy
        The files written.
    image : Volume
        The CT as loaded from the DICOM series (HU).
    labels : Volume
        The label map as loaded from NIfTI, on ``image``'s grid.
    round_trip_exact : bool
        True when the loaded CT equals the generated one voxel for voxel on the same world grid (to 1e-4 mm).
    lesions : tuple of PhantomLesion
    """

    study: PhantomStudy
    image: Volume
    labels: Volume
    round_trip_exact: bool
    lesions: tuple[PhantomLesion, ...]


def demo_study(
    folder: str | os.PathLike[str],
    *,
    seed: int = 0,
    shape: Sequence[int] = (160, 160, 64),
    overwrite: bool = False,
) -> DemoStudy:
    """Generate a phantom, write it as a DICOM study in ``folder``, load it back and check the round trip.

    Raises
    ------
    PhantomError, DicomWriteError, UnreadableFileError
        As :func:`make_phantom` and :func:`write_phantom_study`.
    """
    from medseg.io import load_volume
    from medseg.resample import resample_to

    phantom = make_phantom(seed, shape=shape, liver_tumours=2, kidney_tumour=True)
    study = write_phantom_study(phantom, folder, format="dicom", overwrite=overwrite)
    image = load_volume(study.image_path)
    labels = load_volume(study.labels_path)
    labels = resample_to(labels, image, interpolation="nearest")
    exact = image.same_grid(phantom.image) and np.array_equal(image.array, phantom.image.array)
    return DemoStudy(study, image, labels, bool(exact), phantom.lesions)
