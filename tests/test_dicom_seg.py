"""DICOM SEG in and out (medseg.io.dicom_seg), the curated segment codes, and source references that follow voxels.

An independent decoder (:func:`decode_with_pydicom`, written here from pydicom and the standard's per-frame plane
positions, sharing no code with medseg's reader) checks every SEG medseg writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import make_enhanced_ct, write_series

from medseg import Volume
from medseg.errors import (
    DicomSegError,
    EmptySegmentationError,
    GeometryError,
    GridMismatchError,
    OverlappingSegmentsError,
    SegmentCodeError,
    SourceUidError,
)
from medseg.io import load_segmentation, load_volume, read_seg_info, write_dicom_seg
from medseg.io.dicom_seg import SegAlgorithm
from medseg.labels import Label, LabelTable, SegmentCode, standard_segment_code, standard_segment_codes
from medseg.resample import as_orientation, reorient_to, resample_to

DATA = Path(__file__).parent / "data"
ALGO = SegAlgorithm("test-model", "1.0", "ab" * 32)
TABLE = LabelTable([Label(1, "liver", (221, 130, 101)), Label(3, "kidney_left", (185, 102, 83)),
                    Label(4, "kidney_right", (212, 126, 151)), Label(6, "kidney_tumour", (0, 200, 255), "lesion")])


# ---- an independent reader ------------------------------------------------------------------------------------
def decode_with_pydicom(seg_path: Path, scan: Volume) -> np.ndarray:
    """Label map on ``scan``'s grid from pydicom alone: each frame placed by its ImagePositionPatient.

    Label values: "label value N" in SegmentDescription when present, else the segment number.
    """
    ds = pydicom.dcmread(seg_path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    value = {}
    for item in ds.SegmentSequence:
        text = str(item.get("SegmentDescription", ""))
        value[int(item.SegmentNumber)] = int(text.split()[-1]) if text.startswith("label value") else int(
            item.SegmentNumber)
    out = np.zeros(scan.shape, dtype=np.int32)
    r, c = np.mgrid[: ds.Rows, : ds.Columns]
    for f, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = np.array(fg.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        lps = ipp + c[..., None] * col_mm * iop[:3] + r[..., None] * row_mm * iop[3:]
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.round(scan.voxel_ijk(ras)).astype(int)
        frame = frames[f]
        if ds.SegmentationType == "LABELMAP":
            vals = np.vectorize(lambda n: value.get(int(n), 0))(frame)
            keep = frame != 0
        else:
            seg = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            keep = frame != 0
            vals = np.full(frame.shape, value[seg])
        i, j, k = ijk[keep].T
        out[i, j, k] = vals[keep]
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:  # make test installs it (.ci/ensure-system-packages)
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    res = subprocess.run([exe, str(path)], check=False, capture_output=True, text=True, timeout=120)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def blobs(scan: Volume, seed: int = 0) -> Volume:
    """Labels 1, 3, 4, 6 as boxes and a sphere on the scan's grid (every slice differs)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(scan.shape, dtype=np.uint8)
    ii, jj, kk = np.indices(scan.shape)
    sh = np.array(scan.shape)
    arr[: sh[0] // 2, : sh[1] // 2, : max(1, sh[2] - 1)] = 1
    arr[sh[0] // 2 :, sh[1] // 3 :, sh[2] // 2 :] = 3
    arr[sh[0] // 2 :, : sh[1] // 4, :] = 4
    c = sh / 3
    arr[((ii - c[0]) ** 2 + (jj - c[1]) ** 2 + (kk - c[2]) ** 2) < (min(sh) / 4) ** 2] = 6
    arr[rng.random(scan.shape) < 0.02] = 0
    return scan.with_array(arr, labels=TABLE)


@pytest.fixture
def series(tmp_path: Path) -> Path:
    """A 5-slice axial CT (32 columns × 24 rows) whose file names run against the slice order."""
    write_series(tmp_path / "ct", 5)
    return tmp_path / "ct"


# ---- curated codes --------------------------------------------------------------------------------------------
def test_codes_cover_shipped_cards_ct_basic_and_totalsegmentator() -> None:
    from medseg.models import list_models

    names = {n for card in list_models().cards if card.labels for n in card.labels.names.values()}
    assert {"liver", "kidney_tumour", "lung_left", "airway", "bone", "body"} <= names  # shipped cards + ct-basic
    classes = json.loads((DATA / "totalseg_example" / "classes.json").read_text())
    names |= set(classes["total_v1"].values()) | set(classes["total"].values())
    missing = sorted(n for n in names if standard_segment_code(n) is None)
    assert missing == []
    assert len(classes["total_v1"]) == 104


def test_laterality_is_a_modifier_of_one_type() -> None:
    left, right = standard_segment_code("kidney_left"), standard_segment_code("kidney_right")
    assert left is not None and right is not None
    assert left.type == right.type and left.type.meaning == "Kidney"
    assert (left.modifier.meaning, right.modifier.meaning) == ("Left", "Right")  # type: ignore[union-attr]
    assert standard_segment_code("liver").modifier is None  # type: ignore[union-attr]
    tumour = standard_segment_code("liver_tumour")
    assert tumour is not None and tumour.category.value == "49755003" and tumour.region.meaning == "Liver"  # type: ignore[union-attr]


def test_codes_agree_with_the_dicom_dictionary() -> None:
    """Every code is in pydicom's DICOM PS3.16 dictionary with that meaning, or listed as an exception."""
    from importlib import resources

    from pydicom.sr._concepts_dict import concepts

    meanings: dict[str, set[str]] = {}
    for entry in concepts["SCT"].values():
        for code, (meaning, _) in entry.items():
            meanings.setdefault(code, set()).add(meaning)
    data = json.loads(resources.files("medseg").joinpath("data/segment_codes.json").read_text())
    extra = data["_not_in_dicom_dictionary"]
    assert set(extra).isdisjoint(meanings)
    for name, code in standard_segment_codes().items():
        for part in (code.category, code.type, code.modifier, code.region, code.region_modifier):
            if part is None:
                continue
            assert part.scheme == "SCT", name
            assert part.meaning in meanings.get(part.value, set()) or extra.get(part.value) == part.meaning, (name, part)
    assert {c.category.meaning for c in standard_segment_codes().values()} <= {
        "Anatomical Structure", "Morphologically Abnormal Structure", "Tissue"}  # DICOM CID 7150


def test_label_table_json_keeps_codes(tmp_path: Path) -> None:
    code = standard_segment_code("spleen")
    table = LabelTable([Label(2, "milz", (1, 2, 3), code=code)])
    assert LabelTable.load(table.save(tmp_path / "t.json"))[2].code == code


# ---- source references follow the voxels ----------------------------------------------------------------------
def _check_slices(vol: Volume) -> None:
    """Each slice's instance (found by position) is the file whose ImagePositionPatient is that slice's plane."""
    refs = vol.source
    assert refs is not None
    si = refs.slice_instances(vol)
    for s, n in enumerate(si.instance):
        ds = pydicom.dcmread(refs.files[n])
        assert ds.SOPInstanceUID == refs.sop_instance_uids[n]
        ijk = [0, 0, 0]
        ijk[si.axis] = s
        # the plane of slice s contains the file's first pixel
        ras = np.array(ds.ImagePositionPatient, dtype=float) * [-1, -1, 1]
        assert np.isclose(vol.voxel_ijk(ras)[si.axis], s, atol=1e-3)
        # and the voxels of slice s are the file's pixels (dicom_factory: value = 100 * rank + 3 r + c - 1024)
        plane = np.take(vol.array, s, axis=si.axis)
        rank = round((float(plane.max()) + 1024 - 3 * 23 - 31) / 100)
        assert rank == round((ds.pixel_array.max() - 3 * 23 - 31) / 100)


@pytest.mark.parametrize("code", ["LPS", "RAS", "LPI", "SLP", "ASR", "IRP"])
def test_source_references_follow_reorientation(series: Path, code: str) -> None:
    ct = load_volume(series)
    _check_slices(as_orientation(ct, code))


def test_source_references_follow_every_axis_operation(series: Path) -> None:
    ct = load_volume(series)
    flipped = as_orientation(ct, "RAI")
    _check_slices(reorient_to(flipped, ct))  # type: ignore[arg-type]
    _check_slices(resample_to(flipped, as_orientation(ct, "SRA")))
    _check_slices(flipped.with_array(flipped.array * 0 + flipped.array))
    # the dcmqi CT: after "LPI" slice 0 is the file with the lowest z... files run 01, 02, 03 = descending z
    real = load_volume(DATA / "dicom_seg_example" / "ct_3slice")
    lpi = as_orientation(real, "LPI")
    si = lpi.source.slice_instances(lpi)  # type: ignore[union-attr]
    assert [Path(lpi.source.files[n]).name for n in si.instance] == ["01.dcm", "02.dcm", "03.dcm"]  # type: ignore[union-attr]
    sup = as_orientation(real, "LPS")
    assert [Path(sup.source.files[n]).name for n in sup.source.slice_instances(sup).instance] == [  # type: ignore[union-attr]
        "03.dcm", "02.dcm", "01.dcm"]


def test_slice_instances_refuses_a_resampled_volume(series: Path) -> None:
    ct = load_volume(series)
    half = Volume(ct.array[::2], ct.affine @ np.diag([2.0, 1, 1, 1]), source=ct.source)
    shifted = Volume(ct.array, ct.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0.5], [0, 0, 0, 1]]),
                     source=ct.source)
    with pytest.raises(GeometryError, match="do not sit on the source's slice planes"):
        ct.source.slice_instances(shifted)  # type: ignore[union-attr]
    assert ct.source.slice_instances(half).axis == 2  # type: ignore[union-attr]


