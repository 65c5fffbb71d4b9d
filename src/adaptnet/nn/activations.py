"""Activations of adaptive models, looked up by name.

Every activation here maps 0 to 0, which is what makes ``gradmax`` growth exact: a new
unit with zero incoming weights outputs 0, whatever its outgoing weights are.

``"relu"`` is computed as ``clamp_min(x, 0)`` rather than ``F.relu``: the forward values
are identical, but autograd takes the derivative at 0 as 1 instead of 0. A unit whose
incoming weights and bias are all zero (a ``gradmax`` unit) therefore still receives a
gradient and starts learning; with ``F.relu`` it would stay dead forever. GradMax's
reference code makes the same choice.
"""

from __future__ import annotations

import torch
from torch import nn


class ReLU(nn.Module):
    """ReLU whose derivative at 0 is 1 (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0.0)


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

ACTIVATIONS = tuple(_ACTIVATIONS)


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return _ACTIVATIONS[name]()
