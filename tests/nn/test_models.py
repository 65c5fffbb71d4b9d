"""AdaptiveMLP and AdaptiveCNN: specs, widths, dtype/device and size attributes through edits,
the seed example training, and the activation/gradmax facts that growth relies on."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptnet as an
from adaptnet.nn import ReLU, ResidualBlock


def _mlp(norm: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, torch.Tensor, torch.Tensor, Any]:
    torch.manual_seed(0)
    model = an.AdaptiveMLP(5, [6, 4], 3, norm=norm).to(dtype)
    return model, torch.randn(8, 5, dtype=dtype), torch.randn(8, 3, dtype=dtype), F.mse_loss


def _cnn(norm: str | None = "batch", dtype: torch.dtype = torch.float32) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = an.AdaptiveCNN(2, [4, 3], 3, norm=norm).to(dtype)
    return model, torch.randn(6, 2, 8, 8, dtype=dtype), torch.randint(0, 3, (6,)), F.cross_entropy


MODELS = {"mlp": _mlp, "mlp-batch": lambda **k: _mlp("batch", **k), "mlp-layer": lambda **k: _mlp("layer", **k),
          "cnn": lambda **k: _cnn(None, **k), "cnn-batch": _cnn}


def _edit_tour(model: Any, x: torch.Tensor, y: torch.Tensor, loss_fn: Any, opt: torch.optim.Optimizer) -> None:
    """Every kind of edit once, checking ``widths`` and the size attributes after each.

    Exactness is tested in tests/edit; here ``exact=False`` lets LayerNorm models take every init.
    """
    batch = (x, y)
    steps: list[tuple[Any, Any]] = [
        (lambda: an.widen(model, 0, 3, optimizer=opt, exact=False), lambda w: [w[0] + 3, *w[1:]]),
        (lambda: an.widen(model, 1, 2, init="gradmax", optimizer=opt, batch=batch, loss_fn=loss_fn, exact=False),
         lambda w: [w[0], w[1] + 2]),
        (lambda: an.deepen(model, 0, optimizer=opt, width=5), lambda w: [w[0], 5, w[1]]),
        (lambda: an.widen(model, 1, 1, init="random", optimizer=opt), lambda w: [w[0], 6, w[2]]),
        (lambda: an.widen(model, 0, 2, init="zero", optimizer=opt, exact=False), lambda w: [w[0] + 2, *w[1:]]),
        (lambda: an.prune(model, 0, amount=0.5, optimizer=opt), lambda w: [w[0] - round(0.5 * w[0]), *w[1:]]),
        (lambda: an.prune(model, 2, keep=1, optimizer=opt), lambda w: [*w[:2], 1]),
        (lambda: an.deepen(model, 2, optimizer=opt), lambda w: [*w, 1]),
        (lambda: an.remove_layer(model, 1, optimizer=opt), lambda w: [w[0], *w[2:]]),
    ]
    for edit, expected in steps:
        want = expected(list(model.widths))
        record = edit()
        assert model.widths == want
        assert list(record.widths_after) == want
        assert record.params_after == sum(p.numel() for p in model.parameters())
        check_sizes(model)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def check_sizes(model: nn.Module) -> None:
    """Size attributes agree with tensor shapes, and each layer reads what the previous one writes."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
            assert m.bias is None or m.bias.shape == (m.out_features,), name
        elif isinstance(m, nn.Conv2d):
            assert tuple(m.weight.shape[:2]) == (m.out_channels, m.in_channels), name
            assert m.bias is None or m.bias.shape == (m.out_channels,), name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.weight.shape == m.running_mean.shape == m.running_var.shape == (m.num_features,), name
        elif isinstance(m, nn.LayerNorm):
            assert m.weight.shape == tuple(m.normalized_shape), name
    stream = model.in_size
    for i, block in enumerate(model.blocks):
        if isinstance(block, ResidualBlock):
            assert _n_in(block.op1) == stream and _n_out(block.op2) == stream, f"block {i}"
            assert _n_out(block.op1) == _n_in(block.op2) == block.width, f"block {i}"
            assert _norm_size(block.norm) in (None, block.width), f"block {i}"
        else:
            assert _n_in(block.op) == stream and _n_out(block.op) == block.width, f"block {i}"
            assert _norm_size(block.norm) in (None, block.width), f"block {i}"
            stream = block.width
    assert model.head.in_features == stream


