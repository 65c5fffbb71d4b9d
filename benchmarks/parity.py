"""Parity with PonderNet and ACT: accuracy, ponder steps, extrapolation, over seeds.

The task (Graves 2016, as the PonderNet paper uses it, at 16 elements): an input vector of
16 entries in {-1, 0, 1}. A sample draws its number of non-zero entries k uniformly from a
range, puts them at k random positions, and makes each of them 1 or -1 with probability 1/2;
the rest are 0. The target is the parity of the number of 1s (1 when odd); the -1s are
distractors. Training draws fresh samples every step (as the paper does); validation and test
are fixed sets drawn from their own generators.

  interpolation  train, validation and test with k in 1..16
  extrapolation  train and validation with k in 1..8, test with k in 9..16 (the paper's
                 extrapolation split, scaled to 16 elements: test inputs have more non-zero
                 entries than any training input)

The model is ``PonderNet(step)`` with one of two step modules (``--set step=...``):

  gru     ``RecurrentStep(16, hidden, 2, cell="gru")`` (default, as in the PonderNet paper): a GRU
          cell that sees the whole input at every step, a linear output head (two logits) and a
          linear halting head.
  reader  ``ReaderStep(16, hidden)``: a GRU cell that reads one entry per ponder step, left to
          right (an embedding of -1, 0 or 1), so that parity can be learnt as a two-state automaton
          that does not depend on how many entries are non-zero. Its halting head sees the hidden
          state and which entries are still unread and non-zero.

Training minimises the expected cross-entropy over the halting distribution plus ``beta * KL`` to a
truncated geometric(lambda_p) prior (``adaptive_loss``), with Adam. Every ``eval_every`` steps
the validation set is scored in eval mode (deterministic halting at the median); training stops
when validation accuracy reaches ``stop_at``, or after ``max_iters`` steps or ``budget_s``
CPU seconds of the training process (on a shared, loaded machine wall-clock would measure the
other jobs; both are recorded). The test set is then scored once. ACT (``adaptnet.ACT``, ponder cost tau) runs in the
same harness with the same step module, data and budget.

A seed succeeds when its test accuracy reaches the split's target (99% interpolation, 95%
extrapolation). Each training process uses one intra-op thread (``torch.set_num_threads(1)``);
seeds run in ``--workers`` processes (default 2, one per core), seed-major, and the JSON is
rewritten after every finished run.

Run: ``python benchmarks/parity.py`` (``--seeds``, ``--workers``, ``--split``, ``--model``,
``--quick`` for a smoke run, ``--out`` for the JSON path; hyper-parameters as ``--set key=value``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from _teacher_student import RESULTS, machine_info, render, write_json
from adaptnet.nn.halting import ACT, PonderNet, RecurrentStep
from adaptnet.nn.losses import adaptive_loss

DEFAULT_OUT = RESULTS / "parity.json"
ELEMENTS = 16
SPLITS = {"interpolation": {"train": (1, 16), "test": (1, 16), "target": 0.99},
          "extrapolation": {"train": (1, 8), "test": (9, 16), "target": 0.95}}
DEFAULTS: dict[str, Any] = {
    "hidden": 64, "batch": 128, "lr": 3e-3, "max_steps": 20, "lambda_p": 0.2, "beta": 0.01, "tau": 0.01,
    "max_iters": 20000, "budget_s": 600.0, "eval_every": 250, "stop_at": 0.998, "val_rows": 4000,
    "test_rows": 10000, "grad_clip": 1.0, "verbose": 0,
    "step": "gru",  # or "reader"
    "wall_s": 0.0,  # a wall-clock cap as well (0: none), for sessions with a fixed end on a loaded machine
}
QUICK = {"hidden": 32, "max_iters": 300, "budget_s": 60.0, "eval_every": 100, "val_rows": 500, "test_rows": 1000}


def parity_data(rows: int, nonzero: tuple[int, int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` inputs ``(rows, 16)`` with k in ``nonzero`` (inclusive) non-zero entries, and their parity."""
    k = torch.randint(nonzero[0], nonzero[1] + 1, (rows, 1), generator=generator)  # (rows, 1)
    rank = torch.rand(rows, ELEMENTS, generator=generator).argsort(dim=1).argsort(dim=1)  # random positions
    sign = torch.randint(0, 2, (rows, ELEMENTS), generator=generator) * 2 - 1  # (rows, 16) in {-1, 1}
    x = torch.where(rank < k, sign, 0).float()
    return x, ((x == 1).sum(dim=1) % 2).long()


class ReaderStep(nn.Module):
    """A halting step that reads one entry of the input per ponder step, left to right.

    The state is ``(h, unread)``: the GRU's hidden state and the entries not read yet (shifted
    left, zeros coming in). A step embeds the entry it reads (-1, 0 or 1), updates ``h``, predicts
    from ``h``, and gives a halting logit from ``h`` and ``|unread|``: once nothing non-zero is
    left, the answer cannot change, which the halting head can see.
    """

    def __init__(self, elements: int, hidden: int, output: int = 2, embed: int = 8):
        super().__init__()
        self.embed = nn.Embedding(3, embed)
        self.cell = nn.GRUCell(embed, hidden)
        self.output = nn.Linear(hidden, output)
        self.halt = nn.Linear(hidden + elements, 1)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        h, unread = (None, x) if state is None else state
        entry, unread = unread[:, 0], torch.cat([unread[:, 1:], torch.zeros_like(unread[:, :1])], dim=1)
        h = self.cell(self.embed((entry + 1).long()), h)
        return (h, unread), self.output(h), self.halt(torch.cat([h, unread.abs()], dim=1)).squeeze(1)


