"""Training data: loading every source format, the assistant-only loss mask on real tokenizers, datasets, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf
from transformers import CanineTokenizer

from kangaroo_infer import load_tokenizer
from kangaroo_train.data import (
    SHAREGPT_PYPI,
    build_datasets,
    data_hash,
    load_conversations,
    tokenize_conversation,
)

SHAREGPT_RECORDS = [
    {
        "id": "a",
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "And 3+3?"},
            {"from": "chatgpt", "value": "6"},
        ],
    },
    {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "bing", "value": "Hello!"}]},
]
OPENAI_RECORDS = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "De rien."},
        ]
    },
]


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["auto", "sharegpt"])
def test_sharegpt_json(tmp_path, fmt):
    conversations = load_conversations(str(write_json(tmp_path / "d.json", SHAREGPT_RECORDS)), fmt)
    assert conversations == [
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]


@pytest.mark.parametrize("fmt", ["auto", "openai"])
def test_openai_jsonl(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", OPENAI_RECORDS)
    assert load_conversations(str(path), fmt) == [r["messages"] for r in OPENAI_RECORDS]


def test_save_to_disk_directory_and_limit(tmp_path):
    datasets.Dataset.from_list(OPENAI_RECORDS).save_to_disk(str(tmp_path / "saved"))
    assert load_conversations(str(tmp_path / "saved")) == [r["messages"] for r in OPENAI_RECORDS]
    assert load_conversations(str(tmp_path / "saved"), limit=1) == [OPENAI_RECORDS[0]["messages"]]


def test_normalisation_merges_drops_and_trims(tmp_path):
    records = [
        {  # a split ShareGPT chunk: starts with the assistant, has a double user turn and a trailing question
            "conversations": [
                {"from": "gpt", "value": "...and that is all."},
                {"from": "human", "value": "Part one."},
                {"from": "human", "value": "Part two."},
                {"from": "gpt", "value": "Got both."},
                {"from": "human", "value": "Unanswered?"},
            ]
        },
        {"conversations": [{"from": "human", "value": "Nobody answers."}]},  # no assistant reply: dropped
        {"conversations": []},  # empty: dropped
    ]
    assert load_conversations(str(write_json(tmp_path / "d.json", records))) == [
        [{"role": "user", "content": "Part one.\n\nPart two."}, {"role": "assistant", "content": "Got both."}]
    ]


def test_sharegpt_from_pypi():
    conversations = load_conversations(SHAREGPT_PYPI, limit=20)
    assert len(conversations) == 20
    for conversation in conversations:
        roles = [m["role"] for m in conversation]
        assert set(roles) <= {"system", "user", "assistant"} and roles[-1] == "assistant"
        assert all(isinstance(m["content"], str) for m in conversation)
        assert all(a != b for a, b in zip(roles, roles[1:], strict=False)), "consecutive turns of one role are merged"
        assert roles[0 if roles[0] != "system" else 1] == "user"


def test_no_usable_conversation_names_the_file(tmp_path):
    path = write_json(tmp_path / "empty.json", [{"conversations": [{"from": "human", "value": "hello?"}]}])
    with pytest.raises(ValueError, match=r"No usable conversation in .*empty\.json"):
        load_conversations(str(path))
    with pytest.raises(ValueError, match=r"No usable conversation in .*nothing\.json"):
        load_conversations(str(write_json(tmp_path / "nothing.json", [])))


@pytest.mark.parametrize(
    ("record", "fmt", "problem"),
    [
        ({"conversations": [{"from": "human"}]}, "sharegpt", r"turn 0 must be an object with string fields 'from'"),
        ({"conversations": [{"from": "human", "value": 3}]}, "sharegpt", r"string fields 'from' and 'value'"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", r"unknown role 'alien'"),
        ({"conversations": "not a list"}, "sharegpt", r"needs a list under 'conversations'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "openai", r"unknown role 'tool'"),
        ({"messages": [{"role": "user", "content": None}]}, "openai", r"string fields 'role' and 'content'"),
        ({"text": "hello"}, "auto", r"cannot tell the data format"),
    ],
)
def test_malformed_record_names_file_and_record(tmp_path, record, fmt, problem):
    good = SHAREGPT_RECORDS[1] if fmt != "openai" else OPENAI_RECORDS[0]
    records = [good, good, record] if fmt != "auto" else [record]
    index = 2 if fmt != "auto" else 0
    path = write_json(tmp_path / "bad.json", records)
    with pytest.raises(ValueError, match=rf"bad\.json, record {index}: .*{problem}"):
        load_conversations(str(path), fmt)


def test_invalid_sources_and_lines(tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps(OPENAI_RECORDS[0]) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, record 1 \(line 3\) is not valid JSON"):
        load_conversations(str(bad_line))
    with pytest.raises(ValueError, match=r"must be a list of records"):
        load_conversations(str(write_json(tmp_path / "obj.json", {"data": []})))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"neither 'sharegpt-pypi' nor an existing"):
        load_conversations(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"not one written by datasets' save_to_disk"):
        load_conversations(str(tmp_path))
    with pytest.raises(ValueError, match=r"Unknown data format 'csv'"):
        load_conversations(str(bad_line), "csv")


# ----------------------------------------------------------------------------------------------------------------
# Loss mask
# ----------------------------------------------------------------------------------------------------------------


def masked_runs(sample: dict, tokenizer) -> tuple[list[str], str]:
    """Decoded maximal runs of masked tokens, and the decoded unmasked tokens."""
    runs, current, unmasked = [], [], []
    for token, flag in zip(sample["input_ids"], sample["loss_mask"], strict=True):
        if flag:
            current.append(token)
        else:
            unmasked.append(token)
            if current:
                runs.append(current)
                current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs], tokenizer.decode(unmasked)


MULTI_TURN = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Where is the treasure?"},
    {"role": "assistant", "content": "Buried under the old palm tree, matey!"},
    {"role": "user", "content": "How deep?"},
    {"role": "assistant", "content": "Six feet.\nMaybe seven."},
]


def test_loss_mask_is_exactly_the_replies(smollm2_tokenizer):
    tok = smollm2_tokenizer
    sample = tokenize_conversation(MULTI_TURN, tok, max_len=4096)
    assert sample["input_ids"] == tok.apply_chat_template(MULTI_TURN, tokenize=True)["input_ids"]
    runs, unmasked = masked_runs(sample, tok)
    assert runs == [
        "Buried under the old palm tree, matey!<|im_end|>",
        "Six feet.\nMaybe seven.<|im_end|>",
    ]
    for message in MULTI_TURN[:2] + MULTI_TURN[3:4]:
        assert message["content"] in unmasked
    assert "assistant\n" in unmasked  # the header is scaffolding


def test_loss_mask_with_the_templates_default_system_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    conversation = MULTI_TURN[1:3]
    sample = tokenize_conversation(conversation, tok, max_len=4096)
    runs, unmasked = masked_runs(sample, tok)
    assert runs == ["Buried under the old palm tree, matey!<|im_end|>"]
    assert "You are a helpful AI assistant named SmolLM" in unmasked  # injected by the template, not learned


def test_loss_mask_follows_another_template(smollm2_tokenizer):
    """A template with other headers, trimmed content and the eos token as end of turn: no constants to adapt."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}]: {{ m['content'] | trim }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT]: {% endif %}"
    )
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello!  "}] + MULTI_TURN[3:]
    runs, unmasked = masked_runs(tokenize_conversation(conversation, tok, max_len=4096), tok)
    # The space that ends "[ASSISTANT]: " merges into the reply's first token, which is learned with it.
    assert runs == [f" Hello!{tok.eos_token}", f" Six feet.\nMaybe seven.{tok.eos_token}"]
    assert unmasked.count("[ASSISTANT]:") == 2 and "[USER]: Hi" in unmasked and "[USER]: How deep?" in unmasked


