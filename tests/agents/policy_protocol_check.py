"""Checked by mypy (tests/agents/test_policies.py): both actor-critics satisfy the ActorCritic protocol PPO uses."""

from agents.lm_policy import LMActorCritic
from agents.policies import ActorCritic, MLPActorCritic


def mlp_policy(policy: MLPActorCritic) -> ActorCritic:
    return policy


def language_model_policy(policy: LMActorCritic) -> ActorCritic:
    return policy
