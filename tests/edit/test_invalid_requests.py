"""Refused edits raise ``EditError`` naming what to fix, and leave model and optimizer bit-identical.

So does any failure half-way through an edit: the transaction rolls everything back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from edit_checks import assert_identical, capture, check_optimizer_in_sync, fill_grads, train_steps
from torch import nn

import adaptnet as an
from adaptnet.edit import _apply, ops


class Setup:
    """A trained MLP (BatchNorm, a residual block) with Adam state and pending grads."""

    def __init__(self, kind: str = "mlp") -> None:
        torch.manual_seed(0)
        if kind == "mlp":
            spec = an.AdaptiveMLP(5, [6, 4], 3, norm="batch").spec()
            spec["blocks"] = [{"kind": "dense", "width": 6}, {"kind": "residual", "width": 3},
                              {"kind": "dense", "width": 4}]
            self.model: Any = an.AdaptiveMLP.from_spec(spec)
            self.x, self.y, self.loss_fn = torch.randn(8, 5), torch.randn(8, 3), F.mse_loss
        else:
            self.model = an.AdaptiveCNN(2, [4, 3], 3)
            self.x, self.y, self.loss_fn = torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,)), F.cross_entropy
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        train_steps(self.model, self.optimizer, self.x, self.y, self.loss_fn, steps=2)
        fill_grads(self.model, self.x, self.y, self.loss_fn)
        self.model.eval()  # a mode that differs from the probes' restore path would show up

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def _still_usable(s: Setup) -> None:
    """After a refusal or rollback the pair still trains and edits normally."""
    check_optimizer_in_sync(s.model, s.optimizer)
    s.optimizer.step()
    an.widen(s.model, 0, 1, init="zero", optimizer=s.optimizer)
    train_steps(s.model, s.optimizer, s.x, s.y, s.loss_fn)
    check_optimizer_in_sync(s.model, s.optimizer)


class Custom(torch.optim.Optimizer):
    """An optimizer adaptnet has never heard of."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never stepped
        return None


def _nan_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target) * float("nan")


