"""EarlyExit: compacted inference equals running each sample alone, the training loss weights
every exit, the Trainer uses it, checkpoints round-trip, calibration keeps its accuracy bound."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.nn.early_exit import EarlyExit, calibrate_threshold
from adaptnet.nn.losses import adaptive_loss
from adaptnet.train import checkpoint as ck
from adaptnet.train.trainer import Trainer

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
CRITERIA = ("confidence", "entropy", "patience")


def _data(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes from a random two-layer teacher: some rows easy, some hard."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.Generator().manual_seed(123)
    w1, w2 = torch.randn(10, 16, generator=teacher), torch.randn(16, 4, generator=teacher)
    x = torch.randn(n, 10, generator=g, dtype=torch.float64)
    y = (torch.tanh(x @ w1.double()) @ w2.double()).argmax(dim=1)
    return x.to(dtype), y


@pytest.fixture(scope="module")
def trained() -> EarlyExit:
    """A float64 EarlyExit MLP trained a little, so that its exits disagree in interesting ways."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: before the per-test one-thread fixture (20x faster here)
    model = EarlyExit.mlp(10, [24, 24, 24, 24], 4).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = _data(512)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        adaptive_loss(model, F.cross_entropy, model(x), y).backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def _cnn() -> EarlyExit:
    """Image features (B, C, H, W) between blocks, BatchNorm in eval mode, pooled heads."""
    blocks = [nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
              nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(6, 8, 3, stride=2), nn.ReLU())]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5)) for c in (6, 6, 8)]
    model = EarlyExit(blocks, heads).double()
    with torch.no_grad():  # non-trivial running statistics
        model.blocks[0][1].running_mean.uniform_(-0.5, 0.5)
        model.blocks[0][1].running_var.uniform_(0.5, 2.0)
        for head in model.heads:
            head[2].weight.mul_(8)  # spread the confidences
    return model.eval()


def _set_mixed_threshold(model: EarlyExit, x: torch.Tensor, criterion: str) -> None:
    """A threshold at which some rows leave at the first exit and some do not."""
    if criterion == "patience":
        model.set_criterion("patience", 1)
        return
    with torch.no_grad():
        z = model.exit_logits(x)[0]
    p = torch.softmax(z, dim=1)
    value = p.amax(dim=1) if criterion == "confidence" else -(p * p.log()).sum(dim=1)
    model.set_criterion(criterion, float(value.quantile(0.7 if criterion == "confidence" else 0.3)))


# -- compaction ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_compaction_equals_running_each_sample_alone(trained: EarlyExit, kind: str, criterion: str) -> None:
    if kind == "mlp":
        model, x = trained, _data(300, seed=1)[0]
    else:
        model, x = _cnn(), torch.randn(120, 3, 7, 7, dtype=torch.float64)
    _set_mixed_threshold(model, x, criterion)
    with torch.no_grad():
        out = model(x)
        stats = model.last_stats
        assert stats is not None
        alone = []
        for row in x:
            single = model(row[None])
            alone.append((single[0], int(model.last_stats.exits[0])))  # type: ignore[union-attr]
        every = model.exit_logits(x)
    exits = stats.exits.tolist()
    assert exits == [e for _, e in alone]  # the same decision for every sample, exactly
    assert sum(c > 0 for c in stats.counts) >= 2, stats.counts  # the test exercises compaction
    assert stats.counts == [exits.count(i) for i in range(model.num_exits)]
    assert (out - torch.stack([o for o, _ in alone])).abs().max() <= 1e-10
    at_exit = torch.stack([every[e][i] for i, e in enumerate(exits)])
    assert (out - at_exit).abs().max() <= 1e-10  # each row is its exit's logits


def test_patience_leaves_when_predictions_agree(trained: EarlyExit) -> None:
    x = _data(200, seed=2)[0]
    model = trained
    model.set_criterion("patience", 2)
    with torch.no_grad():
        model(x)
        preds = torch.stack([z.argmax(dim=1) for z in model.exit_logits(x)])  # (n, N)
    exits = model.last_stats.exits  # type: ignore[union-attr]
    for i, e in enumerate(exits.tolist()):
        run = next((k for k in range(2, model.num_exits - 1) if preds[k - 2, i] == preds[k - 1, i] == preds[k, i]),
                   model.num_exits - 1)
        assert e == run
    model.set_criterion("confidence")


# -- statistics ----------------------------------------------------------------------------

