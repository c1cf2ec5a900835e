"""The segmentation engine: load a model once, segment many volumes, return labels on each input's own grid.

>>> seg = Segmenter("ct-basic")                      # doctest: +SKIP
>>> result = seg.segment(load_volume("ct/"))          # doctest: +SKIP
>>> result.labels.array.shape == volume.shape         # doctest: +SKIP

Network models run MONAI's ``sliding_window_inference`` on the card's grid (see :mod:`medseg.transforms`), with
the compute device chosen cuda > mps > cpu unless given, stitching on the compute device or on the host (a CUDA
out-of-memory while stitching on the GPU retries on the host with a logged warning), optional mixed precision
(fp16 on CUDA/MPS, bf16 on CPU), optional mirroring test-time augmentation, and optional skipping of windows that
hold nothing but the intensity floor (air in a clipped CT window: the network's answer there is computed once).
Classical cards run a weight-free function of :mod:`medseg.classical` through the same interface, and nnU-Net
result folders run nnU-Net's own predictor in-process (:mod:`medseg.models.nnunet`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medseg.errors import (
    ChannelCountError,
    DeviceError,
    ModalityMismatchError,
    ModelCardError,
    SegmentationCancelledError,
    WeightsError,
)
from medseg.labels import LabelTable
from medseg.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from medseg.models.cards import ModelCard

__all__ = ["CancelHook", "InferenceOptions", "ProgressHook", "Segmentation", "Segmenter", "choose_device", "segment"]

logger = logging.getLogger(__name__)

StitchDevice = Literal["auto", "host", "compute"]
#: ``progress(done, total)``: sliding windows done out of the total (1 of 1 for classical models).
ProgressHook = Callable[[int, int], None]
#: ``cancel()`` → True to stop; checked before each batch of windows.
CancelHook = Callable[[], bool]


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a network model. ``None`` means "as the model card says" (or the automatic choice).

    Attributes
    ----------
    device : str or None
        Compute device ("cuda", "cuda:1", "mps", "cpu"); None picks cuda > mps > cpu.
    stitch_device : {"auto", "host", "compute"}
        Where the sliding-window output is accumulated. "auto": on the compute device when the output fits in a
        quarter of its free memory, else on the host; a CUDA out-of-memory while stitching on the GPU retries
        on the host with a warning.
    overlap : float or None
        Window overlap fraction in [0, 1).
    blending : {"gaussian", "constant"} or None
        How overlapping windows are weighted.
    sw_batch_size : int or None
        Windows per network call.
    amp : bool or None
        Mixed precision: fp16 on CUDA/MPS, bf16 on CPU. None: on for CUDA, off elsewhere.
    tta : bool or None
        Mirroring test-time augmentation: average the network's logits over all 8 flips of the three axes. None:
        the model's default, off for cards and bundles; nnU-Net result folders mirror over the axes their
        checkpoint allows, as ``nnUNetv2_predict`` does (``tta=False`` turns it off).
    skip_empty : bool
        Windows whose every voxel sits at the normalisation's clip floor (air in a clipped CT window) are not
        run through the network; they get the network's output for such a window, computed once.
    postprocess : bool
        Apply the card's post-processing (largest component, small components, holes).
    inversion : {"trilinear", "nearest"}
        How labels go back to the input grid. "trilinear" (default): the class probabilities are interpolated
        exactly at every input voxel centre, as MONAI's ``Invertd`` does, and the argmax taken there.
        "nearest" (fast mode): the argmax is taken on the network grid and each input voxel takes the label of the
        nearest network voxel (ties: the lower network index); cheaper, but voxels at class boundaries can change
        (see ``docs/inference.md``). With ``probabilities=True`` the trilinear inversion is always used.
    resample : {"monai", "separable"}
        How the scan is resampled onto the network grid. "monai" (default): MONAI executes the fused Orientation +
        Spacing resample. "separable" (fast mode): MONAI plans the same output grid and medseg executes it as
        three 1-D linear interpolations (equal up to float rounding, faster on CPU; oblique grids fall back).
    slab_mb : float
        Memory budget (MiB) of one slab of class scores while going back to the input grid.
    channels_last : bool
        Run the network with its 5-D weights and inputs in PyTorch's ``channels_last_3d`` memory layout. Same
        arithmetic, another layout: oneDNN's bf16 convolutions, transposed ones above all, run faster in it on
        CPU (fast mode; see ``docs/inference.md``). Ignored for TorchScript models.
    """

    device: str | None = None
    stitch_device: StitchDevice = "auto"
    overlap: float | None = None
    blending: Literal["gaussian", "constant"] | None = None
    sw_batch_size: int | None = None
    amp: bool | None = None
    tta: bool | None = None
    skip_empty: bool = False
    postprocess: bool = True
    inversion: Literal["trilinear", "nearest"] = "trilinear"
    resample: Literal["monai", "separable"] = "monai"
    slab_mb: float = 64.0
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.inversion not in ("trilinear", "nearest"):
            raise ValueError(f"inversion must be 'trilinear' or 'nearest', not {self.inversion!r}.")
        if self.resample not in ("monai", "separable"):
            raise ValueError(f"resample must be 'monai' or 'separable', not {self.resample!r}.")

    @classmethod
    def fast(cls, **overrides: Any) -> InferenceOptions:
        """The fast preset: mixed precision, empty windows skipped, windows per call tuned to the device, and the
        separable resample onto the network grid (``resample="separable"``).

        Windows per call: 2 on CPU (bf16 convolutions ran about 2.5× faster than fp32 at 2 windows of 96³ and
        not faster at 1 in our measurements), 4 on GPUs. Labels go back to the input grid with the exact
        trilinear inversion, as in the default: the nearest-neighbour inversion (``inversion="nearest"``) is
        faster still but gave Dice 0.91-0.98 per organ against the default in ``benchmarks/bench_inference.py``,
        so it stays a separate opt-in. Every field can be overridden: ``InferenceOptions.fast(amp=False)``.
        """
        device = choose_device(overrides.get("device"))
        cpu = device.type == "cpu"
        preset = cls(amp=True, skip_empty=True, sw_batch_size=2 if cpu else 4, resample="separable",
                     channels_last=cpu)
        return replace(preset, **overrides)


