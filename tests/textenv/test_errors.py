"""Bad input gets an error naming the argument, the value and the fix; never a silent zero."""

from __future__ import annotations

import math
import re

import gymnasium as gym
import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from textenv import ConfigError, ModelLoadError, PromptError, RewardError, TextRLHFEnv, TextRLHFVectorEnv
from textenv.testing import SAMPLE_PROMPTS, make_tiny_model_dir, make_tiny_tokenizer

PROMPTS = list(SAMPLE_PROMPTS)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.fixture
def env(tiny_dir):
    return TextRLHFEnv(tiny_dir, prompts=PROMPTS, max_new_tokens=2)


@pytest.mark.parametrize("action", [-1, 57, 3.0, True, "5", np.array([1, 2])])
def test_token_outside_the_vocabulary(env, action):
    env.reset(seed=0)
    message = f"action {action!r} is not a token id in [0, 57); pass an int from the policy"
    with pytest.raises(gym.error.InvalidAction, match=exactly(message)):
        env.step(action)


def test_array_and_tensor_actions_are_accepted(env):
    import torch

    env.reset(seed=0)
    env.step(np.int64(5))
    env.reset(seed=0)
    env.step(np.array([5]))
    env.reset(seed=0)
    env.step(torch.tensor(5))


def test_vector_actions_of_the_wrong_shape_or_range(tiny_dir):
    vec = TextRLHFVectorEnv(2, tiny_dir, prompts=PROMPTS)
    with pytest.raises(gym.error.ResetNeeded, match=exactly(
        "step() was called before reset(); call envs.reset() first"
    )):
        vec.step(np.array([1, 2]))
    vec.reset(seed=0)
    wrong_shape = r"must be 2 integer token ids \(shape \(2,\)\), got shape \(3,\)"
    with pytest.raises(gym.error.InvalidAction, match=wrong_shape):
        vec.step(np.array([1, 2, 3]))
    with pytest.raises(gym.error.InvalidAction, match=exactly(
        "actions[1] 99 is not a token id in [0, 57); pass an int from the policy"
    )):
        vec.step(np.array([1, 99]))


def test_step_before_reset_and_after_the_episode_ended(env):
    with pytest.raises(gym.error.ResetNeeded, match=exactly(
        "step() was called before reset(); call env.reset() to start an episode"
    )):
        env.step(5)
    env.reset(seed=0)
    env.step(5)
    assert env.step(5)[2] is True
    with pytest.raises(gym.error.ResetNeeded, match=exactly(
        "step() was called after the episode ended; call env.reset() to start an episode"
    )):
        env.step(5)


def test_empty_prompt_list(tiny_dir, tmp_path):
    with pytest.raises(PromptError, match=exactly(
        "prompts=[] is empty; pass at least one prompt, or prompts=None for the built-in set"
    )):
        TextRLHFEnv(tiny_dir, prompts=[])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptError, match="empty.txt' holds no prompts; add one prompt per line$"):
        TextRLHFEnv(tiny_dir, prompts=tmp_path / "empty.txt")
    with pytest.raises(PromptError, match="is neither a .txt nor a .jsonl file"):
        TextRLHFEnv(tiny_dir, prompts="Tell me about the sea.")
    (tmp_path / "bad.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(PromptError, match="line 1 has no string 'prompt' field"):
        TextRLHFEnv(tiny_dir, prompts=tmp_path / "bad.jsonl")


def test_prompt_longer_than_max_prompt_tokens_raises_or_is_truncated_when_asked(tiny_dir):
    long = "the sea is very very very blue"  # 7 tokens
    with pytest.raises(PromptError, match=exactly(
        "prompts[1]='the sea is very very very blue' is 7 tokens long, more than max_prompt_tokens=5; "
        "raise max_prompt_tokens or pass truncate_prompts=True to keep its last 5 tokens"
    )):
        TextRLHFEnv(tiny_dir, prompts=["i like coffee", long], max_prompt_tokens=5)
    env = TextRLHFEnv(tiny_dir, prompts=[long], max_prompt_tokens=5, truncate_prompts=True)
    obs, _ = env.reset(seed=0)
    assert obs["input_ids"][:5].tolist() == env.tokenizer(long)["input_ids"][-5:]


def test_tokenizer_without_pad_token_is_handled(tmp_path):
    path = make_tiny_model_dir(tmp_path / "nopad", pad_token=False)
    env = TextRLHFEnv(path, prompts=PROMPTS, max_prompt_tokens=8, max_new_tokens=2)
    assert env.tokenizer.pad_token_id is None and env.pad_token_id == env.tokenizer.eos_token_id
    obs, _ = env.reset(seed=0)
    assert obs["input_ids"][0] == env.tokenizer.eos_token_id and obs["attention_mask"][0] == 0
    vec = TextRLHFVectorEnv(3, path, prompts=PROMPTS, max_new_tokens=2)
    vec.reset(seed=0)
    vec.step(np.array([5, 6, 7]))


def test_tokenizer_without_eos_token_is_explained(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.generation_config.eos_token_id = None
    tokenizer = make_tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ConfigError, match=exactly(
        "eos_token_id=None and neither the tokenizer nor the model's generation_config has an EOS token; "
        "pass eos_token_id=<id>, or eos_token_id=[] to end episodes only at max_new_tokens"
    )):
        TextRLHFEnv(model, tokenizer=tokenizer, prompts=PROMPTS)
    env = TextRLHFEnv(model, tokenizer=tokenizer, prompts=PROMPTS, eos_token_id=[], max_new_tokens=2)
    env.reset(seed=0)
    assert env.step(1)[2] is False  # token 1 is no longer an end


def raises_value_error(prompts, completions, **kw):
    if any("coffee" in p for p in prompts):
        raise ValueError("no coffee")
    return [0.0] * len(prompts)


def two_few(prompts, completions, **kw):
    return [0.0] * (len(prompts) + 1)


def gives_nan(prompts, completions, **kw):
    return [math.nan] * len(prompts)


def gives_inf(prompts, completions, **kw):
    return [math.inf] * len(prompts)


def gives_text(prompts, completions, **kw):
    return ["high"] * len(prompts)


def gives_number(prompts, completions, **kw):
    return 1.0


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (raises_value_error, "reward 'raises_value_error' (raises_value_error) raised ValueError: no coffee "
                             "on prompt 'i like coffee'"),
        (two_few, "reward 'two_few' (two_few) returned 2 scores for 1 completions; "
                  "return exactly one float per completion"),
        (gives_nan, "reward 'gives_nan' (gives_nan) returned nan for prompt 'i like coffee' and completion "
                    "'sun'; scores must be finite"),
        (gives_inf, "reward 'gives_inf' (gives_inf) returned inf for prompt 'i like coffee' and completion "
                    "'sun'; scores must be finite"),
        (gives_text, "reward 'gives_text' (gives_text) returned 'high' (str) for prompt 'i like coffee'; "
                     "scores must be real numbers"),
        (gives_number, "reward 'gives_number' (gives_number) returned float 1.0; "
                       "return a list of 1 floats, one per completion"),
    ],
)
def test_bad_reward_functions_name_the_function_and_the_prompt(tiny_dir, fn, message):
    env = TextRLHFEnv(tiny_dir, prompts=PROMPTS, reward=fn, max_new_tokens=1)
    env.reset(seed=0, options={"prompt_index": 3})
    with pytest.raises(RewardError, match=exactly(message)):
        env.step(env.tokenizer.convert_tokens_to_ids("sun"))


