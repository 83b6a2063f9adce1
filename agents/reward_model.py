"""Reward-model training on human preferences, the second stage of InstructGPT.

    python -m agents.reward_model MODEL PREFS.jsonl --output DIR [--eval-data EVAL.jsonl] [--config key=value ...]

A transformers sequence classifier with one output, initialised from a causal LM directory (the
SFT model) with a fresh score head. Each record is a pair or a K-way ranking; a ranking gives all
C(K, 2) pairs, and their loss ``-log sigmoid(r_better - r_worse)`` is averaged per prompt, with all
answers to one prompt in one batch (InstructGPT section 3.5: each answer is scored once, and the
pairs of a prompt, being correlated, do not overfit the way shuffled pairs do).

The score is read at the last real token, located from the attention mask. The text scored is
``prompt + " " + completion`` tokenised with the tokenizer's defaults, the string the env's
``textenv.rewards.RewardModel`` builds (its default ``separator``), so ``reward=DIR`` in
``TextRLHF-v0`` reads the number trained here, and ``PPOConfig(critic_model=DIR)`` starts the
critic from this trunk.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agents.finetune import (
    TrainingConfig,
    bucket_batches,
    pad_right,
    parse_overrides,
    print_settings,
    train_loop,
)
from agents.text_data import Comparison, load_comparisons, split_by_prompt
from textenv.rewards import classifier_logits

SEPARATOR = " "
"""Between prompt and completion: the default ``separator`` of ``textenv.rewards.RewardModel``."""


@dataclass
class RewardModelConfig(TrainingConfig):
    """Reward-model settings (the shared ones are documented on TrainingConfig)."""

    learning_rate: float = 1e-5
    """AdamW step size after warmup."""
    batch_size: int = 4
    """Prompts per optimizer step, each with all of its ranked answers."""
    num_epochs: int = 1
    """Passes over the comparisons; InstructGPT trains one, as the RM overfits after that."""
    eval_fraction: float = 0.1
    """Without ``eval_data``: this fraction of the prompts (with all their records) is held out."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) or not (
            0 <= self.eval_fraction < 1
        ):
            raise ValueError(f"eval_fraction={self.eval_fraction!r} must be a number in [0, 1), e.g. 0.1")


