"""Claims of the napari plugin, measured with a real viewer (run it under Xvfb: ``xvfb-run -a python ...``):

1. Opening a 300-slice 512×512 DICOM CT series in the viewer through the medseg reader costs little more than
   ``medseg.load_volume`` alone (baseline: ``load_volume`` on the same folder, same run).
2. The Review widget's statistics are up to date within a second after a paint stroke, an undo and a redo on a
   512×512×300 volume (baseline: one full recount of the label counts with ``np.bincount``, what a naive plugin
   does per stroke).
3. The UI event loop stays responsive while a segmentation runs in the worker thread: a 10 ms timer's lateness
   (target under 100 ms; baseline: the same timer with nothing running); Cancel ends the run within a second.

Usage:  xvfb-run -a python benchmarks/bench_napari.py [--slices 300] [--size 512] [--seg-size 192]
Prints one table with seconds, ratios against the baselines, and peak RSS. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import cpu_name  # benchmarks/_machine.py (the scripts run from this folder)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process(app, seconds: float = 0.0) -> None:
    end = time.perf_counter() + seconds
    app.processEvents()
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seg-size", type=int, default=192, help="phantom size for the event-loop measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import napari
    from medseg_napari._layers import ReviewLabels, labels_layer_data
    from medseg_napari._review import ReviewWidget
    from medseg_napari._segment import SegmentWidget
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from medseg import load_volume
    from medseg.io import write_dicom_series
    from medseg.phantom import make_phantom

    rows: list[tuple[str, float, str]] = []
    n, k = args.size, args.slices
    with tempfile.TemporaryDirectory() as tmp:
        # ---- 1. open a DICOM series ------------------------------------------------------------------------
        phantom = make_phantom(3, shape=(n, n, k), orientation="LPS")
        folder = Path(tmp) / "ct"
        write_dicom_series(phantom.image, folder, seed=3)
        labels = phantom.labels
        del phantom
        load_times, open_times = [], []
        viewer = napari.Viewer(show=True)
        app = QApplication.instance()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            volume = load_volume(folder)
            load_times.append(time.perf_counter() - t0)
            del volume
            t0 = time.perf_counter()
            layer = viewer.open(str(folder), plugin="medseg")[0]
            process(app)  # the first draw of the slice
            open_times.append(time.perf_counter() - t0)
            viewer.layers.remove(layer)
        load_s, open_s = min(load_times), min(open_times)
        rows.append((f"load_volume, {k} slices {n}x{n} (baseline)", load_s, "1.00"))
        rows.append(("open in the viewer (reader + first draw)", open_s, f"{open_s / load_s:.2f}"))

        # ---- 2. statistics after a stroke, undo, redo ------------------------------------------------------
        image_layer = viewer.open(str(folder), plugin="medseg")[0]
        data, kwargs, _ = labels_layer_data(labels, "AI proposal")
        viewer.add_layer(ReviewLabels(data, **kwargs))
        reviewed = ReviewLabels(data.copy(), **{**kwargs, "name": "Reviewed"})
        viewer.add_layer(reviewed)
        t0 = time.perf_counter()
        widget = ReviewWidget(viewer)
        viewer.window.add_dock_widget(widget)
        build_s = time.perf_counter() - t0
        assert widget.layer is reviewed and widget.image is image_layer
        t0 = time.perf_counter()
        np.bincount(np.asarray(reviewed.data).ravel(), minlength=256)
        recount_s = time.perf_counter() - t0
        rows.append(("full label recount, np.bincount (baseline per stroke)", recount_s, "1.00"))
        rows.append(("review table built once (counts, HU sums, vs AI)", build_s, f"{build_s / recount_s:.2f}"))
        reviewed.mode = "paint"
        reviewed.brush_size = 40
        reviewed.selected_label = 2
        z = reviewed.data.shape[0] // 2
        strokes, undos, redos = [], [], []
        for r in range(args.repeats):
            centre = (z, n // 2 + 10 * r, n // 3)
            t0 = time.perf_counter()
            reviewed.paint(centre, 2)
            strokes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reviewed.undo()
            undos.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reviewed.redo()
            redos.append(time.perf_counter() - t0)
        # the numbers are right (not just fast): compare with a recount once
        counts = np.bincount(np.asarray(reviewed.data).ravel(), minlength=256)
        assert widget.tally is not None and np.array_equal(widget.tally.counts[:256], counts[:256])
        for what, times in (("paint stroke + statistics", strokes), ("undo + statistics", undos),
                            ("redo + statistics", redos)):
            rows.append((f"{what} (brush 40, {n}x{n}x{k})", max(times), f"{max(times) / recount_s:.2f}"))
        viewer.close()

    # ---- 3. event-loop latency while a segmentation runs ---------------------------------------------------------
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    from medseg_napari._layers import image_layer_data

    seg_phantom = make_phantom(5, shape=(args.seg_size, args.seg_size, args.seg_size // 2), orientation="LPS")
    data, kwargs, _ = image_layer_data(seg_phantom.image, "CT")
    viewer.add_image(data, **kwargs)
    seg_widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg_widget)

    def lateness(seconds: float | None, worker=None) -> list[float]:
        late: list[float] = []
        last = [time.perf_counter()]

        def tick() -> None:
            now = time.perf_counter()
            late.append(max(0.0, now - last[0] - 0.010))
            last[0] = now

        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(tick)
        timer.start()
        t0 = time.perf_counter()
        while (worker is not None and not done[0]) or (seconds is not None and time.perf_counter() - t0 < seconds):
            app.processEvents()
            time.sleep(0.001)
        timer.stop()
        return late

    done = [False]
    idle = lateness(2.0)
    worker = seg_widget.run()
    worker.finished.connect(lambda: done.__setitem__(0, True))
    t0 = time.perf_counter()
    busy = lateness(None, worker)
    seg_s = time.perf_counter() - t0
    # Cancel: from the click to the worker's end, after its first batch of windows
    done[0] = False
    worker = seg_widget.run()
    worker.finished.connect(lambda: done.__setitem__(0, True))
    while seg_widget.progress_bar.value() < 1:
        app.processEvents()
        time.sleep(0.001)
    t0 = time.perf_counter()
    seg_widget.cancel_button.click()
    while not done[0]:
        app.processEvents()
        time.sleep(0.001)
    cancel_s = time.perf_counter() - t0

    def p95(xs: list[float]) -> float:
        return float(np.percentile(xs, 95)) if xs else float("nan")

    size = f"{args.seg_size}x{args.seg_size}x{args.seg_size // 2}"
    rows.append(("event-loop lateness, idle: p95 (baseline)", p95(idle), f"max {max(idle):.3f} s"))
    rows.append((f"lateness while segmenting {size} ({seg_s:.1f} s): p95", p95(busy),
                 f"max {max(busy):.3f} s, mean {statistics.mean(busy):.3f}"))
    rows.append(("Cancel: click to the worker's end", cancel_s, "stops at the next batch of windows"))
    viewer.close()

    print(f"CPU: {cpu_name()}; napari {napari.__version__}; peak RSS {peak_rss_mb():.0f} MB")
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement'.ljust(width)}  {'seconds':>9}  ratio / note")
    for what, secs, note in rows:
        print(f"{what.ljust(width)}  {secs:9.3f}  {note}")


if __name__ == "__main__":
    main()
