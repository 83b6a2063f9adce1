"""agents.reward_model: pairwise and K-way losses, scoring at the last real token, held-out accuracy,
the saved directory in the env (reward=dir) and as PPO's critic (critic_model=dir), resume, errors, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import pytest
import torch

import textenv  # noqa: F401  registers TextRLHF-v0
from agents import PPO, PPOConfig, reward_model
from agents.text_data import Comparison, DataError, load_comparisons
from textenv.testing import make_tiny_model_dir

TOPICS = ("sea", "sun", "rain", "dog", "cat", "bread", "coffee", "garden", "city", "music", "friend", "morning")
GOOD = ("good", "great", "happy", "wonderful", "nice")
BAD = ("bad", "sad", "terrible", "awful", "cold")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def toy_preferences(topics: tuple[str, ...]) -> list[dict]:
    """Separable: the chosen answer calls the topic one of GOOD, the rejected one of BAD; some 3-way rankings."""
    records = []
    for t in topics:
        prompt = f"write one sentence about the {t} ."
        for j, (good, bad) in enumerate(zip(GOOD, BAD, strict=True)):
            records.append({"prompt": prompt, "chosen": f"the {t} is {good}", "rejected": f"the {t} is {bad}"})
            if j < 2:
                records.append({"prompt": prompt, "ranked": [f"the {t} is {good}", f"the {t} is so {good}",
                                                             f"the {t} is {bad}"][:: 1 if j else 1]})
    return records


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("rm")
    base = make_tiny_model_dir(root / "base")
    train = write_jsonl(root / "prefs.jsonl", toy_preferences(TOPICS[:9]))
    held = write_jsonl(root / "held.jsonl", toy_preferences(TOPICS[9:]))
    config = reward_model.RewardModelConfig(learning_rate=3e-3, num_epochs=6, warmup_steps=0, batch_size=4)
    metrics = reward_model.train(base, train, output_dir=root / "out", config=config, eval_data=held, progress=False)
    return base, root / "out", metrics


def test_pairwise_loss_is_the_hand_computed_value():
    scores = torch.tensor([1.5, -0.5])
    expected = -math.log(1 / (1 + math.exp(-2.0)))
    assert reward_model.ranking_loss(scores, [2]).item() == pytest.approx(expected)


def test_k_way_loss_averages_all_pairs_per_prompt_then_prompts():
    # prompt 1: ranking of 3 (3 pairs), prompt 2: a pair
    scores = torch.tensor([2.0, 0.0, 1.0, 0.3, 0.8])
    nll = lambda d: math.log(1 + math.exp(-d))  # noqa: E731  -log sigmoid(d)
    first = (nll(2.0 - 0.0) + nll(2.0 - 1.0) + nll(0.0 - 1.0)) / 3
    second = nll(0.3 - 0.8)
    assert reward_model.ranking_loss(scores, [3, 2]).item() == pytest.approx((first + second) / 2)
    assert reward_model.pair_margins(scores, [3, 2]).tolist() == pytest.approx([2.0, 1.0, -1.0, -0.5])
    assert Comparison("p", ("a", "b", "c", "d")).pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_separable_preferences_reach_95_percent_held_out(trained):
    _, _, metrics = trained
    assert metrics["eval_accuracy"] >= 0.95
    assert metrics["eval_margin"] > 0
    assert metrics["eval_pairs"] == 3 * 5 + 3 * 2 * 3  # held-out topics: 5 pairs + 2 rankings of 3 each
    assert metrics["train_loss_last"] < metrics["train_loss_first"]


def test_score_is_read_at_the_last_real_token_whatever_the_padding(trained):
    _, out, _ = trained
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.tensor([[10, 11, 12, 13], [10, 11, 0, 0]])
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left_ids = torch.tensor([[10, 11, 12, 13], [0, 0, 10, 11]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    # a row ending in the pad id: the mask, not the id, says it is real
    pad_end = torch.tensor([[10, 11, 0]])
    with torch.no_grad():
        a = reward_model.sequence_scores(model, ids, right)
        b = reward_model.sequence_scores(model, left_ids, left)
        alone = reward_model.sequence_scores(model, ids[1:, :2], right[1:, :2])
        ends_in_pad = reward_model.sequence_scores(model, pad_end, torch.ones_like(pad_end))
        direct = model.score(model.base_model(input_ids=pad_end).last_hidden_state[:, -1]).squeeze(-1)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a[1:], alone, atol=1e-5)
    assert torch.allclose(ends_in_pad, direct, atol=1e-5)


def test_env_reads_the_same_score_and_prefers_the_chosen_side(trained):
    base, out, _ = trained
    env = gym.make("TextRLHF-v0", model=str(base), reward=str(out), max_new_tokens=4)
    prompts = ["write one sentence about the music .", "write one sentence about the morning ."]
    chosen = ["the music is great", "the morning is happy"]
    rejected = ["the music is awful", "the morning is sad"]
    env_chosen, _ = env.unwrapped.reward_fn(prompts, chosen)
    env_rejected, _ = env.unwrapped.reward_fn(prompts, rejected)
    env.close()
    assert (env_chosen > env_rejected).all()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    data = reward_model.Tokenised([Comparison(p, (c, r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)],
                                  tokenizer, max_length=256)
    with torch.no_grad():
        ours = reward_model.sequence_scores(model, *data.batch([0, 1])[:2])
    assert ours[0::2].tolist() == pytest.approx(env_chosen.tolist(), abs=1e-5)
    assert ours[1::2].tolist() == pytest.approx(env_rejected.tolist(), abs=1e-5)


def test_a_critic_from_the_reward_model_starts_from_its_weights(trained):
    base, out, _ = trained
    envs = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(base), reward=str(out), max_new_tokens=4)
    agent = PPO(envs, PPOConfig(critic="separate", critic_model=str(out), num_envs=2, num_steps=4))
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(out)
    expected = rm.base_model.state_dict()
    got = agent.policy.critic_trunk.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # the value head is the RM's score head: before training, the critic's value is the RM score
    assert torch.equal(agent.policy.value_head.weight, rm.score.weight)
    obs, _ = envs.reset(seed=0)
    with torch.no_grad():
        values = agent.policy.value(agent.policy.preprocess(obs))
        scores = reward_model.sequence_scores(rm, torch.as_tensor(obs["input_ids"]),
                                              torch.as_tensor(obs["attention_mask"]))
    assert values.tolist() == pytest.approx(scores.tolist(), abs=1e-5)
    assert values.abs().max() > 0
    agent.close()


def test_resume_gives_the_same_weights(tmp_path):
    base = make_tiny_model_dir(tmp_path / "base")
    data = write_jsonl(tmp_path / "prefs.jsonl", toy_preferences(TOPICS))
    settings = {"learning_rate": 1e-3, "batch_size": 3, "warmup_steps": 2, "save_steps": 2, "disable_dropout": False}
    reward_model.train(base, data, output_dir=tmp_path / "whole", progress=False,
                       config=reward_model.RewardModelConfig(max_steps=6, **settings))
    reward_model.train(base, data, output_dir=tmp_path / "part", progress=False,
                       config=reward_model.RewardModelConfig(max_steps=3, **settings))
    metrics = reward_model.train(base, data, output_dir=tmp_path / "part", progress=False, resume=True,
                                 config=reward_model.RewardModelConfig(max_steps=6, **settings))
    assert metrics["steps"] == 6
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "chosen": "a"}', "field 'rejected' must be a non-empty string, got missing"),
        ('{"prompt": "p", "chosen": "a", "rejected": ""}', "field 'rejected' must be a non-empty string, got ''"),
        ('{"prompt": "p", "ranked": ["a"]}', "field 'ranked' must be a list of >= 2 non-empty strings, best first"),
        ('{"prompt": "p", "ranked": ["a", "a"]}', "the answers to compare must differ"),
        ('{"prompt": "p", "answer": "a"}', "expected fields 'chosen' and 'rejected', or 'ranked' (best first)"),
        ('{"chosen": "a", "rejected": "b"}', "field 'prompt' must be a non-empty string, got missing"),
    ],
)
def test_malformed_records_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_comparisons(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


def test_cli_trains_and_reports_bad_input(trained, tmp_path, capsys):
    base, _, _ = trained
    data = write_jsonl(tmp_path / "prefs.jsonl", toy_preferences(TOPICS[:4]))
    code = reward_model.main([str(base), str(data), "--output", str(tmp_path / "o"), "--no-progress",
                              "--config", "max_steps=2", "eval_fraction=0.25"])
    printed = capsys.readouterr().out
    assert code == 0 and '"eval_fraction": 0.25' in printed and "held-out accuracy" in printed
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n', encoding="utf-8")
    assert reward_model.main([str(base), str(bad), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {bad}:1: field 'rejected' must be a non-empty string, got missing"
    )
    assert reward_model.main([str(tmp_path / "nowhere"), str(data), "--output", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_pipeline_example_runs_end_to_end_on_a_tiny_model(tmp_path):
    import subprocess
    import sys

    from textenv.testing import CHAT_TEMPLATE

    base = make_tiny_model_dir(tmp_path / "base", chat_template=CHAT_TEMPLATE)
    example = Path(__file__).resolve().parents[2] / "examples" / "instructgpt_pipeline.py"
    budget = ["--sft-minutes", "0.02", "--rm-minutes", "0.02", "--ppo-minutes", "0.02", "--samples", "16"]
    done = subprocess.run(
        [sys.executable, str(example), "--model", str(base), "--workdir", str(tmp_path / "run"),
         "--plot", str(tmp_path / "pipeline.png"), *budget],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out pairwise accuracy" in done.stdout and "after PPO: mean RM score" in done.stdout
    assert (tmp_path / "pipeline.png").is_file()
