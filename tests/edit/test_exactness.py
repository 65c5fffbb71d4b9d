"""Function preservation of exact edits, over random architectures and random edit sequences.

Exact edits (``widen`` with net2net/zero/gradmax, ``deepen``) must change the outputs by at
most 1e-5 (float32) / 1e-10 (float64) max-abs, in eval mode and in train mode (dropout 0).
Documented inexact cases are applied too, but not checked for exactness:

* LayerNorm over the widened layer: exact only for net2net with ``by`` a multiple of the width;
* ``random`` widening, ``prune`` and ``remove_layer`` are not function-preserving.

In float32 a random network can be ill-conditioned (LayerNorm over nearly equal features); the
bound then also allows the forward pass's own rounding error, and the edit itself is checked on
float64 evaluations of the same weights (``assert_preserved``). The fixed cases use the plain bound.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from edit_checks import check_dtype_device, check_optimizer_in_sync, check_sizes, train_steps
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import adaptnet as an
from adaptnet.nn import ACTIVATIONS, ResidualBlock

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CONFIGS = [("mlp", None), ("mlp", "batch"), ("mlp", "layer"), ("cnn", None), ("cnn", "batch")]
DTYPES = [torch.float32, torch.float64]
WIDEN_INITS = ("net2net", "zero", "gradmax", "random")
# Weighted menu of edit kinds (repeats make widening the most frequent edit).
OPS = ("net2net", "net2net", "zero", "gradmax", "random", "deepen", "prune", "remove_layer")
MAX_LAYERS, MAX_WIDTH = 5, 24
PROPERTY = settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Case:
    model: Any
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Any
    norm: str | None
    dtype: torch.dtype
    dropout: float = 0.0


def _blocks(data: st.DataObject, widths: list[int]) -> list[dict[str, Any]]:
    """Dense blocks of ``widths``, each followed by 0-1 residual blocks (trained, not identity)."""
    blocks: list[dict[str, Any]] = []
    for w in widths:
        blocks.append({"kind": "dense", "width": w})
        if data.draw(st.booleans(), label="residual after"):
            blocks.append({"kind": "residual", "width": data.draw(st.integers(1, 6), label="residual width")})
    return blocks


def build_case(data: st.DataObject, kind: str, norm: str | None, dtype: torch.dtype) -> Case:
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    batch = data.draw(st.integers(4, 8), label="batch")
    if kind == "mlp":
        n_in, n_out = data.draw(st.integers(1, 5), label="in"), data.draw(st.integers(1, 3), label="out")
        widths = data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=3), label="hidden")
        activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
        dropout = data.draw(st.sampled_from([0.0, 0.0, 0.3]), label="dropout")
        spec = an.AdaptiveMLP(n_in, widths, n_out, activation=activation, norm=norm, dropout=dropout).spec()
        spec["blocks"] = _blocks(data, widths)
        model = an.AdaptiveMLP.from_spec(spec)
        x, y, loss_fn = torch.randn(batch, n_in), torch.randn(batch, n_out), F.mse_loss
    else:
        n_in, classes = data.draw(st.integers(1, 3), label="in"), data.draw(st.integers(2, 4), label="classes")
        widths = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=2), label="channels")
        pool = data.draw(st.sampled_from(["max", "avg", None]), label="pool")
        kernel = data.draw(st.sampled_from([1, 3]), label="kernel")
        side = data.draw(st.integers(3, 6), label="side")
        spec = an.AdaptiveCNN(n_in, widths, classes, kernel_size=kernel, norm=norm, pool=pool).spec()
        spec["blocks"] = _blocks(data, widths)
        model = an.AdaptiveCNN.from_spec(spec)
        x, y, loss_fn = torch.randn(batch, n_in, side, side), torch.randint(0, classes, (batch,)), F.cross_entropy
    note(f"spec={model.spec()}")
    y = y.to(dtype) if y.is_floating_point() else y
    return Case(model.to(dtype), x.to(dtype), y, loss_fn, norm, dtype, model.options.get("dropout", 0.0))


def _removable(model: Any) -> list[int]:
    blocks = list(model.blocks)
    out = []
    for i, b in enumerate(blocks):
        if isinstance(b, ResidualBlock):
            out.append(i)
        elif isinstance(model, an.AdaptiveMLP) and len(blocks) > 1:
            feeds_residual = i + 1 < len(blocks) and isinstance(blocks[i + 1], ResidualBlock)
            if not feeds_residual:
                out.append(i)
    return out


@dataclass
class Outputs:
    """Eval- and train-mode outputs, and the same weights evaluated in float64 (``ref``)."""

    eval: torch.Tensor
    train: torch.Tensor
    ref_eval: torch.Tensor
    ref_train: torch.Tensor


def _outputs(model: Any, x: torch.Tensor) -> Outputs:
    """Train mode runs on copies, so that running statistics stay put."""
    was_training = model.training
    with torch.no_grad():
        model.eval()
        eval_out, train_out = model(x), copy.deepcopy(model).train()(x)
        if x.dtype == torch.float64:
            ref_eval, ref_train = eval_out, train_out
        else:
            twin = copy.deepcopy(model).double()
            ref_eval, ref_train = twin(x.double()), twin.train()(x.double())
    model.train(was_training)
    return Outputs(eval_out, train_out, ref_eval, ref_train)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def assert_preserved(before: Outputs, after: Outputs, dtype: torch.dtype, what: str, train: bool = True) -> None:
    """The outputs changed by at most TOL[dtype], in eval and (``train``) train mode.

    In float32 the change may also include the forward pass's own rounding error, measured
    against float64 evaluations of the same weights. That error stays far below TOL unless the
    network is ill-conditioned: LayerNorm over features that are (nearly) all equal, as after
    pruning a layer to one unit, amplifies single rounding steps by up to 1/sqrt(eps). No edit
    can be more exact than the forward pass itself, so such cases are checked on the float64
    evaluations, where the edit itself must change the outputs by at most TOL.
    """
    tol = TOL[dtype]
    modes = [("eval", before.eval, after.eval, before.ref_eval, after.ref_eval)]
    if train:
        modes.append(("train", before.train, after.train, before.ref_train, after.ref_train))
    for mode, b, a, b_ref, a_ref in modes:
        change = _max_abs(a, b)
        if dtype == torch.float64:
            assert change <= tol, f"{what} changed {mode} outputs by {change}"
            continue
        exact_change = _max_abs(a_ref, b_ref)
        assert exact_change <= tol, f"{what} changed {mode} outputs by {exact_change} (float64 evaluation)"
        rounding = _max_abs(b, b_ref) + _max_abs(a, a_ref)
        if rounding > tol:
            event("float32 forward ill-conditioned: bound widened by its own rounding error")
        assert change <= tol + rounding, f"{what} changed {mode} outputs by {change} (own rounding {rounding})"


def apply_random_edit(case: Case, data: st.DataObject, optimizer: torch.optim.Optimizer) -> tuple[an.Edit, bool]:
    """One random valid edit; returns its record and whether it must preserve the function."""
    model, widths = case.model, case.model.widths
    op = data.draw(st.sampled_from(OPS), label="op")
    layer = data.draw(st.integers(0, len(widths) - 1), label="layer")
    if op == "deepen" and len(widths) >= MAX_LAYERS:
        op = "remove_layer" if _removable(model) else "prune"
    if op == "remove_layer" and not _removable(model):
        op = "deepen" if len(widths) < MAX_LAYERS else "net2net"
    if op in WIDEN_INITS and widths[layer] >= MAX_WIDTH:
        op = "prune"
    if op == "prune" and widths[layer] == 1:
        op = "net2net"
    batch = (case.x, case.y)
    if op in WIDEN_INITS:
        layernorm = case.norm == "layer"
        if layernorm and op == "net2net" and widths[layer] <= MAX_WIDTH // 2 and data.draw(st.booleans(), label="k*n"):
            by = widths[layer]  # the exact case under LayerNorm
        else:
            by = data.draw(st.integers(1, 4), label="by")
        noise = data.draw(st.sampled_from([0.0, 0.0, 0.1]), label="noise") if op == "net2net" else 0.0
        note(f"widen(layer={layer}, by={by}, init={op!r}, noise={noise}) on {widths}")
        exact = op != "random" and (not layernorm or (op == "net2net" and by % widths[layer] == 0))
        # Under LayerNorm an init that cannot be exact is refused unless exact=False says so.
        edit = an.widen(model, layer, by, init=op, optimizer=optimizer, batch=batch, loss_fn=case.loss_fn,
                        noise=noise, exact=exact)
        return edit, exact
    if op == "deepen":
        width = data.draw(st.one_of(st.none(), st.integers(1, 6)), label="deepen width")
        note(f"deepen(after={layer}, width={width}) on {widths}")
        return an.deepen(model, layer, optimizer=optimizer, width=width, batch=batch), True
    if op == "prune":
        how = data.draw(st.sampled_from(["amount", "keep", "units", "taylor"]), label="prune how")
        n = widths[layer]
        note(f"prune(layer={layer}, {how}) on {widths}")
        if how == "amount":
            kwargs: dict[str, Any] = {"amount": data.draw(st.sampled_from([0.25, 0.5]), label="amount")}
            if round(kwargs["amount"] * n) in (0, n):
                kwargs = {"keep": n - 1}
        elif how == "units":
            kwargs = {"units": data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True))}
        else:
            kwargs = {"keep": data.draw(st.integers(1, n - 1), label="keep")}
            if how == "taylor":
                kwargs.update(importance="taylor", loss_fn=case.loss_fn)
        return an.prune(model, layer, optimizer=optimizer, batch=batch, **kwargs), False
    victim = data.draw(st.sampled_from(_removable(model)), label="remove")
    note(f"remove_layer({victim}) on {widths}")
    return an.remove_layer(model, victim, optimizer=optimizer, batch=batch), False


def check_edit_sequence(case: Case, data: st.DataObject, n_edits: int) -> int:
    """Apply ``n_edits`` random edits with training in between; returns how many were checked exact."""
    model = case.model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, case.x, case.y, case.loss_fn, steps=2)
    checked = 0
    for i in range(n_edits):
        if i % 5 == 4:  # keep training between edits (and sometimes leave grads in place)
            train_steps(model, optimizer, case.x, case.y, case.loss_fn, zero_after=data.draw(st.booleans()))
        before = _outputs(model, case.x)
        widths = list(model.widths)
        edit, exact = apply_random_edit(case, data, optimizer)
        after = _outputs(model, case.x)
        eval_change = _max_abs(after.eval, before.eval)
        train_change = _max_abs(after.train, before.train)
        note(f"  -> {model.widths}: eval change {eval_change:.3g}, train change {train_change:.3g}")
        assert edit.widths_before == tuple(widths) and edit.widths_after == tuple(model.widths)
        assert edit.max_output_change == pytest.approx(eval_change, rel=1e-6, abs=1e-12)
        if exact:
            checked += 1
            # Train mode is only deterministic without dropout.
            assert_preserved(before, after, case.dtype, f"{edit.op}/{edit.init}", train=case.dropout == 0)
        check_sizes(model)
        check_dtype_device(model, case.dtype)
        check_optimizer_in_sync(model, optimizer)
    train_steps(model, optimizer, case.x, case.y, case.loss_fn, steps=1)  # still trains after all of it
    return checked


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("kind", "norm"), CONFIGS, ids=[f"{k}-{n}" for k, n in CONFIGS])
@PROPERTY
@given(data=st.data())
def test_random_edit_sequences_preserve_function(kind: str, norm: str | None, dtype: torch.dtype,
                                                 data: st.DataObject) -> None:
    case = build_case(data, kind, norm, dtype)
    checked = check_edit_sequence(case, data, n_edits=data.draw(st.integers(20, 24), label="edits"))
    note(f"{checked} exact edits checked")
    event(f"exact edits checked: {min(checked // 5 * 5, 20)}+")


# -- deterministic coverage of every exact edit on every kind of layer ------------------------------


def _fixed_case(kind: str, norm: str | None, dtype: torch.dtype) -> Case:
    torch.manual_seed(1)
    if kind == "mlp":
        spec = an.AdaptiveMLP(5, [6, 4], 3, norm=norm).spec()
        spec["blocks"] = [{"kind": "dense", "width": 6}, {"kind": "residual", "width": 3},
                          {"kind": "dense", "width": 4}]
        model = an.AdaptiveMLP.from_spec(spec)
        x, y, loss_fn = torch.randn(8, 5), torch.randn(8, 3), F.mse_loss
    else:
        spec = an.AdaptiveCNN(2, [4, 3], 3, norm=norm).spec()
        spec["blocks"] = [{"kind": "dense", "width": 4}, {"kind": "residual", "width": 2},
                          {"kind": "dense", "width": 3}]
        model = an.AdaptiveCNN.from_spec(spec)
        x, y, loss_fn = torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,)), F.cross_entropy
    model.to(dtype)
    case = Case(model, x.to(dtype), y.to(dtype) if y.is_floating_point() else y, loss_fn, norm, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, optimizer, case.x, case.y, loss_fn, steps=3)  # BN statistics and residuals non-trivial
    return case


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("kind", "norm"), CONFIGS, ids=[f"{k}-{n}" for k, n in CONFIGS])
def test_every_exact_edit_on_every_layer(kind: str, norm: str | None, dtype: torch.dtype) -> None:
    case = _fixed_case(kind, norm, dtype)
    model, tol = case.model, TOL[dtype]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, case.x, case.y, case.loss_fn, steps=2)
    inits = ["net2net"] if norm == "layer" else ["net2net", "zero", "gradmax"]
    for layer in range(len(model.widths)):  # dense stream, residual inner width, last dense layer
        for init in inits:
            before = _outputs(model, case.x)
            by = model.widths[layer] if norm == "layer" else 2
            an.widen(model, layer, by, init=init, optimizer=optimizer, batch=(case.x, case.y), loss_fn=case.loss_fn)
            after = _outputs(model, case.x)
            for mode in ("eval", "train"):  # well-conditioned: the plain bound, no rounding allowance
                change = _max_abs(getattr(after, mode), getattr(before, mode))
                assert change <= tol, f"widen({layer}, {init}) changed {mode} outputs by {change}"
        before = _outputs(model, case.x)
        an.deepen(model, layer, optimizer=optimizer)
        after = _outputs(model, case.x)
        assert torch.equal(after.eval, before.eval) and torch.equal(after.train, before.train), (
            "deepen must be exact to the bit (x + 0)"
        )
        train_steps(model, optimizer, case.x, case.y, case.loss_fn)
    check_optimizer_in_sync(model, optimizer)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_layernorm_net2net_exact_for_multiples_of_the_width(dtype: torch.dtype) -> None:
    case = _fixed_case("mlp", "layer", dtype)
    for k in (1, 2):
        before = _outputs(case.model, case.x)
        an.widen(case.model, 0, k * case.model.widths[0], init="net2net", noise=0.1)
        after = _outputs(case.model, case.x)
        assert _max_abs(after.eval, before.eval) <= TOL[dtype] and _max_abs(after.train, before.train) <= TOL[dtype]


def test_inexact_edits_do_change_the_function() -> None:
    """The comparison above can see a change: the documented non-preserving edits make one."""
    case = _fixed_case("mlp", None, torch.float64)
    for edit in (
        lambda m: an.widen(m, 0, 3, init="random", batch=case.x),
        lambda m: an.prune(m, 0, keep=2, batch=case.x),
        lambda m: an.remove_layer(m, 1, batch=case.x),
    ):
        before = _outputs(case.model, case.x).eval
        record = edit(case.model)
        after = _outputs(case.model, case.x).eval
        assert _max_abs(after, before) > 1e-4
        assert record.max_output_change == pytest.approx(_max_abs(after, before))
    layernorm = _fixed_case("mlp", "layer", torch.float64)
    for init in ("gradmax", "net2net"):  # documented: inexact under LayerNorm (zero carries it: exact)
        before = _outputs(layernorm.model, layernorm.x).eval
        an.widen(layernorm.model, 0, 1, init=init, batch=(layernorm.x, layernorm.y), loss_fn=layernorm.loss_fn,
                 exact=False)
        assert _max_abs(_outputs(layernorm.model, layernorm.x).eval, before) > 1e-6


def test_zero_carries_the_mean_through_layernorm_for_any_amount_and_its_units_learn() -> None:
    case = _fixed_case("mlp", "layer", torch.float64)
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-2)
    train_steps(case.model, opt, case.x, case.y, case.loss_fn, steps=2)
    before = _outputs(case.model, case.x)
    for by in (1, 5):
        an.widen(case.model, 0, by, init="zero", optimizer=opt)
    after = _outputs(case.model, case.x)
    assert _max_abs(after.eval, before.eval) <= TOL[torch.float64]
    writer = case.model.blocks[0].op.weight
    new_rows = writer.detach()[6:].clone()
    assert torch.allclose(new_rows, writer.detach()[:6].mean(0).expand_as(new_rows))  # each row: the mean
    train_steps(case.model, opt, case.x, case.y, case.loss_fn, steps=2)
    moved = writer.detach()[6:] - new_rows
    assert moved.abs().min(dim=1).values.gt(0).all()  # every new unit receives gradient...
    assert not torch.allclose(moved[0], moved[1])  # ...and they learn different things


@pytest.mark.parametrize("init", ["gradmax", "net2net", "firefly"])
def test_an_exact_init_that_layernorm_makes_inexact_is_refused(init: str) -> None:
    case = _fixed_case("mlp", "layer", torch.float64)
    before = _outputs(case.model, case.x).eval
    with pytest.raises(an.EditError, match=r"combined by layer_norm.*exact=False"):
        an.widen(case.model, 0, 1, init=init, batch=(case.x, case.y), loss_fn=case.loss_fn)
    assert torch.equal(_outputs(case.model, case.x).eval, before)


@pytest.mark.parametrize("init", WIDEN_INITS)
def test_widen_is_reproducible_with_a_generator(init: str) -> None:
    models = [_fixed_case("cnn", "batch", torch.float32) for _ in range(2)]
    for case in models:
        generator = torch.Generator().manual_seed(7)
        for layer, by in ((0, 3), (1, 2), (2, 5)):
            an.widen(case.model, layer, by, init=init, batch=(case.x, case.y), loss_fn=case.loss_fn,
                     noise=0.1 if init == "net2net" else 0.0, generator=generator)
    first, second = (dict(c.model.state_dict()) for c in models)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
