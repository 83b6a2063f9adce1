"""Checkpointable env state: what the envs and their engine keep between steps, as plain data.

Model weights are not part of it: the agent saves the policy, and the reference is rebuilt from the
starting weights. KV caches are not either: they are recomputed from the saved token ids on load.
Only numbers, strings, lists, dicts and numpy arrays go in, so `pickle` and `torch.save` both work
(and `torch.load(weights_only=False)` reads it back).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .core import Engine

__all__ = [
    "FORMAT_VERSION",
    "capture_rng",
    "restore_rng",
    "fingerprint",
    "check_config",
    "require",
    "capture_engine",
    "parse_engine",
    "load_controller",
    "env_state",
    "check_env_state",
]

FORMAT_VERSION = 1

_ENGINE_KEYS = ("config", "obs_ids", "obs_mask", "prompt_index", "responses", "kl_sum", "active",
                "token_ids", "token_mask", "mirror", "kl_controller")
_HINTS = {
    "prompts": "build the env with the same prompts, chat_template and truncate_prompts",
    "reference": "build the env from the same starting model, so that the KL reference is the same",
}


def require(state: Any, keys: Sequence[str], where: str) -> None:
    """A clear error for a non-dict or a missing key, before anything reads it."""
    if not isinstance(state, dict):
        raise ConfigError(f"{where} must be the dict returned by state_dict(), got {type(state).__name__}")
    for key in keys:
        if key not in state:
            raise ConfigError(f"{where} is missing key {key!r}; pass the unmodified dict returned by state_dict()")


def capture_rng(rng: np.random.Generator | None) -> dict[str, Any] | None:
    """The generator's bit-generator state (plain ints), or None for a generator never created."""
    return None if rng is None else copy.deepcopy(rng.bit_generator.state)


def restore_rng(state: dict[str, Any] | None, where: str) -> np.random.Generator | None:
    """A new generator continuing exactly where the saved one stopped."""
    if state is None:
        return None
    name = state.get("bit_generator") if isinstance(state, dict) else None
    cls = getattr(np.random, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, np.random.BitGenerator)):
        raise ConfigError(f"{where}={state!r} is not a numpy bit-generator state (no known 'bit_generator')")
    bit_generator = cls()
    try:
        bit_generator.state = copy.deepcopy(state)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"{where} is not a valid {name} state: {exc}") from exc
    return np.random.Generator(bit_generator)


