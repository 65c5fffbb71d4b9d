"""Active-set compaction in PonderNet and ACT: outputs, steps, states, extra inputs and gradients
equal those of running each sample alone, and of a loop that masks halted rows instead."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from adaptnet.nn.halting import ACT, PonderNet, RecurrentStep


def _spread(model: PonderNet | ACT) -> PonderNet | ACT:
    with torch.no_grad():
        model.step.halt.weight.mul_(6.0)  # halting differs per sample
        model.step.halt.bias.fill_(-2.0)
    return model


class LSTMStep(nn.Module):
    """A step with a tuple state and an extra per-sample input (``gain``, (B,))."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.cell = nn.LSTMCell(features, hidden)
        self.output = nn.Linear(hidden, 2)
        self.halt = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, h: Any = None, *, gain: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        h = self.cell(x * gain[:, None], h)
        return h, self.output(h[0]), self.halt(h[0])


def masked_reference(model: PonderNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic PonderNet halting written without compaction (whole batch every step)."""
    h, survive = None, x.new_ones(x.shape[0])
    done = torch.zeros(x.shape[0], dtype=torch.bool)
    out, steps = None, torch.zeros(x.shape[0], dtype=torch.long)
    for n in range(model.max_steps):
        h, y, halt = model.step(x, h)
        survive = survive * (1 - torch.sigmoid(halt))
        new = ~done if n == model.max_steps - 1 else (survive <= 0.5) & ~done
        out = torch.where(new[:, None], y, y if out is None else out)
        steps = torch.where(new, n + 1, steps)
        done = done | new
    assert out is not None
    return out, steps


def test_pondernet_matches_the_masked_loop() -> None:
    torch.manual_seed(0)
    model = _spread(PonderNet(RecurrentStep(5, 16, 2), max_steps=12)).double().eval()
    x = torch.randn(64, 5, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        ref, steps = masked_reference(model, x)  # type: ignore[arg-type]
    assert model.last_steps is not None and torch.equal(model.last_steps, steps)
    assert 1 < steps.float().mean() < 12 and steps.min() < steps.max()
    assert (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize("cls", [PonderNet, ACT])
def test_tuple_states_and_extra_inputs_follow_the_rows(cls: type) -> None:
    torch.manual_seed(1)
    model = _spread(cls(LSTMStep(3, 8), max_steps=9)).double().eval()
    x, gain = torch.randn(30, 3, dtype=torch.float64), torch.rand(30, dtype=torch.float64) * 4
    with torch.no_grad():
        out = model(x, gain=gain)
        steps, (h, c) = model.last_steps.clone(), model.final_state  # type: ignore[union-attr,misc]
        assert steps.min() < steps.max()
        for i in range(x.shape[0]):
            alone = model(x[i : i + 1], gain=gain[i : i + 1])
            assert model.last_steps.item() == steps[i].item()  # type: ignore[union-attr]
            assert (alone - out[i : i + 1]).abs().max() < 1e-12
            assert (model.final_state[0] - h[i : i + 1]).abs().max() < 1e-12
            assert (model.final_state[1] - c[i : i + 1]).abs().max() < 1e-12


def test_act_training_gradients_equal_the_sum_over_samples() -> None:
    torch.manual_seed(2)
    model = _spread(ACT(RecurrentStep(4, 8, 3), max_steps=7, tau=0.05)).double().train()
    x, target = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))

    def loss_of(rows: slice) -> torch.Tensor:
        out = model(x[rows])
        aux = model.aux_loss()
        assert aux is not None
        n = out.shape[0]
        return nn.functional.cross_entropy(out, target[rows], reduction="sum") + aux * n

    model.zero_grad()
    loss_of(slice(None)).backward()
    steps = model.last_steps.clone()  # type: ignore[union-attr]
    batched = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    assert steps.min() < steps.max()
    model.zero_grad()
    for i in range(x.shape[0]):
        loss_of(slice(i, i + 1)).backward()
    for a, b in zip(batched, (p.grad for p in model.parameters()), strict=True):
        assert b is not None and (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("cls", [PonderNet, ACT])
def test_all_halting_at_once_and_a_single_row(cls: type) -> None:
    model = cls(RecurrentStep(3, 4, 2), max_steps=4).eval()
    with torch.no_grad():
        model.step.halt.bias.fill_(30.0)  # everybody halts at the first step
        out = model(torch.randn(6, 3))
        assert model.last_steps.tolist() == [1] * 6  # type: ignore[union-attr]
        assert model.final_state.shape == (6, 4)  # type: ignore[union-attr]
        model.step.halt.bias.fill_(-30.0)  # nobody halts before max_steps
        out = model(torch.randn(1, 3))
        assert model.last_steps.tolist() == [4] and out.shape == (1, 2)  # type: ignore[union-attr]
