"""Batch throughput: ``medseg batch`` against a shell loop of ``medseg segment`` calls, and Dask against in-process.

Baseline: what a user writes today without the runner, one ``medseg segment`` process per case (each process
imports PyTorch and MONAI and loads the model again). Measured in the same run on the same cases:

1. shell loop of ``medseg segment CASE --model M --out ...`` (one process per case);
2. ``medseg batch CASES --model M --out ... --no-stats --no-metrics --no-report`` (the same work: labels only;
   in-process executor: model loaded once, next case read ahead);
3. the same with ``--executor dask --workers 2`` (a LocalCluster of 2 worker processes).

The ratio grows with the share of process start-up (imports, model load) in a case, so it depends on the case
size (``--shape``) and the device; the table says what was measured.

Printed: wall time, cases per hour, the ratio to the shell loop, and the peak resident memory of the process tree
(the sum over the command and its children, sampled every 0.1 s with psutil). Never asserts on time.

    python benchmarks/bench_batch.py [--cases 10] [--shape 96,96,48] [--model phantom-abdomen-ct]

Each child runs under an address-space limit (``prlimit --as``, ``--max-gib``, default 8 GiB) so a run can never take the shared
machine's memory; Dask workers also get a 2 GiB memory limit each.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _machine import cpu_name  # benchmarks/_machine.py (the scripts run from this folder)


def run_tree(cmds: list[list[str]], max_gib: float) -> tuple[float, float]:
    """Run commands one after another; (wall seconds, peak summed RSS of each command's process tree in MiB)."""
    limit = int(max_gib * 2**30)
    peak = 0
    t0 = time.perf_counter()
    for cmd in cmds:
        proc = subprocess.Popen(["prlimit", f"--as={limit}", "--", *cmd], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        root = psutil.Process(proc.pid)
        stop = threading.Event()

        def sample(root: psutil.Process = root, stop: threading.Event = stop) -> None:
            nonlocal peak
            while not stop.is_set():
                try:
                    procs = [root, *root.children(recursive=True)]
                    peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
                except psutil.Error:
                    pass
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, err = proc.communicate()
        stop.set()
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return time.perf_counter() - t0, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--shape", default="96,96,48")
    parser.add_argument("--model", default="phantom-abdomen-ct")
    parser.add_argument("--max-gib", type=float, default=8.0)
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    medseg = str(Path(sys.executable).with_name("medseg"))
    work = Path(tempfile.mkdtemp(prefix="medseg-bench-batch-"))
    try:
        studies = work / "studies"
        for n in range(args.cases):
            subprocess.run([medseg, "phantom", str(studies / f"case-{n:02d}"), "--seed", str(500 + n), "--shape",
                            args.shape], check=True, stdout=subprocess.DEVNULL)
        cases = sorted(studies.iterdir())
        common = ["--model", args.model, "--device", "cpu"]
        print(f"CPU: {cpu_name()} ({psutil.cpu_count(logical=True)} logical CPUs, load average "
              f"{' '.join(f'{v:.1f}' for v in psutil.getloadavg())}); {args.cases} phantom DICOM cases of "
              f"{args.shape} voxels; model {args.model} on cpu")
        loop = [[medseg, "segment", str(c / "ct"), *common, "--out", str(work / "loop" / f"{c.name}.nii.gz")]
                for c in cases]
        (work / "loop").mkdir()
        rows = []
        t, mem = run_tree(loop, args.max_gib)
        rows.append(("shell loop of medseg segment (baseline)", t, mem))
        same_work = ["--quiet", "--no-stats", "--no-metrics", "--no-report"]  # labels only, as the loop writes
        t, mem = run_tree([[medseg, "batch", str(studies), *common, "--out", str(work / "batch"), *same_work]],
                          args.max_gib)
        rows.append(("medseg batch (in-process executor)", t, mem))
        in_process = t
        if not args.skip_dask:
            t, mem = run_tree([[medseg, "batch", str(studies), *common, "--out", str(work / "dask"), *same_work,
                                "--executor", "dask", "--workers", "2"]], args.max_gib)
            rows.append(("medseg batch --executor dask --workers 2", t, mem))
        base = rows[0][1]
        print(f"{'variant':<44} {'wall s':>8} {'cases/h':>9} {'vs loop':>8} {'peak RSS MiB':>13}")
        for name, t, mem in rows:
            print(f"{name:<44} {t:8.1f} {args.cases * 3600 / t:9.0f} {base / t:7.2f}x {mem:13.0f}")
        if not args.skip_dask:
            print(f"dask (2 workers) against the in-process runner: {in_process / rows[2][1]:.2f}x cases per hour")
        same = all((work / "batch" / c.name / "pred.nii.gz").read_bytes()
                   == (work / "dask" / c.name / "pred.nii.gz").read_bytes() for c in cases) if not args.skip_dask else None
        if same is not None:
            print(f"dask labels byte-identical to the in-process run: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
