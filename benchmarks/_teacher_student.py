"""The student–teacher setting of the GradMax paper (Evci et al., ICLR 2022), shared by
``gradmax_teacher_student.py`` and ``optimizer_carry.py``.

As the paper's ``Student_Teacher.ipynb`` runs it: a teacher 10 -> 10 -> 10 without bias,
weights U(-1, 1), ReLU; 1000 inputs x ~ N(0, 1) labelled by the teacher, used as one full
batch; a bias-free student 10 -> 5 -> 10 with Glorot-uniform weights and a ReLU whose
derivative at 0 is 1, trained on the MSE; one unit added to its hidden layer after steps
200, 400, 600, 800 and 1000 (the notebook's step indices, counted from 0), 1500 steps in all.

The student is an ``adaptnet.AdaptiveMLP(10, [5], 10)`` (default activation ``"relu"`` =
gradient 1 at 0). AdaptiveMLP has no bias switch: without a norm
every Linear has a bias. ``bias_free`` removes them the way PyTorch declares a bias-free
Linear (``linear.bias = None``); adaptnet's unit groups list a bias slice only when there
is one, so the student is exactly the notebook's bias-free network, edits included.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adaptnet as an

IN, TEACHER_HIDDEN, OUT, N_DATA = 10, 10, 10, 1000
SMALL, BIG = 5, 10
TEACHER_SEED = 0  # the notebook fixes teacher and data (tf.random.set_seed(0)); seeds vary the student
GROW_AT = (200, 400, 600, 800, 1000)  # grow after the update of these 0-based steps
STEPS = 1500
QUICK_GROW_AT = (20, 40, 60, 80, 100)
QUICK_STEPS = 150
RESULTS = Path(__file__).resolve().parent / "results"


def teacher_data(seed: int = TEACHER_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (1000, 10) ~ N(0, 1) and the teacher's outputs ``y`` (1000, 10)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.rand(TEACHER_HIDDEN, IN, generator=g) * 2 - 1  # U(-1, 1), as weights_range=1
    w2 = torch.rand(OUT, TEACHER_HIDDEN, generator=g) * 2 - 1
    x = torch.randn(N_DATA, IN, generator=g)
    y = (x @ w1.T).clamp_min(0) @ w2.T
    return x, y


def bias_free(model: an.AdaptiveMLP) -> an.AdaptiveMLP:
    """Drop every bias of a norm-free AdaptiveMLP (``linear.bias = None``)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.bias = None
    return model


def student(width: int, seed: int) -> an.AdaptiveMLP:
    """A bias-free ``AdaptiveMLP(10, [width], 10)`` with Glorot-uniform weights (Keras' default)."""
    model = bias_free(an.AdaptiveMLP(IN, [width], OUT))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=g)
    return model


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"torch": torch.__version__, "adaptnet": an.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": usable,
            "threads": threads}


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def render(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(n) for cell, n in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * n for n in widths))
    return lines


def finish(results: dict[str, Any], started: float, out: Path, table: Callable[[dict[str, Any]], str]) -> int:
    """The end of a benchmark's ``main``: stamp the run time, print the table, write the JSON."""
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    write_json(results, out)
    print(f"\n{results['seconds']} s; wrote {out}")
    return 0
