"""Side by side with GroMo: the same student grown by GroMo's tutorial procedure and by adaptnet's ``widen``.

The GradMax student–teacher setting (see ``_teacher_student.py``): a bias-free 10 -> 5 -> 10
student learns a fixed 10 -> 10 -> 10 teacher by full-batch SGD (lr 0.1) on the MSE and gains
one hidden unit after steps 200, 400, 600, 800 and 1000, 1500 steps in all. Within a seed every
arm starts from the same weights and the arms are trained in lockstep, one step each in turn, so
every growth of every arm is timed side by side at the same moment of the same run. Arms:

  gromo    GroMo 0.1.0 ``GrowingMLP`` (same weights, adaptnet's ReLU) grown as in GroMo's GrowingContainer
           tutorial: a statistics pass with ``MSELoss(reduction="sum")``,
           ``compute_optimal_updates(maximum_added_neurons=1)`` (a new neuron and a natural-gradient step on
           the head), a line search of the scaling factor over [0, 0.1, 0.5, 1] on the full batch with
           ``extended_forward``, ``apply_change()``, a new SGD optimizer.
  gradmax  ``an.widen(model, 0, by=1, init="gradmax", optimizer=opt, batch=(x, y), loss_fn=mse)``
  gradmax_xC  the same, then the new unit's outgoing column times C (``--gradmax-scales``, default 0.5:
           the best of a grid on the selection seeds 100-109; incoming weights 0, so still exact)
  zero     ``an.widen(model, 0, by=1, init="zero", optimizer=opt)``            (reference)
  net2net  ``an.widen(model, 0, by=1, init="net2net", noise=0.1, optimizer=opt)`` (reference)

Reported per arm: the final full-batch training loss (mean ± std; minus GroMo's, paired by seed:
mean ± standard error, seeds below GroMo); the wall time of one growth (GroMo's whole tutorial
``grow``; adaptnet's ``widen`` call, gradmax's probe pass included), timed 1 + ``--repeats`` times
at every growth (the extra times on deep copies, arms interleaved): the median of all samples, the
median over growths of each growth's fastest sample, the per-growth ratios to gradmax; the max-abs
change of the full-batch output at the moment of growth and the loss just before and after. At
every growth the optimizer that existed before it is checked: its references to tensors no longer
in the model, the model parameters it does not hold, and how many model parameters one ``step()``
of it changes (measured, then undone so that training is unaffected).

Run: ``python benchmarks/gromo_side_by_side.py`` (``--quick`` for a smoke run, ``--seeds`` for the
number of seeds, default 20, ``--first-seed`` default 0, ``--repeats`` for the timed copies per growth,
default 10, ``--gradmax-scales``, ``--out`` for the JSON path). GroMo comes with ``pip install -e ".[bench]"``.
The scale was selected with ``--first-seed 100 --seeds 10 --repeats 0 --gradmax-scales 0.1,0.25,0.5,0.75,2``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import adaptnet as an
from _teacher_student import (
    GROW_AT,
    QUICK_GROW_AT,
    QUICK_STEPS,
    RESULTS,
    SMALL,
    STEPS,
    TEACHER_SEED,
    finish,
    machine_info,
    mean_std,
    render,
    student,
    teacher_data,
)
from _timing import timed
from adaptnet.nn import ReLU as AdaptnetReLU

try:
    from gromo.containers.growing_mlp import GrowingMLP
except ImportError:  # the script needs GroMo: pip install -e ".[bench]"
    GrowingMLP = None

LR = 0.1
NOISE = 0.1  # net2net symmetry breaking, as in gradmax_teacher_student.py
LINE_SEARCH = (0.0, 0.1, 0.5, 1.0)  # the tutorial's scaling factors
SCALES = (0.5,)  # gradmax_xC arms: chosen on seeds 100-109 (see the module docstring)
WIDEN: dict[str, tuple[str, dict[str, Any]]] = {
    "gradmax": ("gradmax", {"loss_fn": F.mse_loss}),  # batch=(x, y) is added at the call
    "zero": ("zero", {}),
    "net2net": ("net2net", {"noise": NOISE}),
}

REFERENCE = {"final_loss_mean": 0.116, "final_loss_std": 0.065, "growth_ms": 5.0,  # GroMo, measured elsewhere
             "output_change_median": 0.67, "old_optimizer": "silently updates nothing after a growth"}
DEFAULT_OUT = RESULTS / "gromo_side_by_side.json"
Opt = torch.optim.Optimizer


def arm_names(scales: tuple[float, ...]) -> tuple[str, ...]:
    return ("gromo", "gradmax", *(f"gradmax_x{c:g}" for c in scales), "zero", "net2net")


# -- models ------------------------------------------------------------------------------
def gromo_student(seed: int) -> nn.Module:
    """GroMo's ``GrowingMLP`` 10 -> 5 -> 10 without bias, holding the adaptnet student's weights."""
    reference = student(SMALL, seed)
    linears = [m for m in reference.modules() if isinstance(m, nn.Linear)]
    model = GrowingMLP(linears[0].in_features, linears[-1].out_features, hidden_size=SMALL, number_hidden_layers=1,
                       activation=AdaptnetReLU(), use_bias=False)
    with torch.no_grad():
        for layer, linear in zip(model.layers, linears, strict=True):
            layer.weight.copy_(linear.weight)
    return model


class Arm:
    """One model, its optimizer and its growth procedure."""

    def __init__(self, name: str, seed: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.name, self.x, self.y = name, x, y
        self.scale = float(name.removeprefix("gradmax_x")) if name.startswith("gradmax_x") else 1.0
        self.model: nn.Module = gromo_student(seed) if name == "gromo" else student(SMALL, seed)
        self.opt: Opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.phases: dict[str, float] = {}  # GroMo: seconds per phase of the last growth
        self.gamma: float | None = None  # GroMo: the scaling factor the line search chose

    def train_step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss.item()

    def grow(self) -> None:
        if self.name == "gromo":
            self._grow_gromo()
        else:
            init, kwargs = WIDEN[self.name.split("_x")[0]]
            batch = (self.x, self.y) if init == "gradmax" else None
            an.widen(self.model, layer=0, by=1, init=init, optimizer=self.opt, batch=batch, generator=self.gen,
                     **kwargs)
            if self.scale != 1.0:  # the new unit is appended last: its outgoing column is the head's last
                head = [m for m in self.model.modules() if isinstance(m, nn.Linear)][-1]
                with torch.no_grad():
                    head.weight[:, -1] *= self.scale

    def _grow_gromo(self) -> None:
        """GroMo's GrowingContainer tutorial ``grow``, one unit, on the full batch; then a new optimizer."""
        model, x, y = self.model, self.x, self.y
        t0 = time.perf_counter()
        model.eval()
        criterion = nn.MSELoss(reduction="sum")  # the tutorial's: GroMo averages its statistics itself
        model.set_growing_layers(index=0)  # the one growable layer: the head, whose input is the hidden layer
        model.init_computation()
        model.zero_grad()
        criterion(model(x), y).backward()
        model.update_computation()
        t1 = time.perf_counter()
        model.compute_optimal_updates(maximum_added_neurons=1)
        model.reset_computation()
        model.dummy_select_update()
        t2 = time.perf_counter()
        best_loss, best_value = float("inf"), 0.0
        with torch.no_grad():
            for value in LINE_SEARCH:
                model.set_scaling_factor(value)
                loss = F.mse_loss(model.extended_forward(x), y).item()  # the tutorial's evaluate(extended=True)
                if loss < best_loss:
                    best_loss, best_value = loss, value
        t3 = time.perf_counter()
        model.set_scaling_factor(best_value)
        model.apply_change()
        model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=LR)  # the tutorial builds a new optimizer
        t4 = time.perf_counter()
        self.gamma = best_value
        self.phases = {"statistics": t1 - t0, "compute_optimal_updates": t2 - t1, "line_search": t3 - t2,
                       "apply_change_and_new_optimizer": t4 - t3}

    def clone(self) -> Arm:
        """An independent copy (model, optimizer, gradients, generator) for a timing repeat."""
        other = copy.copy(self)
        other.model, other.opt = copy.deepcopy((self.model, self.opt))
        for p, q in zip(self.model.parameters(), other.model.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        other.gen = torch.Generator().set_state(self.gen.get_state())
        other.phases = {}
        return other

    @property
    def width(self) -> int:
        if self.name == "gromo":
            return int(self.model.layers[0].out_features)
        return int(self.model.widths[0])


def old_optimizer_check(model: nn.Module, opt: Opt, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """What an optimizer built before the growth holds, and what one ``step()`` of it changes (as
    ``edit_overhead.py`` counts it); the step is undone, so training continues exactly as without it."""
    params = list(model.parameters())
    live = {id(p) for p in params}
    held = [p for g in opt.param_groups for p in g["params"]]
    held_ids = {id(p) for p in held}
    before = [p.detach().clone() for p in params]
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    F.mse_loss(model(x), y).backward()
    opt.step()
    updated = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))
    with torch.no_grad():
        for b, p in zip(before, params, strict=True):
            p.copy_(b)
    for p in params:
        p.grad = None
    opt.zero_grad(set_to_none=True)
    return {"optimizer_refs": len(held), "stale_refs": sum(id(p) not in live for p in held),
            "model_params": len(params), "params_not_in_optimizer": sum(id(p) not in held_ids for p in params),
            "step_updated_params": updated}


