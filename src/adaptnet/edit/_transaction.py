"""Transactions: remember a model and an optimizer by reference, restore them bit for bit.

Edits never modify a tensor in place: they build new tensors and re-point parameters
(``param.data = new``), buffers, module lists and optimizer state at them. So remembering
*references* is enough to undo anything, at no copying cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Snapshot:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model, self.optimizer = model, optimizer
        self.modules = [(m, dict(m.__dict__), dict(m._modules), dict(m._parameters), dict(m._buffers))
                        for m in model.modules()]
        self.tensors = [(p, p.data, p.grad) for p in model.parameters()]
        self.optim: tuple[list[dict[str, Any]], dict[Any, dict[str, Any]]] | None = None
        if optimizer is not None:
            groups = [{**g, "params": list(g["params"])} for g in optimizer.param_groups]
            state = {p: dict(s) for p, s in optimizer.state.items()}
            self.optim = (groups, state)

    def restore(self) -> None:
        for m, attrs, modules, params, buffers in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._modules.clear()
            m._modules.update(modules)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        for p, data, grad in self.tensors:
            p.data = data
            p.grad = grad
        if self.optimizer is not None and self.optim is not None:
            groups, state = self.optim
            for live, saved in zip(self.optimizer.param_groups, groups, strict=True):
                live.clear()
                live.update(saved)
            del self.optimizer.param_groups[len(groups):]
            self.optimizer.state.clear()
            self.optimizer.state.update({p: dict(s) for p, s in state.items()})


@contextmanager
def transaction(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[Snapshot]:
    """Run an edit; on any exception put model and optimizer back exactly as they were."""
    snapshot = Snapshot(model, optimizer)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
