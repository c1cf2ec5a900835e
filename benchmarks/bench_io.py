"""Claim: medseg.load_volume reads a DICOM CT series faster than SimpleITK's ImageSeriesReader and within 1.5× of a
bare pydicom read-and-stack loop (the floor: no sorting, no validation, no rescale), validation included.

Baselines, same run, same files, each loader in a fresh child process (so peak RSS is its own):
  - medseg.load_volume(folder)
  - SimpleITK ImageSeriesReader (GDCM series file names + Execute)
  - MONAI LoadImage (its default reader choice for a DICOM folder)
  - bare pydicom: dcmread + pixel_array + np.stack over the files in name order

Usage:  python benchmarks/bench_io.py [--slices 300] [--size 512] [--repeats 3] [--syntaxes explicit,j2k]
Prints a table per transfer syntax: best-of-N seconds, ratios, and the child's peak RSS growth over its
post-import baseline during the first load, in MB (the volume itself is 2 bytes × voxels for int16).
Nothing here asserts on time.
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

LOADERS = ("medseg", "simpleitk", "monai", "bare_pydicom")
SYNTAX_NAMES = {"explicit": "explicit-vr-little-endian", "j2k": "jpeg2000-lossless"}


def child(loader: str, folder: str, repeats: int) -> None:
    """Run one loader ``repeats`` times in this process; print JSON with the best time and peak RSS growth."""
    import numpy as np

    def status_mb(field: str) -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return 0.0

    if loader == "medseg":
        import medseg

        def run():
            v = medseg.load_volume(folder)
            return v.array, v.affine
    elif loader == "simpleitk":
        import SimpleITK as sitk

        def run():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder))
            img = reader.Execute()
            return sitk.GetArrayViewFromImage(img), img
    elif loader == "monai":
        from monai.transforms import LoadImage

        loader_t = LoadImage(image_only=True)

        def run():
            img = loader_t(folder)
            return img, None
    else:
        import pydicom

        def run():
            files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
            return np.stack([pydicom.dcmread(f).pixel_array for f in files]), None

    base = status_mb("VmRSS")
    times = []
    peak = 0.0
    extra = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        # VmHWM, not getrusage: ru_maxrss carries the parent's peak across fork/exec.
        peak = peak or status_mb("VmHWM")  # after the first load only
        arr = np.asarray(out[0])
        extra = {"shape": list(arr.shape), "dtype": str(arr.dtype), "checksum": float(arr.sum(dtype=np.float64))}
        del out, arr
    if loader == "monai":
        extra["reader"] = type(loader_t.readers[-1]).__name__ if getattr(loader_t, "readers", None) else "?"
    print(json.dumps({"best_s": min(times), "times": times, "peak_rss_growth_mb": peak - base, **extra}))


def make_series(root: Path, slices: int, size: int, syntax: str) -> Path:
    import numpy as np

    from medseg import Volume
    from medseg.io import write_dicom_series
    from medseg.phantom import make_phantom

    folder = root / f"phantom_{size}x{size}x{slices}_{syntax}"
    if folder.exists():
        return folder
    ph = make_phantom(shape=(size, size, slices), spacing_mm=(0.8, 0.8, 1.0), seed=0)
    image = Volume(np.asarray(ph.image.array).astype(np.int16), ph.image.affine, modality="CT")
    t0 = time.perf_counter()
    write_dicom_series(image, folder, transfer_syntax=SYNTAX_NAMES[syntax], seed=0)
    print(f"  wrote {slices} slices ({syntax}) in {time.perf_counter() - t0:.1f} s → {folder}", flush=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--syntaxes", default="explicit,j2k")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "medseg-bench-io"))
    ap.add_argument("--child", nargs=2, metavar=("LOADER", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.repeats)
        return
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"bench_io: {args.slices}×{args.size}×{args.size} phantom CT, best of {args.repeats}, cpu_count={os.cpu_count()}")
    for syntax in args.syntaxes.split(","):
        folder = make_series(root, args.slices, args.size, syntax)
        results = {}
        for loader in LOADERS:
            proc = subprocess.run(
                [sys.executable, __file__, "--repeats", str(args.repeats), "--child", loader, str(folder)],
                check=False, capture_output=True, text=True,
            )
            if proc.returncode != 0:
                results[loader] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
            else:
                results[loader] = json.loads(proc.stdout.strip().splitlines()[-1])
        ours = results["medseg"].get("best_s")
        bare = results["bare_pydicom"].get("best_s")
        print(f"\n[{syntax}] {folder.name}")
        print(f"{'loader':<14}{'best s':>9}{'vs medseg':>11}{'medseg/it':>11}{'peak RSS +MB':>14}  notes")
        for loader, r in results.items():
            if "error" in r:
                print(f"{loader:<14}  failed: {r['error']}")
                continue
            note = r.get("reader", "") + f" {r['dtype']} {tuple(r['shape'])}"
            print(f"{loader:<14}{r['best_s']:>9.3f}{r['best_s'] / ours:>11.2f}{ours / r['best_s']:>11.2f}"
                  f"{r['peak_rss_growth_mb']:>14.0f}  {note}")
        if ours and bare and "best_s" in results["simpleitk"]:
            print(f"medseg / bare pydicom = {ours / bare:.2f}× (target ≤ 1.5)   "
                  f"medseg / SimpleITK = {ours / results['simpleitk']['best_s']:.2f}× (target < 1)")
        same = results["medseg"].get("checksum") == results["simpleitk"].get("checksum")
        print(f"voxel sum medseg == SimpleITK: {same}")


if __name__ == "__main__":
    main()
