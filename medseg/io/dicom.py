"""DICOM series discovery, selection, validation and loading.

How a folder becomes one volume, as the careful converters (dcm2niix, SimpleITK/GDCM, highdicom) do it:

1. **Discovery.** Every file under the folder is tried, whatever its name or extension. Files that are not
   DICOM (no ``DICM`` preamble and not parseable) are skipped. DICOM objects that are not images are skipped:
   no pixel data, or a SOP class that is a segmentation, structured report, RT object, presentation state,
   key object, encapsulated document or raw data.
2. **Grouping.** Images are grouped by SeriesInstanceUID. When that UID is blank (anonymisers sometimes blank
   it), the *fallback key* ``FrameOfReferenceUID | ImageOrientationPatient (rounded to 1e-4) | Rows×Columns``
   groups them instead; such a series is named ``fallback:<hash>`` in listings and can be chosen by that name.
3. **Validation** inside a series: one orientation, one size, one pixel spacing and pixel format
   (:class:`~medseg.errors.InconsistentSeriesError`); no two different instances at one position
   (:class:`~medseg.errors.DuplicateSlicesError` — the same SOP Instance UID seen twice, e.g. a copied file,
   is kept once); slices stacked along the slice normal (:class:`~medseg.errors.GantryTiltError` otherwise:
   medseg does not resample tilted series, it refuses them); uniform spacing
   (:class:`~medseg.errors.MissingSlicesError` when gaps are whole multiples of the spacing,
   :class:`~medseg.errors.NonUniformSpacingError` otherwise). Spacing counts as uniform when every gap is
   within 1 % (and at least 0.01 mm) of the median gap.
4. **Sorting** by position along the slice normal (never InstanceNumber or file name).
5. **Pixels**: uncompressed data is read straight into the output array; compressed transfer syntaxes (JPEG
   2000, JPEG-LS, JPEG baseline/lossless, RLE) are decoded by pydicom's pylibjpeg / pyjpegls plugins. CT (and
   every modality but MR) comes back rescaled (HU for CT); MR comes back as stored. The output is int16 or int32
   when the rescale is an integer shift, float32 otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
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
    NoImageSeriesError,
    NonUniformSpacingError,
    UnreadableFileError,
)
from medseg.geometry import LPS_TO_RAS
from medseg.volume import SourceReferences, Volume

__all__ = ["SeriesInfo", "is_dicom_file", "list_series", "load_dicom_file", "load_dicom_series"]

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

_UNCOMPRESSED_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
_ORIENTATION_ATOL = 1e-4
_SPACING_RTOL = 0.01
_SPACING_ATOL_MM = 0.01


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
    """

    key: str
    series_instance_uid: str
    description: str
    modality: str
    n_slices: int
    files: tuple[str, ...] = field(repr=False)

    def describe(self) -> str:
        """One line for listings."""
        return (
            f"series_uid={self.key!r}  description={self.description!r}  modality={self.modality or '?'}  "
            f"slices={self.n_slices}"
        )


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
    pixel_offset: int | None = None  # where the pixel data element starts in the file


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


_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")  # Pixel, Float, Double


def _is_image(ds: Any, has_pixels: bool) -> bool:
    if not has_pixels:
        return False
    sop = _sop_class(ds)
    return not any(sop.startswith(p) for p in NON_IMAGE_SOP_CLASS_PREFIXES)


