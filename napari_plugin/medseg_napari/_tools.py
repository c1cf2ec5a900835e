"""Correction tools on a Labels layer's data: each calls a medseg function and returns the change it proposes.

A :class:`ToolChange` lists the voxels (display-order flat indices) that get the label and those that lose it;
:func:`apply_change` writes it into the layer as one undoable step. Locked labels are never overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg import Volume
from medseg.display import METADATA_KEY

__all__ = [
    "ToolChange",
    "apply_change",
    "display_volume",
    "grow_region",
    "keep_largest",
    "otsu_box",
    "remove_small_islands",
    "split_lesions",
]


@dataclass(frozen=True)
class ToolChange:
    """What a tool would change: ``add`` voxels get ``label``, ``remove`` voxels of ``label`` become 0."""

    tool: str
    label: int
    add: np.ndarray
    remove: np.ndarray

    @property
    def voxels(self) -> int:
        return int(self.add.size + self.remove.size)


def display_volume(data: np.ndarray, metadata: Mapping[str, Any], *, modality: str | None = None) -> Volume:
    """A layer's data as a Volume in its display axis order, on its exact affine (a view, no copy)."""
    info = metadata[METADATA_KEY]
    return Volume(np.asarray(data).transpose(2, 1, 0), info["display_affine"], modality=modality)


def _flat(mask_display: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask_display.ravel())


def _unlocked(labels: np.ndarray, locked: Iterable[int]) -> np.ndarray:
    locked = list(locked)
    return ~np.isin(labels, locked) if locked else np.ones(labels.shape, bool)


def grow_region(image: np.ndarray, labels: np.ndarray, metadata: Mapping[str, Any], seed_data: Any, *, label: int,
                lower: float, upper: float, locked: Iterable[int] = ()) -> ToolChange:
    """Add the region grown from ``seed_data`` (display data index) within [lower, upper] (medseg.classical.region_grow)."""
    from medseg.classical import region_grow

    seed = tuple(round(float(c)) for c in np.asarray(seed_data)[::-1])  # (k', j', i') → (i', j', k')
    grown = region_grow(display_volume(image, metadata), seed, lower=lower, upper=upper).array.transpose(2, 1, 0)
    add = (grown > 0) & (labels != label) & _unlocked(labels, locked)
    return ToolChange("region_grow", label, _flat(add), np.empty(0, np.int64))


def otsu_box(image: np.ndarray, labels: np.ndarray, metadata: Mapping[str, Any], box_data: Any, *, label: int,
             foreground: str = "bright", locked: Iterable[int] = ()) -> ToolChange:
    """Add the Otsu foreground of a box ((start, stop) per display data axis) (medseg.classical.otsu_in_box)."""
    from medseg.classical import otsu_in_box

    box = [tuple(int(v) for v in b) for b in box_data][::-1]
    mask = otsu_in_box(display_volume(image, metadata), box, foreground=foreground).array.transpose(2, 1, 0)  # type: ignore[arg-type]
    add = (mask > 0) & (labels != label) & _unlocked(labels, locked)
    return ToolChange("otsu_in_box", label, _flat(add), np.empty(0, np.int64))


def _label_volume(labels: np.ndarray, metadata: Mapping[str, Any], label: int) -> Volume:
    return display_volume((labels == label).astype(np.uint8), metadata)


def remove_small_islands(labels: np.ndarray, metadata: Mapping[str, Any], *, label: int, min_ml: float) -> ToolChange:
    """Remove components of ``label`` smaller than ``min_ml`` (medseg.classical.remove_islands)."""
    from medseg.classical import remove_islands

    kept = remove_islands(_label_volume(labels, metadata, label), min_ml=min_ml).array.transpose(2, 1, 0)
    return ToolChange("remove_islands", label, np.empty(0, np.int64), _flat((labels == label) & (kept == 0)))


def keep_largest(labels: np.ndarray, metadata: Mapping[str, Any], *, label: int) -> ToolChange:
    """Keep only the largest 26-connected component of ``label`` (medseg.postprocess.largest_component)."""
    from medseg.postprocess import largest_component

    mask = labels == label
    kept = largest_component(mask)
    return ToolChange("keep_largest", label, np.empty(0, np.int64), _flat(mask & ~kept))


def split_lesions(labels: np.ndarray, metadata: Mapping[str, Any], *, label: int, min_distance_mm: float
                  ) -> ToolChange:
    """Split touching lesions of ``label`` (medseg.classical.watershed_split) by clearing the seams between them
    (medseg.review.instance_seams)."""
    from medseg.classical import watershed_split
    from medseg.review import instance_seams

    split = watershed_split(_label_volume(labels, metadata, label), min_distance_mm=min_distance_mm)
    seams = instance_seams(split.array.transpose(2, 1, 0))
    return ToolChange("watershed_split", label, np.empty(0, np.int64), _flat(seams))


def apply_change(layer: Any, change: ToolChange) -> None:
    """Write a tool's change into a Labels layer as one undoable step (one paint event)."""
    if change.voxels == 0:
        return
    flat = np.concatenate([change.add, change.remove]).astype(np.int64)
    values = np.concatenate([np.full(change.add.size, change.label), np.zeros(change.remove.size)])
    index = np.unravel_index(flat, layer.data.shape)
    with layer.block_history():
        layer.data_setitem(index, values.astype(layer.data.dtype))
