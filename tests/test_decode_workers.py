"""load_volume(decode_workers=...): the choice of forked parallel decode is a parameter, never found out silently."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import OptionError
from medseg.io import dicom as dicom_io
from medseg.io import load_volume

SERIES = Path(__file__).parent / "data" / "totalseg_example" / "example_ct_dicom"  # 20 JPEG 2000 slices


def test_serial_and_automatic_decode_give_the_same_voxels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int | None] = []
    real = dicom_io._parallel_decode

    def spy(frames, workers=None):  # type: ignore[no-untyped-def]
        calls.append(workers)
        return real(frames, workers)

    monkeypatch.setattr(dicom_io, "_parallel_decode", spy)
    auto = load_volume(SERIES)
    serial = load_volume(SERIES, decode_workers=1)
    assert calls == [None, 1]
    assert np.array_equal(auto.array, serial.array) and np.allclose(auto.affine, serial.affine)


def test_asking_for_workers_where_forking_is_unsafe_warns(caplog: pytest.LogCaptureFixture) -> None:
    out: dict[str, np.ndarray] = {}
    caplog.set_level(logging.WARNING, logger="medseg.io.dicom")
    t = threading.Thread(target=lambda: out.setdefault("a", load_volume(SERIES, decode_workers=2).array))
    stop = threading.Event()
    idle = threading.Thread(target=stop.wait)  # a second thread in the process makes forking unsafe
    idle.start()
    try:
        t.start()
        t.join()
    finally:
        stop.set()
        idle.join()
    assert "a" in out
    assert any("decode_workers=2" in r.getMessage() and "serially" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_decode_workers_must_be_a_whole_number_from_1(bad: object) -> None:
    with pytest.raises(OptionError, match="decode_workers must be a whole number from 1"):
        load_volume(SERIES, decode_workers=bad)  # type: ignore[arg-type]
