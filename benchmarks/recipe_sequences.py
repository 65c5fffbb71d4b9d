"""The sequences recipe at full length: both tasks, several seeds, accuracy and ponder steps by length.

Runs ``adaptnet recipe sequences task=T seed=S`` (default settings: per-token PonderNet, GRU 64,
up to 4 ponder steps, trained on lengths 1..12, tested up to 96) for each task and seed, one
after the other on one torch thread, and reports for every test length the mean and the range
over seeds of the accuracy and of the mean ponder steps per token. Also writes one plot per
task (every seed's curve) for the docs.

Run: ``python benchmarks/recipe_sequences.py`` (``--seeds 0 1 2``, ``--tasks parity addition``,
``--quick`` for a smoke run, ``--out`` for the JSON path, ``--img`` for the plots' folder).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _teacher_student import RESULTS, machine_info, render, write_json
from adaptnet.recipes import run_recipe, show_progress
from adaptnet.recipes.sequences import SequenceSettings

DEFAULT_OUT = RESULTS / "recipe_sequences.json"
DEFAULT_IMG = Path(__file__).resolve().parent.parent / "docs" / "recipes" / "img"


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per length: mean, min and max over seeds of accuracy, token accuracy and ponder steps per token."""
    rows = []
    for i, first in enumerate(runs[0]["table"]):
        row = {k: first[k] for k in ("length", "tokens", "seen_in_training")}
        for key in ("accuracy", "token_accuracy", "ponder_per_token"):
            values = [run["table"][i][key] for run in runs]
            row[key] = {"mean": round(statistics.fmean(values), 4), "min": min(values), "max": max(values)}
        rows.append(row)
    return rows


def plot(task: str, runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = runs[0]["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.9), dpi=80)
    for ax, key, label in ((axes[0], "accuracy", "accuracy (whole sequence right)"),
                           (axes[1], "ponder_per_token", "mean ponder steps per token")):
        ax.axvspan(settings["train_min_len"] - 0.5, settings["train_max_len"] + 0.5, color="0.9",
                   label="training lengths")
        for run in runs:
            table = run["table"]
            ax.plot([r["length"] for r in table], [r[key] for r in table], "o-", ms=3,
                    label=f"seed {run['settings']['seed']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits" if task == "parity" else "digits per number")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.03) if key == "accuracy" else ax.set_ylim(0, settings["max_ponder"] + 0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{task}: per-token PonderNet, trained on lengths "
                 f"{settings['train_min_len']}..{settings['train_max_len']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["parity", "addition"], choices=["parity", "addition"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="the recipe's quick settings (a smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--img", type=Path, default=DEFAULT_IMG, help="folder for sequences_TASK.png")
    args = parser.parse_args()
    torch.set_num_threads(1)

    began = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "recipe_sequences", "machine": machine_info(1), "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp, show_progress():
        for task in args.tasks:
            runs = []
            for seed in args.seeds:
                print(f"\n#### task={task} seed={seed}", flush=True)
                run = run_recipe("sequences", {"task": task, "seed": seed}, out=Path(tmp) / f"{task}-{seed}",
                                 quick=args.quick)
                runs.append({k: run[k] for k in ("settings", "params", "train_s", "wall_s", "table",
                                                 "accuracy_seen_lengths", "accuracy_longer_lengths")}
                            | {"final_train_loss": run["curve"][-1]["loss"]})
            results["tasks"][task] = {"runs": runs, "by_length": summarize(runs)}
            if not args.quick:
                plot(task, runs, args.img / f"sequences_{task}.png")
    results["wall_s"] = round(time.perf_counter() - began, 1)
    results["defaults"] = {k: list(v) if isinstance(v, tuple) else v
                           for k, v in vars(SequenceSettings()).items()}
    if not args.quick:
        write_json(results, args.out)

    for task, entry in results["tasks"].items():
        print(f"\n== {task}: over seeds {args.seeds} (mean [min, max]) ==")
        rows = [("length", "seen", "accuracy", "token accuracy", "ponder/token")]
        for r in entry["by_length"]:
            rows.append((str(r["length"]), "yes" if r["seen_in_training"] else "no",
                         *(f"{r[k]['mean']:.3f} [{r[k]['min']:.3f}, {r[k]['max']:.3f}]"
                           for k in ("accuracy", "token_accuracy", "ponder_per_token"))))
        print("\n".join(render(rows)))
        print("train seconds per run: " + ", ".join(f"{run['train_s']:.0f}" for run in entry["runs"]))
    print(f"\n(total {results['wall_s']:.0f} s{'' if args.quick else f'; JSON in {args.out}'})")


if __name__ == "__main__":
    main()
