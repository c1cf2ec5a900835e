"""DICOM series discovery, selection, validation and loading.

How a folder becomes one volume, as the careful converters (dcm2niix, SimpleITK/GDCM, highdicom) do it:

1. **Discovery: every file is accounted for.** Every file under the folder is tried, whatever its name or
   extension, and ends up in exactly one of three lists:

   - *image frames* of a series;
   - *set aside*, with the reason: files that are not DICOM (no ``DICM`` marker and no parseable header), DICOM
     objects that are not images (a SOP class of segmentations, structured reports, RT objects, presentation
     states, key objects, encapsulated documents, raw data, DICOMDIR, or another registered non-image SOP class
     without pixel data),
     and one-slice series beside a full one that are not slices of it (localizers, scouts; see 4.);
   - *damaged*: a file with the ``DICM`` marker (or a marker a few bits off it) that cannot be parsed, an image
     without pixel data, pixel data shorter than declared, a header value that cannot be parsed, a header that
     contradicts the rest of its series (see 3.), or a one-slice series that is a slice of the full series
     (see 4.). A damaged file is an error naming it and what is wrong; with
     ``skip_unreadable=True`` it is left out with a warning naming it, and recorded in
     :attr:`SourceReferences.skipped <medseg.volume.SourceReferences.skipped>`.
2. **Grouping.** Images are grouped by SeriesInstanceUID. When that UID is blank (anonymisers sometimes blank
   it), the *fallback key* ``FrameOfReferenceUID | ImageOrientationPatient (rounded to 1e-4) | Rows×Columns``
   groups them instead; such a series is named ``fallback:<hash>`` in listings and can be chosen by that name.
3. **Files that contradict their series.** When at most one file in ten (at least one) of a series disagrees
   with all the others — which agree — on image size, pixel format, orientation, pixel spacing, modality,
   rescale slope/intercept or frame of reference, those files are damaged (1.). Other disagreements are an
   :class:`~medseg.errors.InconsistentSeriesError` for the series.
4. **One-slice series.** A one-slice series beside a multi-slice series is a slice of it (damaged, 1.) when it
   lies in that series' slice orientation and its ImageType does not say LOCALIZER (or when it has the series' SOP
   class and no plane attributes at all); otherwise it is a localizer or other single image and is set aside, and
   the multi-slice series loads when it is the only one. ``series_uid=`` loads the one-slice series on its own.
5. **Validation** inside a series: one orientation, one size, one pixel spacing and pixel format
   (:class:`~medseg.errors.InconsistentSeriesError`); no two different instances at one position
   (:class:`~medseg.errors.DuplicateSlicesError` — the same SOP Instance UID seen twice, e.g. a copied file,
   is kept once) unless every position holds the same number of frames (6.); slices stacked along the slice
   normal (:class:`~medseg.errors.GantryTiltError` otherwise: medseg does not resample tilted series, it refuses
   them); uniform spacing (:class:`~medseg.errors.MissingSlicesError` when gaps are whole multiples of the
   spacing, :class:`~medseg.errors.NonUniformSpacingError` otherwise). Spacing counts as uniform when every gap is
   within 1 % (and at least 0.01 mm) of the median gap. Each message names the files concerned.
6. **Several volumes at the same positions** (an enhanced multi-frame file with magnitude and field map,
   echoes or time points; a 4D series of single-frame files) are split as dcm2niix splits them: by the frames'
   Dimension Index Values (the in-stack position left out) or, without them, by temporal position, echo, trigger
   time, acquisition number and image type; volumes are numbered from 0 in that order. Loading such data needs
   ``volume=N`` (:class:`~medseg.errors.MultipleVolumesError` lists the volumes otherwise).
7. **Sorting** by position along the slice normal (never InstanceNumber or file name).
8. **Pixels**: uncompressed little-endian data is read straight into the output array; other transfer syntaxes
   (JPEG 2000, JPEG-LS, JPEG baseline/lossless, RLE, Explicit VR Big Endian, Deflated Explicit VR Little Endian)
   are decoded by pydicom (with the pylibjpeg / pyjpegls plugins). Only the Bits Stored bits are kept (unsigned
   values are masked, signed ones sign-extended), as dcm2niix does. CT (and every modality but MR) comes back
   rescaled (HU for CT); MR comes back as stored. The output is int16 or int32 when the rescale is an integer
   shift, float32 otherwise.

Only :class:`~medseg.errors.MedsegError` subclasses leave this module: pydicom's and the decoders' exceptions on
malformed data become :class:`~medseg.errors.UnreadableFileError` naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import (
    DicomSeriesError,
    DuplicateSlicesError,
    GantryTiltError,
    InconsistentSeriesError,
    MedsegError,
    MissingSlicesError,
    MultipleSeriesError,
    MultipleVolumesError,
    NoImageSeriesError,
    NonUniformSpacingError,
    UnreadableFileError,
)
from medseg.geometry import LPS_TO_RAS
from medseg.volume import SkippedFile, SourceReferences, Volume

__all__ = [
    "FolderContents",
    "SeriesInfo",
    "VolumeInfo",
    "is_dicom_file",
    "list_series",
    "list_volumes",
    "load_dicom_file",
    "load_dicom_series",
    "scan_folder",
]

log = logging.getLogger(__name__)

#: SOP class UID prefixes of DICOM objects that are never image slices.
NON_IMAGE_SOP_CLASS_PREFIXES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, segmentation, label map SEG
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.481",  # RT objects (dose, structure set, plan, ...)
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF/CDA/STL
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)

_IMPLICIT_LE = "1.2.840.10008.1.2"
_UNCOMPRESSED_NATIVE = {_IMPLICIT_LE, "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
_DEFLATED = "1.2.840.10008.1.2.1.99"
_ORIENTATION_ATOL = 1e-4
_SPACING_RTOL = 0.01
_SPACING_ATOL_MM = 0.01
_POSITION_ATOL_MM = 1e-3
_SKIP_HINT = "Re-export or remove the file, or leave it out with skip_unreadable=True (`--skip-unreadable`)."


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found in a folder.

    Attributes
    ----------
    key : str
        What ``series_uid=`` accepts: the SeriesInstanceUID, or ``fallback:<hash>`` when the UID is blank.
    series_instance_uid : str
        As stored ("" when blank).
    description, modality : str
        SeriesDescription and Modality as stored ("" when absent).
    n_slices : int
        Image frames in the series (files, or frames of multi-frame files).
    files : tuple of str
        The files of the series, in discovery order.
    series_number : int or None
        SeriesNumber as stored in the series' first image (None when absent or blank).
    """

    key: str
    series_instance_uid: str
    description: str
    modality: str
    n_slices: int
    files: tuple[str, ...] = field(repr=False)
    series_number: int | None = None

    def describe(self) -> str:
        """One line for listings."""
        return (
            f"series_uid={self.key!r}  description={self.description!r}  modality={self.modality or '?'}  "
            f"slices={self.n_slices}"
        )


@dataclass(frozen=True)
class FolderContents:
    """Every file of a DICOM folder, accounted for (:func:`scan_folder`).

    Attributes
    ----------
    series : tuple of SeriesInfo
        Image series, largest first.
    set_aside : tuple of SkippedFile
        Files that are not part of any image series, with the reason: not DICOM, not an image (SEG, SR, RT,
        presentation state, ...), a one-slice localizer beside the full series.
    skipped : tuple of SkippedFile
        Damaged files left out (only with ``skip_unreadable=True``; without it they are an error).
    """

    series: tuple[SeriesInfo, ...]
    set_aside: tuple[SkippedFile, ...]
    skipped: tuple[SkippedFile, ...]


@dataclass(frozen=True)
class VolumeInfo:
    """One of the volumes a DICOM file or series holds at the same slice positions (:func:`list_volumes`).

    Attributes
    ----------
    index : int
        What ``volume=`` accepts (from 0).
    n_slices : int
        Slices of this volume.
    description : str
        What sets it apart from the others (frame type, echo time, temporal position, dimension index values).
    """

    index: int
    n_slices: int
    description: str


