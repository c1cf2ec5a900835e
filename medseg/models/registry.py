"""Where models come from: cards shipped in the package, user folders, and MONAI bundles.

Search order for a model *name*: each ``models_dirs`` folder in the order given, then the shipped cards in
``medseg/models/shipped/``. A model *path* may be a card (``.yaml``/``.yml``), a MONAI bundle folder in the
Model Zoo layout (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt`` or ``model.ts``), or
an nnU-Net v2 result folder (:mod:`medseg.models.nnunet`; also one ``fold_N`` folder or checkpoint in it). A
``models_dirs`` folder may hold nnU-Net result folders directly or in ``DatasetXXX_Name/`` folders, as nnU-Net's
``nnUNet_results`` does.

Shipped weights sit next to their card in ``medseg/models/shipped/`` (the card's ``weights.file`` is relative to
the card), so a card and its weights travel together.

Security: a bundle's ``inference.json`` may contain Python expressions (``"$..."``) that MONAI evaluates. medseg
reads bundles only from paths the user gave (a ``--models-dir`` folder or an explicit path), never from the
package or the network.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError, ModelCardError, ModelNotFoundError
from medseg.labels import Label, LabelTable, default_color
from medseg.models.cards import (
    CARD_SUFFIXES,
    IntensitySpec,
    ModelCard,
    NetworkSpec,
    PostprocessSpec,
    PreprocessingSpec,
    WeightsSpec,
    WindowSpec,
    load_card,
)
from medseg.models.nnunet import is_nnunet_path, load_nnunet_card

__all__ = ["ModelListing", "find_model", "is_bundle", "list_models", "load_bundle", "shipped_dir"]

logger = logging.getLogger(__name__)

_LESION_WORDS = ("tumor", "tumour", "lesion", "cancer", "metasta", "nodule", "mass", "cyst")


def shipped_dir() -> Path:
    """Folder of the cards (and weights) shipped with medseg."""
    return Path(__file__).parent / "shipped"


def is_bundle(path: Path) -> bool:
    """True if ``path`` is a folder in the MONAI Model Zoo layout."""
    return (path / "configs" / "metadata.json").is_file() and (path / "configs" / "inference.json").is_file()


@dataclass(frozen=True)
class ModelListing:
    """Result of scanning the registry: usable cards, and one line per entry that could not be read."""

    cards: tuple[ModelCard, ...]
    problems: tuple[str, ...] = field(default_factory=tuple)


def _entries(folder: Path) -> Iterable[Path]:
    if is_bundle(folder) or is_nnunet_path(folder):
        yield folder
        return
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in CARD_SUFFIXES or p.is_dir() and (is_bundle(p) or is_nnunet_path(p)):
            yield p
        elif p.is_dir() and p.name.startswith("Dataset"):  # nnUNet_results/DatasetXXX_Name/Trainer__Plans__Config
            yield from (q for q in sorted(p.iterdir()) if q.is_dir() and is_nnunet_path(q))


def _load_entry(path: Path, origin: str) -> ModelCard:
    if path.is_dir() and is_nnunet_path(path):
        return load_nnunet_card(path)
    if path.is_dir():
        return load_bundle(path)
    return load_card(path).with_origin(origin)  # type: ignore[arg-type]


def _check_dirs(models_dirs: Sequence[str | Path]) -> list[Path]:
    dirs = []
    for d in models_dirs:
        p = Path(d)
        if not p.is_dir():
            raise ModelNotFoundError(f"{p}: --models-dir must be an existing folder of model cards or bundles.")
        dirs.append(p)
    return dirs


def list_models(*, models_dirs: Sequence[str | Path] = ()) -> ModelListing:
    """Every model the registry can see: user folders first (in order), then shipped cards.

    Entries that fail to load are skipped and described in ``problems``.

    Raises
    ------
    ModelNotFoundError
        If a ``models_dirs`` entry is not a folder.
    """
    cards: list[ModelCard] = []
    problems: list[str] = []
    seen: set[str] = set()
    sources = [(d, "user") for d in _check_dirs(models_dirs)] + [(shipped_dir(), "shipped")]
    for folder, origin in sources:
        for entry in _entries(folder):
            try:
                card = _load_entry(entry, origin)
            except MedsegError as exc:
                problems.append(f"{entry}: {exc}")
                logger.warning("skipping model %s: %s", entry, exc)
                continue
            if card.name in seen:
                problems.append(f"{entry}: model name {card.name!r} already found earlier in the search order")
                continue
            seen.add(card.name)
            cards.append(card)
    return ModelListing(tuple(cards), tuple(problems))


def find_model(name_or_path: str | Path, *, models_dirs: Sequence[str | Path] = ()) -> ModelCard:
    """The card for a model name, a card file or a bundle folder.

    Raises
    ------
    ModelNotFoundError
        If nothing matches; the message suggests close names and lists what there is.
    ModelCardError
        If the matching card or bundle is invalid.
    """
    p = Path(name_or_path)
    looks_like_path = p.suffix.lower() in CARD_SUFFIXES or p.is_dir() or p.is_file() or len(p.parts) > 1
    if looks_like_path:
        if is_nnunet_path(p):
            return load_nnunet_card(p)
        if p.is_dir():
            if is_bundle(p):
                return load_bundle(p)
            raise ModelNotFoundError(
                f"{p}: a folder was given as the model, but it is not a MONAI bundle (no configs/metadata.json and "
                "configs/inference.json) and not an nnU-Net result folder (no plans.json and dataset.json). To use a "
                "folder of model cards, pass it as --models-dir and the model by name."
            )
        if p.is_file():
            if p.suffix.lower() in CARD_SUFFIXES:
                return load_card(p).with_origin("user")
            raise ModelNotFoundError(
                f"{p}: not a model card. A weights file alone does not say which labels and preprocessing to use; "
                "write a model card (.yaml) that names it under 'weights.file'."
            )
        raise ModelNotFoundError(f"{p}: no such model card or bundle folder.")
    name = str(name_or_path)
    listing = list_models(models_dirs=models_dirs)
    for card in listing.cards:
        if card.name == name or (card.source is not None and card.source.stem == name):
            return card
    names = [c.name for c in listing.cards]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    broken = f" ({len(listing.problems)} entries could not be read: {listing.problems[0]})" if listing.problems else ""
    raise ModelNotFoundError(
        f"No model named {name!r}.{hint} Known models: {', '.join(names) or 'none'}{broken}. Give a card path, a "
        "bundle folder, or --models-dir FOLDER."
    )


# ---- MONAI bundles ------------------------------------------------------------------------------------------
_SUPPORTED_PRE = (
    "LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "EnsureTyped", "EnsureType",
    "ToTensord", "CastToTyped", "Orientationd", "Orientation", "Spacingd", "Spacing", "ScaleIntensityRanged",
    "ScaleIntensityRange", "ScaleIntensityRangePercentilesd", "NormalizeIntensityd", "NormalizeIntensity",
)
_IGNORED_POST = (
    "Activationsd", "Invertd", "AsDiscreted", "SaveImaged", "EnsureTyped", "CopyItemsd", "KeepLargestConnectedComponentd",
    "Lambdad", "ToDeviced", "CastToTyped", "SqueezeDimd",
)


def _target(item: Any) -> str:
    return str(item.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(item, Mapping) else ""


def _transforms(parser: Any, key: str) -> list[tuple[str, str]]:
    """(target class name, config id) of each transform of a Compose at ``key``."""
    raw = parser.get(key)
    if raw is None:
        return []
    if isinstance(raw, Mapping) and "transforms" in raw:
        items, prefix = raw["transforms"], f"{key}#transforms"
    elif isinstance(raw, list):
        items, prefix = raw, key
    else:
        return []
    if isinstance(items, str):  # a reference like "@preprocessing_transforms"
        ref = items.lstrip("@").strip()
        return _transforms(parser, ref)
    return [(_target(item), f"{prefix}#{i}") for i, item in enumerate(items)]


def _arg(parser: Any, cid: str, name: str, default: Any) -> Any:
    raw = parser.get(cid)
    if not isinstance(raw, Mapping) or name not in raw:
        return default
    value = parser.get_parsed_content(f"{cid}#{name}")
    if hasattr(value, "tolist"):
        value = value.tolist()
    return value


def load_bundle(path: str | Path) -> ModelCard:
    """A :class:`ModelCard` for a MONAI bundle folder (Model Zoo layout).

    Labels and channel names come from ``configs/metadata.json`` (``network_data_format``); orientation, spacing,
    intensity and the sliding-window settings are read from the ``preprocessing`` and ``inferer`` sections of
    ``configs/inference.json`` (MONAI evaluates their expressions: load only bundles you trust). The network is
    built from ``network_def`` when the model is loaded.

    Raises
    ------
    ModelNotFoundError
        If the folder is not a bundle.
    ModelCardError
        If the configs cannot be read or use preprocessing medseg cannot reproduce (the message lists the
        supported transforms).
    """
    root = Path(path).resolve()
    if not is_bundle(root):
        raise ModelNotFoundError(f"{root}: not a MONAI bundle (needs configs/metadata.json and configs/inference.json).")
    try:
        meta = json.loads((root / "configs" / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{root / 'configs' / 'metadata.json'}: cannot read bundle metadata ({exc}).") from None
    src = root / "configs" / "metadata.json"
    fmt = meta.get("network_data_format", {}) if isinstance(meta, Mapping) else {}
    inputs = fmt.get("inputs", {}) or {}
    outputs = fmt.get("outputs", {}) or {}
    if not inputs or not outputs:
        raise ModelCardError(f"{src}: 'network_data_format' needs 'inputs' and 'outputs' (channel_def, num_channels).")
    image_in = next(iter(inputs.values()))
    pred = next(iter(outputs.values()))
    channel_def = pred.get("channel_def") or {}
    try:
        channels = {int(k): str(v) for k, v in channel_def.items()}
    except (TypeError, ValueError, AttributeError):
        raise ModelCardError(f"{src}: outputs channel_def must map channel numbers to names, got {channel_def!r}.") from None
    n_out = int(pred.get("num_channels", len(channels)))
    if not channels:
        channels = {c: ("background" if c == 0 else f"class_{c}") for c in range(n_out)}
    labels = LabelTable(
        Label(c, name, default_color(c), "lesion" if any(w in name.lower() for w in _LESION_WORDS) else "organ")
        for c, name in sorted(channels.items())
        if c != 0
    )
    modality = str(image_in.get("modality", "") or "").upper()
    modality = {"MRI": "MR"}.get(modality, modality)
    in_channels = int(image_in.get("num_channels", 1))
    in_names = image_in.get("channel_def") or {}

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    cfg_path = root / "configs" / "inference.json"
    try:
        parser.read_config(str(cfg_path))
        parser["bundle_root"] = str(root)
    except Exception as exc:  # noqa: BLE001 - any config parse failure is the bundle's problem
        raise ModelCardError(f"{cfg_path}: cannot read the bundle config ({type(exc).__name__}: {exc}).") from None
    if parser.get("network_def") is None:
        raise ModelCardError(f"{cfg_path}: no 'network_def' section; medseg builds the network from it.")
    orientation: str | None = None
    spacing: tuple[float, float, float] | None = None
    intensity = IntensitySpec()
    try:
        for name, cid in _transforms(parser, "preprocessing"):
            if name not in _SUPPORTED_PRE:
                raise ModelCardError(
                    f"{cfg_path}: preprocessing transform {name!r} is not one medseg reproduces. Supported: "
                    f"{', '.join(_SUPPORTED_PRE)}. Run this bundle with `python -m monai.bundle run` instead."
                )
            if name.startswith("Orientation"):
                orientation = str(_arg(parser, cid, "axcodes", "RAS"))
            elif name.startswith("Spacing"):
                pix = _arg(parser, cid, "pixdim", None)
                spacing = tuple(float(v) for v in pix) if pix is not None else None  # type: ignore[assignment]
            elif name.startswith("ScaleIntensityRangePercentiles"):
                intensity = IntensitySpec(
                    kind="percentile", lower=float(_arg(parser, cid, "lower", 0.5)),
                    upper=float(_arg(parser, cid, "upper", 99.5)), b_min=float(_arg(parser, cid, "b_min", 0.0)),
                    b_max=float(_arg(parser, cid, "b_max", 1.0)), clip=bool(_arg(parser, cid, "clip", False)),
                )
            elif name.startswith("ScaleIntensityRange"):
                intensity = IntensitySpec(
                    kind="ct_window", a_min=float(_arg(parser, cid, "a_min", 0.0)),
                    a_max=float(_arg(parser, cid, "a_max", 1.0)), b_min=float(_arg(parser, cid, "b_min", 0.0)),
                    b_max=float(_arg(parser, cid, "b_max", 1.0)), clip=bool(_arg(parser, cid, "clip", False)),
                )
            elif name.startswith("NormalizeIntensity"):
                intensity = IntensitySpec(kind="zscore", nonzero=bool(_arg(parser, cid, "nonzero", False)))
        inferer = parser.get("inferer") or {}
        window = WindowSpec()
        if inferer:
            roi = _arg(parser, "inferer", "roi_size", list(window.patch_size))
            roi = [int(roi)] * 3 if isinstance(roi, (int, float)) else [int(v) for v in roi]
            window = WindowSpec(
                patch_size=tuple(roi),  # type: ignore[arg-type]
                overlap=float(_arg(parser, "inferer", "overlap", 0.25)),
                blending=str(_arg(parser, "inferer", "mode", "constant")),  # type: ignore[arg-type]
                sw_batch_size=int(_arg(parser, "inferer", "sw_batch_size", 1)),
            )
        output = "softmax"
        largest = False
        for name, cid in _transforms(parser, "postprocessing"):
            if name == "Activationsd" and bool(_arg(parser, cid, "sigmoid", False)):
                output = "sigmoid"
            if name == "KeepLargestConnectedComponentd":
                largest = True
    except ModelCardError:
        raise
    except Exception as exc:  # noqa: BLE001 - expressions in the bundle config may fail in many ways
        raise ModelCardError(f"{cfg_path}: cannot evaluate the bundle config ({type(exc).__name__}: {exc}).") from None
    if output == "sigmoid":  # every channel is a class, none is background
        labels = LabelTable(
            Label(c + 1, name, default_color(c + 1), "organ") for c, name in sorted(channels.items())
        )
    weights: WeightsSpec | None = None
    for candidate, fmt_name in (("model.pt", "auto"), ("model.ts", "torchscript")):
        if (root / "models" / candidate).is_file():
            weights = WeightsSpec(root / "models" / candidate, None, fmt_name)  # type: ignore[arg-type]
            break
    if weights is None:
        raise ModelCardError(f"{root}: bundle has no models/model.pt or models/model.ts weights.")
    return ModelCard(
        name=root.name,
        version=str(meta.get("version", "0")),
        description=str(meta.get("name", "") or meta.get("description", "")),
        modality=(modality,) if modality else (),
        modality_check="warn",
        kind="bundle",
        network=NetworkSpec(str(parser.get("network_def", {}).get("_target_", "?")).rsplit(".", 1)[-1], {}),
        output=output,  # type: ignore[arg-type]
        input_channels=in_channels,
        channel_names=tuple(str(v) for _, v in sorted(in_names.items())),
        labels=labels,
        preprocessing=PreprocessingSpec(orientation=orientation, spacing_mm=spacing, intensity=intensity),
        inference=window,
        postprocessing=PostprocessSpec(largest_component=largest),
        weights=weights,
        provenance={k: meta[k] for k in ("authors", "copyright", "data_source", "intended_use", "performance")
                    if k in meta},
        source=root,
        origin="bundle",
    )


def build_bundle_network(card: ModelCard) -> Any:
    """The network of a bundle card, built by MONAI's ConfigParser from ``network_def``.

    Raises
    ------
    ModelCardError
        If the bundle's network cannot be instantiated.
    """
    from monai.bundle import ConfigParser

    assert card.source is not None
    cfg_path = card.source / "configs" / "inference.json"
    parser = ConfigParser()
    try:
        parser.read_config(str(cfg_path))
        parser["bundle_root"] = str(card.source)
        net = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as exc:  # noqa: BLE001 - bundle code can fail in many ways
        raise ModelCardError(f"{cfg_path}: cannot build 'network_def' ({type(exc).__name__}: {exc}).") from None
    return net.eval()
