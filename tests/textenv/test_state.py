"""Checkpointable env state: a restored env continues exactly like the uninterrupted one."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from textenv import AdaptiveKLController, ConfigError, TextRLHFEnv, TextRLHFVectorEnv
from textenv.errors import ResetNeeded
from textenv.testing import DEFAULT_VOCAB, SAMPLE_PROMPTS, make_tiny_model_dir

PROMPTS = list(SAMPLE_PROMPTS)
MAX_NEW = 4
EOS = 1  # the tiny tokenizer's <eos>


def settings(**overrides):
    """Env kwargs with an adaptive controller (so its state matters) and a non-zero KL penalty."""
    kwargs = dict(prompts=PROMPTS, max_new_tokens=MAX_NEW, kl_estimator="k3",
                  kl_coef=AdaptiveKLController(0.5, target=0.01, horizon=5))
    kwargs.update(overrides)
    return kwargs


def actions(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """Random tokens with an EOS now and then, so episodes end at different steps."""
    tokens = rng.integers(4, vocab, size=n)
    tokens[rng.random(n) < 0.25] = EOS
    return tokens


def perturb(model: torch.nn.Module, seed: int) -> None:
    """A small in-place change of every weight, as a PPO update makes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def assert_same(a, b, path: str = "") -> None:
    """Equal structure, exact ids / flags / strings, floats within 1e-5."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=path)
    elif isinstance(a, (np.ndarray, float, np.floating)) and np.asarray(a).dtype.kind == "f":
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=path)
    elif isinstance(a, np.ndarray) and a.dtype == object:
        assert a.shape == b.shape, path
        for i, (x, y) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and np.array_equal(a, b), (path, a, b)


def assert_same_state(a, b) -> None:
    """What an agent reads between steps."""
    for name in ("next_logprobs", "next_hidden", "current_obs", "kl_coef"):
        assert_same(getattr(a, name), getattr(b, name), name)


def restored(cls, tiny_dir: str, original, state: dict, **kwargs):
    """A fresh env from the same model dir, given the original's policy weights, then the state."""
    env = cls(*kwargs.pop("args", ()), tiny_dir, **settings(**kwargs))
    env.model.load_state_dict(original.model.state_dict())
    env.load_state_dict(state)
    return env


def step_counting(env, step: np.ndarray, forwards: list) -> tuple[tuple, int]:
    """env.step(step), and how many reference forwards it ran (`forwards` is filled by a hook)."""
    forwards.clear()
    return env.step(step), len(forwards)


