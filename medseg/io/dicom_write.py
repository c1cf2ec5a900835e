"""Writing a volume as a single-frame DICOM CT or MR Image Storage series (pydicom).

Geometry, as the reader (:mod:`medseg.io.dicom`) and every DICOM viewer expects it:

- slice ``k`` of the (i, j, k) array is one file; its pixel at (row r, column c) is ``array[c, r, k]``, so the
  i axis runs along a row and the j axis down a column;
- ``ImageOrientationPatient`` holds the LPS unit vectors of the i and j axes, ``PixelSpacing`` their spacings
  as (between rows = j spacing, between columns = i spacing), ``ImagePositionPatient`` the LPS position of
  voxel (0, 0, k); LPS = diag(-1, -1, 1) · RAS;
- the i and j axes must be orthogonal and the k axis must run along their normal (no shear, no gantry tilt).

DICOM readers stack slices along the normal ``row × column``. A right-handed grid (det of the affine's 3×3 part
> 0, e.g. RAS, LPS or the oblique grids scanners write) therefore reads back with the same array and affine; a
left-handed grid (one axis flipped, e.g. RAI) reads back with the k axis reversed: the same voxels at the same
world positions, stored in the other slice order.

CT pixels are stored unsigned with ``RescaleIntercept`` −1024 and 12 bits stored when the values fit in
[−1024, 3071] HU (as most scanners do), otherwise in the smallest lossless layout (int16, or uint16 with the
minimum as intercept). MR pixels are stored as given (uint16 or int16; the reader applies no rescale to MR).
Only integer values (or floats holding integers) are written: the round trip is lossless by construction.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.errors import DicomWriteError, MedsegError, UnreadableFileError
from medseg.geometry import LPS_TO_RAS
from medseg.volume import Volume

__all__ = ["TRANSFER_SYNTAXES", "TransferSyntax", "WrittenSeries", "write_dicom_series"]

log = logging.getLogger(__name__)

TransferSyntax = Literal["explicit-vr-little-endian", "jpeg2000-lossless", "jpeg-ls-lossless", "rle-lossless"]

#: Transfer syntax names accepted by :func:`write_dicom_series` and their UIDs.
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit-vr-little-endian": "1.2.840.10008.1.2.1",
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "rle-lossless": "1.2.840.10008.1.2.5",
}

_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
#: UID root of pydicom (used for generated UIDs; they are 64 characters at most).
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_J2K_MIN_SIZE = 32  # pylibjpeg-openjpeg always uses 6 DWT resolutions
_ORTHO_TOL = 1e-6  # |cos| between the i and j axes, and sin between k and the normal


@dataclass(frozen=True)
class WrittenSeries:
    """What :func:`write_dicom_series` wrote.

    Attributes
    ----------
    folder : Path
        The series folder.
    files : tuple of Path
        One file per slice, in array order k = 0, 1, ...
    sop_instance_uids : tuple of str
        SOP Instance UIDs in the same order.
    study_instance_uid, series_instance_uid, frame_of_reference_uid : str
    transfer_syntax_uid : str
    modality : str
        "CT" or "MR".
    """

    folder: Path
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    transfer_syntax_uid: str
    modality: str


@dataclass(frozen=True)
class _Storage:
    dtype: np.dtype
    bits_stored: int
    signed: bool
    intercept: int


def _uid(seed: int | None, *parts: object) -> str:
    from pydicom.uid import generate_uid

    if seed is None:
        return str(generate_uid(prefix=_UID_PREFIX))
    return str(generate_uid(prefix=_UID_PREFIX, entropy_srcs=["|".join(["medseg", str(seed), *map(str, parts)])]))


def _check_uid(value: str, what: str) -> str:
    if len(value) > 64 or not _UID_RE.fullmatch(value):
        raise DicomWriteError(
            f"{what} {value!r} is not a valid DICOM UID (digits and dots, at most 64 characters, no leading zeros "
            "in a component). Leave it out to have one generated."
        )
    return value


def _storage(array: np.ndarray, modality: str) -> _Storage:
    """How to store the values losslessly (dtype, bits stored, sign, rescale intercept)."""
    if array.size == 0:
        raise DicomWriteError("Cannot write an empty volume as DICOM.")
    if array.dtype.kind == "b":
        array = array.view(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise DicomWriteError(
                f"DICOM CT/MR pixels are integers; this volume holds non-integer {array.dtype} values. "
                "Round it (e.g. volume.with_array(np.round(volume.array).astype(np.int16))) to write it losslessly."
            )
    elif array.dtype.kind not in "iu":
        raise DicomWriteError(f"Cannot write {array.dtype} voxels as DICOM; give integer (or integral float) values.")
    lo, hi = int(array.min()), int(array.max())
    if modality == "CT":
        if lo >= -1024 and hi <= 3071:
            return _Storage(np.dtype("<u2"), 12, False, -1024)
        if lo >= -1024 and hi <= 65535 - 1024:
            return _Storage(np.dtype("<u2"), 16, False, -1024)
        if lo >= -32768 and hi <= 32767:
            return _Storage(np.dtype("<i2"), 16, True, 0)
        if hi - lo <= 65535:
            return _Storage(np.dtype("<u2"), 16, False, lo)
    else:
        if lo >= 0 and hi <= 65535:
            return _Storage(np.dtype("<u2"), 16, False, 0)
        if lo >= -32768 and hi <= 32767:
            return _Storage(np.dtype("<i2"), 16, True, 0)
    raise DicomWriteError(
        f"Values span [{lo}, {hi}], more than the 16 bits a {modality} slice holds losslessly; "
        "rescale the volume first."
    )


def _lps_geometry(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """LPS unit vectors of i and j, LPS origin, spacings; refuses sheared or tilted grids."""
    lps = LPS_TO_RAS @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    u = lps[:3, :3] / spacing
    row, col, kdir = u[:, 0], u[:, 1], u[:, 2]
    if abs(float(row @ col)) > _ORTHO_TOL:
        raise DicomWriteError(
            f"The i and j axes of this volume are not orthogonal (cos = {float(row @ col):.3g}); a DICOM image plane "
            f"needs orthogonal rows and columns. Grid: {volume.describe_grid()}. Resample it first."
        )
    normal = np.cross(row, col)
    if np.linalg.norm(np.cross(normal, kdir)) > _ORTHO_TOL:
        raise DicomWriteError(
            "The k axis of this volume is not normal to its i-j plane (sheared grid, like a gantry tilt); "
            f"DICOM slices must stack along their normal. Grid: {volume.describe_grid()}. Resample it first."
        )
    return row, col, lps[:3, 3], (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return str(format_number_as_ds(float(value)))


def _prepare_target(folder: Path, *, overwrite: bool) -> None:
    if not folder.parent.is_dir():
        raise DicomWriteError(f"{folder}: parent folder {folder.parent} does not exist; create it first.")
    if folder.exists():
        if not folder.is_dir():
            raise DicomWriteError(f"{folder}: exists and is not a folder; choose a new folder for the series.")
        if any(folder.iterdir()) and not overwrite:
            raise DicomWriteError(
                f"{folder}: folder exists and is not empty; a DICOM series goes into a folder of its own. "
                "Choose a new folder or pass overwrite=True to replace it."
            )


def _move_into_place(tmp: Path, folder: Path, *, overwrite: bool) -> None:
    if folder.exists():
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        elif overwrite:
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
            return
        else:  # appeared while we were writing
            raise DicomWriteError(f"{folder}: another process created this folder while the series was written.")
    os.replace(tmp, folder)


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike[str],
    *,
    transfer_syntax: TransferSyntax = "explicit-vr-little-endian",
    series_description: str = "medseg",
    patient_id: str = "PHANTOM",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
) -> WrittenSeries:
    """Write a volume as a DICOM CT (or MR) Image Storage series, one file per k slice.

    The files carry every type 1 and type 2 attribute of the CT (or MR) Image IOD (patient, study, series,
    frame of reference, equipment, image plane, image pixel, CT/MR image, SOP common); they validate with
    dicom3tools' ``dciodvfy``. The series is written into a temporary sibling folder and renamed into place,
    so ``folder`` never holds a partial series.

    Parameters
    ----------
    volume : Volume
        Image, shape (I, J, K), integer values (HU for CT). ``volume.modality`` "CT" or "MR" (None is written
        as CT, with a logged warning). Its i and j axes must be orthogonal and k normal to them.
    folder : path
        Series folder to create. Its parent must exist; it must not exist or be empty unless ``overwrite``.
    transfer_syntax : {"explicit-vr-little-endian", "jpeg2000-lossless", "jpeg-ls-lossless", "rle-lossless"}
        Compression (all lossless).
    series_description : str
        SeriesDescription.
    patient_id : str
        PatientID and PatientName (write pseudonyms only; medseg never logs them).
    study_instance_uid, series_instance_uid : str, optional
        UIDs to use; generated when absent.
    seed : int, optional
        Makes every generated UID (and the dates) a deterministic function of the seed, so the same seed writes
        the same files. Without it UIDs are random and dates are today's.
    overwrite : bool
        Replace an existing non-empty ``folder``.

    Returns
    -------
    WrittenSeries
        Paths and UIDs, files in array order.

    Raises
    ------
    DicomWriteError
        If the volume cannot be written losslessly (labels or channels, non-integer values, more than 16 bits,
        a modality other than CT/MR, a sheared grid), a UID is invalid, or the folder is not usable.
    UnreadableFileError
        If writing fails (disk full, permissions); nothing is left behind.
    """
    folder = Path(folder)
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise DicomWriteError(
            f"Unknown transfer syntax {transfer_syntax!r}; choose one of {sorted(TRANSFER_SYNTAXES)}."
        )
    if volume.labels is not None:
        raise DicomWriteError(
            "This volume is a label map; write segmentations as DICOM SEG (medseg.io) or NIfTI, not as a CT series."
        )
    if volume.array.ndim != 3:
        raise DicomWriteError(f"A DICOM series holds a 3D volume; this one has shape {volume.array.shape}.")
    modality = (volume.modality or "").upper()
    if not modality:
        log.warning("volume has no modality; writing it as CT")
        modality = "CT"
    if modality not in _SOP_CLASS:
        raise DicomWriteError(f"medseg writes CT and MR series; this volume's modality is {volume.modality!r}.")
    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
    if transfer_syntax == "jpeg2000-lossless" and min(volume.shape[:2]) < _J2K_MIN_SIZE:
        raise DicomWriteError(
            f"JPEG 2000 needs images of at least {_J2K_MIN_SIZE}×{_J2K_MIN_SIZE} pixels (the encoder uses 6 wavelet "
            f"levels); this volume's slices are {volume.shape[1]}×{volume.shape[0]}. Use another transfer syntax."
        )
    row, col, origin, (si, sj, sk) = _lps_geometry(volume)
    normal = np.cross(row, col)
    kstep = (LPS_TO_RAS @ volume.affine)[:3, 2]
    storage = _storage(volume.array, modality)
    study_uid = _check_uid(study_instance_uid, "study_instance_uid") if study_instance_uid else _uid(seed, "study")
    series_uid = (
        _check_uid(series_instance_uid, "series_instance_uid")
        if series_instance_uid
        else _uid(seed, "series", study_uid, series_description)
    )
    for_uid = _uid(seed, "frame-of-reference", study_uid) if seed is not None else _uid(None)
    _prepare_target(folder, overwrite=overwrite)

    if seed is not None:
        date, time = "20260101", "120000"
    else:
        now = _dt.datetime.now(_dt.UTC)
        date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    common = _common_attributes(
        modality=modality,
        study_uid=study_uid,
        series_uid=series_uid,
        for_uid=for_uid,
        series_description=series_description,
        patient_id=patient_id,
        date=date,
        time=time,
        orientation=[*row, *col],
        pixel_spacing=(sj, si),
        slice_thickness=sk,
        storage=storage,
        rows=volume.shape[1],
        columns=volume.shape[0],
    )
    tmp = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    files: list[Path] = []
    sop_uids: list[str] = []
    try:
        tmp.mkdir()
        for k in range(volume.shape[2]):
            sop_uid = _uid(seed, "instance", series_uid, k) if seed is not None else _uid(None)
            position = origin + k * kstep
            pixels = volume.array[:, :, k].T  # (rows = j, columns = i)
            stored = (pixels.astype(np.int64) - storage.intercept).astype(storage.dtype)
            name = f"IM{k + 1:05d}.dcm"
            _write_slice(
                tmp / name,
                common,
                sop_uid=sop_uid,
                instance_number=k + 1,
                position=position,
                slice_location=float(position @ normal),
                stored=np.ascontiguousarray(stored),
                ts_uid=ts_uid,
            )
            files.append(folder / name)
            sop_uids.append(sop_uid)
        _move_into_place(tmp, folder, overwrite=overwrite)
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - OS and encoder errors: name the folder, leave nothing behind
        raise UnreadableFileError(f"{folder}: could not write the DICOM series ({type(exc).__name__}: {exc}).") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %d-slice %s series to %s (%s)", len(files), modality, folder, transfer_syntax)
    return WrittenSeries(
        folder=folder,
        files=tuple(files),
        sop_instance_uids=tuple(sop_uids),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        transfer_syntax_uid=ts_uid,
        modality=modality,
    )


def _common_attributes(
    *,
    modality: str,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    series_description: str,
    patient_id: str,
    date: str,
    time: str,
    orientation: Sequence[float],
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    storage: _Storage,
    rows: int,
    columns: int,
) -> dict[str, Any]:
    """Attributes shared by every slice, keyword → value, in module order."""
    attrs: dict[str, Any] = {
        # SOP Common
        "SpecificCharacterSet": "ISO_IR 100",
        "SOPClassUID": _SOP_CLASS[modality],
        # General Study / Patient
        "StudyDate": date,
        "SeriesDate": date,
        "ContentDate": date,
        "StudyTime": time,
        "SeriesTime": time,
        "ContentTime": time,
        "AccessionNumber": "",
        "Modality": modality,
        "Manufacturer": "medseg",
        "ReferringPhysicianName": "",
        "SeriesDescription": series_description,
        "ManufacturerModelName": "medseg.io.write_dicom_series",
        "PatientName": f"{patient_id}^medseg",
        "PatientID": patient_id,
        "PatientBirthDate": "",
        "PatientSex": "O",
        "SliceThickness": _ds(slice_thickness),
        "SpacingBetweenSlices": _ds(slice_thickness),
        "PatientPosition": "HFS",
        "Laterality": "",
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "StudyID": "1",
        "SeriesNumber": 1,
        "AcquisitionNumber": 1,
        "ImageOrientationPatient": [_ds(v) for v in orientation],
        "FrameOfReferenceUID": for_uid,
        "PositionReferenceIndicator": "",
        # Image Pixel
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": rows,
        "Columns": columns,
        "PixelSpacing": [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])],
        "BitsAllocated": 16,
        "BitsStored": storage.bits_stored,
        "HighBit": storage.bits_stored - 1,
        "PixelRepresentation": 1 if storage.signed else 0,
    }
    if modality == "CT":
        attrs.update(
            ImageType=["DERIVED", "SECONDARY", "AXIAL"],
            KVP="",
            WindowCenter="40",
            WindowWidth="400",
            RescaleIntercept=_ds(storage.intercept),
            RescaleSlope="1",
            RescaleType="HU",
        )
    else:
        attrs.update(
            ImageType=["DERIVED", "SECONDARY", "OTHER"],
            ScanningSequence="RM",  # research mode
            SequenceVariant="NONE",
            ScanOptions="",
            MRAcquisitionType="3D",
            RepetitionTime="",
            EchoTime="",
            EchoTrainLength="",
            MagneticFieldStrength="",
        )
    return attrs


def _write_slice(
    path: Path,
    common: dict[str, Any],
    *,
    sop_uid: str,
    instance_number: int,
    position: np.ndarray,
    slice_location: float,
    stored: np.ndarray,
    ts_uid: str,
) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    ds = Dataset()
    for keyword, value in common.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(slice_location)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = common["SOPClassUID"]
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.PixelData = stored.tobytes()
    if ts_uid != ExplicitVRLittleEndian:
        ds.compress(ts_uid, stored, generate_instance_uid=False)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
