"""DICOM SEG in and out (highdicom writes, pydicom decodes): label volumes ↔ Segmentation Storage objects.

Writing (:func:`write_dicom_seg`)
    The labels must lie on the source scan's voxels (any axis order or direction: they are put back onto the
    acquisition grid exactly, never interpolated). Source instances are matched to the label slices by world
    position (ImagePositionPatient along the slice normal), never by array or file index; frames go in slice
    order. Study, Patient and Frame of Reference come from the source; the SEG is a new series.

    One segment per label present in the array (absent labels are left out). ``seg_type="binary"`` (the
    interoperable default) numbers segments 1..N in label-value order and records each original label value in
    the segment's SegmentDescription (``"label value 5"``), which :func:`load_segmentation` reads back;
    ``seg_type="labelmap"`` (Label Map Segmentation Storage, newer, far smaller for many labels) keeps the label
    values as segment numbers. Each segment carries its label's name, colour (CIELab) and coded concept
    (category, type, laterality modifier, anatomic region for lesions), resolved in this order: the ``codes``
    option, the label's own code (model card ``labels[].code``), the curated table shipped with medseg
    (:func:`medseg.labels.standard_segment_code`). A label with no code is an error; codes are never guessed.

    Sources with blank, missing or duplicate UIDs are refused (:class:`~medseg.errors.SourceUidError`); with
    ``repair_uids=True`` a repaired copy of the source series is written next to the SEG (``<seg>_source/``:
    SOP Class / Instance UIDs from the file meta, or generated; Study / Series / Frame of Reference UIDs generated
    deterministically from the sorted SOP Instance UIDs; pixel data untouched) and the SEG references that copy.

Reading (:func:`load_segmentation`; also what :func:`medseg.io.load_volume` does for a SEG file)
    BINARY, FRACTIONAL and LABELMAP SEGs of any file name. Frames are placed by their plane positions: on the
    SEG's own frame grid (the slab its frames span, slices without frames left empty), or on a ``reference``
    scan's grid. FRACTIONAL frames are thresholded: a voxel belongs to a segment when its value is at least half
    of MaximumFractionalValue. LABELMAP pixels equal to PixelPaddingValue (when present) are background.
    Overlapping segments cannot be one label map: :class:`~medseg.errors.OverlappingSegmentsError`, unless
    ``split=True``, which returns one mask per segment (a channel each).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.errors import (
    DicomSegError,
    EmptySegmentationError,
    GridMismatchError,
    LabelTableError,
    MedsegError,
    OverlappingSegmentsError,
    SegmentCodeError,
    SourceUidError,
    UnreadableFileError,
)
from medseg.geometry import LPS_TO_RAS
from medseg.labels import Code, Label, LabelKind, LabelTable, SegmentCode, standard_segment_code
from medseg.volume import SourceReferences, Volume

__all__ = [
    "SEG_SOP_CLASS_UIDS",
    "SegAlgorithm",
    "SegInfo",
    "SegmentInfo",
    "is_dicom_seg",
    "load_segmentation",
    "read_seg_info",
    "save_segment_masks",
    "write_dicom_seg",
]

log = logging.getLogger(__name__)

SegType = Literal["binary", "labelmap"]
AlgorithmType = Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"]
Compression = Literal["jpegls", "jpeg2000", "rle"]

#: Segmentation Storage and Label Map Segmentation Storage.
SEG_SOP_CLASS_UIDS = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
_TRANSFER_SYNTAX = {
    None: "1.2.840.10008.1.2.1",  # explicit VR little endian
    "jpegls": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "rle": "1.2.840.10008.1.2.5",  # RLE lossless
}
_BINARY_COMPRESSIONS = (None, "jpeg2000")  # 1-bit frames: highdicom encodes these only
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
#: Patient and study attributes of type 2 (present, possibly empty) that the SEG copies from its source.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_VALUE_RE = re.compile(r"label value (\d+)")
_LESION_CATEGORY = "49755003"  # SCT Morphologically Abnormal Structure
_PLANE_ATOL_MM = 1e-3


@dataclass(frozen=True)
class SegAlgorithm:
    """Who made the segmentation, written as each segment's Segmentation Algorithm Identification.

    Attributes
    ----------
    name : str
        Model name, e.g. ``"phantom-abdomen-ct"``.
    version : str
        Model version.
    weights_sha256 : str or None
        sha256 of the weights file (None for rule-based methods).
    medseg_version : str or None
        medseg's version; filled in by the writer when None.
    """

    name: str
    version: str
    weights_sha256: str | None = None
    medseg_version: str | None = None

    @classmethod
    def from_card(cls, card: Any) -> SegAlgorithm:
        """From a :class:`medseg.models.ModelCard` (name, version, weights sha256)."""
        weights = getattr(card, "weights", None)
        return cls(str(card.name), str(card.version), getattr(weights, "sha256", None) if weights else None)


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a DICOM SEG, as :func:`read_seg_info` lists it.

    Attributes
    ----------
    number : int
        Segment number in the file.
    value : int
        Label value the segment becomes in :func:`load_segmentation`'s label map.
    label : str
        SegmentLabel.
    code : SegmentCode or None
        Category, type, modifier and region.
    algorithm_type : str
        AUTOMATIC, SEMIAUTOMATIC or MANUAL.
    algorithm_name, algorithm_version : str or None
        From the Segmentation Algorithm Identification.
    voxels : int
        Voxels in the segment (after the FRACTIONAL threshold).
    """

    number: int
    value: int
    label: str
    code: SegmentCode | None
    algorithm_type: str
    algorithm_name: str | None
    algorithm_version: str | None
    voxels: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"number": self.number, "value": self.value, "label": self.label,
                "code": None if self.code is None else self.code.to_json(), "algorithm_type": self.algorithm_type,
                "algorithm_name": self.algorithm_name, "algorithm_version": self.algorithm_version,
                "voxels": self.voxels}


@dataclass(frozen=True)
class SegInfo:
    """What a DICOM SEG holds: type, segments, and the series it references.

    Attributes
    ----------
    path : Path
    seg_type : str
        BINARY, FRACTIONAL or LABELMAP.
    series_description : str
    referenced_series_uids : tuple of str
        Series Instance UIDs in ReferencedSeriesSequence.
    n_referenced_instances : int
    frame_of_reference_uid : str
    n_frames : int
    segments : tuple of SegmentInfo
    """

    path: Path
    seg_type: str
    series_description: str
    referenced_series_uids: tuple[str, ...]
    n_referenced_instances: int
    frame_of_reference_uid: str
    n_frames: int
    segments: tuple[SegmentInfo, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"path": str(self.path), "seg_type": self.seg_type, "series_description": self.series_description,
                "referenced_series_uids": list(self.referenced_series_uids),
                "n_referenced_instances": self.n_referenced_instances,
                "frame_of_reference_uid": self.frame_of_reference_uid, "n_frames": self.n_frames,
                "segments": [s.to_json() for s in self.segments]}