def assert_plain(value, path: str = "state") -> None:
    """Only plain data: no tensors, modules or generators."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), path
            assert_plain(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            assert_plain(item, f"{path}[{i}]")
    else:
        assert value is None or isinstance(value, (bool, int, float, str, np.ndarray, np.generic)), (path, value)


@pytest.mark.parametrize(
    ("update", "arch"),
    [("none", "gpt2"), ("early", "gpt2"), ("before_save", "gpt2"), ("after_save", "gpt2"), ("reverted", "gpt2"),
     ("before_save", "llama")],
)
def test_restored_vector_env_continues_like_the_uninterrupted_one(tiny_dir, llama_dir, update, arch):
    """`update`: when the policy moves away from the reference (a PPO update) relative to the save."""
    num_envs, rng = 3, np.random.default_rng(0)
    source = tiny_dir if arch == "gpt2" else llama_dir
    a = TextRLHFVectorEnv(num_envs, source, **settings())
    a.reset(seed=7)
    if update in ("early", "reverted"):  # the reference runs its own forwards from here on
        perturb(a.model, seed=1)
        a.step(actions(rng, num_envs, a.single_action_space.n))
    if update == "reverted":  # equal weights again, yet the reference keeps its own forwards
        a.model.load_state_dict(a.ref_model.state_dict())
    vocab, finished = a.single_action_space.n, 0
    for _ in range(5):
        finished += int(a.step(actions(rng, num_envs, vocab))[2].sum())
    lengths = [len(r) for r in a._engine.responses]
    assert finished > 0 and any(0 < n < MAX_NEW for n in lengths), (finished, lengths)
    if update == "before_save":  # rollout, update, save: the env has not looked at the weights yet
        perturb(a.model, seed=1)
    state = a.state_dict()
    assert_plain(state)
    assert state["engine"]["mirror"] is (update not in ("early", "reverted"))

    b = restored(TextRLHFVectorEnv, source, a, state, args=(num_envs,))
    # the mirror is re-checked on load: weights that differ give the reference its own forwards
    assert (b._engine.ref.mirror is None) is (update != "none" and update != "after_save")
    assert_same_state(a, b)
    if update == "after_save":  # the same update in both, as a resumed PPO run makes it
        perturb(a.model, seed=2)
        perturb(b.model, seed=2)
    ref_forwards = []
    a.ref_model.base_model.register_forward_pre_hook(lambda *_: ref_forwards.append(1))
    assert b.ref_model is a.ref_model  # loaded from the same path once per process
    kl_seen = []
    for _ in range(2 * MAX_NEW):
        step = actions(rng, num_envs, vocab)
        out_a, forwards_a = step_counting(a, step, ref_forwards)
        out_b, forwards_b = step_counting(b, step, ref_forwards)
        assert_same(out_a, out_b, "step")
        assert forwards_a == forwards_b  # the reference runs the same forwards (none while mirrored)
        assert_same_state(a, b)
        kl_seen.append(np.abs(out_a[4].get("kl", np.zeros(1))).max())
    assert a.kl_controller.state_dict() == pytest.approx(b.kl_controller.state_dict())
    if update != "reverted":  # (two equal copies' own forwards may round differently)
        assert bool(max(kl_seen) == 0) is (update == "none")  # mirrored: exactly 0


def test_restored_single_env_continues_mid_episode_and_draws_the_same_prompts(tiny_dir):
    a = TextRLHFEnv(tiny_dir, **settings())
    a.reset(seed=3)
    perturb(a.model, seed=1)
    a.step(9)
    b = restored(TextRLHFEnv, tiny_dir, a, a.state_dict())
    assert_same_state(a, b)
    rng = np.random.default_rng(1)
    for _ in range(3):  # finish the episode, then new ones drawn from the restored np_random
        done = False
        while not done:
            token = int(actions(rng, 1, a.action_space.n)[0])
            out_a, out_b = a.step(token), b.step(token)
            assert_same(out_a, out_b, "step")
            done = out_a[2]
        assert_same_state(a, b)
        assert_same(a.reset(), b.reset(), "reset")
    assert a.kl_coef == pytest.approx(b.kl_coef) and a.kl_coef != 0.5


def test_single_env_state_between_episodes_and_before_reset(tiny_dir):
    a = TextRLHFEnv(tiny_dir, **settings())
    fresh = restored(TextRLHFEnv, tiny_dir, a, a.state_dict())
    assert fresh.next_logprobs is None and fresh.current_obs is None
    with pytest.raises(ResetNeeded):
        fresh.step(9)
    a.reset(seed=0)
    a.step(EOS)
    b = restored(TextRLHFEnv, tiny_dir, a, a.state_dict())
    assert b.next_logprobs is None and b.np_random_seed == a.np_random_seed == 0
    with pytest.raises(ResetNeeded, match="after the episode ended"):
        b.step(9)
    assert_same(a.reset(), b.reset(), "reset")
    assert_same_state(a, b)


def test_state_survives_pickle_and_torch_save(tiny_dir):
    a = TextRLHFVectorEnv(2, tiny_dir, **settings())
    a.reset(seed=1)
    perturb(a.model, seed=3)
    a.step(np.array([9, EOS]))
    state = a.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    for copy in (pickle.loads(pickle.dumps(state)), torch.load(buffer, weights_only=False)):
        assert_same(copy, state, "state")
        b = restored(TextRLHFVectorEnv, tiny_dir, a, copy, args=(2,))
        assert_same_state(a, b)
    a.step(np.array([9, 9]))  # the saved state is a copy, not a view of the live one
    assert_same(pickle.loads(pickle.dumps(state)), state, "state")
    assert state["engine"]["responses"] != a._engine.responses


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_envs": 3}, "num_envs=2"),
        ({"max_new_tokens": MAX_NEW + 1}, "max_new_tokens=4"),
        ({"max_prompt_tokens": 32}, "max_prompt_tokens=64"),
        ({"prompts": PROMPTS[:-1]}, "same prompts"),
        ({"chat_template": False, "model": "chat"}, "same prompts"),
        ({"model": "small_vocab"}, "vocab_size=57"),
        ({"model": "other_weights"}, "same starting model"),
    ],
)
def test_state_from_another_configuration_is_refused(tiny_dir, chat_dir, tmp_path, overrides, message):
    model = overrides.pop("model", None)
    source = chat_dir if model == "chat" else tiny_dir
    a = TextRLHFVectorEnv(2, source, **settings())
    a.reset(seed=0)
    state = a.state_dict()
    if model == "small_vocab":
        model = str(make_tiny_model_dir(tmp_path / "small", vocab=DEFAULT_VOCAB[:-3]))
    elif model == "other_weights":
        model = str(make_tiny_model_dir(tmp_path / "other", seed=1))
    else:
        model = source
    b = TextRLHFVectorEnv(overrides.pop("num_envs", 2), model, **settings(**overrides))
    b.reset(seed=5)
    before = b.current_obs
    with pytest.raises(ConfigError, match=message):
        b.load_state_dict(state)
    assert_same(b.current_obs, before, "obs")  # a refused state changes nothing


def test_malformed_state_names_the_problem(tiny_dir):
    a = TextRLHFVectorEnv(2, tiny_dir, **settings())
    a.reset(seed=0)
    single = TextRLHFEnv(tiny_dir, **settings())
    single.reset(seed=0)
    with pytest.raises(ConfigError, match="saved by a TextRLHFEnv, not a TextRLHFVectorEnv"):
        a.load_state_dict(single.state_dict())
    for where, key in [((), "rngs"), (("engine",), "kl_sum"), (("engine",), "token_ids"),
                       (("engine", "config"), "prompts")]:
        state = a.state_dict()
        parent = state
        for step in where:
            parent = parent[step]
        del parent[key]
        with pytest.raises(ConfigError, match=f"missing key '{key}'"):
            a.load_state_dict(state)
    state = a.state_dict()
    state["engine"]["obs_ids"] = state["engine"]["obs_ids"][:, 1:]
    with pytest.raises(ConfigError, match=r"'obs_ids'\] has shape"):
        a.load_state_dict(state)
    state = a.state_dict()
    state["engine"]["kl_controller"] = {}
    with pytest.raises(ConfigError, match="kl_controller"):
        a.load_state_dict(state)
    with pytest.raises(ConfigError, match="must be the dict"):
        a.load_state_dict([1, 2])
