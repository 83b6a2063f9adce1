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

from .errors import ConfigError, NonFiniteRewardError, RewardError

__all__ = [
    "RewardFn",
    "RewardSet",
    "RewardModel",
    "classifier_logits",
    "SentimentReward",
    "LengthReward",
    "KeywordReward",
    "register_reward",
    "get_reward",
    "list_rewards",
    "build_reward",
    "check_reward",
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
        self.label_index = _label_index(label_index, getattr(model.config, "num_labels", 1))
        _check_reward_tokenizer(model, tokenizer)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1, e.g. batch_size=32")
        if not isinstance(separator, str):
            raise ConfigError(f"separator={separator!r} must be a string, e.g. separator=' '")
        model.eval()  # scores must not depend on dropout
        self.model, self.tokenizer, self.separator = model, tokenizer, separator
        self.batch_size = batch_size
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
                logits = classifier_logits(self.model, batch.to(device), mask.to(device))
            scores += logits[:, self.label_index].float().tolist()
        return scores


def classifier_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, num_labels]`` logits of a sequence classifier, read at each row's last real token.

    Decoder classifiers (a linear ``score`` on the trunk: GPT-2, Llama, Qwen2, ...) are pooled here
    from the attention mask: transformers infers the last token from the pad id, which is wrong
    when pad == EOS and a text ends with it. Position ids count real tokens, so left and right
    padding score alike. Other classifiers (BERT-style, pooled at the first token) run as they are.
    """
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
    ).last_hidden_state
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), columns, -1).max(-1).values
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


def _label_index(label_index: Any, num_labels: int) -> int:
    """The logit column that is the score: checked against the model's num_labels at construction."""
    if label_index is None:
        if num_labels != 1:
            raise ConfigError(
                f"the reward model has num_labels={num_labels}; pass label_index=<which logit is the score>"
            )
        return 0
    if isinstance(label_index, bool) or not isinstance(label_index, int) or not 0 <= label_index < num_labels:
        raise ConfigError(
            f"label_index={label_index!r} is out of range: the reward model has num_labels={num_labels}; "
            f"pass an integer in [0, {num_labels}) naming the logit that is the score"
        )
    return label_index


def _check_reward_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """The tokenizer must fit the reward model's embeddings and give it a pad token."""
    if model.config.pad_token_id is None and tokenizer.pad_token_id is None:
        raise ConfigError(
            "the reward model has no pad token, so batched scores cannot find each text's last token; "
            "set model.config.pad_token_id (and tokenizer.pad_token) to e.g. the EOS token id"
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and hasattr(tokenizer, "__len__") and len(tokenizer) > rows:
        raise ConfigError(
            f"the reward model's tokenizer has {len(tokenizer)} tokens but the reward model embeds only {rows}; "
            f"pass the tokenizer the reward model was trained with, e.g. RewardModel(model, tokenizer)"
        )


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
        self, prompts: list[str], completions: list[str], *, where: Sequence[str] | None = None, **kwargs: Any
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Total and per-component scores; `where[i]` (e.g. "env index 2, step 5") goes into error messages.

        `where` is not passed on to the reward functions; every other keyword argument is.
        """
        at = [f" ({w})" for w in where] if where is not None else [""] * len(completions)
        total = np.zeros(len(completions), dtype=np.float64)
        parts = {}
        for name, fn, weight in self.components:
            scores = _call_checked(name, fn, prompts, completions, kwargs, at)
            parts[name] = scores
            with np.errstate(over="ignore"):  # an overflow is reported below, with the item it hit
                total += weight * scores
        for i in np.flatnonzero(~np.isfinite(total)).tolist():
            terms = ", ".join(f"{n}={parts[n][i]:.6g} with weight {w:g}" for n, _, w in self.components)
            raise NonFiniteRewardError(
                f"the weighted reward total is {total[i]} for prompt {prompts[i]!r}{at[i]}: it overflowed "
                f"from finite components ({terms}); lower the weights or the scores' scale"
            )
        return total, parts


def _call_checked(
    name: str, fn: RewardFn, prompts: list[str], completions: list[str], kwargs: dict, at: list[str]
) -> np.ndarray:
    """`fn`'s scores as float64, or RewardError naming the component, the item and what was wrong."""
    try:
        result = fn(prompts, completions, **kwargs)
    except Exception as exc:
        culprit = _find_failing_item(fn, prompts, completions, kwargs)
        where = (f"on prompt {prompts[culprit]!r}{at[culprit]}" if culprit is not None
                 else f"on a batch of {len(prompts)} prompts")
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
                f"{prompts[i]!r}{at[i]}; scores must be real numbers"
            )
        if not math.isfinite(value):
            raise NonFiniteRewardError(
                f"reward {name!r} ({_describe(fn)}) returned {value} for prompt {prompts[i]!r} and "
                f"completion {completions[i]!r}{at[i]}; scores must be finite{_non_finite_hint(fn)}"
            )
        scores[i] = float(value)
    return scores


