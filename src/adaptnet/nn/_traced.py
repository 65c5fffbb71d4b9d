"""The inference paths of EarlyExit, PonderNet, ACT and MoE that ``torch.export``, ``torch.compile``
and ``adaptnet.unit_groups`` trace.

The eager paths compact the batch: rows that have left are written out and dropped, which
gives tensors whose size depends on the data (``torch.where(mask)``, ``.tolist()`` splits).
A traced graph needs shapes known in advance, so here every row stays in the batch and a
mask says which rows are done; work is skipped only when a whole step can be skipped:

* EarlyExit: one ``torch.cond`` per exit, "everybody has left" returns the output, the
  other branch runs the next block (nested, since the blocks differ).
* PonderNet, ACT: a ``while_loop`` over the steps that stops when every row has halted.
* MoE: GShard-style fixed-capacity dispatch: each expert reads a buffer of ``capacity`` rows
  (``N`` when dropless), filled with its tokens in the eager path's order; a ``torch.cond``
  per expert skips the empty ones, and another runs a full expert on the first half of its
  buffer when its tokens fit there (so a dropless expert computes at most twice its rows
  once its share is below one half).

Every row gets the decisions of the eager path, and its outputs up to float rounding
(a matrix product over another number of rows sums in another order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.while_loop import while_loop
from torch._subclasses.fake_tensor import is_fake
from torch.utils import _pytree as pytree

from adaptnet.nn import _exit_rules as rules


def tracing(module: nn.Module, x: torch.Tensor) -> bool:
    """Take the traced path: an eval-mode forward that ``torch.export`` or ``torch.compile`` is
    tracing, or that runs on fake tensors (``adaptnet.unit_groups`` tracing a model that holds
    this module, or any shape propagation), where data-dependent sizes cannot be read.

    ``torch.compiler.is_compiling()`` is True under export and compile (dynamo folds it to a
    constant, and non-strict export sets it). Training mode keeps the eager code under
    ``torch.compile``: its data-dependent sizes become graph breaks, which autograd handles as it
    always does.
    """
    return not module.training and (torch.compiler.is_compiling() or is_fake(x))


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mask shaped to broadcast against ``like`` ``(B, ...)``."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


# -- EarlyExit -----------------------------------------------------------------------------------
def early_exit(blocks: Sequence[nn.Module], heads: Sequence[nn.Module], criterion: str, threshold: float,
               x: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` -> ``(B, C)`` logits, each row from the first exit whose rule fires."""
    n, patience = len(blocks), criterion == "patience"

    def stage(i: int, h: torch.Tensor, out: torch.Tensor | None, decided: torch.Tensor | None,
              prev: torch.Tensor | None, count: torch.Tensor | None) -> torch.Tensor:
        h = blocks[i](h)
        logits = heads[i](h)  # (B, C)
        if i == n - 1:  # the last exit takes every row still going
            return logits if out is None or decided is None else torch.where(_rows(decided, logits), out, logits)
        if patience:
            pred = logits.argmax(dim=1)
            count = rules.streak(pred, prev, count)
            prev, value = pred, count
        else:
            value = rules.score(criterion, logits)
        mask = rules.leaves(criterion, threshold, value)  # (B,)
        if out is None or decided is None:
            out, decided = logits, mask
        else:
            out = torch.where(_rows(mask & ~decided, logits), logits, out)
            decided = decided | mask
        operands = (h, out, decided, *((prev, count) if patience else ()))

        def done(*ops: torch.Tensor) -> torch.Tensor:
            return ops[1].clone()  # a branch may not return its input itself

        def go_on(*ops: torch.Tensor) -> torch.Tensor:
            return stage(i + 1, ops[0], ops[1], ops[2], *(ops[3:] if patience else (None, None)))

        result: torch.Tensor = torch.cond(decided.all(), done, go_on, operands)
        return result

    return stage(0, x, None, None, None, None)


