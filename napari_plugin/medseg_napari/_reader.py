"""The napari reader: DICOM folders and files, DICOM SEG, NIfTI, NRRD and MetaImage through medseg.io.

``napari_get_reader`` answers None for anything :func:`medseg.io.detect_format` does not name and never raises;
a file that medseg cannot read after all (corrupt, inconsistent series) gives a napari notification.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError

__all__ = ["napari_get_reader", "read_medseg", "volume_layers"]

log = logging.getLogger(__name__)

LayerData = tuple[Any, ...]
#: napari's "read fine, no layers" answer (so that no other reader is tried after a notification).
_NOTHING: list[LayerData] = [(None,)]


def napari_get_reader(path: str | list[str]) -> Any:
    """The medseg reader function for ``path``, or None when medseg does not read it."""
    from medseg.io import detect_format

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(detect_format(p) is None for p in paths):
        return None
    return read_medseg


def _is_label_map(volume: Any) -> bool:
    """Labels: a medseg sidecar, or unsigned 8/16-bit integers with at most 256 distinct values (as label files
    are; CT is signed and MR holds many values)."""
    if volume.labels is not None:
        return True
    arr = volume.array
    if arr.ndim != 3 or arr.dtype not in (np.uint8, np.uint16) or (volume.modality or "").upper() in ("CT", "MR"):
        return False
    return bool(np.count_nonzero(np.bincount(arr.ravel())) <= 256)


def volume_layers(volume: Any, name: str) -> list[LayerData]:
    """Layer-data tuples of one loaded volume (Image or Labels), with a notification for oblique grids."""
    from medseg.display import oblique_angle_deg
    from medseg_napari._layers import image_layer_data, labels_layer_data

    angle = oblique_angle_deg(volume.affine)
    if angle > 0.01:
        _notify_info(f"{name}: the scan is oblique by {angle:.1f}° and is shown on the nearest axis-aligned grid "
                     "(rotated about its centre); segmentation, statistics and export use its exact grid.")
    if _is_label_map(volume):
        return [labels_layer_data(volume, name)]
    return [image_layer_data(volume, name)]


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def _read_one(path: Path) -> list[LayerData]:
    from medseg.io import detect_format, list_series, load_volume
    from medseg_napari._layers import labels_layer_data

    kind = detect_format(path)
    if kind == "dicom-folder":
        layers: list[LayerData] = []
        series = list_series(path)
        if not series:
            _notify_error(f"{path}: no DICOM image series in this folder (DICOM SEG and reports are not images).")
        for info in series:
            label = info.description or info.modality or path.name
            if info.series_number is not None:
                label = f"{label} #{info.series_number}"  # the series number radiologists call it by
            name = f"{label} ({info.n_slices} slices)" if len(series) == 1 else f"{label} [{info.key[-8:]}]"
            try:
                volume = load_volume(path, series_uid=info.key if len(series) > 1 else None)
            except MedsegError as exc:
                _notify_error(str(exc))
                continue
            layers += volume_layers(volume, name)
        return layers
    if kind == "dicom-seg":
        from medseg.io import load_segmentation

        seg = load_segmentation(path)  # on the SEG's own frame grid: it overlays its scan by world position
        return [labels_layer_data(seg, path.stem)]
    volume = load_volume(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return volume_layers(volume, name)


def read_medseg(path: str | list[str]) -> list[LayerData]:
    """Layers of every path (napari reader function); errors become notifications, never exceptions."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        try:
            layers += _read_one(Path(p))
        except MedsegError as exc:
            _notify_error(str(exc))
        except Exception as exc:
            log.exception("medseg reader failed on a file")
            _notify_error(f"{p}: could not be read ({type(exc).__name__}: {exc}).")
    return layers or _NOTHING
