"""``grow_experts``: add experts to an ``MoE`` layer, keeping its function where that is possible.

The experts of an ``MoE`` are one unit group (``MoE.expert_group()``: router rows and bias,
and the stacked expert tensors along dim 0), so growing is an index map on that group,
applied by ``apply_index_map`` inside a transaction with the optimizer carried along, like
every width edit. Each new expert (a *copy*) comes from a *source* expert ``s``: it takes
``s``'s router row (so its logit stays a fixed offset from ``s``'s on every input) and, with
``init="copy"``, ``s``'s MLP and optimizer state (Net2Net's convention), or a fresh MLP with
``init="random"``. Then router *biases* move (and, at top-1, the sources' output layers):
the copies of ``s`` take a share ``eta`` of ``s``'s softmax mass together,
``logit_copy = logit_s + log(eta / m)`` for ``m`` copies.

Why not simply exact: routing is discrete, so an expert that is ever chosen changes the
output somewhere, and every gradient a new router row gets is proportional to its softmax
probability, so a new expert with probability 0 never learns. What each mode allows:

* ``top_k == 1`` (the gate is the chosen expert's probability over *all* experts). The copies'
  mass is taken from their source (``logit_s += log(1 - eta)``), which keeps the softmax
  normaliser, and the source's output layer is scaled by ``1 / (1 - eta)`` (the index map's
  consumer ``scale``), which keeps its gated output; copies get the same scale. Copies sit
  below their source on every input (or tie with it, at ``eta = 1/2``) and are not chosen
  (or, tied, compute what it computes). Lowering the sources by
  ``-log(1 - eta)`` can only hand a token to an expert that is *not* a source, so:

  - when every expert is a source with the same ``eta`` (``n >= E``; the default sources
    then cover every expert), no token changes, for every input, whatever ``eta``. Default:
    ``eta = 1/2`` for one MLP copy per expert in dropless mode (the copy ties with its source
    and computes what it computes, so either may take a token: the split is even and the
    copies take tokens at once), else ``eta = 1/4`` (copies start ``log 3`` below their
    source, strictly, so that no tie can reorder a capacity queue or route to a fresh MLP;
    the load-balancing loss pulls up an expert with ``f = 0``, and they soon take tokens);
  - otherwise the tokens that change are those whose expert is a source and whose best
    non-source expert is within ``-log(1 - eta)`` (about ``eta``) of it. With a ``batch``,
    ``eta`` is the largest value up to ``SHARE_MAX`` that keeps that drop below half of the
    smallest such margin on the batch (exact on the batch); without one, ``SHARE_DEFAULT``.
    Copies then start ``log((1 - eta) / eta)`` below their source: slow to be chosen.

* ``top_k >= 2`` (gates renormalised over the chosen experts, computed from their logits
  alone): experts that are not chosen do not enter the forward pass, so sources stay as they
  are and only copies are added. Tokens on which no copy is chosen are bit-identical. A copy
  is chosen only where its source leads the ``k``-th largest logit by more than
  ``-log(eta / m)``, and there the output moves by at most ``eta / (1 + eta)`` times the
  difference of two experts' outputs. With a ``batch``, ``eta`` (at most ``SHARE_MAX``) keeps
  every copy ``log 2`` below the ``k``-th logit wherever its source leads on the batch (exact
  on the batch); without one, ``SHARE_DEFAULT``.

* Capacity mode: the capacity ``ceil(capacity_factor * N * k / E)`` would shrink with more
  experts, so a preserving edit multiplies ``capacity_factor`` by ``E_new / E_old``: each
  expert keeps its capacity and, as no copy is chosen, drops exactly what it dropped before.
  Set the factor back once the new experts carry their share of the load.

``Edit.max_output_change`` reports the change on ``batch``. ``preserve=False`` makes an even
split instead (each source and its ``m`` copies get ``1 / (m + 1)`` of its mass; for top-1
their outputs are scaled by ``m + 1``), which gives copies a real share of the traffic at
once; for top-1 with every expert a source that is exact too. ``init="random"`` with
``preserve=False`` also draws the router row and bias afresh (the plain, non-preserving way).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from adaptnet._tensor import set_parameter
from adaptnet.edit._apply import apply_index_map
from adaptnet.edit._probe import eval_mode
from adaptnet.edit._run import run_edit
from adaptnet.edit.index_map import IndexMap
from adaptnet.edit.init import uniform
from adaptnet.edit.ops import check_positive
from adaptnet.edit.record import Edit
from adaptnet.errors import EditError
from adaptnet.nn.moe import MoE

logger = logging.getLogger(__name__)

INITS = ("copy", "random")
# Top-1 with every expert a source is exact for any share: copies of the MLP take half (they tie
# with their source, and compute what it computes); random experts, or ties that could reorder
# capacity queues, take a quarter (log 3 below their source).
SHARE_COVER_TIE, SHARE_COVER = 0.5, 0.25
SHARE_MAX = 0.05  # largest calibrated share of a source's router mass that its copies take
SHARE_DEFAULT = 1e-3  # the share without a calibration batch
SHARE_MIN = 1e-12  # floor: a share of 0 would put -inf in the router bias


def _find_moe(model: nn.Module, module: str | None) -> tuple[MoE, str, int]:
    """The MoE to grow, its name in ``model`` and its index among the model's MoE layers."""
    if isinstance(model, MoE) and module is None:
        return model, "", 0
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if module is not None:
        for index, (name, m) in enumerate(found):
            if name == module:
                return m, name, index
        raise EditError(f"module={module!r} is not an MoE layer of the model; MoE layers: "
                        f"{[name for name, _ in found] or 'none'}")
    if len(found) != 1:
        raise EditError(
            f"grow_experts needs a model with exactly one MoE layer, or module= naming one; "
            f"{type(model).__name__} has {[name for name, _ in found] or 'none'}"
        )
    name, moe = found[0]
    return moe, name, 0


