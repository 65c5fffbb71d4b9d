"""The ``adaptnet`` entry point: subcommands, logging, and one-line errors with exit status 2.

Bad input (config, data, checkpoint files, arguments) is reported as a single line
``adaptnet: error: ...`` on stderr with exit status 2 and no traceback; a run stopped by
SIGINT/SIGTERM exits with 130 after saving a checkpoint. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from adaptnet import __version__
from adaptnet.cli import export, inspect_run, report, resume, train
from adaptnet.cli._common import CLIError
from adaptnet.train.distributed import exit_process
from adaptnet.train.trainer import TrainingError

# Subcommand modules owned by others, registered when present (same add_parser/run protocol).
OPTIONAL = ("demo", "recipe")
# What counts as bad input: ConfigError, DataError, CheckpointError and EditError are ValueErrors.
USER_ERRORS = (CLIError, ValueError, TrainingError, OSError)


def _commands() -> list[ModuleType]:
    modules: list[ModuleType] = [train, resume, report, inspect_run, export]
    for name in OPTIONAL:
        if importlib.util.find_spec(f"adaptnet.cli.{name}") is not None:
            modules.append(importlib.import_module(f"adaptnet.cli.{name}"))
    return modules


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The parser and, for each subcommand name, the module that runs it."""
    parser = argparse.ArgumentParser(
        prog="adaptnet", description="Adaptive neural networks: train networks that grow and prune as they learn.",
        epilog="run `adaptnet COMMAND --help` for the options of a command",
    )
    parser.add_argument("--version", action="version", version=f"adaptnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO) to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    owners: dict[str, ModuleType] = {}
    for module in _commands():
        before = set(subparsers.choices)
        module.add_parser(subparsers)
        owners.update({name: module for name in set(subparsers.choices) - before})
    return parser, owners


class _Formatter(logging.Formatter):
    """``adaptnet: warning: ...`` (level names in lower case, like the error lines)."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()})
        return super().format(record)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``adaptnet`` command; return its exit status."""
    parser, owners = build_parser()
    # KEY=VALUE settings may follow options (`adaptnet recipe rl --quick seed=1`); argparse leaves
    # those to parse_known_args, and a command that takes them says so with `extra_words`.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "extra_words") or any(word.startswith("-") for word in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.extra_words = extra
    # The library's loggers report to stderr for the length of the command (and no longer,
    # so that main() can also be called in-process, as the tests do).
    logger = logging.getLogger("adaptnet")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("adaptnet: %(levelname)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    logger.propagate = False
    try:
        return int(owners[args.command].run(args) or 0)
    except USER_ERRORS as err:
        print(f"adaptnet: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adaptnet: interrupted", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def entry() -> NoReturn:
    """The ``adaptnet`` command and ``python -m adaptnet``: ``main()``'s status as the exit status
    (a torchrun rank leaves without the C++ teardown: ``adaptnet.train.distributed.exit_process``)."""
    exit_process(main())


if __name__ == "__main__":
    entry()
