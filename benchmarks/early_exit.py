"""Early exits: do the FLOPs saved by leaving early turn into wall-clock saved on batches?

The MLP tasks train an ``EarlyExit.mlp(d, [1024] * 4, C)`` (a Linear+ReLU block and a linear
exit head per layer; wide, so that the three 1024 x 1024 blocks dominate the compute), the image
task a convolutional ``EarlyExit`` (``_early_exit_tasks.conv_early_exit``), each with the
``Trainer`` (every exit's loss, equal weights; Adam, cosine learning rate):

  digits        scikit-learn's 8x8 digits (10 classes), 60/20/20 stratified split. Easy: the
                first exit is about as accurate as the last.
  mixture       a generated task that mixes easy and hard samples, by design: x ~ U(-1, 1)^2;
                outside the central square |x|_inf < 0.5 (75% of the samples) the class is the
                quadrant of x (linearly separable: the first exit gets it); inside it (25%) the
                class is (i + 2 j) mod 4 for the cell (i, j) of a 4 x 4 checkerboard over that
                square, which needs depth. 12000 / 8000 / 8000 rows (train / validation / test).
  shifted       images, easy and hard by design: each digit of the digits split is drawn 8 times
                on a 12 x 12 canvas (plus pixel noise, std 0.1); 60% of the copies sit in the
                centre (easy: one conv layer and a linear head get them), 40% at a random offset
                (hard: a linear head on one layer's features depends on the position; later
                layers see wider neighbourhoods). Blocks: Conv2d 3x3 1 -> 48, then three
                48 -> 48 (+ ReLU), all at 12 x 12; heads Flatten + Linear. A convolution reuses
                each weight at every position of every image, so unlike a Linear on a few rows it
                stays compute-bound on the few images still going. 8624 / 2872 / 2880 images.
  checkerboard  (only with ``--task checkerboard``) x ~ U(-1, 1)^2, class = (i + 2 j) mod 4 for
                the cell of a 6 x 6 grid over the whole square: every sample is hard, so no exit
                can leave early without losing accuracy; kept as the counter-example.

The confidence threshold is calibrated on the validation split (``calibrate_threshold``, at
most half an accuracy point below the final exit). On the test split, at batch sizes 1, 64, 256
and 1024, side by side in the same run (each repeat times the three one after the other; the
median over repeats is reported, per sample):

  (a) full   every block and the final head (``forward_full``): the network without exits
  (b) early  ``model(x)`` in eval mode: active-set compaction, rows leave the batch at their
             exit and later blocks run on the rows still undecided
  (c) loop   what public early-exit code does: each sample alone through the blocks,
             stopping at its exit (the same decisions as (b))

Batches cycle through the shuffled test split. Speed-up = time of (a) / time of (b) or (c),
in wall-clock; a steady clock is recorded too: on the CPU the CPU time of the timing thread (on a
shared, loaded machine it is the steadier of the two: time spent descheduled does not count), on
CUDA (``--device cuda``) wall-clock read after synchronising the device, as every CUDA time here.
The other criteria (entropy, patience) are calibrated the same way and reported without
timings. Also reported: the steady time per row of block 2 on 1 to 256 rows, and where (a) and (b)
spend their steady time at batch 64 (per block and head, by forward hooks; "other" is the rest: the
exit rule, the compaction, Python, freeing memory).

Run: ``python benchmarks/early_exit.py`` (``--quick`` for a smoke run, ``--task``, ``--device``,
``--threads``, ``--repeats``, ``--out`` for the JSON path, ``--models DIR`` to keep the trained
weights and time them again without training).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _early_exit_tasks import build
from _teacher_student import RESULTS, finish, machine_info, render
from _timing import DEVICE_HELP, device_info, device_option, steady_clock, steady_clock_name, synchronize
from adaptnet.nn.early_exit import EarlyExit, calibrate_threshold
from adaptnet.nn.flops import count_macs
from adaptnet.train.trainer import Trainer

DEFAULT_OUT = RESULTS / "early_exit.json"
BATCH_SIZES = (1, 64, 256, 1024)
MAX_DROP = 0.01  # the accuracy the target allows to lose (on the test split)
# The threshold is calibrated on the validation split for half that: the test split is other rows,
# and the accuracy difference between two splits of 8000 rows has a standard error of ~0.2 points.
CALIBRATION_DROP = 0.005
ROWS_PROBED = (1, 4, 16, 64, 256)
DEFAULT_TASKS = ("digits", "mixture", "shifted")
TASKS: dict[str, dict[str, Any]] = {
    "checkerboard": {"epochs": 10, "lr": 2e-3, "rows": (6000, 4000, 4000)},
    "digits": {"epochs": 30, "lr": 1e-3},
    "mixture": {"epochs": 6, "lr": 2e-3, "rows": (12000, 8000, 8000)},
    "shifted": {"epochs": 10, "lr": 2e-3, "copies": 8, "canvas": 12, "channels": 48},
}
FULL = {"width": 1024, "blocks": 4, "repeats": 7, "rows_bs1": 200, "rows_batched": 2048}
QUICK = {"width": 64, "blocks": 4, "repeats": 2, "rows_bs1": 50, "rows_batched": 1024, "epochs": 2,
         "rows": (1000, 500, 500), "copies": 1, "channels": 8}


def loop_one_by_one(model: EarlyExit, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(c): the per-sample loop of public early-exit code (confidence rule, one row at a time)."""
    out = []
    for row in x:
        h = row[None]  # (1, F)
        for block, head in zip(model.blocks, model.heads, strict=True):
            h = block(h)
            z = head(h)
            if torch.softmax(z, dim=1).max() >= threshold:
                break
        out.append(z)
    return torch.cat(out)


