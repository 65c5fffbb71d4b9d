"""PonderNet and ACT: losses against hand computations, compaction against per-sample runs,
variable-length sequences, Trainer and checkpoint integration."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adaptnet as an
from adaptnet.nn.halting import ACT, PonderNet, RecurrentStep
from adaptnet.nn.losses import adaptive_loss
from adaptnet.nn.sequences import PerToken, lengths_to_mask, pad_sequences


class ScriptedStep(nn.Module):
    """A step with fixed halting probabilities per step and outputs equal to the step index."""

    def __init__(self, lambdas: list[float]):
        super().__init__()
        self.lambdas = lambdas
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, h: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = 0 if h is None else int(h[0]) + 1
        lam = torch.full((x.shape[0],), self.lambdas[n], dtype=x.dtype)
        y = self.scale * torch.full((x.shape[0], 1), float(n + 1), dtype=x.dtype)
        return torch.full((x.shape[0],), float(n), dtype=x.dtype), y, torch.logit(lam)


def test_pondernet_losses_equal_hand_computation() -> None:
    lambdas = [0.5, 0.25, 0.3]
    model = PonderNet(ScriptedStep(lambdas), max_steps=3, lambda_p=0.5, beta=0.1).double()
    x = torch.zeros(2, 1, dtype=torch.float64)
    target = torch.tensor([[2.0], [0.0]], dtype=torch.float64)
    out = model(x)
    p = [0.5, 0.5 * 0.25, 0.5 * 0.75 * 1.0]  # the last step takes the remaining mass
    assert torch.allclose(out, torch.full((2, 1), sum(pn * (n + 1) for n, pn in enumerate(p)), dtype=torch.float64))
    expected = sum(pn * ((n + 1 - 2.0) ** 2 + (n + 1 - 0.0) ** 2) / 2 for n, pn in enumerate(p))
    assert model.task_loss(nn.functional.mse_loss, target).item() == pytest.approx(expected, abs=1e-12)
    prior = [0.5, 0.25, 0.125]
    prior = [q / sum(prior) for q in prior]
    kl = sum(pn * math.log(pn / q) for pn, q in zip(p, prior, strict=True))
    assert model.aux_loss().item() == pytest.approx(0.1 * kl, abs=1e-12)  # type: ignore[union-attr]
    total = adaptive_loss(model, nn.functional.mse_loss, out, target)
    assert total.item() == pytest.approx(expected + 0.1 * kl, abs=1e-12)


def test_pondernet_deterministic_halting_at_median() -> None:
    model = PonderNet(ScriptedStep([0.3, 0.4, 0.9, 0.5]), max_steps=4).double().eval()
    out = model(torch.zeros(3, 1, dtype=torch.float64))
    # cumulative halting: 0.3, 1 - 0.7 * 0.6 = 0.58 >= 0.5 -> halts at step 2
    assert model.last_steps.tolist() == [2, 2, 2]  # type: ignore[union-attr]
    assert out.flatten().tolist() == [2.0, 2.0, 2.0]


def test_act_output_and_ponder_cost_equal_hand_computation() -> None:
    model = ACT(ScriptedStep([0.3, 0.4, 0.5]), max_steps=3, tau=0.1, eps=0.01).double()
    out = model(torch.zeros(2, 1, dtype=torch.float64))
    # 0.3 + 0.4 = 0.7 < 0.99; + 0.5 >= 0.99 -> N = 3, R = 1 - 0.7 = 0.3
    assert out.flatten().tolist() == pytest.approx([0.3 * 1 + 0.4 * 2 + 0.3 * 3] * 2)
    assert model.aux_loss().item() == pytest.approx(0.1 * (3 + 0.3))  # type: ignore[union-attr]
    assert model.last_steps.tolist() == [3, 3]  # type: ignore[union-attr]


@pytest.mark.parametrize("cls", [PonderNet, ACT])
def test_compaction_equals_running_each_sample_alone(cls: type) -> None:
    model = cls(RecurrentStep(4, 16, 3), max_steps=8).double().eval()
    with torch.no_grad():
        model.step.halt.bias.fill_(-1.5)  # halting spread over several steps
        x = torch.randn(40, 4, dtype=torch.float64) * 3
        out = model(x)
        steps = model.last_steps.clone()
        assert steps.min() < steps.max()  # the batch really was compacted
        for i in range(x.shape[0]):
            alone = model(x[i : i + 1])
            assert model.last_steps.item() == steps[i].item()
            assert (alone - out[i : i + 1]).abs().max() < 1e-10


def test_sampled_mode_takes_random_steps() -> None:
    model = PonderNet(RecurrentStep(4, 8, 2), max_steps=10, mode="sampled").eval()
    with torch.no_grad():
        model(torch.randn(200, 4))
    assert 1 <= model.last_steps.float().mean() < 10  # type: ignore[union-attr]
    assert model.last_steps.unique().numel() > 1  # type: ignore[union-attr]


def _sequences(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [torch.randn(int(length), 3, dtype=torch.float64) for length in torch.randint(1, 8, (n,))]
    return pad_sequences(seqs)


@pytest.mark.parametrize("cls", [PonderNet, ACT])
@pytest.mark.parametrize("output", ["all", "last"])
def test_per_token_halting_ignores_padding(cls: type, output: str) -> None:
    x, lengths = _sequences()
    model = PerToken(cls(RecurrentStep(3, 8, 2), max_steps=5), output=output).double().eval()
    with torch.no_grad():
        out = model(x, lengths)
        steps = model.last_steps
        padded = model(torch.cat([x, torch.randn(x.shape[0], 3, 3, dtype=torch.float64)], dim=1), lengths)
        assert torch.equal(out, padded) if output == "last" else torch.equal(out, padded[:, : x.shape[1]])
        for i in range(x.shape[0]):
            alone = model(x[i : i + 1, : lengths[i]], lengths[i : i + 1])
            ref = out[i : i + 1] if output == "last" else out[i : i + 1, : lengths[i]]
            assert (alone - ref).abs().max() < 1e-10
    assert steps is not None and torch.equal(steps > 0, lengths_to_mask(lengths, x.shape[1]))


def test_per_token_pondernet_trains_with_the_trainer() -> None:
    x, lengths = _sequences(32)
    y = (x[:, 0, 0] > 0).long()
    model = _SeqClassifier(PerToken(PonderNet(RecurrentStep(3, 8, 2), max_steps=4)))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.float(), lengths, y), batch_size=8)
    model.float()
    losses = []
    for _ in range(3):
        for xb, lb, yb in loader:
            opt.zero_grad()
            out = model((xb, lb))
            loss = adaptive_loss(model, nn.functional.cross_entropy, out, yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert model.inner.halting.aux_loss() is None  # PerToken owns the regulariser: counted once


class _SeqClassifier(nn.Module):
    def __init__(self, inner: PerToken):
        super().__init__()
        self.inner = inner

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.inner(*batch)


def test_trainer_trains_pondernet_on_parity_like_data(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-1, 2, (256, 6), generator=g).float()
    y = ((x == 1).sum(dim=1) % 2).long()
    torch.manual_seed(0)
    model = PonderNet(RecurrentStep(6, 32, 2), max_steps=6, lambda_p=0.3)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    trainer = an.Trainer(model, opt, nn.functional.cross_entropy, metrics=("accuracy",), run_dir=tmp_path,
                         batch_size=64)
    history = trainer.fit((x[:192], y[:192]), (x[192:], y[192:]), epochs=3)
    assert history["train_loss"][-1] < history["train_loss"][0]
    restored, _ = an.load(tmp_path / "checkpoints" / sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1])
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    model = PerToken(ACT(RecurrentStep(3, 8, 2), max_steps=4), output="all").eval()
    an.save(tmp_path / "ckpt", model)
    x, lengths = _sequences(5)
    torch.save({"x": x.float(), "lengths": lengths, "out": model(x.float(), lengths).detach()}, tmp_path / "io.pt")
    code = (  # one intra-op thread, as in this process (conftest): bit equality needs the same summation order
        "import torch, adaptnet as an, sys; torch.set_num_threads(1); m, _ = an.load(sys.argv[1]); m.eval();"
        "d = torch.load(sys.argv[2], weights_only=True); assert torch.equal(m(d['x'], d['lengths']), d['out'])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt"), str(tmp_path / "io.pt")], check=True)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        PonderNet(RecurrentStep(2, 2, 1), max_steps=0)
    with pytest.raises(ValueError, match="lambda_p"):
        PonderNet(RecurrentStep(2, 2, 1), lambda_p=0)
    with pytest.raises(ValueError, match="mode"):
        PonderNet(RecurrentStep(2, 2, 1), mode="greedy")
    with pytest.raises(ValueError, match="eps"):
        ACT(RecurrentStep(2, 2, 1), eps=1.0)
    with pytest.raises(TypeError):
        PerToken(nn.Linear(2, 2))  # type: ignore[arg-type]
