"""The optimizer follows the model through every edit.

For each supported optimizer: surviving per-element state slices are bit-identical
(widen: old units keep their index; prune: survivors in order), ``step`` is kept, fresh
units follow the documented rule (docs/design.md: all per-element state starts at 0),
net2net copies carry their source's state, the optimizer holds exactly the
model's parameters, ``.grad`` is migrated, and training goes on with the new units learning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from edit_checks import check_optimizer_in_sync, fill_grads, held_ids, train_steps
from torch import nn

import adaptnet as an

# The test's own statement of each optimizer's per-element state, independent of adaptnet's table.
OPTIMIZERS: dict[str, tuple[Callable[[Any], torch.optim.Optimizer], set[str]]] = {
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), {"momentum_buffer"}),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2), {"exp_avg", "exp_avg_sq"}),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), {"exp_avg", "exp_avg_sq"}),
    "adamw-amsgrad": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
        {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    ),
    "rmsprop-centered": (
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.9, centered=True),
        {"square_avg", "momentum_buffer", "grad_avg"},
    ),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.1), {"sum"}),
}
NAMES = list(OPTIMIZERS)


def _setup(name: str, kind: str = "mlp", dtype: torch.dtype = torch.float32) -> tuple[Any, ...]:
    """A model trained a few steps with ``name``, with fresh gradients left in ``.grad``."""
    torch.manual_seed(0)
    if kind == "mlp":
        model: nn.Module = an.AdaptiveMLP(4, [5, 3], 2, norm="batch").to(dtype)
        x, y, loss_fn = torch.randn(16, 4, dtype=dtype), torch.randn(16, 2, dtype=dtype), F.mse_loss
    else:
        model = an.AdaptiveCNN(2, [4, 3], 3, norm=None, activation="tanh").to(dtype)  # no dead units
        x, y, loss_fn = torch.randn(8, 2, 6, 6, dtype=dtype), torch.randint(0, 3, (8,)), F.cross_entropy
    make, kinds = OPTIMIZERS[name]
    optimizer = make(model.parameters())
    train_steps(model, optimizer, x, y, loss_fn, steps=3)
    fill_grads(model, x, y, loss_fn)
    for p in model.parameters():  # the test would be vacuous without the state it checks
        assert set(kinds) <= set(optimizer.state[p]), f"{name}: state keys {sorted(optimizer.state[p])}"
    return model, optimizer, x, y, loss_fn, kinds


def _record(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Per parameter name: the Parameter, clones of its value, grad and optimizer state."""
    out = {}
    for name, p in model.named_parameters():
        state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
        out[name] = {"param": p, "value": p.detach().clone(), "grad": p.grad.detach().clone(), "state": state}
    return out


