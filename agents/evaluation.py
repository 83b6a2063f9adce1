"""Acting with a policy without training it: single actions, sampled episodes, evaluation returns.

Kept apart from the algorithm (``agents/ppo.py``): nothing here writes to the rollout buffer, the
optimizer or training's random streams. A :class:`Player` is what acting needs from an agent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv

from agents.envs import token_eval_env
from agents.errors import NonFiniteError, first_nonfinite
from agents.policies import ActorCritic


@dataclass(frozen=True)
class Player:
    """A policy and the preprocessing (observation normaliser, tensor conversion) it acts through."""

    policy: ActorCritic
    obs_tensor: Callable[[Any], torch.Tensor]

    def act(self, obs: Any, *, deterministic: bool, generator: torch.Generator) -> np.ndarray:
        """Env actions for a batch of raw observations."""
        action, _, _ = self.policy.act(self.obs_tensor(obs), deterministic=deterministic, generator=generator)
        return self.policy.to_env_action(action)


def predict(
    player: Player, obs: Any, space: gym.Space, *, deterministic: bool, generator: torch.Generator
) -> np.ndarray:
    """Action(s) for one observation or a batch of them, checked against the observation space."""
    if isinstance(obs, dict):  # token envs: {"input_ids": [L] or [N, L], "attention_mask": ...}
        single = np.asarray(obs["input_ids"]).ndim == 1
        batch = {key: np.asarray(value)[None] if single else value for key, value in obs.items()}
    else:
        array = np.asarray(obs, dtype=np.float32)
        single = array.shape == tuple(space.shape)
        if not single and array.shape[1:] != tuple(space.shape):
            raise ValueError(
                f"obs has shape {array.shape}; expected {tuple(space.shape)} or (batch, *{tuple(space.shape)})"
            )
        found = first_nonfinite(obs)
        if found is not None:
            raise NonFiniteError(
                f"obs[{', '.join(map(str, found[0]))}] = {found[1]!r} is not finite; predict() needs finite "
                "observations within float32's range"
            )
        batch = array[None] if single else array
    with torch.no_grad():
        env_action = player.act(batch, deterministic=deterministic, generator=generator)
    return env_action[0] if single else env_action


def sample_episodes(
    player: Player, envs: VectorEnv, n_episodes: int, *, deterministic: bool, generator: torch.Generator,
    end_info: Callable[[dict[str, Any]], dict[str, Any]],
) -> list[dict[str, Any]]:
    """``n_episodes`` whole episodes in ``envs``: ``return``, ``length`` and what the env reported at the end.

    ``end_info`` finds the end-of-episode entries in a step's info (where depends on the autoreset mode).
    """
    found: list[dict[str, Any]] = []
    num_envs = envs.num_envs
    with torch.inference_mode():
        while len(found) < n_episodes:
            obs, _ = envs.reset()
            running = np.ones(num_envs, dtype=bool)
            returns, lengths = np.zeros(num_envs), np.zeros(num_envs, dtype=np.int64)
            while running.any():
                action = player.act(obs, deterministic=deterministic, generator=generator)
                obs, reward, terminated, truncated, info = envs.step(action)
                returns += np.where(running, reward, 0.0)
                lengths += running
                done = (terminated | truncated) & running
                final = end_info(info)
                for i in np.flatnonzero(done):
                    reported = {k: v[i] for k, v in final.items() if k[0] != "_" and final.get(f"_{k}", done)[i]}
                    found.append({"return": float(returns[i]), "length": int(lengths[i])} | reported)
                running &= ~done
    return found[:n_episodes]


def single_env_returns(
    player: Player, env: gym.Env, n_episodes: int, *, space: gym.Space, seed: int, deterministic: bool,
    generator: torch.Generator,
) -> list[float]:
    """Returns of ``n_episodes`` played one after another on ``env``; episode ``k`` reset with ``seed + k``.

    ``space`` is the observation space the policy was trained on (each observation is checked against it).
    """
    returns = []
    for k in range(n_episodes):
        obs, _ = env.reset(seed=seed + k)
        total, done, step = 0.0, False, 0
        while not done:
            action = predict(player, obs, space, deterministic=deterministic, generator=generator)
            obs, reward, terminated, truncated, _ = env.step(action)
            if first_nonfinite(reward) is not None:
                raise NonFiniteError(
                    f"the evaluation env returned reward {reward!r} at step {step} of the episode reset with "
                    f"seed {seed + k}; rewards must be finite numbers"
                )
            total += float(reward)
            done = terminated or truncated
            step += 1
        returns.append(total)
    return returns


def token_env_returns(
    player: Player, training_envs: VectorEnv, n_episodes: int, *, seed: int, deterministic: bool,
    generator: torch.Generator,
) -> list[float]:
    """Whole episodes of a token env, ``min(n_episodes, num_envs)`` at a time on a KV-cached copy of it.

    The copy shares the trained model and its frozen reference. The policy reads the env's cached
    next-token distribution through ``policy.envs`` (its ``next_token_cache()``, checked against the
    obs it is asked about), so it points at the evaluation env meanwhile.
    """
    policy = player.policy
    envs = token_eval_env(training_envs, min(n_episodes, training_envs.num_envs))
    attached = policy.envs
    policy.envs = envs
    returns: list[float] = []
    try:
        with torch.inference_mode():
            while len(returns) < n_episodes:
                rows = min(envs.num_envs, n_episodes - len(returns))
                returns += _play_round(player, envs, rows, seed=seed + len(returns), deterministic=deterministic,
                                       generator=generator)
    finally:
        policy.envs = attached
        envs.close()
    return returns


def _play_round(
    player: Player, envs: VectorEnv, rows: int, *, seed: int, deterministic: bool, generator: torch.Generator
) -> list[float]:
    """One episode in each of the first ``rows`` sub-envs (row i reset with ``seed + i``); their returns."""
    running = np.arange(envs.num_envs) < rows
    seeds = [seed + i if running[i] else None for i in range(envs.num_envs)]
    # a last, partial round restarts only the rows it needs; the others wait (autoreset disabled)
    obs, _ = envs.reset(seed=seeds, options=None if running.all() else {"reset_mask": running})
    returns = np.zeros(envs.num_envs)
    while running.any():
        action = player.act(obs, deterministic=deterministic, generator=generator)
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += np.where(running, reward, 0.0)
        running &= ~(terminated | truncated)
    if first_nonfinite(returns[:rows]) is not None:
        raise NonFiniteError(f"the evaluation env returned non-finite rewards: episode returns {returns[:rows]}")
    return returns[:rows].tolist()
