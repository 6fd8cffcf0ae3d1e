"""Device check: medseg's CUDA paths run and timed on one GPU, with peak memory, in one command.

Runs, on ``--device`` (default ``cuda:0``; ``--quick`` shrinks every size so that the script also runs on a
CPU in about a minute):

1. the CUDA-marked tests (``pytest -m cuda``): passed / failed / skipped;
2. ``OverlapTileInferer`` against MONAI ``sliding_window_inference``: the same network (``unet_ct_3d``'s
   ``network_def``), the same tile size and overlap, on a 512x512x300 CT-sized volume, in fp32 and in mixed
   precision (bf16 where supported, else fp16); seconds and peak device memory
   (``torch.cuda.max_memory_allocated``; on a CPU the process's peak RSS);
3. ``medseg predict`` end to end against pure inference on 20 volumes (``benchmarks/bench_predict.py``);
4. one training epoch of ``unet_ct_3d`` on the sample data with mixed precision (``precision auto``);
5. ``RandElasticGridd`` 3D against MONAI's ``Rand3DElasticd`` on the device.

Writes ``--out`` (default ``device_check``) ``/device_check.json`` and ``/device_check.md`` (a markdown table
for the README) and prints the table. Run: ``python benchmarks/device_check.py [--quick] [--device cuda:0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Any, device: torch.device, repeats: int = 2) -> tuple[float, float]:
    """(best seconds, peak memory MiB) of ``fn()`` after one warm-up call."""
    fn()
    _sync(device)
    _reset_peak(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, _peak_mb(device)


def _compare(size: tuple[int, ...], ours: tuple[float, float], monai: tuple[float, float]) -> dict[str, Any]:
    """A row of medseg against MONAI: seconds and peak memory of each, and MONAI's time over medseg's."""
    return {"size": "x".join(map(str, size)), "medseg_s": ours[0], "monai_s": monai[0],
            "speedup": monai[0] / ours[0], "medseg_peak_mb": ours[1], "monai_peak_mb": monai[1]}  # fmt: skip


def check_tests(quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300 if quick else 900)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tail)}
    return {"returncode": proc.returncode, "summary": tail, "seconds": time.perf_counter() - t0, **counts}


def check_inferer(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    from monai.bundle import ConfigParser
    from monai.inferers import sliding_window_inference

    from medseg.inferers import OverlapTileInferer
    from medseg.precision import resolve_precision

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "unet_ct_3d" / "configs" / "inference.json"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").to(device).eval()
    roi = [int(r) for r in parser.get_parsed_content("tile_size")]
    size = (128, 128, 64) if quick else (512, 512, 300)
    x = torch.randn(1, 1, *size, device=device)
    rows = []
    mixed = resolve_precision("auto", device)
    for label, plan in (("fp32", resolve_precision("fp32", device)), (f"mixed ({mixed.name})", mixed)):
        ours = OverlapTileInferer(roi, sw_batch_size=4, overlap=0.25, precision=plan)
        amp = plan.name in ("bf16", "fp16")
        dtype = torch.bfloat16 if plan.name == "bf16" else torch.float16

        def medseg_run(ours: OverlapTileInferer = ours) -> Any:
            with torch.no_grad():
                return ours(x, net)

        def monai_run(dtype: torch.dtype = dtype, amp: bool = amp) -> Any:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                return sliding_window_inference(x, roi, 4, net, overlap=0.25, mode="gaussian")

        rows.append(
            {"precision": label, **_compare(size, _timed(medseg_run, device), _timed(monai_run, device))}
        )
    return rows


def check_predict(device: torch.device, quick: bool) -> dict[str, Any]:
    n, size = ("3", ["96", "96", "48"]) if quick else ("20", ["192", "192", "80"])
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_predict.py"),
        "--n",
        n,
        "--size",
        *size,
        "--repeats",
        "1" if quick else "3",
        "--device",
        str(device),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("median:")), proc.stderr[-300:])
    m = re.search(r"engine/pure ([\d.]+)x", line)
    return {
        "returncode": proc.returncode,
        "summary": line,
        "engine_over_pure": float(m.group(1)) if m else None,
    }


def check_training(device: torch.device, quick: bool) -> dict[str, Any]:
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="device_check_train_"))
    bundle = tmp / "unet_ct_3d"
    shutil.copytree(ROOT / "bundles" / "unet_ct_3d" / "configs", bundle / "configs")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(bundle / "configs" / "train.json"),
        "--dataset_dir",
        str(ROOT / "sample_data" / "ct_3d"),
        "--epochs",
        "1",
        "--device",
        f"$torch.device('{device}')",
        "--num_workers",
        "0",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "returncode": proc.returncode,
        "seconds": seconds,
        "error": proc.stderr[-500:] if proc.returncode else "",
    }


def check_elastic(device: torch.device, quick: bool) -> dict[str, Any]:
    from medseg.transforms import RandElasticGridd
    from monai.transforms import Rand3DElasticd

    size = (64, 64, 32) if quick else (192, 192, 128)
    img = torch.randn(1, *size, device=device)
    lab = (img > 1).float()
    ours = RandElasticGridd(["image", "label"], sigma=10.0, num_points=3, mode=("bilinear", "nearest"))
    ours.set_random_state(0)
    monai = Rand3DElasticd(
        ["image", "label"],
        sigma_range=(5, 8),
        magnitude_range=(100, 200),
        prob=1.0,
        mode=("bilinear", "nearest"),
        device=device,
    )
    monai.set_random_state(0)
    data = {"image": img, "label": lab}
    return _compare(size, _timed(lambda: ours(data), device, 3), _timed(lambda: monai(data), device, 3))


def markdown(doc: dict[str, Any]) -> str:
    head = f"Device: {doc['device_name']} ({doc['device']}), torch {doc['torch']}, "
    head += f"{'quick' if doc['quick'] else 'full'} run, {doc['date']}"
    lines = [
        head,
        "",
        "| check | medseg | MONAI | ratio (MONAI / medseg) | peak memory medseg / MONAI (MiB) |",
        "|---|---|---|---|---|",
    ]
    rows = [
        (f"overlap-tile vs sliding window, {r['size']}, {r['precision']}", r, 1.0, "s")
        for r in doc["inferer"]
    ]
    rows.append((f"elastic 3D, {doc['elastic']['size']}", doc["elastic"], 1000.0, "ms"))
    for name, r, scale, unit in rows:
        times = f"{r['medseg_s'] * scale:.2f} {unit} | {r['monai_s'] * scale:.2f} {unit}"
        peaks = f"{r['medseg_peak_mb']:.0f} / {r['monai_peak_mb']:.0f}"
        lines.append(f"| {name} | {times} | {r['speedup']:.2f}x | {peaks} |")
    p, t, c = doc["predict"], doc["training"], doc["tests"]
    lines += [
        "",
        f"- `medseg predict` end to end / pure inference: {p['engine_over_pure']}x ({p['summary']})",
        f"- one training epoch of unet_ct_3d (precision auto): {t['seconds']:.1f} s (exit {t['returncode']})",
        f"- CUDA-marked tests: {c['summary']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (runs on a CPU in about a minute)")
    ap.add_argument("--out", default="device_check")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["tests", "inferer", "predict", "training", "elastic"]
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    doc: dict[str, Any] = {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "quick": args.quick,
        "date": date,
    }
    checks = {
        "tests": lambda: check_tests(args.quick),
        "inferer": lambda: check_inferer(device, args.quick),
        "predict": lambda: check_predict(device, args.quick),
        "training": lambda: check_training(device, args.quick),
        "elastic": lambda: check_elastic(device, args.quick),
    }
    no_elastic = {
        "size": "-",
        "medseg_s": 0,
        "monai_s": 0,
        "speedup": 0,
        "medseg_peak_mb": 0,
        "monai_peak_mb": 0,
    }
    empty: dict[str, Any] = {
        "inferer": [],
        "elastic": no_elastic,
        "predict": {"engine_over_pure": None, "summary": "skipped"},
        "training": {"seconds": 0.0, "returncode": None},
        "tests": {"summary": "skipped"},
    }
    for key, fn in checks.items():
        t0 = time.perf_counter()
        doc[key] = empty[key] if key in args.skip else fn()
        print(f"{key}: {time.perf_counter() - t0:.1f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(doc, indent=2, default=str))
    table = markdown(doc)
    (out / "device_check.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
