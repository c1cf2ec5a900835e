"""Label tables: integer label values with a name, a display colour and a kind (organ or lesion).

A label table travels with every segmentation: in memory on the :class:`~medseg.volume.Volume`, on disk as a
JSON sidecar next to the label image (``case.nii.gz`` → ``case.labels.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medseg.errors import LabelTableError

__all__ = ["Label", "LabelKind", "LabelTable", "find_row", "sidecar_path"]

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
    """

    value: int
    name: str
    color: tuple[int, int, int]
    kind: LabelKind = "organ"

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
        """A JSON-ready dict: ``{"labels": [{"value", "name", "color", "kind"}, ...]}``."""
        return {
            "labels": [
                {"value": lab.value, "name": lab.name, "color": list(lab.color), "kind": lab.kind}
                for lab in self._labels.values()
            ]
        }

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
