"""DICOM SR summary of a segmentation: a TID 1500 Measurement Report (highdicom) beside the DICOM SEG.

:func:`write_dicom_sr` writes a Comprehensive 3D SR whose content is one *Volumetric ROI measurements* group
(TID 1411) per segment of the SEG: the group references the segment (``ReferencedSegment``: the SEG's SOP class and
instance, the segment number, the source series), carries the segment's coded property category and type as
finding category and type, and holds

* ``Volume`` (SCT 118565006) in ``ml`` (UCUM), from :func:`medseg.stats.volume_stats`;
* for CT, when the statistics have it, ``Attenuation Coefficient`` (DCM 112031) with derivation ``Mean``
  (SCT 373098007) in ``[hnsf'U]`` (UCUM Hounsfield unit), the mean over the segment's voxels.

Why SR and not an encapsulated PDF: the values are structured and coded, so a PACS, a viewer or a downstream query
can read the volume of "Liver" as a number in ml; the SR references the SEG's segments, so the numbers stay tied
to the regions they measure. A PDF is pixels for humans, and many PACS keep it as an opaque object.

The SR is in the source's study, in a series of its own; its patient and study modules are copied from the source
images by highdicom, exactly as the SEG writer copies them (type 2 attributes the source lacks are present and
empty); nothing else about the patient is written. Its evidence (Current Requested Procedure Evidence) lists the
SEG and the source instances.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import DicomSrError
from medseg.volume import Volume

__all__ = ["SR_NAME", "write_dicom_sr"]

log = logging.getLogger(__name__)

#: The file name the batch runner gives the SR beside ``segmentation.dcm``.
SR_NAME = "summary-sr.dcm"
#: Patient and study attributes of type 2 that highdicom copies from the evidence (as the SEG writer fills them).
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _headers(source: Volume | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Any]:
    """The source instances' headers (a DICOM-sourced Volume, a folder, or a list of files)."""
    from medseg.io.dicom_seg import _read_headers

    if isinstance(source, Volume):
        if source.source is None or not source.source.files:
            raise DicomSrError("The source volume was not loaded from DICOM (it names no source instances); pass the "
                               "DICOM series folder the SEG was made from.")
        files = [Path(f) for f in dict.fromkeys(source.source.files)]
    elif isinstance(source, str | os.PathLike):
        p = Path(source)
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    else:
        files = [Path(f) for f in source]
    return _read_headers([str(f) for f in files])


