"""When and where to change: triggers, scores and budgets that turn signals into edit requests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaptnet.policy.base import EditRequest, Policy, Signals, apply_request
from adaptnet.policy.depth import DeepenOnPlateau
from adaptnet.policy.grow import GrowEvery, GrowOnPlateau, GrowOnSignal
from adaptnet.policy.prune import PruneToBudget

POLICIES: dict[str, type] = {
    "grow_on_plateau": GrowOnPlateau,
    "grow_every": GrowEvery,
    "grow_on_signal": GrowOnSignal,
    "deepen_on_plateau": DeepenOnPlateau,
    "prune_to_budget": PruneToBudget,
}


def register_policy(name: str, cls: type) -> None:
    """Make a policy class available to configs under ``name``."""
    POLICIES[name] = cls


def make_policy(name: str, options: Mapping[str, Any]) -> Policy:
    """Build a registered policy by name (``ValueError`` naming the known ones otherwise)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    policy: Policy = POLICIES[name](**options)
    return policy


__all__ = [
    "POLICIES",
    "DeepenOnPlateau",
    "EditRequest",
    "GrowEvery",
    "GrowOnPlateau",
    "GrowOnSignal",
    "Policy",
    "PruneToBudget",
    "Signals",
    "apply_request",
    "make_policy",
    "register_policy",
]
