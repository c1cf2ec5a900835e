"""MONAI Model Zoo bundles as medseg models: read them without running them, then build their own components.

A bundle folder holds ``configs/metadata.json``, ``configs/inference.json`` (or ``.yaml`` / ``.yml``) and the
weights its checkpoint loader names (``models/model.pt``, ``models/model_lowres.pt``, ...), optionally
``large_files.yml`` with md5 hashes and a ``scripts/`` package.

Reading (:func:`read_bundle`, used by ``medseg models list`` and ``show``) parses JSON/YAML and the metadata only:
no expression is evaluated and no component is built. The config is checked by
:mod:`medseg.models.bundle_safety` at the same time, so an unsafe bundle is refused before anything of it runs.

Building (:func:`build_bundle`, when a model is loaded) hands only the checked sections to MONAI's
``ConfigParser`` and instantiates, once: the network (``network_def``), the preprocessing ``Compose``, the
inferer, the postprocessing ``Compose``, the checkpoint path and the evaluator's ``amp``. ``LoadImage[d]`` and
``SaveImage[d]`` are replaced by ``Identityd`` (medseg feeds the scan and writes the result itself); datasets,
data loaders, evaluators and handlers are never built.

Version drift: ``SwinUNETR(img_size=...)`` (removed in MONAI 1.5) is dropped with a warning, and a SwinUNETR
bundle whose ``monai_version`` is before 1.5 gets the patch-merging order of MONAI ≤ 1.4
(:class:`PatchMergingV14`), without which its weights load but compute other numbers. The DiNTS architecture
file (``torch.load`` in the config) loads weights-only with numpy's array types allow-listed.

Labels and input channel names come from ``metadata.json``; a file ``medseg.yaml`` in the bundle folder
overrides them (metadata is sometimes wrong)::

    labels: {1: necrosis, 2: edema, 4: enhancing tumour}
    channel_names: [T1c, T1, T2, FLAIR]
    modality: MR
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import (
    ModelCardError,
    ModelNotFoundError,
    UnsafeBundleError,
    UnsupportedBundleError,
    WeightsError,
)
from medseg.labels import Label, LabelTable, default_color
from medseg.models.bundle_safety import REPLACED_TRANSFORMS, SafeConfig, select_config, split_id

__all__ = [
    "OVERRIDE_FILE",
    "BuiltBundle",
    "BundleSpec",
    "PatchMergingV14",
    "build_bundle",
    "bundle_card",
    "bundle_config_path",
    "bundle_parser",
    "bundle_weights_path",
    "check_md5",
    "is_bundle",
    "read_bundle",
]

logger = logging.getLogger(__name__)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
OVERRIDE_FILE = "medseg.yaml"
_LESION_WORDS = ("tumor", "tumour", "lesion", "cancer", "metasta", "nodule", "mass", "cyst", "enhancing", "necro",
                 "edema", "oedema")
_INTERACTIVE_WORDS = ("guidance", "click", "interaction", "point", "prompt", "deepedit", "discrepancy")
_INFERERS = ("SlidingWindowInferer", "SlidingWindowInfererAdapt", "SimpleInferer")
_NET_KEY = "network_def"
_LOAD_KEY = "medseg_load_path"
_AMP_KEY = "medseg_amp"
_MERGING_KEY = "medseg_patch_merging"


def bundle_config_path(root: Path) -> Path | None:
    """``configs/inference.json`` (or ``.yaml`` / ``.yml``) of a bundle folder, or None."""
    for name in CONFIG_NAMES:
        p = root / "configs" / name
        if p.is_file():
            return p
    return None


def is_bundle(path: Path) -> bool:
    """True if ``path`` is a folder in the MONAI Model Zoo layout (metadata.json and an inference config)."""
    return path.is_dir() and (path / "configs" / "metadata.json").is_file() and bundle_config_path(path) is not None


def _read_structured(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # json and yaml errors are ValueErrors
        raise ModelCardError(f"{path}: cannot read it as {path.suffix[1:].upper()} ({exc}).") from None
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError is not a ValueError
        raise ModelCardError(f"{path}: cannot read it as YAML ({type(exc).__name__}: {exc}).") from None


def _target_name(item: Any) -> str:
    t = item.get("_target_", "") if isinstance(item, Mapping) else ""
    return str(t).rsplit(".", 1)[-1] if isinstance(t, str) else ""


def _walk_components(value: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        if "_target_" in value:
            yield value
        for v in value.values():
            yield from _walk_components(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_components(v)


def _ref_key(value: Any) -> str | None:
    """The top-level key of a plain ``"@key"`` reference."""
    if isinstance(value, str) and value.startswith("@"):
        parts = split_id(value[1:])
        return parts[0] if len(parts) == 1 else None
    return None


def _static_transforms(raw: Mapping[str, Any], key: str, depth: int = 0) -> list[str]:
    """Class names of a Compose's transforms read statically (literal lists, ``@ref`` and ``$@a + @b``)."""
    if depth > 8 or key not in raw:
        return []
    return _static_list(raw, raw[key], depth)


