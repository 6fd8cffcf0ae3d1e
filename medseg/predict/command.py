"""``medseg predict``: argument parsing and the command (kept import-light until it runs).

Exit status: 0 every case ok or skipped; 1 at least one case failed; 2 the run could not start (bad
arguments, unreadable bundle or checkpoint, no cases found); 3 ``--merge-reports`` found shard
reports missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

__all__ = ["add_predict_parser", "run_predict"]

_EPILOG = """exit status: 0 all cases ok (or skipped: already done), 1 at least one case failed,
2 the run could not start (bad arguments, bundle/checkpoint unreadable, no cases), 3 --merge-reports
found shard reports missing.

outputs per case (id = sanitised path relative to --input): <id>_seg.nii.gz (mask on the source
grid), <id>_instances.nii.gz (instance labels, bundles that label instances), <id>_seg.dcm (DICOM
SEG, DICOM input), <id>_overlay.png (QC); report.json / report.csv
(report.shard-i-of-n.* per shard); .medseg/ holds the resume state. Run the same command again
after a crash: finished cases are skipped, the rest are redone.

DICOMweb input (--input http://host:port/dicom-web): one case per series of the bundle's modality, id
series-<hash of the SeriesInstanceUID>, retrieved into .medseg/dicomweb/ (re-used by the next run).
--store: each DICOM SEG is sent once; a failed store is a failed case, sent again by the next run."""


def add_predict_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``predict`` subcommand on an ``add_subparsers()`` object."""
    p = sub.add_parser(
        "predict",
        help="segment a folder of scans with a MONAI bundle (resumable, sharded)",
        description="Batch prediction with a MONAI bundle: DICOM series/files, NIfTI, .mat, images or a list "
        "file in; masks on the source grid, optional DICOM SEG and QC overlays, report.json/.csv out.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", help="bundle folder (configs/inference.json, models/model.pt)")
    p.add_argument(
        "--input",
        help="folder (walked recursively), image/DICOM file, list file (.txt), or a DICOMweb service "
        "http(s)://host:port/dicom-web (series listed with QIDO-RS, retrieved with WADO-RS)",
    )
    p.add_argument("--study", nargs="+", action="extend", default=[], metavar="UID",
                   help="DICOMweb input: only these StudyInstanceUIDs")  # fmt: skip
    p.add_argument("--query", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="DICOMweb input: QIDO-RS matching keys (StudyDate=20240101-20240131)")  # fmt: skip
    p.add_argument(
        "--store",
        default=None,
        help="send each DICOM SEG to a PACS: http(s)://host:port/dicom-web (STOW-RS) or "
        "dimse://AET@host:port (C-STORE); a failed store is a failed case, sent again by the next run",
    )
    p.add_argument("--ae-title", default="MEDSEG", help="our (calling) AE title for C-STORE (default MEDSEG)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default=None,
        help="forward-pass precision: auto = bf16 (+ channels-last) on CPUs with native bf16, bf16/fp16 on "
        "CUDA, else fp32 (default: the bundle's 'precision', auto)",
    )
    p.add_argument("--formats", default="nifti", help="comma list of nifti, dicom-seg (default nifti)")
    p.add_argument("--overlays", action="store_true", help="also write <id>_overlay.png QC images")
    p.add_argument("--workers", type=int, default=2, help="loader threads (0: no pipelining; default 2)")
    p.add_argument(
        "--shard",
        default=None,
        help="i/n: process every n-th case from i (0-based); default RANK/WORLD_SIZE under torchrun",
    )
    p.add_argument(
        "--config-file",
        nargs="+",
        default=None,
        help="inference config file(s), merged in order (default configs/inference.json)",
    )
    p.add_argument("--ckpt", default=None, help="checkpoint (default <bundle>/models/model.pt)")
    p.add_argument(
        "--min-tile-fraction",
        type=float,
        default=0.25,
        help="fail images below this fraction of the inference tile (default 0.25)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_memory_option(p)
    p.add_argument(
        "--merge-reports",
        action="store_true",
        help="only merge OUTPUT/report.shard-*-of-*.json into report.json/.csv",
    )
    p.set_defaults(func=run_predict)
    return p


def add_memory_option(p: argparse.ArgumentParser) -> None:
    """``--memory {bundle,retain,release}``: the heap policy of the run (:mod:`medseg.allocator`)."""
    p.add_argument(
        "--memory",
        choices=("bundle", "retain", "release"),
        default="bundle",
        help="retain: keep freed memory in the process during the run (glibc), so forward passes over large "
        "images reuse their pages (faster; the process holds its peak until the run ends); release: the C "
        "library's default; bundle (default): the bundle's retain_freed_memory setting, else release",
    )


def memory_policy(args: argparse.Namespace) -> bool | None:
    """``retain_freed_memory`` for :meth:`BatchPredictor.from_bundle` (``None``: the bundle's setting)."""
    return {"retain": True, "release": False}.get(args.memory)


def _distributed_merge(output_dir: str) -> int | None:
    """Under torchrun: wait for every rank (gloo barrier), then rank 0 merges the shard reports."""
    if not os.environ.get("MASTER_ADDR") or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    from medseg.predict.report import merge_reports

    created = False
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=12))
            created = True
        dist.barrier()
        if dist.get_rank() == 0:
            code, problems = merge_reports(output_dir)
            for msg in problems:
                print(f"medseg predict: {msg}", file=sys.stderr)
            return code
        return None
    except Exception as e:  # never lose the shard's own result over the merge
        print(f"medseg predict: could not merge shard reports ({e}); run --merge-reports", file=sys.stderr)
        return None
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def run_predict(args: argparse.Namespace) -> int:
    """Run ``medseg predict``; returns the exit status."""
    from medseg.predict.discovery import parse_shard, shard_from_env
    from medseg.predict.report import EXIT_SETUP, exit_code, merge_reports

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = os.path.abspath(args.output)
    if args.merge_reports:
        code, problems = merge_reports(out)
        for msg in problems:
            print(f"medseg predict: {msg}", file=sys.stderr)
        print(f"merged into {os.path.join(out, 'report.json')} (exit status {code})")
        return code
    if not args.bundle or not args.input:
        print("medseg predict: --bundle and --input are required (unless --merge-reports)", file=sys.stderr)
        return EXIT_SETUP
    remote = args.input.lower().startswith(("http://", "https://"))
    if not remote and not os.path.exists(args.input):
        print(f"medseg predict: {args.input}: no such file or folder", file=sys.stderr)
        return EXIT_SETUP
    try:
        shard = parse_shard(args.shard) if args.shard else shard_from_env()
    except ValueError as e:
        print(f"medseg predict: {e}", file=sys.stderr)
        return EXIT_SETUP
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    store = None
    if args.store:
        from medseg.predict.pacs import open_store

        try:
            store = open_store(args.store, ae_title=args.ae_title)
        except ValueError as e:
            print(f"medseg predict: {e}", file=sys.stderr)
            return EXIT_SETUP
        formats += [] if "dicom-seg" in formats else ["dicom-seg"]

    from medseg.predict.discovery import discover_cases
    from medseg.predict.engine import BatchPredictor, SetupError, check_output_dir

    try:
        check_output_dir(out, None if remote else args.input)
        if remote:
            from medseg.predict.dicomweb import remote_cases

            cases = remote_cases(args.input, out, args.bundle, args.study, args.query, shard)
        else:
            cases = discover_cases(args.input, exclude=[out])
        if not cases:
            print(f"medseg predict: {args.input}: no cases found", file=sys.stderr)
            return EXIT_SETUP
        predictor = BatchPredictor.from_bundle(
            args.bundle,
            out,
            config_file=args.config_file,
            checkpoint=args.ckpt,
            device=args.device,
            precision=args.precision,
            formats=formats,
            overlays=args.overlays,
            workers=args.workers,
            shard=shard,
            min_tile_fraction=args.min_tile_fraction,
            progress=not args.no_progress,
            retain_freed_memory=memory_policy(args),
        )
    except (SetupError, OSError) as e:
        print(f"medseg predict: {e}", file=sys.stderr)
        return EXIT_SETUP
    rows = predictor.run(args.input, cases=cases)
    if store is not None:
        from medseg.predict.pacs import rewrite_report, store_rows

        rows = store_rows(rows, out, store)
        rewrite_report(rows, out, shard)
        predictor.rows, predictor.exit_code = rows, exit_code(rows)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "skipped", "failed")}
    print(
        f"medseg predict: {len(rows)} case(s): "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f"; report in {out}"
    )
    for r in rows:
        if r.status == "failed":
            print(f"  FAILED {r.id}: {r.error}", file=sys.stderr)
    code = int(predictor.exit_code or 0)
    if shard is not None and args.shard is None:  # torchrun: merge once every rank is done
        merged = _distributed_merge(out)
        code = code if merged is None else max(code, merged)
    return code