@dataclass
class _Frame:
    """Header facts of one image frame (a single-frame file, or one frame of a multi-frame file)."""

    path: str
    ds: Any
    frame: int | None
    sop_instance_uid: str
    position: np.ndarray | None  # LPS mm
    orientation: np.ndarray | None  # 6 direction cosines
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
    rows: int
    columns: int
    slope: float
    intercept: float
    pixel_format: tuple[int, int, int, int, str]  # bits allocated, bits stored, representation, spp, photometric
    transfer_syntax: str
    slice_thickness: float | None
    spacing_between_slices: float | None
    pixel_offset: int | None = None  # where the pixel data element starts in the file (native syntaxes)
    modality: str = ""
    frame_of_reference_uid: str = ""
    instance_number: int = 0
    volume_key: tuple[Any, ...] = ()  # what sets this frame's volume apart when positions repeat
    volume_label: str = ""
    rescaled: bool = False  # RescaleSlope or RescaleIntercept present
    shown: str = ""  # the path as messages show it: relative to the folder searched
    image_type: str = ""
    sop_class: str = ""

    def name(self) -> str:
        shown = self.shown or self.path
        return shown if self.frame is None else f"{shown} frame {self.frame + 1}"


@dataclass
class _Damaged:
    """A damaged file: the record kept with skip_unreadable, and the error raised without it."""

    record: SkippedFile
    error: type[MedsegError]


_INT_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}
_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UC", "UT"}
_TAGS: dict[str, int] = {}


