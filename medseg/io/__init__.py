"""Reading and writing volumes: DICOM series, NIfTI, NRRD, MetaImage (the only place that knows LPS)."""

from medseg.io.dicom import SeriesInfo, list_series
from medseg.io.dicom_write import WrittenSeries, write_dicom_series
from medseg.io.volume_io import READ_FORMATS, WRITE_SUFFIXES, load_volume, save_volume

__all__ = [
           "READ_FORMATS",
           "WRITE_SUFFIXES",
           "SeriesInfo",
           "WrittenSeries",
           "list_series",
           "load_volume",
           "save_volume",
           "write_dicom_series",
]
