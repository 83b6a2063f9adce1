"""Names other RL libraries use for PPOConfig's fields, so an unknown key gets a useful suggestion.

``difflib`` cannot see that SB3's ``n_epochs`` or TRL's ``num_ppo_epochs`` mean ``update_epochs``, nor
that TRL's ``kl_coef`` is a setting of the env rather than of PPO; these tables can.
"""

from __future__ import annotations

import difflib

# SB3, CleanRL, TRL and RLlib names -> ours
ALIASES: dict[str, str] = {
    "lr": "learning_rate", "learning_rate_init": "learning_rate", "step_size": "learning_rate",
    "n_steps": "num_steps", "rollout_steps": "num_steps", "num_rollout_steps": "num_steps",
    "n_epochs": "update_epochs", "num_ppo_epochs": "update_epochs", "ppo_epochs": "update_epochs",
    "num_epochs": "update_epochs", "epochs": "update_epochs", "num_sgd_iter": "update_epochs",
    "batch_size": "num_minibatches", "minibatch_size": "num_minibatches", "mini_batch_size": "num_minibatches",
    "sgd_minibatch_size": "num_minibatches", "num_mini_batches": "num_minibatches",
    "nminibatches": "num_minibatches", "n_minibatches": "num_minibatches",
    "clip_range": "clip_coef", "cliprange": "clip_coef", "clip_param": "clip_coef", "clip_epsilon": "clip_coef",
    "cliprange_value": "vf_clip_coef", "clip_range_vf": "vf_clip_coef", "vf_clip": "vf_clip_coef",
    "vf_clip_param": "vf_clip_coef", "value_clip": "vf_clip_coef",
    "n_envs": "num_envs", "num_workers": "num_envs", "num_env": "num_envs",
    "normalize_advantage": "norm_adv", "normalize_advantages": "norm_adv", "norm_advantages": "norm_adv",
    "whiten_advantages": "norm_adv",
    "normalize_reward": "norm_reward", "normalize_rewards": "norm_reward", "norm_rewards": "norm_reward",
    "whiten_rewards": "norm_reward", "scale_rewards": "norm_reward",
    "normalize_obs": "norm_obs", "normalize_observations": "norm_obs", "norm_observations": "norm_obs",
    "lam": "gae_lambda", "lambda": "gae_lambda", "lambda_": "gae_lambda", "lmbda": "gae_lambda",
    "discount": "gamma", "discount_factor": "gamma",
    "entropy_coef": "ent_coef", "entropy_coeff": "ent_coef", "ent_coeff": "ent_coef", "entropy_beta": "ent_coef",
    "vf_loss_coeff": "vf_coef", "vf_coeff": "vf_coef", "value_coef": "vf_coef", "value_loss_coef": "vf_coef",
    "grad_clip": "max_grad_norm", "max_norm": "max_grad_norm", "clip_grad_norm": "max_grad_norm",
    "gradient_clipping": "max_grad_norm", "grad_norm_clip": "max_grad_norm",
    "net_arch": "hidden_sizes", "hidden_size": "hidden_sizes", "hidden_dims": "hidden_sizes",
    "fcnet_hiddens": "hidden_sizes", "activation_fn": "activation", "fcnet_activation": "activation",
    "share_features_extractor": "shared_trunk", "vf_share_layers": "shared_trunk",
    "eps": "adam_eps", "adam_epsilon": "adam_eps", "optimizer_eps": "adam_eps",
    "kl_threshold": "target_kl", "desired_kl": "target_kl", "kl_coeff": "kl_beta",
    "random_seed": "seed", "num_threads": "torch_threads", "threads": "torch_threads",
    "lr_schedule": "anneal_lr", "linear_lr": "anneal_lr",
    "grad_accum_steps": "gradient_accumulation_steps", "gradient_accumulation": "gradient_accumulation_steps",
    "vf_model": "critic_model", "value_model": "critic_model",
}
# the names whose meaning differs from ours need a word on top of "did you mean"
_SIZE_NOTE = ("PPOConfig counts minibatches instead of sizing them: "
              "minibatch size = num_envs * num_steps // num_minibatches")
_VALUE_CLIP_NOTE = "and clip_vloss=True, which turns value clipping on"
_ALIAS_NOTES = {
    "batch_size": _SIZE_NOTE, "minibatch_size": _SIZE_NOTE, "mini_batch_size": _SIZE_NOTE,
    "sgd_minibatch_size": _SIZE_NOTE,
    **{name: _VALUE_CLIP_NOTE for name, target in ALIASES.items() if target == "vf_clip_coef"},
}
# TRL / textenv names that are settings of the TextRLHF-v0 env, not of PPO -> the env's name
ENV_SETTINGS = {
    "kl_coef": "kl_coef", "init_kl_coef": "kl_coef", "adap_kl_ctrl": "kl_coef", "kl_estimator": "kl_estimator",
    "kl_penalty": "kl_estimator", "missing_eos_penalty": "missing_eos_penalty", "temperature": "temperature",
    "top_k": "top_k", "top_p": "top_p", "response_length": "max_new_tokens", "max_new_tokens": "max_new_tokens",
    "max_prompt_tokens": "max_prompt_tokens", "reward_clip": "reward_clip", "cliprange_reward": "reward_clip",
    "reward_model": "reward", "reward": "reward", "model": "model", "model_name": "model", "prompts": "prompts",
    "device": "device",
}
RUN_LENGTH = ("total_timesteps", "num_timesteps", "n_timesteps", "total_episodes", "num_iterations")


def suggest_field(plain: str, names: list[str]) -> str:
    """What to say after "unknown PPOConfig key ...;" for the lower-cased key ``plain``."""
    if plain in names:
        return f"did you mean {plain!r}?"
    if plain in ALIASES:
        target = ALIASES[plain]
        note = _ALIAS_NOTES.get(plain)
        return f"did you mean {target!r}?" + (f" ({note})" if note else "")
    if plain in ENV_SETTINGS:
        name = ENV_SETTINGS[plain]
        return (f"it is a setting of the env (TextRLHF-v0: {name!r}), not of PPO: pass "
                f"env_kwargs={{{name!r}: ...}} (CLI: --env-kwargs {name}=...)")
    if plain in RUN_LENGTH:
        return "the run length is not a PPOConfig field: pass learn(total_timesteps) (CLI: --total-timesteps)"
    close = difflib.get_close_matches(plain, names, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(names)}"