def _static_list(raw: Mapping[str, Any], value: Any, depth: int) -> list[str]:
    import re

    if isinstance(value, Mapping):
        if _target_name(value) == "Compose":
            return _static_list(raw, value.get("transforms", []), depth + 1)
        return [_target_name(value)] if "_target_" in value else []
    if isinstance(value, list):
        return [n for v in value for n in _static_list(raw, v, depth + 1)]
    if isinstance(value, str) and value.startswith(("@", "$")):
        out: list[str] = []
        for ref in re.findall(r"@([\w#:]+)", value):
            node: Any = raw
            for part in split_id(ref):
                node = node[int(part)] if isinstance(node, list) and part.isdigit() else (
                    node.get(part) if isinstance(node, Mapping) else None)
            out += _static_list(raw, node, depth + 1)
        return out
    return []


@dataclass(frozen=True)
class BundleSpec:
    """What medseg knows about a bundle without running any of it.

    Attributes
    ----------
    root : Path
    config_path : Path
        ``configs/inference.json|yaml|yml``.
    safe : SafeConfig
        The checked sections medseg will hand to MONAI's ConfigParser.
    preprocessing_key, postprocessing_key, inferer_key : str
        Top-level keys of those sections (found through the evaluator and dataset when they reference them).
    preprocessing, postprocessing : tuple of str
        Transform class names, as far as they can be read without evaluating (for ``models show``).
    inferer, network : str
        Class names.
    weights_raw : Any
        The checkpoint loader's ``load_path`` as written (evaluated when the model is built).
    md5 : mapping of str to str
        ``large_files.yml`` md5 hashes by relative path (empty hashes left out).
    monai_version : str or None
        ``metadata.json``'s ``monai_version``.
    licence : str or None
        ``metadata.json``'s licence / copyright lines, and LICENSE file name if there is one.
    trust_code : bool
        Built with ``--trust-bundle-code``.
    scripts_module : str or None
        Module name the bundle's ``scripts/`` package is imported under (only with ``trust_code``).
    label_source : str
        Where the label names come from ("metadata channel_def", "medseg.yaml", "label values").
    notes : tuple of str
        Version drift and other adjustments medseg makes.
    """

    root: Path
    config_path: Path
    safe: SafeConfig
    preprocessing_key: str
    postprocessing_key: str
    inferer_key: str | None
    preprocessing: tuple[str, ...]
    postprocessing: tuple[str, ...]
    inferer: str
    network: str
    weights_raw: Any
    md5: Mapping[str, str] = field(default_factory=dict)
    monai_version: str | None = None
    licence: str | None = None
    trust_code: bool = False
    scripts_module: str | None = None
    label_source: str = "metadata channel_def"
    notes: tuple[str, ...] = ()

    def will_run(self) -> dict[str, Any]:
        """What medseg runs of the bundle and what it does not (``medseg models show``)."""
        runs = [f"{self.preprocessing_key}: " + ", ".join(
            n for n in self.preprocessing if n not in REPLACED_TRANSFORMS) + " (the bundle's own transforms)"]
        runs.append(f"{self.inferer_key or 'inferer'}: {self.inferer} with every parameter of the bundle, on "
                    "medseg's sliding window")
        post = list(self.postprocessing)
        if "Invertd" in post:
            i = post.index("Invertd")
            runs.append("postprocessing before Invertd: " + (", ".join(post[:i]) or "none"))
            runs.append("Invertd: replaced by medseg's slab-by-slab exact inversion (MONAI's semantics)")
            runs.append("postprocessing after Invertd: " + (", ".join(
                n for n in post[i + 1:] if n not in REPLACED_TRANSFORMS) or "none"))
        else:
            runs.append("postprocessing: " + (", ".join(n for n in post if n not in REPLACED_TRANSFORMS) or "none")
                        + "; then back to the input grid")
        skipped = [f"{n} (medseg reads the scan and writes the result)" for n in
                   dict.fromkeys(n for n in (*self.preprocessing, *self.postprocessing) if n in REPLACED_TRANSFORMS)]
        skipped.append("config keys never parsed: " + (", ".join(self.safe.ignored) or "none"))
        return {"runs": runs, "does_not_run": skipped, "adjustments": list(self.notes)}