def test_volume_does_not_import_io() -> None:
    """The volume ↔ io.convert cycle is gone: volume.py imports only the foundation geometry module."""
    import ast

    import medseg.volume

    tree = ast.parse(Path(medseg.volume.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith("medseg.io") for m in imported)
    assert "medseg" in imported  # from medseg import geometry


# ---- writing and reading back ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
@pytest.mark.parametrize("variant", ["axial", "descending", "oblique", "sagittal", "odd_columns", "blank_charset"])
def test_round_trip_on_series_variants(tmp_path: Path, seg_type: str, variant: str) -> None:
    kwargs: dict = {}
    if variant == "descending":
        kwargs["step"] = -2.0
    elif variant == "oblique":
        a, b = np.radians(20), 0.3
        kwargs["iop"] = (np.cos(a), np.sin(a), 0, -np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b))
    elif variant == "sagittal":
        kwargs["iop"] = (0, 1, 0, 0, 0, -1)
    elif variant == "odd_columns":
        kwargs.update(rows=23, cols=33)  # 759 bits per 1-bit frame: rows not byte-aligned
    write_series(tmp_path / "ct", 6, **kwargs)
    if variant == "blank_charset":
        for f in (tmp_path / "ct").iterdir():
            ds = pydicom.dcmread(f)
            ds.SpecificCharacterSet = ""
            ds.save_as(f)
    ct = load_volume(tmp_path / "ct")
    labels = blobs(ct)
    path = write_dicom_seg(as_orientation(labels, "RAS"), ct, tmp_path / "out.seg", seg_type=seg_type,  # type: ignore[arg-type]
                           algorithm=ALGO)
    back = load_segmentation(path, reference=ct)
    assert back.same_grid(ct)
    np.testing.assert_array_equal(back.array, labels.array)
    np.testing.assert_array_equal(decode_with_pydicom(path, ct), labels.array)
    assert back.labels is not None and back.labels.names == TABLE.names
    assert back.labels[6].kind == "lesion" and back.labels[3].code == standard_segment_code("kidney_left")
    own = load_volume(path)  # the SEG's own frame grid, then onto the scan by world position
    np.testing.assert_array_equal(resample_to(own, ct, interpolation="nearest").array, labels.array)


