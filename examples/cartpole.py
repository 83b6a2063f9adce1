"""Train PPO on CartPole-v1 with its tuned preset, evaluate it, save and reload it.

    python examples/cartpole.py [--total-timesteps 100000]
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse

from agents import PPO, PPOConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-timesteps", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--checkpoint", default="cartpole.pt")
    args = parser.parse_args()

    agent = PPO("CartPole-v1", PPOConfig(seed=args.seed), logdir="runs/cartpole")
    agent.learn(total_timesteps=args.total_timesteps)
    mean_return, std_return = agent.evaluate(n_episodes=20)
    print(f"evaluation: {mean_return:.1f} +/- {std_return:.1f} over 20 episodes")

    agent.save(args.checkpoint)
    reloaded = PPO.load(args.checkpoint)
    print(f"reloaded from {args.checkpoint}: step {reloaded.global_step}, evaluation {reloaded.evaluate(5)[0]:.1f}")


if __name__ == "__main__":
    main()
