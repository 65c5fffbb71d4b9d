"""Forward/backward probes on a user batch that leave no trace on the model.

Probes run in eval mode (dropout off, BatchNorm on running statistics, which are then not
updated), and any ``.grad`` they produce is discarded by the caller's snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from adaptnet.errors import EditError
from adaptnet.groups import output_tensors
from adaptnet.nn.losses import LossFn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def split_batch(batch: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        raise EditError(f"{what} needs batch=(inputs, targets) as two tensors")
    return batch[0], batch[1]


def backward_on(model: nn.Module, batch: Any, loss_fn: LossFn | None, what: str) -> None:
    """Fill ``.grad`` of every parameter with the gradient of ``loss_fn`` on ``batch`` (eval mode)."""
    if loss_fn is None:
        raise EditError(f"{what} needs loss_fn= (for example torch.nn.functional.mse_loss)")
    x, y = split_batch(batch, what)
    for p in model.parameters():
        p.grad = None
    with eval_mode(model), torch.enable_grad():
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            value = loss.item()
            # The error's traceback keeps this frame alive: without the del, the graph would pin the
            # parameters and refuse every later edit while the caller holds the exception.
            del loss
            raise EditError(f"{what}: the loss on the given batch is not finite ({value})")
        loss.backward()


@torch.no_grad()
def outputs_of(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    """Every output tensor of ``model(*inputs)`` in eval mode (a Hugging Face model returns a
    ModelOutput: its tensors)."""
    with eval_mode(model):
        return output_tensors(model(*inputs))


def outputs_on(model: nn.Module, batch: Any) -> list[torch.Tensor]:
    """``outputs_of`` on a batch's inputs (``batch`` is the inputs, or ``(inputs, targets)``)."""
    return outputs_of(model, (batch[0] if isinstance(batch, (tuple, list)) else batch,))


def max_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float | None:
    """Max-abs change over all outputs, in float64; None when their shapes differ."""
    if [t.shape for t in before] != [t.shape for t in after]:
        return None
    return max((float((b.to(torch.float64) - a.to(torch.float64)).abs().max())
                for a, b in zip(before, after, strict=True) if a.numel()), default=0.0)