def build(model: str, config: dict[str, Any]) -> PonderNet | ACT:
    step: nn.Module
    if config["step"] == "reader":
        step = ReaderStep(ELEMENTS, config["hidden"])
    else:
        step = RecurrentStep(ELEMENTS, config["hidden"], 2, cell="gru")
    if model == "pondernet":
        return PonderNet(step, max_steps=config["max_steps"], lambda_p=config["lambda_p"], beta=config["beta"])
    return ACT(step, max_steps=config["max_steps"], tau=config["tau"])


@torch.no_grad()
def evaluate(net: PonderNet | ACT, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean ponder steps in eval mode (per-sample halting)."""
    net.eval()
    out = net(x)
    assert net.last_steps is not None
    net.train()
    return float((out.argmax(dim=1) == y).float().mean()), float(net.last_steps.float().mean())


def train_one(job: tuple[str, str, int, dict[str, Any]]) -> dict[str, Any]:
    """Train one seed of one model on one split; the result row of the JSON. With ``save_dir`` in
    the config, the trained weights go to ``{save_dir}/{model}_{split}_{seed}.safetensors``."""
    row, net = fit(*job)
    if job[3].get("save_dir"):
        path = Path(job[3]["save_dir"]) / f"{job[0]}_{job[1]}_{job[2]}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return row


def fit(model: str, split: str, seed: int, config: dict[str, Any]) -> tuple[dict[str, Any], PonderNet | ACT]:
    """Train one seed of one model on one split: the result row and the trained model."""
    torch.set_num_threads(1)
    ranges = SPLITS[split]
    val = parity_data(config["val_rows"], ranges["train"], torch.Generator().manual_seed(10_000 + seed))
    test = parity_data(config["test_rows"], ranges["test"], torch.Generator().manual_seed(20_000 + seed))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build(model, config)
    opt = torch.optim.Adam(net.parameters(), lr=config["lr"])
    curve: list[tuple[int, float, float, float]] = []  # (step, CPU seconds, val accuracy, val mean steps)
    started, cpu_started = time.perf_counter(), time.process_time()
    it = 0
    stopped_by = "max_iters"
    while it < config["max_iters"]:
        if time.process_time() - cpu_started >= config["budget_s"]:
            stopped_by = "cpu budget"
            break
        if config["wall_s"] and time.perf_counter() - started >= config["wall_s"]:
            stopped_by = "wall cap"
            break
        x, y = parity_data(config["batch"], ranges["train"], gen)
        opt.zero_grad(set_to_none=True)
        loss = adaptive_loss(net, F.cross_entropy, net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config["grad_clip"])
        opt.step()
        it += 1
        if it % config["eval_every"] == 0:
            acc, steps = evaluate(net, *val)
            curve.append((it, round(time.process_time() - cpu_started, 1), acc, round(steps, 3)))
            if config["verbose"]:
                print(f"{model}/{split} seed {seed} step {it} cpu {curve[-1][1]} s val {acc:.4f} steps {steps:.2f}",
                      file=sys.stderr, flush=True)
            if acc >= config["stop_at"]:
                stopped_by = "validation accuracy"
                break
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    test_acc, test_steps = evaluate(net, *test)
    val_acc, _ = evaluate(net, *val)
    net.eval()
    with torch.no_grad():
        net(test[0])
    assert net.last_steps is not None
    histogram = torch.bincount(net.last_steps, minlength=config["max_steps"] + 1)[1:].tolist()
    row = {"model": model, "split": split, "seed": seed, "iters": it, "train_seconds": round(seconds, 1),
           "train_cpu_seconds": round(cpu_seconds, 1),
           "val_accuracy": val_acc, "test_accuracy": test_acc, "mean_ponder_steps": test_steps,
           "steps_histogram": histogram, "success": test_acc >= ranges["target"], "stopped_by": stopped_by,
           "curve": curve}
    return row, net


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [r["test_accuracy"] for r in rows]
    return {"seeds": len(rows), "successes": sum(r["success"] for r in rows),
            "test_accuracy_median": statistics.median(acc), "test_accuracy_min": min(acc),
            "test_accuracy_max": max(acc),
            "mean_ponder_steps_median": statistics.median(r["mean_ponder_steps"] for r in rows),
            "train_seconds_median": statistics.median(r["train_seconds"] for r in rows),
            "train_seconds_max": max(r["train_seconds"] for r in rows),
            "train_cpu_seconds_median": statistics.median(r["train_cpu_seconds"] for r in rows),
            "train_cpu_seconds_max": max(r["train_cpu_seconds"] for r in rows),
            "iters_median": statistics.median(r["iters"] for r in rows)}


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"parity ({ELEMENTS} elements): torch {m['torch']}, 1 thread per process, {results['workers']} "
             f"processes, CPUs {m['cpu_count']} ({m['cpus_usable']} usable), {m['cpu']}; load average "
             f"{results['load_avg_at_start']} -> {results['load_avg_at_end']}", ""]
    rows = [("model", "split", "seeds ok", "test acc. median [min, max]", "mean ponder steps",
             "train CPU s median (max)", "wall s median (max)", "iters median")]
    for key, s in results["summary"].items():
        model, split = key.split("/")
        rows.append((model, split, f"{s['successes']}/{s['seeds']} (target {SPLITS[split]['target']:.0%})",
                     f"{s['test_accuracy_median']:.4f} [{s['test_accuracy_min']:.4f}, {s['test_accuracy_max']:.4f}]",
                     f"{s['mean_ponder_steps_median']:.2f}",
                     f"{s['train_cpu_seconds_median']:.0f} ({s['train_cpu_seconds_max']:.0f})",
                     f"{s['train_seconds_median']:.0f} ({s['train_seconds_max']:.0f})", f"{s['iters_median']:.0f}"))
    lines += render(rows)
    lines += ["", "per seed (model/split: seed accuracy steps seconds)"]
    for r in results["runs"]:
        lines.append(f"  {r['model']}/{r['split']}: seed {r['seed']} acc {r['test_accuracy']:.4f} "
                     f"steps {r['mean_ponder_steps']:.2f} CPU {r['train_cpu_seconds']:.0f} s, wall "
                     f"{r['train_seconds']:.0f} s ({r['iters']} iters, stopped by {r['stopped_by']})")
    return "\n".join(lines)


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULTS:
            raise SystemExit(f"--set takes key=value with key one of {sorted(DEFAULTS)}, got {item!r}")
        out[key] = type(DEFAULTS[key])(value)
    if out.get("step", "gru") not in ("gru", "reader"):
        raise SystemExit(f"--set step takes gru or reader, got {out['step']!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per model and split (default 10)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each (default 2)")
    parser.add_argument("--split", choices=[*SPLITS, "all"], default="all")
    parser.add_argument("--model", choices=["pondernet", "act", "all"], default="all")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a hyper-parameter")
    parser.add_argument("--quick", action="store_true", help="smoke run: hidden 32, 300 steps, 2 seeds")
    parser.add_argument("--save-models", type=Path, default=None, metavar="DIR",
                        help="save every trained model as DIR/{model}_{split}_{seed}.safetensors")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.workers < 1:
        parser.error("--seeds and --workers must be positive integers")
    config = {**DEFAULTS, **(QUICK if args.quick else {}), **parse_set(args.set),
              "save_dir": None if args.save_models is None else str(args.save_models)}
    seeds = min(args.seeds, 2) if args.quick else args.seeds
    models = ["pondernet", "act"] if args.model == "all" else [args.model]
    splits = list(SPLITS) if args.split == "all" else [args.split]
    # seed-major: if the run is cut short, every model and split has its first seeds
    jobs = [(model, split, seed, config) for seed in range(args.first_seed, args.first_seed + seeds)
            for model in models for split in splits]
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(train_one, jobs, chunksize=1):
            runs.append(row)
            print(f"{row['model']}/{row['split']} seed {row['seed']}: test accuracy {row['test_accuracy']:.4f}, "
                  f"{row['mean_ponder_steps']:.2f} steps, {row['train_cpu_seconds']:.0f} CPU s", flush=True)
            # written after every run, so that a run cut short still leaves its finished seeds
            results = _results(args, argv, config, models, splits, runs, len(jobs), load_at_start, started)
            write_json(results, args.out)
    print(table(results))
    print(f"\n{results['seconds']} s; wrote {args.out}")
    return 0


def _results(args: argparse.Namespace, argv: list[str] | None, config: dict[str, Any], models: list[str],
             splits: list[str], runs: list[dict[str, Any]], jobs: int, load_at_start: list[float],
             started: float) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: (r["model"], r["split"], r["seed"]))
    summary = {f"{m}/{s}": summarise(rows) for m in models for s in splits
               if (rows := [r for r in runs if r["model"] == m and r["split"] == s])}
    return {
        "benchmark": "parity",
        "command": " ".join(["python", "benchmarks/parity.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(1), "workers": args.workers, "load_avg_at_start": load_at_start,
        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()], "runs_finished": len(runs), "runs_planned": jobs,
        "config": {**config, "elements": ELEMENTS, "splits": SPLITS, "quick": args.quick,
                   "step_module": (f"RecurrentStep({ELEMENTS}, hidden, 2, cell='gru')" if config["step"] == "gru"
                                   else f"ReaderStep({ELEMENTS}, hidden)"), "optimizer": "Adam",
                   "loss": "adaptive_loss(net, F.cross_entropy, ...)", "budget": "CPU seconds of the process"},
        "summary": summary, "runs": runs, "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
