"""The sequences recipe: its data on hand examples, padding that changes nothing, quick runs, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import adaptnet as an
from adaptnet.cli.main import main
from adaptnet.recipes import RecipeError, make_settings, run_recipe
from adaptnet.recipes._seqdata import PAD_TARGET, digits_of, encode_addition, encode_parity, sample, tokens
from adaptnet.recipes.sequences import QUICK, RECIPE, SequenceSettings, build_model, correct, evaluate


def test_parity_on_hand_examples() -> None:
    for bits, parity in [([1], 1), ([0], 0), ([1, 0, 1, 1], 1), ([1, 1, 0, 0, 1, 1], 0)]:
        x, y = encode_parity(bits)
        assert x.shape == (len(bits), 2) and y == parity
        assert x.argmax(dim=1).tolist() == bits and torch.equal(x.sum(dim=1), torch.ones(len(bits)))


def test_addition_on_hand_examples() -> None:
    assert digits_of(1234, 6) == [4, 3, 2, 1, 0, 0]
    x, y = encode_addition(47, 85, 2)  # 47 + 85 = 132: digits 2, 3, then the carry 1
    assert x.shape == (3, 20) and y.tolist() == [2, 3, 1]
    assert x[:, :10].argmax(dim=1).tolist() == [7, 4, 0] and x[:, 10:].argmax(dim=1).tolist() == [5, 8, 0]
    assert encode_addition(999, 1, 3)[1].tolist() == [0, 0, 0, 1]  # a carry through every digit
    assert encode_addition(0, 0, 1)[1].tolist() == [0, 0]
    assert encode_addition(5, 3, 4)[1].tolist() == [8, 0, 0, 0, 0]  # leading zeros
    with pytest.raises(ValueError, match="at most 2 digits"):
        encode_addition(100, 1, 2)


def _number(onehots: torch.Tensor) -> int:
    return sum(int(d) * 10**i for i, d in enumerate(onehots.argmax(dim=1).tolist()))


def test_sampled_batches_are_padded_and_right() -> None:
    g = torch.Generator().manual_seed(3)
    x, lengths, y = sample("addition", [1, 4, 2], g)
    assert x.shape == (3, 5, 20) and lengths.tolist() == [2, 5, 3] and y.shape == (3, 5)
    for i, n in enumerate(lengths.tolist()):
        a, b = _number(x[i, :n, :10]), _number(x[i, :n, 10:])
        assert sum(int(d) * 10**k for k, d in enumerate(y[i, :n].tolist())) == a + b
        assert x[i, n:].abs().sum() == 0 and (y[i, n:] == PAD_TARGET).all()
    x, lengths, y = sample("parity", [3, 1, 7, 2], g)
    assert x.shape == (4, 7, 2) and lengths.tolist() == [3, 1, 7, 2] and y.shape == (4,)
    for i, n in enumerate(lengths.tolist()):
        assert y[i].item() == int(x[i, :n, 1].sum()) % 2 and x[i, n:].abs().sum() == 0
    assert [tokens("addition", 4), tokens("parity", 4)] == [5, 4]


@pytest.mark.parametrize("task", ["parity", "addition"])
def test_a_sequence_predicts_the_same_alone_and_in_a_padded_batch(task: str) -> None:
    settings = SequenceSettings(task=task, hidden=16, max_ponder=4, lambda_p=0.3)
    torch.manual_seed(1)
    model = build_model(settings).double().eval()
    with torch.no_grad():
        model.halting.step.halt.bias.fill_(-1.0)  # halting spread over several ponder steps
    x, lengths, y = sample(task, [2, 9, 5, 1, 7], torch.Generator().manual_seed(0))
    x = x.double()
    x = x + torch.randn_like(x) * ~an.nn.lengths_to_mask(lengths, x.shape[1])[..., None]  # garbage on padding
    with torch.no_grad():
        batched, steps = model(x, lengths), model.last_steps
        assert steps is not None and steps.min() == 0 and steps.max() > 1  # padding idle, real tokens ponder
        for i, n in enumerate(lengths.tolist()):
            alone = model(x[i : i + 1, :n], lengths[i : i + 1])
            ref = batched[i : i + 1] if task == "parity" else batched[i : i + 1, :n]
            assert (alone - ref).abs().max() < 1e-10
            assert torch.equal(model.last_steps, steps[i : i + 1, :n])  # type: ignore[arg-type]
    right, token_right = correct(task, batched, y, lengths)
    if task == "addition":  # padded positions are not scored: each right fraction counts real tokens only
        hits = (batched.argmax(-1) == y).sum(dim=1)
        assert torch.allclose(token_right, hits / lengths)
    assert torch.equal(right, (token_right == 1).float())  # a sequence is right when all its tokens are


def _check_run(results: dict, out: Path, task: str) -> None:
    assert results["curve"][-1]["step"] == results["settings"]["steps"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == task and saved["settings"]["task"] == task
    table = saved["table"]
    assert [r["length"] for r in table] == sorted(QUICK["test_lengths"])
    assert [r["seen_in_training"] for r in table] == [n <= QUICK["train_max_len"] for n in QUICK["test_lengths"]]
    for r in table:
        assert 0 <= r["accuracy"] <= r["token_accuracy"] <= 1
        assert 1 <= r["ponder_per_token"] <= QUICK["max_ponder"]
        assert r["ponder_per_sequence"] == pytest.approx(r["ponder_per_token"] * r["tokens"], abs=0.02)
    for name in saved["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # The saved model is rebuilt from its spec and gives exactly the reported table again.
    model, _ = an.load(out / "model")
    settings = make_settings(RECIPE, saved["settings"])
    assert evaluate(model, settings) == table  # type: ignore[arg-type]


def test_quick_parity_run(tmp_path: Path) -> None:
    results = run_recipe("sequences", {"task": "parity"}, out=tmp_path / "parity", quick=True)
    _check_run(results, tmp_path / "parity", "parity")
    short = [r for r in results["table"] if r["length"] <= 3]
    assert min(r["accuracy"] for r in short) > 0.9  # it learnt something: chance is 0.5


def test_quick_addition_run(tmp_path: Path) -> None:
    # 200 of the quick run's 300 steps (test time): digits are learnt, carries not yet.
    results = run_recipe("sequences", {"task": "addition", "steps": 200}, out=tmp_path / "addition", quick=True)
    _check_run(results, tmp_path / "addition", "addition")
    seen = [r for r in results["table"] if r["seen_in_training"]]
    assert min(r["token_accuracy"] for r in seen) > 0.2  # chance is 0.1 per digit


def test_cli_runs_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    torch.set_num_threads(2)  # the run uses its own thread count (1) and gives the caller's back
    assert main(["recipe", "sequences", "--quick", "task=addition", "steps=10", "--out", str(out)]) == 0
    assert torch.get_num_threads() == 2
    printed = capsys.readouterr().out
    assert "ponder/token" in printed and f"results, settings and plots in {out}" in printed
    assert json.loads((out / "results.json").read_text())["settings"]["steps"] == 10


@pytest.mark.parametrize(("words", "message"), [
    (["task=sorting"], "setting task: expected one of 'parity', 'addition'"),
    (["train_min_len=5", "train_max_len=3"], "train_max_len (3) must be >= train_min_len (5)"),
    (["test_lengths=[1,2,12]"], "test_lengths must include a length above train_max_len (12)"),
    (["test_lengths=[]"], "test_lengths must be a non-empty list"),
    (["test_lengths=[0,20]"], "lengths >= 1"),
    (["test_lengths=[20,20]"], "must not repeat"),
    (["lambda_p=0"], "lambda_p must be in (0, 1]"),
    (["beta=-1"], "beta must be a finite number >= 0"),
    (["lr=0"], "lr must be a positive number"),
    (["max_ponder=0"], "max_ponder must be at least 1"),
    (["steps=-3"], "steps must be at least 1"),
    (["seed=-1"], "seed must be >= 0"),
    (["threads=0"], "threads must be at least 1"),
    (["hidden=wide"], "setting hidden: expected an integer"),
])
def test_bad_settings_exit_2_with_one_line(words: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe", "sequences", *words, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptnet: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()  # nothing was run or written


def test_settings_class_checks_itself() -> None:
    with pytest.raises(ValueError, match="task must be one of parity, addition"):
        SequenceSettings(task="sorting")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="recipe sequences: hidden must be at least 1"):
        make_settings(RECIPE, {"hidden": 0})
    assert dataclasses.replace(SequenceSettings(), task="addition").task == "addition"
