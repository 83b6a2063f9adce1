"""Proximal Policy Optimization: learn() -> collect_rollout() -> advantages -> update().

One class for every env: the policy hides what the observations and actions are, the buffer
hides how they are stored, and this file only runs the algorithm (Schulman et al. 2017).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from torch.nn.parallel import DistributedDataParallel

from agents import checkpoint, evaluation
from agents.buffer import Minibatch, RolloutBuffer
from agents.config import PPOConfig, replace, resolve_config
from agents.devices import training_device
from agents.distributed import data_parallel, process_group, share_prompts
from agents.envs import autoreset_mode, env_id_of, make_vector_env, single_env_copy
from agents.episodes import EpisodeTracker
from agents.guards import NonFiniteSteps, check_obs, check_weights, checked_rewards
from agents.logger import Logger
from agents.lora import trainable_parameters
from agents.losses import clipped_surrogate, kl_penalty_surrogate, masked_mean, value_loss
from agents.normalize import ObservationNormalizer, RewardScaler
from agents.policies import ActorCritic, make_policy_for_env

Callback = Callable[["PPO"], "bool | None"]


class PPO:
    """PPO for any Gymnasium env with Discrete or Box actions.

    ``PPO(env, config, logdir=...)`` takes an env id (vectorised with ``config.num_envs`` copies),
    a ``gymnasium.Env`` or a ``gymnasium.vector.VectorEnv``. When the env's id has a tuned preset,
    the preset is used; fields set in ``config`` override it. A ready VectorEnv keeps its own
    number of envs.
    """

    def __init__(
        self,
        env: str | gym.Env | VectorEnv,
        config: PPOConfig | None = None,
        *,
        logdir: str | os.PathLike[str] | None = None,
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        keywords = isinstance(env_kwargs, dict) and all(isinstance(key, str) for key in env_kwargs)
        if env_kwargs is not None and not keywords:
            raise ValueError(
                f"env_kwargs={env_kwargs!r} must be a dict of keyword arguments for the env, e.g. {{'top_p': 0.9}}"
            )
        self.env_id = env_id_of(env)
        self.env_kwargs = dict(env_kwargs or {})
        self._built_from_id = isinstance(env, str)
        self._source_env = env if isinstance(env, gym.Env) else None  # what evaluate() copies
        self.config = resolve_config(self.env_id, config)
        cfg = self.config
        # under torchrun: one rank of a data-parallel run (its own envs and seeds, one shared policy)
        self.group = process_group(cfg.device)
        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)  # the same on every rank: equal initial weights (rank 0's are broadcast too)
        np.random.seed(cfg.seed + self.group.rank)
        self.generator = torch.Generator().manual_seed(cfg.seed + self.group.rank)
        self.envs = make_vector_env(env, cfg, self.env_kwargs)
        share_prompts(self.envs, self.group)  # text envs: each rank samples its own share of the prompts
        if self.envs.num_envs != cfg.num_envs:  # a ready VectorEnv decides how many envs there are
            self.config = cfg = replace(cfg, num_envs=self.envs.num_envs)
        self.autoreset_mode = autoreset_mode(self.envs, cfg)
        self.num_envs = self.envs.num_envs
        obs_space, action_space = self.envs.single_observation_space, self.envs.single_action_space
        self.device = training_device(cfg.device, self.envs)  # a text env's model device, CUDA, or the CPU
        self.policy: ActorCritic = make_policy_for_env(self.envs, cfg)
        # PPOConfig.mixed_precision: the policy's forwards (rollout and update) in bfloat16
        self._autocast = functools.partial(
            torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"
        )
        self.policy.to(self.device)
        self._sequence_policy = self.policy.sequence_model
        self._parameters = trainable_parameters(self.policy)  # under LoRA: adapters and value head
        # what the update calls: the policy itself, or its DDP wrapper that averages gradients over ranks
        self._train_forward = data_parallel(self.policy, self.group)
        self.optimizer = _adam(self._parameters, lr=cfg.learning_rate, eps=cfg.adam_eps)
        if cfg.norm_obs and not isinstance(obs_space, gym.spaces.Box):
            raise ValueError(f"norm_obs=True needs a Box observation space, not {obs_space}; set norm_obs=False")
        self.obs_normalizer = ObservationNormalizer(
            tuple(getattr(obs_space, "shape", None) or ()), enabled=cfg.norm_obs, clip=cfg.clip_obs
        )
        self.reward_scaler = RewardScaler(
            self.num_envs, enabled=cfg.norm_reward, gamma=cfg.gamma, clip=cfg.clip_reward
        )
        if self.group.active:  # statistics of all ranks, merged once per rollout
            self.obs_normalizer.stats.defer()
            self.reward_scaler.stats.defer()
        self.buffer = RolloutBuffer(
            cfg.num_steps, self.num_envs,
            tuple(self.policy.obs_shape), tuple(action_space.shape),
            obs_dtype=self.policy.obs_dtype, device=self.device,
            action_dtype=torch.int64 if isinstance(action_space, gym.spaces.Discrete) else torch.float32,
        )
        self.logger = Logger(logdir if self.group.is_main else None)  # rank 0 alone logs
        self.logger.hparams(cfg.to_dict())
        self.global_step = 0
        self.iteration = 0
        self.kl_beta = cfg.kl_beta
        self.tracker = EpisodeTracker(self.num_envs)
        self._schedule = (0, 0)
        self.last_stats: dict[str, float] = {}
        """What the last iteration logged (losses, SPS, and objective/* for text envs)."""
        self.nonfinite_steps = NonFiniteSteps(cfg.max_nonfinite_steps)  # skipped minibatch steps in a row
        # rank r's envs are the envs r * num_envs ... of one process running world_size * num_envs
        self._next_obs, _ = self.envs.reset(seed=cfg.seed + self.group.rank * self.num_envs)
        check_obs(self._next_obs, source="reset()", when=self._at)
        self._fresh = True  # every env at the start of an episode (whole-episode rollouts skip a reset)
        self._reset_pending = np.zeros(self.num_envs, dtype=bool)

    @property
    def episodes(self) -> list[tuple[int, float, int]]:
        """Every finished training episode (of this rank) as ``(global_step, return, length)``."""
        return self.tracker.finished

    # ------------------------------------------------------------------ training loop
    def learn(
        self, total_timesteps: int, *, progress: bool = True, callback: Callback | None = None
    ) -> PPO:
        """Train for ``total_timesteps`` more env steps (rounded up to whole rollouts).

        Calling it again continues the same run. ``callback(agent)`` runs after every update;
        returning ``False`` stops training early.
        """
        _check_count("total_timesteps", total_timesteps, example="100_000")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback={callback!r} must be callable as callback(agent) -> bool | None")
        cfg = self.config
        end = self.global_step + int(total_timesteps)
        if self._schedule[1] != end:  # a new schedule, unless a resumed run asks for the same end
            self._schedule = (self.global_step, end)
        bar = _progress_bar(total_timesteps, progress and self.group.is_main)
        while self.global_step < end:
            start_time, start_step = time.perf_counter(), self.global_step
            self._set_learning_rate()
            with torch.inference_mode():
                last_value = self.collect_rollout()
            self.buffer.compute_advantages(
                last_value, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, estimator=cfg.advantage
            )
            stats = self.update()
            self.iteration += 1
            stats["charts/SPS"] = (self.global_step - start_step) / (time.perf_counter() - start_time)
            stats["charts/learning_rate"] = self.optimizer.param_groups[0]["lr"]
            stats.update(self.tracker.flush(self.logger, self.global_step))
            self.last_stats = stats
            self.logger.scalars(stats, self.global_step)
            if bar is not None:
                bar.update(self.global_step - start_step)
                recent = [ret for _, ret, _ in self.episodes[-20:]]
                if recent:
                    bar.set_postfix(episodic_return=f"{np.mean(recent):.1f}")
            stop = callback is not None and callback(self) is False
            if self.group.any(stop):  # one rank stopping stops all: none waits for the others forever
                break
        if bar is not None:
            bar.close()
        self.logger.flush()
        return self

    def _set_learning_rate(self) -> None:
        start, end = self._schedule
        lr = self.config.learning_rate
        if self.config.anneal_lr:
            lr *= max(0.0, 1.0 - (self.global_step - start) / max(1, end - start))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def collect_rollout(self) -> torch.Tensor:
        """Fill the buffer with ``num_steps`` steps of every env; return V(next obs) for bootstrapping.

        With ``whole_episodes`` every env starts a fresh episode and the rollout stops once each has
        finished one; later steps of an env that finished early are masked out of training.
        """
        with self._autocast():  # PPOConfig.mixed_precision: the env's policy forwards too
            return self._collect_rollout()

    def _collect_rollout(self) -> torch.Tensor:
        buf, cfg = self.buffer, self.config
        start_step, local_steps = self.global_step, 0
        kl_coef_before = self._env_kl_coef()
        waiting = np.zeros(self.num_envs, dtype=bool)  # whole episodes: envs already done this rollout
        if cfg.whole_episodes and not self._fresh:
            self._start_fresh_episodes()
        self._fresh = False
        for step in range(cfg.num_steps):
            obs = self._obs_tensor(self._next_obs, update=True)
            action, logprob, value = self.policy.act(obs, generator=self.generator)
            next_obs, reward, terminated, truncated, info = self.envs.step(self.policy.to_env_action(action))
            # a NaN is caught where it enters, before the normaliser statistics or the buffer hold it
            at_step = functools.partial(self._at, step)  # the message is only written for an error
            reward = checked_rewards(reward, self.num_envs, when=at_step)
            check_obs(next_obs, source="step()", when=at_step)
            valid = ~self._reset_pending & ~waiting  # next-step autoreset: this step only reset those envs
            done = (terminated | truncated) & valid
            self.tracker.step(reward, done, valid, self.global_step, self.logger)
            self.tracker.report(self._episode_end_info(info), done)
            buf.add(step, obs=obs, action=action, logprob=logprob, value=value,
                    reward=self.reward_scaler(reward, done), terminated=terminated & valid, episode_end=done,
                    valid=valid)
            cut = truncated & ~terminated & valid
            if self.autoreset_mode == AutoresetMode.SAME_STEP and cut.any():
                # the time limit is not a real end: bootstrap from the value of the state reached
                ended = np.flatnonzero(cut)
                for i in ended:
                    check_obs(info["final_obs"][i][None], source="step() (final_obs)", when=at_step, env=int(i))
                final = self._obs_tensor(np.stack([info["final_obs"][i] for i in ended]))
                buf.add_final_values(step, cut, self.policy.value(final))
            if self.autoreset_mode == AutoresetMode.NEXT_STEP:
                self._reset_pending = done
            self._next_obs = next_obs
            local_steps += int(valid.sum())
            # all ranks' steps; exact at the rollout's end (until then, this rank's times world_size)
            self.global_step = start_step + local_steps * self.group.world_size
            if cfg.whole_episodes:
                waiting |= done
                if waiting.all():
                    buf.clear_from(step + 1)
                    break
        if cfg.whole_episodes and waiting.all():  # every episode ended: nothing to bootstrap
            last_value = torch.zeros(self.num_envs, device=self.device)
        else:
            last_value = self.policy.value(self._obs_tensor(self._next_obs))
        self._end_rollout(start_step, local_steps, kl_coef_before)
        return last_value

    def _end_rollout(self, start_step: int, local_steps: int, kl_coef_before: float | None) -> None:
        """Steps of all ranks, and the statistics merged over them (one reduction each)."""
        self.global_step = start_step + int(self.group.sum(local_steps))
        self.obs_normalizer.sync(self.group)
        self.reward_scaler.sync(self.group)
        if self.group.active and kl_coef_before:
            # an adaptive KL controller (TextRLHF-v0) moved by a factor on each rank's episodes: the
            # product of the factors is the move one process would make after all of them
            factor = self._env_kl_coef() / kl_coef_before
            self.envs.kl_controller.value = kl_coef_before * float(torch.exp(self.group.sum(np.log(factor))))

    def _env_kl_coef(self) -> float | None:
        """The env's KL coefficient where its controller can adapt it (TextRLHF-v0), else None."""
        value = getattr(getattr(self.envs, "kl_controller", None), "value", None)
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    def _at(self, step: int | None = None) -> str:
        """Where training stands, for error messages: the global step and the rollout step (or the reset)."""
        if step is None:
            return f"global step {self.global_step} (the reset)"
        return f"global step {self.global_step} (iteration {self.iteration + 1}, rollout step {step})"

    def _start_fresh_episodes(self) -> None:
        """Reset every env (no seed: their generators carry on) and forget the episodes in flight."""
        self._next_obs, _ = self.envs.reset()
        check_obs(self._next_obs, source="reset()", when=self._at)
        self._reset_pending[:] = False
        self.tracker.restart()

    def _episode_end_info(self, info: dict[str, Any]) -> dict[str, Any]:
        """Where a step's info keeps what the envs reported at an episode end (same-step autoreset: nested)."""
        return info.get("final_info", {}) if self.autoreset_mode == AutoresetMode.SAME_STEP else info

    def _obs_tensor(self, obs: Any, *, update: bool = False) -> torch.Tensor:
        """Raw env observations -> the tensor the policy and buffer take."""
        return self.policy.preprocess(self.obs_normalizer(obs, update=update))

    def update(self) -> dict[str, float]:
        """K epochs of minibatch gradient steps on the rollout; returns the losses to log."""
        cfg = self.config
        totals: dict[str, list[float]] = {}
        skipped = 0
        for epoch in range(cfg.update_epochs):
            epoch_kl = []
            batches = list(
                self.buffer.minibatches(cfg.num_minibatches, self.generator, by_episode=self._sequence_policy)
            )
            real = len(batches)
            # every rank takes as many steps, or one would wait for the others forever: a rank whose
            # rollout split into fewer minibatches (fewer episodes) adds steps that train on nothing
            batches += [self.buffer.idle_minibatch()] * (-int(self.group.min(-real)) - real)
            for number, batch in enumerate(batches, start=1):
                where = (f"iteration {self.iteration + 1}, epoch {epoch + 1} of {cfg.update_epochs}, "
                         f"minibatch {number} of {cfg.num_minibatches}")
                losses = self._minibatch_step(batch, where=where)
                if losses is None:  # non-finite, skipped (PPOConfig.max_nonfinite_steps)
                    skipped += 1
                    continue
                if number > real:  # an idle step: nothing of this rank's to log
                    continue
                epoch_kl.append(losses["losses/approx_kl"])
                for key, value in losses.items():
                    totals.setdefault(key, []).append(value)
            if cfg.target_kl is not None and epoch_kl and self.group.mean(float(np.mean(epoch_kl))) > cfg.target_kl:
                break  # the KL averaged over ranks: every rank stops after the same epoch
        stats = {key: float(np.mean(values)) for key, values in totals.items()}
        stats["losses/skipped_steps"] = float(skipped)
        if cfg.policy_loss == "kl_penalty" and "losses/approx_kl" in stats:
            self._adapt_kl_beta(self.group.mean(stats["losses/approx_kl"]))
            stats["losses/kl_beta"] = self.kl_beta
        real = self.buffer.mask.flatten() > 0
        returns, values = self.buffer.returns.flatten()[real], self.buffer.values.flatten()[real]
        stats["losses/explained_variance"] = _explained_variance(values, returns)
        return stats

    def _minibatch_step(self, batch: Minibatch, *, where: str = "a minibatch step") -> dict[str, float] | None:
        """One optimizer step on ``batch``, its gradient summed over ``gradient_accumulation_steps`` chunks.

        Every loss term is a mean over the batch's unmasked steps, so each chunk's terms are weighted
        by its share of those steps: the step is the same as one pass over the whole batch. A NaN / inf
        loss or gradient norm never reaches the weights: the step is skipped (returns None) or raises
        NonFiniteError naming ``where``, as ``PPOConfig.max_nonfinite_steps`` says.
        """
        cfg, group = self.config, self.group
        advantages = batch.advantages
        steps = float(batch.mask.sum())
        if cfg.norm_adv:  # statistics of the whole minibatch (of all ranks' minibatches), whatever the chunks
            mean = group.masked_mean(advantages, batch.mask)
            std = group.masked_mean((advantages - mean) ** 2, batch.mask).sqrt()
            advantages = (advantages - mean) / (std + 1e-8)
        # each rank's loss is its sum over steps / (all steps / world size): DDP's mean over ranks of
        # the gradients is then the gradient of the mean over every rank's steps
        share = max(float(group.sum(steps)), 1.0) / group.world_size
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        total_loss = 0.0
        if cfg.ptx_coef > 0:
            # first, outside DDP's forward: its gradient accumulates here and the synced backward of the
            # last chunk below averages it over ranks with the rest (as DDP's no_sync accumulation does)
            with self._autocast():
                ptx_loss = self.policy.pretraining_loss(self.generator)
            (cfg.ptx_coef * ptx_loss).backward()
            stats["losses/ptx_loss"] = ptx_loss.item()
            total_loss += cfg.ptx_coef * stats["losses/ptx_loss"]
        chunks = batch.chunks(cfg.gradient_accumulation_steps, by_episode=self._sequence_policy)
        for number, index in enumerate(chunks, start=1):
            chunk = batch.subset(index)
            chunk_steps = float(chunk.mask.sum())
            with self._gradient_sync(last=number == len(chunks)):
                loss, chunk_stats = self._chunk_loss(chunk, advantages[index])
                (chunk_steps / share * loss).backward()
            total_loss += chunk_steps / max(steps, 1.0) * loss.item()  # this rank's, for logging and checks
            for key, value in chunk_stats.items():
                stats[key] = stats.get(key, 0.0) + chunk_steps / max(steps, 1.0) * value
        # the norm before clipping: NaN or inf if any gradient is (clipping would spread it to all)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._parameters, cfg.max_grad_norm, foreach=True))
        where = f"{where} (global step {self.global_step})"
        if group.any(not (np.isfinite(total_loss) and np.isfinite(grad_norm))):  # every rank skips, or none
            self.optimizer.zero_grad(set_to_none=True)  # the non-finite gradients never reach the weights
            self.nonfinite_steps.skip_or_raise(total_loss, grad_norm, where=where, learning_rate=cfg.learning_rate)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # gradients freed now, not at the next step: less held
        self.nonfinite_steps.passed()
        check_weights(self._parameters, self.policy, where=where, learning_rate=cfg.learning_rate)
        return stats

    def _gradient_sync(self, *, last: bool) -> Any:
        """DDP averages gradients at the last chunk's backward only (``no_sync`` before it)."""
        if last or not isinstance(self._train_forward, DistributedDataParallel):
            return contextlib.nullcontext()
        return self._train_forward.no_sync()

    def _chunk_loss(self, batch: Minibatch, advantages: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The PPO loss (clipped or KL-penalised surrogate, value loss, entropy bonus) on some steps."""
        cfg = self.config
        with self._autocast():
            logprob, entropy, value = self._train_forward(batch.obs, batch.actions, batch.episode_ids)
        log_ratio = logprob - batch.logprobs
        ratio = log_ratio.exp()
        kl_per_sample = (ratio - 1) - log_ratio  # k3: unbiased, never negative (Schulman's blog)
        if cfg.policy_loss == "clip":
            policy_loss = clipped_surrogate(ratio, advantages, batch.mask, cfg.clip_coef)
        else:
            policy_loss = kl_penalty_surrogate(ratio, advantages, kl_per_sample, batch.mask, self.kl_beta)
        clip_range = cfg.vf_clip_coef if cfg.vf_clip_coef is not None else cfg.clip_coef
        v_loss = value_loss(
            value, batch.values, batch.returns, batch.mask, clip_range=clip_range if cfg.clip_vloss else None
        )
        entropy_mean = masked_mean(entropy, batch.mask)
        loss = policy_loss + cfg.vf_coef * v_loss
        if cfg.ent_coef > 0:  # skipped at 0: its backward over a 49k vocabulary is not free
            loss = loss - cfg.ent_coef * entropy_mean
        with torch.no_grad():
            clipped = ((ratio - 1).abs() > cfg.clip_coef).float()
            return loss, {
                "losses/policy_loss": policy_loss.item(),
                "losses/value_loss": v_loss.item(),
                "losses/entropy": entropy_mean.item(),
                "losses/approx_kl": masked_mean(kl_per_sample, batch.mask).item(),
                "losses/clipfrac": masked_mean(clipped, batch.mask).item(),
            }

    def _adapt_kl_beta(self, kl: float) -> None:
        # PPO paper, section 4: halve or double beta when the KL leaves [target/1.5, target*1.5]
        if kl < self.config.kl_target / 1.5:
            self.kl_beta /= 2.0
        elif kl > self.config.kl_target * 1.5:
            self.kl_beta *= 2.0

    # ------------------------------------------------------------------ using the policy
    @property
    def player(self) -> evaluation.Player:
        """The policy with this agent's observation preprocessing: what acting without training needs."""
        return evaluation.Player(self.policy, self._obs_tensor)

    def predict(self, obs: Any, *, deterministic: bool = True) -> np.ndarray:
        """Action(s) for one observation or a batch, as the env expects them."""
        space = self.envs.single_observation_space
        return evaluation.predict(self.player, obs, space, deterministic=deterministic, generator=self.generator)

    def sample_episodes(self, n_episodes: int, *, deterministic: bool = False) -> list[dict[str, Any]]:
        """Play ``n_episodes`` whole episodes with the current policy in the training envs, without training.

        Returns one dict per episode: ``return``, ``length`` and what the env reported at its end
        (TextRLHF-v0: ``prompt``, ``completion``, ``score``, ...). The envs are reset afterwards, so
        the next rollout starts fresh episodes.
        """
        _check_count("n_episodes", n_episodes, example="10")
        found = evaluation.sample_episodes(self.player, self.envs, n_episodes, deterministic=deterministic,
                                           generator=self.generator, end_info=self._episode_end_info)
        self._start_fresh_episodes()
        self._fresh = True
        return found

    def evaluate(
        self, n_episodes: int = 10, *, env: gym.Env | None = None, deterministic: bool = True, seed: int | None = None
    ) -> tuple[float, float]:
        """Mean and std of the undiscounted return over ``n_episodes`` on a separate env.

        Without ``env``, a copy of the training env: ``gym.make(id, **env_kwargs)`` for an id, ``gym.make(spec)``
        (or a deep copy, without a spec) for an env object. Token envs (a sequence-model policy) play their
        episodes batched in a KV-cached vector env sharing the trained model and its frozen reference,
        with the KL coefficient frozen at its current value. Episode ``k`` starts from ``reset(seed=seed + k)``
        (default seed: ``config.seed + 1_000_000``) and stochastic actions come from a generator seeded
        with ``seed``: the same call gives the same result, and training's random streams are left alone.
        """
        _check_count("n_episodes", n_episodes, example="10")
        seed = self.config.seed + 1_000_000 if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an integer >= 0 or None, e.g. seed=0")
        play = {"seed": seed, "deterministic": deterministic, "generator": torch.Generator().manual_seed(seed)}
        if env is None and self._sequence_policy:
            if not self._built_from_id:
                # a ready token VectorEnv: its settings are only trusted when made from an id by this agent
                raise ValueError("this agent's env cannot be rebuilt from its id alone; pass evaluate(env=...)")
            returns = evaluation.token_env_returns(self.player, self.envs, n_episodes, **play)
            return float(np.mean(returns)), float(np.std(returns))
        if isinstance(env, VectorEnv) or (env is not None and not isinstance(env, gym.Env)):
            raise ValueError(f"evaluate(env={env!r}) needs a single gymnasium.Env (not a VectorEnv), or env=None")
        owned = env is None
        env = self._evaluation_env() if env is None else env
        try:
            returns = evaluation.single_env_returns(
                self.player, env, n_episodes, space=self.envs.single_observation_space, **play
            )
        finally:
            if owned:
                env.close()
        return float(np.mean(returns)), float(np.std(returns))

    def _evaluation_env(self) -> gym.Env:
        """A fresh single env like the training one (for evaluate); ValueError when none can be made."""
        if self._built_from_id:
            return gym.make(self.env_id, **self.env_kwargs)
        made = single_env_copy(self._source_env if self._source_env is not None else self.envs)
        if made is None:
            raise ValueError("this agent's env cannot be rebuilt or copied for evaluation; pass evaluate(env=...)")
        return made

    # ------------------------------------------------------------------ checkpoints
    def training_state(self) -> dict[str, Any]:
        """Where the run stands (progress, schedule, the observation to act on, episodes in flight):
        what a checkpoint needs beyond weights, optimizer, statistics, RNGs and the envs' own state."""
        return {
            "built_from_id": self._built_from_id,
            "progress": {
                "global_step": self.global_step, "iteration": self.iteration, "kl_beta": self.kl_beta,
                "schedule": self._schedule, "episodes": list(self.tracker.finished),
                "nonfinite_streak": self.nonfinite_steps.streak,
            },
            "rollout": {"next_obs": self._next_obs, "reset_pending": self._reset_pending, "fresh": self._fresh,
                        **{k: v for k, v in self.tracker.state_dict().items() if k != "episodes"}},
        }

    def load_progress(self, progress: dict[str, Any]) -> None:
        """Inverse of ``training_state()["progress"]``."""
        self.global_step, self.iteration = int(progress["global_step"]), int(progress["iteration"])
        self.kl_beta, self._schedule = float(progress["kl_beta"]), tuple(progress["schedule"])
        self.tracker.load_state_dict({"episodes": progress["episodes"]})
        self.nonfinite_steps.streak = int(progress.get("nonfinite_streak", 0))

    def load_rollout(self, rollout: dict[str, Any]) -> None:
        """Inverse of ``training_state()["rollout"]``: continue the episodes in flight where they were."""
        self._next_obs, self._reset_pending = rollout["next_obs"], rollout["reset_pending"]
        self._fresh = bool(rollout.get("fresh", False))
        self.tracker.load_state_dict(rollout)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write everything needed to continue this run exactly, atomically.

        In a data-parallel run every rank calls it; rank 0 writes one file holding each rank's envs and
        random streams, which :meth:`load` resumes at the same or another world size.

        Refuses (NonFiniteError) weights or optimizer state holding NaN / inf, leaving a checkpoint
        already at ``path`` untouched. :func:`agents.checkpoint.describe` lists what the file holds.
        """
        state = checkpoint.agent_state(self)
        checkpoint.gather_ranks(state, self.group)  # data-parallel: every rank's envs and RNGs, to rank 0
        checkpoint.check_finite(state, path)  # the same verdict on every rank: the weights are shared
        if self.group.is_main:  # rank 0 alone writes
            checkpoint.save_checkpoint(state, path)
        self.group.barrier()  # the file is complete before any rank goes on (and may load it)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], env: str | gym.Env | VectorEnv | None = None,
        *, logdir: str | os.PathLike[str] | None = None,
    ) -> PPO:
        """Rebuild an agent from :meth:`save`; ``learn`` then continues the same run.

        ``env`` must have the checkpoint's observation and action spaces (SpaceMismatchError otherwise).
        """
        state = checkpoint.load_checkpoint(path)
        env_kwargs = state.get("env_kwargs", {})
        if env is None:
            if not state["built_from_id"] or env_kwargs is None:
                made_from = "an env object, not an id" if not state["built_from_id"] else "env_kwargs holding objects"
                raise ValueError(
                    f"checkpoint {os.fspath(path)!r} was trained on {made_from}; "
                    "build the same env again and pass PPO.load(path, env=...)"
                )
            env = state["env_id"]
        agent = cls(
            env, checkpoint.saved_config(state, path), logdir=logdir,
            env_kwargs=env_kwargs if isinstance(env, str) else None,
        )
        checkpoint.restore_agent(agent, state, path)
        return agent

    def save_pretrained(self, directory: str | os.PathLike[str], *, merged: bool = False) -> None:
        """Write the trained language model (and its tokenizer) for transformers / peft to load.

        Full fine-tuning writes a plain transformers directory. Under LoRA the adapters are written
        in peft's format (``PeftModel.from_pretrained(base, directory)``); ``merged=True`` writes
        instead a plain transformers model with the adapters merged into the weights (made on a copy:
        the agent keeps training with its adapters).
        """
        from textenv.models import quiet_transformers

        model = getattr(self.policy, "model", None)
        if model is None or not hasattr(model, "save_pretrained"):
            raise ValueError("save_pretrained needs a language-model policy (a TextRLHF-v0 env); use save() instead")
        adapters = getattr(self.policy, "adapters", None)
        if merged and adapters is None:
            raise ValueError("save_pretrained(merged=True) merges LoRA adapters; this agent has none "
                             "(PPOConfig.lora_r=0): call save_pretrained(directory)")
        with quiet_transformers():
            if adapters is None:
                model.save_pretrained(directory)
            elif merged:
                copy.deepcopy(adapters).merge_and_unload().save_pretrained(directory)
            else:
                adapters.save_pretrained(directory)
            tokenizer = getattr(self.envs, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)

    def close(self) -> None:
        self.envs.close()
        self.logger.close()


def _adam(params: list[torch.nn.Parameter], *, lr: float, eps: float) -> torch.optim.Adam:
    # the fused kernel is ~6x faster than the for-each one on a 135M-parameter model on CPU
    try:
        optimizer = torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, TypeError):  # older torch or a device without a fused Adam
        return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)
    # the fused kernel writes in place without bumping the tensors' version counters; an env that
    # watches them (TextRLHF-v0 refreshes its KV cache when the policy changes) must see every step
    optimizer.register_step_post_hook(lambda *_: torch.autograd.graph.increment_version(params))
    return optimizer


def _explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    variance = target.var().item()
    return float("nan") if variance == 0 else 1.0 - (target - predicted).var().item() / variance


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=int(total), unit="step", dynamic_ncols=True)


def _check_count(name: str, value: Any, *, example: str) -> None:
    """ValueError unless ``value`` is an int >= 1 (a bool is not a count)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer, e.g. {name}={example}")
