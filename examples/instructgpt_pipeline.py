"""The InstructGPT pipeline end to end on SmolLM2-135M-Instruct: SFT -> reward model -> PPO.

    python examples/instructgpt_pipeline.py                         # ~20 minutes on one core
    python examples/instructgpt_pipeline.py --sft-minutes 1 --rm-minutes 1 --ppo-minutes 2 --samples 16

Stage 1 fine-tunes the model on the shipped demonstrations (agents/data/sft_train.jsonl), stage 2
trains a reward model from the SFT model on the shipped preferences (concise, on-topic answers over
rambling, prompt-echoing or off-topic ones; a preference VADER does not see), stage 3 runs PPO in
TextRLHF-v0 with that reward model as the reward and as the critic's starting trunk. Prints the
RM's held-out accuracy, the RM score of completions to held-out prompts before and after PPO, the
KL, a few completions, and writes a PNG of the three stages' curves.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import textenv  # registers TextRLHF-v0
from agents import PPO, PPOConfig, reward_model, sft

DATA = Path(__file__).resolve().parent.parent / "agents" / "data"
ENV = {"temperature": 0.7, "max_new_tokens": 32, "kl_coef": 0.05}


def held_out_prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in (DATA / "sft_eval.jsonl").read_text().splitlines() if line]


def train_prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in (DATA / "sft_train.jsonl").read_text().splitlines() if line]


def sample_scores(model_dir: str, rm_dir: str, n: int, seed: int, title: str) -> tuple[float, float, list[dict]]:
    """RM scores of ``n`` completions of ``model_dir`` to held-out prompts: mean, standard error, episodes."""
    envs = gym.make_vec("TextRLHF-v0", num_envs=16, model=model_dir, reward=rm_dir, prompts=held_out_prompts(), **ENV)
    agent = PPO(envs, PPOConfig(seed=seed, num_envs=16, torch_threads=1))
    episodes = agent.sample_episodes(n)
    agent.close()
    scores = np.array([e["score"] for e in episodes])
    mean, sem = float(scores.mean()), float(scores.std(ddof=1) / np.sqrt(len(scores)))
    print(f"{title}: mean RM score {mean:+.3f} +/- {sem:.3f} (s.e.) over {len(scores)} held-out completions")
    for e in episodes[:4]:
        print(f"  [{e['score']:+.2f}] {e['prompt']!r} -> {e['completion']!r}")
    return mean, sem, episodes


def run_ppo(sft_dir: str, rm_dir: str, minutes: float, seed: int, logdir: str) -> tuple[PPO, list[dict], float]:
    envs = gym.make_vec("TextRLHF-v0", num_envs=16, model=sft_dir, reward=rm_dir, prompts=train_prompts(), **ENV)
    config = PPOConfig(critic="separate", critic_model=rm_dir, seed=seed, torch_threads=1, gae_lambda=1.0,
                       update_epochs=2)
    agent = PPO(envs, config, logdir=logdir)
    history, start = [], time.perf_counter()
    # stop before an iteration that would end past the budget (judged by the mean iteration so far)
    while not history or (time.perf_counter() - start) * (len(history) + 1) / len(history) <= 60 * minutes:
        agent.learn(1, progress=False)
        history.append(dict(agent.last_stats))
        stats = history[-1]
        print(f"ppo iteration {len(history):3d}  score {stats['objective/score']:+.3f}  "
              f"kl {stats['objective/kl']:5.2f} nats  length {stats['objective/completion_length']:4.1f}  "
              f"{time.perf_counter() - start:5.0f} s", flush=True)
    return agent, history, time.perf_counter() - start


def save_plot(sft_history: list, rm_history: list, ppo_history: list, before: float, path: Path) -> bool:
    """The three stages' curves in one PNG; False (and a note) without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("no plot: matplotlib is not installed (pip install -e '.[examples]')")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot([h["step"] for h in sft_history], [h["loss"] for h in sft_history])
    axes[0].set(xlabel="step", ylabel="completion cross-entropy", title="1. SFT")
    axes[1].plot([h["step"] for h in rm_history], [h["loss"] for h in rm_history], label="loss")
    axes[1].plot([h["step"] for h in rm_history], [h["objective/accuracy"] for h in rm_history], label="batch accuracy")
    axes[1].set(xlabel="step", title="2. reward model")
    axes[1].legend()
    steps = range(1, len(ppo_history) + 1)
    axes[2].plot(steps, [h["objective/score"] for h in ppo_history], marker="o", label="RM score (training batch)")
    axes[2].axhline(before, color="gray", linestyle="--", label="SFT model, held-out prompts")
    twin = axes[2].twinx()
    twin.plot(steps, [h["objective/kl"] for h in ppo_history], color="tab:red", alpha=0.6, label="KL")
    twin.set_ylabel("KL (nats per completion)", color="tab:red")
    axes[2].set(xlabel="PPO iteration", ylabel="RM score", title="3. PPO")
    axes[2].legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="starting causal LM (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", default="runs/instructgpt", help="SFT / RM outputs and TensorBoard logs")
    parser.add_argument("--sft-minutes", type=float, default=3.0)
    parser.add_argument("--rm-minutes", type=float, default=3.5)
    parser.add_argument("--ppo-minutes", type=float, default=9.5)
    parser.add_argument("--samples", type=int, default=64, help="held-out completions scored before and after PPO")
    parser.add_argument("--plot", default="benchmarks/results/instructgpt_pipeline.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir)
    base = args.model or str(textenv.embedded_model_dir())
    times = {}

    start = time.perf_counter()
    sft_config = sft.SFTConfig(learning_rate=3e-5, batch_size=8, num_epochs=4, max_minutes=args.sft_minutes,
                               seed=args.seed)
    sft_metrics = sft.train(base, DATA / "sft_train.jsonl", output_dir=work / "sft", config=sft_config,
                            eval_data=DATA / "sft_eval.jsonl", logdir=str(work / "tb_sft"), progress=False)
    times["sft"] = time.perf_counter() - start
    print(f"SFT: {sft_metrics['steps']} steps, held-out completion loss {sft_metrics['eval_loss_before']:.3f} -> "
          f"{sft_metrics['eval_loss']:.3f} ({times['sft'] / 60:.1f} min)", flush=True)

    start = time.perf_counter()
    rm_config = reward_model.RewardModelConfig(learning_rate=3e-5, batch_size=4, num_epochs=1,
                                               max_minutes=args.rm_minutes, seed=args.seed)
    rm_metrics = reward_model.train(work / "sft", DATA / "prefs_train.jsonl", output_dir=work / "rm",
                                    config=rm_config, eval_data=DATA / "prefs_eval.jsonl",
                                    logdir=str(work / "tb_rm"), progress=False)
    times["rm"] = time.perf_counter() - start
    print(f"RM: {rm_metrics['steps']} steps, held-out pairwise accuracy {rm_metrics['eval_accuracy_before']:.3f} -> "
          f"{rm_metrics['eval_accuracy']:.3f}, mean margin {rm_metrics['eval_margin']:+.3f} over "
          f"{rm_metrics['eval_pairs']} pairs ({times['rm'] / 60:.1f} min)", flush=True)

    sft_dir, rm_dir = str(work / "sft"), str(work / "rm")
    before, before_sem, _ = sample_scores(sft_dir, rm_dir, args.samples, args.seed, "before PPO (SFT model)")
    agent, ppo_history, times["ppo"] = run_ppo(sft_dir, rm_dir, args.ppo_minutes, args.seed, str(work / "tb_ppo"))
    agent.save_pretrained(str(work / "ppo"))
    agent.close()
    after, after_sem, _ = sample_scores(str(work / "ppo"), rm_dir, args.samples, args.seed + 1, "after PPO")
    kl3 = float(np.mean([h["objective/kl"] for h in ppo_history[-3:]]))
    print(f"PPO: {len(ppo_history)} iterations in {times['ppo'] / 60:.1f} min; held-out RM score "
          f"{before:+.3f} +/- {before_sem:.3f} -> {after:+.3f} +/- {after_sem:.3f}; KL {kl3:.2f} nats per "
          f"completion (last 3 training batches)")
    print("wall time per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    if save_plot(sft_metrics["history"], rm_metrics["history"], ppo_history, before, Path(args.plot)):
        print(f"plot written to {args.plot}")
    print(f"TensorBoard logs in {work}/tb_*")


if __name__ == "__main__":
    main()