def test_stats_nobody_leaves_early_and_everybody_leaves_first() -> None:
    model = EarlyExit.mlp(6, [8, 12, 16], 3).eval()
    x = torch.randn(40, 6)
    per_exit = [6 * 8 + 8 * 3, 8 * 12 + 12 * 3, 12 * 16 + 16 * 3]  # block + head MACs per sample
    assert model.exit_macs(x) == [sum(per_exit[:i + 1]) for i in range(3)]
    for criterion, never in (("confidence", 2.0), ("entropy", -1.0), ("patience", 2)):
        model.set_criterion(criterion, never)
        model(x)
        stats = model.last_stats
        assert stats is not None
        assert stats.flops_fraction == 1.0 and stats.mean_depth == 3.0 and stats.counts == [0, 0, 40]
        assert stats.macs == stats.full_macs == 40 * sum(per_exit)
    for criterion, always in (("confidence", 0.0), ("entropy", 10.0), ("patience", 0)):
        model.set_criterion(criterion, always)
        out = model(x)
        stats = model.last_stats
        assert stats is not None and stats.counts == [40, 0, 0] and stats.mean_depth == 1.0
        assert stats.flops_fraction == pytest.approx(per_exit[0] / sum(per_exit))
        assert torch.equal(stats.exits, torch.zeros(40, dtype=torch.long))
        assert torch.allclose(out, model.exit_logits(x)[0], atol=1e-6)
    assert stats.to_dict()["counts"] == [40, 0, 0]
    model(x[:0])
    assert model.last_stats is not None and model.last_stats.counts == [0, 0, 0]


def test_full_forward_and_training_mode_return_the_final_logits() -> None:
    model = EarlyExit.mlp(6, [8, 8], 3, threshold=0.0).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    full = model.forward_full(x)
    assert torch.equal(model.train()(x), full)
    assert torch.equal(model.exit_logits(x)[-1], full)
    assert not torch.allclose(model.eval()(x), full)  # eval leaves at the first exit


# -- training loss -------------------------------------------------------------------------

def test_training_loss_is_the_weighted_sum_of_the_exits() -> None:
    # Identity blocks; head 0 gives logits (1, 0), head 1 gives (0, 2), for x = (1, 0); target 0.
    heads = [nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)]
    with torch.no_grad():
        heads[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        heads[1].weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    model = EarlyExit([nn.Identity(), nn.Identity()], heads, exit_weights=[1, 3]).double().train()
    assert model.exit_weights == (0.25, 0.75)
    x, y = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0])
    out = model(x)
    assert out.tolist() == [[0.0, 2.0]]
    expected = 0.25 * math.log(1 + math.exp(-1)) + 0.75 * math.log(1 + math.exp(2))
    assert adaptive_loss(model, F.cross_entropy, out, y).item() == pytest.approx(expected, abs=1e-12)
    assert EarlyExit([nn.Identity()] * 4, [nn.Linear(2, 2)] * 4).exit_weights == (0.25,) * 4  # default: equal


def test_task_loss_needs_a_training_forward() -> None:
    model = EarlyExit.mlp(4, [5], 2).eval()
    model(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="training mode"):
        model.task_loss(F.cross_entropy, torch.zeros(3, dtype=torch.long))


def test_trainer_trains_every_exit_through_task_loss() -> None:
    torch.manual_seed(0)
    model = EarlyExit.mlp(10, [32, 32, 32], 4)
    x, y = _data(384, dtype=torch.float32)
    xv, yv = _data(128, seed=5, dtype=torch.float32)
    calls = []
    original = model.task_loss

    def spy(loss_fn, targets):  # type: ignore[no-untyped-def]
        calls.append(len(targets))
        return original(loss_fn, targets)

    model.task_loss = spy  # type: ignore[method-assign]
    first_head = model.heads[0].weight.detach().clone()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy,
                      metrics=["accuracy"], batch_size=64, device="cpu")
    history = trainer.fit((x, y), (xv, yv), epochs=4)
    assert len(calls) == trainer.step == 4 * 6  # one task_loss per optimizer step
    assert not torch.equal(model.heads[0].weight, first_head)  # the first exit's head was trained
    model.eval()
    with torch.no_grad():
        first_exit_accuracy = (model.exit_logits(xv)[0].argmax(dim=1) == yv).double().mean().item()
    assert first_exit_accuracy > 0.5 and history["val_accuracy"][-1] > 0.5  # chance is about 0.25


# -- specs and checkpoints -----------------------------------------------------------------

FRESH_PROCESS = """
import sys, torch
import adaptnet
from adaptnet.train.checkpoint import load
for path in sys.argv[1:]:
    model, state = load(path)
    model.eval()
    with torch.no_grad():
        out = model(state["x"])
    torch.save({"spec": model.spec(), "out": out, "exits": model.last_stats.exits}, path + ".out.pt")
"""


