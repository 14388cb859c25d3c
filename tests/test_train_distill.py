"""Self-distilled training data (kangaroo_train/distill.py): answers equal the base's own greedy ``generate``, batched
or not, turn by turn on the regenerated history; the distill stage end to end, resumed after a kill, split over two
ranks; and every bad input with its one clear error. All on the tiny experiment's real random model (fp32; its large
init scale keeps logits well separated, so left padding never flips a greedy choice)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from kangaroo_infer.base import load_base, load_tokenizer
from kangaroo_train.regenerate import (
    DistillSettings,
    distill_conversations,
    generate_answers,
    prompts_from_conversations,
)
from kangaroo_train.stages import prepare_base
from kangaroo_train.train import CONFIG_DIR
from tests import helpers
from tests.helpers import assert_clean_error

REPO = Path(__file__).resolve().parent.parent
MAX_NEW = 12

# Short prompts, 1-3 turns, one with a system prompt: the tiny experiment's max_len (128) holds two or three turns.
TOPICS = ["kangaroos", "the sea", "tea", "rain", "maths", "trains", "owls", "bread", "chess", "snow", "jazz", "moss"]


def conversation(i: int) -> list[dict[str, str]]:
    turns = 1 + i % 3
    messages = [{"role": "system", "content": "Be brief."}] if i % 4 == 0 else []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"Question {t} about {TOPICS[(i + t) % len(TOPICS)]}" + "?" * (i % 5)},
            {"role": "assistant", "content": f"An original answer {i}.{t} from another model."},
        ]
    return messages


CONVERSATIONS = [conversation(i) for i in range(24)]


def write_openai(path: Path, conversations: list) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


@pytest.fixture(scope="module")
def tiny():
    """The tiny experiment's base (built under $KANGAROO_HOME on first use) and its tokenizer."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=tiny"])
    name = prepare_base(cfg)
    return load_base(name, dtype="float32"), load_tokenizer(name)


def reference_answer(base, prompt_ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """The base's own unbatched greedy generate, cut before EOS."""
    ids = torch.tensor([prompt_ids])
    out = base.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos
    )[0, len(prompt_ids) :].tolist()
    return out[: next((i for i, t in enumerate(out) if t in eos), len(out))]


def chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


# ---- answers equal the base's own greedy generate ------------------------------------------------------------


def test_batched_left_padded_answers_equal_unbatched_greedy(tiny):
    base, tokenizer = tiny
    prompts = [
        chat_ids(tokenizer, [{"role": "user", "content": c[-2]["content"] * (1 + i % 3)}])
        for i, c in enumerate(CONVERSATIONS[:6])
    ]
    assert len({len(p) for p in prompts}) > 2  # real left padding
    budgets = [MAX_NEW, 5, MAX_NEW, 1, 9, MAX_NEW]
    eos = [tokenizer.eos_token_id]
    batched = generate_answers(base, prompts, budgets, eos, tokenizer.pad_token_id)
    for prompt, budget, (ids, ended) in zip(prompts, budgets, batched, strict=True):
        assert ids == reference_answer(base, prompt, budget, eos) and len(ids) == budget and not ended

    # stop tokens that the base does produce: answers end there, EOS excluded, as unbatched generate ends them
    stops = [batched[0][0][3], batched[2][0][0]]
    batched = generate_answers(base, prompts, [MAX_NEW] * 6, stops, tokenizer.pad_token_id)
    assert batched[0][1] and len(batched[0][0]) <= 3 and batched[2] == ([], True)
    for prompt, (ids, ended) in zip(prompts, batched, strict=True):
        assert ids == reference_answer(base, prompt, MAX_NEW, stops)
        assert ended == (len(ids) < MAX_NEW)


