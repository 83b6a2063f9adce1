"""Turn what the user passed (an id, an Env, a VectorEnv) into one vector env PPO can drive."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from agents.config import PPOConfig


def check_env_id(env_id: str) -> None:
    """Raise ValueError for an id Gymnasium does not know, suggesting the closest registered one."""
    if env_id in gym.registry:
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"env={env_id!r} is not a registered Gymnasium id{hint} "
        "(import the package that registers it first, or pass a gymnasium.Env)"
    )


def make_vector_env(
    env: str | gym.Env | VectorEnv, config: PPOConfig, env_kwargs: dict[str, Any] | None = None
) -> VectorEnv:
    """Build or wrap ``env`` as a VectorEnv.

    Ids are vectorised with ``config.num_envs`` copies in same-step autoreset mode, where the obs
    returned at an episode end already belongs to the next episode and the final obs sits in
    ``info["final_obs"]``: every step is a real transition. An id that registers its own batched
    vector env (TextRLHF-v0) gets that one; with ``config.whole_episodes`` it is asked for disabled
    autoreset, so that finished envs wait without computing. ``env_kwargs`` go to the env's
    constructor. A ready VectorEnv is used as it is.
    """
    if isinstance(env, VectorEnv):
        return env
    if env_kwargs and not isinstance(env, str):
        raise ValueError("env_kwargs only apply to an env id; build the env object with them yourself")
    if isinstance(env, str):
        check_env_id(env)
        kwargs = dict(env_kwargs or {})
        mode = config.vectorization
        entry_point = gym.spec(env).vector_entry_point
        if mode == "vector_entry_point":
            if entry_point is None:
                raise ValueError(
                    f"PPOConfig.vectorization='vector_entry_point' but {env!r} registers no vector env; use 'sync'"
                )
            if config.whole_episodes and _accepts(entry_point, "autoreset_mode"):
                kwargs.setdefault("autoreset_mode", AutoresetMode.DISABLED)
            return gym.make_vec(env, num_envs=config.num_envs, vectorization_mode=mode, **kwargs)
        return gym.make_vec(
            env, num_envs=config.num_envs, vectorization_mode=mode,
            vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **kwargs,
        )
    if isinstance(env, gym.Env):
        return SyncVectorEnv([lambda: env], autoreset_mode=AutoresetMode.SAME_STEP)
    raise TypeError(
        f"env={env!r} must be a Gymnasium env id (str), a gymnasium.Env or a gymnasium.vector.VectorEnv"
    )


def _accepts(entry_point: Any, name: str) -> bool:
    creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
    try:
        return name in inspect.signature(creator).parameters
    except (TypeError, ValueError):
        return False


def autoreset_mode(envs: VectorEnv, config: PPOConfig) -> AutoresetMode:
    """The vector env's autoreset mode (Gymnasium's default, next-step, when it does not say).

    Disabled autoreset works only for whole-episode rollouts, and only with a vector env that lets a
    finished sub-env wait (ignores its actions until reset), as TextRLHF-v0's does; Gymnasium's own
    Sync/AsyncVectorEnv refuse to step a finished sub-env.
    """
    mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if isinstance(mode, str):
        mode = AutoresetMode(mode)
    if mode == AutoresetMode.DISABLED:
        if not config.whole_episodes:
            raise ValueError(
                "the vector env has autoreset_mode=DISABLED, which needs PPOConfig(whole_episodes=True); "
                "or build it with AutoresetMode.SAME_STEP"
            )
        if isinstance(envs.unwrapped, (SyncVectorEnv, AsyncVectorEnv)):
            raise ValueError(
                "Gymnasium's Sync/AsyncVectorEnv cannot step a finished env in autoreset_mode=DISABLED; "
                "build it with AutoresetMode.SAME_STEP (whole_episodes=True masks the extra steps)"
            )
    return mode


def env_id_of(env: str | gym.Env | VectorEnv) -> str | None:
    """The registered id behind ``env``, if any (used for presets, checkpoints and evaluation)."""
    if isinstance(env, str):
        return env
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else None