def texts_of(comparison: Comparison) -> list[str]:
    """The strings the env's RewardModel scores for each answer of ``comparison``."""
    return [comparison.prompt + SEPARATOR + answer for answer in comparison.ranked]


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` scores read at each row's last real token: what the env's ``RewardModel`` computes.

    The position comes from the attention mask, never from the pad id (pad == EOS in many models,
    and a text may end with it).
    """
    if not isinstance(getattr(model, "score", None), nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear 'score' head; use a decoder-only classifier")
    return classifier_logits(model, input_ids, attention_mask)[:, 0].float()


def ranking_loss(scores: torch.Tensor, num_answers: Sequence[int]) -> torch.Tensor:
    """Mean over prompts of the mean over all C(K, 2) pairs of ``-log sigmoid(r_better - r_worse)``.

    ``scores`` holds the answers of each prompt in turn, best first; ``num_answers`` their K per prompt.
    """
    losses = []
    for group in torch.split(scores, list(num_answers)):
        better, worse = torch.triu_indices(len(group), len(group), offset=1, device=group.device)
        losses.append(-F.logsigmoid(group[better] - group[worse]).mean())
    return torch.stack(losses).mean()


def pair_margins(scores: torch.Tensor, num_answers: Sequence[int]) -> torch.Tensor:
    """``r_better - r_worse`` for every pair of every prompt, concatenated."""
    margins = []
    for group in torch.split(scores, list(num_answers)):
        better, worse = torch.triu_indices(len(group), len(group), offset=1, device=group.device)
        margins.append(group[better] - group[worse])
    return torch.cat(margins)


class Tokenised:
    """Token ids of every answer of every comparison, computed once."""

    def __init__(self, comparisons: Sequence[Comparison], tokenizer: Any, max_length: int) -> None:
        self.comparisons = list(comparisons)
        flat = [text for c in self.comparisons for text in texts_of(c)]
        ids = tokenizer(flat)["input_ids"] if flat else []
        self.ids: list[list[list[int]]] = []
        for c in self.comparisons:
            self.ids.append([row[:max_length] for row in ids[: len(c.ranked)]])
            ids = ids[len(c.ranked) :]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        rows = [row for i in indices for row in self.ids[i]]
        ids, mask = pad_right(rows, self.pad_id)
        return ids, mask, [len(self.ids[i]) for i in indices]

    def lengths(self) -> list[int]:
        return [max(len(r) for r in rows) for rows in self.ids]


def evaluate(model: nn.Module, data: Tokenised, batch_size: int = 8) -> dict[str, float]:
    """Held-out pairwise ``accuracy`` (r_better > r_worse), mean ``margin`` and ``loss`` over all pairs."""
    margins, losses = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data.comparisons), batch_size):
            ids, mask, counts = data.batch(range(start, min(start + batch_size, len(data.comparisons))))
            scores = sequence_scores(model, ids, mask)
            margins.append(pair_margins(scores, counts))
            losses.append(-F.logsigmoid(margins[-1]))
    if not margins:
        return {"accuracy": math.nan, "margin": math.nan, "loss": math.nan, "pairs": 0}
    margin = torch.cat(margins)
    return {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
            "loss": float(torch.cat(losses).mean()), "pairs": int(margin.numel())}


def train(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    output_dir: str | os.PathLike,
    config: RewardModelConfig | None = None,
    eval_data: str | os.PathLike | None = None,
    logdir: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a reward model from the causal LM at ``model`` on the comparisons in ``data``.

    Held-out comparisons come from ``eval_data`` or, without it, from ``config.eval_fraction`` of
    the prompts. Returns metrics: ``eval_accuracy``, ``eval_margin``, ``eval_loss`` (and their
    ``*_before`` values), ``train_loss_first`` / ``train_loss_last``, ``steps``, ``stopped``,
    ``seconds``, ``history``. Writes a sequence-classification directory to ``output_dir``.
    """
    from agents.model_io import load_reward_model_init, save_model

    config = config or RewardModelConfig()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    comparisons = load_comparisons(data)
    if eval_data is not None:
        held = load_comparisons(eval_data)
    else:
        comparisons, held = split_by_prompt(comparisons, config.eval_fraction, config.seed)
    torch.manual_seed(config.seed)  # the fresh score head
    rm, tokenizer = load_reward_model_init(model)
    train_set = Tokenised(comparisons, tokenizer, config.max_length)
    held_set = Tokenised(held, tokenizer, config.max_length)
    lengths = train_set.lengths()

    def plan(epoch: int) -> list[list[int]]:
        return bucket_batches(lengths, batch_size=config.batch_size, bucket_size=config.bucket_size,
                              seed=config.seed * 1_000_003 + epoch)

    def step_loss(indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask, counts = train_set.batch(indices)
        scores = sequence_scores(rm, ids, mask)
        with torch.no_grad():
            margins = pair_margins(scores, counts)
        stats = {"objective/accuracy": float((margins > 0).float().mean()), "objective/margin": float(margins.mean())}
        return ranking_loss(scores, counts), stats

    before = evaluate(rm, held_set) if not resume else {}
    result = train_loop(model=rm, config=config, plan=plan, step_loss=step_loss, output_dir=Path(output_dir),
                        logdir=logdir, resume=resume, progress=progress, desc="reward model")
    save_model(rm, tokenizer, output_dir)
    after = evaluate(rm, held_set)
    metrics: dict[str, Any] = {"steps": result.steps, "stopped": result.stopped, "seconds": result.seconds,
                               "train_comparisons": len(comparisons), "eval_comparisons": len(held),
                               "eval_pairs": after["pairs"], "history": result.history}
    metrics |= {f"eval_{k}": v for k, v in after.items() if k != "pairs"}
    metrics |= {f"eval_{k}_before": v for k, v in before.items() if k != "pairs"}
    if result.history:
        metrics["train_loss_first"] = result.history[0]["loss"]
        metrics["train_loss_last"] = result.history[-1]["loss"]
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agents.reward_model", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a causal LM directory to start from, e.g. the SFT output")
    parser.add_argument("data", help="preferences .jsonl: prompt + chosen + rejected, or prompt + ranked (best first)")
    parser.add_argument("--output", required=True, help="directory for the reward model and checkpoint.pt")
    parser.add_argument("--eval-data", default=None, help="held-out preferences .jsonl (default: eval_fraction)")
    parser.add_argument("--logdir", default=None, help="TensorBoard folder (default: OUTPUT/runs)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override RewardModelConfig fields")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = RewardModelConfig(**parse_overrides(args.config, RewardModelConfig))
        print_settings("reward model settings", {"model": args.model, "data": args.data, "output": args.output,
                                                 "eval_data": args.eval_data, "config": config.to_dict()})
        metrics = train(args.model, args.data, output_dir=args.output, config=config, eval_data=args.eval_data,
                        logdir=args.logdir, resume=args.resume, progress=not args.no_progress)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"reward model finished: held-out accuracy {metrics['eval_accuracy']:.3f}, mean margin "
          f"{metrics['eval_margin']:+.3f} over {metrics['eval_pairs']} pairs, {metrics['steps']} steps; "
          f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
