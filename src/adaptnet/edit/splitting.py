"""Splitting scores: which units gain most from being split in two (Firefly-style growth).

A unit whose per-sample gradients disagree (some samples want its pre-activation up,
others down) is one that two copies moving apart would serve better than one: Splitting
Steepest Descent (Liu et al., 2019) and Firefly (Wu et al., 2020) grow by splitting such
units. adaptnet scores unit ``i`` by the variance over the batch of the per-sample gradient
of the loss with respect to its pre-activation (summed over positions for convolutions),
measured in eval mode with a forward hook on the layer that produces the units.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptnet.edit._probe import LossFn, eval_mode, split_batch
from adaptnet.edit._transaction import Snapshot
from adaptnet.errors import EditError
from adaptnet.nn.groups import UnitGroup


def splitting_scores(model: nn.Module, group: UnitGroup, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """``(n_units,)`` gradient-variance splitting scores of ``group``'s units on ``batch``."""
    if loss_fn is None:
        raise EditError("init='firefly' needs batch=(inputs, targets) and loss_fn=")
    x, y = split_batch(batch, "init='firefly'")
    producer = next(s.module for s in group.slices if s.role == "out")
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    snapshot = Snapshot(model, None)
    handle = producer.register_forward_hook(keep)
    try:
        with eval_mode(model), torch.enable_grad():
            out = model(x)
            # A sum of per-sample losses: the gradient at row b is sample b's own gradient.
            loss = loss_fn(out, y) * x.shape[0]
            loss.backward()
        grad = captured[0].grad
        if grad is None or grad.dim() < 2 or grad.shape[1] != group.size:
            raise EditError(
                f"init='firefly' reads the units' pre-activations from the output of {type(producer).__name__}, "
                f"which is not (batch, {group.size} units, ...): use init='net2net' or 'gradmax' for this group"
            )
        per_sample = grad.reshape(grad.shape[0], grad.shape[1], -1).sum(dim=2).to(torch.float64)  # (B, n)
        return per_sample.var(dim=0, correction=0)
    finally:
        handle.remove()
        snapshot.restore()
