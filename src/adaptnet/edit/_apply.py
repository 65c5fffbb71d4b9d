"""Apply an index map to every slice of a unit group: parameters, grads, buffers, optimizer state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from adaptnet._tensor import set_parameter
from adaptnet.edit.index_map import IndexMap, remap, scale_along
from adaptnet.edit.optim import migrate_state
from adaptnet.nn.groups import UnitGroup

# Values of a fresh unit in normalisation slices: the state of a freshly built layer.
_NORM_FRESH = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def _linear_attrs(m: Any) -> None:
    m.out_features, m.in_features = m.weight.shape


def _conv_attrs(m: Any) -> None:
    m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


def _batchnorm_attrs(m: Any) -> None:
    stat = m.running_mean if m.running_mean is not None else m.weight
    m.num_features = stat.shape[0]


def _layernorm_attrs(m: Any) -> None:
    m.normalized_shape = (m.weight.shape[0], *m.normalized_shape[1:])


# How each layer type records its size, refreshed after its tensors change shape.
# Users register handlers for their own layer types with ``register_layer``.
_SIZE_ATTRS: dict[type[nn.Module], Callable[[Any], None]] = {
    nn.Linear: _linear_attrs,
    nn.Conv1d: _conv_attrs,
    nn.Conv2d: _conv_attrs,
    nn.Conv3d: _conv_attrs,
    nn.modules.batchnorm._BatchNorm: _batchnorm_attrs,
    nn.LayerNorm: _layernorm_attrs,
}


def register_layer(cls: type[nn.Module], refresh: Callable[[Any], None]) -> None:
    """Tell adaptnet how ``cls`` records its size (``refresh(module)`` re-reads it from its tensors)."""
    _SIZE_ATTRS[cls] = refresh


def _refresh(module: nn.Module) -> None:
    for cls in type(module).__mro__:
        if cls in _SIZE_ATTRS:
            _SIZE_ATTRS[cls](module)
            return


def apply_index_map(
    group: UnitGroup,
    imap: IndexMap,
    fresh: Mapping[int, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Rewrite every tensor of ``group`` so that its units follow ``imap``.

    Args:
        group: the unit group.
        imap: the index map (new units from old ones).
        fresh: for slice ``k`` of ``group.slices``, the values of the fresh units (shaped
            like the tensor with ``n_fresh`` along the slice's dim). Slices without an
            entry get the fresh-layer default (norm slices) or zeros.
        optimizer: its per-element state is remapped with the parameters.
    """
    touched = []
    for k, sl in enumerate(group.slices):
        tensor = sl.tensor
        default = _NORM_FRESH.get(sl.name, 0.0) if sl.role == "norm" else 0.0
        new = remap(tensor.detach(), sl.dim, imap, fresh.get(k, default))
        if sl.role == "in" and imap.scale is not None:
            new = scale_along(new, sl.dim, imap.scale)
        if isinstance(tensor, nn.Parameter):
            grad = tensor.grad
            if optimizer is not None:
                migrate_state(optimizer, tensor, sl.dim, imap)
            set_parameter(tensor, new)
            tensor.grad = None if grad is None else remap(grad, sl.dim, imap, 0.0)
        else:
            sl.module._buffers[sl.name] = new
        touched.append(sl.module)
    for module in dict.fromkeys(touched):
        _refresh(module)
