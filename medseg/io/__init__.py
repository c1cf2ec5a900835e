"""Reading and writing volumes: DICOM series, NIfTI, NRRD, MetaImage (the only place that knows LPS)."""

from medseg.io.dicom import FolderContents, SeriesInfo, VolumeInfo, list_series, list_volumes, scan_folder
from medseg.io.dicom_write import WrittenSeries, write_dicom_series
from medseg.io.volume_io import READ_FORMATS, WRITE_SUFFIXES, load_volume, save_volume

__all__ = [
           "READ_FORMATS",
           "WRITE_SUFFIXES",
           "FolderContents",
           "SeriesInfo",
           "VolumeInfo",
           "WrittenSeries",
           "list_series",
           "list_volumes",
           "load_volume",
           "save_volume",
           "scan_folder",
           "write_dicom_series",
]
