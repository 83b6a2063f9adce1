"""Run a causal LM over a batch whose rows all start with the same tokens, computing those once.

Chat-formatted prompts share a long opening (SmolLM2's system prompt is ~25 of a ~35-token
prompt). The shared tokens' keys and values are the same in every row, so they are computed for one
row and broadcast; the rest of each row attends to them through the cache. Gradients flow through
the shared part as through any other, so this is exact for training too (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .compat import returned_cache

__all__ = ["SharedPrefix", "split_shared_prefix", "prefix_cache", "ReadOnlyPrefixCache"]

MIN_SHARED_TOKENS = 4
"""Below this, computing the prefix separately saves less than the extra call costs."""


@dataclass
class SharedPrefix:
    """A batch split into one shared prefix (`ids`, [1, k]) and each row's remaining columns."""

    ids: torch.Tensor
    rest_ids: torch.Tensor
    rest_mask: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    @property
    def mask(self) -> torch.Tensor:
        """Attention mask over prefix + rest columns, as the second forward needs it."""
        batch = self.rest_mask.shape[0]
        return torch.cat([self.rest_mask.new_ones((batch, self.length)), self.rest_mask], dim=1)

    @property
    def full_ids(self) -> torch.Tensor:
        """Token ids in the column order of the cache: prefix first, then each row's rest."""
        return torch.cat([self.ids.expand(self.rest_ids.shape[0], -1), self.rest_ids], dim=1)


def split_shared_prefix(ids: torch.Tensor, mask: torch.Tensor, *, limit: int | None = None) -> SharedPrefix | None:
    """Split off the longest run of real tokens that opens every row (at most `limit` tokens).

    Rows may be padded anywhere (masked columns); each row drops its first k real tokens, so every
    row keeps `width - k` columns and a real token in column c of any row moves to column c - k.
    Every row keeps at least its last real token.
    Returns None when fewer than MIN_SHARED_TOKENS are shared, or for a single row.
    """
    if ids.shape[0] < 2:
        return None
    real = mask.bool()
    longest = int(real.sum(1).min()) - 1  # every row keeps a token: the forward needs one to run on
    if limit is not None:
        longest = min(longest, limit)
    if longest < MIN_SHARED_TOKENS:
        return None
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :longest]  # real columns, in order
    leading = ids.gather(1, order)
    agree = (leading == leading[:1]).all(0).to(torch.int64).cumprod(0)
    k = int(agree.sum())
    if k < MIN_SHARED_TOKENS:
        return None
    rank = real.cumsum(1) - 1
    keep = ~(real & (rank < k))
    rest_shape = (ids.shape[0], ids.shape[1] - k)
    return SharedPrefix(leading[:1, :k], ids[keep].view(rest_shape), mask[keep].view(rest_shape))


def prefix_cache(trunk: nn.Module, prefix: SharedPrefix, batch: int, *, groups: int = 1) -> DynamicCache | None:
    """The prefix's keys and values from one row, broadcast to `batch` rows (no copy until appended to).

    `trunk` is the model without its output layer (`base_model`): the prefix's logits are never needed.
    With `groups` > 1 the prefix runs as that many rows (which may compute different functions, e.g.
    LoRA adapters on and off) and each is broadcast to `batch` rows, group after group.
    None for caches with other layer kinds (sliding windows keep extra bookkeeping): run those whole.
    """
    out = trunk(input_ids=prefix.ids.expand(groups, -1), use_cache=True)
    cache = returned_cache(out)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    for layer in cache.layers:
        if groups == 1:
            layer.keys = layer.keys.expand(batch, -1, -1, -1)
            layer.values = layer.values.expand(batch, -1, -1, -1)
        else:
            layer.keys = layer.keys.repeat_interleave(batch, dim=0)
            layer.values = layer.values.repeat_interleave(batch, dim=0)
    return cache


class ReadOnlyPrefixCache(DynamicCache):
    """A prefix cache that a forward reads but never appends to: each layer gets prefix + new keys.

    A block recomputed in the backward (activation checkpointing) runs its attention a second time;
    a cache that appended would then hold the new keys twice. Made from `prefix_cache`'s result by
    `ReadOnlyPrefixCache.of(cache)`.
    """

    @classmethod
    def of(cls, cache: DynamicCache) -> ReadOnlyPrefixCache:
        cache.__class__ = cls  # same state, only `update` differs
        return cache  # type: ignore[return-value]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
