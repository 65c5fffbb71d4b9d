"""Running an edit: the one place every edit of ``adaptnet.edit`` goes through.

``run_edit`` checks the optimizer, applies the edit's body inside a transaction (any failure
restores model and optimizer bit for bit), checks the edited model (``_check_after_edit``) and
returns the ``Edit`` record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adaptnet.edit._probe import max_change, outputs_of, outputs_on
from adaptnet.edit._transaction import transaction
from adaptnet.edit.optim import check_optimizer
from adaptnet.edit.record import Edit
from adaptnet.errors import EditError
from adaptnet.groups import inputs_for, trace, verify_group, widths
from adaptnet.nn.protocols import DeclaresGroups

Optimizer = torch.optim.Optimizer


def model_widths(model: nn.Module) -> tuple[int, ...]:
    return tuple(widths(model))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# torch.nn's modules whose forward takes every size from its tensors (or from attributes that
# refresh_sizes keeps in step, such as a conv's groups): a model made of these alone writes no size
# down. Left out: MultiheadAttention (checks its sizes in Python), Unflatten and Fold (hold a shape),
# PReLU, the recurrent modules (check their input size), and any user subclass (another __module__).
_SIZE_FREE_FILES = {f"torch.nn.modules.{name}"
                    for name in ("activation", "dropout", "padding", "pooling", "upsampling")}
_SIZE_FREE_TORCH = frozenset({
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Linear, nn.Embedding,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
    *(cls for cls in vars(nn).values() if isinstance(cls, type) and cls.__module__ in _SIZE_FREE_FILES
      and cls not in (nn.MultiheadAttention, nn.PReLU)),
})


def _sizes_from_tensors(model: nn.Module) -> bool:
    """Whether the model's forward takes every size from its tensors: adaptnet's own models (built
    of adaptnet's and torch's modules), and models built of ``_SIZE_FREE_TORCH`` modules alone (an
    ``nn.Sequential`` of layers). A width edit of a traced group cannot make their forward fail or
    change its output shapes, so the run on the example inputs (a forward pass) is skipped."""
    if isinstance(model, DeclaresGroups):
        return False
    if type(model).__module__.startswith("adaptnet.nn."):
        return all(type(m).__module__.startswith(("adaptnet.nn.", "torch.nn.")) for m in model.modules())
    return all(type(m) in _SIZE_FREE_TORCH for m in model.modules())


def _check_after_edit(model: nn.Module, batch: Any, group: str) -> list[torch.Tensor] | None:
    """Run the edited model (inside the transaction) and return its outputs on ``batch``.

    A traced model is run on its example inputs: an edit after which its forward fails or its
    outputs change shape, or (checked once per group, by tracing again) its unit groups are no
    longer what they were, is undone. That is what a size written into a model's code does
    (``view(b, 4, ...)``, ``split(7)``, ``view(b, -1, n_heads, d)``). Width edits of models whose
    code writes no size down skip the run (``_sizes_from_tensors``).
    """
    try:
        inputs = None if group and _sizes_from_tensors(model) else inputs_for(model)
    except EditError:
        inputs = None  # never traced (an edit of a part of a model, such as grow_experts)
    failure = None
    try:
        if inputs is not None:
            shapes = [tuple(t.shape) for t in outputs_of(model, inputs)]
            if shapes != trace(model).output_shapes:
                failure = f"its outputs are {shapes}, not {trace(model).output_shapes}"
        outputs = outputs_on(model, batch) if batch is not None else None
    except Exception as err:
        failure = f"its forward fails: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if failure is None and inputs is not None and group:
        failure = verify_group(model, group)
    if failure is not None:
        raise EditError(
            f"after the edit, {failure}; the edit is undone. Does {type(model).__name__}'s code write a size down "
            "(view(b, 4, ...), split(7), view(b, -1, n_heads, d))? Compute sizes from the tensors instead "
            "(view(b, -1, ...), chunk(2), view(b, t, -1, d))"
        )
    return outputs


def run_edit(
    model: nn.Module,
    optimizer: Optimizer | None,
    batch: Any,
    body: Callable[[], tuple[tuple[int, ...], tuple[int, ...]]],
    **record: Any,
) -> Edit:
    """Apply ``body`` transactionally and describe what it did."""
    if optimizer is not None:
        check_optimizer(optimizer, model)
    widths, params = model_widths(model), _count(model)
    before = outputs_on(model, batch) if batch is not None else None
    with transaction(model, optimizer):
        added, removed = body()
        after = _check_after_edit(model, batch, record["group"] if record.get("op") in ("widen", "prune") else "")
    change = max_change(before, after) if before is not None and after is not None else None
    return Edit(
        units_added=added,
        units_removed=removed,
        widths_before=widths,
        widths_after=model_widths(model),
        params_before=params,
        params_after=_count(model),
        max_output_change=change,
        **record,
    )
