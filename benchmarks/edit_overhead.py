"""Edit overhead: what adaptnet's edits cost next to a training step, a plain copy, and Torch-Pruning.

A 784-1024-1024-10 MLP trained with Adam at batch 256 (Adam's state and the last step's grads present
at every edit), twice: ``adaptnet.AdaptiveMLP`` and the same ``nn.Sequential`` as a user's traced model
(``an.unit_groups(seq, (x[:2],))``, edited by group name). Every figure is at the default thread count
and at 1 thread; each ratio is measured side by side in one run (interleaved repeats, order rotated,
median of the per-repeat ratios). Targets (issue 16, item 2):

  train step   AdaptiveMLP / the same nn.Sequential (and the traced Sequential / itself untraced)  <= 1.01
  widen        widen(first hidden layer, by=256, Adam carried) / one train step, every init        <= 0.2
               gradmax and firefly need batch= and loss_fn=: their probe (the gradient matrix and its
               SVD; the splitting scores) is timed apart, and the edit is timed with the probe's result
               given (the same plan). Any edit given batch= also runs the model on it before and after
               (Edit.max_output_change): "zero, batch given" shows that cost alone.
  prune        prune(first hidden layer, amount=0.5, magnitude) / one train step                  <= 0.2
               both hidden layers / Torch-Pruning's MagnitudePruner doing the same prune           <= 0.3
               (Torch-Pruning leaves the optimizer stale; adaptnet carries it: both are counted)
  copy floor   every tensor the widen (or the prune) touches, copied once into its new shape / a step:
               parameters, grads and Adam moments; no implementation of the edit can be cheaper.

Run: ``python benchmarks/edit_overhead.py`` (``--threads 1`` for one setting, ``--quick`` for a smoke
run, ``--out`` for the JSON path). Torch-Pruning comes with ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import adaptnet as an
import adaptnet.edit.init as an_init
import adaptnet.edit.ops as an_ops
from _teacher_student import finish, machine_info, render
from _timing import timed
from adaptnet.groups import find_group
from adaptnet.nn import ReLU as AdaptnetReLU

try:
    import torch_pruning as tp
except ImportError:  # the comparison with Torch-Pruning is skipped; adaptnet's own prune is still timed
    tp = None

IN, HIDDEN, OUT, BATCH, BY = 784, 1024, 10, 256, 256
INITS = ("net2net", "zero", "random", "gradmax", "firefly")
TARGETS = {"train_step": 1.01, "widen": 0.2, "prune": 0.2, "prune_vs_tp": 0.3}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "edit_overhead.json"
Model = nn.Module
Opt = torch.optim.Optimizer
Pair = tuple[Model, Opt]


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine makes every timing noisier."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# -- models ------------------------------------------------------------------------------
def train_step(model: Model, opt: Opt, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def sequential() -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, OUT))


def make_models(x: torch.Tensor, y: torch.Tensor) -> dict[str, Pair]:
    """``adaptive`` (AdaptiveMLP), ``plain`` (nn.Sequential) and ``traced`` (the same Sequential,
    traced), all with the same weights, Adam state and grads; the first two traced once here, as a
    first edit would (each timed edit then starts from a copy that holds the trace)."""
    torch.manual_seed(0)
    adaptive = an.AdaptiveMLP(IN, [HIDDEN, HIDDEN], OUT)
    a_opt = torch.optim.Adam(adaptive.parameters(), lr=1e-3)
    for _ in range(3):  # Adam's state is created at the first step
        train_step(adaptive, a_opt, x, y)
    pairs: dict[str, Pair] = {"adaptive": (adaptive, a_opt)}
    for name in ("plain", "traced"):
        seq = sequential()
        with torch.no_grad():
            for p, q in zip(adaptive.parameters(), seq.parameters(), strict=True):  # same order: w0 b0 w1 b1 w2 b2
                q.copy_(p)
                q.grad = p.grad.clone()
        opt = torch.optim.Adam(seq.parameters(), lr=1e-3)
        opt.load_state_dict(a_opt.state_dict())
        pairs[name] = (seq, opt)
    an.unit_groups(adaptive)
    an.unit_groups(pairs["traced"][0], (x[:2],))
    return pairs


def clone(pair: Pair) -> Pair:
    """Independent copies (the trace cache too); the copied optimizer holds the copied parameters."""
    model, opt = pair
    m, o = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), m.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return m, o


def layers(kind: str) -> tuple[Any, Any]:
    """The two hidden groups: by index for AdaptiveMLP, by traced group name for the Sequential."""
    return (0, 1) if kind == "adaptive" else ("0", "2")


# -- the measures: each returns seconds for one fresh copy ---------------------------------
@contextlib.contextmanager
def probe_given(init: str, result: Any) -> Iterator[None]:
    """Inside: widen's probe (gradmax's plan, firefly's scores) returns ``result`` at no cost."""
    target, name = (an_init, "gradmax") if init == "gradmax" else (an_ops, "splitting_scores")
    real = getattr(target, name)
    setattr(target, name, lambda *args, **kwargs: result)
    try:
        yield
    finally:
        setattr(target, name, real)


