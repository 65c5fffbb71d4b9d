"""One rank training the input-adaptive modules under DDP, for tests/train/test_distributed_modules.py.

``python -m torch.distributed.run --nproc_per_node=2 _ddp_worker_modules.py OUT``: in one process
group, trains a small EarlyExit, PonderNet and MoE model in turn (the Trainer switches on
``find_unused_parameters`` for them), grows the MoE's experts mid-run with ``Trainer.apply_edit``,
then checks what must be refused (a mismatched edit, compile with edits). Writes
``OUT/rank{R}.pt``: per model the final state dict, the steps, the losses and the edit events,
plus the messages of the refused cases.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adaptnet as an
from adaptnet.edit import Edit
from adaptnet.policy import GrowEvery
from adaptnet.train.callbacks import Callback
from adaptnet.train.trainer import Trainer, TrainingError

BATCH, CLASSES = 8, 3


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(112, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes
    return x[:96], y[:96], x[96:], y[96:]


def model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "early_exit":
        blocks = [nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]
        return an.EarlyExit(blocks, [nn.Linear(8, CLASSES), nn.Linear(8, CLASSES)]).double()
    if kind == "ponder":
        return an.PonderNet(an.RecurrentStep(6, 8, CLASSES), max_steps=3).double()
    return nn.Sequential(nn.Linear(6, 8), an.MoE(8, 2, 8, top_k=1), nn.Linear(8, CLASSES)).double()


class GrowExpertsAt(Callback):
    """Add ``n`` experts after optimizer step ``step``, through the Trainer (DDP re-wrapped)."""

    def __init__(self, step: int, n: int):
        self.step, self.n = step, n

    def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        if step == self.step:
            trainer.apply_edit(lambda m, opt: an.grow_experts(m, self.n, optimizer=opt, batch=trainer.probe),
                               policy="test", reason=f"step {step}")


class Record(Callback):
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.losses: list[float] = []

    def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        self.losses.append(float(loss))

    def on_after_edit(self, trainer: Trainer, edit: Edit, event: dict[str, Any]) -> None:
        self.events.append(event)


def train(kind: str, callbacks: list[Callback], epochs: int = 3) -> tuple[Trainer, Record]:
    record = Record()
    net = model(kind)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    trainer = Trainer(net, opt, nn.functional.cross_entropy, callbacks=[*callbacks, record], seed=5,
                      batch_size=BATCH, device="cpu", probe_size=32)
    x, y, xv, yv = data()
    trainer.fit((x, y), (xv, yv), epochs=epochs)
    return trainer, record


def error_of(fn: Any) -> str:
    try:
        fn()
    except (TrainingError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    result: dict[str, Any] = {}
    for kind in ("early_exit", "ponder", "moe"):
        callbacks: list[Callback] = [GrowExpertsAt(step=8, n=2)] if kind == "moe" else []
        trainer, record = train(kind, callbacks)
        assert trainer.dist is not None and trainer._forward is not trainer.model  # really under DDP
        ddp: Any = trainer._forward
        result[kind] = {
            "state": trainer.model.state_dict(), "step": trainer.step, "losses": record.losses,
            "events": record.events, "find_unused": bool(ddp.find_unused_parameters), "history": trainer.history,
        }
        if kind == "moe":
            moe = trainer.model[1]
            result[kind]["exp_avg_w1"] = tuple(trainer.optimizer.state[moe.w1]["exp_avg"].shape)

    # Ranks that edit differently: every rank raises, naming both decisions.
    mismatch, _ = train("moe", [], epochs=1)
    n = 1 + rank
    result["mismatch"] = error_of(lambda: mismatch.apply_edit(
        lambda m, opt: an.grow_experts(m, n, optimizer=opt, batch=mismatch.probe)))

    # compile + edits under DDP is refused up front (policies) or at the edit (apply_edit).
    net = model("moe")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    result["compile_policies"] = error_of(lambda: Trainer(
        net, opt, nn.functional.cross_entropy, policies=[GrowEvery(every=1, by=2)], compile=True, device="cpu"))
    compiled = Trainer(net, opt, nn.functional.cross_entropy, compile=True, device="cpu")
    result["compile_apply_edit"] = error_of(lambda: compiled.apply_edit(
        lambda m, o: an.grow_experts(m, 1, optimizer=o)))
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
