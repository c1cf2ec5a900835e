"""Shared fixtures: the real samples in tests/data and tiny volumes whose axes cannot be mixed up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
pytest_plugins = ["pacs_fixtures"]  # orthanc, pacs, phantoms: a real Orthanc for the PACS tests


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except (ImportError, RuntimeError):  # pragma: no cover
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _cuda():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


def oblique_affine(spacing=(0.7, 1.3, 2.9), origin=(-12.5, 40.25, 7.0), angle_deg=23.0, flip=True) -> np.ndarray:
    """Anisotropic, rotated about an oblique axis, with one flipped axis and a non-zero origin."""
    a, b = np.radians(angle_deg), np.radians(angle_deg / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = rz @ rx
    if flip:
        rot = rot @ np.diag([1, -1, 1])
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(spacing)
    aff[:3, 3] = origin
    return aff


@pytest.fixture
def odd_volume():
    """A (7, 5, 4) int16 volume with distinct values on an oblique, anisotropic, flipped grid."""
    from medseg import Volume

    arr = np.arange(7 * 5 * 4, dtype=np.int16).reshape(7, 5, 4) - 50
    return Volume(arr, oblique_affine(), modality="CT")
