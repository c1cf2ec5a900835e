"""Claim: medseg's DICOM SEG writer and reader (geometry checks, instance matching by world position, codes, the
label map onto the source grid) cost about what the bare highdicom path costs, for a 6-label SEG of a
300×512×512 phantom CT: BINARY, LABELMAP, and each compressed.

Same run, same files; each case runs in a fresh child process (so peak RSS is its own):
  - medseg:    write_dicom_seg(labels, ct, path, ...) then load_segmentation(path, reference=ct)
  - highdicom: the path a highdicom user writes by hand: pydicom headers sorted along the slice normal, the label
               array transposed to (frames, rows, columns) in that order, hd.seg.Segmentation(...).save_as(path);
               read back with hd.seg.segread(path).get_pixels_by_source_instance(sorted SOP Instance UIDs,
               combine_segments=True)
Both read back exactly the labels they wrote (checked, printed as "exact").

Usage:  python benchmarks/bench_dicom_seg.py [--shape 512,512,300] [--max-memory-gb 6]
Prints per case: write / read seconds, file size (MB), each child's peak RSS growth over its baseline after the
inputs are loaded (MB), and medseg / highdicom ratios. Nothing here asserts on time. Each child runs under an
address-space limit (--max-memory-gb) so it cannot take the machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_name  # benchmarks/_machine.py (the scripts run from this folder)

CASES = (("binary", None), ("binary", "jpeg2000"), ("labelmap", None), ("labelmap", "jpegls"))
_TS = {None: "1.2.840.10008.1.2.1", "jpeg2000": "1.2.840.10008.1.2.4.90", "jpegls": "1.2.840.10008.1.2.4.80"}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(impl: str, seg_type: str, compression: str | None, study: str, out: str) -> None:
    """Write and read back one SEG; print JSON (seconds, size, peak RSS growth, exactness)."""
    import highdicom  # noqa: F401 - imported before the baseline: module memory is not the operation's
    import numpy as np
    from pydicom.sr.codedict import codes

    import medseg.io.dicom_seg  # noqa: F401
    from medseg.io import load_volume

    ct = load_volume(Path(study) / "ct")
    labels = load_volume(Path(study) / "labels.nii.gz")
    labels = labels.with_array(np.ascontiguousarray(labels.array), labels=labels.labels)
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    if impl == "medseg":
        from medseg.io import load_segmentation, write_dicom_seg
        from medseg.io.dicom_seg import SegAlgorithm

        t0 = time.perf_counter()
        write_dicom_seg(labels, ct, out, seg_type=seg_type, compression=compression,  # type: ignore[arg-type]
                        algorithm=SegAlgorithm("phantom-truth", "1"))
        t1 = time.perf_counter()
        write_peak = _status_mb("VmHWM") - base
        back = load_segmentation(out, reference=ct).array
        t2 = time.perf_counter()
        exact = bool(np.array_equal(back, labels.array))
    else:
        import warnings

        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes

        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((Path(study) / "ct").iterdir())]
        normal = np.cross(np.array(dss[0].ImageOrientationPatient[:3], float),
                          np.array(dss[0].ImageOrientationPatient[3:], float))
        dss.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
        # the phantom series is written in array order with k along the normal (right-handed LPS grid)
        arr = np.ascontiguousarray(labels.array.transpose(2, 1, 0))
        values = [int(v) for v in np.unique(arr) if v]
        assert labels.labels is not None
        if seg_type == "binary":
            lut = np.zeros(max(values) + 1, np.uint8)
            lut[values] = np.arange(1, len(values) + 1)
            pixels, numbers = lut[arr], list(range(1, len(values) + 1))
        else:
            pixels, numbers = arr, values
        algo = hd.AlgorithmIdentificationSequence(name="phantom-truth", version="1",
                                                  family=codes.cid7162.ArtificialIntelligence)
        descs = [hd.seg.SegmentDescription(n, labels.labels[v].name, codes.SCT.AnatomicalStructure, codes.SCT.Liver,
                                           "AUTOMATIC", algorithm_identification=algo) for n, v in zip(numbers, values)]
        seg = hd.seg.Segmentation(dss, pixels, seg_type.upper(), descs, hd.UID(), 1000, hd.UID(), 1, "x", "x", "1",
                                  "0", transfer_syntax_uid=_TS[compression])
        seg.save_as(out)
        t1 = time.perf_counter()
        write_peak = _status_mb("VmHWM") - base
        read = hd.seg.segread(out)
        stack = read.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in dss],
                                                   combine_segments=True, relabel=False)
        t2 = time.perf_counter()
        if seg_type == "binary":
            back_numbers = np.asarray(stack)
            inv = np.zeros(len(values) + 1, np.uint8)
            inv[1:] = values
            back = inv[back_numbers]
        else:
            back = np.asarray(stack)
        exact = bool(np.array_equal(back, arr))
    print(json.dumps({"write_s": t1 - t0, "read_s": t2 - t1, "size_mb": os.path.getsize(out) / 2**20,
                      "write_peak_mb": write_peak, "peak_mb": _status_mb("VmHWM") - base, "exact": exact}))


def _limit(gb: float):
    def apply() -> None:
        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="512,512,300", help="phantom voxels i,j,k")
    parser.add_argument("--max-memory-gb", type=float, default=6.0, help="address-space cap of each child")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, seg_type, comp, study, out = args.child
        child(impl, seg_type, None if comp == "none" else comp, study, out)
        return
    from medseg.io import save_volume
    from medseg.io.dicom_write import write_dicom_series
    from medseg.phantom import make_phantom

    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        study.mkdir()
        t0 = time.perf_counter()
        phantom = make_phantom(11, shape=shape, liver_tumours=2, kidney_tumour=True)  # all 6 labels
        write_dicom_series(phantom.image, study / "ct")
        save_volume(phantom.labels, study / "labels.nii.gz")
        n_labels = len({int(v) for v in phantom.labels.array.ravel()[:: 97]} - {0})
        del phantom
        print(f"phantom {shape} written in {time.perf_counter() - t0:.1f} s; CPU: {platform.processor() or '?'} "
              f"({cpu_name()}), {os.cpu_count()} logical CPUs; labels seen in a sample: {n_labels}")
        rows = []
        for seg_type, comp in CASES:
            result = {}
            for impl in ("medseg", "highdicom"):
                out = str(Path(tmp) / f"{impl}-{seg_type}-{comp}.dcm")
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", impl, seg_type, comp or "none", str(study), out],
                    capture_output=True, text=True, preexec_fn=_limit(args.max_memory_gb), check=False)
                if proc.returncode != 0:
                    print(f"{impl} {seg_type} {comp}: failed\n{proc.stderr[-2000:]}")
                    result[impl] = None
                    continue
                result[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
                os.unlink(out)
            rows.append((seg_type, comp, result))
    head = (f"{'case':<22}{'impl':<11}{'write s':>9}{'read s':>9}{'size MB':>9}{'write peak MB':>15}"
            f"{'peak MB':>9}{'exact':>7}")
    print(head)
    print("-" * len(head))
    for seg_type, comp, result in rows:
        case = f"{seg_type}{'+' + comp if comp else ''}"
        for impl in ("medseg", "highdicom"):
            r = result.get(impl)
            if r is None:
                print(f"{case:<22}{impl:<11}{'failed':>9}")
                continue
            print(f"{case:<22}{impl:<11}{r['write_s']:>9.2f}{r['read_s']:>9.2f}{r['size_mb']:>9.2f}"
                  f"{r['write_peak_mb']:>15.0f}{r['peak_mb']:>9.0f}{r['exact']!s:>7}")
        m, h = result.get("medseg"), result.get("highdicom")
        if m and h:
            print(f"{case:<22}{'ratio':<11}{m['write_s'] / h['write_s']:>9.2f}{m['read_s'] / h['read_s']:>9.2f}"
                  f"{m['size_mb'] / h['size_mb']:>9.2f}{m['write_peak_mb'] / max(h['write_peak_mb'], 1):>15.2f}"
                  f"{m['peak_mb'] / max(h['peak_mb'], 1):>9.2f}")



if __name__ == "__main__":
    main()
