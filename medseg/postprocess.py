"""Clean-up of label maps: keep the largest component of organs, drop small components, fill holes, drop lesion
components away from their host organ.

Connected components use cc3d (26-connectivity by default); hole filling uses scipy. Every operation works on
each label's bounding box, so cost follows the structure's size, not the scan's.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Literal

import numpy as np

from medseg._masks import bounding_box
from medseg.errors import LabelTableError
from medseg.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from medseg.models.cards import PostprocessSpec

__all__ = ["components_touching", "fill_holes", "largest_component", "postprocess_labels",
           "remove_small_components"]

logger = logging.getLogger(__name__)

Connectivity = Literal[6, 18, 26]


def largest_component(mask: np.ndarray, *, connectivity: Connectivity = 26) -> np.ndarray:
    """The largest connected component of a boolean mask (all False if the mask is empty).

    Parameters
    ----------
    mask : ndarray of bool, shape (I, J, K)
    connectivity : {6, 18, 26}
    """
    import cc3d

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    return np.asarray(cc3d.largest_k(mask, k=1, connectivity=connectivity) > 0)


def remove_small_components(mask: np.ndarray, min_voxels: int, *, connectivity: Connectivity = 26) -> np.ndarray:
    """The mask without components of fewer than ``min_voxels`` voxels.

    Parameters
    ----------
    mask : ndarray of bool, shape (I, J, K)
    min_voxels : int
    """
    import cc3d

    mask = np.asarray(mask, dtype=bool)
    if min_voxels <= 1 or not mask.any():
        return mask.copy()
    return np.asarray(cc3d.dust(mask, threshold=int(min_voxels), connectivity=connectivity, in_place=False))


def components_touching(mask: np.ndarray, other: np.ndarray, *, connectivity: Connectivity = 26) -> np.ndarray:
    """The connected components of ``mask`` that touch ``other``: overlap it or lie next to one of its voxels
    (next = within the ``connectivity`` neighbourhood).

    Parameters
    ----------
    mask, other : ndarray of bool, shape (I, J, K)
    connectivity : {6, 18, 26}
        For the components and for "next to".
    """
    import cc3d
    from scipy.ndimage import binary_dilation, generate_binary_structure

    mask = np.asarray(mask, dtype=bool)
    other = np.asarray(other, dtype=bool)
    if not mask.any() or not other.any():
        return np.zeros_like(mask)
    comps = cc3d.connected_components(mask, connectivity=connectivity)
    near = binary_dilation(other, generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity]))
    touching = np.unique(comps[near & mask])
    return np.isin(comps, touching[touching > 0])


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with its enclosed cavities (background not connected to the outside, 6-connected) filled."""
    from scipy.ndimage import binary_fill_holes

    mask = np.asarray(mask, dtype=bool)
    return np.asarray(binary_fill_holes(mask))


def postprocess_labels(
    labels: Volume,
    spec: PostprocessSpec | None = None,
    *,
    largest_organ_component: bool | None = None,
    min_component_ml: float | None = None,
    fill: bool | None = None,
) -> Volume:
    """Apply the card's post-processing to a label volume.

    For every label: drop connected components smaller than ``min_component_ml`` (mL, from the grid's voxel
    volume; the spec's ``min_component_ml_by_label`` overrides it per label name, and an explicit
    ``min_component_ml`` argument applies to every label); for labels of kind ``organ`` keep only the largest
    component; fill enclosed holes with the label, but only where the hole is background (another label inside,
    e.g. a tumour in an organ, is kept). Then, for each label of the spec's ``lesion_hosts``, drop the components
    that touch none of its host labels as they are after that clean-up (a kidney tumour beside a stray kidney
    fragment goes with it).

    Parameters
    ----------
    labels : Volume, shape (I, J, K), integer, with a label table
    spec : PostprocessSpec, optional
        The card's settings; the keyword arguments override them.

    Returns
    -------
    Volume
        Same grid, dtype and label table.

    Raises
    ------
    LabelTableError
        If ``labels`` has no label table (kinds decide what to keep).
    """
    largest = largest_organ_component if largest_organ_component is not None else bool(spec and spec.largest_component)
    min_ml = min_component_ml if min_component_ml is not None else (spec.min_component_ml if spec else 0.0)
    do_fill = fill if fill is not None else bool(spec and spec.fill_holes)
    by_label = dict(spec.min_component_ml_by_label) if spec and min_component_ml is None else {}
    hosts = dict(spec.lesion_hosts) if spec else {}
    if not (largest or min_ml > 0 or do_fill or any(v > 0 for v in by_label.values()) or hosts):
        return labels
    if labels.labels is None:
        raise LabelTableError("Post-processing needs a label table (which labels are organs); the volume has none.")
    arr = np.array(labels.array, copy=True)
    present = set(np.unique(arr).tolist()) - {0}
    for value, label in labels.labels.items():
        if value not in present:
            continue
        box = bounding_box(arr == value)
        if box is None:
            continue
        sub = arr[box]
        mask = sub == value
        keep = mask
        label_ml = by_label.get(label.name, min_ml)
        min_voxels = math.ceil(label_ml / labels.voxel_volume_ml) if label_ml > 0 else 0
        if min_voxels > 1:
            keep = remove_small_components(keep, min_voxels)
        if largest and label.kind == "organ":
            keep = largest_component(keep)
        removed = mask & ~keep
        sub[removed] = 0
        if do_fill and keep.any():
            filled = fill_holes(keep) & (sub == 0) & ~removed
            sub[filled] = value
        if removed.any():
            logger.debug("label %d (%s): removed %d voxels", value, label.name, int(removed.sum()))
    for name, host_names in hosts.items():
        value = labels.labels.value_of(name)
        box = bounding_box(arr == value, margin=1)
        if box is None:
            continue
        sub = arr[box]
        mask = sub == value
        away = mask & ~components_touching(mask, np.isin(sub, [labels.labels.value_of(h) for h in host_names]))
        if away.any():
            logger.debug("label %d (%s): removed %d voxels away from %s", value, name, int(away.sum()),
                         ", ".join(host_names))
            sub[away] = 0
    return labels.with_array(arr, labels=labels.labels)
