"""Text PPO benchmark: this project's PPO against TRL 1.12's PPO and plain ``model.generate``.

Run it from the repository root (TRL is needed only here: ``pip install -e .[benchmark]``)::

    python benchmarks/text_ppo.py                                   # every model, batch and agent
    python benchmarks/text_ppo.py --models tiny --batches 16 --agents ours generate
    python benchmarks/text_ppo.py --models smollm2 --batches 16 --iterations 2
    python benchmarks/text_ppo.py --models smollm2 --agents ours --profile   # + cProfile of ours
    python benchmarks/text_ppo.py --agents ours ours-bf16ref trl                # skip plain generate
    python benchmarks/text_ppo.py --models smollm2 --agents ours ours-lora ours-gc trl generate
    python benchmarks/text_ppo.py --models llama-1b --agents ours-lora --iterations 1 --append  # size sweep

Models (offline): SmolLM2-135M-Instruct from ``textenv.embedded_model_dir()``, and a tiny GPT-2
built from a config (2 layers, 4 heads, width 128, SmolLM2's 49,152-token tokenizer and chat
template, random weights with seed 0) in a temporary directory. The tiny model runs at batch 16
and 64, SmolLM2 at batch 16 (``--batches`` narrows this). For the size sweep, ``llama-135m``,
``llama-360m`` and ``llama-1b`` are randomly initialised Llama configs (SmolLM2-135M's, SmolLM2-360M's
and Llama-3.2-1B's shapes with SmolLM2's tokenizer; 135M, 362M and 1.07B parameters): with no EOS
stop every iteration does the same work whatever the weights, so cost is measured without
pretrained weights.

Every (agent, model, batch) runs in its own subprocess, pinned to one core (``taskset -c <core>``,
``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), one after another. Each does one warm-up
iteration and then ``--iterations`` measured ones; the table reports medians. What it measures:

* ours: ``gym.make_vec("TextRLHF-v0", num_envs=B, reward="sentiment", temperature=0.7,
  max_new_tokens=32, kl_coef=0.05)`` with ``agents.PPO`` (32 steps per env per rollout, 4 epochs,
  minibatches of 8 episodes, lr 1e-5), with the TextRLHF-v0 preset's whole-episode rollouts (one
  response per prompt per rollout, disabled autoreset) and, like TRL's figures, no EOS stop
  (``eos_token_id=[]``), so a rollout always produces ``B * 32`` tokens. One iteration =
  ``collect_rollout()`` under ``torch.inference_mode()`` (the rollout) + advantages + ``update()``
  (the optimisation). The warm-up matters: until the first update the env skips the reference
  forward (KL exactly 0). ``ours-bf16ref`` is the same with the env's ``ref_dtype="bfloat16"``
  (the frozen reference stored and run in bfloat16; the policy stays float32). ``ours-gc`` adds
  ``gradient_checkpointing=True`` (activation checkpointing in the update forward);
  ``ours-bf16ref-gc`` has both (full fine-tuning with every memory option on);
  ``ours-bf16ref-gc-mmap`` runs that in a process started with glibc's ``MALLOC_MMAP_THRESHOLD_=524288``
  (an allocator setting of the user's shell, not of the library; TRL is not run with it). ``ours-lora``:
  ``lora_r=16, lora_alpha=32, lora_target_modules="all-linear"``, the reference being the base model
  with the adapters off, scored in the same forward as the policy (peft's mixed-adapter batches);
  ``ours-lora-2fwd`` scores it in a forward of its own instead. The TextRLHF-v0 preset turns on
  activation checkpointing under LoRA for 2/3 of the decoder blocks, so ``ours-lora`` runs those
  settings, as users get them; ``ours-lora-gc`` recomputes every block (``gradient_checkpointing_fraction=1``).
* TRL: ``trl.experimental.ppo.PPOTrainer`` with the settings of the reference figures
  (``../shared/PEERS.md``): batch B, ``num_mini_batches = B / 8``, 4 PPO epochs, 32 response
  tokens, no EOS stop, fp32 on CPU, lr 3e-6, kl_coef 0.05, clip 0.2 / 0.2, vf_coef 0.1, gamma 1,
  lam 0.95, temperature 0.7. Policy, reference, value model (``AutoModelForSequenceClassification``
  from the policy's weights, ``num_labels=1``) and a reward model: by default an ``nn.Module`` around
  the same VADER sentiment reward ours uses (``--trl-reward model`` uses a fourth full model copy, a
  sequence classifier built from the policy's weights, as in a usual TRL setup). Its rollout
  (generation + reference/value/reward passes) is timed from the end of the previous iteration to
  the first forward pass with gradients; the rest, up to ``on_step_end``, is the optimisation.
* generate: ``model.generate(do_sample=True, max_new_tokens=32, min_new_tokens=32,
  temperature=0.7, top_k=0)`` on B chat-formatted prompts, KV cache on: the speed limit of sampling.

Rollout tokens/s = ``B * 32 / rollout seconds``. Peak RSS is the worker's ``VmHWM`` read as it ends
(counted from its ``exec``), so it covers model loading and imports too; the ``ru_maxrss`` of
``os.wait4`` is kept in the raw records but can include the parent's pages at fork time. Results:
a markdown table on stdout and in ``<out>/text_ppo.md``, raw records in ``<out>/text_ppo.json``;
``--profile`` also writes a cProfile summary of our measured iterations to ``<out>/text_ppo_profile_<model>_b<B>.txt``.
``--append`` keeps the rows of earlier invocations in ``text_ppo.json`` (a row measured again is
replaced), so a long sweep can run one model at a time; a row that fails (e.g. out of memory) is
reported and skipped. With several models a second table shows s/iteration and peak RSS per size.
Targets (in the same run): ours vs TRL s/iteration <= 0.5x, peak RSS <= 0.45x, rollout tok/s >= 1.3x;
ours vs plain generate rollout tok/s >= 0.45x; LoRA peak RSS <= 0.25x TRL's (full fine-tuning),
LoRA s/iteration <= ours (full fine-tuning), LoRA rollout tok/s >= 0.8x plain generate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NEW_TOKENS = 32
PPO_EPOCHS = 4
MINIBATCH = 8  # episodes per minibatch: num_minibatches = B / 8
TEMPERATURE = 0.7
KL_COEF = 0.05
# randomly initialised Llama configs for the size sweep (SmolLM2's tokenizer and 49,152-token vocabulary):
# name -> (hidden, layers, heads, kv heads, intermediate, tied embeddings): 135M, 362M and 1.07B parameters
LLAMA_SIZES = {
    "llama-135m": (576, 30, 9, 3, 1536, True),    # SmolLM2-135M's shape
    "llama-360m": (960, 32, 15, 5, 2560, True),   # SmolLM2-360M's shape
    "llama-1b": (2048, 16, 32, 8, 8192, True),    # Llama-3.2-1B's shape
}
MODELS = ("tiny", "smollm2", *LLAMA_SIZES)
AGENTS = ("ours", "ours-bf16ref", "ours-gc", "ours-bf16ref-gc", "ours-bf16ref-gc-mmap", "ours-lora", "ours-lora-2fwd",
          "ours-lora-gc", "trl", "generate")
LABELS = {
    "ours": "ours", "ours-bf16ref": "ours, bf16 reference", "ours-gc": "ours, activation checkpointing",
    "ours-bf16ref-gc": "ours, bf16 reference + activation checkpointing",
    "ours-bf16ref-gc-mmap": "ours, bf16 reference + activation checkpointing, MALLOC_MMAP_THRESHOLD_=512 KiB",
    "ours-lora": "ours, LoRA r=16", "ours-lora-2fwd": "ours, LoRA r=16, reference as a 2nd forward",
    "ours-lora-gc": "ours, LoRA r=16, every block recomputed", "trl": "TRL 1.12", "generate": "generate",
}
# our variants: PPOConfig and env settings on top of the common ones
OURS: dict[str, dict[str, Any]] = {
    "ours": {"config": {}, "env": {}},
    "ours-bf16ref": {"config": {}, "env": {"ref_dtype": "bfloat16"}},
    "ours-gc": {"config": {"gradient_checkpointing": True}, "env": {}},
    "ours-bf16ref-gc": {"config": {"gradient_checkpointing": True}, "env": {"ref_dtype": "bfloat16"}},
    # glibc hands blocks of 512 KiB and more straight back to the system when freed, instead of keeping
    # them in a heap that the update's mix of long- and short-lived tensors leaves full of holes
    "ours-bf16ref-gc-mmap": {"config": {"gradient_checkpointing": True}, "env": {"ref_dtype": "bfloat16"},
                             "process_env": {"MALLOC_MMAP_THRESHOLD_": str(512 * 1024)}},
    "ours-lora": {"config": {"lora_r": 16, "lora_alpha": 32.0, "lora_target_modules": "all-linear"}, "env": {}},
    "ours-lora-2fwd": {"config": {"lora_r": 16, "lora_alpha": 32.0, "lora_target_modules": "all-linear"},
                       "env": {}, "mixed_batches": False},
    # the preset already recomputes 2/3 of the blocks under LoRA: this row recomputes all of them
    "ours-lora-gc": {"config": {"lora_r": 16, "lora_alpha": 32.0, "lora_target_modules": "all-linear",
                                "gradient_checkpointing": True, "gradient_checkpointing_fraction": 1.0}, "env": {}},
}
LORA = ("ours-lora", "ours-lora-2fwd", "ours-lora-gc")
DEFAULT_BATCHES = {"tiny": (16, 64), "smollm2": (16,)} | dict.fromkeys(LLAMA_SIZES, (16,))
# TRL 1.12.0 figures from ../shared/PEERS.md (one core): s/iteration, rollout s, optimise s,
# rollout tok/s, peak RSS GiB; shown for context, the targets compare against TRL in the same run
PEER_TRL = {
    ("smollm2", 16): (105.0, 16.5, 89.0, 31.0, 7.1),
    ("tiny", 16): (8.0, 1.8, 6.1, 283.0, 1.3),
    ("tiny", 64): (29.0, 5.7, 23.5, 360.0, 2.1),
}
GiB = 1024**3
PHASES = ("rollout_s", "optimise_s", "rollout_cpu_s", "optimise_cpu_s", "generate_s")


def now() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): the CPU clock is immune to a busy shared core."""
    return time.perf_counter(), time.process_time()


