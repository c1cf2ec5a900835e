"""Model cards: one YAML file that says everything needed to run a segmentation model.

A card names the network (a MONAI network and its keyword arguments) or a weight-free function from
:mod:`medseg.classical`, the labels it predicts, the modality it accepts, the grid it works on (orientation and
spacing), the intensity normalisation, the sliding-window settings, the post-processing, the weights file with
its sha256, and where the model came from. Example::

    name: spleen-ct
    version: "1.0"
    modality: CT
    network:
      name: UNet
      kwargs: {spatial_dims: 3, in_channels: 1, out_channels: 2, channels: [16, 32, 64], strides: [2, 2]}
    output: softmax              # channel 0 = background, channel c = c-th label by value
    labels:
      - {value: 1, name: spleen, color: [157, 108, 162], kind: organ}
    preprocessing:
      orientation: RAS
      spacing_mm: [1.5, 1.5, 2.0]
      intensity: {kind: ct_window, a_min: -57, a_max: 164, b_min: 0.0, b_max: 1.0, clip: true}
    inference: {patch_size: [96, 96, 96], overlap: 0.25, blending: gaussian, sw_batch_size: 4}
    postprocessing: {largest_component: true, min_component_ml: 0.5, fill_holes: true}
    weights: {file: spleen-ct.pt, sha256: 0f3c...}
    provenance: {trained_by: medseg train, data: MSD Task09, metrics: {dice_spleen: 0.95}}

Every field is checked when the card is read; a bad one raises :class:`~medseg.errors.ModelCardError` naming the
card file, the field, what was expected and what was found.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from medseg.errors import LabelTableError, ModelCardError
from medseg.labels import Label, LabelTable, SegmentCode, default_color
from medseg.schema import SchemaReader, did_you_mean

__all__ = [
    "CARD_SUFFIXES",
    "IntensitySpec",
    "ModelCard",
    "NetworkSpec",
    "PostprocessSpec",
    "PreprocessingSpec",
    "WeightsSpec",
    "WindowSpec",
    "load_card",
    "parse_card",
]

logger = logging.getLogger(__name__)

CARD_SUFFIXES = (".yaml", ".yml")

ModelKind = Literal["network", "classical", "bundle", "nnunet"]
IntensityKind = Literal["ct_window", "zscore", "percentile", "none"]
Activation = Literal["softmax", "sigmoid"]
Blending = Literal["gaussian", "constant"]
ModalityPolicy = Literal["error", "warn"]

_TOP_KEYS = {
    "name", "version", "description", "modality", "modality_check", "kind", "network", "function", "output",
    "input_channels", "channel_names", "labels", "preprocessing", "inference", "postprocessing", "weights",
    "provenance",
}


@dataclass(frozen=True)
class NetworkSpec:
    """A MONAI network by name with its constructor keyword arguments."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IntensitySpec:
    """Intensity normalisation applied after resampling.

    Attributes
    ----------
    kind : {"ct_window", "zscore", "percentile", "none"}
        ``ct_window``: map [a_min, a_max] (HU) linearly to [b_min, b_max], optionally clipped.
        ``zscore``: subtract the mean and divide by the standard deviation (of non-zero voxels if ``nonzero``).
        ``percentile``: map the [lower, upper] percentiles to [b_min, b_max], optionally clipped.
    """

    kind: IntensityKind = "none"
    a_min: float = -1000.0
    a_max: float = 1000.0
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True
    lower: float = 0.5
    upper: float = 99.5
    nonzero: bool = False


@dataclass(frozen=True)
class PreprocessingSpec:
    """Where the network sees the scan: orientation code, voxel spacing (mm, ``None`` keeps the input's),
    intensity normalisation, and an optional crop to the foreground (raw intensities above a threshold)."""

    orientation: str | None = "RAS"
    spacing_mm: tuple[float, float, float] | None = None
    intensity: IntensitySpec = field(default_factory=IntensitySpec)
    crop_foreground: bool = False
    foreground_threshold: float = -500.0


@dataclass(frozen=True)
class WindowSpec:
    """Sliding-window settings: patch size (voxels on the network grid), overlap fraction, blending, batch."""

    patch_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.25
    blending: Blending = "gaussian"
    sw_batch_size: int = 1