# ---------------------------------------------------------------------------------------------------------------
# shared geometry: a plane of pixels in LPS, pasted onto a voxel grid


@dataclass(frozen=True)
class _Plane:
    position: np.ndarray  # LPS mm of pixel (row 0, column 0)
    row_dir: np.ndarray  # LPS unit vector along a row (column index increases)
    col_dir: np.ndarray  # LPS unit vector down a column (row index increases)
    spacing: tuple[float, float]  # (between rows, between columns) mm

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)


def _plane_grid(planes: Sequence[_Plane], rows: int, columns: int, *, step_mm: float | None,
                where: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """The voxel grid the planes lie on: (order of planes along the normal, RAS affine, shape (I, J, K)).

    The k axis runs along the normal from the lowest plane; slices without a plane are allowed (gaps), planes off
    the lattice are not.
    """
    first = planes[0]
    for p in planes[1:]:
        if not (np.allclose(p.row_dir, first.row_dir, atol=1e-4) and np.allclose(p.col_dir, first.col_dir, atol=1e-4)
                and np.allclose(p.spacing, first.spacing, rtol=1e-4)):
            raise UnreadableFileError(f"{where}: frames differ in orientation or pixel spacing; medseg reads SEGs whose "
                                      "frames share one plane orientation and pixel spacing.")
    normal = first.normal
    dist = np.array([p.position @ normal for p in planes])
    order = np.argsort(dist, kind="stable")
    unique = np.unique(np.round(dist / _PLANE_ATOL_MM) * _PLANE_ATOL_MM)
    if step_mm is None or step_mm <= 0:
        step_mm = float(np.min(np.diff(unique))) if len(unique) > 1 else 1.0
    k = (dist - unique[0]) / step_mm
    if np.any(np.abs(k - np.round(k)) > 0.01):
        raise UnreadableFileError(f"{where}: frame positions are not on a regular slice grid (spacing {step_mm:.4g} mm); "
                                  "read it onto the scan it was made on: load_segmentation(path, reference=scan).")
    base = planes[int(order[0])].position
    lateral = np.array([p.position - base for p in planes])
    lateral -= np.outer(lateral @ normal, normal)
    if np.max(np.linalg.norm(lateral, axis=1)) > 0.01:
        raise UnreadableFileError(f"{where}: frames are not stacked along their normal (tilted or shifted planes); "
                                  "read it onto the scan it was made on: load_segmentation(path, reference=scan).")
    lps = np.eye(4)
    lps[:3, 0] = first.row_dir * first.spacing[1]
    lps[:3, 1] = first.col_dir * first.spacing[0]
    lps[:3, 2] = normal * step_mm
    lps[:3, 3] = base
    n_k = round(float(k.max())) + 1
    return order, LPS_TO_RAS @ lps, (columns, rows, n_k)


def _frame_index_map(plane: _Plane, inv_affine: np.ndarray) -> tuple[int, int, int, int, tuple[int, ...]] | None:
    """How a frame's pixels map onto a grid (given its inverse affine): (row axis, row sign, column axis, column
    sign, grid index of pixel (0, 0)), or None when the pixels are not the grid's voxel centres (another
    orientation, spacing or offset)."""
    inv = inv_affine

    def ijk(r: float, c: float) -> np.ndarray:
        lps = plane.position + c * plane.spacing[1] * plane.row_dir + r * plane.spacing[0] * plane.col_dir
        ras = LPS_TO_RAS[:3, :3] @ lps
        return inv[:3, :3] @ ras + inv[:3, 3]

    base = ijk(0, 0)
    d_col = ijk(0, 1) - base
    d_row = ijk(1, 0) - base
    if np.any(np.abs(base - np.round(base)) > 0.01):
        return None
    axes = []
    for d in (d_row, d_col):
        ax = int(np.argmax(np.abs(d)))
        if abs(abs(d[ax]) - 1) > 1e-3 or np.sum(np.abs(d)) - abs(d[ax]) > 1e-3:
            return None
        axes.append((ax, int(np.sign(d[ax]))))
    (r_ax, r_sign), (c_ax, c_sign) = axes
    if r_ax == c_ax:
        return None
    return r_ax, r_sign, c_ax, c_sign, tuple(int(v) for v in np.round(base))


def _run(base: int, sign: int, n: int, size: int) -> tuple[slice, slice] | None:
    """Where ``n`` pixels starting at grid index ``base`` going ``sign`` land inside ``[0, size)``: (grid slice,
    pixel slice), or None when none do."""
    idx = base + sign * np.arange(n)
    keep = np.nonzero((idx >= 0) & (idx < size))[0]
    if keep.size == 0:
        return None
    first, last = int(idx[keep[0]]), int(idx[keep[-1]])
    grid = slice(first, last + 1) if sign > 0 else slice(first, last - 1 if last > 0 else None, -1)
    return grid, slice(int(keep[0]), int(keep[-1]) + 1)


def _frame_view(array: np.ndarray, index_map: tuple[int, int, int, int, tuple[int, ...]], frame_shape: tuple[int, int]
                ) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """A (rows, columns) view of ``array`` (first 3 axes: the grid) where a frame lands, and the part of the frame
    it holds (row slice, column slice); None when the frame's plane is outside the grid."""
    r_ax, r_sign, c_ax, c_sign, base = index_map
    p_ax = 3 - r_ax - c_ax
    if not 0 <= base[p_ax] < array.shape[p_ax]:
        return None
    rows = _run(base[r_ax], r_sign, frame_shape[0], array.shape[r_ax])
    cols = _run(base[c_ax], c_sign, frame_shape[1], array.shape[c_ax])
    if rows is None or cols is None:
        return None
    index: list[Any] = [None, None, None]
    index[p_ax], index[r_ax], index[c_ax] = base[p_ax], rows[0], cols[0]
    view = array[tuple(index)]  # basic indexing: a view, axes in grid order (rows and columns in some order)
    if r_ax > c_ax:
        view = view.swapaxes(0, 1)
    return view, (rows[1], cols[1])


# ---------------------------------------------------------------------------------------------------------------
# writing


def _source_datasets(source: Volume | str | os.PathLike[str]) -> tuple[Volume | None, list[str]]:
    from medseg.io.volume_io import load_volume

    if isinstance(source, Volume):
        refs = source.source
        if refs is None or not refs.files or not refs.positions_mm:
            raise DicomSegError(
                "The source volume was not loaded from DICOM (it has no source instances to reference); pass the "
                "DICOM series folder, or a Volume from medseg.load_volume(dicom_folder)."
            )
        return source, list(dict.fromkeys(refs.files))
    path = Path(source)
    volume = load_volume(path)
    if volume.source is None or not volume.source.positions_mm:
        raise DicomSegError(f"{path}: not a DICOM image series or file; a DICOM SEG references DICOM source images. "
                            "Pass the DICOM folder the labels were made from.")
    return volume, list(dict.fromkeys(volume.source.files))


def _save_atomically(ds: Any, out_path: Path) -> None:
    """Write a dataset as a DICOM file (preamble and meta) in one step: no partial file is ever left at ``out_path``."""
    from medseg.files import atomic_path

    try:
        with atomic_path(out_path, keep_suffix=".dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom and the file system raise many types
        raise UnreadableFileError(f"{out_path}: could not write ({type(exc).__name__}: {exc}).") from None


def _read_headers(files: Sequence[str]) -> list[Any]:
    import pydicom

    out = []
    for f in files:
        try:
            out.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
            raise UnreadableFileError(f"{f}: cannot read the DICOM header ({type(exc).__name__}: {exc}).") from None
    return out


def _blank(ds: Any, keyword: str) -> bool:
    value = ds.get(keyword, None)
    return value is None or str(value).strip() == ""


def _uid_problems(datasets: Sequence[Any], files: Sequence[str]) -> list[str]:
    problems = []
    for kw in _REQUIRED_UIDS:
        bad = [f for ds, f in zip(datasets, files, strict=True) if _blank(ds, kw)]
        if bad:
            problems.append(f"{kw} blank or missing in {len(bad)} of {len(files)} files (e.g. {Path(bad[0]).name})")
    seen: dict[str, str] = {}
    dups = []
    for ds, f in zip(datasets, files, strict=True):
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if uid and uid in seen:
            dups.append(f"{Path(seen[uid]).name} and {Path(f).name}")
        seen.setdefault(uid, f)
    if dups:
        problems.append(f"duplicate SOPInstanceUID in {len(dups)} file pair(s) (e.g. {dups[0]})")
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(kw, "") or "").strip() for ds in datasets} - {""}
        if len(values) > 1:
            problems.append(f"{kw} differs between files ({len(values)} values)")
    return problems


