"""The DICOM SR summary (TID 1500 Measurement Report) of a DICOM SEG: content, references, privacy, validity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from test_dicom_seg import dciodvfy_errors

from medseg.errors import DicomSrError
from medseg.io import load_volume, write_dicom_seg, write_dicom_sr
from medseg.phantom import make_phantom, write_phantom_study
from medseg.stats import volume_stats


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object, Path]:
    tmp = tmp_path_factory.mktemp("sr")
    study = write_phantom_study(make_phantom(3, shape=(40, 36, 14)), tmp / "study")
    ct, truth = load_volume(study.image_path), load_volume(study.labels_path)
    seg = write_dicom_seg(truth, ct, tmp / "seg.dcm", algorithm_type="MANUAL")
    return tmp, ct, volume_stats(truth, ct), seg


def test_sr_holds_each_segments_volume_and_mean_hu_and_references_the_seg(case: tuple) -> None:
    tmp, ct, stats, seg_path = case
    path = write_dicom_sr(seg_path, stats, ct, tmp / "sr.dcm", algorithm_name="ct-basic", algorithm_version="1")
    sr, seg = hd.sr.srread(path), pydicom.dcmread(seg_path)
    source = pydicom.dcmread(ct.source.files[0], stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID == seg.StudyInstanceUID
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    value_of = {int(s.SegmentNumber): int(s.SegmentDescription.split()[-1]) for s in seg.SegmentSequence}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert sorted(g.referenced_segment.referenced_segment_numbers[0] for g in groups) == sorted(value_of)
    for g in groups:
        ref = g.referenced_segment
        assert (ref.referenced_sop_instance_uid, ref.referenced_sop_class_uid) == (seg.SOPInstanceUID, seg.SOPClassUID)
        row = stats[value_of[ref.referenced_segment_numbers[0]]]
        [volume] = g.get_measurements(name=codes.SCT.Volume)
        [hu] = g.get_measurements(name=codes.DCM.AttenuationCoefficient)
        assert (volume.value, volume.unit.value) == (pytest.approx(row.volume_ml, rel=1e-12), "ml")
        assert (hu.value, hu.unit.value) == (pytest.approx(row.intensity_mean, rel=1e-12), "[hnsf'U]")
        item = {int(s.SegmentNumber): s for s in seg.SegmentSequence}[ref.referenced_segment_numbers[0]]
        assert g.finding_type.value == item.SegmentedPropertyTypeCodeSequence[0].CodeValue
        assert g.finding_category.value == item.SegmentedPropertyCategoryCodeSequence[0].CodeValue
    # evidence: the SEG and every source instance it references
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    listed = {i.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert listed == {seg.SOPInstanceUID, *ct.source.sop_instance_uids}
    # no patient data beyond what the SEG (a copy of the source's patient module) holds
    patient = {kw for kw in sr.dir() if kw.startswith("Patient")}
    assert patient <= {kw for kw in seg.dir() if kw.startswith("Patient")}
    assert all(sr.get(kw) == seg.get(kw) for kw in patient)
    assert dciodvfy_errors(path) == []


def test_without_hounsfield_statistics_only_volumes_are_written(case: tuple) -> None:
    tmp, ct, stats, seg_path = case
    path = write_dicom_sr(seg_path, dataclasses.replace(stats, intensity_unit=None), ct, tmp / "sr-noHU.dcm")
    for g in hd.sr.srread(path).content.get_volumetric_roi_measurement_groups():
        assert [m.name.meaning for m in g.get_measurements()] == ["Volume"]


def test_a_segment_without_statistics_or_a_wrong_source_is_refused(case: tuple, tmp_path: Path) -> None:
    _, ct, stats, seg_path = case
    fewer = dataclasses.replace(stats, labels=tuple(r for r in stats.labels if r.value != 2))
    with pytest.raises(DicomSrError, match=r"segment 2 \('spleen', label value 2\) has no row in the statistics"):
        write_dicom_sr(seg_path, fewer, ct, tmp_path / "x.dcm")
    other = write_phantom_study(make_phantom(4, shape=(40, 36, 14)), tmp_path / "other")
    with pytest.raises(DicomSrError, match=r"the source holds 0 of the 14 instances the SEG references"):
        write_dicom_sr(seg_path, stats, load_volume(other.image_path), tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
