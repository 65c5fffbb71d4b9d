"""Plateau detection and budgets shared by the policies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adaptnet.groups import macs
from adaptnet.nn.groups import UnitGroup, unit_positions


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
    """Parameters one unit of ``group`` owns (its rows, columns and norm parameters; a head owns
    head_dim rows of each projection)."""
    return sum(p.numel() // p.shape[s.dim] * unit_positions(s, group.size).shape[1]
               for s in group.slices if isinstance(p := s.tensor, nn.Parameter))


def macs_per_unit(model: nn.Module, group: UnitGroup, x: torch.Tensor) -> tuple[int, int]:
    """(forward MACs per sample now, extra MACs per sample of one more unit in ``group``).

    Counted from the traced graph (``adaptnet.groups.macs``) for samples shaped like ``x``: every
    product the unit takes part in (convolutions, residual partners, attention) is counted.
    """
    now = macs(model, inputs=(x,))
    return now, macs(model, {group.name: 1}) - now


class Budget:
    """Caps on growth (None: no cap).

    Args:
        max_params: total parameters.
        max_width: units of any one layer.
        max_flops: forward multiply-accumulates per sample (see ``adaptnet.nn.flops``).
    """

    def __init__(self, max_params: int | None = None, max_width: int | None = None, max_flops: int | None = None):
        for name, value in (("max_params", max_params), ("max_width", max_width), ("max_flops", max_flops)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.max_params, self.max_width, self.max_flops = max_params, max_width, max_flops

    def units_allowed(self, model: nn.Module, group: UnitGroup, by: int, x: torch.Tensor | None = None) -> int:
        """How many of ``by`` new units ``group`` may get within the budget (0 to ``by``).

        ``x`` (a probe input batch) is needed for a FLOPs budget.
        """
        allowed = by
        if self.max_width is not None:
            allowed = min(allowed, self.max_width - group.size)
        if self.max_params is not None:
            spare = self.max_params - sum(p.numel() for p in model.parameters())
            allowed = min(allowed, spare // max(1, params_per_unit(group)))
        if self.max_flops is not None and allowed > 0:
            if x is None:
                raise ValueError("a max_flops budget needs a probe batch")
            now, per_unit = macs_per_unit(model, group, x)
            allowed = min(allowed, (self.max_flops - now) // max(1, per_unit))
        return max(0, allowed)
