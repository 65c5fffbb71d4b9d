"""Configs that used to crash ``adaptnet train`` with a traceback (found by tests/fuzz/fuzz_configs.py):
values of the wrong type where a name is looked up, and sizes that cannot be allocated. Each is now
refused in one line, before anything is allocated or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptnet.cli.main import main
from adaptnet.train import build
from adaptnet.train.config import Config, ConfigError, load_config
from adaptnet.train.data import TaskInfo

WINE = TaskInfo(name="wine", task="classification", in_features=13, out_features=3, num_classes=3)
NAMES = "must be one of deepen_on_plateau, grow_every, grow_on_plateau, grow_on_signal, prune_to_budget"


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"data": {"name": "wine"}, **data})
    return str(info.value)


@pytest.mark.parametrize(("entry", "got"), [
    ({"name": {"name": "adam"}}, "got a mapping"),  # was TypeError: unhashable type: 'dict'
    ({"name": ["grow_on_plateau"], "by": 4}, "got ['grow_on_plateau']"),  # was TypeError: unhashable type: 'list'
    ({"name": None}, "got null"),
    ({"by": 4}, "got nothing"),
    ({"name": 3}, "got 3"),
])
def test_a_policy_name_of_the_wrong_type_is_refused(entry: dict, got: str) -> None:
    assert _error({"policies": [entry]}) == f"policies.0.name: {NAMES}, {got}"


def _config(**model: object) -> Config:
    return Config.from_dict({"data": {"name": "wine"}, "model": model})


def test_a_model_too_large_for_memory_is_refused_before_allocating() -> None:
    with pytest.raises(ConfigError) as info:
        build.build_model(_config(hidden=[10**12]), WINE)  # was: the allocator failed inside nn.Linear
    message = str(info.value)
    assert message.startswith("model.hidden: a model of at least 16,000,000,000,000 parameters needs about 256.0 TB "
                              "to train (64.0 TB of weights, then gradients and adam's state), more than the ")
    assert message.endswith("of memory available on cpu")
    with pytest.raises(ConfigError, match=r"^model\.hidden: a model of at least"):
        build.build_model(_config(hidden=[2**63]), WINE)  # beyond what torch can describe


def test_the_exact_count_decides_when_the_bound_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    # [8] on wine: 13*8 + 8*3 = 128 weights (the bound), 139 parameters with biases; adam keeps 2 states.
    cfg = _config(hidden=[8])
    monkeypatch.setattr(build, "available_memory", lambda device: 139 * 4 * 4 - 1)
    with pytest.raises(ConfigError) as info:
        build.build_model(cfg, WINE)
    assert str(info.value).startswith("model.hidden: a model of 139 parameters needs about 2.2 kB to train (556 B of "
                                      "weights, then gradients and adam's state), more than the 2.2 kB")
    monkeypatch.setattr(build, "available_memory", lambda device: 139 * 4 * 4)
    assert sum(p.numel() for p in build.build_model(cfg, WINE).parameters()) == 139
    sgd = Config.from_dict({"data": {"name": "wine"}, "model": {"hidden": [8]}, "optim": {"name": "sgd"}})
    monkeypatch.setattr(build, "available_memory", lambda device: 139 * 4 * 2)  # weights and gradients only
    build.build_model(sgd, WINE)


def test_a_growth_step_too_large_for_memory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def cfg(**policy: object) -> Config:
        return Config.from_dict({"data": {"name": "wine"}, "model": {"hidden": [8]}, "policies": [policy]})

    with pytest.raises(ConfigError, match=r"^policies\.0\.by: one edit of 1,000,000,000,000 units makes a model of "
                                          r"at least 16,000,000,000,139 parameters needs about 256\.0 TB"):
        build.build_model(cfg(name="grow_every", by=10**12), WINE)
    with pytest.raises(ConfigError, match=r"^policies\.0\.width: one edit of 1,000,000,000,000 units"):
        build.build_model(cfg(name="deepen_on_plateau", width=10**12), WINE)
    # Budgets bound the edit: these fit.
    build.build_model(cfg(name="grow_every", by=10**12, max_width=64), WINE)
    build.build_model(cfg(name="grow_on_plateau", by=10**12, max_params=5000), WINE)
    build.build_model(cfg(name="prune_to_budget", target_params=50), WINE)


def test_generated_data_too_large_for_memory_is_refused() -> None:
    cfg = Config.from_dict({"data": {"name": "synthetic", "samples": 10**12}})
    with pytest.raises(ConfigError, match=r"^data\.samples: 1,000,000,000,000 rows need about 640\.0 TB of memory"):
        build.load_splits(cfg)


@pytest.mark.parametrize(("override", "expected"), [
    ("policies.0.name={name: adam}", f"policies.0.name: {NAMES}, got a mapping"),
    ("policies.0.name=[grow_on_plateau]", f"policies.0.name: {NAMES}, got ['grow_on_plateau']"),
    ("model.hidden=[1000000000000]", "model.hidden: a model of at least 16,000,000,000,000 parameters needs about"),
])
def test_the_three_crashes_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     override: str, expected: str) -> None:
    config = Path(__file__).resolve().parents[2] / "examples" / "configs" / "wine.yaml"
    load_config(config)  # the shipped config itself is valid
    rc = main(["train", str(config), override, "train.epochs=1", "--out", str(tmp_path / "run"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err and not out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"adaptnet: error: {expected}"), err
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize(("value", "got"), [([1], "[1]"), ({"a": 1}, "a mapping"), (1.5, "1.5")])
def test_a_union_option_of_the_wrong_type_names_the_union(value: object, got: str) -> None:
    # was: "policies.0.where.str: Input should be a valid string, got [1] (and 1 more problem)"
    message = _error({"policies": [{"name": "grow_on_plateau", "where": value}]})
    assert message == f"policies.0.where: must be a string or an integer, got {got}"