# -- the run -----------------------------------------------------------------------------
def run_seed(names: tuple[str, ...], seed: int, x: torch.Tensor, y: torch.Tensor, steps: int,
             grow_at: tuple[int, ...], repeats: int) -> dict[str, Any]:
    arms = {name: Arm(name, seed, x, y) for name in names}
    curves: dict[str, list[float]] = {name: [] for name in names}
    growths: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for step in range(steps):
        for name, arm in arms.items():
            curves[name].append(arm.train_step())
        if step not in grow_at:
            continue
        k = grow_at.index(step) + seed * len(grow_at)
        order = names[k % len(names):] + names[:k % len(names)]  # rotate who grows first
        samples: dict[str, list[float]] = {name: [] for name in names}
        phases: list[dict[str, float]] = []
        for _ in range(repeats):  # timing repeats on copies, interleaved across the arms
            for name in order:
                twin = arms[name].clone()
                samples[name].append(timed(twin.grow))
                if name == "gromo":
                    phases.append(twin.phases)
        for name in order:  # the growth the run continues with, timed as one more sample
            arm = arms[name]
            with torch.no_grad():
                out_before = arm.model(x)
            old_opt = arm.opt
            seconds = timed(arm.grow)
            samples[name].append(seconds)
            with torch.no_grad():
                out_after = arm.model(x)
            record = {"after_step": step, "width": arm.width, "seconds": seconds, "seconds_samples": samples[name],
                      "seconds_best": min(samples[name]),
                      "max_output_change": (out_after - out_before).abs().max().item(),
                      "loss_before": F.mse_loss(out_before, y).item(), "loss_after": F.mse_loss(out_after, y).item(),
                      "old_optimizer": old_optimizer_check(arm.model, old_opt, x, y)}
            if name == "gromo":
                phases.append(arm.phases)
                record |= {"scaling_factor": arm.gamma, "phases": phases}
            growths[name].append(record)
    out: dict[str, Any] = {}
    for name, arm in arms.items():
        with torch.no_grad():
            final = F.mse_loss(arm.model(x), y).item()
        out[name] = {"final_loss": final, "width": arm.width, "growths": growths[name],
                     "loss_every_10_steps": curves[name][::10]}
    first = grow_at[0] + 1 if grow_at else steps
    out["pre_growth_max_loss_gap"] = max(abs(a - b) for name in names[1:]
                                         for a, b in zip(curves["gromo"][:first], curves[name][:first], strict=True))
    return out


