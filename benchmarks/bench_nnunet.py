"""An nnU-Net v2 result folder through medseg versus nnU-Net's own predictor, in one run: time, peak RSS, agreement.

    .venv/bin/python benchmarks/bench_nnunet.py                 # both sizes below
    .venv/bin/python benchmarks/bench_nnunet.py --sizes small --classes 14

The folder is built here: a TotalSegmentator-like 3 mm ``3d_fullres`` configuration (PlainConvUNet, random
weights, ``--classes`` output classes, no mirroring, as TotalSegmentator's trainers) in the hand-written layout of
``tests/nnunet_factory.py``. The CT is synthetic (body, organs, noise), int16 HU, 0.8 × 0.8 × 1.5 mm.

- medseg: ``Segmenter(folder).segment(load_volume(nifti))`` — nnU-Net's predictor in-process, with medseg's
  one-class-at-a-time argmax at the end (``medseg/models/nnunet.py``).
- nnU-Net: ``nnUNetPredictor.initialize_from_trained_model_folder`` + ``predict_from_files`` on the same NIfTI, as
  ``nnUNetv2_predict`` runs it (its preprocessing and export worker processes included).

Each side runs in its own subprocess in a memory cgroup whose limit is this machine's physical memory (MemTotal,
or ``--limit-gb``): a side that does not fit is killed by the kernel at the limit (it is also the first victim if
the machine runs out first). Without cgroups (not root) the limit is an address-space cap (RLIMIT_AS, through
``prlimit``). Peak RSS is the largest sum of RSS over the subprocess and its children (nnU-Net's worker processes),
sampled every 50 ms; "cgroup peak" is the cgroup's own high-water mark (page cache of written files included).
Agreement: the fraction of input voxels with the same label. Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import MemoryCage, cpu_name, load_average, memory_total_bytes  # benchmarks/_machine.py

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"small": (256, 256, 150), "medium": (512, 512, 200), "large": (512, 512, 300)}
SPACING = (0.8, 0.8, 1.5)



def _make_ct(shape: tuple[int, int, int], path: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(0)
    ni, nj, nk = shape
    i, j = np.meshgrid(np.linspace(-1, 1, ni), np.linspace(-1, 1, nj), indexing="ij")
    body = i**2 / 0.85 + j**2 / 0.55 < 0.85
    ct = np.empty(shape, dtype=np.int16)
    for k in range(nk):
        z = k / nk
        sl = np.full((ni, nj), -1000, dtype=np.int16)
        sl[body] = 40
        sl[(i - 0.3) ** 2 + (j + 0.1) ** 2 < 0.05 + 0.05 * z] = 120  # an organ changing along z
        sl[(i + 0.35) ** 2 + (j - 0.05) ** 2 < 0.03 * (1.2 - z)] = 60
        sl[(i + 0.0) ** 2 + (j - 0.45) ** 2 < 0.004] = 700  # a spine
        sl += rng.integers(-20, 21, size=(ni, nj), dtype=np.int16)
        ct[:, :, k] = sl
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-200.0, -180.0, -300.0]
    nib.save(nib.Nifti1Image(ct, affine), str(path))


def _worker(side: str, folder: Path, image: Path, out: Path) -> None:
    import torch

    t0 = time.perf_counter()
    if side == "medseg":
        from medseg.inference import Segmenter
        from medseg.io import load_volume

        seg = Segmenter(folder, device="cpu")
        t1 = time.perf_counter()
        labels = seg.segment(load_volume(image)).labels.array
        np.save(out / "medseg.npy", labels)
    else:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                               perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        pred.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
        t1 = time.perf_counter()
        (out / "nnunet").mkdir(exist_ok=True)
        pred.predict_from_files([[str(image)]], str(out / "nnunet"), num_processes_preprocessing=1,
                                num_processes_segmentation_export=1)
    t2 = time.perf_counter()
    (out / f"{side}.json").write_text(json.dumps({"init_s": t1 - t0, "segment_s": t2 - t1}))


def _run(side: str, folder: Path, image: Path, out: Path, limit_gb: float, timeout_s: float = 4 * 3600.0) -> dict:
    import psutil

    limit = int(limit_gb * 2**30)
    caged = MemoryCage.available()
    cmd = [sys.executable, __file__, "--worker", side, str(folder), str(image), str(out)]
    if not caged:  # prlimit execs the worker in the same process: the cap holds for it and every child it starts
        cmd = ["prlimit", f"--as={limit}", *cmd]
    log_path = out / f"{side}.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_file, MemoryCage(f"nnunet-{side}", limit) if caged else _nothing() as cage:
        cmd = cage.wrap(cmd) if cage is not None else cmd
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            if time.perf_counter() - t0 > timeout_s:
                for child in ps.children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait()
                break
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        for child in ps.children(recursive=True) if proc.returncode else ():  # workers left behind by a kill
            child.kill()
        oom = cage.oom_kills > 0 if cage is not None else False
        cgroup_peak = cage.peak_bytes / 2**30 if cage is not None else float("nan")
    wall = time.perf_counter() - t0
    log = log_path.read_text(errors="replace")
    result = {"ok": proc.returncode == 0, "wall_s": wall, "peak_rss_gb": peak / 2**30, "cgroup_peak_gb": cgroup_peak,
              "oom_killed": oom, "exit_code": proc.returncode, "limit_gb": limit_gb, "load_average_after": load_average()}
    if (out / f"{side}.json").is_file():
        result.update(json.loads((out / f"{side}.json").read_text()))
    if not result["ok"]:
        last = [line for line in log.splitlines() if line.strip()][-1:] or ["?"]
        result["error"] = (f"killed by the kernel at the {limit_gb:.1f} GiB memory limit (out of memory); last line: "
                           if oom else "") + last[0][:160]
    return result


class _nothing:
    """A context manager for "no cgroup"."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "large"])
    ap.add_argument("--classes", type=int, default=118, help="output classes incl. background (TotalSegmentator: 118)")
    ap.add_argument("--limit-gb", type=float, default=memory_total_bytes() / 2**30,
                    help="memory limit of each side (GiB; default: this machine's physical memory)")
    ap.add_argument("--only", choices=["medseg", "nnunet"], help="run one side only")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]), Path(args.worker[3]))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from nnunet_factory import write_fake_nnunet_folder

    how = "memory cgroup" if MemoryCage.available() else "address-space cap (RLIMIT_AS)"
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, load average {load_average():.1f}; classes {args.classes}; "
          f"limit per side: {how} of {args.limit_gb:.1f} GiB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        labels = {"background": 0, **{f"class_{c}": c for c in range(1, args.classes)}}
        folder = write_fake_nnunet_folder(base / "results", labels=labels, mirroring_axes=None,
                                          transpose_forward=(0, 1, 2), patch_size=(64, 64, 64),
                                          spacing=(3.0, 3.0, 3.0), features=(8, 16, 32, 64))
        print(f"{'size':<6} {'input':<14} {'side':<7} {'ok':<3} {'wall s':>7} {'segment s':>9} "
              f"{'peak RSS GiB':>12} {'cgroup peak':>11}  agreement / error", flush=True)
        for size in args.sizes:
            shape = SIZES[size]
            work = base / size
            work.mkdir()
            image = work / "case_0000.nii.gz"
            _make_ct(shape, image)
            skipped = {"ok": False, "wall_s": float("nan"), "peak_rss_gb": float("nan"),
                        "cgroup_peak_gb": float("nan"), "error": "not run (--only)"}
            ours = _run("medseg", folder, image, work, args.limit_gb) if args.only != "nnunet" else skipped
            print(f"  medseg {size}: {json.dumps(ours)}", flush=True)
            theirs = _run("nnunet", folder, image, work, args.limit_gb) if args.only != "medseg" else skipped
            print(f"  nnU-Net {size}: {json.dumps(theirs)}", flush=True)
            agree = float("nan")
            if ours["ok"] and theirs["ok"]:
                import nibabel as nib

                a = np.load(work / "medseg.npy")
                b = np.asanyarray(nib.load(str(work / "nnunet" / "case.nii.gz")).dataobj)
                agree = float((a == b).mean())
            _print_rows(size, shape, ours, theirs, agree)


def _print_rows(size: str, shape: tuple[int, int, int], ours: dict, theirs: dict, agree: float) -> None:
    for name, r in (("medseg", ours), ("nnU-Net", theirs)):
        extra = f"{agree:.6f}" if r["ok"] else r.get("error", "")
        print(f"{size:<6} {'x'.join(map(str, shape)):<14} {name:<7} {'yes' if r['ok'] else 'no':<3} "
              f"{r['wall_s']:7.1f} {r.get('segment_s', float('nan')):9.1f} {r['peak_rss_gb']:12.2f} "
              f"{r['cgroup_peak_gb']:11.2f}  {extra}")
    if ours["ok"] and theirs["ok"]:
        print(f"{'':<6} ratios medseg / nnU-Net: wall {ours['wall_s'] / theirs['wall_s']:.2f}, peak RSS "
              f"{ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}", flush=True)


if __name__ == "__main__":
    main()
