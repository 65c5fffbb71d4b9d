"""Loader overhead: the Trainer's default loader for tensors against a row-by-row DataLoader.

Given ``(inputs, targets)`` tensors, the Trainer batches them with ``TensorLoader`` (one
``index_select`` per tensor per batch). The alternative is the ``DataLoader`` over a
``TensorDataset`` with ``batch_size`` and ``shuffle=True``, which reads every row with
``__getitem__`` and stacks the rows with ``default_collate``. Both give the same batches
from the same random draws, so the two runs are identical (checked) and only the time differs.

Measured side by side in one run (interleaved repeats, median of the per-repeat ratios),
CPU time (``time.process_time``) with one thread, on digits (1079 training rows of 64
features, 359 validation rows, batch 64) and an ``AdaptiveMLP(64, [32], 10)`` trained with
Adam on the cross-entropy, no policies:

  (a) ``Trainer.fit`` epochs per CPU second, tensors vs ``DataLoader`` (train and validation data)
  (b) one pass over the training data alone (no model): CPU time per epoch, both loaders

Run: ``python benchmarks/loader_overhead.py`` (``--quick`` for a smoke run; ``--out`` for the
JSON path).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptnet as an
from _teacher_student import machine_info, render, write_json
from _timing import timed
from adaptnet.train.data import load_data
from adaptnet.train.loader import TensorLoader
from adaptnet.train.trainer import Trainer

BATCH, HIDDEN = 64, 32
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "loader_overhead.json"


def cpu_seconds(fn: Callable[[], Any]) -> float:
    """CPU seconds of this process while ``fn`` runs."""
    return timed(fn, clock=time.process_time)


def fit(model: nn.Module, train: Any, val: Any, epochs: int) -> tuple[Trainer, dict[str, list[float]]]:
    model = copy.deepcopy(model)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.functional.cross_entropy,
                      metrics=["accuracy"], seed=0, batch_size=BATCH, device="cpu")
    return trainer, trainer.fit(train, val, epochs=epochs)


def measure(repeats: int, epochs: int) -> dict[str, Any]:
    splits = load_data("digits", seed=0)
    assert splits.val is not None
    (x, y), (xv, yv) = splits.train, splits.val
    torch.manual_seed(0)
    model = an.AdaptiveMLP(x.shape[1], [HIDDEN], splits.info.out_features)
    arms = {
        "tensors": lambda: ((x, y), (xv, yv)),  # the Trainer's default: TensorLoader
        "dataloader": lambda: (DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True),
                               DataLoader(TensorDataset(xv, yv), batch_size=BATCH)),
    }
    # The same run either way: same batches, same random draws, same weights.
    (a, ha), (b, hb) = (fit(model, *arm(), epochs=2) for arm in arms.values())
    identical = ha == hb and all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(),
                                                                  strict=True))
    passes = {"tensors": TensorLoader(x, y, batch_size=BATCH, shuffle=True),
              "dataloader": DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)}
    fit_s: dict[str, list[float]] = {k: [] for k in arms}
    pass_s: dict[str, list[float]] = {k: [] for k in passes}
    for _ in range(repeats):
        for name, arm in arms.items():
            train, val = arm()
            fit_s[name].append(cpu_seconds(lambda train=train, val=val: fit(model, train, val, epochs)) / epochs)
        for name, loader in passes.items():
            pass_s[name].append(cpu_seconds(lambda loader=loader: [b for _ in range(10) for b in loader]) / 10)
    ratio = statistics.median(d / t for d, t in zip(fit_s["dataloader"], fit_s["tensors"], strict=True))
    pass_ratio = statistics.median(d / t for d, t in zip(pass_s["dataloader"], pass_s["tensors"], strict=True))
    return {
        "setting": {"data": "digits", "train_rows": len(x), "val_rows": len(xv), "batch": BATCH,
                    "model": f"AdaptiveMLP({x.shape[1]}, [{HIDDEN}], {splits.info.out_features})",
                    "epochs_per_fit": epochs, "repeats": repeats, "clock": "process_time"},
        "identical_runs": identical,
        "fit_epochs_per_cpu_s": {k: round(1 / statistics.median(v), 1) for k, v in fit_s.items()},
        "fit_speedup": round(ratio, 2),
        "pass_ms_per_epoch": {k: round(1e3 * statistics.median(v), 3) for k, v in pass_s.items()},
        "pass_speedup": round(pass_ratio, 1),
    }


def table(r: dict[str, Any]) -> str:
    fit_, pass_ = r["fit_epochs_per_cpu_s"], r["pass_ms_per_epoch"]
    rows = [("measure", "DataLoader (rows)", "tensors (TensorLoader)", "speed-up"),
            ("Trainer.fit, epochs / CPU s", f"{fit_['dataloader']}", f"{fit_['tensors']}", f"{r['fit_speedup']}x"),
            ("a pass over the data, CPU ms", f"{pass_['dataloader']}", f"{pass_['tensors']}",
             f"{r['pass_speedup']}x")]
    s = r["setting"]
    head = (f"{s['data']}: {s['train_rows']} train / {s['val_rows']} val rows, batch {s['batch']}, {s['model']}, "
            f"{s['repeats']} interleaved repeats of {s['epochs_per_fit']} epochs; "
            f"identical runs: {r['identical_runs']}")
    return "\n".join([head, *render(rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats (default 15)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per timed fit (default 10)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (2 repeats of 2 epochs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats, epochs = (2, 2) if args.quick else (args.repeats, args.epochs)
    began = time.perf_counter()
    results = {**measure(repeats, epochs), "machine": machine_info(args.threads),
               "seconds": round(time.perf_counter() - began, 1)}
    write_json(results, args.out)
    print(table(results))
    print(f"\n{results['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