def test_every_turn_answers_the_regenerated_history(tiny):
    """Turn t of every conversation is answered in one batch; each answer equals the base's own greedy answer to the
    history made of the earlier REGENERATED answers."""
    base, tokenizer = tiny
    eos = [tokenizer.eos_token_id]
    prompts = prompts_from_conversations(CONVERSATIONS[:7])
    settings = DistillSettings(max_new_tokens=MAX_NEW, batch_size=3)
    results = distill_conversations(base, tokenizer, prompts.skeletons, prompts.source_indices, settings, eos)
    for source, result in zip(CONVERSATIONS[:7], results, strict=True):
        history = [m for m in source[:1] if m["role"] == "system"]
        for message in source:
            if message["role"] != "user":
                continue
            history.append(message)
            ids = reference_answer(base, chat_ids(tokenizer, history), MAX_NEW, eos)
            history.append({"role": "assistant", "content": tokenizer.decode(ids)})
        assert result.messages == history
        assert "original answer" not in json.dumps(result.messages)
    users = sum(m["role"] == "user" for c in CONVERSATIONS[:7] for m in c)
    assert sum(r.stats["answers"] for r in results) == users
    assert sum(r.stats["answer_tokens"] for r in results) == users * MAX_NEW  # random weights: no EOS in 12 tokens
    assert sum(r.stats["cut_max_new_tokens"] for r in results) == users


def distill_counting(base, tokenizer, skeletons, indices, settings, eos):
    """distill_conversations, checking its progress reports: every user turn is reported once, as an answer or as
    a turn that will never be answered, and the reported tokens are the answers' tokens."""
    reports = []
    results = distill_conversations(base, tokenizer, skeletons, indices, settings, eos, lambda *r: reports.append(r))
    user_turns = sum(m["role"] == "user" for skeleton in skeletons for m in skeleton)
    assert sum(a for a, _, _ in reports) + sum(d for _, _, d in reports) == user_turns
    assert sum(t for _, t, _ in reports) == sum(r.stats["answer_tokens"] for r in results)
    return results


def test_max_len_bounds_prompt_plus_answer(tiny):
    base, tokenizer = tiny
    eos = [tokenizer.eos_token_id]
    three_turns = CONVERSATIONS[2]  # user, assistant x3 without a system prompt
    prompts = prompts_from_conversations([three_turns, CONVERSATIONS[0]])
    first = chat_ids(tokenizer, three_turns[:1])
    history = [
        three_turns[0],
        {"role": "assistant", "content": tokenizer.decode(reference_answer(base, first, MAX_NEW, eos))},
    ]
    second = chat_ids(tokenizer, [*history, three_turns[2]])
    settings = DistillSettings(max_new_tokens=MAX_NEW, max_len=len(second) + 5)
    result, short = distill_counting(base, tokenizer, prompts.skeletons, [0, 1], settings, eos)
    # turn 1's prompt leaves 5 tokens: its answer stops there (max_len) and the conversation ends
    assert result.messages == [
        *history,
        three_turns[2],
        {"role": "assistant", "content": tokenizer.decode(reference_answer(base, second, 5, eos))},
    ]
    assert result.stats["cut_max_len"] == 1 and result.stats["turns_beyond_max_len"] == 1
    assert result.stats["cut_max_new_tokens"] == 1 and result.stats["answer_tokens"] == MAX_NEW + 5
    assert short.stats["cut_max_len"] == 0 and len(short.messages) == 3  # system, user, assistant

    too_long = DistillSettings(max_new_tokens=MAX_NEW, max_len=len(first))  # not even the first answer fits
    (dropped,) = distill_counting(base, tokenizer, prompts.skeletons[:1], [0], too_long, eos)
    assert dropped.messages == [] and dropped.stats["dropped_max_len"] == 1
    assert dropped.stats["turns_beyond_max_len"] == 3


def test_empty_answers_end_their_conversation(tiny):
    base, tokenizer = tiny
    eos = [tokenizer.eos_token_id]
    prompts = prompts_from_conversations(CONVERSATIONS[1:3])  # 2 and 3 turns
    settings = DistillSettings(max_new_tokens=MAX_NEW)
    normal = distill_conversations(base, tokenizer, prompts.skeletons, [1, 2], settings, eos)
    # a stop token that starts conversation 2's second answer but is not in its first: that answer comes out empty
    stop = reference_answer(base, chat_ids(tokenizer, normal[1].messages[:3]), 1, eos)[0]
    assert stop not in reference_answer(base, chat_ids(tokenizer, normal[1].messages[:1]), MAX_NEW, eos)
    _, cut = distill_counting(base, tokenizer, prompts.skeletons, [1, 2], settings, [stop])
    assert cut.messages == normal[1].messages[:2]  # the first answer; the empty second one ends the conversation
    assert cut.stats["empty_answers"] == 1 and cut.stats["turns_after_empty"] == 1 and cut.stats["dropped_empty"] == 0
    first = reference_answer(base, chat_ids(tokenizer, prompts.skeletons[0][:1]), 1, eos)[0]
    gone, _ = distill_conversations(base, tokenizer, prompts.skeletons, [1, 2], settings, [first])
    assert gone.messages == [] and gone.stats["dropped_empty"] == 1 and gone.stats["turns_after_empty"] == 1