def _read_header(path: str, *, strict: bool) -> tuple[Any, int | None] | None:
    """Parse a file's DICOM header up to the pixel data.

    Returns the dataset and the file offset of the pixel data element (None when there is none), or None for
    non-DICOM files when not ``strict``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            offset = fh.tell()
            tag = fh.read(4)
    except InvalidDicomError:
        if strict:
            raise UnreadableFileError(
                f"{path}: not a DICOM file (no DICM preamble and no parseable DICOM header)."
            ) from None
        return None
    except MemoryError:
        raise UnreadableFileError(f"{path}: corrupt DICOM header (an element claims an impossible length).") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input; name the file
        if not strict and not is_dicom_file(path):
            return None
        raise UnreadableFileError(
            f"{path}: truncated or corrupt DICOM file ({type(exc).__name__}: {exc}). Re-export or remove it."
        ) from None
    return ds, (offset if tag in _PIXEL_TAGS else None)


def _frame_facts(path: str, ds: Any, pixel_offset: int | None) -> list[_Frame]:
    """Turn one image dataset into frames, with every header value it needs parsed (errors name the file)."""
    try:
        frames = _frame_facts_unchecked(path, ds)
        for f in frames:
            f.pixel_offset = pixel_offset
        return frames
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - lazily parsed values of a corrupt header fail here
        raise UnreadableFileError(
            f"{path}: corrupt DICOM header ({type(exc).__name__}: {exc}). Re-export or remove the file."
        ) from None


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _first(seq: Any) -> Any:
    return seq[0] if seq else None


def _frame_facts_unchecked(path: str, ds: Any) -> list[_Frame]:
    rows, cols = int(_value(ds, "Rows") or 0), int(_value(ds, "Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise UnreadableFileError(f"{path}: image size {rows}×{cols} is empty.")
    bits_alloc = int(_or(_value(ds, "BitsAllocated"), 16))
    bits_stored = int(_or(_value(ds, "BitsStored"), bits_alloc))
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

    def frame(
        idx: int | None, pos: Any, ori: Any, spacing: Any, slope: Any, inter: Any, thick: Any, between_: Any
    ) -> _Frame:
        ps = _floats(spacing, 2, "PixelSpacing", path)
        if ps is not None and np.any(ps <= 0):
            raise UnreadableFileError(f"{path}: PixelSpacing must be positive, found {ps.tolist()}.")
        ori_arr = _floats(ori, 6, "ImageOrientationPatient", path)
        if ori_arr is not None:
            r, c = ori_arr[:3], ori_arr[3:]
            if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(r @ c) > 1e-2:
                raise UnreadableFileError(
                    f"{path}: ImageOrientationPatient {ori_arr.tolist()} is not two orthogonal unit vectors."
                )
            ori_arr = np.concatenate([r / np.linalg.norm(r), c / np.linalg.norm(c)])
        s = float(slope) if slope not in (None, "") else 1.0
        i = float(inter) if inter not in (None, "") else 0.0
        if not (np.isfinite(s) and np.isfinite(i)) or s == 0:
            raise UnreadableFileError(f"{path}: invalid RescaleSlope/Intercept {slope!r}/{inter!r}.")
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
        )

    if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced multi-frame
        n_frames = int(_or(_value(ds, "NumberOfFrames"), 1))
        shared = _first(ds.get("SharedFunctionalGroupsSequence")) or {}
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if len(per_frame) != n_frames:
            raise UnreadableFileError(
                f"{path}: NumberOfFrames is {n_frames} but PerFrameFunctionalGroupsSequence has {len(per_frame)} items."
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
            frames.append(
                frame(
                    f,
                    pos.get("ImagePositionPatient") if pos else None,
                    ori.get("ImageOrientationPatient") if ori else None,
                    meas.get("PixelSpacing") if meas else None,
                    pvt.get("RescaleSlope") if pvt else _value(ds, "RescaleSlope"),
                    pvt.get("RescaleIntercept") if pvt else _value(ds, "RescaleIntercept"),
                    meas.get("SliceThickness") if meas else None,
                    meas.get("SpacingBetweenSlices") if meas else None,
                )
            )
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
            frames.append(
                frame(f, pos, ori0, spacing, _value(ds, "RescaleSlope"), _value(ds, "RescaleIntercept"), thickness, between)
            )
        return frames
    return [
        frame(
            None,
            _value(ds, "ImagePositionPatient"),
            _value(ds, "ImageOrientationPatient"),
            spacing,
            _value(ds, "RescaleSlope"),
            _value(ds, "RescaleIntercept"),
            thickness,
            between,
        )
    ]


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
    raw = f"{_str(ds, 'FrameOfReferenceUID')}|{ori}|{frame.rows}x{frame.columns}"
    return "fallback:" + hashlib.sha1(raw.encode()).hexdigest()[:12], ""


@dataclass
class _Series:
    key: str
    uid: str
    frames: list[_Frame] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def info(self) -> SeriesInfo:
        ds = self.frames[0].ds
        return SeriesInfo(
            key=self.key,
            series_instance_uid=self.uid,
            description=_str(ds, "SeriesDescription"),
            modality=_str(ds, "Modality"),
            n_slices=len(self.frames),
            files=tuple(self.files),
        )


def _discover(paths: Iterable[str], *, strict: bool) -> dict[str, _Series]:
    series: dict[str, _Series] = {}
    for path in paths:
        header = _read_header(path, strict=strict)
        if header is None:
            log.debug("skipping non-DICOM file %s", path)
            continue
        ds, pixel_offset = header
        try:
            image = _is_image(ds, pixel_offset is not None)
        except Exception as exc:  # noqa: BLE001
            raise UnreadableFileError(f"{path}: corrupt DICOM header ({type(exc).__name__}: {exc}).") from None
        if not image:
            log.debug("skipping non-image DICOM object %s (SOP class %s)", path, _sop_class(ds))
            continue
        frames = _frame_facts(path, ds, pixel_offset)
        key, uid = _series_key(ds, frames[0])
        s = series.setdefault(key, _Series(key, uid))
        s.frames.extend(frames)
        s.files.append(path)
    return series


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The image series in a folder (subfolders included), largest first.

    Raises
    ------
    UnreadableFileError
        If a file that is DICOM cannot be parsed (the message names it).
    """
    found = _discover(_walk(Path(folder)), strict=False)
    return sorted((s.info() for s in found.values()), key=lambda i: (-i.n_slices, i.key))


