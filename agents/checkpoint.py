"""Checkpoints: what a PPO run consists of, atomic writes, loads that name the bad path and part, RNG capture.

A checkpoint holds what resuming needs and says so in its ``contents`` entry (:func:`describe`
lists the parts with their sizes). It never holds a frozen KL reference model: the env rebuilds
that from the starting model, and the hash recorded here makes sure it is the same one.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import pickle
import random
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from agents.config import PPOConfig
from agents.errors import CheckpointError, NonFiniteError, SpaceMismatchError, nonfinite_tensor

if TYPE_CHECKING:
    from agents.ppo import PPO

__all__ = ["CheckpointError", "SpaceMismatchError", "save_checkpoint", "load_checkpoint", "describe",
           "agent_state", "restore_agent", "check_finite", "saved_config"]

FORMAT_VERSION = 1
REQUIRED_PARTS = ("env_id", "built_from_id", "config", "policy", "optimizer", "obs_normalizer", "reward_scaler",
                  "rng", "progress", "env_state")
# temp files carry host and pid, so a later save can tell a dead writer's leftovers from a live write
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` via a temp file in the same folder and ``os.replace``.

    A crash mid-write leaves the previous checkpoint intact: the rename is atomic on POSIX
    and Windows as long as both names live on one file system, hence the same folder. Temp files
    that a killed writer left next to ``path`` are removed first.
    """
    target = Path(path)
    if target.is_dir():
        raise CheckpointError(f"checkpoint path {str(target)!r} is a directory; pass a file path such as "
                              f"{str(target / 'agent.pt')!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
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


def remove_stale_temp_files(target: Path) -> list[Path]:
    """Delete the temp files of saves to ``target`` whose writer (a process on this host) has died."""
    if os.name != "posix":  # os.kill(pid, 0) is a probe only on POSIX
        return []
    removed = []
    for candidate in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        match = _TEMP_NAME.match(candidate.name)
        if match is None or match["name"] != target.name or match["host"] != _HOST:
            continue
        if not _process_alive(int(match["pid"])):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    return True


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with errors that name the path (and the part)."""
    source = Path(path)
    if source.is_dir():
        raise CheckpointError(f"checkpoint {str(source)!r} is a directory; pass the checkpoint file saved by save()")
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
    for part in REQUIRED_PARTS:
        if part not in state:
            raise CheckpointError(
                f"checkpoint {str(source)!r} has no {part!r} part (it holds {', '.join(sorted(map(str, state)))}); "
                "it was edited or written by something else than PPO.save: use an unmodified checkpoint"
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
    state = {
        "env_id": agent.env_id,
        "built_from_id": agent.training_state()["built_from_id"],
        "env_kwargs": agent.env_kwargs if _is_plain_data(agent.env_kwargs) else None,
        "config": agent.config.to_dict(),
        "spaces": {"observation": agent.envs.single_observation_space, "action": agent.envs.single_action_space},
        "policy": agent.policy.state_dict(),
        "optimizer": agent.optimizer.state_dict(),
        "obs_normalizer": agent.obs_normalizer.stats.state_dict(),
        "reward_scaler": agent.reward_scaler.state_dict(),
        "rng": capture_rng(agent.generator),
        "progress": agent.training_state()["progress"],
        "env_state": _env_state(agent),
        "reference": _reference_record(agent),
    }
    state["contents"] = _contents(agent, state)
    return state


# what differs between the ranks of a data-parallel run (weights, optimizer and statistics are shared)
PER_RANK_PARTS = ("env_state", "rng", "reward_scaler")


def gather_ranks(state: dict[str, Any], group: Any) -> None:
    """Data-parallel runs: rank 0's ``state`` also gets every rank's own parts, as ``state["ranks"]``.

    A collective (every rank calls it); a resume at the same world size then continues each rank
    exactly, and at another world size the ranks the checkpoint has continue and the others start fresh.
    """
    if not group.active:
        return
    import torch.distributed as dist

    mine = {part: state[part] for part in PER_RANK_PARTS}
    gathered: list[Any] | None = [None] * group.world_size if group.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    if group.is_main:
        state["ranks"] = gathered
    state["world_size"] = group.world_size


def check_finite(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """NonFiniteError naming the first NaN / inf tensor of the weights, optimizer or statistics to be saved."""
    found = nonfinite_tensor(_tensors(state, ("policy", "optimizer", "obs_normalizer", "reward_scaler")))
    if found is not None:
        name, bad, total = found
        raise NonFiniteError(
            f"refusing to save {os.fspath(path)!r}: {name} holds {bad} non-finite values (of {total}); "
            "a checkpoint already at that path is left untouched. Training diverged: lower "
            "PPOConfig.learning_rate and resume from the last good checkpoint"
        )


def _tensors(state: dict[str, Any], parts: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """``("policy['actor_head.weight']", tensor)`` for every tensor or float array in those parts."""
    def walk(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(value, torch.Tensor):
            yield prefix, value
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            yield prefix, torch.from_numpy(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from walk(f"{prefix}[{key!r}]", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk(f"{prefix}[{i}]", item)

    for part in parts:
        yield from walk(part, state.get(part))


def restore_agent(agent: PPO, state: dict[str, Any], path: str | os.PathLike[str] = "<checkpoint>") -> None:
    """Inverse of :func:`agent_state`, into an agent freshly built with the same config and env.

    Raises SpaceMismatchError if the env's spaces differ from the checkpoint's, and CheckpointError
    naming the part (and ``path``) that does not fit or holds non-finite weights.
    """
    check_spaces(agent, state, path)
    _check_reference(agent, state, path)
    found = nonfinite_tensor(_tensors(state, ("policy",)))
    if found is not None:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} holds non-finite weights ({found[0]}: {found[1]} of {found[2]} "
            "values are NaN or inf); it was saved after training diverged: use an earlier checkpoint"
        )
    ranks = state.get("ranks")
    if ranks:  # a data-parallel checkpoint: this rank's own parts, where the checkpoint has this rank
        rank = agent.group.rank
        state = {**state, **ranks[rank]} if rank < len(ranks) else {**state, "env_state": None, "rng": None}
    with _part("policy", path):
        agent.policy.load_state_dict(state["policy"])
    with _part("optimizer", path):
        agent.optimizer.load_state_dict(state["optimizer"])
    with _part("obs_normalizer", path):
        agent.obs_normalizer.stats.load_state_dict(state["obs_normalizer"])
    with _part("reward_scaler", path):
        agent.reward_scaler.load_state_dict(state["reward_scaler"])
    with _part("progress", path):
        agent.load_progress(state["progress"])
    if state["env_state"] is None:  # a rank beyond the checkpoint's world size: fresh episodes, own seeds
        return
    with _part("env_state", path):
        _restore_env_state(agent, state["env_state"])
    with _part("rng", path):
        restore_rng(state["rng"], agent.generator)


def saved_config(state: dict[str, Any], path: str | os.PathLike[str]) -> PPOConfig:
    """The checkpoint's PPOConfig, or CheckpointError naming the path if it no longer validates."""
    with _part("config", path):
        return PPOConfig.from_dict(state["config"])


@contextmanager
def _part(name: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn the raw error of restoring one part into a CheckpointError that names the part and the path."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r}: its {name!r} part does not fit this agent "
            f"({type(error).__name__}: {error}); load it with the config and env it was saved with"
        ) from error


def check_spaces(agent: PPO, state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """SpaceMismatchError when the agent's env has other spaces than the checkpoint's (as SB3 checks)."""
    saved = state.get("spaces")
    if not isinstance(saved, dict):
        return  # written before spaces were recorded
    current = {"observation": agent.envs.single_observation_space, "action": agent.envs.single_action_space}
    for kind in ("observation", "action"):
        if kind in saved and saved[kind] != current[kind]:
            raise SpaceMismatchError(
                f"checkpoint {os.fspath(path)!r} was trained with {kind} space {saved[kind]}, but the env it is "
                f"loaded onto has {kind} space {current[kind]}; load it onto the env it was trained on "
                "(same id and env_kwargs)"
            )


def _reference_record(agent: PPO) -> dict[str, Any] | None:
    reference = getattr(agent.envs, "ref_model", None)
    if not isinstance(reference, nn.Module):
        return None
    return {"stored": False, "sha256": weights_digest(reference)}


def _check_reference(agent: PPO, state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    record = state.get("reference")
    reference = getattr(agent.envs, "ref_model", None)
    if not isinstance(record, dict) or not isinstance(reference, nn.Module):
        return
    current = weights_digest(reference)
    if record.get("sha256") != current:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} was trained against a KL reference with weights "
            f"{record.get('sha256')}, but the env's reference has {current}; the reference is not stored in "
            "the checkpoint: build the env from the same starting model"
        )


def weights_digest(model: nn.Module, sample: int = 256) -> str:
    """sha256 of ~``sample`` values per tensor (and every shape): cheap for large models, equal for equal weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def _contents(agent: PPO, state: dict[str, Any]) -> dict[str, str]:
    """One line per part saying what it holds, so that a checkpoint explains its own size."""
    params = sum(p.numel() for p in agent.policy.parameters())
    reference = state["reference"]
    return {
        "policy": f"actor-critic weights ({type(agent.policy).__name__}, {params:,} parameters; "
                  "a language-model actor is the env's own model)",
        "optimizer": "Adam state: two moment tensors per parameter (twice the weights' size), needed to resume exactly",
        "spaces": "the env's observation and action spaces, checked on load",
        "obs_normalizer": "running mean / variance of observations",
        "reward_scaler": "running variance of the discounted return",
        "rng": "Python, numpy, torch and the agent's generator states",
        "progress": "global step, iteration, LR schedule, KL beta, finished episodes",
        "env_state": "episodes in flight, env RNGs, KL controller (no weights)",
        "reference": "no reference model" if reference is None else (
            f"not stored: the env rebuilds its frozen KL reference from the starting model ({reference['sha256']})"),
        "config": "the resolved PPOConfig", "env_id": "the env id", "env_kwargs": "the env's keyword arguments",
        "built_from_id": "whether load() can rebuild the env from env_id and env_kwargs",
    }


def describe(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{part: {"bytes": serialised size, "holds": what it is}}`` for a checkpoint file, largest first."""
    state = load_checkpoint(path)
    contents = state.get("contents", {})
    parts = {
        part: {"bytes": _serialised_size(value), "holds": contents.get(part, "")}
        for part, value in state.items() if part not in ("format_version", "contents")
    }
    return dict(sorted(parts.items(), key=lambda item: -item[1]["bytes"]))


def _serialised_size(value: Any) -> int:
    counter = _ByteCounter()
    torch.save(value, counter)
    return counter.count


class _ByteCounter(io.RawIOBase):
    """A write-only sink that only counts, so sizing a part never holds a second copy of it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.count += size
        return size


def _env_state(agent: PPO) -> dict[str, Any]:
    envs = agent.envs
    state: dict[str, Any] = {
        **agent.training_state()["rollout"], "sub_envs": None,
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
    agent.load_rollout(state)


def _is_plain_data(value: Any) -> bool:
    """Strings, numbers, None and lists / dicts of them: what a checkpoint can hold for env_kwargs."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_data(v) for k, v in value.items())
    return False
