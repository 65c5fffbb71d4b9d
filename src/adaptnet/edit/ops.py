"""The public edits: ``widen``, ``prune``, ``deepen``, ``remove_layer``.

Each one validates the whole request first, then applies it inside a transaction (any
failure restores model and optimizer bit for bit), carries the optimizer along, and
returns an ``Edit`` record. Width edits are index maps on unit groups; depth edits ask the
model to insert or remove a block and then re-point the optimizer at the new parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from adaptnet.edit import importance as _importance
from adaptnet.edit import init as _init
from adaptnet.edit._apply import apply_index_map
from adaptnet.edit._probe import LossFn, outputs_on, split_batch
from adaptnet.edit._transaction import transaction
from adaptnet.edit.index_map import IndexMap
from adaptnet.edit.optim import check_optimizer, sync_parameters
from adaptnet.edit.record import Edit
from adaptnet.edit.splitting import splitting_scores
from adaptnet.errors import EditError
from adaptnet.nn.groups import UnitGroup

Optimizer = torch.optim.Optimizer


def _groups(model: nn.Module, what: str) -> list[UnitGroup]:
    unit_groups = getattr(model, "unit_groups", None)
    if not callable(unit_groups):
        raise EditError(
            f"{what} needs an adaptive model (AdaptiveMLP, AdaptiveCNN, or a module with unit_groups()); "
            f"got {type(model).__name__}"
        )
    groups: list[UnitGroup] = unit_groups()
    return groups


def _layer_index(value: Any, count: int, name: str, widths: Sequence[int]) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
        raise EditError(
            f"{name} must be an integer in [0, {count - 1}] (the model has {count} hidden layers, "
            f"widths {list(widths)}); got {value!r}"
            if count else f"{name}={value!r}: the model has no hidden layer"
        )
    return value


def _positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EditError(f"{name} must be a positive integer, got {value!r}")
    return value


def _widths(model: nn.Module) -> tuple[int, ...]:
    return tuple(getattr(model, "widths", ()))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(
    model: nn.Module,
    optimizer: Optimizer | None,
    batch: Any,
    body: Callable[[], tuple[tuple[int, ...], tuple[int, ...]]],
    **record: Any,
) -> Edit:
    """Apply ``body`` transactionally and describe what it did."""
    if optimizer is not None:
        check_optimizer(optimizer, model)
    widths, params = _widths(model), _count(model)
    before = outputs_on(model, batch) if batch is not None else None
    with transaction(model, optimizer):
        added, removed = body()
        after = outputs_on(model, batch) if before is not None else None
    change = None
    if before is not None and after is not None and before.shape == after.shape:
        change = float((after.to(torch.float64) - before.to(torch.float64)).abs().max())
    return Edit(
        units_added=added,
        units_removed=removed,
        widths_before=widths,
        widths_after=_widths(model),
        params_before=params,
        params_after=_count(model),
        max_output_change=change,
        **record,
    )


def widen(
    model: nn.Module,
    layer: int,
    by: int,
    init: str = "net2net",
    optimizer: Optimizer | None = None,
    batch: Any = None,
    loss_fn: LossFn | None = None,
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Edit:
    """Add ``by`` units to hidden layer ``layer``; they are appended after the existing ones.

    Args:
        model: an adaptive model.
        layer: hidden layer index (see ``model.widths``).
        by: number of units (channels) to add.
        init: ``"net2net"``, ``"firefly"``, ``"zero"``, ``"gradmax"`` (all exact) or ``"random"``.
        optimizer: carried along: same parameter objects, per-element state remapped.
        batch: ``(inputs, targets)`` (``gradmax``), or inputs alone to measure the output change.
        loss_fn: ``loss_fn(outputs, targets)``, needed by ``gradmax``.
        noise: ``net2net``/``firefly``: relative symmetry-breaking noise on the split shares (exact).
        generator: the random source for unit choice and fresh weights.
    """
    groups = _groups(model, "widen")
    group = groups[_layer_index(layer, len(groups), "layer", _widths(model))]
    _positive(by, "by")
    if init not in _init.INITS:
        raise EditError(f"init must be one of {', '.join(_init.INITS)}; got {init!r}")
    if init in ("gradmax", "firefly"):
        if loss_fn is None:
            raise EditError(f"init='{init}' needs batch=(inputs, targets) and loss_fn=")
        split_batch(batch, f"init='{init}'")
    if not isinstance(noise, (int, float)) or noise < 0:
        raise EditError(f"noise must be a number >= 0, got {noise!r}")

    def body() -> tuple[tuple[int, ...], tuple[int, ...]]:
        n = group.size
        if init == "net2net":
            imap, fresh = _init.net2net(group, by, generator, float(noise))
        elif init == "firefly":
            ranking = torch.argsort(splitting_scores(model, group, batch, loss_fn), descending=True, stable=True)
            imap, fresh = _init.net2net(group, by, generator, float(noise), ranking)
        elif init == "zero":
            imap, fresh = _init.zero(group, by, generator)
        elif init == "random":
            imap, fresh = _init.random(group, by, generator)
        else:
            imap, fresh = _init.gradmax(model, group, by, batch, loss_fn)
        apply_index_map(group, imap, fresh, optimizer)
        return tuple(range(n, n + by)), ()

    return _run(model, optimizer, batch, body, op="widen", layer=layer, group=group.name, init=init)


def prune(
    model: nn.Module,
    layer: int,
    amount: float | None = None,
    keep: int | None = None,
    units: Sequence[int] | None = None,
    importance: str = "magnitude",
    optimizer: Optimizer | None = None,
    batch: Any = None,
    loss_fn: LossFn | None = None,
) -> Edit:
    """Remove units of hidden layer ``layer``; the survivors keep their order.

    Give exactly one of ``amount`` (a fraction in (0, 1)), ``keep`` (units left) or
    ``units`` (indices to remove). With ``amount``/``keep`` the least important units go,
    by ``importance`` (``"magnitude"`` or ``"taylor"``). ``batch`` measures the output change
    (and feeds ``taylor``, which also needs ``loss_fn``).
    """
    groups = _groups(model, "prune")
    group = groups[_layer_index(layer, len(groups), "layer", _widths(model))]
    n = group.size
    given = [name for name, v in (("amount", amount), ("keep", keep), ("units", units)) if v is not None]
    if len(given) != 1:
        raise EditError(f"give exactly one of amount=, keep=, units=; got {given or 'none'}")
    if importance not in _importance.IMPORTANCES:
        raise EditError(f"importance must be one of {', '.join(_importance.IMPORTANCES)}; got {importance!r}")
    chosen: list[int] | None = None
    if amount is not None:
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 < amount < 1:
            raise EditError(f"amount must be a fraction in (0, 1), got {amount!r}")
        n_remove = round(amount * n)
        if n_remove == 0:
            raise EditError(f"amount={amount} of {n} units rounds to 0 units; use a larger amount or units=")
    elif keep is not None:
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= n:
            raise EditError(f"keep must be an integer in [1, {n}] (layer {layer} has {n} units), got {keep!r}")
        n_remove = n - keep
    else:
        assert units is not None
        chosen = [int(u) for u in units] if all(isinstance(u, int) and not isinstance(u, bool) for u in units) else []
        if len(chosen) != len(units) or len(set(chosen)) != len(chosen) or any(not 0 <= u < n for u in chosen):
            raise EditError(f"units must be distinct integers in [0, {n - 1}], got {list(units)!r}")
        n_remove = len(chosen)
    if n_remove >= n:
        raise EditError(f"pruning all {n} units of layer {layer} would cut the network; keep at least 1")
    if importance == "taylor" and chosen is None and batch is not None:
        if loss_fn is None:
            raise EditError("importance='taylor' with batch= needs loss_fn=")
        split_batch(batch, "importance='taylor'")

    def body() -> tuple[tuple[int, ...], tuple[int, ...]]:
        if chosen is not None:
            removed = sorted(chosen)
        else:
            scores = (_importance.magnitude(group) if importance == "magnitude"
                      else _importance.taylor(model, group, batch, loss_fn))
            removed = sorted(torch.argsort(scores, stable=True)[:n_remove].tolist())
        gone = set(removed)  # built once: a set per unit made this quadratic in the width
        kept = torch.tensor([u for u in range(n) if u not in gone], dtype=torch.long)
        apply_index_map(group, IndexMap.keep(kept), {}, optimizer)
        return (), tuple(removed)

    init = None if units is not None else importance
    return _run(model, optimizer, batch, body, op="prune", layer=layer, group=group.name, init=init)


def _depth_capable(model: nn.Module, what: str) -> list[UnitGroup]:
    groups = _groups(model, what)
    if not callable(getattr(model, "insert_residual", None)) or not callable(getattr(model, "remove_block", None)):
        raise EditError(
            f"{what} needs a model with insert_residual() and remove_block(); {type(model).__name__} has none"
        )
    return groups


def deepen(
    model: nn.Module,
    after: int,
    init: str = "identity",
    optimizer: Optimizer | None = None,
    *,
    width: int | None = None,
    batch: Any = None,
) -> Edit:
    """Insert a hidden layer after layer ``after`` that computes the identity.

    The new layer is a residual block ``x + op2(act(norm(op1(x))))`` whose ``op2`` starts at
    zero: exact with any normalisation and activation. Its inner width is ``width``
    (default: the stream's width). Its parameters join the optimizer's param group of
    the layer before it.
    """
    groups = _depth_capable(model, "deepen")
    _layer_index(after, len(groups), "after", _widths(model))
    if init != "identity":
        raise EditError(f"deepen supports init='identity' only; got {init!r}")
    if width is not None:
        _positive(width, "width")

    def body() -> tuple[tuple[int, ...], tuple[int, ...]]:
        before = list(model.parameters())
        block = model.insert_residual(after, width)  # type: ignore[operator]
        if optimizer is not None:
            sync_parameters(optimizer, model, before)
        return tuple(range(int(block.width))), ()

    return _run(model, optimizer, batch, body, op="deepen", layer=after + 1, group=f"blocks.{after + 1}", init=init)


def remove_layer(
    model: nn.Module,
    layer: int,
    optimizer: Optimizer | None = None,
    *,
    batch: Any = None,
) -> Edit:
    """Remove hidden layer ``layer``.

    A residual block is simply dropped (exact when its last layer is zero). An MLP dense
    layer is merged into its consumer as their linear composition (its norm and activation
    dropped); the consumer's optimizer state restarts. The output change is reported on
    ``batch``.
    """
    groups = _depth_capable(model, "remove_layer")
    _layer_index(layer, len(groups), "layer", _widths(model))
    width = groups[layer].size

    def body() -> tuple[tuple[int, ...], tuple[int, ...]]:
        before = list(model.parameters())
        model.remove_block(layer)  # type: ignore[operator]
        if optimizer is not None:
            sync_parameters(optimizer, model, before)
        return (), tuple(range(width))

    return _run(model, optimizer, batch, body, op="remove_layer", layer=layer, group=f"blocks.{layer}", init=None)
