"""medseg versus MONAI's own bundle run, for a many-class Model Zoo bundle (wholeBody-like, random weights).

The bundle is wholeBody_ct_segmentation's inference config at its low-resolution setting (``highres: false``:
3 mm, ``model_lowres.pt``): SegResNet with 105 output channels, sliding window 96³ with replicate padding and
gaussian blending, softmax → argmax → ``Invertd(nearest)`` → ``SaveImaged``. Weights are random (seeded), with
the last layer re-centred so that many classes win somewhere.

Each run is a child process under a hard address-space limit (``RLIMIT_AS``; also ``MALLOC_ARENA_MAX=2``):
``--cap-gb`` (default 6 GiB) is the stated cap, and "does not fit" below means "does not fit in that cap", on this
machine. When MONAI's run does not fit, it is run again under ``--compare-cap-gb`` (default 10 GiB; 0: skip) so that
time, peak RSS and labels can still be compared. Both runs read the same uncompressed NIfTI and write their labels
as NIfTI; time is wall clock of the whole child (imports excluded), peak RSS is the child's ``ru_maxrss``.

    python benchmarks/bench_bundles.py                                  # 512x512x300 CT
    python benchmarks/bench_bundles.py --shape 512 512 200 --cap-gb 6 --compare-cap-gb 0
    python benchmarks/bench_bundles.py --big-z 400                      # and a 512x512x400 CT

No assertion on time: it prints a table (and ``--json FILE`` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_name  # benchmarks/_machine.py (the scripts run from this folder)

HERE = Path(__file__).resolve()


def wholebody_config() -> dict:
    """wholeBody_ct_segmentation's configs/inference.json (Model Zoo), low-resolution setting."""
    return {
        "displayable_configs": {"highres": False, "sw_overlap": 0.25, "sw_batch_size": 1},
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii",
        "output_dtype": "$numpy.uint8",
        "output_postfix": "trans",
        "separate_folder": False,
        "datalist": [],
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
        "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
        "network_def": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 105,
                        "init_filters": 32, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
                        "dropout_prob": 0.2},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
            {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
            {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96],
                    "sw_batch_size": "@displayable_configs#sw_batch_size",
                    "overlap": "@displayable_configs#sw_overlap", "padding_mode": "replicate", "mode": "gaussian",
                    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
             "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
             "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
             "separate_folder": "@separate_folder"}]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/' + @modelname",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def write_bundle(root: Path) -> Path:
    import torch
    from monai.networks.nets import SegResNet

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=105, init_filters=32, blocks_down=(1, 2, 2, 4),
                    blocks_up=(1, 1, 1), dropout_prob=0.2).eval()
    with torch.no_grad():  # re-centre the last layer so that many of the 105 classes win somewhere
        x = torch.rand(1, 1, 64, 64, 64) * 2 - 1
        out = net(x)
        net.conv_final[-1].conv.bias -= out.mean(dim=(0, 2, 3, 4))
        net.conv_final[-1].conv.weight *= 10
        net.conv_final[-1].conv.bias *= 10
    torch.save(net.state_dict(), root / "models" / "model_lowres.pt")
    meta = {"version": "0.2.0", "monai_version": "1.6.1", "name": "wholeBody-like (random weights)",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1,
                                     "channel_def": {"0": "image"}}},
                "outputs": {"pred": {"type": "image", "num_channels": 105,
                                     "channel_def": {str(i): f"class_{i}" for i in range(105)}}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    (root / "configs" / "inference.json").write_text(json.dumps(wholebody_config(), indent=1))
    return root


def write_ct(path: Path, shape: tuple[int, int, int]) -> Path:
    """A body-like synthetic CT (int16 HU), 0.8 x 0.8 x 1.5 mm, LPS-like axis signs, written uncompressed."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (i / 0.85) ** 2 + (j / 0.65) ** 2 < 1
    organ = ((i - 0.3) / 0.3) ** 2 + ((j + 0.1) / 0.25) ** 2 < 1
    arr = np.empty(shape, dtype=np.int16)
    for k in range(shape[2]):
        z = k / max(1, shape[2] - 1)
        sl = np.where(body, 40, -1000) + np.where(organ & (z > 0.3) & (z < 0.7), 60, 0)
        arr[..., k] = (sl + rng.normal(0, 20, shape[:2])).astype(np.int16)
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])
    affine[:3, 3] = [200.0, 180.0, -300.0]
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def child(role: str, bundle: Path, image: Path, out: Path, cap_gb: float, report: Path) -> None:
    cap = int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    result: dict = {"role": role, "cap_gib": cap_gb}
    try:
        import torch  # noqa: F401 - imports are not timed
        from monai.bundle import ConfigParser

        from medseg.inference import Segmenter
        from medseg.io import load_volume, save_volume

        t0 = time.perf_counter()
        if role == "monai":
            parser = ConfigParser()
            parser.read_config(str(bundle / "configs" / "inference.json"))
            parser["bundle_root"] = str(bundle)
            parser["datalist"] = [str(image)]
            parser["output_dir"] = str(out.parent)
            parser.get_parsed_content("initialize#0")
            parser.get_parsed_content("evaluator").run()
            written = next(out.parent.glob("*_trans.nii"))
            written.rename(out)
        else:
            seg = Segmenter(bundle, device="cpu").segment(load_volume(image))
            save_volume(seg.labels, out)
        result.update(ok=True, seconds=time.perf_counter() - t0)
    except (MemoryError, RuntimeError) as exc:
        root: BaseException = exc
        while root.__cause__ is not None:  # MONAI wraps a transform's error: report the innermost one
            root = root.__cause__
        result.update(ok=False, error=f"{type(root).__name__}: {str(root).splitlines()[0][:200]}")
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report.write_text(json.dumps(result))


def run_child(role: str, bundle: Path, image: Path, out: Path, cap_gb: float, work: Path) -> dict:
    report = work / f"{role}_{out.stem}.json"
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    cmd = [sys.executable, str(HERE), "--child", role, "--bundle", str(bundle), "--image", str(image), "--out",
           str(out), "--cap-gb", str(cap_gb), "--report", str(report)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    if report.is_file():
        res = json.loads(report.read_text())
    else:  # killed before it could report (e.g. an allocation outside Python failing)
        res = {"role": role, "ok": False, "error": f"exit code {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    res["exit_code"] = proc.returncode
    return res


def agreement(a: Path, b: Path) -> tuple[float, int]:
    import nibabel as nib
    import numpy as np

    x = np.asarray(nib.load(str(a)).dataobj).squeeze()
    y = np.asarray(nib.load(str(b)).dataobj).squeeze()
    assert x.shape == y.shape, (x.shape, y.shape)
    return float((x == y).mean()), len(np.unique(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--big-z", type=int, default=0, help="slices of a second, larger CT (0: none)")
    ap.add_argument("--cap-gb", type=float, default=6.0, help="address-space cap of every child (GiB)")
    ap.add_argument("--compare-cap-gb", type=float, default=10.0,
                    help="cap for rerunning MONAI's run when it does not fit in --cap-gb (0: no rerun)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=["monai", "medseg"])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.bundle, args.image, args.out, args.cap_gb, args.report)
        return
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; cap per run: RLIMIT_AS "
          f"{args.cap_gb:g} GiB")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_bundles_") as tmp:
        work = Path(tmp)
        bundle = write_bundle(work / "wholeBody_lowres_like")
        sizes = [tuple(args.shape)] + ([(args.shape[0], args.shape[1], args.big_z)] if args.big_z else [])
        for n, shape in enumerate(sizes):
            image = write_ct(work / f"ct_{n}.nii", shape)
            (work / f"m{n}").mkdir()
            (work / f"s{n}").mkdir()
            ours = run_child("medseg", bundle, image, work / f"s{n}" / "labels.nii", args.cap_gb, work)
            theirs = run_child("monai", bundle, image, work / f"m{n}" / "labels.nii", args.cap_gb, work)
            row = {"shape": list(shape), "medseg": ours, "monai": theirs}
            compare = theirs
            if not theirs.get("ok") and args.compare_cap_gb:
                (work / f"m{n}b").mkdir()
                compare = run_child("monai", bundle, image, work / f"m{n}b" / "labels.nii", args.compare_cap_gb, work)
                row["monai_larger_cap"] = compare
            if ours.get("ok") and compare.get("ok"):
                ref = work / (f"m{n}b" if compare is not theirs else f"m{n}") / "labels.nii"
                row["identical_fraction"], row["labels_present"] = agreement(work / f"s{n}" / "labels.nii", ref)
            rows.append(row)
            image.unlink()
    print(f"{'CT shape':>16} {'run':>7} {'cap GiB':>8} {'ok':>4} {'time s':>8} {'peak RSS GiB':>13}   notes")
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        for role in ("monai", "monai_larger_cap", "medseg"):
            r = row.get(role)
            if r is None:
                continue
            t = f"{r['seconds']:.1f}" if r.get("seconds") else "-"
            peak = f"{r['peak_rss_gib']:.2f}" if r.get("peak_rss_gib") else "-"
            print(f"{shape:>16} {r['role']:>7} {r.get('cap_gib', 0):>8g} {'yes' if r.get('ok') else 'no':>4} {t:>8} "
                  f"{peak:>13}   {r.get('error', '')[:80]}")
        m, s = row.get("monai_larger_cap", row["monai"]), row["medseg"]
        if m.get("ok") and s.get("ok"):
            print(f"{'':>16} medseg/MONAI: time {s['seconds'] / m['seconds']:.2f}x, peak RSS "
                  f"{s['peak_rss_gib'] / m['peak_rss_gib']:.2f}x; identical labels {row['identical_fraction']:.6f} "
                  f"({row['labels_present']} labels present)")
        if not row["monai"].get("ok") and s.get("ok"):
            print(f"{'':>16} MONAI's own run does not fit in RLIMIT_AS {args.cap_gb:g} GiB; medseg's completes "
                  f"(peak RSS {s['peak_rss_gib']:.2f} GiB)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "cap_gib": args.cap_gb, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
