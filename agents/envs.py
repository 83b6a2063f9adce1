"""Turn what the user passed (an id, an Env, a VectorEnv) into one vector env PPO can drive."""

from __future__ import annotations

import copy
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
        check_env_kwargs(env, kwargs, mode)
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


# what make_vec puts in a vector env's spec besides the env's own arguments
VECTOR_SPEC_KEYS = ("num_envs", "vectorization_mode", "vector_kwargs", "wrappers")
# what gym.make itself takes, besides the env constructor's arguments
MAKE_KWARGS = ("max_episode_steps", "disable_env_checker")


def check_env_kwargs(env_id: str, env_kwargs: dict[str, Any], vectorization: str) -> None:
    """ValueError for a key the env's constructor does not take, suggesting the closest one.

    Checked against the signature of the constructor that will receive the kwargs: the id's
    ``vector_entry_point`` for ``vectorization="vector_entry_point"``, else its ``entry_point`` (plus
    ``gym.make``'s own arguments). Constructors taking ``**kwargs`` accept anything.
    """
    check_env_id(env_id)
    spec = gym.spec(env_id)
    vector = vectorization == "vector_entry_point"
    entry_point = spec.vector_entry_point if vector else spec.entry_point
    if "num_envs" in env_kwargs:
        raise ValueError(
            f"env_kwargs key 'num_envs' is set by PPO: use PPOConfig(num_envs={env_kwargs['num_envs']!r}) "
            "(CLI: --num-envs) instead"
        )
    accepted = _parameters(entry_point)
    if accepted is None:
        return
    accepted = accepted - {"self", "num_envs"} | (set() if vector else set(MAKE_KWARGS))
    for key in env_kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(sorted(accepted))}"
            where = entry_point if isinstance(entry_point, str) else getattr(entry_point, "__qualname__", entry_point)
            raise ValueError(f"env_kwargs key {key!r} is not an argument of {env_id} ({where}); {hint}")


def _parameters(entry_point: Any) -> set[str] | None:
    """Keyword names the creator takes, or None when it takes any (``**kwargs``) or cannot be inspected."""
    try:
        creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
        parameters = inspect.signature(creator).parameters.values()
    except (TypeError, ValueError, ImportError, AttributeError, gym.error.Error):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def single_env_copy(env: gym.Env | VectorEnv) -> gym.Env | None:
    """A new single env like ``env`` (or like a vector env's sub-envs) for evaluation, or None.

    ``gym.make(spec)`` when the env has a spec (its kwargs and wrappers come along), else a deep copy.
    """
    if isinstance(env, VectorEnv):
        sub_envs = getattr(env, "envs", None)  # SyncVectorEnv
        if sub_envs:
            return single_env_copy(sub_envs[0])
        spec = getattr(env, "spec", None)
        if spec is None:
            return None
        kwargs = {k: v for k, v in (spec.kwargs or {}).items() if k not in VECTOR_SPEC_KEYS}
        made = gym.make(spec.id, **kwargs)
        for wrapper in (spec.kwargs or {}).get("wrappers") or ():
            made = wrapper(made)
        return made
    if env.spec is not None:
        return gym.make(env.spec)
    try:
        return copy.deepcopy(env)
    except Exception:  # an env holding a window, a socket, a process...: the caller asks for evaluate(env=...)
        return None


def token_eval_env(envs: Any, num_envs: int) -> VectorEnv:
    """A batched copy of a token env (TextRLHF-v0) for evaluation, made from its spec; nothing heavy is copied.

    Same settings, prompts and reward; the trained model and the training env's frozen reference are
    shared through a ``textenv.Shared`` handle (its ``references`` filled in, so no second reference
    is made); the KL coefficient is frozen at its current value (an adaptive controller is not
    advanced by evaluation); finished rows wait (autoreset disabled).
    """
    import torch

    from textenv import Shared  # only token envs get here: classic control never imports textenv

    spec = getattr(envs, "spec", None)
    if spec is None or spec.vector_entry_point is None:
        raise ValueError(
            "this token env was not made by gym.make_vec, so its settings are unknown; pass evaluate(env=...)"
        )
    kwargs = {k: v for k, v in (spec.kwargs or {}).items() if k not in VECTOR_SPEC_KEYS}
    model = Shared(envs.model)
    ref_dtype = kwargs.get("ref_dtype")
    model.references[None if ref_dtype is None else getattr(torch, ref_dtype)] = envs.ref_model
    kwargs.pop("device", None)  # the model passed in decides
    kwargs.update(model=model, tokenizer=envs.tokenizer, kl_coef=float(envs.kl_coef),
                  autoreset_mode=AutoresetMode.DISABLED)
    return gym.make_vec(spec.id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)


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
