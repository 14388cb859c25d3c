"""Batched greedy Kangaroo decoding: every row equals its own vanilla greedy output (prompt without padding)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from kangaroo_infer import KangarooModel
from kangaroo_infer.scheduler import PolicyConfig

from .conftest import VOCAB, identity_adapter, tiny_model

PAD = 0


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:  # ids [B, T], mask [B, T]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def vanilla_row(model, prompt: list[int], max_new_tokens: int, eos_token_id) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=PAD,
        eos_token_id=eos_token_id,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def check_batch(km, prompts, max_new_tokens, eos_token_id=None, **kw):
    """Each row's new tokens equal its own vanilla run; rows end with pad tokens after they finish."""
    ids, mask = left_pad(prompts)
    out = km.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, **kw)
    refs = [vanilla_row(km.base, p, max_new_tokens, eos_token_id) for p in prompts]
    n_max = max(len(r) for r in refs)
    assert out.sequences.shape == (len(prompts), ids.shape[1] + n_max)
    assert out.sequences[:, : ids.shape[1]].tolist() == ids.tolist()
    for row, ref in enumerate(refs):
        assert out.sequences[row, ids.shape[1] :].tolist() == ref + [PAD] * (n_max - len(ref)), f"row {row}, {kw}"
        assert sum(out.accept_lengths[row]) == len(ref)
        assert len(out.accept_lengths[row]) == len(out.draft_lengths[row]) + 1
    return out


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("mistral", {}),
        ("mistral", {"sliding_window": 5}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
        ("llama", {"attn": "eager"}),
    ],
    ids=["llama", "qwen2-tied", "mistral", "mistral-window5", "qwen2-window4", "llama-eager"],
)
def test_batch_greedy_equals_each_rows_vanilla(arch, overrides):
    """Random tiny models and adapters (often and rarely accepted drafts), ragged prompts, many settings."""
    rng = random.Random(f"batch-{arch}-{overrides}")
    accepted_lengths = set()
    for deep_scale, exit_layer, adapter in [(0.05, 2, "identity"), (1.0, 1, "random")]:
        model = tiny_model(arch, deep_scale=deep_scale, exit_layer=exit_layer, seed=rng.randrange(1000), **overrides)
        km = KangarooModel.from_pretrained(model, exit_layer=exit_layer)
        if adapter == "identity":
            identity_adapter(km)
        for threshold, steps, policy in [(0.0, 5, "fixed"), (0.6, 3, PolicyConfig(measure_costs=False))]:
            prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 14))] for _ in range(rng.randint(2, 5))]
            out = check_batch(
                km, prompts, rng.randint(8, 24), threshold=threshold, max_draft_steps=steps, policy=policy
            )
            accepted_lengths |= {a for row in out.accept_lengths for a in row[1:]}
    assert 1 in accepted_lengths and max(accepted_lengths) >= 3  # rejections and multi-token rounds both happen


@pytest.mark.parametrize(
    "arch,overrides",
    [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("mistral", {"sliding_window": 5})],
    ids=["llama", "qwen2-tied", "mistral-window5"],
)
def test_batch_trees_equal_each_rows_vanilla(arch, overrides):
    """Draft trees in a batch: every row its own tree (levels of different widths, rows capped by their own
    budgets, EOS in some rows), lookup rounds between tree rounds; each row equals its own greedy generate."""
    rng = random.Random(f"batch-tree-{arch}")
    accepted, widths = set(), set()
    for deep_scale, exit_layer, adapter in [(0.05, 2, "identity"), (0.4, 2, "identity"), (1.0, 1, "random")]:
        model = tiny_model(arch, deep_scale=deep_scale, exit_layer=exit_layer, seed=rng.randrange(1000), **overrides)
        km = KangarooModel.from_pretrained(model, exit_layer=exit_layer)
        if adapter == "identity":
            identity_adapter(km)
        for threshold, steps, top_k, max_nodes in [(0.0, 4, 3, 10), (0.3, 3, 2, 5), (0.9, 6, 4, 40)]:
            prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 14))] for _ in range(rng.randint(2, 5))]
            policy = rng.choice(["fixed", PolicyConfig(measure_costs=False)])
            out = check_batch(
                km, prompts, rng.randint(1, 24), threshold=threshold, max_draft_steps=steps, policy=policy,
                tree=True, tree_top_k=top_k, tree_max_nodes=max_nodes, lookup_tokens=rng.choice([0, None]),
            )  # fmt: skip
            accepted |= {a for row in out.accept_lengths for a in row[1:]}
            widths |= {d for row in out.draft_lengths for d in row}
    assert 1 in accepted and max(accepted) >= 3 and max(widths) > 4  # rejections, long paths, branching trees
    ids, mask = left_pad(prompts[:3])
    free = km.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, tree=True, threshold=0.0)
    new = free.sequences[:, ids.shape[1] :].tolist()
    check_batch(km, prompts[:3], 12, eos_token_id=[new[0][2], new[1][0]], tree=True, threshold=0.0, policy="fixed")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rows_stop_independently_at_eos(arch):
    """EOS tokens that some rows reach early (inside accepted drafts, or at the first token) and others never."""
    model = tiny_model(arch, deep_scale=0.05, exit_layer=2, seed=12)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    rng = random.Random(arch)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(length)] for length in (3, 9, 1, 6, 12)]
    ids, mask = left_pad(prompts)
    free = km.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=None, threshold=0.0)
    new = free.sequences[:, ids.shape[1] :].tolist()
    eos = [new[0][6], new[2][0]]  # row 0 stops at its 7th token at the latest, row 2 at its first
    out = check_batch(km, prompts, 30, eos_token_id=eos, threshold=0.0, max_draft_steps=6, policy="fixed")
    lengths = [sum(a) for a in out.accept_lengths]
    assert lengths[0] <= 7 and lengths[2] == 1 and max(lengths) > 7
    check_batch(km, prompts, 30, eos_token_id=new[1][3], threshold=0.3, max_draft_steps=4)
    out = check_batch(km, prompts, 30, eos_token_id=[tok for row in new for tok in row[:3]])
    assert all(out.sequences[row, ids.shape[1] + sum(a) - 1].item() in new[row][:3] for row, a in
               enumerate(out.accept_lengths) if sum(a) < 30)  # fmt: skip


