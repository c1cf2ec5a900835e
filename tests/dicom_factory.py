"""Build small, fully controlled DICOM series for tests (pydicom, written from scratch).

Pixel values encode the slice's true index along the normal (value = 100 * index + in-plane ramp), so any
sorting or axis mistake shows up as wrong voxels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    generate_uid,
)

ROWS, COLS = 24, 32


def slice_pixels(index: int, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """Stored values of slice number ``index`` (its rank along the normal): int16, (rows, cols)."""
    r, c = np.mgrid[:rows, :cols]
    return (100 * index + 3 * r + c).astype(np.int16)


def make_slice(
    position: Sequence[float],
    *,
    index: int = 0,
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (0.8, 0.6),
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    sop_uid: str | None = None,
    study_uid: str = "1.2.826.0.1.3680043.8.498.2",
    for_uid: str = "1.2.826.0.1.3680043.8.498.3",
    modality: str = "CT",
    description: str = "test series",
    instance_number: int = 1,
    rows: int = ROWS,
    cols: int = COLS,
    slope: float = 1.0,
    intercept: float = -1024.0,
    pixels: np.ndarray | None = None,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    sop_uid = sop_uid if sop_uid is not None else generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-ID-123"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    arr = slice_pixels(index, rows, cols) if pixels is None else pixels.astype(np.int16)
    ds.PixelData = arr.tobytes()
    return ds


def write_series(
    folder: Path,
    n: int = 5,
    *,
    step: float = 2.0,
    origin: Sequence[float] = (-10.0, 20.0, 30.0),
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    positions: Sequence[Sequence[float]] | None = None,
    names: Sequence[str] | None = None,
    reverse_instance_numbers: bool = True,
    **kwargs,
) -> list[Path]:
    """Write ``n`` slices along the normal of ``iop``; file names and InstanceNumbers run opposite to position."""
    folder.mkdir(parents=True, exist_ok=True)
    iop_arr = np.asarray(iop, dtype=float)
    normal = np.cross(iop_arr[:3], iop_arr[3:])
    if positions is None:
        positions = [np.asarray(origin) + k * step * normal for k in range(n)]
    paths = []
    for k, pos in enumerate(positions):
        number = len(positions) - k if reverse_instance_numbers else k + 1
        ds = make_slice(pos, index=k, iop=iop, instance_number=number, **kwargs)
        name = names[k] if names is not None else f"IM{number:04d}"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def recompress_with_sitk(path: Path, compressor: str = "JPEG") -> None:
    """Replace a file's pixel data with GDCM's encoding ("JPEG": lossless process 14; "JPEG2000": lossless)."""
    import SimpleITK as sitk

    ds = pydicom.dcmread(path)
    img = sitk.GetImageFromArray(ds.pixel_array)
    tmp = path.with_suffix(".gdcm.dcm")
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(tmp))
    writer.SetUseCompression(True)
    writer.SetCompressor(compressor)
    writer.Execute(img)
    enc = pydicom.dcmread(tmp)
    tmp.unlink()
    ds.PixelData = enc.PixelData
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = enc.file_meta.TransferSyntaxUID
    ds.save_as(path, enforce_file_format=True)


def recompress_jpeg_baseline(path: Path) -> np.ndarray:
    """8-bit JPEG baseline (lossy) via Pillow; returns the decoded grey values the file should give back."""
    from PIL import Image

    ds = pydicom.dcmread(path)
    arr8 = (np.clip(ds.pixel_array, 0, 255)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr8).save(buf, format="JPEG", quality=95)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def make_enhanced_ct(path: Path, n: int = 4, *, step: float = 2.5, origin=(5.0, -7.0, 12.0)) -> None:
    """An Enhanced CT Image Storage file with ``n`` frames stored in DESCENDING position order."""
    ds = make_slice(origin, index=0)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
               "RescaleIntercept", "SliceThickness"):
        delattr(ds, kw)
    ds.NumberOfFrames = n
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [0.8, 0.6]
    pm.SliceThickness = step
    shared.PixelMeasuresSequence = [pm]
    po = Dataset()
    po.ImageOrientationPatient = [1.0, 0, 0, 0, 1.0, 0]
    shared.PlaneOrientationSequence = [po]
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1.0, -1024.0, "HU"
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames, per_frame = [], []
    for f in range(n):
        k = n - 1 - f  # descending position
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * step]
        item.PlanePositionSequence = [pp]
        per_frame.append(item)
        frames.append(slice_pixels(k))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack(frames).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _seq_item(**kw) -> Dataset:
    item = Dataset()
    for k, v in kw.items():
        setattr(item, k, v)
    return item


def fieldmap_pixels(volume: int, index: int, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """Stored values of slice ``index`` of volume 0 (magnitude) or 1 (field map): uint16, (rows, cols)."""
    r, c = np.mgrid[:rows, :cols]
    if volume == 0:
        return (200 + 10 * index + 3 * r + c).astype(np.uint16)
    return (2048 + 40 * (r - rows // 2) - 7 * (c - cols // 2) + index).astype(np.uint16)


def make_philips_fieldmap(
    path: Path, n_slices: int = 32, *, step: float = 3.0, origin=(-40.0, -30.0, 12.0),
    iop=(1.0, 0.0, 0.0, 0.0, 0.96592583, -0.25881905),
) -> None:
    """A Philips-style Enhanced MR Image Storage B0 field map: magnitude + field map (Hz), 2 × ``n_slices`` frames.

    Both volumes sit at the same ``n_slices`` positions (an oblique stack). As Philips writes them, the frames are
    ordered by the Dimension Index Values (stack, in-stack position, image type): the two volumes interleave, one
    magnitude and one field-map frame per position, and the positions run in DESCENDING order along the normal. The
    magnitude has rescale 1/0, the field map (Hz) slope 0.5, intercept -1024 (stored 2048 → 0 Hz).
    """
    iop_arr = np.asarray(iop, dtype=float)
    normal = np.cross(iop_arr[:3], iop_arr[3:])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer, ds.SeriesDescription = "MR", "Philips", "B0 map"
    ds.PatientName, ds.PatientID = "Test^Fieldmap", "TEST-ID-FM"
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20260101", "120000", 7, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "MIXED", "NONE"]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLS, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = 2 * n_slices
    ds.AcquisitionDateTime = "20260101120000"
    ds.DimensionOrganizationSequence = [_seq_item(DimensionOrganizationUID="1.2.826.0.1.3680043.8.498.77")]
    ds.DimensionIndexSequence = [
        _seq_item(DimensionOrganizationUID="1.2.826.0.1.3680043.8.498.77", DimensionIndexPointer=0x00209056,
                  FunctionalGroupPointer=0x00209111),  # StackID in FrameContentSequence
        _seq_item(DimensionOrganizationUID="1.2.826.0.1.3680043.8.498.77", DimensionIndexPointer=0x00209057,
                  FunctionalGroupPointer=0x00209111),  # InStackPositionNumber
        _seq_item(DimensionOrganizationUID="1.2.826.0.1.3680043.8.498.77", DimensionIndexPointer=0x00089007,
                  FunctionalGroupPointer=0x00189226),  # FrameType in MRImageFrameTypeSequence
    ]
    shared = Dataset()
    shared.PixelMeasuresSequence = [_seq_item(PixelSpacing=[0.8, 0.6], SliceThickness=step, SpacingBetweenSlices=step)]
    shared.PlaneOrientationSequence = [_seq_item(ImageOrientationPatient=[float(v) for v in iop])]
    shared.MRTimingAndRelatedParametersSequence = [_seq_item(RepetitionTime=20.0, FlipAngle=10.0)]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame, pixels = [], []
    for k in range(n_slices):
        in_stack = n_slices - k  # descending along the normal: in-stack position 1 is the highest slice
        pos = np.asarray(origin) + (n_slices - 1 - k) * step * normal
        for vol in (0, 1):
            item = Dataset()
            item.FrameContentSequence = [_seq_item(StackID="1", InStackPositionNumber=in_stack,
                                                   DimensionIndexValues=[1, in_stack, vol + 1],
                                                   FrameAcquisitionDateTime="20260101120000")]
            item.PlanePositionSequence = [_seq_item(ImagePositionPatient=[float(v) for v in pos])]
            frame_type = (["ORIGINAL", "PRIMARY", "M_FFE", "M_FFE"] if vol == 0 else
                          ["ORIGINAL", "PRIMARY", "B0 MAP", "B0_MAP"])
            item.MRImageFrameTypeSequence = [_seq_item(FrameType=frame_type,
                                                       ComplexImageComponent="MAGNITUDE" if vol == 0 else "PHASE")]
            item.MREchoSequence = [_seq_item(EffectiveEchoTime=2.3)]
            slope, inter = (1.0, 0.0) if vol == 0 else (0.5, -1024.0)
            item.PixelValueTransformationSequence = [_seq_item(RescaleSlope=slope, RescaleIntercept=inter,
                                                               RescaleType="US" if vol == 0 else "HZ")]
            per_frame.append(item)
            pixels.append(fieldmap_pixels(vol, n_slices - 1 - k))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack(pixels).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
