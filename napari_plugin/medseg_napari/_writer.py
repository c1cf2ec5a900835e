"""The napari writer: a Labels layer to NIfTI / NRRD / MetaImage (+ label table sidecar) or DICOM SEG, always on
the source grid of the scan it was made from (from the layer's medseg metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.errors import DicomWriteError, GeometryError, UnsupportedFormatError

__all__ = ["labels_volume_from_attributes", "write_labels"]


def labels_volume_from_attributes(data: Any, attributes: dict[str, Any]) -> Any:
    """The label Volume on its source grid from a layer's data and napari attributes."""
    from medseg.display import METADATA_KEY, table_from_features, volume_from_layer

    metadata = attributes.get("metadata") or {}
    if METADATA_KEY not in metadata:
        raise GeometryError(
            f"Labels layer {attributes.get('name')!r} has no medseg geometry (it was not opened or made by medseg), "
            "so its grid in the patient is unknown. Make it with the medseg Segment widget or open it with medseg."
        )
    features = attributes.get("features")
    table = None
    if features is not None and "index" in features and "name" in features:
        cols = {c: list(features[c]) for c in features}
        colormap = attributes.get("colormap")
        table = table_from_features(cols, getattr(colormap, "color_dict", None))
    return volume_from_layer(data, metadata, labels=table, modality="SEG")


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one Labels layer (napari single-layer writer). Returns the written paths.

    Raises
    ------
    GeometryError
        If the layer carries no medseg geometry.
    UnsupportedFormatError, DicomWriteError
        For other suffixes, or DICOM SEG when the source is not DICOM or this build cannot write SEG yet.
    """
    from medseg.io import save_volume
    from medseg.labels import sidecar_path

    volume = labels_volume_from_attributes(data, attributes)
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return [str(write_seg(volume, p))]
    save_volume(volume, p)
    written = [str(p)]
    if volume.labels is not None:
        written.append(str(sidecar_path(p)))
    return written


def write_seg(volume: Any, path: Path, *, algorithm_type: str = "SEMIAUTOMATIC") -> Path:
    """DICOM SEG of a label volume whose source is a DICOM series.

    Raises
    ------
    DicomWriteError
        If the source is not DICOM or this medseg build has no DICOM SEG writer yet.
    """
    source = volume.source
    if source is None or not source.files or not source.sop_instance_uids:
        raise DicomWriteError(
            f"{path}: DICOM SEG needs a DICOM source series; these labels were made on a non-DICOM scan. "
            "Write NIfTI (.nii.gz) instead."
        )
    try:
        import medseg.io as mio

        write_dicom_seg = mio.write_dicom_seg  # type: ignore[attr-defined]
    except AttributeError:
        raise UnsupportedFormatError(
            f"{path}: this medseg build has no DICOM SEG writer yet (medseg.io.write_dicom_seg); nothing was written. "
            "Write NIfTI (.nii.gz) for now."
        ) from None
    series_folder = Path(source.files[0]).parent
    return Path(write_dicom_seg(volume, series_folder, path, algorithm_type=algorithm_type))
