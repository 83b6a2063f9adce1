"""Command line: ``python -m agents.train ENV_ID [--total-timesteps N] [--config key=value ...] [--env-kwargs ...]``.

Trains PPO with the env's tuned preset (printed at start), evaluates the deterministic policy,
and optionally saves a checkpoint. Every PPOConfig field can be overridden with ``--config``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from typing import Any

from agents.config import PPOConfig, check_field_name, field_names, load_preset, resolve_config
from agents.ppo import PPO


def parse_overrides(pairs: Sequence[str], *, option: str = "--config") -> dict[str, Any]:
    """``["learning_rate=1e-3", "hidden_sizes=(64,64)"]`` -> dict; values parsed as Python literals.

    ``--config`` keys must be PPOConfig fields; ``--env-kwargs`` keys go to the env as they are.
    """
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            example = "learning_rate=3e-4" if option == "--config" else "max_new_tokens=32"
            raise ValueError(f"{option} {pair!r} must look like key=value, e.g. {example}")
        if option == "--config":
            check_field_name(key.strip())
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()  # bare words such as advantage=mc stay strings
        overrides[key.strip()] = value
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agents.train", description=__doc__.splitlines()[0])
    parser.add_argument("env_id", help="a registered Gymnasium id, e.g. CartPole-v1")
    parser.add_argument("--total-timesteps", type=int, default=None, help="env steps (default: the preset's)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's or 0)")
    parser.add_argument("--num-envs", type=int, default=None, help="parallel envs (default: the preset's)")
    parser.add_argument("--logdir", default=None, help="TensorBoard folder (default: runs/ENV_ID__SEED)")
    parser.add_argument("--save", default=None, help="write a checkpoint here at the end")
    parser.add_argument("--eval-episodes", type=int, default=20, help="deterministic evaluation episodes")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--config", nargs="*", default=[], metavar="KEY=VALUE",
        help=f"override PPOConfig fields; known keys: {', '.join(field_names())}",
    )
    parser.add_argument(
        "--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
        help="arguments for the env's constructor, e.g. model=path/to/model reward=sentiment max_new_tokens=32",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = parse_overrides(args.config)
        env_kwargs = parse_overrides(args.env_kwargs, option="--env-kwargs")
        if args.seed is not None:
            overrides["seed"] = args.seed
        if args.num_envs is not None:
            overrides["num_envs"] = args.num_envs
        if args.env_id.startswith("TextRLHF"):
            import textenv  # noqa: F401  registers the text env ids
        preset = load_preset(args.env_id)
        config = resolve_config(args.env_id, PPOConfig(**overrides))
        total = args.total_timesteps or (preset or {}).get("total_timesteps", 100_000)
        print(f"preset for {args.env_id}: {'none (general defaults)' if preset is None else 'agents/presets'}")
        print(json.dumps({"total_timesteps": total, "config": config.to_dict()}, indent=2))
        logdir = args.logdir or f"runs/{args.env_id}__{config.seed}"
        agent = PPO(args.env_id, config, logdir=logdir, env_kwargs=env_kwargs)
        agent.learn(total, progress=not args.no_progress)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mean, std = agent.evaluate(n_episodes=args.eval_episodes)
    print(f"evaluation over {args.eval_episodes} episodes: {mean:.1f} +/- {std:.1f} (TensorBoard logs in {logdir})")
    if args.save:
        agent.save(args.save)
        print(f"checkpoint written to {args.save}")
    agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
