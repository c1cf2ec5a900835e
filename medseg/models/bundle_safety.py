"""Bundles are code: check a MONAI bundle config before anything of it is parsed.

A Model Zoo config can run Python in two ways: a ``"$..."`` expression (MONAI ``eval``\\ s it) and a ``_target_``
(MONAI imports and calls any dotted name). Both run as soon as a component is resolved. medseg therefore reads
the raw JSON/YAML itself and, before handing anything to ``monai.bundle.ConfigParser``:

- keeps only the sections it runs (the network, the preprocessing, the inferer, the postprocessing, the
  checkpoint path and the evaluator's ``amp``) and everything they reference; the rest (datasets, data loaders,
  evaluators, handlers, ``imports``, ``run``) is never parsed;
- accepts a ``_target_`` only from an allow-list: MONAI transforms (not the file readers and writers, which medseg
  replaces), MONAI networks and MONAI inferers, each rewritten to its full dotted name so that MONAI cannot pick
  another component of the same name;
- accepts a ``$`` expression only if its syntax tree uses literals, ``@`` references, arithmetic, comparisons,
  conditionals, subscripts, ``len``/``list``/``range`` and a few other pure builtins, ``torch.device``,
  ``torch.cuda.is_available``, dtype names (``torch.float32``, ``np.uint8``), and lambdas built from those and
  ``torch.where`` (brats' label mapping); ``torch.load`` only as the weights-only loader (DiNTS' architecture
  file) and ``torch.from_numpy``;
- refuses ``%`` macros (they read other files), ``_mode_: debug`` and any expression naming a dunder, anywhere
  in the config.

Anything else is refused with :class:`~medseg.errors.UnsafeBundleError` naming the file, the key and the
expression. ``trust_code=True`` (the CLI's ``--trust-bundle-code``) lifts the expression and target rules for
bundles the user vouches for; the bundle's ``scripts/`` package is then imported under a module name of its own.
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from medseg.errors import UnsafeBundleError

__all__ = ["SafeConfig", "check_expression", "check_target", "select_config", "split_id"]

_REF = re.compile(r"@([\w#:]+)")
_SAFE_BUILTINS = frozenset({"len", "list", "range", "tuple", "int", "float", "bool", "str", "min", "max", "abs",
                            "round", "sum", "sorted", "dict"})
_DTYPES = frozenset({"float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16",
                     "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", "bool_", "long", "int"})
_SAFE_CALLS = frozenset({"torch.device", "torch.cuda.is_available", "torch.where", "torch.load", "torch.from_numpy"})
_MODULES = frozenset({"torch", "np", "numpy"})
#: MONAI transforms medseg never runs from a bundle: it feeds the scan itself and never writes files for a bundle.
REPLACED_TRANSFORMS = frozenset({"LoadImage", "LoadImaged", "SaveImage", "SaveImaged", "WriteFileMapping",
                                 "WriteFileMappingd"})
#: MONAI transforms that look up and call other code by name: refused like an arbitrary target.
_NAME_LOOKUP_TRANSFORMS = frozenset({"TorchVision", "TorchVisiond", "TorchIO", "TorchIOd", "RandTorchVision",
                                     "RandTorchVisiond", "RandTorchIO", "RandTorchIOd", "CuCIM", "CuCIMd",
                                     "RandCuCIM", "RandCuCIMd", "MedNISTReader"})
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_UNARY = (ast.USub, ast.UAdd, ast.Not, ast.Invert)


def split_id(ref: str) -> list[str]:
    """A MONAI config id (``a#b#0`` or ``a::b::0``) as its parts."""
    return [p for p in re.split(r"::|#", ref) if p != ""]


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class _Checker:
    def __init__(self, expr: str, where: str, source: str, refs: list[str]) -> None:
        self.expr, self.where, self.source, self.refs = expr, where, source, refs

    def fail(self, what: str) -> UnsafeBundleError:
        what = re.sub(r"medseg_ref_(\d+)", lambda m: "@" + self.refs[int(m.group(1))], what)
        return UnsafeBundleError(
            f"{self.source}: key '{self.where}': the expression {self.expr!r} {what}. medseg evaluates only "
            "literals, @references, arithmetic, comparisons, conditionals, subscripts, len/list/range, "
            "torch.device, dtype names and lambdas of those. Fix the config, or run a bundle you trust with "
            "--trust-bundle-code."
        )

    def check(self, node: ast.AST, names: frozenset[str]) -> None:
        if isinstance(node, ast.Expression):
            self.check(node.body, names)
        elif isinstance(node, ast.Constant):
            return
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            for e in node.elts:
                self.check(e, names)
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if k is None:
                    raise self.fail("unpacks a mapping with **")
                self.check(k, names)
                self.check(v, names)
        elif isinstance(node, ast.Name):
            if node.id not in names and node.id not in _SAFE_BUILTINS:
                raise self.fail(f"uses the name {node.id!r}")
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, _BINOPS):
                raise self.fail(f"uses the operator {type(node.op).__name__}")
            self.check(node.left, names)
            self.check(node.right, names)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, _UNARY):
                raise self.fail(f"uses the operator {type(node.op).__name__}")
            self.check(node.operand, names)
        elif isinstance(node, ast.BoolOp):
            for v in node.values:
                self.check(v, names)
        elif isinstance(node, ast.Compare):
            self.check(node.left, names)
            for c in node.comparators:
                self.check(c, names)
        elif isinstance(node, ast.IfExp):
            for n in (node.test, node.body, node.orelse):
                self.check(n, names)
        elif isinstance(node, ast.Subscript):
            self.check(node.value, names)
            self.check(node.slice, names)
        elif isinstance(node, ast.Slice):
            for part in (node.lower, node.upper, node.step):
                if part is not None:
                    self.check(part, names)
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted is None:
                raise self.fail(f"reads the attribute {node.attr!r} of a computed value")
            head, _, tail = dotted.partition(".")
            if head not in _MODULES or tail not in _DTYPES:
                if dotted not in _SAFE_CALLS:
                    raise self.fail(f"reads {dotted!r}")
                raise self.fail(f"uses {dotted!r} without calling it")
        elif isinstance(node, ast.Call):
            self.call(node, names)
        elif isinstance(node, ast.Lambda):
            a = node.args
            if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.kw_defaults or a.posonlyargs:
                raise self.fail("defines a lambda with defaults or variable arguments")
            self.check(node.body, names | {arg.arg for arg in a.args})
        else:
            raise self.fail(f"uses {type(node).__name__} syntax")

    def call(self, node: ast.Call, names: frozenset[str]) -> None:
        func = node.func
        dotted = _dotted(func)
        if isinstance(func, ast.Name) and func.id in _SAFE_BUILTINS and func.id not in names:
            pass
        elif dotted in _SAFE_CALLS:
            if dotted == "torch.load":
                for kw in node.keywords:
                    if kw.arg == "weights_only" and not (isinstance(kw.value, ast.Constant) and kw.value.value is True):
                        raise self.fail("calls torch.load without weights_only=True")
                    if kw.arg not in ("map_location", "weights_only"):
                        raise self.fail(f"passes {kw.arg!r} to torch.load")
        elif dotted is None and isinstance(func, ast.Attribute):
            raise self.fail(f"calls the method {func.attr!r} of a computed value")
        else:
            raise self.fail(f"calls {dotted or type(func).__name__!r}")
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise self.fail("unpacks arguments with *")
            self.check(a, names)
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail("unpacks keyword arguments with **")
            self.check(kw.value, names)


