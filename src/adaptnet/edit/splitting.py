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
from adaptnet.nn.groups import UnitGroup, unit_positions


def splitting_scores(model: nn.Module, group: UnitGroup, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """``(n_units,)`` gradient-variance splitting scores of ``group``'s units on ``batch``."""
    if loss_fn is None:
        raise EditError("init='firefly' needs batch=(inputs, targets) and loss_fn=")
    x, y = split_batch(batch, "init='firefly'")
    # The slice that computes the units: its layer's output holds them on the last dim for a
    # matrix weight (Linear, HF Conv1D), on dim 1 for a convolution's (B, C, ...).
    computing = next(s for s in group.slices if s.role == "out" and s.tensor.dim() >= 2)
    producer = computing.module
    unit_dim = -1 if computing.tensor.dim() == 2 else 1
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    snapshot = Snapshot(model, None)
    handle = producer.register_forward_hook(keep)
    try:
        for p in model.parameters():
            p.grad = None  # backward would add into pending grads; the snapshot puts them back
        with eval_mode(model), torch.enable_grad():
            out = model(x)
            # A sum of per-sample losses: the gradient at row b is sample b's own gradient.
            loss = loss_fn(out, y) * x.shape[0]
            if not torch.isfinite(loss):
                value = loss.item()
                del loss, out  # the error's traceback would keep the graph, pinning the parameters
                raise EditError(f"init='firefly': the loss on the given batch is not finite ({value})")
            loss.backward()
        grad = captured[0].grad
        positions = unit_positions(computing, group.size).flatten()
        if grad is None or grad.dim() < 2 or grad.shape[unit_dim] != computing.tensor.shape[computing.dim]:
            raise EditError(
                f"init='firefly' reads the units' pre-activations from the output of {type(producer).__name__}, "
                f"which does not hold them on one dimension: use init='net2net' or 'gradmax' for this group"
            )
        # (B, entries, rest) -> the entries of each unit summed: (B, units)
        moved = grad.movedim(unit_dim, 1)[:, positions.to(grad.device)]
        per_sample = moved.reshape(grad.shape[0], group.size, -1).sum(dim=2).to(torch.float64)
        return per_sample.var(dim=0, correction=0)
    finally:
        handle.remove()
        snapshot.restore()
