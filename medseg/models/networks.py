"""MONAI segmentation networks by name.

Cards name a network class of :mod:`monai.networks.nets`; only the segmentation networks listed in
:data:`NETWORKS` are accepted (a typo gets a "did you mean"). Checking a name does not import torch; building a
network does.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medseg.errors import ModelCardError, UnknownNetworkError
from medseg.schema import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["NETWORKS", "build_network", "canonical_network_name", "count_parameters"]

#: Segmentation networks of ``monai.networks.nets`` that a card may name.
NETWORKS: tuple[str, ...] = (
    "UNet",
    "BasicUNet",
    "BasicUNetPlusPlus",
    "SegResNet",
    "SegResNetDS",
    "DynUNet",
    "UNETR",
    "SwinUNETR",
    "AttentionUnet",
    "FlexibleUNet",
    "HighResNet",
    "VNet",
)


def canonical_network_name(name: str, *, source: str = "model card") -> str:
    """The MONAI class name for ``name`` (case-insensitive).

    Raises
    ------
    UnknownNetworkError
        If no network has that name; the message suggests the closest names and lists the supported ones.
    """
    by_lower = {n.lower(): n for n in NETWORKS}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    hint = did_you_mean(name, NETWORKS, n=3, cutoff=0.5, ignore_case=True)
    raise UnknownNetworkError(
        f"{source}: unknown network {name!r}{hint}. Supported MONAI networks: {', '.join(NETWORKS)}."
    )


def build_network(name: str, kwargs: Mapping[str, Any], *, source: str = "model card") -> torch.nn.Module:
    """Instantiate ``monai.networks.nets.<name>(**kwargs)`` in eval mode.

    Raises
    ------
    UnknownNetworkError
        If ``name`` is not a supported network.
    ModelCardError
        If the keyword arguments do not fit the network's constructor (the message shows its signature).
    """
    from monai.networks import nets

    cls = getattr(nets, canonical_network_name(name, source=source))
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
    try:
        net = cls(**kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as exc:
        raise ModelCardError(
            f"{source}: cannot build {cls.__name__} from network.kwargs {dict(kwargs)}: {exc}. "
            f"Its signature is {cls.__name__}{inspect.signature(cls.__init__)}."
        ) from None
    return net.eval()


def count_parameters(net: torch.nn.Module) -> int:
    """Number of parameters of ``net``."""
    return int(sum(p.numel() for p in net.parameters()))
