"""Apply an index map to every slice of a unit group: parameters, grads, buffers, optimizer state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from adaptnet._tensor import set_parameter
from adaptnet.edit.index_map import IndexMap, remap, scale_along
from adaptnet.edit.optim import migrate_state
from adaptnet.nn.groups import Slice, UnitGroup, flat_map, unit_positions

# Values of a fresh unit in normalisation slices: the state of a freshly built layer.
_NORM_FRESH = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def _linear_attrs(m: Any) -> None:
    m.out_features, m.in_features = m.weight.shape


def _conv_attrs(m: Any) -> None:
    # A grouped conv keeps its channels per group; an edit changes the number of groups.
    if m.transposed:
        per_group = m.in_channels // m.groups
        m.groups = m.weight.shape[0] // per_group if m.groups > 1 else 1
        m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
    else:
        per_group = m.out_channels // m.groups
        m.groups = m.weight.shape[0] // per_group if m.groups > 1 else 1
        m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


def _batchnorm_attrs(m: Any) -> None:
    stat = m.running_mean if m.running_mean is not None else m.weight
    m.num_features = stat.shape[0]


def _layernorm_attrs(m: Any) -> None:
    if m.weight is not None:
        m.normalized_shape = (m.weight.shape[0], *m.normalized_shape[1:])


def _groupnorm_attrs(m: Any) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


def _embedding_attrs(m: Any) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _hf_conv1d_attrs(m: Any) -> None:  # transformers' Conv1D: weight (in, out)
    m.nf = m.weight.shape[1]
    if hasattr(m, "nx"):
        m.nx = m.weight.shape[0]


def _hf_gpt2_attention_attrs(m: Any) -> None:  # splits its fused qkv output by split_size
    if not getattr(m, "is_cross_attention", False):
        m.split_size = m.c_attn.weight.shape[1] // 3
        m.num_heads = m.split_size // m.head_dim


def _hf_bert_attention_attrs(m: Any) -> None:
    m.all_head_size = m.query.weight.shape[0]
    m.num_attention_heads = m.all_head_size // m.attention_head_size


# How each layer type records its size, refreshed after its tensors change shape.
# Users register handlers for their own layer types with ``register_layer``.
_SIZE_ATTRS: dict[type[nn.Module], Callable[[Any], None]] = {
    nn.Linear: _linear_attrs,
    nn.Conv1d: _conv_attrs,
    nn.Conv2d: _conv_attrs,
    nn.Conv3d: _conv_attrs,
    nn.ConvTranspose1d: _conv_attrs,
    nn.ConvTranspose2d: _conv_attrs,
    nn.ConvTranspose3d: _conv_attrs,
    nn.modules.batchnorm._BatchNorm: _batchnorm_attrs,
    nn.LayerNorm: _layernorm_attrs,
    nn.RMSNorm: _layernorm_attrs,
    nn.GroupNorm: _groupnorm_attrs,
    nn.Embedding: _embedding_attrs,
}
# Layer types of optional libraries, by qualified class name (so that adaptnet never imports them).
_SIZE_ATTRS_BY_NAME: dict[str, Callable[[Any], None]] = {
    "transformers.pytorch_utils.Conv1D": _hf_conv1d_attrs,
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": _hf_gpt2_attention_attrs,
    "transformers.models.bert.modeling_bert.BertSelfAttention": _hf_bert_attention_attrs,
}


def register_layer(cls: type[nn.Module], refresh: Callable[[Any], None]) -> None:
    """Tell adaptnet how ``cls`` records its size (``refresh(module)`` re-reads it from its tensors)."""
    _SIZE_ATTRS[cls] = refresh


def _refresh(module: nn.Module) -> None:
    for cls in type(module).__mro__:
        handler = _SIZE_ATTRS.get(cls) or _SIZE_ATTRS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if handler is not None:
            handler(module)
            return


def refresh_sizes(model: nn.Module | None, touched: list[nn.Module]) -> None:
    """Re-read the size attributes of ``touched`` modules and of the modules that contain them
    (an attention block records its number of heads, though its projections own the tensors)."""
    for module in dict.fromkeys(touched):
        _refresh(module)
    if model is None:
        return
    ids = {id(m) for m in touched}
    # Tensors of the touched modules: a module holding one of them too (a tied LM head) changed as well.
    tensors = {id(t) for m in touched for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    for _, module in model.named_modules():
        if id(module) in ids:
            continue
        holds = any(id(t) in tensors for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
        if holds or any(id(sub) in ids for sub in module.modules()):
            _refresh(module)


def _flat(sl: Slice, imap: IndexMap, units: int) -> tuple[IndexMap, torch.Tensor]:
    """The group's index map spelled out along ``sl.dim`` (a unit may own several entries there),
    and the positions of the fresh units' entries, unit by unit."""
    if sl.layout is None:
        return imap, imap.fresh
    source, unit = flat_map(sl, imap.source, units)
    scale = None
    if imap.scale is not None:
        scale = torch.where(unit >= 0, imap.scale[unit.clamp(min=0)], torch.ones((), dtype=imap.scale.dtype))
    fresh_units = imap.fresh
    positions = unit_positions(sl, imap.size)[fresh_units].flatten() if fresh_units.numel() else fresh_units
    return IndexMap(source, scale), positions


