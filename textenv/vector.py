"""TextRLHFVectorEnv: N TextRLHF episodes on one policy, one reference and one reward, batched."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import nn

from .config import check_reset_options, takes_env_settings
from .core import Engine, TextEnvAttributes, build_components
from .env import check_token, observation_space
from .errors import ConfigError, InvalidAction, ResetNeeded
from .state import capture_rng, check_env_state, env_state, restore_rng

__all__ = ["TextRLHFVectorEnv"]

RESET_OPTIONS = ("reset_mask", "prompt_index")


@dataclass(frozen=True)
class NextTokenCache:
    """What `TextRLHFVectorEnv.next_token_cache()` hands an agent: one forward of the env's policy."""

    obs: dict[str, np.ndarray]
    """The observation (`input_ids`, `attention_mask`, [num_envs, L]) the outputs belong to."""
    logprobs: torch.Tensor
    """[num_envs, vocab] float32 log pi(. | state) at the env's temperature (and top-k / top-p)."""
    hidden: torch.Tensor
    """[num_envs, hidden] last-layer hidden state at each row's last token."""

    def matches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        """Whether a batch of states ([N, L] each) is exactly the one the cache was computed for."""
        ids, mask = (torch.as_tensor(self.obs[k]) for k in ("input_ids", "attention_mask"))
        return (ids.shape == input_ids.shape and torch.equal(ids.to(input_ids.device), input_ids)
                and torch.equal(mask.to(attention_mask.device).long(), attention_mask.long()))


