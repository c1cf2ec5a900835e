"""``load_volume`` and ``save_volume``: one entry point per direction for every format medseg handles."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import (
    GeometryError,
    LabelTableError,
    MedsegError,
    MultipleVolumesError,
    OptionError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from medseg.files import atomic_path
from medseg.labels import LabelTable, sidecar_path
from medseg.volume import SourceReferences, Volume

__all__ = ["FORMAT_NAMES", "READ_FORMATS", "WRITE_SUFFIXES", "detect_format", "label_dtype", "load_volume", "save_volume"]

log = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")
_ITK = (".nrrd", ".nhdr", ".mha", ".mhd")
READ_FORMATS = (
    "a folder of DICOM files (any names, subfolders included)",
    "a single DICOM file (.dcm or no extension; enhanced multi-frame included)",
    "DICOM SEG (BINARY, FRACTIONAL, LABELMAP; any file name): a label map with its label table",
    "NIfTI (.nii, .nii.gz)",
    "NRRD (.nrrd, .nhdr)",
    "MetaImage (.mha, .mhd)",
)
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def _suffix(path: Path, choices: tuple[str, ...]) -> str | None:
    name = path.name.lower()
    return next((s for s in choices if name.endswith(s)), None)


def _with_path(exc: MedsegError, path: Path) -> MedsegError:
    """The same error, its message starting with the path when it does not name it yet."""
    msg = str(exc)
    if str(path) in msg:
        return exc
    new = type(exc)(f"{path}: {msg}")
    return new


#: What :func:`detect_format` answers.
FORMAT_NAMES = ("dicom-folder", "dicom", "dicom-seg", "nifti", "nrrd", "metaimage")
_SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # Segmentation, Label Map SEG
_FOLDER_PROBE_FILES = 64


def _dicom_kind(path: Path) -> str | None:
    """"dicom-seg", "dicom" or None for one file, from its header only; never raises."""
    import pydicom

    preamble = False
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            preamble = fh.read(4) == b"DICM"
            fh.seek(0)
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except Exception:  # noqa: BLE001 - any parse failure: a corrupt DICOM (preamble) or not DICOM at all
        return "dicom" if preamble else None
    if not preamble and "SOPClassUID" not in ds and "Modality" not in ds:
        return None  # pydicom parses many byte strings without a preamble: require some DICOM content
    sop = str(getattr(ds, "SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if sop in _SEG_SOP_CLASSES or str(getattr(ds, "Modality", "")).upper() == "SEG":
        return "dicom-seg"
    return "dicom"


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """The format medseg would read ``path`` as, or None when it does not read it; never raises.

    Looks at the name and at most a few headers (a folder: up to 64 of its files, depth first), not at pixel data,
    so a corrupt file of a known format still gets its format's name (and :func:`load_volume` then says what is
    wrong with it).

    Parameters
    ----------
    path : path
        File or folder.

    Returns
    -------
    str or None
        One of :data:`FORMAT_NAMES`: ``"dicom-folder"`` (a folder holding at least one DICOM file), ``"dicom"``,
        ``"dicom-seg"`` (a DICOM Segmentation object), ``"nifti"``, ``"nrrd"``, ``"metaimage"``; None for
        anything else (a missing path, a text file, an empty folder).

    Examples
    --------
    >>> detect_format("notes.txt") is None
    True
    """
    try:
        p = Path(path)
        if p.is_dir():
            checked = 0
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for name in sorted(names):
                    if name.startswith("."):
                        continue
                    if _dicom_kind(Path(root) / name) is not None:
                        return "dicom-folder"
                    checked += 1
                    if checked >= _FOLDER_PROBE_FILES:
                        return None
            return None
        if not p.is_file():
            return None
        if _suffix(p, _NIFTI):
            return "nifti"
        if _suffix(p, (".nrrd", ".nhdr")):
            return "nrrd"
        if _suffix(p, (".mha", ".mhd")):
            return "metaimage"
        return _dicom_kind(p)
    except Exception:  # noqa: BLE001 - the contract is "None, never raise" (a reader asks about any path)
        return None


def load_volume(
    path: str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    volume: int | None = None,
    skip_unreadable: bool = False,
    decode_workers: int | None = None,
) -> Volume:
    """Load a scan or label map, on its own world grid.

    Parameters
    ----------
    path : path
        A DICOM folder or file, NIfTI, NRRD or MetaImage file.
    series_uid : str, optional
        For a DICOM folder holding several series: which one (see :func:`medseg.io.list_series`).
    modality : str, optional
        Modality to record for formats that do not store one (NIfTI, NRRD, MHA); DICOM's own value wins.
    volume : int, optional
        Which volume (from 0) of a file or series holding several at the same positions: a DICOM multi-volume
        file or 4D series (see :func:`medseg.io.list_volumes`), or the last axis of a 4D NIfTI/NRRD/MHA.
    skip_unreadable : bool
        DICOM folders: leave damaged files out, each named in a logged warning and recorded in
        ``volume.source.skipped``, instead of failing on the first one.
    decode_workers : int, optional
        DICOM folders with a compressed series: how many forked processes decode it. None (default) forks up to 8
        when that is safe (no other Python thread in the process) and worth it, else decodes serially; 1 never
        forks (what the batch runner passes when it reads in a background thread or a Dask worker); N > 1 asks for
        N and logs a warning when forking is not safe. The voxels are the same whichever is used.

    Returns
    -------
    Volume
        Array (I, J, K) with its RAS affine; CT from DICOM in HU, MR as stored. A label map with a
        ``.labels.json`` sidecar beside it carries that label table.

    Raises
    ------
    UnsupportedFormatError
        For a file type medseg does not read (the message lists the supported ones).
    UnreadableFileError
        For a missing, truncated or corrupt file (named).
    DicomSeriesError
        For DICOM folders that do not form one volume (several series or volumes, gaps, tilt, a damaged file, ...).
    """
    p = Path(path)
    if volume is not None and (isinstance(volume, bool) or not isinstance(volume, int) or volume < 0):
        raise MultipleVolumesError(f"{p}: volume must be a whole number from 0, not {volume!r}.")
    if decode_workers is not None and (isinstance(decode_workers, bool) or not isinstance(decode_workers, int)
                                       or decode_workers < 1):
        raise OptionError(f"{p}: decode_workers must be a whole number from 1 (or None), not {decode_workers!r}.")
    try:
        loaded = _load(p, series_uid=series_uid, volume=volume, skip_unreadable=skip_unreadable,
                       decode_workers=decode_workers)
    except MedsegError as exc:
        raise _with_path(exc, p) from None
    if modality is not None and loaded.modality is None:
        loaded = Volume(loaded.array, loaded.affine, modality=modality.upper(), labels=loaded.labels, source=loaded.source)
    return loaded


def _one_volume(volume: Volume, p: Path, index: int | None) -> Volume:
    """The ``index``-th volume along the last axis of a 4D image (a 3D image has one, number 0)."""
    n = 1 if volume.array.ndim == 3 else volume.array.shape[3]
    if index is None or (index == 0 and n == 1):
        return volume
    if index >= n:
        raise MultipleVolumesError(f"{p}: no volume {index}; the image holds {n} (numbered from 0).")
    return Volume(volume.array[..., index], volume.affine, modality=volume.modality, source=volume.source)


def _load(p: Path, *, series_uid: str | None, volume: int | None, skip_unreadable: bool,
          decode_workers: int | None = None) -> Volume:
    from medseg.io import dicom

    if not p.exists():
        raise UnreadableFileError(f"{p}: no such file or folder.")
    if p.is_dir():
        return dicom.load_dicom_series(p, series_uid=series_uid, volume=volume, skip_unreadable=skip_unreadable,
                                       decode_workers=decode_workers)
    if series_uid is not None:
        log.warning("%s: series_uid is ignored for a single file", p)
    if _suffix(p, _NIFTI):
        loaded = _one_volume(_load_nifti(p), p, volume)
    elif _suffix(p, _ITK):
        loaded = _one_volume(_load_itk(p), p, volume)
    elif p.suffix.lower() in (".dcm", ".dicom", ".ima", "") or dicom.is_dicom_file(p):
        from medseg.io import dicom_seg

        if dicom_seg.is_dicom_seg(p):
            return dicom_seg.load_segmentation(p)
        return dicom.load_dicom_file(p, volume=volume)
    else:
        raise UnsupportedFormatError(
            f"{p}: unsupported file type {p.suffix!r}. medseg reads " + "; ".join(READ_FORMATS) + "."
        )
    sidecar = sidecar_path(p)
    if sidecar.exists():
        try:
            table = LabelTable.load(sidecar)
        except LabelTableError as exc:
            log.warning("ignoring unreadable label table %s: %s", sidecar, exc)
        else:
            loaded = Volume(loaded.array, loaded.affine, modality=loaded.modality, labels=table, source=loaded.source)
    return loaded


def _load_nifti(p: Path) -> Volume:
    import nibabel as nib

    from medseg.io.convert import volume_from_nibabel

    try:
        img: Any = nib.load(str(p))
        if len(img.shape) > 5 or int(np.prod(img.shape, dtype=np.float64)) > 2**34:
            raise UnreadableFileError(f"{p}: NIfTI header claims an impossible image shape {img.shape}.")
        volume = volume_from_nibabel(img)
    except MedsegError:
        raise
    except MemoryError:
        raise UnreadableFileError(f"{p}: corrupt NIfTI (header claims more data than can exist).") from None
    except Exception as exc:  # noqa: BLE001 - nibabel/gzip/zlib raise many types on corrupt input
        raise UnreadableFileError(
            f"{p}: truncated or corrupt NIfTI file ({type(exc).__name__}: {exc}). Re-export it."
        ) from None
    if not np.all(np.isfinite(img.affine)):
        raise GeometryError(f"{p}: the NIfTI affine is not finite (corrupt sform/qform).")
    return Volume(volume.array, volume.affine, source=SourceReferences(files=(str(p),)))


def _load_itk(p: Path) -> Volume:
    import SimpleITK as sitk

    from medseg.io.convert import volume_from_sitk

    try:
        image = sitk.ReadImage(str(p))
        volume = volume_from_sitk(image)
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - ITK raises RuntimeError with C++ traces; keep the first line
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "Exception" in line), first[0] if first else "")
        raise UnreadableFileError(f"{p}: truncated or corrupt image file ({detail.strip()[:300]}).") from None
    return Volume(volume.array, volume.affine, source=SourceReferences(files=(str(p),)))


def label_dtype(array: np.ndarray) -> np.dtype:
    """Smallest unsigned integer type (uint8 or uint16) that holds a label array.

    Raises
    ------
    LabelTableError
        If the array holds negative, fractional or >65535 values.
    """
    if array.size == 0:
        return np.dtype(np.uint8)
    lo, hi = array.min(), array.max()
    if lo < 0 or hi > 65535 or (array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0)):
        raise LabelTableError(
            f"Label maps hold integers 0..65535; this one holds values in [{lo}, {hi}] of type {array.dtype}."
        )
    return np.dtype(np.uint8 if hi < 256 else np.uint16)


def save_volume(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write a volume as NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha), on its own world grid.

    Label maps (``volume.labels`` set) are written as uint8/uint16 with the label table in a JSON sidecar
    (``seg.nii.gz`` → ``seg.labels.json``). Files are written to a temporary name and renamed, so a failed write
    never leaves a partial file.

    Returns
    -------
    Path
        The written image path.

    Raises
    ------
    UnsupportedFormatError
        For other suffixes.
    UnreadableFileError
        If the file cannot be written (folder missing, disk full, permissions).
    """
    p = Path(path)
    suffix = _suffix(p, WRITE_SUFFIXES)
    if suffix is None:
        raise UnsupportedFormatError(
            f"{p}: cannot write {p.suffix!r}; medseg writes " + ", ".join(WRITE_SUFFIXES) + " (DICOM SEG: medseg.io.write_dicom_seg)."
        )
    if not p.parent.exists():
        raise UnreadableFileError(f"{p}: folder {p.parent} does not exist.")
    array = volume.array
    if volume.labels is not None:
        array = array.astype(label_dtype(array), copy=False)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    out = Volume(array, volume.affine, modality=volume.modality, labels=volume.labels)
    try:
        with atomic_path(p, keep_suffix=suffix) as tmp:
            if suffix in _NIFTI:
                import nibabel as nib

                nib.save(out.to_nibabel(), str(tmp))
            else:
                import SimpleITK as sitk

                sitk.WriteImage(out.to_sitk(), str(tmp), useCompression=True)
        if volume.labels is not None:
            volume.labels.save(sidecar_path(p))
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UnreadableFileError(f"{p}: could not write ({type(exc).__name__}: {exc}).") from None
    return p
