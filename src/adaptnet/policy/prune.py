"""PruneToBudget: remove the least important units until the model fits a parameter budget."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaptnet.edit import IMPORTANCES
from adaptnet.groups import unit_groups
from adaptnet.policy._plateau import params_per_unit
from adaptnet.policy.base import EditRequest, Signals


class PruneToBudget:
    """Prune the widest layer every ``every`` epochs (from epoch ``start``).

    With ``target_params``, each event removes up to ``amount`` of that layer's units, never
    going below the target, until the model has at most ``target_params`` parameters.
    Without a target, every hidden layer is pruned by ``amount`` once, at epoch ``start``.

    Args:
        target_params: the parameter budget, or None.
        amount: fraction of a layer's units removed per event (default 0.25).
        importance: ``"magnitude"`` or ``"taylor"`` (see ``adaptnet.prune``).
        every: epochs between pruning events.
        start: first epoch at which pruning may happen.
    """

    name = "prune_to_budget"

    def __init__(self, target_params: int | None = None, amount: float | None = None,
                 importance: str = "magnitude", every: int = 1, start: int = 0):
        if target_params is not None and (not isinstance(target_params, int) or target_params < 1):
            raise ValueError(f"target_params must be a positive integer or None, got {target_params!r}")
        amount = 0.25 if amount is None else amount
        if not 0 < amount < 1:
            raise ValueError(f"amount must be a fraction in (0, 1), got {amount!r}")
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        self.target, self.amount, self.importance = target_params, float(amount), importance
        self.every, self.start = every, start
        self.done = False

    def decide(self, signals: Signals) -> list[EditRequest]:
        if self.done or signals.epoch < self.start or (signals.epoch - self.start) % self.every:
            return []
        groups = list(unit_groups(signals.model).values())
        if self.target is None:
            self.done = True
            return [self._request(g.layer, g.size - max(1, round(g.size * self.amount)), "prune each layer once")
                    for g in groups if round(g.size * self.amount) >= 1 and g.size > 1]
        excess = signals.num_params - self.target
        if excess <= 0:
            self.done = True
            return []
        group = max(groups, key=lambda g: (g.size, -g.layer))
        remove = min(round(group.size * self.amount), -(-excess // params_per_unit(group)), group.size - 1)
        if remove < 1:
            return []
        return [self._request(group.layer, group.size - remove, f"{signals.num_params} > {self.target} parameters")]

    def _request(self, layer: int, keep: int, reason: str) -> EditRequest:
        return EditRequest("prune", layer, keep=keep, importance=self.importance, policy=self.name, reason=reason)

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.done = bool(state["done"])
