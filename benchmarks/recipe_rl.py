"""The ``rl`` recipe at full size: adaptive (8-8, grows on plateau) vs static (CleanRL's 64-64) PPO.

(15 runs; about 55 minutes of two busy cores, or 15 on two quiet ones.)

Every run is ``run_recipe("rl", ...)``, the same harness as ``adaptnet recipe rl``; the two arms differ
only in ``arch``. Reported per run: env steps until the 100-episode mean return first reaches the
threshold (475 on CartPole-v1), final mean return, final hidden widths and parameters (actor +
critic), env steps/s, growth events, and the greedy return of the reloaded checkpoint.

Runs (in this order, two at a time, one torch thread each):

* CartPole-v1, seeds 0-2, adaptive (``net2net``) and static, up to 500k steps, stopping when the threshold is
  reached (``stop_at_threshold``: the learning-rate schedule still spans 500k steps, so the run up
  to that point is the one a full run would make; it saves the CPU time after it);
* Acrobot-v1, seed 0, adaptive (``net2net``) and static, ``--acrobot-steps`` steps (final mean return);
* the growth initialiser: CartPole adaptive with ``grow_init=zero`` (seed 0) and ``gradmax`` (seeds
  0-2; the ``net2net`` runs are the adaptive runs above);
* CartPole-v1, seeds 0-2, adaptive capped at 32-32 and growing after 20 stale updates (not 10).

Target (issue 6): adaptive reaches 475 in no more steps than static (median over seeds), with a
smaller final network. Reference: CleanRL ppo.py at its defaults reached 475 at a median of 256k
steps (206k-271k).

Run: ``python benchmarks/recipe_rl.py`` (``--quick`` for a smoke run, ``--workers N``, ``--only TEXT``
and ``--merge FILE`` to run some runs apart and add them,
``--plot-only`` to redraw the figure from the JSON). Writes ``benchmarks/results/recipe_rl.json``
after every finished run, and ``docs/recipes/img/rl_cartpole.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "recipe_rl.json"
FIGURE = ROOT / "docs" / "recipes" / "img" / "rl_cartpole.png"
RUNS = ROOT / "runs" / "bench-recipe-rl"


def jobs(acrobot_steps: int, quick: bool) -> list[tuple[str, dict[str, Any]]]:
    cart = {"env": "CartPole-v1", "total_steps": 500_000, "stop_at_threshold": True, "log_every": 50}
    out: list[tuple[str, dict[str, Any]]] = []
    # The adaptive runs name their initialiser: these were measured before gradmax became the default.
    for seed in (0, 1, 2):
        out += [(f"cartpole-adaptive-s{seed}", {**cart, "seed": seed, "arch": "adaptive", "grow_init": "net2net"}),
                (f"cartpole-static-s{seed}", {**cart, "seed": seed, "arch": "static"})]
    acro = {"env": "Acrobot-v1", "total_steps": acrobot_steps, "seed": 0, "log_every": 50}
    out += [("acrobot-adaptive-s0", {**acro, "arch": "adaptive", "grow_init": "net2net"}),
            ("acrobot-static-s0", {**acro, "arch": "static"})]
    out += [(f"cartpole-adaptive-{init}-s{seed}", {**cart, "seed": seed, "arch": "adaptive", "grow_init": init})
            for init, seeds in (("zero", (0,)), ("gradmax", (0, 1, 2))) for seed in seeds]
    # A capped, more patient variant: growth stops at 32-32 (a quarter of the static parameters).
    out += [(f"cartpole-adaptive-cap32-s{seed}", {**cart, "seed": seed, "arch": "adaptive", "max_width": 32,
                                                  "grow_patience": 20, "grow_init": "net2net"}) for seed in (0, 1, 2)]
    if quick:  # a smoke run of the harness: 4 updates each
        out = [(name, {**s, "total_steps": 2048, "eval_episodes": 2}) for name, s in out[:2]]
    return out


def one(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Run one recipe run in this worker process, its progress going to ``RUNS/NAME.log``."""
    torch.set_num_threads(1)
    from adaptnet.recipes import run_recipe, show_progress

    name, settings = job
    folder = RUNS / name
    shutil.rmtree(folder, ignore_errors=True)
    with open(RUNS / f"{name}.log", "w") as log, show_progress(log):
        result = run_recipe("rl", settings, out=folder)
    history = result.pop("history")
    result["history"] = history[::4] + ([history[-1]] if len(history) % 4 != 1 else [])  # every 4th update
    return {"name": name, **result}


def arm(r: dict[str, Any]) -> str:
    """``env arch init [max_width/patience]``: the runs that differ only in their seed."""
    s = r["settings"]
    if r["arch"] == "static":
        return f"{r['env']} static {'-'.join(map(str, s['static_hidden']))}"
    return f"{r['env']} adaptive {s['grow_init']} max{s['max_width']} p{s['grow_patience']}"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median steps to the threshold and final size per arm."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        arms.setdefault(arm(r), []).append(r)
    table = {}
    for key, rs in sorted(arms.items()):
        # A run that never reached the threshold counts as total_steps + 1 (above every run that did).
        steps = [r["steps_to_threshold"] or r["settings"]["total_steps"] + 1 for r in rs]
        table[key] = {
            "seeds": [r["settings"]["seed"] for r in rs],
            "steps_to_threshold": [r["steps_to_threshold"] for r in rs],
            "median_steps_to_threshold": statistics.median(steps),
            "final_mean_return": [r["final_mean_return"] for r in rs],
            "params": [r["params"] for r in rs],
            "actor_widths": [r["actor_widths"] for r in rs],
            "growths": [len(r["growths"]) for r in rs],
            "max_output_change": max((max(g["actor"]["max_output_change"], g["critic"]["max_output_change"])
                                      for r in rs for g in r["growths"]), default=None),
            "eval_mean_return": [r.get("evaluation", {}).get("mean_return") for r in rs],
            "env_steps_per_s": [r["env_steps_per_s"] for r in rs],
        }
    return table


