"""PPO settings: one dataclass, validated in one place, with tuned presets kept as data files."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

ADVANTAGE_ESTIMATORS = ("gae", "mc")
POLICY_LOSSES = ("clip", "kl_penalty")
VECTORIZATION_MODES = ("sync", "async", "vector_entry_point")
ACTIVATIONS = ("tanh", "relu")
CRITICS = ("shared", "separate")


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
    """Shuffled minibatches per epoch; minibatch size is ``batch_size // num_minibatches``."""
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

    _explicit: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        # remember what the user set after construction too, so presets never overwrite it
        if name != "_explicit" and "_explicit" in self.__dict__:
            object.__setattr__(self, "_explicit", self._explicit | {name})
        object.__setattr__(self, name, value)

    @property
    def batch_size(self) -> int:
        """Transitions per rollout."""
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        """Transitions per gradient step."""
        return self.batch_size // self.num_minibatches

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work, and how to fix it."""
        for name in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "ptx_batch_size",
                     "gradient_accumulation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PPOConfig.{name}={value!r} must be a positive integer")
        if self.num_minibatches > self.batch_size:
            raise ValueError(
                f"PPOConfig.num_minibatches={self.num_minibatches} is larger than the rollout "
                f"(num_envs * num_steps = {self.batch_size}); lower num_minibatches or raise num_steps"
            )
        positive = ("learning_rate", "clip_coef", "max_grad_norm", "adam_eps", "kl_beta", "kl_target")
        for name in positive + ("clip_obs", "clip_reward"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)!r} must be > 0")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)!r} must lie in [0, 1]")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError(
                f"PPOConfig.ptx_coef={self.ptx_coef!r} needs ptx_data: "
                "a .txt path (one text per line) or a list of texts"
            )
        for name in ("ent_coef", "vf_coef", "ptx_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)!r} must be >= 0")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"PPOConfig.target_kl={self.target_kl!r} must be > 0 or None")
        if self.vf_clip_coef is not None and not self.vf_clip_coef > 0:
            raise ValueError(f"PPOConfig.vf_clip_coef={self.vf_clip_coef!r} must be > 0 or None")
        if not self.hidden_sizes or any(int(h) < 1 for h in self.hidden_sizes):
            raise ValueError(f"PPOConfig.hidden_sizes={self.hidden_sizes!r} needs at least one width >= 1")
        _check_choice("advantage", self.advantage, ADVANTAGE_ESTIMATORS)
        _check_choice("policy_loss", self.policy_loss, POLICY_LOSSES)
        _check_choice("vectorization", self.vectorization, VECTORIZATION_MODES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("critic", self.critic, CRITICS)

    def to_dict(self) -> dict[str, Any]:
        """Plain fields as a JSON-ready dict (what checkpoints and the CLI print)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        data["hidden_sizes"] = list(self.hidden_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PPOConfig:
        """Build a config from a dict, rejecting unknown keys with the closest valid name."""
        for key in data:
            check_field_name(key)
        return cls(**data)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"PPOConfig.{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def field_names() -> list[str]:
    """Names a user may set."""
    return [f.name for f in fields(PPOConfig) if f.init]


def check_field_name(key: str) -> None:
    """Raise ValueError for an unknown config key, suggesting the closest known one."""
    names = field_names()
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
        raise ValueError(f"unknown PPOConfig key {key!r}{hint}")


def explicit_fields(config: PPOConfig) -> frozenset[str]:
    """The fields the user set, at construction or afterwards."""
    return config._explicit


def _record_explicit_init(cls: type[PPOConfig]) -> None:
    generated_init = cls.__init__
    names = field_names()

    def __init__(self: PPOConfig, *args: Any, **kwargs: Any) -> None:
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
    for key in data.get("config", {}):
        check_field_name(key)
    return data


def resolve_config(env_id: str | None, config: PPOConfig | None) -> PPOConfig:
    """Preset for ``env_id`` (if any), overridden by the fields set explicitly in ``config``."""
    preset = load_preset(env_id) if env_id else None
    if preset is None:
        return config if config is not None else PPOConfig()
    merged = dict(preset["config"])
    if config is not None:
        merged.update({name: getattr(config, name) for name in explicit_fields(config)})
    resolved = PPOConfig(**merged)
    # keep the record of what the user chose, so a saved config reloads the same way
    object.__setattr__(resolved, "_explicit", explicit_fields(config) if config is not None else frozenset())
    return resolved


def replace(config: PPOConfig, **changes: Any) -> PPOConfig:
    """``dataclasses.replace`` that keeps the explicit-field record."""
    new = dataclasses.replace(config, **changes)
    object.__setattr__(new, "_explicit", explicit_fields(config) | frozenset(changes))
    return new
