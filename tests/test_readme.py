"""The README is the contract with new users: its two commands, and every code block run as written.

Each ```python block and each ``python -m agents.train`` line of the ```bash blocks runs in a fresh
interpreter in a temporary directory, through a small runner that caps the training budget without
touching the block's text: ``PPO.learn`` stops after one rollout (two for classic control) with one
update epoch (the blocks' own budgets are for real runs), and the train commands get a small
``--total-timesteps`` and ``--eval-episodes``. Blocks on the embedded SmolLM2 are marked slow.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# `python runner.py block.py` or `python runner.py -m agents.train ...`: the script or module with
# PPO.learn capped; one rollout + one epoch on SmolLM2 is ~15 s on 2 cores instead of ~35 s
RUNNER = """\
import runpy, sys
from agents import PPO
from agents.config import replace

learn = PPO.learn

def capped_learn(self, total_timesteps, *, callback=None, **kwargs):
    rollouts = 1 if self.config.whole_episodes else 2
    start = self.iteration
    self.config = replace(self.config, update_epochs=1)

    def stop(agent):
        if callback is not None and callback(agent) is False:
            return False
        return agent.iteration - start < rollouts

    return learn(self, total_timesteps, callback=stop, **kwargs)

PPO.learn = capped_learn
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", README)[:2]


def python_blocks() -> dict[str, str]:
    """Each ```python block's code, by where it starts: ``"README.md:40"``."""
    found = re.finditer(r"```python\n(.*?)\n```", README, re.S)
    return {f"README.md:{README.count(chr(10), 0, match.start()) + 2}": match.group(1) for match in found}


def train_commands() -> list[str]:
    """The ``python -m agents.train ...`` lines of the README's ```bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("python -m agents.train")]


def small_budget(command: str) -> list[str]:
    """The command's arguments with one rollout's worth of timesteps and one evaluation episode."""
    args = shlex.split(command)
    args[args.index("--total-timesteps") + 1] = "1"
    return [*args[1:], "--eval-episodes", "1", "--no-progress"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python runner.py *args`` in ``cwd``, with the repository importable and no network."""
    (cwd / "runner.py").write_text(RUNNER)
    env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "runner.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # a hang guard: a loaded 2-core machine takes minutes
    assert done.returncode == 0, f"python {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def uses_smollm2(code: str) -> bool:
    return "TextRLHF" in code


def test_readme_starts_with_an_install_and_run_command_and_a_test_command():
    run_command, test_command = readme_commands()
    assert "pip install" in run_command and run_command.split("&&")[-1].strip().startswith("python ")
    assert "pip install" in test_command and test_command.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_readme_has_the_blocks_this_file_runs():
    assert len(python_blocks()) >= 4
    assert {"CartPole-v1", "TextRLHF-v0"} <= {command.split()[3] for command in train_commands()}


@pytest.mark.parametrize(
    "code",
    [pytest.param(code, id=where, marks=[pytest.mark.slow] if uses_smollm2(code) else [])
     for where, code in python_blocks().items()],
)
def test_readme_python_block_runs_as_written(code, tmp_path):
    (tmp_path / "block.py").write_text(code)
    run(["block.py"], tmp_path)


@pytest.mark.parametrize(
    "command",
    [pytest.param(command, id=command.split()[3], marks=[pytest.mark.slow] if uses_smollm2(command) else [])
     for command in train_commands()],
)
def test_readme_train_command_runs(command, tmp_path):
    done = run(small_budget(command), tmp_path)
    assert "evaluation over 1 episodes" in done.stdout
