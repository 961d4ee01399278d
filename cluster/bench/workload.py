"""Workloads: Spec-Bench prompts (chat-templated, per category) or synthetic token ids.

``load_specbench`` reads ``specbench-dev.jsonl`` (``question_id``, ``category``, ``turns``) and
keeps the first ``per_category`` questions of each category (first turn only), in file order.
``encode`` turns them into token ids with the tokenizer's chat template (when it has one),
truncated to ``max_prompt_tokens``. Without a tokenizer (a shape checkpoint on its own), each
prompt becomes seeded random ids of about the prompt's length in tokens (characters / 4).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SPECBENCH = "../shared/data/specbench-dev.jsonl"


@dataclass(frozen=True)
class Prompt:
    question_id: int | str
    category: str
    text: str


@dataclass(frozen=True)
class EncodedPrompt:
    question_id: int | str
    category: str
    token_ids: tuple[int, ...]


def find_specbench(path: str | Path | None = None) -> Path:
    """The given path, else the shared data file beside the repository (or under ``shared/``)."""
    root = Path(__file__).resolve().parents[2]
    candidates = [Path(path)] if path else [root / DEFAULT_SPECBENCH, root / "shared/data/specbench-dev.jsonl",
                                          Path.cwd() / DEFAULT_SPECBENCH]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Spec-Bench prompts not found (tried {', '.join(map(str, candidates))}); "
                            "pass --prompts FILE")


def load_specbench(path: str | Path, *, per_category: int | None = None,
                   categories: list[str] | None = None) -> list[Prompt]:
    prompts: list[Prompt] = []
    counts: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        category = row.get("category", "all")
        if categories and category not in categories:
            continue
        if per_category is not None and counts.get(category, 0) >= per_category:
            continue
        counts[category] = counts.get(category, 0) + 1
        turns = row.get("turns") or [row.get("prompt", "")]
        prompts.append(Prompt(row.get("question_id", len(prompts)), category, str(turns[0])))
    if not prompts:
        raise ValueError(f"{path}: no prompts selected (categories {categories}, per category {per_category})")
    return prompts


def encode(prompts: list[Prompt], tokenizer, *, vocab_size: int, max_prompt_tokens: int,
           chat: bool = True, seed: int = 0) -> list[EncodedPrompt]:
    out = []
    for i, p in enumerate(prompts):
        if tokenizer is not None:
            if chat and getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
            else:
                ids = tokenizer.encode(p.text)
            ids = [int(t) for t in ids]
            if max(ids) >= vocab_size:
                raise ValueError(f"the tokenizer gives id {max(ids)}, outside the model's vocabulary {vocab_size}")
        else:
            rng = random.Random(f"{seed}:{p.question_id}:{i}")
            ids = [rng.randrange(3, vocab_size) for _ in range(max(4, len(p.text) // 4))]
        out.append(EncodedPrompt(p.question_id, p.category, tuple(ids[-max_prompt_tokens:])))
    return out
