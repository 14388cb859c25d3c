"""Self-distilled training data on disk: the conversations of ``data.source`` with every assistant turn regenerated
by the frozen base (``regenerate.py`` says how), sharded and resumable (``shards.ShardedDirectory``).

Layout of ``distill.dir`` (sharded and resumable like the feature cache; shard i belongs to rank i % world_size)::

    manifest.json        what the answers depend on (base, dtype, chat template, prompts, settings); totals once done
    shard-00000.jsonl    a header line (key, stats), then one OpenAI-messages record per conversation of the shard
    conversations.jsonl  the distilled dataset: {"messages": [...], "source_index": i} per line, in source order
    mixed.jsonl          with mix_original: the source conversations, then the distilled ones

``conversations.jsonl`` is ordinary OpenAI-format data: the data stage tokenizes it (so the data hash, and with it the
feature cache's identity, follow the distilled text), and answers regenerated elsewhere (vLLM, SGLang) in the same
format train the same way through ``data.source=FILE.jsonl data.format=openai`` (docs/distillation.md).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .checks import require_positive_int
from .data import load_conversations, tokenizer_identity
from .regenerate import (
    STAT_KEYS,
    DistillSettings,
    Prompts,
    check_chat_template,
    distill_conversations,
    prompts_from_conversations,
    stop_token_ids,
)
from .shards import ShardedDirectory, sha256_json

log = logging.getLogger("kangaroo_train")

FORMAT = "kangaroo-distilled"
OWNER = "distill"  # the writer named in distill.dir's written list (kangaroo_infer.files.claim_directory)
FORMAT_VERSION = 1
CONVERSATIONS_NAME = "conversations.jsonl"
MIXED_NAME = "mixed.jsonl"


class DistilledData(ShardedDirectory):
    """A directory of distilled conversations for one (base, chat template, prompts, settings) combination."""

    LABEL = "Distilled data"
    GROUP = "distill"
    OWNER = OWNER
    KEY_FIELD = "distill_key"  # in the manifest and in every shard's header line
    SUFFIX = ".jsonl"
    OTHER = "other distilled data (another base, chat template, prompts or settings)"
    STALE = (
        "Distilled data in {directory} are stale: they were made with other {fields} ({detail}). Delete {directory} "
        "or set distill.dir elsewhere, then rerun the distill stage."
    )

    def __init__(
        self,
        directory: str | Path,
        *,
        prompts: Prompts,
        settings: DistillSettings,
        identity: dict[str, Any],
        shard_size: int,
        eos: list[int],
    ) -> None:
        identity = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **identity,
            "eos": eos,
            "prompts": sha256_json(prompts.skeletons),
            "source_indices": sha256_json(prompts.source_indices),
            "num_conversations": len(prompts.skeletons),
            "settings": settings.identity(),
            "shard_size": shard_size,
        }
        super().__init__(directory, identity, shard_size)
        self.prompts = prompts
        self.settings = settings
        self.eos = eos
        self.num_shards = math.ceil(len(prompts.skeletons) / shard_size)

    @property
    def conversations_path(self) -> Path:
        return self.directory / CONVERSATIONS_NAME

    def complete_files(self, manifest: dict[str, Any]) -> list[Path]:
        return [self.conversations_path]

    def shard_key(self, path: Path) -> str | None:
        header = self._shard_header(path)
        return None if header is None else header.get(self.KEY_FIELD, "")

    @staticmethod
    def _shard_header(path: Path) -> dict[str, Any] | None:
        """A shard's first line (its key and stats), None when unreadable: a shard cut short is rebuilt."""
        try:
            with path.open(encoding="utf-8") as f:
                header = json.loads(f.readline())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return header if isinstance(header, dict) else {}

    # -- building -----------------------------------------------------------------------------------------------

    def build(
        self,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
    ) -> None:
        """Write this rank's missing shards; whichever rank then finds every shard present assembles the result."""
        todo = self.start(self.num_shards, rank, world_size, self.manifest(complete=False))
        answers = sum(
            sum(m["role"] == "user" for m in skeleton)
            for i in todo
            for skeleton in self.prompts.skeletons[slice(*self.bounds(i, len(self.prompts.skeletons)))]
        )
        with tqdm(
            total=answers,
            unit="answer",
            desc=f"Distilling (rank {rank}, {len(todo)} of {len(range(rank, self.num_shards, world_size))} shards "
            f"to write)",
            position=rank,
            disable=not progress,
        ) as bar:
            tokens = 0

            def on_answers(count: int, new_tokens: int, dropped: int) -> None:
                nonlocal tokens
                tokens += new_tokens
                bar.total -= dropped  # turns that will never be generated: the ETA counts only real work
                elapsed = max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix(tokens=tokens, tok_s=f"{tokens / elapsed:.1f}", refresh=False)
                bar.update(count)

            for index in todo:
                self._build_shard(base, tokenizer, index, rank, on_answers)
        if all(self.shard_is_valid(i) for i in range(self.num_shards)):
            self._assemble()

    def _build_shard(
        self,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        index: int,
        rank: int,
        on_answers: Callable[[int, int, int], None],
    ) -> None:
        lo, hi = self.bounds(index, len(self.prompts.skeletons))
        started = time.monotonic()
        results = distill_conversations(
            base,
            tokenizer,
            self.prompts.skeletons[lo:hi],
            self.prompts.source_indices[lo:hi],
            self.settings,
            self.eos,
            on_answers,
        )
        stats: Counter = Counter()
        lines = []
        for result in results:
            stats += result.stats
            if result.messages:
                stats["conversations"] += 1
                lines.append(json.dumps({"messages": result.messages, "source_index": result.source_index}))
        header = {
            "distill_key": self.key,
            "shard": index,
            "rank": rank,
            "seconds": round(time.monotonic() - started, 3),
            "stats": {key: stats[key] for key in STAT_KEYS},
        }
        self.write(self.shard_path(index), "".join(line + "\n" for line in [json.dumps(header), *lines]))

    def _shard_records(self, index: int) -> Iterator[dict[str, Any]]:
        with self.shard_path(index).open(encoding="utf-8") as f:
            next(f)  # header
            for line in f:
                yield json.loads(line)

    def _assemble(self) -> None:
        """conversations.jsonl from every shard, in source order, and the manifest with the totals."""
        totals: Counter = Counter()
        lines = []
        for index in range(self.num_shards):
            header = self._shard_header(self.shard_path(index))
            totals.update(header["stats"])
            lines += [json.dumps(record, ensure_ascii=False) + "\n" for record in self._shard_records(index)]
        if not lines:
            raise ValueError(
                f"Distillation kept no conversation: every first answer was empty or every prompt reached "
                f"distill.max_len ({self.settings.max_len}). Raise distill.max_len / data.max_len, or check the base "
                f"with a chat prompt (does it answer at all?)."
            )
        self.write(self.conversations_path, "".join(lines))
        p = self.prompts
        report = {
            "source_conversations": len(p.skeletons) + p.dropped_no_user + p.dropped_no_reply,
            "dropped_no_user_turn": p.dropped_no_user,
            "dropped_no_reply": p.dropped_no_reply,
            "truncated_empty_prompt": self.prompts.truncated_empty,
            **{key: totals[key] for key in STAT_KEYS},
        }
        self.write_manifest(self.manifest(complete=True, report=report))

    # -- using the result ---------------------------------------------------------------------------------------

    def report(self) -> dict[str, int]:
        """The totals of a complete distillation (conversations, answers, tokens, cuts, drops)."""
        manifest = self.read_manifest()
        if not self.is_complete() or manifest is None:
            raise ValueError(f"Distilled data in {self.directory} are incomplete; run the distill stage first.")
        return manifest["report"]

    def log_report(self) -> None:
        r = self.report()
        log.info(
            "distill: %d conversations (of %d read; %d without a user turn dropped, %d without an assistant reply "
            "dropped, %d with an empty first answer "
            "dropped, %d whose first prompt reaches max_len dropped), %d answers, %d answer tokens; %d answers cut "
            "at max_new_tokens=%d, %d cut at max_len=%s, %d empty answers dropped; turns not generated: %d beyond "
            "max_len, %d after an empty answer; %d conversations cut before an empty user turn -> %s",
            r["conversations"],
            r["source_conversations"],
            r["dropped_no_user_turn"],
            r.get("dropped_no_reply", 0),
            r["dropped_empty"],
            r["dropped_max_len"],
            r["answers"],
            r["answer_tokens"],
            r["cut_max_new_tokens"],
            self.settings.max_new_tokens,
            r["cut_max_len"],
            self.settings.max_len,
            r["empty_answers"],
            r["turns_beyond_max_len"],
            r["turns_after_empty"],
            r["truncated_empty_prompt"],
            self.conversations_path,
        )

    def training_source(self, mix_original: bool) -> Path:
        """The file the data stage tokenizes: the distilled conversations, or (mix_original) the source
        conversations followed by the distilled ones."""
        if not mix_original:
            return self.conversations_path
        path = self.directory / MIXED_NAME
        with self.conversations_path.open(encoding="utf-8") as f:
            distilled = [json.dumps({"messages": json.loads(line)["messages"]}, ensure_ascii=False) for line in f]
        originals = [json.dumps({"messages": c}, ensure_ascii=False) for c in self.prompts.originals]
        content = "".join(line + "\n" for line in [*originals, *distilled])
        if not path.is_file() or path.read_text(encoding="utf-8") != content:  # every rank may write it, atomically
            self.write(path, content)
        return path


