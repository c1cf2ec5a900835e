"""Interactive classical tools the correction widgets call: each a function of a Volume returning a new Volume on
the input's grid. Sizes are given in mm and mL, never voxels.

``region_grow`` / ``confidence_connected``
    seeded region growing within an intensity window (SimpleITK ConnectedThreshold / ConfidenceConnected).
``otsu_in_box``
    Otsu threshold of the voxels inside a box.
``watershed_split``
    splits touching objects of a mask at the necks of their mm distance map.
``remove_islands``
    drops connected components smaller than a volume in mL.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from medseg._masks import connected_components
from medseg.errors import RegionError
from medseg.labels import Label, LabelTable
from medseg.volume import Volume

__all__ = [
    "REGION_LABELS",
    "confidence_connected",
    "otsu_in_box",
    "otsu_threshold_in_box",
    "region_grow",
    "remove_islands",
    "watershed_split",
]

log = logging.getLogger(__name__)

#: Label table of a single-region mask returned by the interactive tools.
REGION_LABELS = LabelTable([Label(1, "region", (255, 200, 0), "organ")])

Connectivity = Literal[6, 18, 26]


def _require_scalar(volume: Volume, operation: str) -> np.ndarray:
    arr = volume.array
    if arr.ndim != 3:
        raise RegionError(
            f"{operation} needs a scalar volume (I, J, K); got array shape {arr.shape}. Pick one channel first, "
            "e.g. volume.with_array(volume.array[..., 0])."
        )
    return arr


def _seed_list(volume: Volume, seed_ijk: Any, operation: str) -> list[tuple[int, int, int]]:
    """Validated integer seeds as a list of (i, j, k)."""
    try:
        seeds = np.asarray(seed_ijk, dtype=np.float64)
    except (TypeError, ValueError):
        raise RegionError(f"{operation}: seed_ijk must be (i, j, k) or a list of (i, j, k), not {seed_ijk!r}.") from None
    if seeds.ndim == 1:
        seeds = seeds[None, :]
    if seeds.ndim != 2 or seeds.shape[1] != 3 or len(seeds) == 0:
        raise RegionError(
            f"{operation}: seed_ijk must be (i, j, k) or a list of (i, j, k) voxel indices, not an array of shape "
            f"{np.asarray(seed_ijk).shape}."
        )
    if not np.all(np.isfinite(seeds)) or not np.all(seeds == np.round(seeds)):
        raise RegionError(f"{operation}: seed indices must be whole numbers, got {seeds.tolist()}.")
    shape = np.asarray(volume.shape)
    for s in seeds:
        if np.any(s < 0) or np.any(s >= shape):
            raise RegionError(
                f"{operation}: seed (i, j, k) = {tuple(int(v) for v in s)} lies outside the volume; valid indices "
                f"are 0..{shape[0] - 1}, 0..{shape[1] - 1}, 0..{shape[2] - 1} ({volume.describe_grid()}). "
                "Convert world positions with volume.voxel_ijk(xyz) and round."
            )
    return [tuple(int(v) for v in s) for s in seeds]  # type: ignore[misc]


def _from_itk_mask(image: Any, volume: Volume) -> Volume:
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return volume.with_array((arr > 0).astype(np.uint8), labels=REGION_LABELS)


def _itk_scalar(arr: np.ndarray) -> Any:
    import SimpleITK as sitk

    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype not in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64):
        arr = arr.astype(np.float32)
    # Index (x, y, z) of the ITK image is (i, j, k) of the array: no geometry is needed for these filters.
    return sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))


def region_grow(
    volume: Volume,
    seed_ijk: Any,
    *,
    lower: float,
    upper: float,
    connectivity: Literal["face", "full"] = "face",
) -> Volume:
    """Voxels connected to the seed(s) whose values lie in ``[lower, upper]`` (SimpleITK ConnectedThreshold).

    Parameters
    ----------
    volume : Volume, shape (I, J, K)
        Scalar image, e.g. a CT in HU.
    seed_ijk : array-like, shape (3,) or (N, 3)
        Voxel index (i, j, k) of one seed, or several seeds.
    lower, upper : float
        Inclusive intensity window in the volume's units (HU for CT).
    connectivity : {"face", "full"}
        Neighbours sharing a face (6) or also an edge or corner (26).

    Returns
    -------
    Volume, shape (I, J, K), uint8
        1 inside the region, on the input grid, labelled with :data:`REGION_LABELS`.

    Raises
    ------
    RegionError
        If a seed is outside the volume, ``lower > upper``, no seed's value lies in the window, or the volume has
        channels.
    """
    import SimpleITK as sitk

    arr = _require_scalar(volume, "region_grow")
    seeds = _seed_list(volume, seed_ijk, "region_grow")
    if not lower <= upper:
        raise RegionError(f"region_grow: lower ({lower:g}) must not exceed upper ({upper:g}).")
    values = [float(arr[s]) for s in seeds]
    if not any(lower <= v <= upper for v in values):
        raise RegionError(
            f"region_grow: no seed lies inside the window [{lower:g}, {upper:g}]; seed values are "
            f"{[round(v, 2) for v in values]}. Widen the window or move the seed."
        )
    conn = (
        sitk.ConnectedThresholdImageFilter.FaceConnectivity
        if connectivity == "face"
        else sitk.ConnectedThresholdImageFilter.FullConnectivity
    )
    out = sitk.ConnectedThreshold(
        _itk_scalar(arr), seedList=seeds, lower=float(lower), upper=float(upper), replaceValue=1, connectivity=conn
    )
    return _from_itk_mask(out, volume)


def confidence_connected(
    volume: Volume,
    seed_ijk: Any,
    *,
    multiplier: float = 2.5,
    iterations: int = 4,
    initial_radius_mm: float = 3.0,
) -> Volume:
    """Region growing whose window is the mean ± ``multiplier`` standard deviations of the region so far.

    The first estimate comes from the voxels within ``initial_radius_mm`` of each seed (an ellipsoid in mm, so
    the same on any spacing); each of ``iterations`` rounds re-estimates mean and standard deviation from the
    grown region (SimpleITK ConfidenceConnected).

    Parameters
    ----------
    volume : Volume, shape (I, J, K)
        Scalar image.
    seed_ijk : array-like, shape (3,) or (N, 3)
        Voxel index (i, j, k) of one seed, or several seeds.
    multiplier : float
        Half-width of the window in standard deviations (> 0).
    iterations : int
        Re-estimation rounds (≥ 0).
    initial_radius_mm : float
        Radius in mm of the neighbourhood that gives the first mean and standard deviation (≥ 0).

    Returns
    -------
    Volume, shape (I, J, K), uint8
        1 inside the region, on the input grid, labelled with :data:`REGION_LABELS`.

    Raises
    ------
    RegionError
        If a seed is outside the volume, a parameter is out of range, or the volume has channels.
    """
    import SimpleITK as sitk

    arr = _require_scalar(volume, "confidence_connected")
    seeds = _seed_list(volume, seed_ijk, "confidence_connected")
    if not multiplier > 0 or iterations < 0 or not initial_radius_mm >= 0:
        raise RegionError(
            "confidence_connected: multiplier must be > 0, iterations ≥ 0 and initial_radius_mm ≥ 0; got "
            f"{multiplier!r}, {iterations!r}, {initial_radius_mm!r}."
        )
    spacing = np.asarray(volume.spacing_mm)
    r = np.floor(initial_radius_mm / spacing + 1e-9).astype(int)
    offsets = np.stack(
        np.meshgrid(*[np.arange(-ri, ri + 1) for ri in r], indexing="ij"), axis=-1
    ).reshape(-1, 3)
    offsets = offsets[np.sum((offsets * spacing) ** 2, axis=1) <= initial_radius_mm**2 + 1e-9]
    shape = np.asarray(volume.shape)
    neighbourhood = np.unique((np.asarray(seeds)[:, None, :] + offsets[None]).reshape(-1, 3), axis=0)
    neighbourhood = neighbourhood[np.all((neighbourhood >= 0) & (neighbourhood < shape), axis=1)]
    out = sitk.ConfidenceConnected(
        _itk_scalar(arr),
        seedList=[tuple(int(v) for v in s) for s in neighbourhood],
        numberOfIterations=int(iterations),
        multiplier=float(multiplier),
        initialNeighborhoodRadius=0,
        replaceValue=1,
    )
    return _from_itk_mask(out, volume)


BoxIJK = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _box_slices(volume: Volume, box_ijk: Any, operation: str) -> tuple[slice, slice, slice]:
    try:
        box = np.asarray(box_ijk, dtype=np.float64)
    except (TypeError, ValueError):
        box = np.zeros(0)
    if box.shape != (3, 2) or not np.all(np.isfinite(box)) or not np.all(box == np.round(box)):
        raise RegionError(
            f"{operation}: box_ijk must be ((i_start, i_stop), (j_start, j_stop), (k_start, k_stop)) in whole "
            f"voxel indices (stop excluded, as in Python slices), not {box_ijk!r}."
        )
    b = box.astype(int)
    for ax, ((start, stop), n, name) in enumerate(zip(b, volume.shape, "ijk")):
        if start < 0 or stop > n:
            raise RegionError(
                f"{operation}: box {name} range [{start}, {stop}) reaches outside the volume (0..{n}); "
                f"the grid is {volume.describe_grid()}."
            )
        if stop <= start:
            raise RegionError(
                f"{operation}: box is empty along {name} ([{start}, {stop}) holds no voxel); give stop > start."
            )
    return tuple(slice(int(s), int(e)) for s, e in b)  # type: ignore[return-value]


def otsu_threshold_in_box(volume: Volume, box_ijk: Any) -> float:
    """Otsu's threshold of the voxel values inside a box, in the volume's units.

    Parameters
    ----------
    volume : Volume, shape (I, J, K)
        Scalar image.
    box_ijk : ((i_start, i_stop), (j_start, j_stop), (k_start, k_stop))
        Voxel index ranges, stop excluded.

    Returns
    -------
    float
        Values above it are the bright class.

    Raises
    ------
    RegionError
        If the box is malformed, empty or outside the volume, or holds a single value.
    """
    from skimage.filters import threshold_otsu

    arr = _require_scalar(volume, "otsu_in_box")
    values = arr[_box_slices(volume, box_ijk, "otsu_in_box")].ravel()
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        raise RegionError(
            f"otsu_in_box: every voxel in the box has the value {lo:g}; Otsu needs two intensity classes. "
            "Draw a box that holds both the object and its background."
        )
    return float(threshold_otsu(values))


def otsu_in_box(volume: Volume, box_ijk: Any, *, foreground: Literal["bright", "dark"] = "bright") -> Volume:
    """Voxels inside a box on the object's side of the box's Otsu threshold.

    Parameters
    ----------
    volume : Volume, shape (I, J, K)
        Scalar image.
    box_ijk : ((i_start, i_stop), (j_start, j_stop), (k_start, k_stop))
        Voxel index ranges, stop excluded; a box one voxel thick works on one slice.
    foreground : {"bright", "dark"}
        Whether the object is above (bright) or at or below (dark) the threshold.

    Returns
    -------
    Volume, shape (I, J, K), uint8
        1 for object voxels inside the box, 0 elsewhere; on the input grid, labelled with :data:`REGION_LABELS`.

    Raises
    ------
    RegionError
        If the box is malformed, empty or outside the volume, or holds a single value.
    """
    if foreground not in ("bright", "dark"):
        raise RegionError(f"otsu_in_box: foreground must be 'bright' or 'dark', not {foreground!r}.")
    threshold = otsu_threshold_in_box(volume, box_ijk)
    sl = _box_slices(volume, box_ijk, "otsu_in_box")
    inside = volume.array[sl]
    out = np.zeros(volume.shape, dtype=np.uint8)
    out[sl] = (inside > threshold) if foreground == "bright" else (inside <= threshold)
    log.debug("otsu_in_box: threshold %.4g, %d voxels", threshold, int(out.sum()))
    return volume.with_array(out, labels=REGION_LABELS)


def _mask_of(mask_volume: Volume, operation: str) -> np.ndarray:
    arr = _require_scalar(mask_volume, operation)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise RegionError(
            f"{operation} needs a mask or label volume of integers or booleans; got dtype {arr.dtype}. "
            "Threshold it first, e.g. volume.with_array((volume.array > 0.5).astype('uint8'))."
        )
    return arr


def watershed_split(mask_volume: Volume, *, min_distance_mm: float) -> Volume:
    """Split touching objects of a mask into instances at the necks of its distance map.

    The distance to the background is measured in mm with the volume's (anisotropic) spacing; its local maxima
    that are the highest within ``min_distance_mm`` become markers (adjacent maxima of a plateau are one
    marker), and a watershed of the negated distance grows them back to fill the mask (scikit-image).

    Parameters
    ----------
    mask_volume : Volume, shape (I, J, K)
        Mask or label map; every non-zero voxel is foreground.
    min_distance_mm : float
        Two object centres closer than this stay one object (> 0). About the radius of the smallest object to
        keep separate.

    Returns
    -------
    Volume, shape (I, J, K), uint16
        Instances numbered 1..N on the input grid, labelled ``lesion_1``..``lesion_N`` (kind "lesion"); N = 0
        for an empty mask.

    Raises
    ------
    RegionError
        If ``min_distance_mm`` is not positive, the volume is not an integer/boolean mask, or N > 65535.
    """
    import scipy.ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    if not min_distance_mm > 0:
        raise RegionError(f"watershed_split: min_distance_mm must be > 0, not {min_distance_mm!r}.")
    mask = _mask_of(mask_volume, "watershed_split") != 0
    if not mask.any():
        return mask_volume.with_array(np.zeros(mask.shape, dtype=np.uint16), labels=LabelTable([]))
    spacing = np.asarray(mask_volume.spacing_mm)
    dist = ndi.distance_transform_edt(mask, sampling=spacing)
    r = np.floor(min_distance_mm / spacing + 1e-9).astype(int)
    grid = np.ogrid[tuple(slice(-ri, ri + 1) for ri in r)]
    footprint = sum((g * s) ** 2 for g, s in zip(grid, spacing)) <= min_distance_mm**2 + 1e-9
    comps, n_comps = connected_components(mask)
    peaks = peak_local_max(dist, footprint=np.asarray(footprint), labels=comps, exclude_border=False)
    peak_mask = np.zeros(mask.shape, dtype=bool)
    peak_mask[tuple(peaks.T)] = True
    # A component without a peak (cannot happen with a finite footprint, but cheap to guarantee) gets its maximum.
    have = np.zeros(n_comps + 1, dtype=bool)
    have[comps[peak_mask]] = True
    for c in np.flatnonzero(~have[1:]) + 1:
        idx = np.argmax(np.where(comps == c, dist, -1.0))
        peak_mask[np.unravel_index(idx, mask.shape)] = True
    markers, n = connected_components(peak_mask)
    if n > 65535:
        raise RegionError(f"watershed_split: {n} instances is more than a uint16 label map holds; raise min_distance_mm.")
    split = watershed(-dist, markers, mask=mask)
    # Number instances 1..N in order of first appearance along the array.
    present = np.unique(split[split > 0])
    lut = np.zeros(int(split.max()) + 1, dtype=np.uint16)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.uint16)
    out = lut[split]
    table = LabelTable.from_names({v: f"lesion_{v}" for v in range(1, len(present) + 1)},
                                  lesions=[f"lesion_{v}" for v in range(1, len(present) + 1)])
    return mask_volume.with_array(out, labels=table)


def remove_islands(mask_volume: Volume, *, min_ml: float, connectivity: Connectivity = 26) -> Volume:
    """Drop connected components smaller than ``min_ml`` mL, label by label.

    Parameters
    ----------
    mask_volume : Volume, shape (I, J, K)
        Mask or label map (integers or booleans); each label value is cleaned on its own.
    min_ml : float
        Components with a volume below this (voxel count × voxel volume) become background (≥ 0).
    connectivity : {6, 18, 26}
        Voxel neighbourhood that makes a component.

    Returns
    -------
    Volume, shape (I, J, K)
        Same dtype, labels and grid as the input, with the small components set to 0.

    Raises
    ------
    RegionError
        If ``min_ml`` is negative, ``connectivity`` is not 6, 18 or 26, or the volume is not an integer mask.
    """
    import cc3d

    if not min_ml >= 0:
        raise RegionError(f"remove_islands: min_ml must be ≥ 0, not {min_ml!r}.")
    if connectivity not in (6, 18, 26):
        raise RegionError(f"remove_islands: connectivity must be 6, 18 or 26, not {connectivity!r}.")
    arr = _mask_of(mask_volume, "remove_islands")
    work = arr.astype(np.uint8) if arr.dtype == np.bool_ else arr
    lab, n = cc3d.connected_components(work, connectivity=connectivity, return_N=True)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    small = sizes * mask_volume.voxel_volume_ml < min_ml
    small[0] = False
    out = arr.copy()
    out[small[lab]] = 0
    return mask_volume.with_array(out, labels=mask_volume.labels, modality=mask_volume.modality)
