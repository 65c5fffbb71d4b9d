"""The Trainer's loader for data held in tensors: whole batches, one index operation per tensor.

A ``DataLoader`` over a ``TensorDataset`` fetches a batch row by row (``dataset[i]`` for each
index) and stacks the rows with ``default_collate``; on small models that costs about as
much as the training step itself. ``TensorLoader`` takes each batch with one
``index_select`` per tensor instead, and yields the very batches of
``DataLoader(TensorDataset(*tensors), batch_size, shuffle=..., sampler=..., drop_last=...)``.

It also draws from the global torch generator exactly as that ``DataLoader`` does: one
int64 when an iterator is created (the ``DataLoader`` iterator's base seed), then, when
shuffling without a sampler, one int64 at the first batch that seeds the permutation (the
draw of ``RandomSampler``). So passing tensors or the equivalent ``DataLoader`` gives the
same run, bit for bit, and the Trainer's seeding of each epoch from ``(seed, epoch)`` makes
the order reproducible and a mid-epoch resume exact (see ``Trainer._batches``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from adaptnet.train import _rng
from adaptnet.train.distributed import ShardedSampler

Batch = tuple[torch.Tensor, ...]


class TensorLoader:
    """Batches of rows of in-memory tensors (all with the same first dimension ``N``).

    Args:
        *tensors: ``(N, ...)`` tensors; each batch is ``(t[idx] for t in tensors)``.
        batch_size: rows per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: a new random order per pass, drawn from the global torch generator.
        sampler: the row order instead (for example a ``ShardedSampler`` under DDP); its
            ``set_epoch`` / ``start`` are the caller's to set before each pass.
        drop_last: drop the last batch when it has fewer than ``batch_size`` rows.

    Attributes:
        dataset: ``TensorDataset(*tensors)`` (for code that reads rows, such as the probe).
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int = 1, shuffle: bool = False,
                 sampler: Sampler[int] | None = None, drop_last: bool = False):
        if not tensors:
            raise ValueError("TensorLoader needs at least one tensor")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if shuffle and sampler is not None:
            raise ValueError("give shuffle=True or a sampler, not both (as DataLoader)")
        if any(t.dim() == 0 for t in tensors) or len({t.size(0) for t in tensors}) != 1:
            rows = [tuple(t.shape[:1]) for t in tensors]
            raise ValueError(f"the tensors must all have the same first dimension (rows), got {rows}")
        self.dataset = TensorDataset(*tensors)
        self.tensors = tuple(tensors)
        self.batch_size, self.shuffle, self.sampler, self.drop_last = batch_size, shuffle, sampler, drop_last

    def __len__(self) -> int:
        """Batches per pass."""
        rows = len(self.sampler) if self.sampler is not None else len(self.dataset)  # type: ignore[arg-type]
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed
        return self._batches()

    def _batches(self) -> Iterator[Batch]:
        # A generator: the order is made at the first batch, when RandomSampler would draw it.
        n = len(self.dataset)
        if self.sampler is not None:
            order = torch.tensor(list(self.sampler), dtype=torch.int64)  # (rows,)
        elif self.shuffle:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (N,)
        else:
            order = torch.arange(n)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        # The order is drawn on the CPU (the same draws wherever the data is); index_select needs
        # the index on each tensor's device, so it is copied there once per pass.
        orders = {device: order.to(device) for device in {t.device for t in self.tensors}}
        for start in range(0, stop, self.batch_size):
            yield tuple(t.index_select(0, orders[t.device][start:start + self.batch_size]) for t in self.tensors)


Loader = DataLoader | TensorLoader
Data = DataLoader | TensorLoader | TensorDataset | tuple[torch.Tensor, torch.Tensor] | Sequence[torch.Tensor]


def make_loader(data: Any, batch_size: int, shuffle: bool, *, seed: int = 0, sharded: tuple[int, int] | None = None
                ) -> Loader:
    """The loader the Trainer uses for ``data``: a loader as given, or a ``TensorLoader``.

    Args:
        data: a ``DataLoader`` or ``TensorLoader`` (used as it is), or ``(inputs, targets)``
            as a pair of tensors or a ``TensorDataset`` of two tensors.
        batch_size, shuffle: for tensor data.
        seed: the run's seed (the ``ShardedSampler``'s seed derives from it).
        sharded: ``(rank, world_size)``: a shuffled pass is dealt out by a ``ShardedSampler``
            (``batch_size`` rows per rank and step); None: one process's seeded shuffle.
    """
    if isinstance(data, (DataLoader, TensorLoader)):
        return data
    tensors = data.tensors if isinstance(data, TensorDataset) else data
    if not (isinstance(tensors, (tuple, list)) and len(tensors) == 2
            and all(isinstance(t, torch.Tensor) for t in tensors)):
        raise TypeError("data must be a DataLoader, a pair of tensors (inputs, targets) or a TensorDataset of "
                        f"those two tensors; got {type(data).__name__}")
    x, y = tensors
    if shuffle and sharded is not None:
        rank, world = sharded
        sampler = ShardedSampler(TensorDataset(x, y), world, rank, seed=_rng.derive_seed(seed, 2) % 2**62)
        return TensorLoader(x, y, batch_size=batch_size, sampler=sampler)
    return TensorLoader(x, y, batch_size=batch_size, shuffle=shuffle)