def _n_in(op: nn.Module) -> int:
    return int(op.in_features if isinstance(op, nn.Linear) else op.in_channels)


def _n_out(op: nn.Module) -> int:
    return int(op.out_features if isinstance(op, nn.Linear) else op.out_channels)


def _norm_size(norm: nn.Module) -> int | None:
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return int(norm.num_features)
    if isinstance(norm, nn.LayerNorm):
        return int(norm.normalized_shape[0])
    return None


@pytest.mark.parametrize("name", list(MODELS))
def test_edits_update_widths_and_size_attributes(name: str) -> None:
    model, x, y, loss_fn = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _edit_tour(model, x, y, loss_fn, opt)
    assert model(x).shape == (x.shape[0], 3)


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_round_trip_after_edits(name: str) -> None:
    model, x, y, loss_fn = MODELS[name]()
    _edit_tour(model, x, y, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3))
    spec = model.spec()
    assert json.loads(json.dumps(spec)) == spec, "spec must be JSON-serialisable"
    for rebuilt in (type(model).from_spec(spec), an.model_from_spec(spec)):
        assert type(rebuilt) is type(model)
        assert rebuilt.spec() == spec
        assert rebuilt.widths == model.widths
        assert [type(b) for b in rebuilt.blocks] == [type(b) for b in model.blocks]
        check_sizes(rebuilt)
        rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
        rebuilt.eval()
        model.eval()
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x))


def test_spec_is_refused_for_the_wrong_model() -> None:
    spec = an.AdaptiveMLP(3, [4], 2).spec()
    with pytest.raises(ValueError, match="AdaptiveCNN"):
        an.AdaptiveCNN.from_spec(spec)
    with pytest.raises(ValueError, match="format"):
        an.AdaptiveMLP.from_spec({**spec, "format": 99})
    with pytest.raises(ValueError, match="unknown model type"):
        an.model_from_spec({**spec, "type": "Nope"})
    with pytest.raises(ValueError, match="block 0 must be 'dense'"):
        an.AdaptiveMLP.from_spec({**spec, "blocks": [{"kind": "residual", "width": 3}]})


@pytest.mark.parametrize("name", list(MODELS))
def test_float64_survives_every_edit(name: str) -> None:
    model, x, y, loss_fn = MODELS[name](dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _edit_tour(model, x, y, loss_fn, opt)
    for pname, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == "cpu"
        if t.is_floating_point():
            assert t.dtype == torch.float64, pname
    for p, state in opt.state.items():
        for key, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert v.dtype == torch.float64 and v.shape == p.shape, key
    assert model(x).dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mlp-batch", "cnn-batch"])
def test_edits_keep_the_device(name: str) -> None:
    model, x, y, loss_fn = MODELS[name]()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _edit_tour(model, x, y, loss_fn, opt)
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    assert all(v.is_cuda for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim())


def test_seed_network_trains_in_a_plain_loop() -> None:
    """The seed's ``AdaptiveNet(10, 50, 1)``, trained the way the seed did."""
    torch.manual_seed(0)
    model = an.AdaptiveMLP(10, [50], 1)
    assert model.widths == [50]
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(dim=1, keepdim=True)).sin() + 0.1 * x[:, 3:4] ** 2
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    criterion = nn.MSELoss()
    with torch.no_grad():
        first = float(criterion(model(x), y))
    for _ in range(200):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first


