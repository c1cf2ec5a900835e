"""Models: YAML model cards, the registry (shipped cards, user folders, MONAI bundles), MONAI networks by name,
and safe weight loading. Importing this package does not import torch."""

from medseg.models.cards import ModelCard, load_card, parse_card
from medseg.models.registry import (
           ModelListing,
           describe_model,
           find_model,
           list_models,
           load_bundle,
           shipped_dir,
)

__all__ = [
           "ModelCard",
           "ModelListing",
           "describe_model",
           "find_model",
           "list_models",
           "load_bundle",
           "load_card",
           "parse_card",
           "shipped_dir",
]