def test_loss_mask_without_offsets():
    """A Python (non-fast) tokenizer has no offset mapping: span boundaries are found by tokenizing prefixes.
    Canine is character-level and needs no vocabulary files; its SEP character ends assistant turns here."""
    tok = CanineTokenizer()
    assert not tok.is_fast
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}\ue001{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    sample = tokenize_conversation(MULTI_TURN, tok, max_len=4096)
    runs, unmasked = masked_runs(sample, tok)
    assert runs == ["Buried under the old palm tree, matey!\ue001", "Six feet.\nMaybe seven.\ue001"]
    assert unmasked == "<system>You are a pirate.<user>Where is the treasure?<assistant><user>How deep?<assistant>"
    truncated = tokenize_conversation(MULTI_TURN, tok, max_len=90)
    assert truncated["loss_mask"] == sample["loss_mask"][:90]


def test_truncation_keeps_the_mask_of_the_prefix(smollm2_tokenizer):
    full = tokenize_conversation(MULTI_TURN, smollm2_tokenizer, max_len=4096)
    cut = len(full["input_ids"]) - 5  # inside the second reply
    truncated = tokenize_conversation(MULTI_TURN, smollm2_tokenizer, max_len=cut)
    assert truncated["input_ids"] == full["input_ids"][:cut]
    assert truncated["loss_mask"] == full["loss_mask"][:cut]
    assert sum(tokenize_conversation(MULTI_TURN, smollm2_tokenizer, max_len=10)["loss_mask"]) == 0
    with pytest.raises(ValueError, match="max_len=0 must be a positive integer"):
        tokenize_conversation(MULTI_TURN, smollm2_tokenizer, max_len=0)


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


def many_records(count: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": f"Answer number {i}, " + "and more " * (i % 5)},
            ]
        }
        for i in range(count)
    ]