Request = Callable[[Setup], Any]
# (id, request, words the message must contain)
INVALID: list[tuple[str, Request, str]] = [
    ("widen-unknown-layer", lambda s: an.widen(s.model, 3, 2, optimizer=s.optimizer), r"layer must be .*\[0, 2\]"),
    ("widen-negative-layer", lambda s: an.widen(s.model, -1, 2, optimizer=s.optimizer), r"\[0, 2\].*got -1"),
    ("widen-layer-not-a-group", lambda s: an.widen(s.model, "0", 2, optimizer=s.optimizer),
     "'0' is not a unit group of AdaptiveMLP; nearest: blocks"),
    ("widen-layer-float", lambda s: an.widen(s.model, 0.0, 2, optimizer=s.optimizer), "layer must be a group name"),
    ("widen-by-0", lambda s: an.widen(s.model, 0, 0, optimizer=s.optimizer), "by must be a positive integer"),
    ("widen-by-negative", lambda s: an.widen(s.model, 0, -3, optimizer=s.optimizer), "by must be a positive"),
    ("widen-by-float", lambda s: an.widen(s.model, 0, 1.5, optimizer=s.optimizer), "by must be a positive"),
    ("widen-unknown-init", lambda s: an.widen(s.model, 0, 2, init="xavier", optimizer=s.optimizer),
     "init must be one of"),
    ("gradmax-no-loss-fn", lambda s: an.widen(s.model, 0, 2, init="gradmax", optimizer=s.optimizer, batch=s.batch),
     "loss_fn"),
    ("gradmax-no-batch", lambda s: an.widen(s.model, 0, 2, init="gradmax", optimizer=s.optimizer,
                                            loss_fn=s.loss_fn), r"batch=\(inputs, targets\)"),
    ("gradmax-inputs-only", lambda s: an.widen(s.model, 0, 2, init="gradmax", optimizer=s.optimizer, batch=s.x,
                                               loss_fn=s.loss_fn), r"batch=\(inputs, targets\)"),
    ("gradmax-nan-loss", lambda s: an.widen(s.model, 0, 2, init="gradmax", optimizer=s.optimizer, batch=s.batch,
                                            loss_fn=_nan_loss), "not finite"),
    ("net2net-negative-noise", lambda s: an.widen(s.model, 0, 2, optimizer=s.optimizer, noise=-1.0), "noise"),
    ("prune-unknown-layer", lambda s: an.prune(s.model, 7, keep=1, optimizer=s.optimizer), "layer must be"),
    ("prune-every-unit-keep-0", lambda s: an.prune(s.model, 0, keep=0, optimizer=s.optimizer),
     r"keep must be .*\[1, 6\]"),
    ("prune-every-unit-units", lambda s: an.prune(s.model, 0, units=range(6), optimizer=s.optimizer),
     "keep at least 1"),
    ("prune-every-unit-amount", lambda s: an.prune(s.model, 0, amount=1.0, optimizer=s.optimizer), r"\(0, 1\)"),
    ("prune-amount-and-keep", lambda s: an.prune(s.model, 0, amount=0.5, keep=2, optimizer=s.optimizer),
     "exactly one of"),
    ("prune-nothing-given", lambda s: an.prune(s.model, 0, optimizer=s.optimizer), "exactly one of"),
    ("prune-duplicate-units", lambda s: an.prune(s.model, 0, units=[1, 1], optimizer=s.optimizer), "distinct"),
    ("prune-unit-out-of-range", lambda s: an.prune(s.model, 0, units=[6], optimizer=s.optimizer), r"\[0, 5\]"),
    ("prune-unknown-importance", lambda s: an.prune(s.model, 0, keep=2, importance="l1", optimizer=s.optimizer),
     "importance must be one of"),
    ("prune-taylor-nan-loss", lambda s: an.prune(s.model, 0, keep=2, importance="taylor", batch=s.batch,
                                                 loss_fn=_nan_loss, optimizer=s.optimizer), "not finite"),
    ("prune-taylor-no-loss-fn", lambda s: an.prune(s.model, 0, keep=2, importance="taylor", batch=s.batch,
                                                   optimizer=s.optimizer), "loss_fn"),
    ("deepen-init-zero", lambda s: an.deepen(s.model, 0, init="zero", optimizer=s.optimizer), "identity"),
    ("deepen-unknown-layer", lambda s: an.deepen(s.model, 3, optimizer=s.optimizer), "after must be"),
    ("deepen-width-0", lambda s: an.deepen(s.model, 0, optimizer=s.optimizer, width=0), "width must be"),
    ("remove-unknown-layer", lambda s: an.remove_layer(s.model, 3, optimizer=s.optimizer), "layer must be"),
    # refused half-way (inside the transaction) by the model itself:
    ("remove-dense-feeding-residual", lambda s: an.remove_layer(s.model, 0, optimizer=s.optimizer),
     "remove those first"),
    ("optimizer-of-another-model", lambda s: an.widen(
        s.model, 0, 2, optimizer=torch.optim.Adam(an.AdaptiveMLP(5, [6], 3).parameters())),
     "does not hold the model's parameters"),
    ("optimizer-missing-the-head", lambda s: an.widen(
        s.model, 0, 2, optimizer=torch.optim.SGD(s.model.blocks.parameters(), lr=0.1)), r"head\.weight"),
    ("lbfgs", lambda s: an.widen(s.model, 0, 2, optimizer=torch.optim.LBFGS(s.model.parameters())),
     "LBFGS.*register_optimizer"),
    ("custom-optimizer", lambda s: an.widen(s.model, 0, 2, optimizer=Custom(s.model.parameters())),
     "Custom.*register_optimizer"),
    ("custom-optimizer-deepen", lambda s: an.deepen(s.model, 0, optimizer=Custom(s.model.parameters())),
     "Custom"),
]


