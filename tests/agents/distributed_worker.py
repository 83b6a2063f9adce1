"""One rank of a data-parallel run, started by tests/agents/test_distributed.py under torchrun.

``python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_worker.py SCENARIO OUT ...``;
each rank writes ``OUT/rank<r>.json`` (and what the scenario saves) for the test to compare.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agents import PPO, PPOConfig


def flat_parameters(agent: PPO) -> list[float]:
    return torch.cat([p.detach().flatten() for p in agent.policy.parameters()]).tolist()


def group_facts() -> dict:
    """What says the ranks form one process group (two runs with equal seeds would look alike)."""
    token = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(token)  # 1 + 2 only if both ranks take part in one group
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "rank_sum": float(token)}


def cartpole_updates(out: Path) -> None:
    """A few updates on CartPole; a checkpoint; the rank that asks to stop stops every rank."""
    agent = PPO("CartPole-v1", PPOConfig(num_envs=2, num_steps=32, num_minibatches=2, update_epochs=2, seed=5))
    start = flat_parameters(agent)
    first_obs: list[float] = []

    def record_and_stop(a: PPO) -> bool:
        if not first_obs:
            first_obs.extend(a.buffer.obs[:4].flatten().tolist())
        return not (dist.get_rank() == 1 and a.iteration == 3)  # rank 1 alone asks to stop

    agent.learn(64 * 2 * 10, progress=False, callback=record_and_stop)
    agent.save(out / "agent.pt")
    facts = group_facts() | {"start": start, "end": flat_parameters(agent), "first_obs": first_obs,
                             "iteration": agent.iteration, "global_step": agent.global_step}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(facts))


def text_updates(out: Path, model_dir: str) -> None:
    """A few updates of a tiny language model on TextRLHF-v0 (the DDP-wrapped LM actor-critic)."""
    import gymnasium as gym

    from textenv import AdaptiveKLController
    from textenv.testing import SAMPLE_PROMPTS

    # an adaptive KL coefficient moves with each rank's episodes: the ranks must agree on it
    controller = AdaptiveKLController(init_kl_coef=0.1, target=0.01, horizon=20)
    envs = gym.make_vec("TextRLHF-v0", num_envs=2, model=model_dir, reward="length", prompts=list(SAMPLE_PROMPTS),
                        max_new_tokens=4, kl_coef=controller)
    # PPO-ptx: each rank's pre-training batch differs, and its gradient must be averaged like the rest;
    # checkpointing: the tied output layer's gradient is written into .grad outside autograd's own
    # accumulation, and DDP must still average it (the uneven-minibatch worker runs without)
    agent = PPO(envs, PPOConfig(num_steps=4, whole_episodes=True, update_epochs=2, num_minibatches=2,
                                learning_rate=1e-3, seed=2, ptx_coef=0.5, ptx_data=list(SAMPLE_PROMPTS),
                                gradient_checkpointing=True))
    assert agent.policy.sliced_scores and agent.policy.head.output.weight.requires_grad
    start = flat_parameters(agent)
    agent.learn(3 * agent.config.batch_size, progress=False)
    responses = agent.buffer.actions.flatten().tolist()
    prompts = [envs.prompts.index(episode["prompt"]) for episode in agent.sample_episodes(6)]
    facts = group_facts() | {"start_sum": sum(start), "end": flat_parameters(agent), "tokens": responses,
                             "iteration": agent.iteration, "kl_coef": envs.kl_coef,
                             "shard": list(envs.prompt_shard), "prompts": prompts,
                             "ptx_loss": agent.last_stats["losses/ptx_loss"]}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(facts))


def one_update(out: Path, rollout_file: str) -> None:
    """One update on this rank's half of a rollout that one process collected with every env."""
    saved = torch.load(rollout_file, weights_only=False)
    world_size = int(os.environ["WORLD_SIZE"])  # set by torchrun; the group forms inside PPO
    config = PPOConfig.from_dict({**saved["config"], "num_envs": saved["num_envs"] // world_size})
    agent = PPO("CartPole-v1", config)
    agent.policy.load_state_dict(saved["policy"])
    width = agent.num_envs
    columns = slice(dist.get_rank() * width, (dist.get_rank() + 1) * width)
    for name, value in saved["buffer"].items():
        setattr(agent.buffer, name, value[:, columns].clone())
    agent.update()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(group_facts() | {"end": flat_parameters(agent)}))


def cartpole_learning(out: Path) -> None:
    """CartPole with its preset at 4 envs per rank (8 in all, as the 1-process preset)."""
    agent = PPO("CartPole-v1", PPOConfig(num_envs=4, seed=1))
    agent.learn(50_000, progress=False)
    mean, _ = agent.evaluate(n_episodes=20)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(group_facts() | {"eval": mean,
                                                                                 "steps": agent.global_step}))


def uneven_minibatches(out: Path, model_dir: str) -> None:
    """One update where rank 1's rollout holds one trained episode (1 minibatch) and rank 0's two (2)."""
    import gymnasium as gym

    from textenv.testing import SAMPLE_PROMPTS

    envs = gym.make_vec("TextRLHF-v0", num_envs=2, model=model_dir, reward="length", prompts=list(SAMPLE_PROMPTS),
                        max_new_tokens=4)
    agent = PPO(envs, PPOConfig(num_steps=4, whole_episodes=True, update_epochs=2, num_minibatches=2,
                                learning_rate=1e-3, seed=2))
    start = flat_parameters(agent)
    with torch.inference_mode():
        last_value = agent.collect_rollout()
    if dist.get_rank() == 1:
        agent.buffer.mask[:, 1] = 0  # env 1's episode is not trained on
    agent.buffer.compute_advantages(last_value, gamma=1.0, gae_lambda=0.95, estimator="gae")
    stats = agent.update()
    facts = group_facts() | {"start": start, "end": flat_parameters(agent), "approx_kl": stats["losses/approx_kl"]}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(facts))


def cuda_updates(out: Path) -> None:
    """A few CartPole updates with the policy on each rank's GPU: gradients go over NCCL."""
    agent = PPO("CartPole-v1", PPOConfig(num_envs=2, num_steps=32, num_minibatches=2, update_epochs=2, seed=5,
                                         device="cuda"))
    agent.learn(64 * 2 * 3, progress=False)
    facts = group_facts() | {"end": flat_parameters(agent), "device": str(agent.device),
                             "backend": str(dist.get_backend())}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(facts))


def join_reduce_and_exit(out: Path) -> None:
    """Join through the library, reduce a few times, return: the process must then exit cleanly."""
    from agents.distributed import process_group

    group = process_group()
    for _ in range(50):
        group.sum(torch.ones(1000))
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(group_facts()))


if __name__ == "__main__":
    scenario, out, *rest = sys.argv[1:]
    torch.set_num_threads(1)
    {"cartpole": cartpole_updates, "text": text_updates, "one_update": one_update,
     "learning": cartpole_learning, "exit": join_reduce_and_exit, "cuda": cuda_updates,
     "uneven": uneven_minibatches}[scenario](Path(out), *rest)
