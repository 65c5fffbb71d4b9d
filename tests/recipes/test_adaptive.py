"""The adaptive recipe: quick runs end to end (grow, prune, fine-tune, sweep), the CLI, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptnet.cli.main import main
from adaptnet.recipes import RecipeError, get_recipe, make_settings, run_recipe
from adaptnet.recipes.adaptive import RUN_DIR, mlp_params
from adaptnet.train.rundir import read_events, read_metrics


def _events(run: Path) -> list[dict]:
    return [e for e in read_events(run) if e["op"] != "rollback"]


def test_quick_regression_grows_prunes_and_compares(tmp_path, capsys):
    out = tmp_path / "reg"
    r = run_recipe("adaptive", {}, out=out, quick=True)
    s, a = get_recipe("adaptive").quick, r["adaptive"]
    run = out / RUN_DIR
    # The run directory: one metrics row per epoch, growth during the grow phase, pruning after it.
    rows, events = read_metrics(run), _events(run)
    assert [row["epoch"] for row in rows] == list(range(1, s["epochs"] + 1))
    widen = [e for e in events if e["op"] == "widen"]
    prune = [e for e in events if e["op"] == "prune"]
    assert widen and prune, events
    assert all(e["epoch"] <= s["prune_at"] and e["policy"] == "grow_on_signal" for e in widen)
    assert all(e["epoch"] > s["prune_at"] and e["policy"] == "prune_to_budget" for e in prune)
    assert a["peak_params"] > mlp_params(10, a["start_widths"], 1)
    assert a["params"] <= a["budget"] < a["peak_params"] and r["within_budget"]
    assert a["params"] == prune[-1]["params_after"] == mlp_params(10, a["widths"], 1)
    assert a["edits"] == {"widen": len(widen), "prune": len(prune)}
    # The sweep: every width trained for the same steps; FLOPs = 3 x MACs per sample x rows x epochs.
    assert [x["widths"] for x in r["static"]] == [[w, w] for w in s["sweep"]]
    n_train = r["rows"]["train"]
    for x in r["static"]:
        w = x["widths"][0]
        assert x["train_flops"] == 3 * (10 * w + w * w + w) * n_train * s["epochs"]
    assert r["sweep_train_flops"] == sum(x["train_flops"] for x in r["static"])
    assert 0 < r["flops_share"] == a["train_flops"] / r["sweep_train_flops"]
    best = min(r["static"], key=lambda x: x["val"]["loss"])
    assert r["best_static"] == best["widths"] and r["metric"] == "MSE"
    assert 0 <= a["test"]["loss"] < 2 and "r2" in a["test"]
    # Written files: results, the comparison plot, the run's own report; the table is printed.
    assert json.loads((out / "results.json").read_text())["adaptive"]["widths"] == a["widths"]
    assert (out / "adaptive.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert ">> widen" in printed and ">> prune" in printed and "best static (on validation)" in printed
    # The CLI reads the run directory.
    assert main(["inspect", str(run)]) == 0
    shown = capsys.readouterr().out
    assert f"total params: {a['params']}" in shown and f"{len(events)} events" in shown
    assert main(["report", str(run), "--out", str(tmp_path / "report.png")]) == 0
    assert f"params: {mlp_params(10, a['start_widths'], 1)} -> {a['params']}" in capsys.readouterr().out


def test_quick_classification_with_a_budget_and_the_plateau_trigger(tmp_path):
    r = run_recipe("adaptive", {"data": "breast_cancer", "budget": 400, "seed": 1, "trigger": "plateau"},
                   out=tmp_path / "bc", quick=True)
    a = r["adaptive"]
    assert r["task"] == "classification" and r["metric"] == "accuracy %"
    assert a["budget"] == 400 and a["params"] <= 400 and a["widths"] != a["peak_widths"]
    assert 0.5 < a["test"]["accuracy"] <= 1
    within = [x for x in r["static"] if x["params"] <= 400]
    assert r["best_static_within_budget"] == max(within, key=lambda x: (x["val"]["accuracy"], -x["params"]))["widths"]
    events = _events(tmp_path / "bc" / RUN_DIR)
    assert {e["op"] for e in events} == {"widen", "prune"}
    assert {e["policy"] for e in events if e["op"] == "widen"} == {"grow_on_plateau"}


def _csv(path: Path, n: int = 240, target: str = "target") -> Path:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    label = np.where((x[:, 0] * x[:, 1]).numpy() > 0, "yes", "no")
    rows = [",".join(f"{v:.4f}" for v in r) + f",{t}" for r, t in zip(x.tolist(), label, strict=True)]
    lines = [f"a,b,c,{target}", *rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_on_a_user_csv(tmp_path, capsys):
    data = _csv(tmp_path / "xor.csv")
    out = tmp_path / "csv"
    assert main(["recipe", "adaptive", "--quick", f"data={data}", "sweep=[4,8]", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["data"] == "xor.csv" and r["task"] == "classification" and r["rows"] == {"train": 144, "val": 48,
                                                                                     "test": 48}
    assert r["adaptive"]["params"] <= r["adaptive"]["budget"] and len(r["static"]) == 2
    assert f"results, settings and plots in {out}" in capsys.readouterr().out


@pytest.mark.parametrize("words, message", [
    (["data=mnist"], "unknown data set 'mnist'; use one of regression, digits"),
    (["data={tmp}/missing.csv"], "CSV file not found"),
    (["data={tmp}/other.csv"], "no column 'target'; columns: a, b, c, label"),
    (["data={tmp}/other.csv", "target=nope"], "no column 'nope'"),
    (["budget=50"], "budget 50 is below the 69 parameters of the start network [4, 4]"),
    (["data=digits", "start=[8]", "budget=500"], "below the 610 parameters"),
    (["prune_at=13"], "prune_at must be between 1 and epochs - 2 = 12"),
    (["start=[]"], "start must be one or more widths"),
    (["importance=random"], "expected one of 'magnitude', 'taylor'"),
    (["trigger=loss"], "expected one of 'signal', 'plateau'"),
    (["cooldown=-1"], "cooldown must be >= 0 and threshold > 0"),
    (["threshold=0"], "cooldown must be >= 0 and threshold > 0"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, words, message):
    _csv(tmp_path / "other.csv", n=20, target="label")
    argv = ["recipe", "adaptive", "--quick", *(w.format(tmp=tmp_path) for w in words), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptnet: error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # settings are checked before anything is written


def test_show_and_defaults(capsys):
    assert main(["recipe", "adaptive", "--show"]) == 0
    shown = capsys.readouterr().out
    assert "data: regression" in shown and "budget: null" in shown and "# parameters of the final network" in shown
    recipe = get_recipe("adaptive")
    s = make_settings(recipe, {})
    assert s.start == (4, 4) and s.prune_at == 40 and s.epochs == 60 and s.sweep == (4, 8, 16, 32, 64, 128)
    assert (s.trigger, s.threshold, s.cooldown, s.patience, s.min_delta) == ("signal", 0.3, 3, 10, 0.02)
    with pytest.raises(RecipeError, match="prune_amount must be a fraction"):
        make_settings(recipe, {"prune_amount": 1.0})
