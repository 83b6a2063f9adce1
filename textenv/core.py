"""The batched episode machinery shared by the single env (one row) and the vector env (N rows).

Keeping one implementation is what makes the vector env's per-env results equal the single env's:
they differ only in how many rows the same code runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import AdapterReference, adapters_off_context
from .config import TextEnvConfig, check_context, check_tokenizer_size, eos_ids
from .decoding import DecodeState
from .errors import ConfigError, NonFiniteError
from .kl import KLController, as_kl_controller, kl_estimates, restrict_to_support
from .lm_head import LogitHead
from .models import (
    Shared,
    load_policy,
    load_tokenizer,
    model_config,
    model_source,
    release_reference,
    same_weights,
    target_device,
    weights_version,
)
from .paired import PairedDecodeState, ReferenceRows
from .prompts import PromptSet, load_prompts
from .rewards import RewardSet, build_reward, check_reward
from .state import capture_engine, load_controller, parse_engine

__all__ = ["Components", "build_components", "Engine", "StepResult", "TextEnvAttributes"]

# constructor arguments that may hold heavy objects; anything else in a spec is plain data
_HEAVY_KWARGS = ("model", "tokenizer", "reward", "kl_coef", "prompts")


@dataclass
class Components:
    """Everything an env is built from, resolved once: models, tokenizer, prompts, reward, settings."""

    policy: nn.Module
    reference: nn.Module
    tokenizer: Any
    prompts: PromptSet
    reward: RewardSet
    controller: KLController
    config: TextEnvConfig
    eos_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int
    handles: dict[str, Shared]


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Shared) else value


def build_components(
    *,
    model: Any,
    tokenizer: Any,
    reward: Any,
    prompts: Any,
    eos_token_id: int | Sequence[int] | None,
    device: str | torch.device | None,
    settings: dict[str, Any],
) -> Components:
    """Validate the settings, then load or adopt models, tokenizer, prompts and reward.

    Cheapest first: settings, device, prompt files, reward names and paths, the model's context (its
    config alone), tokenizer and prompt lengths, reward models; the policy's weights load last, so a
    mistake anywhere costs no policy load.
    """
    settings = dict(settings)  # the TextEnvConfig fields the caller set; the others keep their defaults
    controller = as_kl_controller(_unwrap(settings.pop("kl_coef", TextEnvConfig.kl_coef)))
    _check_controller(controller)
    config = TextEnvConfig(kl_coef=controller, **settings)
    device = target_device(model, device)
    texts = load_prompts(_unwrap(prompts))
    check_reward(_unwrap(reward))
    source = model_source(model)
    check_context(config, model_config(model, source))
    tokenizer = load_tokenizer(_unwrap(tokenizer), source)
    prompt_set = PromptSet.build(
        texts, tokenizer, max_prompt_tokens=config.max_prompt_tokens,
        chat_template=config.chat_template, truncate=config.truncate_prompts,
    )
    reward_set = build_reward(_unwrap(reward), tokenizer=tokenizer, device=device)
    policy, reference, source, model_handle = load_policy(model, device=device, ref_dtype=config.ref_dtype)
    vocab_size = _vocab_size(policy)
    check_tokenizer_size(tokenizer, vocab_size)
    ends = eos_ids(eos_token_id, tokenizer, getattr(policy, "generation_config", None), vocab_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0] if ends else 0
    handles = {"tokenizer": Shared(tokenizer), "reward": Shared(reward_set), "kl_coef": Shared(controller),
               "prompts": Shared(_unwrap(prompts))}
    if model_handle is not None:
        handles["model"] = model_handle
    return Components(policy, reference, tokenizer, prompt_set, reward_set, controller, config, ends,
                      int(pad_id), vocab_size, handles)


def _check_controller(controller: KLController) -> None:
    value = getattr(controller, "value", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"kl_coef={type(controller).__name__} has the value {value!r}; a KL controller's value must be "
            f"a finite number >= 0"
        )


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool, os.PathLike)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


@dataclass
class StepResult:
    """One step of all rows; `done_rows` index the rows whose episode ended (and `final_*` with them)."""

    reward: np.ndarray
    done: np.ndarray
    estimates: dict[str, np.ndarray]
    kl_coef: float
    done_rows: np.ndarray
    final: list[dict[str, Any]]


class Engine:
    """Runs `num_rows` episodes in lockstep: one batched policy and one reference forward per step."""

    def __init__(self, parts: Components, num_rows: int) -> None:
        cfg = parts.config
        self.parts, self.cfg, self.num_rows = parts, cfg, num_rows
        self.policy, self.ref = self._decode_states()
        self._truncated = cfg.top_k > 0 or cfg.top_p < 1.0
        self.obs_ids = np.full((num_rows, cfg.obs_length), parts.pad_id, dtype=np.int64)
        self.obs_mask = np.zeros((num_rows, cfg.obs_length), dtype=np.int64)
        self.prompt_index = np.zeros(num_rows, dtype=np.int64)
        self.responses: list[list[int]] = [[] for _ in range(num_rows)]
        self.kl_sum = np.zeros(num_rows, dtype=np.float64)
        self.active = np.zeros(num_rows, dtype=bool)
        self._eos = np.array(parts.eos_ids, dtype=np.int64)
        self._verified: tuple[int, int] | None = None
        self._mirror_if_same()

    def _decode_states(self) -> tuple[DecodeState, DecodeState | ReferenceRows]:
        cfg, parts = self.cfg, self.parts
        common = {"num_rows": self.num_rows, "temperature": cfg.temperature, "pad_id": parts.pad_id}
        # the reference is scored at the temperature alone; with top-k / top-p it is renormalised
        # over the tokens the policy can sample (see `step`), so the KL compares the same support
        reference = parts.reference
        if isinstance(reference, AdapterReference) and reference.mixed_batches and reference.adapter_name:
            # LoRA: one forward over policy rows and base-model rows reads the shared weights once
            pair = PairedDecodeState(reference.policy, adapter=reference.adapter_name, track_weights=True,
                                     top_k=cfg.top_k, top_p=cfg.top_p, **common)
            return pair, pair.reference()
        policy = DecodeState(parts.policy, track_weights=True, top_k=cfg.top_k, top_p=cfg.top_p, **common)
        module, adapters_off = adapters_off_context(reference)
        return policy, DecodeState(module, track_weights=False, adapters_off=adapters_off, **common)

    @property
    def _adapter_reference(self) -> bool:
        return isinstance(self.parts.reference, AdapterReference)

    def _same_as_policy(self) -> bool:
        """Whether the reference holds the policy's very weights, so it may borrow the policy's outputs.

        An adapter reference shares the policy's parameters, so equal tensors say nothing there: it
        always runs its own forwards (exactly the policy's while the adapters are still zero).
        """
        return not self._adapter_reference and same_weights(self.policy.params, self.ref.params)

    def _mirror_if_same(self) -> None:
        if self._same_as_policy():
            self.ref.mirror = self.policy
            self._verified = weights_version(self.policy.params)

    def use_reference(self, reference: nn.Module) -> None:
        """Score the KL against `reference` from now on (e.g. an `AdapterReference` once LoRA is on).

        Both decode states are rebuilt, since the policy's modules may have changed (adapters
        injected), and episodes in flight are recomputed from their tokens.
        """
        ids, mask = self.policy.ids, self.policy.mask
        LogitHead.forget(self.parts.policy)
        self.policy.clear()
        self.ref.clear()
        self.parts.reference = reference
        self.policy, self.ref = self._decode_states()
        self._verified = None
        self._mirror_if_same()
        if ids.shape[1]:
            self.policy.restore(ids, mask)
            self.ref.restore(ids, mask)
            self._check_outputs()

    def _check_reference(self, *, sampled: bool = False, replacing_all: bool = False) -> None:
        """While the policy still has the reference's weights, the reference borrows its outputs.

        That makes the KL exactly 0 before training and skips half the forwards. Equality is checked
        in full whenever the weights' version changes, and on a sample of every tensor at each episode
        start (writes through `p.data` bypass version counters); the first difference gives the
        reference its own forwards for good.
        """
        if self.ref.mirror is None:
            return
        version = weights_version(self.policy.params)
        if version != self._verified:
            same = same_weights(self.policy.params, self.ref.params)
        else:
            same = not sampled or same_weights(self.policy.params, self.ref.params, sample=256)
        if same:
            self._verified = version
        else:  # no point recomputing rows that are about to be replaced
            self.ref.unmirror(refresh=not replacing_all)

    def start(self, rows: list[int], prompt_indices: list[int]) -> None:
        """Begin episodes in `rows` with the given prompts (by index into the prompt set)."""
        prompts = [list(self.parts.prompts.token_ids[k]) for k in prompt_indices]
        width = self.cfg.max_prompt_tokens
        for row, k, ids in zip(rows, prompt_indices, prompts, strict=True):
            self.obs_ids[row] = self.parts.pad_id
            self.obs_mask[row] = 0
            self.obs_ids[row, width - len(ids) : width] = ids
            self.obs_mask[row, width - len(ids) : width] = 1
            self.prompt_index[row], self.responses[row], self.kl_sum[row] = k, [], 0.0
            self.active[row] = True
        self._check_reference(sampled=True, replacing_all=sorted(rows) == list(range(self.num_rows)))
        self.policy.start(rows, prompts)
        self.ref.start(rows, prompts)
        self._check_outputs()

    def next_logprobs(self) -> torch.Tensor | None:
        """Policy log-probs for the current states, recomputed first if the weights changed."""
        recomputed = self.policy.stale()
        if recomputed:
            self.policy.refresh()
        if self.ref.mirror is None and self.ref.stale():  # released after the last episode ended
            self.ref.refresh()
            recomputed = True
        mirrored = self.ref.mirror is not None
        self._check_reference()
        if recomputed or (mirrored and self.ref.mirror is None):
            self._check_outputs()
        return self.policy.logprobs

    def _check_outputs(self) -> None:
        """NonFiniteError if an active row's next-token log-probs (policy or reference) are not finite.

        Checked as they are computed, so a NaN never reaches the agent's sampler or the KL term.
        """
        rows = np.flatnonzero(self.active)
        if len(rows):
            self._check_logprobs(self.policy, rows, "policy")
            if self.ref.mirror is None:
                self._check_logprobs(self.ref, rows, "reference")

    def _check_logprobs(self, state: DecodeState, rows: np.ndarray, who: str) -> None:
        logprobs = state.logprobs
        if logprobs is None:
            return
        # NaN propagates through max: one reduction catches NaN, +inf and rows with no finite entry
        bad = (~torch.isfinite(logprobs.amax(-1))).cpu().numpy()
        hits = rows[bad[rows]]
        if not len(hits):
            return
        row = int(hits[0])
        values = logprobs[row]
        kind = "hold NaN" if bool(values.isnan().any()) else "hold +inf" if bool(values.isposinf().any()) else (
            "are -inf for every token")
        where = f"at env index {row}, step {len(self.responses[row])}"
        if who == "policy":
            raise NonFiniteError(
                f"the policy's next-token log-probs {kind} {where}; the policy's weights are probably "
                f"non-finite (a diverged update?): check torch.isfinite(p).all() for p in env.model.parameters(), "
                f"then lower the learning rate or reload a checkpoint"
            )
        fp16 = ", or use ref_dtype='bfloat16' (float16 overflows)" if self.cfg.ref_dtype == "float16" else ""
        raise NonFiniteError(
            f"the reference's next-token log-probs {kind} {where}; the reference model's weights are probably "
            f"non-finite (env.ref_model is a frozen copy of the starting weights): build the env from a "
            f"model with finite weights{fp16}"
        )

    def _check_estimates(self, estimates: dict[str, np.ndarray], actions: np.ndarray, live: np.ndarray) -> None:
        """NonFiniteError if the KL estimate in the reward, or the action's log-prob, is not finite."""
        for name in (self.cfg.kl_estimator, "logprob"):
            hits = np.flatnonzero(live & ~np.isfinite(estimates[name]))
            if not len(hits):
                continue
            row = int(hits[0])
            logp = float(estimates["logprob"][row])
            ref_logp = float(estimates["ref_logprob"][row])
            what = "the action's log-prob" if name == "logprob" else f"the KL estimate {name!r}"
            cfg = self.cfg
            if logp == -math.inf:
                fix = (f"the policy gives token {int(actions[row])} probability 0 at temperature={cfg.temperature}, "
                       f"top_k={cfg.top_k}, top_p={cfg.top_p}: sample actions from env.next_logprobs")
            elif ref_logp == -math.inf:
                fix = ("the reference gives the token probability 0, so log pi - log pi_ref is infinite: build "
                       "the env from a reference that can produce every token the policy samples")
            else:
                fix = (f"the estimate overflowed: the token is far less likely under the policy than under the "
                       f"reference (sampled at another temperature than temperature={cfg.temperature}?)")
            raise NonFiniteError(
                f"{what} is {estimates[name][row]} at env index {row}, step {len(self.responses[row])} "
                f"(action {int(actions[row])}: log pi={logp:.6g}, log pi_ref={ref_logp:.6g}); {fix}"
            )

    def step(self, actions: np.ndarray) -> StepResult:
        """Score `actions` ([num_rows] token ids) against the held distributions, then advance.

        Rows without an episode in flight (finished and not restarted, see the vector env's
        disabled autoreset) ignore their action: reward 0, no token, not done again.
        """
        logprobs = self.next_logprobs()
        live = self.active.copy()
        tokens = torch.as_tensor(np.where(live, actions, self.parts.pad_id), dtype=torch.long, device=logprobs.device)
        ref_logprobs = self.ref.logprobs
        if self._truncated and self.ref.mirror is None:
            ref_logprobs = restrict_to_support(ref_logprobs, logprobs)
        estimates = {k: v.double().cpu().numpy() for k, v in kl_estimates(logprobs, ref_logprobs, tokens).items()}
        for values in estimates.values():
            values[~live] = 0.0
        self._check_estimates(estimates, actions, live)
        kl = estimates[self.cfg.kl_estimator]
        coef = float(self.parts.controller.value)
        if not math.isfinite(coef):
            raise NonFiniteError(
                f"the KL coefficient is {coef} (from {self.parts.controller!r}); a KL controller must keep "
                f"its value a finite number >= 0: check its update()"
            )
        reward = 0.0 - coef * kl  # 0.0 - ...: a zero KL gives +0.0, not -0.0
        reward[~live] = 0.0
        self.kl_sum += kl
        column = self.cfg.max_prompt_tokens
        for row in np.flatnonzero(live).tolist():
            self.responses[row].append(int(actions[row]))
            self.obs_ids[row, column + len(self.responses[row]) - 1] = actions[row]
            self.obs_mask[row, column + len(self.responses[row]) - 1] = 1
        eos = np.isin(actions, self._eos)
        lengths = np.array([len(r) for r in self.responses])
        done = live & (eos | (lengths >= self.cfg.max_new_tokens))
        done_rows = np.flatnonzero(done)
        final: list[dict[str, Any]] = []
        if len(done_rows):
            scores, final = self._finish(done_rows, eos)
            reward[done_rows] += scores
            self.active[done_rows] = False
        if self.active.any():
            keep = torch.as_tensor(self.active, device=tokens.device)
            self.policy.advance(tokens, keep)
            self.ref.advance(tokens, keep)
            self._check_outputs()
        else:  # every episode ended: nothing reads the caches until the next start
            self.policy.release()
            self.ref.release()
        return StepResult(reward, done, estimates, coef, done_rows, final)

    def _finish(self, rows: np.ndarray, eos: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Score the finished rows in one reward call; feed their KL to the controller."""
        cfg, texts = self.cfg, self.parts.prompts.texts
        ended = [bool(eos[r]) for r in rows]
        # the EOS token ends the episode but is not part of the completion text
        completion_ids = [self.responses[r][: len(self.responses[r]) - e] for r, e in zip(rows, ended, strict=True)]
        prompts = [texts[self.prompt_index[r]] for r in rows]
        completions = self.parts.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        total, parts = self.parts.reward(
            prompts, completions, completion_ids=completion_ids, eos=ended,
            where=[f"env index {r}, step {len(self.responses[r]) - 1}" for r in rows],
            prompt_ids=[list(self.parts.prompts.token_ids[self.prompt_index[r]]) for r in rows],
        )
        if cfg.missing_eos_penalty is not None:
            total = total - cfg.missing_eos_penalty * ~np.array(ended)
        score = np.clip(total, -cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip is not None else total
        self.parts.controller.update(float(self.kl_sum[rows].mean()), len(rows))
        final = []
        for j, r in enumerate(rows):
            info = {"score": float(score[j])}
            info.update({f"score/{name}": float(values[j]) for name, values in parts.items()})
            info.update(prompt=prompts[j], completion=completions[j], eos=ended[j],
                        truncated_at_max_tokens=not ended[j], completion_length=len(self.responses[r]),
                        episode_kl=float(self.kl_sum[r]))
            final.append(info)
        return score, final

    def observation(self, row: int) -> dict[str, np.ndarray]:
        return {"input_ids": self.obs_ids[row].copy(), "attention_mask": self.obs_mask[row].copy()}

    def observations(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.obs_ids.copy(), "attention_mask": self.obs_mask.copy()}

    def step_info(self, result: StepResult, row: int) -> dict[str, Any]:
        """The per-token info of `row`, plus the end-of-episode keys if it just finished."""
        e = result.estimates
        info = {"kl": float(e[self.cfg.kl_estimator][row]), "kl_k1": float(e["k1"][row]),
                "kl_k3": float(e["k3"][row]), "kl_full": float(e["full"][row]),
                "logprob": float(e["logprob"][row]), "ref_logprob": float(e["ref_logprob"][row]),
                "kl_coef": result.kl_coef}
        if result.done[row]:
            info.update(result.final[int(np.searchsorted(result.done_rows, row))])
        return info

    def reset_info(self, row: int) -> dict[str, Any]:
        k = int(self.prompt_index[row])
        return {"prompt": self.parts.prompts.texts[k], "prompt_index": k}

    def text(self, row: int) -> str:
        completion = self.parts.tokenizer.decode(self.responses[row], skip_special_tokens=True)
        return f"{self.parts.prompts.texts[self.prompt_index[row]]}\n{completion}"

    def state_dict(self) -> dict[str, Any]:
        """Plain data for everything kept between steps (no weights, no caches; see `textenv.state`)."""
        return capture_engine(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: caches are recomputed from the saved tokens with today's weights.

        The mirror is re-checked: a reference that borrowed the policy's outputs goes on doing so only
        while the weights are still equal (what the saved engine would find at its next check); one
        that ran its own forwards keeps doing so, as it would have.
        """
        saved = parse_engine(self, state)  # validates all before anything changes
        load_controller(self.parts.controller, saved["kl_controller"])
        self.obs_ids, self.obs_mask = saved["obs_ids"], saved["obs_mask"]
        self.prompt_index, self.responses = saved["prompt_index"], saved["responses"]
        self.kl_sum, self.active = saved["kl_sum"], saved["active"]
        mirror = saved["mirror"] and self._same_as_policy()
        self.ref.mirror = self.policy if mirror else None
        self._verified = weights_version(self.policy.params) if mirror else None
        ids, mask = torch.from_numpy(saved["token_ids"]), torch.from_numpy(saved["token_mask"])
        self.policy.restore(ids, mask)
        self.ref.restore(ids, mask)
        self._check_outputs()

    def close(self) -> None:
        self.policy.clear()
        self.ref.clear()


class TextEnvAttributes:
    """The attributes an agent reads on both envs, and a `spec` whose kwargs stay light.

    Gymnasium deep-copies spec kwargs on every `env.spec` read under wrappers, and `check_env`
    re-creates envs from them: heavy kwargs are swapped for `Shared` handles as the spec is set.
    """

    _parts: Components
    _engine: Engine
    _spec: Any = None
    _prompt_pool: np.ndarray | None = None  # set by shard_prompts

    @property
    def spec(self) -> Any:
        return self._spec

    @spec.setter
    def spec(self, value: Any) -> None:
        parts = getattr(self, "_parts", None)
        if parts is not None and value is not None and isinstance(getattr(value, "kwargs", None), dict):
            kwargs = dict(value.kwargs)
            for key in _HEAVY_KWARGS:
                if key in kwargs and not _is_plain(kwargs[key]) and key in parts.handles:
                    kwargs[key] = parts.handles[key]
            value.kwargs = kwargs
        self._spec = value

    @property
    def model(self) -> nn.Module:
        """The policy: the very module passed in (or loaded), which the agent trains."""
        return self._parts.policy

    @property
    def ref_model(self) -> nn.Module:
        """The KL reference: a frozen copy of the policy's starting weights (eval mode, requires_grad
        False), or with LoRA an `AdapterReference`, the policy itself with its adapters off (no copy)."""
        return self._parts.reference

    def use_lora_reference(self, peft_model: Any, *, mixed_batches: bool = True) -> None:
        """Score the KL against the policy with its LoRA adapters off, and drop the frozen copy.

        `peft_model` is the `peft.PeftModel` made from this env's own policy (`env.model`), e.g. by
        `get_peft_model(env.model, LoraConfig(...))`, which injects the adapters in place. The
        reference is then the base model at no memory cost; envs re-created from this env's spec
        (evaluation copies, `check_env`) share it. With `mixed_batches` (default) each step runs one
        forward whose rows are the policy's and the base model's (peft's per-row adapters), so the
        shared weights are read once; False runs the reference as a forward of its own.
        """
        get_base = getattr(peft_model, "get_base_model", None)
        if get_base is None or get_base() is not self.model:
            raise ConfigError(
                "use_lora_reference(peft_model) needs the peft model made from this env's policy: "
                "peft_model = get_peft_model(env.model, LoraConfig(...))"
            )
        old = self._parts.reference
        reference = AdapterReference(peft_model, mixed_batches=mixed_batches)
        self._engine.use_reference(reference)
        handle = self._parts.handles.get("model")
        if handle is not None:
            handle.references = dict.fromkeys(handle.references or [None], reference)
        release_reference(old)

    @property
    def tokenizer(self) -> Any:
        return self._parts.tokenizer

    @property
    def config(self) -> TextEnvConfig:
        return self._parts.config

    @property
    def temperature(self) -> float:
        return self._parts.config.temperature

    @property
    def top_k(self) -> int:
        return self._parts.config.top_k

    @property
    def top_p(self) -> float:
        return self._parts.config.top_p

    @property
    def max_new_tokens(self) -> int:
        return self._parts.config.max_new_tokens

    @property
    def max_prompt_tokens(self) -> int:
        return self._parts.config.max_prompt_tokens

    @property
    def kl_controller(self) -> KLController:
        return self._parts.controller

    @property
    def kl_coef(self) -> float:
        """The current KL coefficient (changes over time with an adaptive controller)."""
        return float(self._parts.controller.value)

    @property
    def reward_fn(self) -> RewardSet:
        return self._parts.reward

    @property
    def prompts(self) -> tuple[str, ...]:
        return self._parts.prompts.texts

    def shard_prompts(self, rank: int, world_size: int) -> None:
        """Draw episodes' prompts from this rank's share of the prompt set only: indices `k % world_size == rank`.

        A data-parallel run (PPO under torchrun calls it) then gives each prompt to one rank instead of
        every rank sampling from all of them. With fewer prompts than ranks every rank keeps them all;
        `shard_prompts(0, 1)` undoes a shard. `options["prompt_index"]` in `reset` can still pick any prompt.
        """
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"shard_prompts({name}={value!r}): must be an int, e.g. shard_prompts(0, 2)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"shard_prompts(rank={rank}, world_size={world_size}): need world_size >= 1 and 0 <= rank < world_size"
            )
        count = len(self._parts.prompts)
        self._prompt_pool = None if count < world_size or world_size == 1 else np.arange(rank, count, world_size)

    @property
    def prompt_shard(self) -> tuple[int, ...]:
        """Indices of the prompts new episodes are drawn from (all of them unless `shard_prompts` split them)."""
        pool = self._prompt_pool
        return tuple(range(len(self._parts.prompts))) if pool is None else tuple(int(k) for k in pool)

    def _draw_prompt(self, rng: np.random.Generator) -> int:
        """A prompt index for a new episode, uniform over this env's share of the prompts."""
        pool = self._prompt_pool
        if pool is None:
            return int(rng.integers(len(self._parts.prompts)))
        return int(pool[rng.integers(len(pool))])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._parts.eos_ids

    @property
    def pad_token_id(self) -> int:
        return self._parts.pad_id