def check_expression(expr: str, *, where: str, source: str) -> list[str]:
    """Check one ``$`` expression (without the ``$``); return the config ids it references.

    Raises
    ------
    UnsafeBundleError
        If the expression uses anything but the restricted grammar described in this module.
    """
    refs: list[str] = []

    def sub(m: re.Match[str]) -> str:
        refs.append(m.group(1))
        return f"medseg_ref_{len(refs) - 1}"

    text = _REF.sub(sub, expr)
    checker = _Checker(expr, where, source, refs)
    if "__" in text:
        raise checker.fail("names a dunder (double underscore)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise checker.fail("is not a single Python expression (statements and imports are not evaluated)") from None
    checker.check(tree, frozenset(f"medseg_ref_{i}" for i in range(len(refs))))
    return refs


_ALLOWED_CACHE: dict[str, str | None] = {}


def check_target(target: Any, *, where: str, source: str) -> str:
    """The full dotted name of an allowed ``_target_`` (a MONAI transform, network or inferer).

    Raises
    ------
    UnsafeBundleError
        For anything else (the message names the key and the target).
    """
    def refuse(why: str) -> UnsafeBundleError:
        return UnsafeBundleError(
            f"{source}: key '{where}#_target_': {target!r} {why}. medseg builds only MONAI transforms, networks "
            "and inferers from a bundle; a bundle that needs its own code (scripts/) runs only with "
            "--trust-bundle-code."
        )

    if not isinstance(target, str) or not target:
        raise refuse("is not a class name")
    if target.startswith(("$", "@", "%")) or "__" in target:
        raise refuse("is computed or names a dunder")
    name = target.rsplit(".", 1)[-1]
    if name in _NAME_LOOKUP_TRANSFORMS:
        raise refuse("looks up other code by name")
    full = _allowed_component(name)
    if full is None:
        raise refuse("is not a MONAI transform, network or inferer")
    if "." in target and not target.startswith("monai."):
        raise refuse("is outside MONAI")
    return full


def _allowed_component(name: str) -> str | None:
    if name in _ALLOWED_CACHE:
        return _ALLOWED_CACHE[name]
    import inspect

    import monai.inferers
    import monai.networks.nets
    import monai.transforms
    import torch

    found: str | None = None
    obj = getattr(monai.transforms, name, None)
    if inspect.isclass(obj) and issubclass(obj, monai.transforms.Transform) and name not in REPLACED_TRANSFORMS:
        found = f"monai.transforms.{name}"
    obj = getattr(monai.networks.nets, name, None)
    if found is None and inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
        found = f"monai.networks.nets.{name}"
    obj = getattr(monai.inferers, name, None)
    if found is None and inspect.isclass(obj) and issubclass(obj, monai.inferers.Inferer):
        found = f"monai.inferers.{name}"
    if found is None and name in REPLACED_TRANSFORMS:
        found = f"monai.transforms.{name}"  # allowed in the config; medseg replaces it before anything runs
    _ALLOWED_CACHE[name] = found
    return found


@dataclass(frozen=True)
class SafeConfig:
    """The part of a bundle config medseg runs, checked.

    Attributes
    ----------
    config : dict
        Only the checked top-level keys, ``_target_`` names rewritten to MONAI's full dotted names.
    keys : tuple of str
        Those top-level keys.
    ignored : tuple of str
        Top-level keys of the bundle that medseg never parses.
    """

    config: dict[str, Any]
    keys: tuple[str, ...]
    ignored: tuple[str, ...]


def _scan_dunders(value: Any, where: str, source: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _scan_dunders(v, f"{where}#{k}" if where else str(k), source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _scan_dunders(v, f"{where}#{i}", source)
    elif isinstance(value, str) and value.startswith("$") and "__" in value:
        raise UnsafeBundleError(
            f"{source}: key '{where}': the expression {value!r} names a dunder (double underscore); medseg refuses "
            "the whole bundle, even though it would not run that key. Remove it, or use --trust-bundle-code for a "
            "bundle you trust."
        )


def select_config(
    raw: Mapping[str, Any],
    roots: Iterable[str],
    *,
    source: str,
    trust_code: bool = False,
    rewrite_targets: Mapping[str, str] | None = None,
) -> SafeConfig:
    """Keep the top-level keys ``roots`` and everything they reference, checking each on the way.

    Parameters
    ----------
    raw : mapping
        The bundle config as read from JSON/YAML (nothing evaluated).
    roots : iterable of str
        Top-level keys medseg needs.
    source : str
        The config file, named in messages.
    trust_code : bool
        Skip the expression and target rules (``--trust-bundle-code``).
    rewrite_targets : mapping, optional
        With ``trust_code``: dotted-name prefixes to rewrite (``scripts.`` → the bundle's own module name).

    Raises
    ------
    UnsafeBundleError
        For an expression, target, macro or ``_mode_`` outside the rules, or a reference to a key that does not
        exist.
    """
    if not trust_code:
        _scan_dunders(raw, "", source)
    out: dict[str, Any] = {}
    todo = [r for r in roots]
    while todo:
        key = todo.pop()
        if key in out:
            continue
        if key not in raw:
            raise UnsafeBundleError(f"{source}: the config references '@{key}', which it does not define.")
        value = copy.deepcopy(raw[key])
        out[key] = value
        for ref in _walk(value, key, source, trust_code, rewrite_targets or {}, out, key):
            parts = split_id(ref)
            if not parts:
                raise UnsafeBundleError(f"{source}: key '{key}': relative reference '@{ref}' is not supported.")
            todo.append(parts[0])
    ignored = tuple(k for k in raw if k not in out)
    return SafeConfig(out, tuple(out), ignored)


def _walk(value: Any, where: str, source: str, trust: bool, rewrite: Mapping[str, str],
          out: dict[str, Any], top: str) -> list[str]:
    refs: list[str] = []
    if isinstance(value, dict):
        if "_target_" in value:
            target = value["_target_"]
            if trust:
                if isinstance(target, str):
                    for old, new in rewrite.items():
                        if target.startswith(old):
                            value["_target_"] = new + target[len(old):]
            else:
                value["_target_"] = check_target(target, where=where, source=source)
            mode = value.get("_mode_", "default")
            if mode not in ("default", "callable", "partial"):
                raise UnsafeBundleError(f"{source}: key '{where}#_mode_': {mode!r} is not run by medseg (only "
                                        "default, callable, partial).")
        for k, v in value.items():
            if k == "_target_":
                continue
            refs += _walk(v, f"{where}#{k}", source, trust, rewrite, out, top)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refs += _walk(v, f"{where}#{i}", source, trust, rewrite, out, top)
    elif isinstance(value, str):
        if value.startswith("%"):
            raise UnsafeBundleError(f"{source}: key '{where}': macro {value!r} reads another config; medseg does "
                                    "not follow macros. Copy the value in.")
        if value.startswith("$"):
            if trust:
                refs += [m.group(1) for m in _REF.finditer(value)]
            else:
                refs += check_expression(value[1:], where=where, source=source)
        elif value.startswith("@"):
            refs.append(value[1:])
    return refs
