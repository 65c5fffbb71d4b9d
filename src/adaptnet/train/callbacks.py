"""Callbacks: hooks into the Trainer's loop. Override the ones you need; all default to no-ops.

The order at the end of an epoch: validation, ``on_epoch_end`` (the model is still the one
that produced the epoch's metrics), the policies' edits (``on_before_edit`` /
``on_after_edit`` for each), the metrics row written to the run directory, then the
checkpoint (``on_checkpoint``). A callback that keeps the best model in ``on_epoch_end``
thus keeps the model that was validated, and the next epoch trains the edited one.

A callback stops training with ``trainer.request_stop()`` (the Trainer finishes the current
step, writes a checkpoint when it has a run directory, and returns).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from adaptnet.edit import Edit
from adaptnet.policy import EditRequest

if TYPE_CHECKING:
    from pathlib import Path

    from adaptnet.train.trainer import Trainer


class Callback:
    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (after a resume has been restored)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based) starts."""

    def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        """After optimizer step ``step`` (1-based); ``loss`` is detached."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        """After validation of epoch ``epoch`` (1-based count), before the epoch's edits and checkpoint.

        ``metrics`` is a copy of the epoch's row (``train_loss``, ``val_*``, ``params``, ``widths``, ``lr``),
        all of it about ``trainer.model`` as it is now; ``seconds`` is added after the edits.
        """

    def on_before_edit(self, trainer: Trainer, request: EditRequest) -> None:
        """Before a policy's edit is applied."""

    def on_after_edit(self, trainer: Trainer, edit: Edit, event: dict[str, Any]) -> None:
        """After an edit; ``event`` is what was logged to events.jsonl."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """After a checkpoint was written."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After training ends (finished or stopped)."""
