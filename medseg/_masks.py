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