@pytest.mark.parametrize(("request_", "match"), [(r, m) for _, r, m in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_request_changes_nothing(request_: Request, match: str) -> None:
    s = Setup()
    before = capture(s.model, s.optimizer)
    with pytest.raises(an.EditError, match=match) as info:
        request_(s)
    assert isinstance(info.value, ValueError)
    assert_identical(before, capture(s.model, s.optimizer))
    _still_usable(s)


def test_cnn_dense_removal_is_refused_and_rolled_back() -> None:
    s = Setup("cnn")
    before = capture(s.model, s.optimizer)
    with pytest.raises(an.EditError, match=r"residual blocks"):
        an.remove_layer(s.model, 0, optimizer=s.optimizer)
    assert_identical(before, capture(s.model, s.optimizer))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: an.widen(m, 0, 2), r"needs example inputs to trace Sequential"),
    (lambda m: an.prune(m, "0", keep=1), r"needs example inputs to trace Sequential"),
    (lambda m: an.deepen(m, 0), r"after must name a block inside an nn.Sequential"),
    (lambda m: an.remove_layer(m, 0), r"layer must name a block"),
], ids=["widen", "prune", "deepen", "remove_layer"])
def test_a_model_never_traced_is_refused_with_what_to_do(edit: Callable[[nn.Module], Any], match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    before = capture(model)
    with pytest.raises(an.EditError, match=match):
        edit(model)
    assert_identical(before, capture(model))


def test_a_model_without_hidden_layers_is_refused() -> None:
    model = an.AdaptiveMLP(3, [], 2)
    with pytest.raises(an.EditError, match="no hidden layer"):
        an.widen(model, 0, 1)


# -- failures half-way through an edit roll everything back --------------------------------------


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, n: int) -> list[int]:
    """Make ``module.name`` raise on its ``n``-th call (earlier calls run for real)."""
    real, calls = getattr(module, name), [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError(f"injected failure in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


EDITS: dict[str, Callable[[Setup], Any]] = {
    "widen-net2net": lambda s: an.widen(s.model, 0, 3, optimizer=s.optimizer, batch=s.batch),
    "widen-gradmax-stream": lambda s: an.widen(s.model, 0, 3, init="gradmax", optimizer=s.optimizer, batch=s.batch,
                                               loss_fn=s.loss_fn),
    "widen-zero-residual": lambda s: an.widen(s.model, 1, 2, init="zero", optimizer=s.optimizer),
    "prune-taylor": lambda s: an.prune(s.model, 2, keep=2, importance="taylor", optimizer=s.optimizer,
                                       batch=s.batch, loss_fn=s.loss_fn),
}


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("target", ["set_parameter", "migrate_state"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_failure_inside_apply_rolls_back(monkeypatch: pytest.MonkeyPatch, edit: str, target: str, n: int) -> None:
    s = Setup()
    before = capture(s.model, s.optimizer)
    calls = _fail_on_call(monkeypatch, _apply, target, n)
    with pytest.raises(RuntimeError, match="injected failure"):
        EDITS[edit](s)
    assert calls[0] == n, "the failure must come after earlier slices were rewritten"
    assert_identical(before, capture(s.model, s.optimizer))
    monkeypatch.undo()
    _still_usable(s)


def test_failure_after_every_slice_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when every tensor was rewritten and only the size attributes remain."""
    s = Setup()
    before = capture(s.model, s.optimizer)
    _fail_on_call(monkeypatch, _apply, "_refresh", 2)
    with pytest.raises(RuntimeError, match="injected failure"):
        an.widen(s.model, 0, 3, init="random", optimizer=s.optimizer)
    assert_identical(before, capture(s.model, s.optimizer))


@pytest.mark.parametrize("edit", [
    lambda s: an.deepen(s.model, 2, optimizer=s.optimizer),
    lambda s: an.remove_layer(s.model, 1, optimizer=s.optimizer),
    lambda s: an.remove_layer(s.model, 2, optimizer=s.optimizer),
], ids=["deepen", "remove-residual", "remove-dense"])
def test_failure_in_depth_edit_rolls_back(monkeypatch: pytest.MonkeyPatch, edit: Callable[[Setup], Any]) -> None:
    """The structure changed and the optimizer was re-synced, then something failed."""
    s = Setup()
    before = capture(s.model, s.optimizer)
    real = ops.sync_parameters

    def sync_then_fail(*args: Any) -> None:
        real(*args)
        raise RuntimeError("injected failure after sync")

    monkeypatch.setattr(ops, "sync_parameters", sync_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        edit(s)
    assert_identical(before, capture(s.model, s.optimizer))
    monkeypatch.undo()
    _still_usable(s)


def test_graph_alive_during_edit_is_refused_half_way_and_rolled_back() -> None:
    """A graph that saved the head's weight makes the rewrite fail at the last slice, after the others."""
    s = Setup()
    dangling = s.model.head(torch.randn(2, 4, requires_grad=True))  # saves head.weight for backward
    before = capture(s.model, s.optimizer)
    with pytest.raises(an.EditError, match="graph built before the edit"):
        an.widen(s.model, 2, 2, optimizer=s.optimizer)
    assert_identical(before, capture(s.model, s.optimizer))
    dangling.sum().backward()  # the old graph still works on the old shapes
    del dangling
    _still_usable(s)


def test_taylor_without_batch_or_grads_is_refused() -> None:
    """Refused inside the edit (when scoring), still without a trace."""
    s = Setup()
    s.optimizer.zero_grad(set_to_none=True)
    before = capture(s.model, s.optimizer)
    with pytest.raises(an.EditError, match=r"taylor.*batch"):
        an.prune(s.model, 0, keep=2, importance="taylor", optimizer=s.optimizer)
    assert_identical(before, capture(s.model, s.optimizer))
