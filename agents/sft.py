"""Supervised fine-tuning on demonstrations, the first stage of InstructGPT.

    python -m agents.sft MODEL DATA.jsonl --output DIR [--eval-data EVAL.jsonl] [--config key=value ...]

The loss is the mean cross-entropy of the completion tokens only. Prompts are tokenised by
``textenv.prompts.PromptSet`` (the env's own code, chat template included), so the model learns to
answer exactly the token sequences it will see in ``TextRLHF-v0``; each completion ends with the
EOS token that ends an episode there. The output directory loads as ``gym.make("TextRLHF-v0", model=DIR)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from agents.finetune import TrainingConfig, bucket_batches, pad_right, parse_overrides, print_settings, train_loop
from agents.text_data import DataError, Demonstration, load_demonstrations

IGNORE = -100
"""Label of tokens that carry no loss (prompt and padding), as in transformers."""


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning settings (the shared ones are documented on TrainingConfig)."""

    learning_rate: float = 2e-5
    """AdamW step size after warmup."""
    num_epochs: int = 2
    """Passes over the demonstrations."""
    chat_template: bool = True
    """Apply the tokenizer's chat template to prompts as the env does (its ``chat_template`` argument)."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one demonstration and how many of them are the prompt."""

    ids: tuple[int, ...]
    prompt_length: int


def encode(demos: Sequence[Demonstration], tokenizer: Any, *, config: SFTConfig, eos_id: int) -> list[Encoded]:
    """Prompt ids exactly as the env builds them, then the completion ids and EOS, cut at max_length."""
    from textenv.prompts import PromptSet

    plain = [d.prompt for d in demos if isinstance(d.prompt, str)]
    limit = 10 * config.max_length  # over-long prompts are cut below, with their completion
    prompt_ids = iter(PromptSet.build(plain, tokenizer, max_prompt_tokens=limit, chat_template=config.chat_template,
                                      truncate=True).token_ids if plain else [])
    completions = tokenizer([d.completion for d in demos], add_special_tokens=False)["input_ids"]
    encoded = []
    for demo, answer in zip(demos, completions, strict=True):
        prompt = next(prompt_ids) if isinstance(demo.prompt, str) else _conversation_ids(demo.prompt, tokenizer)
        ids = (tuple(prompt) + tuple(answer) + (eos_id,))[: config.max_length]
        if len(ids) <= len(prompt):
            raise DataError(
                f"a demonstration's prompt is {len(prompt)} tokens, leaving no completion token within "
                f"max_length={config.max_length}; raise max_length (prompt {str(demo.prompt)[:60]!r})"
            )
        encoded.append(Encoded(ids, len(prompt)))
    return encoded


def _conversation_ids(messages: tuple[dict[str, str], ...], tokenizer: Any) -> list[int]:
    # the same call PromptSet makes, with the whole conversation before the answer
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("multi-message 'messages' demonstrations need a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on prompt and padding)."""
    ids, mask = pad_right([e.ids for e in examples], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(examples):
        labels[i, e.prompt_length : len(e.ids)] = ids[i, e.prompt_length : len(e.ids)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (completion) tokens; logits ``[B, L, V]``."""
    # the logit at position t predicts token t + 1; float32, as bf16 log-softmax loses the small terms
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sft_loss(logits, batch["labels"])


def evaluate(model: torch.nn.Module, examples: Sequence[Encoded], pad_id: int, batch_size: int) -> float:
    """Completion-token cross-entropy over ``examples`` (token-weighted mean)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            count = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(batch_loss(model, batch)) * count
            tokens += count
    return total / max(tokens, 1)


def train(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    output_dir: str | os.PathLike,
    config: SFTConfig | None = None,
    eval_data: str | os.PathLike | None = None,
    logdir: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the causal LM at ``model`` on the demonstrations in ``data``; save it to ``output_dir``.

    Returns metrics: ``train_loss`` (first and last logged), ``eval_loss`` (before and after, when
    ``eval_data`` is given), ``steps``, ``stopped`` (which budget ended the run), ``seconds`` and the
    per-step ``history``. ``resume=True`` continues from ``output_dir/checkpoint.pt`` exactly.
    """
    from agents.model_io import load_causal_lm, save_model

    config = config or SFTConfig()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    demos = load_demonstrations(data)
    held = load_demonstrations(eval_data) if eval_data is not None else []
    torch.manual_seed(config.seed)
    lm, tokenizer = load_causal_lm(model)
    pad_id, eos_id = _pad_and_eos(lm, tokenizer)
    examples = encode(demos, tokenizer, config=config, eos_id=eos_id)
    held_out = encode(held, tokenizer, config=config, eos_id=eos_id) if held else []
    lengths = [len(e.ids) for e in examples]

    def plan(epoch: int) -> list[list[int]]:
        return bucket_batches(lengths, batch_size=config.batch_size, bucket_size=config.bucket_size,
                              seed=config.seed * 1_000_003 + epoch)

    def step_loss(indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = collate([examples[i] for i in indices], pad_id)
        real = float(batch["attention_mask"].sum())
        return batch_loss(lm, batch), {"charts/padding_fraction": 1 - real / batch["attention_mask"].numel()}

    out = Path(output_dir)
    eval_before = evaluate(lm.eval(), held_out, pad_id, config.batch_size) if held_out and not resume else None
    result = train_loop(model=lm, config=config, plan=plan, step_loss=step_loss, output_dir=out, logdir=logdir,
                        resume=resume, progress=progress, desc="sft")
    save_model(lm, tokenizer, out)
    metrics: dict[str, Any] = {"steps": result.steps, "stopped": result.stopped, "seconds": result.seconds,
                               "examples": len(examples), "history": result.history}
    if result.history:
        metrics["train_loss_first"] = result.history[0]["loss"]
        metrics["train_loss_last"] = result.history[-1]["loss"]
    if held_out:
        metrics["eval_loss_before"] = eval_before
        metrics["eval_loss"] = evaluate(lm, held_out, pad_id, config.batch_size)
    return metrics


def _pad_and_eos(model: torch.nn.Module, tokenizer: Any) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None:
        raise ValueError(
            "the tokenizer and the model have no EOS token, so a completion cannot end; set tokenizer.eos_token"
        )
    pad = tokenizer.pad_token_id
    return (eos if pad is None else pad), eos  # padding is masked out, any id will do


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agents.sft", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a causal LM directory (transformers save_pretrained)")
    parser.add_argument("data", help="demonstrations .jsonl: prompt + completion, or messages")
    parser.add_argument("--output", required=True, help="directory for the fine-tuned model and checkpoint.pt")
    parser.add_argument("--eval-data", default=None, help="held-out demonstrations .jsonl")
    parser.add_argument("--logdir", default=None, help="TensorBoard folder (default: OUTPUT/runs)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="override SFTConfig fields")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = SFTConfig(**parse_overrides(args.config, SFTConfig))
        print_settings("sft settings", {"model": args.model, "data": args.data, "output": args.output,
                                        "eval_data": args.eval_data, "config": config.to_dict()})
        metrics = train(args.model, args.data, output_dir=args.output, config=config, eval_data=args.eval_data,
                        logdir=args.logdir, resume=args.resume, progress=not args.no_progress)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in metrics.items() if k != "history"}
    print(f"sft finished: {summary}; model written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