def test_generation_config_eos_default_and_pad_token():
    model = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=13)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    prompts = [[5, 6, 7], [8, 9]]
    ids, mask = left_pad(prompts)
    free = km.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=None, threshold=0.0)
    model.generation_config.eos_token_id = free.sequences[0, 3 + 4].item()
    model.generation_config.pad_token_id = 77
    out = km.generate(ids, attention_mask=mask, max_new_tokens=20, threshold=0.0)
    assert sum(out.accept_lengths[0]) <= 5 and out.sequences[0, -1].item() == 77


def test_single_row_with_mask_and_draft_vocab_and_short_budgets():
    model = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=14)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    # Decisions from the cost priors: measured timings of a tiny model would make drafting depend on the load.
    out = check_batch(km, [[5, 9, 14]], 20, threshold=0.0, policy=PolicyConfig(measure_costs=False))
    assert isinstance(out.accept_lengths[0], list) and out.tau > 1.5
    km.adapter.set_draft_vocab(list(range(0, VOCAB, 3)))
    for max_new in (1, 2, 3, 17):
        check_batch(km, [[5, 9, 14], [3], [20, 21, 22, 23, 24, 25]], max_new, threshold=0.0, policy="fixed")


def test_same_length_rows_without_mask():
    model = tiny_model("mistral", deep_scale=0.1, exit_layer=2, seed=15)
    km = KangarooModel.from_pretrained(model, exit_layer=2, init="copy")
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    out = km.generate(ids, max_new_tokens=15, eos_token_id=None)
    for row in range(3):
        assert out.sequences[row, 5:].tolist() == vanilla_row(km.base, ids[row].tolist(), 15, None)
    assert out.num_new_tokens == 45 and out.tau >= 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"attention_mask": torch.ones(2, 3)}, r"attention_mask must be a tensor of input_ids' shape \[2, 4\]"),
        ({"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}, "right padding or holes"),
        ({"attention_mask": torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]])}, "right padding or holes"),
        ({"attention_mask": torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])}, r"Rows \[0\] of attention_mask are all"),
        ({"attention_mask": torch.tensor([[2, 1, 1, 1], [1, 1, 1, 1]])}, "only 0 .padding. and 1"),
        ({"streamer": object()}, "A streamer takes one prompt"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"threshold": 2.0}, r"threshold must lie in \[0, 1\]"),
    ],
)
def test_batch_argument_errors(kwargs, message):
    km = KangarooModel.from_pretrained(tiny_model("llama"), exit_layer=2)
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        km.generate(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), **kwargs)


