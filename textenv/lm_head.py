"""The policy's next-token log-probs, computed by one function for sampling, the env's KL and the PPO update.

A causal LM is split here into its trunk (`model.base_model`: embeddings, blocks, final norm) and
its head (hidden state -> logits). Every caller runs the trunk (with or without a KV cache) and then
`LogitHead.logprobs`, so the distribution the env samples from and scores the KL with is, by
construction, the one the agent's PPO ratio differentiates. Several families transform logits after
the output layer (Gemma 2/3 soft-capping, Cohere's logit scale, Granite's logit scaling); the head
applies those, and a model whose own forward still disagrees with it is refused at construction.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .kl import token_logprobs

__all__ = ["LogitHead", "eval_mode"]

_PROBE_TOKENS = 6
_HEADS: weakref.WeakKeyDictionary[nn.Module, LogitHead] = weakref.WeakKeyDictionary()


class LogitHead:
    """Trunk and head of a causal LM, checked once to reproduce `model(...).logits` exactly.

    Use `LogitHead.of(model)`: the check costs one forward over a few tokens and is done once per model.
    """

    def __init__(self, model: nn.Module) -> None:
        trunk = getattr(model, "base_model", None)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if trunk is None or trunk is model or output is None:
            raise ConfigError(
                f"model={type(model).__name__} is not a transformers causal LM with a separate trunk "
                f"(base_model) and output layer (get_output_embeddings()); pass e.g. an AutoModelForCausalLM"
            )
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.trunk: nn.Module = trunk
        self.output: nn.Module = output
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.scale: float | None = _logit_scale(model, config)
        self.divisor: float | None = getattr(config, "logits_scaling", None)

    @classmethod
    def of(cls, model: nn.Module) -> LogitHead:
        """The (verified) head of `model`, made once per model object."""
        head = _HEADS.get(model)
        if head is None:
            head = cls(model)
            head.verify(model)
            _HEADS[model] = head
        return head

    @classmethod
    def forget(cls, model: nn.Module) -> None:
        """Drop the head made for `model`, whose modules changed (e.g. LoRA adapters were injected)."""
        _HEADS.pop(model, None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] (the trunk's last hidden state) -> logits [..., V], as the model's forward makes them.

        Under a bfloat16 autocast (an agent's mixed precision) the output layer still runs at the
        weights' precision: the log-probs the KL and the PPO ratio take stay float32-accurate.
        """
        with torch.autocast(hidden.device.type, enabled=False):
            weight = getattr(self.output, "weight", None)
            logits = self.output(hidden.to(weight.dtype) if weight is not None else hidden)
        return self.transform(logits)

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's changes after the output layer (logit scale, scaling, soft-capping), in its order."""
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logprobs(self, hidden: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
        """float32 log pi(. | s) of the sampling distribution (temperature, then top-k, then top-p)."""
        return token_logprobs(self.logits(hidden), temperature, top_k, top_p)

    def verify(self, model: nn.Module) -> None:
        """Refuse a model whose own forward transforms logits in a way this head does not reproduce."""
        vocab = int(self.output.weight.shape[0]) if getattr(self.output, "weight", None) is not None else 2
        device = next(model.parameters()).device
        ids = (torch.arange(_PROBE_TOKENS, device=device) * 7 + 1).remainder(vocab).view(1, -1)
        with torch.no_grad(), eval_mode(list(model.modules())):
            expected = model(input_ids=ids, use_cache=False).logits.float()
            hidden = self.trunk(input_ids=ids, use_cache=False).last_hidden_state
            got = self.logits(hidden).float()
        tolerance = _tolerance(expected.dtype if expected.dtype != torch.float32 else hidden.dtype)
        gap = float((expected - got).abs().max()) if expected.shape == got.shape else math.inf
        if not gap <= tolerance * (1.0 + float(expected.abs().max())):
            raise ConfigError(
                f"model={type(model).__name__} ({getattr(model.config, 'model_type', '?')}) computes its logits "
                f"differently from its trunk + output layer (largest difference {gap:.3g} on a probe), in a way "
                f"textenv does not reproduce; the env's KL and the PPO ratio would score different distributions. "
                f"Supported post-output transforms: final_logit_softcapping, logit_scale, logits_scaling"
            )


def _logit_scale(model: nn.Module, config: Any) -> float | None:
    # Cohere multiplies by `logit_scale`; other configs use the name for unrelated things (CLIP),
    # so only a model that carries the attribute itself counts
    value = getattr(model, "logit_scale", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2


@contextmanager
def eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Dropout off for a forward: the env's log-probs are the deterministic pi(a|s).

    Flags are set directly: Module.train() walks and setattr()s ~400 modules of a 30-layer model,
    ~10 ms a call.
    """
    modes = [m.training for m in modules]
    for m in modules:
        m.__dict__["training"] = False
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.__dict__["training"] = mode