def _unit_dim(old: torch.Size, new: torch.Size) -> int | None:
    """The one dimension whose size changed, or None when the shape is the same."""
    changed = [d for d, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    assert len(changed) <= 1, f"{old} -> {new}: more than one dimension changed"
    return changed[0] if changed else None


def _expect_fresh(new_part: torch.Tensor) -> None:
    # docs/design.md, "Optimizer state rule for new units": every per-element state tensor of a
    # fresh unit starts at 0, as for a parameter never stepped (second moments included: the
    # mean fill was measured worse).
    assert torch.equal(new_part, torch.zeros_like(new_part)), "per-element state of fresh units must start at 0"


def _check_changed_units(before: torch.Tensor, after: torch.Tensor, dim: int, units: range, what: str) -> None:
    delta = (after - before).abs().movedim(dim, 0)
    for u in units:
        assert float(delta[u].max()) > 0, f"{what}: new unit {u} received no update"


def _check_widen(name: str, init: str, kind: str, dtype: torch.dtype = torch.float32) -> None:
    model, optimizer, x, y, loss_fn, kinds = _setup(name, kind, dtype)
    before = _record(model, optimizer)
    n = model.widths[0]
    by = n if init == "net2net" else 3  # by == width: copy i of unit i, so the sources are known
    an.widen(model, 0, by, init=init, optimizer=optimizer, batch=(x, y), loss_fn=loss_fn)
    check_optimizer_in_sync(model, optimizer)
    assert set(held_ids(optimizer)) == {id(p) for p in model.parameters()}
    grown = {}
    for pname, p in model.named_parameters():
        old = before[pname]
        assert p is old["param"], "edits keep the Parameter objects"
        state = optimizer.state[p]
        assert state.keys() == old["state"].keys()
        dim = _unit_dim(old["value"].shape, p.shape)
        if dim is None:  # not in the edited group: nothing changes
            assert torch.equal(p.detach(), old["value"]) and torch.equal(p.grad, old["grad"]), pname
            for k, v in old["state"].items():
                assert torch.equal(state[k], v) if isinstance(v, torch.Tensor) else state[k] == v, (pname, k)
            continue
        grown[pname] = (dim, p.detach().clone())
        assert p.shape[dim] == n + by
        for k, v in old["state"].items():
            if k not in kinds:  # step and other scalars: kept as they were
                assert torch.equal(state[k], v) if isinstance(v, torch.Tensor) else state[k] == v, (pname, k)
                continue
            assert torch.equal(state[k].narrow(dim, 0, n), v), f"{pname}.{k}: old units' state changed"
            if init == "net2net":
                assert torch.equal(state[k].narrow(dim, n, by), v), f"{pname}.{k}: a copy must carry its source's state"
            else:
                _expect_fresh(state[k].narrow(dim, n, by))
        assert torch.equal(p.grad.narrow(dim, 0, n), old["grad"]), f"{pname}: old units' grad changed"
        fresh_grad = p.grad.narrow(dim, n, by)
        if init == "net2net":
            assert torch.equal(fresh_grad, old["grad"]), f"{pname}: a copy carries its source's grad"
        else:
            assert torch.equal(fresh_grad, torch.zeros_like(fresh_grad)), f"{pname}: fresh units start without grad"
        kept = p.detach().narrow(dim, 0, n)
        if init == "net2net" and dim == 1:  # a consumer: each unit and its copy now read half the weight
            assert torch.equal(kept, old["value"] * 0.5) and torch.equal(p.detach().narrow(dim, n, by), kept), pname
        else:
            assert torch.equal(kept, old["value"]), f"{pname}: old units' values changed"
    assert grown, "the edit grew nothing"
    optimizer.step()  # the step the grads were computed for
    train_steps(model, optimizer, x, y, loss_fn, steps=3)
    check_optimizer_in_sync(model, optimizer)
    for pname, p in model.named_parameters():
        if pname in grown:
            dim, value = grown[pname]
            _check_changed_units(value, p.detach(), dim, range(n, n + by), f"{name} {pname}")
        assert torch.isfinite(p).all(), pname


@pytest.mark.parametrize("init", ["zero", "gradmax", "net2net"])
@pytest.mark.parametrize("name", NAMES)
def test_widen_carries_optimizer_state(name: str, init: str) -> None:
    _check_widen(name, init, "mlp")


@pytest.mark.parametrize("name", NAMES)
def test_widen_carries_optimizer_state_cnn(name: str) -> None:
    _check_widen(name, "zero", "cnn")


@pytest.mark.parametrize("init", ["zero", "net2net"])
@pytest.mark.parametrize("name", ["adamw-amsgrad", "rmsprop-centered"])
def test_widen_carries_optimizer_state_float64(name: str, init: str) -> None:
    _check_widen(name, init, "mlp", torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_prune_keeps_survivors_state_in_order(name: str) -> None:
    model, optimizer, x, y, loss_fn, kinds = _setup(name)
    before = _record(model, optimizer)
    removed = [1, 3]
    survivors = torch.tensor([u for u in range(model.widths[0]) if u not in removed])
    edit = an.prune(model, 0, units=removed, optimizer=optimizer)
    assert edit.units_removed == tuple(removed)
    check_optimizer_in_sync(model, optimizer)
    pruned = 0
    for pname, p in model.named_parameters():
        old = before[pname]
        assert p is old["param"]
        dim = _unit_dim(old["value"].shape, p.shape)
        keep = (lambda t: t) if dim is None else (lambda t, d=dim: t.index_select(d, survivors))
        pruned += dim is not None
        assert torch.equal(p.detach(), keep(old["value"])), pname
        assert torch.equal(p.grad, keep(old["grad"])), pname
        state = optimizer.state[p]
        assert state.keys() == old["state"].keys()
        for k, v in old["state"].items():
            if k in kinds:
                assert torch.equal(state[k], keep(v)), f"{pname}.{k}: survivors' state must be kept in order"
            else:
                assert torch.equal(state[k], v) if isinstance(v, torch.Tensor) else state[k] == v, (pname, k)
    assert pruned >= 2
    optimizer.step()
    train_steps(model, optimizer, x, y, loss_fn, steps=2)
    check_optimizer_in_sync(model, optimizer)


@pytest.mark.parametrize("name", NAMES)
def test_deepen_new_parameters_join_and_learn(name: str) -> None:
    model, optimizer, x, y, loss_fn, _ = _setup(name)
    old_ids = {id(p) for p in model.parameters()}
    before = _record(model, optimizer)
    groups_before = len(optimizer.param_groups)
    an.deepen(model, 0, optimizer=optimizer, width=4)
    check_optimizer_in_sync(model, optimizer)
    for pname, old in before.items():  # the old parameters are untouched, state and grad included
        p = old["param"]  # (names shift after an insertion; the Parameter objects do not)
        assert torch.equal(p.detach(), old["value"]) and torch.equal(p.grad, old["grad"]), pname
        for k, v in old["state"].items():
            assert torch.equal(optimizer.state[p][k], v), (pname, k)
    assert len(optimizer.param_groups) == groups_before
    new = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in old_ids}
    assert set(new) == {n for n, _ in model.blocks[1].named_parameters(prefix="blocks.1")}
    optimizer.step()  # the pending grads (new parameters have none yet)
    train_steps(model, optimizer, x, y, loss_fn, steps=3)
    params = dict(model.named_parameters())
    for pname, value in new.items():
        assert params[pname] in optimizer.state, f"{pname} never stepped"
        assert not torch.equal(params[pname].detach(), value), f"{name}: {pname} received no update"


@pytest.mark.parametrize("name", NAMES)
def test_remove_layer_drops_stale_state_and_trains_on(name: str) -> None:
    model, optimizer, x, y, loss_fn, _ = _setup(name)
    removed = list(model.blocks[0].parameters())
    an.remove_layer(model, 0, optimizer=optimizer)
    check_optimizer_in_sync(model, optimizer)
    assert all(id(p) not in set(held_ids(optimizer)) for p in removed)
    assert all(p not in optimizer.state for p in removed)
    train_steps(model, optimizer, x, y, loss_fn, steps=2)
    check_optimizer_in_sync(model, optimizer)


def test_deepen_joins_the_param_group_of_its_neighbours() -> None:
    torch.manual_seed(0)
    model = an.AdaptiveMLP(4, [5, 3], 2)
    body = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
    optimizer = torch.optim.SGD([{"params": body, "lr": 0.1}, {"params": model.head.parameters(), "lr": 0.01}])
    an.deepen(model, 1, optimizer=optimizer)
    check_optimizer_in_sync(model, optimizer)
    new = {id(p) for p in model.blocks[2].parameters()}
    assert new <= {id(p) for p in optimizer.param_groups[0]["params"]}
    assert not new & {id(p) for p in optimizer.param_groups[1]["params"]}


def test_lr_scheduler_keeps_working_after_edits() -> None:
    torch.manual_seed(0)
    model = an.AdaptiveMLP(4, [5, 3], 2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    lr = 0.1

    def epoch() -> None:
        nonlocal lr
        train_steps(model, optimizer, x, y, F.mse_loss)
        scheduler.step()
        lr *= 0.5
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr])
        assert scheduler.get_last_lr() == pytest.approx([lr])

    epoch()
    an.widen(model, 0, 2, init="zero", optimizer=optimizer)
    epoch()
    an.deepen(model, 0, optimizer=optimizer)
    epoch()
    an.prune(model, 1, keep=2, optimizer=optimizer)
    epoch()
    check_optimizer_in_sync(model, optimizer)
    # The new block's parameters are stepped with the scheduled lr (plain SGD: p -= lr * grad).
    new = model.blocks[1].op2.weight
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    expected = new.detach() - lr * new.grad
    optimizer.step()
    assert torch.allclose(new.detach(), expected, rtol=0, atol=1e-7)
    assert scheduler.state_dict()["last_epoch"] == 4