@dataclass
class Iteration:
    """Seconds of one iteration's phases, wall and CPU (generate_s: the sampling part of the rollout)."""

    rollout_s: float
    optimise_s: float
    rollout_cpu_s: float
    optimise_cpu_s: float
    generate_s: float | None = None

    @classmethod
    def between(cls, start: tuple[float, float], middle: tuple[float, float], end: tuple[float, float],
                generate_s: float | None = None) -> Iteration:
        """Rollout from ``start`` to ``middle``, optimisation from ``middle`` to ``end`` (``now()`` stamps)."""
        return cls(middle[0] - start[0], end[0] - middle[0], middle[1] - start[1], end[1] - middle[1], generate_s)

    @property
    def iteration_s(self) -> float:
        return self.rollout_s + self.optimise_s

    @property
    def iteration_cpu_s(self) -> float:
        return self.rollout_cpu_s + self.optimise_cpu_s


@dataclass
class RunRecord:
    """One (agent, model, batch) subprocess: its measured iterations and its peak memory."""

    agent: str
    model: str
    batch: int
    iterations: list[Iteration] = field(default_factory=list)
    warmup: Iteration | None = None
    peak_rss_bytes: int = 0
    vm_hwm_bytes: int = 0
    core: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str) -> float | None:
        values = [getattr(it, name) for it in self.iterations if getattr(it, name) is not None]
        return statistics.median(values) if values else None

    @property
    def tokens_per_s(self) -> float | None:
        rollout = self.median("rollout_s")
        return self.batch * NEW_TOKENS / rollout if rollout else None

    @property
    def tokens_per_cpu_s(self) -> float | None:
        rollout = self.median("rollout_cpu_s")
        return self.batch * NEW_TOKENS / rollout if rollout else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["iterations"] = [
            asdict(it) | {"iteration_s": it.iteration_s, "iteration_cpu_s": it.iteration_cpu_s}
            for it in self.iterations
        ]
        out["median"] = {name: self.median(name) for name in (*PHASES, "iteration_s", "iteration_cpu_s")}
        out["rollout_tokens_per_s"] = self.tokens_per_s
        out["rollout_tokens_per_cpu_s"] = self.tokens_per_cpu_s
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        def iteration(d: dict[str, Any] | None) -> Iteration | None:
            return None if d is None else Iteration(**{k: d[k] for k in PHASES})

        return cls(
            agent=data["agent"], model=data["model"], batch=data["batch"],
            iterations=[iteration(d) for d in data["iterations"]], warmup=iteration(data.get("warmup")),
            peak_rss_bytes=data.get("peak_rss_bytes", 0), vm_hwm_bytes=data.get("vm_hwm_bytes", 0),
            core=data.get("core"), extra=data.get("extra", {}),
        )


