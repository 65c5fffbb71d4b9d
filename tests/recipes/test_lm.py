"""The lm recipe: its model traces into the groups it grows, every growth stage keeps the function
with AdamW carried, the quick run's results hang together, bad settings are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import adaptnet as an
from adaptnet.cli.main import main
from adaptnet.recipes import run_recipe
from adaptnet.recipes._lm import TinyGPT, interpolate_crossing, lm_loss, lr_at, sizes, stdlib_text, windows
from adaptnet.recipes.lm import ARMS, QUICK, LMSettings, grow_stage

START = {"layers": 1, "d_model": 16, "heads": 2, "head_dim": 4, "hidden": 24, "context": 12}
FINAL = {**START, "layers": 3, "d_model": 24, "heads": 3, "hidden": 40}


def test_text_and_windows() -> None:
    text, files = stdlib_text(5000)
    assert text.shape == (5000,) and text.dtype == torch.long and int(text.min()) >= 0 and int(text.max()) < 256
    assert files == sorted(files) and files[0].endswith(".py")
    x, y = windows(text, torch.tensor([0, 100]), 8)
    assert x.shape == y.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1], text[100:108])
    with pytest.raises(ValueError, match="holds only"):
        stdlib_text(10**12)


@pytest.mark.parametrize("heads", [2, 1])
def test_the_model_traces_into_the_groups_the_recipe_grows(heads: int) -> None:
    """One head too: the heads group of one unit, as with several (not head_dim)."""
    torch.manual_seed(0)
    start = {**START, "heads": heads}
    model = TinyGPT(**start)
    groups = an.unit_groups(model, (torch.randint(0, 256, (2, 12)),))
    assert list(groups) == ["embed", "blocks.0.qkv", "blocks.0.fc"] and groups["blocks.0.qkv"].size == heads
    assert sizes(model) == {k: start[k] for k in ("layers", "d_model", "heads", "hidden")}


@pytest.mark.parametrize(("stage", "heads"), [("mlp", 2), ("heads", 2), ("d_model", 2), ("depth", 2),
                                              ("mlp+heads+d_model+depth", 2), ("heads", 1),
                                              ("mlp+heads+d_model+depth", 1)])
def test_each_growth_stage_keeps_the_function_and_carries_adamw(stage: str, heads: int) -> None:
    """From 2 heads, and from one (``heads=[1, 3]``: one head grows into three, exactly)."""
    torch.manual_seed(1)
    start = {**START, "heads": heads}
    model = TinyGPT(**start).double()
    x = torch.randint(0, 256, (3, 12))
    an.unit_groups(model, (x,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # AdamW state to carry
        opt.zero_grad()
        lm_loss(model(x), x).backward()
        opt.step()
    final = {**start, **{k: FINAL[k] for k in ("layers", "d_model", "heads", "hidden")
                         if {"layers": "depth", "d_model": "d_model", "heads": "heads", "hidden": "mlp"}[k] in stage}}
    with torch.no_grad():
        before = model(x)
    grow_stage(model, stage, final, opt, seed=3)
    with torch.no_grad():
        after = model(x)
    assert sizes(model) == {k: final[k] for k in ("layers", "d_model", "heads", "hidden")}
    assert float((after - before).abs().max() / before.abs().max()) < 1e-10
    held = [p for group in opt.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    for p in held:
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            assert key not in state or state[key].shape == p.shape
    opt.zero_grad()
    lm_loss(model(x), x).backward()
    opt.step()  # training goes on with the grown model and the carried optimizer


def test_lr_schedule_and_crossing() -> None:
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.09 * math.pi)))
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    curve = [(0.0, 5.0), (10.0, 3.0), (20.0, 2.0), (30.0, 1.5)]
    assert interpolate_crossing(curve, 2.5) == pytest.approx(15.0)
    assert interpolate_crossing(curve, 3.0) == 10.0
    assert interpolate_crossing(curve, 6.0) == 0.0
    assert interpolate_crossing(curve, 1.0) is None


def test_quick_run_results_hang_together(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    results = run_recipe("lm", {"steps": 100}, out=out, quick=True)
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert (out / saved["plots"][0]).read_bytes()[:4] == b"\x89PNG"
    assert len(results["runs"]) == QUICK["seeds"]
    for run in results["runs"]:
        arms = run["arms"]
        assert list(arms) == list(ARMS)
        static = arms["static"]
        assert arms["grown"]["flops"] == arms["grown_fresh"]["flops"] < static["flops"]
        # Matched FLOPs: within one step of the grown run's.
        assert abs(arms["static_flops"]["flops"] - arms["grown"]["flops"]) <= static["flops"] / static["steps"]
        for arm in ARMS:
            assert arms[arm]["sizes"] == {"layers": 2, "d_model": 64, "heads": 4, "hidden": 128}
            assert arms[arm]["val_loss"] < arms[arm]["curve"][0][2] - 1  # it learnt: from ~5.5 nats/byte
        for stages in (arms["grown"]["stages"], arms["grown_fresh"]["stages"]):
            assert [s["stage"] for s in stages] == ["mlp+heads", "d_model", "depth"]
            for s in stages:
                assert s["rel_change_f64"] <= 1e-8 and s["rel_change_f32"] <= 1e-5
                assert s["loss_after_edit"] == pytest.approx(s["loss_before"], rel=1e-5)
                assert s["spike"] >= s["loss_after_edit"] / s["loss_before"] - 1 - 1e-12  # the peak includes it
                assert s["edit_s"] > 0 and s["edit_per_train_step"] > 0
        fraction = run["flops_fraction_to_static_loss"]
        assert fraction is None or 0 < fraction <= arms["grown"]["flops"] / static["flops"]
        assert [s["spike"] for s in arms["static"]["stages"]] == pytest.approx([0.0] * 3, abs=0.05)  # no edit
        assert arms["static_flops"]["stages"] == []
    summary = results["summary"]
    assert summary["arms"]["static"]["flops_of_static"] == 1.0
    assert [s["stage"] for s in summary["stages"]] == ["mlp+heads", "d_model", "depth"]


@pytest.mark.parametrize(("words", "message"), [
    (["grow=[mlp,width]"], "grow must list kinds from mlp, heads, d_model, depth"),
    (["grow=[mlp,heads,d_model]", "grow_at=[0.1,0.2,0.3]"], "grow must list 'depth' exactly when they differ"),
    (["grow_at=[0.5,0.2,0.7]"], "grow_at must give one increasing fraction"),
    (["layers=[4,2]"], "layers must be [start, final] with 1 <= start <= final"),
    (["steps=0"], "steps must be at least 1"),
    (["heads=two"], "setting heads: expected a list of integers"),
])
def test_bad_settings_exit_2_with_one_line(words: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe", "lm", *words, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptnet: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_settings_defaults_grow_2x64_into_4x128() -> None:
    s = LMSettings()
    assert (s.start()["layers"], s.start()["d_model"], s.final()["layers"], s.final()["d_model"]) == (2, 64, 4, 128)
    assert (s.seeds, s.grow, s.grow_at) == (5, ("mlp+heads", "d_model", "depth"), (0.2, 0.35, 0.5))
    assert LMSettings(heads=(1, 4)).start()["heads"] == 1  # one head grows as several do
