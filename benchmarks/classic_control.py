"""Classic-control benchmark: this project's PPO against Stable-Baselines3's PPO (RL-Zoo settings).

Run it from the repository root::

    python benchmarks/classic_control.py                      # 3 envs x 5 seeds x both agents
    python benchmarks/classic_control.py --envs CartPole-v1 --seeds 3 --agents ours
    python benchmarks/classic_control.py --stop-when-solved --set learning_rate=0.002   # tuning sweep

What it measures, for every (agent, env, seed), each in its own subprocess pinned to one core
(``taskset -c <core>``, ``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), run one after another:

* steps to solve: the first env step (all envs summed) at which the mean return of the last 20
  finished training episodes reaches the threshold (CartPole-v1 475, Acrobot-v1 -100,
  Pendulum-v1 -200);
* wall seconds to solve: from the start of ``learn()`` to that step (``time.perf_counter()`` is
  recorded after every vector-env step, so both agents are timed at the exact step);
* steps/second over the whole fixed budget of ``learn()`` (so SPS compares like with like);
* final evaluation: mean return of 20 deterministic episodes on a fresh env after training.

Our PPO runs with its preset (``agents/presets/<env>.json``) and the budget below; SB3 runs with the
RL-Zoo hyper-parameters (``SB3_ZOO``). Results: a markdown table on stdout and in
``<out>/classic_control.md``, every run's raw record in ``<out>/runs/*.json`` (plus all of them in
``<out>/classic_control_runs.json``), and the learning curves (median across seeds of the 20-episode
running mean, both agents, one panel per env) in ``<out>/classic_control.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0, "Pendulum-v1": -200.0}
BUDGETS = {"CartPole-v1": 100_000, "Acrobot-v1": 100_000, "Pendulum-v1": 150_000}
WINDOW = 20
EVAL_EPISODES = 20
AGENTS = ("ours", "sb3")
LABELS = {"ours": "ours", "sb3": "SB3 (zoo)"}


def linear(initial: float) -> Callable[[float], float]:
    """RL-Zoo's ``lin_<x>``: decays linearly with SB3's progress_remaining (1 -> 0)."""
    return lambda progress_remaining: progress_remaining * initial


def sb3_zoo(env_id: str) -> dict[str, Any]:
    """RL-Zoo PPO hyper-parameters (hyperparams/ppo.yml); ``n_envs``/``normalize`` are for the vec env."""
    return {
        "CartPole-v1": dict(
            n_envs=8,
            normalize=False,
            n_steps=32,
            batch_size=256,
            gae_lambda=0.8,
            gamma=0.98,
            n_epochs=20,
            ent_coef=0.0,
            learning_rate=linear(1e-3),
            clip_range=linear(0.2),
        ),
        "Acrobot-v1": dict(
            n_envs=16,
            normalize=True,
            n_steps=256,
            gae_lambda=0.94,
            gamma=0.99,
            n_epochs=4,
            ent_coef=0.0,
        ),
        "Pendulum-v1": dict(
            n_envs=4,
            normalize=False,
            n_steps=1024,
            gae_lambda=0.95,
            gamma=0.9,
            n_epochs=10,
            ent_coef=0.0,
            learning_rate=1e-3,
            clip_range=0.2,
            use_sde=True,
            sde_sample_freq=4,
        ),
    }[env_id]


# ---------------------------------------------------------------------------- one run (worker side)
@dataclass
class RunRecord:
    """Everything one (agent, env, seed) run produced."""

    agent: str
    env_id: str
    seed: int
    budget: int
    steps: int = 0
    train_seconds: float = 0.0
    episodes: list[tuple[int, float, float]] = field(default_factory=list)
    """(global step at the episode's end, return, seconds since learn() started)."""
    eval_mean: float = float("nan")
    eval_std: float = float("nan")
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def sps(self) -> float:
        return self.steps / self.train_seconds if self.train_seconds > 0 else float("nan")

    def solve_point(self) -> tuple[int, float] | None:
        """(step, seconds) where the 20-episode running mean first reaches the threshold, or None."""
        threshold = THRESHOLDS[self.env_id]
        returns = [ret for _, ret, _ in self.episodes]
        for k in range(WINDOW - 1, len(returns)):
            if sum(returns[k - WINDOW + 1 : k + 1]) / WINDOW >= threshold:
                return int(self.episodes[k][0]), float(self.episodes[k][2])
        return None


def _solved(episodes: list[tuple[Any, ...]], env_id: str) -> bool:
    """Whether the last 20 episodes (``(step, return, ...)`` tuples) average the threshold."""
    recent = [ret for _, ret, _ in episodes[-WINDOW:]]
    return len(recent) == WINDOW and sum(recent) / WINDOW >= THRESHOLDS[env_id]


class StepClock:
    """Records (env steps so far, perf_counter) after every vector-env step of an agent."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: list[int] = []
        self.times: list[float] = []

    def tick(self, steps: int) -> None:
        self.steps.append(steps)
        self.times.append(time.perf_counter() - self.start)

    def seconds_at(self, step: int) -> float:
        """Seconds since start when the env step count first reached ``step``."""
        i = int(np.searchsorted(np.asarray(self.steps), step, side="left"))
        return self.times[min(i, len(self.times) - 1)]


def run_ours(env_id: str, seed: int, budget: int, overrides: dict[str, Any], stop_when_solved: bool) -> RunRecord:
    """Train our PPO with its preset (plus ``overrides``) for ``budget`` steps."""
    from agents import PPO, PPOConfig

    agent = PPO(env_id, PPOConfig(seed=seed, torch_threads=1, **overrides))
    record = RunRecord("ours", env_id, seed, budget, config=agent.config.to_dict())
    clock = StepClock()
    envs_step = agent.envs.step

    def timed_step(actions: Any) -> Any:  # benchmark-side hook: time every vector step
        out = envs_step(actions)
        clock.tick(agent.global_step + agent.num_envs)
        return out

    agent.envs.step = timed_step  # type: ignore[method-assign]

    def callback(a: Any) -> bool:
        return not (stop_when_solved and _solved(a.episodes[-WINDOW:], env_id))

    clock.start = time.perf_counter()
    agent.learn(total_timesteps=budget, progress=False, callback=callback)
    record.train_seconds = time.perf_counter() - clock.start
    record.steps = agent.global_step
    record.episodes = [(int(s), float(r), clock.seconds_at(s)) for s, r, _ in agent.episodes]
    record.eval_mean, record.eval_std = agent.evaluate(n_episodes=EVAL_EPISODES)
    agent.close()
    return record


def run_sb3(env_id: str, seed: int, budget: int, stop_when_solved: bool) -> RunRecord:
    """Train SB3's PPO with the RL-Zoo settings for ``budget`` steps."""
    import torch
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    hyper = sb3_zoo(env_id)
    n_envs, normalize = hyper.pop("n_envs"), hyper.pop("normalize")
    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed)  # Monitor-wrapped: infos carry "episode"
    if normalize:
        venv = VecNormalize(venv, gamma=hyper["gamma"])
    model = SB3PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **hyper)
    record = RunRecord("sb3", env_id, seed, budget, config={k: repr(v) for k, v in hyper.items()})

    class Episodes(BaseCallback):
        def _on_step(self) -> bool:
            now = time.perf_counter() - start
            before = self.num_timesteps - n_envs  # num_timesteps already counts this vector step
            for i, info in enumerate(self.locals["infos"]):
                if "episode" in info:
                    record.episodes.append((before + i + 1, float(info["episode"]["r"]), now))
            return not (stop_when_solved and _solved(record.episodes[-WINDOW:], env_id))

    start = time.perf_counter()
    model.learn(total_timesteps=budget, callback=Episodes(), progress_bar=False)
    record.train_seconds = time.perf_counter() - start
    record.steps = int(model.num_timesteps)
    record.eval_mean, record.eval_std = _evaluate_sb3(model, venv if normalize else None, env_id, seed)
    return record