def _non_finite_hint(fn: RewardFn) -> str:
    if isinstance(fn, RewardModel):
        return (" (the reward model's logits are not: check its weights with torch.isfinite, or load it in "
                "float32)")
    return " (replace NaN / inf in the reward function, e.g. with a penalty score)"


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


def _kind(spec: Any) -> str:
    """'name', 'path', 'module' or 'callable': how a reward spec is resolved (ConfigError for others)."""
    if isinstance(spec, str):
        if spec in _REGISTRY or not ("/" in spec or os.sep in spec or os.path.exists(spec)):
            return "name"
        return "path"
    if isinstance(spec, os.PathLike):
        return "path"
    if isinstance(spec, nn.Module):
        return "module"
    if callable(spec):
        return "callable"
    raise ConfigError(
        f"reward={spec!r} is not a reward; pass a callable fn(prompts, completions, **kw) -> list[float], "
        f"a registered name {list_rewards()}, a sequence-classification model or its path, "
        f"or a list of these (optionally as (reward, weight) pairs)"
    )


def _resolve_one(spec: Any, tokenizer: Any, device: torch.device) -> RewardFn:
    kind = _kind(spec)
    if kind == "name":
        return get_reward(spec)
    if kind == "path":
        return RewardModel(spec, device=device)
    if kind == "module":
        return RewardModel(spec, tokenizer)
    return spec


def _items(spec: Any) -> list[tuple[Any, float]]:
    """The (reward, weight) pairs of any accepted `reward=` value, weights checked."""
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, (list, tuple)) and not _is_pair(spec):
        items = [item if _is_pair(item) else (item, 1.0) for item in spec]
    else:
        items = [spec if _is_pair(spec) else (spec, 1.0)]
    if not items:
        raise ConfigError("reward=[] is empty; pass at least one reward, e.g. reward='sentiment'")
    for item, weight in items:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ConfigError(f"the weight {weight!r} of reward {item!r} must be a finite number")
    return items


def check_reward(spec: Any) -> None:
    """Check a `reward=` value without loading anything: names registered, paths existing, weights finite.

    The env calls this before it loads the policy, so a misspelt name costs no model load.
    """
    from .models import _resolve_source

    if isinstance(spec, RewardSet):
        return
    for item, _ in _items(spec):
        kind = _kind(item)
        if kind == "name":
            get_reward(item)
        elif kind == "path":
            _resolve_source(item, "reward")


def build_reward(spec: Any, *, tokenizer: Any = None, device: torch.device | None = None) -> RewardSet:
    """Turn any accepted `reward=` value into a RewardSet with unique component names."""
    if isinstance(spec, RewardSet):
        return spec
    device = device or torch.device("cpu")
    components: list[tuple[str, RewardFn, float]] = []
    seen: dict[str, int] = {}
    for index, (item, weight) in enumerate(_items(spec)):
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
