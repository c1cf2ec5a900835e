"""Running a MONAI bundle's own transforms around medseg's sliding window and exact inversion.

The data flow is the bundle's, without its loader, dataset, evaluator or writer:

1. the Volume goes in as a MetaTensor (3D with ``original_channel_dim="no_channel"``, or channel-first with
   ``original_channel_dim=0`` for several channels; ``space=RAS``) under the bundle's image key, and the bundle's
   preprocessing transforms run on it one by one, in order (``LoadImage[d]`` replaced by ``Identityd``);
2. the network runs through :meth:`medseg.inference.Segmenter.predict` with every parameter of the bundle's
   inferer (roi size, windows per call, overlap, blending, sigma, ``padding_mode``, cval) and the evaluator's
   ``amp`` (which MONAI applies on CUDA only);
3. the postprocessing transforms before ``Invertd`` run on the network grid;
4. ``Invertd`` is replaced by an exact, slab-by-slab inversion with MONAI's semantics: the one interpolation of the
   preprocessing (``Spacing``: its mode, padding mode and dtype; nearest when ``Invertd(nearest_interp=True)``)
   taken back to the input grid, crops inverted by zero padding before interpolating (as MONAI pads, then
   resamples), pads inverted by cropping;
5. the postprocessing transforms after ``Invertd`` run per slab while they are voxelwise (activations, argmax,
   thresholds, label maps, lambdas), then on the whole volume (e.g. largest connected component).

Preprocessing chains whose geometry the slab inversion does not describe exactly (two interpolations, a crop
before an interpolation, ``Resize``, reflection padding) are inverted by the bundle's own ``Invertd`` instead,
with a logged warning (it holds the whole volume of every channel at full resolution).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import ChannelCountError, UnsupportedBundleError
from medseg.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from medseg.models.bundle import BuiltBundle

__all__ = [
    "BundleRun",
    "InversionPlan",
    "as_meta",
    "bundle_input",
    "check_channels",
    "invert_bundle_output",
    "plan_inversion",
    "preprocess",
    "to_label_array",
    "window_of",
]

logger = logging.getLogger(__name__)

#: Postprocessing transforms that act voxel by voxel (with all channels of a voxel): they run per slab.
VOXELWISE = frozenset({"Activationsd", "Activations", "AsDiscreted", "AsDiscrete", "Lambdad", "Lambda",
                       "CastToTyped", "CastToType", "EnsureTyped", "EnsureType", "ToTensord", "ToTensor",
                       "Identityd", "Identity", "LabelFilterd", "LabelFilter", "MapLabelValued", "MapLabelValue",
                       "ToDeviced", "CopyItemsd", "DeleteItemsd", "ThresholdIntensityd", "ThresholdIntensity"})
_MODES = {"bilinear": "bilinear", "nearest": "nearest", "trilinear": "bilinear", 1: "bilinear", 0: "nearest"}


def bundle_input(volume: Volume) -> Any:
    """The Volume as LoadImaged would give it: float32 MetaTensor, RAS affine, 3D or channel-first."""
    import torch
    from monai.data import MetaTensor

    from medseg.io.convert import volume_to_metatensor

    mt = volume_to_metatensor(volume)
    data = mt.as_tensor()
    meta = dict(mt.meta)
    if volume.array.ndim == 3:
        data = data[0]
        meta["original_channel_dim"] = "no_channel"
    else:
        meta["original_channel_dim"] = 0
    return MetaTensor(data.to(torch.float32), meta=meta)


@dataclass(frozen=True)
class InversionPlan:
    """How the network grid goes back to the input grid, read from the preprocessing as it ran.

    MONAI inverts in reverse order: crops and pads back to the resampled grid G (zero padding, cropping), the one
    interpolating step (``Spacing``) from G back to the grid O it started from, then flips and axis permutations
    (``Orientation``) from O back to the input grid. The plan records the three grids.

    Attributes
    ----------
    exact : bool
        False when the geometry is not one the slab inversion reproduces (then the bundle's ``Invertd`` runs).
    reason : str
        Why not, when not exact.
    oriented_affine, oriented_shape : ndarray (4, 4), tuple of 3 int
        O: the grid before the interpolating step (the input grid up to flips and axis order).
    grid_affine, grid_shape : ndarray (4, 4), tuple of 3 int
        G: the grid right after the interpolating step (O when there is none).
    net_affine, net_shape : ndarray (4, 4), tuple of 3 int
        The network grid (G shifted by the crops and pads).
    interpolates : bool
        Whether there is an interpolating step.
    mode : {"bilinear", "nearest"}
        Its interpolation (before ``Invertd``'s ``nearest_interp``).
    padding_mode : {"border", "zeros"}
    align_corners : bool
    float64 : bool
        It computed in float64 (MONAI's Spacing default): its inverse does too.
    """

    exact: bool
    reason: str
    oriented_affine: np.ndarray
    oriented_shape: tuple[int, int, int]
    grid_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    net_affine: np.ndarray
    net_shape: tuple[int, int, int]
    interpolates: bool = False
    mode: str = "bilinear"
    padding_mode: str = "border"
    align_corners: bool = False
    float64: bool = True


def _affine(x: Any) -> np.ndarray:
    return np.asarray(x.affine.detach().cpu().numpy(), dtype=np.float64)


def _shape(x: Any) -> tuple[int, int, int]:
    return tuple(int(n) for n in x.shape[-3:])  # type: ignore[return-value]


def _key_index(t: Any, key: str) -> int:
    keys = list(getattr(t, "keys", []) or [])
    return keys.index(key) if key in keys else 0


def _pick(values: Any, i: int) -> Any:
    if isinstance(values, (list, tuple)):
        return values[min(i, len(values) - 1)]
    return values


def preprocess(built: BuiltBundle, volume: Volume) -> tuple[dict[str, Any], InversionPlan]:
    """Run the bundle's preprocessing on ``volume``, recording the geometry of each step.

    Returns
    -------
    data : dict
        The transformed dictionary (the image under ``built.image_key``, channel-first on the network grid).
    plan : InversionPlan

    Raises
    ------
    ChannelCountError
        If the volume's channels differ from the bundle's input channels.
    ModelCardError
        If a transform fails (the message names it).
    """
    from medseg.errors import ModelCardError

    key = built.image_key
    img = bundle_input(volume)
    data: dict[str, Any] = {key: img}
    o_affine, o_shape = np.asarray(volume.affine, dtype=np.float64), _shape(img)
    g_affine, g_shape = o_affine, o_shape
    interpolations = 0
    cropped = False
    reason = ""
    mode, padding, align, float64 = "bilinear", "border", False, True
    for t in built.preprocessing:
        before_a, before_s = _affine(data[key]), _shape(data[key])
        try:
            data = t(data)
        except Exception as exc:  # noqa: BLE001 - the bundle's transform
            raise ModelCardError(f"{built.spec.config_path}: preprocessing {type(t).__name__} failed on the input "
                                 f"({type(exc).__name__}: {exc}).") from None
        if not isinstance(data, dict) or key not in data:
            raise ModelCardError(f"{built.spec.config_path}: preprocessing {type(t).__name__} did not return a "
                                 f"dictionary with '{key}'.")
        x = data[key]
        if not hasattr(x, "affine"):
            continue
        after_a, after_s = _affine(x), _shape(x)
        if after_s == before_s and np.allclose(after_a, before_a, atol=1e-6):
            continue
        m = np.linalg.inv(before_a) @ after_a  # index after -> index before
        lin, off = m[:3, :3], m[:3, 3]
        integer_shift = np.allclose(off, np.round(off), atol=1e-4)
        name = type(t).__name__
        if np.allclose(lin, np.eye(3), atol=1e-6) and integer_shift:
            cropped = True  # a crop or a pad of the current grid
            if not interpolations and not reason:
                reason = f"{name} crops or pads before the preprocessing resamples"
            continue
        signed_perm = (np.allclose(np.abs(lin).sum(axis=0), 1, atol=1e-6)
                       and np.allclose(np.abs(lin).max(axis=0), 1, atol=1e-6) and integer_shift)
        if (cropped or interpolations) and not reason:
            reason = f"{name} changes the grid after the preprocessing resampled, cropped or padded it"
        if signed_perm:
            o_affine, o_shape = after_a, after_s
            g_affine, g_shape = after_a, after_s
            continue
        interpolations += 1
        if name not in ("Spacingd", "Spacing") and not reason:
            reason = f"{name} resamples in a way the slab inversion does not reproduce"
        i = _key_index(t, key)
        raw_mode = _pick(getattr(t, "mode", "bilinear"), i)
        raw_mode = getattr(raw_mode, "value", raw_mode)
        mode = _MODES.get(raw_mode, "")  # type: ignore[call-overload]
        if not mode and not reason:
            reason = f"{name} uses the interpolation {raw_mode!r}"
        raw_pad = _pick(getattr(t, "padding_mode", "border"), i)
        padding = str(getattr(raw_pad, "value", raw_pad))
        if padding not in ("border", "zeros") and not reason:
            reason = f"{name} pads with {padding!r}"
        align = bool(_pick(getattr(t, "align_corners", False), i))
        dtype = _pick(getattr(t, "dtype", np.float64), i)
        float64 = dtype is None or "64" in str(dtype)
        o_affine, o_shape = before_a, before_s
        g_affine, g_shape = after_a, after_s
    x = data[key]
    plan = InversionPlan(not reason, reason, o_affine, o_shape, g_affine, g_shape, _affine(x), _shape(x),
                         interpolations > 0, mode or "bilinear", padding, align, float64)
    return data, plan


def window_of(inferer: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """Every sliding-window parameter of a bundle's inferer (a SimpleInferer is one window of the whole image).

    Raises
    ------
    UnsupportedBundleError
        For an inferer medseg does not run.
    """
    from monai.inferers import SimpleInferer, SlidingWindowInferer
    from monai.utils import fall_back_tuple

    if isinstance(inferer, SlidingWindowInferer):
        roi = fall_back_tuple(inferer.roi_size, image_shape)
        return {"patch_size": tuple(int(r) for r in roi), "sw_batch_size": int(inferer.sw_batch_size),
                "overlap": inferer.overlap, "blending": str(getattr(inferer.mode, "value", inferer.mode)),
                "sigma_scale": inferer.sigma_scale,
                "padding_mode": str(getattr(inferer.padding_mode, "value", inferer.padding_mode)),
                "cval": float(inferer.cval)}
    if isinstance(inferer, SimpleInferer):
        return {"patch_size": tuple(int(n) for n in image_shape), "sw_batch_size": 1, "overlap": 0.0,
                "blending": "constant", "sigma_scale": 0.125, "padding_mode": "constant", "cval": 0.0}
    raise UnsupportedBundleError(f"inferer {type(inferer).__name__} is not one medseg runs.")


def as_meta(values: Any, like: Any) -> Any:
    """``values`` as a MetaTensor with the metadata (affine, applied operations) of ``like``."""
    from monai.data import MetaTensor

    out = MetaTensor(values)
    out.copy_meta_from(like, copy_attr=True)
    return out


def _chunkable(transforms: list[Any], key: str) -> bool:
    """True if every transform is voxelwise and touches only ``key``."""
    for t in transforms:
        if type(t).__name__ not in VOXELWISE or type(t).__name__ in ("CopyItemsd", "DeleteItemsd"):
            return False
        if list(getattr(t, "keys", [key]) or [key]) != [key]:
            return False
    return True


def run_before_invert(built: BuiltBundle, data: dict[str, Any], plan: InversionPlan, *, slab_bytes: int) -> dict[
        str, Any]:
    """The postprocessing before ``Invertd``, on the network grid.

    When it is voxelwise on the prediction alone (softmax, argmax, thresholds: the usual case) it runs chunk by
    chunk along the first spatial axis, so that e.g. a 105-class softmax never exists beside the logits; the
    chunks see exactly what the whole tensor would (every operation is per voxel over the channels).
    """
    import torch

    from medseg.errors import ModelCardError

    key = built.pred_key
    transforms = built.before_invert
    if not transforms:
        return data

    def run(d: dict[str, Any]) -> dict[str, Any]:
        for t in transforms:
            try:
                d = t(d)
            except Exception as exc:  # noqa: BLE001 - the bundle's transform
                raise ModelCardError(f"{built.spec.config_path}: postprocessing {type(t).__name__} failed "
                                     f"({type(exc).__name__}: {exc}).") from None
        return d

    pred = data[key]
    if not _chunkable(transforms, key) or pred.ndim != 4:
        return run(data)
    values = pred.as_tensor() if hasattr(pred, "as_tensor") else torch.as_tensor(pred)
    plane = int(values.shape[0] * values.shape[2] * values.shape[3] * values.element_size())
    step = max(1, slab_bytes // max(1, plane))
    parts = []
    for i0 in range(0, values.shape[1], step):
        res = run({key: values[:, i0:i0 + step]})[key]
        parts.append(res.as_tensor() if hasattr(res, "as_tensor") else torch.as_tensor(res))
    del values
    out = dict(data)
    out[key] = as_meta(torch.cat(parts, dim=1), pred)
    return out


def _on_resampled_grid(values: torch.Tensor, plan: InversionPlan) -> torch.Tensor:
    """Network-grid values back on the grid G the preprocessing resampled to: MONAI's inverse of crops (zero
    padding) and of pads (cropping)."""
    import torch

    lo = np.round((np.linalg.inv(plan.grid_affine) @ plan.net_affine)[:3, 3]).astype(int)  # net origin in G
    if tuple(values.shape[1:]) == plan.grid_shape and not lo.any():
        return values
    out = torch.zeros((values.shape[0], *plan.grid_shape), dtype=values.dtype)
    src, dst = [], []
    for a in range(3):
        g0, g1 = max(0, lo[a]), min(plan.grid_shape[a], lo[a] + plan.net_shape[a])
        dst.append(slice(g0, max(g0, g1)))
        src.append(slice(g0 - lo[a], max(g0, g1) - lo[a]))
    out[(slice(None), *dst)] = values[(slice(None), *src)]
    return out


def _linspace_from_neg_one(n: int, align_corners: bool, dtype: torch.dtype) -> torch.Tensor:
    import torch

    if n <= 1:
        return torch.zeros(1, dtype=dtype)
    r = torch.linspace(-1, 1, n, dtype=dtype)
    return r if align_corners else r * (n - 1) / n


def _monai_resample_slabs(
    values: torch.Tensor, plan: InversionPlan, *, mode: str, slab_bytes: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """MONAI's ``SpatialResample`` inverse (G → O) computed slab by slab along O's first axis, with the very
    arithmetic of ``AffineTransform``: the pixel transform normalised by ``to_norm_affine``, the base grid and the
    matrix product of ``torch.nn.functional.affine_grid``, then ``grid_sample``. Same floats as the whole-volume
    call (so that ties between two network voxels fall the same way), one slab of memory."""
    import torch
    import torch.nn.functional as F
    from monai.networks.utils import to_norm_affine

    dtype = values.dtype
    xform = np.linalg.solve(plan.grid_affine, plan.oriented_affine)  # O index -> G index (MONAI: solve(src, dst))
    theta = torch.as_tensor(xform, dtype=torch.float64).to(dtype)[None]
    theta = to_norm_affine(affine=theta, src_size=plan.grid_shape, dst_size=plan.oriented_shape,
                           align_corners=plan.align_corners, zero_centered=False)
    rev = [2, 1, 0]
    theta[:, :3] = theta[:, rev]
    theta[:, :, :3] = theta[:, :, rev]
    theta34 = theta[:, :3]
    d_all, h, w = plan.oriented_shape
    lin_w = _linspace_from_neg_one(w, plan.align_corners, dtype)
    lin_h = _linspace_from_neg_one(h, plan.align_corners, dtype)
    lin_d = _linspace_from_neg_one(d_all, plan.align_corners, dtype)
    src = values.unsqueeze(0).contiguous()
    step = max(1, int(slab_bytes // max(1, (values.shape[0] + 4) * h * w * values.element_size())))
    step = min(step, d_all)
    full = torch.empty((1, step, h, w, 4), dtype=dtype)  # affine_grid's base grid; only the D column changes
    full[..., 0].copy_(lin_w)
    full[..., 1].copy_(lin_h.unsqueeze(-1))
    full[..., 3].fill_(1)
    for d0 in range(0, d_all, step):
        d1 = min(d_all, d0 + step)
        base = full[:, :d1 - d0]
        base[..., 2].copy_(lin_d[d0:d1].unsqueeze(-1).unsqueeze(-1))
        grid = base.reshape(1, -1, 4).bmm(theta34.transpose(1, 2)).view(1, d1 - d0, h, w, 3)
        slab = F.grid_sample(src, grid, mode=mode, padding_mode=plan.padding_mode, align_corners=plan.align_corners)
        del grid
        yield d0, d1, slab[0]


def _oriented_slabs(
    values: torch.Tensor, plan: InversionPlan, *, mode: str, slab_bytes: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    if plan.interpolates:
        yield from _monai_resample_slabs(values, plan, mode=mode, slab_bytes=slab_bytes)
        return
    n = plan.oriented_shape[0]
    step = max(1, int(slab_bytes // max(1, values.shape[0] * plan.oriented_shape[1] * plan.oriented_shape[2]
                                        * values.element_size())))
    for d0 in range(0, n, step):
        yield d0, min(n, d0 + step), values[:, d0:d0 + step]


def _to_input_axes(plan: InversionPlan, input_affine: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """O index -> input index as a signed permutation: for each O axis, the input axis, sign and offset."""
    m = np.linalg.inv(input_affine) @ plan.oriented_affine
    lin = np.round(m[:3, :3]).astype(int)
    axes = [int(np.argmax(np.abs(lin[:, a]))) for a in range(3)]
    signs = [int(lin[axes[a], a]) for a in range(3)]
    offsets = [int(np.round(m[axes[a], 3])) for a in range(3)]
    return axes, signs, offsets


def invert_bundle_output(
    built: BuiltBundle,
    data: dict[str, Any],
    plan: InversionPlan,
    volume: Volume,
    *,
    slab_bytes: int,
) -> np.ndarray:
    """The postprocessed prediction on the input grid: ``Invertd`` replaced, the transforms after it applied.

    Returns
    -------
    ndarray, shape (I, J, K) or (C, I, J, K)
        Integer labels (uint8/uint16) when the output has one channel and the transforms after ``Invertd`` are
        voxelwise (assembled slab by slab; values rounded to whole labels with a warning when the bundle
        interpolated label values), else what MONAI's postprocessing would hand to ``SaveImaged``
        (channel-first), on the input grid.

    Raises
    ------
    UnsupportedBundleError
        If a transform meant to run per slab changes the spatial shape.
    """
    import torch

    from medseg.errors import ModelCardError

    key = built.pred_key
    pred = data[key]
    if built.invert is None and plan.grid_shape == tuple(volume.shape) and np.allclose(plan.net_affine,
                                                                                      volume.affine, atol=1e-5):
        return np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)
    if built.invert is not None and not plan.exact:
        logger.warning("%s: %s; inverting with the bundle's own Invertd (holds every channel at full resolution).",
                       built.spec.config_path, plan.reason)
        inverted = built.invert(data)
        for t in built.after_invert:
            inverted = t(inverted)
        res = inverted[key]
        return np.asarray(res.detach().cpu().numpy() if hasattr(res, "detach") else res)
    if built.invert is None:
        logger.info("%s has no Invertd: taking its output back to the input grid with nearest neighbour",
                    built.spec.config_path)
        nearest = True
    else:
        nearest = bool(_pick(built.invert.nearest_interp, 0))
    mode = "nearest" if nearest or plan.mode == "nearest" else "bilinear"
    values = pred.as_tensor() if hasattr(pred, "as_tensor") else torch.as_tensor(pred)
    values = _on_resampled_grid(values.detach().cpu(), plan)
    if plan.interpolates:  # MONAI resamples in the forward step's dtype and returns float32
        values = values.to(torch.float64 if plan.float64 else torch.float32)
    per_slab: list[Any] = []
    whole: list[Any] = []
    for t in built.after_invert:
        (per_slab if not whole and type(t).__name__ in VOXELWISE else whole).append(t)
    out: np.ndarray | None = None
    labels: np.ndarray | None = None
    non_integer = 0
    in_shape = tuple(int(n) for n in volume.shape[:3])
    axes, signs, offsets = _to_input_axes(plan, np.asarray(volume.affine, dtype=np.float64))
    order = [axes.index(b) for b in range(3)]  # input axis b <- O axis order[b]
    flips = [1 + b for b in range(3) if signs[order[b]] < 0]
    along = axes[0]
    for d0, d1, slab in _oriented_slabs(values, plan, mode=mode, slab_bytes=slab_bytes):
        if plan.interpolates:
            slab = slab.to(torch.float32)
        slab = slab.permute(0, *[1 + order[b] for b in range(3)])
        if flips:
            slab = torch.flip(slab, dims=flips)
        if signs[0] > 0:
            i0, i1 = offsets[0] + d0, offsets[0] + d1
        else:
            i0, i1 = offsets[0] - d1 + 1, offsets[0] - d0 + 1
        where = tuple(slice(i0, i1) if b == along else slice(None) for b in range(3))
        d: dict[str, Any] = {key: slab}
        for t in per_slab:
            try:
                d = t(d)
            except Exception as exc:  # noqa: BLE001 - the bundle's transform
                raise ModelCardError(f"{built.spec.config_path}: postprocessing {type(t).__name__} failed "
                                     f"({type(exc).__name__}: {exc}).") from None
        res = d[key]
        res = res.as_tensor() if hasattr(res, "as_tensor") else torch.as_tensor(res)
        if res.ndim != 4 or tuple(res.shape[1:]) != tuple(slab.shape[1:]):
            raise UnsupportedBundleError(
                f"{built.spec.config_path}: a postprocessing transform after Invertd changed the shape "
                f"{tuple(slab.shape)} to {tuple(res.shape)}; medseg runs only voxelwise transforms there slab by "
                "slab."
            )
        res = res.cpu()
        if not whole and res.shape[0] == 1:  # straight to integer labels: never a full-resolution float volume
            lab = torch.round(res[0].to(torch.float64)) if res.is_floating_point() else res[0]
            if res.is_floating_point():
                non_integer += int((lab != res[0]).sum())
            if lab.numel() and float(lab.min()) < 0:
                raise UnsupportedBundleError(f"{built.spec.config_path}: the bundle's output has negative values; "
                                             "not a label map.")
            if labels is None:
                labels = np.zeros(in_shape, dtype=np.uint16)
            labels[where] = lab.numpy().astype(np.uint16)
            continue
        if out is None:
            np_dtype = res.numpy().dtype if res.dtype != torch.bfloat16 else np.float32
            out = np.zeros((res.shape[0], *in_shape), dtype=np_dtype)
        out[(slice(None), *where)] = res.numpy()
    if labels is not None:
        if non_integer:
            logger.warning("%s: %.1f%% of the output voxels are not whole label values (the bundle interpolates "
                           "labels); rounded to the nearest label", built.spec.config_path,
                           100 * non_integer / labels.size)
        return labels.astype(np.uint8) if (labels.max() if labels.size else 0) <= 255 else labels
    assert out is not None
    if whole:
        from monai.data import MetaTensor

        full: Any = {key: MetaTensor(torch.from_numpy(out), affine=torch.as_tensor(volume.affine))}
        for t in whole:
            full = t(full)
        res = full[key]
        out = np.asarray(res.detach().cpu().numpy() if hasattr(res, "detach") else res)
    return out


def to_label_array(values: np.ndarray, *, source: str) -> np.ndarray:
    """Channel-first postprocessed output → one integer label map (I, J, K).

    One channel: its values, rounded to integers when the bundle interpolated label values (a warning says how
    many voxels were not integers). Several channels (binary masks): label c + 1 where channel c is non-zero,
    later channels over earlier ones.
    """
    if values.ndim == 4 and values.shape[0] == 1:
        arr = values[0]
    elif values.ndim == 4:
        logger.warning("%s gives %d binary channels; labelling channel c as value c + 1 (later channels win where "
                       "they overlap)", source, values.shape[0])
        arr = np.zeros(values.shape[1:], dtype=np.int64)
        for c in range(values.shape[0]):
            arr[values[c] > 0] = c + 1
    else:
        arr = values
    if np.issubdtype(arr.dtype, np.floating):
        rounded = np.rint(arr)
        off = float(np.mean(rounded != arr))
        if off > 0:
            logger.warning("%s: %.1f%% of the output voxels are not whole label values (the bundle interpolates "
                           "labels); rounded to the nearest label", source, 100 * off)
        arr = rounded
    if arr.size and arr.min() < 0:
        raise UnsupportedBundleError(f"{source}: the bundle's output has negative values; not a label map.")
    top = int(arr.max()) if arr.size else 0
    return arr.astype(np.uint8 if top <= 255 else np.uint16)


@dataclass(frozen=True)
class BundleRun:
    """Bookkeeping of one bundle run: the plan used and the network grid."""

    plan: InversionPlan
    network_grid_voxels: int


def check_channels(built: BuiltBundle, volume: Volume, expected: int) -> None:
    """Raise :class:`ChannelCountError` when the volume's channels differ from the bundle's input channels."""
    channels = 1 if volume.array.ndim == 3 else volume.array.shape[3]
    if channels != expected:
        raise ChannelCountError(
            f"Bundle {built.spec.root.name!r} takes {expected} input channel(s) but got {channels} (array shape "
            f"{volume.array.shape}). Give one scan per channel (medseg segment T1C T1 T2 FLAIR --model BUNDLE) or "
            "one 4D file with the channels along the last axis."
        )


def plan_inversion(built: BuiltBundle, volume: Volume) -> InversionPlan:
    """The inversion plan of ``volume`` alone (runs the preprocessing; for inspection and tests)."""
    return preprocess(built, volume)[1]
