"""Small array helpers shared by the label tools (post-processing, metrics, classical models)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel of ``mask``, grown by ``margin`` voxels per axis and
    clipped to the array; None when ``mask`` has no True voxel.

    Parameters
    ----------
    mask : numpy.ndarray of bool, any number of dimensions
    margin : int or sequence of int
        Voxels added on both sides, one number for every axis or one per axis.
    """
    grow = [int(margin)] * mask.ndim if isinstance(margin, (int, np.integer)) else [int(m) for m in margin]
    box = []
    for ax, r in enumerate(grow):
        hit = np.flatnonzero(mask.any(axis=tuple(d for d in range(mask.ndim) if d != ax)))
        if len(hit) == 0:
            return None
        box.append(slice(max(0, int(hit[0]) - r), min(mask.shape[ax], int(hit[-1]) + 1 + r)))
    return tuple(box)


def connected_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a boolean array (cc3d): the component index per voxel (0 = background) and the
    number of components. ``connectivity`` is 6, 18 or 26 in 3D (4 or 8 in 2D)."""
    import cc3d

    lab, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)  # type: ignore[call-overload]
    return np.asarray(lab), int(n)
