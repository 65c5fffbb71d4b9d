"""What keeps a run safe: stopping cleanly on a signal, and rolling back after a bad step."""

from __future__ import annotations

import copy
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


@contextmanager
def stop_on_signals(enabled: bool, request_stop: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGINT/SIGTERM call ``request_stop`` (the loop finishes its step and saves)."""
    if not enabled:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        logger.warning("received %s: stopping after this step", signal.Signals(signum).name)
        request_stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def capture_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Copies of the model, optimizer and scheduler state, to roll back to."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
    }


def restore_training_state(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any, lr_scale: float) -> None:
    """Put back a captured state and scale every learning rate (scheduler bases included) by ``lr_scale``."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
        scheduler.base_lrs = [lr * lr_scale for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= lr_scale
