"""NaN and infinity are stopped where they enter the env, with the env index, the step and the quantity."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from textenv import RewardError, RewardModel, TextRLHFEnv, TextRLHFVectorEnv
from textenv.errors import ConfigError, NonFiniteError
from textenv.testing import SAMPLE_PROMPTS

PROMPTS = list(SAMPLE_PROMPTS)
POLICY_FIX = (
    "the policy's weights are probably non-finite (a diverged update?): check torch.isfinite(p).all() for p in "
    "env.model.parameters(), then lower the learning rate or reload a checkpoint"
)
REFERENCE_FIX = (
    "the reference model's weights are probably non-finite (env.ref_model is a frozen copy of the starting "
    "weights): build the env from a model with finite weights"
)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def fill(model: torch.nn.Module, value: float) -> None:
    for p in model.parameters():
        p.data.fill_(value)  # through .data: no version bump, as a buggy optimizer would write


def test_nan_policy_weights_are_reported_at_reset(policy):
    env = TextRLHFEnv(policy, prompts=PROMPTS, max_new_tokens=3)
    fill(policy, math.nan)
    with pytest.raises(NonFiniteError, match=exactly(
        f"the policy's next-token log-probs hold NaN at env index 0, step 0; {POLICY_FIX}"
    )):
        env.reset(seed=0)


@pytest.mark.parametrize("write", ["data", "in_place"])
def test_nan_policy_weights_mid_episode_are_reported_at_the_next_step(policy, write):
    vec = TextRLHFVectorEnv(3, policy, prompts=PROMPTS, max_new_tokens=5)
    vec.reset(seed=0)
    vec.step(np.array([5, 6, 7]))
    if write == "data":
        fill(policy, math.nan)  # the cached distributions are the old ones: the next forward shows it
        step = 2
    else:
        with torch.no_grad():
            for p in policy.parameters():
                p.fill_(math.inf)  # version bump: the env recomputes before scoring the next action
        step = 1
    with pytest.raises(NonFiniteError, match=exactly(
        f"the policy's next-token log-probs hold NaN at env index 0, step {step}; {POLICY_FIX}"
    )):
        vec.step(np.array([5, 6, 7]))


def test_nan_reference_weights_are_reported(policy):
    env = TextRLHFEnv(policy, prompts=PROMPTS, max_new_tokens=3)
    fill(env.ref_model, math.nan)
    with pytest.raises(NonFiniteError, match=exactly(
        f"the reference's next-token log-probs hold NaN at env index 0, step 0; {REFERENCE_FIX}"
    )):
        env.reset(seed=0)


@pytest.mark.parametrize(("estimator", "quantity", "value"),
                         [("k1", "the KL estimate 'k1'", "nan"), ("full", "the action's log-prob", "-inf")])
def test_an_action_outside_the_sampling_support_is_not_an_infinite_reward(tiny_dir, estimator, quantity, value):
    env = TextRLHFEnv(tiny_dir, prompts=PROMPTS, max_new_tokens=3, top_k=2, kl_estimator=estimator)
    env.reset(seed=0)
    action = int(env.next_logprobs.argmin())
    assert env.next_logprobs[action] == -math.inf
    with pytest.raises(NonFiniteError, match=exactly(
        f"{quantity} is {value} at env index 0, step 0 (action {action}: log pi=-inf, log pi_ref=-inf); the "
        f"policy gives token {action} probability 0 at temperature=0.7, top_k=2, top_p=1.0: sample actions "
        "from env.next_logprobs"
    )):
        env.step(action)


def nan_for_the_cat(prompts, completions, **kw):
    return [math.nan if "cat" in p else 0.5 for p in prompts]


def test_a_nan_component_of_a_weighted_reward_names_the_component_and_the_env(tiny_dir):
    vec = TextRLHFVectorEnv(3, tiny_dir, prompts=PROMPTS, max_new_tokens=2,
                            reward=[("sentiment", 1.0), (nan_for_the_cat, 2.0)])
    vec.reset(options={"prompt_index": [0, 1, 2]})
    vec.step(np.array([5, 5, 5]))
    with pytest.raises(RewardError, match=exactly(
        "reward 'nan_for_the_cat' (nan_for_the_cat) returned nan for prompt 'Write one sentence about the cat.' "
        "and completion 'one one' (env index 1, step 1); scores must be finite (replace NaN / inf in the reward "
        "function, e.g. with a penalty score)"
    )) as caught:
        vec.step(np.array([5, 5, 5]))
    assert isinstance(caught.value, NonFiniteError)


def test_a_weighted_total_that_overflows_is_reported(tiny_dir):
    env = TextRLHFEnv(tiny_dir, prompts=PROMPTS, max_new_tokens=1, reward_clip=None,
                      reward=[(lambda p, c, **k: [1e300] * len(c), 1e10)])
    env.reset(options={"prompt_index": 3})
    with pytest.raises(NonFiniteError, match=exactly(
        "the weighted reward total is inf for prompt 'i like coffee' (env index 0, step 0): it overflowed from "
        "finite components (reward_0=1e+300 with weight 1e+10); lower the weights or the scores' scale"
    )):
        env.step(5)


def test_a_reward_model_with_nan_weights_is_reported(tiny_dir, reward_dir):
    module = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    fill(module, math.nan)
    scorer = RewardModel(module, AutoTokenizer.from_pretrained(reward_dir))
    vec = TextRLHFVectorEnv(2, tiny_dir, prompts=PROMPTS, max_new_tokens=1, reward=scorer)
    vec.reset(options={"prompt_index": [3, 0]})
    with pytest.raises(RewardError, match=exactly(
        "reward 'reward_model' (RewardModel) returned nan for prompt 'i like coffee' and completion 'one' "
        "(env index 0, step 0); scores must be finite (the reward model's logits are not: check its weights "
        "with torch.isfinite, or load it in float32)"
    )):
        vec.step(np.array([5, 5]))


class DivergingController:
    """A custom KL controller whose update goes wrong."""

    def __init__(self, value: float = 0.1) -> None:
        self.value = value

    def update(self, kl: float, n_steps: int) -> None:
        self.value = math.nan

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_a_non_finite_kl_coefficient_is_reported(tiny_dir):
    with pytest.raises(ConfigError, match=exactly(
        "kl_coef=DivergingController has the value inf; a KL controller's value must be a finite number >= 0"
    )):
        TextRLHFEnv(tiny_dir, prompts=PROMPTS, kl_coef=DivergingController(math.inf))
    controller = DivergingController()
    env = TextRLHFEnv(tiny_dir, prompts=PROMPTS, max_new_tokens=1, kl_coef=controller)
    env.reset(seed=0)
    env.step(5)  # the episode ends: the controller is updated to NaN
    env.reset(seed=0)
    with pytest.raises(NonFiniteError, match=exactly(
        f"the KL coefficient is nan (from {controller!r}); a KL controller must keep its value a finite number "
        ">= 0: check its update()"
    )):
        env.step(5)
