"""DeepenOnPlateau: insert an identity-initialised layer when the loss stops improving."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaptnet.policy._plateau import Plateau
from adaptnet.policy.base import EditRequest, Signals


class DeepenOnPlateau:
    """Insert a residual layer (exact identity at insertion) on a plateau.

    Args:
        patience, min_delta, monitor: as for ``GrowOnPlateau``.
        after: ``"last"`` (after the last hidden layer) or a layer index.
        width: inner width of the new layer (default: the stream's width).
        max_layers: stop deepening once the model has this many hidden layers.
        max_params: stop deepening when a new layer would exceed this parameter count.
    """

    name = "deepen_on_plateau"

    def __init__(self, patience: int = 5, min_delta: float = 0.0, after: str | int = "last",
                 width: int | None = None, max_layers: int | None = None, max_params: int | None = None,
                 monitor: str = "auto"):
        if not (after == "last" or (isinstance(after, int) and not isinstance(after, bool) and after >= 0)):
            raise ValueError(f"after must be 'last' or a layer index >= 0, got {after!r}")
        for name, value in (("width", width), ("max_layers", max_layers), ("max_params", max_params)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.plateau = Plateau(patience, min_delta)
        self.after, self.width, self.max_layers, self.max_params = after, width, max_layers, max_params
        self.monitor = monitor

    def decide(self, signals: Signals) -> list[EditRequest]:
        series = signals.series(self.monitor)
        if not series or not self.plateau.update(series[-1]):
            return []
        widths: list[int] = list(getattr(signals.model, "widths", []))
        if not widths or (self.max_layers is not None and len(widths) >= self.max_layers):
            return []
        after = len(widths) - 1 if self.after == "last" else min(int(self.after), len(widths) - 1)
        if self.max_params is not None:
            # A residual layer of inner width w on a stream of width s costs about 2*s*w + 2*w + s.
            stream = widths[after]
            inner = self.width or stream
            if signals.num_params + 2 * stream * inner + 2 * inner + stream > self.max_params:
                return []
        return [EditRequest("deepen", after, init="identity", width=self.width, policy=self.name,
                            reason=f"no improvement for {self.plateau.patience} epochs")]

    def state_dict(self) -> dict[str, Any]:
        return {"plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.plateau.load_state_dict(state["plateau"])