def _prompts_digest(texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> str:
    data = repr((tuple(texts), tuple(tuple(t) for t in token_ids))).encode()
    return f"{len(texts)} prompts, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def _weights_digest(model: nn.Module, sample: int = 256) -> str:
    """A hash of ~`sample` values per tensor: cheap even for large models, exact for equal weights."""
    digest = hashlib.sha256()
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        digest.update(f"{tuple(p.shape)}{p.dtype}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return f"sha256 {digest.hexdigest()[:16]}"


def fingerprint(engine: Engine) -> dict[str, Any]:
    """The settings a state only makes sense with: a mismatch would break shapes or change results."""
    parts, cfg = engine.parts, engine.cfg
    return {
        "num_envs": engine.num_rows,
        "vocab_size": parts.vocab_size,
        "max_new_tokens": cfg.max_new_tokens,
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "prompts": _prompts_digest(parts.prompts.texts, parts.prompts.token_ids),
        "reference": _weights_digest(parts.reference),
    }


def check_config(saved: Any, current: dict[str, Any]) -> None:
    """ConfigError naming the first setting in which the saved env differs from this one."""
    require(saved, list(current), "state['engine']['config']")
    for key, value in current.items():
        if saved[key] != value:
            hint = _HINTS.get(key, f"build the env with {key}={saved[key]!r}")
            raise ConfigError(
                f"the state was saved by an env with {key}={saved[key]!r}, but this env has {key}={value!r}; {hint}"
            )


def capture_engine(engine: Engine) -> dict[str, Any]:
    """Copies of the episodes in flight, the token state of the caches and the KL controller's state."""
    return {
        "config": fingerprint(engine),
        "obs_ids": engine.obs_ids.copy(),
        "obs_mask": engine.obs_mask.copy(),
        "prompt_index": engine.prompt_index.copy(),
        "responses": [list(r) for r in engine.responses],
        "kl_sum": engine.kl_sum.copy(),
        "active": engine.active.copy(),
        # the reference's cache always holds the same tokens as the policy's
        "token_ids": engine.policy.ids.cpu().numpy().copy(),
        "token_mask": engine.policy.mask.cpu().numpy().copy(),
        "mirror": engine.ref.mirror is not None,
        "kl_controller": copy.deepcopy(engine.parts.controller.state_dict()),
    }


def _array(state: dict[str, Any], key: str, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
    where = f"state['engine'][{key!r}]"
    try:
        value = np.array(state[key], dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} is not an array of {np.dtype(dtype).name}: {exc}") from exc
    if value.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape, strict=True)):
        expected = tuple("any" if s is None else s for s in shape)
        raise ConfigError(f"{where} has shape {value.shape}, expected {expected}")
    return value


def parse_engine(engine: Engine, state: Any) -> dict[str, Any]:
    """Validated copies of a saved engine state, converted to the engine's types; nothing is changed yet."""
    require(state, _ENGINE_KEYS, "state['engine']")
    check_config(state["config"], fingerprint(engine))
    n, width, vocab = engine.num_rows, engine.cfg.obs_length, engine.parts.vocab_size
    out = {key: _array(state, key, np.int64, (n, width)) for key in ("obs_ids", "obs_mask")}
    out["prompt_index"] = _array(state, "prompt_index", np.int64, (n,))
    out["kl_sum"] = _array(state, "kl_sum", np.float64, (n,))
    out["active"] = _array(state, "active", bool, (n,))
    out["token_ids"] = _array(state, "token_ids", np.int64, (n, None))
    out["token_mask"] = _array(state, "token_mask", np.int64, out["token_ids"].shape)
    for key in ("obs_mask", "token_mask"):
        if not np.isin(out[key], (0, 1)).all():
            raise ConfigError(f"state['engine'][{key!r}] holds values other than 0 and 1")
    responses = state["responses"]
    if not isinstance(responses, (list, tuple)) or len(responses) != n:
        raise ConfigError(f"state['engine']['responses'] must be a list of {n} token lists")
    out["responses"] = [[int(t) for t in r] for r in responses]
    if any(len(r) > engine.cfg.max_new_tokens for r in out["responses"]):
        raise ConfigError(f"state['engine']['responses'] holds a response longer than {engine.cfg.max_new_tokens}")
    for key in ("obs_ids", "token_ids"):
        if out[key].size and not (0 <= out[key].min() and out[key].max() < vocab):
            raise ConfigError(f"state['engine'][{key!r}] holds token ids outside [0, {vocab})")
    if not 0 <= out["prompt_index"].min(initial=0) <= out["prompt_index"].max(initial=0) < len(engine.parts.prompts):
        raise ConfigError("state['engine']['prompt_index'] holds an index outside the prompt set")
    out["mirror"] = bool(state["mirror"])
    out["kl_controller"] = state["kl_controller"]
    return out


def load_controller(controller: Any, state: Any) -> None:
    """Restore the KL controller, turning its own lookup errors into one that names the state key."""
    try:
        controller.load_state_dict(copy.deepcopy(state))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"state['engine']['kl_controller']={state!r} does not fit {controller!r}: {exc!r}"
        ) from exc


def env_state(kind: str, engine: Engine, **fields: Any) -> dict[str, Any]:
    """The full state of an env of `kind`: format, engine state and the env's own `fields`."""
    return {"format": FORMAT_VERSION, "kind": kind, "engine": engine.state_dict(), **fields}


def check_env_state(state: Any, kind: str, keys: Sequence[str], engine: Engine) -> None:
    """Check the top level (and the settings, whose message says more than a later shape error)."""
    require(state, ("format", "kind"), "state")
    if state["format"] != FORMAT_VERSION:
        raise ConfigError(f"state['format']={state['format']!r} is not {FORMAT_VERSION}, the one this textenv reads")
    if state["kind"] != kind:
        raise ConfigError(f"the state was saved by a {state['kind']}, not a {kind}; load it into a {state['kind']}")
    require(state, ("engine", *keys), "state")
    require(state["engine"], ("config",), "state['engine']")
    check_config(state["engine"]["config"], fingerprint(engine))