def test_a_raising_reward_in_a_batch_names_the_prompt_that_failed(tiny_dir):
    vec = TextRLHFVectorEnv(3, tiny_dir, prompts=PROMPTS, reward=raises_value_error, max_new_tokens=1)
    vec.reset(options={"prompt_index": [0, 3, 2]})
    with pytest.raises(RewardError, match="raised ValueError: no coffee on prompt 'i like coffee'$") as caught:
        vec.step(np.array([5, 5, 5]))
    assert isinstance(caught.value.__cause__, ValueError)


def test_unknown_reward_name_suggests_the_closest(tiny_dir):
    with pytest.raises(ConfigError, match=exactly(
        "reward='sentimnt' is not a registered reward; did you mean 'sentiment'? registered: "
        "['length', 'sentiment']. Register one with textenv.register_reward('sentimnt', fn)"
    )):
        TextRLHFEnv(tiny_dir, prompts=PROMPTS, reward="sentimnt")


def test_model_path_that_does_not_exist(tmp_path, tiny_dir):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match=exactly(
        f"model={missing!r} does not exist; pass an existing model directory or a hub id such as "
        "'HuggingFaceTB/SmolLM2-135M-Instruct' (needs network or the HF cache), or model=None for the "
        "embedded SmolLM2-135M-Instruct"
    )):
        TextRLHFEnv(missing, prompts=PROMPTS)
    with pytest.raises(ModelLoadError, match=exactly(
        f"reward={missing!r} does not exist; pass an existing model directory or a hub id such as "
        "'HuggingFaceTB/SmolLM2-135M-Instruct' (needs network or the HF cache)"
    )):
        TextRLHFEnv(tiny_dir, prompts=PROMPTS, reward=missing)
    with pytest.raises(ModelLoadError, match="does not exist"):
        gym.make("TextRLHF-v0", model="./relative/missing", prompts=PROMPTS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kl_coef": -0.1}, "kl_coef=-0.1 must be a finite number >= 0, e.g. kl_coef=0.05 (0 turns the KL "
                            "penalty off)"),
        ({"kl_coef": "high"}, "kl_coef='high' is neither a number nor a KL controller; pass e.g. kl_coef=0.05 "
                              "or kl_coef=AdaptiveKLController(0.05, target=6.0, horizon=10000)"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be an integer >= 1, e.g. max_new_tokens=32"),
        ({"max_prompt_tokens": 2.5}, "max_prompt_tokens=2.5 must be an integer >= 1, e.g. max_prompt_tokens=64"),
        ({"temperature": 0}, "temperature=0 must be a finite number > 0; use the temperature the agent samples "
                             "with, e.g. temperature=0.7"),
        ({"kl_estimator": "ful"}, "kl_estimator='ful' is not one of ('k1', 'k3', 'full'); did you mean 'full'?"),
        ({"reward_clip": -1}, "reward_clip=-1 must be a number > 0, or None for no clipping"),
        ({"render_mode": "rgb_array"}, "render_mode='rgb_array' is not one of ['ansi', 'human'] or None"),
    ],
)
def test_bad_settings(tiny_dir, kwargs, message):
    with pytest.raises(ConfigError, match=exactly(message)):
        TextRLHFEnv(tiny_dir, prompts=PROMPTS, **kwargs)
