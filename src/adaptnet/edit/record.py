"""The record every edit returns (and the Trainer logs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Edit:
    """What one structural edit did.

    Attributes:
        op: ``"widen"``, ``"prune"``, ``"deepen"``, ``"remove_layer"`` or ``"grow_experts"``.
        layer: the layer index the edit was asked for (for ``deepen``, the new layer's index).
        group: name of the edited unit group or block (``"blocks.1"``).
        init: the initialiser (``widen``/``deepen``) or importance (``prune``) used.
        units_added: indices of the new units in the edited layer.
        units_removed: indices (before the edit) of the removed units.
        widths_before, widths_after: the model's hidden widths around the edit.
        params_before, params_after: parameter counts around the edit.
        max_output_change: max-abs output change on ``batch`` in eval mode, when a batch was given.
    """

    op: str
    layer: int
    group: str
    init: str | None
    units_added: tuple[int, ...] = ()
    units_removed: tuple[int, ...] = ()
    widths_before: tuple[int, ...] = ()
    widths_after: tuple[int, ...] = ()
    params_before: int = 0
    params_after: int = 0
    max_output_change: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out
