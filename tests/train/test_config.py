"""Config: YAML + dotted overrides -> typed Config; every mistake is one line naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adaptnet.train.config import CNNConfig, Config, ConfigError, apply_override, load_config, parse_value

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_valid_and_resolved() -> None:
    cfg = Config.from_dict({"data": {"name": "wine"}})
    assert cfg.model.type == "mlp" and cfg.train.epochs == 20 and cfg.scheduler.name == "none"
    resolved = cfg.to_dict()
    assert resolved["optim"]["lr"] == pytest.approx(1e-3)
    assert Config.from_dict(yaml.safe_load(yaml.safe_dump(resolved))) == cfg  # round trip through YAML


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.policies, "examples start small and grow or prune"
    assert isinstance(cfg.model, CNNConfig) == (path.stem == "digits_cnn")


def test_overrides() -> None:
    cfg = load_config(None, ["data.name=synthetic", "train.epochs=50", "model.hidden=[32,16]", "optim.lr=1e-3",
                             "policies.0.name=grow_on_plateau", "policies.0.by=4", "scheduler=cosine"])
    assert cfg.train.epochs == 50 and cfg.model.hidden == [32, 16] and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.policies[0]["by"] == 4 and cfg.policies[0]["patience"] == 3  # defaults filled in
    assert cfg.scheduler.name == "cosine"


def test_override_into_a_file_and_a_list(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("data: {name: wine}\npolicies:\n  - {name: grow_every, by: 2}\n")
    cfg = load_config(file, ["policies.0.by=4", "policies.1.name=prune_to_budget"])
    assert [p["name"] for p in cfg.policies] == ["grow_every", "prune_to_budget"]
    assert cfg.policies[0]["by"] == 4


@pytest.mark.parametrize("bad", ["epochs", "train.epochs.x=1", "policies.5.by=1"])
def test_malformed_overrides(bad: str) -> None:
    data = {"train": {"epochs": 3}, "policies": []}
    with pytest.raises(ConfigError, match="override"):
        apply_override(data, bad)


def test_yaml_values() -> None:
    assert parse_value("1e-3") == pytest.approx(1e-3)
    assert parse_value("[32,16]") == [32, 16]
    assert parse_value("null") is None and parse_value("true") is True
    assert parse_value("[unclosed") == "[unclosed"


@pytest.mark.parametrize(("data", "expected"), [
    ({"train": {"epochs": -3}}, "train.epochs: must be an integer >= 1, got -3"),
    ({"model": {"hiddn": [3]}}, "model.hiddn: unknown key; allowed: activation, dropout, hidden, norm, type"),
    ({"trian": {}}, "trian: unknown key; allowed: data, device, model, optim, policies, scheduler, seed, train"),
    ({"model": {"hidden": [8, 0]}}, "model.hidden.1: must be an integer >= 1, got 0"),
    ({"model": {"type": "rnn"}}, "model.type: must be one of mlp, cnn, target, hf, got 'rnn'"),
    ({"model": {"type": "cnn"}}, "model.type: cnn needs image data"),
    ({"optim": {"lr": "fast"}}, "optim.lr: must be a number > 0, got 'fast'"),
    ({"optim": {"name": "lion"}}, "optim.name: must be one of sgd, adam, adamw, rmsprop, adagrad"),
    ({"optim": {"name": "adam", "momentum": 0.9}}, "optim.momentum: only valid with optim.name sgd or rmsprop"),
    ({"optim": {"betas": [0.9]}}, "optim.betas: must be a list of 2 numbers"),
    ({"scheduler": {"name": "step", "gamma": 2}}, "scheduler.gamma: must be a number > 0 and <= 1, got 2"),
    ({"train": {"tensorboard": "yes"}}, "train.tensorboard: must be true or false, got 'yes'"),
    ({"train": {"on_nonfinite": "ignore"}}, "train.on_nonfinite: must be one of rollback, stop, got 'ignore'"),
    ({"device": "tpu"}, "device: must be one of auto, cpu, cuda, mps, got 'tpu'"),
    ({"data": {"name": "mnist"}}, "data.name: must be one of synthetic, regression, digits, wine"),
    ({"data": {"name": "wine", "val_fraction": 0.6, "test_fraction": 0.5}}, "data.test_fraction: val_fraction +"),
    ({"data": {"name": "wine", "target": "y"}}, "data.target: only valid with data.csv"),
    ({"data": {"csv": "missing.csv", "target": "y"}}, "data.csv: file not found"),
    ({"policies": [{"name": "grow_fast"}]}, "policies.0.name: must be one of deepen_on_plateau, grow_every"),
    ({"policies": [{"name": "grow_on_plateau", "by": 0}]}, "policies.0.by: must be a positive integer, got 0"),
    ({"policies": [{"name": "grow_on_plateau", "patience": "x"}]}, "policies.0.patience: must be an integer"),
    ({"policies": [{"name": "grow_on_plateau", "bye": 3}]}, "policies.0.bye: unknown key; allowed: by, init"),
    ({"policies": [{"name": "prune_to_budget", "amount": 2.0}]}, "policies.0.amount: must be a fraction in (0, 1)"),
])
def test_errors_name_the_key(data: dict, expected: str) -> None:
    data = {"data": {"name": "wine"}, **data} if "data" not in data else data
    assert _error(data).startswith(expected)


def test_missing_data_and_several_problems() -> None:
    assert _error({}).startswith("data.name: required unless data.csv is set")
    assert _error({"data": {"name": "wine"}, "train": {"epochs": 0, "keep_last": 0}}).endswith("(and 1 more problem)")
    assert "did you mean 'hidden'" in _error({"data": {"name": "wine"}, "model": {"hiddn": [3]}})


def test_csv_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.csv").write_text("a,y\n1,2\n")
    monkeypatch.chdir(tmp_path)
    cfg = Config.from_dict({"data": {"csv": "d.csv", "target": "y"}})
    assert cfg.data.csv == str(tmp_path / "d.csv")


@pytest.mark.parametrize(("text", "expected"), [
    ("data: [unclosed\n", "invalid YAML at line"),
    ("- just\n- a list\n", "must be a mapping of sections"),
])
def test_bad_files(tmp_path: Path, text: str, expected: str) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(file)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
