"""The ``medseg`` command line: one subcommand per job (``medseg --help`` lists them)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from medseg._version import __version__


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from medseg.data.sample_data import DATASETS, generate_sample_data

    names = args.datasets or list(DATASETS)
    for path in generate_sample_data(args.out, names, seed=args.seed):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg", description="U-Net segmentation of medical images with MONAI."
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample-data", help="(re)generate the sample datasets, deterministically")
    p.add_argument("--out", type=Path, required=True, help="folder to write the datasets into")
    p.add_argument(
        "--datasets", nargs="+", metavar="NAME", help="subset to generate (default: all)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0, as committed)")
    p.set_defaults(func=_cmd_sample_data)

    from medseg.predict.command import add_predict_parser

    add_predict_parser(sub)

    from medseg.predict.listener import add_listen_parser

    add_listen_parser(sub)

    from medseg.monailabel import add_prepare_parser

    add_prepare_parser(sub)

    from medseg.bundle_tools import add_bundle_parser

    add_bundle_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
