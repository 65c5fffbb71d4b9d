"""``adaptnet train CONFIG.yaml [key=value ...]``: start a run in a new run directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from adaptnet.cli._common import CLIError, EpochPrinter, describe, fit_and_summarize, on_main_then_share
from adaptnet.train.build import build_run
from adaptnet.train.config import load_config
from adaptnet.train.distributed import is_main_process
from adaptnet.train.rundir import CHECKPOINTS, CONFIG, METRICS

HELP = "train a model from a YAML config into a new run directory"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help=HELP, description=HELP + ".",
        epilog="example: adaptnet train examples/configs/wine.yaml train.epochs=50 'model.hidden=[32,16]'. "
               "SIGINT/SIGTERM stop cleanly with a checkpoint; `adaptnet resume RUN_DIR` continues.",
    )
    parser.add_argument("config", metavar="CONFIG.yaml", help="the run's config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, values parsed as YAML: train.epochs=50 policies.0.by=4")
    parser.add_argument("--out", metavar="DIR", help="run directory (default: runs/<config name>-<timestamp>)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines or progress bars")
    return parser


def default_out(config: str | Path) -> Path:
    """``runs/<config stem>-<YYYYmmdd-HHMMSS>`` (with a numeric suffix if taken)."""
    base = Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def check_fresh(out: Path) -> None:
    """Refuse a folder that already holds a run: nothing saved is ever overwritten."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: is a file, not a folder")
    if any((out / name).exists() for name in (CONFIG, METRICS, CHECKPOINTS)):
        raise CLIError(f"{out} already holds a run; continue it with `adaptnet resume {out}` or choose another --out")


def _out_and_check(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else default_out(args.config)
    check_fresh(out)
    return out


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # Under torchrun rank 0 names and checks the run directory and tells the other ranks.
    out = Path(on_main_then_share(cfg.device, lambda: str(_out_and_check(args))))
    main = is_main_process()
    callbacks = [] if args.quiet or not main else [EpochPrinter(cfg.train.epochs)]
    built = build_run(cfg, out, progress=not args.quiet and main, callbacks=callbacks)
    if not args.quiet and main:
        print(f"training {describe(built)} -> {out}", flush=True)
    return fit_and_summarize(built, out, resume=False)
