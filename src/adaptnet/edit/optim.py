"""Optimizer state that follows the model through every edit.

adaptnet keeps the ``nn.Parameter`` objects of a model across width edits and only
changes their contents, so the optimizer's references (and any the user holds, such as
an EMA copy) stay valid. What must change is the per-element state: each tensor of
``optimizer.state[param]`` shaped like the parameter is remapped with the same index
map as the parameter itself.

Rule for the elements of fresh units (documented in docs/design.md):

* ``"moment"`` state (momentum buffers, Adam's ``exp_avg``, RMSprop's ``grad_avg``)
  starts at 0, as for a parameter that has never been stepped;
* ``"square"`` state (running squares such as ``exp_avg_sq``, Adagrad's ``sum``) starts
  at the mean of the same tensor over the existing elements, so that a new unit's first
  steps have the size of its neighbours' rather than the ``lr / sqrt(1 - beta2)`` jump
  that a zero second moment gives after Adam's bias correction has decayed.

Surviving elements are copied bit for bit; non-element state (``step``) is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import nn

from adaptnet.edit.index_map import IndexMap, remap
from adaptnet.errors import EditError

StateKind = Literal["moment", "square"]

_HANDLERS: dict[type[torch.optim.Optimizer], dict[str, StateKind]] = {
    torch.optim.SGD: {"momentum_buffer": "moment"},
    torch.optim.Adam: {"exp_avg": "moment", "exp_avg_sq": "square", "max_exp_avg_sq": "square"},
    torch.optim.AdamW: {"exp_avg": "moment", "exp_avg_sq": "square", "max_exp_avg_sq": "square"},
    torch.optim.NAdam: {"exp_avg": "moment", "exp_avg_sq": "square"},
    torch.optim.RAdam: {"exp_avg": "moment", "exp_avg_sq": "square"},
    torch.optim.Adamax: {"exp_avg": "moment", "exp_inf": "square"},
    torch.optim.RMSprop: {"square_avg": "square", "momentum_buffer": "moment", "grad_avg": "moment"},
    torch.optim.Adagrad: {"sum": "square"},
}


def register_optimizer(cls: type[torch.optim.Optimizer], state: Mapping[str, StateKind]) -> None:
    """Teach adaptnet an optimizer: name each per-element state key and its kind.

    Example: ``register_optimizer(Lion, {"exp_avg": "moment"})``.
    """
    for key, kind in state.items():
        if kind not in ("moment", "square"):
            raise ValueError(f"state {key!r}: kind must be 'moment' or 'square', got {kind!r}")
    _HANDLERS[cls] = dict(state)


def _handler(optimizer: torch.optim.Optimizer) -> dict[str, StateKind]:
    for cls in type(optimizer).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    names = ", ".join(sorted(c.__name__ for c in _HANDLERS))
    raise EditError(
        f"adaptnet does not know how to carry the state of {type(optimizer).__name__}; "
        f"supported: {names}; register others with adaptnet.register_optimizer(cls, {{state_key: 'moment'|'square'}})"
    )


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise ``EditError`` unless edits can carry ``optimizer`` along with ``model``."""
    handler = _handler(optimizer)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise EditError(
            f"the optimizer does not hold the model's parameters ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); build it from model.parameters() or pass optimizer=None"
        )
    for p in model.parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape and p.dim() > 0 and key not in handler:
                raise EditError(
                    f"{type(optimizer).__name__} keeps per-element state {key!r} that adaptnet does not know; "
                    "declare it with adaptnet.register_optimizer"
                )


def migrate_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, dim: int, imap: IndexMap) -> None:
    """Remap ``param``'s per-element state along ``dim`` (call before ``param`` changes shape)."""
    old = optimizer.state.get(param)
    if not old:
        return  # state is created lazily at the first step(): nothing to carry yet
    handler = _handler(optimizer)
    new = {}
    for key, value in old.items():
        if isinstance(value, torch.Tensor) and key in handler and value.shape == param.shape:
            survivors = value if value.numel() else value.new_zeros(1)
            fill = 0.0 if handler[key] == "moment" else float(survivors.float().mean())
            value = remap(value, dim, imap, fill)
        new[key] = value
    optimizer.state[param] = new


def sync_parameters(optimizer: torch.optim.Optimizer, model: nn.Module, before: Iterable[nn.Parameter]) -> None:
    """After a depth edit: drop parameters the model lost, add the ones it gained.

    A new parameter joins the param group of the parameter just before it in
    ``model.parameters()`` order (its neighbour layer), or the first group. A kept
    parameter whose shape changed outside an index map (a recomposed consumer) restarts
    its state, and its stale ``.grad`` is dropped.
    """
    current = list(model.parameters())
    alive = {id(p) for p in current}
    old = {id(p) for p in before}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in old and id(p) not in alive:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if not (id(p) in old and id(p) not in alive)]
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    previous: nn.Parameter | None = None
    for p in current:
        if id(p) not in group_of and id(p) not in old:
            group = group_of.get(id(previous), optimizer.param_groups[0]) if previous is not None \
                else optimizer.param_groups[0]
            group["params"].append(p)
            group_of[id(p)] = group
        state = optimizer.state.get(p, {})
        if any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape for v in state.values()):
            optimizer.state.pop(p)
        if p.grad is not None and p.grad.shape != p.shape:
            p.grad = None
        previous = p
