"""textenv: language-model token generation as a Gymnasium environment, with the RLHF reward inside.

    import gymnasium as gym
    import textenv                              # registers TextRLHF-v0

    env = gym.make("TextRLHF-v0")               # embedded SmolLM2-135M-Instruct, offline
    envs = gym.make_vec("TextRLHF-v0", num_envs=16, reward=my_reward)   # one batched model
"""

from __future__ import annotations

import gymnasium

from .config import TextEnvConfig
from .env import TextRLHFEnv
from .errors import (
    ConfigError,
    ModelLoadError,
    PromptError,
    RewardError,
    TextEnvError,
)
from .kl import AdaptiveKLController, FixedKLController, KLController
from .models import Shared, embedded_model_dir
from .rewards import (
    KeywordReward,
    LengthReward,
    RewardModel,
    RewardSet,
    SentimentReward,
    get_reward,
    list_rewards,
    register_reward,
)
from .vector import NextTokenCache, TextRLHFVectorEnv

__all__ = [
    "ENV_ID",
    "TextRLHFEnv",
    "TextRLHFVectorEnv",
    "NextTokenCache",
    "TextEnvConfig",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "RewardModel",
    "RewardSet",
    "SentimentReward",
    "LengthReward",
    "KeywordReward",
    "register_reward",
    "get_reward",
    "list_rewards",
    "Shared",
    "embedded_model_dir",
    "TextEnvError",
    "ConfigError",
    "PromptError",
    "RewardError",
    "ModelLoadError",
]

__version__ = "0.1.0"

ENV_ID = "TextRLHF-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="textenv.env:TextRLHFEnv",
        vector_entry_point="textenv.vector:TextRLHFVectorEnv",
    )
