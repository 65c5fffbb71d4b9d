"""The two kinds of hidden block every adaptive model is stacked from.

* ``Block``: ``post(act(norm(op(x))))``, where ``op`` is a Linear or Conv2d and ``post`` is
  dropout or pooling. Its width is ``op``'s number of outputs; it starts a new stream.
* ``ResidualBlock``: ``x + op2(act(norm(op1(x))))``. It keeps the stream width; its own
  width is the inner width of ``op1``. ``deepen`` inserts one with ``op2`` at zero, which
  computes the identity exactly, whatever normalisation the model uses.
"""

from __future__ import annotations

import torch
from torch import nn

# The layer type of a block: what unit groups slice (rows = units, columns = inputs).
Op = nn.Linear | nn.Conv2d


class Block(nn.Module):
    op: Op

    def __init__(self, op: Op, norm: nn.Module, act: nn.Module, post: nn.Module):
        super().__init__()
        self.op, self.norm, self.act, self.post = op, norm, act, post

    @property
    def width(self) -> int:
        return int(self.op.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.act(self.norm(self.op(x))))


class ResidualBlock(nn.Module):
    op1: Op
    op2: Op

    def __init__(self, op1: Op, norm: nn.Module, act: nn.Module, post: nn.Module, op2: Op):
        super().__init__()
        self.op1, self.norm, self.act, self.post, self.op2 = op1, norm, act, post, op2

    @property
    def width(self) -> int:
        return int(self.op1.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.op2(self.post(self.act(self.norm(self.op1(x)))))
