"""What a model may provide to adaptnet, each part optional: small runtime-checkable Protocols.

adaptnet works on any ``nn.Module``; a model that provides one of these is used through it,
and checked with ``isinstance`` first, never called unchecked:

* ``DeclaresGroups``: ``unit_groups()`` returns its groups, for models whose groups tracing cannot
  find (``adaptnet.MoE``: its routing depends on the data).
* ``HasExampleInputs``: ``example_inputs()`` returns inputs to trace it on, so that no one has to
  pass them (adaptnet's own models).
* ``InsertsBlocks``: ``insert_residual(after, width)`` and ``remove_block(index)``, for depth edits
  by layer index (adaptnet's own models; any model's stack of blocks is edited by name instead).
* ``HasSpec``: ``spec()`` describes its architecture for a checkpoint, which rebuilds it with the
  registered class's ``from_spec`` (``adaptnet.register_model``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from adaptnet.nn.groups import UnitGroup


@runtime_checkable
class DeclaresGroups(Protocol):
    def unit_groups(self) -> list[UnitGroup]: ...


@runtime_checkable
class HasExampleInputs(Protocol):
    def example_inputs(self) -> tuple[Any, ...]: ...


@runtime_checkable
class InsertsBlocks(Protocol):
    def insert_residual(self, after: int, width: int | None = None) -> nn.Module: ...

    def remove_block(self, index: int) -> None: ...


@runtime_checkable
class HasSpec(Protocol):
    def spec(self) -> dict[str, Any]: ...
