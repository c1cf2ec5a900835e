"""What medseg's messages and docstrings tell the user to use exists: dotted names, keyword arguments, CLI options
and commands.

Every string literal in ``medseg/`` (error messages, hints, docstrings; f-strings with their placeholders left
out) is searched for

- dotted names ``medseg.x.y`` — each must import / resolve to a real attribute (the module may have been renamed);
- calls with keywords such as ``load_volume(path, volume=N)`` where the name is a public medseg function — each
  keyword must be a parameter of that function;
- CLI options ``--name`` — some ``medseg`` command (or the top-level callback) must define it;
- commands in backticks, ``medseg info ...`` — they must exist.

The checks resolve real attributes at test time, so they keep holding as modules are added or renamed.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import typer

import medseg
from medseg.cli import app

ROOT = Path(medseg.__file__).parent
#: Dotted strings that are file names, not Python names.
NOT_NAMES = {"medseg.yaml"}


def strings() -> list[tuple[str, int, str]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT.parent))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}"
                               for v in node.values)
                out.append((rel, node.lineno, text))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append((rel, node.lineno, node.value))
    return out


STRINGS = strings()


def resolve(dotted: str) -> object:
    """Import the longest importable module prefix, then get the remaining attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if dataclass_field(obj, name):
                obj = None
                continue
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def dataclass_field(obj: object, name: str) -> bool:
    fields = getattr(obj, "__dataclass_fields__", None)
    return bool(fields) and name in fields  # type: ignore[operator]


def test_dotted_medseg_names_exist():
    found = {(m.group(0).rstrip("."), where, line) for where, line, text in STRINGS
             for m in re.finditer(r"\bmedseg(?:\.[A-Za-z_]\w*)+", text)}
    assert len({d for d, _, _ in found}) > 20  # the scan itself works
    missing = []
    for dotted, where, line in sorted(found):
        if dotted in NOT_NAMES:
            continue
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{where}:{line}: {dotted} ({type(exc).__name__}: {exc})")
    assert not missing, "\n".join(missing)


def public_functions() -> dict[str, list[object]]:
    funcs: dict[str, list[object]] = {}
    for info in pkgutil.walk_packages(medseg.__path__, "medseg."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # optional extras (napari, dask) may be absent
            continue
        for name, obj in vars(module).items():
            if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__.startswith("medseg"):
                funcs.setdefault(name, []).append(obj)
    return funcs


def test_suggested_keyword_arguments_exist():
    funcs = public_functions()
    checked, wrong = 0, []
    for where, line, text in STRINGS:
        for m in re.finditer(r"\b([a-z_]\w*)\(([^()]*)\)", text):
            name, args = m.group(1), m.group(2)
            keywords = re.findall(r"\b([a-z_]\w*)=", args)
            if name not in funcs or not keywords:
                continue
            checked += 1
            params = {p for f in funcs[name] for p in inspect.signature(f).parameters}  # type: ignore[arg-type]
            wrong += [f"{where}:{line}: {name}(... {k}=...) but {name} has no parameter {k!r}" for k in keywords
                      if k not in params]
    assert checked >= 5  # load_volume(path, volume=N), load_volume(..., skip_unreadable=True), ...
    assert not wrong, "\n".join(wrong)


def cli_tree():
    root = typer.main.get_command(app)
    options, commands = set(), set()

    def walk(cmd, prefix):
        for param in cmd.params:
            options.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        for name, sub in getattr(cmd, "commands", {}).items():
            commands.add(f"{prefix}{name}")
            walk(sub, f"{prefix}{name} ")

    walk(root, "")
    return options, commands


def test_suggested_cli_options_and_commands_exist():
    options, commands = cli_tree()
    assert "--skip-unreadable" in options and "--volume" in options and "info" in commands
    wrong = []
    for where, line, text in STRINGS:
        for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]+", text):
            if m.group(0) not in options:
                wrong.append(f"{where}:{line}: option {m.group(0)} is not a medseg option")
        for m in re.finditer(r"`medseg ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", text):
            first, second = m.group(1), m.group(2)
            if first not in commands:
                wrong.append(f"{where}:{line}: `medseg {first}` is not a command")
            elif second and any(c.startswith(first + " ") for c in commands) and f"{first} {second}" not in commands:
                wrong.append(f"{where}:{line}: `medseg {first} {second}` is not a command")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("bad", ["medseg.io.no_such_reader", "medseg.resample_to"])
def test_the_resolver_fails_on_names_that_do_not_exist(bad):
    with pytest.raises((ImportError, AttributeError)):
        resolve(bad)
