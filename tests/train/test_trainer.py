"""Trainer: exact resume with edits on both sides, events, run directory, non-finite rollback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptnet as an
from adaptnet.policy import GrowEvery, GrowOnPlateau, PruneToBudget
from adaptnet.train.callbacks import Callback
from adaptnet.train.rundir import read_events, read_metrics
from adaptnet.train.trainer import Trainer, TrainingError


def _data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :1] * x[:, 1:2]).sin() + 0.1 * torch.randn(n, 1, generator=g)
    return x[:64], y[:64], x[64:], y[64:]


def _trainer(run: Path | None, **kw: Any) -> Trainer:
    torch.manual_seed(0)
    model = an.AdaptiveMLP(6, [4, 3], 1, dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    policies = [GrowEvery(every=1, by=2, where="round_robin", init="net2net"),
                PruneToBudget(amount=0.25, start=3)]
    return Trainer(model, opt, nn.functional.mse_loss, policies=policies, scheduler=sched, run_dir=run,
                   seed=7, batch_size=16, **kw)


class _StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        if step == self.step:
            trainer.request_stop()


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for p, s in trainer.optimizer.state.items():
        out.update({f"opt.{names[id(p)]}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize("as_loader", [False, True], ids=["tensors", "dataloader"])
@pytest.mark.parametrize("stop_step", [6, 8, 13])  # 4 batches an epoch: inside epoch 2, at its end, inside 4
def test_resume_is_exact_with_edits_before_and_after(tmp_path: Path, stop_step: int, as_loader: bool) -> None:
    x, y, xv, yv = _data()

    def train() -> Any:  # tensors (the Trainer's TensorLoader) or a user's DataLoader
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True) if as_loader else (x, y)

    full = _trainer(tmp_path / "full")
    full.fit(train(), (xv, yv), epochs=5)

    first = _trainer(tmp_path / "cut", callbacks=[_StopAt(stop_step)])
    first.fit(train(), (xv, yv), epochs=5)
    assert first.step == stop_step
    second = _trainer(tmp_path / "cut")
    second.fit(train(), (xv, yv), epochs=5, resume=True)

    assert second.model.widths == full.model.widths
    a, b = _state(full), _state(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert second.history == full.history
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "cut")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "full")]
    assert read_events(tmp_path / "cut") == read_events(tmp_path / "full")
    edits_before = [e for e in read_events(tmp_path / "cut") if e["step"] <= stop_step]
    edits_after = [e for e in read_events(tmp_path / "cut") if e["step"] > stop_step]
    assert edits_before and edits_after


def test_run_directory_and_events(tmp_path: Path) -> None:
    x, y, xv, yv = _data()
    trainer = _trainer(tmp_path, config={"note": "test"})
    trainer.fit((x, y), (xv, yv), epochs=4)
    for name in ("config.yaml", "metrics.csv", "events.jsonl", "report.png"):
        assert (tmp_path / name).exists(), name
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert {"train_loss", "val_loss", "params", "widths", "lr"} <= rows[0].keys()
    events = read_events(tmp_path)
    widen = [e for e in events if e["op"] == "widen"]
    assert len(widen) == 4
    for e in widen:
        assert e["max_output_change"] < 1e-5  # net2net is exact
        assert abs(e["loss_after"] - e["loss_before"]) < 1e-5
        assert e["params_after"] > e["params_before"]
    assert any(e["op"] == "prune" for e in events)
    assert len(list((tmp_path / "checkpoints").iterdir())) <= 3


def test_grow_on_plateau_respects_budget() -> None:
    x, y, xv, yv = _data()
    torch.manual_seed(0)
    model = an.AdaptiveMLP(6, [2, 2], 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # barely learns: plateaus at once
    policy = GrowOnPlateau(patience=1, min_delta=1.0, by=4, where="gradient", init="gradmax", max_params=80)
    Trainer(model, opt, nn.functional.mse_loss, policies=[policy], batch_size=16).fit((x, y), (xv, yv), epochs=8)
    assert sum(p.numel() for p in model.parameters()) <= 80
    assert sum(model.widths) > 4
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}


class _Poison(Callback):
    """Make the weights non-finite once, after the given step."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        if step == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("nan"))


def test_nonfinite_loss_rolls_back_and_lowers_lr(tmp_path: Path) -> None:
    x, y, xv, yv = _data()
    trainer = _trainer(tmp_path, callbacks=[_Poison(step=5)])
    lr0 = trainer.optimizer.param_groups[0]["lr"]
    trainer.fit((x, y), (xv, yv), epochs=3)
    assert trainer.epoch == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    rollbacks = [e for e in read_events(tmp_path) if e["op"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["lr"] == pytest.approx(lr0 * 0.5)


def test_nonfinite_loss_stop_keeps_last_checkpoint(tmp_path: Path) -> None:
    x, y, xv, yv = _data()
    trainer = _trainer(tmp_path, callbacks=[_Poison(step=6)], on_nonfinite="stop")
    with pytest.raises(TrainingError, match="stopped"):
        trainer.fit((x, y), (xv, yv), epochs=3)
    assert trainer.checkpoints is not None
    latest = trainer.checkpoints.latest()
    assert latest is not None
    _, state = an.load(latest)
    assert state["epoch"] == 1 and torch.isfinite(torch.tensor(state["history"]["train_loss"])).all()


def test_any_module_trains_without_policies() -> None:
    x, y, xv, yv = _data()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = Trainer(model, opt, nn.functional.mse_loss, batch_size=16).fit((x, y), (xv, yv), epochs=3)
    assert len(history["val_loss"]) == 3
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_events_are_json_lines(tmp_path: Path) -> None:
    x, y, xv, yv = _data()
    _trainer(tmp_path).fit((x, y), (xv, yv), epochs=2)
    for line in (tmp_path / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        assert {"step", "epoch", "op", "layer", "params_before", "params_after", "loss_before", "loss_after",
                "max_output_change", "policy"} <= event.keys()
