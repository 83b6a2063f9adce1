"""Actor-critic networks for vector observations: the distribution follows the action space."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from agents.config import PPOConfig

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class ActorCritic(Protocol):
    """What PPO needs from a policy, whatever the env: sample, re-score, and estimate value.

    Every computation PPO trains on goes through ``forward`` (``module(obs, actions, episode_ids)``),
    so a ``DistributedDataParallel`` wrapper around the policy averages its gradients over ranks.
    """

    sequence_model: bool
    """Whether observations are token sequences re-scored one episode per forward (minibatches of whole
    episodes, ``episode_ids`` given to ``forward``)."""
    obs_shape: tuple[int, ...]
    """Shape of one observation as stored in the rollout buffer."""
    obs_dtype: torch.dtype

    def preprocess(self, obs: Any) -> torch.Tensor:
        """A batch of env observations (already normalised where that applies) -> the stored tensor."""
        ...

    def forward(
        self, obs: torch.Tensor, actions: torch.Tensor, episode_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(log_prob, entropy, value)`` of stored actions under the current weights (with gradients)."""
        ...

    def act(
        self, obs: torch.Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(action, log_prob, value)`` for a batch of observations."""
        ...

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """Return V(obs) for a batch."""
        ...

    def to_env_action(self, actions: torch.Tensor) -> np.ndarray:
        """Turn sampled actions into what ``env.step`` accepts (ints, or clipped to bounds)."""
        ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any: ...


def _layer(inputs: int, outputs: int, gain: float) -> nn.Linear:
    # orthogonal init with per-layer gains, as in the PPO implementation-details study
    # (Engstrom et al. 2020; Huang et al. 2022): small policy head, unit value head
    layer = nn.Linear(inputs, outputs)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(inputs: int, hidden_sizes: tuple[int, ...], activation: str) -> tuple[nn.Sequential, int]:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [_layer(inputs, width, math.sqrt(2)), act()]
        inputs = width
    return nn.Sequential(*layers), inputs


class MLPActorCritic(nn.Module):
    """MLP actor and critic, separate or sharing one trunk; Categorical or diagonal Gaussian head.

    The Gaussian has a state-independent, learned log-std. Sampled actions are kept unclipped
    for the log-probabilities; only ``to_env_action`` clips them to the Box bounds.
    """

    sequence_model = False

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, config: PPOConfig) -> None:
        super().__init__()
        obs_dim = int(np.prod(observation_space.shape))
        self.obs_shape, self.obs_dtype = tuple(observation_space.shape), torch.float32
        self.action_space = action_space
        self.discrete = isinstance(action_space, spaces.Discrete)
        out = int(action_space.n) if self.discrete else int(np.prod(action_space.shape))
        self.actor_trunk, width = _mlp(obs_dim, config.hidden_sizes, config.activation)
        self.critic_trunk = (
            self.actor_trunk if config.shared_trunk else _mlp(obs_dim, config.hidden_sizes, config.activation)[0]
        )
        self.actor_head = _layer(width, out, 0.01)
        self.critic_head = _layer(width, 1, 1.0)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((out,), float(config.log_std_init)))
            self.register_buffer("low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def _head(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor_head(self.actor_trunk(obs.flatten(1)))

    def _log_prob_entropy(
        self, head: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # written out rather than through torch.distributions: its argument checks cost more
        # than the tiny MLP itself at classic-control sizes
        if self.discrete:
            log_probs = torch.log_softmax(head, dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            return log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1), entropy
        log_std = self.log_std.expand_as(head)
        log_prob = -0.5 * ((actions - head) / log_std.exp()) ** 2 - log_std - _HALF_LOG_2PI
        return log_prob.sum(-1), (0.5 + _HALF_LOG_2PI + log_std).sum(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic_head(self.critic_trunk(obs.flatten(1))).squeeze(-1)

    def act(
        self, obs: torch.Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head = self._head(obs)
        if self.discrete:
            if deterministic:
                actions = head.argmax(-1)
            else:  # drawn on the (CPU) generator whatever the device: the same run on every device
                probs = torch.softmax(head, -1).cpu()
                actions = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(head.device)
        else:
            noise = torch.randn(head.shape, generator=generator, dtype=head.dtype).to(head.device)
            actions = head if deterministic else head + self.log_std.exp() * noise
        return actions, self._log_prob_entropy(head, actions)[0], self.value(obs)

    def preprocess(self, obs: Any) -> torch.Tensor:
        return torch.as_tensor(obs, dtype=torch.float32, device=self.critic_head.weight.device)

    def forward(
        self, obs: torch.Tensor, actions: torch.Tensor, episode_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_prob, entropy = self._log_prob_entropy(self._head(obs), actions)
        return log_prob, entropy, self.value(obs)

    evaluate = forward  # the name the update used before ``forward``

    def to_env_action(self, actions: torch.Tensor) -> np.ndarray:
        if self.discrete:
            return actions.cpu().numpy().astype(np.int64)
        clipped = torch.maximum(torch.minimum(actions, self.high), self.low)
        return clipped.reshape((-1,) + tuple(self.action_space.shape)).cpu().numpy()


def make_policy(observation_space: spaces.Space, action_space: spaces.Space, config: PPOConfig) -> MLPActorCritic:
    """Pick the actor-critic for the spaces, or say clearly which space is not supported."""
    if not isinstance(action_space, (spaces.Discrete, spaces.Box)):
        raise ValueError(
            f"action space {action_space} is not supported: PPO handles Discrete and Box actions; "
            "wrap the env to expose one of them"
        )
    if not isinstance(observation_space, spaces.Box):
        raise ValueError(
            f"observation space {observation_space} is not supported by the MLP policy: it needs a Box; "
            "flatten it with gymnasium.wrappers.FlattenObservation"
        )
    return MLPActorCritic(observation_space, action_space, config)


def make_policy_for_env(envs: Any, config: PPOConfig) -> nn.Module:
    """The actor-critic for a vector env: the env's own language model for token envs, else an MLP."""
    from agents.lm_policy import LMActorCritic, is_token_env  # transformers stays out of classic control

    if is_token_env(envs):
        return LMActorCritic(envs, config)
    if config.uses_lora:
        raise ValueError(
            f"PPOConfig.lora_r={config.lora_r} (LoRA) applies to language-model policies on a TextRLHF-v0 env; "
            "the MLP policy trains all its weights: set lora_r=0"
        )
    if config.gradient_checkpointing:
        raise ValueError(
            "PPOConfig.gradient_checkpointing=True applies to language-model policies on a TextRLHF-v0 env; "
            "the MLP policy keeps no activations worth recomputing: set gradient_checkpointing=False"
        )
    if config.mixed_precision != "no":
        raise ValueError(
            f"PPOConfig.mixed_precision={config.mixed_precision!r} applies to language-model policies on a "
            "TextRLHF-v0 env; an MLP policy gains nothing from bfloat16: set mixed_precision='no'"
        )
    return make_policy(envs.single_observation_space, envs.single_action_space, config)
