"""How much each unit of a group matters, for choosing what to prune.

* ``magnitude``: the L2 norm of the unit's incoming and outgoing weights together.
* ``taylor``: the first-order estimate of the loss change when the unit is removed,
  ``|sum over the unit's parameters of w * dL/dw|`` (Molchanov et al., 2019), on ``batch``
  (or on the gradients already in ``.grad`` when no batch is given).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptnet.edit._probe import LossFn, backward_on
from adaptnet.edit._transaction import Snapshot
from adaptnet.errors import EditError
from adaptnet.nn.groups import Slice, UnitGroup, unit_positions

IMPORTANCES = ("magnitude", "taylor")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in float32 when it is a half type (its squares and products would lose
    most of their bits or overflow); float32 and float64 stay as they are."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _per_unit(sl: Slice, t: torch.Tensor, units: int) -> torch.Tensor:
    """``(units,)`` in float64: the sum of each unit's entries of ``t`` along ``sl.dim``.

    Summed in ``t``'s own dtype: a sum with ``dtype=torch.float64`` casts all of ``t`` first, which
    made scoring the larger part of a prune. The relative error of a float32 sum (about 1e-7) only
    matters between units whose scores tie anyway.
    """
    if sl.layout is None and t.dim() > 1:
        sums = t.sum([d for d in range(t.dim()) if d != sl.dim])
    else:
        moved = t.movedim(sl.dim, 0)
        if sl.layout is not None:
            moved = moved[unit_positions(sl, units).flatten().to(t.device)]
        sums = moved.reshape(units, -1).sum(dim=1)
    return sums.to(torch.float64)


def magnitude(group: UnitGroup) -> torch.Tensor:
    """``(n_units,)`` L2 norms over the unit's ``out`` and ``in`` slices."""
    squares = [_per_unit(sl, _wide(sl.tensor).square(), group.size) for sl in group.slices if sl.role != "norm"]
    return torch.stack(squares).sum(dim=0).sqrt()


def taylor(model: nn.Module, group: UnitGroup, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """``(n_units,)`` first-order Taylor importance."""
    params = [sl for sl in group.slices if isinstance(sl.tensor, nn.Parameter)]

    def score() -> torch.Tensor:
        terms = []
        for sl in params:
            grad = sl.tensor.grad
            if grad is None:
                raise EditError("importance='taylor' needs batch=(inputs, targets) and loss_fn=, or gradients in .grad")
            terms.append(_per_unit(sl, _wide(sl.tensor) * _wide(grad), group.size))
        return torch.stack(terms).sum(dim=0).abs()

    if batch is None:
        return score()
    snapshot = Snapshot(model, None)
    try:
        backward_on(model, batch, loss_fn, "importance='taylor'")
        return score()
    finally:
        snapshot.restore()
