"""Greedy Kangaroo decoding is token-identical to base.generate(do_sample=False) for any adapter and settings."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kangaroo_infer import KangarooModel
from kangaroo_infer.scheduler import PolicyConfig

from .conftest import VOCAB, identity_adapter, tiny_model

UNSET = object()


def vanilla(model, ids, max_new_tokens, eos_token_id=UNSET):
    eos = {} if eos_token_id is UNSET else {"eos_token_id": eos_token_id}
    return model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, **eos)


def classify(out) -> set[str]:
    """Kinds of verification rounds in one generation (prefill excluded)."""
    kinds = set()
    for drafted, accepted in zip(out.draft_lengths, out.accept_lengths[1:], strict=True):
        if drafted == 0:
            kinds.add("plain")
        elif accepted == drafted + 1:
            kinds.add("all-accepted")
        elif accepted == 1:
            kinds.add("all-rejected")
        else:
            kinds.add("partly-accepted")
    return kinds


def check_identical(km, ids, max_new_tokens, eos_token_id=UNSET, **kw):
    """Both sides get the same eos argument, or neither does (then the generation config's EOS applies)."""
    ref = vanilla(km.base, ids, max_new_tokens, eos_token_id)
    eos = {} if eos_token_id is UNSET else {"eos_token_id": eos_token_id}
    out = km.generate(ids, max_new_tokens=max_new_tokens, **kw, **eos)
    assert out.sequences.shape[0] == 1
    assert out.sequences[0, : ids.shape[1]].tolist() == ids[0].tolist()
    assert out.sequences[0].tolist() == ref[0].tolist(), f"mismatch with {kw}, eos={eos_token_id}"
    assert sum(out.accept_lengths) == out.sequences.shape[1] - ids.shape[1]
    assert len(out.accept_lengths) == len(out.draft_lengths) + 1
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lossless_sweep(arch, tied):
    """Many (exit layer, η, γ, prompt length, max_new_tokens) settings with trained-like and random adapters."""
    rng = random.Random(f"{arch}-{tied}")
    kinds: set[str] = set()
    grid = list(itertools.product([0.0, 0.3, 0.8, 1.0], [1, 2, 5, 9], [1, 6, 19], [1, 2, 11, 40]))
    for deep_scale, exit_layer, adapter_kind in [(0.05, 2, "identity"), (0.3, 1, "identity"), (1.0, 3, "random")]:
        model = tiny_model(arch, tied=tied, deep_scale=deep_scale, exit_layer=exit_layer, seed=rng.randrange(1000))
        km = KangarooModel.from_pretrained(model, exit_layer=exit_layer)
        if adapter_kind == "identity":
            identity_adapter(km)
        for i, (threshold, steps, prompt_len, max_new) in enumerate(rng.sample(grid, 14)):
            ids = torch.randint(3, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(rng.randrange(1000)))
            policy = "fixed" if i % 2 else PolicyConfig(measure_costs=False)  # deterministic adaptive decisions
            out = check_identical(
                km, ids, max_new, eos_token_id=None, threshold=threshold, max_draft_steps=steps, policy=policy
            )
            assert out.sequences.shape[1] == prompt_len + max_new  # no EOS: exactly max_new_tokens
            kinds |= classify(out)
    assert {"all-accepted", "partly-accepted", "all-rejected", "plain"} <= kinds, kinds


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_stops_right_after_eos_inside_a_draft(arch):
    """Pick as EOS a token that a round commits in the middle of several accepted drafts."""
    model = tiny_model(arch, deep_scale=0.05, exit_layer=2, seed=3)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    found = 0
    for seed in range(12):
        ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(seed))
        free = km.generate(ids, max_new_tokens=48, eos_token_id=[], threshold=0.0, max_draft_steps=6, policy="fixed")
        new = free.sequences[0, ids.shape[1] :].tolist()
        start = 0
        for length in free.accept_lengths:
            round_tokens = new[start : start + length]
            if length >= 3 and round_tokens[1] not in new[: start + 1] and round_tokens[1] not in ids[0].tolist():
                eos = round_tokens[1]
                out = check_identical(km, ids, 48, eos_token_id=eos, threshold=0.0, max_draft_steps=6, policy="fixed")
                assert out.sequences[0, -1].item() == eos
                assert out.sequences.shape[1] == ids.shape[1] + start + 2
                assert out.accept_lengths[-1] >= 2  # EOS came with accepted drafts in the same forward
                found += 1
                break
            start += length
    assert found >= 3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_generation_config_eos_and_list_eos(arch):
    model = tiny_model(arch, deep_scale=0.3, exit_layer=2, seed=5)
    km = KangarooModel.from_pretrained(model, exit_layer=2, init="copy")
    for seed in range(6):
        ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(seed))
        free = km.generate(ids, max_new_tokens=30, eos_token_id=[], threshold=0.2, max_draft_steps=4)
        new = free.sequences[0, 4:].tolist()
        check_identical(km, ids, 30, threshold=0.2, max_draft_steps=4)  # no argument: the config's EOS (2)
        check_identical(km, ids, 30, eos_token_id=None, threshold=0.2, max_draft_steps=4)  # None: no EOS
        check_identical(km, ids, 30, eos_token_id=[new[7], new[12]], threshold=0.2, max_draft_steps=4)
        check_identical(km, ids, 30, eos_token_id=new[0], threshold=0.2, max_draft_steps=4)  # EOS at prefill


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("mistral", {"sliding_window": 5}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
    ],
    ids=["mistral-window5", "qwen2-window4-upper-layers"],
)
def test_sliding_window_models(arch, overrides):
    model = tiny_model(arch, deep_scale=0.1, exit_layer=2, seed=7, **overrides)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    for seed, (threshold, steps) in enumerate([(0.0, 4), (0.5, 7), (1.0, 2)]):
        ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(seed))
        check_identical(km, ids, 30, eos_token_id=None, threshold=threshold, max_draft_steps=steps)


