"""Optional TensorBoard logging: per-epoch scalars and structural edits (``pip install adaptnet[tensorboard]``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptnet.edit import Edit
from adaptnet.train.callbacks import Callback
from adaptnet.train.config import ConfigError

if TYPE_CHECKING:
    from adaptnet.train.trainer import Trainer

logger = logging.getLogger(__name__)


class TensorBoardCallback(Callback):
    """Write every numeric metric of an epoch, each layer's width, and each edit to TensorBoard.

    Scalars are indexed by epoch (``loss/train``, ``loss/val``, ``val/accuracy``, ``params``,
    ``width/layer0``...); an edit adds a text entry and an ``edits/<op>`` count at its step.

    Args:
        log_dir: where the event files go (``run_dir/tensorboard`` from the CLI).

    Raises:
        ConfigError: tensorboard is not installed.
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard: tensorboard is not installed; "
                              "pip install adaptnet[tensorboard] (or set train.tensorboard: false)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.edits: dict[str, int] = {}

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        names = {"train_loss": "loss/train", "val_loss": "loss/val"}
        for key, value in metrics.items():
            if key in ("epoch", "step", "widths") or not isinstance(value, (int, float)):
                continue
            tag = names.get(key) or (f"val/{key[4:]}" if key.startswith("val_") else key)
            self.writer.add_scalar(tag, value, epoch)
        for layer, width in enumerate(metrics.get("widths") or []):
            self.writer.add_scalar(f"width/layer{layer}", width, epoch)
        self.writer.flush()

    def on_after_edit(self, trainer: Trainer, edit: Edit, event: dict[str, Any]) -> None:
        op = str(event.get("op", "edit"))
        self.edits[op] = self.edits.get(op, 0) + 1
        self.writer.add_scalar(f"edits/{op}", self.edits[op], trainer.step)
        keys = ("op", "layer", "widths_before", "widths_after", "params_before", "params_after", "policy", "reason")
        text = ", ".join(f"{k}: {event[k]}" for k in keys if k in event)
        self.writer.add_text("edits", text, trainer.step)

    def on_fit_end(self, trainer: Trainer) -> None:
        self.writer.close()
