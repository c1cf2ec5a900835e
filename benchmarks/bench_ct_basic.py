"""ct-basic on the real samples: Dice against TotalSegmentator and seconds per CT.

Claim: ct-basic segments a CT in seconds on a 2-core CPU by working on a ~2 mm grid. Baseline, measured in the
same run: the same rules on the input grid (``CtBasicConfig(working_spacing_mm=None)``).

Cases
  real-20   the shared TotalSegmentator DICOM series (512 × 512 × 20, 0.98 × 0.98 × 2 mm; upper abdomen)
  proxy-300 a 512 × 512 × 300 volume made of those real slices, mirrored back and forth (a typical CT's size;
            not a real anatomy, timing only)
  msd-crop  the MSD spleen crop (164 × 166 × 26, 0.79 × 0.79 × 5 mm; abdomen, no lungs)

Dice follows medseg.metrics' empty-mask rule (absent from both → 1). Lungs: TotalSegmentator's five lobes merged
into left and right; bone: its vertebrae, ribs and humeri (costal cartilage left out).

Run:  .venv/bin/python benchmarks/bench_ct_basic.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from medseg import Volume, load_volume
from medseg.classical import CtBasicConfig, ct_basic
from medseg.resample import resample_to

DATA = ROOT / "tests" / "data"
BODY, LUNG_L, LUNG_R, AIRWAY, BONE = 1, 2, 3, 4, 5


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else float(2 * np.sum(pred & ref) / total)


def timed(volume: Volume, config: CtBasicConfig, repeats: int) -> tuple[Volume, float, float]:
    """Result, median seconds over ``repeats`` runs, and peak traced memory (MiB) of one more run."""
    times = []
    out = ct_basic(volume, config=config)  # warm-up: imports
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = ct_basic(volume, config=config)
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    ct_basic(volume, config=config)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ct = load_volume(DATA / "totalseg_example" / "example_ct_dicom")
    seg = resample_to(load_volume(DATA / "totalseg_example" / "example_seg_dicom.nii.gz"), ct,
                      interpolation="nearest").array
    names = {v: int(k) for k, v in json.loads((DATA / "totalseg_example" / "classes.json").read_text())["total"].items()}
    ref = {
        "lung_left": np.isin(seg, [names["lung_upper_lobe_left"], names["lung_lower_lobe_left"]]),
        "lung_right": np.isin(seg, [names[f"lung_{p}_lobe_right"] for p in ("upper", "middle", "lower")]),
        "bone": np.isin(seg, [names[n] for n in names if n.startswith(("vertebrae_", "rib_", "humerus_"))]),
    }
    reps = int(np.ceil(300 / ct.shape[2]))
    tiles = [ct.array if i % 2 == 0 else ct.array[:, :, ::-1] for i in range(reps)]
    proxy = Volume(np.concatenate(tiles, axis=2)[:, :, :300], ct.affine, modality="CT")
    msd = load_volume(DATA / "msd_spleen_crop" / "sub-spleen2_ct.nii.gz")
    spleen = load_volume(DATA / "msd_spleen_crop" / "sub-spleen2_ct_seg-manual.nii.gz").array > 0

    ours, base = CtBasicConfig(), CtBasicConfig(working_spacing_mm=None)
    print(f"ct-basic timing, median of {args.repeats} (2-mm working grid vs the same rules on the input grid)")
    print(f"{'case':<10} {'shape':<16} {'ours s':>7} {'base s':>7} {'speed-up':>8} {'ours MiB':>9} {'base MiB':>9}")
    results: dict[str, Volume] = {}
    for name, vol in (("real-20", ct), ("proxy-300", proxy), ("msd-crop", msd)):
        out, t_ours, m_ours = timed(vol, ours, args.repeats)
        _, t_base, m_base = timed(vol, base, max(1, args.repeats if name != "proxy-300" else 1))
        results[name] = out
        shape = "x".join(str(n) for n in vol.shape)
        print(f"{name:<10} {shape:<16} {t_ours:7.2f} {t_base:7.2f} {t_base / t_ours:7.2f}x {m_ours:9.0f} {m_base:9.0f}")

    o = results["real-20"].array
    ml = ct.voxel_volume_ml
    print("\nreal-20 against TotalSegmentator (--fast model output), on the CT grid")
    print(f"{'label':<11} {'ct-basic mL':>11} {'TS mL':>8} {'Dice':>6}")
    for label, value in (("lung_left", LUNG_L), ("lung_right", LUNG_R), ("bone", BONE)):
        pred = o == value
        print(f"{label:<11} {pred.sum() * ml:11.1f} {ref[label].sum() * ml:8.1f} {dice(pred, ref[label]):6.3f}")
    inside = float((o[seg > 0] > 0).mean())
    print(f"TotalSegmentator voxels (any label) inside ct-basic's body: {100 * inside:.2f} %")
    m = results["msd-crop"].array
    print(f"\nmsd-crop: lung/airway {np.isin(m, [LUNG_L, LUNG_R, AIRWAY]).sum() * msd.voxel_volume_ml:.1f} mL, "
          f"bone {(m == BONE).sum() * msd.voxel_volume_ml:.1f} mL, manual spleen inside body "
          f"{100 * float((m[spleen] > 0).mean()):.2f} %")


if __name__ == "__main__":
    main()
