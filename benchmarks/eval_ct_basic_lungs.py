"""ct-basic's lungs on real CTs against TotalSegmentator's lung lobes (an accuracy check, not a timing claim).

Reads TotalSegmentator's source distribution (Apache-2.0), which carries real CTs and TotalSegmentator's own
predictions for them, and prints lung Dice (both lungs, left, right), volumes, and what became airway:

    pip download --no-binary :all: --no-deps totalsegmentator==2.18.0 -d /tmp/ts
    .venv/bin/python benchmarks/eval_ct_basic_lungs.py /tmp/ts/totalsegmentator-2.18.0.tar.gz

Cases: ``example_ct`` (122x101x112, 3 mm: abdomen from the lung bases down) against its ``--fast`` prediction
``example_seg_fast_force_split``, ``example_ct_sm`` (its top 30 slices) against the ``total`` prediction
``example_seg``, and the DICOM series in ``tests/data/totalseg_example`` (below the lung bases: no lung). Last,
without a reference (the sdist has no lung masks for it), the volumes ct-basic finds on ``aorta_report/example_ct``
(233x167x191, 1.5 mm, LPS: a whole chest and upper abdomen).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg.classical import ct_basic
from medseg.io import load_volume
from medseg.resample import resample_to

CASES = [("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"), ("example_ct_sm.nii.gz", "example_seg.nii.gz")]
LEFT, RIGHT = ("lung_upper_lobe_left", "lung_lower_lobe_left"), tuple(
    f"lung_{p}_lobe_right" for p in ("upper", "middle", "lower"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2 * np.sum(a & b) / total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sdist", type=Path, help="totalsegmentator-<version>.tar.gz (or its extracted folder)")
    args = ap.parse_args()
    names = {v: int(k) for k, v in json.loads(
        (ROOT / "tests" / "data" / "totalseg_example" / "classes.json").read_text())["total"].items()}
    left_ids, right_ids = [names[n] for n in LEFT], [names[n] for n in RIGHT]
    with tempfile.TemporaryDirectory() as tmp:
        if args.sdist.is_file():
            with tarfile.open(args.sdist) as tar:
                for m in tar.getmembers():
                    if m.name.endswith("reference_files/aorta_report/example_ct.nii.gz"):
                        m.name = "aorta_example_ct.nii.gz"
                        tar.extract(m, tmp, filter="data")
                    elif "/tests/reference_files/" in m.name and Path(m.name).name in {f for c in CASES for f in c}:
                        m.name = Path(m.name).name
                        tar.extract(m, tmp, filter="data")
            ref_dir = Path(tmp)
        else:
            ref_dir = next(args.sdist.rglob("reference_files"))
            (Path(tmp) / "aorta_example_ct.nii.gz").symlink_to(ref_dir / "aorta_report" / "example_ct.nii.gz")
        rows = []
        for img, seg in CASES:
            ct, ref = load_volume(ref_dir / img), load_volume(ref_dir / seg)
            t0 = time.perf_counter()
            out = ct_basic(ct).array
            dt = time.perf_counter() - t0
            rl, rr = np.isin(ref.array, left_ids), np.isin(ref.array, right_ids)
            rows.append((img, seg, dt, dice(np.isin(out, [2, 3]), rl | rr), dice(out == 2, rl), dice(out == 3, rr),
                         (rl | rr).sum() * ct.voxel_volume_ml, np.isin(out, [2, 3]).sum() * ct.voxel_volume_ml,
                         (out == 4).sum() * ct.voxel_volume_ml))
        dcm = load_volume(ROOT / "tests" / "data" / "totalseg_example" / "example_ct_dicom")
        ref = resample_to(load_volume(ROOT / "tests" / "data" / "totalseg_example" / "example_seg_dicom.nii.gz"), dcm,
                          interpolation="nearest")
        out = ct_basic(dcm).array
        rl, rr = np.isin(ref.array, left_ids), np.isin(ref.array, right_ids)
        rows.append(("example_ct_dicom", "example_seg_dicom", float("nan"), dice(np.isin(out, [2, 3]), rl | rr),
                     dice(out == 2, rl), dice(out == 3, rr), (rl | rr).sum() * dcm.voxel_volume_ml,
                     np.isin(out, [2, 3]).sum() * dcm.voxel_volume_ml, (out == 4).sum() * dcm.voxel_volume_ml))
        chest = load_volume(Path(tmp) / "aorta_example_ct.nii.gz")
        t0 = time.perf_counter()
        out = ct_basic(chest).array
        chest_s = time.perf_counter() - t0
        chest_ml = [(out == v).sum() * chest.voxel_volume_ml for v in (2, 3, 4)]
    print(f"{'CT':<20} {'reference':<36} {'s':>5} {'Dice':>6} {'left':>6} {'right':>6} {'ref mL':>8} "
          f"{'ours mL':>8} {'airway mL':>9}")
    for r in rows:
        print(f"{r[0]:<20} {r[1]:<36} {r[2]:5.1f} {r[3]:6.3f} {r[4]:6.3f} {r[5]:6.3f} {r[6]:8.1f} {r[7]:8.1f} "
              f"{r[8]:9.1f}")
    print("(Dice of two empty masks is reported as 1.0.)")
    print(f"aorta_report/example_ct (no reference): {chest_s:.1f} s, lung_left {chest_ml[0]:.0f} mL, lung_right "
          f"{chest_ml[1]:.0f} mL, airway {chest_ml[2]:.1f} mL")


if __name__ == "__main__":
    main()