def _choose(series: dict[str, _Series], folder: Path, series_uid: str | None) -> _Series:
    if not series:
        raise NoImageSeriesError(
            f"{folder}: no DICOM image series found (looked at every file in the folder and its subfolders; "
            "segmentations, reports, RT objects and non-DICOM files are ignored)."
        )
    if series_uid is not None:
        if series_uid in series:
            return series[series_uid]
        listing = "\n".join("  " + s.info().describe() for s in series.values())
        raise MultipleSeriesError(f"{folder}: no series {series_uid!r} here. Series found:\n{listing}")
    if len(series) == 1:
        return next(iter(series.values()))
    listing = "\n".join(
        "  " + i.describe() for i in sorted((s.info() for s in series.values()), key=lambda i: -i.n_slices)
    )
    raise MultipleSeriesError(
        f"{folder}: {len(series)} image series found and none chosen:\n{listing}\n"
        "Choose one with load_volume(path, series_uid=...) or `--series-uid` on the command line."
    )


def _check_consistent(frames: Sequence[_Frame], where: str) -> None:
    def distinct(name: str, values: list[Any]) -> None:
        counts: dict[str, int] = defaultdict(int)
        for v in values:
            counts[str(v)] += 1
        if len(counts) > 1:
            listing = ", ".join(f"{v} ({n} slices)" for v, n in counts.items())
            raise InconsistentSeriesError(
                f"{where}: slices differ in {name}: {listing}. One volume needs one {name}; "
                "split the series (e.g. remove localizer or reformatted slices) and load each part on its own."
            )

    distinct("image size (rows×columns)", [f"{f.rows}×{f.columns}" for f in frames])
    distinct("pixel format", [f.pixel_format for f in frames])
    if any(f.orientation is None for f in frames) or any(f.position is None for f in frames):
        if len(frames) > 1:
            missing = [f.path for f in frames if f.orientation is None or f.position is None][:3]
            raise InconsistentSeriesError(
                f"{where}: slices without ImagePositionPatient/ImageOrientationPatient (e.g. {missing}) cannot be "
                "stacked into a volume. Load a single file instead."
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


def _sorted_stack(frames: list[_Frame], where: str) -> tuple[list[_Frame], np.ndarray, float]:
    """Sort along the slice normal; validate; return frames, LPS normal and the slice step in mm."""
    ori = frames[0].orientation
    assert ori is not None
    normal = np.cross(ori[:3], ori[3:])
    dist = np.array([float(f.position @ normal) for f in frames])  # type: ignore[operator]
    order = np.argsort(dist, kind="stable")
    frames = [frames[i] for i in order]
    dist = dist[order]

    # Duplicate positions: the same instance twice is kept once; different instances there are an error.
    keep = [0]
    for idx in range(1, len(frames)):
        if abs(dist[idx] - dist[keep[-1]]) < 1e-3:
            a, b = frames[keep[-1]], frames[idx]
            if a.sop_instance_uid and a.sop_instance_uid == b.sop_instance_uid and a.frame == b.frame:
                log.info("%s: %s duplicates %s (same SOP Instance UID); kept once", where, b.path, a.path)
                continue
            same = [f.path if f.frame is None else f"{f.path} frame {f.frame + 1}" for f in frames
                    if abs(float(f.position @ normal) - dist[idx]) < 1e-3]  # type: ignore[operator]
            raise DuplicateSlicesError(
                f"{where}: {len(same)} different slices at the same position {dist[idx]:.3f} mm along the slice "
                f"normal: {same}. The series probably mixes acquisitions (echoes, phases, repeats); keep one set."
            )
        keep.append(idx)
    frames = [frames[i] for i in keep]
    dist = dist[keep]
    if len(frames) == 1:
        f = frames[0]
        return frames, normal, float(f.spacing_between_slices or f.slice_thickness or 1.0)

    # Gantry tilt: positions must run along the normal.
    p0 = frames[0].position
    offsets = np.array([f.position - p0 for f in frames])  # type: ignore[operator]
    lateral = offsets - np.outer(offsets @ normal, normal)
    extent = dist[-1] - dist[0]
    if np.max(np.linalg.norm(lateral, axis=1)) > max(0.01, 1e-4 * extent):
        angle = np.degrees(np.arctan2(np.linalg.norm(lateral[-1]), extent))
        tilt = frames[0].ds.get("GantryDetectorTilt", None)
        raise GantryTiltError(
            f"{where}: slices are not stacked along their normal (gantry tilt ≈ {angle:.2f}°"
            + (f", GantryDetectorTilt {tilt}" if tilt not in (None, "") else "")
            + "). medseg does not resample tilted series; correct it first (e.g. dcm2niix, which writes a "
            "tilt-corrected NIfTI) and load that."
        )

    gaps = np.diff(dist)
    step = float(np.median(gaps))
    tol = max(_SPACING_ATOL_MM, _SPACING_RTOL * step)
    if np.any(np.abs(gaps - step) > tol):
        ratio = gaps / step
        whole = np.abs(ratio - np.round(ratio)) <= tol / step
        if np.all(whole) and np.all(np.round(ratio) >= 1):
            where_gaps = [
                f"between {dist[i]:.2f} and {dist[i + 1]:.2f} mm ({round(ratio[i]) - 1} missing)"
                for i in np.nonzero(np.round(ratio) > 1)[0]
            ]
            raise MissingSlicesError(
                f"{where}: slices are missing (spacing {step:.3f} mm): " + "; ".join(where_gaps)
                + ". Re-export the complete series from the PACS."
            )
        odd = [f"{dist[i]:.2f}→{dist[i + 1]:.2f} mm (gap {gaps[i]:.3f})" for i in np.nonzero(np.abs(gaps - step) > tol)[0]]
        raise NonUniformSpacingError(
            f"{where}: slice spacing is not uniform (median {step:.3f} mm; differing gaps at "
            + ", ".join(odd[:10]) + (" ..." if len(odd) > 10 else "")
            + "). Resample the series to uniform spacing first (e.g. dcm2niix) and load that."
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
    _, bits_stored, signed, _, _ = frame.pixel_format
    if signed and bits_stored < raw_dtype.itemsize * 8:  # sign-extend from BitsStored
        shift = raw_dtype.itemsize * 8 - bits_stored
        np.left_shift(target, shift, out=target)
        np.right_shift(target, shift, out=target)
    return target


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


def _parallel_decode(frames: Sequence[_Frame]) -> dict[str, np.ndarray]:
    """Decode a compressed single-frame series in forked worker processes, when that is safe and worth it.

    The JPEG 2000 / JPEG-LS decoders hold the GIL, so threads do not help. Forking is only safe in a
    process without other Python threads (see :func:`_fork_is_safe`); otherwise, and for small series, the caller
    decodes serially. Forked workers never re-import ``__main__``, so scripts need no ``if __name__ == "__main__"`` guard.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    compressed = frames[0].transfer_syntax not in _UNCOMPRESSED_NATIVE
    if (not compressed or cpus < 2 or len(frames) < PARALLEL_DECODE_MIN_SLICES
            or any(f.frame is not None for f in frames) or "fork" not in multiprocessing.get_all_start_methods()
            or not _fork_is_safe()):
        return {}
    workers = min(cpus, 8)
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
            "pylibjpeg-openjpeg, pylibjpeg-libjpeg, pylibjpeg-rle and pyjpegls."
        ) from None
    if arr.ndim == 3 and frame.pixel_format[3] > 1:  # colour (rows, cols, samples): luminance-weighted grey
        arr = arr @ np.array([0.299, 0.587, 0.114])[: arr.shape[-1]]
    if arr.shape != (frame.rows, frame.columns):
        raise UnreadableFileError(
            f"{frame.path}: decoded pixel array has shape {arr.shape}, expected ({frame.rows}, {frame.columns})."
        )
    return arr


def _build_volume(frames: list[_Frame], where: str) -> Volume:
    _check_consistent(frames, where)
    first = frames[0]
    if first.orientation is not None and first.position is not None:
        frames, normal, step = _sorted_stack(frames, where)
        r, c = first.orientation[:3], first.orientation[3:]
        origin = frames[0].position
    else:  # a lone 2D image without patient geometry: identity orientation at the origin
        r, c, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
        origin, step = np.zeros(3), float(first.spacing_between_slices or first.slice_thickness or 1.0)
        log.warning("%s: no ImagePositionPatient/ImageOrientationPatient; using an identity grid", where)
    row_mm, col_mm = first.pixel_spacing or (1.0, 1.0)
    if first.pixel_spacing is None:
        log.warning("%s: no PixelSpacing; assuming 1 mm pixels", where)
    modality = _str(first.ds, "Modality").upper() or None
    cache: dict[str, np.ndarray] = _parallel_decode(frames)
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
        study_instance_uid=_str(ds, "StudyInstanceUID") or None,
        series_instance_uid=_str(ds, "SeriesInstanceUID") or None,
        frame_of_reference_uid=_str(ds, "FrameOfReferenceUID") or None,
        sop_class_uid=_sop_class(ds) or None,
        series_description=_str(ds, "SeriesDescription") or None,
        positions_mm=tuple((-float(f.position[0]), -float(f.position[1]), float(f.position[2]))  # LPS → RAS
                           for f in frames if f.position is not None) if first.position is not None else (),
    )
    # (k, j, i) stacked → (i, j, k): a transposed view, no copy.
    return Volume(out.transpose(2, 1, 0), LPS_TO_RAS @ lps, modality=modality, source=source)


def load_dicom_series(folder: str | Path, *, series_uid: str | None = None) -> Volume:
    """Load one image series from a folder of DICOM files (any names, subfolders included).

    Parameters
    ----------
    folder : path
        Folder to search.
    series_uid : str, optional
        SeriesInstanceUID (or ``fallback:<hash>`` key from :func:`list_series`) to load when there are several.

    Returns
    -------
    Volume
        Slices sorted along the normal; CT in HU.

    Raises
    ------
    NoImageSeriesError, MultipleSeriesError, MissingSlicesError, NonUniformSpacingError,
    InconsistentSeriesError, DuplicateSlicesError, GantryTiltError, UnreadableFileError
        See the module docstring; each message names the folder or file and what to do.
    """
    folder = Path(folder)
    series = _discover(_walk(folder), strict=False)
    chosen = _choose(series, folder, series_uid)
    where = f"{folder} (series {chosen.key})"
    return _build_volume(chosen.frames, where)


def load_dicom_file(path: str | Path) -> Volume:
    """Load a single DICOM file: one slice (a one-slice volume) or an enhanced / legacy multi-frame image.

    Raises
    ------
    UnreadableFileError
        If the file is not DICOM, is corrupt, or holds no image.
    DicomSeriesError
        If a multi-frame file's frames do not form one volume.
    """
    path = Path(path)
    header = _read_header(str(path), strict=True)
    assert header is not None
    ds, pixel_offset = header
    if not _is_image(ds, pixel_offset is not None):
        raise UnreadableFileError(
            f"{path}: this DICOM object is not an image (SOP class {_sop_class(ds) or 'unknown'}); "
            "medseg loads image series. DICOM SEG files are read with medseg.io.dicom_seg."
        )
    return _build_volume(_frame_facts(str(path), ds, pixel_offset), str(path))


__all__ += ["DicomSeriesError"]