@dataclass(frozen=True)
class PostprocessSpec:
    """Label clean-up after inference: keep the largest component of organ labels, drop components smaller
    than ``min_component_ml`` (mL; ``min_component_ml_by_label`` overrides it per label name), fill holes, and
    drop components of a label listed in ``lesion_hosts`` that touch none of its host labels (label name → host
    label names, e.g. ``kidney_tumour: [kidney_left, kidney_right]``)."""

    largest_component: bool = False
    min_component_ml: float = 0.0
    fill_holes: bool = False
    min_component_ml_by_label: Mapping[str, float] = field(default_factory=dict)
    lesion_hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class WeightsSpec:
    """A weights file (absolute, resolved against the card's folder) and its expected sha256 (hex)."""

    path: Path
    sha256: str | None = None
    format: Literal["auto", "state_dict", "torchscript"] = "auto"


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to run one model; build it with :func:`load_card` or :func:`parse_card`.

    ``output`` fixes how channels map to labels: ``softmax`` → channel 0 is background and channel c (c ≥ 1) is
    the c-th label in value order; ``sigmoid`` → channel c is the (c+1)-th label, a voxel gets the most
    probable label whose probability exceeds 0.5.

    ``ensemble`` lists every weight file of a model whose logits are averaged (the folds of an nnU-Net result
    folder, ``weights`` being the first); it is empty for a single network.
    """

    name: str
    version: str = "0"
    description: str = ""
    modality: tuple[str, ...] = ()
    modality_check: ModalityPolicy = "error"
    kind: ModelKind = "network"
    network: NetworkSpec | None = None
    function: str | None = None
    output: Activation = "softmax"
    input_channels: int = 1
    channel_names: tuple[str, ...] = ()
    labels: LabelTable | None = None
    preprocessing: PreprocessingSpec = field(default_factory=PreprocessingSpec)
    inference: WindowSpec = field(default_factory=WindowSpec)
    postprocessing: PostprocessSpec = field(default_factory=PostprocessSpec)
    weights: WeightsSpec | None = None
    ensemble: tuple[WeightsSpec, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = None
    origin: Literal["shipped", "user", "bundle", "memory"] = "memory"
    #: For ``kind: bundle``: what medseg read of the MONAI bundle (:class:`medseg.models.bundle.BundleSpec`).
    bundle: Any = field(default=None, repr=False, compare=False)

    @property
    def out_channels(self) -> int:
        """Number of network output channels the labels imply."""
        n = len(self.labels or ())
        return n + 1 if self.output == "softmax" else n

    def with_origin(self, origin: Literal["shipped", "user", "bundle", "memory"]) -> ModelCard:
        """The same card marked as coming from ``origin``."""
        return replace(self, origin=origin)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description, as ``medseg models show`` prints it."""
        pre = self.preprocessing
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "origin": self.origin,
            "source": str(self.source) if self.source else None,
            "description": self.description,
            "modality": list(self.modality),
            "modality_check": self.modality_check,
            "network": None if self.network is None else {"name": self.network.name, "kwargs": dict(self.network.kwargs)},
            "function": self.function,
            "output": self.output,
            "input_channels": self.input_channels,
            "channel_names": list(self.channel_names),
            "labels": None if self.labels is None else self.labels.to_json()["labels"],
            "preprocessing": {
                "orientation": pre.orientation,
                "spacing_mm": None if pre.spacing_mm is None else list(pre.spacing_mm),
                "intensity": vars(pre.intensity).copy(),
                "crop_foreground": pre.crop_foreground,
            },
            "inference": {
                "patch_size": list(self.inference.patch_size),
                "overlap": self.inference.overlap,
                "blending": self.inference.blending,
                "sw_batch_size": self.inference.sw_batch_size,
            },
            "postprocessing": {**vars(self.postprocessing),
                               "min_component_ml_by_label": dict(self.postprocessing.min_component_ml_by_label),
                               "lesion_hosts": {k: list(v) for k, v in self.postprocessing.lesion_hosts.items()}},
            "weights": None if self.weights is None else {"file": str(self.weights.path), "sha256": self.weights.sha256},
            "ensemble": [{"file": str(w.path), "sha256": w.sha256} for w in self.ensemble],
            "provenance": dict(self.provenance),
        } | (self._bundle_summary() if self.kind == "bundle" and self.bundle is not None else {})

    def _bundle_summary(self) -> dict[str, Any]:
        """A bundle runs its own transforms: list those instead of card fields it does not use."""
        b = self.bundle
        return {
            "preprocessing": {"bundle transforms": list(b.preprocessing)},
            "inference": {"bundle inferer": b.inferer},
            "postprocessing": {"bundle transforms": list(b.postprocessing)},
            "weights": {"file": "the bundle's checkpoint loader load_path (medseg models show evaluates it)",
                        "sha256": self.weights.sha256 if self.weights else None},
            "bundle": {"config": str(b.config_path), "monai_version": b.monai_version, "licence": b.licence,
                       "labels_from": b.label_source},
        }


