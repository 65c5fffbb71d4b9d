"""The adaptive recipe (``adaptnet recipe adaptive``) at its default settings, on every built-in data set.

For each data set and seed, one ``run_recipe("adaptive", {"data": ..., "seed": ...})``: an adaptive
network that starts at widths 4-4, grows until epoch 40 (``GrowOnSignal``, or ``GrowOnPlateau`` with
``--set trigger=plateau``), is pruned to its budget (half of
what it grew to) and fine-tuned to epoch 60, against a static sweep of widths 4..128 (two hidden
layers) trained the same way. Reported per data set, mean ± std over the seeds, all on test:

* the adaptive network's metric (accuracy %, or MSE in target variances), parameters and widths;
* the sweep's pick (best validation metric) and the best static width within the adaptive run's
  budget, with their metric and parameters;
* training FLOPs of the adaptive run as a share of the whole sweep's (3 x forward MACs per sample).

Run: ``python benchmarks/recipe_adaptive.py`` (``--seeds 0 1 2``, ``--data NAME ...``, ``--set KEY=VALUE ...``
to override recipe settings, ``--quick`` for the recipe's quick settings, ``--out``, ``--runs DIR`` to keep
the run folders). One process, one thread. Seeds 0, 1 and 2 are the reported ones; settings are chosen
on other seeds (docs/recipes/adaptive.md, "How the defaults were chosen": seeds 10 to 19).
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
from adaptnet.recipes import parse_overrides, run_recipe, show_progress
from adaptnet.recipes.adaptive import BUILTIN_DATA, metric

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "recipe_adaptive.json"


def one(data: str, seed: int, runs: Path, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """One recipe run (its printed progress goes to ``log.txt`` in its folder); the row we keep."""
    out = runs / f"{data}-seed{seed}"
    out.mkdir(parents=True)
    with (out / "log.txt").open("w") as log, show_progress(log):
        r = run_recipe("adaptive", {**overrides, "data": data, "seed": seed}, out=out / "recipe", quick=quick)
    task, a = r["task"], r["adaptive"]
    static = {tuple(x["widths"]): x for x in r["static"]}

    def pick(widths: list[int] | None) -> dict[str, Any] | None:
        x = static.get(tuple(widths)) if widths is not None else None
        return None if x is None else {"widths": x["widths"], "params": x["params"], "test": metric(x["test"], task)}

    return {
        "data": data, "seed": seed, "task": task, "metric": r["metric"], "wall_s": r["wall_s"],
        "adaptive": {"test": metric(a["test"], task), "params": a["params"], "widths": a["widths"],
                     "peak_widths": a["peak_widths"], "peak_params": a["peak_params"], "budget": a["budget"],
                     "edits": a["edits"], "train_flops": a["train_flops"]},
        "best_static": pick(r["best_static"]), "best_static_within_budget": pick(r["best_static_within_budget"]),
        "static": [{"widths": x["widths"], "params": x["params"], "test": metric(x["test"], task),
                    "val": metric(x["val"], task)} for x in r["static"]],
        "flops_share": r["flops_share"], "plot": str(out / "recipe" / r["plot"]),
    }


def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of one data set; wins count seeds where adaptive is at least as good on test."""
    task = rows[0]["task"]
    better = (lambda a, b: a >= b) if task == "classification" else (lambda a, b: a <= b)
    within = [r["best_static_within_budget"] for r in rows if r["best_static_within_budget"] is not None]
    return {
        "task": task, "metric": rows[0]["metric"], "seeds": len(rows),
        "adaptive": _ms([r["adaptive"]["test"] for r in rows]),
        "adaptive_params": _ms([r["adaptive"]["params"] for r in rows]),
        "peak_params": _ms([r["adaptive"]["peak_params"] for r in rows]),
        "best_static": _ms([r["best_static"]["test"] for r in rows]),
        "best_static_params": _ms([r["best_static"]["params"] for r in rows]),
        "best_static_widths": [r["best_static"]["widths"][0] for r in rows],
        "within_budget": _ms([w["test"] for w in within]) if within else None,
        "within_budget_params": _ms([w["params"] for w in within]) if within else None,
        "adaptive_beats_best_static": sum(better(r["adaptive"]["test"], r["best_static"]["test"]) for r in rows),
        "adaptive_beats_within_budget": sum(better(r["adaptive"]["test"], r["best_static_within_budget"]["test"])
                                            for r in rows if r["best_static_within_budget"] is not None),
        "flops_share": _ms([r["flops_share"] for r in rows]),
        "widths": [r["adaptive"]["widths"] for r in rows],
    }


def table(summary: Mapping[str, Any]) -> str:
    lines = [f"{'data':<14}{'metric':<11}{'adaptive':>16}{'params':>8}{'best static':>16}{'params':>8}"
             f"{'static<=budget':>16}{'params':>8}{'wins':>7}{'FLOPs':>8}"]
    for name, s in summary.items():
        digits = 2 if s["task"] == "classification" else 4

        def ms(x: Mapping[str, float] | None, digits: int = digits) -> str:
            return "-" if x is None else f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"

        def params(x: Mapping[str, float] | None) -> str:
            return "-" if x is None else f"{x['mean']:.0f}"

        lines.append(f"{name:<14}{s['metric']:<11}{ms(s['adaptive']):>16}{params(s['adaptive_params']):>8}"
                     f"{ms(s['best_static']):>16}{params(s['best_static_params']):>8}{ms(s['within_budget']):>16}"
                     f"{params(s['within_budget_params']):>8}"
                     f"{s['adaptive_beats_best_static']:>3}/{s['seeds']:<3}{100 * s['flops_share']['mean']:>7.1f}%")
    lines.append("wins: seeds where adaptive is at least as good as the best static width on test; FLOPs: adaptive "
                 "training FLOPs as a share of the whole sweep's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", nargs="+", choices=BUILTIN_DATA, default=list(BUILTIN_DATA), help="default: all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="recipe settings other than the defaults, as on the command line (trigger=plateau)")
    parser.add_argument("--quick", action="store_true", help="the recipe's quick settings (a smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    torch.set_num_threads(1)
    began = time.perf_counter()
    machine = machine_info(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp)
        for seed in args.seeds:  # seed-major: an interrupted run still covers every data set
            for data in args.data:
                rows.append(one(data, seed, runs, args.quick, overrides))
                r = rows[-1]
                print(f"{data:<14} seed {seed}: adaptive {r['adaptive']['test']:.4f} ({r['adaptive']['params']} "
                      f"params), best static {r['best_static']['test']:.4f} ({r['best_static']['params']} params), "
                      f"FLOPs {100 * r['flops_share']:.1f}% of the sweep, {r['wall_s']:.0f} s", flush=True)
                summary = {d: summarise([r for r in rows if r["data"] == d]) for d in args.data
                           if any(r["data"] == d for r in rows)}
                write_json({"machine": machine, "quick": args.quick, "seeds": args.seeds, "settings": overrides,
                                  "seconds": time.perf_counter() - began, "summary": summary, "runs": rows}, args.out)
    print("\n" + table(summary))
    print(f"\n{len(rows)} recipe runs in {time.perf_counter() - began:.0f} s; wrote {args.out}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
