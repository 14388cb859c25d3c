"""Lookup drafting: the n-gram index, its rounds inside generate (lossless, caches in step), settings and policy."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import DynamicCache

from kangaroo_infer import KangarooAdapter, KangarooModel
from kangaroo_infer.accept import accept_proposal
from kangaroo_infer.cache import KangarooCache
from kangaroo_infer.draft import adapter_logits, shallow_step
from kangaroo_infer.lookup import NgramLookup
from kangaroo_infer.proposal import Proposal
from kangaroo_infer.sample import SamplingConfig
from kangaroo_infer.scheduler import PolicyConfig, Scheduler
from kangaroo_infer.verify import Verifier

from .conftest import VOCAB, identity_adapter, tiny_model
from .test_lossless import check_identical

# ---- the index ---------------------------------------------------------------------------------------------------


def brute_force(tokens: list[int], limit: int, min_n: int, max_n: int) -> list[int]:
    """The specification, searched directly: longest suffix first, its latest earlier occurrence, copied forward."""
    for n in range(min(max_n, len(tokens)), min_n - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                seq = list(tokens)
                for i in range(limit):
                    seq.append(seq[start + n + i])
                return seq[len(tokens) :]
    return []


def test_latest_occurrence_of_the_longest_suffix_is_copied():
    tokens = [1, 2, 3, 9, 1, 2, 4, 8, 5, 1, 2]
    assert NgramLookup(tokens, 2, 3).propose(3) == [4, 8, 5]  # (1, 2) last seen before 4, 8, 5
    tokens = [7, 1, 2, 6, 9, 1, 2, 4, 7, 1, 2]
    assert NgramLookup(tokens, 2, 3).propose(2) == [6, 9]  # (7, 1, 2) beats the later (1, 2)
    assert NgramLookup(tokens, 2, 2).propose(2) == [4, 7]


def test_a_loop_is_copied_past_the_end_of_the_sequence():
    assert NgramLookup([5, 7, 8, 7, 8], 2, 3).propose(5) == [7, 8, 7, 8, 7]
    assert NgramLookup([3, 3, 3], 2, 2).propose(4) == [3, 3, 3, 3]


def test_no_match_and_limits():
    assert NgramLookup([1, 2, 3, 4], 1, 3).propose(4) == []
    assert NgramLookup([1, 5, 2, 5], 2, 3).propose(4) == []  # only a unigram repeats
    assert NgramLookup([1, 5, 2, 5], 1, 3).propose(2) == [2, 5]
    assert NgramLookup([1, 2, 1, 2], 2, 3).propose(0) == []
    assert NgramLookup([4], 1, 3).propose(3) == []
    for bad in [(0, 2), (3, 2)]:
        with pytest.raises(ValueError, match="n-gram sizes"):
            NgramLookup([1, 2], *bad)


def test_growing_index_agrees_with_a_direct_search():
    rng = random.Random(0)
    for trial in range(60):
        min_n, max_n = rng.choice([(1, 1), (1, 3), (2, 3), (2, 5)])
        alphabet = rng.choice([2, 3, 6])
        tokens = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 8))]
        index = NgramLookup(tokens, min_n, max_n)
        for _ in range(12):
            limit = rng.randrange(0, 6)
            assert index.propose(limit) == brute_force(tokens, limit, min_n, max_n), (trial, tokens)
            grow = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 4))]
            tokens += grow
            index.extend(grow)


# ---- decoding ----------------------------------------------------------------------------------------------------


def repetitive_prompt(rng: random.Random, length: int) -> torch.Tensor:
    """A prompt that restates pieces of itself, as documents and chats do: lookup finds matches in it."""
    pieces = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 6))] for _ in range(3)]
    tokens: list[int] = []
    while len(tokens) < length:
        tokens += rng.choice(pieces) if rng.random() < 0.7 else [rng.randrange(3, VOCAB)]
    return torch.tensor([tokens[:length]])


def round_kinds(out) -> set[str]:
    kinds = set()
    for i in out.lookup_rounds:
        drafted, committed = out.draft_lengths[i], out.accept_lengths[i + 1]
        kinds.add("all" if committed == drafted + 1 else "none" if committed == 1 else "part")
    return kinds


def test_lookup_rounds_are_lossless():
    kinds: set[str] = set()
    adapter_rounds = 0
    grid = list(itertools.product([1, 2, 7, 12], [(1, 1), (2, 3), (1, 4)], [0.0, 0.6], [1, 4]))
    for arch in ["llama", "qwen2", "mistral"]:
        rng = random.Random(arch)
        extra = {"sliding_window": 5} if arch == "mistral" else {}
        for deep_scale, kind in [(0.05, "identity"), (1.0, "random")]:
            model = tiny_model(arch, deep_scale=deep_scale, exit_layer=2, seed=rng.randrange(99), **extra)
            km = KangarooModel.from_pretrained(model, exit_layer=2)
            if kind == "identity":
                identity_adapter(km)
            for i, (tokens, (min_n, max_n), threshold, steps) in enumerate(rng.sample(grid, 16)):
                ids = repetitive_prompt(rng, rng.choice([1, 12, 30]))
                policy = "fixed" if i % 2 else PolicyConfig(measure_costs=False)
                out = check_identical(
                    km, ids, rng.choice([1, 9, 40, 60]), eos_token_id=None, threshold=threshold,
                    max_draft_steps=steps, policy=policy, lookup_tokens=tokens, lookup_min_ngram=min_n,
                    lookup_max_ngram=max_n,
                )  # fmt: skip
                assert all(out.draft_lengths[r] <= tokens for r in out.lookup_rounds)
                kinds |= round_kinds(out)
                adapter_rounds += len(out.draft_lengths) - len(out.lookup_rounds)
    assert kinds == {"all", "part", "none"}, kinds  # copies fully right, partly right and wrong were verified
    assert adapter_rounds > 0


def test_lookup_stops_right_after_eos():
    model = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=5)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    ids = repetitive_prompt(random.Random(5), 24)
    free = km.generate(ids, max_new_tokens=40, eos_token_id=None, policy="fixed")
    assert free.lookup_rounds
    new = free.sequences[0, ids.shape[1] :].tolist()
    # An EOS that a lookup round commits after its first token: decoding must end right there.
    r = max(free.lookup_rounds, key=lambda i: free.accept_lengths[i + 1])
    start = sum(free.accept_lengths[: r + 1])
    assert free.accept_lengths[r + 1] > 1
    check_identical(km, ids, 40, eos_token_id=new[start + 1], policy="fixed")
    for eos in set(new[:10]):
        check_identical(km, ids, 40, eos_token_id=eos, policy="fixed")


@pytest.mark.parametrize("accepted", [0, 2, 5])
def test_caches_after_a_lookup_round_match_a_fresh_pass(accepted):
    """Base caches hold exactly the committed tokens; the adapter then drafts as if it had read them all."""
    model = tiny_model("llama", exit_layer=2, seed=4)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    prompt = [5, 17, 33, 8, 40, 41, 9]
    cache = KangarooCache(2, km.backbone.num_layers)
    first = int(km.prefill(torch.tensor([prompt]), cache).argmax())
    truth = model.generate(torch.tensor([prompt + [first]]), do_sample=False, max_new_tokens=8, pad_token_id=0)
    truth = truth[0, len(prompt) + 1 :].tolist()
    drafts = truth[:accepted] + [(truth[accepted] + 1) % VOCAB] + [3, 4]  # the first `accepted` are right
    verifier = Verifier(km.backbone, 2, cache)  # one lookup round: verify the copies, accept greedily, roll back
    proposal = Proposal(drafts, copied=True)
    logits = verifier.logits(first, proposal)  # [k + 1, V]
    path, nxt = accept_proposal(proposal, logits, SamplingConfig())
    assert path == list(range(accepted + 1))
    verifier.keep(path)
    committed = drafts[:accepted] + [nxt]
    assert committed == truth[: accepted + 1]
    sequence = prompt + [first] + committed[:-1]
    with torch.no_grad():
        ref = model(torch.tensor([sequence]), cache=DynamicCache(), use_cache=True).cache
    for idx in range(km.backbone.num_layers):
        assert cache.base.layers[idx].keys.shape[-2] == len(sequence)
        assert torch.allclose(cache.base.layers[idx].keys, ref.layers[idx].keys, atol=1e-4)
    assert cache.adapter_len + cache.unread_len == len(sequence)
    fresh = KangarooCache(2, km.backbone.num_layers)
    km.prefill(torch.tensor([sequence]), fresh)
    after = []
    for c in (cache, fresh):
        state = shallow_step(km.backbone, 2, c, torch.tensor([[committed[-1]]]))
        after.append(adapter_logits(km.backbone, km.adapter, km.draft_head, c, state))
    assert torch.allclose(after[0], after[1], atol=1e-4)


def test_lookup_settings_defaults_and_errors(tmp_path):
    model = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=5)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    prompts = [repetitive_prompt(random.Random(seed), 30) for seed in range(6)]
    by_default = [km.generate(p, max_new_tokens=40, eos_token_id=None, policy="fixed").lookup_rounds for p in prompts]
    assert any(by_default)  # on by default
    ids = prompts[next(i for i, rounds in enumerate(by_default) if rounds)]
    assert km.generate(ids, max_new_tokens=40, eos_token_id=None, lookup_tokens=0).lookup_rounds == []
    for kw, message in [
        ({"lookup_tokens": -1}, "lookup_tokens must be an integer >= 0"),
        ({"lookup_tokens": True}, "lookup_tokens must be an integer"),
        ({"lookup_tokens": 2.5}, "lookup_tokens must be an integer"),
        ({"lookup_min_ngram": 0}, "lookup_min_ngram must be an integer >= 1"),
        ({"lookup_min_ngram": 4, "lookup_max_ngram": 3}, r"lookup_min_ngram \(4\) must not exceed"),
    ]:
        with pytest.raises(ValueError, match=message):
            km.generate(ids, max_new_tokens=5, **kw)
    # Batches and sampling copy too, by default and when asked.
    batch, mask = ids.repeat(2, 1), torch.ones(2, ids.shape[1], dtype=torch.long)
    for kw in [{}, {"lookup_tokens": 4}]:
        out = km.generate(batch, attention_mask=mask, max_new_tokens=40, eos_token_id=None, policy="fixed", **kw)
        assert all(out.lookup_rounds) and out.sequences[0].tolist() == out.sequences[1].tolist()
        sampled = [
            km.generate(
                ids,
                max_new_tokens=40,
                eos_token_id=None,
                temperature=0.7,
                seed=seed,
                policy="fixed",
                lookup_min_ngram=1,
                **kw,
            )  # fmt: skip
            for seed in range(4)
        ]
        assert any(out.lookup_rounds for out in sampled)
    # An adapter checkpoint's generation defaults switch it off or tune it.
    km.adapter.save_pretrained(tmp_path / "a", generation={"lookup_tokens": 0})
    off = KangarooModel(model, KangarooAdapter.from_pretrained(tmp_path / "a", model))
    assert off.generate(ids, max_new_tokens=40, eos_token_id=None, policy="fixed").lookup_rounds == []


def test_adapter_drafting_off():
    """max_draft_steps=0 turns the adapter off: lookup drafts alone, or (with lookup_tokens=0 too) every round is a
    plain step, for one prompt, a tree request, a batch and sampling alike; output unchanged."""
    model = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=5)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)  # drafts that would often be accepted: switched off, none may appear
    rng = random.Random(3)
    prompts = [repetitive_prompt(rng, 30) for _ in range(4)]
    for ids in prompts:
        on = check_identical(km, ids, 40, eos_token_id=None, threshold=0.0, policy="fixed", lookup_tokens=0)
        assert on.tau > 1.2  # the adapter drafts and is accepted when it is on
        for kw in ({}, {"tree": True}):
            plain = check_identical(km, ids, 40, eos_token_id=None, max_draft_steps=0, lookup_tokens=0, **kw)
            assert set(plain.draft_lengths) == {0} and plain.lookup_rounds == [] and plain.tau == 1.0
        copied = check_identical(km, ids, 40, eos_token_id=None, max_draft_steps=0, policy="fixed")
        assert [i for i, n in enumerate(copied.draft_lengths) if n] == copied.lookup_rounds
    assert any(check_identical(km, p, 40, eos_token_id=None, max_draft_steps=0).lookup_rounds for p in prompts)
    batch = torch.cat(prompts)
    out = km.generate(batch, max_new_tokens=30, eos_token_id=None, max_draft_steps=0, lookup_tokens=0)
    assert all(set(row) == {0} for row in out.draft_lengths)
    for row, ids in enumerate(prompts):
        ref = km.generate(ids, max_new_tokens=30, eos_token_id=None)
        assert out.sequences[row].tolist() == ref.sequences[0].tolist()
    sampled = km.generate(prompts[0], max_new_tokens=30, eos_token_id=None, temperature=0.8, seed=1, max_draft_steps=0)
    assert sampled.lookup_rounds == [i for i, n in enumerate(sampled.draft_lengths) if n]
    with pytest.raises(ValueError, match="max_draft_steps must be an integer >= 0; got -1"):
        km.generate(prompts[0], max_new_tokens=5, max_draft_steps=-1)


# ---- the policy ----------------------------------------------------------------------------------------------------


def test_lookup_and_adapter_compete_in_one_scheduler():
    """Free copies that keep being right win over an adapter whose drafts keep being wrong, and the other way round;
    both share one table of verification costs."""
    config = PolicyConfig(measure_costs=False)
    scheduler = Scheduler.create(config, {"adapter": False, "lookup": True})
    offers = {"adapter": 4, "lookup": 7}
    for _ in range(30):
        scheduler.observe("lookup", 7, 7, 0.0, 1.0)
        scheduler.observe("adapter", 4, 0, 1.0, 1.0)
    assert scheduler.choose(offers) == ("lookup", 7)
    for _ in range(60):
        scheduler.observe("lookup", 3, 0, 0.0, 1.0)
        scheduler.observe("adapter", 4, 4, 1.0, 1.0)
    assert scheduler.choose(offers)[0] == "adapter"
    assert scheduler.draft("lookup") == 0.0 < scheduler.draft("adapter")
    fixed = Scheduler.create("fixed", {"adapter": False, "lookup": True})
    assert fixed.choose({"adapter": 4, "lookup": 1}) == ("lookup", 1) and fixed.choose({"adapter": 4}) == ("adapter", 4)
