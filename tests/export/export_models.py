"""Small models for the export and compile tests: the four input-adaptive modules set up so that
their decisions differ per row, and grown models (own and traced)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import adaptnet as an
from adaptnet.nn.early_exit import EarlyExit
from adaptnet.nn.halting import ACT, PonderNet, RecurrentStep
from adaptnet.nn.moe import MoE


def early_exit(criterion: str, seed: int = 0) -> tuple[EarlyExit, torch.Tensor]:
    """An EarlyExit whose rows leave at different exits: the threshold is the median of exit 0's score."""
    torch.manual_seed(seed)
    model = EarlyExit.mlp(6, [16, 16, 16], 4, criterion=criterion).eval()
    x = torch.randn(32, 6) * 3
    if criterion == "patience":
        model.threshold = 1
    else:
        with torch.no_grad():
            p = model.exit_logits(x)[0].softmax(dim=1)
        score = p.amax(dim=1) if criterion == "confidence" else -(p * p.log()).sum(dim=1)
        # halfway between two rows' scores: no row sits on the threshold, where another runtime's
        # rounding (onnxruntime's exp and sums) could take the other decision
        ordered = score.sort().values
        model.threshold = float(ordered[15:17].mean())
    return model, x


class Counter(nn.Module):
    """A user's own net: two Linear layers around a ReLU (one unit group, ``fc1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class LSTMStep(nn.Module):
    """A halting step with a tuple state (LSTM ``(h, c)``): the loop carries a pytree."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.cell = nn.LSTMCell(features, hidden)
        self.output = nn.Linear(hidden, 3)
        self.halt = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, h: Any = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
        h = self.cell(x, h)
        return h, self.output(h[0]), self.halt(h[0])


def _spread(model: PonderNet | ACT, bias: float) -> PonderNet | ACT:
    with torch.no_grad():
        model.step.halt.weight.mul_(6.0)  # halting differs per sample
        model.step.halt.bias.fill_(bias)
    return model.eval()


def halting(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(32, 6)
    # biases picked so that rows halt after 1-4 (ponder), 2-5 (ponder_lstm), 2-5 (act) of 8 steps
    if kind == "ponder":
        return _spread(PonderNet(RecurrentStep(6, 16, 3), max_steps=8), 0.0), x
    if kind == "ponder_lstm":
        return _spread(PonderNet(LSTMStep(6, 16), max_steps=8), -1.0), x
    return _spread(ACT(RecurrentStep(6, 16, 3), max_steps=8), 0.5), x


def moe(top_k: int, capacity_factor: float | None) -> tuple[MoE, torch.Tensor]:
    torch.manual_seed(2)
    return MoE(8, 4, 16, top_k=top_k, capacity_factor=capacity_factor).eval(), torch.randn(4, 8, 8)


def grown(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A model after widen and deepen with the optimizer carried (and a step between)."""
    torch.manual_seed(3)
    model: nn.Module
    if kind == "mlp":
        model, x = an.AdaptiveMLP(6, [8, 8], 3, norm="batch"), torch.randn(16, 6)
    elif kind == "cnn":
        model, x = an.AdaptiveCNN(1, [4, 4], 3), torch.randn(8, 1, 8, 8)
    else:
        model, x = Counter(), torch.randn(16, 6)
        an.unit_groups(model, example_inputs=(x,))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model(x).square().mean().backward()
    opt.step()
    layer: str | int = "fc1" if kind == "traced" else 0
    an.widen(model, layer=layer, by=3, init="net2net", optimizer=opt)
    if kind != "traced":
        an.deepen(model, after=0, optimizer=opt)
    an.widen(model, layer=layer, by=2, init="random", optimizer=opt)
    return model.eval(), x
