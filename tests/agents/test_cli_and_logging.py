"""The CLI, the example script and the TensorBoard metrics, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import PPO, PPOConfig
from agents.train import main, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_TAGS = {
    "charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
    "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
    "losses/clipfrac", "losses/explained_variance",
}


def test_tensorboard_gets_the_usual_metrics(tmp_path):
    agent = PPO("CartPole-v1", PPOConfig(num_envs=2, num_steps=128, num_minibatches=2), logdir=tmp_path)
    agent.learn(1_024, progress=False)
    agent.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert EXPECTED_TAGS <= set(events.Tags()["scalars"])
    steps = [event.step for event in events.Scalars("losses/value_loss")]
    assert steps == [256, 512, 768, 1024]


def test_parse_overrides_reads_literals_and_words():
    parsed = parse_overrides(["learning_rate=1e-3", "hidden_sizes=(32, 32)", "advantage=mc", "norm_obs=True"])
    assert parsed == {"learning_rate": 1e-3, "hidden_sizes": (32, 32), "advantage": "mc", "norm_obs": True}


def test_cli_rejects_an_unknown_key(capsys):
    assert main(["CartPole-v1", "--config", "learnin_rate=1"]) == 2
    assert "unknown PPOConfig key 'learnin_rate'; did you mean 'learning_rate'?" in capsys.readouterr().err


def test_cli_trains_prints_the_preset_and_saves(tmp_path):
    checkpoint = tmp_path / "agent.pt"
    result = subprocess.run(
        [sys.executable, "-m", "agents.train", "CartPole-v1", "--total-timesteps", "512", "--seed", "3",
         "--logdir", str(tmp_path / "runs"), "--save", str(checkpoint), "--eval-episodes", "2",
         "--no-progress", "--config", "update_epochs=2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert '"update_epochs": 2' in result.stdout and '"seed": 3' in result.stdout
    assert "evaluation over 2 episodes" in result.stdout
    assert PPO.load(checkpoint).global_step >= 512


@pytest.mark.parametrize("script,args", [("examples/cartpole.py", ["--total-timesteps", "512"])])
def test_examples_run(tmp_path, script, args):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args, "--checkpoint", str(tmp_path / "c.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "evaluation:" in result.stdout and "reloaded from" in result.stdout


def test_env_kwargs_must_be_keyword_arguments():
    import pytest

    from agents import PPO

    with pytest.raises(ValueError, match=r"env_kwargs=\['max_new_tokens', 32\] must be a dict"):
        PPO("CartPole-v1", env_kwargs=["max_new_tokens", 32])