def test_bench_batch_throughput_cli(tiny_dirs, tmp_path):
    """--batch-size: batched kangaroo vs batched vanilla per batch size, under "batch" in results.json."""
    root, _, _ = tiny_dirs
    questions = tmp_path / "q.jsonl"
    prompts = ["Write a poem about the sea.", "Hi", "Who wrote Hamlet? Answer briefly, please."]
    questions.write_text("".join(json.dumps({"category": "x", "turns": [p]}) + "\n" for p in prompts))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "kangaroo_infer", "bench", "--adapter", str(root / "adapter"), "--questions",
         str(questions), "--max-new-tokens", "10", "--threshold", "0.1", "--batch-size", "1,2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["batch"]) == {"1", "2"} and summary["batch"]["2"]["batches"] == 2
    for row in summary["batch"].values():
        assert row["rows"] == 3 and row["kangaroo_tokens_per_s"] > 0 and row["vanilla_tokens_per_s"] > 0
        assert row["tau"] > 1.0 and row["tokens"] == row["vanilla_tokens"]
    assert summary["batch"]["1"]["rows_identical_to_vanilla_batch"] == 3
    assert "batched throughput" in result.stdout and summary["batch_config"]["tree"] is None
    assert summary["batch_config"]["machine"]["torch_threads"] == 1 and "machine: " in result.stdout  # OMP_NUM_THREADS
    tree = subprocess.run(
        [sys.executable, "-m", "kangaroo_infer", "bench", "--adapter", str(root / "adapter"), "--questions",
         str(questions), "--max-new-tokens", "10", "--batch-size", "3", "--tree", "--tree-top-k", "2", "--policy",
         "fixed", "--out", str(tmp_path / "tree")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert tree.returncode == 0, tree.stderr
    summary = json.loads((tmp_path / "tree" / "results.json").read_text())
    assert summary["batch_config"]["tree"] == [2, 16] and summary["batch"]["3"]["tokens"] > 0


# ---- lookup copies per row, and plain batched steps ----------------------------------------------------------------


def repetitive(rng: random.Random, length: int) -> list[int]:
    """A prompt that restates pieces of itself: lookup finds matches in it."""
    pieces = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 6))] for _ in range(3)]
    tokens: list[int] = []
    while len(tokens) < length:
        tokens += rng.choice(pieces) if rng.random() < 0.7 else [rng.randrange(3, VOCAB)]
    return tokens[:length]


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 5})])
def test_batch_lookup_rows_equal_their_own_greedy_runs(arch, overrides):
    """Per-row copies (ragged prompts, rows with and without matches) keep every row equal to its own greedy run,
    with copies fully right, partly right and wrong; EOS inside a copied stretch ends that row right there."""
    rng = random.Random(arch)
    model = tiny_model(arch, deep_scale=0.05, exit_layer=2, seed=22, **overrides)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    prompts = [repetitive(rng, n) for n in (1, 7, 16, 24, 30)]
    kinds = set()
    priors = PolicyConfig(measure_costs=False)
    for lookup_tokens, policy, steps in [(12, "fixed", 3), (4, priors, 5), (1, "fixed", 2), (None, "fixed", 1)]:
        out = check_batch(km, prompts, 40, threshold=0.0, max_draft_steps=steps, policy=policy,
                          lookup_tokens=lookup_tokens, lookup_min_ngram=1)  # fmt: skip
        for row, rounds in enumerate(out.lookup_rounds):
            for r in rounds:
                drafted, committed = out.draft_lengths[row][r], out.accept_lengths[row][r + 1]
                assert drafted <= (lookup_tokens or 12)
                kinds.add("all" if committed == drafted + 1 else "none" if committed == 1 else "part")
    assert kinds == {"all", "part", "none"}, kinds
    free = check_batch(km, prompts, 40, policy="fixed", lookup_min_ngram=1)
    ids, _ = left_pad(prompts)
    new = free.sequences[:, ids.shape[1] :].tolist()
    row = max(range(len(prompts)), key=lambda r: len(free.lookup_rounds[r]))
    r = free.lookup_rounds[row][-1]
    start = sum(free.accept_lengths[row][: r + 1])
    eos = new[row][start + free.accept_lengths[row][r + 1] - 1]  # the last token that copied round committed
    out = check_batch(km, prompts, 40, eos_token_id=eos, policy="fixed", lookup_min_ngram=1)
    assert sum(out.accept_lengths[row]) <= start + free.accept_lengths[row][r + 1]


def test_batch_falls_back_to_plain_batched_steps_when_drafting_does_not_pay():
    """A useless adapter and no lookup matches: the scheduler decides for the batch and takes plain batched steps
    (no drafts) after a few probes; every row is still its own greedy output."""
    model = tiny_model("llama", seed=4)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    with torch.no_grad():  # zero output: every draft is token 0, which the model never picks
        km.adapter.norm.weight.zero_()
    prompts = [[5, 9, 14], [3], [20, 21, 22, 23, 24, 25]]
    out = check_batch(km, prompts, 60, threshold=0.0, max_draft_steps=5, policy=PolicyConfig(measure_costs=False),
                      lookup_tokens=0)  # fmt: skip
    for lengths in out.draft_lengths:
        assert lengths.count(0) > 0.8 * len(lengths)
    assert out.tau == 1.0