@pytest.mark.parametrize("new_state", ["copy", "zero", "split"])
def test_split_units_state_follows_the_chosen_rule(new_state: str) -> None:
    torch.manual_seed(0)
    model = an.AdaptiveMLP(4, [3], 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    train_steps(model, opt, x, y, F.mse_loss, steps=3)
    rows, cols = model.blocks[0].op.weight, model.head.weight
    old_rows = {k: v.clone() for k, v in opt.state[rows].items()}
    old_cols = {k: v.clone() for k, v in opt.state[cols].items()}
    an.widen(model, 0, 3, init="net2net", optimizer=opt, new_state=new_state)  # each unit split in two
    state_rows, state_cols = opt.state[rows], opt.state[cols]
    for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
        expected = old_rows[key].repeat(2, 1)
        if new_state == "zero":
            expected[3:] = 0
        if new_state == "split":  # each half now gets half the gradient of its incoming weights
            expected = expected * 0.5 ** power
        assert torch.equal(state_rows[key], expected)
        # outgoing columns: their gradients do not change with a split; copies follow new_state
        cols_expected = old_cols[key].repeat(1, 2)
        if new_state == "zero":
            cols_expected[:, 3:] = 0
        assert torch.equal(state_cols[key], cols_expected)
    with pytest.raises(an.EditError, match="new_state must be one of copy, zero, split"):
        an.widen(model, 0, 1, optimizer=opt, new_state="halve")
