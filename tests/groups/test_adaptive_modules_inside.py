"""A user's model that holds one of adaptnet's input-adaptive modules (EarlyExit, PonderNet, ACT,
MoE) traces: on fake tensors their eval forward takes the fixed-shape path that torch.export takes
(a cond per exit, a while_loop, capacity buffers), whose dims are kept fixed; the layers around
them stay groups, and widening those keeps the output and the per-row decisions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import adaptnet as an
from adaptnet.nn.early_exit import EarlyExit
from adaptnet.nn.halting import ACT, PonderNet, RecurrentStep
from adaptnet.nn.moe import MoE


class Holder(nn.Module):
    """``stem`` (Linear + ReLU) -> the adaptive module -> ``mlp`` (a hidden layer of its own)."""

    def __init__(self, inner: nn.Module, inner_in: int, inner_out: int):
        super().__init__()
        self.stem, self.inner = nn.Linear(5, inner_in), inner
        self.up, self.down = nn.Linear(inner_out, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(torch.relu(self.stem(x)))
        return self.down(torch.tanh(self.up(h)))


def _halting(kind: type[PonderNet] | type[ACT], bias: float) -> nn.Module:
    model = kind(RecurrentStep(8, 16, 4), max_steps=6)
    with torch.no_grad():
        model.step.halt.weight.mul_(6.0)  # rows halt after different numbers of steps
        model.step.halt.bias.fill_(bias)
    return model


INNER: dict[str, Callable[[], tuple[nn.Module, int, int]]] = {
    "early_exit": lambda: (EarlyExit.mlp(8, [8, 8], 4, threshold=0.4), 8, 4),
    "pondernet": lambda: (_halting(PonderNet, 0.0), 8, 4),
    "act": lambda: (_halting(ACT, 0.5), 8, 4),
    "moe": lambda: (MoE(8, 4, 16, top_k=2, capacity_factor=0.75), 8, 8),
}
# the adaptive module's first block reads the stem outside any cond: the stem is an exact group
EXPECTED = {"early_exit": ["stem", "up"], "pondernet": ["up"], "act": ["up"], "moe": ["up"]}


def _decisions(model: nn.Module) -> object:
    if isinstance(model, EarlyExit):
        return model.last_stats.counts if model.last_stats is not None else None
    if isinstance(model, PonderNet | ACT):
        return None if model.last_steps is None else model.last_steps.tolist()
    assert isinstance(model, MoE)
    return None if model.last_stats is None else (model.last_stats.routed_per_expert, model.last_stats.dropped)


@pytest.mark.parametrize("name", list(INNER))
def test_the_layers_around_an_adaptive_module_are_groups_that_widen_exactly(name: str) -> None:
    torch.manual_seed(0)
    inner, n_in, n_out = INNER[name]()
    model = Holder(inner, n_in, n_out).double()
    x = torch.randn(32, 5, dtype=torch.float64) * 2
    model.train()
    groups = an.unit_groups(model, example_inputs=(x,))
    assert sorted(groups) == EXPECTED[name]
    assert model.training  # tracing left the modes as they were
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.eval()
    with torch.no_grad():
        before = model(x)
    decided = _decisions(model.inner)
    assert decided is not None  # the eager forward still compacts and records its decisions
    for group in groups:
        an.widen(model, group, 3, init="net2net", optimizer=opt)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max().item() <= 1e-10
    assert _decisions(model.inner) == decided
    model.train()
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
