"""A short run of the config fuzzer (``make fuzz-configs`` runs it for minutes), and its own checks."""

from __future__ import annotations

import io

import yaml
from fuzz_configs import CONFIGS, Case, _check, fuzz, make_case, report, run_case, stopped, summary


def test_a_few_mutated_configs_run_or_are_refused_in_one_line() -> None:
    out = io.StringIO()
    done = fuzz(0, cases=24, out=out)
    assert len(done) == 24
    assert out.getvalue() == "", out.getvalue()  # a failing case prints its seed and config here
    assert all(c.problem is None for c in done)
    # Both outcomes occur with this seed: some configs still run, most are refused.
    assert any(c.rc == 0 for c in done) and any(c.rc == 2 for c in done)
    assert summary(done, 1.0).startswith("24 mutated configs in 1 s: ")


def test_cases_depend_on_the_seed_and_number_only() -> None:
    sources = sorted(CONFIGS.glob("*.yaml"))
    assert len(sources) >= 5
    a, b = make_case(3, 11, sources), make_case(3, 11, list(sources))
    assert (a.source, a.mutations, a.config) == (b.source, b.mutations, b.config) and a.mutations
    others = [make_case(3, n, sources) for n in range(12)]
    assert len({yaml.safe_dump(c.config) for c in others}) > 6
    for case in others:  # tiny: one epoch, and little generated data
        epochs = case.config.get("train", {}).get("epochs", 1) if isinstance(case.config.get("train"), dict) else 1
        assert not (isinstance(epochs, int) and epochs > 1)


def _judged(rc: int, stderr: str) -> Case:
    case = Case(7, 42, "wine.yaml", ["set train.epochs = 'x'"], {"data": {"name": "wine"}}, rc=rc, stderr=stderr)
    _check(case)
    return case


def test_the_checker_accepts_only_a_run_or_a_one_line_refusal() -> None:
    assert _judged(0, "").problem is None
    assert _judged(2, "adaptnet: error: train.epochs: must be an integer >= 1, got 'x'\n").problem is None
    assert _judged(1, "Traceback (most recent call last):\nTypeError: unhashable type: 'dict'\n").problem
    assert _judged(2, "adaptnet: error: a\nadaptnet: error: b\n").problem
    assert _judged(2, "adaptnet: warning: something\nadaptnet: error: model.hidden: bad\n").problem
    assert _judged(137, "").problem == "exit status 137"
    diverged = _judged(2, "adaptnet: warning: loss became nan at epoch 1, step 2: rolling back the epoch\n"
                          "adaptnet: error: the loss became nan at epoch 1, step 2 after 3 rollbacks; lower the lr\n")
    assert diverged.problem is None and stopped(diverged)


def test_a_failing_case_prints_the_seed_and_the_config_that_reproduces_it() -> None:
    case = _judged(1, "Traceback (most recent call last):\nTypeError: unhashable type: 'dict'\n")
    text = report(case)
    assert text.startswith("FAILED: seed 7 case 42 (a traceback, exit status 1); rerun: python "
                           "tests/fuzz/fuzz_configs.py --seed 7 --case 42\n")
    config = text.split("--- config ---\n")[1].split("--- stderr")[0]
    assert yaml.safe_load(config) == case.config and "TypeError: unhashable type" in text


def test_a_case_runs_in_a_subprocess_too() -> None:
    case = make_case(0, 0, sorted(CONFIGS.glob("*.yaml")))
    case.config["train"] = {"epochs": "x"}
    run_case(case, subprocess_timeout=120)
    assert case.rc == 2 and case.problem is None, case.stderr
    assert case.stderr.startswith("adaptnet: error: train.epochs: must be an integer >= 1, got 'x'")
