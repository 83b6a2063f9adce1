"""The environment's settings as one frozen dataclass, validated in one place."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ConfigError
from .kl import KL_ESTIMATORS, KLController, as_kl_controller

__all__ = ["TextEnvConfig", "eos_ids", "check_context", "check_tokenizer_size", "check_reset_options",
           "UnknownSettingError", "takes_env_settings"]

Init = TypeVar("Init", bound=Callable[..., None])


class UnknownSettingError(ConfigError, TypeError):
    """An env keyword that does not exist (a TypeError, as Python's own for unknown keywords)."""


def takes_env_settings(init: Init) -> Init:
    """Give an env ``__init__(self, ..., **settings)`` the `TextEnvConfig` fields as keywords.

    The settings are declared once, in `TextEnvConfig` (types, defaults, docs, checks); the wrapped
    ``__init__`` receives only those the caller passed, shows all of them in its signature (for
    ``help``, IDEs and ``inspect``), and answers a misspelt keyword with the closest real one:
    ``gym.make("TextRLHF-v0", max_new_token=8)`` would otherwise get Python's bare "unexpected keyword".
    """
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not p.VAR_KEYWORD]
    settings = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in dataclasses.fields(TextEnvConfig)]
    names = [p.name for p in own if p.name != "self"] + [p.name for p in settings]

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}=?" if close else f"the settings are: {', '.join(names)}"
                raise UnknownSettingError(f"{type(self).__name__} has no setting {key!r}; {hint}")
        init(self, *args, **kwargs)

    checked.__signature__ = inspect.Signature(own + settings)  # type: ignore[attr-defined]
    del checked.__wrapped__  # inspect must read the signature above, not the **settings one
    return checked  # type: ignore[return-value]