def widen_measures(pair: Pair, kind: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], float]]:
    layer = layers(kind)[0]
    batch = (x, y)
    probed: dict[str, Any] = {}  # each probe's result on the model every copy starts from

    def probe(init: str, m: Model) -> Any:
        group = find_group(m, layer, "layer")
        if init == "gradmax":
            return an_init.gradmax(m, group, BY, batch, F.cross_entropy)
        return an_ops.splitting_scores(m, group, batch, F.cross_entropy)

    def widen(init: str, mode: str = "") -> float:
        m, o = clone(pair)
        if mode == "probe alone":
            return timed(lambda: probe(init, m))
        context: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if mode == "probe given":
            if init not in probed:
                probed[init] = probe(init, m)
            context = probe_given(init, probed[init])
        extra = {"batch": batch, "loss_fn": F.cross_entropy} if mode else {}
        with context:
            t = timed(lambda: an.widen(m, layer=layer, by=BY, init=init, optimizer=o, **extra))
        assert find_group(m, layer, "layer").size == HIDDEN + BY
        return t

    def floor() -> float:
        m, o = clone(pair)
        touched = [(m.get_parameter(name), dim) for name, dim in floor_tensors(kind)]

        def copy_once() -> None:
            new = []
            for p, dim in touched:
                for t in (p.detach(), p.grad, *(o.state[p][k] for k in ("exp_avg", "exp_avg_sq"))):
                    shape = list(t.shape)
                    shape[dim] = BY
                    new.append(torch.cat([t, t.new_zeros(shape)], dim))  # the fastest copy found
        return timed(copy_once)

    out: dict[str, Callable[[], float]] = {"copy floor": floor}
    out.update({init: lambda init=init: widen(init) for init in INITS if init not in ("gradmax", "firefly")})
    # batch= makes every edit run the model on it before and after (Edit.max_output_change): zero
    # with the batch shows that cost alone; gradmax and firefly need the batch for their probe.
    out["zero, batch given"] = lambda: widen("zero", "batch given")
    for init in ("gradmax", "firefly"):
        out[f"{init}, probe given"] = lambda init=init: widen(init, "probe given")
        out[f"{init} probe alone"] = lambda init=init: widen(init, "probe alone")
    return out


def floor_tensors(kind: str, layer: int = 0) -> list[tuple[str, int]]:
    """A hidden layer's parameters (rows) and its consumer's weight (columns)."""
    if kind == "adaptive":
        consumer = "head" if layer == 1 else f"blocks.{layer + 1}.op"
        return [(f"blocks.{layer}.op.weight", 0), (f"blocks.{layer}.op.bias", 0), (f"{consumer}.weight", 1)]
    return [(f"{2 * layer}.weight", 0), (f"{2 * layer}.bias", 0), (f"{2 * layer + 2}.weight", 1)]


