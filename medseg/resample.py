"""Putting one volume on another's grid: exact reorientation when the grids share their voxel centres,
interpolation (SimpleITK) otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from medseg.errors import GeometryError
from medseg.volume import GRID_ATOL_MM, Volume

__all__ = ["Interpolation", "as_orientation", "reorient_to", "resample_to", "stack_channels"]

Interpolation = Literal["nearest", "linear", "bspline"]


def _axis_map(moving: Volume, reference: Volume, atol_mm: float) -> tuple[list[int], list[bool]] | None:
    """How reference axes map to moving axes when both grids hold the same voxel centres, else None."""
    if sorted(moving.shape) != sorted(reference.shape):
        return None
    perm: list[int] = []
    flips: list[bool] = []
    for ax in range(3):
        col = reference.affine[:3, ax]
        for m_ax in range(3):
            if m_ax in perm or moving.shape[m_ax] != reference.shape[ax]:
                continue
            mcol = moving.affine[:3, m_ax]
            if np.allclose(col, mcol, atol=atol_mm / max(reference.shape)):
                perm.append(m_ax)
                flips.append(False)
                break
            if np.allclose(col, -mcol, atol=atol_mm / max(reference.shape)):
                perm.append(m_ax)
                flips.append(True)
                break
        else:
            return None
    return perm, flips


def reorient_to(moving: Volume, reference: Volume, *, atol_mm: float = GRID_ATOL_MM) -> Volume | None:
    """``moving`` on ``reference``'s grid by axis permutation and flips only (exact), or None if that is not enough.

    The result has the reference's affine and the moving volume's values, labels and modality.
    """
    mapping = _axis_map(moving, reference, atol_mm)
    if mapping is None:
        return None
    perm, flips = mapping
    arr = moving.array
    extra = list(range(3, arr.ndim))
    arr = arr.transpose(perm + extra)
    for ax, flip in enumerate(flips):
        if flip:
            arr = np.flip(arr, axis=ax)
    candidate = Volume(arr, reference.affine, modality=moving.modality, labels=moving.labels, source=moving.source)
    # Check the corner voxel lands where it did: same world position of voxel (0, 0, 0) and the far corner.
    corner = np.array([[0, 0, 0], np.array(reference.shape) - 1], dtype=float)
    moved_idx = corner.copy()
    for ax in range(3):
        m_ax = perm[ax]
        src = corner[:, ax] if not flips[ax] else (reference.shape[ax] - 1 - corner[:, ax])
        moved_idx[:, m_ax] = src
    if not np.allclose(moving.world_mm(moved_idx), reference.world_mm(corner), atol=atol_mm):
        return None
    return candidate


def resample_to(
    moving: Volume,
    reference: Volume,
    *,
    interpolation: Interpolation = "linear",
    default_value: float = 0.0,
    atol_mm: float = GRID_ATOL_MM,
) -> Volume:
    """``moving`` on ``reference``'s voxel grid.

    When the two grids hold the same voxel centres (only axis order or direction differ), the result is an exact
    reordering of the voxels, whatever ``interpolation`` says. Otherwise SimpleITK resamples in world space.

    Parameters
    ----------
    moving, reference : Volume
    interpolation : {"nearest", "linear", "bspline"}
        Use "nearest" for label maps (it is forced when ``moving.labels`` is set).
    default_value : float
        Value of reference voxels outside the moving volume.

    Raises
    ------
    GeometryError
        If ``moving`` has channels and the grids differ by more than a reorientation.
    """
    if moving.same_grid(reference, atol_mm=atol_mm):
        return Volume(moving.array, reference.affine, modality=moving.modality, labels=moving.labels,
                      source=moving.source)
    exact = reorient_to(moving, reference, atol_mm=atol_mm)
    if exact is not None:
        return exact
    if moving.array.ndim != 3:
        raise GeometryError("Interpolating multi-channel volumes is not supported; resample each channel.")
    import SimpleITK as sitk

    if moving.labels is not None:
        interpolation = "nearest"
    interp = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}[interpolation]
    src = moving.to_sitk()
    ref = Volume(np.zeros(reference.shape, dtype=np.uint8), reference.affine).to_sitk()
    pixel = src.GetPixelID() if interpolation == "nearest" else sitk.sitkFloat32
    out = sitk.Resample(src, ref, sitk.Transform(), interp, float(default_value), pixel)
    result = Volume.from_sitk(out, modality=moving.modality)
    return Volume(result.array, reference.affine, modality=moving.modality, labels=moving.labels)


def as_orientation(volume: Volume, code: str = "RAS") -> Volume:
    """The same voxels with axes reordered/flipped so the orientation code is ``code`` (e.g. "RAS", "LPS").

    Exact (no interpolation). Oblique volumes get the closest axis-aligned code.

    Raises
    ------
    GeometryError
        If ``code`` is not three letters naming each of the L/R, A/P, S/I axes once.
    """
    import nibabel.orientations as nio

    code = code.upper()
    if len(code) != 3 or sorted(nio.axcodes2ornt(code, labels=None)[:, 0].tolist()) != [0, 1, 2]:
        raise GeometryError(f"Orientation code must name each axis once, like 'RAS' or 'LPS', not {code!r}.")
    start = nio.io_orientation(volume.affine)
    end = nio.axcodes2ornt(code)
    transform = nio.ornt_transform(start, end)
    arr = nio.apply_orientation(volume.array, transform)
    affine = volume.affine @ nio.inv_ornt_aff(transform, volume.shape)
    return Volume(arr, affine, modality=volume.modality, labels=volume.labels, source=volume.source)


def stack_channels(
    volumes: Sequence[Volume], *, reference: Volume | None = None, interpolation: Interpolation = "linear"
) -> Volume:
    """Several scans of one patient as one multi-channel Volume on one grid (the first scan's by default).

    Parameters
    ----------
    volumes : sequence of Volume, each shape (I, J, K)
        The channels in order; each is resampled onto the reference grid (an exact reordering when the grids
        share voxel centres, else ``interpolation``, zero outside).
    reference : Volume, optional
        The grid of the result (default: ``volumes[0]``).

    Returns
    -------
    Volume, shape (I, J, K, C), float32
        On the reference grid, with its modality and source.

    Raises
    ------
    GeometryError
        If no volume is given, or one already has channels.
    """
    if not volumes:
        raise GeometryError("stack_channels needs at least one volume.")
    first = volumes[0] if reference is None else reference
    arrays = []
    for n, v in enumerate(volumes):
        if v.array.ndim != 3:
            raise GeometryError(f"channel {n} has shape {v.array.shape}; give one 3D scan per channel.")
        on_grid = v if v is first else resample_to(v, first, interpolation=interpolation)
        arrays.append(np.asarray(on_grid.array, dtype=np.float32))
    return Volume(np.stack(arrays, axis=-1), first.affine, modality=first.modality, source=first.source)
