"""Claim: a batch that pulls its studies from a PACS and pushes the DICOM SEGs back costs little over the same batch
from a local folder; the table says how much (studies per hour, ratio) and which share of the time is transfer.

Same run, same phantom studies, same model, one process (the model is loaded once, before both runs):
  - local:  ``run_batch`` over a folder of the DICOM studies, writing DICOM SEG (the baseline)
  - pacs:   the studies stored in a real Orthanc (Debian's orthanc + orthanc-dicomweb, in a private network
            namespace) over STOW-RS, then ``run_batch`` with a DICOMweb (or DIMSE) source and ``--push``: QIDO-RS query,
            WADO-RS retrieval into the cache, segmentation, SEG written, STOW-RS push verified

Usage:  python benchmarks/bench_pacs.py [--studies 20] [--shape 40,36,24] [--model phantom-abdomen-ct]
                                         [--protocol dicomweb|dimse] [--torch-threads 1]
Needs root (or user namespaces) for the network namespace, and Orthanc installed. Prints the CPU, a table of
seconds, studies per hour and ratios, the transfer share (query + retrieval + push over the PACS run's wall time),
and peak RSS of this process and of Orthanc. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import orthanc_server as osrv
from _machine import cpu_name  # benchmarks/_machine.py (the scripts run from this folder)


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--shape", default="40,36,24")
    ap.add_argument("--model", default="phantom-abdomen-ct")
    ap.add_argument("--protocol", choices=("dicomweb", "dimse"), default="dicomweb")
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    reason = osrv.why_not()
    if reason:
        sys.exit(f"bench_pacs: {reason}")

    from medseg.manifest import Manifest, make_manifest
    from medseg.pacs import Credentials, PacsSink, PacsSource, store_files
    from medseg.phantom import make_phantom, write_phantom_study
    from medseg.workflow import OutputOptions, RunOptions, run_batch

    shape = tuple(int(v) for v in args.shape.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    local = tmp / "local"
    for n in range(args.studies):
        study = write_phantom_study(make_phantom(1000 + n, shape=shape), tmp / "phantoms" / f"s{n:02d}")
        shutil.copytree(study.image_path, local / f"s{n:02d}")
    options = RunOptions(model=args.model, device="cpu", torch_threads=args.torch_threads, prefetch=True,
                         outputs=OutputOptions(dicom_seg=True, report=False))
    warm = make_manifest(local, checksums=False)
    run_batch(Manifest(warm.cases[:1], warm.root), tmp / "out-warmup", options)  # the model is loaded once, here
    cred = Credentials(osrv.USER, osrv.PASSWORD)
    with osrv.private_network():
        server = osrv.Orthanc(tmp / "orthanc")
        server.start()
        try:
            t = time.perf_counter()
            for folder in sorted(local.iterdir()):
                store_files(PacsSink(server.dicomweb, cred), sorted(folder.iterdir()))
            upload_s = time.perf_counter() - t

            t = time.perf_counter()
            base = run_batch(make_manifest(local, checksums=False), tmp / "out-local", options)
            local_s = time.perf_counter() - t

            url = server.dicomweb if args.protocol == "dicomweb" else server.dimse
            source = PacsSource(url, cache_dir=tmp / "cache", credentials=cred, ae_title=osrv.OUR_AET)
            sink = PacsSink(url, cred, ae_title=osrv.OUR_AET)
            t = time.perf_counter()
            manifest = source.manifest()
            query_s = time.perf_counter() - t
            pacs = run_batch(manifest, tmp / "out-pacs", options, source=source, sink=sink)
            pacs_s = time.perf_counter() - t
            orthanc_mb = vm_hwm_mb(server.proc.pid) if server.proc else float("nan")
            segs = server.seg_series()
        finally:
            server.stop()
    fetch_s = sum(r.timings_s.get("fetch", 0.0) for r in pacs.records)
    push_s = sum(r.timings_s.get("push", 0.0) for r in pacs.records)
    seg_s = sum(r.timings_s.get("segment", 0.0) for r in pacs.records)
    ok = (base.exit_status, pacs.exit_status, sum(len(v) for v in segs.values()))
    print(f"CPU: {cpu_name()}  ({args.studies} phantom studies {shape}, model {args.model}, {args.protocol}, "
          f"torch threads {args.torch_threads})")
    print(f"exit status local {ok[0]}, pacs {ok[1]}; SEG series in Orthanc: {ok[2]} for {len(segs)} studies; "
          f"upload of the studies (STOW-RS, not counted): {upload_s:.1f} s")
    local_seg_s = sum(r.timings_s.get("segment", 0.0) for r in base.records)
    print(f"{'run':<8} {'seconds':>8} {'studies/h':>10} {'vs local':>9} {'segment s':>10} {'rest s':>8}")
    for name, secs, seg in (("local", local_s, local_seg_s), ("pacs", pacs_s, seg_s)):
        print(f"{name:<8} {secs:8.1f} {3600 * args.studies / secs:10.0f} {local_s / secs:9.2f} {seg:10.1f} "
              f"{secs - seg:8.1f}")
    print("(rest = wall time outside segmentation: reading, SEG writing, statistics, and for pacs the transfers; "
          "segmentation time varies with the machine's load, the rest column compares the runs' own overhead)")
    transfer = query_s + fetch_s + push_s
    print(f"pacs run: query {query_s:.2f} s, retrieval {fetch_s:.2f} s, push {push_s:.2f} s, segment {seg_s:.1f} s; "
          f"transfer share {100 * transfer / pacs_s:.1f} % of the wall time (retrieval overlaps segmentation: "
          "the runner reads ahead)")
    print(f"peak RSS: this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB, "
          f"Orthanc {orthanc_mb:.0f} MB")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