def test_eager_attention():
    model = tiny_model("llama", deep_scale=0.1, exit_layer=2, seed=11, attn="eager")
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    out = check_identical(km, ids, 25, eos_token_id=None, threshold=0.0, max_draft_steps=5)
    assert max(out.accept_lengths) > 1


def test_streamer_receives_prompt_then_every_committed_token():
    model = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=2)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    streamer = Collect()
    out = km.generate(ids, max_new_tokens=20, eos_token_id=[], streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert [len(c) for c in streamer.chunks[1:]] == out.accept_lengths
    assert sum(streamer.chunks[1:], []) == out.sequences[0, 6:].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_draft_vocabulary_is_lossless(arch, tmp_path):
    """Drafts drawn from a token subset (FR-Spec style); tokens outside it can only come from verification."""
    model = tiny_model(arch, deep_scale=0.05, exit_layer=2, seed=8, tied=arch == "qwen2")
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    full = km.generate(torch.tensor([[5, 9, 14]]), max_new_tokens=40, eos_token_id=None, policy="fixed", threshold=0.0)
    seen = sorted(set(full.sequences[0].tolist()))
    for vocab in (seen, seen[: len(seen) // 2], list(range(VOCAB))):
        km.adapter.set_draft_vocab(vocab)
        assert km.draft_head.weight.shape == (len(vocab), 64)
        for steps in (1, 4):
            out = check_identical(
                km, torch.tensor([[5, 9, 14]]), 40, eos_token_id=None, max_draft_steps=steps, threshold=0.0,
                policy="fixed",
            )  # fmt: skip
            if vocab is seen:
                assert out.tau > 1.5
    km.adapter.save_pretrained(tmp_path / "ckpt")
    loaded = KangarooModel.from_pretrained(model, adapter=tmp_path / "ckpt")
    assert loaded.adapter.draft_vocab.tolist() == list(range(VOCAB))
    assert loaded.adapter.config.draft_vocab_size == VOCAB
    with pytest.raises(ValueError, match="repeats token ids"):
        km.adapter.set_draft_vocab([3, 3])
    with pytest.raises(ValueError, match=r"within \[0, 96\)"):
        km.adapter.set_draft_vocab([VOCAB])


def test_prompt_beyond_the_positions_says_how_many_tokens_to_cut():
    """Prompt alone too long: how many tokens the prompt must lose (never a negative max_new_tokens); prompt + budget
    too long: both ways out, with numbers that fit."""
    km = KangarooModel.from_pretrained(tiny_model("llama"), exit_layer=2)  # 256 positions
    with pytest.raises(ValueError, match=r"prompt \(300 tokens\).*shorten the prompt by at least 45 tokens \(54 to"):
        km.generate(torch.full((1, 300), 5), max_new_tokens=10)
    with pytest.raises(ValueError, match=r"shorten the prompt by at least 1 tokens"):
        km.generate(torch.full((1, 256), 5), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"= 266 exceeds .* by 10 tokens or lower max_new_tokens to 6\."):
        km.generate(torch.full((1, 250), 5), max_new_tokens=16)
    with pytest.raises(ValueError, match=r"at least 45 tokens"):  # a batch row, the same message
        km.generate(torch.full((2, 300), 5), attention_mask=torch.ones(2, 300), max_new_tokens=10)
    assert km.generate(torch.full((1, 250), 5), max_new_tokens=6, eos_token_id=None).num_new_tokens == 6


@pytest.mark.parametrize("eos", [96, -1, [2, 500], True])
def test_eos_outside_the_vocabulary_is_refused(eos):
    km = KangarooModel.from_pretrained(tiny_model("llama"), exit_layer=2)  # vocabulary [0, 96)
    message = "eos_token_id must be an int" if eos is True else r"eos_token_id \[.*\] lies outside the vocabulary"
    for ids in (torch.tensor([[5, 6]]), torch.tensor([[5, 6], [7, 8]])):
        with pytest.raises(ValueError, match=message):
            km.generate(ids, max_new_tokens=3, eos_token_id=eos)
    with pytest.raises(ValueError, match=message):
        km.resolve_eos(eos)
