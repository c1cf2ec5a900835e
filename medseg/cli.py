"""The ``medseg`` command: a thin shell over the library (parse, call one function, present).

``MedsegError`` becomes exit code 2 with one line on stderr; ``--debug`` shows the traceback. Any other error
is reported the same way as an internal error (exit code 1) with the traceback only under ``--debug``.
``medseg batch`` and ``medseg run`` exit with 3 when the run finished with failed cases.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from medseg.errors import MedsegError

app = typer.Typer(
    name="medseg",
    help="3D organ and tumour segmentation of CT and MR scans.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show progress logs.")] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def fail(exc: MedsegError) -> None:
    """Report a MedsegError the CLI way: one line (or the message) on stderr, exit code 2."""
    if _state["debug"]:
        raise exc
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


def print_json(data: Any) -> None:
    """Plain JSON on stdout (no colour codes), for scripts."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _geometry(volume: Any) -> dict[str, Any]:
    return {
        "shape": list(volume.shape),
        "dtype": str(volume.array.dtype),
        "spacing_mm": [round(s, 6) for s in volume.spacing_mm],
        "origin_mm": [round(s, 6) for s in volume.origin_mm],
        "direction": [[round(float(v), 6) for v in row] for row in volume.direction],
        "orientation": volume.orientation,
        "modality": volume.modality,
        "value_range": [float(volume.array.min()), float(volume.array.max())] if volume.array.size else None,
        "labels": None if volume.labels is None else volume.labels.names,
    }


_VolumeOpt = Annotated[int | None, typer.Option("--volume", min=0, help=(
    "Which volume (from 0) of a DICOM file or series holding several at the same positions (echoes, time points, "
    "magnitude + field map; `medseg info` lists them), or of a 4D NIfTI."))]
_SkipOpt = Annotated[bool, typer.Option("--skip-unreadable", help=(
    "Leave damaged files of a DICOM folder out (each named in a warning and recorded) instead of stopping."))]


class _OnceFilter(logging.Filter):
    """Let each distinct log message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="DICOM folder or file, NIfTI, NRRD or MHA.")],
    series_uid: Annotated[str | None, typer.Option("--series-uid", help="Series to load from a DICOM folder.")] = None,
    volume: _VolumeOpt = None,
    skip_unreadable: _SkipOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Geometry of a scan; for DICOM also the series and volumes found and every file set aside or skipped.

    For a DICOM SEG file: its segments (number, label, category/type codes, algorithm, voxels) and the series it
    references.
    """
    from medseg.errors import MultipleSeriesError, MultipleVolumesError
    from medseg.io import list_volumes, load_volume, scan_folder
    from medseg.io.dicom_seg import is_dicom_seg

    if path.is_file() and is_dicom_seg(path):
        _seg_info(path, as_json)
        return
    loaded, volumes, dicom = None, None, path.is_dir()
    once = _OnceFilter()  # the folder is read up to three times below: warn about each skipped file once
    logging.getLogger("medseg.io.dicom").addFilter(once)
    try:
        contents = scan_folder(path, skip_unreadable=skip_unreadable) if path.is_dir() else None
        try:
            loaded = load_volume(path, series_uid=series_uid, volume=volume, skip_unreadable=skip_unreadable)
            dicom = dicom or bool(loaded.source and loaded.source.sop_class_uid)
        except MultipleSeriesError:  # several series and none chosen: list them
            if series_uid is not None:
                raise
            dicom = False
        except MultipleVolumesError:  # several volumes and none chosen: list them
            if volume is not None:
                raise
            dicom = True
        if dicom:
            volumes = list_volumes(path, series_uid=series_uid, skip_unreadable=skip_unreadable)
    except MedsegError as exc:
        fail(exc)
        return
    finally:
        logging.getLogger("medseg.io.dicom").removeFilter(once)
    data: dict[str, Any] = {"path": str(path)}
    if loaded is not None:
        data.update(_geometry(loaded))
    if volumes is not None:
        data["volumes"] = [{"volume": v.index, "slices": v.n_slices, "description": v.description} for v in volumes]
    if contents is not None:
        data["series"] = [
            {"series_uid": s.key, "description": s.description, "modality": s.modality, "slices": s.n_slices}
            for s in contents.series
        ]
        data["set_aside"] = [{"path": f.path, "reason": f.reason} for f in contents.set_aside]
        data["skipped"] = [{"path": f.path, "reason": f.reason} for f in contents.skipped]
    if as_json:
        print_json(data)
        return
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        if key not in ("series", "set_aside", "skipped", "volumes"):
            table.add_row(f"[bold]{key}[/]", str(value))
    console.print(table)
    if volumes is not None and len(volumes) > 1:
        console.print(f"[bold]volumes[/] ({len(volumes)}, choose with --volume N):")
        for v in data["volumes"]:
            console.print(f"  {v['volume']}: {v['slices']} slices, {v['description']}", highlight=False)
    if contents is None:
        return
    console.print(f"[bold]series found[/] ({len(data['series'])}):")
    for s in data["series"]:
        console.print(f"  {s['series_uid']}  {s['description']!r}  {s['modality']}  {s['slices']} slices")
    for key, title in (("set_aside", "set aside"), ("skipped", "skipped (damaged)")):
        if data[key]:
            console.print(f"[bold]{title}[/] ({len(data[key])}):")
            for f in data[key]:
                console.print(f"  {f['path']}: {f['reason']}", highlight=False, soft_wrap=True)
    if loaded is None and series_uid is None and volumes is None:
        console.print("Several series: choose one with [bold]--series-uid[/] to see its geometry.")


