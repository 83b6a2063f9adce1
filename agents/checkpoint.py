"""Checkpoints: what a PPO run consists of, atomic writes, loads that name the bad path, RNG capture."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from agents.ppo import PPO

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not ours; the message names the path."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` via a temp file in the same folder and ``os.replace``.

    A crash mid-write leaves the previous checkpoint intact: the rename is atomic on POSIX
    and Windows as long as both names live on one file system, hence the same folder.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with errors that name the path."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {str(source)!r} does not exist; check the path passed to load()")
    try:
        # our checkpoints hold numpy arrays and pickled env states, so a full unpickle is needed:
        # load only files you wrote yourself, as with any pickle
        state = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {str(source)!r} is corrupt or not a checkpoint ({type(error).__name__}: {error}); "
            "it was probably cut off mid-copy: use an earlier checkpoint"
        ) from error
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(source)!r} was not written by agents.PPO.save (format_version "
            f"{state.get('format_version') if isinstance(state, dict) else None!r}, expected {FORMAT_VERSION})"
        )
    return state


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a run draws from, so that a resumed run draws the same numbers."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


def agent_state(agent: PPO) -> dict[str, Any]:
    """Everything a run needs to continue exactly: weights, optimizer, statistics, RNGs, envs, progress."""
    return {
        "env_id": agent.env_id,
        "built_from_id": agent._built_from_id,
        "env_kwargs": agent.env_kwargs if _is_plain_data(agent.env_kwargs) else None,
        "config": agent.config.to_dict(),
        "policy": agent.policy.state_dict(),
        "optimizer": agent.optimizer.state_dict(),
        "obs_normalizer": agent.obs_normalizer.stats.state_dict(),
        "reward_scaler": agent.reward_scaler.state_dict(),
        "rng": capture_rng(agent.generator),
        "progress": {
            "global_step": agent.global_step, "iteration": agent.iteration, "kl_beta": agent.kl_beta,
            "schedule": agent._schedule, "episodes": list(agent.episodes),
        },
        "env_state": _env_state(agent),
    }


def restore_agent(agent: PPO, state: dict[str, Any]) -> None:
    """Inverse of :func:`agent_state`, into an agent freshly built with the same config and env."""
    agent.policy.load_state_dict(state["policy"])
    agent.optimizer.load_state_dict(state["optimizer"])
    agent.obs_normalizer.stats.load_state_dict(state["obs_normalizer"])
    agent.reward_scaler.load_state_dict(state["reward_scaler"])
    progress = state["progress"]
    agent.global_step, agent.iteration = progress["global_step"], progress["iteration"]
    agent.kl_beta, agent._schedule = progress["kl_beta"], tuple(progress["schedule"])
    agent.episodes = [tuple(e) for e in progress["episodes"]]
    _restore_env_state(agent, state["env_state"])
    restore_rng(state["rng"], agent.generator)


def _env_state(agent: PPO) -> dict[str, Any]:
    envs = agent.envs
    state: dict[str, Any] = {
        "next_obs": agent._next_obs, "reset_pending": agent._reset_pending, "fresh": agent._fresh,
        "episode_return": agent._episode_return, "episode_length": agent._episode_length, "sub_envs": None,
        # envs that can describe their own state (TextRLHF-v0: episodes in flight, KL controller)
        "vector_env": envs.state_dict() if hasattr(envs, "state_dict") else None,
    }
    sub_envs = getattr(envs, "envs", None)  # SyncVectorEnv keeps its envs in-process
    if sub_envs is not None:
        try:
            state["sub_envs"] = pickle.dumps(sub_envs)
        except Exception:  # an env that cannot be pickled restarts its episodes on load instead
            state["sub_envs"] = None
    return state


def _restore_env_state(agent: PPO, state: dict[str, Any]) -> None:
    if state.get("vector_env") is not None and hasattr(agent.envs, "load_state_dict"):
        agent.envs.load_state_dict(state["vector_env"])
    else:
        sub_envs = getattr(agent.envs, "envs", None)
        if state["sub_envs"] is None or sub_envs is None:
            return  # fresh episodes from the reset in PPO.__init__
        restored = pickle.loads(state["sub_envs"])
        if len(restored) != len(sub_envs):
            return
        agent.envs.envs = restored
    agent._next_obs, agent._reset_pending = state["next_obs"], state["reset_pending"]
    agent._fresh = bool(state.get("fresh", False))
    agent._episode_return, agent._episode_length = state["episode_return"], state["episode_length"]


def _is_plain_data(value: Any) -> bool:
    """Strings, numbers, None and lists / dicts of them: what a checkpoint can hold for env_kwargs."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_data(v) for k, v in value.items())
    return False
