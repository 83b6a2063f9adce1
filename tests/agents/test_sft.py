"""agents.sft: completion-only loss, the env's prompt formatting, bucketing, resume, data errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import pytest
import torch

import textenv  # noqa: F401  registers TextRLHF-v0
from agents import sft
from agents.finetune import bucket_batches
from agents.text_data import DataError, load_demonstrations
from textenv.prompts import PromptSet
from textenv.testing import CHAT_TEMPLATE, make_tiny_model_dir

TOPICS = ("sea", "sun", "rain", "dog", "cat", "bread", "coffee", "garden", "city", "music")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("sft") / "base", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    records = [{"prompt": f"write one sentence about the {t} .", "completion": f"the {t} is calm and nice ."}
               for t in TOPICS]
    records.append({"messages": [{"role": "user", "content": "i like coffee"},
                                 {"role": "assistant", "content": "coffee is warm ."}]})
    return write_jsonl(tmp_path_factory.mktemp("data") / "demos.jsonl", records)


def tiny(**overrides) -> sft.SFTConfig:
    settings = {"learning_rate": 3e-3, "batch_size": 4, "num_epochs": 30, "warmup_steps": 0, "save_steps": 5,
                "disable_dropout": False}
    return sft.SFTConfig(**(settings | overrides))


def test_sft_lowers_the_loss_and_saves_a_model_the_env_loads(base, demos, tmp_path):
    metrics = sft.train(base, demos, output_dir=tmp_path / "out", config=tiny(max_steps=40), eval_data=demos,
                        progress=False)
    assert metrics["steps"] == 40 and metrics["stopped"] == "max_steps"
    assert metrics["eval_loss"] < 0.5 * metrics["eval_loss_before"]
    assert list((tmp_path / "out" / "runs").glob("events.out.tfevents.*"))
    env = gym.make("TextRLHF-v0", model=str(tmp_path / "out"), reward="length", max_new_tokens=4)
    env.reset(seed=0)
    env.close()


def test_prompt_ids_are_the_envs_and_completions_end_with_eos(base, demos):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    records = load_demonstrations(demos)
    encoded = sft.encode(records, tokenizer, config=sft.SFTConfig(), eos_id=tokenizer.eos_token_id)
    env_ids = PromptSet.build([r.prompt for r in records], tokenizer, max_prompt_tokens=64).token_ids
    for example, prompt_ids, record in zip(encoded, env_ids, records, strict=True):
        assert example.ids[: example.prompt_length] == prompt_ids
        answer = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
        assert list(example.ids[example.prompt_length :]) == [*answer, tokenizer.eos_token_id]


def test_prompt_tokens_carry_no_loss():
    examples = [sft.Encoded((5, 6, 7, 8, 9), 3), sft.Encoded((5, 6, 10), 1)]
    batch = sft.collate(examples, pad_id=0)
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 6, 10, -100, -100]]
    logits = torch.randn(2, 5, 12, requires_grad=True)
    sft.sft_loss(logits, batch["labels"]).backward()
    # the logit at t predicts token t + 1: only positions whose next token is a completion token get gradient
    has_grad = logits.grad.abs().sum(-1) > 0
    assert has_grad.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]
    expected = torch.nn.functional.cross_entropy(
        torch.stack([logits[0, 2], logits[0, 3], logits[1, 0], logits[1, 1]]), torch.tensor([8, 9, 6, 10])
    )
    assert torch.allclose(sft.sft_loss(logits, batch["labels"]), expected)


def test_length_bucketing_groups_similar_lengths_deterministically():
    lengths = [int(x) for x in torch.randint(1, 100, (256,), generator=torch.Generator().manual_seed(0))]
    batches = bucket_batches(lengths, batch_size=8, bucket_size=32, seed=3)
    assert batches == bucket_batches(lengths, batch_size=8, bucket_size=32, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(256))
    padded = sum(8 * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # unbucketed batches of 8 pad to ~1.8x here


def test_resume_gives_the_same_weights(base, demos, tmp_path):
    whole = tmp_path / "whole"
    sft.train(base, demos, output_dir=whole, config=tiny(max_steps=8, disable_dropout=False), progress=False)
    part = tmp_path / "part"
    sft.train(base, demos, output_dir=part, config=tiny(max_steps=3), progress=False)
    metrics = sft.train(base, demos, output_dir=part, config=tiny(max_steps=8), resume=True, progress=False)
    assert metrics["steps"] == 8 and len(metrics["history"]) == 8
    a = torch.load(whole / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "hi"}', "field 'completion' must be a non-empty string, got missing"),
        ('{"prompt": 3, "completion": "x"}', "field 'prompt' must be a non-empty string, got 3"),
        ('{"prompt": "hi", "completion": "x"', "not valid JSON"),
        ('["hi"]', "expected a JSON object, got list"),
        ('{"text": "hi"}', "expected fields 'prompt' and 'completion' (or 'messages'), got ['text']"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}',
         "the last message must be a non-empty 'assistant' answer"),
        ('{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
         "messages[0] must be {'role': one of ['system', 'user', 'assistant'], 'content': str}"),
    ],
)
def test_malformed_records_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_demonstrations(path)
    assert str(error.value).startswith(f"{path}:3: ")
    assert message in str(error.value)


def test_cli_trains_and_reports_bad_input(base, demos, tmp_path, capsys):
    out = tmp_path / "cli"
    code = sft.main([str(base), str(demos), "--output", str(out), "--no-progress",
                     "--config", "max_steps=2", "batch_size=2"])
    printed = capsys.readouterr().out
    assert code == 0 and '"max_steps": 2' in printed and (out / "config.json").is_file()
    assert sft.main([str(base), str(demos), "--output", str(out), "--config", "max_step=2"]) == 2
    expected = "error: --config key 'max_step' is not a SFTConfig field; did you mean 'max_steps'?"
    assert expected in capsys.readouterr().err
    assert sft.main([str(base), str(tmp_path / "none.jsonl"), "--output", str(out)]) == 2
    missing = str(tmp_path / "none.jsonl")
    assert capsys.readouterr().err.strip() == f"error: data file {missing!r} does not exist; check the path"
