"""Benchmark: ``medseg predict --memory retain`` against ``--memory release`` (glibc's default heap policy).

With ``retain`` the process keeps freed memory for the next allocation (``medseg.allocator``), so the
forward passes reuse the pages of their activation maps instead of having the kernel fault them in and
zero them again. Each round runs ``medseg predict`` once per policy, in fresh processes, alternating, on
the same input, and reads the report's ``seconds`` / ``infer_s`` and the process's peak resident memory
(``ru_maxrss`` from ``wait4``). Default: the nuclei bundle on one 520x696 DSB 2018 field (the sample
nuclei images without the data). Run: ``python benchmarks/bench_memory_policy.py [--bundle DIR]
[--input DIR_OR_FILE] [--rounds 5] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELD = ROOT.parent / "shared" / "datasets" / "dsb2018_fluo" / "images" / "f4faa3a409014db1.png"  # 520x696


def run_once(bundle: str, source: Path, out: Path, policy: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "medseg", "predict", "--bundle", bundle, "--input", str(source),
           "--output", str(out), "--no-progress", "--memory", policy]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"medseg predict failed:\n{err[-3000:]}")
    with open(out / "report.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {
        "seconds": sum(float(r["seconds"]) for r in rows),
        "infer_s": sum(float(r["infer_s"]) for r in rows),
        "peak_mib": usage.ru_maxrss / 1024,
        "cases": len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(ROOT / "bundles" / "unet_nuclei_2d"))
    ap.add_argument("--input", default=None, help="folder or file (default: one DSB 2018 field)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        if args.input:
            source = Path(args.input)
        elif FIELD.is_file():
            source = tmp / "in"
            source.mkdir()
            shutil.copy(FIELD, source / FIELD.name)
        else:
            source = ROOT / "sample_data" / "nuclei_2d" / "images"
        runs: dict[str, list[dict]] = {"retain": [], "release": []}
        for _ in range(args.rounds):
            for policy in runs:
                runs[policy].append(run_once(args.bundle, source, tmp / f"out_{policy}", policy))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.bundle}, input {args.input or source.name}, {args.rounds} rounds, fresh process per run")
    print("| --memory | seconds (report, all cases) | median | infer_s median | peak RSS MiB |")
    print("|---|---|---|---|---|")
    summary = {}
    for policy, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        summary[policy] = {
            "median_s": statistics.median(secs),
            "median_infer_s": statistics.median(r["infer_s"] for r in rs),
            "peak_mib": max(r["peak_mib"] for r in rs),
            "runs": rs,
        }
        s = summary[policy]
        print(f"| {policy} | {', '.join(f'{v:.2f}' for v in secs)} | {s['median_s']:.2f} | "
              f"{s['median_infer_s']:.2f} | {s['peak_mib']:.0f} |")  # fmt: skip
    ratio = summary["release"]["median_s"] / summary["retain"]["median_s"]
    print(f"release / retain, median seconds: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