def _value(ds: Any, keyword: str) -> Any:
    """A top-level element's value, parsed straight from the raw bytes for plain string and integer VRs.

    pydicom's general value conversion (validation, DSfloat objects) dominates header parsing time for a series;
    the few values medseg needs are parsed here instead: strings as ``str`` (multi-valued: list of ``str``),
    integers as ``int`` (or list). Anything else goes through pydicom. None when absent or empty.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = _TAGS.get(keyword)
    if tag is None:
        tag = _TAGS[keyword] = int(tag_for_keyword(keyword))  # type: ignore[arg-type]
    if tag not in ds:
        return None
    elem = ds.get_item(tag)
    encoding = getattr(ds, "original_encoding", (None, None))
    if isinstance(elem, RawDataElement) and elem.value is not None and encoding[1] is True:
        vr = elem.VR or dictionary_VR(tag)
        raw = elem.value
        if vr in _INT_VRS:
            size = {"H": 2, "h": 2, "I": 4, "i": 4}[_INT_VRS[vr]]
            vals: list[Any] = list(np.frombuffer(raw[: len(raw) // size * size], dtype="<" + _INT_VRS[vr]).tolist())
        elif vr in _STRING_VRS:
            text = raw.decode("latin-1").strip(" \x00")
            vals = [v.strip(" \x00") for v in text.split("\\")] if text else []
        else:
            value = ds.get(keyword)
            return None if value in (None, "") else value
        if not vals:
            return None
        return vals[0] if len(vals) == 1 else vals
    value = ds.get(keyword)
    return None if value in (None, "") else value


def _str(ds: Any, keyword: str) -> str:
    value = _value(ds, keyword)
    return "" if value is None else str(value).strip()


def _floats(value: Any, n: int, what: str, path: str) -> np.ndarray | None:
    if value is None or value == "":
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UnreadableFileError(f"{path}: {what} is not {n} numbers ({value!r}: {exc}).") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise UnreadableFileError(f"{path}: {what} must hold {n} finite numbers, found {value!r}.")
    return arr


def _sop_class(ds: Any) -> str:
    uid = _str(ds, "SOPClassUID")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = _str(ds.file_meta, "MediaStorageSOPClassUID")
    return uid


def _sop_instance(ds: Any) -> str:
    uid = _str(ds, "SOPInstanceUID")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = _str(ds.file_meta, "MediaStorageSOPInstanceUID")
    return uid


#: The pixel data element's tag as it starts in the file: Pixel, Float, Double Float Pixel Data, little then
#: big endian.
_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00",
               b"\x7f\xe0\x00\x10", b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09")


def _sop_name(uid: str) -> str:
    """``uid (its name)`` for messages, e.g. ``1.2.840.10008.5.1.4.1.1.66.4 (Segmentation Storage)``."""
    from pydicom.uid import UID

    try:
        name = UID(uid).name if uid else ""
    except Exception:  # noqa: BLE001 - a damaged UID string has no name
        name = ""
    if not uid:
        return "unknown SOP class"
    return f"{uid} ({name})" if name and name != uid else uid


def _non_image_sop(sop: str) -> bool:
    return any(sop.startswith(p) for p in NON_IMAGE_SOP_CLASS_PREFIXES)


def _damaged_marker(head: bytes) -> bool:
    """True when the 4 bytes at 128 are a few bits off ``DICM`` or file meta elements follow them: a DICOM file
    whose marker was damaged, not some other kind of file."""
    if len(head) < 136 or head[128:132] == b"DICM":
        return False
    flipped = sum((a ^ b).bit_count() for a, b in zip(head[128:132], b"DICM", strict=True))
    return flipped <= 4 or head[132:134] == b"\x02\x00"


@dataclass
class _Header:
    ds: Any
    has_pixels: bool
    pixel_offset: int | None  # file offset of the pixel data element when it can be read straight


def _read_header(path: str) -> _Header | str:
    """Parse a file's DICOM header up to the pixel data.

    Returns the header, or (for a file that is not DICOM) the reason to set it aside.

    Raises
    ------
    UnreadableFileError
        For a DICOM file that cannot be parsed (or whose ``DICM`` marker is damaged), naming it.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    head = b""
    try:
        with open(path, "rb") as fh:
            head = fh.read(136)
            fh.seek(0)
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            offset = fh.tell()
            element = fh.read(12)  # the pixel data element's tag, VR and length, when it is next
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise UnreadableFileError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    except InvalidDicomError:
        if _damaged_marker(head):
            raise UnreadableFileError(
                f"{path}: damaged DICOM file: the 'DICM' marker at byte 128 reads {head[128:132]!r}. {_SKIP_HINT}"
            ) from None
        return "not a DICOM file"
    except MemoryError:
        raise UnreadableFileError(
            f"{path}: corrupt DICOM header (an element claims an impossible length). {_SKIP_HINT}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input; name the file
        if head[128:132] != b"DICM" and not _damaged_marker(head):
            return "not a DICOM file"
        raise UnreadableFileError(
            f"{path}: truncated or corrupt DICOM header ({type(exc).__name__}: {exc}). {_SKIP_HINT}"
        ) from None
    try:
        ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else ""
        if ts == _DEFLATED:  # the stream position says nothing about a deflated data set: read it all
            full = pydicom.dcmread(path)
            has_pixels = any(k in full for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
            return _Header(ds, has_pixels, None)
    except Exception as exc:  # noqa: BLE001
        raise UnreadableFileError(
            f"{path}: corrupt DICOM data set ({type(exc).__name__}: {exc}). {_SKIP_HINT}"
        ) from None
    has_pixels = element[:4] in _PIXEL_TAGS
    if has_pixels and ts in _UNCOMPRESSED_NATIVE:
        _check_native_length(path, element, offset, ts, size)
    return _Header(ds, has_pixels, offset if has_pixels else None)


def _check_native_length(path: str, head: bytes, offset: int, ts: str, size: int) -> None:
    """Uncompressed pixel data must be as long as declared (a truncated file is damaged, not an image)."""
    implicit = ts == _IMPLICIT_LE
    if len(head) < (8 if implicit else 12):
        raise UnreadableFileError(f"{path}: pixel data is truncated (the file ends inside its header). {_SKIP_HINT}")
    length = int.from_bytes(head[4:8] if implicit else head[8:12], "little")
    start = offset + (8 if implicit else 12)
    if length == 0xFFFFFFFF or start + length > size:
        raise UnreadableFileError(
            f"{path}: pixel data is truncated or malformed ({length} bytes declared, {size - start} in the file). "
            + _SKIP_HINT
        )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _first(seq: Any) -> Any:
    return seq[0] if seq else None


def _safe_str(ds: Any, keyword: str) -> str:
    """Like :func:`_str`, for values only shown in messages: "" when the element cannot be read."""
    try:
        return _str(ds, keyword)
    except Exception:  # noqa: BLE001
        return ""


def _frame_facts(path: str, header: _Header) -> list[_Frame]:
    """Turn one image dataset into frames, with every header value it needs parsed (errors name the file)."""
    try:
        frames = _frame_facts_unchecked(path, header.ds)
        for f in frames:
            f.pixel_offset = header.pixel_offset
        return frames
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - lazily parsed values of a corrupt header fail here
        raise UnreadableFileError(
            f"{path}: corrupt DICOM header ({type(exc).__name__}: {exc}). {_SKIP_HINT}"
        ) from None


_IN_STACK_POINTERS = {0x00209057, 0x00200032}  # InStackPositionNumber, ImagePositionPatient


def _number(value: Any) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _image_type(ds: Any) -> str | None:
    value = _value(ds, "ImageType")
    if isinstance(value, list):
        return "\\".join(str(v) for v in value) or None
    return str(value) if value else None


def _classic_volume_key(ds: Any) -> tuple[tuple[Any, ...], str]:
    """What tells apart volumes of a 4D series of single-frame files, and a label for listings."""
    fields = (
        ("temporal position", _number(_value(ds, "TemporalPositionIdentifier"))),
        ("echo", _number(_value(ds, "EchoNumbers"))),
        ("TE", _number(_value(ds, "EchoTime"))),
        ("trigger time", _number(_value(ds, "TriggerTime"))),
        ("acquisition", _number(_value(ds, "AcquisitionNumber"))),
        ("image type", _image_type(ds)),
    )
    key = tuple(-1e300 if v is None else v for _, v in fields[:5]) + (fields[5][1] or "",)
    label = ", ".join(f"{name} {v:g}" if isinstance(v, float) else f"{name} {v}" for name, v in fields if v is not None)
    return key, label


def _enhanced_volume_key(ds: Any, item: Any, shared: Any) -> tuple[tuple[Any, ...], str]:
    """Dimension Index Values without the in-stack position (as dcm2niix sorts), and a label for listings."""
    content = _first(item.get("FrameContentSequence")) if item else None
    dims = ds.get("DimensionIndexSequence") or []
    values = list(content.get("DimensionIndexValues") or []) if content is not None else []
    if not isinstance(values, list):
        values = [values]
    key: list[Any] = []
    for d, v in zip(dims, values, strict=False):
        pointer = d.get("DimensionIndexPointer")
        if pointer is not None and int(pointer) in _IN_STACK_POINTERS:
            continue
        key.append(int(v))
    parts = []
    frame_type = None
    for seq in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "FrameTypeSequence"):
        got = _first(item.get(seq)) if item else None
        got = got or (_first(shared.get(seq)) if shared else None)
        if got is not None and got.get("FrameType"):
            frame_type = "\\".join(str(v) for v in got.FrameType)
            break
    if frame_type:
        parts.append(f"frame type {frame_type}")
    echo = _first(item.get("MREchoSequence")) if item else None
    if echo is not None and echo.get("EffectiveEchoTime") is not None:
        parts.append(f"TE {float(echo.EffectiveEchoTime):g}")
    if content is not None and content.get("TemporalPositionIndex") is not None:
        parts.append(f"temporal position {int(content.TemporalPositionIndex)}")
    if key:
        parts.append("dimension index " + ",".join(str(v) for v in key))
    if not key:  # no usable dimension index: fall back to what the per-frame groups say
        temporal = int(content.get("TemporalPositionIndex") or 0) if content is not None else 0
        te = float(echo.EffectiveEchoTime) if echo is not None and echo.get("EffectiveEchoTime") is not None else 0.0
        key = [temporal, te, frame_type or ""]
    return tuple(key), ", ".join(parts)


def _frame_facts_unchecked(path: str, ds: Any) -> list[_Frame]:
    rows, cols = int(_value(ds, "Rows") or 0), int(_value(ds, "Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise UnreadableFileError(f"{path}: image size {rows}×{cols} is empty. {_SKIP_HINT}")
    bits_alloc = int(_or(_value(ds, "BitsAllocated"), 16))
    bits_stored = int(_or(_value(ds, "BitsStored"), bits_alloc))
    if not 0 < bits_stored <= bits_alloc:
        raise UnreadableFileError(f"{path}: BitsStored {bits_stored} does not fit BitsAllocated {bits_alloc}. "
                                  + _SKIP_HINT)
    pixel_format = (
        bits_alloc,
        bits_stored,
        int(_or(_value(ds, "PixelRepresentation"), 0)),
        int(_or(_value(ds, "SamplesPerPixel"), 1)),
        _str(ds, "PhotometricInterpretation"),
    )
    ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else ""
    sop_uid = _sop_instance(ds)
    thickness_value, between_value = _value(ds, "SliceThickness"), _value(ds, "SpacingBetweenSlices")
    thickness = float(thickness_value) if thickness_value is not None else None
    between = float(between_value) if between_value is not None else None
    common = {
        "modality": _str(ds, "Modality").upper(),
        "frame_of_reference_uid": _str(ds, "FrameOfReferenceUID"),
        "instance_number": int(_number(_value(ds, "InstanceNumber")) or 0),
        "image_type": _image_type(ds) or "",
        "sop_class": _sop_class(ds),
    }
    top_rescaled = _value(ds, "RescaleSlope") is not None or _value(ds, "RescaleIntercept") is not None

    def frame(
        idx: int | None, pos: Any, ori: Any, spacing: Any, slope: Any, inter: Any, thick: Any, between_: Any,
        rescaled: bool,
    ) -> _Frame:
        ps = _floats(spacing, 2, "PixelSpacing", path)
        if ps is not None and np.any(ps <= 0):
            raise UnreadableFileError(f"{path}: PixelSpacing must be positive, found {ps.tolist()}. {_SKIP_HINT}")
        ori_arr = _floats(ori, 6, "ImageOrientationPatient", path)
        if ori_arr is not None:
            r, c = ori_arr[:3], ori_arr[3:]
            if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(r @ c) > 1e-2:
                raise UnreadableFileError(
                    f"{path}: ImageOrientationPatient {ori_arr.tolist()} is not two orthogonal unit vectors. "
                    + _SKIP_HINT
                )
            ori_arr = np.concatenate([r / np.linalg.norm(r), c / np.linalg.norm(c)])
        s = float(slope) if slope not in (None, "") else 1.0
        i = float(inter) if inter not in (None, "") else 0.0
        if not (np.isfinite(s) and np.isfinite(i)) or s == 0:
            raise UnreadableFileError(f"{path}: invalid RescaleSlope/Intercept {slope!r}/{inter!r}. {_SKIP_HINT}")
        return _Frame(
            path=path,
            ds=ds,
            frame=idx,
            sop_instance_uid=sop_uid,
            position=_floats(pos, 3, "ImagePositionPatient", path),
            orientation=ori_arr,
            pixel_spacing=None if ps is None else (float(ps[0]), float(ps[1])),
            rows=rows,
            columns=cols,
            slope=s,
            intercept=i,
            pixel_format=pixel_format,
            transfer_syntax=ts,
            slice_thickness=float(thick) if thick not in (None, "") else None,
            spacing_between_slices=float(between_) if between_ not in (None, "") else None,
            rescaled=rescaled,
            **common,  # type: ignore[arg-type]
        )

    if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced multi-frame
        n_frames = int(_or(_value(ds, "NumberOfFrames"), 1))
        shared = _first(ds.get("SharedFunctionalGroupsSequence")) or {}
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if len(per_frame) != n_frames:
            raise UnreadableFileError(
                f"{path}: NumberOfFrames is {n_frames} but PerFrameFunctionalGroupsSequence has {len(per_frame)} "
                f"items. {_SKIP_HINT}"
            )

        def group(item: Any, keyword: str) -> Any:
            seq = item.get(keyword) if item else None
            if not seq:
                seq = shared.get(keyword) if shared else None
            return _first(seq)

        frames = []
        for f, item in enumerate(per_frame):
            pos = group(item, "PlanePositionSequence")
            ori = group(item, "PlaneOrientationSequence")
            meas = group(item, "PixelMeasuresSequence")
            pvt = group(item, "PixelValueTransformationSequence")
            fr = frame(
                f,
                pos.get("ImagePositionPatient") if pos else None,
                ori.get("ImageOrientationPatient") if ori else None,
                meas.get("PixelSpacing") if meas else None,
                pvt.get("RescaleSlope") if pvt else _value(ds, "RescaleSlope"),
                pvt.get("RescaleIntercept") if pvt else _value(ds, "RescaleIntercept"),
                meas.get("SliceThickness") if meas else None,
                meas.get("SpacingBetweenSlices") if meas else None,
                pvt is not None or top_rescaled,
            )
            fr.volume_key, fr.volume_label = _enhanced_volume_key(ds, item, shared)
            frames.append(fr)
        return frames

    n_frames = int(_or(_value(ds, "NumberOfFrames"), 1) or 1)
    spacing = _value(ds, "PixelSpacing") or _value(ds, "ImagerPixelSpacing")
    if n_frames > 1:  # legacy multi-frame (e.g. NM, US): one position, frames along the normal
        pos0 = _floats(_value(ds, "ImagePositionPatient"), 3, "ImagePositionPatient", path)
        ori0 = _value(ds, "ImageOrientationPatient")
        step = between or thickness or 1.0
        frames = []
        for f in range(n_frames):
            pos = None
            if pos0 is not None and ori0 is not None:
                o = np.array([float(v) for v in ori0])
                pos = pos0 + f * step * np.cross(o[:3], o[3:])
            frames.append(frame(f, pos, ori0, spacing, _value(ds, "RescaleSlope"), _value(ds, "RescaleIntercept"),
                                thickness, between, top_rescaled))
        return frames
    single = frame(
        None,
        _value(ds, "ImagePositionPatient"),
        _value(ds, "ImageOrientationPatient"),
        spacing,
        _value(ds, "RescaleSlope"),
        _value(ds, "RescaleIntercept"),
        thickness,
        between,
        top_rescaled,
    )
    single.volume_key, single.volume_label = _classic_volume_key(ds)
    return [single]


def is_dicom_file(path: str | Path) -> bool:
    """True if the file carries the ``DICM`` marker at byte 128 (the DICOM Part 10 preamble)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _walk(folder: Path) -> list[str]:
    files: list[str] = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
    return files


def _series_key(ds: Any, frame: _Frame) -> tuple[str, str]:
    uid = _str(ds, "SeriesInstanceUID")
    if uid:
        return uid, uid
    ori = "none" if frame.orientation is None else ",".join(f"{v:.4f}" for v in frame.orientation)
    raw = f"{frame.frame_of_reference_uid}|{ori}|{frame.rows}x{frame.columns}"
    return "fallback:" + hashlib.sha1(raw.encode()).hexdigest()[:12], ""


@dataclass
class _Series:
    key: str
    uid: str
    frames: list[_Frame] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    description: str = ""

    def info(self) -> SeriesInfo:
        return SeriesInfo(
            key=self.key,
            series_instance_uid=self.uid,
            description=self.description,
            modality=self.frames[0].modality,
            n_slices=len(self.frames),
            files=tuple(self.files),
            series_number=_series_number(self.frames[0].ds),
        )


def _series_number(ds: Any) -> int | None:
    """SeriesNumber as a whole number, or None when absent, blank or unreadable (it only names the series)."""
    text = _safe_str(ds, "SeriesNumber")
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


@dataclass
class _Survey:
    series: dict[str, _Series]
    set_aside: list[SkippedFile]
    damaged: list[_Damaged]


def _known_non_image_class(sop: str) -> bool:
    """A registered SOP class that is not an image storage class (spectroscopy, waveforms, hanging protocols...).

    Without pixel data, only such an object is set aside: an image class, a blank or an unregistered (garbled)
    SOP class without pixel data is a damaged file.
    """
    from pydicom.uid import UID

    try:
        name = UID(sop).name if sop else ""
    except Exception:  # noqa: BLE001
        return False
    return bool(name) and name != sop and "Image Storage" not in name


def _examine(path: str) -> list[_Frame] | str:
    """Frames of an image file, or why the file is set aside. Raises MedsegError for a damaged file."""
    header = _read_header(path)
    if isinstance(header, str):
        return header
    ds = header.ds
    try:
        sop = _sop_class(ds)
        if _non_image_sop(sop):
            return f"not an image: {_sop_name(sop)}"
        if not header.has_pixels:
            if not _known_non_image_class(sop):
                raise UnreadableFileError(
                    f"{path}: a DICOM file of {_sop_name(sop)} without pixel data: the header is damaged or the "
                    f"file truncated. {_SKIP_HINT}"
                )
            return f"not an image: {_sop_name(sop)} without pixel data"
        frames = _frame_facts(path, header)
        return frames
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged values parse lazily; name the file
        raise UnreadableFileError(f"{path}: corrupt DICOM header ({type(exc).__name__}: {exc}). {_SKIP_HINT}") from None


def _survey(folder: Path) -> _Survey:
    """Every file accounted for: image frames grouped in series, set-aside files, damaged files."""
    paths = _walk(folder)
    series: dict[str, _Series] = {}
    aside: list[SkippedFile] = []
    damaged: list[_Damaged] = []
    for path in paths:
        try:
            got = _examine(path)
            if isinstance(got, str):
                log.debug("setting aside %s: %s", path, got)
                aside.append(SkippedFile(path, got))
                continue
            try:
                key, uid = _series_key(got[0].ds, got[0])
                description = _str(got[0].ds, "SeriesDescription")
            except Exception as exc:  # noqa: BLE001
                raise UnreadableFileError(
                    f"{path}: corrupt DICOM header ({type(exc).__name__}: {exc}). {_SKIP_HINT}"
                ) from None
        except MedsegError as exc:
            damaged.append(_Damaged(SkippedFile(path, _reason(exc, path)), type(exc)))
            continue
        for f in got:
            f.shown = os.path.relpath(path, folder)
        s = series.setdefault(key, _Series(key, uid, description=description))
        s.frames.extend(got)
        s.files.append(path)
    for s in list(series.values()):
        damaged.extend(_contradicting_files(s))
    for key in [k for k, s in series.items() if not s.frames]:
        del series[key]
    damaged.extend(_stray_slices(series))
    return _Survey(series, aside, damaged)


def _reason(exc: MedsegError, path: str) -> str:
    """An error message without the leading path and the closing hint: the reason recorded for a skipped file."""
    msg = str(exc)
    if msg.startswith(f"{path}: "):
        msg = msg[len(path) + 2:]
    return msg.replace(" " + _SKIP_HINT, "").strip().rstrip(".")


_FIELDS: tuple[tuple[str, Any], ...] = (
    ("image size (rows×columns)", lambda f: f"{f.rows}×{f.columns}"),
    ("pixel format", lambda f: f.pixel_format),
    ("orientation", lambda f: None if f.orientation is None else tuple(np.round(f.orientation, 4).tolist())),
    ("pixel spacing", lambda f: None if f.pixel_spacing is None else tuple(np.round(f.pixel_spacing, 5).tolist())),
    ("modality", lambda f: f.modality),
    ("rescale slope/intercept", lambda f: (f.slope, f.intercept, f.rescaled)),
    ("FrameOfReferenceUID", lambda f: f.frame_of_reference_uid),
)


def _contradicting_files(series: _Series) -> list[_Damaged]:
    """Files whose header contradicts all the other files of their series (which agree), removed from it.

    At most one file in ten (at least one) may be such an outlier for a field; more disagreement is left to
    :func:`_check_consistent`, which reports the series as inconsistent.
    """
    single = [f for f in series.frames if f.frame is None]
    if len(single) < 3 or len(single) != len(series.frames):
        return []
    out: dict[str, str] = {}
    for name, get in _FIELDS:
        values = [get(f) for f in single]
        counts = Counter(map(repr, values))
        if len(counts) < 2:
            continue
        common, n_common = counts.most_common(1)[0]
        minority = len(single) - n_common
        if n_common < 2 or minority > max(1, len(single) // 10):
            continue
        ref = next(v for v in values if repr(v) == common)
        for f, v in zip(single, values, strict=True):
            if repr(v) != common and f.path not in out:
                out[f.path] = (f"its {name} {_show(name, v)} contradicts the {n_common} other slices of series "
                               f"{series.key} ({_show(name, ref)}): the header is damaged or the file belongs to "
                               "another acquisition")
    if not out:
        return []
    series.frames = [f for f in series.frames if f.path not in out]
    series.files = [p for p in series.files if p not in out]
    return [_Damaged(SkippedFile(p, r), InconsistentSeriesError) for p, r in out.items()]


def _show(name: str, value: Any) -> str:
    if name.startswith("rescale"):
        slope, inter, present = value
        return f"{slope:g}/{inter:g}" if present else "absent"
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _same_plane(a: _Frame, b: _Frame) -> bool:
    """A one-slice series' frame ``a`` lies in the plane orientation of series frame ``b`` and is no localizer (or
    it has the series' SOP class and no plane attributes at all, which such a SOP class requires)."""
    if "LOCALIZER" in a.image_type.upper() or b.orientation is None:
        return False
    if a.orientation is None or a.position is None:  # an image of the series' kind that lost its plane attributes
        return a.sop_class == b.sop_class
    return bool(np.allclose(a.orientation, b.orientation, atol=_ORIENTATION_ATOL))


def _stray_slices(series: dict[str, _Series]) -> list[_Damaged]:
    """One-slice series in the orientation of a multi-slice series (and not a LOCALIZER): damaged slices of it.

    Localizers and scouts lie in another plane or say LOCALIZER in their ImageType; a single slice in the plane of
    the full series beside it is a slice of that series whose series UID, frame of reference, size or spacing was
    damaged (each of those puts it in a series of its own). So is a slice of the series' SOP class without any
    plane attributes.
    """
    full = [s for s in series.values() if len(s.frames) > 1]
    out = []
    for key, s in list(series.items()):
        if len(s.frames) != 1 or s.frames[0].frame is not None:
            continue
        main = next((m for m in full if _same_plane(s.frames[0], m.frames[0])), None)
        if main is not None:
            path = s.files[0]
            out.append(_Damaged(SkippedFile(path, (
                f"a one-slice series ({key}) in the slice orientation of series {main.key} ({len(main.frames)} "
                "slices) beside it, not marked LOCALIZER: a slice of that series whose header (series UID, frame "
                "of reference, image size or pixel spacing) is damaged"
            )), InconsistentSeriesError))
            del series[key]
    return out


def _settle(survey: _Survey, where: Path, *, skip_unreadable: bool) -> tuple[SkippedFile, ...]:
    """Raise for damaged files, or (skipping them) warn about each and return their records."""
    if not survey.damaged:
        return ()
    if not skip_unreadable:
        first = survey.damaged[0]
        more = len(survey.damaged) - 1
        others = "" if not more else (
            f" ({more} more damaged file{'s' if more > 1 else ''}: "
            + ", ".join(d.record.path for d in survey.damaged[1:4]) + (" ..." if more > 3 else "") + ")"
        )
        raise first.error(f"{first.record.path}: {first.record.reason}.{others} {_SKIP_HINT}")
    for d in survey.damaged:
        log.warning("%s: skipping damaged file %s: %s", where, d.record.path, d.record.reason)
    return tuple(d.record for d in survey.damaged)


def scan_folder(folder: str | Path, *, skip_unreadable: bool = False) -> FolderContents:
    """Account for every file of a DICOM folder (subfolders included): series, files set aside, damaged files.

    Parameters
    ----------
    folder : path
        Folder to search.
    skip_unreadable : bool
        Leave damaged files out (each one logged as a warning and listed in ``skipped``) instead of failing.

    Returns
    -------
    FolderContents

    Raises
    ------
    UnreadableFileError, InconsistentSeriesError
        For a damaged file, unless ``skip_unreadable`` (the message names the file and what is wrong).
    """
    folder = Path(folder)
    survey = _survey(folder)
    skipped = _settle(survey, folder, skip_unreadable=skip_unreadable)
    aside = list(survey.set_aside)
    localizers = _localizers(survey.series)
    for s in localizers:
        aside.append(SkippedFile(s.files[0], _localizer_reason(s, survey.series)))
    infos = sorted((s.info() for s in survey.series.values()), key=lambda i: (-i.n_slices, i.key))
    return FolderContents(series=tuple(infos), set_aside=tuple(aside), skipped=skipped)


def list_series(folder: str | Path, *, skip_unreadable: bool = False) -> list[SeriesInfo]:
    """The image series in a folder (subfolders included), largest first.

    Raises
    ------
    UnreadableFileError, InconsistentSeriesError
        If a file is damaged (the message names it), unless ``skip_unreadable``.
    """
    return list(scan_folder(folder, skip_unreadable=skip_unreadable).series)


def _localizers(series: dict[str, _Series]) -> list[_Series]:
    """One-slice series beside exactly one multi-slice series (left after :func:`_stray_slices`)."""
    full = [s for s in series.values() if len(s.frames) > 1]
    if len(full) != 1:
        return []
    return [s for s in series.values() if len(s.frames) == 1 and len(s.files) == 1]


def _localizer_reason(s: _Series, series: dict[str, _Series]) -> str:
    main = next(x for x in series.values() if len(x.frames) > 1)
    return (f"a one-slice series ({s.key}, {s.description!r}) in another plane than series {main.key} or marked "
            "LOCALIZER: a localizer or other single image, loaded only when chosen with series_uid")


def _choose(series: dict[str, _Series], folder: Path, series_uid: str | None) -> _Series:
    if not series:
        raise NoImageSeriesError(
            f"{folder}: no DICOM image series found (looked at every file in the folder and its subfolders; "
            "segmentations, reports, RT objects and non-DICOM files are set aside: `medseg info FOLDER` lists them)."
        )
    if series_uid is not None:
        if series_uid in series:
            return series[series_uid]
        listing = "\n".join("  " + s.info().describe() for s in series.values())
        raise MultipleSeriesError(f"{folder}: no series {series_uid!r} here. Series found:\n{listing}")
    if len(series) == 1:
        return next(iter(series.values()))
    localizers = _localizers(series)
    if len(localizers) == len(series) - 1:
        main = next(s for s in series.values() if s not in localizers)
        for s in localizers:
            log.info("%s: set aside %s", folder, _localizer_reason(s, series))
        return main
    listing = "\n".join(
        "  " + i.describe() for i in sorted((s.info() for s in series.values()), key=lambda i: -i.n_slices)
    )
    raise MultipleSeriesError(
        f"{folder}: {len(series)} image series found and none chosen:\n{listing}\n"
        "Choose one with load_volume(path, series_uid=...) or `--series-uid` on the command line."
    )


def _names(frames: Sequence[_Frame], limit: int = 3) -> str:
    shown = [f.name() for f in frames[:limit]]
    return ", ".join(shown) + (f" and {len(frames) - limit} more" if len(frames) > limit else "")


def _check_consistent(frames: Sequence[_Frame], where: str) -> None:
    def distinct(name: str, values: list[Any]) -> None:
        groups: dict[str, list[_Frame]] = defaultdict(list)
        for f, v in zip(frames, values, strict=True):
            groups[str(v)].append(f)
        if len(groups) > 1:
            ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
            listing = ", ".join(f"{v} ({len(fs)} slices)" for v, fs in ordered)
            smallest = ordered[-1]
            raise InconsistentSeriesError(
                f"{where}: slices differ in {name}: {listing} (e.g. {smallest[0]} in {_names(smallest[1])}). "
                f"One volume needs one {name}; split the series (e.g. remove localizer or reformatted slices) "
                "and load each part on its own."
            )

    distinct("image size (rows×columns)", [f"{f.rows}×{f.columns}" for f in frames])
    distinct("pixel format", [f.pixel_format for f in frames])
    distinct("modality", [f.modality or "?" for f in frames])
    if any(f.orientation is None for f in frames) or any(f.position is None for f in frames):
        if len(frames) > 1:
            missing = [f for f in frames if f.orientation is None or f.position is None]
            raise InconsistentSeriesError(
                f"{where}: slices without ImagePositionPatient/ImageOrientationPatient (e.g. {_names(missing)}) "
                "cannot be stacked into a volume. Load a single file instead."
            )
        return
    ref = frames[0].orientation
    assert ref is not None
    bad = [f for f in frames if not np.allclose(f.orientation, ref, atol=_ORIENTATION_ATOL)]  # type: ignore[arg-type]
    if bad:
        distinct("orientation", [np.round(np.asarray(f.orientation), 4).tolist() for f in frames])
    spacings = [f.pixel_spacing for f in frames]
    if any(s is None or not np.allclose(s, spacings[0] or (0.0, 0.0), rtol=1e-4) for s in spacings):
        distinct("pixel spacing", spacings)


def _normal(frames: Sequence[_Frame]) -> np.ndarray:
    ori = frames[0].orientation
    assert ori is not None
    return np.cross(ori[:3], ori[3:])


def _dedupe(frames: list[_Frame], where: str) -> list[_Frame]:
    """The same instance (SOP Instance UID and frame) seen twice, e.g. a copied file, is kept once."""
    seen: dict[tuple[str, int | None, tuple[float, ...]], _Frame] = {}
    out = []
    for f in frames:
        if f.sop_instance_uid and f.position is not None:
            key = (f.sop_instance_uid, f.frame, tuple(np.round(f.position, 3).tolist()))
            if key in seen:
                log.info("%s: %s duplicates %s (same SOP Instance UID); kept once", where, f.path, seen[key].path)
                continue
            seen[key] = f
        out.append(f)
    return out


def _split_volumes(frames: list[_Frame], where: str) -> list[tuple[str, list[_Frame]]]:
    """Frames grouped into volumes when every slice position holds the same number (> 1) of frames.

    Volumes are told apart by each frame's ``volume_key`` (dimension index values, or temporal position / echo /
    trigger time / acquisition / image type) and ordered by it, as dcm2niix orders them; when the keys do not
    give one frame per position and volume, the n-th frame of each position (in key, InstanceNumber and frame
    order) goes to volume n. One volume: ``[("", frames)]``.
    """
    if any(f.position is None or f.orientation is None for f in frames) or len(frames) < 2:
        return [("", frames)]
    normal = _normal(frames)
    dist = np.array([float(f.position @ normal) for f in frames])  # type: ignore[operator]
    order = np.argsort(dist, kind="stable")
    at: list[list[_Frame]] = []
    last = None
    for idx in order:
        if last is None or abs(dist[idx] - last) >= _POSITION_ATOL_MM:
            at.append([])
        at[-1].append(frames[idx])
        last = dist[idx]
    counts = {len(g) for g in at}
    if counts == {1}:
        return [("", frames)]
    if len(counts) > 1:
        return [("", frames)]  # uneven: _sorted_stack reports the duplicates
    m = counts.pop()
    by_key: dict[tuple[Any, ...], list[_Frame]] = defaultdict(list)
    for f in frames:
        by_key[f.volume_key].append(f)
    if len(by_key) == m and all(len(v) == len(at) for v in by_key.values()):
        keyed = sorted(by_key.items(), key=lambda kv: kv[0])
        if all(len({round(float(f.position @ normal), 3) for f in v}) == len(at)  # type: ignore[operator]
               for _, v in keyed):
            return [(v[0].volume_label or f"volume {n}", v) for n, (_, v) in enumerate(keyed)]
    volumes: list[list[_Frame]] = [[] for _ in range(m)]
    for g in at:
        ranked = sorted(g, key=lambda f: (f.volume_key, f.instance_number, f.frame or 0, f.path))
        for n, f in enumerate(ranked):
            volumes[n].append(f)
    return [(f"volume {n} (frame {n + 1} at each position)", v) for n, v in enumerate(volumes)]


def _pick_volume(volumes: list[tuple[str, list[_Frame]]], where: str, volume: int | None) -> list[_Frame]:
    if len(volumes) == 1 and volume in (None, 0):
        return volumes[0][1]
    listing = "; ".join(f"{n}: {len(fs)} slices, {label}" for n, (label, fs) in enumerate(volumes))
    if volume is None:
        raise MultipleVolumesError(
            f"{where}: holds {len(volumes)} volumes at the same slice positions ({listing}). Choose one with "
            "load_volume(path, volume=N) or `--volume N` on the command line."
        )
    if not 0 <= volume < len(volumes):
        raise MultipleVolumesError(
            f"{where}: no volume {volume}; it holds {len(volumes)} (numbered from 0: {listing})."
        )
    return volumes[volume][1]


def _sorted_stack(frames: list[_Frame], where: str) -> tuple[list[_Frame], np.ndarray, float]:
    """Sort along the slice normal; validate; return frames, LPS normal and the slice step in mm."""
    normal = _normal(frames)
    dist = np.array([float(f.position @ normal) for f in frames])  # type: ignore[operator]
    order = np.argsort(dist, kind="stable")
    frames = [frames[i] for i in order]
    dist = dist[order]

    # Different instances at one position are an error (the same instance twice was dropped by _dedupe).
    for idx in range(1, len(frames)):
        if abs(dist[idx] - dist[idx - 1]) < _POSITION_ATOL_MM:
            same = [f for f in frames if abs(float(f.position @ normal) - dist[idx]) < _POSITION_ATOL_MM]  # type: ignore[operator]
            raise DuplicateSlicesError(
                f"{where}: {len(same)} different slices at the same position {dist[idx]:.3f} mm along the slice "
                f"normal: {[f.name() for f in same]}. The series probably mixes acquisitions (echoes, phases, "
                "repeats) in uneven numbers, or a slice's position is damaged; keep one set."
            )
    if len(frames) == 1:
        f = frames[0]
        return frames, normal, float(f.spacing_between_slices or f.slice_thickness or 1.0)

    # Gantry tilt: positions must run along the normal.
    lateral = np.array([f.position - (f.position @ normal) * normal for f in frames])  # type: ignore[operator]
    centre = np.median(lateral, axis=0)
    off = np.linalg.norm(lateral - centre, axis=1)
    extent = dist[-1] - dist[0]
    if np.max(np.linalg.norm(lateral - lateral[0], axis=1)) > max(0.01, 1e-4 * extent):
        angle = np.degrees(np.arctan2(np.linalg.norm(lateral[-1] - lateral[0]), extent))
        tilt = _safe_str(frames[0].ds, "GantryDetectorTilt")
        worst = [frames[i] for i in np.argsort(-off, kind="stable")[:3] if off[i] > max(0.01, 1e-4 * extent)]
        raise GantryTiltError(
            f"{where}: slices are not stacked along their normal (gantry tilt ≈ {angle:.2f}°"
            + (f", GantryDetectorTilt {tilt}" if tilt else "")
            + f"; farthest off the stack: {_names(worst or [frames[0], frames[-1]])}). medseg does not resample "
            "tilted series; correct it first (e.g. dcm2niix, which writes a tilt-corrected NIfTI) and load that. "
            "If only one slice is off, its position is damaged: remove it."
        )

    gaps = np.diff(dist)
    step = float(np.median(gaps))
    tol = max(_SPACING_ATOL_MM, _SPACING_RTOL * step)
    if np.any(np.abs(gaps - step) > tol):
        ratio = gaps / step

        def between(i: int) -> str:
            return (f"between {dist[i]:.2f} mm ({frames[i].name()}) and {dist[i + 1]:.2f} mm "
                    f"({frames[i + 1].name()})")

        whole = np.abs(ratio - np.round(ratio)) <= tol / step
        if np.all(whole) and np.all(np.round(ratio) >= 1):
            where_gaps = [f"{between(int(i))} ({round(ratio[i]) - 1} missing)" for i in np.nonzero(np.round(ratio) > 1)[0]]
            raise MissingSlicesError(
                f"{where}: slices are missing (spacing {step:.3f} mm): " + "; ".join(where_gaps[:5])
                + (" ..." if len(where_gaps) > 5 else "") + ". Re-export the complete series from the PACS."
            )
        odd = [f"{dist[i]:.2f}→{dist[i + 1]:.2f} mm (gap {gaps[i]:.3f}; {frames[i].name()}, {frames[i + 1].name()})"
               for i in np.nonzero(np.abs(gaps - step) > tol)[0]]
        raise NonUniformSpacingError(
            f"{where}: slice spacing is not uniform (median {step:.3f} mm; differing gaps at "
            + ", ".join(odd[:5]) + (" ..." if len(odd) > 5 else "")
            + "). Resample the series to uniform spacing first (e.g. dcm2niix) and load that; a single odd slice "
            "may have a damaged position."
        )
    return frames, normal, float((dist[-1] - dist[0]) / (len(frames) - 1))


def _rescale(raw: np.ndarray, frames: Sequence[_Frame]) -> np.ndarray:
    """Apply RescaleSlope/Intercept to the stacked stored values (k, rows, columns).

    An integer shift (slope 1, integral intercept) keeps integers: int16 when the shifted values fit, else int32.
    Anything else gives float32.
    """
    slopes = np.array([f.slope for f in frames], dtype=np.float64)
    inters = np.array([f.intercept for f in frames], dtype=np.float64)
    if np.all(slopes == 1.0) and np.all(inters == 0.0):
        return raw
    if raw.dtype.kind in "iu" and np.all(slopes == 1.0) and np.all(inters == np.round(inters)):
        lo, hi = float(raw.min()) + inters.min(), float(raw.max()) + inters.max()
        target = next((np.dtype(t) for t in (np.int16, np.int32) if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max),
                      None)
        if target is not None:
            if raw.dtype == target:
                out = raw
            elif (raw.dtype.itemsize == target.itemsize and raw.dtype.kind == "u"
                  and float(raw.max()) <= float(np.iinfo(target.type).max)):
                out = raw.view(target)  # same values, reinterpreted in place: no second copy of the volume
            else:
                out = raw.astype(target)
            if np.all(inters == inters[0]):
                out += target.type(inters[0])
            else:
                out += inters.astype(target)[:, None, None]
            return out
    out = raw.astype(np.float32)
    if np.all(slopes == slopes[0]) and np.all(inters == inters[0]):
        out *= np.float32(slopes[0])
        out += np.float32(inters[0])
    else:
        out *= slopes.astype(np.float32)[:, None, None]
        out += inters.astype(np.float32)[:, None, None]
    return out


def _raw_dtype(pixel_format: tuple[int, int, int, int, str]) -> np.dtype | None:
    bits_alloc, _, signed, spp, _ = pixel_format
    if spp != 1 or bits_alloc not in (8, 16, 32):
        return None
    return np.dtype(f"<{'i' if signed else 'u'}{bits_alloc // 8}")


def _read_uncompressed(frame: _Frame, raw_dtype: np.dtype, out: np.ndarray | None) -> np.ndarray:
    """Read native little-endian pixel values straight from the file (into ``out`` when given)."""
    expected = frame.rows * frame.columns
    n_frames = 1 if frame.frame is None else int(frame.ds.get("NumberOfFrames", 1))
    nbytes = expected * raw_dtype.itemsize * n_frames
    assert frame.pixel_offset is not None
    with open(frame.path, "rb") as fh:
        fh.seek(frame.pixel_offset)
        head = fh.read(12)
        implicit = frame.transfer_syntax == "1.2.840.10008.1.2"
        length = int.from_bytes(head[4:8] if implicit else head[8:12], "little")
        if len(head) < 12 or length == 0xFFFFFFFF or length < nbytes:
            raise UnreadableFileError(
                f"{frame.path}: pixel data is truncated or malformed ({length if len(head) >= 12 else 0} bytes "
                f"declared, {nbytes} expected for {n_frames}×{frame.rows}×{frame.columns} pixels). Re-export the file."
            )
        fh.seek(frame.pixel_offset + (8 if implicit else 12) + (frame.frame or 0) * expected * raw_dtype.itemsize)
        target = out if out is not None and out.dtype == raw_dtype else np.empty((frame.rows, frame.columns), raw_dtype)
        got = fh.readinto(memoryview(target).cast("B"))  # type: ignore[arg-type]
    if got != expected * raw_dtype.itemsize:
        raise UnreadableFileError(
            f"{frame.path}: pixel data is truncated ({got} of {expected * raw_dtype.itemsize} bytes). Re-export the file."
        )
    return target


def _keep_bits_stored(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """Keep only the Bits Stored bits: mask unsigned values, sign-extend signed ones (in place when writable)."""
    bits = arr.dtype.itemsize * 8
    if arr.dtype.kind not in "iu" or not 0 < bits_stored < bits:
        return arr
    if not arr.flags.writeable:
        arr = arr.copy()
    if arr.dtype.kind == "u":
        np.bitwise_and(arr, arr.dtype.type((1 << bits_stored) - 1), out=arr)
    else:
        shift = bits - bits_stored
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr


def _decoded(frame: _Frame, cache: dict[str, np.ndarray]) -> np.ndarray:
    """Pixel values through pydicom's decoders (compressed, deflated, big endian, float, colour)."""
    import pydicom

    if frame.path not in cache:
        cache.clear()  # one file at a time (multi-frame files are decoded once for all their frames)
        cache[frame.path] = pydicom.dcmread(frame.path).pixel_array
    arr = cache[frame.path]
    if frame.frame is not None and int(frame.ds.get("NumberOfFrames", 1)) > 1:
        arr = arr[frame.frame]
    return arr


#: Compressed single-frame series with at least this many slices are decoded in several processes.
PARALLEL_DECODE_MIN_SLICES = 16


def _decode_files(paths: list[str]) -> list[np.ndarray | str]:
    """Worker: decode whole files with pydicom; an error comes back as its message."""
    import pydicom

    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(pydicom.dcmread(path).pixel_array)
        except Exception as exc:  # noqa: BLE001 - reported by the parent, with the file name
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def _fork_is_safe() -> bool:
    """True when no other Python thread runs, so a forked child cannot inherit a lock held mid-operation.

    Idle native pools (OpenBLAS, OpenMP) are tolerated, as PyTorch's DataLoader workers tolerate them.
    """
    import threading

    return threading.active_count() == 1 and threading.current_thread() is threading.main_thread()


def _parallel_decode(frames: Sequence[_Frame], workers: int | None = None) -> dict[str, np.ndarray]:
    """Decode a compressed single-frame series in forked worker processes, when that is safe and worth it.

    The JPEG 2000 / JPEG-LS decoders hold the GIL, so threads do not help. Forking is only safe in a
    process without other Python threads (see :func:`_fork_is_safe`); otherwise, and for small series, the caller
    decodes serially. Forked workers never re-import ``__main__``, so scripts need no ``if __name__ == "__main__"`` guard.
    ``workers``: None decides as above (up to 8 processes); 1 never forks; N > 1 forks up to N processes and, where
    forking is not safe, decodes serially with a logged warning (never silently).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    compressed = frames[0].transfer_syntax not in _UNCOMPRESSED_NATIVE
    if workers == 1 or (not compressed or cpus < 2 or len(frames) < PARALLEL_DECODE_MIN_SLICES
                        or any(f.frame is not None for f in frames)):
        return {}
    if "fork" not in multiprocessing.get_all_start_methods() or not _fork_is_safe():
        if workers is not None:
            log.warning("decode_workers=%d asked for, but forking is not safe here (other threads run, or no fork "
                        "start method): decoding %d compressed slices serially", workers, len(frames))
        return {}
    workers = min(cpus, 8) if workers is None else workers
    paths = [f.path for f in frames]
    n_chunks = min(len(paths), workers * 4)
    chunks = [paths[i::n_chunks] for i in range(n_chunks)]
    decoded: dict[str, np.ndarray] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for chunk, results in zip(chunks, pool.map(_decode_files, chunks), strict=True):
            for path, result in zip(chunk, results, strict=True):
                if isinstance(result, np.ndarray):
                    decoded[path] = result  # failures are decoded again serially, which names the file
    return decoded


def _pixels(frame: _Frame, cache: dict[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """The stored pixel values of one frame, shape (rows, columns); read into ``out`` when its dtype fits."""
    raw_dtype = _raw_dtype(frame.pixel_format)
    try:
        if frame.transfer_syntax in _UNCOMPRESSED_NATIVE and raw_dtype is not None and frame.pixel_offset is not None:
            arr = _read_uncompressed(frame, raw_dtype, out)
        elif frame.path in cache and frame.frame is None:
            arr = cache.pop(frame.path)  # decoded ahead by the worker processes
        else:
            arr = _decoded(frame, cache)
    except MedsegError:
        raise
    except MemoryError:
        raise UnreadableFileError(f"{frame.path}: corrupt pixel data (impossible length).") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; name the file and the syntax
        raise UnreadableFileError(
            f"{frame.path}: cannot decode pixel data (transfer syntax {frame.transfer_syntax or 'unknown'}; "
            f"{type(exc).__name__}: {exc}). The file may be truncated or need a decoder: medseg uses pydicom with "
            "pylibjpeg-openjpeg, pylibjpeg-libjpeg, pylibjpeg-rle and pyjpegls. Re-export or remove the file."
        ) from None
    arr = _keep_bits_stored(arr, frame.pixel_format[1])
    if arr.ndim == 3 and frame.pixel_format[3] > 1:  # colour (rows, cols, samples): luminance-weighted grey
        arr = arr @ np.array([0.299, 0.587, 0.114])[: arr.shape[-1]]
    if arr.shape != (frame.rows, frame.columns):
        raise UnreadableFileError(
            f"{frame.path}: decoded pixel array has shape {arr.shape}, expected ({frame.rows}, {frame.columns}). "
            "Re-export or remove the file."
        )
    return arr


def _build_volume(frames: list[_Frame], where: str, *, volume: int | None = None,
                  skipped: tuple[SkippedFile, ...] = (), decode_workers: int | None = None) -> Volume:
    _check_consistent(frames, where)
    frames = _dedupe(frames, where)
    first = frames[0]
    if first.orientation is not None and first.position is not None:
        frames = _pick_volume(_split_volumes(frames, where), where, volume)
        frames, normal, step = _sorted_stack(frames, where)
        r, c = first.orientation[:3], first.orientation[3:]
        origin = frames[0].position
    else:  # a lone 2D image without patient geometry: identity orientation at the origin
        _pick_volume([("", frames)], where, volume)
        r, c, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
        origin, step = np.zeros(3), float(first.spacing_between_slices or first.slice_thickness or 1.0)
        log.warning("%s: no ImagePositionPatient/ImageOrientationPatient; using an identity grid", where)
    row_mm, col_mm = first.pixel_spacing or (1.0, 1.0)
    if first.pixel_spacing is None:
        log.warning("%s: no PixelSpacing; assuming 1 mm pixels", where)
    modality = first.modality or None
    cache: dict[str, np.ndarray] = _parallel_decode(frames, decode_workers)
    raw0 = _pixels(frames[0], cache)
    raw = np.empty((len(frames), first.rows, first.columns), dtype=raw0.dtype)
    raw[0] = raw0
    for k in range(1, len(frames)):
        arr = _pixels(frames[k], cache, out=raw[k])
        if arr is not raw[k] and not np.shares_memory(arr, raw[k]):
            raw[k] = arr  # decoded elsewhere (or another dtype): copy in
    out = _rescale(raw, frames) if modality != "MR" else raw
    lps = np.eye(4)
    lps[:3, 0] = r * col_mm  # i runs along a row: column index, spaced by PixelSpacing[1]
    lps[:3, 1] = c * row_mm  # j runs down a column: row index, spaced by PixelSpacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = origin
    ds = first.ds
    source = SourceReferences(
        files=tuple(f.path for f in frames),
        sop_instance_uids=tuple(f.sop_instance_uid for f in frames),
        study_instance_uid=_safe_str(ds, "StudyInstanceUID") or None,
        series_instance_uid=_safe_str(ds, "SeriesInstanceUID") or None,
        frame_of_reference_uid=first.frame_of_reference_uid or None,
        sop_class_uid=_sop_class(ds) or None,
        series_description=_safe_str(ds, "SeriesDescription") or None,
        positions_mm=tuple((-float(f.position[0]), -float(f.position[1]), float(f.position[2]))  # LPS → RAS
                           for f in frames if f.position is not None) if first.position is not None else (),
        skipped=skipped,
    )
    # (k, j, i) stacked → (i, j, k): a transposed view, no copy.
    return Volume(out.transpose(2, 1, 0), LPS_TO_RAS @ lps, modality=modality, source=source)


def _chosen_series(folder: Path, series_uid: str | None, skip_unreadable: bool
                   ) -> tuple[_Series, str, tuple[SkippedFile, ...]]:
    survey = _survey(folder)
    skipped = _settle(survey, folder, skip_unreadable=skip_unreadable)
    chosen = _choose(survey.series, folder, series_uid)
    return chosen, f"{folder} (series {chosen.key})", skipped


def load_dicom_series(folder: str | Path, *, series_uid: str | None = None, volume: int | None = None,
                      skip_unreadable: bool = False, decode_workers: int | None = None) -> Volume:
    """Load one image series from a folder of DICOM files (any names, subfolders included).

    Parameters
    ----------
    folder : path
        Folder to search.
    series_uid : str, optional
        SeriesInstanceUID (or ``fallback:<hash>`` key from :func:`list_series`) to load when there are several.
    volume : int, optional
        Which volume (from 0, see :func:`list_volumes`) of a series holding several at the same positions.
    skip_unreadable : bool
        Leave damaged files out with a warning (recorded in ``volume.source.skipped``) instead of failing.
    decode_workers : int, optional
        Processes that decode a compressed series (see :func:`medseg.io.load_volume`).

    Returns
    -------
    Volume
        Slices sorted along the normal; CT in HU.

    Raises
    ------
    NoImageSeriesError, MultipleSeriesError, MultipleVolumesError, MissingSlicesError, NonUniformSpacingError,
    InconsistentSeriesError, DuplicateSlicesError, GantryTiltError, UnreadableFileError
        See the module docstring; each message names the folder or file and what to do.
    """
    folder = Path(folder)
    chosen, where, skipped = _chosen_series(folder, series_uid, skip_unreadable)
    return _build_volume(chosen.frames, where, volume=volume, skipped=skipped, decode_workers=decode_workers)


def _file_frames(path: Path) -> list[_Frame]:
    got = _examine(str(path))
    if isinstance(got, str):
        if got == "not a DICOM file":
            raise UnreadableFileError(f"{path}: not a DICOM file (no DICM marker and no parseable DICOM header).")
        raise UnreadableFileError(f"{path}: {got}; medseg loads images from DICOM image objects.")
    return got


def load_dicom_file(path: str | Path, *, volume: int | None = None) -> Volume:
    """Load a single DICOM file: one slice (a one-slice volume) or an enhanced / legacy multi-frame image.

    Parameters
    ----------
    path : path
        The file.
    volume : int, optional
        Which volume (from 0, see :func:`list_volumes`) of a multi-frame file holding several at the same
        positions (magnitude and field map, echoes, time points).

    Raises
    ------
    UnreadableFileError
        If the file is not DICOM, is corrupt, or holds no image.
    MultipleVolumesError
        If it holds several volumes and ``volume`` is not given or out of range.
    DicomSeriesError
        If a multi-frame file's frames do not form one volume.
    """
    path = Path(path)
    return _build_volume(_file_frames(path), str(path), volume=volume)


def list_volumes(path: str | Path, *, series_uid: str | None = None, skip_unreadable: bool = False
                 ) -> list[VolumeInfo]:
    """The volumes a DICOM file or series holds at the same slice positions (one for an ordinary series).

    Parameters
    ----------
    path : path
        DICOM file or folder.
    series_uid : str, optional
        For a folder holding several series.
    skip_unreadable : bool
        As for :func:`load_dicom_series`.

    Returns
    -------
    list of VolumeInfo
        In the order ``volume=`` numbers them.

    Raises
    ------
    MedsegError
        As :func:`load_dicom_series` / :func:`load_dicom_file` for the series or file.
    """
    p = Path(path)
    if p.is_dir():
        chosen, where, _ = _chosen_series(p, series_uid, skip_unreadable)
        frames = chosen.frames
    else:
        frames, where = _file_frames(p), str(p)
    _check_consistent(frames, where)
    volumes = _split_volumes(_dedupe(frames, where), where)
    return [VolumeInfo(index=n, n_slices=len(fs), description=label) for n, (label, fs) in enumerate(volumes)]


__all__ += ["DicomSeriesError"]
