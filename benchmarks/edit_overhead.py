"""Edit overhead: what adaptnet's structure and edits cost next to plain PyTorch and Torch-Pruning.

Three ratios, each measured side by side in one run (interleaved repeats, median of the
per-repeat ratios), on a 784-1024-1024-10 MLP trained with Adam at batch 256:

  (a) train step of ``adaptnet.AdaptiveMLP`` / train step of the same ``nn.Sequential``   target <= 1.03
  (b) ``adaptnet.widen(layer, by=256, init="net2net", optimizer=adam)`` (1024 -> 1280 units,
      Adam state and grads present) / one train step of that model                           target <= 1.0
  (c) ``adaptnet.prune`` of 50% of both hidden layers (optimizer carried) / Torch-Pruning's
      ``MagnitudePruner`` on an identical ``nn.Sequential`` (dependency graph included)      target <= 1.0

(c) also counts the optimizer's stale parameter references after each library's prune and
whether the next ``step()`` updates the model's weights.

Run: ``python benchmarks/edit_overhead.py`` (``--quick`` for a smoke run; ``--out`` for the
JSON path). Torch-Pruning comes with ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import adaptnet as an
from _teacher_student import finish, machine_info
from _timing import timed
from adaptnet.nn import ReLU as AdaptnetReLU

try:
    import torch_pruning as tp
except ImportError:  # the comparison in (c) is skipped; adaptnet's own prune is still timed
    tp = None

IN, HIDDEN, OUT, BATCH, BY = 784, 1024, 10, 256, 256
TARGETS = {"train_step": 1.03, "widen": 1.0, "prune": 1.0}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "edit_overhead.json"
Model = nn.Module
Opt = torch.optim.Optimizer


# -- machine and models ------------------------------------------------------------------
def load_average() -> float | None:
    """The 1-minute load average: other work on the machine makes every timing noisier."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, IN, generator=g), torch.randint(0, OUT, (BATCH,), generator=g)  # (B, 784), (B,)


def train_step(model: Model, opt: Opt, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def make_models(x: torch.Tensor, y: torch.Tensor, warm_steps: int) -> tuple[Model, Opt, Model, Opt]:
    """An AdaptiveMLP with Adam state and grads, and an ``nn.Sequential`` with the same weights, state, grads."""
    torch.manual_seed(0)
    adaptive = an.AdaptiveMLP(IN, [HIDDEN, HIDDEN], OUT)
    a_opt = torch.optim.Adam(adaptive.parameters(), lr=1e-3)
    for _ in range(warm_steps):  # Adam's state is created at the first step
        train_step(adaptive, a_opt, x, y)
    plain = nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT)
    )
    with torch.no_grad():
        for p, q in zip(adaptive.parameters(), plain.parameters(), strict=True):  # same order: w0 b0 w1 b1 w2 b2
            q.copy_(p)
            q.grad = p.grad.clone()
    p_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    p_opt.load_state_dict(a_opt.state_dict())
    return adaptive, a_opt, plain, p_opt


def clone(model: Model, opt: Opt) -> tuple[Model, Opt]:
    """Independent copies; the copied optimizer holds the copied parameters; grads are copied too."""
    m, o = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), m.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    held = {id(p) for g in o.param_groups for p in g["params"]}
    assert all(id(p) in held for p in m.parameters()), "deepcopy did not keep the optimizer on the copy"
    return m, o


def summary(ratios: list[float], target: float) -> dict[str, Any]:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    median = statistics.median(ratios)
    return {"ratio_median": median, "ratio_p25": q[0], "ratio_p75": q[2], "repeats": len(ratios),
            "target": target, "met": median <= target}


# -- (a) train step ----------------------------------------------------------------------
def bench_train_step(adaptive: Model, a_opt: Opt, plain: Model, p_opt: Opt, x: torch.Tensor, y: torch.Tensor,
                     repeats: int, warmup: int) -> dict[str, Any]:
    """One step of each model in turn (order rotated through all permutations); per-round ratios.

    A third model, the ``nn.Sequential`` with adaptnet's ReLU (derivative 1 at 0) in place of
    ``nn.ReLU``, splits the overhead into the activation's share and the rest of the structure.
    """
    models = {"adaptive": clone(adaptive, a_opt), "plain": clone(plain, p_opt)}
    seq, seq_opt = clone(plain, p_opt)
    seq[1], seq[3] = AdaptnetReLU(), AdaptnetReLU()
    models["plain_adaptnet_relu"] = (seq, seq_opt)
    for m, o in models.values():
        for _ in range(warmup):
            train_step(m, o, x, y)
    orders = list(itertools.permutations(models))
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats):
        for name in orders[r % len(orders)]:  # interleaved: drift and bursts hit all three alike
            m, o = models[name]
            times[name].append(timed(lambda m=m, o=o: train_step(m, o, x, y)))

    def ratios(a: str, b: str) -> list[float]:
        return [s / t for s, t in zip(times[a], times[b], strict=True)]

    relu_only = ratios("plain_adaptnet_relu", "plain")
    structure = ratios("adaptive", "plain_adaptnet_relu")
    return {**{f"{name}_ms": 1e3 * statistics.median(ts) for name, ts in times.items()},
            **summary(ratios("adaptive", "plain"), TARGETS["train_step"]),
            "split": {"adaptnet_relu_vs_nn_relu": statistics.median(relu_only),
                      "adaptive_vs_sequential_with_adaptnet_relu": statistics.median(structure)}}


