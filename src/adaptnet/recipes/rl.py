"""Reinforcement learning: a PPO agent whose networks start small and grow when its return plateaus.

The actor and critic are ``AdaptiveMLP``s (tanh, CleanRL's init). Whenever the mean return of the
last 100 episodes has not improved for ``grow_patience`` PPO updates and the task is not solved
yet, every hidden layer of both networks is widened by ``grow_by`` units with an exact,
function-preserving edit, through ``adaptnet.widen(..., optimizer=opt)``: the same Adam keeps
stepping the same parameter objects, its moments remapped to the new shapes, so training goes on
without a restart. ``arch=static`` trains CleanRL's fixed 64-64 networks with the same code.

Outputs (in the run's folder): ``results.json`` (steps until the 100-episode mean first reaches the
environment's threshold, final mean, widths, parameters, env steps/s, every growth event),
``returns.png`` (return vs env steps, growth events marked), and the trained agent as adaptnet
checkpoints ``agent/`` (the actor, all that acting needs) and ``critic/``.

Reload and evaluate a saved agent with adaptnet alone::

    adaptnet recipe rl evaluate=runs/recipe-rl-.../agent eval_episodes=20
    python -c "from adaptnet.recipes.rl import evaluate; print(evaluate('runs/.../agent', episodes=20))"
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

import adaptnet as an
from adaptnet.recipes import Recipe, say

ENVS = ("CartPole-v1", "Acrobot-v1")
THRESHOLD = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0}  # gymnasium's reward_threshold for each
WINDOW = 100  # episodes in the mean return that is reported, compared with the threshold, and watched


def _help(text: str) -> Any:
    return {"help": text}


@dataclass(frozen=True)
class RLSettings:
    """Settings of the ``rl`` recipe; the PPO ones are CleanRL ppo.py's defaults."""

    env: Literal["CartPole-v1", "Acrobot-v1"] = field(default="CartPole-v1", metadata=_help("gymnasium environment"))
    seed: int = field(default=0, metadata=_help("seed of environments, initial weights and minibatches"))
    total_steps: int = field(default=500_000, metadata=_help("environment steps of training (all envs together)"))
    arch: Literal["adaptive", "static"] = field(default="adaptive", metadata=_help(
        "adaptive: start at start_hidden and grow; static: fixed static_hidden"))
    start_hidden: tuple[int, ...] = field(default=(8, 8), metadata=_help("adaptive: initial hidden widths"))
    static_hidden: tuple[int, ...] = field(default=(64, 64), metadata=_help("static: hidden widths (CleanRL's)"))
    grow_patience: int = field(default=10, metadata=_help(
        "PPO updates without a new best 100-episode mean return before growing"))
    grow_min_delta: float = field(default=1.0, metadata=_help("improvement of the mean return that counts as new"))
    grow_by: int = field(default=8, metadata=_help("units added to each hidden layer of actor and critic per growth"))
    max_width: int = field(default=64, metadata=_help("no hidden layer grows beyond this"))
    # gradmax by measurement: on CartPole (3 seeds) it reached 475 at a median of 237k steps, net2net
    # at 334k (one seed not within 500k), zero at 413k (1 seed); see docs/recipes/rl.md.
    grow_init: Literal["net2net", "zero", "gradmax"] = field(default="gradmax", metadata=_help(
        "initialiser of new units (all exact); see docs/recipes/rl.md for the comparison"))
    grow_noise: float = field(default=0.1, metadata=_help("net2net: relative symmetry-breaking noise (exact)"))
    lr: float = field(default=2.5e-4, metadata=_help("Adam learning rate (eps 1e-5)"))
    anneal_lr: bool = field(default=True, metadata=_help("decay the learning rate linearly to 0"))
    num_envs: int = field(default=4, metadata=_help("parallel environments (SyncVectorEnv)"))
    num_steps: int = field(default=128, metadata=_help("steps per environment per rollout"))
    gamma: float = field(default=0.99, metadata=_help("discount"))
    gae_lambda: float = field(default=0.95, metadata=_help("GAE lambda"))
    num_minibatches: int = field(default=4, metadata=_help("minibatches per epoch"))
    update_epochs: int = field(default=4, metadata=_help("epochs over each rollout"))
    clip_coef: float = field(default=0.2, metadata=_help("PPO ratio clip (and value clip)"))
    ent_coef: float = field(default=0.01, metadata=_help("entropy bonus"))
    vf_coef: float = field(default=0.5, metadata=_help("value-loss weight"))
    max_grad_norm: float = field(default=0.5, metadata=_help("gradient-norm clip"))
    stop_at_threshold: bool = field(default=False, metadata=_help(
        "end training when the 100-episode mean first reaches the threshold (the learning-rate schedule "
        "still spans total_steps, so the run up to there is the same as a full one)"))
    eval_episodes: int = field(default=10, metadata=_help("greedy episodes of the reloaded checkpoint at the end"))
    log_every: int = field(default=20, metadata=_help("print progress every this many PPO updates"))
    evaluate: str | None = field(default=None, metadata=_help(
        "a saved agent folder: only reload and evaluate it (eval_episodes episodes, seed)"))

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        for name in ("total_steps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "grow_patience",
                     "grow_by", "max_width", "log_every"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(self.eval_episodes >= 0, f"eval_episodes must be >= 0, got {self.eval_episodes}")
        batch = self.num_envs * self.num_steps
        need(batch % self.num_minibatches == 0 and batch // self.num_minibatches >= 2,
             f"num_envs*num_steps ({batch}) must split into num_minibatches ({self.num_minibatches}) "
             "equal minibatches of at least 2")
        need(self.total_steps >= batch, f"total_steps ({self.total_steps}) must be at least one rollout, "
             f"num_envs*num_steps = {batch}")
        for name in ("start_hidden", "static_hidden"):
            widths = getattr(self, name)
            need(len(widths) >= 1 and all(w >= 1 for w in widths),
                 f"{name} must be a non-empty list of positive widths, such as [8,8]; got {list(widths)}")
        need(max(self.start_hidden) <= self.max_width,
             f"start_hidden {list(self.start_hidden)} is wider than max_width {self.max_width}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        need(0 <= self.gae_lambda <= 1, f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        for name in ("clip_coef", "vf_coef", "max_grad_norm"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("ent_coef", "grow_min_delta", "grow_noise"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.evaluate is not None:
            need((Path(self.evaluate) / "spec.json").is_file(),
                 f"evaluate: {self.evaluate} is not a saved agent (a checkpoint folder with spec.json, "
                 "such as the agent/ folder of an rl run)")
            need(self.eval_episodes >= 1, "evaluate needs eval_episodes >= 1")


# `--quick`: a 16-update CartPole run of a 4-4 agent that grows every 2 updates (a min_delta no
# improvement reaches makes every 2 updates a plateau), so growth, the carried optimizer, the
# checkpoint and its evaluation are all exercised in a few seconds.
QUICK = {"total_steps": 8192, "start_hidden": (4, 4), "grow_patience": 2, "grow_min_delta": 1000.0,
         "grow_by": 4, "max_width": 12, "eval_episodes": 3, "log_every": 4}


# -- growth ----------------------------------------------------------------------------------------------
class Grower:
    """Watches the 100-episode mean return and widens actor and critic when it plateaus."""

    def __init__(self, s: RLSettings):
        self.s = s
        self.best = -float("inf")
        self.stale = 0  # updates since the best mean improved by grow_min_delta
        self.generator = torch.Generator().manual_seed(s.seed + 1)

    def plateaued(self, mean: float | None) -> bool:
        """Count one update; True when ``grow_patience`` updates passed without a new best (below the threshold)."""
        if mean is None:
            return False
        if mean > self.best + self.s.grow_min_delta:
            self.best, self.stale = mean, 0
            return False
        self.stale += 1
        return self.stale >= self.s.grow_patience and mean < THRESHOLD[self.s.env]

    def grow(self, agent: Any, opt: torch.optim.Optimizer, ro: Any) -> dict[str, Any] | None:
        """Widen every hidden layer of both networks below ``max_width``; None when all are at it."""
        from adaptnet.recipes import _ppo

        obs, actions, _, adv, returns, _ = ro.flat()  # the last rollout measures the output change
        batches = {"actor": (obs, torch.stack([actions, adv], 1)), "critic": (obs, returns.unsqueeze(1))}
        losses: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
            "actor": _ppo.policy_gradient_loss, "critic": F.mse_loss}
        event: dict[str, Any] = {}
        for name in ("actor", "critic"):
            net = getattr(agent, name)
            before, params = list(net.widths), sum(p.numel() for p in net.parameters())
            change = 0.0
            for layer, width in enumerate(before):
                by = min(self.s.grow_by, self.s.max_width - width)
                if by < 1:
                    continue
                batch = batches[name] if self.s.grow_init == "gradmax" else batches[name][0]
                edit = an.widen(net, layer, by, init=self.s.grow_init, optimizer=opt, batch=batch,
                                loss_fn=losses[name], noise=self.s.grow_noise if self.s.grow_init == "net2net" else 0.0,
                                generator=self.generator)
                change = max(change, edit.max_output_change or 0.0)
            event[name] = {"widths_before": before, "widths_after": list(net.widths), "params_before": params,
                           "params_after": sum(p.numel() for p in net.parameters()), "max_output_change": change}
        if event["actor"]["widths_before"] == event["actor"]["widths_after"]:
            return None
        self.stale = 0
        return event


# -- training --------------------------------------------------------------------------------------------
def train(s: RLSettings, out: Path) -> dict[str, Any]:
    """PPO on ``s.env`` for ``s.total_steps`` steps; writes ``returns.png``, ``agent/`` and ``critic/`` into ``out``."""
    from adaptnet.recipes import _ppo  # imports gymnasium: only when a run starts (`--list` works without it)

    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    cfg = _ppo.PPOConfig(**{f.name: getattr(s, f.name) for f in dataclasses.fields(_ppo.PPOConfig)})
    envs = _ppo.make_envs(s.env, s.num_envs, s.seed)
    obs_dim, n_actions = _ppo.sizes(envs)
    agent = _ppo.Agent(obs_dim, n_actions, s.start_hidden if s.arch == "adaptive" else s.static_hidden)
    # One Adam over both networks, built once: growth edits its state in place, never rebuilds it.
    opt = torch.optim.Adam(agent.parameters(), lr=s.lr, eps=1e-5)
    grower = Grower(s) if s.arch == "adaptive" else None
    minibatch_gen = torch.Generator().manual_seed(s.seed)

    episodes: list[tuple[int, float]] = []  # (env step at its end, return)
    recent: deque[float] = deque(maxlen=WINDOW)
    step = 0

    def on_episode(at: int, ret: float) -> None:
        episodes.append((at, ret))
        recent.append(ret)

    collector = _ppo.Collector(envs, s.seed, on_episode)
    batch = s.num_envs * s.num_steps
    updates = s.total_steps // batch
    history: list[tuple[int, float]] = []  # (env step, 100-episode mean) after each update
    growths: list[dict[str, Any]] = []
    reached: int | None = None
    say(f"== {s.env}, {s.arch} PPO, {updates} updates of {batch} steps, seed {s.seed}, "
         f"widths {agent.actor.widths}{f' (grows on plateau, max {s.max_width})' if grower else ''} ==")
    began = time.perf_counter()
    for update in range(1, updates + 1):
        if s.anneal_lr:
            opt.param_groups[0]["lr"] = s.lr * (1.0 - (update - 1.0) / updates)
        ro = collector.rollout(agent, s.num_steps)
        step += batch
        collector.advantages(agent, ro, s.gamma, s.gae_lambda)
        stats = _ppo.update(agent, opt, ro, cfg, minibatch_gen)
        mean = float(np.mean(recent)) if recent else None
        if mean is not None:
            history.append((step, mean))
            if reached is None and len(recent) == WINDOW and mean >= THRESHOLD[s.env]:
                reached = step
                say(f"  step {step:>7}  100-episode mean {mean:.1f} reached {THRESHOLD[s.env]:g}")
                if s.stop_at_threshold:
                    break
        # Growth comes after the update, between two optimizer steps, as every edit must.
        if grower is not None and grower.plateaued(mean) and (event := grower.grow(agent, opt, ro)) is not None:
            growths.append({"step": step, "update": update, "mean_return": mean, **event})
            a, c = event["actor"], event["critic"]
            say(f"  step {step:>7}  >> grow (plateau at {mean:.1f}, {s.grow_init}): widths {a['widths_before']} -> "
                 f"{a['widths_after']}, params {a['params_before'] + c['params_before']} -> "
                 f"{a['params_after'] + c['params_after']}, output change actor {a['max_output_change']:.1e} "
                 f"critic {c['max_output_change']:.1e}")
        if update % s.log_every == 0 or update == updates:
            sps = step / (time.perf_counter() - began)
            shown = "-" if mean is None else f"{mean:.1f}"
            say(f"  step {step:>7}  mean return {shown:>6} ({len(episodes)} episodes)  widths {agent.actor.widths}  "
                 f"entropy {stats['entropy']:.3f}  {sps:.0f} steps/s")
    seconds = time.perf_counter() - began
    envs.close()

    an.save(out / "agent", agent.actor, env=s.env, step=step, seed=s.seed, arch=s.arch)
    an.save(out / "critic", agent.critic, env=s.env, step=step, seed=s.seed, arch=s.arch)
    _plot(out / "returns.png", s, episodes, history, growths)
    params = sum(p.numel() for p in agent.parameters())
    return {
        "env": s.env, "arch": s.arch, "threshold": THRESHOLD[s.env], "steps": step,
        "steps_to_threshold": reached, "final_mean_return": history[-1][1] if history else None,
        "episodes": len(episodes), "actor_widths": list(agent.actor.widths), "critic_widths": list(agent.critic.widths),
        "params": params, "env_steps_per_s": round(step / seconds, 1), "train_s": round(seconds, 2),
        "growths": growths, "history": history,
        # Proof that the optimizer was carried: every (grown) parameter still has Adam moments of its shape.
        "optimizer_state_ok": all(opt.state[p]["exp_avg"].shape == p.shape for p in agent.parameters()),
    }


def _plot(path: Path, s: RLSettings, episodes: list[tuple[int, float]], history: list[tuple[int, float]],
          growths: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if episodes:
        steps, returns = zip(*episodes, strict=True)
        ax.scatter(steps, returns, s=2, alpha=0.25, color="tab:gray", label="episode return")
    if history:
        ax.plot(*zip(*history, strict=True), color="tab:blue", label=f"{WINDOW}-episode mean")
    ax.axhline(THRESHOLD[s.env], color="tab:green", linestyle=":", label=f"threshold {THRESHOLD[s.env]:g}")
    for i, g in enumerate(growths):
        ax.axvline(g["step"], color="tab:red", linestyle="--", linewidth=0.8, label="growth" if i == 0 else None)
        ax.annotate(str(g["actor"]["widths_after"][0]), (g["step"], 1.0), xycoords=("data", "axes fraction"),
                    fontsize=7, color="tab:red", ha="center", va="bottom")
    ax.set(xlabel="environment steps", ylabel="return",
           title=f"{s.env}, {s.arch} PPO, seed {s.seed} (red: growth, new width on top)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- evaluation ------------------------------------------------------------------------------------------
def evaluate(path: str | Path, episodes: int = 10, seed: int = 0, greedy: bool = True) -> dict[str, Any]:
    """Reload a saved agent with ``adaptnet.load`` and play ``episodes`` episodes.

    Args:
        path: the ``agent/`` folder of an ``rl`` run (an adaptnet checkpoint of the actor).
        episodes: how many episodes; environment seeds ``seed, seed+1, ...``.
        greedy: take the most likely action (else sample from the policy).

    Returns:
        ``{"env", "widths", "params", "episodes", "mean_return", "returns"}``.
    """
    from adaptnet.recipes import _ppo

    actor, state = an.load(path)
    env = state.get("env")
    if env not in THRESHOLD:
        raise an.CheckpointError(f"{path}: not an rl agent (its state names no environment of {', '.join(ENVS)})")
    returns = _ppo.play(actor, env, episodes, seed, greedy)
    return {"env": env, "widths": list(getattr(actor, "widths", [])), "params": sum(p.numel() for p in
            actor.parameters()), "episodes": episodes, "mean_return": float(np.mean(returns)), "returns": returns}


def run(s: RLSettings, out: Path) -> dict[str, Any]:
    """Train (or, with ``evaluate=PATH``, only evaluate) and return the results for ``results.json``."""
    if s.evaluate is not None:
        result = evaluate(s.evaluate, s.eval_episodes, s.seed)
        say(f"{s.evaluate}: {result['env']}, widths {result['widths']}: mean return {result['mean_return']:.1f} "
             f"over {s.eval_episodes} greedy episodes")
        return {"evaluation": result}
    # Networks of at most a few thousand parameters, stepped one small batch at a time: one intra-op
    # thread is faster than several (about 3x on a loaded 2-core machine), so the run uses one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = train(s, out)
    finally:
        torch.set_num_threads(threads)
    if s.eval_episodes:
        results["evaluation"] = evaluate(out / "agent", s.eval_episodes, s.seed + 10_000)
    steps = results["steps_to_threshold"]
    say(f"\n  reached {THRESHOLD[s.env]:g}: {'never' if steps is None else f'at step {steps}'};  final mean return "
         f"{results['final_mean_return']};  widths {results['actor_widths']}, {results['params']} params;  "
         f"{results['env_steps_per_s']:.0f} env steps/s;  {len(results['growths'])} growths")
    if s.eval_episodes:
        say(f"  reloaded agent/ with adaptnet.load: mean return {results['evaluation']['mean_return']:.1f} "
             f"over {s.eval_episodes} greedy episodes")
    return results


RECIPE = Recipe(
    name="rl",
    summary="PPO on CartPole/Acrobot with actor and critic that start small and grow when the return plateaus",
    settings=RLSettings,
    run=run,
    quick=QUICK,
    requires=(("gymnasium", "rl"),),
)