def test_binary_seg_validates_and_records_segments(tmp_path: Path, series: Path) -> None:
    ct = load_volume(series)
    labels = blobs(ct)
    path = write_dicom_seg(labels, ct, tmp_path / "seg.dcm", algorithm=ALGO, series_description="test SEG")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == pydicom.dcmread(next(series.iterdir())).StudyInstanceUID
    assert ds.SeriesInstanceUID != ct.source.series_instance_uid and ds.SeriesDescription == "test SEG"  # type: ignore[union-attr]
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2, 3, 4]
    assert [s.SegmentDescription for s in ds.SegmentSequence] == [f"label value {v}" for v in (1, 3, 4, 6)]
    seg1 = ds.SegmentSequence[0]
    assert seg1.SegmentAlgorithmType == "AUTOMATIC"
    algo = seg1.SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("test-model", "1.0")
    assert "ab" * 32 in str(algo.AlgorithmParameters)
    kidney = ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeMeaning == "Kidney" and kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    info = read_seg_info(path)
    assert [(s.number, s.value, s.label) for s in info.segments] == [
        (1, 1, "liver"), (2, 3, "kidney_left"), (3, 4, "kidney_right"), (4, 6, "kidney_tumour")]
    assert [s.voxels for s in info.segments] == [int((labels.array == v).sum()) for v in (1, 3, 4, 6)]
    assert info.referenced_series_uids == (ct.source.series_instance_uid,)  # type: ignore[union-attr]
    assert info.n_referenced_instances == 5