def _override(root: Path) -> dict[str, Any]:
    """The user's ``medseg.yaml`` beside the bundle's configs (labels, channel names, modality), checked."""
    from medseg.schema import SchemaReader

    path = root / OVERRIDE_FILE
    if not path.is_file():
        return {}
    r = SchemaReader(str(path), ModelCardError)
    data = r.mapping(_read_structured(path), "the file", ("labels", "channel_names", "modality"))
    out: dict[str, Any] = {}
    if "labels" in data:
        labels = r.mapping(data["labels"], "labels")
        try:
            out["labels"] = {int(k): r.string(labels, k, "labels.") for k in labels}
        except (TypeError, ValueError):
            raise r.fail("labels", "label values mapped to names, e.g. {1: liver}", data["labels"]) from None
    if "channel_names" in data:
        names = data["channel_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise r.fail("channel_names", "a list of names, e.g. [T1c, T1, T2, FLAIR]", names)
        out["channel_names"] = tuple(names)
    if "modality" in data:
        out["modality"] = r.string(data, "modality", "").upper()
    return out


def _md5s(root: Path) -> dict[str, str]:
    path = root / "large_files.yml"
    if not path.is_file():
        path = root / "large_files.yaml"
    if not path.is_file():
        return {}
    data = _read_structured(path)
    out: dict[str, str] = {}
    items = data.get("large_files", []) if isinstance(data, Mapping) else []
    for item in items or []:
        if isinstance(item, Mapping) and item.get("path") and item.get("hash_val") and \
                str(item.get("hash_type", "md5")).lower() == "md5":
            out[str(Path(str(item["path"])))] = str(item["hash_val"]).lower()
    return out


def scripts_module_name(root: Path) -> str:
    """The module name a bundle's ``scripts/`` package is imported under (one per bundle folder)."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return f"medseg_bundle_{digest}_scripts"


def _uses_scripts(raw: Any) -> bool:
    import re

    if isinstance(raw, Mapping):
        return any(_uses_scripts(v) for v in raw.values())
    if isinstance(raw, list):
        return any(_uses_scripts(v) for v in raw)
    return isinstance(raw, str) and bool(re.search(r"(^|[^\w.])scripts\.", raw))


def read_bundle(path: str | Path, *, trust_code: bool = False) -> tuple[BundleSpec, dict[str, Any], Any]:
    """Read and check a bundle folder without evaluating anything.

    Returns
    -------
    spec : BundleSpec
    meta : dict
        ``metadata.json``.
    override : dict
        ``medseg.yaml`` contents (labels, channel_names, modality), empty if absent.

    Raises
    ------
    ModelNotFoundError
        If the folder is not a bundle.
    ModelCardError
        If a config cannot be read.
    UnsafeBundleError
        If the config holds code outside the allow-list (or needs ``scripts/`` without ``trust_code``).
    UnsupportedBundleError
        For interactive/prompted or multi-input bundles and inferers medseg does not reproduce.
    """
    root = Path(path).resolve()
    cfg_path = bundle_config_path(root)
    if cfg_path is None or not (root / "configs" / "metadata.json").is_file():
        raise ModelNotFoundError(f"{root}: not a MONAI bundle (needs configs/metadata.json and configs/"
                                 f"{'|'.join(CONFIG_NAMES)}).")
    meta = _read_structured(root / "configs" / "metadata.json")
    raw = _read_structured(cfg_path)
    if not isinstance(meta, Mapping) or not isinstance(raw, Mapping):
        raise ModelCardError(f"{root}: metadata.json and {cfg_path.name} must each hold a mapping.")
    src = str(cfg_path)
    if _NET_KEY not in raw:
        raise ModelCardError(f"{cfg_path}: no 'network_def' section; medseg builds the network from it.")
    inputs = (meta.get("network_data_format") or {}).get("inputs") or {}
    if isinstance(inputs, Mapping) and len(inputs) > 1:
        raise UnsupportedBundleError(
            f"{root}: the bundle takes {len(inputs)} inputs ({', '.join(map(str, inputs))}); medseg runs bundles "
            "whose only input is the image (several scans go in as channels of that one input). Run this bundle "
            "with `python -m monai.bundle run`."
        )
    evaluator: Mapping[str, Any] = raw["evaluator"] if isinstance(raw.get("evaluator"), Mapping) else {}
    dataset: Mapping[str, Any] = raw["dataset"] if isinstance(raw.get("dataset"), Mapping) else {}
    pre_key = _ref_key(dataset.get("transform")) or "preprocessing"
    post_key = _ref_key(evaluator.get("postprocessing")) or "postprocessing"
    inferer_key = _ref_key(evaluator.get("inferer")) or ("inferer" if "inferer" in raw else None)
    for key, what in ((pre_key, "preprocessing"), (post_key, "postprocessing")):
        if key not in raw:
            raise ModelCardError(f"{cfg_path}: no '{key}' section ({what} transforms); medseg runs the bundle's own "
                                 f"{what}.")
    pre_names = tuple(_static_transforms(raw, pre_key))
    post_names = tuple(_static_transforms(raw, post_key))
    inferer = _target_name(raw.get(inferer_key)) if inferer_key else "SimpleInferer"
    network = _target_name(raw[_NET_KEY])
    interactive = [n for n in (*pre_names, *post_names, inferer, network)
                   if any(w in n.lower() for w in _INTERACTIVE_WORDS) or "vista" in n.lower()]
    if interactive:
        raise UnsupportedBundleError(
            f"{root}: an interactive or prompted bundle ({', '.join(dict.fromkeys(interactive))}): it needs clicks, "
            "points or label prompts that a segmentation run does not give. Use it in MONAI Label or through "
            "`python -m monai.bundle run`."
        )
    if inferer not in _INFERERS:
        raise UnsupportedBundleError(
            f"{cfg_path}: inferer {inferer or '(computed)'!r} is not one medseg runs (it runs {', '.join(_INFERERS)})."
        )
    loaders = [c for c in _walk_components(raw) if _target_name(c) == "CheckpointLoader"]
    weights_raw = loaders[0].get("load_path") if loaders else None
    uses_scripts = _uses_scripts({k: raw[k] for k in raw if k != "imports"})
    scripts_module = None
    rewrite: dict[str, str] = {}
    if uses_scripts and not trust_code:
        # Checked below as well (a scripts.* target is outside the allow-list); say why first when it is scripts/.
        pass
    if trust_code and (root / "scripts" / "__init__.py").is_file():
        scripts_module = scripts_module_name(root)
        rewrite = {"scripts.": scripts_module + "."}
    checked = dict(raw)
    checked[_LOAD_KEY] = weights_raw
    checked[_AMP_KEY] = evaluator.get("amp", False)
    roots = [_NET_KEY, pre_key, post_key, _LOAD_KEY, _AMP_KEY] + ([inferer_key] if inferer_key else [])
    try:
        safe = select_config(checked, roots, source=src, trust_code=trust_code, rewrite_targets=rewrite)
    except UnsafeBundleError as exc:
        if uses_scripts and not trust_code:
            raise UnsafeBundleError(f"{exc} The bundle uses its own scripts/ package: medseg imports it only with "
                                    "--trust-bundle-code.") from None
        raise
    ignored = tuple(k for k in safe.ignored if k not in (_LOAD_KEY, _AMP_KEY))
    safe = SafeConfig(safe.config, safe.keys, ignored)
    override = _override(root)
    version = meta.get("monai_version")
    lic = [str(meta[k]) for k in ("license", "licence", "copyright") if meta.get(k)]
    lic += [p.name for p in sorted(root.glob("LICEN[CS]E*")) if p.is_file()]
    lic += [f"docs/{p.name}" for p in sorted((root / "docs").glob("*LICEN[CS]E*")) if p.is_file()]
    notes: list[str] = []
    net_cfg = raw[_NET_KEY] if isinstance(raw[_NET_KEY], Mapping) else {}
    if network == "SwinUNETR":
        if "img_size" in net_cfg:
            notes.append("SwinUNETR img_size dropped (removed in MONAI 1.5; it never changed the weights)")
        if _before_15(version) and net_cfg.get("downsample", "merging") == "merging":
            notes.append(f"SwinUNETR patch merging in MONAI <= 1.4 order (bundle written for MONAI {version})")
    spec = BundleSpec(
        root=root, config_path=cfg_path, safe=safe, preprocessing_key=pre_key, postprocessing_key=post_key,
        inferer_key=inferer_key, preprocessing=pre_names, postprocessing=post_names, inferer=inferer,
        network=network, weights_raw=weights_raw, md5=_md5s(root), monai_version=None if version is None else
        str(version), licence="; ".join(lic) or None, trust_code=trust_code, scripts_module=scripts_module,
        label_source="medseg.yaml" if "labels" in override else "metadata channel_def", notes=tuple(notes),
    )
    return spec, dict(meta), override


def _before_15(version: Any) -> bool:
    if version is None:
        return False
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(version)) < Version("1.5")
    except InvalidVersion:
        return False


def bundle_card(path: str | Path, *, trust_code: bool = False) -> Any:
    """A :class:`~medseg.models.cards.ModelCard` for a bundle, read without evaluating anything.

    Raises
    ------
    ModelNotFoundError, ModelCardError, UnsafeBundleError, UnsupportedBundleError
        See :func:`read_bundle`.
    """
    from medseg.models.cards import ModelCard, NetworkSpec, PreprocessingSpec, WeightsSpec

    spec, meta, override = read_bundle(path, trust_code=trust_code)
    fmt = meta.get("network_data_format") or {}
    inputs = fmt.get("inputs") or {}
    outputs = fmt.get("outputs") or {}
    image_in: Mapping[str, Any] = next(iter(inputs.values()), {}) if isinstance(inputs, Mapping) else {}
    pred: Mapping[str, Any] = next(iter(outputs.values()), {}) if isinstance(outputs, Mapping) else {}
    src = spec.root / "configs" / "metadata.json"
    sigmoid = "sigmoid" in json.dumps([c for c in _walk_components(spec.safe.config.get(spec.postprocessing_key))
                                       if _target_name(c) == "Activationsd"])
    if "labels" in override:
        names = dict(override["labels"])
    elif sigmoid:
        # channel_def of a sigmoid bundle names channels, not the label values its postprocessing writes.
        names = {}
        spec = _replace(spec, label_source="label values (the metadata names sigmoid channels, not labels; "
                                           f"name them in {OVERRIDE_FILE})")
    else:
        try:
            names = {int(k): str(v) for k, v in (pred.get("channel_def") or {}).items()}
        except (TypeError, ValueError, AttributeError):
            raise ModelCardError(f"{src}: outputs channel_def must map channel numbers to names.") from None
        if not names:
            n_out = int(pred.get("num_channels", 0) or 0)
            names = {c: f"class_{c}" for c in range(1, n_out)}
            spec = _replace(spec, label_source=f"numbered (no channel_def; name them in {OVERRIDE_FILE})")
    labels = LabelTable(
        Label(v, n, default_color(v), "lesion" if any(w in n.lower() for w in _LESION_WORDS) else "organ")
        for v, n in sorted(names.items()) if v != 0
    ) if names else None
    modality = override.get("modality") or str(image_in.get("modality", "") or "").upper()
    modality = {"MRI": "MR", "NONE": ""}.get(modality, modality)
    in_channels = int(image_in.get("num_channels", 1) or 1)
    in_names = override.get("channel_names") or tuple(
        str(v) for _, v in sorted((image_in.get("channel_def") or {}).items(), key=lambda kv: int(kv[0])))
    if len(in_names) != in_channels:
        in_names = in_names if in_channels == 1 and not in_names else tuple(in_names)[:in_channels]
    provenance: dict[str, Any] = {k: meta[k] for k in ("authors", "copyright", "data_source", "intended_use", "performance",
                                      "monai_version", "pytorch_version", "license") if k in meta}
    return ModelCard(
        name=spec.root.name,
        version=str(meta.get("version", "0")),
        description=str(meta.get("name", "") or meta.get("description", "")),
        modality=(modality,) if modality else (),
        modality_check="warn",
        kind="bundle",
        network=NetworkSpec(spec.network, {}),
        output="sigmoid" if sigmoid else "softmax",
        input_channels=in_channels,
        channel_names=tuple(in_names) if len(in_names) == in_channels else (),
        labels=labels,
        preprocessing=PreprocessingSpec(orientation=None),
        weights=WeightsSpec(spec.root / "models" / "model.pt", None, "auto"),
        provenance=provenance,
        source=spec.root,
        origin="bundle",
        bundle=spec,
    )


def _replace(spec: BundleSpec, **changes: Any) -> BundleSpec:
    from dataclasses import replace

    return replace(spec, **changes)


# ---- building -------------------------------------------------------------------------------------------------
class PatchMergingV14:
    """Placeholder replaced by the real class on first use (keeps torch out of imports of this module)."""


def _patch_merging_v14() -> Any:
    """SwinUNETR's 3D PatchMerging as MONAI ≤ 1.4 computed it (two of the eight sub-voxels duplicated)."""
    import torch
    import torch.nn.functional as F
    from monai.networks.nets.swin_unetr import PatchMerging

    class _PatchMergingV14(PatchMerging):  # type: ignore[misc]
        """MONAI ≤ 1.4 order of the eight 2×2×2 sub-voxels: weights trained then expect these numbers."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 5:
                return super().forward(x)  # type: ignore[no-any-return]
            _, d, h, w, _ = x.shape
            if d % 2 or h % 2 or w % 2:
                x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
            order = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
            x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in order], -1)
            return self.reduction(self.norm(x))  # type: ignore[no-any-return]

    return _PatchMergingV14


@dataclass
class BuiltBundle:
    """A bundle's own components, instantiated once by MONAI's ConfigParser from the checked config.

    Attributes
    ----------
    network : torch.nn.Module
        Built from ``network_def`` (weights not yet loaded).
    preprocessing : list
        The preprocessing transforms in order (nested Compose flattened; LoadImage[d] replaced by Identityd).
    inferer : Any
        The bundle's inferer (SlidingWindowInferer, SlidingWindowInfererAdapt or SimpleInferer).
    before_invert, after_invert : list
        Postprocessing transforms before and after ``Invertd`` (all in ``before_invert`` when there is none).
    invert : Any or None
        The bundle's ``Invertd`` (its keys and ``nearest_interp`` are read; it runs only as a fallback).
    weights : Path
        The checkpoint loader's ``load_path``.
    amp : bool
        The evaluator's ``amp``.
    image_key, pred_key : str
    """

    network: Any
    preprocessing: list[Any]
    inferer: Any
    before_invert: list[Any]
    after_invert: list[Any]
    invert: Any
    weights: Path
    amp: bool
    image_key: str
    pred_key: str
    spec: BundleSpec


def _flatten(t: Any) -> list[Any]:
    from monai.transforms import Compose

    if isinstance(t, Compose):
        return [x for inner in t.transforms for x in _flatten(inner)]
    if isinstance(t, (list, tuple)):
        return [x for inner in t for x in _flatten(inner)]
    return [t]


def _replace_io(value: Any) -> Any:
    """LoadImage[d] / SaveImage[d] / WriteFileMapping[d] → Identity[d] with the same keys."""
    if isinstance(value, dict):
        name = _target_name(value)
        if name in REPLACED_TRANSFORMS:
            if name.endswith("d"):
                return {"_target_": "monai.transforms.Identityd", "keys": value.get("keys", "image"),
                        "allow_missing_keys": True}
            return {"_target_": "monai.transforms.Identity"}
        return {k: _replace_io(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_io(v) for v in value]
    return value


def _import_scripts(spec: BundleSpec) -> Any:
    """Import ``<bundle>/scripts`` as ``spec.scripts_module`` (only under ``--trust-bundle-code``)."""
    assert spec.scripts_module is not None
    if spec.scripts_module in sys.modules:
        return sys.modules[spec.scripts_module]
    init = spec.root / "scripts" / "__init__.py"
    ispec = importlib.util.spec_from_file_location(spec.scripts_module, init,
                                                   submodule_search_locations=[str(init.parent)])
    if ispec is None or ispec.loader is None:  # pragma: no cover - a file path always gives a spec
        raise ModelCardError(f"{init}: cannot import the bundle's scripts package.")
    module = importlib.util.module_from_spec(ispec)
    sys.modules[spec.scripts_module] = module
    try:
        ispec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the bundle's own code
        del sys.modules[spec.scripts_module]
        raise ModelCardError(f"{init}: the bundle's scripts package failed to import ({type(exc).__name__}: "
                             f"{exc}).") from None
    logger.warning("imported the bundle's own code %s as %s (--trust-bundle-code)", init.parent, spec.scripts_module)
    return module


def _numpy_safe_globals() -> list[Any]:
    """numpy types a weights-only torch.load needs for the DiNTS architecture file (arrays and scalars)."""
    import numpy as np

    out: list[Any] = [np.ndarray, np.dtype]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        mod = sys.modules.get(mod_name)
        if mod is None:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
        for attr in ("_reconstruct", "scalar"):
            if hasattr(mod, attr):
                out.append(getattr(mod, attr))
    out += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool", "uint8")]
    return out


class _BundleTorch:
    """``torch`` as a bundle's checked expressions see it: ``torch.load`` is the weights-only loader with numpy's
    array types allowed and always maps to the CPU (DiNTS bundles write ``map_location=torch.device('cuda')``);
    ``torch.device('cuda...')`` on a machine without CUDA gives the CPU (medseg moves the network to its own device
    afterwards). Everything else is torch's."""

    def __init__(self) -> None:
        import torch

        self._torch = torch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def load(self, f: Any, map_location: Any = None, weights_only: bool = True) -> Any:
        if not weights_only:
            raise UnsafeBundleError("torch.load(weights_only=False) in a bundle config is refused.")
        with self._torch.serialization.safe_globals(_numpy_safe_globals()):
            return self._torch.load(f, map_location="cpu", weights_only=True)

    def device(self, spec: Any = "cpu", *args: Any) -> Any:
        dev = self._torch.device(spec, *args)
        if dev.type == "cuda" and not self._torch.cuda.is_available():
            logger.info("bundle asks for %s; no CUDA here, building on the CPU", dev)
            return self._torch.device("cpu")
        return dev


def bundle_parser(config: Mapping[str, Any], *, extra_globals: Mapping[str, Any] | None = None) -> Any:
    """MONAI's ConfigParser over a checked config, its expressions seeing numpy and :class:`_BundleTorch`."""
    from monai.bundle import ConfigParser

    globals_: dict[str, Any] = {"torch": _BundleTorch(), "np": "numpy", "numpy": "numpy", **(extra_globals or {})}
    return ConfigParser(dict(config), globals=globals_)


def build_bundle(spec: BundleSpec, *, device: Any = None) -> BuiltBundle:
    """Instantiate the bundle's network, transforms and inferer from the checked config, once.

    Raises
    ------
    ModelCardError
        If MONAI cannot build a component (the message names it).
    UnsupportedBundleError
        If a component is not what medseg runs (e.g. several ``Invertd``).
    """
    import copy

    import torch

    config = _replace_io(copy.deepcopy(spec.safe.config))
    net_cfg = config[_NET_KEY]
    if spec.network == "SwinUNETR" and isinstance(net_cfg, dict):
        if "img_size" in net_cfg:
            net_cfg.pop("img_size")
            logger.warning("%s: SwinUNETR img_size dropped (removed in MONAI 1.5; the weights do not depend on it)",
                           spec.config_path)
        if _before_15(spec.monai_version) and net_cfg.get("downsample", "merging") == "merging":
            net_cfg["downsample"] = f"@{_MERGING_KEY}"
            config[_MERGING_KEY] = _patch_merging_v14()
            logger.warning("%s: written for MONAI %s; SwinUNETR uses the patch-merging order of MONAI <= 1.4 so that "
                           "its weights compute what they were trained to", spec.config_path, spec.monai_version)
    extra: dict[str, Any] = {}
    if spec.trust_code:
        extra["monai"] = "monai"
        if spec.scripts_module is not None:
            extra["scripts"] = _import_scripts(spec)
    config["bundle_root"] = str(spec.root)
    if "device" in config:
        config["device"] = torch.device(device) if device is not None else torch.device("cpu")
    parser = bundle_parser(config, extra_globals=extra)

    def get(key: str) -> Any:
        try:
            return parser.get_parsed_content(key)
        except UnsafeBundleError:
            raise
        except Exception as exc:  # noqa: BLE001 - MONAI and bundle code can fail in many ways
            root: BaseException = exc
            while root.__cause__ is not None:  # ConfigParser wraps the bundle's error: name the real one
                root = root.__cause__
            text = str(root).strip().splitlines()[0] if str(root).strip() else ""
            raise ModelCardError(f"{spec.config_path}: cannot build '{key}' ({type(root).__name__}: {text}).") from None

    network = get(_NET_KEY)
    pre = _flatten(get(spec.preprocessing_key))
    post = _flatten(get(spec.postprocessing_key))
    inferer = get(spec.inferer_key) if spec.inferer_key else None
    if inferer is None:
        from monai.inferers import SimpleInferer

        inferer = SimpleInferer()
    load_path = get(_LOAD_KEY)
    amp = bool(get(_AMP_KEY))
    from monai.transforms import Invertd

    inv = [i for i, t in enumerate(post) if isinstance(t, Invertd)]
    if len(inv) > 1:
        raise UnsupportedBundleError(f"{spec.config_path}: {len(inv)} Invertd transforms; medseg runs one.")
    invert = post[inv[0]] if inv else None
    before, after = (post[:inv[0]], post[inv[0] + 1:]) if inv else (post, [])
    weights = _resolve_weights(spec, load_path)
    image_key = str(invert.orig_keys[0]) if invert is not None else next(
        (str(next(iter(t.keys))) for t in pre if hasattr(t, "keys") and getattr(t, "keys", None)), "image")
    pred_key = str(invert.keys[0]) if invert is not None else "pred"
    return BuiltBundle(network, pre, inferer, before, after, invert, weights, amp, image_key, pred_key, spec)


def _resolve_weights(spec: BundleSpec, load_path: Any) -> Path:
    if load_path is None:
        return next((spec.root / "models" / n for n in ("model.pt", "model.ts")
                     if (spec.root / "models" / n).is_file()), spec.root / "models" / "model.pt")
    weights = Path(str(load_path))
    return weights if weights.is_absolute() else spec.root / weights


def bundle_weights_path(spec: BundleSpec) -> Path:
    """The weights file the bundle's checkpoint loader names (only that checked expression is evaluated).

    Raises
    ------
    ModelCardError
        If the path cannot be evaluated.
    """

    from medseg.models.bundle_safety import split_id

    keep: dict[str, Any] = {}
    todo = [_LOAD_KEY]
    while todo:  # the load path and what it references (all checked by select_config)
        key = todo.pop()
        if key in keep or key not in spec.safe.config:
            continue
        keep[key] = spec.safe.config[key]
        import re

        todo += [split_id(r)[0] for r in re.findall(r"@([\w#:]+)", json.dumps(keep[key]))]
    keep["bundle_root"] = str(spec.root)
    try:
        value = bundle_parser(keep).get_parsed_content(_LOAD_KEY)
    except Exception as exc:  # noqa: BLE001 - the bundle's expression
        raise ModelCardError(f"{spec.config_path}: cannot evaluate the checkpoint path ({type(exc).__name__}: "
                             f"{exc}).") from None
    return _resolve_weights(spec, value)


def check_md5(spec: BundleSpec, weights: Path) -> None:
    """Check ``weights`` against the md5 of ``large_files.yml`` when the bundle records one.

    Raises
    ------
    WeightsError
        If the digests differ.
    """
    try:
        rel = str(weights.resolve().relative_to(spec.root))
    except ValueError:
        return
    expected = spec.md5.get(rel)
    if not expected or not weights.is_file():
        return
    h = hashlib.md5(usedforsecurity=False)
    with open(weights, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    if h.hexdigest() != expected:
        raise WeightsError(f"{weights}: md5 is {h.hexdigest()} but the bundle's large_files.yml records {expected}; "
                           "the file is damaged or not the bundle's. Download it again.")