def print_table(table: dict[str, Any]) -> None:
    print(f"\n{'arm':<42}{'seeds':<9}{'steps to threshold':<28}{'median':>8}  {'final mean':<22}{'params':<20}"
          f"{'widths':<26}{'steps/s':<18}")
    for key, t in table.items():
        reach = ", ".join("-" if s is None else f"{s // 1000}k" for s in t["steps_to_threshold"])
        final = ", ".join(f"{v:.1f}" for v in t["final_mean_return"])
        widths = ", ".join("-".join(map(str, w)) for w in t["actor_widths"])
        sps = ", ".join(f"{v:.0f}" for v in t["env_steps_per_s"])
        seeds = ",".join(map(str, t["seeds"]))
        print(f"{key:<42}{seeds:<9}{reach:<28}{t['median_steps_to_threshold'] // 1000:>7}k  {final:<22}"
              f"{', '.join(map(str, t['params'])):<20}{widths:<26}{sps:<18}")


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"adaptive": "tab:blue", "static": "tab:orange"}
    for ax, env in zip(axes, ("CartPole-v1", "Acrobot-v1"), strict=True):
        # CartPole: static against the recipe's default (gradmax, up to 64); Acrobot: its two runs.
        chosen = [r for r in runs if r["env"] == env and (r["arch"] == "static" or env == "Acrobot-v1" or
                                                           arm(r).endswith("gradmax max64 p10"))]
        for r in chosen:
            steps, means = zip(*r["history"], strict=True)
            init = f" {r['settings']['grow_init']}" if r["arch"] == "adaptive" else ""
            label = f"{r['arch']}{init} ({'-'.join(map(str, r['actor_widths']))} at the end)"
            ax.plot(steps, means, color=colors[r["arch"]], linewidth=1, alpha=0.8,
                    label=label if r["settings"]["seed"] == 0 else None)
            for g in r["growths"]:
                ax.plot(g["step"], g["mean_return"], marker="|", markersize=8, color="tab:red")
        ax.axhline(475.0 if env == "CartPole-v1" else -100.0, color="tab:green", linestyle=":", linewidth=1)
        ax.set(title=f"{env}: 100-episode mean return (red ticks: growth)", xlabel="environment steps")
        ax.title.set_fontsize(9)
        if chosen:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two tiny runs, to check the harness")
    parser.add_argument("--workers", type=int, default=2, help="runs at the same time (default 2)")
    parser.add_argument("--acrobot-steps", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from --out's JSON")
    parser.add_argument("--only", default="", help="run only the runs whose name contains one of these "
                        "(comma-separated)")
    parser.add_argument("--merge", type=Path, help="add the runs of this JSON (an --only run's --out) to --out's")
    args = parser.parse_args()
    if args.merge:
        payload = json.loads(args.out.read_text())
        names = [name for name, _ in jobs(args.acrobot_steps, False)]
        added = json.loads(args.merge.read_text())["runs"]
        runs = [r for r in payload["runs"] if r["name"] not in {a["name"] for a in added}] + added
        runs.sort(key=lambda r: names.index(r["name"]))
        payload["meta"]["finished_runs"], payload["meta"]["planned_runs"] = len(runs), len(names)
        payload.update(summary=summarise(runs), runs=runs)
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
        args.plot_only = True
    if args.plot_only:
        runs = json.loads(args.out.read_text())["runs"]
        print_table(summarise(runs))
        plot(runs, FIGURE)
        return
    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",")
    todo = [(name, s) for name, s in jobs(args.acrobot_steps, args.quick) if any(w in name for w in wanted)]
    meta = {"command": "python benchmarks/recipe_rl.py", "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "workers": args.workers,
            "threads_per_run": 1,
            "note": "2 CPU cores shared with other jobs: env steps/s are noisy and comparable only within a row"}
    runs: list[dict[str, Any]] = []
    began = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for result in pool.imap_unordered(one, todo):
            runs.append(result)
            runs.sort(key=lambda r: [name for name, _ in todo].index(r["name"]))
            print(f"[{time.perf_counter() - began:6.0f} s] {result['name']}: "
                  f"reached {result['steps_to_threshold']}, final {result['final_mean_return']}, "
                  f"widths {result['actor_widths']}",
                  flush=True)
            payload = {"meta": {**meta, "finished_runs": len(runs), "planned_runs": len(todo),
                                "wall_s": round(time.perf_counter() - began)},
                       "summary": summarise(runs), "runs": runs}
            tmp = args.out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(payload, indent=1) + "\n")
            tmp.replace(args.out)
    print_table(summarise(runs))
    if not args.quick:
        plot(runs, FIGURE)


if __name__ == "__main__":
    main()