@dataclass(frozen=True)
class Segmentation:
    """A segmentation on its input's grid.

    Attributes
    ----------
    labels : Volume, shape (I, J, K), uint8 or uint16
        Label values on the input's grid (same shape and affine), with the model's label table.
    probabilities : Volume, shape (I, J, K, C), float32, or None
        Per-class probabilities on the input grid when asked for (background first for softmax models).
    model : str
        Name of the model card.
    card : ModelCard
    device : str
        Where the network ran ("cpu", "cuda:0", ...; "classical" for weight-free models).
    timings_s : mapping of str to float
        Seconds spent per stage (prepare, network, invert, postprocess, total).
    stats : mapping of str to int
        Counters: windows run, windows skipped, network grid voxels.
    """

    labels: Volume
    probabilities: Volume | None
    model: str
    card: ModelCard = field(repr=False)
    device: str = "cpu"
    timings_s: Mapping[str, float] = field(default_factory=dict)
    stats: Mapping[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: model, device, timings, and voxel count and volume (mL) per label."""
        arr = self.labels.array
        counts = np.bincount(arr.ravel(), minlength=int(arr.max()) + 1 if arr.size else 1)
        table = self.labels.labels or LabelTable([])
        per_label = [
            {"value": v, "name": lab.name, "kind": lab.kind, "voxels": int(counts[v]) if v < len(counts) else 0,
             "volume_ml": round((int(counts[v]) if v < len(counts) else 0) * self.labels.voxel_volume_ml, 4)}
            for v, lab in table.items()
        ]
        return {
            "model": self.model,
            "version": self.card.version,
            "device": self.device,
            "grid": self.labels.describe_grid(),
            "dtype": str(arr.dtype),
            "labels": per_label,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "stats": dict(self.stats),
        }


def choose_device(requested: str | None = None) -> torch.device:
    """The compute device: ``requested`` if given, else cuda > mps > cpu.

    Raises
    ------
    DeviceError
        If the requested device is not available here.
    """
    import torch

    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise DeviceError(f"Unknown device {requested!r}; use cpu, cuda, cuda:N or mps.") from None
        mps = getattr(torch.backends, "mps", None)
        if (dev.type == "cuda" and not torch.cuda.is_available()) or (
            dev.type == "mps" and not (mps is not None and mps.is_available())
        ):
            raise DeviceError(f"Device {requested!r} was requested but it is not available here; use --device cpu.")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def stitch_with_fallback(run: Callable[[Any], Any], preferred: Any) -> tuple[Any, Any]:
    """Call ``run(stitch_device)`` on ``preferred``; on a CUDA out-of-memory there, retry on the host.

    Returns the result and the device it was stitched on.
    """
    import torch

    try:
        return run(preferred), preferred
    except torch.cuda.OutOfMemoryError:
        if torch.device(preferred).type == "cpu":
            raise
        logger.warning("CUDA out of memory while stitching on %s; retrying with stitching on the host "
                       "(slower, needs host memory for the output).", preferred)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return run(torch.device("cpu")), torch.device("cpu")


class Segmenter:
    """A model loaded once, to segment many volumes.

    Parameters
    ----------
    model : str, Path or ModelCard
        A model name from the registry, a card file, a MONAI bundle folder, an nnU-Net v2 result folder (or one of
        its ``fold_N`` folders or checkpoints), or a card object.
    models_dirs : sequence of path
        User folders of cards and bundles searched before the shipped cards.
    options : InferenceOptions, optional
        Run settings; keyword arguments named like its fields override them (``overlap=0.5``).
    network : callable, optional
        A predictor to use instead of building the card's network (``(B, C, *patch) → (B, out, *patch)``), e.g.
        an analytic function in tests or a model you already hold.
    trust_bundle_code : bool
        Run a MONAI bundle's own code (its ``scripts/`` package, expressions outside medseg's restricted set):
        ``--trust-bundle-code``. Only for bundles from a source you trust.

    Raises
    ------
    ModelNotFoundError, ModelCardError, UnknownNetworkError, WeightsError
        When the model cannot be found, described or loaded.
    TypeError
        For an unknown option name.
    """

    def __init__(
        self,
        model: str | Path | ModelCard,
        /,
        *,
        models_dirs: Sequence[str | Path] = (),
        options: InferenceOptions | None = None,
        network: Callable[..., Any] | None = None,
        trust_bundle_code: bool = False,
        **option_overrides: Any,
    ) -> None:
        from medseg.models.cards import ModelCard
        from medseg.models.registry import find_model

        names = {f.name for f in fields(InferenceOptions)}
        unknown = sorted(set(option_overrides) - names)
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown}; options are {sorted(names)}.")
        self.options = replace(options or InferenceOptions(), **option_overrides)
        self.card: ModelCard = model if isinstance(model, ModelCard) else find_model(
            model, models_dirs=models_dirs, trust_code=trust_bundle_code)
        self._function: Callable[[Volume], Volume] | None = None
        self._nnunet: Any = None
        self._net: Any = None
        self._air: dict[tuple[int, ...], Any] = {}
        if self.card.kind == "classical":
            self._function = _classical_function(self.card)
            self.device = "classical"
            return
        dev = choose_device(self.options.device)
        self.device = str(dev)
        self._device = dev
        self._bundle: Any = None
        self.weights_sha256: str | None = None
        if self.card.kind == "nnunet":
            from medseg.models.nnunet import NnunetRunner

            overlap = self.options.overlap
            self._nnunet = NnunetRunner(self.card, device=dev, mirroring=self.options.tta,
                                        tile_step_size=0.5 if overlap is None else 1.0 - overlap)
            return
        if self.card.kind == "bundle":
            from medseg.models.bundle import build_bundle

            self._bundle = build_bundle(self.card.bundle, device=dev)
        self._net = network if network is not None else self._load_network()
        if hasattr(self._net, "to") and network is None:
            self._net = self._net.to(dev)
            if self.options.channels_last and not _is_scripted(self._net):
                import torch

                self._net = self._net.to(memory_format=torch.channels_last_3d)

    # ---- loading ------------------------------------------------------------------------------------------
    def _load_network(self) -> Any:
        from medseg.models.networks import build_network
        from medseg.models.weights import is_torchscript, load_weights, verify_sha256

        card = self.card
        if self._bundle is not None:
            from medseg.models.bundle import check_md5

            path = self._bundle.weights
            check_md5(card.bundle, path)
            self.weights_sha256 = verify_sha256(path, card.weights.sha256 if card.weights else None)
            if is_torchscript(path):
                return load_weights(None, path, sha256=self.weights_sha256, format="torchscript")
            return load_weights(self._bundle.network, path, sha256=self.weights_sha256, format="state_dict")
        if card.weights is None:
            raise WeightsError(
                f"Model card {card.name!r} ({card.source}) names no weights file; add 'weights: {{file: ..., "
                "sha256: ...}}' to the card."
            )
        torchscript = card.weights.format == "torchscript" or (
            card.weights.format == "auto" and card.weights.path.is_file() and is_torchscript(card.weights.path)
        )
        if torchscript:
            return load_weights(None, card.weights.path, sha256=card.weights.sha256, format="torchscript")
        assert card.network is not None
        net = build_network(card.network.name, card.network.kwargs, source=str(card.source or card.name))
        return load_weights(net, card.weights.path, sha256=card.weights.sha256, format="state_dict")

    # ---- checks -------------------------------------------------------------------------------------------
    def check_modality(self, volume: Volume) -> None:
        """Warn or raise (per the card's ``modality_check``) when the volume's modality is not the card's.

        Raises
        ------
        ModalityMismatchError
            If the modality differs and the card says ``modality_check: error``.
        """
        card = self.card
        if not card.modality:
            return
        if volume.modality is None:
            logger.warning("volume has no modality; model %s expects %s, assuming it fits.", card.name,
                           "/".join(card.modality))
            return
        if volume.modality.upper() in card.modality:
            return
        msg = (f"Model {card.name!r} is for {'/'.join(card.modality)} scans but the volume is "
               f"{volume.modality}. Choose a model for {volume.modality} (medseg models list).")
        if card.modality_check == "error":
            raise ModalityMismatchError(msg)
        logger.warning("%s Running anyway (the card says modality_check: warn).", msg)

    # ---- running ------------------------------------------------------------------------------------------
    def segment(
        self,
        volume: Volume | str | Path | Sequence[Volume | str | Path],
        *,
        probabilities: bool = False,
        progress: ProgressHook | None = None,
        cancel: CancelHook | None = None,
    ) -> Segmentation:
        """Segment one volume.

        Parameters
        ----------
        volume : Volume, path, or a sequence of them
            A volume, shape (I, J, K) or (I, J, K, C), or a path :func:`medseg.io.load_volume` reads; for a
            multi-channel model also one scan per channel (see :meth:`combine_channels`).
        probabilities : bool
            Also return per-class probabilities on the input grid (costs classes × voxels × 4 bytes).
        progress : callable, optional
            Called as ``progress(done, total)`` with sliding windows done (skipped ones included) after each batch
            of windows, from the thread running the segmentation; classical models report ``(0, 1)`` and ``(1, 1)``.
        cancel : callable, optional
            Called before each batch of windows; when it returns True the segmentation stops and raises
            :class:`~medseg.errors.SegmentationCancelledError`.

        Returns
        -------
        Segmentation
            Labels on the input's grid (same shape and affine).

        Raises
        ------
        ModalityMismatchError, NotVolumetricError, ChannelCountError
            For a volume the model cannot take.
        SegmentationCancelledError
            When ``cancel()`` returned True.
        """
        if not isinstance(volume, (Volume, str, Path)):
            volume = self.combine_channels(list(volume))
        if not isinstance(volume, Volume):
            from medseg.io import load_volume

            volume = load_volume(volume)
        t0 = time.perf_counter()
        self.check_modality(volume)
        if self._function is not None:
            _check_cancel(cancel, self.card.name)
            if progress is not None:
                progress(0, 1)
            result = self._segment_classical(volume, t0)
            if progress is not None:
                progress(1, 1)
            return result
        if self._bundle is not None:
            if probabilities:
                logger.warning("probabilities are not returned for MONAI bundles (%s): their postprocessing "
                               "decides the output", self.card.name)
            return self._segment_bundle(volume, t0, progress, cancel)
        if self._nnunet is not None:  # nnU-Net's predictor runs in one call: progress (0, 1) then (1, 1)
            _check_cancel(cancel, self.card.name)
            if progress is not None:
                progress(0, 1)
            result = self._segment_nnunet(volume, t0, probabilities)
            if progress is not None:
                progress(1, 1)
            return result
        return self._segment_network(volume, t0, probabilities, progress, cancel)

    def combine_channels(self, scans: Sequence[Volume | str | Path]) -> Volume:
        """Several scans as the model's input channels, matched to its channel names, on the first scan's grid.

        A scan given as a path is matched to a channel when the channel's name appears in its file name
        (case-insensitive, as a whole word: ``case_t1c.nii.gz`` is T1c, not T1); if no name matches, the order given
        is the channel order. The output lands on the grid of the first scan *as given*.

        Raises
        ------
        ChannelCountError
            If the number of scans differs from the model's input channels, or names match only some scans.
        """
        import re

        from medseg.errors import ChannelCountError
        from medseg.io import load_volume
        from medseg.resample import stack_channels

        card = self.card
        if len(scans) != card.input_channels:
            names = f" ({', '.join(card.channel_names)})" if card.channel_names else ""
            raise ChannelCountError(f"Model {card.name!r} takes {card.input_channels} input channel(s){names}; "
                                    f"{len(scans)} scans were given.")
        order = list(range(len(scans)))
        labels = [Path(s).name.lower() if not isinstance(s, Volume) else "" for s in scans]
        if card.channel_names and len(scans) > 1 and any(labels):
            def hits(name: str) -> list[int]:
                pat = re.compile(rf"(^|[^a-z0-9]){re.escape(name.lower())}([^a-z0-9]|$)")
                return [i for i, lab in enumerate(labels) if pat.search(lab)]

            found = [hits(n) for n in card.channel_names]
            if all(len(f) == 1 for f in found) and len({f[0] for f in found}) == len(found):
                order = [f[0] for f in found]
                logger.info("channels matched by file name: %s", dict(zip(card.channel_names,
                                                                          (labels[i] for i in order), strict=True)))
            elif any(found):
                missing = [n for n, f in zip(card.channel_names, found, strict=True) if len(f) != 1]
                raise ChannelCountError(
                    f"Model {card.name!r} takes the channels {', '.join(card.channel_names)}; the file names match "
                    f"some but not all of them uniquely ({', '.join(missing)} unmatched or ambiguous). Name each file "
                    "after its channel, or give the scans in the channel order with names that match none."
                )
        loaded = [s if isinstance(s, Volume) else load_volume(s) for s in scans]
        return stack_channels([loaded[i] for i in order], reference=loaded[0])

    def _segment_bundle(self, volume: Volume, t0: float, progress: ProgressHook | None = None,
                        cancel: CancelHook | None = None) -> Segmentation:
        from medseg.bundle_inference import (
            as_meta,
            check_channels,
            invert_bundle_output,
            preprocess,
            run_before_invert,
            to_label_array,
            window_of,
        )
        from medseg.labels import Label, default_color

        built, card = self._bundle, self.card
        check_channels(built, volume, card.input_channels)
        data, plan = preprocess(built, volume)
        x = data[built.image_key]
        t1 = time.perf_counter()
        window = window_of(built.inferer, tuple(int(n) for n in x.shape[1:]))
        window["amp"] = built.amp and self._device.type == "cuda"  # MONAI's evaluator autocasts on CUDA only
        logits, stats, stitched_on = self.predict(x.as_tensor().float(), window=window, progress=progress,
                                                  cancel=cancel)
        stats["network_grid_voxels"] = int(np.prod(x.shape[1:]))
        slab = int(self.options.slab_mb * 1024 * 1024)
        data[built.pred_key] = as_meta(logits.cpu(), x)
        del logits
        data = run_before_invert(built, data, plan, slab_bytes=slab)
        t2 = time.perf_counter()
        values = invert_bundle_output(built, data, plan, volume, slab_bytes=slab)
        arr = values if values.ndim == 3 else to_label_array(values, source=str(card.source))
        t3 = time.perf_counter()
        table = card.labels
        present = [int(v) for v in np.unique(arr) if v != 0]
        unknown = [v for v in present if table is None or v not in table]
        if unknown:
            logger.warning("%s wrote label values %s that its metadata does not name; naming them label_N (name them "
                           "in %s/medseg.yaml)", card.name, unknown, card.source)
            known = list(table.values()) if table is not None else []
            table = LabelTable([*known, *(Label(v, f"label_{v}", default_color(v), "organ") for v in unknown)])
        labels = Volume(arr, volume.affine, modality="SEG", labels=table, source=volume.source)
        timings = {"prepare": t1 - t0, "network": t2 - t1, "invert": t3 - t2, "postprocess": 0.0, "total": t3 - t0}
        logger.info("segmented with bundle %s on %s (stitched on %s) in %.1f s", card.name, self.device, stitched_on,
                    t3 - t0)
        stats["exact_inversion"] = int(plan.exact)
        return Segmentation(labels, None, card.name, card, self.device, timings, stats)

    def _segment_nnunet(self, volume: Volume, t0: float, probabilities: bool) -> Segmentation:
        from medseg.postprocess import postprocess_labels

        card = self.card
        channels = 1 if volume.array.ndim == 3 else volume.array.shape[3]
        if channels != card.input_channels:
            raise ChannelCountError(
                f"nnU-Net folder {card.source} takes {card.input_channels} channel(s) "
                f"({', '.join(card.channel_names)}) but the volume has {channels}."
            )
        arr, probs = self._nnunet.segment(volume, probabilities=probabilities)
        t1 = time.perf_counter()
        labels = Volume(arr, volume.affine, modality="SEG", labels=card.labels, source=volume.source)
        if self.options.postprocess:
            labels = postprocess_labels(labels, card.postprocessing)
        t2 = time.perf_counter()
        prob_volume = None if probs is None else Volume(probs, volume.affine, modality=None)
        logger.info("segmented with nnU-Net folder %s (%d fold(s)) on %s in %.1f s", card.name, self._nnunet.folds,
                    self.device, t2 - t0)
        return Segmentation(labels, prob_volume, card.name, card, self.device,
                            {"nnunet": t1 - t0, "postprocess": t2 - t1, "total": t2 - t0},
                            {"folds": self._nnunet.folds})

    def _segment_classical(self, volume: Volume, t0: float) -> Segmentation:
        from medseg.postprocess import postprocess_labels

        assert self._function is not None
        out = self._function(volume)
        if not isinstance(out, Volume) or out.array.ndim != 3:
            raise ModelCardError(f"{self.card.function} did not return a 3D label Volume.")
        out.require_same_grid(volume, what=f"the input and the output of {self.card.function}")
        table = out.labels or self.card.labels
        if table is None:
            raise ModelCardError(f"{self.card.function} returned no label table and the card {self.card.name!r} "
                                 "lists no labels.")
        if self.card.labels is not None and out.labels is not None and self.card.labels.names != out.labels.names:
            logger.warning("labels of %s differ from the card %s; using the function's.", self.card.function,
                           self.card.name)
        arr = out.array.astype(np.uint8 if max(table, default=0) <= 255 else np.uint16, copy=False)
        labels = Volume(arr, volume.affine, modality="SEG", labels=table, source=volume.source)
        t1 = time.perf_counter()
        if self.options.postprocess:
            labels = postprocess_labels(labels, self.card.postprocessing)
        t2 = time.perf_counter()
        return Segmentation(labels, None, self.card.name, self.card, "classical",
                            {"function": t1 - t0, "postprocess": t2 - t1, "total": t2 - t0}, {})

    def _segment_network(self, volume: Volume, t0: float, probabilities: bool, progress: ProgressHook | None = None,
                         cancel: CancelHook | None = None) -> Segmentation:
        from medseg.postprocess import postprocess_labels
        from medseg.transforms import (
            SLAB_BYTES,
            invert_nearest,
            invert_to_input,
            label_lookup,
            prepare,
            to_probabilities,
        )

        card = self.card
        assert card.labels is not None
        prepared = prepare(volume, card, resample=self.options.resample)
        t1 = time.perf_counter()
        logits, stats, stitched_on = self.predict(prepared.image, floor=prepared.floor, progress=progress,
                                                  cancel=cancel)
        stats["network_grid_voxels"] = int(np.prod(prepared.image.shape[1:]))
        if logits.shape[0] != card.out_channels:
            raise ModelCardError(
                f"Model {card.name!r} returned {logits.shape[0]} channels but its {len(card.labels)} labels with "
                f"output '{card.output}' need {card.out_channels}. Fix 'labels' or network.kwargs.out_channels."
            )
        nearest = self.options.inversion == "nearest" and not probabilities
        if not (nearest and card.output == "softmax"):  # softmax keeps the argmax: not needed for nearest labels
            to_probabilities(logits, card.output)
        logits = logits.cpu()
        t2 = time.perf_counter()
        lookup = label_lookup(card.labels, card.output)
        slab = int(self.options.slab_mb * 1024 * 1024) if self.options.slab_mb else SLAB_BYTES
        if nearest:
            arr, probs = invert_nearest(logits, prepared, lookup, output=card.output, slab_bytes=slab), None
        else:
            arr, probs = invert_to_input(logits, prepared, lookup, output=card.output, probabilities=probabilities,
                                         slab_bytes=slab)
        del logits
        t3 = time.perf_counter()
        labels = Volume(arr, volume.affine, modality="SEG", labels=card.labels, source=volume.source)
        if self.options.postprocess:
            labels = postprocess_labels(labels, card.postprocessing)
        t4 = time.perf_counter()
        prob_volume = None if probs is None else Volume(probs, volume.affine, modality=None)
        timings = {"prepare": t1 - t0, "network": t2 - t1, "invert": t3 - t2, "postprocess": t4 - t3, "total": t4 - t0}
        logger.info("segmented with %s on %s (stitched on %s) in %.1f s", card.name, self.device, stitched_on,
                    t4 - t0)
        return Segmentation(labels, prob_volume, card.name, card, self.device, timings, stats)

    def predict(
        self,
        image: torch.Tensor,
        *,
        floor: float | None = None,
        window: Mapping[str, Any] | None = None,
        progress: ProgressHook | None = None,
        cancel: CancelHook | None = None,
    ) -> tuple[torch.Tensor, dict[str, int], str]:
        """Sliding-window logits of a prepared image.

        Parameters
        ----------
        image : torch.Tensor, shape (C, I', J', K'), float32
            Normalised image on the network grid.
        floor : float, optional
            The normalisation's clip floor; with ``skip_empty`` windows entirely at this value are not run.
        window : mapping, optional
            Sliding-window parameters instead of the card's (a MONAI bundle's inferer): ``patch_size``,
            ``sw_batch_size``, ``overlap``, ``blending``, ``sigma_scale``, ``padding_mode``, ``cval``, ``amp``.
            Options given explicitly (overlap, blending, sw_batch_size, amp) still override them.
        progress, cancel : callable, optional
            As in :meth:`segment`.

        Returns
        -------
        logits : torch.Tensor, shape (out_channels, I', J', K'), float32, on the stitch device
        stats : dict
            ``windows`` run through the network and ``windows_skipped``.
        stitched_on : str
        """
        import torch
        from monai.inferers import sliding_window_inference

        card, opt = self.card, self.options
        dev = self._device
        win = dict(window or {})
        roi = tuple(int(p) for p in win.get("patch_size", card.inference.patch_size))
        counters = {"windows": 0, "windows_skipped": 0}
        use_amp = opt.amp if opt.amp is not None else win.get("amp", dev.type == "cuda")
        amp_dtype = torch.bfloat16 if dev.type == "cpu" else torch.float16
        skip = opt.skip_empty and floor is not None
        if opt.skip_empty and floor is None:
            logger.warning("skip_empty needs a clipped intensity window (ct_window or percentile with clip); "
                           "running every window of %s.", card.name)
        net = self._net

        def run(x: torch.Tensor) -> torch.Tensor:
            if opt.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=bool(use_amp)):
                if not opt.tta:
                    out = _first(net(x))
                    return out.to(torch.float32)
                total = None
                for dims in ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)):
                    xi = torch.flip(x, dims) if dims else x
                    yi = _first(net(xi)).to(torch.float32)
                    yi = torch.flip(yi, dims) if dims else yi
                    total = yi if total is None else total + yi
                assert total is not None
                return total / 8.0

        def air(shape: tuple[int, ...]) -> torch.Tensor:
            if shape not in self._air:
                x = torch.full((1, *shape), float(floor), dtype=torch.float32, device=dev)  # type: ignore[arg-type]
                self._air[shape] = run(x)
            return self._air[shape]

        overlap = win.get("overlap", card.inference.overlap) if opt.overlap is None else opt.overlap
        total = _window_count(tuple(image.shape[1:]), roi, overlap)
        done = [0]

        def predictor(x: torch.Tensor) -> torch.Tensor:
            _check_cancel(cancel, card.name)
            out = _predict_batch(x)
            done[0] += x.shape[0]
            if progress is not None:
                progress(min(done[0], total), total)
            return out

        def _predict_batch(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device=dev, dtype=torch.float32)
            if not skip:
                counters["windows"] += x.shape[0]
                return run(x)
            assert floor is not None
            empty = x.flatten(1).amax(dim=1) <= floor
            n_empty = int(empty.sum())
            counters["windows_skipped"] += n_empty
            counters["windows"] += x.shape[0] - n_empty
            if n_empty == 0:
                return run(x)
            a = air(tuple(x.shape[1:]))
            if n_empty == x.shape[0]:
                return a.expand(x.shape[0], *a.shape[1:]).clone()
            full = run(x[~empty])
            out = torch.empty((x.shape[0], *full.shape[1:]), dtype=full.dtype, device=full.device)
            out[~empty] = full
            out[empty] = a[0].to(full.dtype)
            return out

        mode = win.get("blending", card.inference.blending) if opt.blending is None else opt.blending
        batch = win.get("sw_batch_size", card.inference.sw_batch_size) if opt.sw_batch_size is None else \
            opt.sw_batch_size
        extra = {k: win[k] for k in ("sigma_scale", "padding_mode", "cval") if k in win}
        inputs = image.unsqueeze(0)

        def sliding(stitch: Any) -> torch.Tensor:
            with torch.no_grad():
                out = sliding_window_inference(
                    inputs.to(stitch), roi, batch, predictor, overlap=overlap, mode=mode,
                    sw_device=dev, device=stitch, **extra,
                )
            return _first(out)[0]

        preferred = self._stitch_device(image)
        out, stitched_on = stitch_with_fallback(sliding, preferred)
        if hasattr(out, "as_tensor"):
            out = out.as_tensor()
        return out, counters, str(stitched_on)

    def _stitch_device(self, image: torch.Tensor) -> torch.device:
        import torch

        dev = self._device
        choice = self.options.stitch_device
        if dev.type == "cpu" or choice == "host":
            return torch.device("cpu")
        if choice == "compute" or dev.type != "cuda":
            return dev
        need = 4 * int(np.prod(image.shape[1:])) * (self.card.out_channels + 2)
        free, _total = torch.cuda.mem_get_info(dev)
        if need > free // 4:
            logger.info("stitching on the host: the output needs %.1f GiB, the GPU has %.1f GiB free",
                        need / 2**30, free / 2**30)
            return torch.device("cpu")
        return dev


def _check_cancel(cancel: CancelHook | None, model: str) -> None:
    if cancel is not None and cancel():
        raise SegmentationCancelledError(f"Segmentation with {model!r} was cancelled; no labels were produced.")


def _window_count(image_shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Sliding windows MONAI's ``sliding_window_inference`` runs over an image (it pads the image up to the roi)."""
    from monai.data.utils import dense_patch_slices

    size = tuple(max(s, r) for s, r in zip(image_shape, roi))
    interval = tuple(r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(size, roi))
    return len(dense_patch_slices(size, roi, interval))


def _is_scripted(net: Any) -> bool:
    import torch

    return isinstance(net, torch.jit.ScriptModule)


def _first(out: Any) -> Any:
    if isinstance(out, (list, tuple)):
        return out[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out


def _classical_function(card: ModelCard) -> Callable[[Volume], Volume]:
    from medseg import classical

    name = card.function or ""
    allowed = set(getattr(classical, "__all__", ()))
    if not name.isidentifier() or name not in allowed or not callable(getattr(classical, name, None)):
        raise ModelCardError(
            f"{card.source or card.name}: 'function: {name}' is not a function of medseg.classical; classical "
            f"cards may name only: {', '.join(sorted(n for n in allowed if callable(getattr(classical, n, None))))}."
        )
    return getattr(classical, name)  # type: ignore[no-any-return]


def segment(
    volume: Volume | str | Path,
    /,
    *,
    model: str | Path | ModelCard,
    models_dirs: Sequence[str | Path] = (),
    probabilities: bool = False,
    trust_bundle_code: bool = False,
    **options: Any,
) -> Segmentation:
    """Segment one volume with one model: ``Segmenter(model, **options).segment(volume)``.

    Parameters
    ----------
    volume : Volume or path
        Shape (I, J, K) (or (I, J, K, C) for multi-channel models), or a path to load.
    model : str, Path or ModelCard
        Model name, card file or bundle folder.
    models_dirs : sequence of path
        User folders of cards and bundles.
    probabilities : bool
        Also return per-class probabilities.
    trust_bundle_code : bool
        See :class:`Segmenter`.
    **options
        Fields of :class:`InferenceOptions` (device, overlap, amp, tta, skip_empty, ...).

    Returns
    -------
    Segmentation
        Labels (uint8/uint16, with the label table) on the input's grid.

    Raises
    ------
    MedsegError
        Subclasses for a model that cannot be found or loaded, or a volume it cannot take.
    """
    return Segmenter(model, models_dirs=models_dirs, trust_bundle_code=trust_bundle_code, **options).segment(
        volume, probabilities=probabilities)
