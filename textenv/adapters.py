"""The KL reference of a LoRA policy: the policy itself with its adapters switched off.

With LoRA the trained weights are small adapters on frozen base weights, and the starting policy
is exactly the base model. So the reference needs no second copy of the weights: the env runs the
policy's own modules with the adapters disabled (peft's `disable_adapter()`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

__all__ = ["AdapterReference"]


class AdapterReference(nn.Module):
    """`env.ref_model` of a LoRA policy: a view of the policy with adapters off, holding no weights.

    `peft_model` is the `peft.PeftModel` whose base (`get_base_model()`) is the env's policy. The
    policy is not registered as a submodule, so `parameters()` is empty and nothing is counted,
    saved or frozen twice; `forward` is the base model's forward.

    `mixed_batches`: the env scores policy and reference in one forward (peft's per-row adapter
    names; the base weights are read once for both) instead of two; off, the reference runs its own
    forwards under `disable_adapter()`. Both compute the same distributions.
    """

    def __init__(self, peft_model: Any, *, mixed_batches: bool = True) -> None:
        super().__init__()
        if not callable(getattr(peft_model, "disable_adapter", None)) or not hasattr(peft_model, "get_base_model"):
            raise TypeError(f"AdapterReference needs a peft.PeftModel, got {type(peft_model).__name__}")
        self.__dict__["peft_model"] = peft_model  # a view: not a submodule
        self.mixed_batches = mixed_batches

    @property
    def adapter_name(self) -> str | None:
        """The one active adapter (None when several are active: no mixed batches then)."""
        active = getattr(self.peft_model, "active_adapter", None)
        return active if isinstance(active, str) else None

    @property
    def policy(self) -> nn.Module:
        """The LoRA-injected causal LM the env samples from."""
        return self.peft_model.get_base_model()

    @property
    def config(self) -> Any:
        return self.policy.config

    def adapters_off(self) -> AbstractContextManager:
        """Context in which the policy's modules compute the base model."""
        return self.peft_model.disable_adapter()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.adapters_off():
            return self.policy(*args, **kwargs)


def adapters_off_context(reference: nn.Module) -> tuple[nn.Module, Callable[[], AbstractContextManager] | None]:
    """The module a reference decode state runs, and the context it runs in (None: a plain copy)."""
    if isinstance(reference, AdapterReference):
        return reference.policy, reference.adapters_off
    return reference, None