def warm_up(names: tuple[str, ...], x: torch.Tensor, y: torch.Tensor) -> None:
    """One growth of each arm on a throwaway student, so first-call costs stay out of the timings."""
    for name in names:
        arm = Arm(name, 999, x, y)
        arm.train_step()
        arm.grow()
        arm.train_step()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine inflates every timing."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def summarise(names: tuple[str, ...], runs: list[dict[str, Any]]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for name in names:
        finals = [r[name]["final_loss"] for r in runs]
        growths = [g for r in runs for g in r[name]["growths"]]
        mean, std = mean_std(finals)
        arm: dict[str, Any] = {"final_loss_mean": mean, "final_loss_std": std, "final_losses": finals,
                               "final_loss_min_max": [min(finals), max(finals)],
                               "widths": [r[name]["width"] for r in runs], "growths": len(growths)}
        if name != "gromo":  # paired by seed: this arm's final loss minus GroMo's
            diffs = [f - r["gromo"]["final_loss"] for f, r in zip(finals, runs, strict=True)]
            d_mean, d_std = mean_std(diffs)
            arm |= {"diff_to_gromo_mean": d_mean, "diff_to_gromo_se": d_std / len(diffs) ** 0.5,
                    "seeds_below_gromo": sum(d < 0 for d in diffs), "seeds": len(diffs)}
        if growths:
            pooled = [t for g in growths for t in g["seconds_samples"]]
            best = [g["seconds_best"] for g in growths]
            changes = [g["max_output_change"] for g in growths]
            checks = [g["old_optimizer"] for g in growths]
            arm |= {
                "growth_ms_median": 1e3 * statistics.median(pooled),
                "growth_ms_p25_p75": [1e3 * q for q in quartiles(pooled)[::2]],
                "growth_ms_samples": len(pooled),
                "growth_ms_best_of_growth_median": 1e3 * statistics.median(best),
                "max_output_change_median": statistics.median(changes),
                "max_output_change_max": max(changes),
                "loss_change_at_growth_median": statistics.median(g["loss_after"] - g["loss_before"] for g in growths),
                "old_optimizer_refs": checks[0]["optimizer_refs"],
                "old_optimizer_stale_refs_max": max(c["stale_refs"] for c in checks),
                "old_optimizer_params_not_held_max": max(c["params_not_in_optimizer"] for c in checks),
                "old_optimizer_step_updates_min": min(c["step_updated_params"] for c in checks),
                "old_optimizer_step_updates_max": max(c["step_updated_params"] for c in checks),
                "model_params": checks[0]["model_params"],
            }
            if name == "gromo":
                arm["scaling_factors"] = {str(v): sum(g["scaling_factor"] == v for g in growths) for v in LINE_SEARCH}
                arm["phase_ms_median"] = {p: 1e3 * statistics.median(ph[p] for g in growths for ph in g["phases"])
                                          for p in growths[0]["phases"][0]}
            if name != "gradmax":  # time ratios to gradmax, paired by seed and growth
                pairs = [(g, h) for r in runs for g, h in zip(r[name]["growths"], r["gradmax"]["growths"], strict=True)]
                arm["time_ratio_to_gradmax_median"] = statistics.median(
                    statistics.median(g["seconds_samples"]) / statistics.median(h["seconds_samples"]) for g, h in pairs)
                arm["time_ratio_to_gradmax_best_p25_median_p75"] = list(
                    quartiles([g["seconds_best"] / h["seconds_best"] for g, h in pairs]))
        arms[name] = arm
    return arms


