"""Foundation geometry: LPS ↔ RAS, ITK's (z, y, x) array order, and the array-level conversions built on them.

The one home of the facts every geometry-aware module needs, below :mod:`medseg.volume` in the layers so that
both :mod:`medseg.volume` and :mod:`medseg.io.convert` import it (neither imports the other's implementation):

- DICOM and ITK use LPS+ world coordinates; medseg, nibabel and MONAI use RAS+. ``RAS = diag(-1, -1, 1) · LPS``
  (:data:`LPS_TO_RAS`, its own inverse).
- An ITK/SimpleITK array is indexed ``a[z, y, x]``; a medseg array ``array[i, j, k]`` is ``a.transpose(2, 1, 0)``.
- An affine maps voxel indices (i, j, k) to world mm; its columns are the axes' directions times their spacings.

Functions here take and return plain ``(array, affine)`` pairs; :mod:`medseg.io.convert` wraps them for
:class:`~medseg.volume.Volume`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import GeometryError

if TYPE_CHECKING:  # pragma: no cover
    import nibabel as nib
    import SimpleITK as sitk
    from monai.data import MetaTensor

__all__ = [
    "LPS_TO_RAS",
    "itk_geometry",
    "lps_affine",
    "metatensor",
    "metatensor_to_array",
    "nibabel_image",
    "nibabel_to_array",
    "sitk_image",
    "sitk_to_array",
]

#: Flips x and y: maps LPS coordinates to RAS (and back; it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_TO_RAS.setflags(write=False)


def lps_affine(origin: Any, spacing: Any, direction: Any) -> np.ndarray:
    """RAS affine from ITK/DICOM geometry.

    Parameters
    ----------
    origin : array-like, shape (3,)
        LPS position (mm) of voxel (0, 0, 0).
    spacing : array-like, shape (3,)
        Voxel size (mm) along i, j, k.
    direction : array-like, shape (3, 3) or (9,)
        LPS unit vectors of the i, j, k axes as columns (ITK's row-major direction matrix).

    Returns
    -------
    ndarray, shape (4, 4)
        Voxel (i, j, k) → RAS mm.
    """
    a = np.eye(4)
    a[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    a[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ a


def itk_geometry(affine: Any) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """ITK origin (LPS mm), spacing (mm) and row-major direction (9 numbers) of a RAS affine; inverse of
    :func:`lps_affine`."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(lps[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def sitk_image(array: np.ndarray, affine: Any) -> sitk.Image:
    """SimpleITK image of an (I, J, K) or (I, J, K, C) array on a RAS affine (channels become vector components)."""
    import SimpleITK as sitk

    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.ndim == 4:
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0, 3)), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    origin, spacing, direction = itk_geometry(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def sitk_to_array(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(array (I, J, K[, C]), RAS affine)`` of a 2D or 3D SimpleITK image (2D becomes one slice).

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
    return arr, affine


def nibabel_to_array(image: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray]:
    """``(array, RAS affine)`` of a nibabel image; scaled data (scl_slope/inter) as float32, unscaled as stored.

    Raises
    ------
    GeometryError
        If the image is not 2D or 3D (or 4D with one volume, or a NIfTI vector image).
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
    return np.asarray(arr), np.asarray(image.affine, dtype=np.float64)


def metatensor_to_array(tensor: MetaTensor) -> tuple[np.ndarray, np.ndarray]:
    """``(array (I, J, K[, C]), RAS affine)`` of a channel-first MetaTensor; an LPS-space tensor is converted.

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
    return arr, affine


def nibabel_image(array: np.ndarray, affine: Any) -> nib.Nifti1Image:
    """NIfTI-1 image: the affine becomes the sform (code 1, scanner) and, when it has no shear, the qform too."""
    import nibabel as nib

    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, affine)
    img.set_sform(affine, code=1)
    try:
        img.set_qform(affine, code=1, strip_shears=False)
    except Exception:  # noqa: BLE001 - a sheared affine has no quaternion form; the sform carries it
        img.set_qform(None, code=0)
    img.header.set_xyzt_units("mm", "sec")
    return img


def metatensor(array: np.ndarray, affine: Any, *, filename: str | None = None) -> MetaTensor:
    """Channel-first MONAI MetaTensor (C, I, J, K) of an (I, J, K[, C]) array, ``affine`` = the RAS affine."""
    import torch
    from monai.data import MetaTensor
    from monai.utils import SpaceKeys

    arr = np.asarray(array)
    ndim = arr.ndim
    if arr.dtype in (np.uint16, np.uint32):  # torch's unsigned types beyond uint8 support few operations
        arr = arr.astype(np.int32 if arr.dtype == np.uint16 else np.int64)
    arr = arr[None] if ndim == 3 else np.moveaxis(arr, -1, 0)
    aff = torch.tensor(np.array(affine, dtype=np.float64), dtype=torch.float64)
    meta: dict[str, Any] = {
        "affine": aff,
        "original_affine": aff.clone(),
        "spatial_shape": np.array(arr.shape[1:4]),
        "space": SpaceKeys.RAS,
        "original_channel_dim": "no_channel" if ndim == 3 else -1,
    }
    if filename is not None:
        meta["filename_or_obj"] = filename
    # Arrays in Fortran order (NIfTI data) stay so: a transposing copy of a CT costs about a second, and every
    # consumer (MONAI's resample, medseg's separable one) reads strided tensors. Negative strides must be copied.
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous) or any(s < 0 for s in arr.strides):
        arr = np.ascontiguousarray(arr)
    return MetaTensor(torch.from_numpy(arr), meta=meta)