def test_constructor_validation() -> None:
    for bad in (
        lambda: an.AdaptiveMLP(0, [4], 1),
        lambda: an.AdaptiveMLP(3, [4, 0], 1),
        lambda: an.AdaptiveMLP(3, [4], 1, norm="group"),
        lambda: an.AdaptiveMLP(3, [4], 1, activation="swish"),
        lambda: an.AdaptiveMLP(3, [4], 1, dropout=1.0),
        lambda: an.AdaptiveCNN(1, [], 10),
        lambda: an.AdaptiveCNN(1, [4], 10, kernel_size=2),
        lambda: an.AdaptiveCNN(1, [4], 10, norm="layer"),
    ):
        with pytest.raises(ValueError):
            bad()


def test_unit_groups_declare_every_tensor_of_a_layer() -> None:
    spec = an.AdaptiveMLP(5, [6, 4], 3, norm="batch").spec()
    spec["blocks"] = [{"kind": "dense", "width": 6}, {"kind": "residual", "width": 3}, {"kind": "dense", "width": 4}]
    model = an.AdaptiveMLP.from_spec(spec)
    groups = list(an.unit_groups(model).values())
    assert [g.layer for g in groups] == [0, 1, 2]
    assert [g.size for g in groups] == model.widths
    for g in groups:
        for sl in g.slices:
            assert sl.tensor.shape[sl.dim] == g.size, (g.name, sl.name)
    stream = {(id(sl.module), sl.name, sl.role) for sl in groups[0].slices}
    residual, after = model.blocks[1], model.blocks[2]
    assert (id(residual.op1), "weight", "in") in stream, "a residual block reads the stream it sits on"
    assert (id(residual.op2), "weight", "out") in stream, "and writes back into it"
    assert (id(after.op), "weight", "in") in stream
    assert (id(model.blocks[0].norm), "running_var", "norm") in stream


# -- the facts gradmax growth relies on -----------------------------------------------------------


def test_relu_has_derivative_one_at_zero() -> None:
    x = torch.tensor([-2.0, -0.0, 0.0, 3.0], requires_grad=True)
    out = ReLU()(x)
    assert torch.equal(out, F.relu(x.detach()))
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert isinstance(an.AdaptiveMLP(2, [3], 1).blocks[0].act, ReLU), '"relu" must be adaptnet\'s ReLU'


@pytest.mark.parametrize("name", ["mlp", "mlp-batch", "cnn", "cnn-batch"])
def test_gradmax_units_start_silent_and_learn(name: str) -> None:
    model, x, y, loss_fn = MODELS[name]()
    layer, n, by = 0, model.widths[0], 3
    an.widen(model, layer, by, init="gradmax", batch=(x, y), loss_fn=loss_fn)
    block = model.blocks[layer]
    incoming = block.op.weight.detach()[n:]
    assert torch.equal(incoming, torch.zeros_like(incoming)), "gradmax units have zero incoming weights"
    outgoing = model.blocks[layer + 1].op.weight.detach()[:, n:]
    per_unit = outgoing.movedim(1, 0).reshape(by, -1).norm(dim=1)
    assert (per_unit > 0).all(), "every gradmax unit needs non-zero outgoing weights"
    model.train()
    loss_fn(model(x), y).backward()
    grad = block.op.weight.grad[n:].reshape(by, -1).norm(dim=1)
    assert (grad > 0).all(), "a silent unit must still receive an incoming gradient (ReLU'(0) = 1)"


def test_gradmax_directions_follow_the_gradient() -> None:
    """The first gradmax unit's outgoing weights are the top singular direction: the loss falls
    faster along its incoming gradient than for a random unit of the same outgoing norm."""
    model, x, y, loss_fn = _mlp()
    n = model.widths[0]
    an.widen(model, 0, 1, init="gradmax", batch=(x, y), loss_fn=loss_fn)
    model.eval()
    loss_fn(model(x), y).backward()
    g_gradmax = float(model.blocks[0].op.weight.grad[n:].norm())
    torch.manual_seed(3)
    w = model.blocks[1].op.weight
    with torch.no_grad():
        random = torch.randn_like(w[:, n:])
        w[:, n:] = random * (w[:, n:].norm() / random.norm())  # same outgoing norm, random direction
    model.zero_grad()
    loss_fn(model(x), y).backward()
    assert g_gradmax >= float(model.blocks[0].op.weight.grad[n:].norm())
