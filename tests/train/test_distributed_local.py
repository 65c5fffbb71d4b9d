"""The parts of the distributed plumbing that run in one process (no torchrun): edit functions
through the Trainer, the loss module DDP wraps, and what happens at exit and after a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adaptnet as an
from adaptnet.edit import Edit
from adaptnet.nn.losses import adaptive_loss
from adaptnet.train import distributed
from adaptnet.train.callbacks import Callback
from adaptnet.train.rundir import read_events
from adaptnet.train.trainer import Trainer


def _moe_trainer(callbacks: list[Callback], loss_fn: Any = nn.functional.cross_entropy) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), an.MoE(8, 2, 8, top_k=1), nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Trainer(model, opt, loss_fn, callbacks=callbacks, seed=5, batch_size=8, device="cpu",
                   probe_size=32)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(96, 6, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


class GrowAt(Callback):
    def __init__(self, step: int):
        self.step = step
        self.edits: list[Edit] = []

    def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        if step == self.step:
            self.edits.append(trainer.apply_edit(
                lambda m, opt: an.grow_experts(m, 2, optimizer=opt, batch=trainer.probe), reason="test"))


def test_apply_edit_grows_experts_between_steps() -> None:
    grow = GrowAt(step=3)
    trainer = _moe_trainer([grow])
    trainer.fit(_data(), epochs=2)
    moe = trainer.model[1]
    assert trainer.step == 24 and moe.num_experts == 4
    assert trainer.optimizer.state[moe.w1]["exp_avg"].shape == (4, 8, 8)
    (edit,) = grow.edits
    assert (edit.op, edit.units_added) == ("grow_experts", (2, 3))
    assert edit.max_output_change is not None and edit.max_output_change <= 1e-12


def test_a_rollback_after_an_edit_inside_the_epoch_restores_the_edited_model() -> None:
    # The epoch's rollback point is taken before the edit at step 3; a non-finite loss at step 5
    # must roll back to the edited model (4 experts), not to the 2-expert one of the epoch's start.
    fired: list[int] = []
    trainer: Trainer

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(out, target)
        if trainer.model.training and trainer.step == 5 and not fired:
            fired.append(trainer.step)
            return loss * float("nan")
        return loss

    trainer = _moe_trainer([GrowAt(step=3)], loss_fn=loss_fn)
    trainer.fit(_data(), epochs=1)
    assert fired == [5] and trainer.rollbacks == 0  # reset at the epoch's end; it did happen once
    assert trainer.step == 12 and trainer.model[1].num_experts == 4
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_apply_edit_outside_fit_logs_to_the_run_directory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = an.AdaptiveMLP(6, [5], 3).double()
    trainer = Trainer(model, torch.optim.Adam(model.parameters()), nn.functional.cross_entropy, run_dir=tmp_path,
                      device="cpu")
    edit = trainer.apply_edit(lambda m, opt: an.widen(m, 0, 3, optimizer=opt), policy="me", reason="by hand")
    assert edit.widths_after == (8,) and model.widths == [8]
    (event,) = read_events(tmp_path)
    assert (event["op"], event["policy"], event["reason"], event["loss_before"]) == ("widen", "me", "by hand", None)
    with pytest.raises(TypeError, match="must return the Edit record"):
        trainer.apply_edit(lambda m, opt: None)  # type: ignore[arg-type,return-value]


def test_the_loss_module_ddp_wraps_is_the_trainers_loss() -> None:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 8)]
    model = an.EarlyExit(blocks, [nn.Linear(8, 3), nn.Linear(8, 3)]).double()
    x, y = _data()
    wrapped = distributed.WithLoss(model)(x, y, nn.functional.cross_entropy)
    assert torch.equal(wrapped, adaptive_loss(model, nn.functional.cross_entropy, model(x), y))
    # Every exit head is in the loss's graph, so DDP's search for unused parameters finds it.
    wrapped.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())
    assert next(n for n, _ in distributed.WithLoss(model).named_parameters()) == "model.blocks.0.0.weight"


def test_no_store_prefix_without_a_restart_or_across_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert distributed._store_of_this_attempt() == {}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes: their agents count restarts apart
    assert distributed._store_of_this_attempt() == {}


def test_the_process_group_is_destroyed_at_exit_once_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[Any] = []
    monkeypatch.setattr(distributed, "_SHUTDOWN_REGISTERED", False)
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    distributed.shutdown_at_exit()
    distributed.shutdown_at_exit()
    assert registered == [distributed._shutdown]
    destroyed: list[bool] = []
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.torch_dist, "destroy_process_group", lambda: destroyed.append(True))
    monkeypatch.delattr(distributed.sys, "last_value", raising=False)
    distributed._shutdown()
    assert destroyed == [True]
    monkeypatch.setattr(distributed.sys, "last_value", RuntimeError("a rank failed"), raising=False)
    distributed._shutdown()  # dying of an exception: peers may be in a collective, leave the group
    assert destroyed == [True]


class Events(Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_after_edit(self, trainer: Trainer, edit: Edit, event: dict[str, Any]) -> None:
        self.seen.append(event)


def test_policies_decide_and_edit_without_the_ddp_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 16: where="gradient" measures each layer with probe units added by swap_tensors, which a
    # live DDP wrapper (it holds every parameter) refused. A real DDP wrapper, on a 1-rank gloo group.
    from torch.nn.parallel import DistributedDataParallel

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = an.AdaptiveMLP(6, [4, 4], 3).double()
        policy = an.GrowOnPlateau(patience=1, min_delta=100, by=2)  # any loss is a plateau: grows each epoch
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), nn.functional.cross_entropy,
                          [policy], [events := Events()], seed=1, batch_size=16, device="cpu", probe_size=32)
        wraps = []

        def wrap() -> None:  # as Trainer._wrap under torchrun (the training loop of one process)
            trainer._forward, trainer._wrapped = DistributedDataParallel(trainer.model), True
            wraps.append(trainer.step)

        monkeypatch.setattr(trainer, "_wrap", wrap)
        wrap()
        trainer.fit(_data(), epochs=3)
        steps = trainer.step // 3
        assert wraps == [0, steps, 2 * steps, 3 * steps]  # the policies ran unwrapped after every epoch
        assert sum(model.widths) == 8 + 2 * 2 and isinstance(trainer._forward, DistributedDataParallel)
        assert all("gradient score" in e["reason"] for e in events.seen) and len(events.seen) == 2
    finally:
        torch.distributed.destroy_process_group()
