"""Reading and writing volumes: DICOM series, NIfTI, NRRD, MetaImage (the only place that knows LPS)."""

from medseg.io.dicom import SeriesInfo, list_series
from medseg.io.dicom_seg import SegAlgorithm, SegInfo, load_segmentation, read_seg_info, write_dicom_seg
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
           "SegAlgorithm",
           "SegInfo",
           "SeriesInfo",
           "WrittenSeries",
           "detect_format",
           "list_series",
           "load_segmentation",
           "load_volume",
           "read_seg_info",
           "save_volume",
           "write_dicom_seg",
           "write_dicom_series",
]
