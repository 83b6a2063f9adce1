"""Command line: ``python -m agents.train ENV_ID [--total-timesteps N] [--config key=value ...] [--env-kwargs ...]``.

Trains PPO with the env's tuned preset (printed at start), optionally saves a checkpoint, then evaluates
the deterministic policy. Every PPOConfig field can be overridden with ``--config``. A mistake in the
arguments, the config or the env's kwargs is one ``error: ...`` line and exit code 2, before any model
loads; an error during training or evaluation is one such line and exit code 1.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import gymnasium as gym

from agents.config import PPOConfig, check_field_name, field_names, load_preset, resolve_config
from agents.envs import check_env_id, check_env_kwargs
from agents.errors import CheckpointError
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


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``error: ...`` line (exit 2), like the other checks."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see python -m agents.train --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m agents.train", description=__doc__.splitlines()[0])
    parser.add_argument("env_id", help="a registered Gymnasium id, e.g. CartPole-v1")
    parser.add_argument("--total-timesteps", type=int, default=None, help="env steps (default: the preset's)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's or 0)")
    parser.add_argument("--num-envs", type=int, default=None, help="parallel envs (default: the preset's)")
    parser.add_argument("--logdir", default=None, help="TensorBoard folder (default: runs/ENV_ID__SEED)")
    parser.add_argument("--save", default=None, help="write a checkpoint here after training (before evaluating)")
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


# what a user's mistake raises: bad values, env errors (textenv's derive from gymnasium.error.Error),
# unreadable checkpoints; each becomes one "error: ..." line instead of a traceback
USER_ERRORS = (ValueError, TypeError, gym.error.Error, CheckpointError)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; under ``torchrun`` every rank runs it and rank 0 alone prints (and writes --save)."""
    if int(os.environ.get("RANK", "0")) > 0:
        with contextlib.redirect_stdout(io.StringIO()):
            return _main(argv)
    return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad command line (2), already printed
        return int(exit_.code or 0)
    try:
        config, env_kwargs, total = _prepare(args)
        logdir = args.logdir or f"runs/{args.env_id}__{config.seed}"
        agent = PPO(args.env_id, config, logdir=logdir, env_kwargs=env_kwargs)
    except USER_ERRORS as error:  # before any training
        return _fail(error)
    try:
        agent.learn(total, progress=not args.no_progress)
        if args.save:  # before evaluating: a failing evaluation must not lose the run
            agent.save(args.save)
            print(f"checkpoint written to {args.save}")
        mean, std = agent.evaluate(n_episodes=args.eval_episodes)
    except USER_ERRORS as error:
        return _fail(error, code=1)
    finally:
        agent.close()
    print(f"evaluation over {args.eval_episodes} episodes: {mean:.1f} +/- {std:.1f} (TensorBoard logs in {logdir})")
    return 0


def _prepare(args: argparse.Namespace) -> tuple[PPOConfig, dict[str, Any], int]:
    """Every check that needs no env: arguments, config, env kwargs; prints the run's settings."""
    for name in ("total_timesteps", "eval_episodes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be a positive integer, e.g. 1000")
    overrides = parse_overrides(args.config)
    env_kwargs = parse_overrides(args.env_kwargs, option="--env-kwargs")
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.num_envs is not None:
        overrides["num_envs"] = args.num_envs
    if args.env_id.startswith("TextRLHF"):
        import textenv  # noqa: F401  registers the text env ids
    check_env_id(args.env_id)
    preset = load_preset(args.env_id)
    config = resolve_config(args.env_id, PPOConfig(**overrides))
    check_env_kwargs(args.env_id, env_kwargs, config.vectorization)
    if args.save and Path(args.save).is_dir():
        raise ValueError(f"--save {args.save} is a directory; pass a file path such as {Path(args.save) / 'agent.pt'}")
    total = args.total_timesteps or (preset or {}).get("total_timesteps", 100_000)
    print(f"preset for {args.env_id}: {'none (general defaults)' if preset is None else 'agents/presets'}")
    print(json.dumps({"total_timesteps": total, "config": config.to_dict()}, indent=2))
    rounding = rollout_rounding(total, config)
    if rounding:
        print(rounding)
    return config, env_kwargs, total


def rollout_rounding(total: int, config: PPOConfig) -> str | None:
    """The line saying how ``total`` env steps round up to whole rollouts, or None when they divide."""
    batch = config.batch_size
    rollouts = -(-total // batch)
    shape = f"{config.num_envs} envs x {config.num_steps} steps"
    if config.whole_episodes:  # only the steps of each env's one episode count
        return (f"total_timesteps {total} -> whole rollouts of up to {shape} = {batch} steps: at least {rollouts} "
                f"rollouts, stopping at the first rollout end at or after step {total} "
                "(episodes that end early count only their own steps)")
    if total % batch == 0:
        return None
    return f"total_timesteps {total} -> {rollouts * batch} ({rollouts} rollouts of {shape})"


def _fail(error: BaseException, code: int = 2) -> int:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