# ----------------------------------------------------------------------------------------------------------------
# From the training config
# ----------------------------------------------------------------------------------------------------------------


def open_distillation(cfg: DictConfig, base_name: str) -> tuple[DistilledData, PreTrainedTokenizerBase]:
    """The distilled data that ``cfg`` asks for (checked against what is on disk) and the base's tokenizer: checks the
    settings, the chat template and the prompts before any model is loaded."""
    from transformers import AutoConfig, GenerationConfig

    from kangaroo_infer.adapter import base_fingerprint
    from kangaroo_infer.base import load_tokenizer, resolve_base_path

    d = cfg.distill
    if d.dir is None:
        raise ValueError("distill.dir is not set; set it to a directory for the distilled conversations.")
    DistilledData.check_directory(d.dir)
    if not isinstance(d.mix_original, bool):
        raise ValueError(f"distill.mix_original={d.mix_original!r} must be true or false.")
    settings = DistillSettings(
        temperature=d.temperature,
        top_p=d.top_p,
        seed=d.seed,
        max_new_tokens=d.max_new_tokens,
        max_len=d.max_len,
        batch_size=d.batch_size,
    )
    limit = d.num_conversations if d.num_conversations is not None else cfg.data.num_conversations
    require_positive_int("distill.num_conversations", limit, optional=True, hint=" (null: data.num_conversations)")
    tokenizer = load_tokenizer(base_name)
    check_chat_template(tokenizer, base_name)
    path = resolve_base_path(base_name)
    try:
        generation_eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: the model config's
        generation_eos = getattr(AutoConfig.from_pretrained(path), "eos_token_id", None)
    eos = stop_token_ids(generation_eos, tokenizer)
    dropped: dict[str, int] = {}
    prompts = prompts_from_conversations(
        load_conversations(str(cfg.data.source), cfg.data.format, limit, dropped), empty_prompts=d.empty_prompts
    )
    prompts.dropped_no_user += dropped.get("no_user", 0)
    prompts.dropped_no_reply += dropped.get("no_reply", 0)
    identity = {
        "base": base_name,
        "base_fingerprint": base_fingerprint(AutoConfig.from_pretrained(path)),
        "dtype": cfg.model.dtype,
        "tokenizer": sha256_json(tokenizer_identity(tokenizer)),
    }
    data = DistilledData(d.dir, prompts=prompts, settings=settings, identity=identity, shard_size=d.shard_size, eos=eos)
    data.check()
    return data, tokenizer


def distilled_data_config(cfg: DictConfig, data: DistilledData) -> DictConfig:
    """A copy of ``cfg`` whose data stage reads the distilled conversations (all of them, OpenAI format); the
    distillation key is part of it, so everything keyed on the data config follows the distilled text."""
    source = data.training_source(bool(cfg.distill.mix_original))
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.data.source = str(source)
        out.data.format = "openai"
        out.data.num_conversations = None
        out.data.distill_key = data.key
    OmegaConf.set_readonly(out, OmegaConf.is_readonly(cfg))
    return out
