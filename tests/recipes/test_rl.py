"""The rl recipe: PPO whose actor and critic grow, end to end, plus the growth step on its own.

The end-to-end runs use the quick settings with fewer, shorter rollouts (growth after every
update that does not set a new best), so the whole file takes seconds, not minutes.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gymnasium")

import adaptnet as an
from adaptnet.cli.main import main
from adaptnet.recipes import RecipeError, _ppo, make_settings, rl, run_recipe

# 4 updates of 4 envs x 32 steps; patience 1 makes every update without a new best a plateau.
SHORT = {"total_steps": 512, "num_steps": 32, "grow_patience": 1, "eval_episodes": 2}


def test_quick_run_grows_saves_and_reloads(tmp_path):
    out = tmp_path / "run"
    results = run_recipe("rl", SHORT, out=out, quick=True)
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 512 and saved["env"] == "CartPole-v1" and saved["arch"] == "adaptive"
    assert (out / "returns.png").stat().st_size > 1000

    growths = results["growths"]
    assert growths, "the quick settings must make the network grow"
    first = growths[0]
    assert first["actor"]["widths_before"] == [4, 4] and first["actor"]["widths_after"] == [8, 8]
    assert first["critic"]["params_after"] > first["critic"]["params_before"]
    for g in growths:  # growth (gradmax by default) preserves both networks' outputs on the last rollout
        assert g["actor"]["max_output_change"] <= 1e-5 and g["critic"]["max_output_change"] <= 1e-5
    assert results["actor_widths"] == growths[-1]["actor"]["widths_after"]
    assert results["optimizer_state_ok"]

    # The checkpoint comes back with adaptnet alone, grown architecture included, and plays.
    actor, state = an.load(out / "agent")
    assert actor.widths == results["actor_widths"] and state["env"] == "CartPole-v1" and state["step"] == 512
    evaluation = rl.evaluate(out / "agent", episodes=2, seed=3)
    assert evaluation["widths"] == results["actor_widths"] and len(evaluation["returns"]) == 2
    assert all(1 <= r <= 500 for r in evaluation["returns"])
    assert results["evaluation"]["episodes"] == 2


@pytest.mark.parametrize("init", ["net2net", "zero", "gradmax"])
def test_growth_preserves_the_policy_and_carries_adam(init):
    torch.manual_seed(0)
    s = make_settings(rl.RECIPE, {**rl.QUICK, "grow_init": init, "num_steps": 16})
    envs = _ppo.make_envs(s.env, s.num_envs, seed=0)
    agent = _ppo.Agent(*_ppo.sizes(envs), hidden=(4, 4))
    opt = torch.optim.Adam(agent.parameters(), lr=s.lr, eps=1e-5)
    params = list(agent.parameters())
    collector = _ppo.Collector(envs, 0, lambda step, ret: None)
    ro = collector.rollout(agent, s.num_steps)
    collector.advantages(agent, ro, s.gamma, s.gae_lambda)
    _ppo.update(agent, opt, ro, _ppo.PPOConfig(num_envs=4, num_steps=16), torch.Generator().manual_seed(0))
    obs = ro.flat()[0]
    with torch.no_grad():
        logits, values = agent.actor(obs), agent.value(obs)
    steps = [opt.state[p]["step"].item() for p in params]

    event = rl.Grower(s).grow(agent, opt, ro)

    assert event is not None and agent.actor.widths == [8, 8] and agent.critic.widths == [8, 8]
    with torch.no_grad():
        assert torch.allclose(agent.actor(obs), logits, atol=1e-5)
        assert torch.allclose(agent.value(obs), values, atol=1e-5)
    assert event["actor"]["max_output_change"] <= 1e-5
    # Same parameter objects (the optimizer was never rebuilt), Adam state reshaped, step counts kept.
    assert [id(p) for p in agent.parameters()] == [id(p) for p in params]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params]
    for p, step in zip(params, steps, strict=True):
        assert opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["exp_avg_sq"].shape == p.shape
        assert opt.state[p]["step"].item() == step
    assert agent.actor.blocks[0].op.weight.shape == (8, 4)
    # Surviving units keep their moments: the first 4 rows of layer 0 were only re-indexed, never reset.
    assert opt.state[agent.actor.blocks[0].op.weight]["exp_avg_sq"][:4].abs().sum() > 0
    _ppo.update(agent, opt, ro, _ppo.PPOConfig(num_envs=4, num_steps=16), torch.Generator().manual_seed(1))
    envs.close()


def test_growth_stops_at_max_width():
    s = make_settings(rl.RECIPE, {"start_hidden": [8, 6], "max_width": 8, "grow_by": 4, "grow_patience": 2})
    grower = rl.Grower(s)
    assert [grower.plateaued(m) for m in (None, 10.0, 10.5, 10.9, 30.0, 29.0)] == [False, False, False, True,
                                                                                    False, False]
    solved = rl.Grower(s)
    assert [solved.plateaued(480.0) for _ in range(4)] == [False] * 4  # a solved task never grows, however flat
    agent = _ppo.Agent(4, 2, (8, 6))
    opt = torch.optim.Adam(agent.parameters())
    ro = _ppo.Rollout(torch.randn(8, 1, 4), torch.randint(0, 2, (8, 1)).float(), *(torch.zeros(8, 1) for _ in range(4)))
    ro.advantages, ro.returns = torch.randn(8, 1), torch.randn(8, 1)
    event = grower.grow(agent, opt, ro)
    assert event is not None and event["actor"]["widths_after"] == [8, 8]  # only the layer below max_width
    assert grower.grow(agent, opt, ro) is None


def test_cli_runs_and_evaluates(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [f"{k}={v}" for k, v in SHORT.items()]
    assert main(["recipe", "rl", "--quick", *args, "arch=static", "static_hidden=[16]", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["growths"] == [] and results["actor_widths"] == [16]
    printed = capsys.readouterr().out
    assert "static PPO" in printed and "reloaded agent/ with adaptnet.load" in printed

    again = tmp_path / "eval"
    assert main(["recipe", "rl", f"evaluate={out / 'agent'}", "eval_episodes=2", "--out", str(again)]) == 0
    evaluation = json.loads((again / "results.json").read_text())["evaluation"]
    assert evaluation["widths"] == [16] and len(evaluation["returns"]) == 2
    assert "mean return" in capsys.readouterr().out


@pytest.mark.parametrize(("setting", "message"), [
    ("env=Pong-v5", "setting env: expected one of 'CartPole-v1', 'Acrobot-v1'"),
    ("num_minibatches=3", "num_envs*num_steps (512) must split into num_minibatches (3)"),
    ("start_hidden=[128,8]", "start_hidden [128, 8] is wider than max_width 64"),
    ("start_hidden=[]", "start_hidden must be a non-empty list"),
    ("total_steps=100", "total_steps (100) must be at least one rollout"),
    ("gamma=1.5", "gamma must be in (0, 1], got 1.5"),
    ("grow_init=random", "expected one of 'net2net', 'zero', 'gradmax'"),
    ("evaluate=/no/such/agent", "evaluate: /no/such/agent is not a saved agent"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, setting, message):
    assert main(["recipe", "rl", setting, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptnet: error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_settings_defaults_are_cleanrl_ppo():
    s = make_settings(rl.RECIPE, {})
    assert (s.lr, s.num_envs, s.num_steps, s.gamma, s.gae_lambda, s.num_minibatches, s.update_epochs) == (
        2.5e-4, 4, 128, 0.99, 0.95, 4, 4)
    assert (s.clip_coef, s.ent_coef, s.vf_coef, s.max_grad_norm, s.anneal_lr) == (0.2, 0.01, 0.5, 0.5, True)
    assert s.static_hidden == (64, 64) and s.start_hidden == (8, 8)
    with pytest.raises(RecipeError, match="eval_episodes must be >= 0"):
        make_settings(rl.RECIPE, {"eval_episodes": -1})
