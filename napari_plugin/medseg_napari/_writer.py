"""The napari writer: a Labels layer to NIfTI / NRRD / MetaImage (+ label table sidecar) or DICOM SEG, always on
the source grid of the scan it was made from (from the layer's medseg metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DicomWriteError, GeometryError

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
        For other suffixes, or DICOM SEG when the source is not DICOM (and what the SEG writer raises).
    """
    from medseg.io import save_volume
    from medseg.labels import sidecar_path

    volume = labels_volume_from_attributes(data, attributes)
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        model = (attributes.get("metadata") or {}).get("medseg", {}).get("model")
        return [str(write_seg(volume, p, model=model))]
    save_volume(volume, p)
    written = [str(p)]
    if volume.labels is not None:
        written.append(str(sidecar_path(p)))
    return written


def write_seg(volume: Any, path: Path, *, source: Any = None, model: Any = None,
              algorithm_type: str = "SEMIAUTOMATIC") -> Path:
    """DICOM SEG of a label volume whose source is a DICOM series, read back and checked before returning.

    Parameters
    ----------
    volume : Volume
        Labels on the source grid, with their label table and the source's references.
    path : Path
        The SEG file to write.
    source : Volume, optional
        The DICOM scan (default: the folder of the files the labels' source references name).
    model : mapping, optional
        ``{"name", "version", "weights_sha256"}`` of the model that proposed the labels (default: the review tool).
    algorithm_type : str
        SEMIAUTOMATIC: a model's proposal edited by a person.

    Raises
    ------
    DicomWriteError
        If the source is not DICOM.
    MedsegError
        What :func:`medseg.io.write_dicom_seg` raises (blank source UIDs, labels without a coded concept, ...).
    GeometryError
        If the written SEG does not read back identical on the source grid.
    """
    import medseg
    from medseg.io import load_segmentation, write_dicom_seg
    from medseg.io.dicom_seg import SegAlgorithm

    refs = volume.source
    if refs is None or not refs.files or not refs.sop_instance_uids:
        raise DicomWriteError(
            f"{path}: DICOM SEG needs a DICOM source series; these labels were made on a non-DICOM scan. "
            "Write NIfTI (.nii.gz) instead."
        )
    if source is None:
        source = Path(refs.files[0]).parent
    if model:
        algorithm = SegAlgorithm(str(model["name"]), str(model["version"]), model.get("weights_sha256"))
    else:
        algorithm = SegAlgorithm("medseg napari review", medseg.__version__)
    written = Path(write_dicom_seg(volume, source, path, algorithm=algorithm, algorithm_type=algorithm_type))  # type: ignore[arg-type]
    back = load_segmentation(written, reference=volume)
    if not np.array_equal(back.array, volume.array):
        raise GeometryError(f"{written}: the DICOM SEG reads back different from the labels; do not use it.")
    return written
