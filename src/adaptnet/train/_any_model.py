"""Checkpoints of a user's own model: the edited shapes, and how to give them to a fresh instance.

A user's class cannot be rebuilt from a spec without importing code that the checkpoint names,
which adaptnet never does. So the checkpoint records what the edits changed: the size of every
unit group (by name), the depth edits in order, and the shapes and dtypes of the example inputs
the model was traced with. ``load(path, model=MyNet())`` replays the depth edits on the fresh
instance, traces it, checks that its groups are the saved ones, resizes each group (the values
do not matter: the weights are loaded next) and returns it loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptnet.edit import depth, prune, widen
from adaptnet.errors import CheckpointError, EditError
from adaptnet.groups import trace, unit_groups

TYPE = "traced"
FORMAT = 1


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def traced_spec(model: nn.Module) -> dict[str, Any]:
    """The spec of a model without ``spec()``: its class (for messages only) and what edits changed."""
    traced = model.__dict__.get("_adaptnet_trace") is not None
    groups = {name: g.size for name, g in unit_groups(model).items()} if traced else {}
    inputs = trace(model).example_inputs if traced else ()
    return {
        "type": TYPE,
        "format": FORMAT,
        "class": _qualname(type(model)),
        "groups": groups,
        "depth_edits": list(depth.depth_edits(model)),
        "example_inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                           for t in inputs if isinstance(t, torch.Tensor)]
        if all(isinstance(t, torch.Tensor) for t in inputs) else None,
    }


def _example_inputs(spec: dict[str, Any], where: str) -> tuple[torch.Tensor, ...] | None:
    described = spec.get("example_inputs")
    if described is None:
        return None
    try:
        return tuple(torch.zeros(d["shape"], dtype=getattr(torch, d["dtype"])) for d in described)
    except (TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"{where}: example_inputs must be a list of {{shape, dtype}} ({err})") from err


def reshape(model: nn.Module, spec: dict[str, Any], where: str) -> None:
    """Give the fresh ``model`` the structure recorded in ``spec`` (values are loaded afterwards)."""
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{where}: traced model format {spec.get('format')!r} is not supported ({FORMAT})")
    saved_groups = spec.get("groups")
    if not isinstance(saved_groups, dict):
        raise CheckpointError(f"{where}: 'groups' must map group names to sizes")
    if depth.depth_edits(model):
        raise CheckpointError(f"{where}: the given {type(model).__name__} has been deepened or shortened already; "
                              "pass a freshly built instance")
    try:
        depth.replay(model, spec.get("depth_edits", []))
    except EditError as err:
        raise CheckpointError(f"{where}: cannot redo the saved depth edits on {type(model).__name__}: {err}") from err
    if not saved_groups:
        return
    inputs = _example_inputs(spec, where)
    try:
        groups = unit_groups(model, inputs) if inputs is not None else unit_groups(model)
    except EditError as err:
        raise CheckpointError(f"{where}: cannot trace the given {type(model).__name__}: {err}") from err
    for name, size in saved_groups.items():
        if name not in groups:
            raise CheckpointError(
                f"{where}: the given {type(model).__name__} has no unit group {name!r} (saved from "
                f"{spec.get('class')}); its groups: {', '.join(list(groups)[:8])}: pass an instance of the saved class"
            )
        current = groups[name].size
        if not isinstance(size, int) or size < 1:
            raise CheckpointError(f"{where}: group {name!r} has size {size!r}; expected a positive integer")
        if size > current:
            widen(model, name, size - current, init="net2net", exact=False)
        elif size < current:
            prune(model, name, keep=size)
    extra = [n for n in unit_groups(model) if n not in saved_groups]
    if extra:
        raise CheckpointError(
            f"{where}: the given {type(model).__name__} has unit group {extra[0]!r}, which the saved model "
            f"({spec.get('class')}) does not have: pass an instance of the saved class"
        )