class TextRLHFVectorEnv(TextEnvAttributes, VectorEnv):
    """`num_envs` TextRLHF-v0 episodes with one batched policy, reference and reward model.

    Same semantics, arguments and info keys as `TextRLHFEnv` (see its docstring); sub-env `i` behaves
    exactly like a `TextRLHFEnv` reset with seed `seed + i` and given the same actions. Per step it
    runs one batched policy forward and one reference forward (KV cache, left-padded rows with explicit
    masks and position ids), plus one prompt forward for the rows that start a new episode, and one
    reward call for all rows that finished.

    Autoreset is Gymnasium's SAME_STEP mode by default: when a row's episode ends, the returned
    observation is already the next episode's first one; the last observation and info of the
    finished episode are in `info["final_obs"]` / `info["final_info"]` (mask `info["_final_obs"]`),
    as `SyncVectorEnv` returns them. With `autoreset_mode=AutoresetMode.DISABLED` a finished row
    waits instead (what RLHF trainers do: one response per prompt per batch): its episode-end step
    returns the final observation and info, later steps ignore its action and return the same
    observation, reward 0 and `terminated=True` (no reward call, no prompt forward), until
    `reset(options={"reset_mask": mask})` (or a plain `reset()`) starts it again.

    `next_logprobs` is [num_envs, vocab], `next_hidden` [num_envs, hidden] and `current_obs` the
    batched observation they belong to; the other agent-facing attributes
    (`model`, `ref_model`, `tokenizer`, `temperature`, `kl_coef`, `kl_controller`, ...) are the
    single env's.
    """

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.SAME_STEP}

    @takes_env_settings
    def __init__(
        self,
        num_envs: int = 1,
        model: nn.Module | str | os.PathLike | None = None,
        *,
        tokenizer: Any = None,
        reward: Any = "sentiment",
        prompts: str | os.PathLike | Sequence[str] | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        device: str | torch.device | None = None,
        render_mode: str | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP,
        **settings: Any,
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ConfigError(f"num_envs={num_envs!r} must be an integer >= 1, e.g. num_envs=16")
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            mode = None
        if mode not in (AutoresetMode.SAME_STEP, AutoresetMode.DISABLED):
            raise ConfigError(
                f"autoreset_mode={autoreset_mode!r} is not supported: use AutoresetMode.SAME_STEP (default) "
                "or AutoresetMode.DISABLED"
            )
        self.autoreset_mode = mode
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode={render_mode!r} is not one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self._parts = build_components(model=model, tokenizer=tokenizer, reward=reward, prompts=prompts,
                                       eos_token_id=eos_token_id, device=device, settings=settings)
        self.num_envs = num_envs
        self._engine = Engine(self._parts, num_rows=num_envs)
        self.single_action_space = spaces.Discrete(self._parts.vocab_size)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.single_observation_space = observation_space(self._parts.vocab_size, self._parts.config.obs_length)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._rngs: list[np.random.Generator | None] = [None] * num_envs
        self._started = False

    @property
    def next_logprobs(self) -> torch.Tensor | None:
        """[num_envs, vocab] float32 log pi(. | current state of each sub-env) at `temperature`."""
        return self._engine.next_logprobs() if self._started else None

    @property
    def next_hidden(self) -> torch.Tensor | None:
        """[num_envs, hidden] last-layer hidden state of the policy at each sub-env's position."""
        if not self._started:
            return None
        self._engine.next_logprobs()  # refreshes the cache first if the weights changed
        return self._engine.policy.hidden

    @property
    def current_obs(self) -> dict[str, np.ndarray] | None:
        """A copy of the observation the sub-envs are in now (what `next_logprobs` belongs to)."""
        return self._engine.observations() if self._started else None

    def next_token_cache(self) -> NextTokenCache | None:
        """The hand-off to an agent: the policy forward this env already ran at the current states.

        An agent whose policy is this env's `model` samples the next tokens from `logprobs` (and
        reads its value head off `hidden`) instead of running the model again, after checking with
        `matches(obs)` that the observation it acts on is the one these belong to. None before the
        first reset.
        """
        if not self._started:
            return None
        logprobs = self._engine.next_logprobs()  # refreshes the cache first if the weights changed
        return NextTokenCache(self._engine.observations(), logprobs, self._engine.policy.hidden)

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode in every sub-env; sub-env i is seeded with `seed + i` (or `seed[i]`).

        `options={"reset_mask": mask}` (a bool array of shape `(num_envs,)`, Gymnasium's convention)
        restarts only the masked sub-envs; the others carry on.
        """
        options = check_reset_options(options, RESET_OPTIONS)
        rows = self._reset_rows(options)
        seeds = self._seeds(seed)
        super().reset(seed=seed if isinstance(seed, int) else None)
        for i, s in enumerate(seeds):
            if s is not None or self._rngs[i] is None:
                self._rngs[i] = seeding.np_random(s)[0]
        indices = self._prompt_indices(options)
        self._engine.start(rows, [indices[i] for i in rows])
        self._started = True
        infos: dict[str, Any] = {}
        for i in rows:
            infos = self._add_info(infos, self._engine.reset_info(i), i)
        return self._engine.observations(), infos

    def _reset_rows(self, options: Mapping[str, Any]) -> list[int]:
        mask = options.get("reset_mask")
        if mask is None:
            return list(range(self.num_envs))
        mask = np.asarray(mask)
        if mask.shape != (self.num_envs,) or mask.dtype != np.bool_ or not mask.any():
            raise ConfigError(
                f"options['reset_mask']={options['reset_mask']!r} must be a bool array of shape ({self.num_envs},) "
                "with at least one True"
            )
        if not self._started and not mask.all():
            raise ResetNeeded("the first reset() must start every sub-env; leave out options['reset_mask']")
        return np.flatnonzero(mask).tolist()

    def _seeds(self, seed: int | Sequence[int | None] | None) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return [int(seed) + i for i in range(self.num_envs)]
        if isinstance(seed, Sequence) and len(seed) == self.num_envs:
            return list(seed)
        raise ConfigError(f"seed={seed!r} must be None, an int, or a list of {self.num_envs} ints / None")

    def _prompt_indices(self, options: Mapping[str, Any]) -> list[int]:
        n = len(self._parts.prompts)
        if "prompt_index" not in options:
            return [self._draw_prompt(rng) for rng in self._rngs]
        value = options["prompt_index"]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        indices = list(value) if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) else None
        if indices is None or len(indices) != self.num_envs or not all(
            isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)) and 0 <= k < n for k in indices
        ):
            raise ConfigError(
                f"options['prompt_index']={value!r} must be {self.num_envs} ints in [0, {n}), one per sub-env"
            )
        return [int(k) for k in indices]

    def step(
        self, actions: Any
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if not self._started:
            raise ResetNeeded("step() was called before reset(); call envs.reset() first")
        tokens = self._check_actions(actions)
        idle = ~self._engine.active
        result = self._engine.step(tokens)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            infos = {}
            for i in np.flatnonzero(~idle).tolist():
                infos = self._add_info(infos, self._engine.step_info(result, i), i)
            terminations = result.done | idle
            truncations = np.zeros(self.num_envs, dtype=np.bool_)
            return self._engine.observations(), result.reward.copy(), terminations, truncations, infos
        finished: dict[int, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}
        for row in result.done_rows.tolist():
            finished[row] = (self._engine.observation(row), self._engine.step_info(result, row))
        if finished:
            rows = list(finished)
            self._engine.start(rows, [self._draw_prompt(self._rngs[r]) for r in rows])
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            if i in finished:
                final_obs, final_info = finished[i]
                infos = self._add_info(infos, {"final_obs": final_obs, "final_info": final_info}, i)
                infos = self._add_info(infos, self._engine.reset_info(i), i)
            else:
                infos = self._add_info(infos, self._engine.step_info(result, i), i)
        truncations = np.zeros(self.num_envs, dtype=np.bool_)
        return self._engine.observations(), result.reward.copy(), result.done.copy(), truncations, infos

    def _check_actions(self, actions: Any) -> np.ndarray:
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu().numpy()
        array = np.asarray(actions)
        if array.shape != (self.num_envs,) or not np.issubdtype(array.dtype, np.integer):
            raise InvalidAction(
                f"actions {actions!r} must be {self.num_envs} integer token ids (shape ({self.num_envs},)), "
                f"got shape {array.shape} dtype {array.dtype}"
            )
        for i, token in enumerate(array.tolist()):
            check_token(token, self._parts.vocab_size, where=f"actions[{i}]")
        return array.astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides what these envs do next, as plain picklable data (no weights).

        The episodes in flight, each sub-env's generator state and the KL controller's state.
        """
        return env_state("TextRLHFVectorEnv", self._engine, rngs=[capture_rng(r) for r in self._rngs],
                         np_random=capture_rng(self._np_random), np_random_seed=self._np_random_seed,
                         started=self._started)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the vector env that wrote `state` stopped (ConfigError if it does not fit).

        Build this env with the same model, num_envs, settings and prompts and give `model` the saved
        policy weights first: the caches (policy and reference) are recomputed with them.
        """
        check_env_state(state, "TextRLHFVectorEnv", ("rngs", "np_random", "np_random_seed", "started"),
                        self._engine)
        if not isinstance(state["rngs"], (list, tuple)) or len(state["rngs"]) != self.num_envs:
            raise ConfigError(f"state['rngs'] must be a list of {self.num_envs} generator states or None")
        rngs = [restore_rng(s, f"state['rngs'][{i}]") for i, s in enumerate(state["rngs"])]
        rng = restore_rng(state["np_random"], "state['np_random']")
        self._engine.load_state_dict(state["engine"])
        self._rngs, self._np_random, self._np_random_seed = rngs, rng, state["np_random_seed"]
        self._started = bool(state["started"])

    def render(self) -> tuple[str, ...] | None:
        """Each sub-env's prompt and response so far."""
        return tuple(self._engine.text(i) for i in range(self.num_envs)) if self._started else None

    def close_extras(self, **kwargs: Any) -> None:
        if hasattr(self, "_engine"):  # construction may have failed before the engine existed
            self._engine.close()
        self._started = False
