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


# ---------------------------------------------------------------------- mistakes: one line, exit 2, nothing trained
@pytest.fixture
def nothing_may_train(monkeypatch):
    """Fail the test if the CLI builds an agent (and so loads a model or trains)."""
    import agents.train

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI built an agent despite a bad command line")

    monkeypatch.setattr(agents.train, "PPO", refuse)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "lr=1e-3"], "error: unknown PPOConfig key 'lr'; did you mean 'learning_rate'?"),
        (["--config", "learning_rate=fast"], "error: PPOConfig.learning_rate='fast' must be a finite number > 0, "
                                             "not a str; e.g. learning_rate=0.0003"),
        (["--config", "hidden_sizes=64"], "error: PPOConfig.hidden_sizes=64 must be a non-empty tuple of positive "
                                          "layer widths, not an int; e.g. hidden_sizes=(64, 64)"),
        (["--config", "gamma=inf"], "error: PPOConfig.gamma='inf' must be a number in [0, 1], not a str; "
                                    "e.g. gamma=0.99"),
        (["--config", "num_steps"], "error: --config 'num_steps' must look like key=value, e.g. learning_rate=3e-4"),
        (["--total-timesteps", "0"], "error: --total-timesteps 0 must be a positive integer, e.g. 1000"),
        (["--total-timesteps", "-5"], "error: --total-timesteps -5 must be a positive integer, e.g. 1000"),
        (["--eval-episodes", "0"], "error: --eval-episodes 0 must be a positive integer, e.g. 1000"),
        (["--num-envs", "0"], "error: PPOConfig.num_envs=0 must be a positive integer; e.g. num_envs=8"),
        (["--seed", "-1"], "error: PPOConfig.seed=-1 must be an integer in [0, 2**32); e.g. seed=0"),
        (["--total-timesteps", "many"], "error: argument --total-timesteps: invalid int value: 'many' "
                                        "(see python -m agents.train --help)"),
        (["--env-kwargs", "max_episode_step=10"], "error: env_kwargs key 'max_episode_step' is not an argument of "
                                                  "CartPole-v1 (gymnasium.envs.classic_control.cartpole:CartPoleEnv); "
                                                  "did you mean 'max_episode_steps'?"),
        (["--env-kwargs", "num_envs=3"], "error: env_kwargs key 'num_envs' is set by PPO: use "
                                         "PPOConfig(num_envs=3) (CLI: --num-envs) instead"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2_before_training(capsys, nothing_may_train, args, message):
    assert main(["CartPole-v1", *args]) == 2
    err = capsys.readouterr().err
    assert err == message + "\n"


def test_cli_refuses_a_directory_as_save_path(capsys, nothing_may_train, tmp_path):
    assert main(["CartPole-v1", "--save", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --save {tmp_path} is a directory")


def test_cli_unknown_env_is_one_line(capsys, nothing_may_train):
    assert main(["CartPole-v2"]) == 2
    assert capsys.readouterr().err.startswith("error: env='CartPole-v2' is not a registered Gymnasium id; "
                                              "did you mean 'CartPole-v1'?")


def test_cli_text_env_kwarg_typo_is_caught_before_loading_a_model(capsys, nothing_may_train, monkeypatch):
    import textenv.models

    monkeypatch.setattr(textenv.models, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["TextRLHF-v0", "--env-kwargs", "max_new_token=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: env_kwargs key 'max_new_token' is not an argument of TextRLHF-v0 "
                          "(textenv.vector:TextRLHFVectorEnv); did you mean 'max_new_tokens'?")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "kwarg,start",
    [("model=/no/such/dir", "error: model='/no/such/dir' does not exist"),
     ("temperature=-1", "error: temperature=-1 must be a finite number > 0")],
)
def test_cli_env_errors_are_one_line_and_exit_2(capsys, kwarg, start):
    assert main(["TextRLHF-v0", "--no-progress", "--env-kwargs", kwarg]) == 2
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1


def test_cli_saves_before_a_failing_evaluation(capsys, monkeypatch, tmp_path):
    def broken_evaluate(self, *args, **kwargs):
        raise ValueError("the evaluation env broke")

    monkeypatch.setattr(PPO, "evaluate", broken_evaluate)
    path = tmp_path / "agent.pt"
    code = main(["CartPole-v1", "--total-timesteps", "256", "--no-progress", "--logdir", str(tmp_path / "runs"),
                 "--save", str(path), "--config", "update_epochs=1"])
    captured = capsys.readouterr()
    assert code == 1 and captured.err == "error: the evaluation env broke\n"
    assert f"checkpoint written to {path}" in captured.out
    assert PPO.load(path).global_step == 256


def test_cli_says_how_the_run_rounds_up_to_whole_rollouts(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(PPO, "learn", lambda self, total, **kwargs: self)
    monkeypatch.setattr(PPO, "evaluate", lambda self, **kwargs: (1.0, 0.0))
    assert main(["CartPole-v1", "--total-timesteps", "300", "--logdir", str(tmp_path)]) == 0
    assert "total_timesteps 300 -> 512 (2 rollouts of 8 envs x 32 steps)\n" in capsys.readouterr().out
    assert main(["CartPole-v1", "--total-timesteps", "512", "--logdir", str(tmp_path)]) == 0
    assert "total_timesteps 512 ->" not in capsys.readouterr().out


def test_whole_episode_rollouts_say_they_stop_at_a_rollout_end():
    from agents.train import rollout_rounding

    config = PPOConfig(num_envs=16, num_steps=32, whole_episodes=True)
    assert rollout_rounding(1000, config) == (
        "total_timesteps 1000 -> whole rollouts of up to 16 envs x 32 steps = 512 steps: at least 2 rollouts, "
        "stopping at the first rollout end at or after step 1000 (episodes that end early count only their own steps)"
    )
