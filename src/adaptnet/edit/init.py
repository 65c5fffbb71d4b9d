"""Initialisers for widening: each turns a request for ``by`` new units into an index map
plus the values of the fresh units.

* ``net2net``: new units copy existing ones; each copy and its original share the original
  outgoing weights (``1/count`` each). Exact. With ``noise > 0`` the shares are perturbed
  (``1/count + eps`` for a copy, minus the copies' ``eps`` for the original) so they still
  sum to 1: symmetry is broken while the function stays exact up to rounding.
* ``firefly``: ``net2net`` splitting of the units with the highest splitting score (the
  variance of their per-sample gradients, see ``adaptnet.edit.splitting``) instead of random
  units. Exact.
* ``zero``: random incoming weights (a fresh layer's init), zero outgoing weights. Exact.
* ``gradmax``: zero incoming weights, outgoing weights along the top left singular vectors
  of the gradient the new incoming weights would receive (Evci et al., ICLR 2022). Exact,
  since every activation maps 0 to 0; the matrix is measured by autograd with one probe unit
  per outgoing coordinate, so it holds for any consumer (Linear, Conv, residual partners).
* ``random``: random incoming and outgoing weights; the non-preserving baseline.

``zero`` on a residual stream (a group whose units a LayerNorm or an RMSNorm mixes, or that a
tied embedding both writes and reads) *carries* the stream instead (``carry``): every writer's
new rows are the mean of its old rows (LayerNorm: the new channels hold each token's mean, so
the mean is unchanged and the variance scales by ``d/d'``) or zero (RMSNorm: the mean square
scales by ``d/d'``); each norm's ``eps`` becomes ``eps * d/d'`` and its scale is multiplied by
``sqrt(d/d')``, so every normalised old channel is what it was, and the new ones are 0. The
readers of normalised values get random new columns (they read zeros), other readers zero
columns. Exact for any ``by`` on pre-norm transformers; the edit checks it on the example inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from adaptnet._tensor import set_parameter
from adaptnet.edit._apply import apply_index_map
from adaptnet.edit._probe import LossFn, backward_on, max_change, outputs_of
from adaptnet.edit._transaction import Snapshot
from adaptnet.edit.index_map import IndexMap
from adaptnet.errors import EditError
from adaptnet.groups import inputs_for
from adaptnet.nn.groups import Slice, UnitGroup, unit_positions

INITS = ("net2net", "firefly", "zero", "gradmax", "random")
Plan = tuple[IndexMap, dict[int, torch.Tensor]]


def uniform(shape: list[int], bound: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # In place: the same operations in the same order (the same bits) without three float64 temporaries.
    values = torch.rand(shape, generator=generator, dtype=torch.float64).mul_(2).sub_(1).mul_(bound)
    return values.to(device=like.device, dtype=like.dtype)


def _entries(sl: Slice, units: int) -> int:
    """How many indices along ``sl.dim`` one unit owns (a head owns head_dim columns)."""
    return 1 if sl.layout is None else int(unit_positions(sl, units).shape[1])


def _fresh_shape(sl: Slice, n: int, units: int) -> list[int]:
    shape = list(sl.tensor.shape)
    shape[sl.dim] = n * _entries(sl, units)
    return shape


def _fan_in(sl: Slice, units: int, by: int) -> int:
    """Fan-in of the layer owning ``sl`` after the edit (for a fresh layer's init bound).

    A weight's fan-in is its size over its output dimension: for an ``out`` slice that is the
    slice's own dim; for an ``in`` slice the output is the other one of the first two dims.
    """
    weight = sl.tensor if sl.name == "weight" else getattr(sl.module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise EditError(
            f"fresh random weights need a fan-in, read from a layer's .weight (Linear, Conv); "
            f"{type(sl.module).__name__} has none: use init='net2net' or 'gradmax' for this group"
        )
    if sl.role == "in":  # the consumer's rows grow by the new columns
        out_dim = 1 if sl.dim == 0 else 0
        grown = weight.shape[sl.dim] + by * _entries(sl, units)
        return max(1, weight.numel() // weight.shape[sl.dim] * grown // weight.shape[out_dim])
    out_dim = sl.dim if sl.tensor is weight else 0
    return max(1, weight.numel() // weight.shape[out_dim])


def _random_fresh(
    group: UnitGroup, by: int, roles: tuple[str, ...], generator: torch.Generator | None
) -> dict[int, torch.Tensor]:
    n = group.size
    return {
        k: uniform(_fresh_shape(sl, by, n), 1 / math.sqrt(_fan_in(sl, n, by)), sl.tensor, generator)
        for k, sl in enumerate(group.slices)
        if sl.role in roles
    }


def net2net(group: UnitGroup, by: int, generator: torch.Generator | None, noise: float,
            ranking: torch.Tensor | None = None) -> Plan:
    """Split ``by`` units; ``ranking`` (units, best first) replaces the random choice."""
    n = group.size
    # Split every unit equally often first (which keeps LayerNorm statistics exact when
    # ``by`` is a multiple of the width), then distinct units for the remainder.
    order = torch.randperm(n, generator=generator) if ranking is None else ranking
    sources = torch.cat([torch.arange(n).repeat(by // n), order[: by % n]])
    full = torch.cat([torch.arange(n), sources])
    counts = torch.bincount(full, minlength=n).to(torch.float64)
    scale = 1.0 / counts[full]
    if noise > 0:
        eps = torch.randn(by, generator=generator, dtype=torch.float64) * noise * scale[n:]
        scale[n:] += eps
        scale[:n] -= torch.zeros(n, dtype=torch.float64).index_add_(0, sources, eps)
    return IndexMap.append(n, sources, scale), {}


def zero(group: UnitGroup, by: int, generator: torch.Generator | None) -> Plan:
    return IndexMap.append(group.size, torch.full((by,), -1)), _random_fresh(group, by, ("out",), generator)


def random(group: UnitGroup, by: int, generator: torch.Generator | None) -> Plan:
    return IndexMap.append(group.size, torch.full((by,), -1)), _random_fresh(group, by, ("out", "in"), generator)


# How a stream carries new channels, by the ops that mix its units (see the module docstring).
_CARRY_MEAN = frozenset({"layer_norm", "mean"})
_CARRY_ZERO = frozenset({"rms_norm", "mean_square"})
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")


def carry_kind(group: UnitGroup) -> str | None:
    """``"mean"`` or ``"zero"``: what new channels of a norm-mixed or tied group carry; None for
    a plain group (``zero`` keeps its usual meaning) or one no carry keeps exact."""
    if not group.mixed and not group.tied:
        return None
    if group.mixed and group.mixed <= _CARRY_MEAN:
        return "mean"
    if group.mixed <= _CARRY_ZERO:
        return "zero"
    return None


def carry(group: UnitGroup, by: int, generator: torch.Generator | None) -> Plan:
    """The index map and fresh values that carry the stream (module docstring); norms follow apart."""
    n, kind = group.size, carry_kind(group)
    fresh: dict[int, torch.Tensor] = {}
    for k, sl in enumerate(group.slices):
        # Writers: rows, biases, and stream content that is not a norm's or a scale (a position
        # table added in, a cls token concatenated in).
        writer = sl.role == "out" or (sl.role == "norm" and sl.fill != 1.0 and not _owns_eps(sl.module))
        if writer and kind == "mean":
            mean = _columns(sl, sl.tensor.detach(), n).to(torch.float64).mean(0, keepdim=True)
            fresh[k] = _from_columns(sl, mean.expand(by, -1), n).to(sl.tensor.dtype)
        elif writer:
            fresh[k] = torch.zeros(_fresh_shape(sl, by, n), dtype=sl.tensor.dtype, device=sl.tensor.device)
        elif sl.role == "in" and (kind == "zero" or sl.after_norm):
            fan_in = _fan_in(sl, n, by)
            fresh[k] = uniform(_fresh_shape(sl, by, n), 1 / math.sqrt(fan_in), sl.tensor, generator)
    return IndexMap.append(n, torch.full((by,), -1)), fresh


# A carried stream must keep the outputs on the example inputs within this, relative to their largest
# value: float rounding, not more. Float64 models may compute norms in float32 (Llama's RMSNorm does),
# hence 1e-6 there; a stream the carry cannot keep changes by 1e-3 or more (post-norm BERT).
_CARRY_TOLERANCE = {torch.float64: 1e-6}


def carry_checked(model: nn.Module, group: UnitGroup, by: int, optimizer: torch.optim.Optimizer | None,
                  generator: torch.Generator | None) -> None:
    """Widen a residual stream with ``init="zero"`` (``carry``, then ``rescale_norms``), checked on
    the example inputs: a stream that a norm does not guard (post-norm, BERT-style: the norm's output
    *is* the stream) changes, and the edit is refused."""
    inputs = inputs_for(model)
    before = outputs_of(model, inputs)
    imap, fresh = carry(group, by, generator)
    apply_index_map(group, imap, fresh, optimizer, model)
    rescale_norms(group, group.size, group.size + by)
    change = max_change(before, outputs_of(model, inputs))
    if change is None:
        return  # the outputs changed shape: run_edit refuses the edit
    scale = max((float(t.abs().max()) for t in before if t.numel()), default=1.0) or 1.0
    dtype = before[0].dtype if before else torch.float32
    if change / scale > _CARRY_TOLERANCE.get(dtype, 1e-5):
        raise EditError(
            f"init='zero' cannot keep the function of {group.name!r}: carrying the stream's "
            f"{carry_kind(group)} into {by} new channels changed the outputs by {change / scale:.2g} "
            "(relative). It is exact when the stream is read by norms and linear layers only (pre-norm "
            "transformers); a norm whose output is the stream itself (post-norm, as in BERT), a per-channel op "
            "before a norm (a depthwise conv, a layer scale) or a non-linear op on the raw stream cannot keep it. "
            "Pass exact=False to widen anyway"
        )


def _owns_eps(module: nn.Module) -> bool:
    """A normalisation module (LayerNorm, RMSNorm, BatchNorm, a norm written by hand): it has an eps."""
    return any(hasattr(module, a) for a in _EPS_NAMES)


def rescale_norms(group: UnitGroup, old: int, new: int) -> None:
    """After a carry: each norm of the stream gets ``eps * old/new`` and its scale ``* sqrt(old/new)``."""
    ratio = old / new
    for sl in group.slices:
        module = sl.module
        names = [a for a in _EPS_NAMES if hasattr(module, a)]
        if sl.role != "norm" or sl.name != "weight" or not names:
            continue
        eps = getattr(module, names[0])
        if eps is None:  # nn.RMSNorm(eps=None) uses the dtype's machine epsilon
            eps = torch.finfo(sl.tensor.dtype).eps
        setattr(module, names[0], float(eps) * ratio)
        weight = sl.tensor
        if isinstance(weight, nn.Parameter):
            grad = weight.grad
            set_parameter(weight, weight.detach() * math.sqrt(ratio))
            weight.grad = grad
        else:
            module._buffers[sl.name] = weight * math.sqrt(ratio)


def _columns(sl: Slice, t: torch.Tensor, units: int) -> torch.Tensor:
    """``(units, per-unit numel)``: each unit's entries of ``t`` flattened."""
    moved = t.movedim(sl.dim, 0)
    if sl.layout is not None:
        moved = moved[unit_positions(sl, units).flatten().to(t.device)]
    return moved.reshape(units, -1)


def _from_columns(sl: Slice, cols: torch.Tensor, units: int) -> torch.Tensor:
    """Inverse of ``_columns`` for ``cols`` of shape ``(n, per-unit numel)``: entries unit after unit."""
    moved = list(sl.tensor.movedim(sl.dim, 0).shape)
    return cols.reshape([cols.shape[0] * _entries(sl, units), *moved[1:]]).movedim(0, sl.dim)


def _consumers(group: UnitGroup) -> list[tuple[int, Slice]]:
    """The slices (with their index in the group) that read the group's units."""
    consumers = [(k, sl) for k, sl in enumerate(group.slices) if sl.role == "in"]
    if not consumers:
        raise EditError(f"gradient-guided growth needs a layer that reads the units of {group.name!r}, and it has "
                        "none (its units are summed or are an output); use init='zero' or 'net2net'")
    return consumers


def gradient_matrix(model: nn.Module, group: UnitGroup, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """``M`` such that new zero-fan-in units with outgoing weights ``w`` get incoming gradient ``w^T M``.

    Returns ``(d_out, d_in)`` in float64, where ``d_out`` is the size of one unit's outgoing
    weights (all consumer columns concatenated) and ``d_in`` of its incoming weights. The model
    is left exactly as it was (grads included).
    """
    n = group.size
    consumers = _consumers(group)
    widths = [_columns(sl, sl.tensor, n).shape[1] for _, sl in consumers]
    d_out = sum(widths)
    ref = consumers[0][1].tensor
    # Probe: d_out fresh units with zero incoming weights; unit i writes the one-hot e_i
    # into the concatenated consumer columns. Its incoming gradient is then row i of M.
    eye = torch.eye(d_out, dtype=ref.dtype, device=ref.device)
    probe = {k: _from_columns(sl, c, n) for (k, sl), c in zip(consumers, eye.split(widths, dim=1), strict=True)}
    snapshot = Snapshot(model, None)
    try:
        apply_index_map(group, IndexMap.append(n, torch.full((d_out,), -1)), probe, None, model)
        try:
            backward_on(model, batch, loss_fn, "gradient-guided growth")
        except EditError:
            raise
        except Exception as err:  # the model's own code failed on the widened group
            raise EditError(
                f"gradient-guided growth of {group.name!r}: with {d_out} probe units added, the model's forward "
                f"fails ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); a size written "
                "into its code? Compute sizes from the tensors, or widen with init='zero' or 'net2net'"
            ) from err
        rows = []
        for sl in group.slices:
            if sl.role == "out" and isinstance(sl.tensor, nn.Parameter) and sl.tensor.grad is not None:
                rows.append(_columns(sl, sl.tensor.grad, n + d_out)[n:])
        return torch.cat(rows, dim=1).to(torch.float64)
    finally:
        snapshot.restore()


def _outgoing_norm(group: UnitGroup) -> float:
    """Mean norm of the existing units' outgoing weights (all consumer columns together)."""
    existing = torch.cat([_columns(sl, sl.tensor.detach(), group.size) for sl in group.slices if sl.role == "in"],
                         dim=1)
    norm = float(existing.to(torch.float64).norm(dim=1).mean())
    return norm if norm > 0 else 1.0


def growth_score(model: nn.Module, group: UnitGroup, by: int, batch: Any, loss_fn: LossFn | None) -> float:
    """The gradient norm that ``by`` gradmax units added to ``group`` would receive.

    ``sqrt(sum of the top-by squared singular values of M)`` times the outgoing norm gradmax
    gives new units. One SGD step of size ``lr`` on those units lowers the loss by about
    ``lr * score**2`` (first order): comparable across layers, and what ``where="gradient"``
    and ``GrowOnSignal`` use.
    """
    s = torch.linalg.svdvals(gradient_matrix(model, group, batch, loss_fn))
    return float(s[:by].pow(2).sum().sqrt()) * _outgoing_norm(group)


def gradmax(model: nn.Module, group: UnitGroup, by: int, batch: Any, loss_fn: LossFn | None) -> Plan:
    n = group.size
    consumers = _consumers(group)
    widths = [_columns(sl, sl.tensor, n).shape[1] for _, sl in consumers]
    ref = consumers[0][1].tensor
    u, s, _ = torch.linalg.svd(gradient_matrix(model, group, batch, loss_fn), full_matrices=False)
    rank = max(1, int((s > s[0] * 1e-6).sum())) if s.numel() and s[0] > 0 else 1
    # Beyond the rank there are no new directions: they repeat, with alternating signs. A unit
    # and its opposite receive opposite gradients (with ReLU they then compute different
    # functions; with an odd one such as tanh they do not), but units two ranks apart move in
    # lockstep: gradmax adds at most 2 * rank distinct units (rank <= outgoing size).
    picks = torch.arange(by) % rank
    signs = 1.0 - 2.0 * ((torch.arange(by) // rank) % 2).to(torch.float64)
    directions = u[:, picks].T * signs[:, None]  # (by, d_out), unit-norm rows
    # New outgoing columns get the mean norm of the existing units' outgoing columns.
    outgoing = (directions * _outgoing_norm(group)).to(ref.dtype)
    fresh = {k: _from_columns(sl, c, n) for (k, sl), c in zip(consumers, outgoing.split(widths, dim=1), strict=True)}
    return IndexMap.append(n, torch.full((by,), -1)), fresh
