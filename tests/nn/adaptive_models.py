"""The four input-adaptive modules, small and in float64, set up so that their decisions differ per
row: an early exit whose threshold is exit 0's median confidence, halting heads scaled so that rows
halt after different steps, an MoE dropless and one whose capacity drops assignments."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adaptnet.nn.early_exit import EarlyExit
from adaptnet.nn.halting import ACT, PonderNet, RecurrentStep
from adaptnet.nn.moe import MoE


def _early_exit() -> tuple[nn.Module, torch.Tensor]:
    model = EarlyExit.mlp(6, [16, 16, 16], 4).double()
    x = torch.randn(64, 6, dtype=torch.float64) * 3
    with torch.no_grad():  # rows leave at different exits: the threshold is exit 0's median confidence
        model.threshold = float(model.exit_logits(x)[0].softmax(dim=1).amax(dim=1).median())
    return model, x


def _halting(kind: type[PonderNet] | type[ACT], bias: float) -> tuple[nn.Module, torch.Tensor]:
    model = kind(RecurrentStep(6, 16, 3), max_steps=8).double()
    with torch.no_grad():  # halting differs per row
        model.step.halt.weight.mul_(6.0)
        model.step.halt.bias.fill_(bias)
    return model, torch.randn(64, 6, dtype=torch.float64)


BUILD: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "early_exit": _early_exit,
    "pondernet": lambda: _halting(PonderNet, 0.0),
    "act": lambda: _halting(ACT, 0.5),
    "moe": lambda: (MoE(8, 4, 16, top_k=2).double(), torch.randn(4, 8, 8, dtype=torch.float64)),
    "moe_capacity": lambda: (MoE(8, 4, 16, top_k=2, capacity_factor=1.0).double(),
                             torch.randn(4, 8, 8, dtype=torch.float64)),
}


