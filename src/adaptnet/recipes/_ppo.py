"""PPO for discrete actions (clipped surrogate, GAE), after CleanRL's ``ppo.py``, on adaptnet networks.

The mechanics of the ``rl`` recipe, kept apart so that ``rl.py`` reads as the experiment: vector
environments, the actor and critic (two ``AdaptiveMLP``s with CleanRL's orthogonal init), one
rollout, the advantage estimate, one PPO update, and greedy evaluation of a saved actor.
Everything follows CleanRL's choices (Adam eps 1e-5, advantage normalisation per minibatch,
clipped value loss, truncation treated as termination) so the numbers compare with its results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical

from adaptnet.nn import AdaptiveMLP


@dataclass(frozen=True)
class PPOConfig:
    """CleanRL ppo.py's hyper-parameters (its defaults) that one update needs."""

    num_envs: int = 4
    num_steps: int = 128
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5


def make_envs(env_id: str, num_envs: int, seed: int) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``env_id`` in one process, with episode returns recorded.

    SAME_STEP autoreset gives the reset observation on the step an episode ends, as the gym
    versions CleanRL was written for did; gymnasium 1.x's default (NEXT_STEP) would insert a
    dummy transition after every episode end.
    """
    plain = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)],
                                     autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(plain)
    envs.action_space.seed(seed)
    return envs


def sizes(envs: gym.vector.VectorEnv) -> tuple[int, int]:
    """``(observation size, number of actions)``: flat observations and discrete actions only."""
    obs_space, action_space = envs.single_observation_space, envs.single_action_space
    if not isinstance(action_space, gym.spaces.Discrete) or obs_space.shape is None or len(obs_space.shape) != 1:
        raise ValueError(f"the rl recipe needs flat observations and discrete actions, got {obs_space}, {action_space}")
    return obs_space.shape[0], int(action_space.n)


def policy_net(obs_dim: int, hidden: tuple[int, ...], n_out: int, head_std: float) -> AdaptiveMLP:
    """A tanh ``AdaptiveMLP`` with CleanRL's ``layer_init``: orthogonal weights, zero biases.

    Hidden layers get gain sqrt(2); the head gets ``head_std`` (0.01 for the actor, so the first
    policy is near uniform; 1.0 for the critic).
    """
    net = AdaptiveMLP(obs_dim, list(hidden), n_out, activation="tanh")
    for module in net.modules():
        if isinstance(module, nn.Linear):
            std = head_std if module is net.head else math.sqrt(2)
            nn.init.orthogonal_(module.weight, std)
            nn.init.zeros_(module.bias)
    return net


class Agent(nn.Module):
    """An actor (logits) and a critic (state value), separate networks as in CleanRL."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: tuple[int, ...]):
        super().__init__()
        self.actor = policy_net(obs_dim, hidden, n_actions, head_std=0.01)
        self.critic = policy_net(obs_dim, hidden, 1, head_std=1.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)  # (B,)

    def act(self, obs: torch.Tensor, action: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(action, log-prob, entropy, value)``, each ``(B,)``; samples an action unless one is given."""
        # validate_args=False: the logits come from our own network; the checks cost ~10% of a rollout step.
        dist = Categorical(logits=self.actor(obs), validate_args=False)
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.value(obs)


@dataclass
class Rollout:
    """One rollout of ``num_steps`` steps in ``num_envs`` environments: tensors ``(T, N)`` or ``(T, N, obs)``."""

    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def flat(self) -> tuple[torch.Tensor, ...]:
        """``(obs, actions, logprobs, advantages, returns, values)`` with time and envs merged: ``(T*N, ...)``."""
        assert self.advantages is not None and self.returns is not None, "call advantages() first"
        obs = self.obs.reshape(-1, self.obs.shape[-1])
        return (obs, *(t.reshape(-1) for t in (self.actions, self.logprobs, self.advantages, self.returns,
                                                self.values)))


class Collector:
    """Steps the environments with the current agent; keeps the observation between rollouts."""

    def __init__(self, envs: gym.vector.VectorEnv, seed: int,
                 on_episode: Callable[[int, float], None]):
        self.envs = envs
        obs, _ = envs.reset(seed=seed)
        self.obs = torch.as_tensor(obs, dtype=torch.float32)  # (N, obs)
        self.done = torch.zeros(envs.num_envs)
        self.steps = 0  # environment steps so far, all environments together
        self.on_episode = on_episode  # called with (env step, return) for each finished episode

    @torch.no_grad()
    def rollout(self, agent: Agent, num_steps: int) -> Rollout:
        n = self.envs.num_envs
        obs = torch.zeros(num_steps, n, self.obs.shape[-1])
        actions, logprobs, rewards, dones, values = (torch.zeros(num_steps, n) for _ in range(5))
        for t in range(num_steps):
            obs[t], dones[t] = self.obs, self.done
            action, logprob, _, value = agent.act(self.obs)
            actions[t], logprobs[t], values[t] = action, logprob, value
            next_obs, reward, terminated, truncated, info = self.envs.step(action.numpy())
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
            self.obs = torch.as_tensor(next_obs, dtype=torch.float32)
            self.done = torch.as_tensor(np.logical_or(terminated, truncated), dtype=torch.float32)
            self.steps += n
            if "_episode" in info:
                for i in np.flatnonzero(info["_episode"]):
                    self.on_episode(self.steps, float(info["episode"]["r"][i]))
        return Rollout(obs, actions, logprobs, rewards, dones, values)

    @torch.no_grad()
    def advantages(self, agent: Agent, ro: Rollout, gamma: float, lam: float) -> None:
        """Generalised advantage estimation, bootstrapped from the value of the observation after the rollout."""
        next_value = agent.value(self.obs)
        adv = torch.zeros_like(ro.rewards)
        last = torch.zeros_like(next_value)
        for t in reversed(range(ro.rewards.shape[0])):
            if t == ro.rewards.shape[0] - 1:
                not_done, following = 1.0 - self.done, next_value
            else:
                not_done, following = 1.0 - ro.dones[t + 1], ro.values[t + 1]
            delta = ro.rewards[t] + gamma * following * not_done - ro.values[t]
            last = delta + gamma * lam * not_done * last
            adv[t] = last
        ro.advantages, ro.returns = adv, adv + ro.values


def update(agent: Agent, optimizer: torch.optim.Optimizer, ro: Rollout, cfg: PPOConfig,
           generator: torch.Generator) -> dict[str, float]:
    """``update_epochs`` passes of clipped-surrogate PPO over the rollout in ``num_minibatches`` minibatches."""
    obs, actions, old_logp, adv, returns, old_values = ro.flat()
    batch = obs.shape[0]
    mb = batch // cfg.num_minibatches
    stats: dict[str, float] = {}
    for _ in range(cfg.update_epochs):
        order = torch.randperm(batch, generator=generator)
        for start in range(0, batch, mb):
            idx = order[start:start + mb]
            _, logp, entropy, value = agent.act(obs[idx], actions[idx])
            log_ratio = logp - old_logp[idx]
            ratio = log_ratio.exp()
            a = adv[idx]
            a = (a - a.mean()) / (a.std() + 1e-8)
            pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
            # Clipped value loss, as CleanRL's default (clip_vloss=True).
            v_clipped = old_values[idx] + (value - old_values[idx]).clamp(-cfg.clip_coef, cfg.clip_coef)
            v_loss = 0.5 * torch.max((value - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2).mean()
            loss = pg_loss - cfg.ent_coef * entropy.mean() + cfg.vf_coef * v_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                stats = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(),
                         "entropy": entropy.mean().item(), "approx_kl": ((ratio - 1) - log_ratio).mean().item()}
    return stats


def policy_gradient_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The policy-gradient loss as ``loss_fn(outputs, targets)`` for ``widen(init="gradmax")``.

    ``targets`` is ``(B, 2)``: the action taken and its advantage; the loss is
    ``-mean(log pi(action) * advantage)``, whose gradient is the unclipped PPO gradient.
    """
    logp = F.log_softmax(logits, dim=-1).gather(1, targets[:, :1].long()).squeeze(1)
    return -(logp * targets[:, 1]).mean()


@torch.no_grad()
def play(actor: nn.Module, env_id: str, episodes: int, seed: int, greedy: bool = True) -> list[float]:
    """Returns of ``episodes`` episodes of ``actor`` (logits from observations), one environment, seeds ``seed+i``."""
    env = gym.make(env_id)
    actor.eval()
    returns = []
    generator = torch.Generator().manual_seed(seed)
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            logits = actor(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))  # (1, actions)
            if greedy:
                action = int(logits.argmax(-1))
            else:
                action = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns
