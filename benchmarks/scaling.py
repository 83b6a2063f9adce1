"""Data-parallel scaling on this machine: the same PPO on 1 and 2 processes (torchrun, gloo).

Run it from the repository root with both cores idle::

    python benchmarks/scaling.py                 # CartPole steps/s and tiny-text rollout tokens/s
    python benchmarks/scaling.py --procs 1 2 --cartpole-steps 40000

Each configuration is one ``torchrun --standalone --nproc_per_node N`` run (plain ``python`` for 1),
every rank with one torch thread and its own envs (weak scaling: the per-rank work is fixed, so N
ranks do N times the work per iteration). What it measures, after one warm-up iteration:

* CartPole-v1: the preset's PPO (8 envs per rank, 32 steps, 10 epochs); env steps per second over
  all ranks, rollouts and updates included.
* TextRLHF-v0 on a tiny Llama (2 layers, width 64, word-level vocabulary, random weights) at 16
  envs per rank, 16 new tokens, no EOS stop: rollout tokens/s over all ranks and s / iteration.

Scaling efficiency = (rate on N processes / N) / (rate on 1 process). The table goes to stdout and
``<out>/scaling.md``. Two processes on a 2-core machine share memory bandwidth and the gloo
all-reduce runs on the same cores, so the efficiency here is a floor for machines with a core (or a
GPU) per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(kind: str, out: Path, steps: int, iterations: int, model_dir: str | None) -> None:
    """One rank: time ``iterations`` PPO iterations after a warm-up; rank 0 writes the rates."""
    import torch

    torch.set_num_threads(1)
    from agents import PPO, PPOConfig

    if kind == "cartpole":
        agent = PPO("CartPole-v1", PPOConfig(num_envs=8, seed=0, torch_threads=1))
        agent.learn(agent.config.batch_size * agent.group.world_size, progress=False)  # warm-up
        start_step, start = agent.global_step, time.perf_counter()
        agent.learn(steps, progress=False)
        elapsed = time.perf_counter() - start
        record = {"steps_per_s": (agent.global_step - start_step) / elapsed}
    else:
        import gymnasium as gym
        from gymnasium.vector import AutoresetMode

        import textenv  # noqa: F401
        from textenv.testing import SAMPLE_PROMPTS

        envs = gym.make_vec("TextRLHF-v0", num_envs=16, model=model_dir, reward="length", max_new_tokens=16,
                            prompts=list(SAMPLE_PROMPTS), eos_token_id=[], autoreset_mode=AutoresetMode.DISABLED)
        agent = PPO(envs, PPOConfig(num_steps=16, whole_episodes=True, update_epochs=4, num_minibatches=2,
                                    learning_rate=1e-4, seed=0, torch_threads=1))
        rollout_s, iteration_s = [], []
        for i in range(iterations + 1):
            start = time.perf_counter()
            with torch.inference_mode():
                last_value = agent.collect_rollout()
            rolled = time.perf_counter()
            agent.buffer.compute_advantages(last_value, gamma=1.0, gae_lambda=0.95, estimator="gae")
            agent.update()
            if i:  # the first is the warm-up
                rollout_s.append(rolled - start)
                iteration_s.append(time.perf_counter() - start)
        world = agent.group.world_size
        rollout = agent.group.sum(sorted(rollout_s)[len(rollout_s) // 2]).item() / world  # ranks' mean median
        record = {"tokens_per_s": 16 * 16 * world / rollout, "iteration_s": sorted(iteration_s)[len(iteration_s) // 2]}
    if agent.group.is_main:
        (out / f"{kind}.json").write_text(json.dumps(record))


def run(kind: str, procs: int, args: argparse.Namespace, model_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = [__file__, "_worker", kind, tmp, str(args.cartpole_steps), str(args.iterations), model_dir]
        launcher = [sys.executable] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run(launcher + script, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(tmp) / f"{kind}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--cartpole-steps", type=int, default=40_000, help="timed CartPole steps (all ranks)")
    parser.add_argument("--iterations", type=int, default=5, help="timed text iterations after a warm-up")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    from textenv.testing import make_tiny_model_dir

    model_dir = str(make_tiny_model_dir(Path(tempfile.mkdtemp(prefix="scaling_")), arch="llama", seed=0,
                                        n_layer=2, n_embd=64))
    rows = {n: {"cartpole": run("cartpole", n, args, model_dir), "text": run("text", n, args, model_dir)}
            for n in args.procs}
    base = rows[min(args.procs)]
    lines = ["| processes | CartPole steps/s | efficiency | text rollout tok/s | efficiency | text s / iteration |",
             "|---|---|---|---|---|---|"]
    for n, row in rows.items():
        scale = n / min(args.procs)
        cart = row["cartpole"]["steps_per_s"] / scale / base["cartpole"]["steps_per_s"]
        text = row["text"]["tokens_per_s"] / scale / base["text"]["tokens_per_s"]
        lines.append(f"| {n} | {row['cartpole']['steps_per_s']:,.0f} | {cart:.0%} | "
                     f"{row['text']['tokens_per_s']:,.0f} | {text:.0%} | {row['text']['iteration_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.md").write_text(
        f"Data-parallel scaling, {os.cpu_count()} cores, gloo, one torch thread per rank (weak scaling: "
        f"8 CartPole envs or 16 text envs per rank).\n\n{table}\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind, out, steps, iterations, model_dir = sys.argv[2:7]
        worker(kind, Path(out), int(steps), int(iterations), model_dir)
    else:
        main()
