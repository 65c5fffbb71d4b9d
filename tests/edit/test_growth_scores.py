"""Growth initialisers and scores: GradMax optimality against brute force, firefly's splitting
score against per-sample gradients, the growth score, and FLOPs-aware exactness."""

from __future__ import annotations

import math

import torch
from torch import nn

import adaptnet as an
from adaptnet.edit.init import growth_score
from adaptnet.edit.splitting import splitting_scores


def _setup(out_features: int = 2) -> tuple[an.AdaptiveMLP, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(3)
    model = an.AdaptiveMLP(4, [3], out_features).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    y = torch.randn(64, out_features, dtype=torch.float64)
    return model, (x, y)


def _incoming_grad_norm(model: an.AdaptiveMLP, batch: tuple[torch.Tensor, torch.Tensor], outgoing: torch.Tensor
                        ) -> float:
    """Gradient norm of one new zero-fan-in unit with the given outgoing weights (measured by autograd)."""
    trial = an.AdaptiveMLP.from_spec(model.spec()).double()
    trial.load_state_dict(model.state_dict())
    an.widen(trial, 0, 1, init="zero")
    block, head = trial.blocks[0], trial.head
    with torch.no_grad():
        block.op.weight[-1].zero_()
        block.op.bias[-1] = 0.0
        head.weight[:, -1] = outgoing
    loss = nn.functional.mse_loss(trial(batch[0]), batch[1])
    loss.backward()
    grads = [block.op.weight.grad[-1], block.op.bias.grad[-1:]]
    return float(torch.cat([g.flatten() for g in grads]).norm())


def test_gradmax_outgoing_weights_maximise_the_gradient_norm_brute_force() -> None:
    model, batch = _setup(out_features=2)
    an.widen(model, 0, 1, init="gradmax", batch=batch, loss_fn=nn.functional.mse_loss)
    chosen = model.head.weight[:, -1].detach().clone()
    unit = chosen / chosen.norm()
    model_before = an.AdaptiveMLP(4, [3], 2).double()  # rebuild the pre-edit model for the brute force
    model_before.blocks[0].op.weight.data = model.blocks[0].op.weight.data[:3].clone()
    model_before.blocks[0].op.bias.data = model.blocks[0].op.bias.data[:3].clone()
    model_before.head.weight.data = model.head.weight.data[:, :3].clone()
    model_before.head.bias.data = model.head.bias.data.clone()
    best = _incoming_grad_norm(model_before, batch, unit)
    angles = torch.linspace(0, 2 * math.pi, 721, dtype=torch.float64)
    brute = max(_incoming_grad_norm(model_before, batch, torch.stack([a.cos(), a.sin()])) for a in angles)
    assert best >= brute - 1e-9  # no unit-norm direction on a 0.5 degree grid does better
    assert best > 0


def test_gradmax_is_exact_and_new_units_learn() -> None:
    model, batch = _setup()
    model.eval()
    with torch.no_grad():
        before = model(batch[0])
    an.widen(model, 0, 2, init="gradmax", batch=batch, loss_fn=nn.functional.mse_loss)
    with torch.no_grad():
        assert (model(batch[0]) - before).abs().max() <= 1e-10
    assert model.head.weight[:, 3:].abs().sum() > 0  # outgoing weights set
    assert model.blocks[0].op.weight[3:].abs().sum() == 0  # incoming weights zero
    nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
    assert model.blocks[0].op.weight.grad[3:].abs().sum() > 0  # ...and they receive a gradient


def test_growth_score_is_the_gradient_norm_gradmax_units_receive() -> None:
    model, batch = _setup()
    group = next(iter(an.unit_groups(model).values()))
    score = growth_score(model, group, 1, batch, nn.functional.mse_loss)
    an.widen(model, 0, 1, init="gradmax", batch=batch, loss_fn=nn.functional.mse_loss)
    nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
    block = model.blocks[0]
    received = torch.cat([block.op.weight.grad[-1], block.op.bias.grad[-1:]]).norm()
    assert abs(float(received) - score) <= 1e-9 * max(1.0, score)


def test_splitting_score_is_the_variance_of_per_sample_gradients() -> None:
    model, (x, y) = _setup()
    model.eval()
    scores = splitting_scores(model, next(iter(an.unit_groups(model).values())), (x, y), nn.functional.mse_loss)
    per_sample = []
    for i in range(x.shape[0]):
        pre = model.blocks[0].op(x[i : i + 1])  # (1, 3) pre-activations
        pre.retain_grad()
        out = model.head(model.blocks[0].post(model.blocks[0].act(model.blocks[0].norm(pre))))
        nn.functional.mse_loss(out, y[i : i + 1]).backward()
        per_sample.append(pre.grad[0])
    reference = torch.stack(per_sample).var(dim=0, correction=0)
    assert torch.allclose(scores, reference, rtol=1e-9, atol=1e-12)


def test_firefly_splits_the_highest_scoring_units_exactly() -> None:
    model, batch = _setup()
    model.eval()
    scores = splitting_scores(model, next(iter(an.unit_groups(model).values())), batch, nn.functional.mse_loss)
    with torch.no_grad():
        before = model(batch[0])
    top = int(scores.argmax())
    an.widen(model, 0, 1, init="firefly", batch=batch, loss_fn=nn.functional.mse_loss, noise=0.1)
    weight = model.blocks[0].op.weight
    assert torch.equal(weight[3], weight[top])  # the copy is of the best-scoring unit
    with torch.no_grad():
        assert (model(batch[0]) - before).abs().max() <= 1e-10