def _seg_info(path: Path, as_json: bool) -> None:
    from medseg.io import read_seg_info

    try:
        info_ = read_seg_info(path)
    except MedsegError as exc:
        fail(exc)
        return
    if as_json:
        print_json(info_.to_json())
        return
    console.print(f"[bold]DICOM SEG[/] {path}  {info_.seg_type}, {info_.n_frames} frames, "
                  f"{info_.series_description!r}", highlight=False)
    console.print(f"[bold]references[/] series {', '.join(info_.referenced_series_uids) or '?'} "
                  f"({info_.n_referenced_instances} instances), frame of reference {info_.frame_of_reference_uid}",
                  highlight=False)
    table = Table("#", "value", "label", "category", "type", "algorithm", "voxels")
    for seg in info_.segments:
        c = seg.code
        typ = "-" if c is None else f"{c.type.meaning} ({c.type.scheme} {c.type.value})" + (
            f", {c.modifier.meaning}" if c.modifier is not None else "")
        cat = "-" if c is None else f"{c.category.meaning} ({c.category.scheme} {c.category.value})"
        algo = seg.algorithm_type + (f" {seg.algorithm_name} {seg.algorithm_version or ''}" if seg.algorithm_name
                                     else "")
        table.add_row(str(seg.number), str(seg.value), seg.label, cat, typ, algo.strip(), str(seg.voxels))
    console.print(table)


_SegType = Annotated[str, typer.Option("--seg-type", help="DICOM SEG type: binary (interoperable) or labelmap.")]
_RepairUids = Annotated[bool, typer.Option("--repair-uids", help=(
    "For a source series with blank/missing UIDs: write a repaired copy next to the SEG and reference it."))]


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Input scan or labels (DICOM folder/file, DICOM SEG, NIfTI, NRRD, MHA).")],
    dst: Annotated[Path, typer.Argument(help="Output file (.nii.gz, .nii, .nrrd, .mha, or .dcm for a DICOM SEG).")],
    series_uid: Annotated[str | None, typer.Option("--series-uid", help="Series to load from a DICOM folder.")] = None,
    volume_index: _VolumeOpt = None,
    skip_unreadable: _SkipOpt = False,
    reference: Annotated[Path | None, typer.Option("--reference", help=(
        "labels → SEG: the DICOM series the labels were made from. SEG → labels: put the labels on this scan's "
        "grid (default: the SEG's own frame grid)."))] = None,
    split: Annotated[bool, typer.Option("--split", help="SEG → labels: one mask file per segment "
                                        "(DST_<value>_<name>.nii.gz), for overlapping segments.")] = False,
    seg_type: _SegType = "binary",
    repair_uids: _RepairUids = False,
    codes: Annotated[Path | None, typer.Option("--codes", help="JSON of DICOM codes by label name, for labels the "
                                               "curated table does not cover.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="labels → SEG: the model that made the labels "
                                              "(name, version and weights sha256 go into the SEG).")] = None,
    algorithm_type: Annotated[str, typer.Option("--algorithm-type", help="labels → SEG: AUTOMATIC (needs --model), "
                                                "SEMIAUTOMATIC (needs --model) or MANUAL.")] = "AUTOMATIC",
) -> None:
    """Convert a scan to another format on the same world grid; labels ↔ DICOM SEG."""
    from medseg.io import load_segmentation, load_volume, save_volume, write_dicom_seg
    from medseg.io.dicom_seg import SegAlgorithm, is_dicom_seg, save_segment_masks

    try:
        if src.is_file() and is_dicom_seg(src):
            ref = load_volume(reference, skip_unreadable=skip_unreadable) if reference is not None else None
            volume = load_segmentation(src, reference=ref, split=split)
            outs = save_segment_masks(volume, dst) if split else [save_volume(volume, dst)]
            for out in outs:
                console.print(f"wrote {out}  ({volume.describe_grid()})", highlight=False)
            return
        if split:
            raise _usage_error(f"--split applies to DICOM SEG input; {src} is not a DICOM SEG.")
        if dst.name.lower().endswith(".dcm"):
            if reference is None:
                raise _usage_error(f"{dst}: writing a DICOM SEG needs --reference DICOM_FOLDER, the series the labels "
                                   "were made from.")
            labels = load_volume(src, series_uid=series_uid, volume=volume_index, skip_unreadable=skip_unreadable)
            algorithm = None
            if model is not None:
                from medseg.models import find_model

                algorithm = SegAlgorithm.from_card(find_model(model))
            out = write_dicom_seg(labels, reference, dst, seg_type=seg_type.lower(),  # type: ignore[arg-type]
                                  algorithm=algorithm, algorithm_type=algorithm_type.upper(),  # type: ignore[arg-type]
                                  repair_uids=repair_uids, codes=codes)
            console.print(f"wrote {out}  (DICOM SEG, {seg_type.upper()}, referencing {reference})", highlight=False)
            return
        if reference is not None:
            raise _usage_error("--reference applies to labels → DICOM SEG (DST ending in .dcm) or DICOM SEG input.")
        volume = load_volume(src, series_uid=series_uid, volume=volume_index, skip_unreadable=skip_unreadable)
        out = save_volume(volume, dst)
    except MedsegError as exc:
        fail(exc)
        return
    console.print(f"wrote {out}  ({volume.describe_grid()})")


def _usage_error(message: str) -> MedsegError:
    from medseg.errors import DicomSegError

    return DicomSegError(message)


