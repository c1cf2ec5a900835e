"""HD95 + ASSD + NSD of a liver-sized object in a 512×512×300 mask: medseg.evaluate vs MONAI's three functions.

Baseline (same run, same masks): monai.metrics.compute_hausdorff_distance(percentile=95),
compute_average_surface_distance(symmetric=True) and compute_surface_dice, each given the voxel spacing.
Prints the values of both, their largest difference, the time ratio and peak memory (tracemalloc for Python/numpy
allocations, plus process RSS from psutil). Never asserts on time.

    .venv/bin/python benchmarks/bench_metrics.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
import warnings

import numpy as np


def liver_like(shape: tuple[int, int, int], spacing: tuple[float, float, float], shift_mm: tuple[float, float, float],
               ) -> np.ndarray:
    """A lumpy ellipsoid of about 1.6 L (a liver), built slab by slab to keep memory low."""
    centre = np.array([220.0, 210.0, 150.0]) * spacing + np.asarray(shift_mm)
    radii = np.array([95.0, 80.0, 60.0])
    out = np.zeros(shape, dtype=np.uint8)
    ii, jj = np.meshgrid(np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1], indexing="ij")
    for k in range(shape[2]):
        z = k * spacing[2]
        r2 = ((ii - centre[0]) / radii[0]) ** 2 + ((jj - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
        bumps = 0.08 * np.sin(ii / 9.0) * np.cos(jj / 11.0 + z / 13.0)
        out[:, :, k] = r2 <= 1.0 + bumps
    return out


def ours(pred: np.ndarray, ref: np.ndarray, affine: np.ndarray, tol: float) -> dict[str, float]:
    from medseg import Volume, evaluate

    row = evaluate(Volume(pred, affine), Volume(ref, affine), nsd_tolerance_mm=tol)[1]
    return {"hd95_mm": row.hd95_mm, "assd_mm": row.assd_mm, "nsd": row.nsd}


def monai(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    p = torch.from_numpy(pred)[None, None]
    r = torch.from_numpy(ref)[None, None]
    sp = list(spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "hd95_mm": compute_hausdorff_distance(p, r, percentile=95, spacing=sp).item(),
            "assd_mm": compute_average_surface_distance(p, r, symmetric=True, spacing=sp).item(),
            "nsd": compute_surface_dice(p, r, [tol], spacing=sp).item(),
        }


def timed(fn, *args) -> tuple[dict[str, float], float, int]:
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(*args)
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, dt, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (best is reported)")
    args = parser.parse_args()
    import psutil
    import torch

    shape = (512, 512, 300)
    spacing = (0.78, 0.78, 1.5)
    affine = np.diag([*spacing, 1.0])
    tol = 2.0
    ref = liver_like(shape, spacing, (0.0, 0.0, 0.0))
    pred = liver_like(shape, spacing, (2.3, -1.6, 3.0))
    ml = ref.sum() * np.prod(spacing) / 1000
    print(f"mask {shape} uint8, spacing {spacing} mm, reference object {ml:.0f} mL, prediction shifted "
          f"(2.3, -1.6, 3.0) mm; torch threads {torch.get_num_threads()}")
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    res_m, _t_m, peak_m = timed(monai, pred, ref, spacing, tol)  # warm-up, imports
    res_o, _t_o, peak_o = timed(ours, pred, ref, affine, tol)
    times_m, times_o = [], []
    for _ in range(args.repeats):
        res_m, t, peak_m = timed(monai, pred, ref, spacing, tol)
        times_m.append(t)
        res_o, t, peak_o = timed(ours, pred, ref, affine, tol)
        times_o.append(t)
    rss_peak = proc.memory_info().rss
    print(f"{'metric':<10}{'medseg':>16}{'MONAI':>16}{'|diff|':>12}")
    worst = 0.0
    for key in ("hd95_mm", "assd_mm", "nsd"):
        diff = abs(res_o[key] - res_m[key])
        worst = max(worst, diff)
        print(f"{key:<10}{res_o[key]:>16.6f}{res_m[key]:>16.6f}{diff:>12.2e}")
    best_o, best_m = min(times_o), min(times_m)
    print(f"time (best of {args.repeats}): medseg {best_o:.3f} s, MONAI (3 calls) {best_m:.3f} s, "
          f"ratio {best_m / best_o:.1f}x; all runs medseg {[round(t, 3) for t in times_o]}, "
          f"MONAI {[round(t, 3) for t in times_m]}")
    print(f"peak traced memory: medseg {peak_o / 2**20:.0f} MiB, MONAI {peak_m / 2**20:.0f} MiB "
          f"(tracemalloc; torch's own buffers are not traced); process RSS {rss0 / 2**20:.0f} → "
          f"{rss_peak / 2**20:.0f} MiB")
    print(f"largest |difference| {worst:.2e} ({'equal to 1e-3 mm' if worst <= 1e-3 else 'NOT EQUAL'})")


if __name__ == "__main__":
    main()
