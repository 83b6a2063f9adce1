"""Rewards: built-ins, registry, reward models, weighted components reported one by one."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import textenv
from textenv import KeywordReward, LengthReward, RewardModel, SentimentReward, TextRLHFEnv, TextRLHFVectorEnv
from textenv.errors import ConfigError
from textenv.rewards import build_reward
from textenv.testing import SAMPLE_PROMPTS

PROMPTS = list(SAMPLE_PROMPTS)


def finish(env, words: list[str], prompt_index: int = 3) -> dict:
    """Play `words` as the response of prompt `prompt_index`; return the last info."""
    env.reset(seed=0, options={"prompt_index": prompt_index})
    for word in words:
        *_, info = env.step(env.unwrapped.tokenizer.convert_tokens_to_ids(word))
    return info


def test_sentiment_is_vader_compound_of_the_completion():
    scores = SentimentReward()(["p", "p", "p"], ["I love it, wonderful!", "this is terrible and sad", "a table"])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0


def test_length_and_keyword_rewards():
    assert LengthReward(target=4)(["p"] * 3, ["a b c d", "a b", "a b c d e f g h"]) == [0.0, -0.5, -1.0]
    assert LengthReward(target=5, unit="chars")(["p"], ["abc"]) == [-0.4]
    assert KeywordReward(["sea", "Blue"])(["p"] * 3, ["The SEA is blue.", "seaside", "the sea"]) == [1.0, 0.0, 0.5]
    with pytest.raises(ConfigError, match="keywords='sea' must be a non-empty list"):
        KeywordReward("sea")


def test_default_reward_is_sentiment_in_the_env(tiny_dir):
    env = TextRLHFEnv(tiny_dir, prompts=PROMPTS, max_new_tokens=3)
    info = finish(env, ["happy", "wonderful", "love"])
    expected = SentimentReward()([PROMPTS[3]], ["happy wonderful love"])[0]
    assert info["score"] == info["score/sentiment"] == pytest.approx(expected) and expected > 0.5


def test_registered_reward_by_name_and_reward_kwargs(tiny_dir):
    seen = {}

    def shouty(prompts, completions, *, completion_ids, prompt_ids, eos, **kw):
        seen.update(completion_ids=completion_ids, prompt_ids=prompt_ids, eos=eos)
        return [float(c.count("!")) for c in completions]

    textenv.register_reward("shouty", shouty)
    try:
        assert "shouty" in textenv.list_rewards()
        with pytest.raises(ConfigError, match="a reward named 'shouty' is already registered"):
            textenv.register_reward("shouty", lambda p, c, **k: [0.0] * len(c))
        env = TextRLHFEnv(tiny_dir, prompts=PROMPTS, reward="shouty", max_new_tokens=4)
        info = finish(env, ["good", "!", "!", "<eos>"])
    finally:
        textenv.rewards._REGISTRY.pop("shouty")
    assert info["score/shouty"] == 2.0 and info["eos"] is True
    tok = env.tokenizer
    assert seen == {"completion_ids": [tok.convert_tokens_to_ids(["good", "!", "!"])],
                    "prompt_ids": [tok(PROMPTS[3])["input_ids"]], "eos": [True]}


def test_weighted_components_are_reported_separately(tiny_dir):
    keyword = KeywordReward(["coffee"])
    env = TextRLHFEnv(tiny_dir, prompts=PROMPTS, reward=[("sentiment", 2.0), (keyword, 0.5), "length"],
                      max_new_tokens=2, reward_clip=None)
    info = finish(env, ["great", "coffee"])
    sentiment = SentimentReward()(["x"], ["great coffee"])[0]
    length = LengthReward()(["x"], ["great coffee"])[0]
    assert info["score/sentiment"] == pytest.approx(sentiment) and info["score/keyword"] == 1.0
    assert info["score/length"] == pytest.approx(length)
    assert info["score"] == pytest.approx(2 * sentiment + 0.5 + length)
    as_dict = build_reward({"sentiment": 1.0, "length": 3.0})
    assert [(n, w) for n, _, w in as_dict.components] == [("sentiment", 1.0), ("length", 3.0)]
    twice = build_reward([lambda p, c, **k: [1.0] * len(c), "sentiment", "sentiment"])
    assert twice.names == ("reward_0", "sentiment", "sentiment_2")


def direct_scores(reward_dir: str, texts: list[str]) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    with torch.no_grad():
        # token type ids off: transformers 4.x tokenizers return them and GPT-2 adds an embedding for them
        return [float(model(**tokenizer(t, return_tensors="pt", return_token_type_ids=False)).logits[0, 0])
                for t in texts]


def test_reward_model_path_scores_prompt_plus_completion(tiny_dir, reward_dir):
    vec = TextRLHFVectorEnv(3, tiny_dir, prompts=PROMPTS, reward=reward_dir, max_new_tokens=2, reward_clip=None)
    vec.reset(options={"prompt_index": [0, 3, 2]})
    good, sea = vec.tokenizer.convert_tokens_to_ids(["good", "sea"])
    vec.step(np.array([good, sea, good]))
    _, _, _, _, info = vec.step(np.array([sea, sea, good]))
    name = reward_dir.rsplit("/", 1)[-1]
    texts = [PROMPTS[0] + " good sea", PROMPTS[3] + " sea sea", PROMPTS[2] + " good good"]
    expected = direct_scores(reward_dir, texts)
    np.testing.assert_allclose(info["final_info"][f"score/{name}"], expected, atol=1e-5)
    np.testing.assert_allclose(info["final_info"]["score"], expected, atol=1e-5)
    assert len(set(np.round(expected, 6))) == 3


def test_reward_model_scores_do_not_depend_on_the_batch(reward_dir):
    scorer = RewardModel(reward_dir, batch_size=8)
    texts = ["the sea is blue and calm today", "good", "i like coffee"]
    batched = scorer(texts, [""] * 3)
    alone = [scorer([t], [""])[0] for t in texts]
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_reward_model_reads_the_last_real_token_even_when_it_is_the_pad_id(reward_dir):
    """pad == EOS is common; a text ending in EOS is scored at that EOS, padded or not."""
    module = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    tokenizer.pad_token = tokenizer.eos_token
    module.config.pad_token_id = tokenizer.eos_token_id
    scorer = RewardModel(module, tokenizer)
    text = "the sea is calm" + tokenizer.eos_token
    with torch.no_grad():
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        hidden = module.base_model(input_ids=ids).last_hidden_state[:, -1]
        at_eos = float(module.score(hidden)[0, 0])
    batched = scorer([text, "good"], ["", ""])  # right padded with the EOS id
    assert scorer([text], [""])[0] == pytest.approx(at_eos, abs=1e-5)
    assert batched[0] == pytest.approx(at_eos, abs=1e-5)


def test_reward_model_module_uses_the_env_tokenizer(tiny_dir, reward_dir):
    module = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    env = TextRLHFEnv(tiny_dir, prompts=PROMPTS, reward=module, max_new_tokens=1, reward_clip=None)
    assert not module.training
    info = finish(env, ["calm"])
    assert info["score/reward_model"] == pytest.approx(direct_scores(reward_dir, [PROMPTS[3] + " calm"])[0], abs=1e-5)


def test_reward_model_with_several_labels_needs_label_index(reward_dir):
    config = AutoModelForSequenceClassification.from_pretrained(reward_dir).config
    config.num_labels = 2
    module = AutoModelForSequenceClassification.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    with pytest.raises(ConfigError, match="num_labels=2; pass label_index="):
        RewardModel(module, tokenizer)
    assert len(RewardModel(module, tokenizer, label_index=1)(["a"], ["b"])) == 1


@pytest.mark.parametrize(("num_labels", "label_index"), [(1, 1), (2, 2), (2, -1), (3, True), (2, 1.0)])
def test_reward_model_label_index_out_of_range_fails_at_construction(reward_dir, num_labels, label_index):
    config = AutoModelForSequenceClassification.from_pretrained(reward_dir).config
    config.num_labels = num_labels
    module = AutoModelForSequenceClassification.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    message = (f"label_index={label_index!r} is out of range: the reward model has num_labels={num_labels}; "
               f"pass an integer in [0, {num_labels}) naming the logit that is the score")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        RewardModel(module, tokenizer, label_index=label_index)


def test_reward_model_with_a_tokenizer_larger_than_its_embeddings(tiny_dir, reward_dir):
    module = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    module.resize_token_embeddings(50)
    message = ("the reward model's tokenizer has 57 tokens but the reward model embeds only 50; pass the "
               "tokenizer the reward model was trained with, e.g. RewardModel(model, tokenizer)")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        TextRLHFEnv(tiny_dir, prompts=PROMPTS, reward=module)  # scored with the env's tokenizer


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, "batch_size=0 must be an integer >= 1, e.g. batch_size=32"),
    ({"separator": None}, "separator=None must be a string, e.g. separator=' '"),
])
def test_reward_model_settings_are_checked(reward_dir, kwargs, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        RewardModel(reward_dir, **kwargs)
