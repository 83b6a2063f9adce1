"""LoRA adapters (through ``peft``) on a language-model policy or critic trunk.

Only the adapters train; the base weights stay frozen, so the starting policy is the base model and
the env's KL reference needs no copy of its own (``env.use_lora_reference``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn


def attach_lora(module: nn.Module, lora_config: Any) -> Any:
    """Inject adapters into ``module`` in place; returns the ``peft.PeftModel`` around it.

    ``module`` keeps its identity (the env goes on sampling from the very object), its base weights
    are frozen and the new adapter weights are the only trainable ones. LoRA's B matrices start at
    zero, so the adapted module computes exactly what it computed before.
    """
    try:
        from peft import get_peft_model
    except ModuleNotFoundError as exc:  # pragma: no cover - peft is a dependency
        raise ModuleNotFoundError("PPOConfig(lora_r > 0) needs peft: pip install peft") from exc
    with warnings.catch_warnings():
        # peft asks transformers 5.24 for the renamed `is_gradient_checkpointing`: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            peft_model = get_peft_model(module, copy.deepcopy(lora_config))
        except ValueError as exc:
            raise ValueError(
                f"LoRA could not be applied to {type(module).__name__}: {exc}. Check PPOConfig.lora_target_modules "
                f"(e.g. 'all-linear' or ('q_proj', 'v_proj'))"
            ) from exc
    if peft_model.get_base_model() is not module:  # pragma: no cover - peft's documented behaviour
        raise RuntimeError("peft did not inject the adapters in place")
    return peft_model


def critic_lora_config(lora_config: Any) -> Any:
    """The policy's LoRA settings for a critic trunk (no causal-LM head there)."""
    config = copy.deepcopy(lora_config)
    config.task_type = None
    return config


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should hold: all of them, or the adapters and heads under LoRA."""
    return [p for p in module.parameters() if p.requires_grad]
