"""What a checkpoint's ``state.pt`` may hold: plain values, and the optimizer keyed by parameter names.

``torch.load(weights_only=True)`` reads back tensors and plain Python values only, so
anything else (numpy arrays and scalars, modules, functions) is refused at save time with
the key that holds it, rather than converted: every value comes back with the type it had.

The optimizer is stored with the *name* of every parameter of each param group, because
edits (``deepen``) append parameters to existing groups: the optimizer's order is not
``model.parameters()`` order, and a fresh optimizer on a rebuilt model has other groups.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from adaptnet.errors import CheckpointError

logger = logging.getLogger(__name__)

# Exact types (subclasses such as numpy.float64 or a namedtuple are not read back).
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)
_TENSORS = (torch.Tensor, nn.Parameter)


def check_plain(value: Any, where: str) -> None:
    """Raise ``CheckpointError`` unless ``value`` is made only of what ``weights_only`` loading reads."""
    kind = type(value)
    if kind in _SCALARS or kind in _TENSORS:
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _SCALARS:
                raise CheckpointError(f"{where} has a key of type {qualname(type(key))}; keys must be plain values")
            check_plain(item, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    hint = ""
    if kind.__module__.split(".")[0] == "numpy":
        hint = "; convert numpy values first (torch.from_numpy(array) or array.tolist(); scalar.item())"
    elif isinstance(value, nn.Module):
        hint = "; save a module's state_dict(), never the module"
    raise CheckpointError(
        f"{where} is a {qualname(kind)}: state.pt holds only tensors and plain Python values (None, bool, int, "
        f"float, complex, str, bytes, list, tuple, set, dict) so that torch.load(weights_only=True) reads it{hint}"
    )


def qualname(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` plus the name and shape of each parameter it holds, group by group."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups: list[list[str]] = []
    for i, group in enumerate(optimizer.param_groups):
        strangers = sum(id(p) not in names for p in group["params"])
        if strangers:
            raise CheckpointError(
                f"optimizer param group {i} holds {strangers} tensor(s) that are not parameters of the model; "
                "a checkpoint restores only an optimizer over the model it saves"
            )
        groups.append([names[id(p)] for p in group["params"]])
    state_dict = optimizer.state_dict()
    check_plain(state_dict, "optimizer.state_dict()")
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    return {
        "type": qualname(type(optimizer)),
        "param_names": groups,  # param_names[g][i] names state_dict["param_groups"][g]["params"][i]
        "param_shapes": {n: shapes[n] for group in groups for n in group},
        "state_dict": state_dict,
    }


def saved_groups(saved: Any, model: nn.Module, where: str) -> list[list[nn.Parameter]]:
    """Check a saved optimizer state against ``model``; return the parameters of each saved group."""
    keys = {"type", "param_names", "param_shapes", "state_dict"}
    if not isinstance(saved, dict) or not keys <= saved.keys() or not isinstance(saved["param_shapes"], dict):
        raise CheckpointError(f"{where}: not an adaptnet optimizer state (use state['optimizer'] from load())")
    names, shapes, state_dict = saved["param_names"], saved["param_shapes"], saved["state_dict"]
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or not isinstance(names, list) or len(names) != len(groups) or any(
        not isinstance(n, list) or len(n) != len(g.get("params", ())) for n, g in zip(names, groups, strict=True)
    ):
        raise CheckpointError(f"{where}: the optimizer's parameter names do not match its param groups")
    params = dict(model.named_parameters())
    flat = [n for group in names for n in group]
    unknown = [n for n in flat if n not in params]
    if unknown:
        raise CheckpointError(f"{where}: the optimizer holds parameters the model does not have: {unknown[:5]}")
    if len(set(flat)) != len(flat):
        raise CheckpointError(f"{where}: the optimizer holds a parameter twice")
    wrong = [f"{n} {shapes.get(n)} vs {list(params[n].shape)}" for n in flat if shapes.get(n) != list(params[n].shape)]
    if wrong:
        raise CheckpointError(f"{where}: the optimizer state was saved for other parameter shapes: {wrong[:5]}")
    return [[params[n] for n in group] for group in names]


def restore_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, saved_optimizer_state: Any) -> None:
    """Load a saved optimizer state into ``optimizer``, matching parameters by name.

    The param groups of ``optimizer`` are rebuilt from the saved parameter names on ``model``
    (groups, order and hyperparameters as saved), then ``optimizer.load_state_dict`` runs:
    ``Adam(model.parameters())`` on a loaded model gets exactly the saved per-parameter state.

    Args:
        optimizer: a freshly built optimizer of the saved type (its groups are replaced).
        model: the model the state belongs to, usually from ``load``.
        saved_optimizer_state: ``state["optimizer"]`` from ``load``.

    Raises:
        CheckpointError: the state is not a saved optimizer state, is of another optimizer
            type, or names parameters the model lacks or has in another shape; ``optimizer``
            is left as it was.
    """
    groups = saved_groups(saved_optimizer_state, model, "saved optimizer state")
    if saved_optimizer_state["type"] != qualname(type(optimizer)):
        raise CheckpointError(
            f"the saved optimizer state is for {saved_optimizer_state['type']}, not {qualname(type(optimizer))}"
        )
    state_dict = saved_optimizer_state["state_dict"]
    restored = {id(p) for group in groups for p in group}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    dropped = [n for n, p in model.named_parameters() if id(p) in held and id(p) not in restored]
    if dropped:
        logger.warning("restore_optimizer: %s were not in the saved optimizer and are no longer optimized", dropped)
    previous = optimizer.param_groups
    optimizer.param_groups = [
        {**{k: v for k, v in saved.items() if k != "params"}, "params": params}
        for saved, params in zip(state_dict["param_groups"], groups, strict=True)
    ]
    try:
        optimizer.load_state_dict(state_dict)
    except Exception as err:
        optimizer.param_groups = previous
        raise CheckpointError(f"cannot load the saved optimizer state: {err}") from err