def test_sampled_answers_are_reproducible_per_conversation(tiny):
    base, tokenizer = tiny
    eos = [tokenizer.eos_token_id]
    prompts = prompts_from_conversations(CONVERSATIONS[:6])

    def run(batch_size: int, seed: int = 0, temperature: float = 0.8, order=range(6)):
        settings = DistillSettings(
            temperature=temperature, top_p=0.9, seed=seed, max_new_tokens=8, batch_size=batch_size
        )
        skeletons = [prompts.skeletons[i] for i in order]
        results = distill_conversations(base, tokenizer, skeletons, list(order), settings, eos)
        return {r.source_index: r.messages for r in results}

    together = run(batch_size=4)
    assert together == run(batch_size=1) == run(batch_size=3, order=[5, 2, 0, 4, 1, 3])  # batch-independent
    assert together != run(batch_size=4, seed=1)
    greedy = {
        r.source_index: r.messages
        for r in distill_conversations(
            base, tokenizer, prompts.skeletons, list(range(6)), DistillSettings(max_new_tokens=8), eos
        )
    }
    assert together != greedy


def test_directory_mix_original_and_stale_settings(tiny, tmp_path):
    """DistilledData in one process: shards, the assembled OpenAI data that load_conversations reads, the mixed file,
    and a directory refused when the settings change."""
    from kangaroo_train.data import load_conversations
    from kangaroo_train.distill import DistilledData

    base, tokenizer = tiny
    eos = [tokenizer.eos_token_id]
    prompts = prompts_from_conversations(CONVERSATIONS[:5])

    def data(max_new_tokens: int) -> DistilledData:
        settings = DistillSettings(max_new_tokens=max_new_tokens, batch_size=2)
        identity = {"base": tokenizer.name_or_path}
        return DistilledData(tmp_path, prompts=prompts, settings=settings, identity=identity, shard_size=2, eos=eos)

    distilled = data(6)
    assert not distilled.is_complete()
    distilled.build(base, tokenizer, progress=False)
    assert distilled.is_complete() and sorted(p.name for p in tmp_path.glob("shard-*")) == [
        "shard-00000.jsonl",
        "shard-00001.jsonl",
        "shard-00002.jsonl",
    ]
    assert distilled.report()["answers"] == 9 and distilled.report()["answer_tokens"] == 9 * 6  # 1+2+3+1+2 turns
    loaded = load_conversations(str(distilled.training_source(mix_original=False)), "openai")
    assert len(loaded) == 5 and "original answer" not in json.dumps(loaded)
    mixed = load_conversations(str(distilled.training_source(mix_original=True)), "openai")
    assert mixed == [*CONVERSATIONS[:5], *loaded]
    with pytest.raises(ValueError, match="are stale: they were made with other settings"):
        data(7).check()


# ---- bad input -----------------------------------------------------------------------------------------------


