"""nnU-Net v2 result folders as models, run by nnU-Net's own predictor in-process.

A result folder is ``DatasetXXX_Name/Trainer__Plans__Configuration/`` holding ``dataset.json``, ``plans.json``
and ``fold_N/checkpoint_final.pth`` (or ``checkpoint_best.pth``). Give medseg the folder (every fold found, their
logits averaged, as ``nnUNetv2_predict`` does), one ``fold_N`` folder, or one checkpoint file.

Why nnU-Net's own predictor: labels identical to ``nnUNetv2_predict`` need all of its rules (SimpleITK array order
and ``transpose_forward``, crop to non-zero, its normalisation, shape-based resampling with a separate z, its tile
positions, fp16 Gaussian accumulation, order-1 logit resampling); a re-implementation drifts. medseg therefore
builds the network from ``plans.json`` itself, loads the checkpoints with ``torch.load(weights_only=True)`` and an
explicit allow-list of numpy types (nnU-Net loads them with ``weights_only=False``), and hands both to
``nnUNetPredictor.manual_initialization``; ``predict_single_npy_array`` then runs on the scan's voxels in the
order nnU-Net's image reader would give them. This never walks nnU-Net's trainer classes (that lookup imports
every trainer and, through timm, torchvision, which fails beside a CPU-only torch), so any trainer name works as
long as its network is the one ``plans.json`` describes (a mismatch is reported, never guessed).

Safety: ``plans.json`` names Python classes that nnU-Net imports by name. medseg accepts only network classes from
``dynamic_network_architectures.architectures`` and building blocks from ``torch.nn``; anything else is refused
before nnU-Net sees the plans. Checkpoints holding pickled objects beyond the allow-list are refused.

Needs the optional ``nnunet`` extra (``pip install 'medseg[nnunet]'``) to run; reading the folder's description
(``medseg models list/show``) does not.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import (
    CheckpointMismatchError,
    ChecksumMismatchError,
    MissingDependencyError,
    ModelCardError,
    ModelNotFoundError,
    UnsafeCheckpointError,
    WeightsError,
)
from medseg.labels import Label, LabelTable, default_color

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from medseg.models.cards import ModelCard
    from medseg.volume import Volume

__all__ = [
    "CHECKPOINT_ALLOWED_GLOBALS",
    "NnunetRunner",
    "is_nnunet_path",
    "load_nnunet_card",
    "load_nnunet_checkpoint",
]

logger = logging.getLogger(__name__)

_DEFAULT_CHECKPOINT = "checkpoint_final.pth"
_FOLD = re.compile(r"^fold_(\d+|all)$")
_LESION_WORDS = ("tumor", "tumour", "lesion", "cancer", "metasta", "nodule", "mass", "cyst")
_NETWORK_PREFIX = "dynamic_network_architectures.architectures."
_IMPORT_PREFIX = "torch.nn."
#: Image readers whose array order medseg reproduces; the "WithReorient" ones reorient to RAS first.
_READERS = {"SimpleITKIO": False, "NibabelIO": False, "SimpleITKIOWithReorient": True, "NibabelIOWithReorient": True}

#: What a trained nnU-Net checkpoint may hold besides tensors, numbers, strings and containers: numpy scalars and
#: arrays in its training log (``logging``, ``_best_ema``), by their pickled names. Nothing here runs code.
CHECKPOINT_ALLOWED_GLOBALS = (
    "numpy.dtype",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtypes.*DType",
)


# ---- the folder ------------------------------------------------------------------------------------------------
def _split_path(path: Path) -> tuple[Path, tuple[str, ...] | None, str | None]:
    """(result folder, folds or None for all, checkpoint file name or None) of a folder, fold or checkpoint path."""
    if path.is_file() and path.suffix == ".pth" and _FOLD.match(path.parent.name):
        return path.parent.parent, (_FOLD.match(path.parent.name).group(1),), path.name  # type: ignore[union-attr]
    if path.is_dir() and _FOLD.match(path.name) and not (path / "plans.json").is_file():
        return path.parent, (_FOLD.match(path.name).group(1),), None  # type: ignore[union-attr]
    return path, None, None


def is_nnunet_path(path: str | Path) -> bool:
    """True for an nnU-Net v2 result folder (``plans.json`` and ``dataset.json``), one of its ``fold_N`` folders,
    or a checkpoint inside one."""
    root, _, _ = _split_path(Path(path))
    return root.is_dir() and (root / "plans.json").is_file() and (root / "dataset.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path}: cannot read this nnU-Net file as JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelCardError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


def _configuration(plans: Mapping[str, Any], name: str, plans_path: Path) -> dict[str, Any]:
    """The configuration ``name`` of plans.json with ``inherits_from`` resolved (as nnU-Net's PlansManager does)."""
    configs = plans.get("configurations")
    if not isinstance(configs, Mapping) or name not in configs:
        known = sorted(configs) if isinstance(configs, Mapping) else []
        raise ModelCardError(f"{plans_path}: no configuration {name!r} (the folder name's last part); plans.json "
                             f"has {known}. Rename nothing: give the folder nnU-Net wrote.")
    seen: list[str] = []
    merged: dict[str, Any] = {}
    current: str | None = name
    while current is not None:
        if current in seen or current not in configs:
            raise ModelCardError(f"{plans_path}: configuration {current!r} is missing or inherits in a loop "
                                 f"({' -> '.join(seen + [str(current)])}).")
        seen.append(current)
        cfg = dict(configs[current])
        merged = {**cfg, **merged}
        current = cfg.get("inherits_from")
    merged.pop("inherits_from", None)
    return merged


def _labels(dataset: Mapping[str, Any], path: Path) -> LabelTable:
    raw = dataset.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        raise ModelCardError(f"{path}: 'labels' must map label names to values, e.g. {{\"background\": 0, "
                             f"\"liver\": 1}}; found {raw!r}.")
    region_order = dataset.get("regions_class_order")
    items: list[Label] = []
    regions = [(n, v) for n, v in raw.items() if isinstance(v, (list, tuple))]
    if regions:  # region-based training: the i-th region (in file order, background excluded) writes label order[i]
        if not isinstance(region_order, list):
            raise ModelCardError(f"{path}: region-based labels need 'regions_class_order'.")
        named = [(n, v) for n, v in raw.items() if not (isinstance(v, (int, float)) and int(v) == 0)]
        if len(named) != len(region_order):
            raise ModelCardError(f"{path}: {len(named)} regions but {len(region_order)} entries in "
                                 "'regions_class_order'.")
        pairs = [(str(n), int(v)) for (n, _), v in zip(named, region_order)]
    else:
        try:
            pairs = [(str(n), int(v)) for n, v in raw.items() if str(n) != "ignore"]
        except (TypeError, ValueError):
            raise ModelCardError(f"{path}: every label value must be an integer; found {dict(raw)!r}.") from None
    for name, value in sorted(pairs, key=lambda p: p[1]):
        if value == 0:
            continue
        kind = "lesion" if any(w in name.lower() for w in _LESION_WORDS) else "organ"
        items.append(Label(value, name, default_color(value), kind))  # type: ignore[arg-type]
    if not items:
        raise ModelCardError(f"{path}: 'labels' holds no foreground label.")
    return LabelTable(items)


def _checksums(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` from an optional ``SHA256SUMS`` file (``sha256sum`` format) in the folder."""
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        return {}
    out: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and len(parts[0]) == 64:
            out[parts[1].lstrip("*").strip()] = parts[0].lower()
    return out


def _fold_sort_key(fold: str) -> tuple[int, int]:
    return (1, 0) if fold == "all" else (0, int(fold))


def load_nnunet_card(
    path: str | Path, *, folds: Sequence[int | str] | None = None, checkpoint: str | None = None
) -> ModelCard:
    """A :class:`~medseg.models.cards.ModelCard` (kind ``nnunet``) for an nnU-Net v2 result folder.

    Labels and their names come from ``dataset.json``, input channels from its ``channel_names``; the network is
    described by ``plans.json``. Nothing is imported or unpickled here.

    Parameters
    ----------
    path : path
        The ``Trainer__Plans__Configuration`` folder, one ``fold_N`` folder in it, or a checkpoint file in one.
    folds : sequence of int or "all", optional
        Folds to ensemble (logits averaged). Default: the fold of ``path`` if it names one, else every
        ``fold_N`` holding the checkpoint (``fold_all`` only when there is no other), as nnU-Net does.
    checkpoint : str, optional
        Checkpoint file name in each fold (default ``checkpoint_final.pth``, or the file ``path`` names).

    Raises
    ------
    ModelNotFoundError
        If ``path`` is not an nnU-Net result folder.
    ModelCardError
        If ``dataset.json`` or ``plans.json`` is unreadable or does not describe a runnable model.
    WeightsError
        If a requested fold has no checkpoint.
    """
    from medseg.models.cards import ModelCard, NetworkSpec, PreprocessingSpec, WeightsSpec, WindowSpec

    given = Path(path)
    root, path_folds, path_ckpt = _split_path(given)
    root = root.resolve()
    if not is_nnunet_path(root):
        raise ModelNotFoundError(f"{given}: not an nnU-Net v2 result folder (needs plans.json and dataset.json, "
                                 "e.g. Dataset001_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres).")
    dataset_path, plans_path = root / "dataset.json", root / "plans.json"
    dataset, plans = _read_json(dataset_path), _read_json(plans_path)
    parts = root.name.split("__")
    if len(parts) != 3:
        raise ModelCardError(f"{root}: the folder name must be Trainer__Plans__Configuration, as nnU-Net writes it "
                             f"(e.g. nnUNetTrainer__nnUNetPlans__3d_fullres); found {root.name!r}.")
    trainer, plans_name, configuration = parts
    cfg = _configuration(plans, configuration, plans_path)
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in _READERS:
        raise ModelCardError(f"{plans_path}: image_reader_writer {reader!r} is not one medseg reproduces "
                             f"({', '.join(_READERS)}); its array order is unknown here.")
    if cfg.get("previous_stage"):
        raise ModelCardError(f"{plans_path}: configuration {configuration!r} is a cascade stage (it needs the "
                             f"segmentation of {cfg['previous_stage']!r} as input); medseg runs single-stage "
                             "configurations only. Use the 3d_fullres or 3d_lowres folder.")
    labels = _labels(dataset, dataset_path)
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, Mapping) or not channels:
        raise ModelCardError(f"{dataset_path}: 'channel_names' must map channel numbers to names, e.g. "
                             f"{{\"0\": \"CT\"}}; found {channels!r}.")
    channel_names = tuple(str(v) for _, v in sorted(channels.items(), key=lambda kv: int(kv[0])))
    modality: tuple[str, ...] = ("CT",) if all(c.upper() == "CT" for c in channel_names) else ()

    ckpt_name = checkpoint or path_ckpt or _DEFAULT_CHECKPOINT
    if folds is not None:
        wanted = tuple(str(f) for f in folds)
    elif path_folds is not None:
        wanted = path_folds
    else:
        found = sorted((m.group(1) for d in root.iterdir() if d.is_dir() and (m := _FOLD.match(d.name))
                        and (d / ckpt_name).is_file()), key=_fold_sort_key)
        numbered = tuple(f for f in found if f != "all")
        wanted = numbered or tuple(found)
    if not wanted:
        raise WeightsError(f"{root}: no fold_N/{ckpt_name} found. Copy the fold folders with their checkpoints, "
                           "or name another checkpoint (e.g. fold_0/checkpoint_best.pth).")
    sums = _checksums(root)
    weights = []
    for fold in wanted:
        file = root / f"fold_{fold}" / ckpt_name
        if not file.is_file():
            raise WeightsError(f"{file}: checkpoint not found for fold {fold}. Folds with {ckpt_name}: "
                               f"{sorted(d.name for d in root.glob('fold_*') if (d / ckpt_name).is_file())}.")
        weights.append(WeightsSpec(file, sums.get(f"fold_{fold}/{ckpt_name}"), "state_dict"))
    arch = cfg.get("architecture", {})
    net_name = str(arch.get("network_class_name", cfg.get("UNet_class_name", "?"))).rsplit(".", 1)[-1]
    patch = [int(p) for p in cfg.get("patch_size", [])]
    dataset_folder = root.parent.name or str(plans.get("dataset_name", "nnunet"))
    return ModelCard(
        name=f"{dataset_folder}__{configuration}",
        version=str(dataset.get("release", plans_name)),
        description=str(dataset.get("description", "") or dataset.get("name", "") or dataset_folder),
        modality=modality,
        modality_check="warn",
        kind="nnunet",
        network=NetworkSpec(net_name, {}),
        output="softmax",
        input_channels=len(channel_names),
        channel_names=channel_names,
        labels=labels,
        preprocessing=PreprocessingSpec(orientation="RAS" if _READERS[reader] else None),  # nnU-Net does the rest
        inference=WindowSpec(patch_size=tuple(patch) if len(patch) == 3 else (0, 0, 0), overlap=0.5,  # type: ignore[arg-type]
                             blending="gaussian"),
        weights=weights[0],
        ensemble=tuple(weights),
        provenance={"nnunet": {"trainer": trainer, "plans": plans_name, "configuration": configuration,
                               "folds": list(wanted), "checkpoint": ckpt_name, "image_reader_writer": reader,
                               "spacing_mm_network_order": cfg.get("spacing"),
                               "transpose_forward": plans.get("transpose_forward")},
                    **({"licence": dataset["licence"]} if "licence" in dataset else {})},
        source=root,
        origin="user",
    )


# ---- checkpoints -----------------------------------------------------------------------------------------------
def _allowed_globals() -> list[Any]:
    """The objects of :data:`CHECKPOINT_ALLOWED_GLOBALS`, with the pickled names torch matches them by."""
    import numpy.dtypes

    core = np._core.multiarray  # type: ignore[attr-defined]
    out: list[Any] = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(core, name)
        out += [(fn, f"numpy._core.multiarray.{name}"), (fn, f"numpy.core.multiarray.{name}")]
    out += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    return out


def load_nnunet_checkpoint(path: str | Path, *, sha256: str | None = None) -> dict[str, Any]:
    """An nnU-Net checkpoint read with ``torch.load(weights_only=True)``, numpy types allow-listed.

    The sha256 is checked first when given (``SHA256SUMS`` in the result folder), else computed and logged.

    Raises
    ------
    ChecksumMismatchError
        If the file's sha256 differs from ``sha256``.
    UnsafeCheckpointError
        If it holds pickled objects beyond :data:`CHECKPOINT_ALLOWED_GLOBALS` (they could run code).
    WeightsError
        If it is not a readable checkpoint or has no ``network_weights``.
    """
    import pickle

    import torch

    from medseg.models.weights import verify_sha256

    path = Path(path)
    try:
        digest = verify_sha256(path, sha256)
    except ChecksumMismatchError as exc:
        raise ChecksumMismatchError(str(exc).replace("the model card expects", "SHA256SUMS records")) from None
    logger.info("nnU-Net checkpoint %s sha256 %s", path.name, digest)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc)) or re.findall(r"global '?([\w.]+)", str(exc))
        what = found[0] if found else "an object outside the allow-list"
        raise UnsafeCheckpointError(
            f"{path}: the checkpoint holds the pickled object {what}, which medseg refuses to load (unpickling it "
            f"could run code). Allowed beyond tensors and plain containers: {', '.join(CHECKPOINT_ALLOWED_GLOBALS)}. "
            "Re-save it with only those, e.g. torch.save({'network_weights': ckpt['network_weights'], "
            "'trainer_name': ..., 'inference_allowed_mirroring_axes': ...}, path)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({exc}).") from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("network_weights"), Mapping):
        keys = list(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise WeightsError(f"{path}: not an nnU-Net checkpoint (no 'network_weights'; found {keys}).")
    return dict(ckpt)


# ---- running ---------------------------------------------------------------------------------------------------
def _require_nnunetv2() -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "Running an nnU-Net result folder needs nnU-Net v2: pip install 'medseg[nnunet]' (with the same torch "
            "pin as medseg, e.g. pip install -c .ci/constraints.txt torch==2.13.0 'medseg[nnunet]')."
        ) from None


def _check_plans_imports(configuration_manager: Any, plans_path: Path) -> None:
    """Refuse network classes and building blocks outside dynamic_network_architectures and torch.nn."""
    name = str(configuration_manager.network_arch_class_name)
    if not name.startswith(_NETWORK_PREFIX):
        raise ModelCardError(f"{plans_path}: network_class_name {name!r} is not a class of {_NETWORK_PREFIX}*; "
                             "medseg imports nothing else named in plans.json.")
    kwargs = configuration_manager.network_arch_init_kwargs
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        value = kwargs.get(key)
        if value is not None and not str(value).startswith(_IMPORT_PREFIX):
            raise ModelCardError(f"{plans_path}: architecture kwarg {key!r} = {value!r} is not a {_IMPORT_PREFIX}* "
                                 "class; medseg imports nothing else named in plans.json.")


@dataclass(frozen=True)
class _Loaded:
    network: Any
    plans_manager: Any
    configuration_manager: Any
    parameters: list[dict[str, Any]]
    dataset_json: dict[str, Any]
    trainer_name: str
    mirror_axes: tuple[int, ...] | None
    reorient: bool


def _load(card: ModelCard) -> _Loaded:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    assert card.source is not None
    root = card.source
    info = card.provenance["nnunet"]
    dataset_json = _read_json(root / "dataset.json")
    plans_manager = PlansManager(_read_json(root / "plans.json"))
    configuration_manager = plans_manager.get_configuration(info["configuration"])
    _check_plans_imports(configuration_manager, root / "plans.json")
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    try:
        network = get_network_from_plans(
            configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=False,
            deep_supervision=False,
        )
    except (ImportError, TypeError, ValueError, KeyError) as exc:
        raise ModelCardError(f"{root / 'plans.json'}: cannot build the network of configuration "
                             f"{info['configuration']!r} ({type(exc).__name__}: {exc}).") from None
    parameters: list[dict[str, Any]] = []
    trainer_name, mirror_axes = str(info["trainer"]), None
    for i, spec in enumerate(card.ensemble or ((card.weights,) if card.weights else ())):
        ckpt = load_nnunet_checkpoint(spec.path, sha256=spec.sha256)
        state = dict(ckpt["network_weights"])
        if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
            state = {k[len("module."):]: v for k, v in state.items()}
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointMismatchError(
                f"{spec.path}: the checkpoint does not fit the network plans.json describes "
                f"({configuration_manager.network_arch_class_name}); the trainer {trainer_name!r} may build another "
                f"architecture. {str(exc).splitlines()[0][:300]}"
            ) from None
        parameters.append(state)
        if i == 0:
            trainer_name = str(ckpt.get("trainer_name", trainer_name))
            axes = ckpt.get("inference_allowed_mirroring_axes")
            mirror_axes = None if axes is None else tuple(int(a) for a in axes)
    network.load_state_dict(parameters[0])
    return _Loaded(network.eval(), plans_manager, configuration_manager, parameters, dataset_json, trainer_name,
                   mirror_axes, _READERS[str(info["image_reader_writer"])])


class NnunetRunner:
    """An nnU-Net result folder loaded once into nnU-Net's own predictor, to segment many volumes.

    Parameters
    ----------
    card : ModelCard
        A card from :func:`load_nnunet_card`.
    device : torch.device
        Where the network runs.
    tile_step_size : float
        Sliding-window step as a fraction of the patch (nnU-Net's default 0.5, i.e. overlap 0.5).
    mirroring : bool or None
        Mirroring test-time augmentation over the axes the checkpoint allows; None: nnU-Net's default (on).

    Raises
    ------
    MissingDependencyError
        If nnunetv2 is not installed.
    ModelCardError, UnsafeCheckpointError, ChecksumMismatchError, CheckpointMismatchError, WeightsError
        If the folder's plans or checkpoints cannot be used.
    """

    def __init__(self, card: ModelCard, *, device: torch.device, tile_step_size: float = 0.5,
                 mirroring: bool | None = None) -> None:
        _require_nnunetv2()
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.card = card
        loaded = _load(card)
        self._reorient = loaded.reorient
        use_mirroring = True if mirroring is None else bool(mirroring)
        with contextlib.redirect_stdout(io.StringIO()) as said:
            self.predictor = nnUNetPredictor(
                tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                allow_tqdm=False,
            )
            self.predictor.manual_initialization(
                loaded.network, loaded.plans_manager, loaded.configuration_manager, loaded.parameters,
                loaded.dataset_json, loaded.trainer_name, loaded.mirror_axes,
            )
        _log_said(said)
        self.folds = len(loaded.parameters)
        self.mirror_axes = loaded.mirror_axes if use_mirroring else None

    def segment(self, volume: Volume, *, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and optionally class probabilities) of ``volume`` on its own grid.

        Parameters
        ----------
        volume : Volume, shape (I, J, K) or (I, J, K, C)
        probabilities : bool
            Also return nnU-Net's per-class probabilities.

        Returns
        -------
        labels : ndarray, shape (I, J, K), uint8 or uint16
            Label values of ``dataset.json`` on the input grid.
        probabilities : ndarray, shape (I, J, K, classes), float32, or None
        """
        from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

        from medseg.io.convert import itk_array, volume_from_itk_array
        from medseg.resample import as_orientation, reorient_to

        work = as_orientation(volume, "RAS") if self._reorient else volume
        array, spacing = itk_array(work)
        image = (array[None] if array.ndim == 3 else array).astype(np.float32)
        pred = self.predictor
        with contextlib.redirect_stdout(io.StringIO()) as said:
            if probabilities or pred.label_manager.has_regions:  # nnU-Net's own conversion, all classes at once
                out = pred.predict_single_npy_array(image, {"spacing": list(spacing)}, None, None, probabilities)
                seg, probs = (out[0], out[1]) if probabilities else (out, None)
            else:  # the same steps as predict_single_npy_array, with a one-class-at-a-time argmax at the end
                ppa = PreprocessAdapterFromNpy([image], [None], [{"spacing": list(spacing)}], [None],
                                               pred.plans_manager, pred.dataset_json, pred.configuration_manager,
                                               num_threads_in_multithreaded=1, verbose=False)
                dct = next(ppa)
                del image
                logits = pred.predict_logits_from_preprocessed_data(dct["data"]).cpu()
                seg, probs = self._labels_from_logits(logits, dct["data_properties"]), None
        _log_said(said)
        top = max(self.card.labels or [0])
        seg = np.asarray(seg).astype(np.uint8 if top <= 255 else np.uint16, copy=False)
        labels = volume_from_itk_array(seg, work)
        prob_arr: np.ndarray | None = None
        if probs is not None:
            prob_arr = np.ascontiguousarray(np.asarray(probs, dtype=np.float32).transpose(3, 2, 1, 0))
        if work is not volume:
            back = reorient_to(labels, volume)
            assert back is not None  # a pure reorientation is exact both ways
            labels_arr = back.array
            if prob_arr is not None:
                prob_back = reorient_to(work.with_array(prob_arr), volume)
                assert prob_back is not None
                prob_arr = prob_back.array
        else:
            labels_arr = labels.array
        return np.ascontiguousarray(labels_arr), prob_arr


    def _labels_from_logits(self, logits: torch.Tensor, properties: Mapping[str, Any]) -> np.ndarray:
        """nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` for softmax models, resampling
        one class at a time (with nnU-Net's own resampling function) and keeping a running argmax.

        nnU-Net resamples every class's logits to the input grid at once (classes × voxels × 2 bytes, after a
        float64 copy of all logits); this holds two class maps at a time. Each class goes through the very same
        function and dtype conversions, and the running argmax keeps the first maximum as ``argmax(0)`` does, so
        the labels are identical.
        """
        from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

        pred = self.predictor
        pm, cm = pred.plans_manager, pred.configuration_manager
        shape = properties["shape_after_cropping_and_before_resampling"]
        spacing_t = [properties["spacing"][i] for i in pm.transpose_forward]
        current = cm.spacing if len(cm.spacing) == len(shape) else [spacing_t[0], *cm.spacing]
        best: np.ndarray | None = None
        seg: np.ndarray | None = None
        for c in range(logits.shape[0]):
            one = np.asarray(cm.resampling_fn_probabilities(logits[c:c + 1], shape, current, spacing_t))[0]
            if best is None:
                best = one
                seg = np.zeros(one.shape, dtype=np.uint8 if logits.shape[0] <= 256 else np.uint16)
                continue
            better = one > best
            seg[better] = c  # type: ignore[index]
            np.maximum(best, one, out=best)
            del one, better
        assert seg is not None
        n_fg = len(pred.label_manager.foreground_labels)
        full = np.zeros(properties["shape_before_cropping"], dtype=np.uint8 if n_fg < 255 else np.uint16)
        full = insert_crop_into_image(full, seg, properties["bbox_used_for_cropping"])
        return np.asarray(full).transpose(pm.transpose_backward)


def _log_said(buffer: io.StringIO) -> None:
    """nnU-Net prints; the library must not: pass its lines to the log at debug level."""
    for line in buffer.getvalue().splitlines():
        if line.strip():
            logger.debug("nnU-Net: %s", line)