def _evaluate_sb3(model: Any, vec_normalize: Any, env_id: str, seed: int) -> tuple[float, float]:
    """Deterministic returns on a fresh env, seeded as our ``PPO.evaluate`` seeds its episodes."""
    import gymnasium as gym

    env, returns = gym.make(env_id), []
    for episode in range(EVAL_EPISODES):
        obs, _ = env.reset(seed=seed + 1_000_000 + episode)
        total, done = 0.0, False
        while not done:
            model_obs = vec_normalize.normalize_obs(obs) if vec_normalize is not None else obs
            action, _ = model.predict(model_obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns)), float(np.std(returns))


def worker_main(argv: list[str]) -> None:
    """Entry point of the subprocess: run one (agent, env, seed) and write its record as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--agent", choices=AGENTS, required=True)
    parser.add_argument("--env", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--stop-when-solved", action="store_true")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.agent == "ours":
        record = run_ours(args.env, args.seed, args.budget, json.loads(args.overrides), args.stop_when_solved)
    else:
        record = run_sb3(args.env, args.seed, args.budget, args.stop_when_solved)
    Path(args.json).write_text(json.dumps(asdict(record)))


# ---------------------------------------------------------------------------- driver side
def launch(
    agent: str,
    env_id: str,
    seed: int,
    budget: int,
    overrides: dict[str, Any],
    *,
    stop_when_solved: bool,
    out: Path,
    core: int,
) -> RunRecord:
    """Run one (agent, env, seed) in a fresh pinned subprocess and load its record."""
    path = out / "runs" / f"{agent}_{env_id}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "taskset",
        "-c",
        str(core),
        sys.executable,
        __file__,
        "_worker",
        "--agent",
        agent,
        "--env",
        env_id,
        "--seed",
        str(seed),
        "--budget",
        str(budget),
        "--overrides",
        json.dumps(overrides),
        "--json",
        str(path),
    ] + (["--stop-when-solved"] if stop_when_solved else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), repo) if p)
    subprocess.run(command, env=env, check=True)
    data = json.loads(path.read_text())
    data["episodes"] = [tuple(e) for e in data["episodes"]]
    return RunRecord(**data)


@dataclass
class Summary:
    """One (agent, env) row of the table, over seeds."""

    runs: list[RunRecord]

    def solve_points(self) -> list[tuple[float, float]]:
        points = [r.solve_point() for r in self.runs]
        return [(float(p[0]), p[1]) if p else (float("inf"), float("inf")) for p in points]

    @property
    def solved(self) -> int:
        return sum(r.solve_point() is not None for r in self.runs)

    @property
    def median_steps(self) -> float:
        return float(np.median([s for s, _ in self.solve_points()]))

    @property
    def median_seconds(self) -> float:
        return float(np.median([t for _, t in self.solve_points()]))

    @property
    def median_sps(self) -> float:
        return float(np.median([r.sps for r in self.runs]))

    def steps_range(self) -> str:
        steps = [s for s, _ in self.solve_points()]
        return f"{_k(min(steps))}-{_k(max(steps))}"

    def eval_text(self) -> str:
        means = [r.eval_mean for r in self.runs]
        return f"{statistics.mean(means):.1f} (min {min(means):.1f})"


def _k(steps: float) -> str:
    return "never" if not np.isfinite(steps) else f"{steps / 1000:.1f}k"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if np.isfinite(a) and np.isfinite(b) and b > 0 else "n/a"


def markdown_table(results: dict[str, dict[str, list[RunRecord]]]) -> str:
    """The results as a markdown table: one row per agent and env, plus the ours/SB3 ratio row."""
    lines = [
        "| env | agent | seeds solved | steps to solve: median [min-max] | wall s to solve (median) "
        "| steps/s (median) | final eval, 20 ep (mean over seeds, worst seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for env_id, by_agent in results.items():
        summaries = {agent: Summary(runs) for agent, runs in by_agent.items() if runs}
        for agent, s in summaries.items():
            lines.append(
                f"| {env_id} | {LABELS[agent]} | {s.solved}/{len(s.runs)} | {_k(s.median_steps)} [{s.steps_range()}] "
                f"| {s.median_seconds:.1f} | {s.median_sps:,.0f} | {s.eval_text()} |"
            )
        if "ours" in summaries and "sb3" in summaries:
            ours, sb3 = summaries["ours"], summaries["sb3"]
            win = ours.median_steps < sb3.median_steps and ours.median_seconds < sb3.median_seconds
            all_solved = ours.solved == len(ours.runs)
            verdict = "target met" if win and all_solved else "TARGET MISSED"
            lines.append(
                f"| {env_id} | **ours/SB3** | {verdict} | {_ratio(ours.median_steps, sb3.median_steps)} "
                f"| {_ratio(ours.median_seconds, sb3.median_seconds)} | {_ratio(ours.median_sps, sb3.median_sps)} | |"
            )
    return "\n".join(lines)


def running_mean_curve(record: RunRecord, grid: np.ndarray) -> np.ndarray:
    """The 20-episode running mean of the training return, as a step function sampled on ``grid``."""
    if len(record.episodes) < 1:
        return np.full(len(grid), np.nan)
    steps = np.array([s for s, _, _ in record.episodes])
    returns = np.array([r for _, r, _ in record.episodes])
    cumsum = np.concatenate([[0.0], np.cumsum(returns)])
    counts = np.minimum(np.arange(1, len(returns) + 1), WINDOW)
    means = (cumsum[1:] - cumsum[np.arange(1, len(returns) + 1) - counts]) / counts
    index = np.searchsorted(steps, grid, side="right") - 1
    return np.where(index >= 0, means[np.clip(index, 0, None)], np.nan)


def plot(results: dict[str, dict[str, list[RunRecord]]], path: Path) -> None:
    """Median (across seeds) running-mean return vs env steps; min-max band; one panel per env."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (env_id, by_agent) in zip(axes[0], results.items(), strict=True):
        budget = max(r.budget for runs in by_agent.values() for r in runs)
        grid = np.linspace(0, budget, 400)
        for agent, runs in by_agent.items():
            if not runs:
                continue
            curves = np.stack([running_mean_curve(r, grid) for r in runs])
            with warnings.catch_warnings():  # all-NaN columns before any episode ended
                warnings.simplefilter("ignore", RuntimeWarning)
                median = np.nanmedian(curves, axis=0)
                low, high = np.nanmin(curves, axis=0), np.nanmax(curves, axis=0)
            line = ax.plot(grid, median, label=f"{LABELS[agent]} (median of {len(runs)})")[0]
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.axhline(THRESHOLDS[env_id], color="grey", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(env_id)
        ax.set_xlabel("environment steps")
        ax.xaxis.set_major_formatter(lambda x, _pos: f"{x / 1000:.0f}k")
        ax.set_ylabel(f"mean return, last {WINDOW} training episodes")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values parsed as JSON when they can be) -> PPOConfig overrides."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def default_budget(env_id: str) -> int:
    """The fixed budget per env (SPS is measured over the same number of steps for both agents)."""
    return BUDGETS[env_id]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(THRESHOLDS), choices=list(THRESHOLDS))
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=AGENTS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--budget", type=int, default=None, help="env steps per run (default: per-env budget)")
    parser.add_argument("--stop-when-solved", action="store_true", help="end each run once solved (tuning sweeps)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override our PPOConfig fields")
    parser.add_argument("--core", type=int, default=1, help="CPU core every run is pinned to")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.set)

    results: dict[str, dict[str, list[RunRecord]]] = {}
    for env_id in args.envs:
        results[env_id] = {agent: [] for agent in args.agents}
        budget = args.budget or default_budget(env_id)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for agent in args.agents:
                record = launch(
                    agent,
                    env_id,
                    seed,
                    budget,
                    overrides if agent == "ours" else {},
                    stop_when_solved=args.stop_when_solved,
                    out=args.out,
                    core=args.core,
                )
                results[env_id][agent].append(record)
                point = record.solve_point()
                print(
                    f"{env_id:12s} {agent:4s} seed {seed}: solved at {_k(point[0]) if point else 'never'}"
                    f"{f' ({point[1]:.1f} s)' if point else ''}, {record.sps:,.0f} steps/s, "
                    f"eval {record.eval_mean:.1f}",
                    file=sys.stderr,
                    flush=True,
                )

    table = markdown_table(results)
    print(table)
    (args.out / "classic_control.md").write_text(table + "\n")
    all_runs = [asdict(r) for by_agent in results.values() for runs in by_agent.values() for r in runs]
    (args.out / "classic_control_runs.json").write_text(json.dumps(all_runs))
    plot(results, args.out / "classic_control.png")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
    else:
        main()
