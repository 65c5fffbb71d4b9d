"""Specs of plain PyTorch layers, so that modules built from them (early-exit blocks, halting
steps, experts) can be rebuilt from ``spec.json`` in a fresh process, with no pickling.

``module_spec(m)`` gives a JSON-serialisable dict for a registered adaptive model (its own
``spec()``) or for a layer in the table below (and ``nn.Sequential`` of them);
``module_from_spec(spec)`` builds it back, freshly initialised (weights come from
``model.safetensors``). ``register_layer_spec`` adds layer types.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from adaptnet.nn.activations import ReLU
from adaptnet.nn.registry import model_from_spec

# layer type -> the constructor arguments that rebuild it, read from an instance
_LAYERS: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]]]] = {}


def _name(cls: type) -> str:
    """torch layers by their plain name (``Linear``), others by their full path (no clashes)."""
    return cls.__name__ if cls.__module__.startswith("torch.") else f"{cls.__module__}.{cls.__qualname__}"


def register_layer_spec(cls: type[nn.Module], arguments: Callable[[Any], dict[str, Any]]) -> None:
    """Make ``cls`` serialisable: ``arguments(instance)`` returns keyword arguments for ``cls(**kw)``."""
    _LAYERS[_name(cls)] = (cls, arguments)


def _no_args(m: Any) -> dict[str, Any]:
    return {}


for _cls, _args in (
    (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}),
    (nn.Conv1d, lambda m: _conv(m)),
    (nn.Conv2d, lambda m: _conv(m)),
    (nn.BatchNorm1d, lambda m: {"num_features": m.num_features, "affine": m.affine}),
    (nn.BatchNorm2d, lambda m: {"num_features": m.num_features, "affine": m.affine}),
    (nn.LayerNorm, lambda m: {"normalized_shape": list(m.normalized_shape),
                              "elementwise_affine": m.elementwise_affine}),
    (nn.Dropout, lambda m: {"p": m.p}),
    (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    (nn.MaxPool2d, lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "ceil_mode": m.ceil_mode}),
    (nn.AvgPool2d, lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "ceil_mode": m.ceil_mode}),
    (nn.AdaptiveAvgPool2d, lambda m: {"output_size": m.output_size}),
    (nn.Embedding, lambda m: {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim}),
    (nn.GRUCell, lambda m: {"input_size": m.input_size, "hidden_size": m.hidden_size, "bias": m.bias}),
    (nn.LSTMCell, lambda m: {"input_size": m.input_size, "hidden_size": m.hidden_size, "bias": m.bias}),
    (nn.GRU, lambda m: {"input_size": m.input_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
                        "batch_first": m.batch_first}),
    (nn.LeakyReLU, lambda m: {"negative_slope": m.negative_slope}),
    (ReLU, _no_args), (nn.ReLU, _no_args), (nn.GELU, _no_args), (nn.SiLU, _no_args), (nn.Tanh, _no_args),
    (nn.Sigmoid, _no_args), (nn.Identity, _no_args),
):
    register_layer_spec(_cls, _args)


def _conv(m: Any) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
            "stride": m.stride, "padding": m.padding, "groups": m.groups, "bias": m.bias is not None}


def module_spec(module: nn.Module) -> dict[str, Any]:
    """A JSON-serialisable description of ``module`` (``ValueError`` for an unknown layer type)."""
    spec = getattr(module, "spec", None)
    if callable(spec):
        return dict(spec())
    if type(module) is nn.Sequential:
        return {"type": "Sequential", "layers": [module_spec(m) for m in module]}
    name = _name(type(module))
    if name not in _LAYERS:
        raise ValueError(f"cannot describe a {name} in a spec; register it with adaptnet.nn.register_layer_spec")
    return {"type": name, "layer": True, **_LAYERS[name][1](module)}


def module_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Build the module ``spec`` describes (freshly initialised)."""
    if spec.get("type") == "Sequential":
        return nn.Sequential(*(module_from_spec(s) for s in spec["layers"]))
    if spec.get("layer"):
        name = spec["type"]
        if name not in _LAYERS:
            raise ValueError(f"unknown layer type {name!r} in spec; known: {', '.join(sorted(_LAYERS))}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k not in ("type", "layer")}
        return _LAYERS[name][0](**kwargs)
    return model_from_spec(spec)
