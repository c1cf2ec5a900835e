"""The one error family of medseg.

Every error medseg raises on purpose is a :class:`MedsegError`. Each subclass also derives from the builtin
that matches it (``ValueError``, ``OSError``, ``LookupError``), so callers that already catch those keep working.
Messages say what was expected, what was found, which file, and what to do.
"""

from __future__ import annotations

__all__ = [
    "ChannelCountError",
    "CheckpointMismatchError",
    "ChecksumMismatchError",
    "DicomSegError",
    "DicomSeriesError",
    "DicomSrError",
    "DicomWriteError",
    "DuplicateSlicesError",
    "EmptySegmentationError",
    "GantryTiltError",
    "GeometryError",
    "GridMismatchError",
    "InconsistentSeriesError",
    "LabelTableError",
    "ManifestError",
    "MedsegError",
    "MissingDependencyError",
    "MissingSlicesError",
    "ModalityMismatchError",
    "ModelCardError",
    "ModelNotFoundError",
    "MultipleSeriesError",
    "MultipleVolumesError",
    "NoImageSeriesError",
    "NonUniformSpacingError",
    "NotVolumetricError",
    "OptionError",
    "OverlappingSegmentsError",
    "PhantomError",
    "RecipeError",
    "RegionError",
    "ResultsLayoutError",
    "SegmentCodeError",
    "SegmentationCancelledError",
    "SourceUidError",
    "UnknownNetworkError",
    "UnreadableFileError",
    "UnsafeBundleError",
    "UnsafeCheckpointError",
    "UnsupportedBundleError",
    "UnsupportedFormatError",
    "WeightsError",
    "WorkflowError",
]


class MedsegError(Exception):
    """Base class of every error medseg raises on purpose."""


class UnsupportedFormatError(MedsegError, ValueError):
    """The path is not in a format medseg reads or writes."""


class UnreadableFileError(MedsegError, OSError):
    """A file exists but cannot be read: truncated, corrupt, or not what its name says."""


class DicomSeriesError(MedsegError, ValueError):
    """A DICOM folder or series cannot be turned into one volume."""


class NoImageSeriesError(DicomSeriesError):
    """A folder holds no DICOM image series."""


class MultipleSeriesError(DicomSeriesError):
    """A folder holds several image series and none was chosen."""


class MultipleVolumesError(DicomSeriesError):
    """A DICOM file or series holds several volumes at the same slice positions (echoes, time points, magnitude
    and field map) and none was chosen, or the chosen number does not exist."""


class MissingSlicesError(DicomSeriesError):
    """Slices are missing from a series (gaps that are multiples of the slice spacing)."""


class NonUniformSpacingError(DicomSeriesError):
    """The distances between slices differ and are not explained by missing slices."""


class InconsistentSeriesError(DicomSeriesError):
    """Slices of one series disagree in orientation, size, pixel spacing or pixel format."""


class DuplicateSlicesError(DicomSeriesError):
    """Several different slices sit at the same position."""


class GantryTiltError(DicomSeriesError):
    """Slices are stacked along a direction that is not normal to them (tilted gantry)."""


class DicomWriteError(MedsegError, ValueError):
    """A volume cannot be written as a DICOM series (modality, pixel values, geometry, target folder)."""


class PhantomError(MedsegError, ValueError):
    """A phantom option is out of range (shape, spacing, orientation, body scale, tumour counts, study folder)."""


class GeometryError(MedsegError, ValueError):
    """An affine or a voxel grid is invalid."""


class GridMismatchError(GeometryError):
    """Two volumes that must share a voxel grid do not."""


class NotVolumetricError(MedsegError, ValueError):
    """An operation needs a 3D volume and was given a single slice (or a 4D array)."""


class LabelTableError(MedsegError, ValueError):
    """A label table is malformed or does not match a label volume."""


class ModelCardError(MedsegError, ValueError):
    """A model card (YAML) or a MONAI bundle's configs do not describe a runnable model."""


class UnsafeBundleError(ModelCardError):
    """A MONAI bundle config holds code medseg does not run without ``--trust-bundle-code`` (an expression or a
    ``_target_`` outside the allow-list, a macro, the bundle's own ``scripts/`` package)."""


class UnsupportedBundleError(ModelCardError):
    """A MONAI bundle medseg cannot run as a segmentation model (interactive or prompted, several inputs, an
    inferer or transform it does not reproduce)."""


class UnknownNetworkError(ModelCardError, LookupError):
    """A model card names a network that MONAI does not provide (the message suggests the closest name)."""


class ModelNotFoundError(MedsegError, LookupError):
    """No model card, bundle or file matches the requested model name or path."""


class WeightsError(MedsegError, ValueError):
    """A weights file cannot be loaded into the model's network."""


class ChecksumMismatchError(WeightsError):
    """A weights file's sha256 differs from the one its model card records."""


class UnsafeCheckpointError(WeightsError):
    """A checkpoint holds pickled Python objects, which are refused (they can run code when loaded)."""


class CheckpointMismatchError(WeightsError):
    """A checkpoint's parameter names or shapes do not match the network built from the card."""


class ModalityMismatchError(MedsegError, ValueError):
    """A scan's modality is not one the model card accepts."""


class ChannelCountError(MedsegError, ValueError):
    """A volume has a different number of channels than the model expects."""


class RegionError(MedsegError, ValueError):
    """A seed, box, window or mask given to an interactive tool does not fit the volume."""


class DeviceError(MedsegError, ValueError):
    """A requested compute device (e.g. CUDA) is not available on this machine."""


class ResultsLayoutError(MedsegError, ValueError):
    """A results folder for a report does not have the documented layout (RESULTS_DIR/<case_id>/pred.*)."""


class RecipeError(MedsegError, ValueError):
    """A training recipe (YAML) or its dataset manifest is missing, malformed or names files that do not exist."""


class ManifestError(MedsegError, ValueError):
    """A manifest (JSON, CSV, MSD dataset.json) cannot be read, names files outside its root or that do not exist,
    repeats a case id, or a file's sha256 differs from the one it records."""


class SegmentationCancelledError(MedsegError, RuntimeError):
    """A segmentation was cancelled through its ``cancel`` hook before it finished (nothing was returned)."""


class DicomSegError(MedsegError, ValueError):
    """A DICOM SEG cannot be written from these labels and source, or read as asked."""


class SegmentCodeError(DicomSegError, LookupError):
    """Labels have no coded concept (category, type) for DICOM SEG; the message lists them and how to give codes."""


class SourceUidError(DicomSegError):
    """The source series has blank, missing or duplicate UIDs a DICOM SEG must reference (see ``repair_uids``)."""


class EmptySegmentationError(DicomSegError):
    """A label map holds no labelled voxel, so there is no segment to write."""


class OverlappingSegmentsError(DicomSegError):
    """Segments of a DICOM SEG overlap, so they cannot be one label map (read them with ``split=True``)."""


class DicomSrError(MedsegError, ValueError):
    """A DICOM SR summary cannot be written from this SEG, statistics and source."""


class WorkflowError(MedsegError, ValueError):
    """A workflow recipe or a batch run's options cannot be honoured (bad field, unavailable output or executor)."""


class OptionError(MedsegError, ValueError):
    """An option given to a medseg function (or a CLI flag) is out of range or of the wrong kind."""


class MissingDependencyError(MedsegError, ImportError):
    """An optional dependency that a model kind needs (e.g. nnunetv2 for nnU-Net folders) is not installed."""
