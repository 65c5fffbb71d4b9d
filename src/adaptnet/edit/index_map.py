"""Index maps: the one description of every width edit (widen, prune, split, reorder).

For each unit after the edit, ``source`` names the unit before the edit it comes from, or
-1 for a fresh unit. Consumers (the columns that read the units) may be multiplied by a
per-unit ``scale``: Net2Net splitting gives a unit and its copies each ``1/count`` of the
original outgoing weights so that their sum is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IndexMap:
    """Attributes:
    source: ``(n_new,)`` long tensor; ``source[j]`` is the old unit that new unit ``j``
        copies, or -1 when ``j`` is fresh.
    scale: ``(n_new,)`` float tensor for consumer columns, or None for no scaling.
    """

    source: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.source.numel())

    @property
    def fresh(self) -> torch.Tensor:
        """Positions of the fresh units, ``(n_fresh,)``."""
        return (self.source < 0).nonzero().flatten()

    @classmethod
    def keep(cls, kept: torch.Tensor) -> IndexMap:
        """Keep the units ``kept`` (in that order) and drop the others."""
        return cls(kept.to(torch.long))

    @classmethod
    def append(cls, old_size: int, sources: torch.Tensor, scale: torch.Tensor | None = None) -> IndexMap:
        """Keep every old unit in place and append one new unit per entry of ``sources``."""
        return cls(torch.cat([torch.arange(old_size), sources.to(torch.long)]), scale)


def remap(t: torch.Tensor, dim: int, imap: IndexMap, fresh: torch.Tensor | float) -> torch.Tensor:
    """A new tensor whose slices along ``dim`` follow ``imap`` (``t`` is never modified).

    Args:
        t: the tensor before the edit; ``t.shape[dim]`` is the old number of units.
        dim: the unit dimension.
        imap: the index map.
        fresh: values for the fresh units: a tensor shaped like ``t`` with
            ``n_fresh`` along ``dim``, or a scalar fill.
    """
    n_old = t.shape[dim]
    if imap.size >= n_old and torch.equal(imap.source[:n_old], torch.arange(n_old)):
        # Old units in order, then new ones (every widen): one copy of the old tensor, not a gather.
        shape = list(t.shape)
        shape[dim] = imap.size
        out = t.new_empty(shape)
        out.narrow(dim, 0, n_old).copy_(t)
        tail = IndexMap(imap.source[n_old:])
        if tail.size:
            out.narrow(dim, n_old, tail.size).copy_(remap(t, dim, tail, fresh))
        return out
    source = imap.source.to(t.device)
    out = t.index_select(dim, source.clamp(min=0))
    positions = imap.fresh.to(t.device)
    if positions.numel():
        if isinstance(fresh, torch.Tensor):
            values = fresh.to(device=t.device, dtype=t.dtype)
        else:
            shape = list(t.shape)
            shape[dim] = positions.numel()
            values = torch.full(shape, float(fresh), dtype=t.dtype, device=t.device)
        out.index_copy_(dim, positions, values)
    return out


def scale_along(t: torch.Tensor, dim: int, scale: torch.Tensor) -> torch.Tensor:
    """``t`` multiplied by ``scale`` broadcast along ``dim``."""
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * scale.to(device=t.device, dtype=t.dtype).view(shape)
