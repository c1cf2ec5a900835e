"""Sample data: a seeded phantom abdominal CT with its true labels, made on the spot (offline, no download)."""

from __future__ import annotations

from typing import Any

__all__ = ["SAMPLE_SEED", "SAMPLE_SHAPE", "phantom_sample"]

SAMPLE_SEED = 7
SAMPLE_SHAPE = (128, 128, 64)


def phantom_sample() -> list[tuple[Any, ...]]:
    """The phantom CT (HU) and its true organ and tumour labels, as napari layer data."""
    from medseg.phantom import make_phantom
    from medseg_napari._layers import image_layer_data, labels_layer_data

    phantom = make_phantom(SAMPLE_SEED, shape=SAMPLE_SHAPE, orientation="LPS")
    return [
        image_layer_data(phantom.image, f"phantom CT (seed {SAMPLE_SEED})"),
        labels_layer_data(phantom.labels, "phantom truth"),
    ]
