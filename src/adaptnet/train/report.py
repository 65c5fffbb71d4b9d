"""Reports of run directories: a PNG of the training curves and a text summary.

The PNG has four panels: losses (train dashed, validation solid) with every structural
edit as a vertical line coloured by its op, the validation metric, the width of every
layer, and the parameter count, all against epochs. Several runs are overlaid (one colour
each), so runs that differ in size or learning rate can be compared at a glance.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptnet.train.rundir import read_events, read_metrics

logger = logging.getLogger(__name__)

OP_COLORS = {"widen": "tab:green", "prune": "tab:red", "deepen": "tab:blue", "remove_layer": "tab:purple",
             "rollback": "black"}
METRIC_ORDER = ("val_accuracy", "val_r2", "val_mae")
LAYER_STYLES = ("-", "--", ":", "-.")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _column(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [_number(r.get(key)) for r in rows]


def metric_key(rows: Sequence[dict[str, Any]]) -> str | None:
    """The validation metric to show: accuracy, else R², else MAE, else any other ``val_*``."""
    keys = list(rows[0]) if rows else []
    found = [k for k in METRIC_ORDER if k in keys]
    found += [k for k in keys if k.startswith("val_") and k != "val_loss" and k not in found]
    return found[0] if found else None


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's folder name, with its parent when names repeat."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(run_dirs, names, strict=True)]


def write_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Plot one or more run directories into a PNG at ``out`` and return its path.

    Raises:
        ValueError: none of the run directories has any metrics yet.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    paths = [Path(d) for d in run_dirs]
    runs = [(label, read_metrics(p), read_events(p)) for label, p in zip(_labels(paths), paths, strict=True)]
    if not any(rows for _, rows, _ in runs):
        raise ValueError(f"no metrics to plot: {', '.join(map(str, paths))} has no metrics.csv rows yet")
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display needed, no global pyplot state
    ax_loss, ax_metric, ax_width, ax_params = fig.subplots(2, 2).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    ops_seen: set[str] = set()
    metric_names: set[str] = set()
    for (label, rows, events), color in zip(runs, colors, strict=True):
        if not rows:
            continue
        epochs = _column(rows, "epoch")
        ax_loss.plot(epochs, _column(rows, "train_loss"), "--", color=color, label=f"{label} train")
        if "val_loss" in rows[0]:
            ax_loss.plot(epochs, _column(rows, "val_loss"), "-", color=color, label=f"{label} val")
        key = metric_key(rows)
        if key is not None:
            metric_names.add(key)
            ax_metric.plot(epochs, _column(rows, key), "-", color=color, label=f"{label} {key}")
        depth = max(len(r.get("widths") or []) for r in rows)
        for layer in range(depth):
            widths = [_number((r.get("widths") or [])[layer]) if layer < len(r.get("widths") or []) else math.nan
                      for r in rows]
            ax_width.step(epochs, widths, LAYER_STYLES[layer % len(LAYER_STYLES)], where="post", color=color,
                          label=f"{label} layer {layer}")
        ax_params.step(epochs, _column(rows, "params"), "-", where="post", color=color, label=label)
        for event in events:
            op = str(event.get("op"))
            ops_seen.add(op)
            x = _number(event.get("epoch")) + 0.5  # edits happen after that epoch's metrics row
            for ax in (ax_loss, ax_params):
                ax.axvline(x, color=OP_COLORS.get(op, "tab:gray"), alpha=0.5, linewidth=1, linestyle=":")
    losses = [v for _, rows, _ in runs for k in ("train_loss", "val_loss") for v in _column(rows, k)]
    if losses and all(v > 0 for v in losses if not math.isnan(v)) and not all(math.isnan(v) for v in losses):
        ax_loss.set_yscale("log")
    ax_loss.set(title="loss (train dashed, validation solid)", xlabel="epoch", ylabel="loss")
    ax_metric.set(title="validation metric", xlabel="epoch", ylabel=", ".join(sorted(metric_names)) or "(none)")
    ax_width.set(title="width per layer", xlabel="epoch", ylabel="units / channels")
    ax_params.set(title="parameters", xlabel="epoch", ylabel="parameters")
    handles, labels = ax_loss.get_legend_handles_labels()
    handles += [Line2D([], [], color=OP_COLORS.get(op, "tab:gray"), linestyle=":") for op in sorted(ops_seen)]
    labels += [f"edit: {op}" for op in sorted(ops_seen)]
    ax_loss.legend(handles, labels, fontsize="small")
    for ax in (ax_metric, ax_width, ax_params):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    fig.suptitle("adaptnet: " + ", ".join(label for label, _, _ in runs))
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    logger.info("wrote %s", target)
    return target


def _series_line(name: str, values: list[float], epochs: list[float], higher_is_better: bool) -> str | None:
    finite = [(v, e) for v, e in zip(values, epochs, strict=True) if not math.isnan(v)]
    if not finite:
        return None
    best, at = (max if higher_is_better else min)(finite, key=lambda pair: pair[0])
    return f"{name}: {values[0]:.4g} -> {values[-1]:.4g} (best {best:.4g} at epoch {int(at)})"


def summarize(run_dir: str | Path) -> str:
    """A few lines on a run: epochs, losses and metrics (first -> last, best), size, edits."""
    path = Path(run_dir)
    rows, events = read_metrics(path), read_events(path)
    if not rows:
        return f"{path}: no epochs recorded yet"
    epochs = _column(rows, "epoch")
    lines = [f"run: {path}", f"epochs: {int(epochs[-1])} ({rows[-1].get('step', '?')} steps)"]
    for key in [k for k in rows[0] if k.endswith("_loss") or k.startswith("val_")]:
        line = _series_line(key, _column(rows, key), epochs, key in ("val_accuracy", "val_r2"))
        if line:
            lines.append(line)
    edits = [e for e in events if e.get("op") != "rollback"]
    widths_end, params_end = rows[-1].get("widths"), rows[-1].get("params")
    for e in edits:  # an edit after the last metrics row changed the final size
        if _number(e.get("epoch")) >= epochs[-1]:
            widths_end, params_end = e.get("widths_after", widths_end), e.get("params_after", params_end)
    lines.append(f"params: {rows[0].get('params')} -> {params_end}")
    lines.append(f"widths: {rows[0].get('widths')} -> {widths_end}")
    counts = Counter(str(e.get("op")) for e in edits)
    lines.append(f"edits: {len(edits)}" + (f" ({', '.join(f'{op} {n}' for op, n in sorted(counts.items()))})"
                                           if counts else ""))
    rollbacks = len(events) - len(edits)
    if rollbacks:
        lines.append(f"rollbacks: {rollbacks}")
    return "\n".join(lines)
