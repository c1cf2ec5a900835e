"""The numpydoc Examples of the notebook-facing helpers run as doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["medseg.schema", "medseg.files", "medseg.manifest", "medseg.workflow",
                                    "medseg.io.dicom_sr"])
def test_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
