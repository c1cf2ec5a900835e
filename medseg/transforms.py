"""Pre-processing built from a model card with MONAI transforms, and its exact inverse onto the input grid.

Forward (:func:`prepare`): Volume → MONAI MetaTensor → ``Orientation`` + ``Spacing`` (fused into one float32
resample with ``Compose(lazy=True)``) → optional foreground crop → intensity normalisation
(``ScaleIntensityRange``, ``NormalizeIntensity`` or ``ScaleIntensityRangePercentiles``). The result keeps the
affine of the network grid, so nothing else has to be remembered to go back.

Inverse (:func:`invert_to_input`): class scores on the network grid → labels (and optionally probabilities) on the
input grid. Every input voxel centre is mapped through ``inv(A_net) @ A_in`` to a continuous network-grid index
and the scores are sampled there with trilinear interpolation (border values outside the network grid, background
outside a foreground crop), one slab of input slices at a time; the argmax is taken per slab. Peak memory is
one slab of ``classes × slab`` floats instead of ``classes × full-resolution`` volumes. When the two grids share
voxel centres (only axis order or direction differ) the mapping is an exact index permutation and no
interpolation happens. See ``docs/inference.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medseg.errors import ChannelCountError, NotVolumetricError
from medseg.labels import LabelTable
from medseg.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from medseg.models.cards import ModelCard

__all__ = [
    "Prepared", "build_preprocessing", "clip_floor", "invert_nearest", "invert_to_input", "label_lookup", "prepare",
]

logger = logging.getLogger(__name__)

#: Default budget (bytes) for one slab of class scores during the inversion.
SLAB_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Prepared:
    """A volume made ready for the network.

    Attributes
    ----------
    image : torch.Tensor, shape (C, I', J', K'), float32
        Normalised intensities on the network grid (cropped to the foreground when the card asks).
    affine : ndarray, shape (4, 4)
        Voxel index on ``image`` → RAS mm.
    input_shape : tuple of 3 int
        Spatial shape of the input volume.
    input_affine : ndarray, shape (4, 4)
        Affine of the input volume.
    floor : float or None
        Value that every intensity at or below the card's lower clip maps to (air in a clipped CT window), or
        None when the normalisation has no clip floor.
    cropped : bool
        True when ``image`` is a foreground crop (voxels mapping outside it are background).
    """

    image: torch.Tensor
    affine: np.ndarray
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    floor: float | None
    cropped: bool = False


def clip_floor(card: ModelCard) -> float | None:
    """The normalised value of everything below the card's lower clip, or None if the normalisation has none."""
    it = card.preprocessing.intensity
    if it.kind in ("ct_window", "percentile") and it.clip:
        return float(min(it.b_min, it.b_max))
    return None


def build_preprocessing(card: ModelCard) -> tuple[Any, list[Any]]:
    """MONAI transforms for ``card``: (geometry Compose, list of intensity transforms).

    The geometry part (Orientation, Spacing) runs lazily and is applied as one float32 resample; the intensity
    transforms run after an optional foreground crop.
    """
    import torch
    from monai.transforms import (
        Compose,
        NormalizeIntensity,
        Orientation,
        ScaleIntensityRange,
        ScaleIntensityRangePercentiles,
        Spacing,
    )

    pre = card.preprocessing
    geometry: list[Any] = []
    if pre.orientation is not None:
        geometry.append(Orientation(axcodes=pre.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pre.spacing_mm is not None:
        geometry.append(Spacing(pixdim=pre.spacing_mm, mode="bilinear", padding_mode="border", dtype=np.float32))
    # The dtype must also go through ``overrides``: with lazy=True MONAI ignores Spacing(dtype=...) otherwise.
    compose = Compose(geometry, lazy=True, overrides={"dtype": torch.float32, "mode": "bilinear",
                                                       "padding_mode": "border"})
    it = pre.intensity
    intensity: list[Any] = []
    if it.kind == "ct_window":
        intensity.append(ScaleIntensityRange(a_min=it.a_min, a_max=it.a_max, b_min=it.b_min, b_max=it.b_max,
                                             clip=it.clip, dtype=np.float32))
    elif it.kind == "zscore":
        intensity.append(NormalizeIntensity(nonzero=it.nonzero, channel_wise=True, dtype=np.float32))
    elif it.kind == "percentile":
        intensity.append(ScaleIntensityRangePercentiles(lower=it.lower, upper=it.upper, b_min=it.b_min,
                                                        b_max=it.b_max, clip=it.clip, channel_wise=True,
                                                        dtype=np.float32))
    return compose, intensity


def check_input(volume: Volume, card: ModelCard) -> None:
    """Refuse volumes the model cannot take.

    Raises
    ------
    NotVolumetricError
        If the volume is a single slice or thinner than 2 voxels along an axis.
    ChannelCountError
        If the number of channels differs from the card's ``input_channels``.
    """
    if min(volume.shape) < 2:
        raise NotVolumetricError(
            f"Model {card.name!r} needs a 3D volume with at least 2 voxels along every axis; got "
            f"{volume.describe_grid()}. Load a whole series (a folder), not a single slice."
        )
    channels = 1 if volume.array.ndim == 3 else volume.array.shape[3]
    if channels != card.input_channels:
        names = f" ({', '.join(card.channel_names)})" if card.channel_names else ""
        what = (f"a 4D image with {channels} volumes along the last axis" if volume.array.ndim == 4
                else "a single-channel 3D image")
        raise ChannelCountError(
            f"Model {card.name!r} takes {card.input_channels} input channel(s){names}, but got {what} "
            f"(array shape {volume.array.shape}). "
            + ("Select one volume (e.g. the first time point) before segmenting."
               if card.input_channels == 1 else "Stack the channels in the card's order along a last axis.")
        )


def _separable_geometry(img: Any, transforms: list[Any]) -> Any | None:
    """Orientation + Spacing as MONAI plans them (lazily: the output grid is MONAI's), executed as three 1-D linear
    interpolations in float32 (border values outside the input, as ``padding_mode="border"``).

    Trilinear interpolation is separable, so this is the same resample as MONAI's executed one up to float
    rounding; it reads each input voxel a few times instead of gathering 8 corners per output voxel. Returns a
    plain tensor (C, I', J', K') and the output affine, or None when the grids are oblique to each other.
    """
    import torch

    x = img
    for t in transforms:
        x = t(x, lazy=True)
    if not getattr(x, "pending_operations", None):
        return None
    out_affine = np.asarray(x.peek_pending_affine().detach().cpu().numpy(), dtype=np.float64)
    out_shape = tuple(int(n) for n in x.peek_pending_shape())
    in_affine = np.asarray(img.affine.detach().cpu().numpy(), dtype=np.float64)
    axis_map = _axis_aligned(np.linalg.inv(in_affine) @ out_affine)  # output index → input index
    if axis_map is None:
        return None
    perm, scale, offset = axis_map  # output axis a reads input axis perm[a]
    data = img.as_tensor().to(torch.float32)
    # Work in the tensor's memory order (NIfTI data arrive in Fortran order): a permuted view, no copy.
    phys = sorted(range(3), key=lambda d: -data.stride(1 + d))
    data = data.permute(0, *[1 + d for d in phys])
    perm = [phys.index(p) for p in perm]
    order = sorted(range(3), key=lambda a: out_shape[a] / max(1, data.shape[1 + perm[a]]))  # shrink first
    for a in order:
        q = scale[a] * np.arange(out_shape[a], dtype=np.float64) + offset[a]
        data = _lerp_axis(data, 1 + perm[a], q)
    data = data.permute(0, *[1 + perm[a] for a in range(3)]).contiguous()
    return data, out_affine


def prepare(volume: Volume, card: ModelCard, *, resample: Literal["monai", "separable"] = "monai") -> Prepared:
    """Run the card's pre-processing on ``volume``.

    Parameters
    ----------
    volume : Volume, shape (I, J, K) or (I, J, K, C)
    card : ModelCard
    resample : {"monai", "separable"}
        "monai" (default): MONAI executes the fused Orientation + Spacing resample. "separable" (fast mode): the
        same output grid, resampled as three 1-D linear interpolations (equal up to float rounding, faster on
        CPU); grids oblique to each other fall back to MONAI.

    Returns
    -------
    Prepared

    Raises
    ------
    NotVolumetricError, ChannelCountError
        See :func:`check_input`.
    """
    import torch
    from monai.data import MetaTensor

    check_input(volume, card)
    compose, intensity = build_preprocessing(card)
    img: Any = volume.to_metatensor()
    if not torch.is_floating_point(img):
        img = img.to(torch.float32)
    fast = _separable_geometry(img, list(compose.transforms)) if resample == "separable" else None
    if fast is not None:
        data, affine = fast
    else:
        img = compose(img)
        if not isinstance(img, MetaTensor):  # pragma: no cover - MONAI always returns MetaTensor here
            raise TypeError("MONAI returned a plain tensor; expected a MetaTensor with an affine")
        affine = np.asarray(img.affine.detach().cpu().numpy(), dtype=np.float64)
        data = img.as_tensor().to(torch.float32)
    if card.preprocessing.crop_foreground:
        fg = (data > card.preprocessing.foreground_threshold).any(dim=0)
        if bool(fg.any()):
            idx = [torch.nonzero(fg.any(dim=tuple(d for d in range(3) if d != ax))).flatten() for ax in range(3)]
            lo = [int(i.min()) for i in idx]
            hi = [int(i.max()) + 1 for i in idx]
            data = data[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            shift = np.eye(4)
            shift[:3, 3] = lo
            affine = affine @ shift
        else:
            logger.warning("no voxel above the foreground threshold %s; not cropping",
                           card.preprocessing.foreground_threshold)
    owned = data.untyped_storage().data_ptr() != img.untyped_storage().data_ptr()  # not the caller's array
    for t in intensity:
        data = _scale_range_in_place(data, t) if owned else t(data)  # type: ignore[operator]
    if isinstance(data, MetaTensor):
        data = data.as_tensor()
    return Prepared(
        image=data.to(torch.float32).contiguous(),
        affine=affine,
        input_shape=volume.shape,
        input_affine=np.asarray(volume.affine, dtype=np.float64),
        floor=clip_floor(card),
        cropped=card.preprocessing.crop_foreground,
    )


def _scale_range_in_place(data: torch.Tensor, t: Any) -> Any:
    """MONAI's ``ScaleIntensityRange`` executed in place, the same float32 operations in the same order
    (bit-identical, ``tests/test_transforms.py``): on a CT-sized network grid its four temporary volumes cost
    more than the arithmetic. Other transforms run as MONAI's."""
    import torch
    from monai.transforms import ScaleIntensityRange

    if (type(t) is not ScaleIntensityRange or t.a_max == t.a_min or data.dtype != torch.float32
            or (t.clip and (t.b_min is None or t.b_max is None))):
        return t(data)
    data.sub_(t.a_min).div_(t.a_max - t.a_min)
    if t.b_min is not None and t.b_max is not None:
        data.mul_(t.b_max - t.b_min).add_(t.b_min)
    if t.clip:
        data.clamp_(t.b_min, t.b_max)
    return data


def label_lookup(card_labels: LabelTable, output: Literal["softmax", "sigmoid"]) -> np.ndarray:
    """Label value of each argmax index: index 0 is background, index c the c-th label in value order.

    For ``sigmoid`` outputs the argmax runs over ``[0.5, p_1, ..., p_n]`` so index 0 means "no probability above
    0.5"; the lookup is the same.
    """
    values = [0, *sorted(card_labels)]
    dtype = np.uint8 if max(values) <= 255 else np.uint16
    return np.asarray(values, dtype=dtype)


def _axis_aligned(m: np.ndarray) -> tuple[list[int], list[float], list[float]] | None:
    """If each input axis maps to one network axis (scale and offset only), return (perm, scale, offset) with
    network index along axis ``perm[a]`` = ``scale[a] * i_a + offset[a]``; else None."""
    lin = m[:3, :3]
    tol = 1e-7 * max(1.0, float(np.abs(lin).max()))
    perm: list[int] = []
    for a in range(3):
        nz = np.flatnonzero(np.abs(lin[:, a]) > tol)
        if len(nz) != 1:
            return None
        perm.append(int(nz[0]))
    if sorted(perm) != [0, 1, 2]:
        return None
    return perm, [float(lin[perm[a], a]) for a in range(3)], [float(m[perm[a], 3]) for a in range(3)]


def _first_argmax(values: torch.Tensor, *, floor: float | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Index of the first maximum over dim 0 (``floor`` is a constant channel 0 in front, for sigmoid outputs),
    as ``dtype`` (int64 by default)."""
    import torch

    if floor is None:
        best, first = values[0].clone(), 1
    else:
        best, first = torch.full_like(values[0], floor), 0
    idx = torch.zeros(values.shape[1:], dtype=dtype or torch.int64)
    for c in range(first, values.shape[0]):
        better = values[c] > best
        idx.masked_fill_(better, c + 1 - first)
        best = torch.maximum(best, values[c])
    return idx


def _labels_axis_aligned(
    scores: torch.Tensor,
    axis_map: tuple[list[int], list[float], list[float]],
    in_shape: tuple[int, int, int],
    lookup: np.ndarray,
    *,
    output: Literal["softmax", "sigmoid"],
    cropped: bool,
    slab_bytes: int,
    max_boundary_fraction: float = 0.08,
) -> np.ndarray | None:
    """Argmax of the trilinearly interpolated scores, computed exactly but only where it can differ from the
    corners' argmax; None when more than ``max_boundary_fraction`` of the cells hold a class boundary.

    Trilinear interpolation is a convex combination of a cell's 8 corners, so if one class is the (first) maximum
    at all 8 corners it is the maximum everywhere in the cell. Those voxels take the corner label; the others
    (near class boundaries, a few percent) are interpolated exactly from their 8 corners.
    """
    import torch

    perm, scale, offset = axis_map
    net_shape = tuple(int(n) for n in scores.shape[1:])
    n_ch = int(scores.shape[0])
    floor = 0.5 if output == "sigmoid" else None
    # Corner labels as argmax indices in the smallest integer type: the cell tests below read them 8 times.
    corner = _first_argmax(scores, floor=floor, dtype=torch.uint8 if n_ch < 256 else torch.int32)
    # Cells: corner (lower) index per axis, clamped so a cell always has two corners (one for size-1 axes).
    pad = [(0, 1) if n == 1 else (0, 0) for n in net_shape]
    ext = corner
    for r, (_, p) in enumerate(pad):
        if p:
            ext = torch.cat([ext, ext.narrow(r, 0, 1)], dim=r)
    c0 = ext[:-1, :-1, :-1]
    uniform = torch.ones_like(c0, dtype=torch.bool)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                if di or dj or dk:
                    uniform &= ext[di:di + c0.shape[0], dj:dj + c0.shape[1], dk:dk + c0.shape[2]] == c0
    if 1.0 - int(uniform.sum()) / max(1, uniform.numel()) > max_boundary_fraction:
        return None  # boundaries everywhere (a noisy model): the dense separable path is faster
    lo_net: list[torch.Tensor] = [torch.empty(0)] * 3
    w_net: list[torch.Tensor] = [torch.empty(0)] * 3
    inside_net: list[torch.Tensor] = [torch.empty(0)] * 3
    for a in range(3):
        r = perm[a]
        n = net_shape[r]
        q = scale[a] * np.arange(in_shape[a], dtype=np.float64) + offset[a]
        qc = np.clip(q, 0.0, n - 1)
        lo = np.minimum(np.floor(qc).astype(np.int64), max(n - 2, 0))
        lo_net[r] = torch.from_numpy(lo)
        w_net[r] = torch.from_numpy((qc - lo).astype(np.float32))
        inside_net[r] = torch.from_numpy((q > -0.5) & (q < n - 0.5))
    labels = np.zeros(in_shape, dtype=lookup.dtype)
    flat = scores.reshape(n_ch, -1)
    strides = (net_shape[1] * net_shape[2], net_shape[2], 1)
    a_s = perm.index(0)
    others = [a for a in range(3) if a != a_s]
    step = max(1, int(slab_bytes // max(1, 16 * in_shape[others[0]] * in_shape[others[1]])))

    def shaped(t: torch.Tensor, a: int) -> torch.Tensor:
        view = [1, 1, 1]
        view[a] = -1
        return t.view(view)

    # Corner labels and the uniform-cell mask in input axis order (views), gathered per slab one axis at a time
    # with np.take (much cheaper than a 3-index gather of int64 over every input voxel).
    c0_in = c0.numpy().transpose(perm)
    uniform_in = uniform.numpy().transpose(perm)

    def gather(arr: np.ndarray, s0: int, s1: int) -> np.ndarray:
        out = np.take(arr, lo_net[perm[a_s]][s0:s1].numpy(), axis=a_s)
        for a in others:
            out = np.take(out, lo_net[perm[a]].numpy(), axis=a)
        return out

    for s0 in range(0, in_shape[a_s], step):
        s1 = min(in_shape[a_s], s0 + step)
        slab_idx = torch.from_numpy(gather(c0_in, s0, s1))  # (slab in input axis order), argmax indices
        slab_uniform = torch.from_numpy(gather(uniform_in, s0, s1))
        todo = torch.nonzero(~slab_uniform)  # (M, 3) input-order positions within the slab
        if len(todo):
            total = torch.zeros((n_ch, len(todo)), dtype=torch.float32)
            los, ws = [], []
            for r in range(3):
                a = perm.index(r)
                pos = todo[:, a] + (s0 if a == a_s else 0)
                los.append(lo_net[r][pos])
                ws.append(w_net[r][pos])
            for di in (0, 1):
                for dj in (0, 1):
                    for dk in (0, 1):
                        weight = torch.ones(len(todo), dtype=torch.float32)
                        offset_flat = torch.zeros(len(todo), dtype=torch.int64)
                        for r, d in enumerate((di, dj, dk)):
                            weight = weight * (ws[r] if d else 1 - ws[r])
                            hi = torch.clamp(los[r] + d, max=net_shape[r] - 1)
                            offset_flat = offset_flat + hi * strides[r]
                        total += flat[:, offset_flat].to(torch.float32) * weight
            exact = _first_argmax(total, floor=floor, dtype=slab_idx.dtype)
            slab_idx[todo[:, 0], todo[:, 1], todo[:, 2]] = exact
        if cropped:
            ins = []
            for a in range(3):
                r = perm[a]
                t = inside_net[r][s0:s1] if a == a_s else inside_net[r]
                ins.append(shaped(t, a))
            slab_idx = torch.where(ins[0] & ins[1] & ins[2], slab_idx, torch.zeros((), dtype=slab_idx.dtype))
        index = tuple(slice(s0, s1) if a == a_s else slice(None) for a in range(3))
        labels[index] = np.take(lookup, slab_idx.numpy())
    return labels


def _lerp_axis(t: torch.Tensor, dim: int, q: np.ndarray) -> torch.Tensor:
    """Linear interpolation of ``t`` along ``dim`` at continuous indices ``q`` (clamped to the edge voxels)."""
    import torch

    n = t.shape[dim]
    qc = np.clip(q, 0.0, n - 1)
    lo = np.minimum(np.floor(qc).astype(np.int64), max(n - 2, 0))
    w = torch.from_numpy((qc - lo).astype(np.float32))
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * t.ndim
    shape[dim] = len(q)
    w = w.view(shape)
    t = t.to(torch.float32)

    def take(idx: np.ndarray) -> torch.Tensor:
        # Gathers along the outermost axis copy whole planes (torch indexing); along inner axes numpy's take was
        # 2-3x faster than torch's advanced indexing on CPU (torch's index_select slower still).
        if dim > 1 and t.device.type == "cpu":
            return torch.from_numpy(np.take(t.numpy(), idx, axis=dim))
        return t.index_select(dim, torch.from_numpy(idx).to(t.device))

    a = take(lo)
    if n == 1:
        return a
    return a.lerp_(take(hi), w.to(t.device))


def _signed_permutation(m: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """True if ``m`` (input index → network index) maps input voxel centres exactly onto network voxel centres."""
    lin = m[:3, :3]
    if not np.allclose(np.abs(lin).sum(axis=0), 1.0, atol=1e-6) or not np.allclose(np.abs(lin).max(axis=0), 1.0,
                                                                                     atol=1e-6):
        return False
    if not np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=1e-4):
        return False
    corners = np.array([[0, 0, 0], np.array(in_shape) - 1], dtype=float)
    mapped = corners @ lin.T + m[:3, 3]
    return bool(np.all(mapped > -0.5) and np.all(mapped < np.array(out_shape) - 0.5))


def invert_to_input(
    scores: torch.Tensor,
    prepared: Prepared,
    lookup: np.ndarray,
    *,
    output: Literal["softmax", "sigmoid"],
    probabilities: bool = False,
    slab_bytes: int = SLAB_BYTES,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities on the network grid → labels (and probabilities) on the input grid.

    Parameters
    ----------
    scores : torch.Tensor, shape (C, I', J', K')
        Probabilities (after softmax or sigmoid) on ``prepared``'s network grid, on the host.
    prepared : Prepared
        Where the network grid lies and what the input grid was.
    lookup : ndarray, shape (L + 1,)
        Label value of each argmax index (:func:`label_lookup`).
    output : {"softmax", "sigmoid"}
        For sigmoid, a voxel is background unless some probability exceeds 0.5.
    probabilities : bool
        Also return the interpolated probabilities (costs C × I × J × K × 4 bytes).
    slab_bytes : int
        Budget for one slab of interpolated scores.

    Returns
    -------
    labels : ndarray, shape (I, J, K), dtype of ``lookup``
    probs : ndarray, shape (I, J, K, C), float32, or None
        Background first for softmax models (C = labels + 1), one channel per label for sigmoid models.
    """
    import torch
    import torch.nn.functional as F

    n_ch = int(scores.shape[0])
    net_shape = tuple(int(s) for s in scores.shape[1:])
    in_shape = prepared.input_shape
    m = np.linalg.inv(prepared.affine) @ prepared.input_affine  # input index → network index
    labels = np.zeros(in_shape, dtype=lookup.dtype)
    probs = np.zeros((*in_shape, n_ch), dtype=np.float32) if probabilities else None
    lut = torch.from_numpy(lookup.astype(np.int64))

    def finish(slab: torch.Tensor, inside: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """slab: (C, I, J, n) probabilities → (labels (I, J, n), probs)."""
        if inside is not None:  # outside a foreground crop: background
            slab = slab * inside
            if output == "softmax":
                slab[0] = torch.where(inside[0], slab[0], torch.ones((), dtype=slab.dtype))
        # Channel by channel (fast on strided slabs); strict ">" keeps the first maximum, as torch.argmax does.
        if output == "sigmoid":
            best, idx = torch.full_like(slab[0], 0.5), torch.zeros(slab.shape[1:], dtype=torch.int64)
            first = 0
        else:
            best, idx = slab[0].clone(), torch.zeros(slab.shape[1:], dtype=torch.int64)
            first = 1
        for c in range(first, slab.shape[0]):
            better = slab[c] > best
            idx.masked_fill_(better, c + 1 - first)
            best = torch.maximum(best, slab[c])
        return lut[idx], slab

    if _signed_permutation(m, in_shape, net_shape):
        # Exact: every input voxel centre is a network voxel centre.
        lin = np.round(m[:3, :3]).astype(int)
        off = np.round(m[:3, 3]).astype(int)
        perm = [int(np.argmax(np.abs(lin[:, a]))) for a in range(3)]  # input axis a ← network axis perm[a]
        sub = scores
        index: list[slice] = []
        for a in range(3):
            r = perm[a]
            s = int(lin[r, a])
            start = off[r]
            stop = start + s * (in_shape[a] - 1)
            index.append(slice(start, stop + 1) if s > 0 else slice(stop, start + 1))
        # Slice on the network axes, then reorder/flip to the input axes.
        net_slices = [slice(None)] * 3
        for a in range(3):
            net_slices[perm[a]] = index[a]
        sub = scores[(slice(None), *net_slices)]
        sub = sub.permute(0, *[1 + perm[a] for a in range(3)])
        flips = [1 + a for a in range(3) if lin[perm[a], a] < 0]
        if flips:
            sub = torch.flip(sub, dims=flips)
        step = max(1, int(slab_bytes // max(1, n_ch * in_shape[0] * in_shape[1] * 4)))
        for k0 in range(0, in_shape[2], step):
            slab = sub[..., k0:k0 + step].to(torch.float32)
            lab, slab = finish(slab, None)
            labels[..., k0:k0 + step] = lab.numpy()
            if probs is not None:
                probs[:, :, k0:k0 + step] = slab.permute(1, 2, 3, 0).numpy()
        return labels, probs

    axis_map = _axis_aligned(m)
    if axis_map is not None and not probabilities:
        sparse = _labels_axis_aligned(scores, axis_map, in_shape, lookup, output=output, cropped=prepared.cropped,
                                      slab_bytes=slab_bytes)
        if sparse is not None:
            return sparse, None
    if axis_map is not None:
        # Axis-aligned grids (the usual case: only spacing, origin, order or direction signs differ): trilinear
        # interpolation is a product of three 1D linear interpolations, done one axis at a time. Slabs run along
        # the input axis that maps to the first network axis, so every gather copies contiguous blocks.
        perm, scale, offset = axis_map
        coords = [scale[a] * np.arange(in_shape[a], dtype=np.float64) + offset[a] for a in range(3)]
        a_s = perm.index(0)
        a1, a2 = sorted((a for a in range(3) if a != a_s), key=lambda a: perm[a])
        step = max(1, int(slab_bytes // max(1, n_ch * in_shape[a1] * in_shape[a2] * 4)))
        for s0 in range(0, in_shape[a_s], step):
            s1 = min(in_shape[a_s], s0 + step)
            slab = _lerp_axis(scores, 1, coords[a_s][s0:s1])  # (C, n, N1, N2)
            slab = _lerp_axis(slab, 2, coords[a1])  # (C, n, I_a1, N2)
            slab = _lerp_axis(slab, 3, coords[a2])  # (C, n, I_a1, I_a2)
            where = {a_s: 1, a1: 2, a2: 3}
            slab = slab.permute(0, where[0], where[1], where[2])  # input axis order
            inside = None
            if prepared.cropped:
                ranges = [coords[a][s0:s1] if a == a_s else coords[a] for a in range(3)]
                ins = [torch.from_numpy((q > -0.5) & (q < net_shape[perm[a]] - 0.5)) for a, q in enumerate(ranges)]
                inside = (ins[0][:, None, None] & ins[1][None, :, None] & ins[2][None, None, :]).unsqueeze(0)
            lab, slab = finish(slab, inside)
            where_slab = tuple(slice(s0, s1) if a == a_s else slice(None) for a in range(3))
            labels[where_slab] = lab.numpy()
            if probs is not None:
                probs[where_slab] = slab.permute(1, 2, 3, 0).numpy()
        return labels, probs

    # General case (oblique to each other): trilinear sampling at mapped voxel centres, slab by slab along the
    # input's last axis.
    vol = scores.unsqueeze(0)  # (1, C, D=I', H=J', W=K')
    if vol.dtype not in (torch.float32, torch.float64):
        vol = vol.to(torch.float32)
    sizes = np.array(net_shape, dtype=np.float64)
    denom = np.where(sizes > 1, sizes - 1, 1.0)
    m_t = torch.from_numpy(m[:3, :3].astype(np.float64))
    t_t = torch.from_numpy(m[:3, 3].astype(np.float64))
    ii = torch.arange(in_shape[0], dtype=torch.float64)
    jj = torch.arange(in_shape[1], dtype=torch.float64)
    base = ii[:, None, None, None] * m_t[:, 0] + jj[None, :, None, None] * m_t[:, 1] + t_t  # (I, J, 1, 3)
    step = max(1, int(slab_bytes // max(1, n_ch * in_shape[0] * in_shape[1] * 4)))
    for k0 in range(0, in_shape[2], step):
        kk = torch.arange(k0, min(in_shape[2], k0 + step), dtype=torch.float64)
        q = base + kk[None, None, :, None] * m_t[:, 2]  # (I, J, n, 3) network indices (i', j', k')
        # Outside the network grid: border values, as MONAI's Spacing inverse does; outside a foreground crop:
        # background, as the crop's inverse (zero padding) does.
        inside = None
        if prepared.cropped:
            half = torch.from_numpy(sizes - 0.5)
            inside = ((q > -0.5) & (q < half)).all(dim=-1).unsqueeze(0)
        g = (2.0 * q / torch.from_numpy(denom) - 1.0)
        g = torch.where(torch.from_numpy(sizes > 1), g, torch.zeros_like(g))
        grid = g.flip(-1).to(torch.float32).unsqueeze(0)  # grid_sample wants (x=W, y=H, z=D)
        slab = F.grid_sample(vol, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        del grid, g, q
        lab, slab = finish(slab, inside)
        labels[..., k0:k0 + len(kk)] = lab.numpy()
        if probs is not None:
            probs[:, :, k0:k0 + len(kk)] = slab.permute(1, 2, 3, 0).numpy()
    return labels, probs


def invert_nearest(
    scores: torch.Tensor,
    prepared: Prepared,
    lookup: np.ndarray,
    *,
    output: Literal["softmax", "sigmoid"],
    slab_bytes: int = SLAB_BYTES,
    tie_eps: float = 1e-4,
) -> np.ndarray:
    """Labels on the input grid from the argmax on the network grid, resampled with nearest neighbour (fast mode).

    The label of every network voxel is taken first (first maximum, as :func:`invert_to_input`); each input
    voxel centre then takes the label of the nearest network voxel centre (border labels outside the network grid,
    background outside a foreground crop). This is not the trilinear inverse: near class boundaries a voxel can
    take a neighbouring label (about 1-3 % of the voxels of a real segmentation, all at boundaries), but it costs
    one gather instead of interpolating every class.

    Tie rule: a voxel centre that lies half-way between two network voxel centres (to within ``tie_eps`` of a
    network voxel, e.g. when the input spacing divides the network spacing) takes the **lower** network index.

    Parameters
    ----------
    scores : torch.Tensor, shape (C, I', J', K')
        Probabilities (or logits, for softmax outputs) on ``prepared``'s network grid, on the host.
    prepared : Prepared
    lookup : ndarray, shape (L + 1,)
        Label value of each argmax index (:func:`label_lookup`).
    output : {"softmax", "sigmoid"}
        For sigmoid, ``scores`` must be probabilities: a voxel is background unless one exceeds 0.5.
    slab_bytes : int
        Budget for the index arrays of one slab (oblique grids only).
    tie_eps : float
        Tolerance (in network voxels) of the tie rule.

    Returns
    -------
    labels : ndarray, shape (I, J, K), dtype of ``lookup``
    """
    net_shape = tuple(int(s) for s in scores.shape[1:])
    in_shape = prepared.input_shape
    floor = 0.5 if output == "sigmoid" else None
    net_labels = lookup[_first_argmax(scores, floor=floor).numpy()]  # (I', J', K'), label values
    m = np.linalg.inv(prepared.affine) @ prepared.input_affine  # input index → network index

    def nearest(q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest index (ties to the lower one), clamped to the grid, and whether q lies inside the grid."""
        idx = np.ceil(q - 0.5 - tie_eps).astype(np.int64)
        return np.clip(idx, 0, n - 1), (q > -0.5) & (q < n - 0.5)

    axis_map = _axis_aligned(m)
    if axis_map is not None:
        perm, scale, offset = axis_map
        out = net_labels.transpose(perm)  # input axis a <- network axis perm[a]
        inside = []
        for a in range(3):
            q = scale[a] * np.arange(in_shape[a], dtype=np.float64) + offset[a]
            idx, ins = nearest(q, net_shape[perm[a]])
            out = np.take(out, idx, axis=a)
            inside.append(ins)
        if prepared.cropped and not all(bool(i.all()) for i in inside):
            out = np.where(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :], out,
                           np.zeros((), dtype=out.dtype))
        return np.ascontiguousarray(out, dtype=lookup.dtype)

    labels = np.zeros(in_shape, dtype=lookup.dtype)
    ii = np.arange(in_shape[0], dtype=np.float64)
    jj = np.arange(in_shape[1], dtype=np.float64)
    base = ii[:, None, None, None] * m[:3, 0] + jj[None, :, None, None] * m[:3, 1] + m[:3, 3]  # (I, J, 1, 3)
    step = max(1, int(slab_bytes // max(1, 48 * in_shape[0] * in_shape[1])))
    for k0 in range(0, in_shape[2], step):
        kk = np.arange(k0, min(in_shape[2], k0 + step), dtype=np.float64)
        q = base + kk[None, None, :, None] * m[:3, 2]  # (I, J, n, 3)
        parts = [nearest(q[..., r], net_shape[r]) for r in range(3)]
        slab = net_labels[parts[0][0], parts[1][0], parts[2][0]]
        if prepared.cropped:
            slab = np.where(parts[0][1] & parts[1][1] & parts[2][1], slab, np.zeros((), dtype=slab.dtype))
        labels[..., k0:k0 + len(kk)] = slab
    return labels


def to_probabilities(logits: torch.Tensor, output: Literal["softmax", "sigmoid"], *, chunk: int = 8) -> torch.Tensor:
    """Softmax over channels (or sigmoid), in place in chunks along the first spatial axis.

    Parameters
    ----------
    logits : torch.Tensor, shape (C, I', J', K')
        Overwritten with the probabilities.
    """
    import torch

    n = logits.shape[1]
    for i0 in range(0, n, chunk):
        part = logits[:, i0:i0 + chunk]
        if output == "softmax":
            part.copy_(torch.softmax(part.to(torch.float32), dim=0).to(logits.dtype))
        else:
            part.copy_(torch.sigmoid(part.to(torch.float32)).to(logits.dtype))
    return logits


