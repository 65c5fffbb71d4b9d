"""Variable-length sequences with halting modules.

Sequences are given padded, ``(B, T, F)``, with their ``lengths`` ``(B,)``; ``pad_sequences``
builds both from a list. Two ways to halt:

* per sequence: the halting module's ``step`` reads the whole sequence each ponder step; pass
  ``lengths=`` to the halting module and it reaches the step, compacted with the batch;
* per token: ``PerToken(halting)`` runs the halting module at every time step on the tokens
  that exist (padding never computes), carrying each sequence's recurrent state from token to
  token (the state at the halting step; in training the halting-weighted mean state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from adaptnet.nn.halting import ACT, PonderNet, take
from adaptnet.nn.losses import per_sample_loss
from adaptnet.nn.registry import register_model
from adaptnet.nn.serialize import module_from_spec, module_spec


def pad_sequences(sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, F)`` zero-padded batch and ``(B,)`` lengths from tensors of shape ``(T_i, F)``."""
    if not sequences or any(s.dim() != 2 or s.shape[0] < 1 for s in sequences):
        raise ValueError("pad_sequences needs a non-empty list of (length >= 1, features) tensors")
    lengths = torch.tensor([s.shape[0] for s in sequences])
    return nn.utils.rnn.pad_sequence(list(sequences), batch_first=True), lengths


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """``(B, T)`` boolean mask, True on real tokens."""
    steps = torch.arange(max_len if max_len is not None else int(lengths.max()), device=lengths.device)
    return steps[None, :] < lengths[:, None]


def _put(state: Any, rows: torch.Tensor, new: Any) -> Any:
    """``state`` with ``state[rows] = new`` for tensors or tuples (out of place)."""
    if isinstance(new, torch.Tensor):
        return new if state is None and rows.numel() == new.shape[0] else state.index_copy(0, rows, new)
    if isinstance(new, (tuple, list)):
        return type(new)(_put(None if state is None else s, rows, n) for s, n in
                         zip(state if state is not None else [None] * len(new), new, strict=True))
    return state


@register_model
class PerToken(nn.Module):
    """Per-token halting over padded sequences: every real token ponders as long as it needs.

    ``forward(x, lengths)`` with ``x`` ``(B, T, F)`` returns ``(B, T, ...)`` per-token outputs
    (zeros on padding) for ``output="all"``, or each sequence's last real token's output
    ``(B, ...)`` for ``output="last"``. Losses: ``task_loss`` (PonderNet: the expected loss on
    the tokens that are scored, with ``targets`` ``(B, T, ...)`` or ``(B, ...)`` to match
    ``output``) and ``aux_loss`` (the inner module's regulariser, averaged over real tokens).

    Args:
        halting: a ``PonderNet`` or ``ACT`` whose step takes one token ``(B, F)``.
        output: ``"all"`` or ``"last"``.
    """

    def __init__(self, halting: PonderNet | ACT, output: str = "last"):
        super().__init__()
        if not isinstance(halting, (PonderNet, ACT)):
            raise TypeError("PerToken wraps a PonderNet or an ACT")
        if output not in ("all", "last"):
            raise ValueError(f"output must be 'all' or 'last', got {output!r}")
        self.halting, self.output = halting, output
        self._scored: list[tuple[torch.Tensor, int, Any]] = []  # (rows, t, PonderNet stash) per token
        self._aux: list[torch.Tensor] = []
        self.last_steps: torch.Tensor | None = None  # (B, T) ponder steps per token, 0 on padding
        self._last_output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[:2]
        lengths = lengths.to(x.device)
        state: Any = None
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        steps = torch.zeros(batch, length, dtype=torch.long, device=x.device)
        self._scored, self._aux = [], []
        for t in range(length):
            rows = (lengths > t).nonzero().flatten()
            if rows.numel() == 0:
                break
            h = take(state, rows) if state is not None else None
            y = self.halting(x[rows, t], h)
            state = _put(state, rows, self.halting.final_state)
            assert self.halting.last_steps is not None
            steps[rows, t] = self.halting.last_steps
            outputs.append((rows, y))
            if self.training:
                self._record(rows, t, lengths)
        self.last_steps = steps
        # This module now owns the losses: the inner module must not add its last token's again.
        self.halting.clear_loss_state()
        self._last_output = self._assemble(outputs, lengths, batch, length)
        return self._last_output

    def _record(self, rows: torch.Tensor, t: int, lengths: torch.Tensor) -> None:
        inner = self.halting
        aux = inner.aux_loss()
        if aux is not None:  # inner aux is a batch mean: weight it by the tokens it covers
            self._aux.append(aux * rows.numel())
        if isinstance(inner, PonderNet) and inner._stash is not None:
            scored = rows if self.output == "all" else rows[lengths[rows] == t + 1]
            if scored.numel():
                keep = torch.isin(rows, scored).nonzero().flatten()
                ys, p = inner._stash
                self._scored.append((scored, t, ([y[keep] for y in ys], p[keep])))

    def _assemble(self, outputs: list[tuple[torch.Tensor, torch.Tensor]], lengths: torch.Tensor, batch: int,
                  length: int) -> torch.Tensor:
        sample = outputs[0][1]
        if self.output == "all":
            out = sample.new_zeros((batch, length, *sample.shape[1:]))
            for t, (rows, y) in enumerate(outputs):
                out = out.index_put((rows, torch.full_like(rows, t)), y)
            return out
        last = sample.new_zeros((batch, *sample.shape[1:]))
        for t, (rows, y) in enumerate(outputs):
            ending = (lengths[rows] == t + 1).nonzero().flatten()
            last = last.index_copy(0, rows[ending], y[ending])
        return last

    def task_loss(self, loss_fn: Callable[..., torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """PonderNet: expected loss on the scored tokens; ACT: the plain loss on the outputs."""
        if not isinstance(self.halting, PonderNet):
            assert self._last_output is not None, "task_loss needs a forward pass first"
            return loss_fn(self._last_output, targets)
        if not self._scored:
            raise RuntimeError("task_loss needs a forward pass in training mode first")
        total, count = None, 0
        for rows, t, (ys, p) in self._scored:
            target = targets[rows, t] if self.output == "all" else targets[rows]
            losses = torch.stack([per_sample_loss(loss_fn, y, target) for y in ys], dim=1)  # (b, N)
            term = (p * losses).sum()
            total = term if total is None else total + term
            count += rows.numel()
        assert total is not None
        return total / count

    def aux_loss(self) -> torch.Tensor | None:
        if not self.training or not self._aux or self.last_steps is None:
            return None
        return torch.stack(self._aux).sum() / (self.last_steps > 0).sum()

    def spec(self) -> dict[str, Any]:
        return {"type": "PerToken", "halting": module_spec(self.halting), "output": self.output}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> PerToken:
        halting = module_from_spec(spec["halting"])
        assert isinstance(halting, (PonderNet, ACT))
        return cls(halting, spec["output"])
