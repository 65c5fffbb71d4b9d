"""Helpers shared by the edit tests: exact snapshots of a model and its optimizer, invariants.

``capture`` copies everything an edit could touch (parameter objects and values, grads,
buffers, module size attributes, the module tree, param groups, optimizer state), so that
``assert_identical`` can prove "bit-identical" with ``torch.equal`` rather than a tolerance.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_SCALARS = (int, float, bool, str, tuple, type(None))


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.device == b.device
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    return bool(a == b)


@dataclass
class Capture:
    params: list[tuple[str, nn.Parameter, torch.Tensor, torch.Tensor | None, bool]]
    buffers: list[tuple[str, torch.Tensor | None]]
    modules: list[tuple[str, type, dict[str, Any]]]
    groups: list[tuple[list[nn.Parameter], dict[str, Any]]]
    state: list[tuple[nn.Parameter, dict[str, Any]]]


def capture(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Capture:
    """A deep copy of everything that describes ``model`` and ``optimizer`` (parameter objects kept by reference)."""
    params = [
        (name, p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone(), p.requires_grad)
        for name, p in model.named_parameters()
    ]
    buffers = [(name, None if b is None else b.detach().clone()) for name, b in model.named_buffers()]
    modules = [
        (name, type(m), {k: copy.deepcopy(v) for k, v in vars(m).items() if not k.startswith("_") and
                         isinstance(v, _SCALARS)})
        for name, m in model.named_modules()
    ]
    groups: list[tuple[list[nn.Parameter], dict[str, Any]]] = []
    state: list[tuple[nn.Parameter, dict[str, Any]]] = []
    if optimizer is not None:
        groups = [
            (list(g["params"]), {k: _clone(v) for k, v in g.items() if k != "params"}) for g in optimizer.param_groups
        ]
        state = [(p, {k: _clone(v) for k, v in s.items()}) for p, s in optimizer.state.items()]
    return Capture(params, buffers, modules, groups, state)


def assert_identical(before: Capture, after: Capture) -> None:
    """Every tensor bit-identical (``torch.equal``), every object and attribute the same."""
    assert [n for n, *_ in before.params] == [n for n, *_ in after.params], "parameter names changed"
    for (name, p0, v0, g0, r0), (_, p1, v1, g1, r1) in zip(before.params, after.params, strict=True):
        assert p0 is p1, f"{name}: a different Parameter object"
        assert _same(v0, v1), f"{name}: values changed"
        assert (g0 is None) == (g1 is None), f"{name}: .grad appeared or vanished"
        assert g0 is None or _same(g0, g1), f"{name}: .grad changed"
        assert r0 == r1, f"{name}: requires_grad changed"
    assert [n for n, _ in before.buffers] == [n for n, _ in after.buffers], "buffer names changed"
    for (name, b0), (_, b1) in zip(before.buffers, after.buffers, strict=True):
        assert (b0 is None and b1 is None) or _same(b0, b1), f"buffer {name} changed"
    assert [(n, t) for n, t, _ in before.modules] == [(n, t) for n, t, _ in after.modules], "module tree changed"
    for (name, _, a0), (_, _, a1) in zip(before.modules, after.modules, strict=True):
        assert a0 == a1, f"module {name!r}: attributes changed: {a0} != {a1}"
    assert len(before.groups) == len(after.groups), "number of param groups changed"
    for i, ((ps0, h0), (ps1, h1)) in enumerate(zip(before.groups, after.groups, strict=True)):
        assert len(ps0) == len(ps1) and all(a is b for a, b in zip(ps0, ps1, strict=True)), f"group {i}: params"
        assert h0.keys() == h1.keys(), f"group {i}: keys changed"
        for k in h0:
            assert _same(h0[k], h1[k]), f"group {i}: {k} changed"
    assert len(before.state) == len(after.state), "optimizer state gained or lost entries"
    states = {id(p): s for p, s in after.state}
    for p, s0 in before.state:
        assert id(p) in states, "optimizer state of a parameter vanished"
        s1 = states[id(p)]
        assert s0.keys() == s1.keys(), f"state keys changed: {sorted(s0)} != {sorted(s1)}"
        for k in s0:
            assert _same(s0[k], s1[k]), f"optimizer state {k!r} changed"


def held_ids(optimizer: torch.optim.Optimizer) -> list[int]:
    return [id(p) for g in optimizer.param_groups for p in g["params"]]


def check_optimizer_in_sync(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """No stale reference, no missing parameter, per-element state and grads shaped like their parameter."""
    held = held_ids(optimizer)
    assert len(held) == len(set(held)), "a parameter is held twice"
    assert set(held) == {id(p) for p in model.parameters()}, "optimizer and model disagree on the parameters"
    alive = {id(p) for p in model.parameters()}
    for p, s in optimizer.state.items():
        assert id(p) in alive, "optimizer state kept for a parameter the model no longer has"
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert v.shape == p.shape, f"state {k!r} shaped {tuple(v.shape)} for a parameter {tuple(p.shape)}"
    for name, p in model.named_parameters():
        assert p.grad is None or p.grad.shape == p.shape, f"{name}: stale .grad shape"


def check_sizes(model: nn.Module) -> None:
    """Every layer's size attributes agree with its tensors."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
            assert m.bias is None or tuple(m.bias.shape) == (m.out_features,), name
        elif isinstance(m, nn.Conv2d):
            assert tuple(m.weight.shape[:2]) == (m.out_channels, m.in_channels // m.groups), name
            assert m.bias is None or tuple(m.bias.shape) == (m.out_channels,), name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                assert t is None or tuple(t.shape) == (m.num_features,), name
        elif isinstance(m, nn.LayerNorm):
            for t in (m.weight, m.bias):
                assert t is None or tuple(t.shape) == tuple(m.normalized_shape), name


def check_dtype_device(model: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
    device = torch.device(device)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == device.type, f"{name} moved to {t.device}"
        if t.is_floating_point():
            assert t.dtype == dtype, f"{name} is {t.dtype}, expected {dtype}"
    for name, p in model.named_parameters():
        assert p.grad is None or (p.grad.dtype == dtype and p.grad.device.type == device.type), f"{name}.grad"


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                loss_fn: Any, steps: int = 1, zero_after: bool = False) -> None:
    """Plain training steps in train mode; grads are left in ``.grad`` unless ``zero_after``."""
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    if zero_after:
        optimizer.zero_grad()


def fill_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Any) -> None:
    """Leave fresh gradients in ``.grad`` (an edit between backward() and step())."""
    for p in model.parameters():
        p.grad = None
    loss_fn(model(x), y).backward()
