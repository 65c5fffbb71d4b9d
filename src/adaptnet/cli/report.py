"""``adaptnet report RUN_DIR [RUN_DIR ...]``: summaries and one PNG comparing the runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptnet.cli._common import CLIError
from adaptnet.train.report import summarize, write_report
from adaptnet.train.rundir import METRICS

HELP = "summarise run directories and plot them (overlaid) into a PNG"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report", help=HELP, description=HELP + ": losses with edits marked, the validation metric, "
        "widths per layer and parameters against epochs.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by `adaptnet train`")
    parser.add_argument("--out", metavar="PNG",
                        help="the PNG (default: RUN_DIR/report.png for one run, report.png for several)")
    return parser


def run(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise CLIError(f"run directory not found: {d}")
        if not (d / METRICS).is_file():
            raise CLIError(f"{d} has no {METRICS}: not a run directory, or no epoch has finished yet")
    out = Path(args.out) if args.out else (dirs[0] / "report.png" if len(dirs) == 1 else Path("report.png"))
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out {out}: must end in .png")
    for i, d in enumerate(dirs):
        print(("\n" if i else "") + summarize(d))
    print(f"\nreport: {write_report(dirs, out)}")
    return 0
