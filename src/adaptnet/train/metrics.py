"""Validation metrics by name, computed over a whole validation set at once."""

from __future__ import annotations

from collections.abc import Callable

import torch

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows whose arg-max class equals the target. ``outputs``: (N, C); ``targets``: (N,)."""
    return float((outputs.argmax(dim=1) == targets).to(torch.float64).mean())


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs - targets.reshape(outputs.shape)).abs().to(torch.float64).mean())


def r2(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Coefficient of determination over all output columns."""
    t = targets.reshape(outputs.shape).to(torch.float64)
    residual = ((outputs.to(torch.float64) - t) ** 2).sum()
    total = ((t - t.mean(dim=0)) ** 2).sum()
    return float(1 - residual / total) if total > 0 else float("nan")


METRICS: dict[str, MetricFn] = {"accuracy": accuracy, "mae": mae, "r2": r2}


def resolve(metrics: dict[str, MetricFn] | tuple[str, ...] | list[str]) -> dict[str, MetricFn]:
    if isinstance(metrics, dict):
        return metrics
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    return {m: METRICS[m] for m in metrics}
