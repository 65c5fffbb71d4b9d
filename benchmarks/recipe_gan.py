"""The GAN recipe (``adaptnet recipe gan``) at its default settings, both tasks, several seeds.

For each task and seed, one ``run_recipe("gan", {"task": ..., "seed": ...})``: the growing GAN
(ring: widened on plateaus from 16 to at most 64 units per hidden layer; digits: progressive
4x4 -> 8x8 with a fade-in) and then the static GAN of the grown run's final size, trained with the
same steps, data order, noise and optimizer settings. Reported per task, mean ± std over seeds:

* ring: modes covered (of 8) and the share of high-quality samples (within 3 sigma of a mode),
  at the last step and averaged over the last quarter of the evaluations (GAN metrics oscillate);
* digits: the share of samples a logistic regression classifies with confidence > 0.9, and the
  class balance (entropy of the predicted classes / log 10), final and last-quarter mean;
* parameters of G + D, and the training CPU time of the growing run relative to the static one
  (process time, one thread: time slices lost to other processes on a shared machine do not count).

Run: ``python benchmarks/recipe_gan.py`` (``--seeds N``, ``--tasks ring digits``, ``--quick`` for
the recipe's quick settings, ``--out``, ``--runs DIR`` to keep the run folders). One thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from _teacher_student import machine_info, write_json
from adaptnet.recipes import run_recipe, show_progress

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "recipe_gan.json"
METRICS = {"ring": ("modes", "quality"), "digits": ("confident", "balance")}


def one(task: str, seed: int, runs: Path, quick: bool) -> dict[str, Any]:
    """One recipe run (its printed progress goes to ``log.txt`` in its folder); the row we keep."""
    out = runs / f"{task}-seed{seed}"
    out.mkdir(parents=True)
    with (out / "log.txt").open("w") as log, show_progress(log):
        r = run_recipe("gan", {"task": task, "seed": seed}, out=out / "recipe", quick=quick)
    row: dict[str, Any] = {"task": task, "seed": seed, "wall_s": r["wall_s"], "folder": str(out / "recipe")}
    for name, run in r["runs"].items():
        row[name] = {k: run[k] for k in ("final", "last_quarter", "params_g", "params_d", "train_s", "cpu_s")}
        if task == "ring":
            row[name]["widths"] = run["widths"]
            row[name]["growth_steps"] = [e["step"] for e in run["edits"]]
            row[name]["max_output_change"] = max([max(e["change_g"], e["change_d"]) for e in run["edits"]],
                                                 default=None)
    if task == "digits":
        row["classifier"] = r["classifier"]
    return row


def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds; ``wins``: seeds where the growing GAN is at least as good (last-quarter mean)."""
    task = rows[0]["task"]
    out: dict[str, Any] = {"seeds": len(rows)}
    for name in ("adaptive", "static"):
        out[name] = {f"{when}_{m}": _ms([r[name][when][m] for r in rows])
                     for when in ("final", "last_quarter") for m in METRICS[task]}
        out[name]["params"] = _ms([r[name]["params_g"] + r[name]["params_d"] for r in rows])
    out["cpu_time_ratio"] = _ms([r["adaptive"]["cpu_s"] / r["static"]["cpu_s"] for r in rows])
    out["wins"] = {m: sum(r["adaptive"]["last_quarter"][m] >= r["static"]["last_quarter"][m] for r in rows)
                   for m in METRICS[task]}
    if task == "ring":
        out["final_widths"] = [r["adaptive"]["widths"] for r in rows]
        out["growth_steps"] = [r["adaptive"]["growth_steps"] for r in rows]
    else:
        out["classifier"] = _ms([r["classifier"]["accuracy"] for r in rows])
        out["real_confident"] = _ms([r["classifier"]["confident"] for r in rows])
    return out


def table(summary: Mapping[str, Any]) -> str:
    lines = []
    for task, s in summary.items():
        a, b = METRICS[task]
        lines.append(f"{task} ({s['seeds']} seeds)  {'params':>7}{'final ' + a:>18}{'final ' + b:>18}"
                     f"{'last-1/4 ' + a:>20}{'last-1/4 ' + b:>20}")
        for name in ("adaptive", "static"):
            r = s[name]
            cells = "".join(f"{r[k]['mean']:>11.3f} ± {r[k]['std']:.3f}" if k.startswith("final")
                            else f"{r[k]['mean']:>13.3f} ± {r[k]['std']:.3f}"
                            for k in (f"final_{a}", f"final_{b}", f"last_quarter_{a}", f"last_quarter_{b}"))
            lines.append(f"  {name:<17}{r['params']['mean']:>7.0f}{cells}")
        lines.append(f"  growing run's training CPU time / static's: {s['cpu_time_ratio']['mean']:.2f}; "
                     f"growing at least as good (last quarter): {a} {s['wins'][a]}/{s['seeds']}, "
                     f"{b} {s['wins'][b]}/{s['seeds']}\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", nargs="+", choices=tuple(METRICS), default=list(METRICS), help="default: both")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per task (default 3)")
    parser.add_argument("--quick", action="store_true", help="the recipe's quick settings (a smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    torch.set_num_threads(1)
    began = time.perf_counter()
    machine = machine_info(1)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp)
        for seed in range(args.seeds):  # seed-major: an interrupted run still covers every task
            for task in args.tasks:
                rows.append(one(task, seed, runs, args.quick))
                r, (a, b) = rows[-1], METRICS[task]
                print(f"{task:<7} seed {seed}: growing {a} {r['adaptive']['last_quarter'][a]:.3f} "
                      f"{b} {r['adaptive']['last_quarter'][b]:.3f}; static {a} {r['static']['last_quarter'][a]:.3f} "
                      f"{b} {r['static']['last_quarter'][b]:.3f} (last-quarter means), {r['wall_s']:.0f} s", flush=True)
                summary = {t: summarise([x for x in rows if x["task"] == t]) for t in args.tasks
                           if any(x["task"] == t for x in rows)}
                write_json({"machine": machine, "quick": args.quick, "seeds": args.seeds,
                                  "seconds": time.perf_counter() - began, "summary": summary, "runs": rows}, args.out)
    print("\n" + table(summary))
    print(f"{len(rows)} recipe runs in {time.perf_counter() - began:.0f} s; wrote {args.out}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
