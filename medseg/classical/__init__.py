"""Weight-free segmentation tools: the ``ct-basic`` model and interactive classical tools.

Everything here is a function of a :class:`~medseg.volume.Volume` that returns a new Volume on the input's grid
(same shape, same affine). Sizes are given in mm and mL, never voxels: the functions convert with the volume's
spacing, so the same call gives the same physical result on a 0.7 mm or a 5 mm grid.

:mod:`medseg.classical.ct_basic`
    the ``ct-basic`` model: body, left lung, right lung, airway and bone of a CT from Hounsfield-unit rules.
:mod:`medseg.classical.interactive`
    the interactive tools the correction widgets call: ``region_grow``, ``confidence_connected``, ``otsu_in_box``,
    ``watershed_split``, ``remove_islands``.

See ``docs/classical.md`` for the rules, thresholds and limitations.
"""

from __future__ import annotations

from medseg.classical.ct_basic import CT_BASIC_LABELS, CtBasicConfig, ct_basic
from medseg.classical.interactive import (
    REGION_LABELS,
    confidence_connected,
    otsu_in_box,
    otsu_threshold_in_box,
    region_grow,
    remove_islands,
    watershed_split,
)

__all__ = [
    "CT_BASIC_LABELS",
    "REGION_LABELS",
    "CtBasicConfig",
    "confidence_connected",
    "ct_basic",
    "otsu_in_box",
    "otsu_threshold_in_box",
    "region_grow",
    "remove_islands",
    "watershed_split",
]
