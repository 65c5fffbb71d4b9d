"""Model registry: ``spec["type"]`` -> class, so that a checkpoint rebuilds its model alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

_MODELS: dict[str, Any] = {}
T = TypeVar("T")


def register_model(cls: T) -> T:
    """Class decorator: make ``cls`` (with ``spec()``/``from_spec()``) loadable by name."""
    _MODELS[cls.__name__] = cls  # type: ignore[attr-defined]
    return cls


def model_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from its ``spec()``; raises ``ValueError`` for an unknown type."""
    name = spec.get("type") if isinstance(spec, Mapping) else None
    if name not in _MODELS:
        raise ValueError(f"unknown model type {name!r}; registered: {', '.join(sorted(_MODELS))}")
    model: nn.Module = _MODELS[name].from_spec(spec)
    return model
