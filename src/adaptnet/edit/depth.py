"""Depth edits on any model: a block inserted into (or removed from) a stack of residual blocks.

A stack is an ``nn.Sequential`` or ``nn.ModuleList`` of blocks that each map the residual
stream to itself (``x + f(x)``: a pre-norm transformer block, a ResNet basic block without a
downsampling shortcut). ``insert_block`` puts a copy of block ``i`` after it and makes the
copy compute the identity: first by zeroing its writers into the residual stream (the output
projections: every ``out`` slice of a group that runs through the block), and where a norm
follows those writers (a post-activation ResNet block, ``relu(bn(conv(...)) + x)``) by zeroing
that last norm's scale and shift instead. Each way is checked on the model's example inputs,
to the bit; a block for which neither gives the identity is not residual, and is refused.
``init="copy"`` inserts the copy as it is (G_stack-style stacking: the new block repeats its
neighbour's work, so the function changes; the cheapest way to a deeper model that already
computes something, not an exact edit).

Every depth edit is recorded on the model (``depth_edits``) so that a checkpoint can rebuild
the same modules in a freshly built instance before loading weights into it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from adaptnet.edit._probe import max_change, outputs_of
from adaptnet.errors import EditError
from adaptnet.groups import inputs_for, trace

_DEPTH = "_adaptnet_depth"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_NORM_NAMES = ("norm", "ln", "bn")  # a user's own norm class (LlamaRMSNorm) is known by its name
DEPTH_INITS = ("identity", "fresh", "copy")


def depth_edits(model: nn.Module) -> tuple[dict[str, Any], ...]:
    """The depth edits made on ``model`` since it was built, oldest first."""
    edits: tuple[dict[str, Any], ...] = model.__dict__.get(_DEPTH, ())
    return edits


def _record(model: nn.Module, entry: dict[str, Any]) -> None:
    # A new tuple, not an append: a rolled-back transaction restores the old one.
    model.__dict__[_DEPTH] = (*depth_edits(model), entry)


def locate(model: nn.Module, name: Any, what: str) -> tuple[nn.Sequential | nn.ModuleList, int]:
    """The stack and index that ``name`` (``"blocks.3"``) names."""
    container_name, _, index = name.rpartition(".") if isinstance(name, str) else ("", "", "")
    try:
        container = model.get_submodule(container_name) if container_name else model
    except AttributeError:
        container = None
    if not isinstance(container, (nn.Sequential, nn.ModuleList)) or not index.isdigit():
        raise EditError(
            f"{what} must name a block inside an nn.Sequential or nn.ModuleList of residual blocks, "
            f"such as 'blocks.3' or 'transformer.h.1'; got {name!r}"
        )
    i = int(index)
    if not 0 <= i < len(container):
        raise EditError(f"{what}={name!r}: {container_name} has blocks 0 to {len(container) - 1}")
    return container, i


def _zero(tensors: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t in tensors:
            t.zero_()


def _stream_writers(model: nn.Module, block_name: str) -> list[str]:
    """The names, inside the block, of its parameters whose output rows index a dimension that
    runs on outside the block (the residual stream): its output projections, with their biases.
    Read from the model's trace as it is (before a copy of the block is inserted: a copy has the
    same names, and the trace need not be redone)."""
    found = trace(model)
    prefix = block_name + "."
    outside = {v for (name, _), vs in found.variables.items() if not name.startswith(prefix) for v in vs}
    tensors = dict(model.named_parameters())
    writers = {name.rpartition(".")[0] for (name, d), vs in found.variables.items()
               if name.startswith(prefix) and name in tensors and found.roles[(name, d)] == "out"
               and outside.intersection(vs)}
    return [name[len(prefix):] for name in tensors if name.rpartition(".")[0] in writers]


def _last_norm(block: nn.Module) -> list[torch.Tensor]:
    norms = [m for m in block.modules() if getattr(m, "weight", None) is not None and (
        isinstance(m, _NORMS) or any(k in type(m).__name__.lower() for k in _NORM_NAMES))]
    if not norms:
        return []
    last = norms[-1]
    return [t for t in (last.weight, getattr(last, "bias", None)) if isinstance(t, torch.Tensor)]


def _renumber(model: nn.Module, container: nn.Sequential | nn.ModuleList, old_length: int) -> None:
    """Keep what a Hugging Face model records about its stack of layers in step with it: its
    config's ``num_hidden_layers`` (Llama runs ``layers[:num_hidden_layers]``) and each layer's
    ``layer_idx`` (its key/value cache slot)."""
    config = getattr(model, "config", None)
    if getattr(config, "num_hidden_layers", None) == old_length:
        config.num_hidden_layers = len(container)  # type: ignore[union-attr]
    for j, block in enumerate(container):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j  # type: ignore[assignment]


def insert_block(model: nn.Module, after: str, init: str) -> tuple[str, nn.Module]:
    """Insert an identity copy of block ``after`` right after it; returns its name and module."""
    container, i = locate(model, after, "after")
    inputs = inputs_for(model)
    before = outputs_of(model, inputs)
    writers = _stream_writers(model, after)
    block = copy.deepcopy(container[i])
    if init == "fresh":
        for m in block.modules():
            if callable(reset := getattr(m, "reset_parameters", None)):
                reset()
    container.insert(i + 1, block)
    _renumber(model, container, len(container) - 1)
    try:
        try:
            outputs_of(model, inputs)
        except Exception as err:
            raise EditError(
                f"block {after!r} is not residual: the model does not run with a copy of it after it "
                f"({type(err).__name__}); deepen inserts blocks that keep the stream's shape, x + f(x) (a "
                "downsampling block changes it)"
            ) from err
        if init == "copy":
            return f"{after.rpartition('.')[0]}.{i + 1}".lstrip("."), block
        return _make_identity(model, after, block, i, inputs, before, writers)
    except BaseException:
        del container[i + 1]
        _renumber(model, container, len(container) + 1)
        raise


def _make_identity(model: nn.Module, after: str, block: nn.Module, i: int, inputs: tuple[Any, ...],
                   before: list[torch.Tensor], writers: list[str]) -> tuple[str, nn.Module]:
    name = f"{after.rpartition('.')[0]}.{i + 1}".lstrip(".")
    saved = {id(p): p.detach().clone() for p in block.parameters()}
    copied: list[torch.Tensor] = [block.get_parameter(w) for w in writers]
    for attempt in (lambda: copied, lambda: _last_norm(block)):
        tensors = attempt()
        if not tensors:
            continue
        _zero(tensors)
        if max_change(before, outputs_of(model, inputs)) == 0.0:
            return name, block
        with torch.no_grad():  # undo this attempt before the next
            for p in block.parameters():
                p.copy_(saved[id(p)])
    change = max_change(before, outputs_of(model, inputs))
    by = f"{change:.3g}" if change is not None else "its shape"
    raise EditError(
        f"block {after!r} is not residual: a copy of it with its output projections (or its last norm's "
        f"scale and shift) at zero still changes the output (by {by}). deepen inserts blocks into a "
        "stack of residual blocks x + f(x) (pre-norm transformer blocks, ResNet blocks without a downsampling "
        "shortcut); a post-norm block, norm(x + f(x)), has no exact insertion"
    )


def record_insert(model: nn.Module, after: str, init: str) -> None:
    _record(model, {"op": "insert", "after": after, "init": init})


def remove_block(model: nn.Module, layer: str) -> nn.Module:
    container, i = locate(model, layer, "layer")
    if len(container) == 1:
        raise EditError(f"{layer!r} is the only block of its stack; removing it would empty it")
    block = container[i]
    del container[i]
    _renumber(model, container, len(container) + 1)
    _record(model, {"op": "remove", "layer": layer})
    return block


def replay(model: nn.Module, edits: Any) -> None:
    """Redo recorded depth edits on a freshly built model (weights are loaded afterwards)."""
    if not isinstance(edits, list):
        raise EditError("depth_edits must be a list of recorded edits")
    for entry in edits:
        op = entry.get("op") if isinstance(entry, dict) else None
        if op == "insert":
            container, i = locate(model, entry.get("after"), "after")
            container.insert(i + 1, copy.deepcopy(container[i]))
            _renumber(model, container, len(container) - 1)
            record_insert(model, entry["after"], str(entry.get("init", "identity")))
        elif op == "remove":
            container, i = locate(model, entry.get("layer"), "layer")
            del container[i]
            _renumber(model, container, len(container) + 1)
            _record(model, {"op": "remove", "layer": entry["layer"]})
        else:
            raise EditError(f"unknown depth edit {entry!r}: expected op 'insert' or 'remove'")
