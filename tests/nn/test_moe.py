"""MoE: routing against a per-token reference loop, losses and capacity drops against hand
computations, the loss protocol with the Trainer, hidden-width edits, spec round trips."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptnet as an
from adaptnet.nn.losses import adaptive_loss
from adaptnet.nn.moe import MoE, expert_capacity
from adaptnet.nn.serialize import module_from_spec, module_spec


def _expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.linear(moe.act(F.linear(x, moe.w1[e], moe.b1[e])), moe.w2[e], moe.b2[e])


def _reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, no batching, no sorting: the definition of dropless routing."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = moe.router(x[n])
        probs = logits.softmax(-1)
        chosen = sorted(range(moe.num_experts), key=lambda e: -float(logits[e]))[: moe.top_k]
        total = sum(float(probs[e]) for e in chosen)
        for e in chosen:
            gate = probs[e] if moe.top_k == 1 else probs[e] / total
            out[n] += gate * _expert(moe, e, x[n])
    return out


def _router_identity(moe: MoE) -> None:
    """Router logits equal the token (``dim == num_experts``)."""
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(moe.num_experts, dtype=moe.router.weight.dtype))
        moe.router.bias.zero_()


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_dropless_equals_per_token_reference(top_k: int, activation: str) -> None:
    moe = MoE(5, 4, 7, top_k=top_k, activation=activation).double()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    for mode in (moe.train, moe.eval):
        mode()
        out = moe(x)
        assert out.shape == x.shape
        with torch.no_grad():
            assert torch.allclose(out, _reference(moe, x.reshape(-1, 5)).reshape(x.shape), atol=1e-12, rtol=0)
    stats = moe.last_stats
    assert stats is not None and stats.tokens == 18 and stats.dropped == 0 and stats.capacity is None
    assert sum(stats.tokens_per_expert) == 18 * top_k == sum(stats.routed_per_expert)


def test_load_balancing_and_z_loss_equal_hand_computation() -> None:
    tokens = [[2.0, 0.3, 0.0], [0.0, 1.0, 0.2], [1.0, 0.0, 0.5], [0.1, 0.0, 3.0]]
    x = torch.tensor(tokens, dtype=torch.float64)
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in tokens]
    mean_p = [sum(p[i] for p in probs) / 4 for i in range(3)]
    lse = [math.log(sum(math.exp(u) for u in row)) for row in tokens]

    moe = MoE(3, 3, 4, top_k=1, aux_loss_coef=0.1, z_loss_coef=0.0).double()
    _router_identity(moe)
    moe(x)
    f = [2 / 4, 1 / 4, 1 / 4]  # top-1 choices: experts 0, 1, 0, 2
    expected = 0.1 * 3 * sum(fi * pi for fi, pi in zip(f, mean_p, strict=True))
    assert moe.aux_loss().item() == pytest.approx(expected, abs=1e-14)  # type: ignore[union-attr]

    moe = MoE(3, 3, 4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.0).double()
    _router_identity(moe)
    moe(x)
    f = [3 / 8, 2 / 8, 3 / 8]  # top-2 choices: {0,1}, {1,2}, {0,2}, {2,0}: 8 assignments
    expected = 0.1 * 3 * sum(fi * pi for fi, pi in zip(f, mean_p, strict=True))
    assert moe.aux_loss().item() == pytest.approx(expected, abs=1e-14)  # type: ignore[union-attr]

    moe = MoE(3, 3, 4, top_k=1, aux_loss_coef=0.0, z_loss_coef=0.5).double()
    _router_identity(moe)
    moe(x)
    assert moe.aux_loss().item() == pytest.approx(0.5 * sum(v * v for v in lse) / 4, abs=1e-14)  # type: ignore[union-attr]

    # Perfect balance gives alpha, whatever the number of experts.
    moe = MoE(4, 4, 2, aux_loss_coef=0.3, z_loss_coef=0.0).double()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.zero_()
    moe(torch.randn(8, 4, dtype=torch.float64))  # all logits tie: top-1 picks expert 0, P_i = 1/4
    assert moe.aux_loss().item() == pytest.approx(0.3 * 4 * 1.0 * 0.25, abs=1e-14)  # type: ignore[union-attr]


def test_aux_loss_only_after_a_training_forward() -> None:
    moe = MoE(3, 2, 4)
    assert moe.aux_loss() is None and moe.last_stats is None
    moe(torch.randn(5, 3))
    assert moe.aux_loss() is not None
    moe.eval()
    moe(torch.randn(5, 3))
    assert moe.aux_loss() is None
    assert MoE(3, 2, 4, aux_loss_coef=0, z_loss_coef=0)(torch.randn(5, 3)) is not None
    quiet = MoE(3, 2, 4, aux_loss_coef=0, z_loss_coef=0)
    quiet(torch.randn(5, 3))
    assert quiet.aux_loss() is None


def test_capacity_drops_exactly_the_overflow_top1() -> None:
    moe = MoE(2, 2, 3, top_k=1, capacity_factor=1.0).double().eval()
    _router_identity(moe)
    # Tokens 0, 1, 2, 4, 5 choose expert 0; token 3 chooses expert 1. Capacity ceil(1 * 6 / 2) = 3.
    x = torch.tensor([[1, 0], [2, 0], [3, 0], [0, 1], [4, 0], [5, 0]], dtype=torch.float64)
    out = moe(x)
    dropless = MoE(2, 2, 3, top_k=1).double().eval()
    dropless.load_state_dict(moe.state_dict())
    full = dropless(x)
    assert torch.equal(out[[0, 1, 2, 3]], full[[0, 1, 2, 3]])
    assert torch.equal(out[[4, 5]], torch.zeros(2, 2, dtype=torch.float64))
    stats = moe.last_stats
    assert stats is not None
    assert (stats.capacity, stats.routed_per_expert, stats.tokens_per_expert) == (3, [5, 1], [3, 1])
    assert (stats.dropped, stats.dropped_tokens) == (2, 2)


def test_capacity_serves_first_choices_before_second_choices() -> None:
    moe = MoE(2, 2, 3, top_k=2, capacity_factor=0.5).double().eval()
    _router_identity(moe)
    # Capacity ceil(0.5 * 2 * 2 / 2) = 1. Token 0 prefers expert 1, token 1 prefers expert 0: each
    # expert serves its first-choice token (slot 0) and drops token 0's / token 1's second choice.
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    out = moe(x)
    gates = x.softmax(-1)  # renormalised over both experts = the full softmax here
    expected = torch.stack([gates[0, 1] * _expert(moe, 1, x[0]), gates[1, 0] * _expert(moe, 0, x[1])])
    assert torch.allclose(out, expected, atol=1e-14, rtol=0)
    stats = moe.last_stats
    assert stats is not None and (stats.dropped, stats.dropped_tokens, stats.tokens_per_expert) == (2, 0, [1, 1])


def test_capacity_formula() -> None:
    assert expert_capacity(1.25, 64, 1, 4) == 20
    assert expert_capacity(1.0, 10, 2, 3) == 7  # ceil(6.67)
    assert expert_capacity(1e-6, 10, 1, 4) == 1
    # A factor rescaled with the number of experts keeps the integer despite float noise.
    for tokens in range(1, 300):
        assert expert_capacity(1.1 * 7 / 3, tokens, 2, 7) == expert_capacity(1.1, tokens, 2, 3)


def test_backward_reaches_router_and_chosen_experts_only() -> None:
    moe = MoE(4, 3, 5, aux_loss_coef=0.0, z_loss_coef=0.0)
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([0.0, 0.0, -50.0]))  # expert 2 is never chosen
    moe(torch.randn(16, 4)).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.w1.grad is not None and moe.w1.grad[:2].abs().sum() > 0
    assert torch.equal(moe.w1.grad[2], torch.zeros_like(moe.w1.grad[2]))


def test_trainer_adds_the_aux_loss_by_itself() -> None:
    torch.manual_seed(0)
    moe = MoE(8, 4, 16, top_k=2, aux_loss_coef=1.0, z_loss_coef=0.1)
    model = nn.Sequential(nn.Linear(4, 8), moe, nn.Linear(8, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    # adaptive_loss = task loss + aux_loss, so the trainer sees the router's regularisers.
    out = model(x)
    task = F.mse_loss(out, y)
    assert adaptive_loss(model, F.mse_loss, out, y).item() == pytest.approx((task + moe.aux_loss()).item())  # type: ignore[operator]

    def nothing(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.sum() * 0.0  # no task loss: only aux_loss can move anything

    experts = moe.w1.detach().clone()
    router = moe.router.weight.detach().clone()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    history = an.Trainer(model, opt, nothing, batch_size=16).fit((x, y), epochs=2)
    assert all(v > 0 for v in history["train_loss"])  # what the trainer minimised was the aux loss
    assert not torch.equal(moe.router.weight, router)
    assert torch.equal(moe.w1.detach(), experts)  # the aux losses do not depend on the experts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), MoE(8, 4, 16, top_k=1), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    history = an.Trainer(model, opt, F.mse_loss, batch_size=16).fit((x, y), epochs=5)
    assert history["train_loss"][-1] < history["train_loss"][0]


@pytest.mark.parametrize("init", ["net2net", "gradmax"])
def test_widen_expert_hidden_units_is_exact(init: str) -> None:
    moe = MoE(4, 3, 6, top_k=2).double()
    opt = torch.optim.Adam(moe.parameters(), 1e-2)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        adaptive_loss(moe, F.mse_loss, moe(x), y).backward()
        opt.step()
    moe.eval()
    with torch.no_grad():
        before = moe(x)
    edit = an.widen(moe, 0, 5, init=init, optimizer=opt, batch=(x, y), loss_fn=F.mse_loss)
    assert moe.hidden == 11 and moe.widths == [11] and edit.widths_after == (11,)
    with torch.no_grad():
        assert (moe(x) - before).abs().max() <= 1e-10
    an.prune(moe, 0, keep=4, optimizer=opt)
    assert moe.hidden == 4 and tuple(moe.w2.shape) == (3, 4, 4)
    moe.train()
    opt.zero_grad()
    adaptive_loss(moe, F.mse_loss, moe(x), y).backward()
    opt.step()


def test_spec_round_trip_and_nesting(tmp_path: Path) -> None:
    moe = MoE(6, 5, 9, top_k=2, capacity_factor=1.5, aux_loss_coef=0.02, z_loss_coef=0.0, activation="silu")
    rebuilt = MoE.from_spec(moe.spec())
    assert rebuilt.spec() == moe.spec()
    model = nn.Sequential(nn.Linear(3, 6), moe, nn.Linear(6, 2))
    again = module_from_spec(module_spec(model))
    again.load_state_dict(model.state_dict())
    x = torch.randn(7, 3)
    model.eval()
    again.eval()
    assert torch.equal(model(x), again(x))
    an.save(tmp_path / "ckpt", moe.double(), optimizer=None)
    loaded, _ = an.load(tmp_path / "ckpt")
    loaded.eval()
    moe.eval()
    z = torch.randn(4, 6, dtype=torch.float64)
    assert isinstance(loaded, MoE) and torch.equal(loaded(z), moe(z))
    with pytest.raises(ValueError, match="format"):
        MoE.from_spec({**moe.spec(), "format": 99})


def test_checkpoint_loads_in_a_fresh_process(tmp_path: Path) -> None:
    moe = MoE(4, 3, 5, top_k=2).eval()
    an.save(tmp_path / "ckpt", moe)
    x = torch.randn(6, 4)
    torch.save({"x": x, "out": moe(x).detach()}, tmp_path / "io.pt")
    code = (  # one intra-op thread, as in this process (conftest): bit equality needs the same summation order
        "import torch, adaptnet as an, sys; torch.set_num_threads(1); m, _ = an.load(sys.argv[1]); m.eval();"
        "d = torch.load(sys.argv[2], weights_only=True); assert torch.equal(m(d['x']), d['out'])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt"), str(tmp_path / "io.pt")], check=True)


def test_empty_input_and_bad_arguments() -> None:
    moe = MoE(3, 2, 4)
    assert moe(torch.zeros(0, 3)).shape == (0, 3)
    assert moe.aux_loss() is None
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        moe(torch.zeros(2, 4))
    for kwargs, match in [({"top_k": 3}, "top_k"), ({"capacity_factor": 0}, "capacity_factor"),
                          ({"activation": "softmax"}, "activation"), ({"aux_loss_coef": -1}, "aux_loss_coef"),
                          ({"hidden": 0}, "hidden")]:
        with pytest.raises(ValueError, match=match):
            MoE(**{"dim": 3, "num_experts": 2, "hidden": 4, **kwargs})  # type: ignore[arg-type]
