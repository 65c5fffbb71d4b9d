"""Callback hook order: ``on_epoch_end`` sees the model that produced the epoch's metrics; edits follow."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adaptnet as an
from adaptnet.edit import Edit
from adaptnet.policy import EditRequest, GrowEvery, PruneToBudget
from adaptnet.train.callbacks import Callback
from adaptnet.train.rundir import read_events, read_metrics
from adaptnet.train.trainer import Trainer


def _data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=g, dtype=torch.float64)
    y = (x[:, :1] * x[:, 1:2]).sin() + 0.1 * torch.randn(80, 1, generator=g, dtype=torch.float64)
    return x[:48], y[:48], x[48:], y[48:]


def _trainer(run: Path | None, callbacks: list[Callback]) -> Trainer:
    torch.manual_seed(0)
    model = an.AdaptiveMLP(6, [4, 3], 1, dropout=0.1).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    policies = [GrowEvery(every=1, by=2, where="round_robin", init="net2net"), PruneToBudget(amount=0.25, start=2)]
    return Trainer(model, opt, nn.functional.mse_loss, policies=policies, callbacks=callbacks, run_dir=run,
                   seed=3, batch_size=16, checkpoint_every=1)


class _KeepBest(Callback):
    """What a best-model callback does: keep a copy of the model whenever the validation loss improves."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, Any], nn.Module]] = []

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        self.seen.append((dict(metrics), copy.deepcopy(trainer.model)))


def test_on_epoch_end_sees_the_model_that_produced_the_metrics() -> None:
    x, y, xv, yv = _data()
    keep = _KeepBest()
    trainer = _trainer(None, [keep])
    trainer.fit((x, y), (xv, yv), epochs=4)
    assert len(keep.seen) == 4
    for metrics, model in keep.seen:
        assert list(model.widths) == metrics["widths"]  # type: ignore[attr-defined]
        assert sum(p.numel() for p in model.parameters()) == metrics["params"]
        model.eval()
        with torch.no_grad():  # float64: the same numbers up to the order of summation
            loss = float(nn.functional.mse_loss(model(xv), yv))
        assert abs(loss - metrics["val_loss"]) < 1e-12
    # ... and the next epoch trains the edited model: every epoch changed the widths.
    assert all(a[0]["widths"] != b[0]["widths"] for a, b in zip(keep.seen, keep.seen[1:], strict=False))
    assert list(trainer.model.widths) != keep.seen[-1][0]["widths"]


class _Order(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.calls.append("epoch_start")

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        self.calls.append("epoch_end")

    def on_before_edit(self, trainer: Trainer, request: EditRequest) -> None:
        self.calls.append("before_edit")

    def on_after_edit(self, trainer: Trainer, edit: Edit, event: dict[str, Any]) -> None:
        self.calls.append("after_edit")

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        self.calls.append("checkpoint")


def test_hooks_at_the_end_of_an_epoch_run_in_the_documented_order(tmp_path: Path) -> None:
    x, y, xv, yv = _data()
    order = _Order()
    _trainer(tmp_path, [order]).fit((x, y), (xv, yv), epochs=2)
    text = " ".join(order.calls).replace("epoch_start", "|epoch_start").strip("|")
    epochs = [e.split() for e in text.split("|")]
    assert len(epochs) == 2
    for calls in epochs:  # epoch 1: a widen; epoch 2: a widen and the prune of both layers
        edits = (len(calls) - 3) // 2
        assert edits >= 1 and calls == ["epoch_start", "epoch_end", *["before_edit", "after_edit"] * edits,
                                        "checkpoint"], calls


class _StopAtEpochEnd(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch == self.epoch:
            trainer.request_stop()


def test_a_stop_from_on_epoch_end_keeps_the_epochs_edits_and_resumes_exactly(tmp_path: Path) -> None:
    x, y, xv, yv = _data()
    full = _trainer(tmp_path / "full", [])
    full.fit((x, y), (xv, yv), epochs=4)
    cut = _trainer(tmp_path / "cut", [_StopAtEpochEnd(2)])
    cut.fit((x, y), (xv, yv), epochs=4)
    assert cut.epoch == 2 and any(e["epoch"] == 2 for e in read_events(tmp_path / "cut"))  # edits applied
    resumed = _trainer(tmp_path / "cut", [])
    resumed.fit((x, y), (xv, yv), epochs=4, resume=True)
    assert resumed.history == full.history
    for (name, p), q in zip(resumed.model.state_dict().items(), full.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert read_events(tmp_path / "cut") == read_events(tmp_path / "full")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "cut")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "full")]


class _AddsToMetrics(Callback):
    """A callback that writes into the row it is given (its own bookkeeping, say)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        metrics["mine"] = float(epoch)
        metrics["val_loss"] = -1.0


def test_what_a_callback_writes_into_metrics_does_not_reach_the_run_directory(tmp_path: Path) -> None:
    x, y, xv, yv = _data()
    trainer = _trainer(tmp_path, [_AddsToMetrics()])
    trainer.fit((x, y), (xv, yv), epochs=2)
    rows = read_metrics(tmp_path)
    assert all("mine" not in r and r["val_loss"] > 0 for r in rows)
    assert trainer.history["val_loss"] == [r["val_loss"] for r in rows]
