"""Token log-probs in float32, the k1 / k3 / full KL estimates, and the KL coefficient controllers.

The per-token penalty is `kl_coef * estimate(pi, pi_ref)` with both distributions taken at the
sampling temperature (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences";
k1 / k3 as in Schulman, "Approximating KL Divergence", 2020).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import ConfigError

__all__ = [
    "KL_ESTIMATORS",
    "KLController",
    "FixedKLController",
    "AdaptiveKLController",
    "as_kl_controller",
    "token_logprobs",
    "restrict_to_support",
    "kl_estimates",
]

KL_ESTIMATORS = ("k1", "k3", "full")


def token_logprobs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the sampling distribution in float32: softmax at `temperature`, then top-k, then top-p.

    Tokens outside the kept set get -inf and the rest are renormalised, as `generate` samples
    (top-k and top-p off at 0 and 1.0). float32 because bf16 keeps ~3 significant digits, and the
    per-token log pi - log pi_ref differences (the KL term) would drown in rounding.
    """
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    if 0 < top_k < logprobs.shape[-1]:
        kth = logprobs.topk(top_k, dim=-1).values[..., -1:]
        logprobs = _renormalise(logprobs.masked_fill(logprobs < kth, -math.inf))
    if top_p < 1.0:
        ordered, order = logprobs.sort(dim=-1, descending=True)
        mass_before = ordered.exp().cumsum(-1) - ordered.exp()
        # keep the most likely tokens until their mass reaches top_p (at least one)
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = _renormalise(logprobs.masked_fill(drop, -math.inf))
    return logprobs


def restrict_to_support(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """pi_ref renormalised over the tokens pi can sample: a top-k / top-p policy's KL stays finite."""
    return _renormalise(ref_logprobs.masked_fill(torch.isneginf(logprobs), -math.inf))


def _renormalise(logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - logprobs.logsumexp(-1, keepdim=True)


def kl_estimates(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, actions: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-row KL estimates at the sampled tokens.

    Args:
        logprobs: [batch, vocab] log pi(. | s) at the sampling temperature.
        ref_logprobs: [batch, vocab] log pi_ref(. | s), same temperature.
        actions: [batch] int64 token ids sampled from pi.

    Returns:
        `logprob`, `ref_logprob` (each [batch]) and the estimates `k1` = log pi(a) - log pi_ref(a)
        (unbiased, can be negative), `k3` = r - 1 - log r with r = pi_ref(a) / pi(a) (unbiased,
        never negative) and `full` = sum_v pi(v) (log pi(v) - log pi_ref(v)) (exact, never negative).
    """
    index = actions.view(-1, 1)
    logp = logprobs.gather(-1, index).squeeze(-1)
    ref_logp = ref_logprobs.gather(-1, index).squeeze(-1)
    log_ratio = ref_logp - logp
    probs = logprobs.exp()
    # tokens with pi(v) = 0 contribute nothing, even where pi_ref(v) = 0 too (0 * inf would be nan)
    terms = torch.where(probs > 0, probs * (logprobs - ref_logprobs), torch.zeros_like(probs))
    return {
        "logprob": logp,
        "ref_logprob": ref_logp,
        "k1": logp - ref_logp,
        "k3": torch.expm1(log_ratio) - log_ratio,
        "full": terms.sum(-1),
    }


@runtime_checkable
class KLController(Protocol):
    """What the env needs from a KL coefficient: its current value and a feedback hook."""

    value: float

    def update(self, kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedKLController:
    """A constant KL coefficient; `update` does nothing."""

    def __init__(self, value: float) -> None:
        _check_coef(value, "kl_coef")
        self.value = float(value)

    def update(self, kl: float, n_steps: int) -> None:
        """Fixed: ignores feedback."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController({self.value})"


class AdaptiveKLController:
    """The adaptive coefficient of Ziegler et al. 2019, steering the per-episode KL toward `target`.

    After episodes with mean KL `kl` (nats per episode, summed over tokens) covering `n_steps`
    episodes: `e = clip(kl / target - 1, -0.2, 0.2)`, `value *= 1 + e * n_steps / horizon`.
    """

    def __init__(self, init_kl_coef: float = 0.05, target: float = 6.0, horizon: int = 10_000) -> None:
        _check_coef(init_kl_coef, "init_kl_coef")
        if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
            raise ConfigError(f"target={target!r} must be a positive KL in nats per episode, e.g. 6.0")
        if not (isinstance(horizon, (int, float)) and horizon > 0):
            raise ConfigError(f"horizon={horizon!r} must be a positive number of episodes, e.g. 10000")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        """Move `value` toward the coefficient that would give `target` KL."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value:.4g}, target={self.target}, horizon={self.horizon:g})"


def as_kl_controller(kl_coef: Any) -> KLController:
    """A float becomes a FixedKLController; a controller object is used as is (it may be shared)."""
    if isinstance(kl_coef, bool):
        _check_coef(kl_coef, "kl_coef")
    if isinstance(kl_coef, (int, float)):
        return FixedKLController(kl_coef)
    if isinstance(kl_coef, KLController):
        return kl_coef
    raise ConfigError(
        f"kl_coef={kl_coef!r} is neither a number nor a KL controller; pass e.g. kl_coef=0.05 or "
        f"kl_coef=AdaptiveKLController(0.05, target=6.0, horizon=10000)"
    )


def _check_coef(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{name}={value!r} must be a finite number >= 0, e.g. {name}=0.05 (0 turns the KL penalty off)"
        )
