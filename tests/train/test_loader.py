"""TensorLoader: the batches and RNG draws of the equivalent DataLoader, without row-by-row collation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptnet as an
from adaptnet.train import _rng
from adaptnet.train.distributed import ShardedSampler
from adaptnet.train.loader import TensorLoader, make_loader
from adaptnet.train.trainer import Trainer


def _tensors(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 2, generator=g), torch.randint(0, 5, (n,), generator=g)


def _passes(loader: Any, passes: int = 2) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """The batches of ``passes`` passes from a fixed global seed, and the global RNG state after them."""
    torch.manual_seed(123)
    out = [[t for batch in loader for t in batch] for _ in range(passes)]
    return out, torch.get_rng_state()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7, 10, 64])
def test_batches_and_rng_draws_equal_those_of_the_dataloader(shuffle: bool, drop_last: bool,
                                                             batch_size: int) -> None:
    x, y = _tensors()
    ours = TensorLoader(x, y, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    theirs = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    assert len(ours) == len(theirs)
    (a, rng_a), (b, rng_b) = _passes(ours), _passes(theirs)
    assert len(a[0]) == len(b[0]) == 2 * len(theirs)
    assert all(torch.equal(s, t) and s.dtype == t.dtype for p, q in zip(a, b, strict=True)
               for s, t in zip(p, q, strict=True))
    assert torch.equal(rng_a, rng_b)  # the random stream after the passes is the same
    if shuffle and a[0]:
        assert not all(torch.equal(s, t) for s, t in zip(a[0], a[1], strict=True))  # a new order per pass


def test_batches_are_copies_in_rows_of_batch_size() -> None:
    x, y = _tensors(23)
    batches = list(TensorLoader(x, y, batch_size=10))
    assert [len(b[0]) for b in batches] == [10, 10, 3]
    assert [len(b[0]) for b in TensorLoader(x, y, batch_size=10, drop_last=True)] == [10, 10]
    batches[0][0].zero_()
    assert x.abs().sum() > 0  # a batch never aliases the data


@pytest.mark.parametrize(("world", "rank", "start"), [(1, 0, 0), (2, 1, 0), (2, 0, 13), (3, 2, 8)])
def test_a_sharded_sampler_gives_the_dataloaders_batches(world: int, rank: int, start: int) -> None:
    x, y = _tensors()
    batches = []
    for loader_type in ("ours", "theirs"):
        sampler = ShardedSampler(TensorDataset(x, y), world, rank, seed=5)
        sampler.set_epoch(3)
        sampler.start = start
        loader: Any = (TensorLoader(x, y, batch_size=8, sampler=sampler) if loader_type == "ours"
                       else DataLoader(TensorDataset(x, y), batch_size=8, sampler=sampler))
        assert len(loader) == -(-len(sampler) // 8)
        batches.append(_passes(loader, passes=1))
    (a, rng_a), (b, rng_b) = batches
    assert all(torch.equal(s, t) for s, t in zip(a[0], b[0], strict=True)) and len(a[0]) == len(b[0])
    assert torch.equal(rng_a, rng_b)


def test_the_trainers_tensor_data_is_batched_without_reading_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _tensors()
    for data in ((x, y), [x, y], TensorDataset(x, y)):
        loader = make_loader(data, 16, shuffle=True)
        assert isinstance(loader, TensorLoader)

        def no_rows(self: TensorDataset, index: int) -> Any:
            raise AssertionError("a row was read on its own")

        with monkeypatch.context() as m:
            m.setattr(TensorDataset, "__getitem__", no_rows)
            assert sum(len(b[0]) for b in loader) == len(x)
    sharded = make_loader((x, y), 16, shuffle=True, seed=3, sharded=(1, 2))
    assert isinstance(sharded, TensorLoader) and isinstance(sharded.sampler, ShardedSampler)
    assert sharded.sampler.rank == 1 and sharded.sampler.seed == _rng.derive_seed(3, 2) % 2**62
    assert not isinstance(make_loader((x, y), 16, shuffle=False, sharded=(1, 2)).sampler, ShardedSampler)
    given = DataLoader(TensorDataset(x, y), batch_size=4)
    assert make_loader(given, 16, shuffle=True) is given


def test_bad_data_gets_one_clear_error() -> None:
    x, y = _tensors()
    with pytest.raises(TypeError, match="pair of tensors"):
        make_loader((x, y, y), 16, shuffle=True)
    with pytest.raises(TypeError, match="pair of tensors"):
        make_loader(x, 16, shuffle=True)
    with pytest.raises(ValueError, match="same first dimension"):
        make_loader((x, y[:-1]), 16, shuffle=True)
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(x, y, batch_size=0)


def _fit(data: Any) -> tuple[Trainer, dict[str, list[float]]]:
    x, y = _tensors(70)
    torch.manual_seed(0)
    model = an.AdaptiveMLP(6, [8], 5, dropout=0.2)  # dropout: the global RNG stream matters
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), nn.functional.cross_entropy,
                      policies=[an.GrowEvery(every=1, by=2, init="net2net")], seed=4, batch_size=16)
    history = trainer.fit(data, (x[:20].flatten(1), y[:20]), epochs=3)
    return trainer, history


def test_tensors_train_as_the_equivalent_dataloader_bit_for_bit() -> None:
    x, y = _tensors(70)
    x = x.flatten(1)
    ref, ref_history = _fit(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    for data in ((x, y), TensorDataset(x, y)):
        trainer, history = _fit(data)
        assert history == ref_history
        for (name, p), q in zip(trainer.model.state_dict().items(), ref.model.state_dict().values(), strict=True):
            assert torch.equal(p, q), name


@pytest.mark.gpu
@pytest.mark.parametrize("shuffle", [False, True])
def test_tensors_on_the_gpu_give_the_dataloaders_batches(shuffle: bool) -> None:
    x, y = (t.cuda() for t in _tensors())
    ours = TensorLoader(x, y, batch_size=7, shuffle=shuffle)
    theirs = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=shuffle)
    (a, rng_a), (b, rng_b) = _passes(ours), _passes(theirs)
    assert all(t.is_cuda for batch in a for t in batch)
    assert len(a) == len(b) and all(len(p) == len(q) for p, q in zip(a, b, strict=True))
    assert all(torch.equal(s, t) for p, q in zip(a, b, strict=True) for s, t in zip(p, q, strict=True))
    assert torch.equal(rng_a, rng_b)
