"""grow_experts: exactness in every routing mode it covers (and the documented bounds where it
cannot be exact), optimizer state carried, transactions, new experts coming alive, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from edit_checks import assert_identical, capture, check_optimizer_in_sync, fill_grads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaptnet as an
from adaptnet.edit.experts import SHARE_DEFAULT, grow_experts
from adaptnet.errors import EditError
from adaptnet.nn.losses import adaptive_loss
from adaptnet.nn.moe import MoE

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
EXPERT_PARAMS = ("router.weight", "router.bias", "w1", "b1", "w2", "b2")


def _model(top_k: int, capacity_factor: float | None, dtype: torch.dtype, experts: int = 4) -> nn.Sequential:
    moe = MoE(6, experts, 8, top_k=top_k, capacity_factor=capacity_factor)
    return nn.Sequential(nn.Linear(5, 6), moe, nn.Linear(6, 3)).to(dtype)


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        adaptive_loss(model, F.mse_loss, model(x), y).backward()
        opt.step()


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    model.train(train)
    out = model(x)
    model.eval()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("init", ["copy", "random"])
@pytest.mark.parametrize("capacity_factor", [None, 1.25])
@pytest.mark.parametrize("top_k", [1, 2])
# Fewer new experts than experts (calibrated on the batch); one copy per expert (top-1 dropless
# copies tie with their source); every expert a source, one of them twice.
@pytest.mark.parametrize("n", [2, 4, 5])
def test_preserving_growth_is_exact_on_the_batch(n: int, top_k: int, capacity_factor: float | None, init: str,
                                                  dtype: torch.dtype) -> None:
    model = _model(top_k, capacity_factor, dtype)
    moe = model[1]
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = torch.randn(96, 5, dtype=dtype), torch.randn(96, 3, dtype=dtype)
    _train(model, opt, x, y, 3)
    before, before_train = _outputs(model, x), _outputs(model, x, train=True)
    capacity = moe.capacity(96)
    edit = grow_experts(model, n, init=init, optimizer=opt, batch=(x, y))
    assert moe.num_experts == 4 + n and edit.units_added == tuple(range(4, 4 + n))
    assert edit.op == "grow_experts" and edit.group == "1.experts" and edit.init == init
    assert edit.max_output_change is not None and edit.max_output_change <= TOL[dtype]
    assert (_outputs(model, x) - before).abs().max() <= TOL[dtype]
    assert (_outputs(model, x, train=True) - before_train).abs().max() <= TOL[dtype]
    assert moe.capacity(96) == capacity  # every expert keeps its capacity
    check_optimizer_in_sync(model, opt)
    _train(model, opt, x, y, 1)  # and training goes on


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("init", ["copy", "random"])
@pytest.mark.parametrize("n", [3, 4])
def test_top1_with_every_expert_a_source_is_exact_on_any_input(n: int, init: str,
                                                               capacity_factor: float | None) -> None:
    moe = MoE(6, 3, 8, top_k=1, capacity_factor=capacity_factor).double()
    opt = torch.optim.SGD(moe.parameters(), 0.1)
    _train(moe, opt, torch.randn(64, 6, dtype=torch.float64), torch.randn(64, 6, dtype=torch.float64), 3)
    x = torch.randn(4000, 6, dtype=torch.float64) * 3
    before = _outputs(moe, x)
    grow_experts(moe, n, init=init, optimizer=opt)  # no batch: nothing calibrated, exact anyway
    assert (_outputs(moe, x) - before).abs().max() <= 1e-10
    stats = moe.last_stats
    assert stats is not None
    if n == 4 or init == "random" or capacity_factor is not None:  # copies strictly below their source
        assert stats.routed_per_expert[3:] == [0] * n


def test_without_a_batch_only_tokens_in_the_documented_band_change() -> None:
    # top-1, one new expert from expert 0: sources drop by -log(1 - eta), so a token can change only
    # if its expert is the source and a non-source expert is within that of it.
    moe = MoE(4, 4, 8, top_k=1).double().eval()
    x = torch.randn(20000, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = moe.router(x)
    before = _outputs(moe, x)
    grow_experts(moe, 1, sources=[0])
    changed = (_outputs(moe, x) - before).abs().amax(dim=1) > 1e-10
    top2 = logits.topk(2, dim=1)
    band = (top2.indices[:, 0] == 0) & (top2.values[:, 0] - top2.values[:, 1] < -math.log1p(-SHARE_DEFAULT))
    assert bool(band.any()) and torch.equal(changed, band)

    # top-2: a token changes only if a copy is chosen for it.
    moe = MoE(4, 4, 8, top_k=2).double().eval()
    x = x * 4  # large logits: sources often lead the runner-up by more than -log(share / 2)
    before = _outputs(moe, x)
    grow_experts(moe, 2, sources=[1, 2], share=0.05)
    with torch.no_grad():
        copy_chosen = (moe.router(x).topk(2, dim=1).indices >= 4).any(dim=1)
    changed = (_outputs(moe, x) - before).abs().amax(dim=1) > 0
    assert bool(copy_chosen.any()) and not bool((changed & ~copy_chosen).any())


@pytest.mark.parametrize("init", ["copy", "random"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_optimizer_state_is_carried(top_k: int, init: str) -> None:
    moe = MoE(5, 4, 6, top_k=top_k)
    opt = torch.optim.Adam(moe.parameters(), 1e-2)
    x, y = torch.randn(64, 5), torch.randn(64, 5)
    _train(moe, opt, x, y, 3)
    fill_grads(moe, x, y, lambda out, t: adaptive_loss(moe, F.mse_loss, out, t))  # an edit between backward and step
    params = dict(moe.named_parameters())
    saved = {name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in params.items()}
    values = {name: p.detach().clone() for name, p in params.items()}
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    ids = {name: id(p) for name, p in params.items()}

    grow_experts(moe, 2, init=init, optimizer=opt, sources=[1, 3], share=0.25)
    assert {name: id(p) for name, p in moe.named_parameters()} == ids  # same Parameter objects
    check_optimizer_in_sync(moe, opt)
    for name in EXPERT_PARAMS:
        p, old = params[name], saved[name]
        assert torch.equal(opt.state[p]["step"], old["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            now = opt.state[p][key]
            assert torch.equal(now[:4], old[key])  # surviving experts: bit-identical
            if init == "copy":
                assert torch.equal(now[4:], old[key][[1, 3]])  # copies take their source's state
            else:  # fresh experts start with fresh state
                assert torch.equal(now[4:], torch.zeros_like(now[4:]))
        assert torch.equal(p.grad[:4], grads[name])  # type: ignore[index]
    # Values of surviving experts: untouched, except what the scheme moves on purpose (top-1:
    # the sources' router bias and output layers).
    for name in ("router.weight", "w1", "b1"):
        assert torch.equal(params[name].detach()[:4], values[name])
    if top_k == 2:
        for name in ("router.bias", "w2", "b2"):
            assert torch.equal(params[name].detach()[:4], values[name])
    else:
        kept = [0, 2]
        for name in ("router.bias", "w2", "b2"):
            assert torch.equal(params[name].detach()[kept], values[name][kept])
        assert torch.allclose(params["w2"].detach()[[1, 3]], values["w2"][[1, 3]] / 0.75)
    opt.step()  # the optimizer steps the grown parameters
    assert params["w1"].shape[0] == 6


def _teacher_task(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs from four regions, each with its own random target function."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(4, 6, generator=g)
    maps = torch.randn(4, 6, 6, generator=g)
    x = torch.randn(1024, 6, generator=g)
    y = torch.einsum("nij,nj->ni", maps[(x @ regions.T).argmax(1)], x).tanh()
    return x, y


@pytest.mark.parametrize(("top_k", "n", "preserve", "init", "capacity_factor"), [
    (1, 2, True, "copy", None),  # every expert a source, copies tie with their source
    (1, 2, True, "random", 1.25),  # every expert a source, copies log 3 below
    (2, 2, True, "copy", None),  # calibrated on the batch
    (2, 2, True, "random", None),
    (1, 1, False, "copy", None),  # an even split
])
def test_new_experts_get_chosen_and_trained(top_k: int, n: int, preserve: bool, init: str,
                                            capacity_factor: float | None) -> None:
    x, y = _teacher_task()
    torch.manual_seed(0)
    # The load-balancing loss is what pulls a new expert (no tokens yet) up; alpha = 0.1 makes it
    # win against the task loss's pull within a few hundred steps on this task.
    moe = MoE(6, 2, 12, top_k=top_k, capacity_factor=capacity_factor, aux_loss_coef=0.1)
    opt = torch.optim.Adam(moe.parameters(), 1e-2)

    def train(steps: int) -> None:
        moe.train()
        for i in range(steps):
            rows = torch.arange(i * 128, (i + 1) * 128) % 1024
            opt.zero_grad()
            adaptive_loss(moe, F.mse_loss, moe(x[rows]), y[rows]).backward()
            opt.step()

    train(100)
    edit = grow_experts(moe, n, init=init, optimizer=opt, preserve=preserve, batch=x[:512])
    if preserve:
        assert edit.max_output_change is not None and edit.max_output_change <= 1e-5
    new = moe.w1.detach()[2:].clone()
    train(300)
    with torch.no_grad():
        moe.eval()
        moe(x)
    stats = moe.last_stats
    assert stats is not None and all(count > 0 for count in stats.routed_per_expert[2:])
    assert (moe.w1.detach()[2:] - new).abs().amax(dim=(1, 2)).min() > 0


def test_fewer_new_experts_than_experts_top1_still_learn_their_router_rows() -> None:
    moe = MoE(6, 4, 8, top_k=1)
    opt = torch.optim.Adam(moe.parameters(), 1e-2)
    x, y = torch.randn(256, 6), torch.randn(256, 6)
    _train(moe, opt, x, y, 5)
    grow_experts(moe, 1, optimizer=opt, batch=x)
    row = moe.router.weight.detach()[4].clone()
    _train(moe, opt, x, y, 3)
    assert not torch.equal(moe.router.weight.detach()[4], row)  # alive, though not chosen yet


@pytest.mark.parametrize("top_k", [1, 2])
def test_even_split_when_not_preserving(top_k: int) -> None:
    moe = MoE(4, 3, 5, top_k=top_k).double()
    bias = moe.router.bias.detach().clone()
    x = torch.randn(256, 4, dtype=torch.float64)
    before = _outputs(moe, x)
    edit = grow_experts(moe, 2, preserve=False, sources=[0, 0], batch=x)
    third = math.log(3)
    assert torch.allclose(moe.router.bias.detach(), torch.cat([bias - torch.tensor([third, 0, 0]),
                                                               (bias[0] - third).repeat(2)]), atol=1e-14)
    assert edit.max_output_change == pytest.approx(float((_outputs(moe, x) - before).abs().max()))
    fresh = MoE(4, 3, 5, top_k=top_k)
    weight = fresh.router.weight.detach().clone()
    grow_experts(fresh, 1, init="random", preserve=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fresh.router.weight.detach()[:3], weight)
    assert not torch.equal(fresh.router.weight.detach()[3], weight[0])  # a fresh router row


def test_growth_and_then_hidden_width_edits() -> None:
    moe = MoE(4, 2, 5, top_k=2).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    grow_experts(moe, 2, batch=x)
    before = _outputs(moe, x)
    an.widen(moe, 0, 3, init="net2net")
    assert tuple(moe.w1.shape) == (4, 8, 4) and (_outputs(moe, x) - before).abs().max() <= 1e-10


def test_bad_requests_leave_everything_bit_identical() -> None:
    model = _model(1, None, torch.float32)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = torch.randn(32, 5), torch.randn(32, 3)
    _train(model, opt, x, y, 2)
    snap = capture(model, opt)
    bad: list[tuple[dict[str, object], str]] = [
        ({"n": 0}, "n must be"),
        ({"init": "net2net"}, "init must be"),
        ({"sources": [0, 9]}, "sources"),
        ({"sources": [0]}, "sources"),
        ({"share": 0.7}, "share"),
        ({"share": 0}, "share"),
        ({"preserve": "yes"}, "preserve"),
        ({"module": "0"}, "not an MoE"),
        ({"batch": "x"}, "batch"),
    ]
    for kwargs, match in bad:
        with pytest.raises(EditError, match=match):
            grow_experts(model, **{"n": 2, "optimizer": opt, **kwargs})  # type: ignore[arg-type]
        assert_identical(snap, capture(model, opt))
    with pytest.raises(EditError, match="exactly one MoE"):
        grow_experts(nn.Sequential(MoE(3, 2, 2), MoE(3, 2, 2)), 1)
    with pytest.raises(EditError, match="none"):
        grow_experts(nn.Linear(2, 2), 1)

    out = model(x)  # a graph still alive: the edit must fail after it started, and roll back
    with pytest.raises(EditError, match="graph"):
        grow_experts(model, 2, optimizer=opt)
    assert_identical(snap, capture(model, opt))
    out.sum().backward()


def test_named_layer_in_a_model_with_two_moes() -> None:
    model = nn.Sequential(MoE(3, 2, 4), nn.Linear(3, 3), MoE(3, 3, 4, top_k=2))
    edit = grow_experts(model, 1, module="2")
    assert (model[0].num_experts, model[2].num_experts) == (2, 4)
    assert (edit.group, edit.layer) == ("2.experts", 1)


def test_checkpoint_round_trip_after_growth(tmp_path: Path) -> None:
    moe = MoE(5, 3, 6, top_k=2, capacity_factor=1.5)
    x = torch.randn(40, 5)
    grow_experts(moe, 2, batch=x)
    an.save(tmp_path / "ckpt", moe)
    loaded, _ = an.load(tmp_path / "ckpt")
    assert isinstance(loaded, MoE) and loaded.spec() == moe.spec()
    assert loaded.num_experts == 5 and loaded.capacity_factor == pytest.approx(1.5 * 5 / 3)
    assert torch.equal(_outputs(loaded, x), _outputs(moe, x))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    experts=st.integers(1, 5),
    n=st.integers(1, 6),
    top_k=st.integers(1, 2),
    capacity_factor=st.sampled_from([None, 0.8, 1.5]),
    init=st.sampled_from(["copy", "random"]),
    seed=st.integers(0, 2**16),
)
def test_property_preserving_growth(experts: int, n: int, top_k: int, capacity_factor: float | None, init: str,
                                    seed: int) -> None:
    top_k = min(top_k, experts)
    torch.manual_seed(seed)
    moe = MoE(4, experts, 5, top_k=top_k, capacity_factor=capacity_factor).double()
    opt = torch.optim.Adam(moe.parameters(), 1e-2)
    x = torch.randn(48, 4, dtype=torch.float64)
    _train(moe, opt, x, torch.randn(48, 4, dtype=torch.float64), 2)
    before = _outputs(moe, x)
    grow_experts(moe, n, init=init, optimizer=opt, batch=x, generator=torch.Generator().manual_seed(seed))
    assert (_outputs(moe, x) - before).abs().max() <= 1e-10
    check_optimizer_in_sync(moe, opt)
