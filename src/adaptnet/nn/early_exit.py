"""EarlyExit: input-adaptive depth that saves real time on batches, not only FLOPs on paper.

A stack of blocks with a classifier head after each. In training mode every block and head
runs and the loss is a weighted sum over the exits (``task_loss``, used by the Trainer via
``adaptive_loss``). In eval mode the batch is *compacted*: after each head the rows whose
exit rule fires are written to the output and dropped, so the next block runs only on the
rows still undecided. Every sample gets exactly the decision (and, up to float rounding,
the output) it would get alone, but the batch keeps the speed of dense matrix products;
the usual alternative, a loop over single samples, loses far more to per-call overhead
than exiting early saves (``benchmarks/early_exit.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
from torch import nn

from adaptnet.nn import _exit_rules as rules
from adaptnet.nn import _traced
from adaptnet.nn.activations import ACTIVATIONS, make_activation
from adaptnet.nn.flops import count_macs
from adaptnet.nn.losses import KeepsForwardState, LossFn
from adaptnet.nn.registry import register_model
from adaptnet.nn.serialize import module_from_spec, module_spec

logger = logging.getLogger(__name__)

SPEC_FORMAT = 1
CRITERIA = rules.CRITERIA


@dataclass(frozen=True)
class ExitStats:
    """What one eval-mode forward pass of an ``EarlyExit`` did, for its batch of ``B`` rows.

    Attributes:
        exits: ``(B,)`` 0-based index of the head each row left at.
        counts: rows that left at each head (``len(heads)`` entries, summing to ``B``).
        mean_depth: blocks run per row, averaged: **1-based**, from 1 (everyone left at the
            first exit) to ``len(blocks)`` (nobody left early); 0.0 for an empty batch.
        macs: multiply-accumulates spent on the batch (blocks and heads that ran).
        full_macs: those of running every row through every block and every head.
        flops_fraction: ``macs / full_macs`` (1.0 when nobody leaves early).
    """

    exits: torch.Tensor
    counts: list[int]
    mean_depth: float
    macs: int
    full_macs: int
    flops_fraction: float

    def to_dict(self) -> dict[str, Any]:
        """Plain values (``exits`` left out), for logs and JSON."""
        return {"counts": list(self.counts), "mean_depth": self.mean_depth, "macs": self.macs,
                "full_macs": self.full_macs, "flops_fraction": self.flops_fraction}


@register_model
class EarlyExit(KeepsForwardState):
    """Blocks with an exit head after each; eval-mode inference leaves as early as the rule allows.

    Args:
        blocks: ``blocks[i]`` maps the running features ``(B, ...)`` to ``(B, ...)``.
        heads: ``heads[i]`` maps the features after block ``i`` to logits ``(B, C)``; one per
            block, the last one is the final classifier.
        criterion: ``"confidence"`` (max softmax probability ``>= threshold``), ``"entropy"``
            (softmax entropy in nats ``<= threshold``) or ``"patience"`` (the arg-max
            prediction unchanged over ``threshold`` consecutive exits; an integer).
        threshold: of the criterion; None takes 0.9 (confidence), 0.5 nats (entropy) or 2
            (patience). ``calibrate_threshold`` picks one from validation data.
        exit_weights: weight of each exit's loss in ``task_loss``, normalised to sum 1;
            default equal weights (``1 / len(heads)`` each).

    Training mode returns the final logits ``(B, C)`` and keeps every exit's logits for
    ``task_loss``. Eval mode returns ``(B, C)`` logits, each row from the exit it left at,
    and sets ``last_stats`` (an ``ExitStats``). Compaction relies on blocks and heads
    treating rows independently in eval mode (as Linear, Conv, norms with running statistics
    and dropout do): then every row gets the decision, and up to float rounding the output,
    it would get alone. Blocks and heads must be serialisable by
    ``adaptnet.nn.serialize.module_spec`` for ``spec()`` (checkpoints).
    """

    forward_state = ("_exit_logits",)

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        criterion: str = "confidence",
        threshold: float | None = None,
        exit_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if len(blocks) == 0 or len(blocks) != len(heads):
            raise ValueError(f"EarlyExit needs one head per block and at least one block, got {len(blocks)} "
                             f"blocks and {len(heads)} heads")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self._criterion = rules.check_criterion(criterion)
        self._threshold = rules.check_threshold(
            self._criterion, rules.DEFAULT_THRESHOLD[self._criterion] if threshold is None else threshold)
        self.exit_weights = rules.check_weights(exit_weights, len(self.heads))
        self._last: tuple[Any, ...] | ExitStats | None = None  # raw record of the last eval forward, or its stats
        self._exit_logits: list[torch.Tensor] | None = None  # stashed by a training-mode forward
        self._macs: dict[tuple[Any, ...], list[int]] = {}  # (input shape, structure) -> cumulative MACs

    # -- the exit rule -------------------------------------------------------------------------
    @property
    def criterion(self) -> str:
        """The exit rule (change it together with the threshold: ``set_criterion``)."""
        return self._criterion

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = rules.check_threshold(self._criterion, value)

    def set_criterion(self, criterion: str, threshold: float | None = None) -> None:
        """Switch the exit rule (threshold None: the criterion's default)."""
        criterion = rules.check_criterion(criterion)
        value = rules.check_threshold(criterion, rules.DEFAULT_THRESHOLD[criterion] if threshold is None else threshold)
        self._criterion, self._threshold = criterion, value

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, ...)`` -> logits ``(B, C)``: all exits in training, early exits in eval."""
        if self.training:
            logits = self.exit_logits(x)
            self._exit_logits = logits
            return logits[-1]
        self._exit_logits = None
        if _traced.tracing(self, x):  # torch.export / torch.compile: fixed shapes, see adaptnet.nn._traced
            self._last = None
            return _traced.early_exit(list(self.blocks), list(self.heads), self._criterion, self._threshold, x)
        return self._infer(x)

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits for every row, ``len(heads)`` tensors ``(B, C)`` (nobody leaves)."""
        out = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            out.append(head(x))
        return out

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """The plain network: every block, then the final head only. ``(B, ...)`` -> ``(B, C)``."""
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.heads[-1](x)
        return out

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        n, batch = len(self.blocks), x.shape[0]
        criterion, threshold = self._criterion, self._threshold
        out: torch.Tensor | None = None  # (B, C), allocated when some rows of a batch leave and some stay
        active: torch.Tensor | None = None  # (A,) original index of the rows still going; None: all, in order
        left: list[tuple[int, torch.Tensor | None]] = []  # (exit, original rows that left there; None: all)
        prev: torch.Tensor | None = None  # patience: (A,) previous prediction and streak
        count: torch.Tensor | None = None
        h = x
        # zip over the ModuleLists: indexing them (self.blocks[i]) costs microseconds per call
        for i, (block, head) in enumerate(zip(self.blocks, self.heads, strict=True)):
            h = block(h)
            logits = head(h)  # (A, C)
            if i < n - 1:
                if criterion == "patience":
                    pred = logits.argmax(dim=1)
                    count = rules.streak(pred, prev, count)
                    prev, value = pred, count
                else:
                    value = rules.score(criterion, logits)
                mask = rules.leaves(criterion, threshold, value)  # (A,)
                if mask.shape[0] == 1:  # one row (online inference): no indices needed
                    if not bool(mask):
                        continue
                    k = 1
                else:
                    leaving = torch.where(mask)[0]  # (k,) positions among the rows still going
                    k = leaving.numel()
                    if k == 0:
                        continue
                if k < mask.shape[0]:  # some leave: write them out, go on with the others
                    # index_select / index_copy_: several times cheaper than x[idx] on CPU
                    rows = leaving if active is None else active.index_select(0, leaving)
                    if out is None:
                        out = logits.new_empty((batch, *logits.shape[1:]))
                    out.index_copy_(0, rows, logits.index_select(0, leaving))
                    left.append((i, rows))
                    staying = torch.where(~mask)[0]
                    h = h.index_select(0, staying)
                    active = staying if active is None else active.index_select(0, staying)
                    if prev is not None and count is not None:
                        prev, count = prev.index_select(0, staying), count.index_select(0, staying)
                    continue
            # Every row still going leaves here (all of them fired, or this is the last exit).
            left.append((i, active))
            if out is None:  # nobody left before: no row was dropped, the logits are the output
                out = logits
            else:
                assert active is not None
                out.index_copy_(0, active, logits)
            break
        assert out is not None
        # Kept raw: the statistics are worked out only if someone reads ``last_stats``.
        self._last = (tuple(x.shape), x.dtype, x.device, left)
        return out

    # -- statistics ----------------------------------------------------------------------------
    @property
    def last_stats(self) -> ExitStats | None:
        """``ExitStats`` of the last eval-mode forward pass (None before the first one)."""
        if isinstance(self._last, tuple):
            shape, dtype, device, left = self._last
            exits = torch.empty(shape[0], dtype=torch.long, device=device)
            counts = [0] * self.num_exits
            for i, rows in left:
                if rows is None:
                    exits.fill_(i)
                else:
                    exits[rows] = i
                counts[i] = shape[0] if rows is None else rows.numel()
            self._last = self._stats(torch.zeros((min(shape[0], 1), *shape[1:]), dtype=dtype, device=device),
                                     shape[0], exits, counts)
        return self._last

    def exit_macs(self, x: torch.Tensor) -> list[int]:
        """Per-sample MACs of leaving at each exit (cumulative: blocks and heads ``0..i``).

        Measured with ``count_macs`` on one row of ``x`` ``(B, ...)`` (only its shape matters)
        the first time an input shape (or a changed architecture) is seen, then cached.
        """
        key = (tuple(x.shape[1:]), tuple(tuple(p.shape) for p in self.parameters()))
        cached = self._macs.get(key)
        if cached is None:
            stages = []
            h = x[:1]
            with torch.no_grad():
                for block, head in zip(self.blocks, self.heads, strict=True):
                    cost = count_macs(block, h)
                    h = block(h)
                    stages.append(cost + count_macs(head, h))
            cached = self._macs[key] = list(accumulate(stages))
        return cached

    def _stats(self, x: torch.Tensor, batch: int, exits: torch.Tensor, counts: list[int]) -> ExitStats:
        if batch == 0:
            return ExitStats(exits, counts, 0.0, 0, 0, 0.0)
        cumulative = self.exit_macs(x)
        macs = sum(c * m for c, m in zip(counts, cumulative, strict=True))
        full = batch * cumulative[-1]
        depth = sum((i + 1) * c for i, c in enumerate(counts)) / batch
        return ExitStats(exits, counts, depth, macs, full, macs / full if full else 1.0)

    # -- training loss -------------------------------------------------------------------------
    def task_loss(self, loss_fn: LossFn, targets: torch.Tensor) -> torch.Tensor:
        """``sum_i exit_weights[i] * loss_fn(logits_i, targets)`` over the exits of the last
        training-mode forward pass (the Trainer calls it through ``adaptive_loss``)."""
        if self._exit_logits is None:
            raise RuntimeError("EarlyExit.task_loss needs the exits of a forward pass in training mode; "
                               "call model.train() and model(x) first")
        terms = [w * loss_fn(z, targets) for w, z in zip(self.exit_weights, self._exit_logits, strict=True) if w]
        return torch.stack(terms).sum()

    # -- spec ----------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description (blocks and heads via ``module_spec``)."""
        return {"type": type(self).__name__, "format": SPEC_FORMAT,
                "blocks": [module_spec(b) for b in self.blocks], "heads": [module_spec(h) for h in self.heads],
                "criterion": self._criterion, "threshold": self._threshold,
                "exit_weights": list(self.exit_weights)}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> EarlyExit:
        """Build a freshly initialised model with the architecture and exit rule of ``spec``."""
        if spec.get("type") != cls.__name__:
            raise ValueError(f"spec is for {spec.get('type')!r}, not {cls.__name__}")
        if spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"spec format {spec.get('format')!r} is not supported (expected {SPEC_FORMAT})")
        for key in ("blocks", "heads"):
            if not isinstance(spec.get(key), list):
                raise ValueError(f"spec[{key!r}] must be a list of module specs")
        return cls([module_from_spec(s) for s in spec["blocks"]], [module_from_spec(s) for s in spec["heads"]],
                   criterion=spec.get("criterion", "confidence"), threshold=spec.get("threshold"),
                   exit_weights=spec.get("exit_weights"))

    @classmethod
    def mlp(
        cls,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        activation: str = "relu",
        **kwargs: Any,
    ) -> EarlyExit:
        """An MLP with an exit after every hidden layer: block ``i`` is ``Linear`` + activation
        (``(B, in) -> (B, hidden[i])``), head ``i`` is ``Linear(hidden[i], num_classes)``.
        ``kwargs`` go to ``EarlyExit`` (criterion, threshold, exit_weights)."""
        hidden = list(hidden)
        named = {"in_features": in_features, "num_classes": num_classes, **{f"hidden[{i}]": w for i, w in
                                                                            enumerate(hidden)}}
        for name, value in named.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not hidden:
            raise ValueError("hidden must list at least one width (one block per exit)")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        blocks = [nn.Sequential(nn.Linear(a, b), make_activation(activation))
                  for a, b in zip([in_features, *hidden[:-1]], hidden, strict=True)]
        heads = [nn.Linear(w, num_classes) for w in hidden]
        return cls(blocks, heads, **kwargs)