def test_reoriented_source_frames_reference_the_right_instances(tmp_path: Path, series: Path) -> None:
    """Reorient the DICOM-sourced scan, write a SEG: each frame names the instance its plane lies in."""
    ct = load_volume(series)
    labels = blobs(ct)
    moved_ct, moved_labels = as_orientation(ct, "ILA"), as_orientation(labels, "ILA")
    path = write_dicom_seg(moved_labels, moved_ct, tmp_path / "seg.dcm", algorithm=ALGO)
    by_uid = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in series.iterdir()}
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    checked = 0
    for f, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = by_uid[uid]
        assert np.allclose(fg.PlanePositionSequence[0].ImagePositionPatient, src.ImagePositionPatient)
        value = int(ds.SegmentSequence[int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber) - 1]
                    .SegmentDescription.split()[-1])
        k = round(ct.voxel_ijk(np.array(src.ImagePositionPatient, dtype=float) * [-1, -1, 1])[2])
        np.testing.assert_array_equal(frames[f] != 0, labels.array[:, :, k].T == value)
        checked += 1
    assert checked == ds.NumberOfFrames > 5


def test_multiframe_source(tmp_path: Path) -> None:
    make_enhanced_ct(tmp_path / "enhanced.dcm", 4)
    ct = load_volume(tmp_path / "enhanced.dcm")
    labels = blobs(ct)
    for seg_type in ("binary", "labelmap"):
        path = write_dicom_seg(labels, ct, tmp_path / f"{seg_type}.dcm", seg_type=seg_type, algorithm=ALGO)  # type: ignore[arg-type]
        np.testing.assert_array_equal(load_segmentation(path, reference=ct).array, labels.array)
        np.testing.assert_array_equal(decode_with_pydicom(path, ct), labels.array)


@pytest.mark.parametrize(("seg_type", "compression"), [("binary", "jpeg2000"), ("labelmap", "jpegls"),
                                                       ("labelmap", "jpeg2000"), ("labelmap", "rle")])
def test_compressed_round_trip(tmp_path: Path, seg_type: str, compression: str) -> None:
    write_series(tmp_path / "ct", 3, rows=40, cols=36)  # JPEG 2000 needs 32 pixels along both
    ct = load_volume(tmp_path / "ct")
    labels = blobs(ct)
    path = write_dicom_seg(labels, ct, tmp_path / "seg.dcm", seg_type=seg_type, compression=compression,  # type: ignore[arg-type]
                           algorithm=ALGO)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(load_segmentation(path, reference=ct).array, labels.array)


def test_labelmap_keeps_values_and_reads_without_padding_value(tmp_path: Path, series: Path) -> None:
    ct = load_volume(series)
    labels = blobs(ct)
    path = write_dicom_seg(labels, ct, tmp_path / "seg.dcm", seg_type="labelmap", algorithm=ALGO)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert {int(s.SegmentNumber) for s in ds.SegmentSequence} - {0} == {1, 3, 4, 6}
    if "PixelPaddingValue" in ds:
        del ds.PixelPaddingValue
    ds.save_as(tmp_path / "nopad")  # no extension: any file name reads
    np.testing.assert_array_equal(load_segmentation(tmp_path / "nopad", reference=ct).array, labels.array)


def test_manual_and_semiautomatic(tmp_path: Path, series: Path) -> None:
    ct = load_volume(series)
    labels = blobs(ct)
    manual = pydicom.dcmread(write_dicom_seg(labels, ct, tmp_path / "m.dcm", algorithm_type="MANUAL"))
    assert manual.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    assert "SegmentationAlgorithmIdentificationSequence" not in manual.SegmentSequence[0]
    semi = pydicom.dcmread(write_dicom_seg(labels, ct, tmp_path / "s.dcm", algorithm=ALGO,
                                           algorithm_type="SEMIAUTOMATIC"))
    assert semi.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    with pytest.raises(DicomSegError, match="needs algorithm=SegAlgorithm"):
        write_dicom_seg(labels, ct, tmp_path / "a.dcm")


# ---- errors ---------------------------------------------------------------------------------------------------
def test_absent_labels_left_out_and_empty_refused(tmp_path: Path, series: Path) -> None:
    ct = load_volume(series)
    only_liver = ct.with_array((blobs(ct).array == 1).astype(np.uint8), labels=TABLE)
    info = read_seg_info(write_dicom_seg(only_liver, ct, tmp_path / "one.dcm", algorithm=ALGO))
    assert [s.label for s in info.segments] == ["liver"]
    with pytest.raises(EmptySegmentationError, match="no labelled voxel"):
        write_dicom_seg(ct.with_array(np.zeros(ct.shape, np.uint8), labels=TABLE), ct, tmp_path / "e.dcm",
                        algorithm=ALGO)
    assert not (tmp_path / "e.dcm").exists()


