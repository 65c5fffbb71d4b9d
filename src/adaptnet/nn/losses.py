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

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
