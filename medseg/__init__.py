"""medseg: 3D organ and tumour segmentation of CT and MR scans.

Four calls for a notebook: ``load_volume`` → ``segment`` → ``evaluate`` → ``volume_stats``.
Heavy dependencies (torch, MONAI, napari) are imported only by the functions that need them.
"""

from medseg.errors import MedsegError
from medseg.io import SegAlgorithm, list_series, load_segmentation, load_volume, save_volume, write_dicom_seg
from medseg.labels import Label, LabelTable
from medseg.metrics import evaluate
from medseg.stats import volume_stats
from medseg.volume import SourceReferences, Volume

__version__ = "0.1.0"

__all__ = [
    "Label",
    "LabelTable",
    "MedsegError",
    "SegAlgorithm",
    "Segmentation",
    "Segmenter",
    "SourceReferences",
    "Volume",
    "__version__",
    "evaluate",
    "list_series",
    "load_segmentation",
    "load_volume",
    "save_volume",
    "segment",
    "volume_stats",
    "write_dicom_seg",
]

# Lazily imported (they need torch and MONAI): ``import medseg`` stays light.
_LAZY = {"segment": "medseg.inference", "Segmenter": "medseg.inference", "Segmentation": "medseg.inference"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")
