"""Growth policies: when (a plateau, a schedule, a gradient signal) and where (gradient, round
robin, last, a fixed layer), within budgets of parameters, width and FLOPs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from adaptnet.edit import INITS
from adaptnet.edit._probe import backward_on
from adaptnet.edit._transaction import Snapshot
from adaptnet.edit.init import growth_score
from adaptnet.edit.ops import inexact_reason
from adaptnet.groups import unit_groups
from adaptnet.policy._plateau import Budget, Plateau, params_per_unit
from adaptnet.policy.base import EditRequest, Signals

logger = logging.getLogger(__name__)

WHERE = ("gradient", "round_robin", "last")


def _check_where(where: str | int) -> None:
    if isinstance(where, bool) or not (where in WHERE or (isinstance(where, int) and where >= 0)):
        raise ValueError(f"where must be one of {', '.join(WHERE)} or a layer index >= 0, got {where!r}")


class _Grow:
    """Shared by the growth policies: choose a layer within the budget, then widen it."""

    name = "grow"

    def __init__(self, by: int, where: str | int, init: str, max_params: int | None, max_width: int | None,
                 max_flops: int | None, noise: float = 0.1):
        if not isinstance(by, int) or isinstance(by, bool) or by < 1:
            raise ValueError(f"by must be a positive integer, got {by!r}")
        _check_where(where)
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if not isinstance(noise, (int, float)) or noise < 0:
            raise ValueError(f"noise must be a number >= 0, got {noise!r}")
        self.by, self.where, self.init, self.noise = by, where, init, float(noise)
        self.budget = Budget(max_params, max_width, max_flops)
        self.turn = 0  # round-robin position
        self.exhausted = False

    def _allowed(self, signals: Signals) -> dict[int, int]:
        """Units each layer may get within the budget; marks the policy exhausted when none may."""
        probe_x = signals.probe[0] if signals.probe is not None else None
        allowed: dict[int, int] = {}
        for g in unit_groups(signals.model).values():
            n = self.budget.units_allowed(signals.model, g, self.by, probe_x)
            # A group this init cannot grow exactly (units mixed by a LayerNorm, tied weights) is left alone.
            why = inexact_reason(g, self.init, n) if n > 0 else None
            if why is not None:
                logger.debug("%s: %s cannot grow with init=%r: %s", self.name, g.name, self.init, why)
            allowed[g.layer] = 0 if why is not None else n
        if not any(allowed.values()):
            logger.info("%s: no layer may grow (budget reached, or none that init=%r keeps exact); no more growth",
                        self.name, self.init)
            self.exhausted = True
        return allowed

    def _scores(self, signals: Signals, allowed: dict[int, int]) -> dict[int, float]:
        """Growth score (see ``adaptnet.edit.init.growth_score``) of each layer that may grow."""
        if signals.probe is None or signals.loss_fn is None:
            raise ValueError("gradient-based growth needs a probe batch and a loss function")
        return {g.layer: growth_score(signals.model, g, allowed[g.layer], signals.probe, signals.loss_fn)
                for g in unit_groups(signals.model).values() if allowed[g.layer] > 0}

    def _grow(self, signals: Signals, reason: str, allowed: dict[int, int] | None = None,
              scores: dict[int, float] | None = None) -> list[EditRequest]:
        allowed = self._allowed(signals) if allowed is None else allowed
        eligible = [layer for layer, n in allowed.items() if n > 0]
        if not eligible:
            return []
        if isinstance(self.where, int):
            if self.where not in eligible:
                return []
            layer = self.where
        elif self.where == "last":
            layer = max(eligible)
        elif self.where == "round_robin":
            order = sorted(allowed)
            layer = next(order[(self.turn + i) % len(order)] for i in range(len(order))
                         if order[(self.turn + i) % len(order)] in eligible)
            self.turn = order.index(layer) + 1
        else:
            scores = self._scores(signals, allowed) if scores is None else scores
            layer = max(scores, key=lambda k: scores[k])
            reason += f"; gradient score {scores[layer]:.3g} (best of {len(scores)} layers)"
        # Split copies get symmetry-breaking noise (exact): without it a copy and its source
        # receive the same gradients and never part.
        noise = self.noise if self.init in ("net2net", "firefly") else None
        return [EditRequest("widen", layer, by=allowed[layer], init=self.init, noise=noise, policy=self.name,
                            reason=reason)]

    def _state(self) -> dict[str, Any]:
        return {"turn": self.turn, "exhausted": self.exhausted}

    def _load(self, state: Mapping[str, Any]) -> None:
        self.turn, self.exhausted = int(state["turn"]), bool(state["exhausted"])


class GrowOnPlateau(_Grow):
    """Widen a layer by ``by`` units when the monitored loss stops improving.

    Args:
        patience: epochs without an improvement of at least ``min_delta`` before growing.
        min_delta: the smallest decrease that counts as an improvement.
        by: units to add per growth (fewer when a budget is nearly reached).
        where: ``"gradient"`` (the layer where new units would get the largest gradient,
            GradMax's criterion), ``"round_robin"``, ``"last"``, or a layer index.
        init: how new units start (see ``adaptnet.widen``).
        max_params, max_width, max_flops: budgets that stop growth (``max_flops``: forward
            multiply-accumulates per sample).
        monitor: ``"auto"`` (validation loss if any, else training loss) or a series name.
        noise: for ``net2net``/``firefly``, the relative symmetry-breaking noise on the split
            shares (exact; see ``adaptnet.widen``): without it copies never part from their source.
    """

    name = "grow_on_plateau"

    def __init__(self, patience: int = 3, min_delta: float = 0.0, by: int = 8, where: str | int = "gradient",
                 init: str = "net2net", max_params: int | None = None, max_width: int | None = None,
                 max_flops: int | None = None, monitor: str = "auto", noise: float = 0.1):
        super().__init__(by, where, init, max_params, max_width, max_flops, noise)
        self.plateau = Plateau(patience, min_delta)
        self.monitor = monitor

    def decide(self, signals: Signals) -> list[EditRequest]:
        series = signals.series(self.monitor)
        if not series or not self.plateau.update(series[-1]) or self.exhausted:
            return []
        return self._grow(signals, f"no improvement for {self.plateau.patience} epochs")

    def state_dict(self) -> dict[str, Any]:
        return {**self._state(), "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load(state)
        self.plateau.load_state_dict(state["plateau"])


class GrowEvery(_Grow):
    """Widen a layer by ``by`` units every ``every`` epochs (from epoch ``start``), within budget."""

    name = "grow_every"

    def __init__(self, every: int = 5, by: int = 8, where: str | int = "round_robin", init: str = "net2net",
                 max_params: int | None = None, max_width: int | None = None, max_flops: int | None = None,
                 start: int = 0, noise: float = 0.1):
        super().__init__(by, where, init, max_params, max_width, max_flops, noise)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        self.every, self.start = every, start

    def decide(self, signals: Signals) -> list[EditRequest]:
        if signals.epoch < self.start or (signals.epoch - self.start) % self.every or self.exhausted:
            return []
        return self._grow(signals, f"scheduled every {self.every} epochs")

    def state_dict(self) -> dict[str, Any]:
        return self._state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load(state)


class GrowOnSignal(_Grow):
    """Widen when growth is expected to pay, measured on the probe batch; or on a long plateau.

    The first-order loss decrease of a gradient step is proportional to the squared gradient
    norm. New gradmax units would receive a gradient of norm ``score`` (``growth_score``) on
    ``k`` new parameters; the existing ``n`` parameters receive ``g``. Growth fires when the
    new units would learn faster per parameter than the network already does:
    ``(score**2 / k) / (|g|**2 / n) > threshold``. The ratio does not depend on the learning
    rate or the optimizer, rises as the existing weights converge (a plateau seen from the
    gradient), and stays low when new units would get no gradient.

    The ratio a task reaches varies (on two spirals, 0.2 fired on four seeds out of five and never
    on the fifth, which stayed at its start size), so a plateau of ``patience`` epochs also grows,
    at the layer with the best score: a network whose loss has stopped improving is never left
    at its start size because the signal stayed below the threshold. ``patience=None`` turns
    that off.

    Args:
        threshold: the ratio that triggers growth (1.0: new units would learn as fast per parameter).
        by, init, max_params, max_width, max_flops: as for ``GrowOnPlateau``.
        every: epochs between measurements.
        cooldown: epochs to wait after a growth before measuring again (or growing on a plateau).
        patience, min_delta, monitor: the plateau that also grows, as for ``GrowOnPlateau``
            (``patience=None``: only the signal grows).
    """

    name = "grow_on_signal"

    def __init__(self, threshold: float = 1.0, by: int = 8, init: str = "gradmax", every: int = 1,
                 cooldown: int = 0, max_params: int | None = None, max_width: int | None = None,
                 max_flops: int | None = None, patience: int | None = 10, min_delta: float = 0.0,
                 monitor: str = "auto"):
        super().__init__(by, "gradient", init, max_params, max_width, max_flops)
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not isinstance(cooldown, int) or cooldown < 0:
            raise ValueError(f"cooldown must be an integer >= 0, got {cooldown!r}")
        self.threshold, self.every, self.cooldown = float(threshold), every, cooldown
        self.plateau = Plateau(patience, min_delta) if patience is not None else None
        self.monitor = monitor
        self.last_growth = -(10**9)

    def decide(self, signals: Signals) -> list[EditRequest]:
        series = signals.series(self.monitor) if self.plateau is not None else []
        # The plateau counts every epoch, also while cooling down, so that its wait is current.
        stalled = self.plateau is not None and bool(series) and self.plateau.update(series[-1])
        measure = signals.epoch % self.every == 0
        if self.exhausted or not (measure or stalled) or signals.epoch - self.last_growth <= self.cooldown:
            return []
        allowed = self._allowed(signals)
        if self.exhausted:
            return []
        scores = self._scores(signals, allowed)
        per_param = _existing_grad_per_param(signals) if measure else 0.0
        groups = {g.layer: g for g in unit_groups(signals.model).values()}
        ratios = {layer: score**2 / (allowed[layer] * params_per_unit(groups[layer])) / per_param
                  for layer, score in scores.items()} if per_param > 0 else {}
        best = max(ratios, key=lambda k: ratios[k]) if ratios else None
        if best is not None and ratios[best] > self.threshold:
            reason = f"new units would learn {ratios[best]:.3g}x faster per parameter (> {self.threshold})"
        elif stalled and scores:
            assert self.plateau is not None
            reason = f"no improvement for {self.plateau.patience} epochs (signal below {self.threshold})"
        else:
            return []
        self.last_growth = signals.epoch
        return self._grow(signals, reason, allowed, scores)

    def state_dict(self) -> dict[str, Any]:
        plateau = self.plateau.state_dict() if self.plateau is not None else None
        return {**self._state(), "last_growth": self.last_growth, "plateau": plateau}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load(state)
        self.last_growth = int(state["last_growth"])
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])


def _existing_grad_per_param(signals: Signals) -> float:
    """Mean squared gradient per parameter of the existing model on the probe batch."""
    model = signals.model
    snapshot = Snapshot(model, None)
    try:
        backward_on(model, signals.probe, signals.loss_fn, "grow_on_signal")
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total = sum(float(g.to(torch.float64).pow(2).sum()) for g in grads)
        return total / max(1, sum(g.numel() for g in grads))
    finally:
        snapshot.restore()
