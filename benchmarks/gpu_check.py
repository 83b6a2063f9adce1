"""GPU check, under 5 minutes on one GPU: CartPole, then one text PPO iteration on SmolLM2 and on a ~1B Llama.

    python benchmarks/gpu_check.py                  # on cuda (the default device)
    python benchmarks/gpu_check.py --device cpu --quick   # the script itself, on a tiny model, anywhere
    python benchmarks/gpu_check.py --mixed-precision bf16  # the text rows again with bf16 autocast

Prints one table: CartPole steps/s and evaluation return after 50k steps; for each text model, a
warm-up iteration and then one timed PPO iteration at batch 64 (32 new tokens, no EOS stop, 4 epochs,
minibatches of 16): rollout tokens/s, s / iteration and peak GPU memory (``max_memory_allocated``).
The ~1B model is ``llama-1b`` of ``benchmarks/text_ppo.py`` (Llama-3.2-1B's shape, SmolLM2's
vocabulary, random weights: cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def cartpole(device: str, steps: int) -> dict:
    from agents import PPO, PPOConfig

    agent = PPO("CartPole-v1", PPOConfig(seed=1, device=device))
    start = time.perf_counter()
    agent.learn(steps, progress=False)
    elapsed = time.perf_counter() - start
    mean, _ = agent.evaluate(n_episodes=10)
    return {"what": f"CartPole-v1, {steps:,} steps", "steps/s": agent.global_step / elapsed, "return": mean}


def text_iteration(name: str, model_dir: str, device: str, batch: int, mixed_precision: str = "no") -> dict:
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    import textenv  # noqa: F401
    from agents import PPO, PPOConfig

    envs = gym.make_vec("TextRLHF-v0", num_envs=batch, model=model_dir, reward="sentiment", max_new_tokens=32,
                        eos_token_id=[], autoreset_mode=AutoresetMode.DISABLED, device=device)
    agent = PPO(envs, PPOConfig(num_steps=32, update_epochs=4, num_minibatches=max(1, batch // 16),
                                learning_rate=1e-5, seed=0, device=device, mixed_precision=mixed_precision))

    def iteration() -> tuple[float, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            last_value = agent.collect_rollout()
        _sync(agent.device)
        rolled = time.perf_counter()
        agent.buffer.compute_advantages(last_value, gamma=1.0, gae_lambda=0.95, estimator="gae")
        agent.update()
        _sync(agent.device)
        return rolled - start, time.perf_counter() - start

    iteration()  # warm-up (and the first update, after which the reference runs its own forwards)
    if agent.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(agent.device)
    rollout_s, iteration_s = iteration()
    parameters = sum(p.numel() for p in agent.policy.parameters())
    precision = "" if mixed_precision == "no" else f", {mixed_precision} autocast"
    return {"what": f"{name} ({parameters / 1e6:,.0f}M), batch {batch}{precision}", "tok/s": batch * 32 / rollout_s,
            "s/iteration": iteration_s, "peak GiB": peak_memory_gib(agent.device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: checks the script")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="PPOConfig.mixed_precision of the text rows")
    args = parser.parse_args()
    from text_ppo import build_llama

    import textenv

    rows = [cartpole(args.device, 2_000 if args.quick else 50_000)]
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.quick:
        from textenv.testing import make_tiny_model_dir

        models = {"tiny llama": str(make_tiny_model_dir(tmp / "tiny", arch="llama", seed=0, n_layer=2, n_embd=32))}
    else:
        models = {"SmolLM2-135M": str(textenv.embedded_model_dir()),
                  "llama-1b": str(build_llama(tmp / "llama-1b", textenv.embedded_model_dir(), "llama-1b"))}
    for name, directory in models.items():
        rows.append(text_iteration(name, directory, args.device, 8 if args.quick else args.batch,
                                   args.mixed_precision))
    print(f"| run ({args.device}) | steps/s or rollout tok/s | s / iteration | peak GPU GiB | eval return |")
    print("|---|---|---|---|---|")
    for row in rows:
        rate = row.get("steps/s", row.get("tok/s"))
        peak = row.get("peak GiB")
        print(f"| {row['what']} | {rate:,.0f} | {row.get('s/iteration', float('nan')):.2f} | "
              f"{'-' if peak is None else f'{peak:.1f}'} | {row.get('return', '-')} |")


if __name__ == "__main__":
    main()
