from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny MLPs run fastest on one thread, and results must not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stop_when_solved():
    """Factory of learn() callbacks that stop once the last 20 training returns average ``threshold``."""

    def make(threshold: float, window: int = 20):
        def callback(agent) -> bool:
            recent = [ret for _, ret, _ in agent.episodes[-window:]]
            return not (len(recent) == window and np.mean(recent) >= threshold)

        return callback

    return make
