"""Held-out evaluation of the shipped network model ``phantom-abdomen-ct`` against the issue's targets.

Ten phantoms (seeds 90000–90009, never used in training or validation: the script checks the seeds recorded in the
card's provenance) with varied spacing (1.5–3.5 mm in-plane, 1.5–5 mm slices), orientation (LPS, RAS, LPI, RAI and
the permuted PLS and ASL), body size (0.8–1.2) and tumours (1–3 liver tumours, a kidney tumour in about 60 %) are
segmented with the shipped card through the public Segmenter on CPU, on each phantom's own grid, and scored with
:func:`medseg.metrics.evaluate` against the phantom's exact labels.

Printed: per-label mean Dice (over the cases whose reference has the label) beside its target (organs ≥ 0.90,
tumours ≥ 0.70), lesion-wise detection precision / recall / F1 pooled over the cases (target F1 ≥ 0.8), whether
every output was on its input's grid, and time and peak RSS per case. There is no accuracy baseline to divide by:
the targets are the reference. Nothing is asserted; the exit code is 0 either way.

Post-processing choices (e.g. a per-label minimum component size) are never made on these seeds: they are made on
the card's validation phantoms or on 30 *calibration* phantoms (seeds 5300–5329, drawn like the held-out sets,
never used for training or scoring), whose predicted lesion components ``--components-on`` lists.

Usage::

    python benchmarks/eval_shipped_models.py                # table
    python benchmarks/eval_shipped_models.py --first-seed 91000   # another held-out set
    python benchmarks/eval_shipped_models.py --json out.json
    python benchmarks/eval_shipped_models.py --record       # also write the table into the shipped card
    python benchmarks/eval_shipped_models.py --components-on calibration   # lesion components, no post-processing
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "phantom-abdomen-ct"
EVAL_SEEDS = tuple(range(90000, 90010))
#: Phantoms drawn like the held-out sets for choosing post-processing; never scored as held-out.
CALIBRATION_SEEDS = tuple(range(5300, 5330))
ORGAN_TARGET, TUMOUR_TARGET, F1_TARGET = 0.90, 0.70, 0.80


def heldout_source(seeds: tuple[int, ...] = EVAL_SEEDS) -> Any:
    """The held-out phantom source (seeds, spacing, orientation, body size, tumour ranges)."""
    from medseg.train import PhantomSource

    return PhantomSource(seeds=seeds, spacing_lo_mm=(1.5, 1.5, 1.5), spacing_hi_mm=(3.5, 3.5, 5.0),
                         orientations=("LPS", "RAS", "LPI", "RAI", "PLS", "ASL"), body_scale=(0.8, 1.2),
                         liver_tumours=(1, 3), kidney_tumour=0.6, noise_hu=(10.0, 15.0))


def _training_seeds(card: Any) -> set[int]:
    seeds: set[int] = set()
    for key in ("train_data", "validation_data"):
        ph = (card.provenance.get(key) or {}).get("phantoms")
        if not ph:
            continue
        s = ph["seeds"]
        seeds |= set(range(s[0], s[1])) if len(s) == 2 else set(s)  # two numbers: [start, stop)
    return seeds


def evaluate_model(model: str = MODEL, *, device: str = "cpu", seeds: tuple[int, ...] = EVAL_SEEDS) -> dict[str, Any]:
    """Segment and score the held-out phantoms; return the table as a dict."""
    from medseg.inference import Segmenter
    from medseg.metrics import evaluate
    from medseg.train import phantom_cases

    seg = Segmenter(model, device=device)
    card = seg.card
    overlap = _training_seeds(card) & set(seeds)
    if overlap:
        raise SystemExit(f"held-out seeds {sorted(overlap)} were used in training; choose others")
    overlap = set(CALIBRATION_SEEDS) & set(seeds)
    if overlap:
        raise SystemExit(f"held-out seeds {sorted(overlap)} are calibration seeds (post-processing was chosen on "
                         "them); choose others")
    assert card.labels is not None
    names = [card.labels.names[v] for v in sorted(card.labels)]
    lesion_names = [card.labels.names[v] for v in sorted(card.labels) if card.labels[v].kind == "lesion"]
    dice: dict[str, list[float]] = {n: [] for n in names}
    counts = {n: {"n_ref": 0, "n_pred": 0, "tp_ref": 0, "tp_pred": 0} for n in lesion_names}
    cases = []
    for case in phantom_cases(heldout_source(seeds)):
        ph = case.make()
        t0 = time.perf_counter()
        out = seg.segment(ph.image)
        seconds = time.perf_counter() - t0
        on_grid = out.labels.same_grid(ph.image) and out.labels.shape == ph.image.shape
        result = evaluate(out.labels, ph.labels)
        row: dict[str, Any] = {"seed": case.seed, "shape": list(case.shape),
                               "spacing_mm": [round(s, 2) for s in case.spacing_mm], "orientation": case.orientation,
                               "body_scale": case.body_scale, "on_input_grid": bool(on_grid),
                               "seconds": round(seconds, 2), "dice": {}}
        for r in result.labels:
            if r.name in dice and not r.ref_empty:
                dice[r.name].append(float(r.dice))
                row["dice"][r.name] = round(float(r.dice), 4)
        for les in result.lesions:
            if les.name in counts:
                for k in counts[les.name]:
                    counts[les.name][k] += int(getattr(les, k))
        cases.append(row)
        print(f"  seed {case.seed} {case.orientation} {tuple(case.shape)} "
              f"{'x'.join(f'{s:.2f}' for s in case.spacing_mm)} mm, body {case.body_scale:.2f}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row["dice"].items()) + f"  ({seconds:.1f} s)", flush=True)
    summary: dict[str, Any] = {"model": card.name, "seeds": list(seeds), "labels": {}, "lesions": {}}
    for n in names:
        kind = card.labels[card.labels.value_of(n)].kind
        target = TUMOUR_TARGET if n in lesion_names else ORGAN_TARGET
        vals = dice[n]
        mean = float(np.mean(vals)) if vals else float("nan")
        summary["labels"][n] = {"kind": kind, "mean_dice": round(mean, 4), "min_dice": round(min(vals), 4) if vals
                                else None, "cases": len(vals), "target": target, "met": bool(vals and mean >= target)}
    for n, c in counts.items():
        precision = c["tp_pred"] / c["n_pred"] if c["n_pred"] else 1.0
        recall = c["tp_ref"] / c["n_ref"] if c["n_ref"] else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        summary["lesions"][n] = {**c, "precision": round(precision, 4), "recall": round(recall, 4),
                                 "f1": round(f1, 4), "target": F1_TARGET, "met": f1 >= F1_TARGET}
    summary["all_on_input_grid"] = all(c["on_input_grid"] for c in cases)
    summary["seconds_per_case"] = round(float(np.mean([c["seconds"] for c in cases])), 2)
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary["cases"] = cases
    return summary


def lesion_components(model: str = MODEL, *, on: str = "calibration", device: str = "cpu") -> list[dict[str, Any]]:
    """Lesion components predicted without post-processing on the card's validation phantoms (``on="validation"``)
    or on the calibration phantoms (:data:`CALIBRATION_SEEDS`, drawn like the held-out sets), never on held-out
    seeds: how big the detected ones and the false positives are, without post-processing and after the card's.
    This is what post-processing (``postprocessing.min_component_ml_by_label``, ``lesion_hosts``) is chosen
    and checked on."""
    from medseg.inference import Segmenter
    from medseg.metrics import evaluate
    from medseg.postprocess import postprocess_labels
    from medseg.train import PhantomSource, _source, phantom_cases

    seg = Segmenter(model, device=device, postprocess=False)
    if on == "calibration":
        source: Any = heldout_source(CALIBRATION_SEEDS)
    else:
        described = seg.card.provenance.get("validation_data")
        source = _source(seg.card.name, described, "provenance.validation_data", Path.cwd()) if described else None
        if not isinstance(source, PhantomSource):
            raise SystemExit(f"{seg.card.name}: the card records no validation phantoms")
    rows = []
    for case in phantom_cases(source):
        ph = case.make()
        raw = seg.segment(ph.image).labels
        for stage, labels in (("raw", raw), ("card", postprocess_labels(raw, seg.card.postprocessing))):
            for det in evaluate(labels, ph.labels).lesions:
                for m in det.lesions:
                    rows.append({"seed": case.seed, "postprocessing": stage, "label": det.name, "status": m.status,
                                 "ref_ml": round(m.ref_ml, 3), "pred_ml": round(m.pred_ml, 3), "dice": round(m.dice, 3)})
                    if stage == "raw":
                        print(f"  seed {case.seed} {det.name:<14} {m.status:<15} reference {m.ref_ml:7.2f} mL  "
                              f"predicted {m.pred_ml:7.2f} mL  Dice {m.dice:.2f}", flush=True)
    for stage, what in (("raw", "without post-processing"), ("card", "after the card's post-processing")):
        print(f"{what}:")
        for name in sorted({r["label"] for r in rows}):
            mine = [r for r in rows if r["label"] == name and r["postprocessing"] == stage]
            found = [r["pred_ml"] for r in mine if r["pred_ml"] > 0 and r["ref_ml"] > 0]
            false = [r["pred_ml"] for r in mine if r["pred_ml"] > 0 and r["ref_ml"] == 0]
            missed = sum(1 for r in mine if r["pred_ml"] == 0 and r["ref_ml"] > 0)
            smallest = f"smallest {min(found):.2f} mL" if found else "none"
            largest = f", largest {max(false):.2f} mL" if false else ""
            print(f"  {name}: {len(found)} detected ({smallest}); {missed} missed; {len(false)} false positive{largest}")
    return rows


def print_table(s: dict[str, Any]) -> None:
    print(f"\n{s['model']}: {len(s['cases'])} held-out phantoms (seeds {s['seeds'][0]}–{s['seeds'][-1]})")
    print(f"{'label':<16}{'mean Dice':>10}{'min':>8}{'cases':>7}{'target':>8}  met")
    for n, r in s["labels"].items():
        mn = "-" if r["min_dice"] is None else f"{r['min_dice']:.3f}"
        print(f"{n:<16}{r['mean_dice']:>10.3f}{mn:>8}{r['cases']:>7}{r['target']:>8.2f}  {'yes' if r['met'] else 'NO'}")
    print(f"\n{'lesions':<16}{'ref':>5}{'pred':>6}{'prec':>7}{'recall':>8}{'F1':>7}{'target':>8}  met")
    for n, r in s["lesions"].items():
        print(f"{n:<16}{r['n_ref']:>5}{r['n_pred']:>6}{r['precision']:>7.3f}{r['recall']:>8.3f}{r['f1']:>7.3f}"
              f"{r['target']:>8.2f}  {'yes' if r['met'] else 'NO'}")
    print(f"\nevery output on its input grid: {s['all_on_input_grid']}; {s['seconds_per_case']} s per case (CPU); "
          f"peak RSS {s['peak_rss_mb']} MB")


def record_in_card(s: dict[str, Any]) -> Path:
    """Write the summary (without per-case rows) into the list ``provenance.heldout_evaluation`` of the shipped
    card, replacing an earlier entry for the same seeds."""
    import yaml

    from medseg.models.cards import load_card
    from medseg.models.registry import shipped_dir
    from medseg.train import dump_yaml

    path = shipped_dir() / f"{s['model']}.yaml"
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    data = yaml.safe_load(text)
    seeds = [s["seeds"][0], s["seeds"][-1] + 1]
    entry = {
        "command": "python benchmarks/eval_shipped_models.py"
                   + ("" if s["seeds"][0] == EVAL_SEEDS[0] else f" --first-seed {s['seeds'][0]}"),
        "seeds": seeds,
        "labels": {n: {"mean_dice": r["mean_dice"], "min_dice": r["min_dice"], "cases": r["cases"]}
                   for n, r in s["labels"].items()},
        "lesion_detection": {n: {k: r[k] for k in ("n_ref", "n_pred", "precision", "recall", "f1")}
                             for n, r in s["lesions"].items()},
        "all_on_input_grid": s["all_on_input_grid"],
    }
    prov = data.setdefault("provenance", {})
    earlier = prov.get("heldout_evaluation")
    entries = [e for e in (earlier if isinstance(earlier, list) else []) if e.get("seeds") != seeds]
    prov["heldout_evaluation"] = sorted([*entries, entry], key=lambda e: e["seeds"][0])
    path.write_text(header + dump_yaml(data))
    load_card(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--first-seed", type=int, default=EVAL_SEEDS[0],
                   help=f"first of the ten held-out seeds (default {EVAL_SEEDS[0]}; another set for a fresh check)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON")
    p.add_argument("--record", action="store_true", help="write the summary into the shipped card's provenance")
    p.add_argument("--components-on", choices=("validation", "calibration"),
                   help="instead: list predicted lesion components (no post-processing) on the card's validation "
                        "phantoms or on the calibration phantoms, to choose per-label minimum component sizes")
    a = p.parse_args(argv)
    if a.components_on:
        lesion_components(a.model, on=a.components_on, device=a.device)
        return 0
    s = evaluate_model(a.model, device=a.device, seeds=tuple(range(a.first_seed, a.first_seed + 10)))
    print_table(s)
    if a.json:
        a.json.write_text(json.dumps(s, indent=2) + "\n")
    if a.record:
        print(f"recorded in {record_in_card(s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
