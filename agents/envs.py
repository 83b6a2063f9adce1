"""Turn what the user passed (an id, an Env, a VectorEnv) into one vector env PPO can drive."""

from __future__ import annotations

import difflib

import gymnasium as gym
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv

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


def make_vector_env(env: str | gym.Env | VectorEnv, config: PPOConfig) -> VectorEnv:
    """Build or wrap ``env`` as a VectorEnv.

    Ids are vectorised with ``config.num_envs`` copies in same-step autoreset mode, where the obs
    returned at an episode end already belongs to the next episode and the final obs sits in
    ``info["final_obs"]``: every step is a real transition. A ready VectorEnv is used as it is.
    """
    if isinstance(env, VectorEnv):
        return env
    if isinstance(env, str):
        check_env_id(env)
        return gym.make_vec(
            env,
            num_envs=config.num_envs,
            vectorization_mode=config.vectorization,
            vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
        )
    if isinstance(env, gym.Env):
        return SyncVectorEnv([lambda: env], autoreset_mode=AutoresetMode.SAME_STEP)
    raise TypeError(
        f"env={env!r} must be a Gymnasium env id (str), a gymnasium.Env or a gymnasium.vector.VectorEnv"
    )


def autoreset_mode(envs: VectorEnv) -> AutoresetMode:
    """The vector env's autoreset mode (Gymnasium's default, next-step, when it does not say)."""
    mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if isinstance(mode, str):
        mode = AutoresetMode(mode)
    if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
        raise ValueError(
            f"vector env autoreset_mode={mode} is not supported: use AutoresetMode.SAME_STEP or NEXT_STEP"
        )
    return mode


def env_id_of(env: str | gym.Env | VectorEnv) -> str | None:
    """The registered id behind ``env``, if any (used for presets, checkpoints and evaluation)."""
    if isinstance(env, str):
        return env
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else None
