"""Where models come from: cards shipped in the package, user folders, and MONAI bundles.

Search order for a model *name*: each ``models_dirs`` folder in the order given, then the shipped cards in
``medseg/models/shipped/``. A model *path* may be a card (``.yaml``/``.yml``), a MONAI bundle folder in the
Model Zoo layout (``configs/metadata.json``, ``configs/inference.json|yaml|yml``, the weights its checkpoint loader
names; see :mod:`medseg.models.bundle`), or an nnU-Net v2 result folder (:mod:`medseg.models.nnunet`; also one
``fold_N`` folder or checkpoint in it). A ``models_dirs`` folder may hold nnU-Net result folders directly or in
``DatasetXXX_Name/`` folders, as nnU-Net's ``nnUNet_results`` does.

Shipped weights sit next to their card in ``medseg/models/shipped/`` (the card's ``weights.file`` is relative to
the card), so a card and its weights travel together.

Security: a bundle's config may contain Python expressions (``"$..."``) and ``_target_`` names that MONAI would run.
medseg reads bundles only from paths the user gave (a ``--models-dir`` folder or an explicit path), checks the raw
config before anything is parsed (:mod:`medseg.models.bundle_safety`), and never evaluates anything while listing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError, ModelNotFoundError
from medseg.models.cards import (
    CARD_SUFFIXES,
    ModelCard,
    load_card,
)
from medseg.models.nnunet import is_nnunet_path, load_nnunet_card
from medseg.schema import did_you_mean

__all__ = ["ModelListing", "describe_model", "find_model", "is_bundle", "list_models", "load_bundle", "shipped_dir"]

logger = logging.getLogger(__name__)

_LESION_WORDS = ("tumor", "tumour", "lesion", "cancer", "metasta", "nodule", "mass", "cyst")


def shipped_dir() -> Path:
    """Folder of the cards (and weights) shipped with medseg."""
    return Path(__file__).parent / "shipped"


def is_bundle(path: Path) -> bool:
    """True if ``path`` is a folder in the MONAI Model Zoo layout (metadata.json and inference.json|yaml|yml)."""
    from medseg.models.bundle import is_bundle as _is_bundle

    return _is_bundle(path)


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


def _load_entry(path: Path, origin: str, trust_code: bool) -> ModelCard:
    if path.is_dir() and is_nnunet_path(path):
        return load_nnunet_card(path)
    if path.is_dir():
        return load_bundle(path, trust_code=trust_code)
    return load_card(path).with_origin(origin)  # type: ignore[arg-type]


def _check_dirs(models_dirs: Sequence[str | Path]) -> list[Path]:
    dirs = []
    for d in models_dirs:
        p = Path(d)
        if not p.is_dir():
            raise ModelNotFoundError(f"{p}: --models-dir must be an existing folder of model cards or bundles.")
        dirs.append(p)
    return dirs


def list_models(*, models_dirs: Sequence[str | Path] = (), trust_code: bool = False) -> ModelListing:
    """Every model the registry can see: user folders first (in order), then shipped cards.

    Entries that fail to load are skipped and described in ``problems``. Bundles are read and checked, never
    evaluated; ``trust_code`` accepts bundles that need their own code (``--trust-bundle-code``).

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
                card = _load_entry(entry, origin, trust_code)
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