def test_label_without_code_is_an_error_listing_it(tmp_path: Path, series: Path) -> None:
    ct = load_volume(series)
    arr = blobs(ct).array
    table = LabelTable([Label(1, "liver", (1, 1, 1)), Label(3, "my_organ", (2, 2, 2)), Label(4, "thing", (3, 3, 3)),
                        Label(6, "kidney_tumour", (4, 4, 4))])
    labels = ct.with_array(arr, labels=table)
    with pytest.raises(SegmentCodeError, match=r"3 'my_organ', 4 'thing'.*codes=.*model card"):
        write_dicom_seg(labels, ct, tmp_path / "x.dcm", algorithm=ALGO)
    code = {"category": ["SCT", "91723000", "Anatomical Structure"], "type": ["SCT", "78961009", "Spleen"]}
    codes_file = tmp_path / "codes.json"
    codes_file.write_text(json.dumps({"my_organ": code, "thing": code}))
    back = load_segmentation(write_dicom_seg(labels, ct, tmp_path / "x.dcm", algorithm=ALGO, codes=codes_file),
                             reference=ct)
    assert back.labels[3].code == SegmentCode.from_json(code)  # type: ignore[index]
    own = ct.with_array(arr, labels=LabelTable([*(lab for v, lab in table.items() if v not in (3, 4)),
                                                Label(3, "my_organ", (2, 2, 2), code=SegmentCode.from_json(code)),
                                                Label(4, "thing", (3, 3, 3), code=SegmentCode.from_json(code))]))
    write_dicom_seg(own, ct, tmp_path / "y.dcm", algorithm=ALGO)  # codes on the labels themselves


def test_labels_off_the_source_grid_are_refused(tmp_path: Path, series: Path) -> None:
    ct = load_volume(series)
    labels = blobs(ct)
    moved = Volume(labels.array, labels.affine @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
                   labels=TABLE)
    with pytest.raises(GridMismatchError, match="not on the grid of the source series"):
        write_dicom_seg(moved, ct, tmp_path / "x.dcm", algorithm=ALGO)
    with pytest.raises(DicomSegError, match="not loaded from DICOM"):
        write_dicom_seg(labels, Volume(ct.array, ct.affine), tmp_path / "x.dcm", algorithm=ALGO)
    with pytest.raises(DicomSegError, match="'jpeg2000' only"):
        write_dicom_seg(labels, ct, tmp_path / "x.dcm", algorithm=ALGO, compression="jpegls")


