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


def _keeps_prefix(source: torch.Tensor, n_old: int) -> bool:
    """Whether ``source`` starts with every old unit in order (every widen: old units, then new ones)."""
    return source.numel() >= n_old and torch.equal(source[:n_old], torch.arange(n_old, device=source.device))


def _along(dim: int, t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (one per index along ``dim``) shaped to broadcast against ``t``, in ``t``'s dtype."""
    shape = [1] * t.dim()
    shape[dim] = -1
    return values.to(device=t.device, dtype=t.dtype).view(shape)


def _gather(t: torch.Tensor, dim: int, source: torch.Tensor, fresh: torch.Tensor | float) -> torch.Tensor:
    """A new tensor (or ``fresh`` itself, moved to ``t``'s device and dtype) whose slices along
    ``dim`` are ``t``'s at ``source`` and, where ``source`` is -1, ``fresh``'s, in order."""
    shape = list(t.shape)
    shape[dim] = source.numel()
    is_fresh = source < 0
    n_fresh = int(is_fresh.sum())
    if isinstance(fresh, torch.Tensor) and n_fresh and list(fresh.shape) != [*shape[:dim], n_fresh, *shape[dim + 1:]]:
        raise ValueError(f"fresh values of shape {tuple(fresh.shape)} for {n_fresh} fresh units along dim {dim} "
                         f"of a tensor shaped {tuple(t.shape)}")
    if n_fresh == 0:
        return t.index_select(dim, source.to(t.device))
    if n_fresh == source.numel():  # only fresh units (widen with zero, random, gradmax): no gather at all
        if isinstance(fresh, torch.Tensor):
            return fresh.to(device=t.device, dtype=t.dtype)
        return torch.full(shape, float(fresh), dtype=t.dtype, device=t.device)
    out = t.index_select(dim, source.clamp(min=0).to(t.device))
    positions = is_fresh.nonzero().flatten().to(t.device)
    values = fresh.to(device=t.device, dtype=t.dtype) if isinstance(fresh, torch.Tensor) else \
        torch.full([positions.numel() if d == dim else s for d, s in enumerate(shape)], float(fresh),
                   dtype=t.dtype, device=t.device)
    return out.index_copy_(dim, positions, values)


def remap(t: torch.Tensor, dim: int, imap: IndexMap, fresh: torch.Tensor | float,
          scale: torch.Tensor | None = None) -> torch.Tensor:
    """A new tensor whose slices along ``dim`` follow ``imap`` (``t`` is never modified).

    Args:
        t: the tensor before the edit; ``t.shape[dim]`` is the old number of units.
        dim: the unit dimension.
        imap: the index map.
        fresh: values for the fresh units: a tensor shaped like ``t`` with
            ``n_fresh`` along ``dim``, or a scalar fill.
        scale: ``(n_new,)``, multiplies the result along ``dim`` (consumers of split units).
    """
    n_old, n_new = t.shape[dim], imap.size
    prefix = _keeps_prefix(imap.source, n_old)
    if prefix and n_new > n_old and not bool((imap.source[n_old:] < 0).all()):
        # New units copied from old ones (net2net, firefly): one gather over all units reads each
        # source row once; copying the old units first and gathering the copies after reads it twice.
        out = _gather(t, dim, imap.source, fresh)
        return out if scale is None else out.mul_(_along(dim, out, scale))
    if prefix:
        # Old units in order, then fresh ones (zero, random, gradmax): the old tensor copied once, whole,
        # next to the fresh units' values. ``cat`` copies row by row; a copy into a column slice of
        # a new tensor (``narrow(1, ...).copy_``) ran at under half its speed.
        out = torch.cat([t, _gather(t, dim, imap.source[n_old:], fresh)], dim)
        return out if scale is None else out.mul_(_along(dim, out, scale))
    out = _gather(t, dim, imap.source, fresh)
    if scale is not None:
        return out * _along(dim, out, scale)
    # Only fresh units: the result must not be the caller's own tensor of values.
    return out.clone() if isinstance(fresh, torch.Tensor) and out.data_ptr() == fresh.data_ptr() else out


def scale_along(t: torch.Tensor, dim: int, scale: torch.Tensor) -> torch.Tensor:
    """``t`` multiplied by ``scale`` broadcast along ``dim``."""
    return t * _along(dim, t, scale)
