"""The recipe machinery: settings from KEY=VALUE and YAML, checked types, output folder, CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from adaptnet.cli.main import main
from adaptnet.recipes import (
    _REGISTERED,
    Recipe,
    RecipeError,
    make_settings,
    parse_overrides,
    register_recipe,
    run_recipe,
)


@dataclass(frozen=True)
class Toy:
    steps: int = field(default=10, metadata={"help": "how many steps"})
    lr: float = 0.1
    hidden: tuple[int, ...] = (8, 8)
    mode: Literal["a", "b"] = "a"
    budget: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def _run(settings: Toy, out: Path) -> dict[str, Any]:
    if settings.mode == "b":
        raise RuntimeError("the toy fails in mode b")
    (out / "trace.txt").write_text(f"{settings.steps} {settings.hidden}\n")
    return {"final": settings.steps * settings.lr, "hidden": list(settings.hidden)}


@pytest.fixture
def toy():
    recipe = register_recipe(Recipe("toy", "a toy recipe", Toy, _run, quick={"steps": 2}))
    yield recipe
    _REGISTERED.pop("toy")


def test_settings_are_typed_and_checked(toy):
    s = make_settings(toy, parse_overrides(["steps=3", "lr=1", "hidden=[4,2]", "mode=b", "budget=null"]))
    assert s == Toy(steps=3, lr=1.0, hidden=(4, 2), mode="b", budget=None)
    assert isinstance(s.lr, float)
    for bad, message in [({"stepz": 1}, "has no setting 'stepz'; its settings: steps, lr"),
                         ({"steps": "x"}, "setting steps: expected an integer, got 'x'"),
                         ({"steps": 1.5}, "expected an integer"),
                         ({"mode": "c"}, "expected one of 'a', 'b'"),
                         ({"hidden": [1, "x"]}, "expected a list of integers"),
                         ({"budget": "lots"}, "expected an integer or null"),
                         ({"steps": 0}, "steps must be at least 1, got 0")]:
        with pytest.raises(RecipeError, match=message):
            make_settings(toy, bad)
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_overrides(["steps"])


def test_run_writes_settings_and_results(toy, tmp_path):
    results = run_recipe("toy", {"lr": 0.5}, out=tmp_path / "run", quick=True)
    assert results["final"] == 1.0 and results["settings"]["steps"] == 2
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["final"] == 1.0 and saved["out"] == str(tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "settings.yaml").read_text())["hidden"] == [8, 8]
    with pytest.raises(RecipeError, match="is not empty"):  # earlier results are never overwritten
        run_recipe("toy", out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == saved
    with pytest.raises(RecipeError, match=r"unknown recipe 'nope'; available: .*toy"):
        run_recipe("nope")


def test_cli(toy, tmp_path, capsys):
    assert main(["recipe", "--list"]) == 0
    assert "toy" in capsys.readouterr().out
    assert main(["recipe", "toy", "--show", "steps=4"]) == 0
    shown = capsys.readouterr().out
    assert "steps: 4" in shown and "# how many steps" in shown
    config = tmp_path / "toy.yaml"
    config.write_text("steps: 5\nlr: 0.2\n")
    assert main(["recipe", "toy", "--config", str(config), "lr=0.4", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["final"] == pytest.approx(2.0)
    for argv, message in [(["recipe", "toy", "steps=-1"], "steps must be at least 1"),
                          (["recipe", "nope"], "unknown recipe 'nope'"),
                          (["recipe"], "name a recipe"),
                          (["recipe", "toy", "--config", str(tmp_path / "missing.yaml")], "config file not found")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("adaptnet: error:") and message in err and "Traceback" not in err


def test_a_failed_run_leaves_no_empty_folder(toy, tmp_path):
    with pytest.raises(RuntimeError, match="fails in mode b"):
        run_recipe("toy", {"mode": "b"}, out=tmp_path / "failed")
    assert not (tmp_path / "failed").exists()
