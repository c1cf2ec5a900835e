"""The one schema reader of medseg: model cards, training recipes, workflow recipes and manifests.

Every YAML/JSON input is checked field by field with a :class:`SchemaReader`; a bad field raises the reader's
error class (a :class:`~medseg.errors.MedsegError`) with a message naming the file, the field, what was expected
and what was found. Unknown fields get the one did-you-mean of medseg, :func:`did_you_mean`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

__all__ = ["SchemaReader", "did_you_mean", "read_yaml"]


def did_you_mean(name: str, options: Iterable[str], *, n: int = 1, cutoff: float = 0.6,
                 ignore_case: bool = False) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``options`` (up to ``n``), or ``""`` when none is close.

    ``ignore_case`` compares lower-cased names and still names the options as they are spelled.

    Examples
    --------
    >>> did_you_mean("epohcs", ["epochs", "lr"])
    " (did you mean 'epochs'?)"
    >>> did_you_mean("unte", ["UNet", "SegResNet"], ignore_case=True)
    " (did you mean 'UNet'?)"
    >>> did_you_mean("zzz", ["epochs"])
    ''
    """
    spelled = {(o.lower() if ignore_case else o): o for o in sorted(set(options))}
    key = name.lower() if ignore_case else name
    close = [spelled[c] for c in difflib.get_close_matches(key, list(spelled), n=n, cutoff=cutoff)]
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


class SchemaReader:
    """Typed field access whose errors name the source file and the field.

    Parameters
    ----------
    source : str
        Named at the start of every message (a file path, or e.g. ``"recipe.yaml (model section)"``).
    error : type of MedsegError
        The error raised (``ModelCardError`` for cards, ``RecipeError`` for recipes, ...).

    ``where`` arguments are dotted field paths; for the per-key accessors it is the prefix of ``key``
    (``"inference."``), so a message names ``inference.overlap``.
    """

    def __init__(self, source: str, error: type[MedsegError]) -> None:
        self.source = source
        self.error = error

    def problem(self, message: str) -> MedsegError:
        """``error("<source>: <message>")``, to raise."""
        return self.error(f"{self.source}: {message}")

    def fail(self, where: str, expected: str, got: Any) -> MedsegError:
        """The error for field ``where`` holding ``got`` instead of ``expected``, to raise."""
        return self.problem(f"field '{where}': expected {expected}, got {got!r}.")

    def mapping(self, data: Any, where: str, allowed: Iterable[str] | None = None) -> Mapping[str, Any]:
        """``data`` as a mapping (``None`` → ``{}``) whose keys are all in ``allowed`` (when given)."""
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            raise self.fail(where, "a mapping (key: value lines)", data)
        if allowed is not None:
            allowed = set(allowed)
            unknown = sorted(set(map(str, data)) - allowed)
            if unknown:
                hint = "; ".join(f"'{u}'{did_you_mean(u, allowed)}" for u in unknown)
                raise self.problem(f"unknown field(s) in '{where}': {hint}. Allowed: {sorted(allowed)}.")
        return data

    def required(self, data: Mapping[str, Any], key: str, where: str) -> Any:
        """``data[key]``, or an error naming the missing field."""
        if data.get(key) is None:
            raise self.problem(f"missing required field '{where}{key}'.")
        return data[key]

    def string(self, data: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
        """A string (numbers are accepted and converted: ``version: 1.0``); required when ``default`` is None."""
        value = data.get(key, default)
        if value is None:
            raise self.problem(f"missing required field '{where}{key}'.")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.fail(where + key, "a string", value)
        return str(value)

    def optional_number(self, data: Mapping[str, Any], key: str, where: str, default: float | None = None, *,
                        lo: float | None = None, hi: float | None = None,
                        integer: bool = False) -> float | int | None:
        """A number in [lo, hi] (an int when ``integer``), or None when absent and ``default`` is None."""
        value = data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and int(value) != value):
            raise self.fail(where + key, "an integer" if integer else "a number", value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(where + key, f"a number in [{lo}, {hi}]", value)
        return int(value) if integer else float(value)

    def number(self, data: Mapping[str, Any], key: str, where: str, default: float, *, lo: float | None = None,
               hi: float | None = None) -> float:
        """A float in [lo, hi] (an explicit null is refused)."""
        value = self.optional_number(data, key, where, default, lo=lo, hi=hi)
        if value is None:
            raise self.fail(where + key, "a number", None)
        return float(value)

    def integer(self, data: Mapping[str, Any], key: str, where: str, default: int, *, lo: float | None = None,
                hi: float | None = None) -> int:
        """An integer in [lo, hi] (``3.0`` is accepted, ``3.5`` is not; an explicit null is refused)."""
        value = self.optional_number(data, key, where, default, lo=lo, hi=hi, integer=True)
        if value is None:
            raise self.fail(where + key, "an integer", None)
        return int(value)

    def optional_integer(self, data: Mapping[str, Any], key: str, where: str, default: int | None = None, *,
                         lo: float | None = None, hi: float | None = None) -> int | None:
        """An integer in [lo, hi], or None when absent and ``default`` is None."""
        value = self.optional_number(data, key, where, default, lo=lo, hi=hi, integer=True)
        return None if value is None else int(value)

    def boolean(self, data: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        """``true`` or ``false`` (not 0/1, not "yes")."""
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(where + key, "true or false", value)
        return value

    def choice(self, data: Mapping[str, Any], key: str, where: str, default: str, options: Iterable[str]) -> str:
        """One of ``options``."""
        options = tuple(options)
        value = data.get(key, default)
        if value not in options:
            hint = did_you_mean(value, options) if isinstance(value, str) else ""
            raise self.fail(where + key, f"one of {list(options)}{hint}", value)
        return str(value)

    def triple(self, value: Any, where: str, kind: type, *, positive: bool = True) -> tuple[Any, Any, Any]:
        """Three numbers (i, j, k) of ``kind`` (int or float), or one number for all three."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise self.fail(where, f"three {kind.__name__}s (i, j, k) or one for all", value)
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
                raise self.fail(where, f"three {kind.__name__}s (i, j, k)", value)
            if positive and v <= 0:
                raise self.fail(where, "positive values (i, j, k)", value)
            out.append(kind(v))
        return tuple(out)  # type: ignore[return-value]

    def pair(self, value: Any, where: str, kind: type = float) -> tuple[Any, Any]:
        """``[low, high]`` (low ≤ high) or one number for both."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return kind(value), kind(value)
        if not isinstance(value, (list, tuple)) or len(value) != 2 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in value) or value[1] < value[0]:
            raise self.fail(where, "[low, high] (two numbers, low <= high) or one number", value)
        return kind(value[0]), kind(value[1])


def _one_line(exc: BaseException) -> str:
    """A parser's message on one line (YAML errors quote the offending lines with a caret under them)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        context = getattr(exc, "context", None)
        return f"{context + ': ' if context else ''}{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def read_yaml(path: str | Path, error: type[MedsegError], *, what: str) -> Any:
    """Parse a YAML file (``yaml.safe_load``), raising ``error`` naming ``what`` it should be.

    Raises
    ------
    MedsegError
        ``error`` if the file cannot be read or is not valid YAML.
    """
    import yaml

    p = Path(path)
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise error(f"{p}: cannot read the {what} as YAML ({_one_line(exc)}).") from None
