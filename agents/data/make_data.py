"""Write the shipped demonstrations and preferences for the built-in prompts (deterministic).

    python agents/data/make_data.py          # rewrites agents/data/*.jsonl

The files are part of the project and licensed with it (Apache-2.0). The prompts are textenv's
built-in "Write one sentence about <topic>." set; one in five (chosen by a fixed seed) is held out,
so the eval files share no prompt with the train files.

The preference they encode is one VADER does not see: every answer is built from the same neutral
templates, so sentiment is equal on both sides. Best first:
1. one sentence that mentions the topic (concise, on topic);
2. the same kind of sentence followed by two more (rambling);
3. the prompt repeated before the sentence (echoes the instruction);
4. one sentence about a different topic (off topic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from textenv.prompts import builtin_prompts

HERE = Path(__file__).parent
SEED = 20260101
PREFIX = "Write one sentence about "

SENTENCES = (
    "{T} is something many people notice in everyday life.",
    "There is always something new to learn about {t}.",
    "{T} can turn an ordinary day into a memorable one.",
    "People often describe {t} in very different ways.",
    "Thinking about {t} brings a few simple details to mind.",
    "{T} is a familiar sight for many people around the world.",
    "Most people have at least one story about {t}.",
    "{T} has a character of its own that is easy to recognise.",
)
FILLER = (
    "I could say much more about this, and there are many other things to add here as well.",
    "Also, in addition, there is a lot more that could be written on this subject in general.",
    "Anyway, that is just one thought, and another one would be something else entirely.",
)


def topic_of(prompt: str) -> str:
    return prompt[len(PREFIX) :].rstrip(".")


def sentence(topic: str, rng: random.Random) -> str:
    template = rng.choice(SENTENCES)
    return template.format(t=topic, T=topic[:1].upper() + topic[1:])


def answers(prompt: str, others: list[str], rng: random.Random) -> list[str]:
    """The four answers to ``prompt``, best first (see the module docstring)."""
    topic = topic_of(prompt)
    concise = sentence(topic, rng)
    rambling = " ".join([sentence(topic, rng), *rng.sample(FILLER, 2)])
    echo = f"{prompt} {sentence(topic, rng)}"
    off_topic = sentence(topic_of(rng.choice([o for o in others if o != prompt])), rng)
    return [concise, rambling, echo, off_topic]


def preferences(prompts: list[str], rng: random.Random) -> list[dict]:
    """Per prompt one pair (the concise answer against one of the worse kinds); every other prompt a 4-way ranking."""
    records = []
    for i, prompt in enumerate(prompts):
        ranked = answers(prompt, prompts, rng)
        records.append({"prompt": prompt, "chosen": ranked[0], "rejected": rng.choice(ranked[1:])})
        if i % 2 == 0:
            records.append({"prompt": prompt, "ranked": answers(prompt, prompts, rng)})
    return records


def write(name: str, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (HERE / name).write_text(text, encoding="utf-8")
    print(f"{name}: {len(records)} records")


def main() -> None:
    rng = random.Random(SEED)
    prompts = [p for p in builtin_prompts() if p.startswith(PREFIX)]
    held = set(rng.sample(prompts, len(prompts) // 5))
    train = [p for p in prompts if p not in held]
    evaluation = [p for p in prompts if p in held]
    for split, chosen in (("train", train), ("eval", evaluation)):
        write(f"sft_{split}.jsonl", [{"prompt": p, "completion": sentence(topic_of(p), rng)} for p in chosen])
        write(f"prefs_{split}.jsonl", preferences(chosen, rng))


if __name__ == "__main__":
    main()
