"""Prompt sources (a list, a .txt file, a .jsonl file, the built-in set), chat template, tokenised once."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PromptError

__all__ = ["PromptSet", "load_prompts", "builtin_prompts"]


def builtin_prompts() -> list[str]:
    """The ~300 "Write one sentence about <topic>." prompts shipped as package data."""
    text = resources.files("textenv").joinpath("data", "prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(source: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """Prompt strings from a list, a `.txt` path (one per line) or a `.jsonl` path (`prompt` field)."""
    if source is None:
        return builtin_prompts()
    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source))
    if not isinstance(source, Sequence):
        raise PromptError(
            f"prompts={source!r} is not a list of strings or a .txt / .jsonl path; "
            f"pass e.g. prompts=['Tell me about the sea.']"
        )
    prompts = list(source)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise PromptError(f"prompts[{i}]={prompt!r} is not a string; pass a list of strings")
    if not prompts:
        raise PromptError("prompts=[] is empty; pass at least one prompt, or prompts=None for the built-in set")
    return prompts


def _read_file(path: Path) -> list[str]:
    if path.suffix not in (".txt", ".jsonl"):
        raise PromptError(
            f"prompts={str(path)!r} is neither a .txt nor a .jsonl file; pass a list of strings such as "
            f"prompts=[{str(path)!r}] for a single prompt, or a path ending in .txt or .jsonl"
        )
    if not path.is_file():
        raise PromptError(f"prompts={str(path)!r} does not exist; pass an existing .txt or .jsonl file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".txt":
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = [_jsonl_prompt(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise PromptError(f"prompts={str(path)!r} holds no prompts; add one prompt per line")
    return prompts


def _jsonl_prompt(line: str, path: Path, lineno: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptError(f"prompts={str(path)!r} line {lineno} is not valid JSON: {exc}") from exc
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str):
        raise PromptError(
            f"prompts={str(path)!r} line {lineno} has no string 'prompt' field; "
            f'write one object per line like {{"prompt": "Tell me about the sea."}}'
        )
    return prompt


@dataclass(frozen=True)
class PromptSet:
    """The prompt texts and their token ids (chat template applied), tokenised once at construction."""

    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def build(
        cls,
        source: str | os.PathLike | Sequence[str] | None,
        tokenizer: Any,
        *,
        max_prompt_tokens: int,
        chat_template: bool = True,
        truncate: bool = False,
    ) -> PromptSet:
        """Load and tokenise prompts; too long ones raise unless `truncate` (then the start is cut)."""
        texts = load_prompts(source)
        if chat_template and getattr(tokenizer, "chat_template", None):
            rendered = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
                )
                for t in texts
            ]
            # the template already holds the special tokens (BOS and the like)
            encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            encoded = tokenizer(texts)["input_ids"]
        ids = []
        for i, (text, tokens) in enumerate(zip(texts, encoded, strict=True)):
            if not tokens:
                raise PromptError(
                    f"prompts[{i}]={text!r} gives no tokens, so the policy has nothing to condition on; "
                    f"remove it or use a tokenizer with a BOS token or a chat template"
                )
            if len(tokens) > max_prompt_tokens:
                if not truncate:
                    raise PromptError(
                        f"prompts[{i}]={_short(text)} is {len(tokens)} tokens long, more than "
                        f"max_prompt_tokens={max_prompt_tokens}; raise max_prompt_tokens or pass "
                        f"truncate_prompts=True to keep its last {max_prompt_tokens} tokens"
                    )
                # keep the end: with a chat template that is where the generation prompt is
                tokens = tokens[-max_prompt_tokens:]
            ids.append(tuple(int(t) for t in tokens))
        return cls(texts=tuple(texts), token_ids=tuple(ids))


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
