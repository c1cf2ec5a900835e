"""The one geometry-carrying object: a voxel array with a 4×4 RAS affine in millimetres.

Array axes are (i, j, k) — nibabel's and MONAI's order — and ``affine @ [i, j, k, 1]`` gives the world position
(x, y, z) of a voxel centre in RAS+ millimetres: +x points to the patient's *R*ight, +y *A*nterior, +z
*S*uperior (DICOM/ITK's LPS+ has +x to the patient's left and +y posterior). Spacing, origin, direction and
orientation code are derived from the affine and never stored twice. The array-level conversions to SimpleITK,
nibabel and MONAI (LPS and (z, y, x) order) live in the foundation module :mod:`medseg.geometry`; the methods
here call them, and :mod:`medseg.io.convert` offers the same as functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg import geometry
from medseg.errors import GeometryError, GridMismatchError, NotVolumetricError
from medseg.labels import LabelTable

if TYPE_CHECKING:  # pragma: no cover
    import nibabel as nib
    import SimpleITK as sitk
    from monai.data import MetaTensor

__all__ = ["GRID_ATOL_MM", "SkippedFile", "SliceInstances", "SourceReferences", "Volume"]

#: Default tolerance (mm) when deciding whether two grids are the same.
GRID_ATOL_MM = 1e-4


@dataclass(frozen=True)
class SliceInstances:
    """Which source instance holds each slice of a volume (see :meth:`SourceReferences.slice_instances`).

    Attributes
    ----------
    axis : int
        The array axis (0, 1 or 2) that runs across the source's slice planes.
    instance : tuple of int
        ``instance[s]`` is the index into :class:`SourceReferences`' per-instance tuples of the instance whose plane
        holds slice ``s`` along ``axis``.
    """

    axis: int
    instance: tuple[int, ...]


@dataclass(frozen=True)
class SkippedFile:
    """A file of a DICOM folder that is not in the loaded volume, and why.

    Attributes
    ----------
    path : str
        The file.
    reason : str
        What is wrong with it (damaged header, unreadable, contradicts the series), one line.
    """

    path: str
    reason: str


@dataclass(frozen=True)
class SourceReferences:
    """Where a volume came from, kept so that derived objects (DICOM SEG) can reference it.

    The per-instance tuples (``files``, ``sop_instance_uids``, ``positions_mm``) describe one source plane each
    (a single-frame file, or one frame of a multi-frame file). They are keyed by **world position**, not by array
    index: reorienting, flipping or transposing the voxels (:func:`medseg.resample.as_orientation`,
    :func:`~medseg.resample.reorient_to`, :meth:`Volume.with_array`) keeps them valid as they are. Ask
    :meth:`slice_instances` which instance holds each slice of a given volume.

    Attributes
    ----------
    files : tuple of str
        Source file of each instance (one entry for a single file without geometry).
    sop_instance_uids : tuple of str
        SOP Instance UID of each instance (may hold empty strings when the source blanked them).
    positions_mm : tuple of (float, float, float)
        RAS position (mm) of each instance's first pixel (its ImagePositionPatient); empty when unknown.
    study_instance_uid, series_instance_uid, frame_of_reference_uid, sop_class_uid : str or None
        As in the source; ``None`` or ``""`` when absent or blanked.
    series_description : str or None
        Free text from the source, for listings.
    skipped : tuple of SkippedFile
        Damaged files of the source folder left out because the caller asked to skip them
        (``load_volume(..., skip_unreadable=True)``); empty otherwise.
    """

    files: tuple[str, ...] = ()
    sop_instance_uids: tuple[str, ...] = ()
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    sop_class_uid: str | None = None
    series_description: str | None = None
    positions_mm: tuple[tuple[float, float, float], ...] = ()

    def slice_instances(self, volume: Volume, *, atol_voxels: float = 0.01) -> SliceInstances:
        """Which instance holds each slice of ``volume``, found from the instances' world positions.

        Parameters
        ----------
        volume : Volume
            A volume on the source's voxels in any axis order or direction (e.g. the scan after
            :func:`~medseg.resample.as_orientation`, or labels on its grid).
        atol_voxels : float
            How far (in voxels) a position may sit from a voxel centre.

        Returns
        -------
        SliceInstances

        Raises
        ------
        GeometryError
            If there are no positions, or the volume's voxels do not sit on the instances' planes (e.g. it was
            resampled, cropped or comes from another series).
        """
        if not self.positions_mm:
            raise GeometryError("These source references hold no instance positions (not a DICOM source with "
                                "ImagePositionPatient); slices cannot be matched to instances.")
        ijk = volume.voxel_ijk(np.asarray(self.positions_mm, dtype=np.float64))
        n = len(self.positions_mm)
        shape = np.array(volume.shape)
        for axis in range(3):
            others = [a for a in range(3) if a != axis]
            idx = ijk[:, axis]
            rounded = np.round(idx)
            if n == 1 and shape[axis] != 1:
                continue
            if (np.all(np.abs(idx - rounded) <= atol_voxels) and np.all(np.ptp(ijk[:, others], axis=0) <= atol_voxels)
                    and len(set(rounded.astype(int).tolist())) == n and n == shape[axis]
                    and rounded.min() >= 0 and rounded.max() <= shape[axis] - 1):
                order = np.empty(n, dtype=int)
                order[rounded.astype(int)] = np.arange(n)
                return SliceInstances(axis, tuple(int(v) for v in order))
        raise GeometryError(
            f"The volume ({volume.describe_grid()}) does not hold one slice per source instance ({n} instances): "
            "its voxels do not sit on the source's slice planes (resampled, cropped, or another series). Put it "
            "on the source scan's grid first, e.g. medseg.resample.resample_to(labels, scan, "
            "interpolation='nearest')."
        )
    skipped: tuple[SkippedFile, ...] = ()


def _check_affine(affine: Any) -> np.ndarray:
    a = np.array(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise GeometryError(f"Affine shape must be (4, 4), not {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise GeometryError(f"Affine must be finite, got\n{a}")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise GeometryError(f"Affine last row must be [0, 0, 0, 1], not {a[3].tolist()}.")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise GeometryError(f"Affine is singular (a zero spacing or parallel axes):\n{a}")
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image or label map on a world grid.

    Parameters
    ----------
    array : ndarray, shape (I, J, K) or (I, J, K, C)
        Voxel values; a trailing axis holds channels (e.g. class probabilities).
    affine : ndarray, shape (4, 4)
        Voxel index (i, j, k) → RAS+ world position in mm.
    modality : str, optional
        DICOM modality code (``"CT"``, ``"MR"``, ...) when known.
    labels : LabelTable, optional
        Present on label maps: what each integer means.
    source : SourceReferences, optional
        Source files and DICOM UIDs.

    Raises
    ------
    GeometryError
        If the affine is not a finite, invertible 4×4 matrix or the array is not 3D (+ channels).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None
    labels: LabelTable | None = None
    source: SourceReferences | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim not in (3, 4):
            raise GeometryError(
                f"Volume array must be 3D (I, J, K) or 4D (I, J, K, C), not {arr.ndim}D with shape {arr.shape}."
            )
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "affine", _check_affine(self.affine))

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing_mm)
        extra = f", labels={len(self.labels)}" if self.labels is not None else ""
        return (
            f"Volume(shape={self.array.shape}, dtype={self.array.dtype}, spacing_mm=({sp}), "
            f"orientation={self.orientation!r}, modality={self.modality!r}{extra})"
        )

    # ---- derived geometry -------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (I, J, K)."""
        return tuple(int(n) for n in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm (norms of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """RAS position in mm of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3×3 matrix whose columns are the RAS unit vectors of the i, j, k axes."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def orientation(self) -> str:
        """Three-letter code of the RAS direction each axis points to most, e.g. ``"LPS"`` or ``"RAS"``."""
        import nibabel.orientations as nio

        return "".join(nio.aff2axcodes(self.affine))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (|det| of the affine's 3×3 part, mm³ / 1000)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    @property
    def is_oblique(self) -> bool:
        """True when an axis is not aligned with a world axis (to 1e-4)."""
        d = np.abs(self.direction)
        return bool(np.any((d > 1e-4) & (d < 1 - 1e-4)))

    def world_mm(self, ijk: Any) -> np.ndarray:
        """World RAS positions (mm) of voxel indices; ``ijk`` has shape (..., 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def voxel_ijk(self, xyz: Any) -> np.ndarray:
        """Continuous voxel indices of world RAS positions (mm); ``xyz`` has shape (..., 3)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def describe_grid(self) -> str:
        """One line naming shape, spacing, origin and orientation, for messages."""
        sp = ", ".join(f"{s:.4g}" for s in self.spacing_mm)
        org = ", ".join(f"{s:.4g}" for s in self.origin_mm)
        return f"shape {self.shape}, spacing ({sp}) mm, origin ({org}) mm, orientation {self.orientation}"

    def same_grid(self, other: Volume, *, atol_mm: float = GRID_ATOL_MM) -> bool:
        """True if both volumes have the same spatial shape and every voxel centre agrees to ``atol_mm``."""
        if self.shape != other.shape:
            return False
        # The farthest corner moves by at most sum(|Δcolumn| * extent) + |Δorigin|.
        extent = np.array([*self.shape, 1], dtype=np.float64) - np.array([1, 1, 1, 0])
        diff = np.abs(self.affine[:3] - other.affine[:3]) @ extent
        return bool(np.all(diff <= atol_mm))

    def require_same_grid(self, other: Volume, *, what: str = "the two volumes", atol_mm: float = GRID_ATOL_MM) -> None:
        """Raise :class:`GridMismatchError` naming both grids unless :meth:`same_grid` holds."""
        if not self.same_grid(other, atol_mm=atol_mm):
            raise GridMismatchError(
                f"{what} are not on the same voxel grid:\n  first:  {self.describe_grid()}\n"
                f"  second: {other.describe_grid()}\n"
                "Resample one onto the other first, e.g. medseg.resample.resample_to(moving, reference, interpolation="
                "'nearest') for labels."
            )

    def require_3d(self, operation: str) -> None:
        """Raise :class:`NotVolumetricError` if the volume is a single slice (or has channels)."""
        if self.array.ndim != 3 or min(self.shape) < 2:
            raise NotVolumetricError(
                f"{operation} needs a 3D volume with at least 2 voxels along every axis; got {self.describe_grid()}"
                f" (array shape {self.array.shape}). Load a whole series (a folder), not a single slice."
            )

    # ---- derived volumes --------------------------------------------------------------------------------------
    def with_array(self, array: np.ndarray, *, labels: LabelTable | None = None, modality: str | None = None) -> Volume:
        """A new volume on this grid holding ``array`` (same spatial shape), keeping the source references.

        Raises
        ------
        GeometryError
            If ``array``'s spatial shape differs from this volume's.
        """
        array = np.asarray(array)
        if array.shape[:3] != self.shape:
            raise GeometryError(f"New array shape {array.shape} does not match the grid {self.shape}.")
        return replace(self, array=array, labels=labels, modality=modality if modality is not None else self.modality)

    # ---- conversions (array-level work in medseg.geometry) ------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        """Exact SimpleITK image (LPS, (z, y, x) array order handled)."""
        return geometry.sitk_image(self.array, self.affine)

    @classmethod
    def from_sitk(cls, image: sitk.Image, *, modality: str | None = None) -> Volume:
        """Exact volume from a SimpleITK image."""
        arr, affine = geometry.sitk_to_array(image)
        return cls(arr, affine, modality=modality)

    def to_nibabel(self) -> nib.Nifti1Image:
        """NIfTI-1 image with this affine as sform and qform (when representable)."""
        return geometry.nibabel_image(self.array, self.affine)

    @classmethod
    def from_nibabel(cls, image: nib.spatialimages.SpatialImage, *, modality: str | None = None) -> Volume:
        """Volume from any nibabel spatial image (its ``affine`` is RAS by definition)."""
        arr, affine = geometry.nibabel_to_array(image)
        return cls(arr, affine, modality=modality)

    def to_metatensor(self) -> MetaTensor:
        """MONAI MetaTensor, channel-first (C, I, J, K), with this RAS affine; MONAI transforms run on it."""
        filename = self.source.files[0] if self.source is not None and self.source.files else None
        return geometry.metatensor(self.array, self.affine, filename=filename)

    @classmethod
    def from_metatensor(
        cls, tensor: MetaTensor, *, modality: str | None = None, labels: LabelTable | None = None
    ) -> Volume:
        """Volume from a channel-first MetaTensor (one channel → 3D, several → channels last)."""
        arr, affine = geometry.metatensor_to_array(tensor)
        return cls(arr, affine, modality=modality, labels=labels)
