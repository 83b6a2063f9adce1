"""The README's two commands are the contract with new users; CI must run the second one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def test_readme_starts_with_an_install_and_run_command_and_a_test_command():
    run, test = readme_commands()
    assert "pip install" in run and run.split("&&")[-1].strip().startswith("python ")
    assert "pip install" in test and test.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines
