"""KL estimates and coefficient controllers."""

from __future__ import annotations

import pytest
import torch

from textenv import AdaptiveKLController, FixedKLController
from textenv.errors import ConfigError
from textenv.kl import as_kl_controller, kl_estimates, token_logprobs


def test_estimates_match_their_definitions():
    generator = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 10, generator=generator), -1)
    ref = torch.log_softmax(torch.randn(4, 10, generator=generator), -1)
    actions = torch.tensor([0, 3, 9, 3])
    out = kl_estimates(logp, ref, actions)
    rows = torch.arange(4)
    ratio = ref[rows, actions].exp() / logp[rows, actions].exp()
    torch.testing.assert_close(out["k1"], logp[rows, actions] - ref[rows, actions])
    torch.testing.assert_close(out["k3"], ratio - 1 - ratio.log())
    exact = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logp), torch.distributions.Categorical(logits=ref)
    )
    torch.testing.assert_close(out["full"], exact)
    assert (out["k3"] >= 0).all() and (out["full"] > 0).all() and (out["k1"] < 0).any()


def test_full_kl_ignores_tokens_the_policy_never_picks():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    ref = torch.log(torch.tensor([[0.25, 0.75, 0.0]]))
    full = kl_estimates(logp, ref, torch.tensor([0]))["full"]
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    torch.testing.assert_close(full, expected.view(1))


def test_token_logprobs_are_float32_at_the_temperature():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    out = token_logprobs(logits, 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.log_softmax(logits.float() * 2, -1))


def test_adaptive_controller_follows_ziegler_et_al():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(12.0, n_steps=10)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    value = controller.value
    controller.update(4.5, n_steps=20)  # error -0.25, clipped to -0.2
    assert controller.value == pytest.approx(value * (1 - 0.2 * 20 / 100))
    value = controller.value
    controller.update(6.6, n_steps=1)
    assert controller.value == pytest.approx(value * (1 + 0.1 / 100))


def test_fixed_controller_and_custom_controllers():
    fixed = as_kl_controller(0.05)
    fixed.update(100.0, 10)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    fixed.load_state_dict({"value": 0.2})
    assert fixed.state_dict() == {"value": 0.2}

    class Halving:
        value = 1.0

        def update(self, kl, n_steps):
            self.value /= 2

        def state_dict(self):
            return {"value": self.value}

        def load_state_dict(self, state):
            self.value = state["value"]

    custom = Halving()
    assert as_kl_controller(custom) is custom


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_kl_coef": -1.0}, "init_kl_coef=-1.0 must be a finite number >= 0"),
        ({"target": 0.0}, "target=0.0 must be a positive KL in nats per episode, e.g. 6.0"),
        ({"horizon": 0}, "horizon=0 must be a positive number of episodes, e.g. 10000"),
    ],
)
def test_adaptive_controller_validates(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdaptiveKLController(**kwargs)


def test_top_k_and_top_p_keep_the_likely_tokens_and_renormalise():
    import math

    from textenv.kl import restrict_to_support, token_logprobs

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    torch.testing.assert_close(token_logprobs(logits, 1.0).exp(), probs)
    torch.testing.assert_close(token_logprobs(logits, 1.0, top_k=2).exp(), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # top-p: the most likely tokens until their mass reaches p
    torch.testing.assert_close(token_logprobs(logits, 1.0, top_p=0.8).exp(), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    three = torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95
    torch.testing.assert_close(token_logprobs(logits, 1.0, top_p=0.81).exp(), three)
    assert token_logprobs(logits, 1.0, top_p=0.1).isfinite().sum() == 1  # always at least one token
    # top-k first, then top-p on the renormalised rest
    torch.testing.assert_close(token_logprobs(logits, 1.0, top_k=3, top_p=0.6).exp(),
                               torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    ref = torch.tensor([[0.25, 0.25, 0.25, 0.25]]).log()
    restricted = restrict_to_support(ref, token_logprobs(logits, 1.0, top_k=2))
    torch.testing.assert_close(restricted.exp(), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    assert restricted[0, 3] == -math.inf


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"top_k": -1}, "top_k=-1 must be"), ({"top_p": 0.0}, "top_p=0.0 must be"), ({"top_p": 1.5}, "top_p=1.5 must be")],
)
def test_bad_sampling_settings_are_named(kwargs, message):
    from textenv.config import TextEnvConfig

    with pytest.raises(ConfigError, match=message):
        TextEnvConfig(**kwargs)
