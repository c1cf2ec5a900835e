"""Fixtures and helpers shared by the PACS tests: one real Orthanc per test module, in a private network namespace.

``orthanc`` enters a network namespace of its own (``tests/orthanc_server.py``) and starts one Orthanc for the
module that uses it; ``pacs`` wipes it before each test. A module that needs another Orthanc configuration
(other modalities; not TLS, see tests/test_pacs_recipes_tls.py) overrides ``orthanc_options``. Skipped, with the
reason, where Orthanc is not installed or the machine does not allow a network namespace.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orthanc_server as osrv
import pytest

from medseg.pacs import Credentials, PacsSink, case_id_for_study, store_files

SHARED = Path(__file__).parent / "data"
DCMQI_CT = SHARED / "dicom_seg_example" / "ct_3slice"
TOTALSEG_CT = SHARED / "totalseg_example" / "example_ct_dicom"
SHAPE = (40, 36, 24)
CRED = Credentials(osrv.USER, osrv.PASSWORD)
ENV = {"MEDSEG_PACS_USER": osrv.USER, "MEDSEG_PACS_PASSWORD": osrv.PASSWORD}

@pytest.fixture(scope="module")
def orthanc_options() -> dict[str, Any]:
    """Keyword arguments of :class:`orthanc_server.Orthanc` (override in a module for another configuration)."""
    return {}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, orthanc_options: dict[str, Any]) -> Iterator[osrv.Orthanc]:
    reason = osrv.why_not()
    if reason:
        pytest.skip(reason)
    try:
        net = osrv.private_network()
        net.__enter__()
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a private network namespace for Orthanc here ({exc})")
    server = osrv.Orthanc(tmp_path_factory.mktemp("orthanc"), **orthanc_options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        net.__exit__(None, None, None)


@pytest.fixture
def pacs(orthanc: osrv.Orthanc) -> osrv.Orthanc:
    if orthanc.proc is None:
        orthanc.start()
    orthanc.wipe()
    return orthanc


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medseg.phantom import make_phantom, write_phantom_study

    root = tmp_path_factory.mktemp("phantoms")
    for seed in (21, 22, 23):
        write_phantom_study(make_phantom(seed, shape=SHAPE), root / f"p{seed}")
    return root


def _upload(server: osrv.Orthanc, folder: Path) -> list[str]:
    return store_files(PacsSink(server.dicomweb, CRED), sorted(p for p in folder.iterdir() if p.is_file()))


def _local_folder(tmp: Path, phantoms: Path, seeds: list[int], dcmqi: bool) -> Path:
    folder = tmp / "local"
    for seed in seeds:
        shutil.copytree(phantoms / f"p{seed}" / "ct", folder / f"p{seed}")
    if dcmqi:
        shutil.copytree(DCMQI_CT, folder / "dcmqi")
    return folder


def _study_uid(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(p for p in sorted(folder.iterdir()) if p.is_file()), stop_before_pixels=True)
               .StudyInstanceUID)


def _check_pushed_segs(server: osrv.Orthanc, out: Path, local: Path, local_out: Path) -> None:
    """One SEG series per study, referencing the CT's study, series and every instance; same labels as locally."""
    import pydicom

    from medseg.io import load_segmentation, load_volume

    segs = server.seg_series()
    assert segs and all(len(v) == 1 for v in segs.values()), segs
    files = server.seg_files()
    for study in sorted(local.iterdir()):
        study_uid = _study_uid(study)
        ct = load_volume(study)
        [raw] = files[study_uid]
        path = out / "pushed.dcm"
        path.write_bytes(raw)
        ds = pydicom.dcmread(path)
        sop = str(ds.SOPInstanceUID)
        assert ds.StudyInstanceUID == study_uid and ds.SeriesInstanceUID == segs[study_uid][0]
        [ref] = ds.ReferencedSeriesSequence
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(study.iterdir())]
        assert ref.SeriesInstanceUID == headers[0].SeriesInstanceUID
        assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == {
            h.SOPInstanceUID for h in headers}
        pushed = load_segmentation(path, reference=ct)
        local_labels = load_volume(local_out / study.name / "pred.nii.gz")
        assert pushed.same_grid(local_labels)
        assert np.array_equal(np.asarray(pushed.array), np.asarray(local_labels.array)), study.name
        assert np.asarray(pushed.array).max() > 0
        # the case's own record says the push was verified
        push = json.loads((out / case_id_for_study(study_uid) / "push.json").read_text())
        assert push["verified"] and push["sop_instance_uids"] == [sop]


