"""An independent converter as the oracle: medseg's voxels and world coordinates equal dcm2niix's.

For every DICOM series in tests/data, the phantom series in several orientations (RAS, LPS, left-handed RAI,
descending-z LPI, oblique), the transfer syntaxes medseg decodes in other ways (big endian, deflated, JPEG 2000)
and the multi-volume cases (a Philips-style enhanced field map, a 4D series of single-frame files), dcm2niix (the
PyPI package's binary) converts the same files and both results are compared **by world position**: the mapping
from our voxel indices to dcm2niix's must be an exact signed axis permutation with an integer shift (voxel
centres within 1e-3 voxel), and the values at the same world positions must be equal. CT is compared in HU
(dcm2niix's scl_slope/scl_inter applied), MR as stored (medseg does not rescale MR; dcm2niix's unscaled values).

Not compared: Siemens mosaics (dcm2niix unpacks the tiles into slices; medseg loads a mosaic as the stored 2D
image, see docs/io.md) — there is none in tests/data.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import make_philips_fieldmap, make_slice, write_series

from medseg import Volume, load_volume

dcm2niix = pytest.importorskip("dcm2niix", reason="the dcm2niix package (dev extra) is the oracle")


def run_dcm2niix(src: Path, out: Path) -> list[Path]:
    """dcm2niix's NIfTI files for ``src`` (a folder or one file), sorted by name."""
    out.mkdir(parents=True, exist_ok=True)
    args = [dcm2niix.bin, "-z", "n", "-b", "n", "-f", "%s_%e_%t", "-o", str(out)]
    if src.is_file():
        args += ["-s", "y"]  # this file only
    proc = subprocess.run([*args, str(src)], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(out.glob("*.nii"))


def on_our_grid(theirs: np.ndarray, their_affine: np.ndarray, ours: Volume) -> np.ndarray:
    """dcm2niix's values at our voxel centres; fails unless our grid is theirs with axes permuted/flipped/shifted."""
    m = np.linalg.inv(their_affine) @ ours.affine
    r, t = np.round(m[:3, :3]), np.round(m[:3, 3])
    np.testing.assert_allclose(m[:3, :3], r, atol=1e-3, err_msg="grids differ beyond an axis permutation")
    np.testing.assert_allclose(m[:3, 3], t, atol=1e-3, err_msg="voxel centres do not coincide")
    assert sorted(np.abs(r).sum(axis=0).tolist()) == [1, 1, 1] and sorted(np.abs(r).sum(axis=1).tolist()) == [1, 1, 1]
    perm, index = [], []
    for a in range(3):
        b = int(np.flatnonzero(r[:, a])[0])
        sign = int(r[b, a])
        idx = sign * np.arange(ours.shape[a]) + int(t[b])
        assert idx.min() >= 0 and idx.max() < theirs.shape[b], f"our axis {a} runs outside dcm2niix's axis {b}"
        perm.append(b)
        index.append(idx)
    return theirs.transpose(perm)[np.ix_(*index)]


def assert_matches(ours: Volume, nifti: Path, *, volume: int | None = None) -> None:
    import nibabel as nib

    img = nib.load(str(nifti))
    data = img.get_fdata() if ours.modality != "MR" else np.asarray(img.dataobj.get_unscaled())
    if data.ndim == 4:
        data = data[..., 0 if volume is None else volume]
    assert data.ndim == 3, data.shape
    expected = on_our_grid(data, img.affine, ours)
    np.testing.assert_array_equal(ours.array.astype(np.float64), expected.astype(np.float64))


def compare_series(src: Path, tmp_path: Path, **load) -> Volume:
    ours = load_volume(src, **load)
    [nifti] = run_dcm2niix(src, tmp_path / "dcm2niix")
    assert_matches(ours, nifti)
    return ours


@pytest.mark.parametrize("series", ["dicom_seg_example/ct_3slice", "totalseg_example/example_ct_dicom"])
def test_real_series_equal_dcm2niix(tmp_path, data_dir, series):
    vol = compare_series(data_dir / series, tmp_path)
    assert vol.shape[2] in (3, 20)


def rotated(volume: Volume, degrees: float) -> Volume:
    """The same voxels on a grid rotated about the k axis (an oblique acquisition)."""
    a = np.radians(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0, 0], [np.sin(a), np.cos(a), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return Volume(volume.array, rot @ volume.affine, modality=volume.modality)


@pytest.mark.parametrize("variant", ["RAS", "LPS", "RAI", "LPI", "oblique"])
def test_phantom_series_equal_dcm2niix(tmp_path, variant):
    from medseg.io import write_dicom_series
    from medseg.phantom import make_phantom

    code = "LPS" if variant == "oblique" else variant
    image = make_phantom(11, shape=(40, 34, 12), orientation=code).image
    if variant == "oblique":
        image = rotated(image, 17.0)
    write_dicom_series(image, tmp_path / "ct", seed=3)
    ours = compare_series(tmp_path / "ct", tmp_path)
    if variant == "oblique":
        assert ours.is_oblique
    else:  # a left-handed grid (RAI, LPI: slices descending along the normal) reads back with k reversed
        assert ours.orientation == (code if code[2] == "S" else code[:2] + "S")


def _resave(path: Path, syntax: str) -> None:
    ds = pydicom.dcmread(path)
    if syntax == "big-endian":
        arr = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", ["big-endian", "deflated"])
def test_big_endian_and_deflated_series_equal_dcm2niix(tmp_path, syntax):
    """Both load; dcm2niix converts the same series written little endian (it reads no deflated files)."""
    write_series(tmp_path / "le", 4, step=2.5, modality="MR", intercept=0.0)
    paths = write_series(tmp_path / "ct", 4, step=2.5, modality="MR", intercept=0.0)
    for p in paths:
        _resave(p, syntax)
    assert str(pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID) == (
        pydicom.uid.ExplicitVRBigEndian if syntax == "big-endian" else pydicom.uid.DeflatedExplicitVRLittleEndian)
    ours = load_volume(tmp_path / "ct")
    [nifti] = run_dcm2niix(tmp_path / "le", tmp_path / "dcm2niix")
    assert_matches(ours, nifti)
    if syntax == "big-endian":  # dcm2niix reads big endian itself too
        [nifti_be] = run_dcm2niix(tmp_path / "ct", tmp_path / "dcm2niix_be")
        assert_matches(ours, nifti_be)


def test_high_bits_beyond_bits_stored_are_masked_as_dcm2niix_does(tmp_path):
    """A Siemens-like 12-bit series with data in the 4 unused high bits: 4095 comes back, not 65535."""
    (tmp_path / "mr").mkdir()
    stored = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 7) % 4096
    for k in range(3):
        ds = make_slice((0, 0, 2.0 * k), modality="MR", intercept=0.0)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.PixelData = ((stored + k) % 4096 | 0xF000).astype(np.uint16).tobytes()  # high bits all set
        ds.save_as(tmp_path / "mr" / f"s{k}", enforce_file_format=True)
    ours = compare_series(tmp_path / "mr", tmp_path)
    assert ours.array.max() == 4095 and ours.array.dtype == np.uint16
    np.testing.assert_array_equal(ours.array[:, :, 0], stored.T)


def test_philips_fieldmap_volumes_equal_dcm2niix(tmp_path):
    src = tmp_path / "fieldmap.dcm"
    make_philips_fieldmap(src)
    niftis = run_dcm2niix(src, tmp_path / "dcm2niix")
    # dcm2niix writes the magnitude and (suffix _ph) the field map as two files.
    [magnitude] = [p for p in niftis if not p.stem.endswith("_ph")]
    [fieldmap] = [p for p in niftis if p.stem.endswith("_ph")]
    for n, nifti in ((0, magnitude), (1, fieldmap)):
        vol = load_volume(src, volume=n)
        assert vol.shape == (32, 24, 32) and vol.modality == "MR"
        assert_matches(vol, nifti)


def test_4d_series_of_single_frame_files_equals_dcm2niix(tmp_path):
    """Three time points at the same 5 positions, files named and numbered out of order."""
    folder = tmp_path / "dce"
    folder.mkdir()
    rng = np.random.default_rng(4)
    names = rng.permutation(15)
    for t in range(3):
        for k in range(5):
            n = t * 5 + k
            ds = make_slice((1.0, 2.0, 3.0 + 2.5 * k), modality="MR", intercept=0.0, instance_number=n + 1,
                            pixels=(100 * t + 10 * k + np.arange(24 * 32).reshape(24, 32) % 97).astype(np.int16))
            ds.TemporalPositionIdentifier = t + 1
            ds.NumberOfTemporalPositions = 3
            ds.AcquisitionNumber = t + 1
            ds.AcquisitionTime = f"1200{t:02d}.000000"
            ds.TriggerTime = 1000.0 * t
            ds.save_as(folder / f"f{names[n]:02d}", enforce_file_format=True)
    [nifti] = run_dcm2niix(folder, tmp_path / "dcm2niix")
    for t in range(3):
        vol = load_volume(folder, volume=t)
        assert vol.shape == (32, 24, 5)
        assert_matches(vol, nifti, volume=t)
