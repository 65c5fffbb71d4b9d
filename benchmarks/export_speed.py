"""Exported programs against eager: what the traced path of the input-adaptive modules costs.

Eager inference compacts the batch (rows that have left are dropped); a ``torch.export``
program cannot, so it keeps every row and skips only whole steps (``torch.cond`` per exit,
``while_loop`` over halting steps, empty experts skipped; see ``adaptnet/nn/_traced.py``).
Each case is timed three ways, side by side in one run (each repeat times every arm one after
the other; medians over repeats): ``eager`` (the module), ``program``
(``torch.export.export(module.eval(), (x,)).module()``) and ``onnxruntime`` (the program
converted by ``torch.onnx.export(..., dynamo=True)``, one intra-op thread). One intra-op thread
for torch too, no autograd. Ratios are time / eager time (below 1: faster than eager).

Cases (untrained, seed 0; thresholds and halting biases set so that the work differs per row):

  early_exit      ``EarlyExit.mlp(64, [512] * 4, 10)``, batch 256, confidence threshold at the
                  median of exit 0: half the rows leave at the first exit
  early_exit_all  the same, threshold 0: every row leaves at the first exit (cond skips 3 blocks)
  early_exit_1    the same as ``early_exit``, one row (online inference)
  ponder          ``PonderNet(RecurrentStep(64, 512, 10), max_steps=20)``, batch 256
  act             ``ACT`` with the same step, batch 256
  moe             ``MoE(64, 8, 512, top_k=2)``, dropless, 1024 tokens
  moe_capacity    the same with ``capacity_factor=1.25``
  moe_1           the dropless one on a single token
  mlp             ``AdaptiveMLP(64, [512, 512], 10)`` widened by 128 (no control flow: the baseline)

Run: ``python benchmarks/export_speed.py`` (``--repeats``, ``--quick``, ``--out``).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from torch import nn

import adaptnet as an
from _teacher_student import RESULTS, finish, machine_info, render
from _timing import timed
from adaptnet.nn.early_exit import EarlyExit
from adaptnet.nn.halting import ACT, PonderNet, RecurrentStep
from adaptnet.nn.moe import MoE

DEFAULT_OUT = RESULTS / "export_speed.json"


def _early_exit(batch: int, everyone_first: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = EarlyExit.mlp(64, [512] * 4, 10).eval()
    x = torch.randn(256, 64) * 4
    with torch.no_grad():
        confidence = model.exit_logits(x)[0].softmax(dim=1).amax(dim=1)
    model.threshold = 0.0 if everyone_first else float(confidence.median())
    return model, x[:batch]


def _halting(cls: type[PonderNet] | type[ACT]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    step = RecurrentStep(64, 512, 10)
    with torch.no_grad():
        step.halt.weight.mul_(8.0)
        step.halt.bias.fill_(-2.0 if cls is PonderNet else 0.0)
    return cls(step, max_steps=20).eval(), torch.randn(256, 64)


def _moe(tokens: int, capacity_factor: float | None = None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MoE(64, 8, 512, top_k=2, capacity_factor=capacity_factor).eval(), torch.randn(tokens, 64)


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = an.AdaptiveMLP(64, [512, 512], 10)
    an.widen(model, layer=0, by=128)
    return model.eval(), torch.randn(256, 64)


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "early_exit": lambda: _early_exit(256),
    "early_exit_all": lambda: _early_exit(256, everyone_first=True),
    "early_exit_1": lambda: _early_exit(1),
    "ponder": lambda: _halting(PonderNet),
    "act": lambda: _halting(ACT),
    "moe": lambda: _moe(1024),
    "moe_capacity": lambda: _moe(1024, 1.25),
    "moe_1": lambda: _moe(1),
    "mlp": _mlp,
}


def _work(model: nn.Module, x: torch.Tensor) -> str:
    """What eager inference did on ``x``: the part of the full work that was needed."""
    with torch.no_grad():
        model(x)
    stats = getattr(model, "last_stats", None)
    if isinstance(model, EarlyExit) and stats is not None:
        return f"exits {stats.counts}"
    if isinstance(model, (PonderNet, ACT)):
        return f"mean steps {stats['mean_steps']:.1f} of {model.max_steps}, max {stats['max_steps']}"
    if isinstance(model, MoE) and stats is not None:
        return f"tokens per expert {stats.tokens_per_expert}"
    return "-"


def measure(name: str, repeats: int, inner: int) -> dict[str, Any]:
    model, x = CASES[name]()
    work = _work(model, x)
    started = time.perf_counter()
    program = torch.export.export(model, (x,))
    export_s = time.perf_counter() - started
    onnx_program = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
    assert onnx_program is not None
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), options)
    feed = {session.get_inputs()[0].name: x.numpy()}
    module = program.module()
    arms: dict[str, Callable[[], Any]] = {"eager": lambda: model(x), "program": lambda: module(x),
                                          "onnxruntime": lambda: session.run(None, feed)}
    with torch.no_grad():
        expected = model(x)
        diffs = {"program": float((module(x) - expected).abs().max()),
                 "onnxruntime": float((torch.from_numpy(session.run(None, feed)[0]) - expected).abs().max())}
        for fn in arms.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(repeats):
            for arm, fn in arms.items():
                times[arm].append(timed(lambda fn=fn: [fn() for _ in range(inner)]) / inner)
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    return {"input": list(x.shape), "eager_work": work, "export_seconds": round(export_s, 2),
            "max_abs_diff": diffs, "median_ms": {k: round(v * 1e3, 4) for k, v in medians.items()},
            "ratio_to_eager": {k: round(v / medians["eager"], 3) for k, v in medians.items()}}


def table(results: dict[str, Any]) -> str:
    rows = [("case", "input", "eager work", "eager ms", "program", "onnxruntime", "max |diff|", "export s")]
    for name, r in results["cases"].items():
        rows.append((name, "x".join(map(str, r["input"])), r["eager_work"], f"{r['median_ms']['eager']:.3f}",
                     f"{r['ratio_to_eager']['program']:.2f}x", f"{r['ratio_to_eager']['onnxruntime']:.2f}x",
                     f"{max(r['max_abs_diff'].values()):.1e}", f"{r['export_seconds']:.1f}"))
    return "\n".join(["time relative to eager (median of repeats, 1 thread, no autograd)", *render(rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 7; 2 with --quick)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="default: all")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 2 calls per timing")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    if repeats < 1:
        parser.error("--repeats must be positive")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # deprecation notes inside torch.onnx
    logging.disable(logging.WARNING)  # torch.onnx: "torchvision is not installed"
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()
    cases = {name: measure(name, repeats, 2 if args.quick else 10) for name in args.cases}
    results: dict[str, Any] = {
        "benchmark": "export_speed",
        "command": " ".join(["python", "benchmarks/export_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(torch.get_num_threads()), "load_avg_at_start": load_at_start,
        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
        "versions": {"onnxruntime": ort.__version__},
        "config": {"repeats": repeats, "quick": args.quick}, "cases": cases,
    }
    return finish(results, started, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
