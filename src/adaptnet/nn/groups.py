"""Unit groups: how an adaptive module declares which tensor slices share one dimension.

A unit group is the set of slices that must change together when units are added,
removed or reordered (DESIGN.md section 3). The module only *declares* groups; the
``adaptnet.edit`` layer applies index maps to them, so edits never need to know which
model they work on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Role = Literal["out", "in", "norm"]

# Where a group's units sit along a dimension that holds more than the units themselves (a fused
# qkv projection, heads of several columns, a flatten of (C, H, W)): a tree of
# ("g",) the group's units, ("n", size) an index space of that size that the edit leaves alone,
# ("cat", (parts...)) parts end to end, ("mul", (parts...)) a row-major product (last fastest).
Layout = tuple[Any, ...]


@dataclass(frozen=True)
class Slice:
    """One tensor of a unit group, indexed by unit along ``dim``.

    Attributes:
        module: the module that owns the tensor.
        name: the parameter or buffer name on ``module`` (``"weight"``, ``"running_mean"``, ...).
        dim: the dimension that is indexed by unit.
        role: ``"out"`` for a producer (rows that compute the units), ``"in"`` for a
            consumer (columns that read the units), ``"norm"`` for other per-unit values
            (normalisation parameters and statistics, tensors added to or multiplying the units).
        layout: where the units sit along ``dim`` when it holds more than one index per unit,
            or None when index ``i`` is unit ``i``.
        fill: the value of a fresh unit's entries where no initialiser sets them (None: the
            fresh-layer default for the name, such as 1 for a norm's weight).
        after_norm: an ``"in"`` slice whose every read is of a normalisation's output
            (LayerNorm, RMSNorm), so that new residual channels reach it as zeros.
    """

    module: nn.Module
    name: str
    dim: int
    role: Role
    layout: Layout | None = None
    fill: float | None = None
    after_norm: bool = False

    @property
    def tensor(self) -> torch.Tensor:
        value = getattr(self.module, self.name)
        assert isinstance(value, torch.Tensor), f"{self.name} is not a tensor"
        return value


@dataclass(frozen=True)
class UnitGroup:
    """All slices that share one unit dimension (the hidden units of one layer).

    Attributes:
        name: a stable, human-readable name such as ``"blocks.2"`` or ``"fc1"``.
        layer: the layer index users pass to ``widen``/``prune`` for this group.
        slices: every tensor slice indexed by the group's units.
        units: the number of units, for groups found by tracing (else read from the first slice).
        mixed: ops that combine the units with each other (``layer_norm``, ``mean``,
            ``softmax``...): adding or copying units changes what those ops compute.
        tied: tensors used both to compute and to read the units (tied weights).
    """

    name: str
    layer: int
    slices: tuple[Slice, ...]
    units: int | None = None
    mixed: frozenset[str] = frozenset()
    tied: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        if self.units is not None:
            return self.units
        first = self.slices[0]
        return int(first.tensor.shape[first.dim])

    def parameters(self) -> list[nn.Parameter]:
        return [s.tensor for s in self.slices if isinstance(s.tensor, nn.Parameter)]


# -- layouts: where each unit's entries sit along a dimension -------------------------------------
def _layout_size(layout: Layout, units: int) -> int:
    kind = layout[0]
    if kind == "g":
        return units
    if kind == "n":
        return int(layout[1])
    sizes = [_layout_size(p, units) for p in layout[1]]
    if kind == "cat":
        return sum(sizes)
    total = 1
    for s in sizes:
        total *= s
    return total


def _expand(layout: Layout, source: torch.Tensor, old_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per flat position after the edit: the old flat position (-1: fresh) and the group unit.

    ``source`` maps the group's new units to old ones (-1 for fresh), as an ``IndexMap``.
    """
    kind = layout[0]
    if kind == "g":
        return source, torch.arange(source.numel())
    if kind == "n":
        n = int(layout[1])
        return torch.arange(n), torch.full((n,), -1)
    parts = [_expand(p, source, old_units) for p in layout[1]]
    old_sizes = [_layout_size(p, old_units) for p in layout[1]]
    if kind == "cat":
        offsets = torch.tensor([0, *old_sizes[:-1]]).cumsum(0).tolist()
        src = torch.cat([torch.where(s >= 0, s + o, -1) for (s, _), o in zip(parts, offsets, strict=True)])
        return src, torch.cat([u for _, u in parts])
    src, unit = parts[0]
    for (s, u), size in zip(parts[1:], old_sizes[1:], strict=True):
        both = (src[:, None] >= 0) & (s[None, :] >= 0)
        src = torch.where(both, src[:, None] * size + s[None, :], -1).flatten()
        unit = torch.maximum(unit[:, None], u[None, :]).flatten()
    return src, unit


def flat_map(sl: Slice, source: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every index along ``sl.dim`` after an edit of ``units`` old units by ``source``:
    the old index it comes from (-1: a fresh unit's entry), and the unit it belongs to."""
    if sl.layout is None:
        return source, torch.arange(source.numel())
    return _expand(sl.layout, source, units)


def unit_positions(sl: Slice, units: int) -> torch.Tensor:
    """``(units, k)``: the indices along ``sl.dim`` of each unit's ``k`` entries, in order."""
    if sl.layout is None:
        return torch.arange(units)[:, None]
    _, unit = _expand(sl.layout, torch.arange(units), units)
    positions = torch.argsort(unit, stable=True)[(unit < 0).sum():]
    return positions.view(units, -1)
