"""Training losses of models that contain input-adaptive modules, collected without user code.

An input-adaptive module (early exits, halting, mixture of experts) may define, using what
it stashed during its last forward pass in training mode:

* ``task_loss(loss_fn, targets) -> Tensor``: replaces ``loss_fn(outputs, targets)`` (early
  exits weight every exit's loss; PonderNet takes the expectation over halting steps). The
  outermost such module is used.
* ``aux_loss() -> Tensor | None``: added to the loss (load balancing, router z-loss, KL to a
  halting prior, ponder cost). Every such module contributes.

``adaptive_loss`` is what the Trainer calls; plain training loops can call it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class KeepsForwardState(nn.Module):
    """A module that keeps what its last forward computed for the loss and the caller (the loss
    terms ``adaptive_loss`` reads, a halting model's final state: graph tensors in training), in the
    attributes named in ``forward_state``. A copy or a pickle leaves them out: ``copy.deepcopy``
    cannot copy a tensor that is not a graph leaf (a deepcopy of a model after a training step, for
    an EMA or a best-so-far snapshot, would raise), and a copy has run no forward."""

    forward_state: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        return {**state, **{name: None for name in self.forward_state if name in state}}


def adaptive_loss(model: nn.Module, loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``loss_fn(outputs, targets)``, or the modules' ``task_loss``, plus every ``aux_loss``."""
    task = next((m for m in model.modules() if callable(getattr(m, "task_loss", None))), None)
    loss = task.task_loss(loss_fn, targets) if task is not None else loss_fn(outputs, targets)  # type: ignore[operator]
    for module in model.modules():
        aux = getattr(module, "aux_loss", None)
        if callable(aux) and (value := aux()) is not None:
            loss = loss + value
    return loss


def per_sample_loss(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B,)`` losses, from a loss function that accepts ``reduction="none"`` (as torch's do)."""
    try:
        values = loss_fn(outputs, targets, reduction="none")  # type: ignore[call-arg]
    except TypeError as err:
        raise TypeError(
            "this module weights the loss per sample: pass a loss function that accepts reduction='none' "
            "(for example torch.nn.functional.cross_entropy or mse_loss)"
        ) from err
    return values.reshape(values.shape[0], -1).mean(dim=1)