def test_prompt_errors_and_drops():
    with pytest.raises(ValueError, match=r"Conversation 2 .* empty user turn .*distill.empty_prompts=truncate"):
        prompts_from_conversations([*CONVERSATIONS[:2], [{"role": "user", "content": "  "}, *CONVERSATIONS[0][1:]]])
    later_empty = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "?"},
    ]
    cut = prompts_from_conversations([later_empty, [{"role": "user", "content": ""}]], empty_prompts="truncate")
    assert cut.skeletons == [[{"role": "user", "content": "Hi"}]] and cut.truncated_empty == 2
    assert cut.dropped_no_user == 1  # the one that starts with an empty turn keeps nothing

    no_user = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]
    kept = prompts_from_conversations([no_user, CONVERSATIONS[1], no_user])
    assert kept.source_indices == [1] and kept.dropped_no_user == 2
    with pytest.raises(ValueError, match="None of the 2 conversations to distill has a"):
        prompts_from_conversations([no_user, no_user])
    with pytest.raises(ValueError, match="empty_prompts='skip' must be one of"):
        prompts_from_conversations(CONVERSATIONS[:1], empty_prompts="skip")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.5, "distill.temperature=-0.5 must be >= 0"),
        ("top_p", 0.0, r"distill.top_p=0.0 must be in \(0, 1\]"),
        ("max_new_tokens", 0, "distill.max_new_tokens=0 must be a positive integer"),
        ("batch_size", True, "distill.batch_size=True must be a positive integer"),
        ("max_len", -3, "distill.max_len=-3 must be a positive integer or null"),
    ],
)
def test_bad_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillSettings(**{field: value})


def test_base_without_chat_template(tiny):
    base, tokenizer = tiny
    bare = load_tokenizer(tokenizer.name_or_path)
    bare.chat_template = None
    prompts = prompts_from_conversations(CONVERSATIONS[:1])
    with pytest.raises(ValueError, match="has no chat template.*distill=none"):
        distill_conversations(base, bare, prompts.skeletons, [0], DistillSettings(), [bare.eos_token_id])


# ---- the distill stage through the real entry point ----------------------------------------------------------


def run_train(
    output_dir: Path,
    *overrides: str,
    data: Path | None = None,
    distill: str = "greedy",
    env: dict | None = None,
    check: bool = True,
    popen: bool = False,
):
    """``python -m kangaroo_train experiment=tiny distill=greedy ...`` on ``data`` (default: this file's
    conversations)."""
    data = data or write_openai(output_dir.parent / f"{output_dir.name}-data.jsonl", CONVERSATIONS)
    distilling = [
        f"data.source={data}", "data.format=openai", f"distill={distill}", f"distill.max_new_tokens={MAX_NEW}",
        "distill.shard_size=4", "distill.batch_size=4",
    ]  # fmt: skip
    return helpers.run_train(output_dir, *distilling, *overrides, env=env, check=check, popen=popen)


def shards(directory: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in sorted(directory.glob("shard-*.jsonl"))}


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory) -> Path:
    """data -> distill -> cache -> train -> export on the distilled conversations, uninterrupted, one process."""
    output_dir = tmp_path_factory.mktemp("distilled") / "run"
    out = run_train(output_dir, "trainer.max_steps=6", "trainer.val_check_interval=3")
    assert "distill: 24 conversations (of 24 read" in out.stdout + out.stderr
    return output_dir


