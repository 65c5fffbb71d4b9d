"""Plateau detection and budgets shared by the policies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from adaptnet.nn.groups import UnitGroup


class Plateau:
    """Fires when the monitored value has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, patience: int, min_delta: float):
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.patience, self.min_delta = patience, float(min_delta)
        self.best = float("inf")
        self.wait = 0

    def update(self, value: float) -> bool:
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.wait = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.wait = float(state["best"]), int(state["wait"])


def params_per_unit(group: UnitGroup) -> int:
    """Parameters one unit of ``group`` owns (its rows, columns and norm parameters)."""
    return sum(p.numel() // p.shape[s.dim] for s in group.slices if isinstance(p := s.tensor, nn.Parameter))


class Budget:
    """Caps on growth: total parameters and the width of any one layer (None: no cap)."""

    def __init__(self, max_params: int | None = None, max_width: int | None = None):
        for name, value in (("max_params", max_params), ("max_width", max_width)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.max_params, self.max_width = max_params, max_width

    def units_allowed(self, model: nn.Module, group: UnitGroup, by: int) -> int:
        """How many of ``by`` new units ``group`` may get within the budget (0 to ``by``)."""
        allowed = by
        if self.max_width is not None:
            allowed = min(allowed, self.max_width - group.size)
        if self.max_params is not None:
            spare = self.max_params - sum(p.numel() for p in model.parameters())
            allowed = min(allowed, spare // max(1, params_per_unit(group)))
        return max(0, allowed)
