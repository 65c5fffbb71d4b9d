"""Configs that name any model: model.target (a user's class) and model.hf (a transformers model from a
config), through `adaptnet train`, `resume`, `inspect` and `report`; code in a run directory is imported
only with --trust-code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from adaptnet.cli.main import main
from adaptnet.train.rundir import read_events, read_metrics

USER_MODULE = '''
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self, inputs=64, hidden=8, classes=10):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
'''
GROW = [{"name": "grow_every", "every": 1, "by": 4, "where": "last"}]


def _config(tmp_path: Path, model: dict[str, Any], data: dict[str, Any], epochs: int = 1) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {**data, "batch_size": 64}, "model": model, "policies": GROW,
                                    "train": {"epochs": epochs, "probe_size": 32}, "optim": {"lr": 0.01}}))
    return path


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "adaptnet_user_net.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_users_class_trains_resumes_and_inspects_with_trust(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = {"target": "adaptnet_user_net:TwoLayer", "kwargs": {"hidden": 6}}
    config = _config(in_tmp, model, {"name": "digits"})
    assert main(["train", str(config), "--out", "run", "--quiet"]) == 0
    assert [e["widths_after"] for e in read_events(in_tmp / "run")] == [[10]]
    capsys.readouterr()
    assert main(["resume", "run", "--epochs", "2", "--quiet"]) == 2  # the run names code: not without trust
    err = capsys.readouterr().err
    assert "model.target 'adaptnet_user_net:TwoLayer'" in err and "--trust-code" in err and "Traceback" not in err
    assert main(["resume", "run", "--epochs", "2", "--quiet", "--trust-code"]) == 0
    assert [e["widths_after"] for e in read_events(in_tmp / "run")] == [[10], [14]]
    assert len(read_metrics(in_tmp / "run")) == 2
    capsys.readouterr()
    assert main(["inspect", "run"]) == 2
    assert main(["inspect", "run", "--trust-code"]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "14" in out and "2 events" in out
    assert main(["export", "run", "--format", "pt2"]) == 2  # the grown user class, rebuilt only with trust
    assert "--trust-code" in capsys.readouterr().err and not (in_tmp / "run" / "model.pt2").exists()
    assert main(["export", "run", "--format", "pt2", "--trust-code"]) == 0
    assert "TwoLayer" in capsys.readouterr().out
    program = torch.export.load(in_tmp / "run" / "model.pt2")
    assert program.state_dict["fc1.weight"].shape == (14, 64)  # the grown width
    assert program.module()(torch.randn(3, 64)).shape == (3, 10)  # the batch left free
    assert main(["report", "run"]) == 0


@pytest.mark.parametrize(("model", "message"), [
    ({"target": "adaptnet_no_such_module:Net"}, "model.target: cannot import 'adaptnet_no_such_module'"),
    ({"target": "adaptnet_user_net:Missing"}, "has no attribute 'Missing'"),
    ({"target": "adaptnet_user_net"}, "must look like package.module:callable"),
    ({"target": "adaptnet_user_net:TwoLayer", "kwargs": {"width": 3}}, "model.kwargs: adaptnet_user_net:TwoLayer"),
    ({"hf": "no_such_type", "task": "causal_lm"}, "neither a local folder nor a transformers model type"),
    ({"hf": "gpt2", "task": "translation"}, "model.task"),
])
def test_a_bad_model_is_one_line_and_exit_2(in_tmp: Path, capsys: pytest.CaptureFixture[str], model: dict[str, Any],
                                            message: str) -> None:
    data = {"name": "tokens", "samples": 64} if "hf" in model else {"name": "digits"}
    assert main(["train", str(_config(in_tmp, model, data)), "--out", "run", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_transformers_causal_lm_trains_and_resumes_without_trust(in_tmp: Path) -> None:
    pytest.importorskip("transformers")
    model = {"hf": {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_inner": 16,
                    "vocab_size": 32, "n_positions": 16}, "task": "causal_lm"}
    config = _config(in_tmp, model, {"name": "tokens", "samples": 256})
    assert main(["train", str(config), "--out", "run", "--quiet"]) == 0
    assert main(["resume", "run", "--epochs", "2", "--quiet"]) == 0  # transformers' own classes: no code to trust
    events = read_events(in_tmp / "run")
    assert [e["group"] for e in events] == ["model.transformer.h.0.mlp.c_fc"] * 2
    assert events[-1]["widths_after"][-1] == 24
    assert read_metrics(in_tmp / "run")[-1]["val_accuracy"] > 0


def test_a_transformers_classifier_reads_digits_as_tokens(in_tmp: Path) -> None:
    pytest.importorskip("transformers")
    model = {"hf": "bert", "task": "sequence_classification",
             "config": {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "vocab_size": 17, "max_position_embeddings": 64}}
    config = _config(in_tmp, model, {"name": "digits", "standardize": False})
    assert main(["train", str(config), "--out", "run", "--quiet"]) == 0
    assert read_events(in_tmp / "run")[0]["op"] == "widen"