# ---------------------------------------------------------------------------------------------- models
def build_tiny_model(directory: Path, tokenizer_dir: str | os.PathLike[str]) -> Path:
    """A randomly initialised 2-layer GPT-2 (width 128, 4 heads) with SmolLM2's tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=128, n_layer=2, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_llama(directory: Path, tokenizer_dir: str | os.PathLike[str], size: str) -> Path:
    """A randomly initialised Llama of one of ``LLAMA_SIZES`` (seed 0): cost, not quality, is measured."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, intermediate, tied = LLAMA_SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=tied,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"   built {size}: {sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M parameters", flush=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def prompt_ids(tokenizer: Any) -> list[list[int]]:
    """The built-in prompts with the chat template applied, tokenised exactly as the env does it."""
    from textenv.prompts import PromptSet

    return [list(ids) for ids in PromptSet.build(None, tokenizer, max_prompt_tokens=64).token_ids]


def left_padded(rows: list[list[int]], pad_id: int) -> dict[str, Any]:
    """``input_ids`` / ``attention_mask`` tensors with the rows right-aligned (left padding)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------- runners
def run_ours(
    model_dir: str, batch: int, iterations: int, profile_path: Path | None, variant: str = "ours"
) -> RunRecord:
    """Our PPO on the TextRLHF-v0 vector env: rollout and update timed separately."""
    import gymnasium as gym
    import torch
    from gymnasium.vector import AutoresetMode

    import textenv  # noqa: F401  (registers TextRLHF-v0)
    from agents import PPO, PPOConfig

    # as TRL's figures: no EOS stop (every response has 32 tokens); finished rows wait for the batch
    envs = gym.make_vec(
        "TextRLHF-v0", num_envs=batch, model=model_dir, reward="sentiment", temperature=TEMPERATURE,
        max_new_tokens=NEW_TOKENS, kl_coef=KL_COEF, eos_token_id=[], autoreset_mode=AutoresetMode.DISABLED,
        **OURS[variant]["env"],
    )
    config = PPOConfig(
        num_steps=NEW_TOKENS, update_epochs=PPO_EPOCHS, num_minibatches=batch // MINIBATCH,
        learning_rate=1e-5, seed=0, torch_threads=1, **OURS[variant]["config"],
    )
    agent = PPO(envs, config)
    cfg = agent.config
    if OURS[variant].get("mixed_batches", True) is False:  # the reference as a forward of its own
        envs.use_lora_reference(agent.policy.adapters, mixed_batches=False)

    def one_iteration() -> Iteration:
        start = now()
        with torch.inference_mode():
            last_value = agent.collect_rollout()
        rolled = now()
        agent.buffer.compute_advantages(last_value, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, estimator=cfg.advantage)
        agent.update()
        return Iteration.between(start, rolled, now())

    record = RunRecord(variant, "", batch, warmup=one_iteration())
    profiler = _start_profile(profile_path)
    record.iterations = [one_iteration() for _ in range(iterations)]
    _stop_profile(profiler, profile_path)
    trainable = sum(p.numel() for p in agent.policy.parameters() if p.requires_grad)
    record.extra = {"config": {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")},
                    "episodes": len(agent.episodes), "trainable_parameters": trainable,
                    "parameters": sum(p.numel() for p in agent.policy.parameters())}
    envs.close()
    return record


def vader_reward_model(tokenizer: Any) -> Any:
    """An ``nn.Module`` that TRL's ``get_reward`` can call, scoring responses with VADER (as ours does).

    ``get_reward`` runs ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=...)``,
    applies ``model.score`` to the last hidden states and reads position ``[row, last non-pad token]``.
    The "backbone" here decodes each row's response (the tokens after the last assistant header of
    the chat template) and writes its VADER compound score at every position.
    """
    import torch
    from torch import nn
    from transformers.utils import ModelOutput

    from textenv import SentimentReward

    marker = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    sentiment = SentimentReward()

    def response_of(ids: list[int]) -> list[int]:
        for start in range(len(ids) - len(marker), -1, -1):
            if ids[start : start + len(marker)] == marker:
                return ids[start + len(marker):]
        return ids

    class Backbone(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> ModelOutput:
            rows = [response_of(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask, strict=True)]
            texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
            scores = torch.tensor(sentiment([""] * len(texts), texts), dtype=torch.float32)
            hidden = scores[:, None, None].expand(-1, input_ids.shape[1], 1)
            return ModelOutput(hidden_states=(hidden,))

    class VaderReward(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self) -> None:
            super().__init__()
            self.backbone = Backbone()
            self.score = nn.Identity()

    return VaderReward()


def run_trl(model_dir: str, batch: int, iterations: int, reward: str) -> RunRecord:
    """TRL 1.12's PPOTrainer, its phases timed by wrapping two module functions and a callback."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    # SmolLM2 pads with <|im_end|>, which its chat template also uses inside prompts; TRL masks every
    # pad-id token, so pad with <|endoftext|> instead (same compute, sane masks)
    tokenizer.pad_token = "<|endoftext|>"
    dataset = Dataset.from_dict({"input_ids": prompt_ids(tokenizer)})
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    if reward == "vader":
        reward_model = vader_reward_model(tokenizer)
    else:
        reward_model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    for model in (policy, ref, value) + ((reward_model,) if reward != "vader" else ()):
        model.config.pad_token_id = tokenizer.pad_token_id
    output_dir = tempfile.mkdtemp(prefix="trl_ppo_")
    args = PPOConfig(
        output_dir=output_dir, per_device_train_batch_size=batch, num_mini_batches=batch // MINIBATCH,
        num_ppo_epochs=PPO_EPOCHS, response_length=NEW_TOKENS, local_rollout_forward_batch_size=batch,
        learning_rate=3e-6, kl_coef=KL_COEF, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0,
        lam=0.95, temperature=TEMPERATURE, stop_token=None, missing_eos_penalty=None, bf16=False, fp16=False,
        use_cpu=True, total_episodes=batch * (iterations + 1), num_sample_generations=0, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    marks: dict[str, list[Any]] = {"iteration_start": [], "optimise_start": [], "end": [], "generate": []}

    def timed_generation(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        out = original_generation(*a, **kw)
        marks["generate"].append(time.perf_counter() - start)
        return out

    def marked_forward(*a: Any, **kw: Any) -> Any:
        # the first forward with gradients of an iteration is where the optimisation starts
        if torch.is_grad_enabled() and len(marks["optimise_start"]) < len(marks["iteration_start"]):
            marks["optimise_start"].append(now())
        return original_forward(*a, **kw)

    class Marks(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            marks["iteration_start"].append(now())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            stamp = now()
            marks["end"].append(stamp)
            marks["iteration_start"].append(stamp)  # the next iteration starts here

    original_generation, original_forward = trl_ppo.batch_generation, trl_ppo.forward
    trl_ppo.batch_generation, trl_ppo.forward = timed_generation, marked_forward
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward_model,
        train_dataset=dataset, value_model=value, eval_dataset=dataset.select(range(batch)), callbacks=[Marks()],
    )
    trainer.train()
    trl_ppo.batch_generation, trl_ppo.forward = original_generation, original_forward
    shutil.rmtree(output_dir, ignore_errors=True)
    phases = zip(marks["iteration_start"], marks["optimise_start"], marks["end"], marks["generate"], strict=False)
    done = [Iteration.between(start, opt, end, generate_s=gen) for start, opt, end, gen in phases]
    return RunRecord("trl", "", batch, iterations=done[1:], warmup=done[0], extra={"reward": reward})


def run_generate(model_dir: str, batch: int, iterations: int) -> RunRecord:
    """Plain sampling with the KV cache: ``B * 32`` tokens per call, nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = prompt_ids(tokenizer)
    generator = torch.Generator().manual_seed(0)

    def one_call() -> Iteration:
        picks = torch.randint(len(prompts), (batch,), generator=generator).tolist()
        inputs = left_padded([prompts[i] for i in picks], tokenizer.pad_token_id)
        start = now()
        with torch.inference_mode():
            model.generate(
                **inputs, do_sample=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                temperature=TEMPERATURE, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
            )
        end = now()
        return Iteration.between(start, end, end, generate_s=end[0] - start[0])

    record = RunRecord("generate", "", batch, warmup=one_call())
    record.iterations = [one_call() for _ in range(max(iterations, 3))]
    return record


def _start_profile(path: Path | None) -> Any:
    if path is None:
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _stop_profile(profiler: Any, path: Path | None) -> None:
    if profiler is None or path is None:
        return
    import io
    import pstats

    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    path.write_text(text.getvalue())


def vm_hwm_bytes() -> int:
    """This process's peak resident set (``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(argv: list[str]) -> None:
    """Subprocess entry point: one (agent, model, batch), its record written to ``--json``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--agent", choices=AGENTS, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--trl-reward", default="vader")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.agent in OURS:
        record = run_ours(args.model_dir, args.batch, args.iterations, args.profile, args.agent)
    elif args.agent == "trl":
        record = run_trl(args.model_dir, args.batch, args.iterations, args.trl_reward)
    else:
        record = run_generate(args.model_dir, args.batch, args.iterations)
    record.model, record.vm_hwm_bytes = args.model, vm_hwm_bytes()
    args.json.write_text(json.dumps(record.to_dict(), indent=1))


# ---------------------------------------------------------------------------------------------- parent
def run_subprocess(agent: str, model: str, model_dir: str, batch: int, args: argparse.Namespace) -> RunRecord:
    """Run one configuration pinned to one core; its peak RSS comes from ``os.wait4``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        command = [
            "taskset", "-c", str(args.core), sys.executable, __file__, "_worker", "--agent", agent,
            "--model", model, "--model-dir", model_dir, "--batch", str(batch),
            "--iterations", str(args.iterations), "--trl-reward", args.trl_reward, "--json", str(out),
        ]
        if args.profile and agent in OURS:
            command += ["--profile", str(args.out / f"text_ppo_profile_{model}_b{batch}.txt")]
        env = os.environ | {
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        } | OURS.get(agent, {}).get("process_env", {})
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0 or not out.exists():
            raise RuntimeError(f"{agent} {model} batch {batch} failed (exit {process.returncode})")
        record = RunRecord.from_dict(json.loads(out.read_text()))
    # the worker's own VmHWM (counted from its exec); ru_maxrss may include the parent's pages at fork time
    record.extra["ru_maxrss_bytes"] = usage.ru_maxrss * 1024  # kilobytes on Linux
    record.peak_rss_bytes = record.vm_hwm_bytes or record.extra["ru_maxrss_bytes"]
    record.core = args.core
    record.extra["wall_s"] = time.perf_counter() - start
    return record


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def markdown_table(records: list[RunRecord]) -> str:
    """One block of rows per (model, batch): each agent, TRL's reference figures, then the ratios."""
    lines = [
        "| model | batch | agent | rollout tok/s (per CPU s) | rollout s (of which generate) | optimise s "
        "| s / iteration | CPU s / iteration | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], dict[str, RunRecord]] = {}
    for record in records:
        groups.setdefault((record.model, record.batch), {})[record.agent] = record
    for (model, batch), by_agent in groups.items():
        row = f"| {model} | {batch} |"
        for agent in AGENTS:
            r = by_agent.get(agent)
            if r is None:
                continue
            trains = agent != "generate"
            generate = r.median("generate_s") if agent == "trl" else None
            lines.append(
                f"{row} {LABELS[agent]} | {_fmt(r.tokens_per_s, 0)} ({_fmt(r.tokens_per_cpu_s, 0)}) | "
                f"{_fmt(r.median('rollout_s'), 2)}{f' ({generate:.2f})' if generate else ''} | "
                f"{_fmt(r.median('optimise_s') if trains else None, 2)} | "
                f"{_fmt(r.median('iteration_s') if trains else None, 2)} | "
                f"{_fmt(r.median('iteration_cpu_s') if trains else None, 2)} | {r.peak_rss_bytes / GiB:.2f} |"
            )
        peer = PEER_TRL.get((model, batch))
        if peer is not None:
            s_iter, rollout, optimise, tokens, rss = peer
            lines.append(f"{row} TRL, PEERS.md figures | {tokens:.0f} | {rollout} | {optimise} | {s_iter} | | {rss} |")
        lines += ratio_rows(row, by_agent)
    return "\n".join(lines)


# targets of the ratio rows: (rollout tok/s, s / iteration, peak RSS) against TRL, and against other rows
TRL_TARGETS = {"ours": (">= 1.3x", "<= 0.5x", "<= 0.45x"), "ours-bf16ref-gc": ("", "", "<= 0.45x"),
               "ours-bf16ref-gc-mmap": ("", "", "<= 0.45x"),
               "ours-lora": ("", "", "<= 0.25x")}
GENERATE_TARGETS = {"ours": ">= 0.45x", "ours-lora": ">= 0.8x"}
VS_OURS_TARGETS = {"ours-lora": "<= 1.0x"}  # s / iteration of LoRA against our full fine-tuning


def _target(text: str) -> str:
    return f" ({text})" if text else ""


def ratio_rows(row: str, by_agent: dict[str, RunRecord]) -> list[str]:
    """Each of our variants against TRL and plain generate, and the memory options against full ``ours``."""
    lines = []
    trl, gen, full = by_agent.get("trl"), by_agent.get("generate"), by_agent.get("ours")
    for variant in OURS:
        ours, label = by_agent.get(variant), LABELS[variant]
        if ours is None:
            continue
        tok_t, iter_t, rss_t = TRL_TARGETS.get(variant, ("", "", ""))
        if trl:
            lines.append(
                f"{row} **{label} / TRL** | {_ratio(ours.tokens_per_s, trl.tokens_per_s)} "
                f"({_ratio(ours.tokens_per_cpu_s, trl.tokens_per_cpu_s)}){_target(tok_t)} | "
                f"{_ratio(ours.median('rollout_s'), trl.median('rollout_s'))} | "
                f"{_ratio(ours.median('optimise_s'), trl.median('optimise_s'))} | "
                f"{_ratio(ours.median('iteration_s'), trl.median('iteration_s'))}{_target(iter_t)} | "
                f"{_ratio(ours.median('iteration_cpu_s'), trl.median('iteration_cpu_s'))} | "
                f"{_ratio(ours.peak_rss_bytes, trl.peak_rss_bytes)}{_target(rss_t)} |"
            )
        if gen:
            lines.append(
                f"{row} **{label} / generate** | {_ratio(ours.tokens_per_s, gen.tokens_per_s)} "
                f"({_ratio(ours.tokens_per_cpu_s, gen.tokens_per_cpu_s)}){_target(GENERATE_TARGETS.get(variant, ''))}"
                " | | | | | |"
            )
        if full and variant != "ours":
            lines.append(
                f"{row} **{label} / ours** | {_ratio(ours.tokens_per_s, full.tokens_per_s)} | "
                f"{_ratio(ours.median('rollout_s'), full.median('rollout_s'))} | "
                f"{_ratio(ours.median('optimise_s'), full.median('optimise_s'))} | "
                f"{_ratio(ours.median('iteration_s'), full.median('iteration_s'))}"
                f"{_target(VS_OURS_TARGETS.get(variant, ''))} | "
                f"{_ratio(ours.median('iteration_cpu_s'), full.median('iteration_cpu_s'))} | "
                f"{_ratio(ours.peak_rss_bytes, full.peak_rss_bytes)} |"
            )
    return lines


def size_sweep_table(records: list[RunRecord]) -> str:
    """Cost against model size: s / iteration and peak RSS per model and agent, one row per model."""
    agents = [a for a in AGENTS if a != "generate" and any(r.agent == a for r in records)]
    by_model: dict[tuple[str, int], dict[str, RunRecord]] = {}
    for record in records:
        by_model.setdefault((record.model, record.batch), {})[record.agent] = record
    lines = ["| model | parameters | batch | " + " | ".join(f"{LABELS[a]}: s / it, GiB" for a in agents) + " |",
             "|---|---|---|" + "---|" * len(agents)]
    for (model, batch), by_agent in by_model.items():
        sizes = [r.extra.get("parameters") for r in by_agent.values() if r.extra.get("parameters")]
        cells = []
        for agent in agents:
            r = by_agent.get(agent)
            cells.append("-" if r is None else f"{_fmt(r.median('iteration_s'), 1)} s, {r.peak_rss_bytes / GiB:.2f}")
        size = f"{sizes[0] / 1e6:,.0f}M" if sizes else "-"
        lines.append(f"| {model} | {size} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def configurations(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(model, batch) pairs: ``--batches`` if given (for every model), else each model's defaults."""
    return [(m, b) for m in args.models for b in (args.batches or DEFAULT_BATCHES[m])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="rollout batch sizes (multiples of 8); default: 16 and 64 for tiny, 16 for smollm2")
    parser.add_argument("--agents", nargs="+", choices=AGENTS, default=list(AGENTS))
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations after one warm-up")
    parser.add_argument("--core", type=int, default=1, help="the CPU core every subprocess is pinned to")
    parser.add_argument("--trl-reward", choices=("vader", "model"), default="vader",
                        help="TRL's reward model: VADER in an nn.Module (as ours), or a 4th full model copy")
    parser.add_argument("--profile", action="store_true", help="cProfile our measured iterations")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of <out>/text_ppo.json from earlier runs (same rows are replaced)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if any(b % MINIBATCH for b in args.batches or ()):
        parser.error(f"--batches must be multiples of {MINIBATCH} (minibatches of {MINIBATCH} episodes)")
    args.out.mkdir(parents=True, exist_ok=True)

    import textenv

    smollm2_dir = str(textenv.embedded_model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="text_ppo_tiny_"))
    def built(name: str, build: Callable[[Path], Path]) -> Callable[[], str]:
        directory = tmp / name
        return lambda: str(directory if (directory / "config.json").exists() else build(directory))

    model_dirs: dict[str, Callable[[], str]] = {
        "smollm2": lambda: smollm2_dir,
        "tiny": built("tiny", lambda d: build_tiny_model(d, smollm2_dir)),
    } | {size: built(size, lambda d, size=size: build_llama(d, smollm2_dir, size)) for size in LLAMA_SIZES}
    raw = args.out / "text_ppo.json"
    records: list[RunRecord] = []
    if args.append and raw.exists():  # an earlier invocation's rows stay, unless measured again now
        records = [RunRecord.from_dict(d) for d in json.loads(raw.read_text())]
    try:
        for model, batch in configurations(args):
            for agent in args.agents:
                print(f"== {agent} {model} batch {batch} (core {args.core})", flush=True)
                try:
                    record = run_subprocess(agent, model, model_dirs[model](), batch, args)
                except RuntimeError as failure:  # e.g. out of memory: the other rows still run
                    print(f"   {failure}", flush=True)
                    continue
                print(f"   rollout {_fmt(record.median('rollout_s'), 2)} s, {_fmt(record.tokens_per_s, 0)} tok/s, "
                      f"iteration {_fmt(record.median('iteration_s'), 2)} s, "
                      f"peak RSS {record.peak_rss_bytes / GiB:.2f} GiB", flush=True)
                records = [r for r in records if (r.agent, r.model, r.batch) != (agent, model, batch)] + [record]
                raw.write_text(json.dumps([r.to_dict() for r in records], indent=1))  # kept if a later row fails
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = markdown_table(records)
    if len({r.model for r in records}) > 1:
        table += "\n\nCost against model size (median s / iteration, peak RSS GiB):\n\n" + size_sweep_table(records)
    header = (f"Text PPO benchmark: one core (taskset -c {args.core}), one torch thread, {NEW_TOKENS} new tokens, "
              f"{PPO_EPOCHS} PPO epochs, minibatches of {MINIBATCH}; median of {args.iterations} iterations after "
              f"one warm-up; TRL reward: {args.trl_reward}. Seconds are wall time; CPU s (and tok/s per CPU s) "
              f"use the process's CPU time, which a busy shared core does not inflate.\n\n")
    print("\n" + header + table)
    (args.out / "text_ppo.md").write_text(header + table + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker(sys.argv[2:])
    else:
        main()