def _repair_source(files: Sequence[str], datasets: Sequence[Any], folder: Path) -> list[str]:
    """Write a copy of the source series with its UIDs filled in; pixel data untouched. Returns the new files."""
    import pydicom
    from pydicom.uid import generate_uid

    def meta(ds: Any, kw: str) -> str:
        fm = getattr(ds, "file_meta", None)
        return "" if fm is None else str(fm.get(kw, "") or "").strip()

    sop_uids: list[str] = []
    seen: set[str] = set()
    for f, ds in zip(files, datasets, strict=True):
        uid = "" if _blank(ds, "SOPInstanceUID") else str(ds.SOPInstanceUID).strip()
        uid = uid or meta(ds, "MediaStorageSOPInstanceUID")
        if not uid or uid in seen:  # generated from the file's bytes: the same file gets the same UID again
            digest = hashlib.sha256(Path(f).read_bytes()).hexdigest()
            uid = generate_uid(entropy_srcs=["medseg-repaired-sop-instance", digest, uid])
        seen.add(uid)
        sop_uids.append(uid)
    entropy = sorted(sop_uids)
    generated = {kw: generate_uid(entropy_srcs=[f"medseg-repaired-{kw}", *entropy])
                 for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, (f, ds_head, uid) in enumerate(zip(files, datasets, sop_uids, strict=True)):
        ds = pydicom.dcmread(f)
        sop_class = "" if _blank(ds_head, "SOPClassUID") else str(ds_head.SOPClassUID).strip()
        sop_class = sop_class or meta(ds_head, "MediaStorageSOPClassUID")
        if not sop_class:
            raise SourceUidError(f"{f}: SOPClassUID is blank in the dataset and in the file meta; medseg cannot tell "
                                 "what kind of image it is, so it cannot repair it. Re-export the series.")
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = uid
        for kw, value in generated.items():
            if _blank(ds, kw):
                setattr(ds, kw, value)
        ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(sop_class)
        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(uid)
        target = folder / (Path(f).name or f"{n:05d}.dcm")
        ds.save_as(target, enforce_file_format=True)
        out.append(str(target))
    return out


def _source_planes(datasets: Sequence[Any], files: Sequence[str]) -> tuple[list[tuple[int, int | None]], list[_Plane]]:
    """Every source plane: (dataset index, frame index or None) and its geometry."""
    keys: list[tuple[int, int | None]] = []
    planes: list[_Plane] = []
    for n, (ds, f) in enumerate(zip(datasets, files, strict=True)):
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
            for fi, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
                keys.append((n, fi))
                planes.append(_functional_plane(fg, shared, f))
        else:
            try:
                iop = np.array([float(v) for v in ds.ImageOrientationPatient])
                ipp = np.array([float(v) for v in ds.ImagePositionPatient])
                ps = tuple(float(v) for v in ds.PixelSpacing)
            except (AttributeError, TypeError, ValueError):
                raise DicomSegError(f"{f}: no ImagePositionPatient / ImageOrientationPatient / PixelSpacing; a SEG "
                                    "needs the source's patient geometry.") from None
            keys.append((n, None))
            planes.append(_Plane(ipp, iop[:3], iop[3:], (ps[0], ps[1])))
    return keys, planes


def _functional_plane(fg: Any, shared: Any, where: str) -> _Plane:
    def seq(name: str) -> Any:
        for group in (fg, shared):
            if group is not None and name in group:
                return group[name].value[0]
        raise UnreadableFileError(f"{where}: a frame has no {name} (per-frame or shared); cannot place it.")

    iop = np.array([float(v) for v in seq("PlaneOrientationSequence").ImageOrientationPatient])
    ipp = np.array([float(v) for v in seq("PlanePositionSequence").ImagePositionPatient])
    ps = [float(v) for v in seq("PixelMeasuresSequence").PixelSpacing]
    return _Plane(ipp, iop[:3], iop[3:], (ps[0], ps[1]))


def _labels_on_planes(labels: Volume, planes: Sequence[_Plane], rows: int, columns: int, where: str) -> np.ndarray:
    """Label values of every source plane, (n_planes, rows, columns), taken from ``labels`` by world position.

    Raises
    ------
    GridMismatchError
        If a plane's pixels are not voxel centres of ``labels`` (labels not on the source scan's grid).
    """
    arr = np.asarray(labels.array)
    out = np.zeros((len(planes), rows, columns), dtype=arr.dtype)
    inv = np.linalg.inv(labels.affine)
    for n, plane in enumerate(planes):
        index_map = _frame_index_map(plane, inv)
        got = None if index_map is None else _frame_view(arr, index_map, (rows, columns))
        if got is None or got[0].shape != (rows, columns):
            raise GridMismatchError(
                f"The labels are not on the grid of the source series {where}: source plane {n} (origin "
                f"{np.round(LPS_TO_RAS[:3, :3] @ plane.position, 3).tolist()} mm RAS) is not a slice of the labels' "
                f"grid ({labels.describe_grid()}). Write a SEG from labels on the scan's own grid (medseg's "
                "segment output is), or put them there first: medseg.resample.resample_to(labels, scan, "
                "interpolation='nearest')."
            )
        out[n] = got[0]
    return out


def _histogram(arr: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Voxel count of every value of an 8/16-bit unsigned array, in chunks (bincount copies its input to intp)."""
    flat_len = arr.shape[-1] if arr.ndim else 1
    counts = np.zeros(max(minlength, 1 << (8 * arr.dtype.itemsize)), dtype=np.int64)
    planes = arr.reshape(-1, flat_len) if arr.ndim > 1 else arr.reshape(1, -1)
    step = max(1, (1 << 22) // max(flat_len, 1))
    for start in range(0, planes.shape[0], step):
        counts += np.bincount(planes[start:start + step].ravel(), minlength=counts.size)
    return counts


def _values_present(arr: np.ndarray) -> list[int]:
    """Non-zero values in a label array (a histogram for 8/16-bit unsigned arrays: far faster than a sort)."""
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if arr.dtype in (np.uint8, np.uint16):
        return [int(v) for v in np.nonzero(_histogram(arr))[0] if v != 0]
    return [int(v) for v in np.unique(arr) if v != 0]


def _resolve_code(label: Label, codes: Mapping[str, SegmentCode]) -> SegmentCode | None:
    return codes.get(label.name) or label.code or standard_segment_code(label.name)


def _load_codes(codes: str | os.PathLike[str] | Mapping[str, Any] | None) -> dict[str, SegmentCode]:
    if codes is None:
        return {}
    if isinstance(codes, Mapping):
        data: Any = codes
        where = "codes"
    else:
        import json

        path = Path(codes)
        where = str(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise SegmentCodeError(f"{path}: cannot read the codes file as JSON ({exc}). Expected "
                                   "{label_name: {category: [scheme, value, meaning], type: [...], modifier: [...]}}.") from None
        if isinstance(data, Mapping) and isinstance(data.get("codes"), Mapping):
            data = data["codes"]
    if not isinstance(data, Mapping):
        raise SegmentCodeError(f"{where}: expected a mapping of label name to code.")
    out = {}
    for name, entry in data.items():
        if str(name).startswith("_"):
            continue
        try:
            out[str(name)] = entry if isinstance(entry, SegmentCode) else SegmentCode.from_json(entry, where=f"{where}: {name}")
        except LabelTableError as exc:
            raise SegmentCodeError(str(exc)) from None
    return out


def _hd_code(code: Code) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _segment_description(number: int, value: int, label: Label, code: SegmentCode, algorithm: SegAlgorithm | None,
                         algorithm_type: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    ident = None
    if algorithm_type != "MANUAL":
        params = {"medseg_version": str(algorithm.medseg_version)} if algorithm and algorithm.medseg_version else {}
        if algorithm is not None and algorithm.weights_sha256:
            params["weights_sha256"] = algorithm.weights_sha256
        ident = hd.AlgorithmIdentificationSequence(
            name=algorithm.name if algorithm else "medseg",
            family=dcm_codes.cid7162.ArtificialIntelligence,
            version=algorithm.version if algorithm else str(params.get("medseg_version", "unknown")),
            source="medseg",
            parameters=params or None,
        )
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name[:64],
        segmented_property_category=_hd_code(code.category),
        segmented_property_type=_hd_code(code.type),
        algorithm_type=algorithm_type,
        algorithm_identification=ident,
        anatomic_regions=[_hd_code(code.region)] if code.region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*label.color) if hasattr(hd.color.CIELabColor, "from_rgb")
        else None,
    )
    if code.modifier is not None:
        from pydicom.sequence import Sequence as DicomSequence

        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = DicomSequence(
            [_hd_code(code.modifier)])
    if code.region is not None and code.region_modifier is not None:
        from pydicom.sequence import Sequence as DicomSequence

        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = DicomSequence([_hd_code(code.region_modifier)])
    desc.SegmentDescription = f"label value {value}"
    return desc


def write_dicom_seg(
    labels: Volume,
    source: Volume | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    seg_type: SegType = "binary",
    algorithm: SegAlgorithm | None = None,
    algorithm_type: AlgorithmType = "AUTOMATIC",
    series_description: str | None = None,
    series_number: int | None = None,
    compression: Compression | None = None,
    repair_uids: bool = False,
    codes: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> Path:
    """Write a label volume as a DICOM SEG that references the DICOM scan it was made from.

    Parameters
    ----------
    labels : Volume
        Label map (integers 0..65535, 0 = background) with its :class:`~medseg.labels.LabelTable`, on the source
        scan's voxels (any axis order or direction).
    source : Volume or path
        The DICOM-sourced scan (a Volume from :func:`medseg.io.load_volume`, whose source references name the
        instances), or its DICOM folder / file.
    path : path
        Output file (any name; ``.dcm`` is customary). Written atomically.
    seg_type : {"binary", "labelmap"}
        BINARY (Segmentation Storage, 1 bit per segment and frame; the interoperable default) or LABELMAP
        (Label Map Segmentation Storage; one frame per slice, label values kept).
    algorithm : SegAlgorithm, optional
        Model name, version and weights sha256 (medseg's version is added). Required unless ``algorithm_type``
        is "MANUAL".
    algorithm_type : {"AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"}
        AUTOMATIC for model output; SEMIAUTOMATIC / MANUAL for edited or drawn labels.
    series_description : str, optional
        Default: "Segmentation by <model>" (or "Manual segmentation").
    series_number : int, optional
        Default: the source's SeriesNumber + 1000 (1000 when it has none).
    compression : {"jpegls", "jpeg2000", "rle"}, optional
        Lossless compression. BINARY frames take "jpeg2000" only; LABELMAP takes all three.
    repair_uids : bool
        Repair a source with blank / missing / duplicate UIDs by writing a fixed copy to ``<path stem>_source/``
        next to the SEG, and reference that copy.
    codes : path or mapping, optional
        Coded concepts by label name, as a JSON file or mapping ``{name: {category: [scheme, value, meaning],
        type: [...], modifier: [...]}}``; they win over the label's own code and the curated table.

    Returns
    -------
    Path
        The written SEG.

    Raises
    ------
    EmptySegmentationError
        If no voxel is labelled.
    SegmentCodeError
        If a label present has no coded concept (the message lists them and how to give codes).
    SourceUidError
        If the source has blank / missing / duplicate UIDs and ``repair_uids`` is False.
    GridMismatchError
        If the labels are not on the source scan's voxels.
    DicomSegError
        For other impossible requests (a source without DICOM instances, an unsupported compression).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from medseg.phantom import make_phantom, write_phantom_study
    >>> from medseg.io import load_volume, load_segmentation, write_dicom_seg
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> study = write_phantom_study(make_phantom(0, shape=(48, 40, 12)), tmp / "study")
    >>> ct = load_volume(study.image_path)
    >>> truth = load_volume(study.labels_path)
    >>> seg = write_dicom_seg(truth, ct, tmp / "seg.dcm", algorithm_type="MANUAL")
    >>> back = load_segmentation(seg, reference=ct)
    >>> bool((back.array == truth.array).all()), back.labels[1].name
    (True, 'liver')
    """
    import highdicom as hd

    import medseg

    kind = seg_type.lower()
    if kind not in ("binary", "labelmap"):
        raise DicomSegError(f"seg_type must be 'binary' or 'labelmap', not {seg_type!r}.")
    if compression not in _TRANSFER_SYNTAX:
        raise DicomSegError(f"compression must be one of 'jpegls', 'jpeg2000', 'rle' or None, not {compression!r}.")
    if kind == "binary" and compression not in _BINARY_COMPRESSIONS:
        raise DicomSegError(f"BINARY SEG frames (1 bit) can be compressed with 'jpeg2000' only, not {compression!r}; "
                            "use seg_type='labelmap' for JPEG-LS or RLE.")
    if algorithm_type not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
        raise DicomSegError(f"algorithm_type must be AUTOMATIC, SEMIAUTOMATIC or MANUAL, not {algorithm_type!r}.")
    if algorithm_type != "MANUAL" and algorithm is None:
        raise DicomSegError(f"algorithm_type {algorithm_type} needs algorithm=SegAlgorithm(name, version, "
                            "weights_sha256) naming the model (CLI: --model M), or algorithm_type='MANUAL' for "
                            "hand-drawn labels (CLI: --algorithm-type MANUAL).")
    out_path = Path(path)
    if not out_path.parent.exists():
        raise UnreadableFileError(f"{out_path}: folder {out_path.parent} does not exist.")
    if labels.array.ndim != 3:
        raise DicomSegError(f"labels must be a 3D label map, not an array of shape {labels.array.shape}.")
    arr = np.asarray(labels.array)
    if arr.dtype.kind not in "biu" and not (arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0)):
        raise DicomSegError(f"labels must hold integer label values, not {arr.dtype} values.")
    present = _values_present(arr)
    if not present:
        raise EmptySegmentationError("The label map holds no labelled voxel (all 0), so a DICOM SEG would have no "
                                     "segment; nothing was written.")
    if min(present) < 0 or max(present) > 65535:
        raise DicomSegError(f"Label values must be 1..65535; found {min(present)}..{max(present)}.")
    table = labels.labels
    if table is None:
        raise SegmentCodeError(f"The label map has no label table, so its values {present[:10]} have no names or "
                               "codes; attach one (volume.with_array(array, labels=LabelTable(...))), or put a "
                               "label table sidecar beside the label file (labels.nii.gz → labels.labels.json).")
    missing = [v for v in present if v not in table]
    if missing:
        raise LabelTableError(f"Label values {missing[:20]} are in the array but not in its label table "
                              f"({table!r}); add them to the table.")
    code_map = _load_codes(codes)
    resolved = {v: _resolve_code(table[v], code_map) for v in present}
    uncoded = [f"{v} {table[v].name!r}" for v, c in resolved.items() if c is None]
    if uncoded:
        raise SegmentCodeError(
            "No DICOM coded concept (category, type) is known for label(s) " + ", ".join(uncoded) + ". Give codes "
            "with codes= (a JSON file or mapping {name: {category: [SCT, '91723000', 'Anatomical Structure'], "
            "type: [SCT, '<code>', '<meaning>'], modifier: [SCT, '7771000', 'Left']}}; CLI: --codes FILE), or as "
            "'code:' in the model card's label entries. medseg does not guess codes from names."
        )

    _volume, files = _source_datasets(source)
    where = str(Path(files[0]).parent)
    datasets = _read_headers(files)
    problems = _uid_problems(datasets, files)
    if problems and not repair_uids:
        raise SourceUidError(
            f"{where}: the source series cannot be referenced by a DICOM SEG: " + "; ".join(problems)
            + ". Pass repair_uids=True (CLI: --repair-uids) to write a repaired copy of the series (UIDs filled in, "
            "pixel data untouched) next to the SEG and reference that copy, or fix the series at its source."
        )
    repaired_folder = None
    if problems:
        stem = out_path.name[:-4] if out_path.name.lower().endswith(".dcm") else out_path.name
        repaired_folder = out_path.with_name(stem + "_source")
        files = _repair_source(files, datasets, repaired_folder)
        datasets = _read_headers(files)
        log.info("wrote a UID-repaired copy of the source series to %s", repaired_folder)

    keys, planes = _source_planes(datasets, files)
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    if compression == "jpeg2000" and min(rows, columns) < 32:
        raise DicomSegError(f"{where}: frames of {rows}×{columns} pixels are too small for JPEG 2000 (at least 32 "
                            "along both); use compression=None, or 'jpegls' / 'rle' with seg_type='labelmap'.")
    multi = any(fi is not None for _, fi in keys)
    if multi and len(datasets) > 1:
        raise DicomSegError(f"{where}: the source mixes several multi-frame files; a SEG references one multi-frame "
                            "image or a series of single-frame images.")
    if not multi:  # single-frame images: frames in slice order along the normal
        normal = planes[0].normal
        order = sorted(range(len(planes)), key=lambda n: float(planes[n].position @ normal))
        datasets = [datasets[n] for n in order]
        planes = [planes[n] for n in order]
    values_per_plane = _labels_on_planes(labels, planes, rows, columns, where)

    for ds in datasets:  # header copies only; the source files are not touched
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # highdicom refuses it empty; absent means the default repertoire
        for kw in _TYPE2_COPIED:  # type 2 (may be empty) but must be present for highdicom to copy them
            if kw not in ds:
                setattr(ds, kw, "")
    algo = algorithm
    if algo is not None and algo.medseg_version is None:
        algo = SegAlgorithm(algo.name, algo.version, algo.weights_sha256, medseg.__version__)
    if kind == "binary":
        numbers = {v: n for n, v in enumerate(present, start=1)}
    else:
        numbers = {v: v for v in present}
    descriptions = [_segment_description(numbers[v], v, table[v], resolved[v], algo, algorithm_type)  # type: ignore[arg-type]
                    for v in present]
    lut = np.zeros(max(present) + 1, dtype=np.uint16 if max(numbers.values()) > 255 else np.uint8)
    for v, n in numbers.items():
        lut[v] = n
    pixel_array = lut[values_per_plane]  # any unsigned index type works; no int64 copy of the volume
    src_number = datasets[0].get("SeriesNumber", None)
    try:
        default_number = int(src_number) + 1000 if src_number not in (None, "") else 1000
    except (TypeError, ValueError):
        default_number = 1000
    description = series_description or (f"Segmentation by {algo.name}"[:64] if algo is not None
                                          else f"{algorithm_type.capitalize()} segmentation")
    with warnings.catch_warnings():
        # highdicom warns about the source's patient name format, quoting the name: never let it reach a log.
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*Person Name.*", category=UserWarning)
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=pixel_array,
            segmentation_type="BINARY" if kind == "binary" else "LABELMAP",
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number) if series_number is not None else default_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name=(algo.name if algo is not None else "medseg")[:64],
            software_versions=f"medseg {medseg.__version__}",
            device_serial_number="0",
            series_description=description[:64],
            content_label="SEGMENTATION",
            content_description=description[:64],
            transfer_syntax_uid=_TRANSFER_SYNTAX[compression],
        )
    _save_atomically(seg, out_path)
    log.info("wrote %s SEG with %d segment(s) over %d source frame(s) to %s", kind.upper(), len(present), len(planes),
             out_path)
    return out_path


# ---------------------------------------------------------------------------------------------------------------
# reading


def is_dicom_seg(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a DICOM file whose SOP class is (Label Map) Segmentation Storage."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a SEG
        return False
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return uid in SEG_SOP_CLASS_UIDS


def _code_of(item: Any, seq: str) -> Code | None:
    if seq not in item or not item[seq].value:
        return None
    c = item[seq].value[0]
    try:
        return Code(str(c.CodingSchemeDesignator), str(c.CodeValue), str(c.CodeMeaning))
    except (AttributeError, MedsegError):
        return None


def _segment_code(item: Any) -> SegmentCode | None:
    category = _code_of(item, "SegmentedPropertyCategoryCodeSequence")
    typ = _code_of(item, "SegmentedPropertyTypeCodeSequence")
    if category is None or typ is None:
        return None
    t_item = item.SegmentedPropertyTypeCodeSequence[0]
    modifier = _code_of(t_item, "SegmentedPropertyTypeModifierCodeSequence")
    region = _code_of(item, "AnatomicRegionSequence")
    region_mod = _code_of(item.AnatomicRegionSequence[0], "AnatomicRegionModifierSequence") if region else None
    return SegmentCode(category, typ, modifier, region, region_mod)


def _rgb(item: Any, value: int) -> tuple[int, int, int]:
    from medseg.labels import default_color

    lab = item.get("RecommendedDisplayCIELabValue", None)
    if lab is None:
        return default_color(value)
    try:
        import highdicom as hd

        rgb = hd.color.CIELabColor.from_dicom_value([int(v) for v in lab]).to_rgb()
        return tuple(int(max(0, min(255, round(float(c))))) for c in rgb)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - a malformed colour is not worth refusing the file
        log.warning("segment %s: unreadable RecommendedDisplayCIELabValue %s; using a default colour", value, lab)
        return default_color(value)


@dataclass
class _Decoded:
    ds: Any
    seg_type: str
    numbers: list[int]
    values: dict[int, int]
    table: LabelTable
    items: dict[int, Any]
    planes: list[_Plane]
    frame_segments: list[int | None]  # segment number of each frame (None: LABELMAP)
    frames: np.ndarray  # (n_frames, rows, columns)
    step_mm: float | None


def _decode(path: Path) -> _Decoded:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UnreadableFileError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc}).") from None
    sop = str(ds.get("SOPClassUID", "") or "")
    if sop not in SEG_SOP_CLASS_UIDS:
        raise UnreadableFileError(f"{path}: not a DICOM SEG (SOP class {sop or 'unknown'}); load images with "
                                  "medseg.io.load_volume.")
    seg_type = str(ds.get("SegmentationType", "") or ("LABELMAP" if sop.endswith(".66.7") else "")).upper()
    if seg_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise UnreadableFileError(f"{path}: unknown SegmentationType {seg_type!r} (expected BINARY, FRACTIONAL or "
                                  "LABELMAP).")
    if "SegmentSequence" not in ds or not ds.SegmentSequence:
        raise UnreadableFileError(f"{path}: the SEG has no SegmentSequence (no segments described).")
    # A LABELMAP may describe its background as segment 0; background is never a label.
    items = {int(it.SegmentNumber): it for it in ds.SegmentSequence if int(it.SegmentNumber) != 0}
    if not items:
        raise UnreadableFileError(f"{path}: the SEG describes no segment other than the background.")
    numbers = sorted(items)
    written = {}
    for n, it in items.items():
        m = _VALUE_RE.fullmatch(str(it.get("SegmentDescription", "") or "").strip())
        if m:
            written[n] = int(m.group(1))
    values = written if len(written) == len(numbers) and len(set(written.values())) == len(numbers) else {
        n: n for n in numbers}
    table_rows = []
    for n in numbers:
        it = items[n]
        code = _segment_code(it)
        kind: LabelKind = "lesion" if code is not None and code.category.value == _LESION_CATEGORY else "organ"
        name = str(it.get("SegmentLabel", "") or f"segment_{n}")
        table_rows.append(Label(values[n], name, _rgb(it, values[n]), kind, code))
    table = LabelTable(table_rows)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise UnreadableFileError(f"{path}: cannot decode the SEG's pixel data ({type(exc).__name__}: {exc}).") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = np.asarray(pixels).reshape(n_frames, int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    if per_frame is None or len(per_frame) != n_frames:
        raise UnreadableFileError(f"{path}: PerFrameFunctionalGroupsSequence is missing or does not have one item per "
                                  f"frame ({n_frames} frames); cannot place the frames.")
    planes = [_functional_plane(fg, shared, str(path)) for fg in per_frame]
    frame_segments: list[int | None] = []
    for fg in per_frame:
        if seg_type == "LABELMAP":
            frame_segments.append(None)
            continue
        sid = fg.get("SegmentIdentificationSequence", None) or (
            shared.get("SegmentIdentificationSequence", None) if shared is not None else None)
        if not sid:
            raise UnreadableFileError(f"{path}: a frame has no SegmentIdentificationSequence; cannot tell its segment.")
        frame_segments.append(int(sid[0].ReferencedSegmentNumber))
    step = None
    if shared is not None and "PixelMeasuresSequence" in shared:
        sbs = shared.PixelMeasuresSequence[0].get("SpacingBetweenSlices", None)
        step = float(sbs) if sbs not in (None, "") else None
    return _Decoded(ds, seg_type, numbers, values, table, items, planes, frame_segments, pixels, step)


def _frame_masks(dec: _Decoded, f: int) -> list[tuple[int, np.ndarray]]:
    """(segment number, boolean mask) pairs held by frame ``f``."""
    frame = dec.frames[f]
    if dec.seg_type == "LABELMAP":
        pad = dec.ds.get("PixelPaddingValue", None)
        out = []
        for n in _values_present(frame) if frame.dtype in (np.uint8, np.uint16) else np.unique(frame).tolist():
            n = int(n)
            if n == 0 or (pad is not None and n == int(pad)) or n not in dec.values:
                continue
            out.append((n, frame == n))
        return out
    seg = dec.frame_segments[f]
    assert seg is not None
    if dec.seg_type == "FRACTIONAL":
        top = float(dec.ds.get("MaximumFractionalValue", 255) or 255)
        return [(seg, frame.astype(np.float32) >= 0.5 * top)]
    return [(seg, frame != 0)]


def _place(dec: _Decoded, affine: np.ndarray, shape: tuple[int, int, int], *, split: bool, where: str
           ) -> tuple[np.ndarray, dict[int, int]] | None:
    """Paste every frame onto a grid; (array, voxels per segment when ``split``), or None when a frame does not sit
    on it."""
    n_seg = len(dec.numbers)
    channel = {n: c for c, n in enumerate(dec.numbers)}
    if split:
        out = np.zeros((*shape, n_seg), dtype=np.uint8)
    else:
        out = np.zeros(shape, dtype=np.uint8 if max(dec.values.values()) < 256 else np.uint16)
    rows, columns = dec.frames.shape[1:]
    overlaps: set[tuple[int, int]] = set()
    dropped = 0
    inv = np.linalg.inv(affine)
    inverse = {v: n for n, v in dec.values.items()}
    lut = None
    if dec.seg_type == "LABELMAP" and not split:  # one frame per plane, no overlaps: map numbers to values at once
        top = max(int(dec.frames.max()), max(dec.numbers)) + 1
        lut = np.zeros(top, dtype=out.dtype)
        for n, v in dec.values.items():
            lut[n] = v
        pad = dec.ds.get("PixelPaddingValue", None)
        if pad is not None and 0 <= int(pad) < top:
            lut[int(pad)] = 0
    for f, plane in enumerate(dec.planes):
        if lut is not None:
            index_map = _frame_index_map(plane, inv)
            if index_map is None:
                return None
            vals = lut[dec.frames[f]]
            got = _frame_view(out, index_map, (rows, columns))
            if got is None:
                dropped += int(np.count_nonzero(vals))
                continue
            view, (r_keep, c_keep) = got
            sub = vals[r_keep, c_keep]
            dropped += int(np.count_nonzero(vals)) - int(np.count_nonzero(sub))
            np.copyto(view, sub, where=sub != 0)
            continue
        masks = _frame_masks(dec, f)
        if not masks:
            continue
        index_map = _frame_index_map(plane, inv)
        if index_map is None:
            return None
        for seg, mask in masks:
            target = out[..., channel[seg]] if split else out
            got = _frame_view(target, index_map, (rows, columns))
            if got is None:
                dropped += int(mask.sum())
                continue
            view, (r_keep, c_keep) = got
            sub = mask[r_keep, c_keep]
            if sub.shape != mask.shape:
                dropped += int(mask.sum()) - int(sub.sum())
            if split:
                view[sub] = 1
                continue
            value = dec.values[seg]
            clash = view[sub]
            other = (clash != 0) & (clash != value)
            if np.any(other):
                for v in np.unique(clash[other]):
                    overlaps.add(tuple(sorted((seg, inverse[int(v)]))))  # type: ignore[arg-type]
            view[sub] = value
    if overlaps:
        pairs = ", ".join(f"{a} {dec.items[a].get('SegmentLabel', '')!r} and {b} {dec.items[b].get('SegmentLabel', '')!r}"
                          for a, b in sorted(overlaps))
        raise OverlappingSegmentsError(
            f"{where}: segments overlap ({pairs}), so they cannot be one label map. Read one mask per segment "
            "instead: load_segmentation(path, split=True) (CLI: medseg convert SEG OUT --split)."
        )
    if dropped:
        log.warning("%s: %d segmented voxel(s) lie outside the target grid and were left out", where, dropped)
    # Voxel counts are only wanted by read_seg_info (which reads split); a label map's would cost a full pass.
    counts = {n: int(np.count_nonzero(out[..., channel[n]])) for n in dec.numbers} if split else {}
    return out, counts


def _references(ds: Any) -> SourceReferences:
    series = ds.get("ReferencedSeriesSequence", None) or []
    uids: list[str] = []
    series_uid = None
    for item in series:
        series_uid = series_uid or str(item.get("SeriesInstanceUID", "") or "") or None
        for inst in item.get("ReferencedInstanceSequence", None) or []:
            uids.append(str(inst.get("ReferencedSOPInstanceUID", "") or ""))
    return SourceReferences(
        files=(str(ds.filename),) if getattr(ds, "filename", None) else (),
        sop_instance_uids=tuple(uids),
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or "") or None,
        series_instance_uid=series_uid,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or "") or None,
        sop_class_uid=str(ds.get("SOPClassUID", "") or "") or None,
        series_description=str(ds.get("SeriesDescription", "") or "") or None,
    )


def _load(path: Path, reference: Volume | None, split: bool) -> tuple[Volume, _Decoded, dict[int, int]]:
    dec = _decode(path)
    rows, columns = dec.frames.shape[1:]
    where = str(path)
    placed = None
    if reference is not None:
        placed = _place(dec, reference.affine, reference.shape, split=split, where=where)
        if placed is not None:
            arr, counts = placed
            table = dec.table
            return Volume(arr, reference.affine, modality=None, labels=table, source=_references(dec.ds)), dec, counts
    _order, affine, shape = _plane_grid(dec.planes, rows, columns, step_mm=dec.step_mm, where=where)
    own = _place(dec, affine, shape, split=split, where=where)
    assert own is not None
    arr, counts = own
    volume = Volume(arr, affine, labels=dec.table, source=_references(dec.ds))
    if reference is None:
        return volume, dec, counts
    from medseg.resample import resample_to

    log.warning("%s: the SEG's frames do not sit on the reference grid's voxels; resampling (nearest neighbour) "
                "from the SEG's own grid (%s) onto the reference (%s)", where, volume.describe_grid(),
                reference.describe_grid())
    if split:
        chans = [resample_to(Volume(arr[..., c], affine, labels=dec.table), reference, interpolation="nearest").array
                 for c in range(arr.shape[-1])]
        return Volume(np.stack(chans, axis=-1), reference.affine, labels=dec.table, source=volume.source), dec, counts
    moved = resample_to(volume, reference, interpolation="nearest")
    return Volume(moved.array, reference.affine, labels=dec.table, source=volume.source), dec, counts


def load_segmentation(
    seg_path: str | os.PathLike[str], *, reference: Volume | None = None, split: bool = False
) -> Volume:
    """Read a DICOM SEG as a label volume with its label table.

    Parameters
    ----------
    seg_path : path
        A BINARY, FRACTIONAL or LABELMAP DICOM SEG file (any name).
    reference : Volume, optional
        Put the labels on this scan's grid (shape and affine), frames placed by their plane positions. Without
        it, the labels are on the SEG's own frame grid (the slab its frames span).
    split : bool
        Return one mask per segment: a (I, J, K, N) uint8 volume, channel c = the c-th label of the table in
        value order. Needed when segments overlap.

    Returns
    -------
    Volume
        Label values: the original values a medseg BINARY SEG recorded ("label value N" in each
        SegmentDescription), otherwise the segment numbers. The table carries names, colours, kinds (lesion for
        Morphologically Abnormal Structure) and codes.

    Raises
    ------
    UnreadableFileError
        If the file is not a readable DICOM SEG or its frames cannot be placed.
    OverlappingSegmentsError
        If segments overlap and ``split`` is False.
    """
    path = Path(seg_path)
    volume, _, _ = _load(path, reference, split)
    return volume


def read_seg_info(seg_path: str | os.PathLike[str]) -> SegInfo:
    """List a DICOM SEG's segments (number, value, label, codes, algorithm, voxels) and referenced series.

    Raises
    ------
    UnreadableFileError
        If the file is not a readable DICOM SEG.
    """
    path = Path(seg_path)
    _, dec, counts = _load(path, None, True)
    ds = dec.ds
    segments = []
    for n in dec.numbers:
        it = dec.items[n]
        algo = (it.get("SegmentationAlgorithmIdentificationSequence", None) or [None])[0]
        segments.append(SegmentInfo(
            number=n, value=dec.values[n], label=str(it.get("SegmentLabel", "") or ""), code=_segment_code(it),
            algorithm_type=str(it.get("SegmentAlgorithmType", "") or ""),
            algorithm_name=None if algo is None else str(algo.get("AlgorithmName", "") or "") or None,
            algorithm_version=None if algo is None else str(algo.get("AlgorithmVersion", "") or "") or None,
            voxels=counts.get(n, 0),
        ))
    refs = ds.get("ReferencedSeriesSequence", None) or []
    return SegInfo(
        path=path,
        seg_type=dec.seg_type,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        referenced_series_uids=tuple(str(r.get("SeriesInstanceUID", "") or "") for r in refs),
        n_referenced_instances=sum(len(r.get("ReferencedInstanceSequence", None) or []) for r in refs),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        n_frames=int(ds.get("NumberOfFrames", 1) or 1),
        segments=tuple(segments),
    )


def save_segment_masks(volume: Volume, path: str | os.PathLike[str]) -> list[Path]:
    """Write a split segmentation (:func:`load_segmentation` with ``split=True``) as one mask file per segment.

    ``labels.nii.gz`` becomes ``labels_<value>_<name>.nii.gz`` for each label of the table (in value order, one
    per channel); each mask holds the label's value where the segment is, 0 elsewhere, with a one-label table.

    Raises
    ------
    DicomSegError
        If ``volume`` is not a (I, J, K, N) volume with an N-label table.
    UnsupportedFormatError
        If ``path`` has a suffix :func:`medseg.io.save_volume` does not write.
    """
    from medseg.io.volume_io import WRITE_SUFFIXES, save_volume

    table = volume.labels
    if volume.array.ndim != 4 or table is None or len(table) != volume.array.shape[3]:
        raise DicomSegError("save_segment_masks needs the (I, J, K, N) volume that load_segmentation(..., "
                            "split=True) returns, with one label per channel.")
    p = Path(path)
    suffix = next((x for x in WRITE_SUFFIXES if p.name.lower().endswith(x)), p.suffix)
    stem = p.name[: len(p.name) - len(suffix)] if suffix else p.name
    out = []
    for c, (value, label) in enumerate(table.items()):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label.name).strip("_") or "segment"
        mask = np.where(volume.array[..., c] != 0, value, 0).astype(np.uint8 if value < 256 else np.uint16)
        one = Volume(mask, volume.affine, labels=LabelTable([label]))
        out.append(save_volume(one, p.with_name(f"{stem}_{value}_{safe}{suffix}")))
    return out
