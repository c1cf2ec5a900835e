"""Exact conversions between :class:`~medseg.volume.Volume` and SimpleITK, nibabel and MONAI objects.

This module and the DICOM reader are the only places that know that ITK and DICOM use LPS coordinates and
(z, y, x) array order. ``RAS = diag(-1, -1, 1) · LPS``; an ITK array ``a[z, y, x]`` is ``volume.array[x, y, z]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import GeometryError
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

#: Flips x and y: maps LPS coordinates to RAS (and back; it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_affine(origin: Any, spacing: Any, direction: Any) -> np.ndarray:
    """RAS affine from ITK/DICOM geometry: LPS origin (3,), spacing (3,), direction (3, 3) with axes as columns."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    a[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ a


def _itk_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(lps[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """SimpleITK image on the same world grid (channels become vector components)."""
    import SimpleITK as sitk

    arr = volume.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.ndim == 4:
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0, 3)), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    origin, spacing, direction = _itk_geometry(volume.affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


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
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim == 2:
        image = sitk.JoinSeries(image)
    elif dim != 3:
        raise GeometryError(f"Expected a 2D or 3D image, got a {dim}D image of size {image.GetSize()}.")
    arr = sitk.GetArrayFromImage(image)
    arr = arr.transpose(2, 1, 0, 3) if image.GetNumberOfComponentsPerPixel() > 1 else arr.transpose(2, 1, 0)
    affine = lps_affine(image.GetOrigin(), image.GetSpacing(), np.reshape(image.GetDirection(), (3, 3)))
    return Volume(arr, affine, modality=modality, labels=labels)


def volume_to_nibabel(volume: Volume) -> nib.Nifti1Image:
    """NIfTI-1 image: the affine becomes the sform (code 1, scanner) and, when it has no shear, the qform too."""
    import nibabel as nib

    arr = volume.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, volume.affine)
    img.set_sform(volume.affine, code=1)
    try:
        img.set_qform(volume.affine, code=1, strip_shears=False)
    except Exception:  # noqa: BLE001 - a sheared affine has no quaternion form; the sform carries it
        img.set_qform(None, code=0)
    img.header.set_xyzt_units("mm", "sec")
    return img


def volume_from_nibabel(
    image: nib.spatialimages.SpatialImage, *, modality: str | None = None, labels: LabelTable | None = None
) -> Volume:
    """Volume from a nibabel image; scaled data (scl_slope/inter) comes back as float32, unscaled as stored.

    Raises
    ------
    GeometryError
        If the image is not 2D or 3D (or 4D with one volume).
    """
    header = image.header
    slope, inter = (header.get_slope_inter() if hasattr(header, "get_slope_inter") else (None, None))
    scaled = (slope is not None and slope != 1.0) or (inter is not None and inter != 0.0)
    arr = image.get_fdata(dtype=np.float32) if scaled else np.asanyarray(image.dataobj)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector images: (I, J, K, 1, C)
        arr = arr[:, :, :, 0, :]
    if arr.ndim not in (3, 4):
        raise GeometryError(f"Expected a 3D image, got shape {arr.shape}.")
    return Volume(np.asarray(arr), image.affine, modality=modality, labels=labels)


def volume_to_metatensor(volume: Volume) -> MetaTensor:
    """Channel-first MONAI MetaTensor (C, I, J, K) with ``affine`` = the RAS affine and ``space`` = RAS."""
    import torch
    from monai.data import MetaTensor
    from monai.utils import SpaceKeys

    arr = volume.array
    if arr.dtype in (np.uint16, np.uint32):  # torch's unsigned types beyond uint8 support few operations
        arr = arr.astype(np.int32 if arr.dtype == np.uint16 else np.int64)
    arr = arr[None] if arr.ndim == 3 else np.moveaxis(arr, -1, 0)
    affine = torch.tensor(np.array(volume.affine), dtype=torch.float64)
    meta: dict[str, Any] = {
        "affine": affine,
        "original_affine": affine.clone(),
        "spatial_shape": np.array(volume.shape),
        "space": SpaceKeys.RAS,
        "original_channel_dim": "no_channel" if volume.array.ndim == 3 else -1,
    }
    if volume.source is not None and volume.source.files:
        meta["filename_or_obj"] = volume.source.files[0]
    # Arrays in Fortran order (NIfTI data) stay so: a transposing copy of a CT costs about a second, and every
    # consumer (MONAI's resample, medseg's separable one) reads strided tensors. Negative strides must be copied.
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous) or any(s < 0 for s in arr.strides):
        arr = np.ascontiguousarray(arr)
    return MetaTensor(torch.from_numpy(arr), meta=meta)


def volume_from_metatensor(
    tensor: MetaTensor, *, modality: str | None = None, labels: LabelTable | None = None
) -> Volume:
    """Volume from a channel-first MetaTensor; an LPS-space tensor (``space`` = LPS) is converted to RAS.

    Raises
    ------
    GeometryError
        If the tensor is not (C, I, J, K).
    """
    from monai.utils import SpaceKeys

    if tensor.ndim != 4:
        raise GeometryError(f"Expected a channel-first (C, I, J, K) MetaTensor, got shape {tuple(tensor.shape)}.")
    affine = np.asarray(tensor.affine.detach().cpu().numpy(), dtype=np.float64)
    if str(tensor.meta.get("space", SpaceKeys.RAS)) == str(SpaceKeys.LPS):
        affine = LPS_TO_RAS @ affine
    arr = tensor.detach().cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    return Volume(arr, affine, modality=modality, labels=labels)