def _inputs(batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor):
        raise EditError("batch must be the model's inputs (a tensor) or (inputs, targets)")
    return x


@torch.no_grad()
def _router_logits(model: nn.Module, moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """``(N, E)`` float64 router logits of every token ``moe`` sees when ``model`` runs on ``x``."""
    seen: list[torch.Tensor] = []
    handle = moe.router.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with eval_mode(model):
            model(x)
    finally:
        handle.remove()
    if not seen:
        raise EditError("the calibration batch never reached the MoE layer")
    return torch.cat(seen).to(torch.float64)


def _default_sources(num_experts: int, n: int, top_k: int, logits: torch.Tensor | None,
                     generator: torch.Generator | None) -> list[int]:
    """The most loaded experts on the batch first (else a random order), cycled ``n`` times."""
    if logits is not None:
        load = torch.bincount(logits.topk(top_k, dim=1).indices.flatten(), minlength=num_experts)
        order = torch.argsort(-load, stable=True).tolist()
    else:
        order = torch.randperm(num_experts, generator=generator).tolist()
    return [order[i % num_experts] for i in range(n)]


def _top1_total(logits: torch.Tensor | None, sources: set[int], num_experts: int, tie: bool) -> float:
    """Top-1: the share every source gives away (the same for all, so their order is kept).

    Lowering the sources by ``-log(1 - eta)`` can only hand a token over to an expert that is
    not a source. With every expert a source nothing changes, whatever ``eta``; otherwise
    ``eta`` keeps that drop below half of the smallest such margin on the batch.
    """
    if len(sources) == num_experts:
        return SHARE_COVER_TIE if tie else SHARE_COVER
    if logits is None:
        return SHARE_DEFAULT
    is_source = torch.zeros(num_experts, dtype=torch.bool, device=logits.device)
    is_source[list(sources)] = True
    winner = logits.argmax(dim=1)
    mine = is_source[winner]
    if not bool(mine.any()):
        return SHARE_MAX
    rivals = logits[mine].masked_fill(is_source, -math.inf).max(dim=1).values  # best non-source
    margin = float((logits[mine].max(dim=1).values - rivals).min())
    return max(SHARE_MIN, min(SHARE_MAX, -math.expm1(-margin / 2)))


def _topk_total(logits: torch.Tensor | None, s: int, copies: int, k: int) -> float:
    """Top-k (k >= 2): what ``s``'s copies take, so that each stays ``log 2`` below the k-th logit
    of every batch token where ``s`` leads it (so no copy is chosen on the batch)."""
    if logits is None:
        return SHARE_DEFAULT
    values, index = logits.topk(min(k, logits.shape[1]), dim=1)  # (N, k)
    leads = (index[:, : k - 1] == s).any(dim=1)
    if not bool(leads.any()):
        return SHARE_MAX
    lead = float((logits[leads, s] - values[leads, -1]).max())
    return max(SHARE_MIN, min(SHARE_MAX, copies * 0.5 * math.exp(-lead)))


def _totals(moe: MoE, sources: list[int], logits: torch.Tensor | None, preserve: bool,
            share: float | None, init: str) -> dict[int, float]:
    """For each source, the share of its router mass its copies take together (split equally)."""
    copies = Counter(sources)
    if share is not None:
        return dict.fromkeys(copies, share)
    if not preserve:  # an even split: the source and each copy get 1 / (m + 1)
        return {s: m / (m + 1) for s, m in copies.items()}
    if moe.top_k == 1:
        tie = init == "copy" and moe.capacity_factor is None and max(copies.values()) == 1
        return dict.fromkeys(copies, _top1_total(logits, set(copies), moe.num_experts, tie))
    return {s: _topk_total(logits, s, m, moe.top_k) for s, m in copies.items()}


def _fresh_experts(moe: MoE, sources: list[int], preserve: bool,
                   generator: torch.Generator | None) -> dict[int, torch.Tensor]:
    """``init="random"``: new expert MLPs like fresh Linear layers; router rows shadow the source
    (preserving) or are drawn afresh. Keys are slice positions in ``MoE.expert_group()``."""
    n, dim, hidden = len(sources), moe.dim, moe.hidden
    ref, src = moe.w1, torch.tensor(sources, dtype=torch.long, device=moe.w1.device)
    values: dict[tuple[nn.Module, str], torch.Tensor] = {
        (moe, "w1"): uniform([n, hidden, dim], 1 / math.sqrt(dim), ref, generator),
        (moe, "b1"): uniform([n, hidden], 1 / math.sqrt(dim), ref, generator),
        (moe, "w2"): uniform([n, dim, hidden], 1 / math.sqrt(hidden), ref, generator),
        (moe, "b2"): uniform([n, dim], 1 / math.sqrt(hidden), ref, generator),
    }
    if preserve:
        values[(moe.router, "weight")] = moe.router.weight.detach().index_select(0, src)
        values[(moe.router, "bias")] = moe.router.bias.detach().index_select(0, src)
    else:
        values[(moe.router, "weight")] = uniform([n, dim], 1 / math.sqrt(dim), moe.router.weight, generator)
        values[(moe.router, "bias")] = uniform([n], 1 / math.sqrt(dim), moe.router.bias, generator)
    slots = {(s.module, s.name): k for k, s in enumerate(moe.expert_group().slices)}
    return {slots[key]: value for key, value in values.items()}


def _shift_router_bias(moe: MoE, old: int, sources: list[int], totals: dict[int, float],
                       lower_source: bool) -> None:
    """A copy of ``s`` gets ``bias[s] + log(eta_s / m_s)``; with ``lower_source``, ``s`` keeps ``1 - eta_s``."""
    bias = moe.router.bias
    new = bias.detach().to(torch.float64).clone()
    copies = Counter(sources)
    for j, s in enumerate(sources):
        new[old + j] = new[s] + math.log(totals[s] / copies[s])
    if lower_source:
        for s, total in totals.items():
            new[s] += math.log1p(-total)
    grad = bias.grad
    set_parameter(bias, new.to(bias.dtype))
    bias.grad = grad


def _check(n: Any, init: Any, preserve: Any, sources: Any, share: Any, num_experts: int) -> None:
    check_positive(n, "n")
    if init not in INITS:
        raise EditError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if not isinstance(preserve, bool):
        raise EditError(f"preserve must be True or False, got {preserve!r}")
    if sources is not None:
        ok = isinstance(sources, Sequence) and all(isinstance(s, int) and not isinstance(s, bool) for s in sources)
        if not ok or len(sources) != n or any(not 0 <= s < num_experts for s in sources):
            raise EditError(f"sources must list n={n} expert indices in [0, {num_experts - 1}], got {sources!r}")
    if share is not None and (not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 0.5):
        raise EditError(
            f"share must be in (0, 0.5]: the part of a source's router mass its copies take together "
            f"(the source keeps the rest, at least as much as they do); got {share!r}"
        )


def grow_experts(
    model_or_moe: nn.Module,
    n: int,
    init: str = "copy",
    optimizer: torch.optim.Optimizer | None = None,
    preserve: bool = True,
    batch: Any = None,
    generator: torch.Generator | None = None,
    *,
    sources: Sequence[int] | None = None,
    share: float | None = None,
    module: str | None = None,
) -> Edit:
    """Add ``n`` experts to an ``MoE`` layer (appended after the existing ones).

    See the module docstring for the exactness scheme and what it covers.

    Args:
        model_or_moe: an ``MoE``, or a model with one (or name it with ``module=``).
        n: experts to add.
        init: ``"copy"`` (a new expert copies its source's MLP and optimizer state) or
            ``"random"`` (a fresh MLP). Either way the router row copies the source's,
            unless ``preserve=False`` with ``"random"``.
        optimizer: carried along: same parameter objects, per-element state remapped.
        preserve: keep the function (see the module docstring; capacity kept); False makes
            an even split of each source's router mass (not exact).
        batch: inputs (or ``(inputs, targets)``) of ``model_or_moe``: calibrates the shares,
            orders the default sources (most loaded first) and measures ``max_output_change``.
        generator: random source for the default sources (without batch) and fresh weights.
        sources: the expert each new expert comes from (``n`` indices). Default: experts in
            order of load on ``batch`` (else a random order), cycled, so that ``n >= E``
            makes every expert a source.
        share: the part ``eta`` of each source's router mass that its copies take together,
            in (0, 0.5], instead of the default.
        module: name of the MoE layer inside the model (``model.named_modules()``).
    """
    moe, name, index = _find_moe(model_or_moe, module)
    old = moe.num_experts
    _check(n, init, preserve, sources, share, old)
    x = _inputs(batch) if batch is not None else None

    def body() -> tuple[tuple[int, ...], tuple[int, ...]]:
        logits = _router_logits(model_or_moe, moe, x) if x is not None else None
        chosen = list(sources) if sources is not None else _default_sources(old, n, moe.top_k, logits, generator)
        totals = _totals(moe, chosen, logits, preserve, None if share is None else float(share), init)
        # A new expert's router row shadows its source's, except random experts not preserving.
        shadow = init == "copy" or preserve
        lower = shadow and (moe.top_k == 1 or not preserve)  # sources give their copies mass
        scale = None
        if lower and moe.top_k == 1:  # a source gates by what it keeps: its output layer scales back
            scale = torch.ones(old + n, dtype=torch.float64)
            for s, total in totals.items():
                scale[s] = 1.0 / (1.0 - total)
            if init == "copy":  # copies compute what their source computes
                scale[old:] = torch.tensor([1.0 / (1.0 - totals[s]) for s in chosen], dtype=torch.float64)
        if init == "copy":
            imap = IndexMap.append(old, torch.tensor(chosen), scale)
            fresh: dict[int, torch.Tensor] = {}
        else:
            imap = IndexMap.append(old, torch.full((n,), -1), scale)
            fresh = _fresh_experts(moe, chosen, preserve, generator)
        moe.clear_loss_state()  # a loss stashed before the edit is stale after it
        apply_index_map(moe.expert_group(), imap, fresh, optimizer)
        if shadow:
            _shift_router_bias(moe, old, chosen, totals, lower_source=lower)
        if preserve and moe.capacity_factor is not None:
            moe.capacity_factor = moe.capacity_factor * (old + n) / old
        logger.info("grow_experts: %d -> %d experts, sources %s, shares %s", old, old + n, chosen,
                    {s: float(f"{t:.3g}") for s, t in totals.items()})
        return tuple(range(old, old + n)), ()

    group = f"{name}.experts" if name else "experts"
    return run_edit(model_or_moe, optimizer, batch, body, op="grow_experts", layer=index, group=group, init=init)