def write_dicom_sr(
    seg_path: str | os.PathLike[str],
    stats: Any,
    source: Volume | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    path: str | os.PathLike[str],
    *,
    algorithm_name: str = "medseg",
    algorithm_version: str | None = None,
    series_number: int | None = None,
    series_description: str | None = None,
) -> Path:
    """Write a TID 1500 Measurement Report of a DICOM SEG's segments: volume (ml) and, for CT, mean HU.

    Parameters
    ----------
    seg_path : path
        The DICOM SEG (:func:`medseg.io.write_dicom_seg`) whose segments are measured.
    stats : VolumeStats
        :func:`medseg.stats.volume_stats` of the same labels (on the source grid, with the image for mean HU).
        Rows are matched to segments by label value (the SEG's ``label value N`` segment descriptions).
    source : Volume, folder or files
        The DICOM series the SEG references (its instances become the SR's evidence beside the SEG).
    path : path
        Output file (written atomically).
    algorithm_name, algorithm_version : str
        The device observer (the model that made the labels).
    series_number : int, optional
        Default: the SEG's SeriesNumber + 1.
    series_description : str, optional
        Default: "Volumes by <algorithm_name>".

    Returns
    -------
    Path
        The written SR.

    Raises
    ------
    DicomSrError
        If a segment has no row in ``stats``, or the source does not hold every instance the SEG references.
    UnreadableFileError
        If the SEG or a source file cannot be read, or the SR cannot be written.

    Examples
    --------
    >>> import tempfile, pathlib, pydicom
    >>> from medseg.phantom import make_phantom, write_phantom_study
    >>> from medseg.io import load_volume, write_dicom_seg
    >>> from medseg.stats import volume_stats
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> study = write_phantom_study(make_phantom(0, shape=(48, 40, 12)), tmp / "study")
    >>> ct, truth = load_volume(study.image_path), load_volume(study.labels_path)
    >>> seg = write_dicom_seg(truth, ct, tmp / "seg.dcm", algorithm_type="MANUAL")
    >>> sr = write_dicom_sr(seg, volume_stats(truth, ct), ct, tmp / "sr.dcm")
    >>> pydicom.dcmread(sr).ContentTemplateSequence[0].TemplateIdentifier
    '1500'
    """
    import highdicom as hd
    import numpy as np
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    import medseg
    from medseg.io.dicom_seg import read_seg_info

    seg_file = Path(seg_path)
    info = read_seg_info(seg_file)
    seg_ds = pydicom.dcmread(seg_file, stop_before_pixels=True)
    headers = _headers(source)
    wanted = {str(item.ReferencedSOPInstanceUID): str(ref.SeriesInstanceUID)
              for ref in seg_ds.get("ReferencedSeriesSequence", []) for item in ref.ReferencedInstanceSequence}
    evidence_src = [ds for ds in headers if str(ds.get("SOPInstanceUID", "")) in wanted]
    missing = set(wanted) - {str(ds.SOPInstanceUID) for ds in evidence_src}
    if missing or not wanted:
        raise DicomSrError(f"{seg_file}: the source holds {len(wanted) - len(missing)} of the {len(wanted)} instances "
                           "the SEG references; pass the DICOM series the SEG was made from.")
    for ds in evidence_src:  # header copies only; what highdicom copies into the patient and study modules
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
        for kw in _TYPE2_COPIED:
            if kw not in ds:
                setattr(ds, kw, "")

    ct = str(evidence_src[0].get("Modality", "")).upper() == "CT"
    hu = codes.UCUM.HounsfieldUnit if ct and getattr(stats, "intensity_unit", None) == "HU" else None
    Code_ = hd.sr.CodedConcept
    ml = Code_(value="ml", scheme_designator="UCUM", meaning="milliliter")
    device_uid = generate_uid(entropy_srcs=["medseg device observer", algorithm_name, algorithm_version or ""])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=algorithm_name[:64], manufacturer_name="medseg",
            model_name=f"{algorithm_name} {algorithm_version or ''}".strip()[:64]))
    series_uid = next(iter(wanted.values()))
    groups = []
    rows = {int(r.value): r for r in stats.labels}
    for seg in info.segments:
        row = rows.get(int(seg.value))
        if row is None:
            raise DicomSrError(f"{seg_file}: segment {seg.number} ({seg.label!r}, label value {seg.value}) has no row in "
                               "the statistics; compute them from the same labels (medseg.stats.volume_stats).")
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=float(row.volume_ml), unit=ml)]
        if hu is not None and np.isfinite(row.intensity_mean):
            measurements.append(hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient,
                                                  value=float(row.intensity_mean), unit=hu,
                                                  derivation=codes.SCT.Mean))
        code = seg.code
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[str(seg_ds.SOPInstanceUID), str(seg.number)]),
                identifier=f"segment {seg.number} {seg.label}"[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg_ds.SOPClassUID), sop_instance_uid=str(seg_ds.SOPInstanceUID),
                segment_number=int(seg.number),
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
            finding_category=None if code is None else Code_(code.category.value, code.category.scheme,
                                                                 code.category.meaning),
            finding_type=None if code is None else Code_(code.type.value, code.type.scheme, code.type.meaning),
            measurements=measurements))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion if ct else codes.SCT.ImagingProcedure,
        imaging_measurements=groups)
    try:
        number = int(series_number) if series_number is not None else int(seg_ds.get("SeriesNumber", 999) or 999) + 1
    except (TypeError, ValueError):
        number = 1000
    description = (series_description or f"Volumes by {algorithm_name}")[:64]
    with warnings.catch_warnings():
        # highdicom warns about the source's patient name format, quoting the name: never let it reach a log.
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*Person Name.*", category=UserWarning)
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*evidence_src, seg_ds],
            content=report,
            series_instance_uid=hd.UID(),
            series_number=number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medseg",
            is_complete=True,
            series_description=description,
            software_versions=f"medseg {medseg.__version__}",
        )
    from medseg.io.dicom_seg import _save_atomically

    out_path = Path(path)
    _save_atomically(sr, out_path)
    log.info("wrote a DICOM SR with the volumes of %d segment(s) to %s", len(groups), out_path)
    return out_path
