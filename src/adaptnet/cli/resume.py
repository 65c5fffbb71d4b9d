"""``adaptnet resume RUN_DIR``: continue a stopped run from its latest checkpoint.

A checkpoint that fails to load (a file damaged, missing, or not matching its SHA-256 in
``manifest.json``) is skipped with a warning naming it and why; the run goes on from the newest
one that loads. With none, nothing is touched and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaptnet.cli._common import CLIError, EpochPrinter, describe, fit_and_summarize, newest_loadable
from adaptnet.train.build import build_run, fresh_model
from adaptnet.train.config import load_config
from adaptnet.train.distributed import is_main_process
from adaptnet.train.rundir import CONFIG

HELP = "continue a run from its latest checkpoint to its configured epochs"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "resume", help=HELP, description=HELP + " (or --epochs). Everything is rebuilt from RUN_DIR/config.yaml; "
        "on CPU the result equals an uninterrupted run bit for bit.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `adaptnet train`")
    parser.add_argument("--epochs", type=int, metavar="N", help="train to N epochs in all (updates config.yaml)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines or progress bars")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the model.target that RUN_DIR/config.yaml names (it runs that code)")
    return parser


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CLIError(f"run directory not found: {run_dir}")
    if not (run_dir / CONFIG).is_file():
        raise CLIError(f"{run_dir} is not a run directory: it has no {CONFIG}")
    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs: must be an integer >= 1, got {args.epochs}")
    cfg = load_config(run_dir / CONFIG, [f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    # Fails on damaged checkpoints before anything is touched.
    none = f"{run_dir} has no checkpoint to resume from; start it again with `adaptnet train`"
    fresh = fresh_model(cfg, str(run_dir / CONFIG), args.trust_code)  # refuses a model.target not trusted
    latest, model, state, skipped = newest_loadable(run_dir, none, fresh)
    done = int(state.get("epoch", 0))
    if done > cfg.train.epochs:
        raise CLIError(f"{run_dir} has already trained {done} epochs; pass --epochs N with N > {done} to go on")
    main = is_main_process()  # under torchrun only rank 0 prints
    for path, reason in skipped if main else []:
        print(f"adaptnet: warning: skipping checkpoint {path.name}, it does not load ({reason}); "
              f"resuming from {latest.name}", file=sys.stderr, flush=True)
    callbacks = [] if args.quiet or not main else [EpochPrinter(cfg.train.epochs)]
    built = build_run(cfg, run_dir, progress=not args.quiet and main, callbacks=callbacks)
    if not args.quiet and main:
        print(f"resuming {run_dir} from {latest.name} (epoch {done}): {describe(built, model)}", flush=True)
    built.trainer.resume(latest)  # the checkpoint chosen above, not necessarily the highest step
    return fit_and_summarize(built, run_dir, resume=False)
