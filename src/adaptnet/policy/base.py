"""What policies see and what they ask for.

A policy looks at ``Signals`` once per epoch (after validation) and returns
``EditRequest``s; the Trainer applies them between optimizer steps. Signals hold only
values every process of a distributed run can agree on (per-epoch losses that can be
all-reduced, the parameter count, a probe batch, and a generator seeded from
``(seed, step)``), never rank-local randomness, so decisions are reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from adaptnet.edit import Edit, deepen, prune, remove_layer, widen
from adaptnet.nn.losses import LossFn

Op = Literal["widen", "prune", "deepen", "remove_layer"]


@dataclass(frozen=True)
class EditRequest:
    """One edit a policy asks for (fields unused by ``op`` stay None)."""

    op: Op
    layer: int
    by: int | None = None
    init: str | None = None
    amount: float | None = None
    keep: int | None = None
    importance: str | None = None
    width: int | None = None
    noise: float | None = None
    policy: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Signals:
    """Everything a policy may base a decision on, at the end of an epoch.

    Attributes:
        epoch: epochs completed (1 after the first epoch).
        step: optimizer steps completed.
        model: the (unwrapped) model.
        history: per-epoch series such as ``"train_loss"``, ``"val_loss"``, ``"val_accuracy"``.
        probe: a fixed ``(inputs, targets)`` batch for gradient-based choices.
        loss_fn: the training loss.
        generator: seeded from ``(seed, step)``: identical on every process.
        lr: the learning rate of the first param group.
    """

    epoch: int
    step: int
    model: nn.Module
    history: Mapping[str, list[float]]
    probe: tuple[torch.Tensor, torch.Tensor] | None
    loss_fn: LossFn | None
    generator: torch.Generator = field(default_factory=torch.Generator)
    lr: float = 0.0

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def series(self, monitor: str) -> list[float]:
        """The monitored series; ``"auto"`` is ``val_loss`` when there is validation data."""
        if monitor == "auto":
            monitor = "val_loss" if self.history.get("val_loss") else "train_loss"
        if monitor not in self.history:
            raise ValueError(f"monitor {monitor!r} is not recorded; available: {', '.join(sorted(self.history))}")
        return self.history[monitor]


@runtime_checkable
class Policy(Protocol):
    """Decides when and where to edit. State must be plain values (it is checkpointed)."""

    name: str

    def decide(self, signals: Signals) -> list[EditRequest]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def apply_request(
    request: EditRequest,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    probe: tuple[torch.Tensor, torch.Tensor] | None,
    loss_fn: LossFn | None,
    generator: torch.Generator | None,
) -> Edit:
    """Carry out ``request`` with the edit functions of ``adaptnet.edit``."""
    if request.op == "widen":
        assert request.by is not None
        return widen(model, request.layer, request.by, init=request.init or "net2net", optimizer=optimizer,
                     batch=probe, loss_fn=loss_fn, noise=request.noise or 0.0, generator=generator)
    if request.op == "prune":
        return prune(model, request.layer, amount=request.amount, keep=request.keep,
                     importance=request.importance or "magnitude", optimizer=optimizer, batch=probe, loss_fn=loss_fn)
    if request.op == "deepen":
        return deepen(model, request.layer, init=request.init or "identity", optimizer=optimizer,
                      width=request.width, batch=probe)
    return remove_layer(model, request.layer, optimizer=optimizer, batch=probe)
