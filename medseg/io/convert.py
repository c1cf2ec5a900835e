"""Exact conversions between :class:`~medseg.volume.Volume` and SimpleITK, nibabel and MONAI objects.

The array-level work (LPS ↔ RAS, ITK's (z, y, x) order) lives in the foundation module :mod:`medseg.geometry`,
which :mod:`medseg.volume` imports too; this module wraps it for volumes. ``RAS = diag(-1, -1, 1) · LPS``; an ITK
array ``a[z, y, x]`` is ``volume.array[x, y, z]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import GeometryError
from medseg.geometry import (
    LPS_TO_RAS,
    lps_affine,
    metatensor,
    metatensor_to_array,
    nibabel_image,
    nibabel_to_array,
    sitk_image,
    sitk_to_array,
)
from medseg.labels import LabelTable
from medseg.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import nibabel as nib
    import SimpleITK as sitk
    from monai.data import MetaTensor

__all__ = [
    "LPS_TO_RAS",
    "itk_array",
    "lps_affine",
    "volume_from_itk_array",
    "volume_from_metatensor",
    "volume_from_nibabel",
    "volume_from_sitk",
    "volume_to_metatensor",
    "volume_to_nibabel",
    "volume_to_sitk",
]


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """SimpleITK image on the same world grid (channels become vector components)."""
    return sitk_image(volume.array, volume.affine)


def itk_array(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxels in SimpleITK's array order and the spacing in that order, as ``sitk.GetArrayFromImage`` and
    ``GetSpacing()[::-1]`` give them for :func:`volume_to_sitk` of the volume (what nnU-Net's readers hand its
    network).

    Returns
    -------
    array : ndarray, shape (K, J, I) or (C, K, J, I)
        A transposed view (no copy) of ``volume.array``; channels first for a 4D volume.
    spacing_mm : tuple of float
        (k, j, i) spacing in mm.
    """
    arr = volume.array
    view = arr.transpose(3, 2, 1, 0) if arr.ndim == 4 else arr.transpose(2, 1, 0)
    i, j, k = volume.spacing_mm
    return view, (k, j, i)


def volume_from_itk_array(
    array: np.ndarray, like: Volume, *, modality: str | None = None, labels: LabelTable | None = None
) -> Volume:
    """A volume on ``like``'s grid from an array in SimpleITK order (K, J, I), the inverse of :func:`itk_array`.

    Raises
    ------
    GeometryError
        If the array's shape is not ``like``'s shape reversed.
    """
    if array.ndim != 3 or tuple(array.shape) != tuple(like.shape[::-1]):
        raise GeometryError(
            f"Expected an array of shape {tuple(like.shape[::-1])} (SimpleITK order of the grid "
            f"{like.describe_grid()}), got {tuple(array.shape)}."
        )
    return Volume(array.transpose(2, 1, 0), like.affine, modality=modality, labels=labels, source=like.source)


def volume_from_sitk(image: sitk.Image, *, modality: str | None = None, labels: LabelTable | None = None) -> Volume:
    """Volume from a 3D SimpleITK image (a 2D image becomes a one-slice volume).

    Raises
    ------
    GeometryError
        If the image has more than three dimensions.
    """
    arr, affine = sitk_to_array(image)
    return Volume(arr, affine, modality=modality, labels=labels)


def volume_to_nibabel(volume: Volume) -> nib.Nifti1Image:
    """NIfTI-1 image: the affine becomes the sform (code 1, scanner) and, when it has no shear, the qform too."""
    return nibabel_image(volume.array, volume.affine)


def volume_from_nibabel(
    image: nib.spatialimages.SpatialImage, *, modality: str | None = None, labels: LabelTable | None = None
) -> Volume:
    """Volume from a nibabel image; scaled data (scl_slope/inter) comes back as float32, unscaled as stored.

    Raises
    ------
    GeometryError
        If the image is not 2D or 3D (or 4D with one volume).
    """
    arr, affine = nibabel_to_array(image)
    return Volume(arr, affine, modality=modality, labels=labels)


def volume_to_metatensor(volume: Volume) -> MetaTensor:
    """Channel-first MONAI MetaTensor (C, I, J, K) with ``affine`` = the RAS affine and ``space`` = RAS."""
    filename = volume.source.files[0] if volume.source is not None and volume.source.files else None
    return metatensor(volume.array, volume.affine, filename=filename)


def volume_from_metatensor(
    tensor: MetaTensor, *, modality: str | None = None, labels: LabelTable | None = None
) -> Volume:
    """Volume from a channel-first MetaTensor; an LPS-space tensor (``space`` = LPS) is converted to RAS.

    Raises
    ------
    GeometryError
        If the tensor is not (C, I, J, K).
    """
    arr, affine = metatensor_to_array(tensor)
    return Volume(arr, affine, modality=modality, labels=labels)
