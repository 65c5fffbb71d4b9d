"""Recurrent halting: PonderNet (Banino et al., 2021) and ACT (Graves, 2016).

Both repeat a ``step`` module until each sample decides to halt:
``step(x, h, **kwargs) -> (h, y, halt_logit)`` with ``h=None`` at the first step, ``y`` the
prediction after this step ``(B, ...)`` and ``halt_logit`` ``(B,)`` or ``(B, 1)``. Extra
keyword tensors whose first dimension is the batch (for example the ``lengths`` of padded
sequences) are passed to every step.

Samples stop computing when they halt (active-set compaction: halted rows are written to
the output and dropped from the batch), so a batch costs what its samples need, not what
its slowest sample needs. The per-sample decisions are those of running each sample alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adaptnet.nn import _traced
from adaptnet.nn.losses import KeepsForwardState, per_sample_loss
from adaptnet.nn.registry import register_model
from adaptnet.nn.serialize import module_from_spec, module_spec

LossFn = Callable[..., torch.Tensor]
State = Any  # a tensor, a tuple of tensors, or None


def take(value: Any, rows: torch.Tensor) -> Any:
    """``value`` restricted to ``rows`` along the batch dimension (tensors, tuples, dicts, None)."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows)
    if isinstance(value, (tuple, list)):
        return type(value)(take(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: take(v, rows) for k, v in value.items()}
    return value


class _Halted:
    """What the rows that halted leave behind, collected step by step and put back in batch order
    once at the end (one copy per tensor, not one full-batch write per step)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []  # original batch indices of the rows that halted, per step
        self.values: list[tuple[Any, ...]] = []  # their outputs (and states, costs), per step
        self.counts: list[int] = []
        self.steps: list[int] = []

    def add(self, rows: torch.Tensor, count: int, step: int, *values: Any) -> None:
        self.rows.append(rows)
        self.values.append(values)
        self.counts.append(count)
        self.steps.append(step)

    def assemble(self, batch: int) -> tuple[torch.Tensor, list[Any]]:
        """``(B,)`` steps per sample, and each collected value in batch order."""
        rows = self.rows[0] if len(self.rows) == 1 else torch.cat(self.rows)
        order = None  # one piece: every row halted at the same step, before any compaction, in batch order
        if len(self.rows) > 1:  # order[i]: where row i's values are in the concatenation
            order = torch.empty_like(rows).index_copy_(0, rows, torch.arange(batch, device=rows.device))
        steps = torch.repeat_interleave(torch.tensor(self.steps, device=rows.device),
                                        torch.tensor(self.counts, device=rows.device))
        values = [_reorder([v[i] for v in self.values], order) for i in range(len(self.values[0]))]
        return steps if order is None else steps.index_select(0, order), values


def _reorder(parts: list[Any], order: torch.Tensor | None) -> Any:
    """Concatenate per-step pieces (tensors, tuples of tensors or None) and put rows in batch order."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], torch.Tensor):
        joined = parts[0] if len(parts) == 1 else torch.cat(parts)
        return joined if order is None else joined.index_select(0, order)
    return type(parts[0])(_reorder([p[i] for p in parts], order) for i in range(len(parts[0])))


def _split(done: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``count`` halted rows and of the rest, each in increasing order."""
    order = torch.argsort(done.to(torch.uint8), descending=True, stable=True)  # halted first
    return order[:count], order[count:]


def _halting(halt_logit: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(halt_logit.reshape(halt_logit.shape[0]))


class _Halting(KeepsForwardState):
    """What PonderNet and ACT share: the step, its limits, statistics and spec."""

    # PonderNet's outputs and halting probabilities, ACT's ponder cost, the expected final state
    forward_state = ("_stash", "_ponder", "final_state")

    def __init__(self, step: nn.Module, max_steps: int):
        super().__init__()
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        self.step, self.max_steps = step, max_steps
        self.last_steps: torch.Tensor | None = None  # (B,) steps each sample took in the last forward
        self.final_state: State = None  # each sample's recurrent state when it halted

    def clear_loss_state(self) -> None:
        """Forget what the last forward stashed for the losses (a wrapper has taken it over)."""

    @property
    def last_stats(self) -> dict[str, float]:
        steps = self.last_steps
        if steps is None:
            return {}
        return {"mean_steps": float(steps.float().mean()), "max_steps": int(steps.max()),
                "steps_fraction": float(steps.float().mean()) / self.max_steps}


@register_model
class PonderNet(_Halting):
    """PonderNet: learn a per-sample number of computation steps.

    Training runs all ``max_steps`` steps (the loss is an expectation over the halting
    distribution): ``task_loss`` is ``sum_n p_n * loss(y_n, target)`` and ``aux_loss`` is
    ``beta * KL(p || truncated geometric(lambda_p))``; ``p_n = lambda_n * prod_{j<n}(1 - lambda_j)``
    with ``lambda_N = 1`` at the last step. The training forward returns ``sum_n p_n y_n``.

    Inference halts each sample at the first step where its cumulative halting probability
    reaches 0.5 (``mode="deterministic"``, the median of its halting distribution) or with
    probability ``lambda_n`` at step ``n`` (``mode="sampled"``), and returns ``y`` at that step.

    Args:
        step: ``step(x, h, **kwargs) -> (h, y, halt_logit)``.
        max_steps: the most steps any sample takes.
        lambda_p: the prior's halting probability per step (expected steps ``1 / lambda_p``).
        beta: weight of the KL regulariser.
        mode: ``"deterministic"`` or ``"sampled"`` halting at inference.
    """

    def __init__(self, step: nn.Module, max_steps: int = 20, lambda_p: float = 0.2, beta: float = 0.01,
                 mode: str = "deterministic"):
        super().__init__(step, max_steps)
        if not 0 < lambda_p <= 1:
            raise ValueError(f"lambda_p must be in (0, 1], got {lambda_p!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        if mode not in ("deterministic", "sampled"):
            raise ValueError(f"mode must be 'deterministic' or 'sampled', got {mode!r}")
        self.lambda_p, self.beta, self.mode = float(lambda_p), float(beta), mode
        self._stash: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def prior(self, like: torch.Tensor) -> torch.Tensor:
        """``(max_steps,)`` geometric(lambda_p) probabilities truncated at ``max_steps`` and renormalised."""
        n = torch.arange(self.max_steps, dtype=like.dtype, device=like.device)
        p = self.lambda_p * (1 - self.lambda_p) ** n
        return p / p.sum()

    def forward(self, x: torch.Tensor, h: State = None, **kwargs: Any) -> torch.Tensor:
        if self.training:
            return self._unrolled(x, h, kwargs)
        if _traced.tracing(self, x):  # torch.export / torch.compile: fixed shapes, see adaptnet.nn._traced
            self._stash, self.last_steps, self.final_state = None, None, None
            return _traced.ponder(self.step, self.max_steps, self.mode == "sampled", x, h, kwargs)
        return self._halted(x, h, kwargs)

    def _unrolled(self, x: torch.Tensor, h: State, kwargs: dict[str, Any]) -> torch.Tensor:
        ys, probs, states = [], [], []
        survive = x.new_ones(x.shape[0])  # prod_{j<n} (1 - lambda_j), (B,)
        for n in range(self.max_steps):
            h, y, halt = self.step(x, h, **kwargs)
            lam = _halting(halt) if n < self.max_steps - 1 else torch.ones_like(survive)
            probs.append(survive * lam)
            survive = survive * (1 - lam)
            ys.append(y)
            states.append(h)
        p = torch.stack(probs, dim=1)  # (B, N)
        self._stash = (ys, p)
        self.last_steps = torch.full((x.shape[0],), self.max_steps, device=x.device)
        self.final_state = _expected(states, p)
        return _expected(ys, p)

    def _halted(self, x: torch.Tensor, h: State, kwargs: dict[str, Any]) -> torch.Tensor:
        batch = x.shape[0]
        rows = torch.arange(batch, device=x.device)  # original indices of the active rows
        survive = x.new_ones(batch)
        halted = _Halted()
        for n in range(self.max_steps):
            h, y, halt = self.step(x, h, **kwargs)
            lam = _halting(halt)
            active = lam.shape[0]
            if n == self.max_steps - 1:
                done, count = None, active
            else:
                if self.mode == "deterministic":
                    survive = survive * (1 - lam)
                    done = survive <= 0.5  # cumulative halting probability has reached 0.5
                else:
                    done = torch.rand_like(lam) < lam
                count = int(done.sum())  # the one host sync of a step
            if count == 0:
                continue  # nobody halted: the batch stays as it is
            if count == active:  # everybody left: no indexing at all
                halted.add(rows, count, n + 1, y, h)
                break
            assert done is not None
            idx, keep = _split(done, count)
            halted.add(rows[idx], count, n + 1, y[idx], take(h, idx))
            rows, x, h, survive = rows[keep], x[keep], take(h, keep), survive[keep]
            kwargs = take(kwargs, keep)
        steps, (out, final) = halted.assemble(batch)
        self._stash, self.last_steps, self.final_state = None, steps, final
        return out

    def clear_loss_state(self) -> None:
        self._stash = None

    def task_loss(self, loss_fn: LossFn, targets: torch.Tensor) -> torch.Tensor:
        """Expected loss over the halting distribution of the last training forward."""
        if self._stash is None:
            raise RuntimeError("task_loss needs a forward pass in training mode first")
        ys, p = self._stash
        losses = torch.stack([per_sample_loss(loss_fn, y, targets) for y in ys], dim=1)  # (B, N)
        return (p * losses).sum(dim=1).mean()

    def aux_loss(self) -> torch.Tensor | None:
        """``beta * KL(p || prior)``, averaged over the batch (None outside training)."""
        if self._stash is None or self.beta == 0:
            return None
        p = self._stash[1]
        prior = self.prior(p)
        kl = (p * (p.clamp_min(1e-12).log() - prior.log())).sum(dim=1)
        return self.beta * kl.mean()

    def spec(self) -> dict[str, Any]:
        return {"type": "PonderNet", "step": module_spec(self.step), "max_steps": self.max_steps,
                "lambda_p": self.lambda_p, "beta": self.beta, "mode": self.mode}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> PonderNet:
        return cls(module_from_spec(spec["step"]), spec["max_steps"], spec["lambda_p"], spec["beta"], spec["mode"])


@register_model
class ACT(_Halting):
    """Adaptive Computation Time: a sample stops once its halting units sum to ``1 - eps``.

    The output is the halting-weighted mean ``sum_{n<N} h_n y_n + R y_N`` with remainder
    ``R = 1 - sum_{n<N} h_n``; ``aux_loss`` is the ponder cost ``tau * mean(N + R)``. Training
    and inference use the same per-sample halting, with active-set compaction in both.

    Args:
        step: ``step(x, h, **kwargs) -> (h, y, halt_logit)``.
        max_steps: the most steps any sample takes.
        tau: weight of the ponder cost.
        eps: halting threshold slack (Graves: 0.01), so one step can suffice.
    """

    def __init__(self, step: nn.Module, max_steps: int = 20, tau: float = 0.01, eps: float = 0.01):
        super().__init__(step, max_steps)
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau!r}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps!r}")
        self.tau, self.eps = float(tau), float(eps)
        self._ponder: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, h: State = None, **kwargs: Any) -> torch.Tensor:
        if _traced.tracing(self, x):  # torch.export / torch.compile: fixed shapes, see adaptnet.nn._traced
            self._ponder, self.last_steps, self.final_state = None, None, None
            return _traced.act(self.step, self.max_steps, self.eps, x, h, kwargs)
        batch = x.shape[0]
        rows = torch.arange(batch, device=x.device)  # original indices of the active rows
        total = x.new_zeros(batch)  # sum of halting probabilities so far, (B,) of the active rows
        acc_y: torch.Tensor | None = None  # running weighted outputs of the active rows
        acc_h: State = None
        halted = _Halted()
        for n in range(self.max_steps):
            h, y, halt = self.step(x, h, **kwargs)
            p = _halting(halt)
            active = p.shape[0]
            if n == self.max_steps - 1:
                done, count = torch.ones_like(p, dtype=torch.bool), active
            else:
                done = total + p >= 1 - self.eps
                count = int(done.sum())  # the one host sync of a step
            weight = p if count == 0 else torch.where(done, 1 - total, p)  # the remainder R on the halting step
            acc_y = _add(acc_y, y, weight)
            acc_h = _add_state(acc_h, h, weight)
            if count == 0:
                total = total + weight
                continue
            # ponder cost N + R: N is a count (no gradient), R carries the gradient
            if count == active:
                halted.add(rows, count, n + 1, acc_y, acc_h, (n + 1) + weight)
                break
            total = total + weight
            idx, keep = _split(done, count)
            halted.add(rows[idx], count, n + 1, acc_y[idx], take(acc_h, idx), (n + 1) + weight[idx])
            rows, x, h, total = rows[keep], x[keep], take(h, keep), total[keep]
            acc_y, acc_h, kwargs = acc_y[keep], take(acc_h, keep), take(kwargs, keep)
        steps, (out, final, ponder) = halted.assemble(batch)
        self._ponder = ponder if self.training else None
        self.last_steps, self.final_state = steps, final
        return out

    def clear_loss_state(self) -> None:
        self._ponder = None

    def aux_loss(self) -> torch.Tensor | None:
        """``tau * mean ponder cost`` of the last training forward (None outside training)."""
        if self._ponder is None or self.tau == 0:
            return None
        return self.tau * self._ponder.mean()

    def spec(self) -> dict[str, Any]:
        return {"type": "ACT", "step": module_spec(self.step), "max_steps": self.max_steps, "tau": self.tau,
                "eps": self.eps}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ACT:
        return cls(module_from_spec(spec["step"]), spec["max_steps"], spec["tau"], spec["eps"])


@register_model
class RecurrentStep(nn.Module):
    """A ready-made halting step: a recurrent cell, an output head and a halting head.

    ``step(x, h) -> (h, y, halt_logit)`` with ``x`` ``(B, input_size)``, ``h`` ``(B, hidden_size)``
    (zeros when None), ``y`` ``(B, output_size)``, ``halt_logit`` ``(B,)``.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, cell: str = "gru"):
        super().__init__()
        if cell not in ("gru", "rnn"):
            raise ValueError(f"cell must be 'gru' or 'rnn', got {cell!r}")
        self.cell_type = cell
        self.cell: nn.Module = nn.GRUCell(input_size, hidden_size) if cell == "gru" else nn.RNNCell(
            input_size, hidden_size)
        self.output = nn.Linear(hidden_size, output_size)
        self.halt = nn.Linear(hidden_size, 1)
        self.sizes = (input_size, hidden_size, output_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.cell(x, h)
        return h, self.output(h), self.halt(h).squeeze(1)

    def spec(self) -> dict[str, Any]:
        return {"type": "RecurrentStep", "input_size": self.sizes[0], "hidden_size": self.sizes[1],
                "output_size": self.sizes[2], "cell": self.cell_type}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> RecurrentStep:
        return cls(spec["input_size"], spec["hidden_size"], spec["output_size"], spec["cell"])


def _weighted(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return value * weight.reshape(-1, *([1] * (value.dim() - 1)))


def _add(acc: torch.Tensor | None, value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    term = _weighted(value, weight)
    return term if acc is None else acc + term


def _add_state(acc: State, h: State, weight: torch.Tensor) -> State:
    if isinstance(h, torch.Tensor):
        return _add(acc, h, weight)
    if isinstance(h, (tuple, list)):
        return type(h)(_add_state(None if acc is None else a, v, weight) for a, v in
                       zip(acc if acc is not None else [None] * len(h), h, strict=True))
    return None


def _expected(values: list[Any], p: torch.Tensor) -> Any:
    """``sum_n p[:, n] * values[n]`` for tensors or tuples of tensors."""
    acc: State = None
    for n, value in enumerate(values):
        acc = _add_state(acc, value, p[:, n])
    return acc