def prune_tp(model: nn.Sequential, example: torch.Tensor) -> None:
    """Torch-Pruning as documented: build the dependency graph (inside the pruner), then prune."""
    assert tp is not None
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5, ignored_layers=[model[4]],
    )
    pruner.step()


def prune_measures(pairs: dict[str, Pair], x: torch.Tensor) -> dict[str, Callable[[], float]]:
    def prune(kind: str, which: tuple[Any, ...]) -> float:
        m, o = clone(pairs[kind])
        t = timed(lambda: [an.prune(m, layer=g, amount=0.5, importance="magnitude", optimizer=o) for g in which])
        assert [find_group(m, g, "layer").size for g in which] == [HIDDEN // 2] * len(which)
        return t

    def torch_pruning() -> float:
        m, _ = clone(pairs["plain"])
        t = timed(lambda: prune_tp(m, x[:1]))  # type: ignore[arg-type]
        assert [m[0].out_features, m[2].out_features] == [HIDDEN // 2] * 2
        return t

    def floor() -> float:
        """The prune of both layers as copies alone: every tensor it touches (parameter, grad, both
        Adam moments) gathered once into its new shape, layer 0 then layer 1, as the edits do."""
        m, o = clone(pairs["adaptive"])
        kept = torch.arange(0, HIDDEN, 2)  # every other unit: a gather, as a prune's keep map is

        def copy_once() -> None:
            current: dict[tuple[str, int], torch.Tensor] = {}
            for layer in (0, 1):
                for name, dim in floor_tensors("adaptive", layer):
                    p = m.get_parameter(name)
                    for i, t in enumerate((p.detach(), p.grad, *(o.state[p][k] for k in ("exp_avg", "exp_avg_sq")))):
                        current[name, i] = current.get((name, i), t).index_select(dim, kept)
        return timed(copy_once)

    out: dict[str, Callable[[], float]] = {"both copy floor": floor}
    for kind in ("adaptive", "traced"):
        first, second = layers(kind)
        out[f"{kind} layer 0"] = lambda kind=kind, first=first: prune(kind, (first,))
        out[f"{kind} both"] = lambda kind=kind, first=first, second=second: prune(kind, (first, second))
    if tp is not None:
        out["torch-pruning both"] = torch_pruning
    return out


# -- side by side ------------------------------------------------------------------------
def side_by_side(step_pair: Pair, measures: dict[str, Callable[[], float]], x: torch.Tensor, y: torch.Tensor,
                 repeats: int, warmup: int) -> dict[str, list[float]]:
    """Per repeat: the median of 3 train steps, then every measure once, in rotated order.
    Returns seconds per repeat for ``"step"`` and every measure."""
    m, o = clone(step_pair)
    names = list(measures)
    for _ in range(warmup):
        train_step(m, o, x, y)
        for f in measures.values():
            f()
    times: dict[str, list[float]] = {"step": [], **{n: [] for n in names}}
    for r in range(repeats):
        times["step"].append(statistics.median(timed(lambda: train_step(m, o, x, y)) for _ in range(3)))
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # drift and bursts hit every measure alike
            times[name].append(measures[name]())
    return times


def summary(ratios: list[float], target: float | None = None) -> dict[str, Any]:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    median = statistics.median(ratios)
    out = {"ratio_median": median, "ratio_p25": q[0], "ratio_p75": q[2], "repeats": len(ratios)}
    return out if target is None else {**out, "target": target, "met": median <= target}


def ratios_to(times: dict[str, list[float]], ref: str, target: float | None) -> dict[str, Any]:
    out = {"reference_ms": 1e3 * statistics.median(times[ref])}
    for name, ts in times.items():
        if name != ref:
            r = [a / b for a, b in zip(ts, times[ref], strict=True)]
            tgt = None if "probe alone" in name or "floor" in name or "both" in name else target
            out[name] = {"ms": 1e3 * statistics.median(ts), **summary(r, tgt)}
    return out


def bench_train_step(pairs: dict[str, Pair], x: torch.Tensor, y: torch.Tensor, repeats: int,
                     warmup: int) -> dict[str, Any]:
    """One step of each model in turn (order rotated through all permutations); per-round ratios.
    ``plain_adaptnet_relu`` (the Sequential with adaptnet's ReLU, derivative 1 at 0) splits the
    overhead into the activation's share and the rest of the structure."""
    models = {name: clone(pairs[name]) for name in ("adaptive", "plain", "traced")}
    seq, seq_opt = clone(pairs["plain"])
    seq[1], seq[3] = AdaptnetReLU(), AdaptnetReLU()
    models["plain_adaptnet_relu"] = (seq, seq_opt)
    for m, o in models.values():
        for _ in range(warmup):
            train_step(m, o, x, y)
    orders = list(itertools.permutations(models))
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats):
        for name in orders[r % len(orders)]:
            m, o = models[name]
            times[name].append(timed(lambda m=m, o=o: train_step(m, o, x, y)))

    def ratios(a: str, b: str) -> list[float]:
        return [s / t for s, t in zip(times[a], times[b], strict=True)]

    return {**{f"{name}_ms": 1e3 * statistics.median(ts) for name, ts in times.items()},
            "adaptive": summary(ratios("adaptive", "plain"), TARGETS["train_step"]),
            "traced": summary(ratios("traced", "plain"), TARGETS["train_step"]),
            "split": {"adaptnet_relu_vs_nn_relu": statistics.median(ratios("plain_adaptnet_relu", "plain")),
                      "adaptive_vs_sequential_with_adaptnet_relu":
                          statistics.median(ratios("adaptive", "plain_adaptnet_relu"))}}


def optimizer_after_prune(pairs: dict[str, Pair], x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Stale references (held by the optimizer, gone from the model), and what the next step() updates."""
    out = {}
    for name in ("adaptnet", "torch_pruning") if tp is not None else ("adaptnet",):
        model, opt = clone(pairs["adaptive" if name == "adaptnet" else "plain"])
        if name == "adaptnet":
            for layer in (0, 1):
                an.prune(model, layer=layer, amount=0.5, optimizer=opt)
        else:
            prune_tp(model, x[:1])  # type: ignore[arg-type]
        live, held = {id(p) for p in model.parameters()}, [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, opt, x, y)
        updated = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True))
        out[name] = {"optimizer_refs": len(held), "stale_refs": sum(id(p) not in live for p in held),
                     "model_params": len(before), "step_updated_params": updated}
    return out


def run_at(threads: int, pairs: dict[str, Pair], x: torch.Tensor, y: torch.Tensor, repeats: int,
           warmup: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    load_start = load_average()
    result: dict[str, Any] = {"threads": threads, "train_step": bench_train_step(pairs, x, y, 4 * repeats, warmup)}
    for kind in ("adaptive", "traced"):
        times = side_by_side(pairs[kind], widen_measures(pairs[kind], kind, x, y), x, y, repeats, warmup)
        result[f"widen_{kind}"] = ratios_to(times, "step", TARGETS["widen"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Torch-Pruning's advisory warnings would land in the timed region
        times = side_by_side(pairs["adaptive"], prune_measures(pairs, x), x, y, repeats, warmup)
        prune = ratios_to(times, "step", TARGETS["prune"])
        if tp is not None:  # the copy floor against Torch-Pruning: how close to 0.3x any carrying prune can get
            for label in ("adaptive both", "traced both", "both copy floor"):
                r = [a / b for a, b in zip(times[label], times["torch-pruning both"], strict=True)]
                prune[f"{label} vs torch-pruning"] = summary(r, None if "floor" in label else TARGETS["prune_vs_tp"])
        result["prune"] = prune
        result["optimizer_after_prune"] = optimizer_after_prune(pairs, x, y)
    result["load_average"] = {"start": load_start, "end": load_average()}
    return result


# -- report ------------------------------------------------------------------------------
def _ratio(r: dict[str, Any]) -> str:
    return f"{r['ratio_median']:.3f} [{r['ratio_p25']:.3f}, {r['ratio_p75']:.3f}]"


def _met(r: dict[str, Any]) -> tuple[str, str]:
    return (f"<= {r['target']}", "yes" if r["met"] else "NO") if "met" in r else ("", "")


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"edit_overhead: torch {m['torch']}, CPUs {m['cpu_count']} ({m['cpus_usable']} usable), {m['cpu']}, "
             f"torch-pruning {m['torch_pruning']}"]
    for run in results["runs"]:
        a = run["train_step"]
        rows = [("measure", "time", "ratio median [p25, p75]", "target", "met")]
        rows.append(("train step AdaptiveMLP / Sequential", f"{a['adaptive_ms']:.2f} / {a['plain_ms']:.2f} ms",
                     _ratio(a["adaptive"]), *_met(a["adaptive"])))
        rows.append(("train step traced Sequential / Sequential", f"{a['traced_ms']:.2f} / {a['plain_ms']:.2f} ms",
                     _ratio(a["traced"]), *_met(a["traced"])))
        for kind in ("adaptive", "traced"):
            w = run[f"widen_{kind}"]
            for name, r in w.items():
                if isinstance(r, dict):
                    rows.append((f"{kind}: widen {name} / step", f"{r['ms']:.2f} ms", _ratio(r), *_met(r)))
        p = run["prune"]
        for name, r in p.items():
            if isinstance(r, dict):
                label = f"prune 50% {name}" + ("" if "vs" in name else " / step")
                rows.append((label, f"{r['ms']:.2f} ms" if "ms" in r else "", _ratio(r), *_met(r)))
        load = run["load_average"]
        lines += ["", f"threads {run['threads']}: step {run['widen_adaptive']['reference_ms']:.2f} ms (AdaptiveMLP), "
                      f"load average {load['start']} -> {load['end']}", *render(rows)]
        for name, c in run["optimizer_after_prune"].items():
            lines.append(f"  after prune, {name}: stale refs {c['stale_refs']}/{c['optimizer_refs']}, next step() "
                         f"updates {c['step_updated_params']}/{c['model_params']} model params")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help=f"thread counts to measure at (default: the default, {torch.get_num_threads()}, and 1)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per measure (default 21)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (3 repeats, no stable numbers)")
    args = parser.parse_args(argv)
    threads = args.threads or list(dict.fromkeys([torch.get_num_threads(), 1]))
    if any(t < 1 for t in threads) or (args.repeats is not None and args.repeats < 1):
        parser.error("--threads and --repeats must be positive integers")
    repeats = args.repeats or (3 if args.quick else 21)
    warmup = 1 if args.quick else 2

    started = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, IN, generator=g), torch.randint(0, OUT, (BATCH,), generator=g)  # (B, 784), (B,)
    pairs = make_models(x, y)
    results: dict[str, Any] = {
        "benchmark": "edit_overhead",
        "command": " ".join(["python", "benchmarks/edit_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine_info(torch.get_num_threads()),
                    "torch_pruning": getattr(tp, "__version__", None) if tp is not None else None},
        "config": {"sizes": [IN, HIDDEN, HIDDEN, OUT], "batch": BATCH, "by": BY, "loss": "cross_entropy",
                   "optimizer": "Adam", "grads_present_at_edit": True, "repeats": repeats, "warmup": warmup,
                   "quick": args.quick, "timer": "time.perf_counter, gc disabled in timed regions",
                   "targets": TARGETS},
        "runs": [run_at(t, pairs, x, y, repeats, warmup) for t in threads],
    }
    return finish(results, started, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
