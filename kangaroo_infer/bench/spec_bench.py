"""Spec-Bench model-answer files (``--spec-bench-dir``): one per decoder, read by Spec-Bench's own
evaluation/speed.py and evaluation/equal.py as they read their own."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from ..files import write_file
from ..model import KangarooModel
from .decoders import Decoder
from .out_dir import OWNER, display_name


def spec_bench_model_ids(km: KangarooModel, temperature: float, decoders: list[Decoder]) -> dict[str, str]:
    """decoder -> Spec-Bench model id, in Spec-Bench's naming (model, method, dtype, temperature), e.g.
    ``smollm2-135m-instruct-pld-10-float32-temp-0.0``."""
    model = (display_name(km.base.config.name_or_path) or "model").rsplit("/", 1)[-1]
    dtype = str(km.base.dtype).removeprefix("torch.")
    return {d.name: f"{model}-{d.name}-{dtype}-temp-{float(temperature)}" for d in decoders}


def check_spec_bench_dir(directory: Path, model_ids: dict[str, str], replace: bool) -> None:
    """Refuse a file, and answer files of an earlier run unless ``replace`` (--resume or --overwrite)."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--spec-bench-dir {directory} is a file; name a directory.")
    existing = [f"{m}.jsonl" for m in model_ids.values() if (directory / f"{m}.jsonl").exists()]
    if existing and not replace:
        raise ValueError(
            f"{directory} already holds Spec-Bench answers {existing}; pass --resume or --overwrite to replace them "
            f"(or use another --spec-bench-dir)."
        )


def _question_order(record: dict) -> tuple:
    """Spec-Bench sorts answer files by question_id (integers there); other ids sort after them, as text."""
    qid = record["question_id"]
    numeric = isinstance(qid, int | float) and not isinstance(qid, bool)
    return (0, qid, "") if numeric else (1, 0, str(qid)), record["category"]


def write_spec_bench(records: list[dict], directory: str | Path, model_ids: dict[str, str]) -> list[Path]:
    """One Spec-Bench model-answer file per decoder, ``DIR/<model_id>.jsonl``: a line per question, sorted by
    question_id, with the question file's own category and ``choices[0]`` holding turns, decoding_steps,
    new_tokens, wall_time (one entry per turn; bench decodes the first turn) and accept_lengths (tokens committed
    per full-model forward)."""
    directory = Path(directory)
    rows = sorted(records, key=_question_order)
    written = []
    for decoder, model_id in model_ids.items():
        lines = []
        for r in rows:
            run = r["decoders"][decoder]
            choice = {
                "index": 0,
                "turns": run["turns"],
                "decoding_steps": [run["decoding_steps"]],
                "new_tokens": [run["new_tokens"]],
                "wall_time": [run["wall_time"]],
                "accept_lengths": run["accept_lengths"],
            }
            answer = {
                "question_id": r["question_id"],
                "category": r.get("source_category", r["category"]),
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "choices": [choice],
                "tstamp": r.get("tstamp", time.time()),
            }
            lines.append(json.dumps(answer) + "\n")
        # checked by check_spec_bench_dir (replaced only with --resume or --overwrite); atomic: never half a file
        written.append(write_file(directory / f"{model_id}.jsonl", "".join(lines), OWNER, overwrite=True))
    return written
