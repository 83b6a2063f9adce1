"""Causal-LM actor-critic for token-level envs such as TextRLHF-v0.

The actor is the env's own language model (the very module, so the env's KL reward follows the
weights PPO changes). The critic is a value head on the actor's trunk (TRL style) or a separate
trunk (DeepSpeed-Chat style), chosen by ``PPOConfig.critic``. During rollouts the env already ran
the policy forward with its KV cache, so sampling takes it from ``env.next_token_cache()`` instead of
a second forward; updates re-run each episode's whole sequence once.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from agents.activation_checkpointing import blocks_keep_read_only_caches, blocks_recomputed, checkpointed_blocks
from agents.config import PPOConfig
from agents.lora import attach_lora, critic_lora_config
from agents.sliced_scores import can_slice, entropy_of, sliced_token_scores, tied_embedding, tied_lookups
from textenv.compat import cache_kwargs
from textenv.lm_head import LogitHead
from textenv.models import quiet_transformers
from textenv.prefix import ReadOnlyPrefixCache, prefix_cache, split_shared_prefix


def is_token_env(envs: Any) -> bool:
    """An env whose actions are next tokens of a causal LM it exposes as ``.model``."""
    space = envs.single_observation_space
    return (
        isinstance(space, spaces.Dict) and "input_ids" in space.spaces and "attention_mask" in space.spaces
        and isinstance(getattr(envs, "model", None), nn.Module)
    )


def sample_tokens(log_probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row by inverting the CDF.

    ``torch.multinomial`` draws a random number per vocabulary entry (~25 ms for 16 x 49k on one
    core); one uniform per row and a binary search cost a tenth of that. The CDF is summed in
    float64 so that the tail of a 49k-entry vocabulary keeps its probability.
    """
    cdf = log_probs.exp().double().cumsum(-1)
    # drawn on the (CPU) generator whatever the device: the same tokens on every device
    uniform = torch.rand(log_probs.shape[0], 1, generator=generator, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, uniform).squeeze(-1).clamp(max=log_probs.shape[-1] - 1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # left-padded rows: position ids count real tokens only, as the env's own forwards do
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (real tokens are contiguous)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(-1).values


class LMActorCritic(nn.Module):
    """Actor-critic over a transformers causal LM; observations are ``[N, 2, L]`` (ids, mask)."""

    sequence_model = True

    def __init__(self, envs: Any, config: PPOConfig) -> None:
        super().__init__()
        self.envs = envs
        self.model = envs.model
        self.model.eval()  # dropout off: PPO ratios must compare the same function (TRL does the same)
        # the distribution the env samples from and scores the KL with: the same in the PPO ratio
        self.sampling = (float(envs.temperature), int(getattr(envs, "top_k", 0)), float(getattr(envs, "top_p", 1.0)))
        self.truncated = self.sampling[1] > 0 or self.sampling[2] < 1.0
        self.entropy_bonus = config.ent_coef > 0
        self.critic_trunk: nn.Module | None = None
        score_head: nn.Linear | None = None
        if config.critic == "separate":  # before any adapters: a copied trunk starts from the base weights
            self.critic_trunk, score_head = _critic_trunk(self.model, config.critic_model)
        self.adapters: Any = None  # the peft model around self.model under LoRA
        self.critic_adapters: Any = None
        if config.uses_lora:
            if not callable(getattr(envs, "use_lora_reference", None)):
                raise ValueError(
                    f"PPOConfig(lora_r={config.lora_r}) needs a TextRLHF-v0 env, whose KL reference can be the "
                    f"policy with its adapters off; {type(envs).__name__} has no use_lora_reference()"
                )
            lora_config = config.peft_config()
            self.adapters = attach_lora(self.model, lora_config)
            envs.use_lora_reference(self.adapters)
            if self.critic_trunk is not None:
                self.critic_adapters = attach_lora(self.critic_trunk, critic_lora_config(lora_config))
                self.critic_trunk.eval()
            # the injected adapter layers too: their dropout stays off, as TRL's PPO turns dropout off
            self.model.eval()
        # the env samples and scores its KL with this very head: the PPO ratio compares one distribution
        self.head = LogitHead.of(self.model)
        # checkpointing trades compute for memory: the update's logits are then recomputed in the backward
        # too, a slice of rows at a time (no [tokens, vocab] tensor), where the output layer allows it
        self.sliced_scores = config.gradient_checkpointing and can_slice(self.head)
        self.checkpointed = checkpointed_blocks(
            [self.model] + ([self.critic_trunk] if self.critic_trunk is not None else []),
            config.gradient_checkpointing_fraction,
        ) if config.gradient_checkpointing else []
        hidden = int(self.model.config.hidden_size)
        if self.critic_trunk is not None:
            hidden = int(self.critic_trunk.config.hidden_size)
        self.value_head = nn.Linear(hidden, 1, device=next(self.model.parameters()).device)
        # zero head: initial values are 0 and the value loss does not push the shared trunk at first
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        if score_head is not None:  # critic from a reward model: start from its score (DeepSpeed-Chat does too)
            with torch.no_grad():
                self.value_head.weight.copy_(score_head.weight.float())
                if score_head.bias is not None:
                    self.value_head.bias.copy_(score_head.bias.float())
        self.pretraining = (
            PretrainingTexts(config.ptx_data, envs.tokenizer, config.ptx_batch_size) if config.ptx_coef > 0 else None
        )
        length = int(envs.single_observation_space["input_ids"].shape[0])
        self.obs_shape: tuple[int, ...] = (2, length)
        self.obs_dtype = torch.int64

    # ------------------------------------------------------------------ observations
    def preprocess(self, obs: dict[str, np.ndarray]) -> torch.Tensor:
        """Dict of ``[N, L]`` arrays -> ``[N, 2, L]`` int64 tensor (ids, attention mask) on the model's device."""
        return torch.stack(
            [torch.as_tensor(obs["input_ids"], dtype=torch.int64), torch.as_tensor(obs["attention_mask"])], dim=-2
        ).long().to(self.device)

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def _env_cache(self, obs: torch.Tensor) -> Any:
        """The env's own forward at ``obs`` (``next_token_cache()``, the documented hand-off), or None."""
        hand_off = getattr(self.envs, "next_token_cache", None)
        cache = hand_off() if callable(hand_off) else None
        return cache if cache is not None and cache.matches(obs[:, 0], obs[:, 1]) else None

    # ------------------------------------------------------------------ forward passes
    def _trunk_hidden(self, trunk: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = trunk(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
        return out.last_hidden_state

    def _hidden_at(
        self, trunk: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """Last-layer hidden states ``[B, H]`` at ``(rows, cols)``; a prompt opening all rows share runs once.

        With activation checkpointing the blocks are recomputed in the backward: the shared opening's
        cache is then read-only (a recomputed block must not append its keys a second time).
        """
        recompute = bool(self.checkpointed) and torch.is_grad_enabled()
        rank = (mask.cumsum(-1) - 1)[rows, cols]  # the queried tokens must come after the shared part
        # (a transformers that drops caches in checkpointed blocks runs whole rows)
        can_share = not recompute or blocks_keep_read_only_caches()
        shared = split_shared_prefix(ids, mask, limit=int(rank.min())) if can_share else None
        cache = prefix_cache(trunk, shared, ids.shape[0]) if shared is not None else None
        if cache is None:
            with blocks_recomputed(self.checkpointed) if recompute else contextlib.nullcontext():
                return self._trunk_hidden(trunk, ids, mask)[rows, cols]
        full_mask = shared.mask
        with blocks_recomputed(self.checkpointed, read_only_cache=True) if recompute else contextlib.nullcontext():
            out = trunk(
                input_ids=shared.rest_ids, attention_mask=full_mask,
                # (use_cache asks for a cache to be returned; the read-only one is read all the same)
                position_ids=_positions(full_mask)[:, shared.length :], use_cache=not recompute,
                **cache_kwargs(trunk, ReadOnlyPrefixCache.of(cache) if recompute else cache),
            )
        return out.last_hidden_state[rows, cols - shared.length]

    def _heads(
        self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs ``[B, V]`` at temperature and values ``[B]`` at positions ``(rows, cols)``."""
        hidden, values = self._hidden_and_values(ids, mask, rows, cols)
        return self.head.logprobs(hidden, *self.sampling), values

    def _hidden_and_values(
        self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The actor trunk's hidden states ``[B, H]`` and values ``[B]`` at positions ``(rows, cols)``."""
        hidden = self._hidden_at(self.head.trunk, ids, mask, rows, cols)
        if self.critic_trunk is None:
            value_hidden = hidden
        else:
            value_hidden = self._hidden_at(self.critic_trunk, ids, mask, rows, cols)
        return hidden, self._value(value_hidden)

    def _value(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) from trunk hidden states, in float32 also under ``PPOConfig.mixed_precision="bf16"``."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    def _current(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token log-probs and values for a batch of states, reusing the env's cache if possible."""
        ids, mask = obs[:, 0], obs[:, 1]
        rows, last = torch.arange(obs.shape[0], device=obs.device), _last_index(mask)
        cache = self._env_cache(obs)
        if cache is None:
            return self._heads(ids, mask, rows, last)
        if self.critic_trunk is None:
            value_hidden = cache.hidden
        else:  # the separate critic has no cache of its own: one pass over the states
            value_hidden = self._hidden_at(self.critic_trunk, ids, mask, rows, last)
        return cache.logprobs, self._value(value_hidden)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self._current(obs)[1]

    def act(
        self, obs: torch.Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_probs, values = self._current(obs)
        actions = log_probs.argmax(-1) if deterministic else sample_tokens(log_probs, generator)
        return actions, log_probs.gather(-1, actions[:, None]).squeeze(-1), values

    def forward(
        self, obs: torch.Tensor, actions: torch.Tensor, episode_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-score stored tokens with one forward per episode, not one per token.

        Every state of an episode is a prefix of its longest state, so one causal pass over that
        state yields the logits (and values) at all of the episode's positions.
        """
        ids, mask = obs[:, 0], obs[:, 1]
        last = _last_index(mask)
        if episode_ids is None:
            episode_ids = torch.arange(obs.shape[0], device=obs.device)
        episodes, rows = torch.unique(episode_ids, return_inverse=True)
        longest = torch.full((len(episodes),), -1, dtype=torch.long, device=obs.device)
        longest = longest.scatter_reduce(0, rows, last, "amax")
        owner = torch.zeros(len(episodes), dtype=torch.long, device=obs.device)
        is_longest = last == longest[rows]
        owner[rows[is_longest]] = torch.nonzero(is_longest).squeeze(-1)
        seq_ids, seq_mask = ids[owner], mask[owner]
        # drop the columns that are padding in every row: prompts are left-padded to a fixed width,
        # and attention over pad columns would cost as much as over real tokens
        first = int(torch.nonzero(seq_mask.any(0))[0])
        # (clamped: an empty row, e.g. an unused step of a rollout that ended early, is never trained on)
        # an output layer tied to the input embedding: its gradient is then made once, not twice
        tied = tied_embedding(self.head) if self.sliced_scores else None
        with tied_lookups(tied):
            hidden, values = self._hidden_and_values(seq_ids[:, first:], seq_mask[:, first:], rows,
                                                     (last - first).clamp(min=0))
        if self.sliced_scores:
            chosen, entropy = sliced_token_scores(self.head, hidden, actions, self.sampling, tied=tied is not None)
            return chosen, entropy if self.entropy_bonus else entropy.detach(), values
        log_probs = self.head.logprobs(hidden, *self.sampling)
        # without an entropy bonus the entropy is only logged: no graph over [tokens, vocab] for it
        with torch.set_grad_enabled(self.entropy_bonus and torch.is_grad_enabled()):
            entropy = entropy_of(log_probs, self.truncated)
        return log_probs.gather(-1, actions[:, None].long()).squeeze(-1), entropy, values

    evaluate = forward  # the name the update used before ``forward``

    def to_env_action(self, actions: torch.Tensor) -> np.ndarray:
        return actions.cpu().numpy().astype(np.int64)

    def pretraining_loss(self, generator: torch.Generator) -> torch.Tensor:
        """Next-token cross-entropy on a batch of pre-training texts (PPO-ptx, Ouyang et al. 2022)."""
        if self.pretraining is None:
            raise ValueError("pretraining_loss needs PPOConfig.ptx_coef > 0 and ptx_data")
        ids, mask = (t.to(self.device) for t in self.pretraining.sample(generator))
        labels = ids.masked_fill(mask == 0, -100)
        return self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss


class PretrainingTexts:
    """Pre-tokenised texts for the PPO-ptx term, sampled in batches with the agent's generator."""

    def __init__(self, source: str | os.PathLike[str] | list[str], tokenizer: Any, batch_size: int,
                 max_length: int = 128) -> None:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ValueError(
                    f"PPOConfig.ptx_data={str(path)!r} does not exist; pass a .txt file or a list of texts"
                )
            source = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not source or not all(isinstance(text, str) and text for text in source):
            raise ValueError("PPOConfig.ptx_data must hold at least one non-empty text")
        self.encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in source]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch_size = batch_size

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.encoded), (self.batch_size,), generator=generator).tolist()
        rows = [self.encoded[i] for i in picks]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # right padding: labels on pads are ignored
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return ids, mask


def _critic_trunk(model: nn.Module, path: str | None) -> tuple[nn.Module, nn.Linear | None]:
    """A separate critic's trunk, and the score head to start the value head from where there is one.

    From a model path (e.g. a reward model: trunk and its one-output score head) or a copy of the
    policy's trunk (no head).
    """
    if path is None:
        return copy.deepcopy(model.base_model), None
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    with quiet_transformers():
        config = AutoConfig.from_pretrained(path)
        classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        if classifier and int(config.num_labels) == 1:
            scorer = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
            head = getattr(scorer, "score", None)
            return scorer.base_model, head if isinstance(head, nn.Linear) and head.out_features == 1 else None
        return AutoModel.from_pretrained(path, dtype=torch.float32), None
