"""Config-mutation fuzzer for ``adaptnet train``: every outcome is a run or a one-line refusal.

Each case takes one of the shipped configs (``examples/configs/*.yaml``), makes it tiny (1 epoch,
a small synthetic data set), applies 1 to 3 random mutations (a key dropped, a value of the
wrong type, a number out of range, an unknown key, a value taken from another key) and runs
the CLI's ``train`` entry point on it, in this process (``adaptnet.cli.main.main``) or, with
``--subprocess``, as ``python -m adaptnet`` with a time limit. The outcome must be exit status
0, or exit status 2 with exactly one line on stderr (``adaptnet: error: ...``) and no traceback.
A failing case prints the seed, its case number and the mutated config; rerun it alone with
``--seed S --case N``, or save the YAML and run ``adaptnet train`` on it.

    python tests/fuzz/fuzz_configs.py --seconds 180 --seed 1     # make fuzz-configs
    python tests/fuzz/fuzz_configs.py --cases 20 --seed 0        # a fixed number of cases

Case ``N`` of seed ``S`` is generated from ``random.Random(f"{S}/{N}")`` alone, so it is the same
whatever ran before it. Exit status: 0 when every case passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
SMALL_SAMPLES = 200  # rows of the synthetic / regression data in a tiny run

# Values a mutation puts in place of another: each of the wrong type for most keys, or out of range.
WRONG_TYPES: list[Any] = [None, True, False, "", "x", "relu", [], [1, 2], ["a"], {}, {"a": 1}, {"name": "adam"},
                          3, -1, 0.5, "1e-3", "3"]
NUMBERS: list[Any] = [-1, 0, 1, -0.5, 1e-12, 0.999999, 1.0, 2.0, 10**12, 2**63, -(2**63), 10**30, 1e308,
                      math.inf, -math.inf, math.nan]
UNKNOWN_KEYS: list[Any] = ["bogus", "epoch", "hiden", "lr_", "name_", "Type", "policy", "", 1, None, True]
# The one error line allowed after warnings: the Trainer stopping a run whose loss kept diverging (each
# rollback before it warns). Any other refusal must come alone, before training starts.
TRAINING_STOPPED = re.compile(r"^adaptnet: error: the loss became \S+ at epoch \d+, step \d+ after \d+ rollbacks")


@dataclass
class Case:
    """One mutated config: where it came from, what was done to it, and the result."""

    seed: int
    number: int
    source: str
    mutations: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    rc: int | None = None
    stderr: str = ""
    problem: str | None = None


# -- mutations --------------------------------------------------------------------------------
def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path in a tree of dicts and lists (each dict key and each list index)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _parent(tree: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        tree = tree[part]
    return tree


def _show(path: tuple[Any, ...]) -> str:
    return ".".join(map(str, path)) or "config"


def mutate(config: dict[str, Any], rng: random.Random) -> str:
    """Apply one random mutation to ``config`` in place; return what it did, in words."""
    paths = list(_paths(config))
    kind = rng.choice(["drop", "wrong_type", "number", "unknown_key", "swap"])
    if kind == "unknown_key" or not paths:
        containers = [p for p in paths if isinstance(_parent(config, (*p, None)), dict)]
        where = rng.choice([(), *containers])
        node = _parent(config, (*where, None))
        key = rng.choice(UNKNOWN_KEYS)
        node[key] = rng.choice(WRONG_TYPES + NUMBERS)
        return f"add unknown key {_show((*where, key))} = {node[key]!r}"
    path = rng.choice(paths)
    parent = _parent(config, path)
    if kind == "drop":
        del parent[path[-1]]
        return f"drop {_show(path)}"
    if kind == "number":
        value = rng.choice(NUMBERS)
    elif kind == "swap":  # a value from another key (right type somewhere, wrong meaning here)
        value = copy.deepcopy(_value_at(config, rng.choice(paths)))
    else:
        value = copy.deepcopy(rng.choice(WRONG_TYPES))
    parent[path[-1]] = value
    return f"set {_show(path)} = {value!r}"


def _value_at(tree: Any, path: tuple[Any, ...]) -> Any:
    return _parent(tree, path)[path[-1]]


def make_tiny(config: dict[str, Any]) -> None:
    """One epoch on little data, before and after the mutations (only where the values are valid:
    an invalid value stays, since refusing it is what is tested)."""
    train = config.get("train")
    if isinstance(train, dict):
        epochs = train.get("epochs")
        if "epochs" not in train or (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 1):
            train["epochs"] = 1
        if train.get("compile") is True:
            train["compile"] = False  # compiling takes tens of seconds; the flag's type is still fuzzed
    data = config.get("data")
    if isinstance(data, dict) and data.get("name") in ("synthetic", "regression"):
        samples = data.get("samples")
        if "samples" not in data or (isinstance(samples, int) and not isinstance(samples, bool)
                                     and SMALL_SAMPLES < samples < 10**9):
            data["samples"] = SMALL_SAMPLES


def make_case(seed: int, number: int, sources: list[Path]) -> Case:
    """Case ``number`` of ``seed``: the same config and mutations whatever ran before."""
    rng = random.Random(f"{seed}/{number}")
    source = rng.choice(sources)
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    config.setdefault("train", {})
    make_tiny(config)
    case = Case(seed, number, source.name, config=config)
    for _ in range(rng.choice([1, 1, 2, 3])):
        case.mutations.append(mutate(config, rng))
    make_tiny(config)
    return case


# -- running ----------------------------------------------------------------------------------
def _check(case: Case) -> None:
    """Exit 0; or exit 2 with one ``adaptnet: error:`` line, after warnings only if training had started."""
    lines = case.stderr.splitlines()
    if "Traceback" in case.stderr:
        case.problem = f"a traceback, exit status {case.rc}"
    elif case.rc == 0:
        return
    elif case.rc != 2:
        case.problem = f"exit status {case.rc}"
    elif not lines or not lines[-1].startswith("adaptnet: error: "):
        case.problem = "no 'adaptnet: error: ...' line at the end of stderr"
    elif len(lines) > 1 and not (TRAINING_STOPPED.match(lines[-1])
                                 and all(line.startswith("adaptnet: warning: ") for line in lines[:-1])):
        case.problem = f"{len(lines)} lines on stderr, not one 'adaptnet: error: ...' line"


def stopped(case: Case) -> bool:
    """A run that started and was stopped by the Trainer (the loss diverged): warnings, then one error."""
    return case.problem is None and case.rc == 2 and len(case.stderr.splitlines()) > 1


def run_in_process(case: Case, folder: Path) -> None:
    """``adaptnet.cli.main.main(["train", ...])`` with stdout discarded and stderr captured."""
    from adaptnet.cli.main import main

    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(case.config, sort_keys=False), encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            case.rc = main(["train", str(config), "--out", str(folder / "run"), "--quiet"])
        except SystemExit as exit_:
            case.rc = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # what the command would have died with
            traceback.print_exc(file=err)
            case.rc = 1
    case.stderr = err.getvalue()


def run_subprocess(case: Case, folder: Path, timeout: float) -> None:
    """``python -m adaptnet train ...`` with a time limit (a run past it is a failure too)."""
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(case.config, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    try:
        proc = subprocess.run([sys.executable, "-m", "adaptnet", "train", str(config), "--out",
                               str(folder / "run"), "--quiet"], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=folder)
    except subprocess.TimeoutExpired as err:
        case.rc, case.stderr = 124, (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else ""
        case.problem = f"still running after {timeout:g} s"
        return
    case.rc, case.stderr = proc.returncode, proc.stderr


def run_case(case: Case, *, subprocess_timeout: float | None = None) -> Case:
    """Run one case in a fresh temporary folder and judge its outcome."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-config-"))
    try:
        if subprocess_timeout is not None:
            run_subprocess(case, folder, subprocess_timeout)
        else:
            run_in_process(case, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if case.problem is None:
        _check(case)
    return case


def report(case: Case) -> str:
    """What a failing case prints: how to rerun it, what was done, the config, what came out."""
    text = yaml.safe_dump(case.config, sort_keys=False)
    tail = "\n".join(case.stderr.rstrip().splitlines()[-15:])
    return (f"FAILED: seed {case.seed} case {case.number} ({case.problem}); rerun: python tests/fuzz/fuzz_configs.py "
            f"--seed {case.seed} --case {case.number}\n  from {case.source}: {'; '.join(case.mutations)}\n"
            f"--- config ---\n{text}--- stderr (exit status {case.rc}) ---\n{tail}\n")


def fuzz(seed: int, *, cases: int | None = None, seconds: float | None = None, only: int | None = None,
         subprocess_timeout: float | None = None, out: Any = sys.stdout) -> list[Case]:
    """Run cases ``0, 1, ...`` of ``seed`` (``cases`` of them, or until ``seconds`` have passed; a
    case that has started always finishes), or case ``only``; return them all."""
    sources = sorted(CONFIGS.glob("*.yaml"))
    numbers: Iterator[int] = iter([only]) if only is not None else iter(range(cases if cases is not None else 2**62))
    start, done = time.monotonic(), []
    for number in numbers:
        if seconds is not None and only is None and time.monotonic() - start >= seconds:
            break
        case = run_case(make_case(seed, number, sources), subprocess_timeout=subprocess_timeout)
        done.append(case)
        if case.problem is not None:
            print(report(case), file=out, flush=True)
    return done


def summary(done: list[Case], seconds: float) -> str:
    ran = sum(c.rc == 0 and c.problem is None for c in done)
    halted = sum(stopped(c) for c in done)
    refused = sum(c.rc == 2 and c.problem is None for c in done) - halted
    failed = sum(c.problem is not None for c in done)
    return (f"{len(done)} mutated configs in {seconds:.0f} s: {ran} ran (exit 0), {refused} refused in one line "
            f"(exit 2), {halted} stopped in training (rollback warnings, then one error line, exit 2), "
            f"{failed} failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0, help="the seed the cases derive from (default 0)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, help="time budget: start cases until it is spent (default 180)")
    budget.add_argument("--cases", type=int, help="run this many cases instead")
    budget.add_argument("--case", type=int, help="run only case N of the seed (to reproduce a failure)")
    parser.add_argument("--subprocess", action="store_true",
                        help="run each case as `python -m adaptnet` (isolated, slower) instead of in-process")
    parser.add_argument("--timeout", type=float, default=120, help="per case, with --subprocess (default 120 s)")
    args = parser.parse_args(argv)
    if args.seconds is None and args.cases is None and args.case is None:
        args.seconds = 180.0
    sys.path.insert(0, str(ROOT / "src"))
    if not args.subprocess:
        import torch

        torch.set_num_threads(1)  # tiny models: one thread is faster, and kinder to a shared machine
    start = time.monotonic()
    done = fuzz(args.seed, cases=args.cases, seconds=args.seconds, only=args.case,
                subprocess_timeout=args.timeout if args.subprocess else None)
    if args.case is not None and done:
        case = done[0]
        print(f"seed {case.seed} case {case.number} from {case.source}: {'; '.join(case.mutations)}\n"
              f"{yaml.safe_dump(case.config, sort_keys=False)}exit status {case.rc}\n{case.stderr}", end="")
    print(summary(done, time.monotonic() - start) + f" (seed {args.seed}"
          + (", subprocesses" if args.subprocess else ", in-process") + ")")
    return 1 if any(c.problem is not None for c in done) else 0


if __name__ == "__main__":
    sys.exit(main())