# -- (b) widen ---------------------------------------------------------------------------
def bench_widen(adaptive: Model, a_opt: Opt, x: torch.Tensor, y: torch.Tensor,
                repeats: int, warmup: int) -> dict[str, Any]:
    stepper, s_opt = clone(adaptive, a_opt)  # a separate 1024-wide model for the step time

    def one_step() -> float:
        return timed(lambda: train_step(stepper, s_opt, x, y))

    def one_widen(layer: int) -> float:
        m, o = clone(adaptive, a_opt)  # every widen starts from the same 1024-wide state, copied untimed
        t = timed(lambda: an.widen(m, layer=layer, by=BY, init="net2net", optimizer=o))
        assert m.widths[layer] == HIDDEN + BY and o.state[m.blocks[layer].op.weight]["exp_avg"].shape[0] == HIDDEN + BY
        return t

    for _ in range(warmup):
        one_step()
        one_widen(0)
        one_widen(1)
    steps: list[float] = []
    widens: dict[int, list[float]] = {0: [], 1: []}
    for r in range(repeats):
        step_t = statistics.median(one_step() for _ in range(3))
        steps.append(step_t)
        for layer in ((0, 1) if r % 2 == 0 else (1, 0)):
            widens[layer].append(one_widen(layer))
    out: dict[str, Any] = {"step_ms": 1e3 * statistics.median(steps), "by": BY, "from_width": HIDDEN}
    for layer, ts in widens.items():
        ratios = [w / s for w, s in zip(ts, steps, strict=True)]
        out[f"layer{layer}"] = {"widen_ms": 1e3 * statistics.median(ts), **summary(ratios, TARGETS["widen"])}
    return out


# -- (c) prune ---------------------------------------------------------------------------
def prune_adaptnet(model: Model, opt: Opt) -> None:
    for layer in (0, 1):
        an.prune(model, layer=layer, amount=0.5, importance="magnitude", optimizer=opt)


def prune_tp(model: nn.Sequential, example: torch.Tensor) -> None:
    """Torch-Pruning as documented: build the dependency graph (inside the pruner), then prune."""
    assert tp is not None
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5, ignored_layers=[model[4]],
    )
    pruner.step()