def calibrate_threshold(
    model: EarlyExit,
    x: torch.Tensor,
    y: torch.Tensor,
    max_accuracy_drop: float = 0.01,
    candidates: Sequence[float] | None = None,
    *,
    batch_size: int = 1024,
) -> tuple[float, dict[str, Any]]:
    """The cheapest threshold whose accuracy is within ``max_accuracy_drop`` of the final exit's.

    Every exit's logits are computed once on ``x`` (eval mode, no gradients); each candidate is
    then simulated with the same rule the compacted forward applies. The threshold that never
    lets a sample leave early is always tried too, so an answer always exists. The model is
    not changed: set ``model.threshold = threshold`` to use it.

    Args:
        model: an ``EarlyExit``; its ``criterion`` is the one calibrated.
        x: ``(N, ...)`` validation inputs. y: ``(N,)`` class indices.
        max_accuracy_drop: allowed accuracy loss (a fraction, 0.01 = one point) relative to
            the final exit's accuracy on ``(x, y)``.
        candidates: thresholds to try; default a grid for the criterion (confidence 0..1,
            entropy 0..log(C) on a log scale, patience 0..len(heads)-1).
        batch_size: rows per forward pass while computing the logits.

    Returns:
        ``(threshold, report)``; the report holds the criterion, the final exit's accuracy,
        the chosen row (``accuracy``, ``mean_depth`` 1-based, ``flops_fraction``,
        ``exit_counts``) and ``candidates``, one such row per threshold tried.
    """
    if not isinstance(model, EarlyExit):
        raise TypeError(f"calibrate_threshold needs an EarlyExit, got {type(model).__name__}")
    if x.shape[0] == 0 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, ...) with N > 0 and y (N,) class indices; got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not 0 <= max_accuracy_drop <= 1:
        raise ValueError(f"max_accuracy_drop must be in [0, 1], got {max_accuracy_drop!r}")
    criterion, n = model.criterion, model.num_exits
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [model.exit_logits(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(training)
    logits = [torch.cat([p[k] for p in parts]) for k in range(n)]  # n x (N, C)
    cumulative = torch.tensor(model.exit_macs(x), dtype=torch.float64)
    correct = torch.stack([z.argmax(dim=1) == y.to(z.device) for z in logits]).cpu()  # (n, N)
    scores = rules.all_scores(criterion, logits).cpu()  # (n, N)
    final_accuracy = float(correct[-1].double().mean())
    if candidates is None:
        candidates = rules.default_candidates(criterion, n, logits[-1].shape[1])
    tried = sorted({rules.check_threshold(criterion, t) for t in candidates} | {rules.never(criterion, n)})
    rows: list[dict[str, Any]] = []
    for t in tried:
        first = rules.first_exit(criterion, t, scores)  # (N,)
        rows.append({
            "threshold": t,
            "accuracy": float(correct.gather(0, first[None]).double().mean()),
            "mean_depth": float((first + 1).double().mean()),
            "flops_fraction": float(cumulative[first].sum() / (first.numel() * cumulative[-1])),
            "exit_counts": torch.bincount(first, minlength=n).tolist(),
        })
    allowed = [r for r in rows if r["accuracy"] >= final_accuracy - max_accuracy_drop - 1e-12]
    best = min(allowed, key=lambda r: (r["flops_fraction"], -r["accuracy"]))
    logger.info("calibrated %s threshold %s: accuracy %.4f (final exit %.4f), FLOPs fraction %.3f", criterion,
                best["threshold"], best["accuracy"], final_accuracy, best["flops_fraction"])
    report = {"criterion": criterion, "max_accuracy_drop": max_accuracy_drop, "final_accuracy": final_accuracy,
              **best, "candidates": rows}
    return best["threshold"], report
