"""Batched KV-cache decoding of one causal LM: each row is its own left-padded sequence.

Rows start (a prompt forward) and advance (one token) independently of each other, yet every
forward is batched: a row that starts a new episode gets its prompt's keys and values spliced into
the shared cache, right-aligned. Explicit attention masks and position ids make a padded row compute
what the same sequence computes alone.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .compat import cache_kwargs, returned_cache
from .lm_head import LogitHead, eval_mode
from .models import weights_version
from .prefix import SharedPrefix, prefix_cache, split_shared_prefix

__all__ = ["DecodeState"]


class DecodeState:
    """The KV cache, token ids and next-token distribution of one model over `num_rows` sequences.

    `ids` / `mask` are [num_rows, S] and mirror the cache columns; `logprobs` is [num_rows, vocab]
    (float32, at `temperature`) and `hidden` [num_rows, hidden] (last layer, current position).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_rows: int,
        temperature: float,
        pad_id: int,
        track_weights: bool,
        top_k: int = 0,
        top_p: float = 1.0,
        adapters_off: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self.model = model
        # the LoRA reference: the policy's own modules, run with their adapters switched off
        self._context = adapters_off or nullcontext
        self.num_rows = num_rows
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.pad_id = pad_id
        self.track_weights = track_weights
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | None = None
        self.ids = torch.full((num_rows, 0), pad_id, dtype=torch.long, device=self.device)
        self.mask = torch.zeros((num_rows, 0), dtype=torch.long, device=self.device)
        self._logprobs: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._released = False  # cache and outputs freed while no sequence advances (see `release`)
        # a state whose model has the very weights of another borrows that one's outputs: no forward,
        # and a KL of exactly 0 (two copies can round differently, e.g. with other memory alignment)
        self.mirror: DecodeState | None = None
        self.version: tuple[int, int] | None = None
        # the trunk runs here and the head scores its last position: the same function as in the update
        self.head = LogitHead.of(model)
        self.params = list(model.parameters())
        self._modules = list(model.modules())

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Run the model on new tokens `ids`, `mask` covering cache + new columns: cache, logprobs, hidden."""
        # position of each new token = number of real tokens before it in its own row
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        trunk = self.head.trunk
        with torch.no_grad(), eval_mode(self._modules), self._context():
            out = trunk(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **cache_kwargs(trunk, cache),
            )
            hidden = out.last_hidden_state[:, -1]
            logprobs = self._score(hidden)
        if self.track_weights:
            self.version = weights_version(self.params)
        return returned_cache(out), logprobs, hidden.float()

    def _score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-probs of the sampling distribution from the trunk's last hidden states."""
        return self.head.logprobs(hidden, self.temperature, self.top_k, self.top_p)

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def _prefill(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Forward whole sequences from scratch: ids and mask in the cache's column order, cache, outputs.

        An opening that all rows share (a chat template's system prompt) is computed once.
        """
        shared = split_shared_prefix(ids, mask)
        if shared is not None:
            cache = self._prefix_cache(shared, ids.shape[0])
            if cache is not None:
                cache, logprobs, hidden = self._forward(shared.rest_ids, shared.mask, cache)
                return shared.full_ids, shared.mask, cache, logprobs, hidden
        cache, logprobs, hidden = self._forward(ids, mask, self._new_cache())
        return ids, mask, cache, logprobs, hidden

    def _prefix_cache(self, shared: SharedPrefix, rows: int) -> DynamicCache | None:
        with torch.no_grad(), eval_mode(self._modules), self._context():
            return prefix_cache(self.head.trunk, shared, rows)

    def _cache_rows(self, rows: list[int]) -> torch.Tensor:
        """The cache (and output) rows that hold the sequences in `rows`."""
        return torch.tensor(rows, device=self.device)

    def _splicable(self) -> bool:
        # sliding-window and other layer kinds keep extra bookkeeping; rebuild those caches instead
        return self.cache is not None and all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def start(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Begin new sequences `prompts` in `rows` (one batched prompt forward); other rows carry on."""
        new_ids, new_mask = _left_pad(prompts, self.pad_id, self.device)
        if rows == list(range(self.num_rows)):
            self.ids, self.mask = new_ids, new_mask
            if self.mirror is None:
                self.ids, self.mask, self.cache, self._logprobs, self._hidden = self._prefill(new_ids, new_mask)
                self._released = False
        elif self.mirror is not None:
            self._place(rows, new_ids, new_mask)
            self._trim()
        elif not self._splicable():
            self._place(rows, new_ids, new_mask)
            self._trim()
            self.refresh()
        else:
            self._splice_rows(rows, new_ids, new_mask)

    def _splice_rows(self, rows: list[int], new_ids: torch.Tensor, new_mask: torch.Tensor) -> None:
        """Prompt forward for `rows` alone, then their keys / values replace theirs in the batch cache."""
        new_ids, new_mask, new_cache, logprobs, hidden = self._prefill(new_ids, new_mask)
        index = self._cache_rows(rows)
        self._place(rows, new_ids, new_mask)
        width = self.ids.shape[1]
        for layer, new_layer in zip(self.cache.layers, new_cache.layers, strict=True):
            layer.keys = _splice(layer.keys, new_layer.keys, index, width)
            layer.values = _splice(layer.values, new_layer.values, index, width)
        self._logprobs = self._logprobs.index_copy(0, index, logprobs)
        self._hidden = self._hidden.index_copy(0, index, hidden)
        self._trim()

    def _place(self, rows: list[int], new_ids: torch.Tensor, new_mask: torch.Tensor) -> None:
        """Write new rows right-aligned into ids / mask, widening all rows on the left if needed."""
        grow = new_ids.shape[1] - self.ids.shape[1]
        if grow > 0:
            self.ids = torch.cat([self.ids.new_full((self.num_rows, grow), self.pad_id), self.ids], 1)
            self.mask = torch.cat([self.mask.new_zeros((self.num_rows, grow)), self.mask], 1)
        pad = self.ids.shape[1] - new_ids.shape[1]
        index = torch.tensor(rows, device=self.device)
        # out of place: state made under torch.inference_mode() cannot be written in place outside it
        self.ids = self.ids.index_copy(0, index, torch.nn.functional.pad(new_ids, (pad, 0), value=self.pad_id))
        self.mask = self.mask.index_copy(0, index, torch.nn.functional.pad(new_mask, (pad, 0), value=0))

    def _trim(self) -> None:
        """Drop columns no row uses any more, so the cache never outgrows the longest episode."""
        used = self.mask.any(0)
        if bool(used.all()):
            return
        self.ids, self.mask = self.ids[:, used], self.mask[:, used]
        for layer in self.cache.layers if self.cache is not None else ():
            layer.keys, layer.values = layer.keys[:, :, used], layer.values[:, :, used]

    def advance(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Append one token per row ([num_rows] int64) and compute the next distributions.

        Rows where `keep` is False get a masked column: nothing attends to it, so an idle row's
        sequence stays what it was.
        """
        tokens = tokens.to(self.device).view(-1, 1)
        column = torch.ones_like(tokens) if keep is None else keep.to(self.device).view(-1, 1).long()
        self.ids = torch.cat([self.ids, tokens], 1)
        self.mask = torch.cat([self.mask, column], 1)
        if self.mirror is None:
            self.cache, self._logprobs, self._hidden = self._forward(tokens, self.mask, self.cache)

    def refresh(self) -> None:
        """Recompute cache and distributions from the token ids, e.g. after the weights changed."""
        if self.ids.shape[1]:
            self.ids, self.mask, self.cache, self._logprobs, self._hidden = self._prefill(self.ids, self.mask)
        self._released = False

    def restore(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Take over saved token ids / mask (a loaded checkpoint) and rebuild the cache from them.

        A mirrored state keeps no cache of its own: it goes on borrowing the mirror's outputs.
        """
        self.ids, self.mask = ids.to(self.device), mask.to(self.device)
        self.cache = self._logprobs = self._hidden = None
        self.version = None
        if self.mirror is None:
            self.refresh()

    def unmirror(self, *, refresh: bool = True) -> None:
        """Stop borrowing the mirror's outputs: run this model's own forwards from now on."""
        self.mirror = None
        if refresh:
            self.refresh()

    @property
    def logprobs(self) -> torch.Tensor | None:
        return self.mirror.logprobs if self.mirror is not None else self._logprobs

    @property
    def hidden(self) -> torch.Tensor | None:
        return self.mirror.hidden if self.mirror is not None else self._hidden

    def stale(self) -> bool:
        """Whether the outputs must be recomputed: released, or the weights changed since the last forward."""
        if self._released:
            return True
        return self.track_weights and self.version is not None and weights_version(self.params) != self.version

    def release(self) -> None:
        """Free the cache while no sequence advances (every episode ended), e.g. through a PPO update.

        A KV cache of a batch of finished episodes is ~0.1 GiB for a 135M model that nothing reads
        until the next episodes start from a fresh prompt forward; asked for before that, it is
        recomputed from the token ids.
        """
        if self.mirror is None and self.ids.shape[1]:
            self.clear()
            self._released = True

    def clear(self) -> None:
        """Free the cache (on close)."""
        self.cache = None
        self._logprobs = self._hidden = None


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask [len(prompts), longest], each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _splice(batch: torch.Tensor, new: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """Put `new` [R, H, q, D] right-aligned into rows `index` of `batch` [N, H, S, D], zeros before it."""
    grow = width - batch.shape[2]
    if grow > 0:
        batch = torch.nn.functional.pad(batch, (0, 0, grow, 0))
    rows = torch.zeros((len(index), *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
    rows[:, :, width - new.shape[2] :] = new
    return batch.index_copy(0, index, rows)