# -- PonderNet and ACT ---------------------------------------------------------------------------
def _sigmoid(halt_logit: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(halt_logit.reshape(halt_logit.shape[0]))  # (B,)


def _loop(max_steps: int, first: tuple[torch.Tensor, ...], state: Any,
          body: Callable[[torch.Tensor, Any, tuple[torch.Tensor, ...]], tuple[Any, tuple[torch.Tensor, ...]]]
          ) -> tuple[torch.Tensor, ...]:
    """Steps 2..max_steps of a halting loop while some row is still going (``first[-1]``: done, (B,)).

    ``body(n, state, carried) -> (state, carried)`` with ``n`` the 0-based step; the recurrent
    state (a tensor or a tuple of them) travels flattened, as ``while_loop`` carries tensors.
    """
    leaves, spec = pytree.tree_flatten(state)
    k = len(leaves)

    def cond_fn(n: torch.Tensor, *carried: torch.Tensor) -> torch.Tensor:
        return (n < max_steps) & ~carried[-1].all()

    def body_fn(n: torch.Tensor, *carried: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, rest = body(n, pytree.tree_unflatten(list(carried[:k]), spec), tuple(carried[k:]))
        return (n + 1, *pytree.tree_flatten(h)[0], *rest)

    step = torch.ones((), dtype=torch.long, device=first[-1].device)
    result = while_loop(cond_fn, body_fn, (step, *leaves, *first))
    return tuple(result[1 + k:])


def ponder(step: nn.Module, max_steps: int, sampled: bool, x: torch.Tensor, h: Any,
           kwargs: dict[str, Any]) -> torch.Tensor:
    """PonderNet inference: ``y`` of the step where each row halts, ``(B, ...)``."""
    h, y, halt = step(x, h, **kwargs)
    if max_steps == 1:
        return y
    lam = _sigmoid(halt)
    survive = 1 - lam  # (B,) prod_{j<=n} (1 - lambda_j)
    done = torch.rand_like(lam) < lam if sampled else survive <= 0.5

    def body(n: torch.Tensor, h: Any, carried: tuple[torch.Tensor, ...]) -> tuple[Any, tuple[torch.Tensor, ...]]:
        out, survive, done = carried
        h, y, halt = step(x, h, **kwargs)
        lam = _sigmoid(halt)
        survive = survive * (1 - lam)
        halts = (torch.rand_like(lam) < lam) if sampled else survive <= 0.5
        now = (halts | (n >= max_steps - 1)) & ~done
        return h, (torch.where(_rows(now, y), y, out), survive, done | now)

    return _loop(max_steps, (y, survive, done), h, body)[0]


def _accumulate(acc: Any, value: Any, weight: torch.Tensor, running: torch.Tensor | None) -> Any:
    """``acc + weight * value`` leaf by leaf, on the ``running`` rows only (all rows when None)."""
    def one(a: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        term = v * _rows(weight, v)
        if a is None:
            return term
        return a + term if running is None else torch.where(_rows(running, v), a + term, a)

    leaves, spec = pytree.tree_flatten(value)
    old = [None] * len(leaves) if acc is None else pytree.tree_flatten(acc)[0]
    return pytree.tree_unflatten([one(a, v) for a, v in zip(old, leaves, strict=True)], spec)


def act(step: nn.Module, max_steps: int, eps: float, x: torch.Tensor, h: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """ACT inference: the halting-weighted mean of each row's outputs, ``(B, ...)``."""
    h, y, halt = step(x, h, **kwargs)
    p = _sigmoid(halt)
    total = torch.zeros_like(p)
    done = p >= 1 - eps if max_steps > 1 else torch.ones_like(p, dtype=torch.bool)
    weight = torch.where(done, 1 - total, p)  # the remainder R on the halting step
    acc_y = _accumulate(None, y, weight, None)
    if max_steps == 1:
        return acc_y
    acc_h = _accumulate(None, h, weight, None)
    leaves, spec = pytree.tree_flatten(acc_h)
    k = len(leaves)

    def body(n: torch.Tensor, h: Any, carried: tuple[torch.Tensor, ...]) -> tuple[Any, tuple[torch.Tensor, ...]]:
        acc_h = pytree.tree_unflatten(list(carried[:k]), spec)
        acc_y, total, done = carried[k:]
        h, y, halt = step(x, h, **kwargs)
        p = _sigmoid(halt)
        running = ~done
        now = ((total + p >= 1 - eps) | (n >= max_steps - 1)) & running
        weight = torch.where(now, 1 - total, p)
        acc_h = _accumulate(acc_h, h, weight, running)
        acc_y = _accumulate(acc_y, y, weight, running)
        total = torch.where(running, total + weight, total)
        return h, (*pytree.tree_flatten(acc_h)[0], acc_y, total, done | now)

    return _loop(max_steps, (*leaves, acc_y, total + weight, done), h, body)[k]


# -- MoE -----------------------------------------------------------------------------------------
def _expert(act: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
            w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    return F.linear(act(F.linear(tokens, w1, b1)), w2, b2)  # (R, D) -> (R, H) -> (R, D)


def _run_expert(chunk: torch.Tensor, used: torch.Tensor, params: tuple[torch.Tensor, ...],
                act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One expert on its buffer ``(C, D)`` whose first ``used`` rows are its tokens: skipped when
    empty, on the first half only when they fit there, else on all ``C`` rows."""
    capacity = chunk.shape[0]
    half = capacity // 2

    def nothing(c: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(c)

    def whole(c: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        return _expert(act, c, *p)

    def first_half(c: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        # rows by index, not c[:half] and a pad: with a capacity that depends on a free batch size,
        # torch.export cannot prove floor(c / 2) <= c, which slicing and padding would guard on
        rows = torch.arange(half, device=c.device)
        return torch.zeros_like(c).index_copy(0, rows, _expert(act, c.index_select(0, rows), *p))

    def some(c: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        if half == 0:
            return whole(c, *p)
        out: torch.Tensor = torch.cond(used <= half, first_half, whole, (c, *p))
        return out

    result: torch.Tensor = torch.cond(used > 0, some, nothing, (chunk, *params))
    return result


def moe(tokens: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor, capacity: int | None,
        experts: tuple[torch.Tensor, ...], act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``(N, D)`` tokens routed to ``top_idx`` ``(N, k)`` with ``gates`` ``(N, k)`` -> ``(N, D)``.

    ``experts``: ``w1`` ``(E, H, D)``, ``b1``, ``w2``, ``b2``. Assignments are numbered
    slot-major (``slot * N + token``) and served in that order within each expert, as in the
    eager path; those beyond ``capacity`` are dropped.
    """
    n, dim = tokens.shape
    num_experts = experts[0].shape[0]
    cap = n if capacity is None else capacity  # an expert takes each token at most once
    expert_of = top_idx.t().reshape(-1)  # (kN,)
    token_of = torch.arange(n, device=tokens.device).repeat(top_idx.shape[1])  # (kN,)
    gate_of = gates.t().reshape(-1)  # (kN,)
    onehot = F.one_hot(expert_of, num_experts)  # (kN, E)
    position = (onehot.cumsum(0) - 1).gather(1, expert_of[:, None]).squeeze(1)  # (kN,) place in its expert
    used = onehot.sum(0).clamp(max=cap)  # (E,) rows of each buffer that hold tokens
    # Buffer slot of each assignment; dropped ones go to one spare slot past the end.
    slot = torch.where(position < cap, expert_of * cap + position, num_experts * cap)
    spare = num_experts * cap + 1
    token_at = torch.full((spare,), n, dtype=torch.long, device=tokens.device).scatter(0, slot, token_of)
    gate_at = gates.new_zeros(spare).scatter(0, slot, gate_of)
    token_at, gate_at = token_at[:-1], gate_at[:-1]  # (E * C,); token n is a row of zeros
    padded = torch.cat([tokens, tokens.new_zeros(1, dim)])  # (N + 1, D)
    buffers = padded.index_select(0, token_at).reshape(num_experts, cap, dim)  # (E, C, D)
    per_expert = [t.unbind(0) for t in experts]
    ys = [_run_expert(buffers[e], used[e], tuple(p[e] for p in per_expert), act) for e in range(num_experts)]
    y = torch.stack(ys).reshape(num_experts * cap, dim) * gate_at[:, None]  # (E * C, D)
    return tokens.new_zeros(n + 1, dim).index_add(0, token_at, y)[:n]
