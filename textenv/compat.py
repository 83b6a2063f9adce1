"""The few transformers APIs that changed name across the versions we support, behind one function each.

transformers 5.24 renamed the `past_key_values` argument and output of every model to `cache`
(the old name warns, and goes away in 5.40); older releases know only `past_key_values`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

__all__ = ["cache_kwargs", "returned_cache"]

_CACHE_ARGUMENT: dict[type, str] = {}


def _cache_argument(module: nn.Module) -> str:
    kind = type(module)
    if kind not in _CACHE_ARGUMENT:
        parameters = inspect.signature(module.forward).parameters
        _CACHE_ARGUMENT[kind] = "cache" if "cache" in parameters else "past_key_values"
    return _CACHE_ARGUMENT[kind]


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """`{"cache": cache}` or `{"past_key_values": cache}`, whichever `module.forward` takes."""
    return {_cache_argument(module): cache}


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned, under its new name or its old one."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values