def test_blank_uids_refused_then_repaired(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", 4, study_uid="", series_uid="", for_uid="")
    ct = load_volume(tmp_path / "ct")
    labels = blobs(ct)
    with pytest.raises(SourceUidError, match=r"StudyInstanceUID blank.*SeriesInstanceUID blank.*FrameOfReferenceUID"
                                             r" blank.*repair_uids=True \(CLI: --repair-uids\)"):
        write_dicom_seg(labels, ct, tmp_path / "seg.dcm", algorithm=ALGO)
    path = write_dicom_seg(labels, ct, tmp_path / "seg.dcm", algorithm=ALGO, repair_uids=True)
    repaired = sorted((tmp_path / "seg_source").iterdir())
    assert len(repaired) == 4
    again = write_dicom_seg(labels, ct, tmp_path / "again.dcm", algorithm=ALGO, repair_uids=True)
    first, second = pydicom.dcmread(path), pydicom.dcmread(again)
    assert first.StudyInstanceUID == second.StudyInstanceUID != ""  # deterministic
    assert first.FrameOfReferenceUID == pydicom.dcmread(repaired[0]).FrameOfReferenceUID
    for f in repaired:
        orig = pydicom.dcmread(tmp_path / "ct" / f.name)
        assert pydicom.dcmread(f).PixelData == orig.PixelData
    np.testing.assert_array_equal(load_segmentation(path, reference=load_volume(tmp_path / "seg_source")).array,
                                  labels.array)


def _sorted_datasets(series: Path) -> list:
    dss = sorted((pydicom.dcmread(f) for f in series.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    for ds in dss:
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "", "", "", ""
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "", ""
    return dss


def _overlapping_seg(series: Path, path: Path) -> np.ndarray:
    """A BINARY SEG (written by highdicom directly) whose two segments overlap; returns the masks (k, r, c, 2)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    masks = np.zeros((5, 24, 32, 2), dtype=bool)
    masks[:, 2:12, 3:20, 0] = True
    masks[1:4, 8:20, 10:30, 1] = True
    descs = [hd.seg.SegmentDescription(n, name, codes.SCT.AnatomicalStructure, typ, "MANUAL")
             for n, name, typ in ((1, "liver", codes.SCT.Liver), (2, "spleen", codes.SCT.Spleen))]
    seg = hd.seg.Segmentation(_sorted_datasets(series), masks, "BINARY", descs, hd.UID(), 9, hd.UID(), 1, "x", "x",
                              "1", "1")
    seg.save_as(path)
    return masks


def test_overlapping_segments_need_split(tmp_path: Path, series: Path) -> None:
    ct = load_volume(series)
    masks = _overlapping_seg(series, tmp_path / "overlap.dcm")
    with pytest.raises(OverlappingSegmentsError, match=r"1 'liver' and 2 'spleen'.*split=True.*--split"):
        load_segmentation(tmp_path / "overlap.dcm", reference=ct)
    split = load_segmentation(tmp_path / "overlap.dcm", reference=ct, split=True)
    assert split.array.shape == (*ct.shape, 2)
    np.testing.assert_array_equal(split.array[..., 1], masks[..., 1].transpose(2, 1, 0))


def test_fractional_seg_thresholds_at_half(tmp_path: Path, series: Path) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ct = load_volume(series)
    dss = _sorted_datasets(series)
    prob = np.zeros((5, 24, 32), dtype=np.float32)
    prob[:, :, :16] = 0.7
    prob[:, :, 16:20] = 0.49
    desc = hd.seg.SegmentDescription(1, "liver", codes.SCT.AnatomicalStructure, codes.SCT.Liver, "MANUAL")
    seg = hd.seg.Segmentation(dss, prob, "FRACTIONAL", [desc], hd.UID(), 9, hd.UID(), 1, "x", "x", "1", "1",
                              max_fractional_value=100)
    seg.save_as(tmp_path / "frac.dcm")
    back = load_segmentation(tmp_path / "frac.dcm", reference=ct)
    np.testing.assert_array_equal(back.array, (prob >= 0.5).astype(np.uint8).transpose(2, 1, 0))


# ---- real samples ---------------------------------------------------------------------------------------------
def test_dcmqi_liver_seg_reads_onto_its_ct_exactly() -> None:
    folder = DATA / "dicom_seg_example"
    ct = load_volume(folder / "ct_3slice")
    seg = load_segmentation(folder / "liver.dcm", reference=ct)
    truth = resample_to(load_volume(folder / "liver_seg.nrrd"), ct, interpolation="nearest")
    assert int((seg.array == 1).sum()) == 107_098
    np.testing.assert_array_equal(seg.array, truth.array)
    assert seg.labels is not None and seg.labels[1].name == "Liver"
    assert abs(float(ct.array[seg.array == 1].mean()) - 37.3) < 0.1
    own = load_volume(folder / "liver.dcm")
    assert own.same_grid(ct) and own.labels == seg.labels


def test_totalsegmentator_series_refused_then_repaired_round_trip(tmp_path: Path) -> None:
    folder = DATA / "totalseg_example"
    ct = load_volume(folder / "example_ct_dicom")
    nii = load_volume(folder / "example_seg_dicom.nii.gz")
    names = json.loads((folder / "classes.json").read_text())["total"]
    present = [int(v) for v in np.unique(nii.array) if v]
    table = LabelTable.from_names({v: names[str(v)] for v in present})
    labels = resample_to(nii.with_array(nii.array.astype(np.uint8), labels=table), ct, interpolation="nearest")
    with pytest.raises(SourceUidError, match=r"SOPClassUID blank or missing in 20 of 20.*SOPInstanceUID.*"
                                             r"StudyInstanceUID.*SeriesInstanceUID.*--repair-uids"):
        write_dicom_seg(labels, ct, tmp_path / "seg.dcm", algorithm=SegAlgorithm("TotalSegmentator", "2"))
    path = write_dicom_seg(labels, ct, tmp_path / "seg.dcm", algorithm=SegAlgorithm("TotalSegmentator", "2"),
                           repair_uids=True)
    back = load_segmentation(path, reference=ct)
    assert len(back.labels) == len(present) == 31  # type: ignore[arg-type]
    np.testing.assert_array_equal(back.array, labels.array)
    liver = back.labels.value_of("liver")  # type: ignore[union-attr]
    assert abs(float(ct.array[back.array == liver].mean()) - 89.3) < 0.5
    meta_uids = sorted(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
                       for f in (folder / "example_ct_dicom").iterdir())
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    referenced = sorted(i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence)
    assert referenced == meta_uids  # the repaired copy took the SOP Instance UIDs from the file meta
    assert dciodvfy_errors(path) == []


def test_docstring_examples_run() -> None:
    import doctest

    import medseg.io.dicom_seg

    result = doctest.testmod(medseg.io.dicom_seg)
    assert result.attempted > 0 and result.failed == 0


# ---- acceptance: phantom DICOM series → phantom-abdomen-ct → SEG → back onto the source grid ------------------
@pytest.fixture(scope="module")
def segmenter():
    from medseg.inference import InferenceOptions, Segmenter

    return Segmenter("phantom-abdomen-ct", device="cpu", options=InferenceOptions.fast())


def _oblique(volume: Volume) -> Volume:
    """The same voxels rotated 15° about z and 10° about x around the volume's centre (an oblique series)."""
    a, b = np.radians(15), np.radians(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = np.eye(4)
    rot[:3, :3] = rz @ rx
    centre = volume.world_mm((np.array(volume.shape) - 1) / 2)
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = -centre, centre
    return Volume(volume.array, back @ rot @ shift @ volume.affine, modality=volume.modality)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["RAS", "LPS", "RAI", "LAI", "oblique"])
def test_phantom_series_segmented_to_seg_reads_back_exactly(tmp_path: Path, segmenter, variant: str) -> None:
    """RAS, LPS, flipped (RAI, left-handed: the series reads back with its slices reversed), descending z (LAI: the
    slice normal points to the feet) and oblique phantom CT series."""
    from medseg.io import save_volume
    from medseg.io.dicom_write import write_dicom_series
    from medseg.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(7, shape=(64, 56, 24), orientation="LPS" if variant == "oblique" else variant)
    if variant == "oblique":
        folder = write_dicom_series(_oblique(phantom.image), tmp_path / "ct").folder
    else:
        folder = write_phantom_study(phantom, tmp_path / "study").image_path
    ct = load_volume(folder)
    assert ct.is_oblique == (variant == "oblique")
    if variant == "LAI":
        z = [pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2] for f in ct.source.files]  # type: ignore[union-attr]
        assert ct.source.slice_instances(ct).axis == 2 and z == sorted(z, reverse=True)  # type: ignore[union-attr]
    result = segmenter.segment(ct)
    nifti = load_volume(save_volume(result.labels, tmp_path / "labels.nii.gz"))
    assert nifti.same_grid(ct) and len(np.unique(nifti.array)) >= 5
    algo = SegAlgorithm.from_card(segmenter.card)
    binary = write_dicom_seg(result.labels, ct, tmp_path / "binary.dcm", algorithm=algo)
    labelmap = write_dicom_seg(result.labels, folder, tmp_path / "labelmap.dcm", seg_type="labelmap", algorithm=algo)
    for path in (binary, labelmap):
        back = load_segmentation(path, reference=ct)
        np.testing.assert_array_equal(back.array, nifti.array)
        np.testing.assert_array_equal(decode_with_pydicom(path, ct), nifti.array)
        assert back.labels is not None and back.labels.names == result.labels.labels.names  # type: ignore[union-attr]
    assert dciodvfy_errors(binary) == []
    algo_item = pydicom.dcmread(binary).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo_item.AlgorithmName == "phantom-abdomen-ct"
    assert segmenter.card.weights.sha256 in str(algo_item.AlgorithmParameters)


# ---- CLI ------------------------------------------------------------------------------------------------------
def test_cli_info_lists_segments(data_dir: Path) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app

    seg = data_dir / "dicom_seg_example" / "liver.dcm"
    res = CliRunner().invoke(app, ["info", str(seg), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["seg_type"] == "BINARY" and data["n_referenced_instances"] == 3
    assert data["referenced_series_uids"] == ["1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"]
    [segment] = data["segments"]
    assert (segment["number"], segment["label"], segment["voxels"]) == (1, "Liver", 107_098)
    assert segment["code"]["type"] == ["SRT", "T-62000", "Liver"] and segment["algorithm_type"] == "SEMIAUTOMATIC"
    res = CliRunner().invoke(app, ["info", str(seg)])
    assert res.exit_code == 0 and "Liver" in res.stdout and "107098" in res.stdout and "T-62000" in res.stdout


def test_cli_convert_both_ways_and_split(tmp_path: Path, series: Path, data_dir: Path) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.io import save_volume

    runner = CliRunner()
    folder = data_dir / "dicom_seg_example"
    res = runner.invoke(app, ["convert", str(folder / "liver.dcm"), str(tmp_path / "liver.nii.gz"), "--reference",
                              str(folder / "ct_3slice")])
    assert res.exit_code == 0, res.output
    truth = load_volume(folder / "liver_seg.nrrd")
    np.testing.assert_array_equal(load_volume(tmp_path / "liver.nii.gz").array,
                                  resample_to(truth, load_volume(folder / "ct_3slice"), interpolation="nearest").array)
    labels = blobs(load_volume(series))
    save_volume(labels, tmp_path / "labels.nii.gz")
    res = runner.invoke(app, ["convert", str(tmp_path / "labels.nii.gz"), str(tmp_path / "seg.dcm")])
    assert res.exit_code == 2 and "--reference" in res.output
    res = runner.invoke(app, ["convert", str(tmp_path / "labels.nii.gz"), str(tmp_path / "seg.dcm"), "--reference",
                              str(series)])
    assert res.exit_code == 2 and "--model" in res.output and "MANUAL" in res.output
    res = runner.invoke(app, ["convert", str(tmp_path / "labels.nii.gz"), str(tmp_path / "seg.dcm"), "--reference",
                              str(series), "--model", "phantom-abdomen-ct", "--seg-type", "labelmap"])
    assert res.exit_code == 0, res.output
    assert pydicom.dcmread(tmp_path / "seg.dcm").SegmentSequence[1].SegmentationAlgorithmIdentificationSequence[
        0].AlgorithmName == "phantom-abdomen-ct"
    res = runner.invoke(app, ["convert", str(tmp_path / "seg.dcm"), str(tmp_path / "back.nii.gz"), "--reference",
                              str(series)])
    assert res.exit_code == 0, res.output
    back = load_volume(tmp_path / "back.nii.gz")
    np.testing.assert_array_equal(back.array, labels.array)
    assert back.labels is not None and back.labels.names == TABLE.names  # the sidecar came along
    masks = _overlapping_seg(series, tmp_path / "overlap.dcm")
    res = runner.invoke(app, ["convert", str(tmp_path / "overlap.dcm"), str(tmp_path / "o.nii.gz")])
    assert res.exit_code == 2 and "--split" in res.output
    res = runner.invoke(app, ["convert", str(tmp_path / "overlap.dcm"), str(tmp_path / "o.nii.gz"), "--split",
                              "--reference", str(series)])
    assert res.exit_code == 0, res.output
    spleen = load_volume(tmp_path / "o_2_spleen.nii.gz")
    np.testing.assert_array_equal(spleen.array != 0, masks[..., 1].transpose(2, 1, 0))
    assert spleen.labels is not None and spleen.labels.names == {2: "spleen"}
    assert (tmp_path / "o_1_liver.nii.gz").is_file()


@pytest.mark.slow
def test_cli_segment_writes_a_seg_for_dicom_input_only(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.io import save_volume
    from medseg.phantom import make_phantom, write_phantom_study

    study = write_phantom_study(make_phantom(2, shape=(48, 48, 20)), tmp_path / "study")
    runner = CliRunner()
    nifti_ct = save_volume(load_volume(study.image_path), tmp_path / "ct.nii.gz")
    res = runner.invoke(app, ["segment", str(nifti_ct), "--model", "phantom-abdomen-ct", "--out",
                              str(tmp_path / "x.dcm")])
    assert res.exit_code == 2 and "DICOM SEG references" in res.output and "is not DICOM" in res.output
    assert "ct.nii.gz" in res.output
    res = runner.invoke(app, ["segment", str(study.image_path), "--model", "phantom-abdomen-ct", "--fast", "--out",
                              str(tmp_path / "seg.dcm"), "--seg-type", "labelmap"])
    assert res.exit_code == 0, res.output
    ct = load_volume(study.image_path)
    back = load_segmentation(tmp_path / "seg.dcm", reference=ct)
    assert back.labels is not None and set(back.labels.names.values()) <= {
        "liver", "spleen", "kidney_left", "kidney_right", "liver_tumour", "kidney_tumour"}
    assert int((back.array == back.labels.value_of("liver")).sum()) > 100
    assert pydicom.dcmread(tmp_path / "seg.dcm").SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