def data_config(source: Path, **overrides):
    cfg = {
        "source": str(source),
        "format": "auto",
        "max_len": 64,
        "num_conversations": None,
        "val_fraction": 0.2,
        "seed": 0,
        "min_assistant_tokens": 1,
    }
    return OmegaConf.create({**cfg, **overrides})


def test_build_datasets_split_is_deterministic_and_cached(tmp_path, smollm2_tokenizer):
    source = write_jsonl(tmp_path / "chat.jsonl", many_records(30))
    train, val = build_datasets(data_config(source), smollm2_tokenizer, tmp_path / "cache")
    assert (len(train), len(val)) == (24, 6)
    assert train.column_names == ["input_ids", "loss_mask"] and val.column_names == ["input_ids", "loss_mask"]
    for row in train:
        assert len(row["input_ids"]) == len(row["loss_mask"]) <= 64 and sum(row["loss_mask"]) >= 1
    cached = sorted((tmp_path / "cache" / "tokenized").glob("*.arrow"))
    assert len(cached) == 1

    again_train, again_val = build_datasets(data_config(source), smollm2_tokenizer, tmp_path / "cache")
    assert sorted((tmp_path / "cache" / "tokenized").glob("*.arrow")) == cached  # re-used, not re-written
    assert again_train["input_ids"] == train["input_ids"] and again_val["input_ids"] == val["input_ids"]
    assert data_hash(again_train) == data_hash(train)

    _, other_val = build_datasets(data_config(source, seed=1), smollm2_tokenizer, tmp_path / "cache")
    assert other_val["input_ids"] != val["input_ids"]
    limited, none_val = build_datasets(
        data_config(source, num_conversations=5, val_fraction=0.0), smollm2_tokenizer, tmp_path / "cache"
    )
    assert (len(limited), len(none_val)) == (5, 0)


def test_build_datasets_drops_samples_without_assistant_tokens(tmp_path, smollm2_tokenizer):
    records = many_records(4)
    records[2]["messages"][0]["content"] = "A long question " * 40  # its reply falls beyond max_len
    train, val = build_datasets(
        data_config(write_jsonl(tmp_path / "c.jsonl", records), val_fraction=0.0), smollm2_tokenizer, tmp_path
    )
    assert len(train) == 3 and len(val) == 0
    with pytest.raises(ValueError, match=r"No sample from data source '.*c\.jsonl' keeps at least 1 assistant"):
        build_datasets(data_config(tmp_path / "c.jsonl", max_len=8), smollm2_tokenizer, tmp_path)
    with pytest.raises(ValueError, match=r"data\.val_fraction=1\.0 must be in \[0, 1\)"):
        build_datasets(data_config(tmp_path / "c.jsonl", val_fraction=1.0), smollm2_tokenizer, tmp_path)


def test_data_hash_sees_every_change():
    rows = [{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"input_ids": [4, 5], "loss_mask": [0, 1]}]
    reference = data_hash(datasets.Dataset.from_list(rows))
    assert reference == data_hash(datasets.Dataset.from_list(copy.deepcopy(rows)))
    changed_mask = copy.deepcopy(rows)
    changed_mask[1]["loss_mask"] = [1, 1]
    moved_boundary = [{"input_ids": [1, 2], "loss_mask": [0, 1]}, {"input_ids": [3, 4, 5], "loss_mask": [1, 0, 1]}]
    for other in (changed_mask, moved_boundary, rows[::-1], rows[:1]):
        assert data_hash(datasets.Dataset.from_list(other)) != reference
    assert data_hash(datasets.Dataset.from_list(rows * 2).select([2, 3])) == reference  # a selection hashes its rows


def test_frequent_tokens_ranks_assistant_tokens_only():
    from kangaroo_train.data import frequent_tokens

    ds = datasets.Dataset.from_list(
        [
            {"input_ids": [5, 5, 5, 7, 9, 9], "loss_mask": [0, 0, 0, 1, 1, 1]},  # 5 is prompt-only
            {"input_ids": [7, 7, 3], "loss_mask": [1, 1, 1]},
        ]
    )
    assert frequent_tokens(ds, vocab_size=10, size=3) == [7, 9, 3]  # counts 3, 2, 1
    assert frequent_tokens(ds, vocab_size=10, size=5) == [7, 9, 3, 0, 1]  # ties (unseen) by id
    with pytest.raises(ValueError, match=r"draft_vocab_size=11 must be an integer in \[1, 10\]"):
        frequent_tokens(ds, vocab_size=10, size=11)