REF_DTYPE_NAMES = ("float32", "bfloat16", "float16")
# where transformers configs keep the longest sequence a model takes (GPT-2 style, then others)
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class TextEnvConfig:
    """Settings shared by `TextRLHFEnv` and `TextRLHFVectorEnv` (the defaults are the env's)."""

    max_new_tokens: int = 32
    """Response length limit; the episode ends (terminated) when it is reached."""
    max_prompt_tokens: int = 64
    """Prompt length limit after the chat template; sets the observation width with max_new_tokens."""
    temperature: float = 0.7
    """Temperature of both log-probs in the KL term; the agent must sample at the same one."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all); the log-probs are those of that distribution."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens holding this much probability (1.0: all)."""
    kl_coef: float | KLController = 0.05
    """Weight of the per-token KL penalty: a float, or a controller such as AdaptiveKLController."""
    kl_estimator: str = "k1"
    """Per-token KL estimate used in the reward: 'k1' (log-ratio), 'k3' or 'full' (exact)."""
    reward_clip: float | None = 5.0
    """The final score is clipped to [-reward_clip, reward_clip]; None leaves it unclipped."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score (before clipping) when a response ends without EOS."""
    chat_template: bool = True
    """Apply the tokenizer's chat template to prompts when it has one."""
    truncate_prompts: bool = False
    """Keep the last max_prompt_tokens tokens of longer prompts instead of raising PromptError."""
    ref_dtype: str | None = None
    """Precision of the frozen reference: None (the policy's), 'float32', 'bfloat16' or 'float16'."""

    def __post_init__(self) -> None:
        _positive_int(self.max_new_tokens, "max_new_tokens", "max_new_tokens=32")
        _positive_int(self.max_prompt_tokens, "max_prompt_tokens", "max_prompt_tokens=64")
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise ConfigError(
                f"temperature={self.temperature!r} must be a finite number > 0; use the temperature the "
                f"agent samples with, e.g. temperature=0.7"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r} must be an integer >= 0 (0 turns it off), e.g. top_k=50")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p!r} must be a number in (0, 1] (1.0 turns it off), e.g. top_p=0.9")
        as_kl_controller(self.kl_coef)
        if self.kl_estimator not in KL_ESTIMATORS:
            close = difflib.get_close_matches(str(self.kl_estimator), KL_ESTIMATORS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"kl_estimator={self.kl_estimator!r} is not one of {KL_ESTIMATORS}{hint}")
        if self.reward_clip is not None and not (_is_number(self.reward_clip) and self.reward_clip > 0):
            raise ConfigError(
                f"reward_clip={self.reward_clip!r} must be a number > 0, or None for no clipping"
            )
        if self.missing_eos_penalty is not None and not _is_number(self.missing_eos_penalty):
            raise ConfigError(
                f"missing_eos_penalty={self.missing_eos_penalty!r} must be a finite number or None"
            )
        if self.ref_dtype is not None and self.ref_dtype not in REF_DTYPE_NAMES:
            raise ConfigError(
                f"ref_dtype={self.ref_dtype!r} is not one of {REF_DTYPE_NAMES} or None; e.g. ref_dtype='bfloat16'"
            )
        for name in ("chat_template", "truncate_prompts"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")

    @property
    def obs_length(self) -> int:
        """Width of the observation arrays: prompt area then response area."""
        return self.max_prompt_tokens + self.max_new_tokens


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any, name: str, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1, e.g. {example}")


def eos_ids(
    eos_token_id: int | Sequence[int] | None, tokenizer: Any, generation_config: Any, vocab_size: int
) -> tuple[int, ...]:
    """The token ids that end an episode: given explicitly, else the tokenizer's and the model's."""
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    else:
        ids = [getattr(tokenizer, "eos_token_id", None)]
        from_model = getattr(generation_config, "eos_token_id", None)
        ids += from_model if isinstance(from_model, (list, tuple)) else [from_model]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ConfigError(
                "eos_token_id=None and neither the tokenizer nor the model's generation_config has an EOS "
                "token; pass eos_token_id=<id>, or eos_token_id=[] to end episodes only at max_new_tokens"
            )
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ConfigError(f"eos_token_id={eos_token_id!r}: {i!r} is not a token id in [0, {vocab_size})")
    return tuple(dict.fromkeys(ids))


def context_limit(model_config: Any) -> tuple[int, str] | None:
    """(longest sequence, config field) of a transformers config; None for models with no limit."""
    if model_config is None:
        return None
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for field in _CONTEXT_FIELDS:
        value = getattr(text, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            # the name the config itself uses (GPT-2 maps max_position_embeddings to n_positions)
            return value, getattr(text, "attribute_map", {}).get(field, field)
    return None


def check_context(config: TextEnvConfig, model_config: Any) -> None:
    """A prompt plus a response must fit the model's context (read from its config, before weights load)."""
    limit = context_limit(model_config)
    if limit is None or config.obs_length <= limit[0]:
        return
    tokens, field = limit
    raise ConfigError(
        f"max_prompt_tokens={config.max_prompt_tokens} + max_new_tokens={config.max_new_tokens} = "
        f"{config.obs_length} is more than the model's context of {tokens} tokens (config.{field}); "
        f"lower max_prompt_tokens or max_new_tokens so that their sum is at most {tokens}"
    )


def check_tokenizer_size(tokenizer: Any, vocab_size: int) -> None:
    """Every token id the tokenizer can produce must have a row in the model's output layer."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > vocab_size:
        raise ConfigError(
            f"the tokenizer has {size} tokens but the model's output layer has {vocab_size} (its vocab_size), "
            f"so token ids >= {vocab_size} could be neither sampled nor scored; pass the tokenizer the model "
            f"was trained with, or call model.resize_token_embeddings(len(tokenizer)) before building the env"
        )


def check_reset_options(options: Any, accepted: Sequence[str]) -> Mapping[str, Any]:
    """`reset(options=...)` as a mapping ({} for None); unknown keys suggest the closest accepted one."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"options={options!r:.80} must be a dict or None; accepted keys: {list(accepted)}"
        )
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.4)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"reset(options=...) got the unknown key {key!r}; {hint}accepted keys: {list(accepted)}"
            )
    return options
