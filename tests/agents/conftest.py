from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def stop_when_solved():
    """Factory of learn() callbacks that stop once the last 20 training returns average ``threshold``."""

    def make(threshold: float, window: int = 20):
        def callback(agent) -> bool:
            recent = [ret for _, ret, _ in agent.episodes[-window:]]
            return not (len(recent) == window and np.mean(recent) >= threshold)

        return callback

    return make