def table(results: dict[str, Any]) -> str:
    m, c, arms = results["machine"], results["config"], results["arms"]
    rows = [("arm", "final loss mean ± std", "minus GroMo's, paired mean ± s.e. (seeds lower)",
             "growth ms, median [p25, p75]", "best of each growth, median", "time / gradmax's (median; best)",
             "max |Δout| at growth, median", "Δloss at growth, median", "old optimizer after a growth")]
    for name, a in arms.items():
        loss = f"{a['final_loss_mean']:.4f} ± {a['final_loss_std']:.4f}"
        diff = "—" if name == "gromo" else (f"{a['diff_to_gromo_mean']:+.4f} ± {a['diff_to_gromo_se']:.4f} "
                                            f"({a['seeds_below_gromo']}/{a['seeds']})")
        if "growth_ms_median" not in a:
            rows.append((name, loss, diff, *["—"] * 6))
            continue
        ratio = "1" if name == "gradmax" else (f"{a['time_ratio_to_gradmax_median']:.2f}; "
                                               f"{a['time_ratio_to_gradmax_best_p25_median_p75'][1]:.2f}")
        rows.append((
            name, loss, diff,
            f"{a['growth_ms_median']:.2f} [{a['growth_ms_p25_p75'][0]:.2f}, {a['growth_ms_p25_p75'][1]:.2f}]",
            f"{a['growth_ms_best_of_growth_median']:.2f}", ratio,
            f"{a['max_output_change_median']:.2g}", f"{a['loss_change_at_growth_median']:+.4f}",
            f"{a['old_optimizer_stale_refs_max']}/{a['old_optimizer_refs']} refs stale, step updates "
            f"{a['old_optimizer_step_updates_min']}/{a['model_params']} params",
        ))
    seeds = c["seeds"]
    lines = [f"gromo_side_by_side: torch {m['torch']}, gromo {m['gromo']}, threads {m['threads']}, "
             f"CPUs {m['cpu_count']} ({m['cpus_usable']} usable), {m['cpu']}, "
             f"load average {results['load_average']['start']} -> {results['load_average']['end']}",
             f"SGD lr {c['lr']}, {c['steps']} steps, +1 unit after steps {list(c['grow_at'])}, "
             f"{len(seeds)} seeds ({seeds[0]}-{seeds[-1]}), teacher seed {c['teacher_seed']}, "
             f"{c['timing_samples_per_growth']} timing samples per growth", ""]
    lines += render(rows)
    gm = arms["gromo"]
    if "scaling_factors" in gm:
        lines += ["", "gromo: scaling factor chosen by the line search (count): "
                  + ", ".join(f"{v}: {n}" for v, n in gm["scaling_factors"].items()),
                  "gromo: growth phases, median ms: "
                  + ", ".join(f"{p} {v:.2f}" for p, v in gm["phase_ms_median"].items())]
    t = results["target"]
    if t:
        loss = "; ".join(f"{n} {arms[n]['diff_to_gromo_mean']:+.4f} ± {arms[n]['diff_to_gromo_se']:.4f} "
                         f"({'met' if ok else 'NOT met'})" for n, ok in t["loss_no_worse"].items())
        g = arms["gradmax"]
        lines += ["", f"reference (GroMo, measured elsewhere): {REFERENCE}",
                  f"target: loss no worse than gromo's (paired mean difference <= 0): {loss}",
                  f"target: growth faster (median {g['growth_ms_median']:.2f} vs {gm['growth_ms_median']:.2f} ms): "
                  f"{'met' if t['growth_faster'] else 'NOT met'}; "
                  f"optimizer never stale: {'met' if t['optimizer_never_stale'] else 'NOT met'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--seeds", type=int, default=None, help="number of student seeds (default 20; 2 with --quick)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first student seed (default 0)")
    parser.add_argument("--gradmax-scales", type=lambda v: tuple(float(c) for c in v.split(",") if c),
                        default=SCALES, help="gradmax_xC arms, comma-separated C (default 0.5; '' for none)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="extra timed growths on copies at every growth (default 10; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_STEPS} steps, growth after {list(QUICK_GROW_AT)}, 2 seeds")
    args = parser.parse_args(argv)
    if GrowingMLP is None:
        print("gromo is not installed: pip install -e \".[bench]\" (or pip install gromo)", file=sys.stderr)
        return 2
    seeds = range(args.first_seed, args.first_seed + (args.seeds or (2 if args.quick else 20)))
    names = arm_names(args.gradmax_scales)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 10)
    if len(seeds) < 1 or repeats < 0 or args.threads < 1 or any(c <= 0 for c in args.gradmax_scales):
        parser.error("--seeds and --threads must be positive integers, --repeats >= 0, --gradmax-scales > 0")
    steps, grow_at = (QUICK_STEPS, QUICK_GROW_AT) if args.quick else (STEPS, GROW_AT)
    torch.set_num_threads(args.threads)

    started, load_start = time.perf_counter(), load_average()
    x, y = teacher_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GroMo's advisory warnings (e.g. a null scaling factor) stay quiet
        warm_up(names, x, y)
        gc.freeze()  # imports and warm-up objects leave the collector's view: timed()'s collect stays cheap
        runs = [run_seed(names, seed, x, y, steps, grow_at, repeats) for seed in seeds]
    arms = summarise(names, runs)
    g, gm = arms["gradmax"], arms["gromo"]
    machine = machine_info(torch.get_num_threads()) | {"gromo": metadata.version("gromo")}
    adaptnet_arms = [n for n in names if n != "gromo"]
    target = {} if not grow_at else {
        "loss_no_worse": {n: arms[n]["diff_to_gromo_mean"] <= 0 for n in adaptnet_arms if n.startswith("gradmax")},
        "growth_faster": g["growth_ms_median"] < gm["growth_ms_median"],
        "optimizer_never_stale": all(arms[n]["old_optimizer_stale_refs_max"] == 0
                                     and arms[n]["old_optimizer_params_not_held_max"] == 0
                                     and arms[n]["old_optimizer_step_updates_min"] == arms[n]["model_params"]
                                     for n in adaptnet_arms),
    }
    results: dict[str, Any] = {
        "benchmark": "gromo_side_by_side",
        "command": " ".join(["python", "benchmarks/gromo_side_by_side.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "config": {"teacher": "10-10-10, no bias, U(-1, 1), ReLU", "teacher_seed": TEACHER_SEED,
                   "student": "bias-free 10-5-10, Glorot uniform, relu = adaptnet's ReLU (d/dx at 0 = 1); "
                              "gromo: GrowingMLP(10, 10, hidden_size=5, number_hidden_layers=1, "
                              "activation=adaptnet ReLU, use_bias=False) with the same weights",
                   "data": "1000 x ~ N(0, 1), full batch", "loss": "mse", "optimizer": "SGD", "lr": LR,
                   "steps": steps, "grow_at": list(grow_at), "by": 1, "seeds": list(seeds),
                   "gradmax_scales": list(args.gradmax_scales),
                   "gromo_procedure": "GrowingContainer tutorial grow(): MSELoss(sum) statistics pass, "
                                      "compute_optimal_updates(maximum_added_neurons=1), dummy_select_update, "
                                      f"line search over {list(LINE_SEARCH)} with extended_forward (MSE mean), "
                                      "apply_change, new SGD",
                   "timing": "each growth: `repeats` timed growths on copies (arms interleaved, order rotated "
                             "per growth) plus the real one; gc off while timed",
                   "timing_samples_per_growth": repeats + 1, "noise_net2net": NOISE, "quick": args.quick},
        "reference_gromo_elsewhere": REFERENCE,
        "target": target,
        "pre_growth_max_loss_gap": max(r["pre_growth_max_loss_gap"] for r in runs),
        "arms": arms,
        "runs": runs,
    }
    results["load_average"] = {"start": load_start, "end": load_average()}
    return finish(results, started, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
