"""Policies: triggers, layer choice, budgets, and state round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptnet as an
from adaptnet.edit.init import growth_score
from adaptnet.nn.flops import count_macs
from adaptnet.policy import POLICIES, Signals, make_policy
from adaptnet.policy._plateau import Budget, Plateau, params_per_unit


def _signals(model: nn.Module, losses: list[float], epoch: int | None = None) -> Signals:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, :1] * x[:, 1:2]).sin()
    return Signals(epoch if epoch is not None else len(losses), 10, model, {"train_loss": losses}, (x, y),
                   nn.functional.mse_loss, g, lr=1e-2)


def test_plateau_fires_after_patience_and_resets() -> None:
    plateau = Plateau(patience=2, min_delta=0.1)
    assert [plateau.update(v) for v in (1.0, 0.95, 0.93, 0.5, 0.49, 0.48)] == [False, False, True, False, False, True]


def test_grow_on_plateau_widens_the_layer_with_the_largest_gradient_score() -> None:
    model = an.AdaptiveMLP(6, [3, 5], 1)
    policy = an.GrowOnPlateau(patience=1, by=2, where="gradient", init="gradmax")
    signals = _signals(model, [1.0])
    assert policy.decide(signals) == []
    signals = _signals(model, [1.0, 1.0])
    [request] = policy.decide(signals)
    scores = [growth_score(model, g, 2, signals.probe, signals.loss_fn) for g in list(an.unit_groups(model).values())]
    assert request.op == "widen" and request.by == 2 and request.init == "gradmax"
    assert request.layer == max(range(len(scores)), key=scores.__getitem__)


def test_round_robin_last_and_fixed_layer() -> None:
    model = an.AdaptiveMLP(6, [3, 3, 3], 1)
    rr = an.GrowEvery(every=1, by=1, where="round_robin")
    assert [rr.decide(_signals(model, [1.0] * e))[0].layer for e in (1, 2, 3, 4)] == [0, 1, 2, 0]
    assert an.GrowEvery(every=1, where="last").decide(_signals(model, [1.0]))[0].layer == 2
    assert an.GrowEvery(every=1, where=1).decide(_signals(model, [1.0]))[0].layer == 1
    assert an.GrowEvery(every=2).decide(_signals(model, [1.0])) == []


def test_budgets_cap_units_and_stop_growth() -> None:
    model = an.AdaptiveMLP(6, [4], 1)
    group = next(iter(an.unit_groups(model).values()))
    assert params_per_unit(group) == 6 + 1 + 1  # incoming weights, bias, outgoing weight
    params = sum(p.numel() for p in model.parameters())
    assert Budget(max_params=params + 8 * 3 + 5).units_allowed(model, group, 10) == 3
    assert Budget(max_width=6).units_allowed(model, group, 10) == 2
    x = torch.randn(4, 6)
    macs = count_macs(model, x)
    assert macs == 6 * 4 + 4 * 1
    assert Budget(max_flops=macs + 7 * 2).units_allowed(model, group, 10, x) == 2
    policy = an.GrowEvery(every=1, by=4, max_params=params)
    assert policy.decide(_signals(model, [1.0])) == [] and policy.exhausted


def test_count_macs_for_a_cnn() -> None:
    model = an.AdaptiveCNN(1, [4, 6], 10, kernel_size=3, pool="max")
    # 8x8 conv 1->4 (3x3), pool to 4x4, conv 4->6 (3x3), pool, head 6->10
    assert count_macs(model, torch.randn(2, 1, 8, 8)) == 8 * 8 * 4 * 9 + 4 * 4 * 6 * 4 * 9 + 6 * 10


def test_grow_on_signal_fires_only_when_new_units_would_learn_faster() -> None:
    model = an.AdaptiveMLP(6, [2], 1)
    assert an.GrowOnSignal(threshold=1e9, by=2).decide(_signals(model, [1.0])) == []
    [request] = an.GrowOnSignal(threshold=1e-9, by=2).decide(_signals(model, [1.0]))
    assert request.op == "widen" and request.init == "gradmax" and "faster per parameter" in request.reason


def test_grow_on_signal_also_grows_on_a_plateau_unless_turned_off() -> None:
    model = an.AdaptiveMLP(6, [2], 1)
    fallback = an.GrowOnSignal(threshold=1e9, by=2, patience=2, cooldown=1)
    never = an.GrowOnSignal(threshold=1e9, by=2, patience=None)
    losses = [1.0, 1.0, 1.0]  # the first value is an improvement, then 2 epochs without one
    for epoch in range(1, 3):
        assert fallback.decide(_signals(model, losses[:epoch], epoch)) == []
        assert never.decide(_signals(model, losses[:epoch], epoch)) == []
    [request] = fallback.decide(_signals(model, losses, 3))
    assert "no improvement for 2 epochs (signal below" in request.reason
    assert never.decide(_signals(model, losses, 3)) == []
    # The plateau counts during the cooldown, and the state round-trips.
    restored = an.GrowOnSignal(threshold=1e9, by=2, patience=2, cooldown=1)
    restored.load_state_dict(fallback.state_dict())
    assert restored.state_dict() == fallback.state_dict()
    assert restored.decide(_signals(model, [*losses, 1.0], 4)) == []  # cooling down
    [again] = restored.decide(_signals(model, [*losses, 1.0, 1.0], 5))
    assert "no improvement" in again.reason


def test_deepen_on_plateau_and_max_layers() -> None:
    model = an.AdaptiveMLP(6, [4], 1)
    policy = an.DeepenOnPlateau(patience=1, max_layers=2)
    policy.decide(_signals(model, [1.0]))
    [request] = policy.decide(_signals(model, [1.0, 1.0]))
    assert request.op == "deepen" and request.layer == 0
    an.deepen(model, 0)
    policy.decide(_signals(model, [1.0, 1.0, 1.0]))
    assert policy.decide(_signals(model, [1.0] * 4)) == []  # already 2 hidden layers


def test_prune_to_budget_stops_at_the_target() -> None:
    model = an.AdaptiveMLP(6, [16, 8], 1)
    target = 100
    policy = an.PruneToBudget(target_params=target, amount=0.5)
    for epoch in range(1, 20):
        for request in policy.decide(_signals(model, [1.0] * epoch)):
            an.prune(model, request.layer, keep=request.keep)
    assert sum(p.numel() for p in model.parameters()) <= target
    assert policy.done and all(w >= 1 for w in model.widths)


def test_prune_without_target_prunes_each_layer_once() -> None:
    model = an.AdaptiveMLP(6, [8, 4], 1)
    requests = an.PruneToBudget(amount=0.25).decide(_signals(model, [1.0]))
    assert [(r.layer, r.keep) for r in requests] == [(0, 6), (1, 3)]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_state_dict_round_trip(name: str) -> None:
    policy = make_policy(name, {})
    model = an.AdaptiveMLP(6, [3, 3], 1)
    for epoch in range(1, 4):
        policy.decide(_signals(model, [1.0] * epoch))
    clone = make_policy(name, {})
    clone.load_state_dict(policy.state_dict())
    assert clone.state_dict() == policy.state_dict()


@pytest.mark.parametrize(
    ("name", "options"),
    [("grow_on_plateau", {"by": 0}), ("grow_on_plateau", {"where": "middle"}), ("grow_every", {"every": 0}),
     ("grow_on_plateau", {"init": "magic"}), ("prune_to_budget", {"amount": 1.5}), ("deepen_on_plateau",
     {"after": -1}), ("grow_on_signal", {"threshold": 0}), ("grow_on_plateau", {"max_params": 0})],
)
def test_bad_options_raise_value_error(name: str, options: dict) -> None:
    with pytest.raises(ValueError):
        make_policy(name, options)


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="grow_on_plateau"):
        make_policy("grow_sometimes", {})
