"""One PPO agent for classic control and, through the same class, for language models."""

from agents import reward_model, sft  # noqa: F401  InstructGPT steps 1 and 2
from agents.config import PPOConfig, available_presets
from agents.errors import CheckpointError, NonFiniteError, SpaceMismatchError
from agents.ppo import PPO

__all__ = [
    "PPO", "PPOConfig", "available_presets", "NonFiniteError", "CheckpointError", "SpaceMismatchError",
    "sft", "reward_model",
]
