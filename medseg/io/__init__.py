"""Reading and writing volumes: DICOM series, NIfTI, NRRD, MetaImage (the only place that knows LPS)."""

from medseg.io.dicom import SeriesInfo, list_series
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
           "SeriesInfo",
           "WrittenSeries",
           "detect_format",
           "list_series",
           "load_volume",
           "save_volume",
           "write_dicom_series",
]