# ---- parsing --------------------------------------------------------------------------------------------------
def _code(r: SchemaReader, data: Any, where: str) -> SegmentCode | None:
    """A label's optional DICOM SEG code: {category: [scheme, value, meaning], type: [...], modifier: [...]}."""
    if data is None:
        return None
    try:
        return SegmentCode.from_json(data, where=f"{r.source}: field '{where}'")
    except LabelTableError as exc:
        raise ModelCardError(str(exc)) from None


def _labels(r: SchemaReader, data: Any) -> LabelTable:
    items: list[Label] = []
    if isinstance(data, Mapping):  # {1: liver, 2: tumour}
        data = [{"value": k, "name": v} for k, v in data.items()]
    if not isinstance(data, list) or not data:
        raise r.fail("labels", "a non-empty list of {value, name, color, kind} (or a {value: name} mapping)", data)
    for n, item in enumerate(data):
        where = f"labels[{n}]"
        item = r.mapping(item, where, {"value", "name", "color", "colour", "kind", "code"})
        code = _code(r, item.get("code"), f"{where}.code")
        try:
            value = int(item["value"])
            color = item.get("color", item.get("colour")) or default_color(value)
            items.append(Label(value, str(item["name"]), tuple(color), item.get("kind", "organ"), code))  # type: ignore[arg-type]
        except KeyError as exc:
            raise ModelCardError(f"{r.source}: field '{where}' needs '{exc.args[0]}'.") from None
        except (TypeError, ValueError) as exc:
            raise ModelCardError(f"{r.source}: field '{where}': {exc}") from None
    try:
        return LabelTable(items)
    except LabelTableError as exc:
        raise ModelCardError(f"{r.source}: field 'labels': {exc}") from None


def _intensity(r: SchemaReader, data: Any) -> IntensitySpec:
    d = r.mapping(data, "preprocessing.intensity",
                  {"kind", "a_min", "a_max", "b_min", "b_max", "clip", "lower", "upper", "nonzero"})
    w = "preprocessing.intensity."
    kind = r.choice(d, "kind", w, "none", ("ct_window", "zscore", "percentile", "none"))
    spec = IntensitySpec(
        kind=kind,  # type: ignore[arg-type]
        a_min=r.number(d, "a_min", w, -1000.0), a_max=r.number(d, "a_max", w, 1000.0),
        b_min=r.number(d, "b_min", w, 0.0), b_max=r.number(d, "b_max", w, 1.0),
        clip=r.boolean(d, "clip", w, True),
        lower=r.number(d, "lower", w, 0.5, lo=0, hi=100), upper=r.number(d, "upper", w, 99.5, lo=0, hi=100),
        nonzero=r.boolean(d, "nonzero", w, False),
    )
    if kind == "ct_window" and spec.a_max <= spec.a_min:
        raise r.fail(w + "a_max", f"a value above a_min = {spec.a_min}", spec.a_max)
    if kind == "percentile" and spec.upper <= spec.lower:
        raise r.fail(w + "upper", f"a percentile above lower = {spec.lower}", spec.upper)
    return spec


