"""A misspelt env keyword names the setting it was probably meant to be, through every way of making the env."""

from __future__ import annotations

import re

import gymnasium as gym
import pytest

import textenv
from textenv.config import UnknownSettingError


@pytest.mark.parametrize("make", [
    lambda d, **kw: gym.make("TextRLHF-v0", model=d, **kw),
    lambda d, **kw: gym.make_vec("TextRLHF-v0", num_envs=2, model=d, **kw),
    lambda d, **kw: textenv.TextRLHFVectorEnv(2, d, **kw),
])
def test_a_misspelt_keyword_gets_did_you_mean(tiny_dir, make):
    with pytest.raises(TypeError, match=re.escape("has no setting 'max_new_token'; did you mean max_new_tokens=?")):
        make(tiny_dir, max_new_token=4)
    with pytest.raises(UnknownSettingError, match="has no setting 'zzz'; the settings are: .*max_new_tokens"):
        make(tiny_dir, zzz=1)
