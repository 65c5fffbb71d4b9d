"""Growth vs a static width sweep: one adaptive run against a search over static sizes.

Does one growth run find a network as good as the best of a sweep of static widths, for less
training compute?

Tasks: scikit-learn ``digits`` (64 features, 10 classes), a teacher-student regression
(a fixed random 20 -> 48 -> 1 tanh teacher with label noise) and two spirals (2-D, 2 classes).
For each, the same training recipe (Adam, learning rate, batch size, early stopping on validation loss
with the best-validation weights kept, and an epoch cap) is run for

  * a static sweep of ``AdaptiveMLP`` widths (4, 8, 16, 32, 64, 128; never edited), and
  * adaptnet growth from width 4 with a growth policy and a budget (``max_width`` 128),

over 5 seeds (each seed: its own data split, sample and initialisation). The epoch cap counts the
epochs of the final architecture: ``max_epochs`` for a static width, and for growth ``max_epochs``
after its last edit (at most ``GROWTH_CAP`` x ``max_epochs`` in all). Reported per arm:
test metric (accuracy, or MSE in target standard deviations squared) mean ± std, the
parameter count of the delivered model, and training FLOPs = sum over optimizer steps of
3 x forward MACs per sample (``adaptnet.nn.flops.count_macs``, re-counted after every edit)
x the batch's rows. Validation passes, growth probes (gradient scores, GradMax's matrix) and
the probe-loss checks of the Trainer are not counted; wall-clock seconds (which include
them) are reported beside. ``sweep-pick`` is what a sweep delivers: per seed, the width with
the best validation metric, for the FLOPs of the whole sweep.

Targets (against the static width with the best mean test metric): growth within 0.5
percentage points of accuracy (classification) or 5 % relative MSE (regression), with no more
parameters than that width, for at most 35 % of the whole sweep's training FLOPs.

Run: ``python benchmarks/growth_vs_sweep.py`` (``--quick`` for a smoke run, ``--tasks``,
``--seeds N``, ``--out``; ``--select`` runs the validation grid that chose the growth
settings, on seeds disjoint from the reported ones).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import adaptnet as an
from adaptnet.nn.flops import count_macs
from adaptnet.train.data import load_data

WIDTHS = (4, 8, 16, 32, 64, 128)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "growth_vs_sweep.json"
TARGETS = {"classification_pp": 0.5, "regression_rel": 0.05, "flops_share": 0.35}
SELECT_SEEDS = (100, 101, 102, 103, 104)  # --select uses these; the report uses 0..N-1

# The recipe, identical for every arm of a task (sweep widths and growth alike): Adam (no weight decay)
# at ``lr``; early stopping when the validation loss has not improved for ``patience`` epochs, never
# before ``min_epochs``; the weights of the best validation epoch are the result. ``lr`` was chosen by
# ``--select`` from ``LR_CHOICES`` on the sweep alone.
# Epoch cap: ``max_epochs`` for a static run; for a growth run ``max_epochs`` after its last edit and
# ``GROWTH_CAP`` x ``max_epochs`` in all (every epoch of it counts in its FLOPs).
GROWTH_CAP = 2
_STOP = {"patience": 25, "min_epochs": 50, "max_epochs": 300}
RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"kind": "classification", "layers": 1, "activation": "relu", "lr": 3e-3, "batch_size": 128,
               **_STOP, "patience": 20, "max_epochs": 200},
    "teacher": {"kind": "regression", "layers": 1, "activation": "tanh", "lr": 1e-2, "batch_size": 256, **_STOP,
                "data": {"samples": 6000, "hidden": 48}},
    "spirals": {"kind": "classification", "layers": 2, "activation": "relu", "lr": 3e-3, "batch_size": 128,
                **_STOP, "data": {"turns": 3.0, "noise": 0.5}},
}

# Growth arms per task: what ``--select`` chose on the selection seeds' validation data.
# ``GrowOnSignal`` also grows after 10 epochs without improvement (its default ``patience``).
_BASE = {"by": 8, "init": "zero", "start": 4, "max_width": 128}
GROWTH: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {"growth": {"policy": "signal", "threshold": 0.3, "cooldown": 3, **_BASE, "init": "gradmax"}},
    "teacher": {"growth": {"policy": "signal", "threshold": 0.1, "cooldown": 5, **_BASE}},
    "spirals": {"growth": {"policy": "signal", "threshold": 0.5, "cooldown": 3, **_BASE}},
}


# -- tasks -----------------------------------------------------------------------------------
Pair = tuple[torch.Tensor, torch.Tensor]


def _split(x: np.ndarray, y: np.ndarray, seed: int, kind: str) -> tuple[Pair, Pair, Pair]:
    """60/20/20 split by ``seed``; features (and regression targets) standardised on train."""
    n = len(x)
    order = np.random.default_rng(seed).permutation(n)
    n_val = n_test = n // 5
    idx = order[: n - n_val - n_test], order[n - n_val - n_test: n - n_test], order[n - n_test:]
    mean, std = x[idx[0]].mean(axis=0), x[idx[0]].std(axis=0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    if kind == "regression":
        y = (y - y[idx[0]].mean()) / y[idx[0]].std()

    def pair(i: np.ndarray) -> Pair:
        xs = torch.tensor(x[i], dtype=torch.float32)
        if kind == "regression":
            return xs, torch.tensor(y[i], dtype=torch.float32).reshape(-1, 1)  # (N, F), (N, 1)
        return xs, torch.tensor(y[i], dtype=torch.int64)  # (N, F), (N,)

    return pair(idx[0]), pair(idx[1]), pair(idx[2])


def teacher(seed: int, samples: int = 6000, hidden: int = 48, noise: float = 0.1,
            scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random teacher 20 -> hidden -> 1 (tanh), the same for every seed; ``x`` ~ N(0, I) and
    Gaussian label noise (``noise`` x the clean targets' std) drawn by ``seed``.

    ``hidden`` = 48 sits between two sweep widths (32 and 64), as a problem's right size usually does.
    """
    t = np.random.default_rng(12345)  # the teacher is the same for every seed
    w1, b1 = t.standard_normal((20, hidden)) * scale / math.sqrt(20), t.standard_normal(hidden) * 0.5
    w2 = t.standard_normal(hidden) / math.sqrt(hidden)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 20))
    clean = np.tanh(x @ w1 + b1) @ w2
    return x, clean + noise * clean.std() * rng.standard_normal(samples)


def spirals(seed: int, samples: int = 2000, turns: float = 3.0, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved spirals in 2-D, ``turns`` turns each out to radius 5 (so neighbouring arms are
    ``5 / (2 turns)`` apart), uniform over the area, plus Gaussian noise of std ``noise / (2 turns)``
    (a tenth of the gap for ``noise`` = 0.5); labels 0/1 by arm."""
    rng = np.random.default_rng(seed)
    half = samples // 2
    t = np.sqrt(rng.uniform(0, 1, half)) * turns * 2 * np.pi  # (half,)
    arm = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / (turns * 2 * np.pi) * 5
    x = np.concatenate([arm, -arm]) + noise * rng.standard_normal((2 * half, 2)) / (turns * 2)
    y = np.concatenate([np.zeros(half, dtype=np.int64), np.ones(half, dtype=np.int64)])
    return x, y


def make_task(name: str, seed: int, options: Mapping[str, Any]) -> tuple[Pair, Pair, Pair, int, int]:
    """(train, val, test, in_features, out_features); ``options`` go to the generator."""
    if name == "digits":
        s = load_data("digits", seed=seed, val_fraction=0.2, test_fraction=0.2)
        assert s.val is not None and s.test is not None
        return s.train, s.val, s.test, 64, 10
    if name == "teacher":
        return (*_split(*teacher(seed, **options), seed, "regression"), 20, 1)
    if name == "spirals":
        return (*_split(*spirals(seed, **options), seed, "classification"), 2, 2)
    raise ValueError(f"unknown task {name!r}")


# -- one training run ------------------------------------------------------------------------
class Meter(an.Callback):
    """Counts training FLOPs, keeps the best-validation model, stops early.

    It is also the first policy of the Trainer: policies run after validation and before any
    edit, so the model kept for a best epoch is the one that was validated (``on_epoch_end``,
    which now also runs before the edits, would see the same model).
    """

    name = "meter"

    def __init__(self, n_train: int, batch_size: int, patience: int, min_epochs: int, max_epochs: int,
                 x1: torch.Tensor):
        self.n_train, self.batch_size, self.x1 = n_train, batch_size, x1
        self.patience, self.min_epochs, self.max_epochs = patience, min_epochs, max_epochs
        self.flops, self.macs, self.wait, self.last_edit = 0, 0, 0, 0
        self.best, self.best_epoch, self.best_model = math.inf, 0, None
        self.trainer: Any = None
        self.edits: list[dict[str, Any]] = []
        self.by_arch: dict[tuple[int, ...], tuple[float, Any]] = {}  # widths -> (best val loss, model)

    def on_fit_start(self, trainer: Any) -> None:
        self.trainer, self.macs = trainer, count_macs(trainer.model, self.x1)

    def on_batch_end(self, trainer: Any, step: int, loss: torch.Tensor) -> None:
        rows = min(self.batch_size, self.n_train - (trainer.batch_in_epoch - 1) * self.batch_size)
        self.flops += 3 * self.macs * rows

    def on_after_edit(self, trainer: Any, edit: an.Edit, event: dict[str, Any]) -> None:
        self.macs = count_macs(trainer.model, self.x1)
        self.edits.append({"epoch": event["epoch"], "op": edit.op, "layer": edit.layer,
                           "widths": list(edit.widths_after)})
        self.last_edit = event["epoch"]

    def decide(self, signals: an.Signals) -> list[an.EditRequest]:
        value = signals.history["val_loss"][-1]
        arch = tuple(signals.model.widths)  # type: ignore[union-attr]
        if value < self.by_arch.get(arch, (math.inf, None))[0]:
            self.by_arch[arch] = (value, copy.deepcopy(signals.model))
        if value < self.best:
            self.best, self.best_epoch, self.wait = value, signals.epoch, 0
            self.best_model = self.by_arch[arch][1]
        else:
            self.wait += 1
            if self.wait >= self.patience and signals.epoch >= self.min_epochs:
                self.trainer.request_stop()
        if signals.epoch - self.last_edit >= self.max_epochs:  # the epoch cap, counted from the last edit
            self.trainer.request_stop()
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def make_policies(g: Mapping[str, Any]) -> list[Any]:
    """The adaptnet growth policies of one growth setting (see ``GROWTH`` and ``SELECT_GRID``)."""
    budget = {k: g[k] for k in ("max_params", "max_width", "max_flops") if k in g}
    if g["policy"] == "plateau":
        policies: list[Any] = [an.GrowOnPlateau(patience=g["patience"], by=g["by"], where=g.get("where", "gradient"),
                                                init=g["init"], min_delta=g.get("min_delta", 0.0), **budget)]
    elif g["policy"] == "signal":
        policies = [an.GrowOnSignal(threshold=g["threshold"], by=g["by"], init=g["init"], every=g.get("every", 1),
                                    cooldown=g.get("cooldown", 0), **budget)]
    else:
        raise ValueError(f"unknown growth policy {g['policy']!r}")
    return policies


def batches(data: Pair, size: int) -> DataLoader:
    """Shuffled batches sliced from the tensors at once (the same batches as the Trainer's own
    ``TensorLoader``, kept so that the runs stay those reported); the Trainer seeds the order per epoch."""
    ds = TensorDataset(*data)
    return DataLoader(ds, sampler=BatchSampler(RandomSampler(ds), size, drop_last=False), batch_size=None)


def evaluate(model: torch.nn.Module, data: Pair, kind: str) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(data[0])
    if kind == "regression":
        return {"mse": float(F.mse_loss(out, data[1]))}
    return {"accuracy": float((out.argmax(1) == data[1]).double().mean()), "loss": float(F.cross_entropy(out, data[1]))}


Job = tuple[str, str, Any, int, dict[str, Any]]


def run_one(job: Job) -> dict[str, Any]:
    """``job`` = (task, arm, width or growth settings, seed, recipe) -> one result row."""
    task, arm, setting, seed, recipe = job
    torch.set_num_threads(1)
    train, val, test, n_in, n_out = make_task(task, seed, recipe.get("data", {}))
    torch.manual_seed(seed)
    start = setting if arm == "static" else setting["start"]
    model = an.AdaptiveMLP(n_in, [start] * recipe["layers"], n_out, activation=recipe["activation"])
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    loss_fn = F.mse_loss if recipe["kind"] == "regression" else F.cross_entropy
    static_cap = recipe.get("static_cap", 1)  # --static-cap: the static arm's epoch cap x this (a sensitivity check)
    max_epochs = recipe["max_epochs"] * (static_cap if arm == "static" else 1)
    meter = Meter(len(train[0]), recipe["batch_size"], recipe["patience"], recipe["min_epochs"], max_epochs,
                  train[0][:1])
    policies = [meter, *(make_policies(setting) if arm != "static" else [])]
    trainer = an.Trainer(model, opt, loss_fn, policies=policies, callbacks=[meter], seed=seed,
                         batch_size=recipe["batch_size"], device="cpu", on_nonfinite="stop")
    began = time.perf_counter()
    cap = max_epochs * (1 if arm == "static" else GROWTH_CAP)
    trainer.fit(batches(train, recipe["batch_size"]), batches(val, 4096), epochs=cap)
    seconds = time.perf_counter() - began
    best = meter.best_model
    assert best is not None
    return {
        "task": task, "arm": arm, "width": setting if arm == "static" else None, "seed": seed, "setting": setting,
        "lr": recipe["lr"],
        "test": evaluate(best, test, recipe["kind"]), "val": evaluate(best, val, recipe["kind"]),
        "params": sum(p.numel() for p in best.parameters()), "widths": list(best.widths),
        "final_widths": list(trainer.model.widths), "epochs": trainer.epoch, "best_epoch": meter.best_epoch,
        "last_edit": meter.last_edit, "steps": trainer.step, "train_flops": meter.flops, "seconds": seconds,
        "edits": meter.edits,
        "by_arch": [{"widths": list(a), "params": sum(p.numel() for p in m.parameters()), "val_loss": v,
                     "val": evaluate(m, val, recipe["kind"]), "test": evaluate(m, test, recipe["kind"])}
                    for a, (v, m) in meter.by_arch.items()],
    }


def run_jobs(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    """Run jobs in ``workers`` processes (one intra-op thread each), results in job order."""
    if workers <= 1:
        return [run_one(j) for j in jobs]
    with get_context("spawn").Pool(workers) as pool:
        return pool.map(run_one, jobs, chunksize=1)


# -- summaries -------------------------------------------------------------------------------
def metric_of(row: Mapping[str, Any], split: str = "test") -> float:
    m = row[split]
    return m["mse"] if "mse" in m else 100 * m["accuracy"]


def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _arm(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"test": _ms([metric_of(r) for r in rows]), "val": _ms([metric_of(r, "val") for r in rows]),
            "params": _ms([r["params"] for r in rows]), "train_flops": _ms([r["train_flops"] for r in rows]),
            "seconds": _ms([r["seconds"] for r in rows]), "epochs": _ms([r["epochs"] for r in rows]),
            "widths": [r["widths"] for r in rows]}


def summarise(task: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    kind = RECIPES[task]["kind"]
    sign = -1 if kind == "regression" else 1  # sign * metric: larger is better
    static_rows = [r for r in rows if r["arm"] == "static"]
    static = {f"static-{w}": _arm(mine) for w in WIDTHS if (mine := [r for r in static_rows if r["width"] == w])}
    sweep_flops = sum(v["train_flops"]["mean"] for v in static.values())
    sweep_seconds = sum(v["seconds"]["mean"] for v in static.values())
    best_test = max(static, key=lambda k: sign * static[k]["test"]["mean"])
    best_val = max(static, key=lambda k: sign * static[k]["val"]["mean"])
    # What one sweep per seed delivers: the width with the best validation metric of that seed.
    picks = [max((r for r in static_rows if r["seed"] == seed), key=lambda r: sign * metric_of(r, "val"))
             for seed in sorted({r["seed"] for r in static_rows})]
    pick = {**_arm(picks), "train_flops": {"mean": sweep_flops, "std": 0.0},
            "seconds": {"mean": sweep_seconds, "std": 0.0}}
    growth = {name: _arm(mine) for name in dict.fromkeys(r["arm"] for r in rows if r["arm"] != "static")
              if (mine := [r for r in rows if r["arm"] == name])}
    out: dict[str, Any] = {"kind": kind, "metric": "mse" if kind == "regression" else "accuracy_pct",
                           "arms": {**static, "sweep-pick": pick, **growth}, "sweep_train_flops": sweep_flops,
                           "sweep_seconds": sweep_seconds, "best_static_by_test": best_test,
                           "best_static_by_val": best_val, "targets": {}}
    ref = static[best_test]
    limit = TARGETS["regression_rel"] if kind == "regression" else TARGETS["classification_pp"]
    for name, g in growth.items():
        gap = (g["test"]["mean"] / ref["test"]["mean"] - 1 if kind == "regression"
               else ref["test"]["mean"] - g["test"]["mean"])
        out["targets"][name] = {
            "metric_gap": gap, "metric_ok": gap <= limit,
            "params_ratio": g["params"]["mean"] / ref["params"]["mean"],
            "params_ok": g["params"]["mean"] <= ref["params"]["mean"],
            "flops_share": g["train_flops"]["mean"] / sweep_flops,
            "flops_ok": g["train_flops"]["mean"] <= TARGETS["flops_share"] * sweep_flops,
            "seconds_share": g["seconds"]["mean"] / sweep_seconds,
        }
    return out


def table(summary: Mapping[str, Any]) -> str:
    lines = []
    for task, s in summary.items():
        unit = "test MSE" if s["kind"] == "regression" else "test acc %"
        lines.append(f"\n{task} ({unit}; best static by test: {s['best_static_by_test']}, by val: "
                     f"{s['best_static_by_val']})")
        lines.append(f"  {'arm':<16} {unit:>17} {'params':>8} {'train GFLOPs':>13} {'% of sweep':>10} {'epochs':>7}")
        for name, a in s["arms"].items():
            fmt = "{:.4f} ± {:.4f}" if s["kind"] == "regression" else "{:.2f} ± {:.2f}"
            share = 100 * a["train_flops"]["mean"] / s["sweep_train_flops"]
            lines.append(f"  {name:<16} {fmt.format(a['test']['mean'], a['test']['std']):>17} "
                         f"{a['params']['mean']:>8.0f} {a['train_flops']['mean'] / 1e9:>13.3f} {share:>9.1f}% "
                         f"{a['epochs']['mean']:>7.0f}")
        for name, t in s["targets"].items():
            gap = (f"{100 * t['metric_gap']:+.1f}% MSE" if s["kind"] == "regression"
                   else f"{t['metric_gap']:+.2f} pp")
            lines.append(f"  {name} vs {s['best_static_by_test']}: gap {gap} [{_yes(t['metric_ok'])}], params "
                         f"x{t['params_ratio']:.2f} [{_yes(t['params_ok'])}], FLOPs {100 * t['flops_share']:.1f}% "
                         f"of sweep [{_yes(t['flops_ok'])}]; wall-clock {100 * t['seconds_share']:.0f}% of sweep")
            lines.append(f"    widths per seed: {s['arms'][name]['widths']}")
    return "\n".join(lines)


def _yes(ok: bool) -> str:
    return "met" if ok else "MISSED"


# -- selection on validation -----------------------------------------------------------------
LR_CHOICES = (3e-3, 1e-2)
# The same candidates for every task: two triggers, their knobs, two initialisers.
SELECT_GRID: list[dict[str, Any]] = [
    *({"policy": "plateau", "patience": p, "by": 8, "init": "zero", "start": 4, "max_width": 128} for p in (3, 5)),
    {"policy": "plateau", "patience": 3, "by": 8, "init": "gradmax", "start": 4, "max_width": 128},
    *({"policy": "signal", "threshold": t, "cooldown": c, "by": 8, "init": "zero", "start": 4, "max_width": 128}
      for t in (0.05, 0.1, 0.2, 0.3, 0.5) for c in (3, 5)),
    {"policy": "signal", "threshold": 0.3, "cooldown": 3, "by": 8, "init": "gradmax", "start": 4, "max_width": 128},
]
TIE = {"classification": 0.25, "regression": 0.01}  # validation differences below these count as ties


def _key(setting: Any) -> str:
    return json.dumps(setting, sort_keys=True)


def _mean_by(rows: list[dict[str, Any]], field: str) -> dict[str, dict[str, float]]:
    """Per setting: mean validation metric, parameters and training FLOPs over the seeds."""
    out = {}
    for key, group in itertools.groupby(sorted(rows, key=lambda r: _key(r[field])), key=lambda r: _key(r[field])):
        g = list(group)
        out[key] = {"val": statistics.fmean(metric_of(r, "val") for r in g),
                    "params": statistics.fmean(r["params"] for r in g),
                    "train_flops": statistics.fmean(r["train_flops"] for r in g)}
    return out


def select(tasks: list[str], workers: int) -> dict[str, Any]:
    """Choose each task's learning rate, then its growth setting, on the selection seeds' validation data.

    1. Learning rate: the one of ``LR_CHOICES`` whose best static width has the best validation metric
       (the recipe is chosen for the sweep, not for growth).
    2. Growth: among the ``SELECT_GRID`` settings within 35 % of the sweep's FLOPs, the best validation
       metric; settings within ``TIE`` of it (0.25 pp, or 1 % relative) count as tied, and the one with
       the fewest parameters wins.
    """
    jobs: list[Job] = [(t, "static", w, s, dict(RECIPES[t], lr=lr)) for t in tasks for lr in LR_CHOICES
                       for w in WIDTHS for s in SELECT_SEEDS]
    rows = run_jobs(jobs, workers)
    out: dict[str, Any] = {}
    for t in tasks:
        sign = -1 if RECIPES[t]["kind"] == "regression" else 1
        per_lr = {}
        for lr in LR_CHOICES:
            widths = _mean_by([r for r in rows if r["task"] == t and r["lr"] == lr], "width")
            per_lr[lr] = {"widths": widths, "sweep_flops": sum(w["train_flops"] for w in widths.values()),
                          "best_val": max((w["val"] for w in widths.values()), key=lambda v: sign * v)}
        lr = max(LR_CHOICES, key=lambda x: sign * per_lr[x]["best_val"])
        out[t] = {"lr": lr, "static": {str(k): v for k, v in per_lr.items()}}
    jobs = [(t, "growth", c, s, dict(RECIPES[t], lr=out[t]["lr"])) for t in tasks for c in SELECT_GRID
            for s in SELECT_SEEDS]
    rows = run_jobs(jobs, workers)
    for t in tasks:
        chosen = out[t]["static"][str(out[t]["lr"])]
        best, sweep = chosen["best_val"], chosen["sweep_flops"]
        kind = RECIPES[t]["kind"]
        cands = _mean_by([r for r in rows if r["task"] == t], "setting")
        for c in cands.values():
            c["flops_share"] = c["train_flops"] / sweep
            c["within"] = (c["val"] <= best * (1 + TARGETS["regression_rel"]) if kind == "regression"
                           else c["val"] >= best - TARGETS["classification_pp"])
        ok = {k: c for k, c in cands.items() if c["flops_share"] <= TARGETS["flops_share"]}
        top = (min if kind == "regression" else max)(c["val"] for c in ok.values())
        tied = [k for k, c in ok.items() if (c["val"] <= top * (1 + TIE[kind]) if kind == "regression"
                                             else c["val"] >= top - TIE[kind])]
        pick = min(tied, key=lambda k: ok[k]["params"])
        out[t].update({"best_static_val": best, "candidates": cands, "chosen": json.loads(pick)})
    return out


def select_table(result: Mapping[str, Any]) -> str:
    lines = []
    for t, r in result.items():
        lines.append(f"\n{t}: lr {r['lr']} (best static val per lr: "
                     + ", ".join(f"{lr}: {v['best_val']:.4g}" for lr, v in r["static"].items())
                     + f"); growth candidates on validation (best static {r['best_static_val']:.4g}):")
        for key, c in sorted(r["candidates"].items(), key=lambda kv: kv[1]["params"]):
            mark = "*" if json.loads(key) == r["chosen"] else " "
            lines.append(f" {mark} val {c['val']:8.4f} params {c['params']:7.0f} FLOPs {100 * c['flops_share']:5.1f}% "
                         f"{'within' if c['within'] else '      '}  {key}")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------
def machine_info(workers: int) -> dict[str, Any]:
    return {"torch": torch.__version__, "adaptnet": an.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "workers": workers, "threads": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--tasks", nargs="+", choices=list(RECIPES), default=list(RECIPES), help="default: all")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2, one thread each)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 3 widths, 5 epochs")
    parser.add_argument("--select", action="store_true", help="run the validation grid for the growth settings")
    parser.add_argument("--static-cap", type=int, default=1, metavar="K",
                        help="sensitivity check: the static arm's epoch cap x K (default 1; growth unchanged)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.workers < 1 or args.static_cap < 1:
        parser.error("--seeds, --workers and --static-cap must be >= 1")
    began = time.perf_counter()
    if args.select:
        result = select(args.tasks, args.workers)
        print(select_table(result))
        print(f"\nselection took {time.perf_counter() - began:.0f} s")
        path = args.out.with_name(args.out.stem + "_select.json") if args.out == DEFAULT_OUT else args.out
        _write(path, {"machine": machine_info(args.workers), "selection_seeds": SELECT_SEEDS, "grid": SELECT_GRID,
                      "lr_choices": LR_CHOICES, "select": result})
        return 0
    widths, seeds = WIDTHS, list(range(args.seeds))
    recipes = {t: dict(r) for t, r in RECIPES.items()}
    if args.quick:
        widths, seeds = (4, 16, 64), [0]
        for r in recipes.values():
            r["max_epochs"], r["patience"], r["min_epochs"] = 5, 3, 0
    for r in recipes.values():
        r["static_cap"] = args.static_cap
    jobs: list[Job] = [(t, "static", w, s, recipes[t]) for t in args.tasks for w in widths for s in seeds]
    jobs += [(t, arm, setting, s, recipes[t]) for t in args.tasks for arm, setting in GROWTH[t].items()
             for s in seeds]
    jobs.sort(key=lambda j: -(j[2] if j[1] == "static" else 64))  # longest first keeps both workers busy
    rows = run_jobs(jobs, args.workers)
    summary = {t: summarise(t, [r for r in rows if r["task"] == t]) for t in args.tasks}
    print(table(summary))
    elapsed = time.perf_counter() - began
    print(f"\n{len(jobs)} runs in {elapsed:.0f} s ({args.workers} workers)")
    _write(args.out, {"machine": machine_info(args.workers), "quick": args.quick, "seeds": seeds,
                      "widths": list(widths), "recipes": recipes, "growth_cap": GROWTH_CAP, "growth": GROWTH,
                      "targets": TARGETS, "seconds": elapsed, "summary": summary, "runs": rows})
    return 0


def _write(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
