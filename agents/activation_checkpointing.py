"""Activation (gradient) checkpointing for the update forward of a language-model policy.

transformers recomputes a decoder block in the backward only while that block is in training
mode, but the policy stays in eval mode so that dropout never changes the function PPO compares.
So the blocks' own ``training`` flag is raised only around the forward with gradients, and their
submodules stay in eval mode: recomputation without dropout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def checkpointed_blocks(models: list[nn.Module]) -> list[nn.Module]:
    """Turn on transformers' checkpointing in each model; return the decoder blocks it recomputes."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks: list[nn.Module] = []
    for model in models:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"PPOConfig.gradient_checkpointing=True, but {type(model).__name__} does not support activation "
                "checkpointing in transformers: set gradient_checkpointing=False"
            )
        # non-reentrant: works when only LoRA adapters (not the inputs) require gradients
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        blocks += [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not blocks:
        raise ValueError(
            "PPOConfig.gradient_checkpointing=True, but the policy has no decoder blocks that transformers "
            "checkpoints: set gradient_checkpointing=False"
        )
    return blocks


@contextmanager
def blocks_recomputed(blocks: list[nn.Module]) -> Iterator[None]:
    """Mark only the blocks themselves as training (what transformers checks), nothing inside them."""
    before = [block.training for block in blocks]
    for block in blocks:
        block.__dict__["training"] = True  # not .train(): that would switch dropout on in the children
    try:
        yield
    finally:
        for block, was in zip(blocks, before, strict=True):
            block.__dict__["training"] = was