models_app = typer.Typer(help="Model cards: shipped, in --models-dir folders, and MONAI bundles.", no_args_is_help=True)
app.add_typer(models_app, name="models")
_ModelsDir = Annotated[
    list[Path] | None,
    typer.Option("--models-dir", help="Folder of model cards / MONAI bundles, searched before the shipped ones "
                 "(repeatable). Bundle configs are checked before anything of them runs."),
]
_TrustCode = Annotated[
    bool,
    typer.Option("--trust-bundle-code", help="Run MONAI bundles' own code: their scripts/ package and config "
                 "expressions outside medseg's restricted set. Only for bundles from a source you trust."),
]


@models_app.command("list")
def models_list(
    models_dir: _ModelsDir = None,
    trust_bundle_code: _TrustCode = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the models medseg can run (bundles are read and checked, never run).

    Models that cannot be read or are refused (a damaged card, an unsafe bundle) are named on stderr after the
    listing of the rest, and the exit status is then 2."""
    from medseg.models import list_models

    try:
        listing = list_models(models_dirs=models_dir or [], trust_code=trust_bundle_code)
    except MedsegError as exc:
        fail(exc)
        return
    if as_json:
        print_json({"models": [c.summary() for c in listing.cards], "problems": list(listing.problems)})
    else:
        table = Table("name", "version", "kind", "modality", "labels", "origin")
        for c in listing.cards:
            table.add_row(c.name, c.version, c.kind, "/".join(c.modality) or "-",
                          ", ".join(c.labels.names.values()) if c.labels else "-", c.origin)
        console.print(table)
    for problem in listing.problems:
        err_console.print(f"[yellow]skipped:[/] {problem}", highlight=False, soft_wrap=True)
    if listing.problems:
        raise typer.Exit(2)


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="Model name, card file or bundle folder.")],
    models_dir: _ModelsDir = None,
    trust_bundle_code: _TrustCode = False,
) -> None:
    """Show a model as JSON: source, licence, labels, channels, versions, weights and their sha256, and for a MONAI
    bundle what medseg will and will not run of it."""
    from medseg.models import describe_model, find_model

    try:
        card = find_model(name, models_dirs=models_dir or [], trust_code=trust_bundle_code)
        print_json(describe_model(card))
    except MedsegError as exc:
        fail(exc)
        return


@app.command("segment")
def segment_cmd(
    src: Annotated[list[Path], typer.Argument(help=(
        "Input scan (DICOM folder/file, NIfTI, NRRD, MHA). For a multi-channel model give one scan per channel "
        "(e.g. T1C T1 T2 FLAIR: matched to the model's channel names by file name, else taken in the order given; "
        "resampled onto the first scan's grid) or one 4D file."))],
    model: Annotated[str, typer.Option("--model", "-m", help=(
        "Model name, card file, MONAI bundle folder or nnU-Net result folder (or its fold_N / checkpoint).")
    )],
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "Output labels (.nii.gz, .nii, .nrrd, .mha), or .dcm for a DICOM SEG referencing a DICOM input."))],
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: best).")] = None,
    overlap: Annotated[float | None, typer.Option("--overlap", min=0.0, max=0.95, help="Window overlap.")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help=(
        "Mirroring test-time augmentation (8× slower). Default: off, except for nnU-Net folders (on, as nnU-Net)."
    ))] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision (default: on for CUDA).")] = None,
    fast: Annotated[bool, typer.Option("--fast", help=(
        "Fast preset: mixed precision, skip air-only windows, windows per call tuned to the device, separable "
        "resampling onto the network grid. Labels still go back with the exact trilinear inversion."
    ))] = False,
    series_uid: Annotated[str | None, typer.Option("--series-uid", help="Series to load from a DICOM folder.")] = None,
    volume: _VolumeOpt = None,
    skip_unreadable: _SkipOpt = False,
    models_dir: _ModelsDir = None,
    trust_bundle_code: _TrustCode = False,
    seg_type: _SegType = "binary",
    repair_uids: _RepairUids = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Segment a scan; write labels on the scan's own grid with a label-table sidecar (.labels.json), or a DICOM
    SEG (--out *.dcm) that references the DICOM input."""
    from medseg.inference import InferenceOptions, Segmenter
    from medseg.io import load_volume, save_volume, write_dicom_seg
    from medseg.io.dicom_seg import SegAlgorithm
    from medseg.models import find_model

    try:
        # The preset depends on the device (windows per call, channels-last on CPU): build it for --device.
        options = InferenceOptions.fast(device=device) if fast else InferenceOptions(device=device)
        changes: dict[str, Any] = {"overlap": overlap, "amp": amp if amp is not None else options.amp}
        if tta is not None:
            changes["tta"] = tta
        to_seg = out.name.lower().endswith(".dcm")
        scans: list[Any] = ([load_volume(p, series_uid=series_uid, volume=volume, skip_unreadable=skip_unreadable)
                             for p in src] if len(src) == 1 else list(src))
        scan = scans[0]
        if to_seg and (len(scans) != 1 or scan.source is None or not scan.source.positions_mm):
            what = f"{len(scans)} scans were given" if len(scans) != 1 else f"{src[0]} is not DICOM"
            raise _usage_error(f"{out}: a DICOM SEG references one DICOM source series, but {what}; write .nii.gz "
                               "labels instead, or segment the DICOM series.")
        card = find_model(model, models_dirs=models_dir or [], trust_code=trust_bundle_code)
        segmenter = Segmenter(card, options=options, **changes)
        result = segmenter.segment(scan if len(scans) == 1 else scans)
        if to_seg:
            written = write_dicom_seg(result.labels, scan, out, seg_type=seg_type.lower(),  # type: ignore[arg-type]
                                      algorithm=SegAlgorithm.from_card(segmenter.card), repair_uids=repair_uids)
        else:
            written = save_volume(result.labels, out)
    except MedsegError as exc:
        fail(exc)
        return
    summary = {"input": [str(p) for p in src] if len(src) > 1 else str(src[0]), "output": str(written),
               **result.summary()}
    if as_json:
        print_json(summary)
        return
    console.print(f"wrote {written}  ({result.labels.describe_grid()})")
    for lab in summary["labels"]:
        console.print(f"  {lab['value']:>3} {lab['name']:<24} {lab['volume_ml']:>10.2f} mL")


@app.command("train")
def train_cmd(
    recipe: Annotated[Path, typer.Argument(help="Training recipe (YAML), e.g. workflows/train-phantom-abdomen-ct.yaml.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: the recipe's output_dir).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue from a last.pt written by this recipe.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Override training.epochs.")] = None,
    until_epoch: Annotated[int | None, typer.Option("--until-epoch", min=1,
                                                    help="Stop after this epoch (continue with --resume).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: CUDA if present).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary (no progress bar).")] = False,
) -> None:
    """Train a network from a recipe; write the best weights with their model card, last.pt, metrics.csv, curves.png."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from medseg.train import ProgressEvent, train

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=as_json,
                   transient=True)  # gone when done: an error stays the one line on stderr
    task = bar.add_task("caching cases", total=None)

    def show(ev: ProgressEvent) -> None:
        if ev.kind == "start":
            bar.update(task, description="training", total=(ev.epochs - ev.epoch + 1) * ev.steps, completed=0)
        elif ev.kind == "step":
            bar.update(task, advance=1, description=f"epoch {ev.epoch}/{ev.epochs} loss {ev.loss:.3f}")
        elif ev.kind == "epoch" and ev.record is not None and ev.record.val_mean_dice is not None:
            bar.console.print(f"epoch {ev.epoch}: loss {ev.record.train_loss:.4f}, validation mean Dice "
                              f"{ev.record.val_mean_dice:.4f}", highlight=False)

    try:
        with bar:
            result = train(recipe, output_dir=out, resume=resume, epochs=epochs, until_epoch=until_epoch,
                           device=device, progress=show)
    except MedsegError as exc:
        fail(exc)
        return
    best = next(r for r in result.history if r.epoch == result.best_epoch)
    summary = {"output_dir": str(result.output_dir), "card": str(result.card_path), "weights": str(result.weights_path),
               "checkpoint": str(result.checkpoint_path), "best_epoch": result.best_epoch,
               "best_mean_dice": result.best_mean_dice, "validation_dice": best.val_dice,
               "metrics_csv": str(result.metrics_csv), "curves_png": str(result.curves_png),
               "seconds": round(result.seconds, 1)}
    if as_json:
        print_json(summary)
        return
    console.print(f"best epoch {result.best_epoch}: mean validation Dice {result.best_mean_dice:.4f}")
    for name, dice in (best.val_dice or {}).items():
        console.print(f"  {name:<24} {dice:.4f}")
    console.print(f"model card {result.card_path}\nweights    {result.weights_path}\nresume     {result.checkpoint_path}")


@app.command("demo")
def demo_cmd(
    folder: Annotated[Path, typer.Argument(help="Demo folder (an earlier demo there is replaced).")] = Path("medseg-demo"),
    seed: Annotated[int, typer.Option("--seed", min=0, help="Phantom seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write report.html.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty folder that is not a demo.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Phantom CT → DICOM series → segment with the shipped phantom-abdomen-ct → labels, volumes, Dice, report."""
    from medseg.demo import run_demo

    try:
        result = run_demo(folder, seed=seed, device=device, report=report, overwrite=overwrite)
    except MedsegError as exc:
        fail(exc)
        return
    data = result.to_json()
    if as_json:
        print_json(data)
        return
    g = data["grid"]
    console.print(f"DICOM series  {data['dicom_series']}  ({g['shape'][0]}×{g['shape'][1]}×{g['shape'][2]}, "
                  f"{' × '.join(f'{s:g}' for s in g['spacing_mm'])} mm, {g['orientation']})", highlight=False)
    table = Table("label", "kind", "model mL", "truth mL", "Dice", "HD95 mm", title=f"{data['model']} on {data['device']}")
    for r in data["labels"]:
        hd = "-" if r["hd95_mm"] is None else f"{r['hd95_mm']:.1f}"
        table.add_row(r["name"], r["kind"], f"{r['volume_ml']:.1f}", f"{r['truth_ml']:.1f}", f"{r['dice']:.3f}", hd)
    console.print(table)
    for d in data["lesions"]:
        console.print(f"{d['name']}: {d['detected']}/{d['n_ref']} detected, {d['false_positives']} false positive(s)")
    console.print(f"labels        {data['segmentation']}  (on the CT's grid: {data['on_input_grid']})")
    console.print(f"report        {data['report_html'] or 'not written (--no-report)'}")
    console.print(f"DICOM SEG     {data['dicom_seg']}  (read back onto the CT's grid: exact "
                  f"{data['dicom_seg_round_trip_exact']})")
    console.print(f"time          {data['seconds']['total']:.1f} s (segmentation {data['seconds']['segment']:.1f} s)")


def _three(text: str | None, what: str, kind: type) -> tuple[Any, ...] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").replace("×", ",").split(",")
    try:
        values = tuple(kind(p.strip()) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"{what} must be three numbers like 192,192,80, not {text!r}.") from None
    if len(values) != 3:
        raise typer.BadParameter(f"{what} must be three numbers like 192,192,80, not {text!r}.")
    return values


@app.command("phantom")
def phantom_cmd(
    out: Annotated[Path, typer.Argument(help="Study folder to create (ct/ or ct.nii.gz, labels.nii.gz, phantom.json).")],
    seed: Annotated[int, typer.Option("--seed", min=0, help="Anatomy, tumours and noise.")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="dicom (a CT series) or nifti.")] = "dicom",
    shape: Annotated[str, typer.Option("--shape", help="Voxels along i,j,k.")] = "192,192,80",
    spacing: Annotated[str | None, typer.Option("--spacing", help="mm along i,j,k (default: 400×400×260 mm FOV).")]
    = None,
    orientation: Annotated[str, typer.Option("--orientation", help="Axis code: LPS, RAS, RAI, ...")] = "LPS",
    body_scale: Annotated[float, typer.Option("--body-scale", help="Body size, 0.5–1.5.")] = 1.0,
    liver_tumours: Annotated[int | None, typer.Option("--liver-tumours", help="0–3 (default: from the seed).")]
    = None,
    kidney_tumour: Annotated[bool | None, typer.Option("--kidney-tumour/--no-kidney-tumour",
                                                        help="Default: from the seed.")] = None,
    transfer_syntax: Annotated[str, typer.Option("--transfer-syntax", help="explicit-vr-little-endian, "
                                                 "jpeg2000-lossless, jpeg-ls-lossless or rle-lossless.")]
    = "explicit-vr-little-endian",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Write a seeded synthetic abdominal CT study with its ground-truth organ and tumour labels."""
    from medseg.phantom import make_phantom, write_phantom_study
    from medseg.stats import volume_stats

    try:
        phantom = make_phantom(seed, shape=_three(shape, "--shape", int) or (), spacing_mm=_three(spacing, "--spacing",
                               float), orientation=orientation, body_scale=body_scale, liver_tumours=liver_tumours,
                               kidney_tumour=kidney_tumour)
        study = write_phantom_study(phantom, out, format=fmt, transfer_syntax=transfer_syntax,  # type: ignore[arg-type]
                                    overwrite=overwrite)
        stats = volume_stats(phantom.labels)
    except MedsegError as exc:
        fail(exc)
        return
    data = {
        "folder": str(study.folder),
        "image_path": str(study.image_path),
        "labels_path": str(study.labels_path),
        **_geometry(phantom.image),
        "volumes_ml": {r.name: round(r.volume_ml, 3) for r in stats.labels},
        "lesions": [{"label": phantom.label_table[les.label].name, "centre_mm": [round(v, 2) for v in les.centre_mm],
                     "radius_mm": round(les.radius_mm, 2)} for les in phantom.lesions],
    }
    if as_json:
        print_json(data)
        return
    console.print(f"wrote {data['image_path']} and {data['labels_path']}  ({phantom.image.describe_grid()})", highlight=False)
    table = Table("label", "mL", title=f"phantom seed {seed}")
    for name, ml in data["volumes_ml"].items():  # type: ignore[union-attr]
        table.add_row(name, f"{ml:.1f}")
    console.print(table)


@app.command("evaluate")
def evaluate_cmd(
    pred: Annotated[Path, typer.Argument(help="Predicted label map (NIfTI, NRRD, MHA, DICOM).")],
    ref: Annotated[Path, typer.Argument(help="Reference label map.")],
    nsd_tolerance_mm: Annotated[float, typer.Option("--nsd-tolerance", help="NSD tolerance in mm.")] = 2.0,
    resample: Annotated[bool, typer.Option("--resample", help="Resample PRED onto REF's grid if they differ.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (strict: inf/nan as null).")] = False,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write per-label CSV here.")] = None,
) -> None:
    """Dice, IoU, precision, recall, Hausdorff, HD95, ASSD, NSD and volumes per label (docs/metrics.md)."""
    from medseg.io import load_volume
    from medseg.metrics import evaluate

    try:
        result = evaluate(load_volume(pred), load_volume(ref), nsd_tolerance_mm=nsd_tolerance_mm, resample=resample)
    except MedsegError as exc:
        fail(exc)
        return
    if _write_csv_or_json(result, csv_out, as_json):
        return
    table = Table("label", "Dice", "IoU", "HD95 mm", "ASSD mm", f"NSD@{nsd_tolerance_mm:g}", "pred mL", "ref mL")
    for r in result.labels:
        table.add_row(r.name, f"{r.dice:.4f}", f"{r.iou:.4f}", f"{r.hd95_mm:.2f}", f"{r.assd_mm:.2f}", f"{r.nsd:.4f}",
                      f"{r.pred_ml:.2f}", f"{r.ref_ml:.2f}")
    console.print(table)
    for d in result.lesions:
        console.print(f"{d.name}: {d.n_ref} reference / {d.n_pred} predicted lesions, detected {d.tp_ref}, missed "
                      f"{d.fn}, false positive {d.fp}, F1 {d.f1:.3f}", highlight=False)


def _write_csv_or_json(result: Any, csv_out: Path | None, as_json: bool) -> bool:
    """Write ``result.to_csv()`` to ``csv_out`` when given; print its JSON when asked (True: nothing more to print)."""
    if csv_out is not None:
        from medseg.files import atomic_write_text

        atomic_write_text(csv_out, result.to_csv())
    if as_json:
        print_json(result.to_json())
    return as_json


@app.command("stats")
def stats_cmd(
    seg: Annotated[Path, typer.Argument(help="Label map (NIfTI, NRRD, MHA, DICOM).")],
    image: Annotated[Path | None, typer.Option("--image", help="The scan, for intensity statistics.")] = None,
    volume: _VolumeOpt = None,
    skip_unreadable: _SkipOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (strict: inf/nan as null).")] = False,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write per-label CSV here.")] = None,
) -> None:
    """Volume (mL), intensity statistics, centroid, extent and lesion counts per label (--volume: of --image)."""
    from medseg.io import load_volume
    from medseg.stats import volume_stats

    try:
        scan = (load_volume(image, volume=volume, skip_unreadable=skip_unreadable) if image is not None else None)
        result = volume_stats(load_volume(seg), scan)
    except MedsegError as exc:
        fail(exc)
        return
    if _write_csv_or_json(result, csv_out, as_json):
        return
    unit = result.intensity_unit or "units"
    table = Table("label", "voxels", "mL", "components", f"mean {unit}", f"SD {unit}")
    for r in result.labels:
        table.add_row(r.name, str(r.voxels), f"{r.volume_ml:.2f}", str(r.n_components), f"{r.intensity_mean:.1f}",
                      f"{r.intensity_std:.1f}")
    console.print(table)


@app.command("report")
def report_cmd(
    results_dir: Annotated[Path, typer.Argument(help="RESULTS_DIR/<case_id>/pred.* (+ ref.*, image.*).")],
    out: Annotated[Path, typer.Option("--out", help="HTML report to write (CSV/JSON go beside it).")] = Path(
        "report.html"
    ),
    nsd_tolerance_mm: Annotated[float, typer.Option("--nsd-tolerance", help="NSD tolerance in mm.")] = 2.0,
    modality: Annotated[str | None, typer.Option("--modality", help="Modality of NIfTI/NRRD images, e.g. CT.")] = None,
    resample: Annotated[bool, typer.Option("--resample", help="Resample predictions/images onto the reference.")] = False,
) -> None:
    """Self-contained HTML report (tables, Dice and volume plots, thumbnails) plus CSV and JSON."""
    from medseg.report import write_report

    try:
        result = write_report(results_dir, out, nsd_tolerance_mm=nsd_tolerance_mm, modality=modality,
                              resample=resample)
    except MedsegError as exc:
        fail(exc)
        return
    console.print(f"wrote {result.html_path} ({result.n_cases} cases, {result.n_evaluated} with a reference), "
                  + ", ".join(str(p) for p in (*result.csv_paths, result.json_path)), highlight=False)


# ---- manifests and batch runs -----------------------------------------------------------------------------------
manifest_app = typer.Typer(help="Manifests: the cases of a batch run or a training (JSON, CSV, MSD dataset.json).",
                           no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


@manifest_app.command("make")
def manifest_make(
    folder: Annotated[Path, typer.Argument(help="Folder of study folders (DICOM series or image files) or images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write (.json).")],
    checksums: Annotated[bool, typer.Option("--checksums/--no-checksums", help="Record each file's sha256.")] = True,
) -> None:
    """One case per image series or file found (case ids from folder names), with sha256."""
    from medseg.manifest import make_manifest

    try:
        manifest = make_manifest(folder, checksums=checksums)
        written = manifest.save(out)
    except MedsegError as exc:
        fail(exc)
        return
    labelled = len(manifest.labelled())
    console.print(f"wrote {written}: {len(manifest)} case(s), {labelled} with reference labels", highlight=False, soft_wrap=True)


@manifest_app.command("check")
def manifest_check(
    manifest: Annotated[Path, typer.Argument(help="Manifest (JSON, CSV or MSD dataset.json).")],
    load: Annotated[bool, typer.Option("--load/--no-load", help="Also load every image (unreadable, not 3D).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every problem: missing files, duplicate ids, checksum mismatches, unreadable or non-3D images.

    Exit status 0 when the manifest is clean, 3 when problems were found, 2 when it cannot be read.
    """
    from medseg.manifest import check_manifest

    result = check_manifest(manifest, load_images=load)
    if as_json:
        print_json(result.to_json())
    else:
        for p in result.problems:
            err_console.print(f"[red]{p.kind}[/] {p.case_id or '-'}: {p.message}", highlight=False, soft_wrap=True)
        console.print(f"{manifest}: {result.n_cases} case(s), {len(result.problems)} problem(s)", highlight=False, soft_wrap=True)
    if any(p.kind == "unreadable-manifest" for p in result.problems):
        raise typer.Exit(2)
    if result.problems:
        raise typer.Exit(3)


def _present_run(run: Any, *, quiet: bool, log_json: bool) -> Any:
    """Run ``run(progress)`` with a rich progress bar (or JSON lines, or nothing); exit 0 / 3 (failed cases)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from medseg.workflow import RunEvent

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tally]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
                   disable=quiet or log_json)
    task = bar.add_task("cases", total=None, tally="")

    def show(ev: RunEvent) -> None:
        if log_json:
            sys.stdout.write(json.dumps(ev.to_json()) + "\n")
            sys.stdout.flush()
            return
        tally = f"done {ev.done}  failed {ev.failed}  skipped {ev.skipped}"
        if ev.kind == "start":
            bar.update(task, total=ev.total, completed=0, tally=tally)
        elif ev.kind == "case":
            bar.update(task, completed=ev.done + ev.failed + ev.skipped, tally=tally)
            if ev.record is not None and ev.record.state == "failed" and not quiet:
                bar.console.print(f"[red]failed[/] {ev.record.case_id}: {ev.record.error}", highlight=False,
                                  soft_wrap=True)

    try:
        with bar:
            result = run(show)
    except MedsegError as exc:
        fail(exc)
        return None
    n_failed = len(result.failed)
    if log_json:
        sys.stdout.write(json.dumps({"event": "summary", "out_dir": str(result.out_dir),
                                     "run_record": str(result.run_record), "exit_status": result.exit_status,
                                     "failed_cases": [r.case_id for r in result.failed]}) + "\n")
    elif not quiet:
        console.print(f"{result.count('done')} done, {result.count('skipped')} skipped (already done), {n_failed} "
                      f"failed in {result.seconds:.1f} s; results in {result.out_dir}", highlight=False, soft_wrap=True)
        for name, p in (("statistics", result.statistics_csv), ("metrics", result.metrics_csv),
                        ("report", result.report_html), ("run record", result.run_record)):
            if p is not None:
                console.print(f"  {name:<11} {p}", highlight=False, soft_wrap=True)
    if n_failed:
        err_console.print(f"{n_failed} case(s) failed: {', '.join(r.case_id for r in result.failed)} (each case's "
                          "status.json says why)", highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    return result


_EXIT_HELP = "Exit status: 0 every case done, 3 finished with failed cases (count printed), 2 usage or recipe error."


# PACS options of `medseg batch` and `medseg watch` (medseg/pacs.py; docs/pacs.md). Credentials never go here.
_Query = Annotated[list[str] | None, typer.Option("--query", help="Study filter Keyword=value (repeatable): "
                                                  "ModalitiesInStudy=CT, StudyDate=20240101-20241231, "
                                                  "StudyInstanceUID=uid1,uid2.")]
_Series = Annotated[list[str] | None, typer.Option("--series", help="Series rule (repeatable): modality=CT, "
                                                   "description=REGEX, orientation=axial, thickness=0.5-5, "
                                                   "min-instances=N.")]
_Push = Annotated[bool, typer.Option("--push", help="Push each DICOM SEG back to the source PACS (STOW-RS or "
                                     "C-STORE), verified, once.")]
_PushTo = Annotated[str | None, typer.Option("--push-to", help="Push each DICOM SEG to this PACS instead.")]
_Credentials = Annotated[Path | None, typer.Option("--credentials", help="File with one line user:password, "
                                                   "readable only by its owner (else MEDSEG_PACS_USER + "
                                                   "MEDSEG_PACS_PASSWORD, or MEDSEG_PACS_TOKEN).")]
_CaBundle = Annotated[str | None, typer.Option("--ca-bundle", help="PEM file of CA certificates for HTTPS.")]
_AeTitle = Annotated[str, typer.Option("--ae-title", help="Our DICOM AE title (DIMSE).")]
_Cache = Annotated[Path | None, typer.Option("--cache", help="Where series are retrieved (default OUT/.pacs-cache).")]
_Timeout = Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds per PACS request.")]
_INPUT_HELP = ("A manifest (JSON, CSV, MSD dataset.json), a folder of studies, or a PACS: "
               "dicomweb+http(s)://HOST[:PORT]/PATH or dimse://AET@HOST:PORT.")


@app.command("batch", epilog=_EXIT_HELP)
def batch_cmd(
    inputs: Annotated[str, typer.Argument(help=_INPUT_HELP)],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name, card file or MONAI bundle folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (OUT/<case_id>/pred.nii.gz, ...).")],
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: best).")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="The fast inference preset (see medseg segment).")] = False,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help=(
        "Mirroring test-time augmentation (8× slower). Default: off, except for nnU-Net folders (on, as nnU-Net)."
    ))] = None,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg/--no-dicom-seg", help="DICOM SEG for DICOM inputs.")] = False,
    seg_type: Annotated[str, typer.Option("--seg-type", help="DICOM SEG type: binary or labelmap.")] = "binary",
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Statistics per case and statistics.csv.")] = True,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics", help="Metrics against the cases' reference "
                                          "labels, when they have one.")] = True,
    report: Annotated[bool, typer.Option("--report/--no-report", help="report.html over all cases.")] = True,
    executor: Annotated[str, typer.Option("--executor", help="local (in-process) or dask.")] = "local",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Dask LocalCluster worker processes.")] = 2,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="A running Dask scheduler, tcp://HOST:PORT.")]
    = None,
    torch_threads: Annotated[int | None, typer.Option("--torch-threads", min=1, help="PyTorch threads per process.")]
    = None,
    include_phi: Annotated[bool, typer.Option("--include-phi", help="Put patient name, ID and birth date in the "
                                              "records and statistics.csv (off: case_id only).")] = False,
    models_dir: _ModelsDir = None,
    trust_bundle_code: _TrustCode = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    log_json: Annotated[bool, typer.Option("--log-json", help="One JSON line per event on stdout.")] = False,
    query: _Query = None,
    series: _Series = None,
    push: _Push = False,
    push_to: _PushTo = None,
    credentials: _Credentials = None,
    ca_bundle: _CaBundle = None,
    ae_title: _AeTitle = "MEDSEG",
    cache: _Cache = None,
    timeout: _Timeout = 30.0,
) -> None:
    """Segment every case of a manifest, folder or PACS; resumable (a rerun skips done cases); failed cases
    recorded. With --push each DICOM SEG goes back to the PACS, verified, once."""
    from medseg.pacs import open_endpoints
    from medseg.workflow import OutputOptions, RunOptions, load_manifest_or_folder, run_batch

    try:
        source, sink = open_endpoints(inputs, cache_dir=cache or out / ".pacs-cache", query=query or [],
                                      series=series or [], push=push, push_to=push_to, credentials_file=credentials,
                                      ca_bundle=ca_bundle, ae_title=ae_title, timeout_s=timeout)
        options = RunOptions(model=model, models_dirs=tuple(str(d) for d in models_dir or ()), device=device,
                             fast=fast, tta=tta, torch_threads=torch_threads,
                             outputs=OutputOptions(dicom_seg=dicom_seg or sink is not None, seg_type=seg_type,  # type: ignore[arg-type]
                                                   stats=stats, metrics=metrics, report=report),
                             executor=executor, workers=workers, scheduler=scheduler,  # type: ignore[arg-type]
                             include_phi=include_phi, trust_bundle_code=trust_bundle_code)
        options.check_available()
        manifest = source.manifest() if source is not None else load_manifest_or_folder(inputs)
    except MedsegError as exc:
        fail(exc)
        return
    _present_run(lambda show: run_batch(manifest, out, options, progress=show, source=source, sink=sink),
                 quiet=quiet, log_json=log_json)


@app.command("watch", epilog="Exit status: 2 for a usage error or a PACS that refuses our credentials at the "
             "first poll; 0 when --max-polls is reached.")
def watch_cmd(
    source_url: Annotated[str, typer.Argument(metavar="SOURCE", help="dicomweb+http(s)://HOST[:PORT]/PATH or "
                                              "dimse://AET@HOST:PORT.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name, card file or MONAI bundle folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (+ watch.json, what watch did).")],
    interval: Annotated[float, typer.Option("--interval", min=0.0, help="Seconds between polls.")] = 30.0,
    stable: Annotated[float, typer.Option("--stable", min=0.0, help="Seconds without a new instance before a "
                                          "study is run.")] = 60.0,
    max_polls: Annotated[int | None, typer.Option("--max-polls", min=1, help="Stop after N polls (default: "
                                                  "until interrupted).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: best).")] = None,
    seg_type: Annotated[str, typer.Option("--seg-type", help="DICOM SEG type: binary or labelmap.")] = "binary",
    models_dir: _ModelsDir = None,
    query: _Query = None,
    series: _Series = None,
    push: _Push = False,
    push_to: _PushTo = None,
    credentials: _Credentials = None,
    ca_bundle: _CaBundle = None,
    ae_title: _AeTitle = "MEDSEG",
    cache: _Cache = None,
    timeout: _Timeout = 30.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No line per finished case.")] = False,
) -> None:
    """Poll a PACS for new studies; segment each stable one once, write DICOM SEG (and push it with --push);
    a restart neither repeats nor skips a study."""
    from medseg.pacs import open_endpoints, watch
    from medseg.workflow import OutputOptions, RunEvent, RunOptions

    def show(ev: RunEvent) -> None:
        if ev.kind == "case" and ev.record is not None and not quiet:
            line = f"{ev.record.case_id}: {ev.record.state}" + (f" ({ev.record.error})" if ev.record.error else "")
            err_console.print(line, highlight=False, soft_wrap=True, markup=False)

    from medseg.errors import OptionError
    from medseg.pacs import is_pacs_url

    try:
        if not is_pacs_url(source_url):
            raise OptionError(f"{source_url}: medseg watch polls a PACS: dicomweb+http(s)://HOST[:PORT]/PATH or "
                              "dimse://AET@HOST:PORT.")
        source, sink = open_endpoints(source_url, cache_dir=cache or out / ".pacs-cache", query=query or [],
                                      series=series or [], push=push, push_to=push_to, credentials_file=credentials,
                                      ca_bundle=ca_bundle, ae_title=ae_title, timeout_s=timeout)
        if source is None:  # is_pacs_url said yes above
            raise OptionError(f"{source_url}: not a PACS address.")
        options = RunOptions(model=model, models_dirs=tuple(str(d) for d in models_dir or ()), device=device,
                             outputs=OutputOptions(dicom_seg=True, seg_type=seg_type, report=False))  # type: ignore[arg-type]
        options.check_available()
        watch(source, out, options, sink=sink, interval_s=interval, stable_s=stable, max_polls=max_polls,
              progress=show)
    except MedsegError as exc:
        fail(exc)


@app.command("run", epilog=_EXIT_HELP)
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="Workflow recipe (YAML), e.g. workflows/ct-organs-phantoms.yaml.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: key=value (repeatable), e.g. "
                                                   "--set outputs.folder=/tmp/run.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    log_json: Annotated[bool, typer.Option("--log-json", help="One JSON line per event on stdout.")] = False,
) -> None:
    """Run a workflow recipe (batch segmentation with statistics, metrics and report). A training recipe runs
    `medseg train` on it."""
    from medseg.errors import WorkflowError
    from medseg.schema import read_yaml
    from medseg.workflow import is_training_recipe, load_workflow, run_workflow

    try:
        data = read_yaml(recipe, WorkflowError, what="recipe") if recipe.is_file() else None
        if is_training_recipe(data):
            if set_:
                raise WorkflowError(f"{recipe}: --set applies to workflow recipes; edit the training recipe or use "
                                  "`medseg train` options.")
            train_cmd(recipe, out=None, resume=None, epochs=None, until_epoch=None, device=None, as_json=log_json)
            return
        workflow = load_workflow(recipe, overrides=set_ or [])
    except MedsegError as exc:
        fail(exc)
        return
    _present_run(lambda show: run_workflow(workflow, progress=show), quiet=quiet, log_json=log_json)


def main() -> None:
    """Console entry point: ``app()`` with no traceback for unexpected errors unless ``--debug`` is given."""
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False, soft_wrap=True)
        raise SystemExit(130) from None
    except Exception as exc:
        if debug:
            raise
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (run with --debug for the "
                          "traceback, and please report it)", highlight=False, markup=True, soft_wrap=True)
        raise SystemExit(1) from None
