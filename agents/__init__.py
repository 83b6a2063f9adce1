"""One PPO agent for classic control and, through the same class, for language models."""

from agents.config import PPOConfig, available_presets
from agents.errors import CheckpointError, NonFiniteError, SpaceMismatchError
from agents.ppo import PPO

__all__ = ["PPO", "PPOConfig", "available_presets", "NonFiniteError", "CheckpointError", "SpaceMismatchError"]
