"""Label tables: integer label values with a name, a display colour, a kind (organ or lesion) and, for DICOM SEG,
a coded concept (category, type, laterality; :class:`SegmentCode`).

Coded concepts for the labels medseg knows (the shipped models, ct-basic, TotalSegmentator's ``total`` and
``total_v1`` classes) come from a curated table shipped as data (``medseg/data/segment_codes.json``):
:func:`standard_segment_code`. Names are looked up exactly; a code is never guessed from a name.

A label table travels with every segmentation: in memory on the :class:`~medseg.volume.Volume`, on disk as a
JSON sidecar next to the label image (``case.nii.gz`` → ``case.labels.json``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from medseg.errors import LabelTableError

__all__ = [
    "Code",
    "Label",
    "LabelKind",
    "LabelTable",
    "SegmentCode",
    "find_row",
    "sidecar_path",
    "standard_segment_code",
    "standard_segment_codes",
]

LabelKind = Literal["organ", "lesion", "other"]
_KINDS = ("organ", "lesion", "other")

# A qualitative palette (tab20-like, RGB 0–255) used when a table gives no colour.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)


def default_color(value: int) -> tuple[int, int, int]:
    """Colour used for label ``value`` when none is given."""
    return _PALETTE[(value - 1) % len(_PALETTE)]


@dataclass(frozen=True)
class Code:
    """One coded concept, as DICOM writes it: coding scheme designator, code value and code meaning.

    Attributes
    ----------
    scheme : str
        e.g. ``"SCT"`` (SNOMED CT) or ``"DCM"``.
    value : str
        e.g. ``"10200004"``.
    meaning : str
        e.g. ``"Liver"``.
    """

    scheme: str
    value: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("scheme", "value", "meaning"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise LabelTableError(f"A code needs a non-empty {name} string, not {getattr(self, name)!r} ({self}).")

    def to_json(self) -> list[str]:
        """``[scheme, value, meaning]``."""
        return [self.scheme, self.value, self.meaning]

    @classmethod
    def from_json(cls, data: Any, *, where: str = "code") -> Code:
        """Parse ``[scheme, value, meaning]`` or ``{"scheme", "value", "meaning"}``.

        Raises
        ------
        LabelTableError
            If ``data`` is neither.
        """
        if isinstance(data, Mapping) and {"scheme", "value", "meaning"} <= set(data):
            return cls(str(data["scheme"]), str(data["value"]), str(data["meaning"]))
        if isinstance(data, (list, tuple)) and len(data) == 3:
            return cls(str(data[0]), str(data[1]), str(data[2]))
        raise LabelTableError(f"{where}: expected [scheme, value, meaning], e.g. [SCT, '10200004', Liver], not {data!r}.")


@dataclass(frozen=True)
class SegmentCode:
    """What a segment is, in DICOM SEG's coded terms.

    Attributes
    ----------
    category : Code
        SegmentedPropertyCategory (DICOM CID 7150), e.g. Anatomical Structure, Morphologically Abnormal Structure.
    type : Code
        SegmentedPropertyType, e.g. Kidney.
    modifier : Code or None
        SegmentedPropertyTypeModifier: laterality (Left / Right) where it applies; the left and right kidney are
        one type with a modifier.
    region : Code or None
        AnatomicRegion, for lesions (e.g. a neoplasm in the Liver).
    region_modifier : Code or None
        Laterality of the region.
    """

    category: Code
    type: Code
    modifier: Code | None = None
    region: Code | None = None
    region_modifier: Code | None = None

    def to_json(self) -> dict[str, list[str]]:
        """``{"category": [...], "type": [...], ...}`` (absent parts left out)."""
        out = {"category": self.category.to_json(), "type": self.type.to_json()}
        for name in ("modifier", "region", "region_modifier"):
            code = getattr(self, name)
            if code is not None:
                out[name] = code.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any, *, where: str = "code") -> SegmentCode:
        """Parse what :meth:`to_json` wrote.

        Raises
        ------
        LabelTableError
            If ``category`` or ``type`` is missing or a part is malformed.
        """
        if not isinstance(data, Mapping) or "category" not in data or "type" not in data:
            raise LabelTableError(
                f"{where}: expected {{category: [scheme, value, meaning], type: [...], modifier: [...] (optional)}}, "
                f"not {data!r}."
            )
        unknown = sorted(set(data) - {"category", "type", "modifier", "region", "region_modifier"})
        if unknown:
            raise LabelTableError(f"{where}: unknown field(s) {unknown}; a code has category, type, modifier, region "
                                  "and region_modifier.")
        parts = {k: (Code.from_json(data[k], where=f"{where}.{k}") if data.get(k) is not None else None)
                 for k in ("category", "type", "modifier", "region", "region_modifier")}
        return cls(**parts)  # type: ignore[arg-type]


@functools.cache
def standard_segment_codes() -> Mapping[str, SegmentCode]:
    """The curated label name → :class:`SegmentCode` table shipped with medseg (``medseg/data/segment_codes.json``).

    It covers every label of the shipped model cards and ct-basic, and TotalSegmentator's ``total`` (v2) and
    ``total_v1`` class names (the latter are the MONAI ``wholeBody_ct_segmentation`` bundle's channels).
    """
    data = json.loads(resources.files("medseg").joinpath("data/segment_codes.json").read_text())
    return {name: SegmentCode.from_json(entry, where=f"segment_codes.json: {name}")
            for name, entry in data["codes"].items()}


def standard_segment_code(name: str) -> SegmentCode | None:
    """The curated code of label ``name`` (exact name, e.g. ``"kidney_left"``), or None when the table has none."""
    return standard_segment_codes().get(name)


@dataclass(frozen=True)
class Label:
    """One label class.

    Attributes
    ----------
    value : int
        Integer stored in the label image (1..65535; 0 is background and never a label).
    name : str
        Human-readable name, e.g. ``"liver"``.
    color : tuple of 3 int
        Display colour, RGB in 0–255.
    kind : {"organ", "lesion", "other"}
        Organs are post-processed as one connected structure; lesions are counted instance by instance.
    code : SegmentCode or None
        Coded concept for DICOM SEG; None means "look the name up in :func:`standard_segment_code`".
    """

    value: int
    name: str
    color: tuple[int, int, int]
    kind: LabelKind = "organ"
    code: SegmentCode | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.value, int) or isinstance(self.value, bool) or not 1 <= self.value <= 65535:
            raise LabelTableError(f"Label value must be an integer in 1..65535, not {self.value!r} ({self.name!r}).")
        if not self.name or not isinstance(self.name, str):
            raise LabelTableError(f"Label {self.value} needs a non-empty name, not {self.name!r}.")
        if len(self.color) != 3 or any(not 0 <= int(c) <= 255 for c in self.color):
            raise LabelTableError(
                f"Label {self.value} ({self.name}) colour must be three integers in 0..255, not {self.color!r}."
            )
        object.__setattr__(self, "color", tuple(int(c) for c in self.color))
        if self.kind not in _KINDS:
            raise LabelTableError(f"Label {self.value} ({self.name}) kind must be one of {_KINDS}, not {self.kind!r}.")


class LabelTable(Mapping[int, Label]):
    """An immutable mapping ``value → Label``, ordered by value."""

    def __init__(self, labels: Iterable[Label]) -> None:
        table: dict[int, Label] = {}
        for label in labels:
            if label.value in table:
                raise LabelTableError(
                    f"Label value {label.value} appears twice ({table[label.value].name!r} and {label.name!r})."
                )
            table[label.value] = label
        self._labels = dict(sorted(table.items()))

    @classmethod
    def from_names(cls, names: Mapping[int, str], *, lesions: Iterable[str] = ()) -> LabelTable:
        """Build a table from ``{value: name}`` with default colours; names in ``lesions`` get kind "lesion"."""
        lesion_names = set(lesions)
        return cls(
            Label(int(v), n, default_color(int(v)), "lesion" if n in lesion_names else "organ")
            for v, n in names.items()
        )

    def __getitem__(self, value: int) -> Label:
        return self._labels[value]

    def __iter__(self) -> Iterator[int]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __repr__(self) -> str:
        return "LabelTable(" + ", ".join(f"{v}: {lab.name!r}" for v, lab in self._labels.items()) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelTable) and self._labels == other._labels

    def __hash__(self) -> int:
        return hash(tuple(self._labels.items()))

    @property
    def names(self) -> dict[int, str]:
        """``{value: name}``."""
        return {v: lab.name for v, lab in self._labels.items()}

    def value_of(self, name: str) -> int:
        """The value of the label called ``name``.

        Raises
        ------
        LabelTableError
            If no label has that name (the message lists the names there are).
        """
        for v, lab in self._labels.items():
            if lab.name == name:
                return v
        raise LabelTableError(f"No label named {name!r}; the table has {sorted(self.names.values())}.")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"labels": [{"value", "name", "color", "kind"[, "code"]}, ...]}``."""
        rows = []
        for lab in self._labels.values():
            row: dict[str, Any] = {"value": lab.value, "name": lab.name, "color": list(lab.color), "kind": lab.kind}
            if lab.code is not None:
                row["code"] = lab.code.to_json()
            rows.append(row)
        return {"labels": rows}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "label table") -> LabelTable:
        """Parse what :meth:`to_json` wrote (also accepts a plain ``{"1": "liver", ...}`` mapping).

        Raises
        ------
        LabelTableError
            If the data is not a label table; the message names ``source``.
        """
        try:
            if "labels" in data:
                return cls(
                    Label(
                        int(item["value"]),
                        str(item["name"]),
                        tuple(item.get("color") or default_color(int(item["value"]))),  # type: ignore[arg-type]
                        item.get("kind", "organ"),
                        SegmentCode.from_json(item["code"], where=f"label {item.get('value')} code")
                        if item.get("code") is not None else None,
                    )
                    for item in data["labels"]
                )
            return cls.from_names({int(k): str(v) for k, v in data.items()})
        except LabelTableError as exc:
            raise LabelTableError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LabelTableError(
                f"{source}: expected {{'labels': [{{'value': int, 'name': str, 'color': [r, g, b], 'kind': ...}}]}} "
                f"or {{value: name}}; could not parse it ({type(exc).__name__}: {exc})."
            ) from None

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON to ``path`` (atomically: a reader never sees half a table)."""
        from medseg.files import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LabelTable:
        """Read a table written by :meth:`save`.

        Raises
        ------
        LabelTableError
            If the file is not valid JSON or not a label table.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LabelTableError(f"{path}: cannot read label table JSON ({exc}).") from None
        if not isinstance(data, dict):
            raise LabelTableError(f"{path}: expected a JSON object holding a label table.")
        return cls.from_json(data, source=str(path))


_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def find_row(rows: Iterable[Any], key: int | str, *, what: str = "label") -> Any:
    """The first row whose ``value`` or ``name`` equals ``key`` (rows of per-label result tables).

    Raises
    ------
    KeyError
        If no row has that value or name (the message lists the names there are).
    """
    rows = tuple(rows)
    for row in rows:
        if row.value == key or row.name == key:
            return row
    raise KeyError(f"No {what} {key!r}; rows: {[r.name for r in rows]}")


def sidecar_path(image_path: str | Path) -> Path:
    """Where the label table of a label image lives: ``seg.nii.gz`` → ``seg.labels.json``."""
    p = Path(image_path)
    name = p.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + ".labels.json")
