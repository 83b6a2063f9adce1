"""Smoke runs of examples/ in a subprocess, with tiny models and budgets (the real runs take minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

from textenv.testing import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{name} {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_rlhf_sentiment_runs_on_a_tiny_model_and_shows_its_noise(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny")
    out = run_example("rlhf_sentiment.py", "--model", str(model), "--minutes", "0.05", "--iterations", "2",
                      "--samples", "20", cwd=tmp_path)
    assert "What the numbers mean:" in out
    assert "sampling 20 completions before training... 16/20 20/20" in out
    assert "before training: mean VADER score " in out and "(95%) over 20 completions" in out
    iterations = [line for line in out.splitlines() if line.startswith("iteration ")]
    assert 1 <= len(iterations) <= 2
    assert all(" min  batch score " in line and " rolling mean " in line and " nats " in line for line in iterations)
    assert "after training: mean VADER score " in out and "a change of " in out
    assert (tmp_path / "runs" / "rlhf").is_dir()
    if find_spec("matplotlib") is not None:  # an [examples] extra, not a [dev] one
        assert (tmp_path / "rlhf_sentiment.png").stat().st_size > 0


def test_cartpole_example_trains_saves_and_reloads(tmp_path):
    out = run_example("cartpole.py", "--total-timesteps", "512", cwd=tmp_path)
    assert "evaluation: " in out and "reloaded from cartpole.pt: step " in out
