"""Damaged files give the original volume or a MedsegError naming the damaged file — nothing else.

The DICOM cases flip 1–5 bits in the *header* (from the ``DICM`` marker up to the pixel data element) of the
first, middle or last slice along the normal of a phantom series and of the shared TotalSegmentator series: the
damage a bad disk or a broken transfer leaves. Every outcome is classified; the test fails on a volume that
differs from the original (grid or voxels), an error that does not name the damaged file, or an exception outside
the MedsegError family. Outcome counts are printed (``pytest -s``). Each case is seeded.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import warnings
from collections import Counter

import numpy as np
import pytest

from medseg import load_volume
from medseg.errors import MedsegError

#: Voxel centres of a loaded volume may move by at most this much (mm) to count as the original grid: bit flips
#: in the last digits of a direction cosine below the reader's 1e-4 orientation tolerance move far corners of a
#: 512-pixel slice by up to 0.05 mm.
GRID_ATOL_MM = 0.05


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


def header_length(path) -> int:
    """Bytes before the pixel data element (file meta and data set header)."""
    import pydicom

    with open(path, "rb") as fh:
        pydicom.dcmread(fh, stop_before_pixels=True)
        return fh.tell()


def flip_bits(data: bytes, rng: np.random.Generator, lo: int, hi: int) -> tuple[bytes, list[int]]:
    buf = bytearray(data)
    where = []
    for _ in range(int(rng.integers(1, 6))):
        pos = int(rng.integers(lo, hi))
        buf[pos] ^= 1 << int(rng.integers(0, 8))
        where.append(pos)
    return bytes(buf), where


def same_volume(vol, ref) -> bool:
    return (vol.shape == ref.shape and vol.same_grid(ref, atol_mm=GRID_ATOL_MM) and vol.array.dtype == ref.array.dtype
            and np.array_equal(vol.array, ref.array))


def classify(load, victim, ref, outcomes: Counter, failures: list, label: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vol = load()
    except MedsegError as exc:
        if victim.name in str(exc):
            outcomes["MedsegError naming the file"] += 1
        else:
            outcomes["MedsegError NOT naming the file"] += 1
            failures.append(f"{label}: error does not name {victim.name}: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - the point of the test: nothing else may escape
        outcomes[f"foreign {type(exc).__name__}"] += 1
        failures.append(f"{label}: {type(exc).__name__} escaped: {exc}")
        return
    if same_volume(vol, ref):
        outcomes["original volume"] += 1
    else:
        outcomes["CHANGED volume"] += 1
        failures.append(f"{label}: loaded {vol!r} / {vol.describe_grid()} instead of {ref.describe_grid()} "
                        f"(voxels equal: {vol.shape == ref.shape and np.array_equal(vol.array, ref.array)})")


@pytest.fixture
def decode_memo(monkeypatch):
    """Decode each distinct file content once: unchanged slices of a series are not decoded again for every case.

    The memo is keyed by the sha256 of the whole file, so a damaged file (different bytes) is always decoded for
    real; only byte-identical copies of undamaged slices reuse their earlier decode.
    """
    from medseg.io import dicom

    real = dicom._decoded
    memo: dict[str, np.ndarray] = {}

    def decoded(frame, cache):
        with open(frame.path, "rb") as fh:
            key = hashlib.sha256(fh.read()).hexdigest()
        if frame.frame is not None or key not in memo:
            arr = real(frame, cache)
            if frame.frame is not None:
                return arr
            memo[key] = arr.copy()
        return memo[key].copy()

    monkeypatch.setattr(dicom, "_decoded", decoded)
    monkeypatch.setattr(dicom, "_parallel_decode", lambda frames, workers=None: {})


def fuzz_series(folder, tmp_path, n_per_end: int, seed: int, *, skip: bool = False) -> tuple[Counter, list]:
    """Header bit flips in the first, middle and last slice of ``folder``'s series; outcomes and failures."""
    work = tmp_path / "series"
    shutil.copytree(folder, work)
    ref = load_volume(work)
    order = [p.replace(str(folder), str(work)) for p in ref.source.files]
    from pathlib import Path

    victims = {"first": Path(order[0]), "middle": Path(order[len(order) // 2]), "last": Path(order[-1])}
    outcomes: Counter = Counter()
    failures: list = []
    rng = np.random.default_rng(seed)
    for where, victim in victims.items():
        original = victim.read_bytes()
        hi = header_length(victim)
        for t in range(n_per_end):
            damaged, flips = flip_bits(original, rng, 128, hi)
            victim.write_bytes(damaged)
            classify(lambda: load_volume(work), victim, ref, outcomes, failures, f"{where} slice, case {t}, "
                     f"bytes {flips}")
        victim.write_bytes(original)
    return outcomes, failures


def report(name: str, outcomes: Counter, failures: list) -> None:
    print(f"\n{name}: {sum(outcomes.values())} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    for f in failures[:20]:
        print("  FAIL", f)


def test_header_bit_flips_in_end_and_middle_slices_of_a_phantom_series(tmp_path, decode_memo):
    from medseg.phantom import make_phantom, write_phantom_study

    study = write_phantom_study(make_phantom(5, shape=(40, 36, 24)), tmp_path / "study")
    outcomes, failures = fuzz_series(study.image_path, tmp_path, 80, seed=20261204)
    report("phantom series (24 slices)", outcomes, failures)
    assert sum(outcomes.values()) == 240
    assert outcomes["original volume"] > 0 and outcomes["MedsegError naming the file"] > 0  # both kinds occur
    assert not failures, "\n".join(failures[:20])


def test_header_bit_flips_in_end_and_middle_slices_of_the_totalsegmentator_series(tmp_path, data_dir, decode_memo):
    outcomes, failures = fuzz_series(data_dir / "totalseg_example" / "example_ct_dicom", tmp_path, 40, seed=15)
    report("TotalSegmentator series (20 JPEG 2000 slices, blank UIDs)", outcomes, failures)
    assert sum(outcomes.values()) == 120
    assert outcomes["original volume"] > 0 and outcomes["MedsegError naming the file"] > 0
    assert not failures, "\n".join(failures[:20])


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
    for t, (kind, corrupt) in enumerate(corruptions(data, rng, 240, header_len)):
        path = tmp_path / f"slice_{t:03d}"
        path.write_bytes(corrupt)
        before = outcomes["medseg_error"]
        check(path, outcomes)
        if kind == 0:  # every truncation (of the header or of the pixel values) is an error
            assert outcomes["medseg_error"] == before + 1, f"truncated copy {t} loaded"
        path.unlink()
    print(f"\nsingle CT slice: {outcomes}")
    assert outcomes["medseg_error"] >= 80


def test_truncated_slice_inside_a_series_folder_is_named(tmp_path, data_dir):
    src_dir = data_dir / "dicom_seg_example" / "ct_3slice"
    rng = np.random.default_rng(99)
    for victim in ("01.dcm", "02.dcm", "03.dcm"):  # 03 is the lowest slice, 01 the highest: both ends and middle
        data = (src_dir / victim).read_bytes()
        for t in range(6):
            folder = tmp_path / f"series_{victim}_{t}"
            shutil.copytree(src_dir, folder)
            (folder / victim).write_bytes(data[: int(rng.integers(0, len(data)))])
            with pytest.raises(MedsegError, match=rf"{folder}/{victim}"):
                load_volume(folder)
            vol = load_volume(folder, skip_unreadable=True) if t % 3 == 0 and victim != "02.dcm" else None
            if vol is not None:  # an end slice left out: two slices, and the record of the skipped file
                assert vol.shape[2] == 2 and [s.path for s in vol.source.skipped] == [str(folder / victim)]
            shutil.rmtree(folder)


# Byte ranges of the NIfTI-1 header that say nothing about the grid or the voxel values: data_type, db_name,
# extents, session_error, regular, dim_info (0..40 but sizeof_hdr), intent parameters and code (56..70), slice
# start (74..76), slice end/code, units? no: xyzt_units is kept out; cal/glmax/glmin, descrip, aux_file (120..252
# less 123), intent_name (328..344).
NIFTI_FREE_BYTES = set(range(4, 40)) | set(range(56, 70)) | set(range(74, 76)) | set(range(120, 123)) \
    | set(range(124, 252)) | set(range(328, 344))


@pytest.mark.parametrize("compressed", [False, True])
def test_corrupt_nifti(tmp_path, data_dir, compressed):
    raw = gzip.decompress((data_dir / "totalseg_example" / "example_mr_sm.nii.gz").read_bytes())
    ref = load_volume(data_dir / "totalseg_example" / "example_mr_sm.nii.gz")
    rng = np.random.default_rng(7 if compressed else 8)
    outcomes: Counter = Counter()
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
        changed = {i for i in range(352) if i < len(corrupt) and corrupt[i] != raw[i]}
        try:
            vol = load_volume(path)
        except MedsegError as exc:
            assert path.name in str(exc), f"error does not name the file: {exc}"
            outcomes["MedsegError naming the file"] += 1
        else:
            same = same_volume(vol, ref)
            if kind != 0 and changed <= NIFTI_FREE_BYTES:
                # Only bytes that carry no geometry or values changed: the volume must be the original one.
                assert same, f"case {t}: bytes {sorted(changed)} changed the volume: {vol!r}"
            outcomes["original volume" if same else "other volume (geometry or values fields hit)"] += 1
        path.unlink()
    print(f"\nNIfTI ({'gzip' if compressed else 'raw'}): " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    assert outcomes["MedsegError naming the file"] >= 40
