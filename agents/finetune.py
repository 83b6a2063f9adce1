"""The training loop that supervised fine-tuning and reward-model training share.

Budgets (epochs, steps, minutes), length-bucketed batch plans, atomic checkpoints with exact resume,
tqdm progress and TensorBoard logging. What a step computes is the caller's ``step_loss``.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT = "checkpoint.pt"
"""File name of the resumable training state inside ``output_dir``."""


@dataclass
class TrainingConfig:
    """Settings shared by ``agents.sft`` and ``agents.reward_model``."""

    learning_rate: float = 2e-5
    """AdamW step size, after a linear warmup over ``warmup_steps``; constant afterwards, so that a
    time budget can stop the run anywhere."""
    warmup_steps: int = 10
    """Optimizer steps of linear learning-rate warmup from 0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    batch_size: int = 8
    """Examples per optimizer step (``agents.reward_model``: prompts per step, each with all its answers)."""
    num_epochs: int = 1
    """Passes over the training data, unless a step or time budget ends the run first."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (counting steps before a resume)."""
    max_minutes: float | None = None
    """Stop once this many minutes of this call have passed (checked before each step)."""
    max_length: int = 256
    """Longest tokenised example; longer ones are cut at the end."""
    max_grad_norm: float = 1.0
    """Gradient norm clipping threshold."""
    disable_dropout: bool = True
    """Train with dropout off (TRL's default for reward models): less noise for small batches."""
    bucket_size: int = 16
    """Length bucketing: each run of ``bucket_size * batch_size`` shuffled examples is sorted by length
    before it is cut into batches, so a batch holds similar lengths and padding stays small."""
    save_steps: int = 50
    """Write the resumable checkpoint every this many steps (and always at the end)."""
    seed: int = 0
    """Seeds the head initialisation, the data order and dropout."""
    torch_threads: int | None = None
    """``torch.set_num_threads`` for this run; None leaves torch's default."""

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "batch_size", "num_epochs", "max_length", "bucket_size", "save_steps"):
            value = getattr(self, name)
            minimum = 0 if name == "warmup_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a number > 0, e.g. {name}=1e-5")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps={self.max_steps!r} must be an integer >= 1 or None (no step budget)")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0):
            raise ValueError(f"max_minutes={self.max_minutes!r} must be a number > 0 or None (no time budget)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_overrides(pairs: Sequence[str], cls: type) -> dict[str, Any]:
    """``["learning_rate=1e-4", "max_steps=10"]`` -> dict, with keys checked against ``cls``'s fields."""
    names = [f.name for f in fields(cls)]
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--config {pair!r} must look like key=value, e.g. learning_rate=1e-5")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"--config key {key!r} is not a {cls.__name__} field; {hint}known: {', '.join(names)}")
        try:
            overrides[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            overrides[key] = raw.strip()
    return overrides


def print_settings(title: str, settings: dict[str, Any]) -> None:
    print(f"{title}:")
    print(json.dumps(settings, indent=2, default=str), flush=True)


def bucket_batches(lengths: Sequence[int], *, batch_size: int, bucket_size: int, seed: int) -> list[list[int]]:
    """Index batches of similar lengths, in an order fixed by ``seed`` (same seed, same batches).

    Shuffle, sort each window of ``bucket_size * batch_size`` by length, cut it into batches, then
    shuffle the batches: randomness of order is kept while padding is mostly gone.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * bucket_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` ids right-padded with ``pad_id`` (or ``fill``) and the explicit attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left and right padding give the same outputs."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class LoopResult:
    steps: int
    stopped: str
    seconds: float
    history: list[dict[str, float]]


def train_loop(
    *,
    model: nn.Module,
    config: TrainingConfig,
    plan: Callable[[int], list[Any]],
    step_loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    output_dir: Path,
    logdir: str | None,
    resume: bool,
    progress: bool,
    desc: str,
) -> LoopResult:
    """Run optimizer steps over ``plan(epoch)`` (the batches of that epoch) until a budget is spent.

    The checkpoint holds weights, optimizer, RNG states, the position in the data and the history,
    so a resumed run takes the same steps on the same batches as one that never stopped.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    position = {"step": 0, "epoch": 0, "batch": 0}
    history: list[dict[str, float]] = []
    checkpoint = output_dir / CHECKPOINT
    if resume:
        history = _restore(checkpoint, model, optimizer, position)
    writer = SummaryWriter(logdir or str(output_dir / "runs"))
    per_epoch = len(plan(0))
    total = config.num_epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    bar = tqdm(total=total, initial=position["step"], desc=desc, disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    stopped = "epochs"
    model.train(not config.disable_dropout)
    while position["epoch"] < config.num_epochs:
        batches = plan(position["epoch"])
        while position["batch"] < len(batches):
            stopped = _budget_spent(config, position["step"], time.perf_counter() - start)
            if stopped:
                break
            _set_lr(optimizer, config, position["step"])
            loss, stats = step_loss(batches[position["batch"]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            position["step"] += 1
            position["batch"] += 1
            record = {"step": position["step"], "loss": float(loss.detach()), "grad_norm": float(grad_norm),
                      "learning_rate": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start} | stats
            history.append(record)
            _log(writer, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if position["step"] % config.save_steps == 0:
                _save(checkpoint, model, optimizer, position, history, config)
        if stopped:
            break
        position["epoch"] += 1
        position["batch"] = 0
        stopped = "epochs"
    bar.close()
    _save(checkpoint, model, optimizer, position, history, config)
    writer.close()
    model.eval()
    return LoopResult(position["step"], stopped or "epochs", time.perf_counter() - start, history)


def _budget_spent(config: TrainingConfig, step: int, elapsed: float) -> str:
    if config.max_steps is not None and step >= config.max_steps:
        return "max_steps"
    if config.max_minutes is not None and elapsed >= 60 * config.max_minutes:
        return "max_minutes"
    return ""


def _set_lr(optimizer: torch.optim.Optimizer, config: TrainingConfig, step: int) -> None:
    scale = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * scale


def _log(writer: Any, record: dict[str, float]) -> None:
    step = int(record["step"])
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
            tag = key if "/" in key else ("losses/" if key == "loss" else "charts/") + key
            writer.add_scalar(tag, value, step)


def _save(path: Path, model: nn.Module, optimizer: Any, position: dict, history: list, config: TrainingConfig) -> None:
    """Write via a temp file in the same folder and ``os.replace``: a kill mid-write keeps the old one."""
    state = {"kind": "finetune", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "position": dict(position), "history": history, "config": config.to_dict(),
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _restore(path: Path, model: nn.Module, optimizer: Any, position: dict) -> list[dict[str, float]]:
    if not path.is_file():
        raise ValueError(f"resume=True but {str(path)!r} does not exist; run once without resume to start")
    try:
        # our own file, holding RNG states (numpy, Python) that need a full unpickle
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"checkpoint {str(path)!r} is unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("kind") != "finetune":
        raise ValueError(f"{str(path)!r} is not an agents.sft / agents.reward_model checkpoint")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    position.update(state["position"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return list(state["history"])
