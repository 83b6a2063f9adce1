"""Log-probs of the taken tokens and entropies from hidden states, through the LM head a slice of rows at a time.

The PPO update needs two numbers per state from the ``[states, vocab]`` next-token distribution.
Computing that distribution for a whole minibatch keeps it for the backward and then makes its
gradients: about four ``[states, vocab]`` float32 tensors at once, ~0.2 GiB for 256 states of
SmolLM2's 49k-token vocabulary, at the start of the backward, the peak of a full fine-tuning step.
Here the forward keeps only the hidden states; the backward recomputes the logits slice by slice
and adds the output layer's weight gradient into one buffer. The gradients are those of the
whole-batch computation (the log-softmax part is differentiated by autograd on each slice); only
the temporaries shrink to ``[slice, vocab]``. The price is one more output-layer matmul per state,
so the policy uses it with ``PPOConfig.gradient_checkpointing`` (the memory-first mode).

An output layer tied to the input embedding (SmolLM2, Llama 3.2, Gemma) gets its ``[vocab, width]``
gradient from two places: here and from the token lookups. Autograd would hold this part until the
lookups' part arrives at the end of the backward and then add a second dense ``[vocab, width]``
tensor to it (0.1 GiB each on SmolLM2, while every other gradient is alive). With
:func:`tied_lookups` the part made here goes straight into the weight's ``.grad`` and the lookups
send only their rows (sparse), which autograd adds into that ``.grad`` in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from textenv.kl import token_logprobs
from textenv.lm_head import LogitHead

SLICE_ELEMENTS = 1 << 21
"""Logits per slice (rows x vocab): 8 MiB in float32, 42 rows of a 49k vocabulary."""


def entropy_of(log_probs: torch.Tensor, truncated: bool) -> torch.Tensor:
    """Entropy of each row of ``log_probs [..., V]``; tokens a top-k / top-p policy cannot sample add 0."""
    finite = torch.where(log_probs.isfinite(), log_probs, 0.0) if truncated else log_probs
    return -(log_probs.exp() * finite).sum(-1)


def can_slice(head: LogitHead) -> bool:
    """Whether ``head``'s output layer is a plain ``nn.Linear`` (its weight gradient is then written here)."""
    return type(head.output) is nn.Linear


def tied_embedding(head: LogitHead) -> nn.Embedding | None:
    """``head``'s trunk's input embedding where it shares its weight with the output layer, else None."""
    embedding = head.trunk.get_input_embeddings()
    output: Any = head.output
    tied = isinstance(embedding, nn.Embedding) and embedding.weight is getattr(output, "weight", None)
    return embedding if tied else None


@contextmanager
def tied_lookups(embedding: nn.Embedding | None) -> Iterator[None]:
    """Within: ``embedding``'s lookups send their gradient as sparse rows (see the module's docstring).

    Only for a forward scored by ``sliced_token_scores(..., tied=True)``: that dense part must reach
    ``.grad`` first, or the weight's gradient would be left sparse.
    """
    if embedding is None or embedding.sparse:
        yield
        return
    embedding.sparse = True
    try:
        yield
    finally:
        embedding.sparse = False


def sliced_token_scores(
    head: LogitHead, hidden: torch.Tensor, actions: torch.Tensor, sampling: tuple[float, int, float],
    *, tied: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi(actions | s)`` and the entropy of ``pi(. | s)``, both ``[N]``, from ``hidden [N, H]``.

    ``sampling`` is ``(temperature, top_k, top_p)`` as the env samples; ``head`` must pass
    :func:`can_slice`. ``tied``: the backward adds the output weight's gradient into its ``.grad``
    itself, as ``backward()`` would, for a forward whose lookups ran under :func:`tied_lookups`.
    """
    output: Any = head.output
    rows = max(1, SLICE_ELEMENTS // int(output.weight.shape[0]))
    return _SlicedScores.apply(hidden, output.weight, output.bias, actions.long(), head, sampling, rows, tied)


class _SlicedScores(torch.autograd.Function):
    """hidden, output weight, bias -> (log-prob of the taken token, entropy), one slice of rows at a time."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, actions: torch.Tensor,
        head: LogitHead, sampling: tuple[float, int, float], rows: int, tied: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # an entropy that is only logged sends no gradient at all
        ctx.save_for_backward(hidden, weight, bias, actions)
        ctx.head, ctx.sampling, ctx.rows = head, sampling, rows
        ctx.tied_weight = weight if tied else None  # the parameter itself: its .grad is written here
        ctx.truncated = sampling[1] > 0 or sampling[2] < 1.0
        chosen = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        entropy = torch.empty_like(chosen)
        for part in torch.arange(hidden.shape[0], device=hidden.device).split(rows):
            log_probs = head.logprobs(hidden[part], *sampling)  # (head.output is weight and bias)
            chosen[part] = log_probs.gather(-1, actions[part, None]).squeeze(-1)
            entropy[part] = entropy_of(log_probs, ctx.truncated)
        return chosen, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_chosen: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, actions = ctx.saved_tensors
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        tied = ctx.tied_weight if wants_weight else None
        if tied is not None:  # into .grad, before the lookups' sparse rows are added to it
            if tied.grad is None:
                tied.grad = torch.zeros_like(weight)
            grad_weight = tied.grad
        else:
            grad_weight = torch.zeros_like(weight) if wants_weight else None
        grad_bias = torch.zeros_like(bias) if wants_bias and bias is not None else None
        for part in torch.arange(hidden.shape[0], device=hidden.device).split(ctx.rows):
            inputs = hidden[part].to(weight.dtype)
            with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
                logits = F.linear(inputs, weight, bias).detach().requires_grad_(True)
                log_probs = token_logprobs(ctx.head.transform(logits), *ctx.sampling)
                outputs, grads = [], []
                if grad_chosen is not None:
                    outputs.append(log_probs.gather(-1, actions[part, None]).squeeze(-1))
                    grads.append(grad_chosen[part])
                if grad_entropy is not None:
                    outputs.append(entropy_of(log_probs, ctx.truncated))
                    grads.append(grad_entropy[part])
                if not outputs:
                    break
                (grad_logits,) = torch.autograd.grad(outputs, logits, grads)
            if grad_hidden is not None:
                grad_hidden[part] = (grad_logits @ weight).to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, inputs)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        returned_weight = None if tied is not None else grad_weight  # (a tied one is in .grad already)
        return grad_hidden, returned_weight, grad_bias, None, None, None, None, None
