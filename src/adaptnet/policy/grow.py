"""Growth policies: when (a plateau, a schedule) and where (gradient, round robin, last, fixed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from adaptnet.edit import INITS
from adaptnet.edit.init import growth_score
from adaptnet.policy._plateau import Budget, Plateau
from adaptnet.policy.base import EditRequest, Signals

logger = logging.getLogger(__name__)

WHERE = ("gradient", "round_robin", "last")


def _check_where(where: str | int) -> None:
    if isinstance(where, bool) or not (where in WHERE or (isinstance(where, int) and where >= 0)):
        raise ValueError(f"where must be one of {', '.join(WHERE)} or a layer index >= 0, got {where!r}")


class _Grow:
    """Shared by the growth policies: choose a layer within the budget, then widen it."""

    name = "grow"

    def __init__(self, by: int, where: str | int, init: str, max_params: int | None, max_width: int | None):
        if not isinstance(by, int) or isinstance(by, bool) or by < 1:
            raise ValueError(f"by must be a positive integer, got {by!r}")
        _check_where(where)
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.by, self.where, self.init = by, where, init
        self.budget = Budget(max_params, max_width)
        self.turn = 0  # round-robin position
        self.exhausted = False

    def _grow(self, signals: Signals, reason: str) -> list[EditRequest]:
        groups = signals.model.unit_groups()  # type: ignore[operator]
        allowed = {g.layer: self.budget.units_allowed(signals.model, g, self.by) for g in groups}
        eligible = [layer for layer, n in allowed.items() if n > 0]
        if not eligible:
            if not self.exhausted:
                logger.info("%s: growth budget reached; no more growth", self.name)
            self.exhausted = True
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
            if signals.probe is None or signals.loss_fn is None:
                raise ValueError("where='gradient' needs a probe batch and a loss function")
            scores = {g.layer: growth_score(signals.model, g, allowed[g.layer], signals.probe, signals.loss_fn)
                      for g in groups if g.layer in eligible}
            layer = max(scores, key=lambda k: scores[k])
            reason += f"; gradient score {scores[layer]:.3g} (best of {len(scores)} layers)"
        return [EditRequest("widen", layer, by=allowed[layer], init=self.init, policy=self.name, reason=reason)]

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
        max_params, max_width: budgets that stop growth.
        monitor: ``"auto"`` (validation loss if any, else training loss) or a series name.
    """

    name = "grow_on_plateau"

    def __init__(self, patience: int = 3, min_delta: float = 0.0, by: int = 8, where: str | int = "gradient",
                 init: str = "net2net", max_params: int | None = None, max_width: int | None = None,
                 monitor: str = "auto"):
        super().__init__(by, where, init, max_params, max_width)
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
                 max_params: int | None = None, max_width: int | None = None, start: int = 0):
        super().__init__(by, where, init, max_params, max_width)
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
