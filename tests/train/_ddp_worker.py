"""One rank of a small adaptive run, for tests/train/test_distributed.py (launched by torchrun).

``python -m torch.distributed.run --nproc_per_node=2 _ddp_worker.py '{json options}'``: trains a
float64 AdaptiveMLP with widen, deepen and prune events and writes ``out/rank{R}.pt`` (the final
state dict, the step, the epoch) or ``out/rank{R}.error`` (the message of a TrainingError).
``build()`` is also used by the test for the single-process reference.

``kill_step`` / ``kill_rank``: that rank SIGKILLs itself after that optimizer step;
``kill_save_step``: rank 0 SIGKILLs itself inside the checkpoint save of that step, after the
weights were written to the temporary folder. Either only in the first attempt of the group
(``TORCHELASTIC_RESTART_COUNT`` 0), so that torchrun's restart finds a group that goes through.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

import adaptnet as an
from adaptnet.policy import EditRequest, GrowEvery, PruneToBudget, Signals
from adaptnet.train.callbacks import Callback
from adaptnet.train.trainer import Trainer, TrainingError

BATCH = 8  # per rank


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(160, 6, generator=g, dtype=torch.float64)
    y = (x[:, :1] * x[:, 1:2]).sin() + 0.1 * torch.randn(160, 1, generator=g, dtype=torch.float64)
    return x[:120], y[:120], x[120:], y[120:]


class DeepenAt:
    """Explicit edits: a residual layer after layer 0 at the end of epoch ``epoch``."""

    name = "deepen_at"

    def __init__(self, epoch: int, layer: int = 0):
        self.epoch, self.layer = epoch, layer

    def decide(self, signals: Signals) -> list[EditRequest]:
        if signals.epoch != self.epoch:
            return []
        return [EditRequest("deepen", self.layer, init="identity", policy=self.name, reason="scheduled")]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        if step == self.step:
            trainer.request_stop()


class KillAt(Callback):
    """SIGKILL this process after optimizer step ``step`` (no handler, no cleanup: a crash)."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        if step == self.step:
            self.marker.write_text(f"killed after step {step}")
            os.kill(os.getpid(), signal.SIGKILL)


def kill_inside_save(step: int, marker: Path) -> None:
    """SIGKILL this process inside the checkpoint save of ``step``, once its weights are on disk."""
    save_file = safetensors.torch.save_file

    def dying_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        save_file(tensors, filename, metadata=metadata)
        if f"step-{step:08d}" in str(filename):
            marker.write_text(f"killed while saving {filename}")
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = dying_save_file


class Started(Callback):
    """The step ``fit`` started from (after a resume)."""

    def __init__(self) -> None:
        self.step = -1

    def on_fit_start(self, trainer: Trainer) -> None:
        self.step = trainer.step


def build(run_dir: str | None, batch_size: int = BATCH, callbacks: list[Callback] | None = None) -> Trainer:
    torch.manual_seed(0)
    model = an.AdaptiveMLP(6, [6, 5], 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    policies = [GrowEvery(every=2, by=2, where="round_robin", init="net2net"), DeepenAt(3),
                PruneToBudget(amount=0.25, start=4)]
    return Trainer(model, opt, nn.functional.mse_loss, policies=policies, callbacks=callbacks or [],
                   run_dir=run_dir, seed=11, batch_size=batch_size, device="cpu")


def main(options: dict[str, Any]) -> None:
    rank = int(os.environ["RANK"])
    out = Path(options["out"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    started = Started()
    callbacks: list[Callback] = [started]
    if options.get("stop_step") is not None and rank == options.get("stop_rank", 0):
        callbacks.append(StopAt(options["stop_step"]))
    if restart == 0 and options.get("kill_step") is not None and rank == options.get("kill_rank", 0):
        callbacks.append(KillAt(options["kill_step"], out / f"killed-rank{rank}"))
    if restart == 0 and options.get("kill_save_step") is not None and rank == 0:
        kill_inside_save(options["kill_save_step"], out / "killed-rank0")
    trainer = build(options.get("run_dir"), callbacks=callbacks)
    if options.get("mismatch") and rank == 1:  # this rank's policy decides differently
        trainer.policies[0] = GrowEvery(every=1, by=3, where="round_robin", init="net2net")
    if options.get("nan_step") is not None and rank == 1:  # one non-finite loss, on rank 1 only
        fired = []

        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss = nn.functional.mse_loss(out, target)
            if trainer.model.training and trainer.step == options["nan_step"] and not fired:
                fired.append(True)
                return loss * float("nan")
            return loss

        trainer.loss_fn = loss_fn
    x, y, xv, yv = data()
    try:
        trainer.fit((x, y), (xv, yv), epochs=options.get("epochs", 5), resume=bool(options.get("resume")))
    except TrainingError as err:
        (out / f"rank{rank}.error").write_text(str(err))
        return
    torch.save({"state": trainer.model.state_dict(), "step": trainer.step, "epoch": trainer.epoch,
                "history": trainer.history, "lr": trainer.optimizer.param_groups[0]["lr"], "restart": restart,
                "started_at": started.step, "world": trainer.dist.world_size if trainer.dist else 1},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    # An ordinary exit: the Trainer destroys the process group at exit (distributed.shutdown_at_exit).
    main(json.loads(sys.argv[1]))
