"""One forward for a LoRA policy and its reference: policy rows and base-model rows in one batch.

With LoRA the reference is the policy's own base weights with the adapters off. peft computes a
batch whose rows name different adapters (`"__base__"`: none) in one pass, so each base weight is
read once for both and only the small adapter products run on the policy rows alone. Token-by-token
decoding on a CPU costs about what reading the weights costs, so this nearly halves the price of
scoring the reference beside the policy.

Rows [0, N) of the batch are the policy's, rows [N, 2N) the reference's, on the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from .decoding import DecodeState
from .kl import token_logprobs
from .lm_head import eval_mode
from .prefix import SharedPrefix, prefix_cache

__all__ = ["BASE_ADAPTER", "PairedDecodeState", "PolicyRows", "ReferenceRows", "lora_layers"]

BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in a mixed-adapter batch."""


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The modules peft injected LoRA adapters into (they take `adapter_names` per row)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no adapters
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def adapter_per_row(layers: list[nn.Module], names: list[str]) -> Iterator[None]:
    """Every LoRA layer called inside applies adapter `names[i]` to row i (peft's mixed batches).

    peft's own route is `PeftModel.forward(..., adapter_names=...)`; the env runs the trunk and the
    head separately (see `textenv.lm_head`), so the argument is handed to each layer directly.
    """

    def inject(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "adapter_names": names}

    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _plain_linear(layer: nn.Module, adapter: str) -> bool:
    """A peft LoRA Linear whose `adapter` is vanilla LoRA on an nn.Linear, unmerged: `PolicyRows` can run it."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - no peft, no LoRA layers
        return False
    return (
        type(layer) is Linear and adapter in layer.lora_A and adapter not in getattr(layer, "lora_variant", {})
        and not layer.merged and not layer.disable_adapters and type(layer.get_base_layer()) is nn.Linear
        and not getattr(layer, "fan_in_fan_out", False) and not getattr(layer, "lora_bias", {}).get(adapter, False)
        and not getattr(layer, "use_dora", {}).get(adapter, False)
    )


def _policy_rows_forward(layer: nn.Module, adapter: str, rows: int) -> Any:
    """The layer's forward with `adapter` added to rows [0, rows) only: slices, not peft's per-row index lists."""
    base, down, up = layer.get_base_layer(), layer.lora_A[adapter], layer.lora_B[adapter]
    dropout, scaling = layer.lora_dropout[adapter], layer.scaling  # read at each call: peft may rescale

    def forward(x: torch.Tensor) -> torch.Tensor:
        result = base(x)
        result[:rows] += up(down(dropout(x[:rows]))) * scaling[adapter]
        return result

    return forward


class PolicyRows:
    """LoRA layers that apply `adapter` to batch rows [0, rows) and the base model to the rest.

    What `adapter_per_row` computes, with less work per layer call: peft's mixed-batch path builds
    index lists in Python and gathers and scatters the rows, in ~200 layer calls per decoding step.
    Vanilla LoRA Linear layers get a plain forward on row slices while `rows(n)` is entered; other
    kinds of layers (DoRA, embeddings, ...) keep peft's per-row route. Which layers qualify, and their
    slice forwards, are worked out once: entering then writes one attribute per layer (going through
    nn.Module's setattr, and checking every layer anew, cost ~5 ms a decoding step).
    """

    def __init__(self, layers: list[nn.Module], adapter: str) -> None:
        self.adapter = adapter
        plain = [_plain_linear(layer, adapter) for layer in layers]
        self.fast = [layer for layer, ok in zip(layers, plain, strict=True) if ok]
        self.others = [layer for layer, ok in zip(layers, plain, strict=True) if not ok]
        self._forwards: dict[int, list[Any]] = {}  # batch rows -> one slice forward per fast layer

    @contextmanager
    def rows(self, rows: int) -> Iterator[None]:
        """Inside, the layers apply the adapter to the first `rows` rows of each batch only."""
        names = [self.adapter] * rows + [BASE_ADAPTER] * rows
        if any(layer.merged or layer.disable_adapters for layer in self.fast):  # changed since: take peft's route
            with adapter_per_row(self.fast + self.others, names):
                yield
            return
        if rows not in self._forwards:
            self._forwards[rows] = [_policy_rows_forward(layer, self.adapter, rows) for layer in self.fast]
        for layer, forward in zip(self.fast, self._forwards[rows], strict=True):
            layer.__dict__["forward"] = forward  # an instance attribute: shadows the method
        try:
            with adapter_per_row(self.others, names) if self.others else nullcontext():
                yield
        finally:
            for layer in self.fast:
                layer.__dict__.pop("forward", None)


class PairedDecodeState(DecodeState):
    """A policy decode state whose every forward also computes the reference on the same tokens.

    `ids` / `mask` / `logprobs` / `hidden` are the policy's N rows, as in `DecodeState`; the cache
    holds 2N rows and `reference_logprobs` the reference's distributions (at the temperature alone:
    the engine restricts them to the policy's top-k / top-p support itself).
    """

    def __init__(self, model: nn.Module, *, adapter: str, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._rows = PolicyRows(lora_layers(model), adapter)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        with self._rows.rows(ids.shape[0]):
            return super()._forward(torch.cat([ids, ids]), torch.cat([mask, mask]), cache)

    def _score(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head.logits(hidden)  # one call: a LoRA'd output layer takes all 2N rows at once
        if self.top_k == 0 and self.top_p >= 1.0:  # both halves at the temperature alone: one call, no copy
            return token_logprobs(logits, self.temperature)
        rows = hidden.shape[0] // 2
        policy = token_logprobs(logits[:rows], self.temperature, self.top_k, self.top_p)
        return torch.cat([policy, token_logprobs(logits[rows:], self.temperature)])

    def _prefix_cache(self, shared: SharedPrefix, rows: int) -> DynamicCache | None:
        with torch.no_grad(), eval_mode(self._modules), self._rows.rows(1):
            return prefix_cache(self.head.trunk, shared, rows, groups=2)

    def _cache_rows(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows + [r + self.num_rows for r in rows], device=self.device)

    @property
    def logprobs(self) -> torch.Tensor | None:
        return None if self._logprobs is None else self._logprobs[: self.num_rows]

    @property
    def hidden(self) -> torch.Tensor | None:
        return None if self._hidden is None else self._hidden[: self.num_rows]

    @property
    def reference_logprobs(self) -> torch.Tensor | None:
        return None if self._logprobs is None else self._logprobs[self.num_rows :]

    def reference(self) -> ReferenceRows:
        return ReferenceRows(self)


class ReferenceRows:
    """The reference half of a `PairedDecodeState`, driven by the engine like a reference state.

    Its outputs come with the policy's forwards, so starting, advancing and restoring it do nothing.
    """

    mirror = None
    track_weights = False

    def __init__(self, pair: PairedDecodeState) -> None:
        self.pair = pair
        self.params: list[nn.Parameter] = []

    @property
    def logprobs(self) -> torch.Tensor | None:
        return self.pair.reference_logprobs

    @property
    def ids(self) -> torch.Tensor:
        return self.pair.ids

    @property
    def mask(self) -> torch.Tensor:
        return self.pair.mask

    def start(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Nothing to do: the pair's policy state starts both halves."""

    def advance(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Nothing to do: the pair's policy state advances both halves."""

    def refresh(self) -> None:
        """Nothing to do: the pair's policy state recomputes both halves."""

    def restore(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Nothing to do: the pair's policy state restores both halves."""

    def unmirror(self, *, refresh: bool = True) -> None:
        """Nothing to do: the reference rows never borrow the policy's outputs."""

    def stale(self) -> bool:
        return False

    def release(self) -> None:
        """Nothing to do: the pair's policy state holds the cache."""

    def clear(self) -> None:
        """Nothing to do: the pair's policy state holds the cache."""