def find_model(
    name_or_path: str | Path, *, models_dirs: Sequence[str | Path] = (), trust_code: bool = False
) -> ModelCard:
    """The card for a model name, a card file or a bundle folder (``trust_code``: see :func:`list_models`).

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
                return load_bundle(p, trust_code=trust_code)
            raise ModelNotFoundError(
                f"{p}: a folder was given as the model, but it is not a MONAI bundle (no configs/metadata.json and "
                "configs/inference.json|yaml|yml) and not an nnU-Net result folder (no plans.json and dataset.json). "
                "To use a folder of model cards, pass it as --models-dir and the model by name."
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
    listing = list_models(models_dirs=models_dirs, trust_code=trust_code)
    for card in listing.cards:
        if card.name == name or (card.source is not None and card.source.stem == name):
            return card
    names = [c.name for c in listing.cards]
    hint = did_you_mean(name, names, n=3, cutoff=0.5)
    broken = f" ({len(listing.problems)} entries could not be read: {listing.problems[0]})" if listing.problems else ""
    raise ModelNotFoundError(
        f"No model named {name!r}{hint}. Known models: {', '.join(names) or 'none'}{broken}. Give a card path, a "
        "bundle folder, or --models-dir FOLDER."
    )


# ---- MONAI bundles ------------------------------------------------------------------------------------------
def load_bundle(path: str | Path, *, trust_code: bool = False) -> ModelCard:
    """A :class:`ModelCard` for a MONAI bundle folder (Model Zoo layout), read without running any of it.

    Labels and input channels come from ``configs/metadata.json`` (or the bundle's ``medseg.yaml``); the config is
    checked by :mod:`medseg.models.bundle_safety` (see :mod:`medseg.models.bundle`). Its transforms, inferer and
    network are built only when the model is loaded.

    Raises
    ------
    ModelNotFoundError
        If the folder is not a bundle.
    ModelCardError
        If the configs cannot be read; :class:`~medseg.errors.UnsafeBundleError` for code outside the allow-list
        without ``trust_code``; :class:`~medseg.errors.UnsupportedBundleError` for interactive or multi-input
        bundles.
    """
    from medseg.models.bundle import bundle_card

    card: ModelCard = bundle_card(path, trust_code=trust_code)
    return card


def describe_model(card: ModelCard) -> dict[str, Any]:
    """Everything ``medseg models show`` prints: source, licence, labels, channels, versions, the weights file and
    its sha256, and for a MONAI bundle what medseg runs of it and what it does not.

    The weights' sha256 is computed from the file. For a bundle, only its checked checkpoint path is evaluated
    (see :mod:`medseg.models.bundle_safety`); nothing else of it runs.

    Raises
    ------
    ModelCardError
        If a bundle's checkpoint path cannot be evaluated.
    """
    from medseg.models.weights import sha256_file

    info: dict[str, Any] = {} if card.kind in ("bundle", "nnunet") else card.summary()
    info.update({
        "name": card.name,
        "kind": card.kind,
        "origin": card.origin,
        "source": str(card.source) if card.source else None,
        "description": card.description,
        "licence": card.provenance.get("licence") or card.provenance.get("license"),
        "modality": list(card.modality),
        "input_channels": card.input_channels,
        "channel_names": list(card.channel_names),
        "labels": None if card.labels is None else card.labels.to_json()["labels"],
        "versions": {"model": card.version},
    })
    weights: Path | None = card.weights.path if card.weights else None
    if card.kind == "bundle" and card.bundle is not None:
        from medseg.models.bundle import bundle_weights_path

        spec = card.bundle
        weights = bundle_weights_path(spec)
        info["licence"] = spec.licence
        info["versions"].update({"monai_version (bundle)": spec.monai_version,
                                 "pytorch_version (bundle)": card.provenance.get("pytorch_version")})
        info["config"] = str(spec.config_path)
        info["labels_from"] = spec.label_source
        info["medseg_runs"] = spec.will_run()
        info["md5 (large_files.yml)"] = dict(spec.md5) or None
    if card.kind == "nnunet":
        from importlib.metadata import PackageNotFoundError, version

        nn = card.provenance.get("nnunet", {})
        try:
            info["versions"]["nnunetv2 (installed)"] = version("nnunetv2")
        except PackageNotFoundError:
            info["versions"]["nnunetv2 (installed)"] = None
        info["medseg_runs"] = (
            f"nnU-Net's own predictor in-process on the {nn.get('configuration')} configuration: its preprocessing "
            f"(reader order {nn.get('image_reader_writer')}), sliding window and mirroring as the checkpoint allows, "
            f"folds {nn.get('folds')} ({nn.get('checkpoint')}) averaged; the network built from plans.json. Not run: "
            f"the trainer class {nn.get('trainer')!r} (its code is never imported), nnU-Net's file writers."
        )
        info["nnunet"] = dict(nn)
        info["ensemble"] = [{"file": str(w.path), "sha256": sha256_file(w.path) if w.path.is_file() else None,
                             "sha256 (SHA256SUMS)": w.sha256} for w in card.ensemble]
    if weights is not None:
        info["weights"] = {"file": str(weights), "exists": weights.is_file(),
                           "sha256": sha256_file(weights) if weights.is_file() else None,
                           "sha256 (card)": card.weights.sha256 if card.weights else None}
    else:
        info["weights"] = None
    return info
