"""Loading weights safely: sha256 first, then ``torch.load(weights_only=True)`` or TorchScript.

A checkpoint that holds pickled Python objects (anything but tensors, numbers, strings and containers of them) is
refused: unpickling can run arbitrary code. TorchScript files (``torch.jit.save``) are accepted as whole modules.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medseg.errors import (
    CheckpointMismatchError,
    ChecksumMismatchError,
    UnsafeCheckpointError,
    WeightsError,
)
from medseg.files import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["is_torchscript", "load_state_dict", "load_weights", "verify_sha256"]

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "network", "net", "weights")


def verify_sha256(path: str | Path, expected: str | None) -> str:
    """Check ``path`` against ``expected`` (hex); return the actual digest.

    Raises
    ------
    WeightsError
        If the file does not exist.
    ChecksumMismatchError
        If the digests differ.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found. Put it next to the model card or fix 'weights.file'.")
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        raise ChecksumMismatchError(
            f"{path}: sha256 is {actual} but the model card expects {expected.lower()}. The file is damaged or "
            "not the one the card describes; refusing to load it."
        )
    if expected is None:
        logger.warning("%s has no sha256 in its model card; loaded unchecked (sha256 %s).", path.name, actual)
    return actual


def is_torchscript(path: str | Path) -> bool:
    """True for a ``torch.jit.save`` archive (a zip holding ``code/`` and ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1].startswith("code/") for n in names) and any(
        n.endswith("constants.pkl") for n in names
    )


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        raise WeightsError(
            f"{path}: expected a state dict (parameter name → tensor), optionally under one of {_WRAPPER_KEYS}; "
            f"found {type(obj).__name__}" + (f" with keys {list(obj)[:8]}" if isinstance(obj, Mapping) else "") + "."
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict(path: str | Path, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, loaded with ``weights_only=True`` after the sha256 check.

    Raises
    ------
    ChecksumMismatchError
        If the sha256 differs from ``sha256``.
    UnsafeCheckpointError
        If the file holds pickled Python objects.
    WeightsError
        If the file is not a checkpoint or holds no state dict.
    """
    import pickle

    import torch

    path = Path(path)
    verify_sha256(path, sha256)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text or "global" in text.lower().split("weightsunpickler error")[-1]:
            detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
            raise UnsafeCheckpointError(
                f"{path}: the checkpoint holds pickled Python objects, which medseg refuses to load (they can run "
                f"code). Re-save only the weights: torch.save(model.state_dict(), path). ({detail[:200]})"
            ) from None
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (the file is damaged or of another kind).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({exc}).") from None
    return _unwrap(obj, path)


def load_weights(
    network: torch.nn.Module | None,
    path: str | Path,
    *,
    sha256: str | None = None,
    format: Literal["auto", "state_dict", "torchscript"] = "auto",
) -> torch.nn.Module:
    """Load weights into ``network`` (state dict) or load a whole TorchScript module; returns the module to run.

    Parameters
    ----------
    network : torch.nn.Module or None
        Network built from the card; may be None only for TorchScript files.
    path : path
        ``.pt``/``.pth`` state dict (possibly wrapped, e.g. ``{"state_dict": ...}``) or a TorchScript archive.
    sha256 : str, optional
        Expected hex digest; checked before anything is unpickled.

    Raises
    ------
    ChecksumMismatchError, UnsafeCheckpointError, WeightsError
        See :func:`load_state_dict`.
    CheckpointMismatchError
        If parameter names or shapes differ; the message lists missing and unexpected keys.
    """
    import torch

    path = Path(path)
    if format == "torchscript" or (format == "auto" and is_torchscript(path)):
        verify_sha256(path, sha256)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise WeightsError(f"{path}: not a loadable TorchScript module ({exc}).") from None
        logger.info("loaded TorchScript module %s", path.name)
        return module.eval()
    if network is None:
        raise WeightsError(f"{path}: a state dict needs a network from the model card; none was given.")
    state = load_state_dict(path, sha256=sha256)
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or wrong_shape:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "") if keys else "none"

        raise CheckpointMismatchError(
            f"{path}: the checkpoint does not match the network {type(network).__name__} built from the card.\n"
            f"  missing keys: {show(missing)}\n  unexpected keys: {show(unexpected)}\n"
            f"  shape mismatches: {show(wrong_shape)}\n"
            "Check network.kwargs in the card (channels, strides, out_channels) against how the model was trained."
        )
    network.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s", len(state), path.name)
    return network.eval()
