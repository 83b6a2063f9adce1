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


def checkpointed_blocks(models: list[nn.Module], fraction: float = 1.0) -> list[nn.Module]:
    """Turn on transformers' checkpointing in each model; return the decoder blocks it recomputes.

    ``fraction``: the share of each model's blocks recomputed, the first ones (at least one). The
    others keep their activations from the forward to the backward: more memory, less compute.
    """
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
        own = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        kept = max(1, round(fraction * len(own)))
        for block in own[kept:]:
            block.gradient_checkpointing = False
        blocks += own[:kept]
    if not blocks:
        raise ValueError(
            "PPOConfig.gradient_checkpointing=True, but the policy has no decoder blocks that transformers "
            "checkpoints: set gradient_checkpointing=False"
        )
    return blocks


def blocks_keep_read_only_caches() -> bool:
    """Whether this transformers lets a checkpointed block keep a cache it only reads.

    Older releases drop every cache in a checkpointed block; an update forward then runs whole rows.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    return hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


@contextmanager
def blocks_recomputed(blocks: list[nn.Module], *, read_only_cache: bool = False) -> Iterator[None]:
    """Mark only the blocks themselves as training (what transformers checks), nothing inside them.

    ``read_only_cache``: the forward passes a cache the blocks only read (a ``ReadOnlyPrefixCache``),
    which the recomputation in the backward can read again, so the blocks keep it.
    """
    before = [block.training for block in blocks]
    for block in blocks:
        block.__dict__["training"] = True  # not .train(): that would switch dropout on in the children
        if read_only_cache:
            block.__dict__["_can_checkpoint_with_cache"] = True
    try:
        yield
    finally:
        for block, was in zip(blocks, before, strict=True):
            block.__dict__["training"] = was
            block.__dict__.pop("_can_checkpoint_with_cache", None)