def test_checkpoint_round_trips_through_a_fresh_process(trained: EarlyExit, tmp_path: Path) -> None:
    x = _data(100, seed=3)[0]
    expected = {}
    for criterion in CRITERIA:  # one fresh process for all three
        _set_mixed_threshold(trained, x, criterion)
        model = EarlyExit(trained.blocks, trained.heads, trained.criterion, trained.threshold,
                          exit_weights=[1, 1, 2, 4])
        ck.save(tmp_path / criterion, model, x=x)
        with torch.no_grad():
            expected[criterion] = (model.spec(), model.eval()(x), model.last_stats.exits)  # type: ignore[union-attr]
    trained.set_criterion("confidence")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, *(str(tmp_path / c) for c in CRITERIA)], check=True,
                   env=ENV, timeout=300)
    for criterion, (spec, out, exits) in expected.items():
        got = torch.load(tmp_path / f"{criterion}.out.pt", weights_only=True)
        assert got["spec"] == spec and spec["criterion"] == criterion
        assert spec["exit_weights"] == [0.125, 0.125, 0.25, 0.5]
        assert got["out"].dtype == torch.float64 and torch.equal(got["out"], out)
        assert torch.equal(got["exits"], exits)


def test_spec_round_trip_and_errors() -> None:
    model = EarlyExit.mlp(5, [7, 9], 3, activation="gelu", criterion="patience", threshold=1)
    rebuilt = EarlyExit.from_spec(model.spec())
    assert rebuilt.spec() == model.spec() and rebuilt.threshold == 1 and isinstance(rebuilt.threshold, int)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(8, 5)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="not EarlyExit"):
        EarlyExit.from_spec({**model.spec(), "type": "AdaptiveMLP"})
    with pytest.raises(ValueError, match="one head per block"):
        EarlyExit([nn.Identity()], [])
    with pytest.raises(ValueError, match="criterion must be one of"):
        EarlyExit([nn.Identity()], [nn.Identity()], criterion="margin")
    with pytest.raises(ValueError, match="integer >= 0"):
        EarlyExit([nn.Identity()], [nn.Identity()], criterion="patience", threshold=0.9)
    with pytest.raises(ValueError, match="finite number"):
        model.set_criterion("entropy", float("nan"))
    with pytest.raises(ValueError, match="one weight per exit"):
        EarlyExit([nn.Identity()], [nn.Identity()], exit_weights=[1, 2])
    with pytest.raises(ValueError, match="must not all be 0"):
        EarlyExit([nn.Identity()], [nn.Identity()], exit_weights=[0])
    with pytest.raises(ValueError, match="hidden\\[1\\]"):
        EarlyExit.mlp(5, [7, 0], 3)
    with pytest.raises(ValueError, match="cannot describe"):
        EarlyExit([nn.Bilinear(2, 2, 2)], [nn.Identity()]).spec()
    assert EarlyExit([nn.Identity()], [nn.Identity()], criterion="patience").threshold == 2


# -- calibration ---------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("drop", [0.0, 0.03])
def test_calibration_respects_the_accuracy_bound(trained: EarlyExit, criterion: str, drop: float) -> None:
    x, y = _data(400, seed=4)
    trained.set_criterion(criterion)
    threshold, report = calibrate_threshold(trained, x, y, max_accuracy_drop=drop)
    assert report["threshold"] == threshold and report["criterion"] == criterion
    assert len(report["candidates"]) > 2
    trained.threshold = threshold
    with torch.no_grad():
        out = trained(x)
    stats = trained.last_stats
    assert stats is not None
    accuracy = (out.argmax(dim=1) == y).double().mean().item()
    assert accuracy >= report["final_accuracy"] - drop - 1e-12
    # The simulation took exactly the decisions of the compacted forward pass.
    assert accuracy == pytest.approx(report["accuracy"], abs=1e-12)
    assert stats.counts == report["exit_counts"]
    assert stats.flops_fraction == pytest.approx(report["flops_fraction"], abs=1e-12)
    assert stats.mean_depth == pytest.approx(report["mean_depth"], abs=1e-12)
    # The cheapest allowed: nothing cheaper kept the accuracy.
    cheaper = [r for r in report["candidates"] if r["flops_fraction"] < report["flops_fraction"]]
    assert all(r["accuracy"] < report["final_accuracy"] - drop for r in cheaper)
    if drop > 0:
        assert report["flops_fraction"] < 1.0  # this model has exits that are good enough
    trained.set_criterion("confidence")


def test_calibration_with_candidates_falls_back_to_no_early_exit(trained: EarlyExit) -> None:
    x, y = _data(200, seed=6)
    trained.set_criterion("confidence")
    threshold, report = calibrate_threshold(trained, x, y, max_accuracy_drop=0.0, candidates=[0.0])
    first_ok = report["candidates"][0]["accuracy"] >= report["final_accuracy"]
    assert threshold == (0.0 if first_ok else 2.0)
    assert [r["threshold"] for r in report["candidates"]] == [0.0, 2.0]
    assert trained.training is False and trained.threshold == 0.9  # the model is left as it was
    with pytest.raises(ValueError, match="class indices"):
        calibrate_threshold(trained, x, y[:5])
    with pytest.raises(TypeError, match="needs an EarlyExit"):
        calibrate_threshold(nn.Linear(2, 2), x, y)  # type: ignore[arg-type]
