"""Weight-free segmentation tools: the ``ct-basic`` model and interactive classical tools.

Everything here is a function of a :class:`~medseg.volume.Volume` that returns a new Volume on the input's grid
(same shape, same affine). Sizes are given in mm and mL, never voxels: the functions convert with the volume's
spacing, so the same call gives the same physical result on a 0.7 mm or a 5 mm grid.

``ct_basic``
    body, left lung, right lung, airway (trachea and main bronchi) and bone of a CT, from Hounsfield-unit rules,
    morphology and connected components (SimpleITK, scipy.ndimage, cc3d, scikit-image). Left and right are the
    patient's, read from the affine (RAS: the patient's left is −x), never from array order.
``region_grow`` / ``confidence_connected``
    seeded region growing within an intensity window (SimpleITK ConnectedThreshold / ConfidenceConnected).
``otsu_in_box``
    Otsu threshold of the voxels inside a box.
``watershed_split``
    splits touching objects of a mask at the necks of their mm distance map.
``remove_islands``
    drops connected components smaller than a volume in mL.

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
