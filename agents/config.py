"""PPO settings: one dataclass, validated in one place, with tuned presets kept as data files."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

import numpy as np

from agents.aliases import suggest_field

ADVANTAGE_ESTIMATORS = ("gae", "mc")
POLICY_LOSSES = ("clip", "kl_penalty")
VECTORIZATION_MODES = ("sync", "async", "vector_entry_point")
ACTIVATIONS = ("tanh", "relu")
CRITICS = ("shared", "separate")
MIXED_PRECISION = ("no", "bf16")


@dataclass
class PPOConfig:
    """Hyper-parameters of PPO. Names follow CleanRL's ``ppo.py`` so its users feel at home.

    Fields you pass explicitly override the env's tuned preset (see :func:`resolve_config`);
    fields you leave out take the preset's value, or the default below when there is no preset.
    """

    num_envs: int = 8
    """Parallel environments in the vector env (ignored when you pass a ready VectorEnv)."""
    num_steps: int = 128
    """Steps taken in each env per rollout; the rollout holds ``num_envs * num_steps`` transitions."""
    whole_episodes: bool = False
    """Each rollout starts every env from a reset and runs it for exactly one episode (at most
    ``num_steps`` steps); envs that finish early wait, their steps masked out. What RLHF trainers do
    (one response per prompt per batch); ``False`` is the classic fixed-length rollout that carries
    episodes over from one rollout to the next."""
    learning_rate: float = 3e-4
    """Adam step size."""
    anneal_lr: bool = False
    """Decay the learning rate linearly to 0 over ``total_timesteps`` of the current ``learn`` call."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda: 0 is one-step TD, 1 is the Monte-Carlo return."""
    update_epochs: int = 10
    """Passes (K epochs) over the rollout per update."""
    num_minibatches: int = 4
    """Shuffled minibatches per epoch. Every transition is used once per epoch: when the rollout does not
    divide evenly, minibatches differ in size by one (``batch_size // num_minibatches`` or one more)."""
    gradient_accumulation_steps: int = 1
    """Split each minibatch into this many chunks (whole episodes for language models), run the
    forward and backward pass per chunk and take one optimizer step: the same update with a fraction
    of the activation memory."""
    clip_coef: float = 0.2
    """Surrogate clipping range epsilon."""
    clip_vloss: bool = False
    """Clip the value update around the rollout's values (PPO2 / TRL ``cliprange_value``)."""
    vf_clip_coef: float | None = None
    """Value clipping range; ``None`` reuses ``clip_coef``."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value-loss coefficient."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    target_kl: float | None = None
    """Stop the epochs early once the approximate KL of an epoch exceeds this (``None``: never)."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    advantage: str = "gae"
    """``"gae"`` (default) or ``"mc"``: Monte-Carlo returns minus the value baseline (REINFORCE with baseline)."""
    policy_loss: str = "clip"
    """``"clip"`` (PPO-Clip) or ``"kl_penalty"``: ratio * A - beta * KL(old || new) with adaptive beta."""
    kl_beta: float = 1.0
    """Initial beta of the KL penalty (``policy_loss="kl_penalty"``)."""
    kl_target: float = 0.01
    """KL target of the penalty: beta halves below target/1.5 and doubles above target*1.5."""
    norm_obs: bool = False
    """Normalise observations by running mean and variance (saved in checkpoints)."""
    norm_reward: bool = False
    """Scale rewards by the running std of the discounted return, as SB3's VecNormalize does."""
    clip_obs: float = 10.0
    """Clip normalised observations to [-clip_obs, clip_obs]."""
    clip_reward: float = 10.0
    """Clip scaled rewards to [-clip_reward, clip_reward]."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Widths of the MLP hidden layers (actor and critic alike)."""
    activation: str = "tanh"
    """Hidden activation: ``"tanh"`` or ``"relu"``."""
    shared_trunk: bool = False
    """One MLP trunk for actor and critic, two heads on top; separate MLPs otherwise."""
    critic: str = "shared"
    """Language-model policies: ``"shared"`` puts the value head on the policy's trunk (TRL style),
    ``"separate"`` gives the critic its own trunk (DeepSpeed-Chat style)."""
    critic_model: str | None = None
    """With ``critic="separate"``: a model path to initialise the critic's trunk from (e.g. a reward
    model); ``None`` copies the policy's starting trunk."""
    lora_r: int = 0
    """Language-model policies: rank of LoRA adapters (through ``peft``); 0 is full fine-tuning. With
    LoRA only the adapters and the value head train, and the env's KL reference is the base model
    with the adapters switched off: no second copy of the weights."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator: the adapter output is multiplied by ``lora_alpha / lora_r``."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input, for other trainers' configs: PPO runs the policy in eval mode, so
    it is off in rollouts, in the KL and in the ratio (TRL's PPO turns dropout off as well)."""
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    """Which layers get adapters: ``"all-linear"`` (every linear layer but the output layer) or module
    names such as ``("q_proj", "v_proj")``."""
    lora_config: Any = None
    """A ready ``peft.LoraConfig`` (or its dict), used instead of the ``lora_*`` fields."""
    gradient_checkpointing: bool = False
    """Language-model policies: keep only each block's input in the update forward and recompute the
    rest during the backward (transformers' activation checkpointing); the output layer's logits are
    then recomputed too, a slice of states at a time, instead of a ``[states, vocab]`` tensor for the
    whole minibatch: less memory, more compute."""
    gradient_checkpointing_fraction: float = 1.0
    """With ``gradient_checkpointing``: the share of decoder blocks recomputed in the backward (the
    first ones). Each block left out keeps its activations instead, trading memory for time: for
    SmolLM2-135M at minibatches of 8 responses, ~16 MB and ~1 % of a LoRA update's time per block."""
    ptx_coef: float = 0.0
    """Language-model policies: weight of the pre-training loss mixed into every update
    (InstructGPT's PPO-ptx); 0 turns it off."""
    ptx_data: str | list[str] | None = None
    """Texts for the pre-training loss: a ``.txt`` path (one text per line) or a list of strings."""
    ptx_batch_size: int = 4
    """Texts per pre-training loss term (one batch per PPO minibatch step)."""
    log_std_init: float = 0.0
    """Initial log standard deviation of the Gaussian policy (Box action spaces)."""
    adam_eps: float = 1e-5
    """Adam epsilon (1e-5 as in SB3 and CleanRL rather than torch's 1e-8)."""
    vectorization: str = "sync"
    """How env ids are vectorised: ``"sync"`` (one process), ``"async"`` (one process per env) or
    ``"vector_entry_point"`` (the batched vector env the id registers, e.g. TextRLHF-v0's)."""
    seed: int = 0
    """Seeds torch, numpy, the envs and the action sampling: the same seed gives the same run."""
    torch_threads: int | None = None
    """``torch.set_num_threads`` for this process; ``None`` leaves torch's choice."""
    device: str = "auto"
    """Where the policy, the rollout buffer and the sampling live: ``"auto"`` (a TextRLHF-v0 env's
    model device; otherwise CUDA when present, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    mixed_precision: str = "no"
    """``"bf16"``: the policy's forwards (the rollout's, a TextRLHF-v0 env's included, and the update's)
    run under ``torch.autocast`` in bfloat16, for speed and activation memory on GPUs with bf16 (Ampere
    and later). Weights, optimizer state, gradients, the output layer, log-probs, values, the KL and
    the losses stay float32. ``"no"``: float32 throughout."""
    max_nonfinite_steps: int = 0
    """Minibatch steps in a row whose loss or gradient norm is NaN / inf that may be skipped (no optimizer
    step, gradients zeroed, counted in ``losses/skipped_steps``) before training stops with
    ``NonFiniteError``; 0 stops at the first one."""

    _explicit: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.init:
                object.__setattr__(self, f.name, _normalise(f.name, getattr(self, f.name)))
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "_explicit" and "_explicit" in self.__dict__:
            # after construction: an unknown name would silently become a new attribute, a bad value
            # would only fail later, far from the line that set it
            check_field_name(name)
            value = _normalise(name, value)
            check_field(name, value)
            # remember what the user set after construction too, so presets never overwrite it
            object.__setattr__(self, "_explicit", self._explicit | {name})
        object.__setattr__(self, name, value)

    @property
    def batch_size(self) -> int:
        """Transitions per rollout."""
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        """Transitions in the smallest minibatch (the others hold one more when the rollout does not divide)."""
        return self.batch_size // self.num_minibatches

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work, the rule, and an example.

        Every field is type- and range-checked here (see ``FIELD_RULES``), then the combinations.
        """
        for name in field_names():
            check_field(name, getattr(self, name))
        if self.num_minibatches > self.batch_size:
            raise ValueError(
                f"PPOConfig.num_minibatches={self.num_minibatches} is larger than the rollout "
                f"(num_envs * num_steps = {self.batch_size}); lower num_minibatches or raise num_steps"
            )
        if self.norm_adv and self.minibatch_size == 1:
            # a one-sample minibatch normalises its advantage to exactly 0: the actor would never move
            raise ValueError(
                f"PPOConfig.num_minibatches={self.num_minibatches} with norm_adv=True gives minibatches of one "
                f"transition (num_envs * num_steps = {self.batch_size}), whose normalised advantage is always 0; "
                "lower num_minibatches, raise num_steps, or set norm_adv=False"
            )
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError(
                f"PPOConfig.ptx_coef={self.ptx_coef!r} needs ptx_data: "
                "a .txt path (one text per line) or a list of texts"
            )
        if self.critic_model is not None and self.critic != "separate":
            raise ValueError(
                f"PPOConfig.critic_model={self.critic_model!r} is only used with critic='separate' "
                f"(critic={self.critic!r}); set critic='separate' or leave critic_model=None"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain fields as a JSON-ready dict (what checkpoints and the CLI print)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        data["hidden_sizes"] = list(self.hidden_sizes)
        if isinstance(self.lora_target_modules, tuple):
            data["lora_target_modules"] = list(self.lora_target_modules)
        if self.lora_config is not None:
            data["lora_config"] = _plain(self.lora_config.to_dict())
        return data

    @property
    def uses_lora(self) -> bool:
        """Whether the language-model policy trains LoRA adapters instead of all weights."""
        return self.lora_r > 0 or self.lora_config is not None

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` for the policy: ``lora_config`` or one made from the ``lora_*`` fields."""
        from peft import LoraConfig

        if self.lora_config is not None:
            return self.lora_config
        targets = self.lora_target_modules
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets if isinstance(targets, str) else list(targets))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PPOConfig:
        """Build a config from a dict, rejecting unknown keys with the closest valid name."""
        if not isinstance(data, dict):
            raise ValueError(f"PPOConfig.from_dict({data!r}) needs a dict of fields, e.g. {{'learning_rate': 3e-4}}")
        for key in data:
            check_field_name(key)
        return cls(**data)


def _plain(value: Any) -> Any:
    """JSON-ready: sets and tuples become lists, enums their values, other objects their str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    enum_value = getattr(value, "value", None)
    return enum_value if isinstance(enum_value, (str, int)) else str(value)


# ---------------------------------------------------------------------- field rules
# kind -> (the rule as the error states it, the test); a value of the wrong type fails the test too
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_widths(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) > 0 and all(_is_int(w) and w >= 1 for w in value)


def _is_texts(value: Any) -> bool:
    if value is None or (isinstance(value, (str, os.PathLike)) and os.fspath(value)):
        return True
    return isinstance(value, list) and all(isinstance(text, str) for text in value)


def _is_modules(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, tuple) and len(value) > 0 and all(isinstance(m, str) and m for m in value)


def _is_lora_config(value: Any) -> bool:
    return value is None or type(value).__name__ == "LoraConfig"


def _is_device_name(name: str) -> bool:
    kind, _, index = name.partition(":")
    return (name in ("auto", "cpu", "cuda", "mps")) or (kind == "cuda" and index.isdigit())


_KINDS: dict[str, tuple[str, Any]] = {
    "positive_int": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "count": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "seed": ("an integer in [0, 2**32)", lambda v: _is_int(v) and 0 <= v < 2**32),
    "positive_int_or_none": ("a positive integer or None", lambda v: v is None or (_is_int(v) and v >= 1)),
    "positive": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
    "non_negative": ("a finite number >= 0", lambda v: _is_number(v) and v >= 0),
    "unit": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "share": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "finite": ("a finite number", _is_number),
    "positive_or_none": ("a finite number > 0, or None", lambda v: v is None or (_is_number(v) and v > 0)),
    "bool": ("True or False", lambda v: isinstance(v, bool)),
    "widths": ("a non-empty tuple of positive layer widths", _is_widths),
    "path_or_none": ("a model path (str) or None", lambda v: v is None or isinstance(v, (str, os.PathLike))),
    "texts": ("a .txt path, a list of texts, or None", _is_texts),
    "dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "modules": ("'all-linear' or a non-empty tuple of module names", _is_modules),
    "lora_config": ("a peft.LoraConfig, its dict, or None", _is_lora_config),
    "device": ("'auto', 'cpu', 'cuda' or 'cuda:N'", lambda v: isinstance(v, str) and _is_device_name(v)),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "advantage": ADVANTAGE_ESTIMATORS,
    "policy_loss": POLICY_LOSSES,
    "vectorization": VECTORIZATION_MODES,
    "activation": ACTIVATIONS,
    "critic": CRITICS,
    "mixed_precision": MIXED_PRECISION,
}

# field -> (kind, an example value for the message); choices are checked against CHOICES
FIELD_RULES: dict[str, tuple[str, Any]] = {
    "num_envs": ("positive_int", 8), "num_steps": ("positive_int", 128), "whole_episodes": ("bool", True),
    "learning_rate": ("positive", 3e-4), "anneal_lr": ("bool", True), "gamma": ("unit", 0.99),
    "gae_lambda": ("unit", 0.95), "update_epochs": ("positive_int", 10), "num_minibatches": ("positive_int", 4),
    "gradient_accumulation_steps": ("positive_int", 4), "clip_coef": ("positive", 0.2),
    "clip_vloss": ("bool", True), "vf_clip_coef": ("positive_or_none", 0.2), "ent_coef": ("non_negative", 0.01),
    "vf_coef": ("non_negative", 0.5), "max_grad_norm": ("positive", 0.5), "target_kl": ("positive_or_none", 0.02),
    "norm_adv": ("bool", True), "advantage": ("choice", "gae"), "policy_loss": ("choice", "clip"),
    "kl_beta": ("positive", 1.0), "kl_target": ("positive", 0.01), "norm_obs": ("bool", True),
    "norm_reward": ("bool", True), "clip_obs": ("positive", 10.0), "clip_reward": ("positive", 10.0),
    "hidden_sizes": ("widths", (64, 64)), "activation": ("choice", "tanh"), "shared_trunk": ("bool", True),
    "critic": ("choice", "shared"), "critic_model": ("path_or_none", "path/to/reward_model"),
    "ptx_coef": ("non_negative", 0.1), "ptx_data": ("texts", "pretrain.txt"), "ptx_batch_size": ("positive_int", 4),
    "log_std_init": ("finite", -0.5), "adam_eps": ("positive", 1e-5), "vectorization": ("choice", "sync"),
    "seed": ("seed", 0), "torch_threads": ("positive_int_or_none", 4), "max_nonfinite_steps": ("count", 3),
    "lora_r": ("count", 16), "lora_alpha": ("positive", 32.0), "lora_dropout": ("dropout", 0.05),
    "lora_target_modules": ("modules", "all-linear"), "lora_config": ("lora_config", None),
    "gradient_checkpointing": ("bool", True), "gradient_checkpointing_fraction": ("share", 0.5),
    "device": ("device", "cpu"), "mixed_precision": ("choice", "bf16"),
}


def _normalise(name: str, value: Any) -> Any:
    """numpy scalars -> Python ones and a list of widths -> a tuple; anything else is left for the checks."""
    if isinstance(value, np.generic) and not isinstance(value, np.str_):
        value = value.item()
    if name == "hidden_sizes" and isinstance(value, (list, tuple)):
        value = tuple(w.item() if isinstance(w, np.integer) else w for w in value)
    if name == "lora_target_modules" and isinstance(value, list):
        value = tuple(value)
    if name == "lora_config" and isinstance(value, dict):
        from peft import LoraConfig

        try:
            value = LoraConfig(**value)
        except TypeError as error:  # an unknown key: peft names it
            raise ValueError(
                f"PPOConfig.lora_config={value!r} is not a valid peft.LoraConfig ({error}); pass the keyword "
                f"arguments of peft.LoraConfig, e.g. {{'r': 16, 'lora_alpha': 32, 'target_modules': 'all-linear'}}"
            ) from None
    return value


def check_field(name: str, value: Any) -> None:
    """Raise ValueError if ``value`` breaks the type / range rule of field ``name``."""
    kind, example = FIELD_RULES[name]
    if kind == "choice":
        _check_choice(name, value, CHOICES[name])
        return
    rule, test = _KINDS[kind]
    if not test(value):
        wrong_type = _wrong_type(kind, value)
        raise ValueError(f"PPOConfig.{name}={value!r} must be {rule}{wrong_type}; e.g. {name}={example!r}")


def _wrong_type(kind: str, value: Any) -> str:
    """``", not a str"`` when the type (rather than the size) is what is wrong."""
    numeric = kind not in ("bool", "widths", "path_or_none", "texts", "modules", "lora_config")
    integral = kind in ("positive_int", "count", "seed", "positive_int_or_none")
    if value is None or (numeric and _is_int(value)) or (numeric and not integral and isinstance(value, float)):
        return ""
    if kind == "bool" and isinstance(value, bool):
        return ""
    if kind in ("widths", "modules") and isinstance(value, (tuple, str)):
        return ""
    if kind == "device" and isinstance(value, str):
        return ""
    name = type(value).__name__
    return f", not {'an' if name[0] in 'aeiou' else 'a'} {name}"


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value in choices and isinstance(value, str):
        return
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else f"; e.g. {name}={choices[0]!r}"
    raise ValueError(f"PPOConfig.{name}={value!r} is not one of {', '.join(map(repr, choices))}{hint}")


def field_names() -> list[str]:
    """Names a user may set."""
    return [f.name for f in fields(PPOConfig) if f.init]


def check_field_name(key: Any) -> None:
    """Raise ValueError for an unknown config key, suggesting our name for it (aliases, then difflib)."""
    names = field_names()
    if key in names:
        return
    if not isinstance(key, str):
        raise ValueError(f"PPOConfig key {key!r} must be a str naming a field, e.g. 'learning_rate'")
    plain = key.strip().lower().replace("-", "_")
    raise ValueError(f"unknown PPOConfig key {key!r}; {suggest_field(plain, names)}")


def explicit_fields(config: PPOConfig) -> frozenset[str]:
    """The fields the user set, at construction or afterwards."""
    return config._explicit


def _record_explicit_init(cls: type[PPOConfig]) -> None:
    generated_init = cls.__init__
    names = field_names()

    def __init__(self: PPOConfig, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:  # before the dataclass's own TypeError, which suggests nothing
            check_field_name(key)
        generated_init(self, *args, **kwargs)
        object.__setattr__(self, "_explicit", frozenset(names[: len(args)]) | frozenset(kwargs))

    __init__.__doc__ = generated_init.__doc__
    cls.__init__ = __init__  # type: ignore[method-assign]


_record_explicit_init(PPOConfig)


def available_presets() -> list[str]:
    """Env ids that ship a tuned preset."""
    folder = resources.files("agents") / "presets"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(env_id: str) -> dict[str, Any] | None:
    """The tuned settings for ``env_id`` as a dict, or ``None`` when it has no preset."""
    path = resources.files("agents") / "presets" / f"{env_id}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    for key in [*data.get("config", {}), *data.get("with_lora", {})]:
        check_field_name(key)
    return data


def resolve_config(env_id: str | None, config: PPOConfig | dict[str, Any] | None) -> PPOConfig:
    """Preset for ``env_id`` (if any), overridden by the fields set explicitly in ``config``.

    Always a new object, validated as a whole: the user's config is never written to.
    """
    if isinstance(config, dict):
        config = PPOConfig.from_dict(config)
    if config is not None and not isinstance(config, PPOConfig):
        raise ValueError(
            f"config={config!r} must be a PPOConfig (or a dict of its fields), e.g. PPOConfig(learning_rate=3e-4)"
        )
    preset = load_preset(env_id) if env_id else None
    if preset is None:
        # fields assigned one by one were checked alone; their combination is checked here
        return replace(config) if config is not None else PPOConfig()
    merged = dict(preset["config"])
    chosen = {name: getattr(config, name) for name in explicit_fields(config)} if config is not None else {}
    merged.update(chosen)
    if PPOConfig(**merged).uses_lora:
        # adapters start at zero and train few weights: they need a larger step than full fine-tuning
        merged.update(preset.get("with_lora", {}))
        merged.update(chosen)
    resolved = PPOConfig(**merged)
    # keep the record of what the user chose, so a saved config reloads the same way
    object.__setattr__(resolved, "_explicit", explicit_fields(config) if config is not None else frozenset())
    return resolved


def replace(config: PPOConfig, **changes: Any) -> PPOConfig:
    """``dataclasses.replace`` that keeps the explicit-field record."""
    new = dataclasses.replace(config, **changes)
    object.__setattr__(new, "_explicit", explicit_fields(config) | frozenset(changes))
    return new