def _lesion_hosts(r: SchemaReader, data: Any, label_names: set[str] | None) -> dict[str, tuple[str, ...]]:
    """``postprocessing.lesion_hosts``: label name → a non-empty list of other label names of the card."""
    where = "postprocessing.lesion_hosts"
    hosts = r.mapping(data, where, label_names)
    if hosts and label_names is None:
        raise r.fail(where, "labels in the card to name", dict(hosts))
    out: dict[str, tuple[str, ...]] = {}
    for name, value in hosts.items():
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise r.fail(f"{where}.{name}", "a list of host label names, e.g. [kidney_left, kidney_right]", value)
        allowed = sorted((label_names or set()) - {str(name)})
        for n in names:
            if n not in allowed:
                raise ModelCardError(f"{r.source}: '{where}.{name}' names '{n}', which is not another label of the "
                                     f"card{did_you_mean(n, allowed)}. Labels: {allowed}.")
        out[str(name)] = tuple(names)
    return out


def parse_card(data: Any, *, source: str | Path = "model card", base_dir: Path | None = None) -> ModelCard:
    """Validate a card's parsed YAML content and build a :class:`ModelCard`.

    Parameters
    ----------
    data : mapping
        The parsed YAML document.
    source : str or Path
        Named in error messages (the card's path).
    base_dir : Path, optional
        Folder that relative weight paths are resolved against (the card's folder).

    Raises
    ------
    ModelCardError
        If a field is missing, unknown, of the wrong type or out of range; the message names the field.
    UnknownNetworkError
        If ``network.name`` is not a MONAI network (with the closest names).
    """
    r = SchemaReader(str(source), ModelCardError)
    top = r.mapping(data, "(top level)", _TOP_KEYS)
    if not top:
        raise ModelCardError(f"{source}: the card is empty; expected at least 'name', 'labels' and 'network'.")
    name = r.string(top, "name", "")
    kind = r.choice(top, "kind", "", "network", ("network", "classical", "bundle"))
    modality_raw = top.get("modality", ())
    modality = (modality_raw,) if isinstance(modality_raw, str) else tuple(modality_raw or ())
    if not all(isinstance(m, str) for m in modality):
        raise r.fail("modality", "a DICOM modality code like CT or MR, or a list of them", modality_raw)
    network: NetworkSpec | None = None
    function: str | None = None
    if kind == "classical":
        function = r.string(top, "function", "")
        if "network" in top:
            raise ModelCardError(f"{source}: a 'classical' card names a 'function', not a 'network'.")
    else:
        net = r.mapping(top.get("network"), "network", {"name", "kwargs"})
        if not net:
            raise ModelCardError(
                f"{source}: missing required field 'network' (a MONAI network name and its kwargs), e.g. "
                "network: {name: UNet, kwargs: {spatial_dims: 3, in_channels: 1, out_channels: 2, ...}}."
            )
        kwargs = dict(r.mapping(net.get("kwargs"), "network.kwargs"))
        from medseg.models.networks import canonical_network_name

        network = NetworkSpec(canonical_network_name(r.string(net, "name", "network."), source=str(source)), kwargs)
    labels = _labels(r, top.get("labels")) if (kind != "classical" or "labels" in top) else None
    output = r.choice(top, "output", "", "softmax", ("softmax", "sigmoid"))
    in_default = int(network.kwargs.get("in_channels", 1)) if network else 1
    input_channels = int(r.number(top, "input_channels", "", in_default, lo=1))
    channel_names = tuple(str(c) for c in (top.get("channel_names") or ()))
    if channel_names and len(channel_names) != input_channels:
        raise r.fail("channel_names", f"{input_channels} names (one per input channel)", list(channel_names))

    pre = r.mapping(top.get("preprocessing"), "preprocessing",
                    {"orientation", "spacing_mm", "intensity", "crop_foreground", "foreground_threshold"})
    orientation = pre.get("orientation", "RAS")
    if orientation is not None:
        import nibabel.orientations as nio

        ok = isinstance(orientation, str) and len(orientation) == 3
        if ok:
            try:
                ok = sorted(nio.axcodes2ornt(orientation.upper())[:, 0].tolist()) == [0, 1, 2]
            except Exception:  # noqa: BLE001 - any parse failure is reported below
                ok = False
        if not ok:
            raise r.fail("preprocessing.orientation", "a three-letter code like RAS or LPS, or null", orientation)
        orientation = orientation.upper()
    spacing = pre.get("spacing_mm")
    preprocessing = PreprocessingSpec(
        orientation=orientation,
        spacing_mm=None if spacing is None else r.triple(spacing, "preprocessing.spacing_mm", float),
        intensity=_intensity(r, pre.get("intensity")),
        crop_foreground=r.boolean(pre, "crop_foreground", "preprocessing.", False),
        foreground_threshold=r.number(pre, "foreground_threshold", "preprocessing.", -500.0),
    )
    inf = r.mapping(top.get("inference"), "inference", {"patch_size", "overlap", "blending", "sw_batch_size"})
    window = WindowSpec(
        patch_size=r.triple(inf.get("patch_size", 96), "inference.patch_size", int),
        overlap=r.number(inf, "overlap", "inference.", 0.25, lo=0.0, hi=0.95),
        blending=r.choice(inf, "blending", "inference.", "gaussian", ("gaussian", "constant")),  # type: ignore[arg-type]
        sw_batch_size=int(r.number(inf, "sw_batch_size", "inference.", 1, lo=1)),
    )
    post = r.mapping(top.get("postprocessing"), "postprocessing", {"largest_component", "min_component_ml",
                                                                   "fill_holes", "min_component_ml_by_label",
                                                                   "lesion_hosts"})
    label_names = None if labels is None else set(labels.names.values())
    by_label = r.mapping(post.get("min_component_ml_by_label"), "postprocessing.min_component_ml_by_label",
                         label_names)
    postprocessing = PostprocessSpec(
        largest_component=r.boolean(post, "largest_component", "postprocessing.", False),
        min_component_ml=r.number(post, "min_component_ml", "postprocessing.", 0.0, lo=0.0),
        fill_holes=r.boolean(post, "fill_holes", "postprocessing.", False),
        min_component_ml_by_label={str(k): r.number(by_label, k, "postprocessing.min_component_ml_by_label.", 0.0,
                                                     lo=0.0) for k in by_label},
        lesion_hosts=_lesion_hosts(r, post.get("lesion_hosts"), label_names),
    )
    weights: WeightsSpec | None = None
    if top.get("weights") is not None:
        wd = r.mapping(top["weights"], "weights", {"file", "sha256", "format"})
        wfile = Path(r.string(wd, "file", "weights."))
        if not wfile.is_absolute():
            wfile = (base_dir or Path.cwd()) / wfile
        sha = wd.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                                or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise r.fail("weights.sha256", "64 hexadecimal characters (sha256sum of the weights file)", sha)
        weights = WeightsSpec(wfile, None if sha is None else sha.lower(),
                              r.choice(wd, "format", "weights.", "auto", ("auto", "state_dict", "torchscript")))  # type: ignore[arg-type]
    if kind == "network" and labels is not None and network is not None:
        out = network.kwargs.get("out_channels")
        expected = len(labels) + 1 if output == "softmax" else len(labels)
        if out is not None and int(out) != expected:
            raise ModelCardError(
                f"{source}: network.kwargs.out_channels is {out} but {len(labels)} labels with output "
                f"'{output}' need {expected} channels"
                + (" (channel 0 is background)." if output == "softmax" else ".")
            )
    provenance = r.mapping(top.get("provenance"), "provenance")
    return ModelCard(
        name=name,
        version=r.string(top, "version", "", "0"),
        description=str(top.get("description", "") or ""),
        modality=tuple(m.upper() for m in modality),
        modality_check=r.choice(top, "modality_check", "", "error", ("error", "warn")),  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        network=network,
        function=function,
        output=output,  # type: ignore[arg-type]
        input_channels=input_channels,
        channel_names=channel_names,
        labels=labels,
        preprocessing=preprocessing,
        inference=window,
        postprocessing=postprocessing,
        weights=weights,
        provenance=dict(provenance),
        source=Path(source) if isinstance(source, Path) else None,
    )


def load_card(path: str | Path) -> ModelCard:
    """Read and validate a YAML model card; relative weight paths resolve against the card's folder.

    Raises
    ------
    ModelNotFoundError
        If the file does not exist.
    ModelCardError
        If the file is not valid YAML or not a valid card.
    """
    from medseg.errors import ModelNotFoundError
    from medseg.schema import read_yaml

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such model card file.")
    data = read_yaml(path, ModelCardError, what="model card")
    card = parse_card(data, source=path, base_dir=path.parent)
    return replace(card, source=path)
