"""Bad input gets an error naming the argument, the value and the fix; never a silent zero."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from textenv import ConfigError, ModelLoadError, PromptError, RewardError, TextRLHFEnv, TextRLHFVectorEnv, models
from textenv.config import TextEnvConfig, check_context, context_limit
from textenv.testing import DEFAULT_VOCAB, SAMPLE_PROMPTS, make_tiny_model_dir, make_tiny_tokenizer

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
                             "on prompt 'i like coffee' (env index 0, step 0)"),
        (two_few, "reward 'two_few' (two_few) returned 2 scores for 1 completions; "
                  "return exactly one float per completion"),
        (gives_nan, "reward 'gives_nan' (gives_nan) returned nan for prompt 'i like coffee' and completion "
                    "'sun' (env index 0, step 0); scores must be finite (replace NaN / inf in the reward function, "
                    "e.g. with a penalty score)"),
        (gives_inf, "reward 'gives_inf' (gives_inf) returned inf for prompt 'i like coffee' and completion "
                    "'sun' (env index 0, step 0); scores must be finite (replace NaN / inf in the reward function, "
                    "e.g. with a penalty score)"),
        (gives_text, "reward 'gives_text' (gives_text) returned 'high' (str) for prompt 'i like coffee' "
                     "(env index 0, step 0); "
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
    message = "raised ValueError: no coffee on prompt 'i like coffee' (env index 1, step 0)"
    with pytest.raises(RewardError, match=f"{re.escape(message)}$") as caught:
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


@pytest.mark.parametrize(("arch", "field"), [("gpt2", "n_positions"), ("llama", "max_position_embeddings")])
def test_prompt_plus_response_longer_than_the_model_context(tiny_dir, llama_dir, arch, field):
    path = tiny_dir if arch == "gpt2" else llama_dir
    with pytest.raises(ConfigError, match=exactly(
        "max_prompt_tokens=250 + max_new_tokens=10 = 260 is more than the model's context of 256 tokens "
        f"(config.{field}); lower max_prompt_tokens or max_new_tokens so that their sum is at most 256"
    )):
        TextRLHFEnv(path, prompts=PROMPTS, max_prompt_tokens=250, max_new_tokens=10)


def test_a_model_without_a_context_limit_is_not_checked():
    no_limit = SimpleNamespace(vocab_size=57, hidden_size=32)  # e.g. a state-space model's config
    assert context_limit(no_limit) is None
    check_context(TextEnvConfig(max_prompt_tokens=10_000, max_new_tokens=10_000), no_limit)


def test_tokenizer_larger_than_the_model_vocabulary(tiny_dir):
    tokenizer = make_tiny_tokenizer([*DEFAULT_VOCAB, "tea", "milk"])
    with pytest.raises(ConfigError, match=exactly(
        "the tokenizer has 59 tokens but the model's output layer has 57 (its vocab_size), so token ids >= 57 "
        "could be neither sampled nor scored; pass the tokenizer the model was trained with, or call "
        "model.resize_token_embeddings(len(tokenizer)) before building the env"
    )):
        TextRLHFEnv(tiny_dir, tokenizer=tokenizer, prompts=PROMPTS)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load a causal LM's weights (or convert the embedded one) fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("the policy was loaded before the mistake was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    monkeypatch.setattr(models, "embedded_model_dir", fail)
    monkeypatch.setattr(models, "_REFERENCES", {})  # nothing cached to hide a load


@pytest.mark.parametrize(
    ("device", "cuda", "reason"),
    [
        ("cuda", 0, "torch.cuda.is_available() is False"),
        ("cuda:0", 0, "torch.cuda.is_available() is False"),
        ("cuda:7", 2, "this machine has 2 cuda device(s), so index 7 does not exist"),
        ("mps", 0, "torch.backends.mps.is_available() is False"),
        ("gpu", 0, None),
        (True, 0, None),
    ],
)
def test_unavailable_device_is_reported_before_loading(monkeypatch, tiny_dir, no_model_loads, device, cuda, reason):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    available = ["cpu", "cuda", "cuda:0", "cuda:1"] if cuda else ["cpu"]
    problem = "is not a device name torch knows" if reason is None else f"is not available: {reason}"
    message = (f"device={device!r} {problem}; available: {available}. Pass one of those, or device=None "
               "(cuda when available, else cpu)")
    with pytest.raises(ConfigError, match=exactly(message)):
        TextRLHFEnv(tiny_dir, prompts=PROMPTS, device=device)
    with pytest.raises(ConfigError, match=exactly(message)):
        TextRLHFVectorEnv(2, None, prompts=PROMPTS, device=device)


@pytest.mark.parametrize("model", ["tiny", None])
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"reward": "sentimnt"}, ConfigError,
         "reward='sentimnt' is not a registered reward; did you mean 'sentiment'? registered: "
         "['length', 'sentiment']. Register one with textenv.register_reward('sentimnt', fn)"),
        ({"reward": [("sentiment", 2.0), "lenght"]}, ConfigError,
         "reward='lenght' is not a registered reward; did you mean 'length'? registered: "
         "['length', 'sentiment']. Register one with textenv.register_reward('lenght', fn)"),
        ({"reward": {"sentiment": float("nan")}}, ConfigError,
         "the weight nan of reward 'sentiment' must be a finite number"),
        ({"reward": 3}, ConfigError, None),
        ({"reward": "./no/such/reward-model"}, ModelLoadError, None),
        ({"prompts": "missing.txt"}, PromptError,
         "prompts='missing.txt' does not exist; pass an existing .txt or .jsonl file"),
        ({"prompts": "empty.txt"}, PromptError, "prompts='empty.txt' holds no prompts; add one prompt per line"),
        ({"prompts": "bad.jsonl"}, PromptError, None),
        ({"prompts": "fields.jsonl"}, PromptError,
         "prompts='fields.jsonl' line 2 has no string 'prompt' field; write one object per line like "
         '{"prompt": "Tell me about the sea."}'),
        ({"prompts": [1, 2]}, PromptError, "prompts[0]=1 is not a string; pass a list of strings"),
    ],
)
def test_reward_and_prompt_mistakes_are_reported_before_the_model_loads(
    tiny_dir, tmp_path, monkeypatch, no_model_loads, model, kwargs, error, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "fields.jsonl").write_text('{"prompt": "hi"}\n{"text": "hi"}\n')
    kwargs = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(error, match=None if message is None else exactly(message)):
        TextRLHFEnv(tiny_dir if model == "tiny" else None, **kwargs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"promt": 1}, "reset(options=...) got the unknown key 'promt'; did you mean 'prompt_index'? "
                       "accepted keys: ['prompt_index']"),
        ({"prompt_index": 1, "seed": 3}, "reset(options=...) got the unknown key 'seed'; "
                                         "accepted keys: ['prompt_index']"),
        ({"reset_mask": [True]}, "reset(options=...) got the unknown key 'reset_mask'; "
                                 "accepted keys: ['prompt_index']"),
        (["prompt_index"], "options=['prompt_index'] must be a dict or None; accepted keys: ['prompt_index']"),
        ({"prompt_index": 9}, "options['prompt_index']=9 is not an index in [0, 5)"),
    ],
)
def test_reset_options_are_checked(env, options, message):
    with pytest.raises(ConfigError, match=exactly(message)):
        env.reset(options=options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reset_msk": [True, True]}, "reset(options=...) got the unknown key 'reset_msk'; did you mean "
                                      "'reset_mask'? accepted keys: ['reset_mask', 'prompt_index']"),
        ({"prompt_idx": [0, 1]}, "reset(options=...) got the unknown key 'prompt_idx'; did you mean "
                                 "'prompt_index'? accepted keys: ['reset_mask', 'prompt_index']"),
        ("reset_mask", "options='reset_mask' must be a dict or None; accepted keys: ['reset_mask', 'prompt_index']"),
        ({"prompt_index": 3}, "options['prompt_index']=3 must be 2 ints in [0, 5), one per sub-env"),
        ({"prompt_index": [0, True]}, "options['prompt_index']=[0, True] must be 2 ints in [0, 5), one per sub-env"),
    ],
)
def test_vector_reset_options_are_checked(tiny_dir, options, message):
    vec = TextRLHFVectorEnv(2, tiny_dir, prompts=PROMPTS, max_new_tokens=2)
    with pytest.raises(ConfigError, match=exactly(message)):
        vec.reset(options=options)
    vec.reset(options={"prompt_index": np.array([4, 0])})
