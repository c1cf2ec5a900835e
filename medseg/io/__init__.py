"""Reading and writing volumes: DICOM series, NIfTI, NRRD, MetaImage (the only place that knows LPS)."""

from medseg.io.dicom import FolderContents, SeriesInfo, VolumeInfo, list_series, list_volumes, scan_folder
from medseg.io.dicom_seg import SegAlgorithm, SegInfo, load_segmentation, read_seg_info, write_dicom_seg
from medseg.io.dicom_sr import write_dicom_sr
from medseg.io.dicom_write import WrittenSeries, write_dicom_series
from medseg.io.volume_io import (
           FORMAT_NAMES,
           READ_FORMATS,
           WRITE_SUFFIXES,
           detect_format,
           load_volume,
           save_volume,
)

__all__ = [
           "FORMAT_NAMES",
           "READ_FORMATS",
           "WRITE_SUFFIXES",
           "FolderContents",
           "SegAlgorithm",
           "SegInfo",
           "SeriesInfo",
           "VolumeInfo",
           "WrittenSeries",
           "detect_format",
           "list_series",
           "list_volumes",
           "load_segmentation",
           "load_volume",
           "read_seg_info",
           "save_volume",
           "scan_folder",
           "write_dicom_seg",
           "write_dicom_series",
           "write_dicom_sr",
]
