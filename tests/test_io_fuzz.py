"""Random corruptions (truncation, bit flips, byte overwrites) give a clean load or a MedsegError naming the file."""

from __future__ import annotations

import gzip
import shutil
import warnings

import numpy as np
import pytest

from medseg import load_volume
from medseg.errors import MedsegError


def corruptions(data: bytes, rng: np.random.Generator, n: int, header_len: int):
    """``n`` corrupted copies of ``data``: a third truncated, a third bit-flipped, a third with bytes overwritten."""
    for t in range(n):
        buf = bytearray(data)
        kind = t % 3
        if kind == 0:
            buf = buf[: int(rng.integers(0, len(buf)))]
        elif kind == 1:
            for _ in range(int(rng.integers(1, 6))):
                pos = int(rng.integers(0, header_len))
                buf[pos] ^= 1 << int(rng.integers(0, 8))
        else:
            pos = int(rng.integers(0, header_len))
            buf[pos : pos + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        yield kind, bytes(buf)


def check(path, outcomes):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_volume(path)
        outcomes["loaded"] += 1
    except MedsegError as exc:
        assert path.name in str(exc), f"error does not name the file: {exc}"
        outcomes["medseg_error"] += 1
    # Any other exception type fails the test with its traceback.


def test_corrupt_dicom_slices(tmp_path, data_dir):
    import pydicom

    src = data_dir / "dicom_seg_example" / "ct_3slice" / "02.dcm"
    data = src.read_bytes()
    ds = pydicom.dcmread(src)
    header_len = len(data) - len(ds.PixelData)  # everything before the pixel values
    rng = np.random.default_rng(1234)
    outcomes = {"loaded": 0, "medseg_error": 0}
    for t, (_, corrupt) in enumerate(corruptions(data, rng, 240, header_len)):
        path = tmp_path / f"slice_{t:03d}"
        path.write_bytes(corrupt)
        check(path, outcomes)
        path.unlink()
    assert outcomes["medseg_error"] >= 80  # truncations alone are 80 and must all fail cleanly
    assert sum(outcomes.values()) == 240


def test_corrupt_dicom_slice_inside_a_series_folder(tmp_path, data_dir):
    src_dir = data_dir / "dicom_seg_example" / "ct_3slice"
    data = (src_dir / "02.dcm").read_bytes()
    rng = np.random.default_rng(99)
    errors = 0
    for t, (kind, corrupt) in enumerate(corruptions(data, rng, 30, 1500)):
        folder = tmp_path / f"series_{t:02d}"
        shutil.copytree(src_dir, folder)
        (folder / "02.dcm").write_bytes(corrupt)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_volume(folder)
        except MedsegError as exc:
            errors += 1
            assert str(folder) in str(exc)
            if kind == 0 and "02.dcm" not in str(exc):  # a truncated slice is named, unless it was dropped whole
                assert "missing" in str(exc) or "no DICOM image series" in str(exc) or "differ" in str(exc), exc
        shutil.rmtree(folder)
    assert errors >= 10


@pytest.mark.parametrize("compressed", [False, True])
def test_corrupt_nifti(tmp_path, data_dir, compressed):
    raw = gzip.decompress((data_dir / "totalseg_example" / "example_mr_sm.nii.gz").read_bytes())
    rng = np.random.default_rng(7 if compressed else 8)
    outcomes = {"loaded": 0, "medseg_error": 0}
    for t, (kind, corrupt) in enumerate(corruptions(raw, rng, 120, 352)):
        if compressed:
            gz = gzip.compress(raw if kind == 0 else corrupt, compresslevel=1)
            if kind == 0:  # truncate the compressed stream itself
                gz = gz[: int(rng.integers(0, len(gz)))]
            path = tmp_path / f"mr_{t:03d}.nii.gz"
            path.write_bytes(gz)
        else:
            path = tmp_path / f"mr_{t:03d}.nii"
            path.write_bytes(corrupt)
        check(path, outcomes)
        path.unlink()
    assert outcomes["medseg_error"] >= 40