@pytest.mark.slow
def test_stage_end_to_end_and_lossless(distilled_run, tiny):
    from kangaroo_infer import KangarooModel

    base, tokenizer = tiny
    records = [
        json.loads(line) for line in (distilled_run / "distill" / "conversations.jsonl").read_text().splitlines()
    ]
    assert [r["source_index"] for r in records] == list(range(24))
    prompts = prompts_from_conversations(CONVERSATIONS)
    expected = distill_conversations(
        base, tokenizer, prompts.skeletons, prompts.source_indices, DistillSettings(max_new_tokens=MAX_NEW),
        [tokenizer.eos_token_id],
    )  # fmt: skip
    assert [r["messages"] for r in records] == [e.messages for e in expected]
    manifest = json.loads((distilled_run / "distill" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["report"]["answers"] == sum(len(c) // 2 for c in CONVERSATIONS)
    assert len(shards(distilled_run / "distill")) == 6

    # the features were cached from the distilled text: the same cache is stale for the original replies
    out = run_train(
        distilled_run.parent / "original", f"cache.dir={distilled_run / 'features'}", "stage=cache", distill="none",
        check=False,
    )  # fmt: skip
    assert_clean_error(out, "stale", "data_hash")

    km = KangarooModel.from_pretrained(None, adapter=distilled_run / "adapter")
    for prompt in ["Tell me about kangaroos.", "Question 1 about owls?"]:
        ids = torch.tensor([chat_ids(tokenizer, [{"role": "user", "content": prompt}])])
        ours = km.generate(ids, max_new_tokens=24)
        reference = km.base.generate(ids, do_sample=False, max_new_tokens=24, attention_mask=torch.ones_like(ids))
        assert torch.equal(ours.sequences, reference), prompt


@pytest.mark.slow
def test_rerun_skips_and_stale_settings_are_refused(distilled_run):
    before = shards(distilled_run / "distill")
    again = run_train(distilled_run, "stage=distill")
    assert "Distilling" not in again.stderr and shards(distilled_run / "distill") == before
    out = run_train(distilled_run, "stage=distill", "distill.max_new_tokens=7", check=False)
    assert_clean_error(out, "are stale", "settings", "distill.dir")


@pytest.mark.slow
def test_resume_after_kill_loses_at_most_one_shard(tiny, tmp_path):
    output_dir = tmp_path / "run"
    directory = output_dir / "distill"
    # one conversation per shard, longer answers: the kill lands while later shards are still being written
    settings = ["stage=distill", "distill.shard_size=1", "distill.max_new_tokens=32"]
    process = run_train(output_dir, *settings, popen=True)
    deadline = time.monotonic() + 300
    while not (directory / "shard-00000.jsonl").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    written = shards(directory)
    assert 1 <= len(written) < 24, "the kill came too late to test resuming"

    out = run_train(output_dir, *settings)
    assert f"{24 - len(written)} of 24 shards to write" in out.stderr
    after = shards(directory)
    assert len(after) == 24 and not list(directory.glob("*.tmp-*"))
    for name, stat in written.items():  # finished shards are kept, not rewritten
        assert (after[name].st_ino, after[name].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    # the same as an uninterrupted run (greedy answers do not depend on the batching: see the tests above)
    base, tokenizer = tiny
    prompts = prompts_from_conversations(CONVERSATIONS)
    decoding = DistillSettings(max_new_tokens=32, max_len=128)  # the tiny experiment's data.max_len
    eos = [tokenizer.eos_token_id]
    whole = distill_conversations(base, tokenizer, prompts.skeletons, prompts.source_indices, decoding, eos)
    records = [json.loads(line) for line in (directory / "conversations.jsonl").read_text().splitlines()]
    assert records == [{"messages": r.messages, "source_index": r.source_index} for r in whole if r.messages]


@pytest.mark.slow
def test_two_ranks_split_the_shards(distilled_run, tmp_path):
    output_dir = tmp_path / "run"
    processes = [
        run_train(output_dir, "stage=distill", popen=True, env={"SLURM_PROCID": str(r), "SLURM_STEP_NUM_TASKS": "2"})
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "rank 0, 3 of 3 shards to write" in outputs[0][1] and "rank 1," not in outputs[0][1]
    assert "rank 1, 3 of 3 shards to write" in outputs[1][1] and "rank 0," not in outputs[1][1]
    directory = output_dir / "distill"
    for path in sorted(directory.glob("shard-*.jsonl")):
        header = json.loads(path.read_text().splitlines()[0])
        assert header["rank"] == header["shard"] % 2, path.name
    expected = (distilled_run / "distill" / "conversations.jsonl").read_text()
    assert (directory / "conversations.jsonl").read_text() == expected


@pytest.mark.slow
def test_entry_point_errors(tmp_path):
    """Each bad input stops the run before any answer is generated, with one clear message."""
    bad = [*CONVERSATIONS[:3], [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]]
    data = write_openai(tmp_path / "bad.jsonl", bad)
    out = run_train(tmp_path / "empty", "stage=distill", data=data, check=False)
    assert_clean_error(out, "Conversation 3 of the data to distill has an empty user turn")

    # a base whose tokenizer has no chat template: the tiny model without its template
    tiny_dir = Path(prepare_base_for_tests())
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    out = run_train(tmp_path / "bare-run", f"model.name={bare}", "model.tiny=null", "stage=distill", check=False)
    assert_clean_error(out, "has no chat template", "distill=none")


def prepare_base_for_tests() -> str:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return prepare_base(compose(config_name="train", overrides=["experiment=tiny"]))
