"""Counting the compute of a forward pass (multiply-accumulates per sample)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, per sample, in Linear and Conv layers.

    Measured with forward hooks on ``x`` (``(B, ...)``), so it follows whatever the model
    currently is (grown, pruned, deepened). Training costs about three times this per sample
    (the backward pass computes two products per forward product).
    """
    total = 0

    def hook(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        batch = output.shape[0]
        if isinstance(module, nn.Linear):
            total += output.numel() // batch * module.in_features
        else:  # Conv: each output element sums over (in_channels / groups) x kernel
            total += output.numel() // batch * (module.in_channels // module.groups) * int(
                torch.tensor(module.kernel_size).prod()
            )

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in training:
            m.training = mode
    return total
