"""Reading and validating the ``.jsonl`` files of the InstructGPT pipeline.

Demonstrations (``agents.sft``): ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role",
"content"}, ...]}`` whose last message is the assistant's answer. Preferences (``agents.reward_model``):
``{"prompt", "chosen", "rejected"}`` pairs or ``{"prompt", "ranked": [best, ..., worst]}`` rankings.
Every error names the file, the line, the field and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file that is missing or holds a malformed record; the message says where and why."""


@dataclass(frozen=True)
class Demonstration:
    """One supervised example: the prompt as the env sees it, and the answer to learn."""

    prompt: str | tuple[dict[str, str], ...]
    """A user prompt string, or the chat messages before the answer."""
    completion: str


@dataclass(frozen=True)
class Comparison:
    """Answers to one prompt, best first: a pair (K = 2) or a K-way ranking."""

    prompt: str
    ranked: tuple[str, ...]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """All C(K, 2) (better, worse) index pairs (InstructGPT section 3.5)."""
        return list(combinations(range(len(self.ranked)), 2))


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; bad JSON or a non-object raises DataError."""
    source = Path(path)
    if source.suffix != ".jsonl":
        raise DataError(f"data file {str(source)!r} is not a .jsonl file; write one JSON object per line")
    if not source.is_file():
        raise DataError(f"data file {str(source)!r} does not exist; check the path")
    with source.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{source}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{source}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _text(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if field not in record else f"{value!r}"
        raise DataError(f"{where}: field {field!r} must be a non-empty string, got {got}")
    return value


def load_demonstrations(path: str | os.PathLike) -> list[Demonstration]:
    """Demonstrations from a ``.jsonl`` file (see the module docstring for the two record forms)."""
    found = [_demonstration(record, f"{path}:{lineno}") for lineno, record in read_jsonl(path)]
    if not found:
        raise DataError(f"data file {str(path)!r} holds no records; write one demonstration per line")
    return found


def _demonstration(record: dict[str, Any], where: str) -> Demonstration:
    if "messages" in record:
        return _split_answer(_messages(record["messages"], where))
    if "prompt" not in record and "completion" not in record:
        raise DataError(
            f"{where}: expected fields 'prompt' and 'completion' (or 'messages'), got {sorted(record) or 'none'}"
        )
    return Demonstration(_text(record, "prompt", where), _text(record, "completion", where))


def _messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: field 'messages' must be a list of at least 2 messages, got {messages!r}")
    checked = []
    for i, message in enumerate(messages):
        valid = isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
        if not valid:
            raise DataError(
                f"{where}: messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': str}}, got {message!r}"
            )
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "assistant" or not checked[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty 'assistant' answer, got {messages[-1]!r}")
    return tuple(checked)


def _split_answer(messages: tuple[dict[str, str], ...]) -> Demonstration:
    head, answer = messages[:-1], messages[-1]["content"]
    if len(head) == 1 and head[0]["role"] == "user":
        return Demonstration(head[0]["content"], answer)  # the env's own prompt form
    return Demonstration(head, answer)


def load_comparisons(path: str | os.PathLike) -> list[Comparison]:
    """Pairs and K-way rankings from a ``.jsonl`` file, each as a :class:`Comparison`."""
    found = [_comparison(record, f"{path}:{lineno}") for lineno, record in read_jsonl(path)]
    if not found:
        raise DataError(f"data file {str(path)!r} holds no records; write one preference per line")
    return found


def _comparison(record: dict[str, Any], where: str) -> Comparison:
    prompt = _text(record, "prompt", where)
    if "ranked" in record:
        ranked = record["ranked"]
        valid = isinstance(ranked, list) and len(ranked) >= 2 and all(isinstance(r, str) and r.strip() for r in ranked)
        if not valid:
            raise DataError(
                f"{where}: field 'ranked' must be a list of >= 2 non-empty strings, best first, got {ranked!r}"
            )
        answers = tuple(ranked)
    elif "chosen" in record or "rejected" in record:
        answers = (_text(record, "chosen", where), _text(record, "rejected", where))
    else:
        raise DataError(
            f"{where}: expected fields 'chosen' and 'rejected', or 'ranked' (best first), got {sorted(record)}"
        )
    if len(set(answers)) != len(answers):
        raise DataError(f"{where}: the answers to compare must differ; a text appears twice in {list(answers)!r}")
    return Comparison(prompt, answers)


def split_by_prompt(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out): about ``fraction`` of the distinct prompts, with all their records, held out."""
    import random

    prompts = sorted({str(item.prompt) for item in items})
    held = set(random.Random(seed).sample(prompts, max(1, round(fraction * len(prompts))))) if fraction > 0 else set()
    if len(held) == len(prompts):
        raise DataError(f"eval_fraction={fraction} would hold out all {len(prompts)} prompts; lower it")
    return [i for i in items if str(i.prompt) not in held], [i for i in items if str(i.prompt) in held]
