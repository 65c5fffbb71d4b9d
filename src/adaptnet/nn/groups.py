"""Unit groups: how an adaptive module declares which tensor slices share one dimension.

A unit group is the set of slices that must change together when units are added,
removed or reordered (DESIGN.md section 3). The module only *declares* groups; the
``adaptnet.edit`` layer applies index maps to them, so edits never need to know which
model they work on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Role = Literal["out", "in", "norm"]


@dataclass(frozen=True)
class Slice:
    """One tensor of a unit group, indexed by unit along ``dim``.

    Attributes:
        module: the module that owns the tensor.
        name: the parameter or buffer name on ``module`` (``"weight"``, ``"running_mean"``, ...).
        dim: the dimension that is indexed by unit.
        role: ``"out"`` for a producer (rows that compute the units), ``"in"`` for a
            consumer (columns that read the units), ``"norm"`` for per-unit normalisation
            parameters and statistics.
    """

    module: nn.Module
    name: str
    dim: int
    role: Role

    @property
    def tensor(self) -> torch.Tensor:
        value = getattr(self.module, self.name)
        assert isinstance(value, torch.Tensor), f"{self.name} is not a tensor"
        return value


@dataclass(frozen=True)
class UnitGroup:
    """All slices that share one unit dimension (the hidden units of one layer).

    Attributes:
        name: a stable, human-readable name such as ``"blocks.2"``.
        layer: the layer index users pass to ``widen``/``prune`` for this group.
        slices: every tensor slice indexed by the group's units.
    """

    name: str
    layer: int
    slices: tuple[Slice, ...]

    @property
    def size(self) -> int:
        first = self.slices[0]
        return int(first.tensor.shape[first.dim])

    def parameters(self) -> list[nn.Parameter]:
        return [s.tensor for s in self.slices if isinstance(s.tensor, nn.Parameter)]


def linear_like_slices(module: nn.Module, role: Role) -> list[Slice]:
    """Slices of a Linear or Conv layer: rows (``out``) or input columns (``in``)."""
    if role == "out":
        slices = [Slice(module, "weight", 0, "out")]
        if getattr(module, "bias", None) is not None:
            slices.append(Slice(module, "bias", 0, "out"))
        return slices
    return [Slice(module, "weight", 1, "in")]


def norm_slices(module: nn.Module) -> list[Slice]:
    """Per-unit slices of a BatchNorm or LayerNorm (affine parameters and running statistics)."""
    names = ("weight", "bias", "running_mean", "running_var")
    return [
        Slice(module, n, 0, "norm")
        for n in names
        if isinstance(getattr(module, n, None), torch.Tensor)
    ]
