"""napari layers from medseg volumes (geometry from :mod:`medseg.display`) and the reviewable Labels layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from napari.layers import Labels
from napari.utils.colormaps import DirectLabelColormap

from medseg import Volume
from medseg.display import (
    METADATA_KEY,
    label_colors,
    label_features,
    layer_geometry,
    table_from_features,
    volume_from_layer,
    window_limits,
)
from medseg.io.volume_io import label_dtype
from medseg.labels import LabelTable

__all__ = [
    "ReviewLabels",
    "atom_changes",
    "image_layer_data",
    "labels_kwargs",
    "labels_layer_data",
    "layer_table",
    "layer_volume",
    "looks_like_ct",
]

# napari 0.9.2's Labels history (read in its source; tests/test_napari_review.py pins the behaviour):
# one undo item = a list of atoms, each a _MaskedPaintAtom(slice_key, mask, old_values, new_value) or a
# (indices, old_values, new_values) tuple from data_setitem.


def _atom_index(atom: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, Any]:
    """Flat voxel indices of a history atom, their values before it, and its value(s) after it."""
    if hasattr(atom, "slice_key"):
        grid = np.indices([s.stop - s.start for s in atom.slice_key], sparse=False)
        idx = tuple(g + s.start for g, s in zip(grid, atom.slice_key, strict=True))
        if atom.mask is None:  # the whole box changed; old_values is a snapshot of the box
            flat = np.ravel_multi_index(tuple(i.ravel() for i in idx), shape)
            return flat, np.asarray(atom.old_values).ravel(), atom.new_value
        flat = np.ravel_multi_index(tuple(i[atom.mask] for i in idx), shape)
        return flat, np.asarray(atom.old_values).ravel(), atom.new_value
    indices, old, new = atom
    flat = np.ravel_multi_index(tuple(np.asarray(i).ravel() for i in indices), shape)
    return flat, np.asarray(old).ravel(), new


def atom_changes(atoms: list[Any], shape: tuple[int, ...], action: str = "apply"
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(flat indices, old values, new values) of each atom of one history item, in the order they apply.

    ``action`` "apply": a paint event's item, applied first to last (before → after). "undo" and "redo": an item
    as it sits at the end of the undo or redo history, which napari replays last to first (undo: after → before;
    redo: before → after, the redo history holding items reversed).
    """
    seq = atoms if action == "apply" else list(reversed(atoms))
    for atom in seq:
        flat, before, after = _atom_index(atom, shape)
        after_arr = np.broadcast_to(np.asarray(after), flat.shape)
        if action == "undo":
            yield flat, after_arr, before
        else:
            yield flat, before, after_arr


class ReviewLabels(Labels):
    """A Labels layer whose undo and redo tell listeners what they changed, and which protects locked labels.

    napari replays undo/redo without a paint event; this layer calls ``history_listeners`` with
    ``(action, atoms)`` ("undo" or "redo") before replaying an item. Painting, filling and polygons never
    overwrite a value in ``locked_labels``.
    """

    def __init__(self, data: Any, **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.locked_labels: set[int] = set()
        self.history_listeners: list[Callable[[str, list[Any]], None]] = []

    def _notify(self, action: str, history: Any) -> None:
        if history:
            item = list(history[-1])
            for listener in list(self.history_listeners):
                listener(action, item)

    def undo(self) -> None:
        self._notify("undo", self._undo_history)
        super().undo()

    def redo(self) -> None:
        self._notify("redo", self._redo_history)
        super().redo()

    def _apply_mask_to_data(self, data: np.ndarray, mask: np.ndarray, new_label: int,
                            volume_slice: tuple[slice, ...]) -> np.ndarray | None:
        if self.locked_labels:
            mask = np.asarray(mask) & ~np.isin(data, list(self.locked_labels))
        return super()._apply_mask_to_data(data, mask, new_label, volume_slice)  # type: ignore[no-any-return]

    def reset_history(self) -> None:
        """Forget undo and redo (after the data was replaced as a whole)."""
        self._reset_history()


def labels_kwargs(table: LabelTable | None, values: Any = (), hidden: Any = ()) -> dict[str, Any]:
    """``colormap`` and ``features`` of a Labels layer for a label table."""
    return {
        "colormap": DirectLabelColormap(color_dict=label_colors(table, hidden=hidden, values=values)),
        "features": label_features(table),
    }


def image_layer_data(volume: Volume, name: str) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari layer-data tuple for a scan (CT in the soft-tissue window)."""
    g = layer_geometry(volume)
    kwargs = g.kwargs(name=name, colormap="gray")
    if looks_like_ct(volume):
        kwargs["contrast_limits"] = window_limits("soft tissue")
    return g.data, kwargs, "image"


def looks_like_ct(volume: Volume) -> bool:
    """CT by its modality, or (formats without one: NIfTI, NRRD, MHA) by air at about -1000 HU in its values.

    Used for the display window only; the volume's modality stays as stored.
    """
    modality = (volume.modality or "").upper()
    if modality:
        return modality == "CT"
    sample = np.asarray(volume.array).ravel()[:: max(1, volume.array.size // 200_000)]
    return bool(sample.size and -1100 <= float(sample.min()) <= -900 and float(sample.max()) <= 4100)


def labels_layer_data(volume: Volume, name: str) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari layer-data tuple for a label map: an editable contiguous copy, with names and colours."""
    g = layer_geometry(volume)
    data = np.ascontiguousarray(g.data, dtype=label_dtype(g.data))
    present = np.flatnonzero(np.bincount(data.ravel())) if data.dtype == np.uint8 else np.unique(data)
    kwargs = g.kwargs(name=name, **labels_kwargs(volume.labels, values=present))
    return data, kwargs, "labels"


def layer_table(layer: Any) -> LabelTable | None:
    """The label table of a Labels layer made by medseg (None when its features carry no names)."""
    features = getattr(layer, "features", None)
    if features is None or "index" not in features or "name" not in features:
        return None
    cols = {c: list(features[c]) for c in features.columns}
    colours = getattr(layer.colormap, "color_dict", None)
    return table_from_features(cols, colours)


def layer_volume(layer: Any, *, labels: bool = False) -> Volume:
    """The exact source-grid Volume of a medseg layer (labels: with the layer's label table)."""
    if METADATA_KEY not in layer.metadata:
        from medseg.errors import GeometryError

        raise GeometryError(
            f"Layer {layer.name!r} was not opened by medseg (no geometry in its metadata); open the file with "
            "File > Open with Plugin > medseg."
        )
    if labels:
        return volume_from_layer(layer.data, layer.metadata, labels=layer_table(layer), modality="SEG")
    return volume_from_layer(layer.data, layer.metadata)
