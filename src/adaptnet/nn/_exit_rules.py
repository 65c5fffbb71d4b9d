"""Exit rules of ``EarlyExit``: when a sample may leave at an exit.

One scoring function serves both the compacted inference pass and the calibration's
simulation, so that both take exactly the same decisions from the same logits.

* ``confidence``: leave when the largest softmax probability is ``>= threshold``. Any
  threshold above 1 (``NEVER["confidence"]`` = 2.0) keeps every sample to the last exit.
* ``entropy``: leave when the entropy of the softmax, in nats, is ``<= threshold`` (0 means
  certain, ``log(C)`` uniform). A negative threshold keeps every sample to the last exit.
* ``patience`` (PABEE, Zhou et al., 2020): leave when the arg-max prediction has been the
  same at ``threshold`` consecutive exits after the one where it first appeared, i.e. when
  the last ``threshold + 1`` exits agree. The threshold is an integer >= 0: 0 leaves at the
  first exit, ``len(heads) - 1`` or more keeps every sample to the last exit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CRITERIA = ("confidence", "entropy", "patience")
DEFAULT_THRESHOLD: dict[str, float] = {"confidence": 0.9, "entropy": 0.5, "patience": 2}
# A threshold that lets nobody leave early (patience: ``len(heads) - 1``, see ``never``).
NEVER: dict[str, float] = {"confidence": 2.0, "entropy": -1.0}


def check_criterion(criterion: object) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(map(repr, CRITERIA))}, got {criterion!r}")
    return str(criterion)


def check_threshold(criterion: str, threshold: object) -> float:
    """The threshold as a number (an ``int`` for patience), or ``ValueError`` saying what is allowed."""
    if criterion == "patience":
        if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold >= 0 \
                and float(threshold).is_integer():
            return int(threshold)
        raise ValueError(f"the patience threshold must be an integer >= 0 (consecutive exits that agree), "
                         f"got {threshold!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"the {criterion} threshold must be a finite number, got {threshold!r}")
    return float(threshold)


def never(criterion: str, n_exits: int) -> float:
    """A threshold with which every sample runs to the last exit."""
    return n_exits - 1 if criterion == "patience" else NEVER[criterion]


def check_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """Exit loss weights normalised to sum 1 (default: ``1 / n`` each)."""
    if weights is None:
        return tuple(1.0 / n for _ in range(n))
    values = list(weights)
    if len(values) != n:
        raise ValueError(f"exit_weights needs one weight per exit ({n}), got {len(values)}")
    for i, w in enumerate(values):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"exit_weights[{i}] must be a finite number >= 0, got {w!r}")
    total = float(sum(values))
    if total <= 0:
        raise ValueError("exit_weights must not all be 0")
    return tuple(float(w) / total for w in values)


def score(criterion: str, logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` statistic of ``logits`` ``(B, C)`` that ``leaves`` compares (not for patience).

    Confidence: ``sum_j exp(z_j - max z)``, the inverse of the largest softmax probability
    (one operation fewer than the probability itself). Entropy: in nats. Written out from
    ``exp`` and row sums rather than ``torch.softmax``: on CPU, softmax over a short last
    dimension (4-10 classes) costs 4-6x more on a batch of 1024 (torch 2.13), and every
    operation here runs at every exit.
    """
    shifted = logits - logits.amax(dim=1, keepdim=True)  # (B, C), max 0
    e = shifted.exp()
    total = e.sum(dim=1)  # (B,) in [1, C]
    if criterion == "confidence":
        return total
    # H = -sum p log p with p = e / total, log p = shifted - log(total)
    return total.log() - (e * shifted).sum(dim=1) / total


def leaves(criterion: str, threshold: float, value: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the samples that leave, from ``score`` (or the patience streak)."""
    if criterion == "entropy":
        return value <= threshold
    if criterion == "confidence":  # max p >= t  <=>  1 / max p <= 1 / t
        return value <= (1.0 / threshold if threshold > 0 else math.inf)
    return value >= threshold  # patience


def streak(pred: torch.Tensor, prev: torch.Tensor | None, count: torch.Tensor | None) -> torch.Tensor:
    """Consecutive exits whose prediction equalled the previous exit's, up to this one."""
    if prev is None or count is None:
        return torch.zeros_like(pred)
    return torch.where(pred == prev, count + 1, torch.zeros_like(count))


def all_scores(criterion: str, logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n_exits, N)``: the value ``leaves`` compares, at every exit, for every sample."""
    if criterion != "patience":
        return torch.stack([score(criterion, z) for z in logits])
    counts: list[torch.Tensor] = []
    prev: torch.Tensor | None = None
    for z in logits:
        pred = z.argmax(dim=1)
        counts.append(streak(pred, prev, counts[-1] if counts else None))
        prev = pred
    return torch.stack(counts)


def first_exit(criterion: str, threshold: float, scores: torch.Tensor) -> torch.Tensor:
    """``(N,)`` 0-based index of the exit each sample leaves at (the last one takes the rest)."""
    mask = leaves(criterion, threshold, scores)
    mask[-1] = True
    return mask.to(torch.uint8).argmax(dim=0)  # argmax returns the first maximal index


def default_candidates(criterion: str, n_exits: int, n_classes: int) -> list[float]:
    """Thresholds ``calibrate_threshold`` tries when none are given (the "never" one is added there)."""
    if criterion == "patience":
        return [float(t) for t in range(n_exits)]
    if criterion == "confidence":
        return [i / 100 for i in range(101)] + [0.995, 0.999, 0.9995, 0.9999, 0.99999]
    top = math.log(max(n_classes, 2))
    return [0.0] + [top * 10 ** (-5 + 5 * i / 99) for i in range(100)]  # 1e-5 log(C) .. log(C)
