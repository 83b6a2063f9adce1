"""Rewards: the protocol `fn(prompts, completions, **kw) -> list[float]`, a registry, built-ins,
a sequence-classification scorer, weighted combinations and validation of what functions return.

Every reward is called batched: one call per batch of finished episodes. Besides `prompts` and
`completions` (lists of str), functions receive the keyword arguments `prompt_ids`, `completion_ids`
(lists of lists of token ids) and `eos` (list of bool); accept `**kwargs` to ignore them.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, RewardError

__all__ = [
    "RewardFn",
    "RewardSet",
    "RewardModel",
    "SentimentReward",
    "LengthReward",
    "KeywordReward",
    "register_reward",
    "get_reward",
    "list_rewards",
    "build_reward",
]

RewardFn = Callable[..., Sequence[float]]

_REGISTRY: dict[str, RewardFn] = {}


class SentimentReward:
    """VADER compound sentiment of the completion, in [-1, 1]; a real lexicon that works offline."""

    name = "sentiment"

    def __init__(self) -> None:
        self._analyzer: Any = None

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        if self._analyzer is None:  # loading the lexicon takes ~50 ms: only when first used
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._analyzer = SentimentIntensityAnalyzer()
        return [float(self._analyzer.polarity_scores(c)["compound"]) for c in completions]


class LengthReward:
    """`-|n - target| / target` for the completion's length n in words (or characters): 0 at target."""

    name = "length"

    def __init__(self, target: int = 20, *, unit: str = "words") -> None:
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ConfigError(f"target={target!r} must be an integer >= 1, e.g. LengthReward(target=20)")
        if unit not in ("words", "chars"):
            raise ConfigError(f"unit={unit!r} must be 'words' or 'chars'")
        self.target, self.unit = target, unit

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        lengths = [len(c.split()) if self.unit == "words" else len(c) for c in completions]
        return [-abs(n - self.target) / self.target for n in lengths]


class KeywordReward:
    """The fraction of `keywords` the completion contains as whole words, in [0, 1]."""

    name = "keyword"

    def __init__(self, keywords: Sequence[str], *, case_sensitive: bool = False) -> None:
        if isinstance(keywords, str) or not keywords or not all(isinstance(k, str) and k for k in keywords):
            raise ConfigError(
                f"keywords={keywords!r} must be a non-empty list of non-empty strings, e.g. ['sea', 'blue']"
            )
        flags = 0 if case_sensitive else re.IGNORECASE
        self.keywords = tuple(keywords)
        self._patterns = [re.compile(rf"(?<!\w){re.escape(k)}(?!\w)", flags) for k in keywords]

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        n = len(self._patterns)
        return [sum(bool(p.search(c)) for p in self._patterns) / n for c in completions]


class RewardModel:
    """The score of a sequence-classification model on `prompt + separator + completion`.

    `model` is a transformers `*ForSequenceClassification` module or its directory / hub id; a module
    passed in is used as is (frozen by the caller). `label_index` picks the logit when there are several.
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        label_index: int | None = None,
        separator: str = " ",
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        from .models import load_sequence_classifier

        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            loaded, loaded_tokenizer = load_sequence_classifier(path, device=torch.device(device or "cpu"))
            model, tokenizer = loaded, tokenizer or loaded_tokenizer
            name = name or os.path.basename(os.path.normpath(path))
        if not isinstance(model, nn.Module):
            raise ConfigError(f"reward model={model!r} is not a module; pass a sequence-classification model")
        if tokenizer is None:
            raise ConfigError("RewardModel(tokenizer=None) with a module: pass the reward model's tokenizer")
        num_labels = getattr(model.config, "num_labels", 1)
        if label_index is None and num_labels != 1:
            raise ConfigError(
                f"the reward model has num_labels={num_labels}; pass label_index=<which logit is the score>"
            )
        if model.config.pad_token_id is None and tokenizer.pad_token_id is None:
            raise ConfigError(
                "the reward model has no pad token, so batched scores cannot find each text's last token; "
                "set model.config.pad_token_id (and tokenizer.pad_token) to e.g. the EOS token id"
            )
        model.eval()  # scores must not depend on dropout
        self.model, self.tokenizer, self.separator = model, tokenizer, separator
        self.label_index, self.batch_size = label_index or 0, batch_size
        self.name = name or "reward_model"

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        texts = [p + self.separator + c for p, c in zip(prompts, completions, strict=True)]
        device = next(self.model.parameters()).device
        scores: list[float] = []
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.model.config.pad_token_id
        for start in range(0, len(texts), self.batch_size):
            ids = self.tokenizer(texts[start : start + self.batch_size])["input_ids"]
            width = max(len(row) for row in ids)
            # right padding keeps position ids of real tokens unchanged, so a text scores the same
            # whatever batch it is in
            batch = torch.full((len(ids), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for i, row in enumerate(ids):
                batch[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
            scores += logits[:, self.label_index].float().tolist()
        return scores


def register_reward(name: str, fn: RewardFn, *, overwrite: bool = False) -> None:
    """Make `fn(prompts, completions, **kw) -> list[float]` available as `reward=name`."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name={name!r} must be a non-empty string")
    if not callable(fn):
        raise ConfigError(f"fn={fn!r} is not callable; pass fn(prompts, completions, **kw) -> list[float]")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
        raise ConfigError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = fn


