"""Optimizer state that follows the model through every edit.

adaptnet keeps the ``nn.Parameter`` objects of a model across width edits and only
changes their contents, so the optimizer's references (and any the user holds, such as
an EMA copy) stay valid. What must change is the per-element state: each tensor of
``optimizer.state[param]`` shaped like the parameter is remapped with the same index
map as the parameter itself.

Fresh units start with all per-element state at 0, as a parameter that has never been
stepped (documented in docs/design.md, with the measurement behind the choice). Surviving
elements are copied bit for bit; non-element state (Adam's ``step``) is kept. A unit copied
by a split (``net2net``) gets its source's state (``new_state="copy"``), none
(``"zero"``), or the source's state rescaled for the gradients it will now receive
(``"split"``: see ``split_moments``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from adaptnet.edit.index_map import IndexMap, remap
from adaptnet.errors import EditError

# Per-element state keys (tensors shaped like their parameter) of each optimizer.
_STATE_KEYS: dict[type[torch.optim.Optimizer], frozenset[str]] = {
    torch.optim.SGD: frozenset({"momentum_buffer"}),
    torch.optim.Adam: frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    torch.optim.AdamW: frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    torch.optim.NAdam: frozenset({"exp_avg", "exp_avg_sq"}),
    torch.optim.RAdam: frozenset({"exp_avg", "exp_avg_sq"}),
    torch.optim.Adamax: frozenset({"exp_avg", "exp_inf"}),
    torch.optim.RMSprop: frozenset({"square_avg", "momentum_buffer", "grad_avg"}),
    torch.optim.Adagrad: frozenset({"sum"}),
}


# State that averages squared gradients (scales with a gradient's square); the rest scales with it.
_SQUARED = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
NEW_STATES = ("copy", "zero", "split")


def split_moments(key: str, value: torch.Tensor, dim: int, share: torch.Tensor) -> torch.Tensor:
    """A split unit's state for ``share`` (its part of the split, ``1/count``) along ``dim``.

    After a split each copy's outgoing weights are ``share`` of the original's, so the
    gradients of its incoming weights are ``share`` of what they were: first moments scale by
    ``share``, second moments by ``share**2`` (the rule of staged training, Shen et al. 2022).
    Adam's step ``m / sqrt(v)`` is unchanged, and the state matches the gradients to come.
    """
    shape = [1] * value.dim()
    shape[dim] = -1
    factor = share.to(device=value.device, dtype=value.dtype).view(shape)
    return value * (factor * factor if key in _SQUARED else factor)


def register_optimizer(cls: type[torch.optim.Optimizer], state_keys: Iterable[str]) -> None:
    """Teach adaptnet an optimizer: name its per-element state keys.

    Example: ``register_optimizer(Lion, ["exp_avg"])``.
    """
    keys = [state_keys] if isinstance(state_keys, str) else list(state_keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"state_keys must be a non-empty list of state names, got {state_keys!r}")
    _STATE_KEYS[cls] = frozenset(keys)


def _state_keys(optimizer: torch.optim.Optimizer) -> frozenset[str]:
    for cls in type(optimizer).__mro__:
        if cls in _STATE_KEYS:
            return _STATE_KEYS[cls]
    names = ", ".join(sorted(c.__name__ for c in _STATE_KEYS))
    raise EditError(
        f"adaptnet does not know how to carry the state of {type(optimizer).__name__}; "
        f"supported: {names}; register others with adaptnet.register_optimizer(cls, [state keys])"
    )


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise ``EditError`` unless edits can carry ``optimizer`` along with ``model``."""
    keys = _state_keys(optimizer)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise EditError(
            f"the optimizer does not hold the model's parameters ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); build it from model.parameters() or pass optimizer=None"
        )
    for p in model.parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape and p.dim() > 0 and key not in keys:
                raise EditError(
                    f"{type(optimizer).__name__} keeps per-element state {key!r} that adaptnet does not know; "
                    "declare it with adaptnet.register_optimizer"
                )


def migrate_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, dim: int, imap: IndexMap,
                  new_state: str = "copy", split: bool = False) -> None:
    """Remap ``param``'s per-element state along ``dim`` (call before ``param`` changes shape).

    ``new_state`` says what units copied from others start with (``NEW_STATES``); ``split``: the
    tensor holds the split units' incoming weights, whose gradients the split rescales.
    """
    old = optimizer.state.get(param)
    if not old:
        return  # state is created lazily at the first step(): nothing to carry yet
    keys = _state_keys(optimizer)
    n_old = param.shape[dim]
    source = imap.source
    if new_state == "zero":  # copies (new positions with a source) start as never stepped
        copies = torch.arange(source.numel()) >= n_old
        source = torch.where(copies, torch.full_like(source, -1), source)
    state_map = IndexMap(source, imap.scale)
    new = {}
    for key, value in old.items():
        if isinstance(value, torch.Tensor) and key in keys and value.shape == param.shape:
            value = remap(value, dim, state_map, 0.0)
            if new_state == "split" and split and imap.scale is not None:
                value = split_moments(key, value, dim, imap.scale)
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
