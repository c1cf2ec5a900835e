"""The ``ct-basic`` model: body, left lung, right lung, airway (trachea and main bronchi) and bone of a CT.

Hounsfield-unit rules, morphology and connected components (SimpleITK, scipy.ndimage, cc3d, scikit-image). Left
and right are the patient's, read from the affine (RAS: the patient's left is -x), never from array order. Sizes
are given in mm, never voxels. See ``docs/classical.md`` for the rules, thresholds and limitations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg._masks import bounding_box, connected_components
from medseg.errors import ModalityMismatchError
from medseg.labels import Label, LabelTable
from medseg.volume import Volume

__all__ = ["CT_BASIC_LABELS", "CtBasicConfig", "ct_basic"]

log = logging.getLogger(__name__)

#: Labels written by :func:`ct_basic`.
CT_BASIC_LABELS = LabelTable(
    [
        Label(1, "body", (177, 122, 101), "other"),
        Label(2, "lung_left", (128, 174, 128), "organ"),
        Label(3, "lung_right", (111, 184, 210), "organ"),
        Label(4, "airway", (0, 151, 206), "organ"),
        Label(5, "bone", (241, 214, 145), "organ"),
    ]
)

_BODY, _LUNG_LEFT, _LUNG_RIGHT, _AIRWAY, _BONE = 1, 2, 3, 4, 5
# Bits of the working grid's region code (one byte per working voxel).
_BIT_BODY, _BIT_BONE, _BIT_AIRWAY, _BIT_LEFT, _BIT_RIGHT = 0, 1, 2, 3, 4
_WHOLE = (slice(None), slice(None), slice(None))


# ---------------------------------------------------------------------------------------------------------------
# ct-basic
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CtBasicConfig:
    """Rules of :func:`ct_basic`. Intensities in HU, sizes in mm and mL.

    Attributes
    ----------
    working_spacing_mm : float or None
        Morphology and connected components run on a grid coarsened by whole-voxel block averaging to about this
        spacing (never finer than the input); the result is mapped back to the input grid and its boundaries are
        re-thresholded there. ``None`` works on the input grid (slower, the benchmark's baseline).
    body_min_hu : float
        Tissue of the body is above this; outside air is below.
    body_opening_mm : float
        Opening radius that detaches the table, blankets and cables from the body.
    lung_max_hu : float
        Lung parenchyma (and air) is below this.
    lung_min_ml : float
        A low-density component inside the body smaller than this is not a lung.
    lung_min_above_air_hu : float
        Aerated lung is a mixture of air and tissue; gas in the stomach and bowel is air. A low-density component
        is lung only if the median HU of its interior (its voxels one working voxel away from its border, where
        the wall's partial volume does not reach) lies at least this far above the scan's own air. Measured on
        real CTs: colon gas interiors 13-14 HU above air, lung bases 178-195 HU above air (docs/classical.md);
        severe emphysema lowers lung density to about 50-100 HU above air.
    air_hu : float
        Air level used when the scan shows too little air outside the body to measure its own (tight crops):
        the outside voxels between −1100 and −900 HU give it otherwise (scanners read air anywhere from about
        −1000 to −975).
    airway_seed_max_hu : float
        The trachea is looked for as air below this inside the body, in the top slices holding lung.
    airway_max_ml : float
        Region growing of the airway stops before its volume exceeds this (leakage into the lungs).
    bone_min_hu : float
        Cortical bone is above this.
    bone_min_ml : float
        Dense components smaller than this (calcifications, contrast specks) are not bone.
    bone_closing_mm : float
        Closing radius that bridges gaps in the cortex before the marrow is filled in-plane.
    """

    working_spacing_mm: float | None = 2.0
    body_min_hu: float = -500.0
    body_opening_mm: float = 4.0
    lung_max_hu: float = -400.0
    lung_min_ml: float = 20.0
    lung_min_above_air_hu: float = 40.0
    air_hu: float = -1000.0
    airway_seed_max_hu: float = -900.0
    airway_max_ml: float = 250.0
    bone_min_hu: float = 200.0
    bone_min_ml: float = 0.5
    bone_closing_mm: float = 3.0


def _check_ct(volume: Volume, operation: str) -> None:
    modality = (volume.modality or "").upper()
    if modality and modality != "CT":
        raise ModalityMismatchError(
            f"{operation} works on CT in Hounsfield units; this volume's modality is {volume.modality!r}. "
            "Use a model made for that modality instead."
        )
    volume.require_3d(operation)
    if not modality:
        lo = float(np.min(volume.array))
        if lo > -200:
            raise ModalityMismatchError(
                f"{operation} needs CT intensities in HU; this volume has no modality and its lowest value is "
                f"{lo:g}, while a CT holds air (≈ −1000 HU) or fat (≈ −100 HU). If it is a CT stored without its "
                "rescale slope/intercept, convert it to HU first; otherwise it is not a CT."
            )


def _factors(spacing: Sequence[float], target_mm: float | None) -> tuple[int, int, int]:
    if target_mm is None:
        return (1, 1, 1)
    return tuple(max(1, round(target_mm / s)) for s in spacing)  # type: ignore[return-value]


def _block_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Mean of each ``f`` block (float32); the last, partial blocks repeat the array's edge."""
    if f == (1, 1, 1):
        return a.astype(np.float32, copy=False)
    pad = [(0, (-n) % fi) for n, fi in zip(a.shape, f)]
    n_block = f[0] * f[1] * f[2]
    if np.issubdtype(a.dtype, np.integer) and not any(p[1] for p in pad):
        info = np.iinfo(a.dtype.type)
        if n_block * max(abs(int(info.min)), int(info.max)) < 2**24:
            # Integers below 2**24 add exactly in float32 in any order, and the division is rounded once, so this
            # equals the reshape-and-mean below without its float32 copy of the whole input.
            total = a[:: f[0], :: f[1], :: f[2]].astype(np.float32)
            for i in range(f[0]):
                for j in range(f[1]):
                    for k in range(f[2]):
                        if i or j or k:
                            total += a[i :: f[0], j :: f[1], k :: f[2]]
            total /= np.float32(n_block)
            return total
    if any(p[1] for p in pad):
        a = np.pad(a, pad, mode="edge")
    s = a.shape
    out = a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).astype(np.float32)
    return out.mean(axis=(1, 3, 5), dtype=np.float32)


def _radius_vox(radius_mm: float, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Half-widths in voxels of a box reaching ``radius_mm`` along each axis (at least 1 voxel if radius > 0)."""
    if radius_mm <= 0:
        return (0, 0, 0)
    return tuple(max(1, int(np.floor(radius_mm / s + 1e-6))) for s in spacing)  # type: ignore[return-value]


def _box_morphology(m: np.ndarray, r: Sequence[int], *, dilate: bool) -> np.ndarray:
    """Binary erosion or dilation by a box of half-widths ``r``: separable 1-D min/max filters, edges copied."""
    import scipy.ndimage as ndi

    filter1d = ndi.maximum_filter1d if dilate else ndi.minimum_filter1d
    a = m.view(np.uint8) if m.dtype == np.bool_ else m.astype(np.uint8)
    for ax, ri in enumerate(r):
        if ri > 0:
            a = filter1d(a, 2 * ri + 1, axis=ax, mode="nearest")
    return a.astype(bool)


def _erode(m: np.ndarray, r: Sequence[int]) -> np.ndarray:
    """Binary erosion by a box of half-widths ``r`` (separable; the outside of the array copies its edge)."""
    return _box_morphology(m, r, dilate=False)


def _dilate(m: np.ndarray, r: Sequence[int]) -> np.ndarray:
    """Binary dilation by a box of half-widths ``r`` (separable)."""
    return _box_morphology(m, r, dilate=True)


def _fill_holes_in_plane(m: np.ndarray, axial: int) -> np.ndarray:
    """Fill holes slice by slice across ``axial``: background not 4-connected to the slice's edge becomes True.

    Each slice is labelled only inside the bounding box of its True pixels: background on that box's border is
    connected to the slice's edge through the all-background outside, so the holes are the same.
    """
    import cc3d

    out = np.array(m, dtype=bool, copy=True)
    planes = np.moveaxis(out, axial, 0)  # a view: writes go to ``out``
    for k in np.flatnonzero(planes.any(axis=(1, 2))):
        sl = planes[k]
        box = bounding_box(sl)
        assert box is not None  # the plane holds a True pixel
        crop = np.ascontiguousarray(sl[box])
        lab = cc3d.connected_components(~crop, connectivity=4)
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        hole = np.ones(int(lab.max()) + 1, dtype=bool)
        hole[border] = False
        hole[0] = False
        sl[box] = crop | hole[lab]
    return out


def _mean_index(m: np.ndarray, origin: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Mean voxel index of the True voxels of ``m`` (offset by ``origin``), as ``np.argwhere(m).mean(axis=0)``.

    The index sums are integers (exact in float64), so the result is bitwise that of argwhere-and-mean, without
    the (N, 3) index array.
    """
    n = int(np.count_nonzero(m))
    per_ij = m.sum(axis=2, dtype=np.int64)
    counts = (per_ij.sum(axis=1), per_ij.sum(axis=0), m.sum(axis=(0, 1), dtype=np.int64))
    sums = [int(np.dot(cnt, np.arange(len(cnt), dtype=np.int64))) + int(o) * n for cnt, o in zip(counts, origin)]
    return np.array(sums, dtype=np.float64) / n


def _label_medians(values: np.ndarray, lab: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.median(values, lab, index)``, sorting only the voxels of the labels in ``index``.

    The same lexsort and the same mean of the two middle values as SciPy, so the same numbers.
    """
    wanted = np.zeros(int(lab.max()) + 2, dtype=bool)
    wanted[index] = True
    sel = wanted[lab]
    v, lv = values[sel], lab[sel]
    order = np.lexsort((v, lv))
    v, lv = v[order], lv[order]
    locs = np.arange(len(lv))
    lo = np.zeros(int(lab.max()) + 2, dtype=np.intp)
    lo[lv[::-1]] = locs[::-1]
    hi = np.zeros(int(lab.max()) + 2, dtype=np.intp)
    hi[lv] = locs
    lo, hi = lo[index], hi[index]
    step = (hi - lo) // 2
    lo += step
    hi -= step
    if np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_:
        return (v[lo].astype("d") + v[hi].astype("d")) / 2.0
    return (v[lo] + v[hi]) / 2.0


def _axial_axis(volume: Volume) -> int:
    return int(np.argmax(np.abs(volume.direction[2, :])))


def _superior_sign(volume: Volume, axial: int) -> int:
    """+1 if the index along ``axial`` grows towards the head, else −1."""
    return 1 if volume.affine[2, axial] > 0 else -1


def _body(c: np.ndarray, spacing: Sequence[float], axial: int, cfg: CtBasicConfig) -> np.ndarray:
    """The largest tissue component, plus big ones holding fat (arms), slice-wise hole-filled."""
    tissue = c > cfg.body_min_hu
    r = _radius_vox(cfg.body_opening_mm, spacing)
    # With a margin one voxel wider than a morphology radius, erosion, dilation, components and in-plane hole filling
    # inside the box equal those on the whole grid: the box's border is background wherever it is not the edge.
    box = bounding_box(tissue, [ri + 1 for ri in r]) or _WHOLE
    m = _dilate(_erode(tissue[box], r), r)
    lab, n = connected_components(m)
    body = np.zeros(c.shape, dtype=bool)
    if n == 0:
        return body
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    cb = c[box]
    fat = np.bincount((lab * ((cb > -150) & (cb < -50))).ravel(), minlength=n + 1)  # fat[0] is not used
    keep = (sizes >= 0.05 * sizes[largest]) & (fat >= 0.05 * np.maximum(sizes, 1))
    keep[largest] = True
    keep[0] = False
    body[box] = _fill_holes_in_plane(keep[lab], axial)
    return body


def _air_level(c: np.ndarray, body: np.ndarray, cfg: CtBasicConfig) -> float:
    """The scan's own air HU: median of the outside voxels between −1100 and −900 HU, if there are enough."""
    outside = c[~body]
    air = outside[(outside > -1100.0) & (outside < -900.0)]
    if air.size < max(100, 0.01 * c.size):
        log.debug("ct-basic: %d air voxels outside the body; assuming air at %g HU", air.size, cfg.air_hu)
        return float(cfg.air_hu)
    return float(np.median(air))


def _airway(
    c: np.ndarray, body: np.ndarray, low: np.ndarray, spacing: Sequence[float], axial: int, sup: int,
    voxel_ml: float, cfg: CtBasicConfig, *, box: tuple[slice, ...] | None = None,
    full_shape: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, float]:
    """Trachea and main bronchi: seed a round air tube in the top lung slices, grow with leakage control.

    ``c``, ``body`` and ``low`` may be the ``box`` of arrays of ``full_shape`` (the body's bounding box): the
    seed is looked for on whole slices (the same centres of mass as without the box) and grown inside the box.
    Returns the airway mask (on the arrays given) and the HU threshold it was grown with.
    """
    import scipy.ndimage as ndi

    if box is None or full_shape is None:
        box, full_shape = _WHOLE, c.shape
    origin = [sl.indices(n)[0] for sl, n in zip(box, full_shape)]
    plane_axes = [ax for ax in range(3) if ax != axial]
    plane_shape = tuple(full_shape[ax] for ax in plane_axes)
    plane_box = tuple(box[ax] for ax in plane_axes)

    def whole_slice(plane: np.ndarray) -> np.ndarray:
        sl = np.zeros(plane_shape, dtype=bool)
        sl[plane_box] = plane
        return sl

    empty = np.zeros_like(body)
    n_slices = full_shape[axial]
    order = range(n_slices - 1, -1, -1) if sup > 0 else range(n_slices)
    in_plane = [s for ax, s in enumerate(spacing) if ax != axial]
    px_mm2 = float(in_plane[0] * in_plane[1])
    has_low = np.zeros(n_slices, dtype=bool)
    has_low[box[axial]] = low.any(axis=tuple(plane_axes))
    seed: tuple[int, ...] | None = None
    checked = 0
    for k in order:
        if not has_low[k]:
            continue
        checked += 1
        if checked > max(3, round(40.0 / spacing[axial])):  # look in the top 4 cm of the lungs only
            break
        at_k: list[Any] = [slice(None)] * 3
        at_k[axial] = k - origin[axial]
        body_sl = whole_slice(body[tuple(at_k)])
        sl = whole_slice(c[tuple(at_k)] < cfg.airway_seed_max_hu) & body_sl
        if not body_sl.any():
            continue
        lab, n = ndi.label(sl)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        areas = ndi.sum(sl, lab, idx) * px_mm2
        coms = ndi.center_of_mass(sl, lab, idx)
        body_com = np.array(ndi.center_of_mass(body_sl))
        body_extent = np.ptp(np.argwhere(body_sl), axis=0) * np.array(in_plane)
        sides = _two_lungs(whole_slice(low[tuple(at_k)]), np.array(in_plane))
        best = None
        for i, (area, com) in enumerate(zip(areas, coms)):
            if not 50.0 <= area <= 700.0:
                continue
            off_mm = np.abs((np.array(com) - body_com) * np.array(in_plane))
            # Central in the body (both in-plane directions: the trachea is near the middle of the neck/chest).
            if np.any(off_mm > 0.25 * body_extent + 10.0):
                continue
            # In the mediastinum: between the two lungs of the slice, not under one of them (stomach or colon
            # gas below a lung base is central enough, but lies beside or below one lung, not between both).
            if sides is not None:
                c1, c2 = sides
                d = c2 - c1
                t = float(np.dot(np.array(com) * np.array(in_plane) - c1, d) / np.dot(d, d))
                if not 0.25 <= t <= 0.75:
                    continue
            score = float(np.sum(off_mm))
            if best is None or score < best[0]:
                best = (score, i + 1)
        if best is not None:
            pos = np.argwhere(lab == best[1])[0]
            full = list(pos)
            full.insert(axial, k)
            seed = tuple(int(v) - o for v, o in zip(full, origin))
            break
    if seed is None:
        return empty, cfg.airway_seed_max_hu
    # Grow from the seed with rising thresholds; keep the last one before a leak (volume jump or too large).
    prev: np.ndarray | None = None
    prev_ml, prev_t = 0.0, cfg.airway_seed_max_hu
    for t in np.arange(cfg.airway_seed_max_hu - 50.0, cfg.airway_seed_max_hu + 101.0, 25.0):
        cand = (c < t) & body
        lab, _ = connected_components(cand, 6)
        region = lab == lab[seed]
        ml = float(region.sum() * voxel_ml)
        log.debug("airway threshold %g HU: %.1f mL", t, ml)
        if ml > cfg.airway_max_ml or (prev is not None and ml > 2.0 * prev_ml + 5.0):
            break
        prev, prev_ml, prev_t = region, ml, float(t)
    if prev is None:
        return empty, cfg.airway_seed_max_hu
    return prev, prev_t


def _two_lungs(plane: np.ndarray, px_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Centres (mm, in-plane) of the two largest lung-like regions of a slice, or None if there are not two of
    comparable size (the smaller at least a tenth of the larger)."""
    import scipy.ndimage as ndi

    lab, n = ndi.label(plane)
    if n < 2:
        return None
    idx = np.arange(1, n + 1)
    areas = ndi.sum(plane, lab, idx)
    top = np.argsort(areas)[::-1][:2]
    if areas[top[1]] < 0.1 * areas[top[0]]:
        return None
    coms = ndi.center_of_mass(plane, lab, idx[top])
    return np.array(coms[0]) * px_mm, np.array(coms[1]) * px_mm


def _split_two(m: np.ndarray, spacing: Sequence[float], min_vox: int) -> np.ndarray:
    """Labels 1..n of ``m``, eroding until one big component falls apart into two (lungs joined at the front)."""
    import scipy.ndimage as ndi
    from skimage.segmentation import watershed

    lab, _ = connected_components(m)
    sizes = np.bincount(lab.ravel())[1:]
    big = np.flatnonzero(sizes >= min_vox) + 1
    if len(big) != 1:
        return lab
    comp = lab == big[0]
    eroded = comp
    for _ in range(8):
        eroded = _erode(eroded, (1, 1, 1))
        elab, en = connected_components(eroded)
        if en < 2:
            continue
        esizes = np.bincount(elab.ravel())[1:]
        top = np.argsort(esizes)[::-1][:2]
        if esizes[top[1]] >= 0.15 * esizes[top[0]]:
            markers = np.zeros(m.shape, dtype=np.int32)
            markers[elab == top[0] + 1] = 1
            markers[elab == top[1] + 1] = 2
            dist = ndi.distance_transform_edt(comp, sampling=spacing)
            split = watershed(-dist, markers, mask=comp)
            out = lab.copy()
            out[comp] = 0
            nxt = int(lab.max()) + 1
            out[split == 1] = big[0]
            out[split == 2] = nxt
            return out
    return lab


def _code_labels() -> np.ndarray:
    """Label of each region code: airway, then left lung, then right lung win over bone in the body, over body."""
    lut = np.zeros(32, dtype=np.uint8)
    for code in range(32):
        body, bone, airway, left, right = ((code >> b) & 1 for b in range(5))
        lut[code] = (
            _AIRWAY if airway else _LUNG_LEFT if left else _LUNG_RIGHT if right
            else _BONE if bone and body else _BODY if body else 0
        )
    return lut


def _box_and_or(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bitwise AND and OR of each voxel's 3×3×3 neighbourhood (edges copied).

    Bit by bit these are the erosion and the dilation by a one-voxel box, as :func:`_erode` and :func:`_dilate`
    with ``(1, 1, 1)`` give them.
    """
    both = []
    for op in (np.bitwise_and, np.bitwise_or):
        acc = code.copy()
        for ax in range(code.ndim):
            if code.shape[ax] < 2:
                continue
            src = acc.copy()
            head = [slice(None)] * code.ndim
            tail = [slice(None)] * code.ndim
            head[ax], tail[ax] = slice(1, None), slice(None, -1)
            op(acc[tuple(head)], src[tuple(tail)], out=acc[tuple(head)])
            op(acc[tuple(tail)], src[tuple(head)], out=acc[tuple(tail)])
        both.append(acc)
    return both[0], both[1]


def _to_input_grid(
    code: np.ndarray, a: np.ndarray, f: tuple[int, int, int], shape: tuple[int, int, int], *,
    body_min_hu: float, bone_min_hu: float, airway_max_hu: float, lung_max_hu: float,
) -> np.ndarray:
    """Labels on the input grid from the working grid's region code, boundaries re-thresholded on the input HU.

    A region covers the input voxels of its eroded (by one working voxel) blocks as they are, and, within its
    dilated blocks, the input voxels on its side of its threshold (lungs and airway only inside the body). Where a
    block's whole 3×3×3 neighbourhood has one code, its eroded and dilated regions agree and the block takes the
    code's label without looking at the input; only the other blocks (the boundary band) are re-thresholded,
    voxel by voxel.
    """
    lut = _code_labels()
    if f == (1, 1, 1):
        return lut[code]
    and_, or_ = _box_and_or(code)
    band = and_ != or_
    n0, n1, n2 = code.shape
    padded = np.empty((n0 * f[0], n1 * f[1], n2 * f[2]), dtype=np.uint8)
    padded.reshape(n0, f[0], n1, f[1], n2, f[2])[...] = lut[code][:, None, :, None, :, None]
    if not band.any():
        return _crop_to(padded, shape)
    # The input as (block i, block j, block k, i in block, j in block, k in block), a view when the blocks tile it.
    if any(n % fi for n, fi in zip(shape, f)):
        a = np.pad(a, [(0, (-n) % fi) for n, fi in zip(shape, f)], mode="edge")
    st = a.strides
    blocks = np.lib.stride_tricks.as_strided(
        a, shape=(n0, n1, n2, *f), strides=(st[0] * f[0], st[1] * f[1], st[2] * f[2], *st), writeable=False
    )
    where = np.nonzero(band)
    hu = blocks[where].reshape(len(where[0]), -1)  # (band blocks, voxels per block)
    inner, outer = and_[where][:, None], or_[where][:, None]

    def has(bits: np.ndarray, bit: int) -> np.ndarray:
        return (bits & np.uint8(1 << bit)) != 0

    body = has(inner, _BIT_BODY) | (has(outer, _BIT_BODY) & (hu > body_min_hu))
    bone = has(inner, _BIT_BONE) | (has(outer, _BIT_BONE) & (hu > bone_min_hu))
    lab = np.where(body, np.where(bone, np.uint8(_BONE), np.uint8(_BODY)), np.uint8(0))
    taken = np.zeros(hu.shape, dtype=bool)
    for bit, value, max_hu in (
        (_BIT_AIRWAY, _AIRWAY, airway_max_hu), (_BIT_LEFT, _LUNG_LEFT, lung_max_hu),
        (_BIT_RIGHT, _LUNG_RIGHT, lung_max_hu),
    ):
        if not has(outer, bit).any():
            continue
        fine = (has(inner, bit) | (has(outer, bit) & (hu < max_hu) & body)) & ~taken
        lab[fine] = value
        taken |= fine
    padded.reshape(n0, f[0], n1, f[1], n2, f[2]).transpose(0, 2, 4, 1, 3, 5)[where] = lab.reshape(-1, *f)
    return _crop_to(padded, shape)


def _crop_to(padded: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``padded`` cut to ``shape`` from its start, contiguous."""
    if padded.shape == tuple(shape):
        return padded
    return np.ascontiguousarray(padded[: shape[0], : shape[1], : shape[2]])


def ct_basic(volume: Volume, *, config: CtBasicConfig | None = None) -> Volume:
    """Body, left/right lung, airway and bone of a CT from HU rules, morphology and connected components.

    Parameters
    ----------
    volume : Volume, shape (I, J, K)
        A CT in Hounsfield units (modality ``"CT"``, or unset with HU-like values), any orientation and spacing.
    config : CtBasicConfig, optional
        Thresholds and sizes; the defaults are documented in ``docs/classical.md``.

    Returns
    -------
    Volume, shape (I, J, K), uint8
        On the input grid, labelled with :data:`CT_BASIC_LABELS`: 1 body, 2 lung_left, 3 lung_right, 4 airway,
        5 bone; 0 outside the body. Lungs and airway are empty when the scan holds no lung (an abdomen crop).

    Raises
    ------
    ModalityMismatchError
        If the volume is not a CT (e.g. MR), or has no modality and does not hold HU values.
    NotVolumetricError
        If the volume is a single slice.
    """
    cfg = config or CtBasicConfig()
    _check_ct(volume, "ct-basic")
    a = volume.array
    shape = volume.shape
    f = _factors(volume.spacing_mm, cfg.working_spacing_mm)
    spacing = tuple(s * fi for s, fi in zip(volume.spacing_mm, f))
    voxel_ml = volume.voxel_volume_ml * f[0] * f[1] * f[2]
    axial = _axial_axis(volume)
    sup = _superior_sign(volume, axial)
    c_full = _block_mean(a, f)
    log.debug("ct-basic: working grid %s (block %s) from %s", c_full.shape, f, shape)

    body_full = _body(c_full, spacing, axial, cfg)
    # Everything else lies in the body: work in its bounding box, with a margin of background one voxel wider than
    # any morphology radius below, so that the results equal those on the whole working grid.
    r_bone = _radius_vox(cfg.bone_closing_mm, spacing)
    box = bounding_box(body_full, [max(2, ri + 1) for ri in r_bone]) or _WHOLE
    origin = [sl.indices(n)[0] for sl, n in zip(box, c_full.shape)]
    c = c_full[box]
    body = body_full[box]

    # Low density inside the body: lungs, airway, bowel gas. Lung parenchyma is air mixed with tissue; gas is air:
    # a component is lung-like when the median of its interior lies well above the scan's own air.
    low = (c < cfg.lung_max_hu) & body
    low_lab, n_low = connected_components(low)
    keep = np.zeros(n_low + 1, dtype=bool)
    if n_low:
        sizes = np.bincount(low_lab.ravel(), minlength=n_low + 1)
        cand = np.flatnonzero(sizes[1:] * voxel_ml >= cfg.lung_min_ml) + 1
        if len(cand):
            air = _air_level(c_full, body_full, cfg)
            interior_lab = np.where(_erode(low, (1, 1, 1)), low_lab, 0)
            n_inner = np.bincount(interior_lab.ravel(), minlength=n_low + 1)[cand]
            med = np.asarray(_label_medians(c, low_lab, cand), dtype=np.float64)
            has_inner = n_inner > 0
            if has_inner.any():
                med[has_inner] = _label_medians(c, interior_lab, cand[has_inner])
            log.debug("ct-basic: air %.0f HU; candidate interiors %s HU", air, np.round(med).tolist())
            keep[cand[med > air + cfg.lung_min_above_air_hu]] = True
    lungish = keep[low_lab]

    airway, airway_hu = (
        _airway(c, body, lungish, spacing, axial, sup, voxel_ml, cfg, box=box, full_shape=c_full.shape)
        if lungish.any()
        else (np.zeros_like(body), cfg.airway_seed_max_hu)
    )
    lungs = lungish & ~_dilate(airway, (1, 1, 1))
    # Drop crumbs that a one-voxel opening removes, but keep every voxel of a component that survives it: thin
    # lung (the bases and costophrenic recesses on a 3 mm grid) is still lung.
    if lungs.any():
        comp_lab, n_comp = connected_components(lungs)
        survives = np.zeros(n_comp + 1, dtype=bool)
        survives[np.unique(comp_lab[_dilate(_erode(lungs, (1, 1, 1)), (1, 1, 1)) & lungs])] = True
        survives[0] = False
        lungs = survives[comp_lab]
    min_vox = max(1, int(np.ceil(cfg.lung_min_ml / voxel_ml)))
    lung_lab = _split_two(lungs, spacing, min_vox) if lungs.any() else np.zeros(c.shape, dtype=np.int32)

    # Assign each big component to the patient's left or right by its world x (RAS: left is −x).
    lung_left = np.zeros_like(body)
    lung_right = np.zeros_like(body)
    if lung_lab.any():
        coarse_affine = volume.affine.copy()
        coarse_affine[:3, :3] = volume.affine[:3, :3] * np.asarray(f)
        coarse_affine[:3, 3] = volume.world_mm((np.asarray(f) - 1) / 2.0)
        body_x = float(coarse_affine[0, :3] @ _mean_index(body, origin) + coarse_affine[0, 3])
        sizes = np.bincount(lung_lab.ravel())
        for comp_value in np.flatnonzero(sizes >= min_vox):
            if comp_value == 0:
                continue
            comp = lung_lab == comp_value
            x = float(coarse_affine[0, :3] @ _mean_index(comp, origin) + coarse_affine[0, 3])
            if x < body_x:
                lung_left |= comp
            else:
                lung_right |= comp
        lung_left = _fill_holes_in_plane(lung_left, axial)
        lung_right = _fill_holes_in_plane(lung_right, axial) & ~lung_left

    # Bone: dense, inside the body, big enough; marrow filled in-plane.
    dense = (c > cfg.bone_min_hu) & body
    bone_lab, n_bone = connected_components(dense)
    if n_bone:
        bsizes = np.bincount(bone_lab.ravel())
        ok = bsizes * voxel_ml >= cfg.bone_min_ml
        ok[0] = False
        bone = ok[bone_lab]
        bone = _fill_holes_in_plane(_erode(_dilate(bone, r_bone), r_bone), axial)
    else:
        bone = np.zeros_like(body)

    # One byte per working voxel: which of the five regions hold it.
    code = body_full.view(np.uint8).copy()
    inner = code[box]
    for bit, mask in ((_BIT_BONE, bone), (_BIT_AIRWAY, airway), (_BIT_LEFT, lung_left), (_BIT_RIGHT, lung_right)):
        inner |= mask.view(np.uint8) << np.uint8(bit)
    out = _to_input_grid(code, a, f, shape, body_min_hu=cfg.body_min_hu, bone_min_hu=cfg.bone_min_hu,
                         airway_max_hu=airway_hu, lung_max_hu=cfg.lung_max_hu)
    return volume.with_array(out, labels=CT_BASIC_LABELS, modality=volume.modality)