def apply_index_map(
    group: UnitGroup,
    imap: IndexMap,
    fresh: Mapping[int, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    model: nn.Module | None = None,
    new_state: str = "copy",
) -> None:
    """Rewrite every tensor of ``group`` so that its units follow ``imap``.

    Args:
        group: the unit group.
        imap: the index map (new units from old ones).
        fresh: for slice ``k`` of ``group.slices``, the values of the fresh units (shaped
            like the tensor with ``n_fresh * k`` along the slice's dim, where ``k`` is the number
            of entries of one unit there, unit after unit). Slices without an entry get their
            ``fill``, the fresh-layer default (norm slices) or zeros.
        optimizer: its per-element state is remapped with the parameters.
        model: the whole model, so that containers that record sizes are refreshed too.
        new_state: the optimizer state of units copied from others (``adaptnet.edit.optim``).
    """
    touched = []
    units = group.size
    # A tensor with two slices in the group (a square layer inside a residual stream) changes along
    # its first slice's dim before the second: fresh values made for the old shape follow it.
    done: dict[int, list[tuple[int, IndexMap]]] = {}
    for k, sl in enumerate(group.slices):
        tensor = sl.tensor
        flat, positions = _flat(sl, imap, units)
        default = sl.fill if sl.fill is not None else _NORM_FRESH.get(sl.name, 0.0) if sl.role == "norm" else 0.0
        values: torch.Tensor | float = default
        if k in fresh:
            values = fresh[k]
            for dim, earlier in done.get(id(tensor), []):
                values = remap(values, dim, earlier, 0.0)
        scale = flat.scale if sl.role == "in" else None
        if isinstance(values, torch.Tensor) and not torch.equal(positions, flat.fresh):
            # The fresh units' entries are not in order along the dim (a fused qkv): written after.
            new = remap(tensor.detach(), sl.dim, flat, default)
            new.index_copy_(sl.dim, positions.to(new.device), values.to(device=new.device, dtype=new.dtype))
            new = new if scale is None else scale_along(new, sl.dim, scale)
        else:  # one pass: the old entries, the copies and the fresh values written once each
            new = remap(tensor.detach(), sl.dim, flat, values, scale)
        done.setdefault(id(tensor), []).append((sl.dim, flat))
        if isinstance(tensor, nn.Parameter):
            grad = tensor.grad
            if optimizer is not None:
                migrate_state(optimizer, tensor, sl.dim, flat, new_state, split=sl.role != "in")
            set_parameter(tensor, new)
            tensor.grad = None if grad is None else remap(grad, sl.dim, flat, 0.0)
        else:
            sl.module._buffers[sl.name] = new
        touched.append(sl.module)
    refresh_sizes(model, touched)