def optimizer_after_edit(model: Model, opt: Opt, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Stale references (held by the optimizer, gone from the model), and what the next step() updates."""
    live = {id(p) for p in model.parameters()}
    held = [p for g in opt.param_groups for p in g["params"]]
    held_ids = {id(p) for p in held}
    stale = sum(id(p) not in live for p in held)
    orphans = sum(id(p) not in held_ids for p in model.parameters())
    mismatched = sum(
        any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape for v in opt.state.get(p, {}).values())
        for p in model.parameters()
    )
    before = [p.detach().clone() for p in model.parameters()]
    error = None
    try:
        train_step(model, opt, x, y)
    except Exception as err:  # reported, not raised: what a user would hit
        error = f"{type(err).__name__}: {err}"
    updated = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True))
    n = len(before)
    return {"optimizer_refs": len(held), "stale_refs": stale, "model_params": n, "params_not_in_optimizer": orphans,
            "state_shape_mismatches": mismatched, "step_updated_params": updated, "step_updates_all": updated == n,
            "step_error": error}


def bench_prune(adaptive: Model, a_opt: Opt, plain: Model, p_opt: Opt, x: torch.Tensor, y: torch.Tensor,
                repeats: int, warmup: int) -> dict[str, Any]:
    example = x[:1]  # Torch-Pruning traces one example, as in its documentation

    def one(which: str) -> tuple[float, Model, Opt]:
        if which == "adaptnet":
            m, o = clone(adaptive, a_opt)
            t = timed(lambda: prune_adaptnet(m, o))
            widths = m.widths
        else:
            m, o = clone(plain, p_opt)
            t = timed(lambda: prune_tp(m, example))
            widths = [m[0].out_features, m[2].out_features]
        assert list(widths) == [HIDDEN // 2, HIDDEN // 2], widths
        return t, m, o

    names = ["adaptnet"] + (["torch_pruning"] if tp is not None else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Torch-Pruning's advisory warnings would land in the timed region
        for _ in range(warmup):
            for name in names:
                one(name)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(one(name)[0])
        checks = {}
        for name in names:
            _, m, o = one(name)
            checks[name] = optimizer_after_edit(m, o, x, y)
    out: dict[str, Any] = {"amount": 0.5, "layers": [0, 1], "adaptnet_ms": 1e3 * statistics.median(times["adaptnet"]),
                           "optimizer": checks}
    if tp is None:
        out.update(torch_pruning_ms=None, ratio_median=None, met=None,
                   skipped="torch-pruning is not installed: pip install -e '.[bench]'")
        return out
    ratios = [a / b for a, b in zip(times["adaptnet"], times["torch_pruning"], strict=True)]
    out.update(torch_pruning_ms=1e3 * statistics.median(times["torch_pruning"]),
               torch_pruning_call="MagnitudePruner(model, x[:1], MagnitudeImportance(p=2), pruning_ratio=0.5, "
                                  "ignored_layers=[output Linear]).step()",
               **summary(ratios, TARGETS["prune"]))
    return out


# -- report ------------------------------------------------------------------------------
def _yes(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "NO")


def table(results: dict[str, Any]) -> str:
    m, a, w, p = results["machine"], results["train_step"], results["widen"], results["prune"]
    rows = [("measure", "adaptnet", "reference", "ratio median [p25, p75]", "target", "met")]

    def ratio(r: dict[str, Any]) -> str:
        return "n/a" if r.get("ratio_median") is None else \
            f"{r['ratio_median']:.3f} [{r['ratio_p25']:.3f}, {r['ratio_p75']:.3f}]"

    rows.append(("(a) train step, Adam, batch 256", f"{a['adaptive_ms']:.2f} ms", f"{a['plain_ms']:.2f} ms Sequential",
                 ratio(a), f"<= {a['target']}", _yes(a["met"])))
    rows.append(("    split: Sequential+adaptnet ReLU", f"{a['plain_adaptnet_relu_ms']:.2f} ms",
                 "vs nn.ReLU Sequential", f"{a['split']['adaptnet_relu_vs_nn_relu']:.3f}", "", ""))
    rows.append(("    split: AdaptiveMLP", f"{a['adaptive_ms']:.2f} ms", "vs Sequential+adaptnet ReLU",
                 f"{a['split']['adaptive_vs_sequential_with_adaptnet_relu']:.3f}", "", ""))
    for layer in (0, 1):
        r = w[f"layer{layer}"]
        rows.append((f"(b) widen layer {layer} 1024->1280 net2net", f"{r['widen_ms']:.2f} ms",
                     f"{w['step_ms']:.2f} ms train step", ratio(r), f"<= {r['target']}", _yes(r["met"])))
    ref = "n/a" if p["torch_pruning_ms"] is None else f"{p['torch_pruning_ms']:.2f} ms Torch-Pruning"
    rows.append(("(c) prune 50% of both hidden layers", f"{p['adaptnet_ms']:.2f} ms", ref, ratio(p),
                 f"<= {TARGETS['prune']}", _yes(p.get("met"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"edit_overhead: torch {m['torch']}, threads {m['threads']}, CPUs {m['cpu_count']} "
             f"({m['cpus_usable']} usable), {m['cpu']}, torch-pruning {m['torch_pruning']}, "
             f"load average {results['load_average']['start']} -> {results['load_average']['end']}"]
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(n) for cell, n in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * n for n in widths))
    lines.append("")
    lines.append("optimizer after prune (Adam built before the edit):")
    for name, c in p["optimizer"].items():
        lines.append(f"  {name:14s} stale refs {c['stale_refs']}/{c['optimizer_refs']}, "
                     f"model params not in optimizer {c['params_not_in_optimizer']}/{c['model_params']}, "
                     f"next step() updates {c['step_updated_params']}/{c['model_params']} model params"
                     + (f", error: {c['step_error']}" if c["step_error"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per measure (default 41)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (3 repeats, no stable numbers)")
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("--threads and --repeats must be positive integers")
    repeats = args.repeats or (3 if args.quick else 41)
    warmup = 1 if args.quick else 3
    torch.set_num_threads(args.threads)

    started, load_start = time.perf_counter(), load_average()
    x, y = make_data()
    adaptive, a_opt, plain, p_opt = make_models(x, y, warm_steps=3)
    results: dict[str, Any] = {
        "benchmark": "edit_overhead",
        "command": " ".join(["python", "benchmarks/edit_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine_info(torch.get_num_threads()),
                    "torch_pruning": getattr(tp, "__version__", None) if tp is not None else None},
        "config": {"sizes": [IN, HIDDEN, HIDDEN, OUT], "batch": BATCH, "loss": "cross_entropy", "optimizer": "Adam",
                   "grads_present_at_edit": True, "repeats": repeats, "warmup": warmup, "quick": args.quick,
                   "timer": "time.perf_counter, gc disabled in timed regions"},
        "train_step": bench_train_step(adaptive, a_opt, plain, p_opt, x, y, 4 * repeats, warmup),
        "widen": bench_widen(adaptive, a_opt, x, y, repeats, warmup),
        "prune": bench_prune(adaptive, a_opt, plain, p_opt, x, y, repeats, warmup),
    }
    results["load_average"] = {"start": load_start, "end": load_average()}
    return finish(results, started, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
