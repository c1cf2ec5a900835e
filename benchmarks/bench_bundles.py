"""medseg versus MONAI's own bundle run, for a many-class Model Zoo bundle (wholeBody-like, random weights).

The bundle is wholeBody_ct_segmentation's inference config at its low-resolution setting (``highres: false``:
3 mm, ``model_lowres.pt``): SegResNet with 105 output channels, sliding window 96³ with replicate padding and
gaussian blending, softmax → argmax → ``Invertd(nearest)`` → ``SaveImaged``. Weights are random (seeded), with
the last layer re-centred so that many classes win somewhere.

Each run is a child process in its own memory cgroup whose limit is this machine's physical memory (MemTotal;
``--limit-gb`` to choose another): "does not fit in this machine's memory" below means the kernel killed the run
when its resident memory reached the limit (or, the run being the first OOM victim, when the machine ran out).
Where cgroups are not available (not root), the limit is an address-space cap (``RLIMIT_AS``) instead, which is
stricter. ``MALLOC_ARENA_MAX=2`` for both. Both runs read the same uncompressed NIfTI and write their labels as
NIfTI; time is wall clock of the whole child (imports excluded); peak RSS is the child's ``ru_maxrss`` when it
completes, else the largest anonymous memory of its cgroup sampled every 50 ms.

    python benchmarks/bench_bundles.py                        # 512x512x300 CT (0.8 x 0.8 x 1.5 mm)
    python benchmarks/bench_bundles.py --shape 512 512 100
    python benchmarks/bench_bundles.py --big 512 512 1500 --big-spacing 0.98 0.98 1.0
        # and a whole-body CT, head to thigh (1.5 m at 1 mm, 500 mm field of view)

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

from _machine import MemoryCage, cpu_name, load_average, memory_total_bytes  # benchmarks/_machine.py

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


def write_ct(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float] = (0.8, 0.8, 1.5)) -> Path:
    """A body-like synthetic CT (int16 HU), LPS-like axis signs, written uncompressed."""
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
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [200.0, 180.0, -300.0]
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def child(role: str, bundle: Path, image: Path, out: Path, cap_gb: float, report: Path) -> None:
    if cap_gb:
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    result: dict = {"role": role}
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


def run_child(role: str, bundle: Path, image: Path, out: Path, limit_gb: float, work: Path) -> dict:
    """One run in its own memory cgroup limited to ``limit_gb`` (RLIMIT_AS of that size where there is none)."""
    report = work / f"{role}_{out.parent.name}.json"
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    caged = MemoryCage.available()
    cmd = [sys.executable, str(HERE), "--child", role, "--bundle", str(bundle), "--image", str(image), "--out",
           str(out), "--cap-gb", "0" if caged else str(limit_gb), "--report", str(report)]
    with open(work / f"{role}_{out.parent.name}.log", "wb") as log:
        if caged:
            with MemoryCage(f"{role}-{out.parent.name}", int(limit_gb * 2**30)) as cage:
                run = cage.run(cmd, env=env, stdout=log)
        else:
            proc = subprocess.run(cmd, check=False, env=env, stdout=log, stderr=subprocess.STDOUT)
            run = {"exit_code": proc.returncode, "oom_killed": False, "peak_bytes": 0, "peak_anon_bytes": 0}
    res = json.loads(report.read_text()) if report.is_file() else {"role": role, "ok": False}
    res.update(exit_code=run["exit_code"], limit_gib=limit_gb, limit="cgroup" if caged else "RLIMIT_AS",
               cgroup_peak_gib=run["peak_bytes"] / 2**30, oom_killed=run["oom_killed"])
    if "peak_rss_gib" not in res:  # killed before it could report: the sampled peak of its heap
        res["peak_rss_gib"] = run["peak_anon_bytes"] / 2**30
    if not res.get("ok") and "error" not in res:
        if run["oom_killed"]:
            res["error"] = f"killed by the kernel at the {limit_gb:.1f} GiB memory limit (out of memory)"
        else:
            tail = (work / f"{role}_{out.parent.name}.log").read_text(errors="replace").strip().splitlines()[-1:]
            res["error"] = f"exit code {run['exit_code']}: {tail[0][:200] if tail else ''}"
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
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5], help="mm")
    ap.add_argument("--big", type=int, nargs=3, help="shape of a second, larger CT")
    ap.add_argument("--big-spacing", type=float, nargs=3, default=[0.98, 0.98, 1.0], help="its spacing (mm)")
    ap.add_argument("--limit-gb", type=float, default=memory_total_bytes() / 2**30,
                    help="memory limit of every run (GiB; default: this machine's physical memory)")
    ap.add_argument("--only", choices=["monai", "medseg"], help="run one side only")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=["monai", "medseg"])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cap-gb", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.bundle, args.image, args.out, args.cap_gb, args.report)
        return
    cpu = cpu_name()
    how = "memory cgroup" if MemoryCage.available() else "address-space cap (RLIMIT_AS)"
    print(f"CPU: {cpu}, {os.cpu_count()} cores, load average {load_average():.1f}; memory {memory_total_bytes() / 2**30:.1f}"
          f" GiB; limit per run: {how} of {args.limit_gb:.1f} GiB", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_bundles_") as tmp:
        work = Path(tmp)
        bundle = write_bundle(work / "wholeBody_lowres_like")
        sizes = [(tuple(args.shape), tuple(args.spacing))]
        if args.big:
            sizes.append((tuple(args.big), tuple(args.big_spacing)))
        roles = [args.only] if args.only else ["medseg", "monai"]
        for n, (shape, spacing) in enumerate(sizes):
            image = write_ct(work / f"ct_{n}.nii", shape, spacing)
            row: dict = {"shape": list(shape), "spacing": list(spacing)}
            for role in roles:
                (work / f"{role}{n}").mkdir()
                row[role] = run_child(role, bundle, image, work / f"{role}{n}" / "labels.nii", args.limit_gb, work)
                row[role]["load_average_after"] = load_average()
                print(f"  {role} {'x'.join(map(str, shape))}: {json.dumps(row[role])}", flush=True)
            if all(row.get(r, {}).get("ok") for r in ("medseg", "monai")):
                row["identical_fraction"], row["labels_present"] = agreement(
                    work / f"medseg{n}" / "labels.nii", work / f"monai{n}" / "labels.nii")
            rows.append(row)
            image.unlink()
            for role in roles:
                (work / f"{role}{n}" / "labels.nii").unlink(missing_ok=True)
    print(f"{'CT shape':>15} {'spacing mm':>15} {'run':>7} {'ok':>4} {'time s':>8} {'peak RSS GiB':>13} "
          f"{'cgroup peak':>12}   notes")
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        spacing = "x".join(f"{v:g}" for v in row["spacing"])
        for role in ("monai", "medseg"):
            r = row.get(role)
            if r is None:
                continue
            t = f"{r['seconds']:.1f}" if r.get("seconds") else "-"
            print(f"{shape:>15} {spacing:>15} {role:>7} {'yes' if r.get('ok') else 'no':>4} {t:>8} "
                  f"{r['peak_rss_gib']:>13.2f} {r['cgroup_peak_gib']:>12.2f}   {r.get('error', '')[:90]}")
        m, s = row.get("monai", {}), row.get("medseg", {})
        if m.get("ok") and s.get("ok"):
            print(f"{'':>15} medseg/MONAI: time {s['seconds'] / m['seconds']:.2f}x, peak RSS "
                  f"{s['peak_rss_gib'] / m['peak_rss_gib']:.2f}x; identical labels {row['identical_fraction']:.6f} "
                  f"({row['labels_present']} labels present)")
        elif "monai" in row and not m.get("ok") and s.get("ok"):
            print(f"{'':>15} MONAI's own run does not fit in {m['limit_gib']:.1f} GiB ({m['limit']}); medseg's "
                  f"completes (peak RSS {s['peak_rss_gib']:.2f} GiB)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "limit_gib": args.limit_gb, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
