"""The public edits: ``widen``, ``prune``, ``deepen``, ``remove_layer``.

Each one validates the whole request first, then applies it inside a transaction (any
failure restores model and optimizer bit for bit), carries the optimizer along, and
returns an ``Edit`` record. Width edits are index maps on unit groups, named or numbered
(``adaptnet.unit_groups``); depth edits insert or remove a block (``adaptnet.edit.depth``) and
then re-point the optimizer at the new parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from adaptnet.edit import depth as _depth
from adaptnet.edit import importance as _importance
from adaptnet.edit import init as _init
from adaptnet.edit._apply import apply_index_map
from adaptnet.edit._probe import LossFn, split_batch
from adaptnet.edit._run import model_widths, run_edit
from adaptnet.edit._transaction import Snapshot
from adaptnet.edit.index_map import IndexMap
from adaptnet.edit.optim import NEW_STATES, sync_parameters
from adaptnet.edit.record import Edit
from adaptnet.edit.splitting import splitting_scores
from adaptnet.errors import EditError
from adaptnet.groups import find_group, verify_one_unit
from adaptnet.nn.groups import UnitGroup
from adaptnet.nn.protocols import InsertsBlocks

Optimizer = torch.optim.Optimizer
Layer = int | str

# Ops whose statistics stay the same when every unit is copied equally often.
_MEAN_LIKE = frozenset({"layer_norm", "rms_norm", "group_norm", "mean", "mean_square", "var", "std", "var_mean",
                        "std_mean", "layer_norm without a scale", "rms_norm without a scale"})


def inexact_reason(group: UnitGroup, init: str, by: int) -> str | None:
    """Why ``init`` cannot keep the function when ``group`` grows by ``by`` units, or None."""
    if init == "random" or (init == "zero" and _init.carry_kind(group) is not None):
        return None
    if group.tied:
        return f"{', '.join(group.tied)} both computes and reads its units (tied weights)"
    if not group.mixed:
        return None
    mean_like = group.mixed <= _MEAN_LIKE
    if init in ("net2net", "firefly") and mean_like and by % group.size == 0:
        return None
    why = f"its units are combined by {', '.join(sorted(group.mixed))}, whose statistics new units change"
    if init in ("net2net", "firefly") and mean_like:
        why += f"; net2net is exact here when by is a multiple of its {group.size} units"
    return why


def _check_exact(group: UnitGroup, init: str, by: int) -> None:
    """Refuse an init that is meant to keep the function where this group makes that impossible."""
    why = inexact_reason(group, init, by)
    if why is not None:
        raise EditError(
            f"init={init!r} cannot keep the function of group {group.name!r}: {why}; pass exact=False "
            "to widen anyway (Edit.max_output_change reports the change when batch= is given)"
        )


def check_positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EditError(f"{name} must be a positive integer, got {value!r}")
    return value


def widen(
    model: nn.Module,
    layer: Layer,
    by: int,
    init: str = "net2net",
    optimizer: Optimizer | None = None,
    batch: Any = None,
    loss_fn: LossFn | None = None,
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    exact: bool = True,
    new_state: str = "copy",
) -> Edit:
    """Add ``by`` units to a unit group; they are appended after the existing ones.

    Args:
        model: any ``nn.Module`` (traced once: see ``adaptnet.unit_groups``).
        layer: a group name (``"fc1"``) or its index in ``unit_groups(model)`` (``model.widths``).
        by: number of units (channels, heads) to add.
        init: ``"net2net"``, ``"firefly"``, ``"zero"``, ``"gradmax"`` (all exact) or ``"random"``.
        optimizer: carried along: same parameter objects, per-element state remapped.
        batch: ``(inputs, targets)`` (``gradmax``), or inputs alone to measure the output change.
        loss_fn: ``loss_fn(outputs, targets)``, needed by ``gradmax``.
        noise: ``net2net``/``firefly``: relative symmetry-breaking noise on the split shares (exact).
        generator: the random source for unit choice and fresh weights.
        exact: refuse (``EditError``) an exact init that this group cannot keep exact (units
            mixed by a LayerNorm or a mean, tied weights); False widens anyway (``zero`` still
            carries a norm-mixed stream where that is exact, else uses its plain form).
        new_state: the optimizer state of units split from others (``net2net``, ``firefly``):
            ``"copy"`` their source's, ``"zero"`` none (as fresh units), ``"split"`` the source's
            rescaled to the gradients the split leaves them (first moments by the unit's share,
            second moments by its square: staged training's rule). Fresh units start at zero.
    """
    group = find_group(model, layer, "layer")
    check_positive(by, "by")
    if init not in _init.INITS:
        raise EditError(f"init must be one of {', '.join(_init.INITS)}; got {init!r}")
    if exact:
        _check_exact(group, init, by)
    if init in ("gradmax", "firefly"):
        if loss_fn is None:
            raise EditError(f"init='{init}' needs batch=(inputs, targets) and loss_fn=")
        split_batch(batch, f"init='{init}'")
    if not isinstance(noise, (int, float)) or noise < 0:
        raise EditError(f"noise must be a number >= 0, got {noise!r}")
    if new_state not in NEW_STATES:
        raise EditError(f"new_state must be one of {', '.join(NEW_STATES)}; got {new_state!r}")

    def body() -> tuple[tuple[int, ...], tuple[int, ...]]:
        n = group.size
        if init == "net2net":
            imap, fresh = _init.net2net(group, by, generator, float(noise))
        elif init == "firefly":
            ranking = torch.argsort(splitting_scores(model, group, batch, loss_fn), descending=True, stable=True)
            imap, fresh = _init.net2net(group, by, generator, float(noise), ranking)
        elif init == "zero" and _init.carry_kind(group) is not None:
            snapshot = Snapshot(model, optimizer)
            try:
                _init.carry_checked(model, group, by, optimizer, generator)
                return tuple(range(n, n + by)), ()
            except EditError:
                if exact:
                    raise
                snapshot.restore()  # exact=False: where the carry cannot be exact, the plain zero init
            imap, fresh = _init.zero(group, by, generator)
        elif init == "zero":
            imap, fresh = _init.zero(group, by, generator)
        elif init == "random":
            imap, fresh = _init.random(group, by, generator)
        else:
            imap, fresh = _init.gradmax(model, group, by, batch, loss_fn)
        apply_index_map(group, imap, fresh, optimizer, model, new_state)
        return tuple(range(n, n + by)), ()

    return run_edit(model, optimizer, batch, body, op="widen", layer=group.layer, group=group.name, init=init)


def prune(
    model: nn.Module,
    layer: Layer,
    amount: float | None = None,
    keep: int | None = None,
    units: Sequence[int] | None = None,
    importance: str = "magnitude",
    optimizer: Optimizer | None = None,
    batch: Any = None,
    loss_fn: LossFn | None = None,
) -> Edit:
    """Remove units of a unit group (``layer``: its name or index); the survivors keep their order.

    Give exactly one of ``amount`` (a fraction in (0, 1)), ``keep`` (units left) or
    ``units`` (indices to remove). With ``amount``/``keep`` the least important units go,
    by ``importance`` (``"magnitude"`` or ``"taylor"``). ``batch`` measures the output change
    (and feeds ``taylor``, which also needs ``loss_fn``). One unit may be left (one attention head,
    or one key/value head with its query heads, too), except where one unit would trace
    differently: one group of a grouped convolution (``EditError``, the model unchanged).
    """
    group = find_group(model, layer, "layer")
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
            raise EditError(f"keep must be an integer in [1, {n}] ({group.name} has {n} units), got {keep!r}")
        n_remove = n - keep
    else:
        assert units is not None
        chosen = [int(u) for u in units] if all(isinstance(u, int) and not isinstance(u, bool) for u in units) else []
        if len(chosen) != len(units) or len(set(chosen)) != len(chosen) or any(not 0 <= u < n for u in chosen):
            raise EditError(f"units must be distinct integers in [0, {n - 1}], got {list(units)!r}")
        n_remove = len(chosen)
    if n_remove >= n:
        raise EditError(f"pruning all {n} units of {group.name} would cut the network; keep at least 1")
    if n - n_remove == 1 and _grouped_conv(group):
        raise EditError(
            f"pruning {group.name} to 1 unit would leave one group of a grouped convolution, which then "
            "traces as a plain convolution (its channels no longer one group): keep at least 2"
        )
    # One unit is a size-1 dim, which a trace may read as no unit at all (a broadcast): the group
    # would vanish at the next trace and never grow again. A hidden layer's one unit, one attention
    # head, one key/value head with its query heads trace as several do; a transformer's residual
    # stream of one channel (its norms' weights then broadcast) does not. The edit traces again to see.
    retrace_one = n - n_remove == 1
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
        keep_mask = torch.ones(n, dtype=torch.bool)
        keep_mask[removed] = False
        kept = keep_mask.nonzero().flatten()
        apply_index_map(group, IndexMap.keep(kept), {}, optimizer, model)
        if retrace_one:
            failure = verify_one_unit(model, group.name)
            if failure is not None:
                raise EditError(f"pruning {group.name} to 1 unit: {failure}; keep at least 2 (the edit is undone)")
        return (), tuple(removed)

    init = None if units is not None else importance
    return run_edit(model, optimizer, batch, body, op="prune", layer=group.layer, group=group.name, init=init)


def _grouped_conv(group: UnitGroup) -> bool:
    """The units are the groups of a grouped convolution (a depthwise conv's channels)."""
    return any(isinstance(sl.module, nn.modules.conv._ConvNd) and sl.module.groups == group.size > 1
               for sl in group.slices)


def _own_index(model: nn.Module, value: Any, name: str) -> tuple[InsertsBlocks, int]:
    """Depth edits by index: adaptnet's own models, which insert their own residual blocks."""
    if not isinstance(model, InsertsBlocks):
        raise EditError(
            f"{name} must name a block inside an nn.Sequential or nn.ModuleList of residual blocks of "
            f"{type(model).__name__} (such as 'blocks.3'); got {value!r}"
        )
    widths = model_widths(model)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(widths):
        raise EditError(
            f"{name} must be an integer in [0, {len(widths) - 1}] (the model has {len(widths)} hidden layers, "
            f"widths {list(widths)}); got {value!r}"
            if widths else f"{name}={value!r}: the model has no hidden layer"
        )
    return model, value


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def deepen(
    model: nn.Module,
    after: Layer,
    init: str = "identity",
    optimizer: Optimizer | None = None,
    *,
    width: int | None = None,
    batch: Any = None,
) -> Edit:
    """Insert a block after ``after`` that computes the identity.

    ``after`` names a block of a user's model (``"blocks.3"``: an ``nn.Sequential`` or
    ``nn.ModuleList`` of residual blocks): a copy of it is inserted with its output
    projections at zero (``init="identity"``; ``"fresh"`` re-initialises the copy's other
    weights first), or its last norm's scale at zero where a norm follows the projections
    (``relu(bn(conv(x)) + x)``). Exact to the bit, or refused (``EditError``) for a block that
    is not residual. ``init="copy"`` inserts the copy unchanged (stacking, as G_stack grows
    transformers): not exact; ``batch=`` reports the change. See ``adaptnet.edit.depth``.

    ``after`` as an index adds a residual block ``x + op2(act(norm(op1(x))))`` with ``op2`` at
    zero to adaptnet's own models; its inner width is ``width`` (default: the stream's width).
    New parameters join the optimizer's param group of the layer before them.
    """
    if isinstance(after, str):
        _depth.locate(model, after, "after")
        if init not in _depth.DEPTH_INITS:
            raise EditError(f"init must be one of {', '.join(_depth.DEPTH_INITS)}; got {init!r}")
        if width is not None:
            raise EditError("width= applies to adaptnet's own models; a copied block keeps its widths")
        inserted: list[str] = []

        def insert() -> tuple[tuple[int, ...], tuple[int, ...]]:
            before = list(model.parameters())
            name, _ = _depth.insert_block(model, after, init)
            _depth.record_insert(model, after, init)
            inserted.append(name)
            if optimizer is not None:
                sync_parameters(optimizer, model, before)
            return (), ()

        record = run_edit(model, optimizer, batch, insert, op="deepen", layer=-1, group=after, init=init)
        return replace(record, group=inserted[0])
    own, index = _own_index(model, after, "after")
    if init != "identity":
        raise EditError(f"deepen of adaptnet's own models supports init='identity' only; got {init!r}")
    if width is not None:
        check_positive(width, "width")
    names: list[str] = []

    def body() -> tuple[tuple[int, ...], tuple[int, ...]]:
        before = list(model.parameters())
        block = own.insert_residual(index, width)
        names.append(_name_of(model, block))
        if optimizer is not None:
            sync_parameters(optimizer, model, before)
        return tuple(range(model_widths(model)[index + 1])), ()

    record = run_edit(model, optimizer, batch, body, op="deepen", layer=index + 1, group="", init=init)
    return replace(record, group=names[0])


def remove_layer(
    model: nn.Module,
    layer: Layer,
    optimizer: Optimizer | None = None,
    *,
    batch: Any = None,
) -> Edit:
    """Remove a block: ``layer`` names one in a stack of a user's model (``"blocks.3"``), or is
    the index of a hidden layer of adaptnet's own models.

    A residual block is simply dropped (exact when its output is zero). An ``AdaptiveMLP`` dense
    layer is merged into its consumer as their linear composition (its norm and activation
    dropped); the consumer's optimizer state restarts. The output change is reported on
    ``batch``.
    """
    if isinstance(layer, str):
        _depth.locate(model, layer, "layer")

        def drop() -> tuple[tuple[int, ...], tuple[int, ...]]:
            before = list(model.parameters())
            _depth.remove_block(model, layer)
            if optimizer is not None:
                sync_parameters(optimizer, model, before)
            return (), ()

        return run_edit(model, optimizer, batch, drop, op="remove_layer", layer=-1, group=layer, init=None)
    own, index = _own_index(model, layer, "layer")
    width = model_widths(model)[index]
    blocks = getattr(model, "blocks", None)
    name = _name_of(model, blocks[index]) if isinstance(blocks, nn.ModuleList) else str(index)

    def body() -> tuple[tuple[int, ...], tuple[int, ...]]:
        before = list(model.parameters())
        own.remove_block(index)
        if optimizer is not None:
            sync_parameters(optimizer, model, before)
        return (), tuple(range(width))

    return run_edit(model, optimizer, batch, body, op="remove_layer", layer=index, group=name, init=None)