def get_reward(name: str) -> RewardFn:
    """The registered reward `name`; unknown names suggest the closest registered one."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"reward={name!r} is not a registered reward; {hint}registered: {sorted(_REGISTRY)}. "
            f"Register one with textenv.register_reward({name!r}, fn)"
        )
    return _REGISTRY[name]


def list_rewards() -> list[str]:
    """Names usable as `reward=`."""
    return sorted(_REGISTRY)


register_reward("sentiment", SentimentReward())
register_reward("length", LengthReward())


class RewardSet:
    """Named, weighted reward components scored together; the total is their weighted sum.

    Each call returns the total and every component's own (unweighted) score, so that what the
    policy optimises can be reported part by part.
    """

    def __init__(self, components: Sequence[tuple[str, RewardFn, float]]) -> None:
        self.components = tuple(components)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.components)

    def __call__(
        self, prompts: list[str], completions: list[str], **kwargs: Any
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        total = np.zeros(len(completions), dtype=np.float64)
        parts = {}
        for name, fn, weight in self.components:
            scores = _call_checked(name, fn, prompts, completions, kwargs)
            parts[name] = scores
            total += weight * scores
        return total, parts


def _call_checked(name: str, fn: RewardFn, prompts: list[str], completions: list[str], kwargs: dict) -> np.ndarray:
    try:
        result = fn(prompts, completions, **kwargs)
    except Exception as exc:
        culprit = _find_failing_item(fn, prompts, completions, kwargs)
        where = f"on prompt {prompts[culprit]!r}" if culprit is not None else f"on a batch of {len(prompts)} prompts"
        raise RewardError(
            f"reward {name!r} ({_describe(fn)}) raised {type(exc).__name__}: {exc} {where}"
        ) from exc
    if isinstance(result, (torch.Tensor, np.ndarray)):
        result = result.tolist()
    if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        raise RewardError(
            f"reward {name!r} ({_describe(fn)}) returned {type(result).__name__} {result!r:.80}; "
            f"return a list of {len(completions)} floats, one per completion"
        )
    if len(result) != len(completions):
        raise RewardError(
            f"reward {name!r} ({_describe(fn)}) returned {len(result)} scores for {len(completions)} "
            f"completions; return exactly one float per completion"
        )
    scores = np.empty(len(result), dtype=np.float64)
    for i, value in enumerate(result):
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward {name!r} ({_describe(fn)}) returned {value!r} ({type(value).__name__}) for prompt "
                f"{prompts[i]!r}; scores must be real numbers"
            )
        if not math.isfinite(value):
            raise RewardError(
                f"reward {name!r} ({_describe(fn)}) returned {value} for prompt {prompts[i]!r} and "
                f"completion {completions[i]!r}; scores must be finite"
            )
        scores[i] = float(value)
    return scores


def _find_failing_item(fn: RewardFn, prompts: list[str], completions: list[str], kwargs: dict) -> int | None:
    """Re-run a failed batch one item at a time to tell the user which prompt made it fail."""
    if len(prompts) == 1:
        return 0
    for i in range(len(prompts)):
        try:
            fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in kwargs.items()})
        except Exception:
            return i
    return None


def _describe(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _component_name(spec: Any, fn: Any, index: int) -> str:
    if isinstance(spec, str) and spec in _REGISTRY:
        return spec
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name and name != "<lambda>" else f"reward_{index}"


def _resolve_one(spec: Any, tokenizer: Any, device: torch.device) -> RewardFn:
    if isinstance(spec, str):
        if spec in _REGISTRY or not ("/" in spec or os.sep in spec or os.path.exists(spec)):
            return get_reward(spec)
        return RewardModel(spec, device=device)
    if isinstance(spec, os.PathLike):
        return RewardModel(spec, device=device)
    if isinstance(spec, nn.Module):
        return RewardModel(spec, tokenizer)
    if callable(spec):
        return spec
    raise ConfigError(
        f"reward={spec!r} is not a reward; pass a callable fn(prompts, completions, **kw) -> list[float], "
        f"a registered name {list_rewards()}, a sequence-classification model or its path, "
        f"or a list of these (optionally as (reward, weight) pairs)"
    )


def build_reward(spec: Any, *, tokenizer: Any = None, device: torch.device | None = None) -> RewardSet:
    """Turn any accepted `reward=` value into a RewardSet with unique component names."""
    if isinstance(spec, RewardSet):
        return spec
    device = device or torch.device("cpu")
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, (list, tuple)) and not _is_pair(spec):
        items = [item if _is_pair(item) else (item, 1.0) for item in spec]
    else:
        items = [spec if _is_pair(spec) else (spec, 1.0)]
    if not items:
        raise ConfigError("reward=[] is empty; pass at least one reward, e.g. reward='sentiment'")
    components: list[tuple[str, RewardFn, float]] = []
    seen: dict[str, int] = {}
    for index, (item, weight) in enumerate(items):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ConfigError(f"the weight {weight!r} of reward {item!r} must be a finite number")
        fn = _resolve_one(item, tokenizer, device)
        name = _component_name(item, fn, index)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        components.append((name, fn, float(weight)))
    return RewardSet(components)


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[1], numbers.Real)
        and not isinstance(item[1], bool)
    )