def batches(x: torch.Tensor, size: int, rows: int) -> list[torch.Tensor]:
    """``rows`` rows (cycling through ``x``) in batches of ``size``."""
    index = torch.arange(max(rows, size)) % x.shape[0]
    return [x[index[i:i + size]] for i in range(0, len(index), size)]


def time_per_sample(fn: Callable[[torch.Tensor], torch.Tensor], parts: list[torch.Tensor],
                    device: torch.device) -> tuple[float, float]:
    """Seconds per sample: wall-clock, and the steady clock of ``device`` (``_timing.steady_clock``)."""
    clock = steady_clock(device)
    synchronize(device)
    wall, steady = time.perf_counter(), clock()
    for part in parts:
        fn(part)
    synchronize(device)
    rows = sum(p.shape[0] for p in parts)
    return (time.perf_counter() - wall) / rows, (clock() - steady) / rows


def measure(model: EarlyExit, x: torch.Tensor, threshold: float, config: dict[str, Any],
            device: torch.device) -> dict[str, Any]:
    arms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "full": model.forward_full,
        "early": model,
        "loop": lambda part: loop_one_by_one(model, part, threshold),
    }
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]
    out = {}
    for size in BATCH_SIZES:
        parts = batches(x, size, config["rows_bs1"] if size == 1 else config["rows_batched"])
        # The loop's cost per sample does not depend on the batch: time it on fewer rows.
        rows = {"full": parts, "early": parts, "loop": parts[:max(1, config["rows_bs1"] // size)]}
        for fn in arms.values():  # warm-up (the first eval forward also measures the MACs per exit)
            fn(parts[0])
        wall: dict[str, list[float]] = {name: [] for name in arms}
        steady: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(config["repeats"]):
            for name, fn in arms.items():
                w, c = time_per_sample(fn, rows[name], device)
                wall[name].append(w)
                steady[name].append(c)
        median = {name: statistics.median(v) for name, v in wall.items()}
        median_steady = {name: statistics.median(v) for name, v in steady.items()}
        out[str(size)] = {
            "rows": {name: sum(p.shape[0] for p in r) for name, r in rows.items()},
            "us_per_sample": {name: 1e6 * t for name, t in median.items()},
            "speedup_early_over_full": median["full"] / median["early"],
            "speedup_loop_over_full": median["full"] / median["loop"],
            "steady_us_per_sample": {name: 1e6 * t for name, t in median_steady.items()},
            "steady_speedup_early_over_full": median_steady["full"] / median_steady["early"],
            "steady_speedup_loop_over_full": median_steady["full"] / median_steady["loop"],
            "all_repeats_wall_us": {name: [round(1e6 * t, 3) for t in v] for name, v in wall.items()},
        }
    return out


def block_cost_by_rows(model: EarlyExit, x: torch.Tensor, repeats: int, device: torch.device) -> dict[str, float]:
    """Steady microseconds per row of the second block on ``r`` rows (random features): why leaving
    rows of a small batch saves less than their FLOPs (a Linear on few rows reads its whole weight),
    or does not (a convolution reuses each weight at every position)."""
    block, shape, clock = model.blocks[1], model.blocks[0](x[:1]).shape[1:], steady_clock(device)
    inputs = {r: torch.randn(r, *shape, generator=torch.Generator().manual_seed(r)).to(device) for r in ROWS_PROBED}
    times: dict[int, list[float]] = {r: [] for r in ROWS_PROBED}
    for _ in range(repeats):
        for r, h in inputs.items():  # interleaved: every repeat times every size
            calls = max(1, 256 // r)
            start = clock()
            for _ in range(calls):
                block(h)
            times[r].append((clock() - start) / (calls * r))
    return {str(r): 1e6 * statistics.median(v) for r, v in times.items()}


def cost_by_part(model: EarlyExit, x: torch.Tensor, repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Steady microseconds per sample that (a) and (b) spend in each block and head at batch 64
    (forward hooks; on CUDA each hook synchronises), and outside them ("other": the exit rule,
    compaction, Python, freeing memory). Keys "block i" and "head i" index ``model.blocks`` and
    ``model.heads`` (the table counts from 1)."""
    spent: dict[str, float] = {}
    clock = steady_clock(device)

    def enter(name: str) -> Callable[..., None]:
        return lambda module, inputs: spent.__setitem__(name, spent.get(name, 0.0) - clock())

    def leave(name: str) -> Callable[..., None]:
        return lambda module, inputs, output: spent.__setitem__(name, spent[name] + clock())

    handles = [hook for i, pair in enumerate(zip(model.blocks, model.heads, strict=True))
               for name, module in zip((f"block {i}", f"head {i}"), pair, strict=True)
               for hook in (module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave(name)))]
    parts = batches(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))], 64, 1024)
    out = {}
    try:
        for arm, fn in (("full", model.forward_full), ("early", model)):
            runs = []
            for _ in range(repeats):
                spent.clear()
                start = clock()
                for part in parts:
                    fn(part)
                runs.append({**spent, "other": clock() - start - sum(spent.values())})
            out[arm] = {k: 1e6 * statistics.median(r[k] for r in runs) / 1024 for k in runs[0]}
    finally:
        for handle in handles:
            handle.remove()
    return out


def head_macs(model: EarlyExit, x: torch.Tensor) -> list[int]:
    """MACs per sample of each head alone."""
    out, h = [], x[:1]
    for block, head in zip(model.blocks, model.heads, strict=True):
        h = block(h)
        out.append(count_macs(head, h))
    return out


def run_task(name: str, config: dict[str, Any], models: Path | None, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(0)
    data, model, described = build(name, config)
    data = {split: (x.to(device), y.to(device)) for split, (x, y) in data.items()}
    model.to(device)
    x, y = data["test"]
    classes = int(data["train"][1].max()) + 1
    # Training is deterministic (seed 0): ``--models`` keeps the weights, so that the timing can be
    # taken again (on a quieter machine) without training again.
    size = f"c{config['channels']}" if name == "shifted" else str(config["width"])
    saved = None if models is None else models / f"{name}-{size}x{config['blocks']}-{config['epochs']}.pt"
    loaded = saved is not None and saved.exists()
    if loaded:
        assert saved is not None
        model.load_state_dict(torch.load(saved, map_location=device, weights_only=True))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
        trainer = Trainer(model, opt, F.cross_entropy, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=config["epochs"]), metrics=["accuracy"], batch_size=64, device=device, seed=0)
        trainer.fit(data["train"], data["val"], epochs=config["epochs"])
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), saved)
    train_seconds = time.perf_counter() - started
    model.eval()
    criteria = {}
    with torch.inference_mode():  # as a deployment would run it (all three arms alike)
        every = model.exit_logits(x)
        accuracy = [float((z.argmax(dim=1) == y).double().mean()) for z in every]
        for criterion in ("entropy", "patience", "confidence"):  # confidence last: the one timed
            model.set_criterion(criterion)
            threshold, report = calibrate_threshold(model, *data["val"], max_accuracy_drop=CALIBRATION_DROP)
            model.threshold = threshold
            early = model(x)
            stats = model.last_stats
            assert stats is not None
            criteria[criterion] = {
                "threshold": threshold, "val_accuracy": report["accuracy"],
                "val_final_accuracy": report["final_accuracy"],
                "accuracy": float((early.argmax(dim=1) == y).double().mean()),
                "exit_counts": stats.counts, "mean_depth": stats.mean_depth, "flops_fraction": stats.flops_fraction,
                # the plain network (a) runs every block and the final head only
                "macs_ratio_vs_full_network": stats.macs / (x.shape[0] * (
                    model.exit_macs(x)[-1] - sum(head_macs(model, x)[:-1]))),
            }
        loop = loop_one_by_one(model, x, threshold)
        criteria["confidence"]["accuracy_loop"] = float((loop.argmax(dim=1) == y).double().mean())
        timing = measure(model, x, threshold, config, device)
        rows_cost = block_cost_by_rows(model, x, 2 * config["repeats"], device)
        parts_cost = cost_by_part(model, x, config["repeats"], device)
    q = criteria["confidence"]
    targets = {  # issue 5: >= 50% of FLOPs saved at <= 1 point accuracy loss, >= 2x wall-clock at 64 and 256
        "flops_saved": 1 - q["flops_fraction"], "test_accuracy_drop": accuracy[-1] - q["accuracy"],
        "speedup_64": timing["64"]["speedup_early_over_full"], "speedup_256": timing["256"]["speedup_early_over_full"],
    }
    targets["met"] = bool(targets["flops_saved"] >= 0.5 and targets["test_accuracy_drop"] <= MAX_DROP + 1e-12
                          and min(targets["speedup_64"], targets["speedup_256"]) >= 2)
    return {"config": {**config, "model": described, "classes": classes, "input_shape": list(x.shape[1:]),
                       "rows": {k: int(v[0].shape[0]) for k, v in data.items()},
                       "train_seconds": round(train_seconds, 1), "weights_loaded_from": str(saved) if loaded else None},
            "accuracy_per_exit": accuracy, "criteria": criteria, "timing": timing, "targets": targets,
            "block_steady_us_per_row_by_rows": rows_cost, "steady_us_per_sample_by_part_batch_64": parts_cost}


def table(results: dict[str, Any]) -> str:
    m, steady = results["machine"], "CUDA-synced" if "gpu" in results["machine"] else "CPU"
    lines = [f"early_exit: torch {m['torch']}, threads {m['threads']}, CPUs {m['cpu_count']} "
             f"({m['cpus_usable']} usable), {m['cpu']}" + (f"; timed on {m['gpu']}" if "gpu" in m else "")]
    for name, r in results["tasks"].items():
        c, q = r["config"], r["criteria"]["confidence"]
        lines += ["", f"== {name}: {c['model']}, {c['epochs']} epochs ({c['train_seconds']} s); rows {c['rows']}; "
                      f"median of {c['repeats']} repeats",
                  f"test accuracy per exit {[round(a, 4) for a in r['accuracy_per_exit']]}", ""]
        rows = [("criterion", "threshold", "test acc.", "final exit acc.", "exits per head", "mean depth",
                 "FLOPs fraction", "MACs vs (a)")]
        for crit, s in r["criteria"].items():
            rows.append((crit, f"{s['threshold']:.4g}", f"{s['accuracy']:.4f}", f"{r['accuracy_per_exit'][-1]:.4f}",
                         str(s["exit_counts"]), f"{s['mean_depth']:.2f}", f"{s['flops_fraction']:.3f}",
                         f"{s['macs_ratio_vs_full_network']:.3f}"))
        lines += [*render(rows), ""]
        rows = [("batch", "(a) full us/sample", "(b) early us/sample", "(c) loop us/sample", "(b) speed-up",
                 "(c) speed-up", f"{steady}-time speed-up (b), (c)")]
        for size, t in r["timing"].items():
            us = t["us_per_sample"]
            rows.append((size, f"{us['full']:.1f}", f"{us['early']:.1f}", f"{us['loop']:.1f}",
                         f"{t['speedup_early_over_full']:.2f}x", f"{t['speedup_loop_over_full']:.2f}x",
                         f"{t['steady_speedup_early_over_full']:.2f}x, {t['steady_speedup_loop_over_full']:.2f}x"))
        lines += render(rows)
        lines.append(f"confidence threshold {q['threshold']:.4g} (calibrated on validation, max drop "
                     f"{CALIBRATION_DROP:.1%}); speed-up from MACs alone: {1 / q['macs_ratio_vs_full_network']:.2f}x")
        cost = r["block_steady_us_per_row_by_rows"]
        lines.append(f"block 2 {steady} us per row, on " + ", ".join(f"{k} rows: {v:.1f}" for k, v in cost.items()))
        by_part = r["steady_us_per_sample_by_part_batch_64"]
        parts = [(f"{kind} {i}", f"{kind} {i + 1}") for i in range(c["blocks"]) for kind in ("block", "head")]
        lines.append(f"batch 64, {steady} us per sample in each part, (a) / (b): " + ", ".join(
            f"{label} " + " / ".join(f"{b[k]:.1f}" if k in b else "-" for b in (by_part["full"], by_part["early"]))
            for k, label in [*parts, ("other", "other")]))
        g = r["targets"]
        lines.append(f"targets (>= 50% FLOPs saved, <= 1 point lost on test, >= 2x at batch 64 and 256): FLOPs saved "
                     f"{g['flops_saved']:.1%}, test accuracy drop {100 * g['test_accuracy_drop']:.2f} points, "
                     f"{g['speedup_64']:.2f}x and {g['speedup_256']:.2f}x: {'MET' if g['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all",
                        help=f"which task (default all: {', '.join(DEFAULT_TASKS)})")
    parser.add_argument("--device", type=device_option, default=torch.device("cpu"), help=DEVICE_HELP)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 7; 2 with --quick)")
    parser.add_argument("--models", type=Path, default=None,
                        help="folder for the trained weights: reused when there, saved after training otherwise")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: width 64, 4 blocks, 2 epochs, fewer rows, 2 repeats")
    args = parser.parse_args(argv)
    base = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        base["repeats"] = args.repeats
    if base["repeats"] < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be positive integers")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tasks = {}
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    for name in DEFAULT_TASKS if args.task == "all" else [args.task]:
        config = {**TASKS[name], **base} if args.quick else {**base, **TASKS[name]}
        tasks[name] = run_task(name, config, args.models, args.device)
    results: dict[str, Any] = {
        "benchmark": "early_exit",
        "command": " ".join(["python", "benchmarks/early_exit.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine_info(torch.get_num_threads()), **device_info(args.device)},
        "steady_clock": steady_clock_name(args.device),
        "config": {"model": "EarlyExit: Linear+ReLU (MLP tasks) or Conv+ReLU (shifted) blocks, linear heads",
                   "optimizer": "Adam, cosine LR",
                   "batch_size_train": 64, "max_accuracy_drop": MAX_DROP,
                   "calibration_max_accuracy_drop": CALIBRATION_DROP, "batch_sizes": list(BATCH_SIZES),
                   "timed_criterion": "confidence", "quick": args.quick},
        "tasks": tasks,
        "load_avg_at_start": load_at_start,
        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    return finish(results, started, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
