"""The adapter's cache follows one rule for a prompt and for a batch (``cache.py``): between rounds it holds every
base slot but the newest m, whose exit states wait unread for its next call. Checked after every round of real
decoding (chains, trees, lookup copies, plain steps, rows that finish early) against the adapter run from scratch
over the tokens committed so far. Drafts are not part of the lossless guarantee, so nothing else would notice an
adapter that reads the wrong states: only the acceptance rate would drop."""

from __future__ import annotations

import random

import torch
from transformers import DynamicCache

from kangaroo_infer import KangarooModel
from kangaroo_infer.adapter import KangarooAdapter
from kangaroo_infer.batch import BatchRows
from kangaroo_infer.rounds import PromptRows, decode
from kangaroo_infer.settings import GenerationOptions, GenerationSettings, prompt_padding

from .conftest import assert_fp32_close, identity_adapter, tiny_model
from .test_batch import left_pad, repetitive

REDUCTION = 256  # longest fp32 reduction of the tiny models: MLP width 128, prompts + answers < 256 tokens


def from_scratch(km, tokens: list[int]) -> tuple[torch.Tensor, DynamicCache]:
    """Exit states [1, n, H] of ``tokens`` (one prefill) and the adapter's cache after reading all of them."""
    with torch.no_grad():
        _, exits = km.backbone.prefill(torch.tensor([tokens]), km.exit_layer, DynamicCache())
        cache = DynamicCache()
        km.adapter(exits, cache=cache)
    return exits, cache


def check_row(km, tokens: list[int], adapter: DynamicCache, unread: torch.Tensor | None, pad: int, read: int) -> None:
    """One row: adapter slots [pad, read) and unread exit states hold what reading ``tokens`` from scratch gives."""
    exits, ref = from_scratch(km, tokens)
    n = read - pad  # adapter entries of this row (slots before pad are padding)
    m = 0 if unread is None else unread.shape[1]
    if n > 0:
        for got, want in zip(adapter.layers, ref.layers, strict=True):
            assert_fp32_close(got.keys[:, :, pad:read], want.keys[:, :, :n], REDUCTION)
            assert_fp32_close(got.values[:, :, pad:read], want.values[:, :, :n], REDUCTION)
    valid = min(m, len(tokens))  # a batch row's unread slots may start in its padding
    if valid:
        assert_fp32_close(unread[:, m - valid :], exits[:, len(tokens) - valid :], REDUCTION)


class Recorder:
    """Keeps each row's committed tokens as the loop reports them; ``lags`` collects every m seen."""

    def record(self, prompts: list[list[int]]) -> None:
        self.tokens = [list(p) for p in prompts]
        self.lags: list[int] = []


class CheckedPrompt(PromptRows, Recorder):
    def observe(self, row: int, committed: list[int]) -> None:
        super().observe(row, committed)
        self.tokens[0] += committed

    def keep(self, still, result) -> None:
        super().keep(still, result)
        cache, sequence = self.cache, self.tokens[0][:-1]  # the newest token is not in any cache yet
        assert cache.shallow_len == cache.deep_len == len(sequence)
        assert cache.adapter_len + cache.unread_len == len(sequence)
        check_row(self.km, sequence, cache.adapter, cache.unread, 0, cache.adapter_len)
        self.lags.append(cache.unread_len)


class CheckedBatch(BatchRows, Recorder):
    def observe(self, row: int, committed: list[int]) -> None:
        super().observe(row, committed)
        self.tokens[self.active[row]] += committed

    def keep(self, still, result) -> None:
        super().keep(still, result)
        slots, read = self.base.get_seq_length(0), self.adapter_cache.get_seq_length(0)
        m = 0 if self.unread is None else self.unread.shape[1]
        assert read + m == slots
        for i, row in enumerate(self.active):
            sequence, pad = self.tokens[row][:-1], int(self.pad[i])
            assert slots - pad == len(sequence)
            unread = None if self.unread is None else self.unread[i : i + 1]
            rows = DynamicCache()
            for layer in self.adapter_cache.layers:
                rows.update(layer.keys[i : i + 1], layer.values[i : i + 1], len(rows.layers))
            check_row(self.km, sequence, rows, unread, pad, read)
        self.lags.append(m)


def run(km, rows_cls, prompts: list[list[int]], **options):
    batched = rows_cls is CheckedBatch
    settings = GenerationSettings.resolve(
        km.limits, km.adapter.config.generation, GenerationOptions.of(options, "test")
    )
    if batched:
        ids, mask = left_pad(prompts)
        rows = rows_cls(km, ids, prompt_padding(ids, mask), settings, None)
    else:
        rows = rows_cls(km, torch.tensor(prompts), settings, None)
    rows.km = km
    rows.record(prompts)
    with torch.no_grad():
        decode(rows, settings, None, batched)
    return rows


def test_adapter_cache_rule_for_a_prompt_and_a_batch():
    rng = random.Random(7)
    model = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=3)
    high = KangarooModel.from_pretrained(model, exit_layer=2)  # drafts often accepted
    identity_adapter(high)
    low = KangarooModel(model, KangarooAdapter.for_base(model, exit_layer=2, init="random", num_layers=2))
    prompts = [repetitive(rng, n) for n in (1, 6, 13, 20)]
    configs = [
        (high, dict(threshold=0.0, max_draft_steps=4, lookup_tokens=0)),  # chains fully and partly accepted
        (high, dict(threshold=0.0, max_draft_steps=2, lookup_tokens=6, lookup_min_ngram=1)),  # + lookup copies
        (high, dict(max_draft_steps=0, lookup_tokens=0)),  # plain steps only: the unread queue grows
        (low, dict(threshold=0.0, max_draft_steps=3, lookup_tokens=4, lookup_min_ngram=1)),  # two blocks
    ]
    lags = {"prompt": set(), "batch": set()}
    for km, options in configs:
        options = dict(policy="fixed", max_new_tokens=24, eos_token_id=None, **options)
        for prompt in prompts:
            lags["prompt"] |= set(run(km, CheckedPrompt, [prompt], **options).lags)
        lags["batch"] |= set(run(km, CheckedBatch, prompts, **options).lags)
        # Rows that finish early leave the batch (its shared padding is dropped): end on a token row 1 emits.
        eos = run(km, CheckedPrompt, [prompts[1]], **options).tokens[0][len(prompts[1]) + 3]
        run(km, CheckedBatch, prompts, **{**options, "eos_token_id": eos})
    tree = dict(policy="fixed", max_new_tokens=24, eos_token_id=None, tree=True, threshold=0.0, max_draft_steps=3)
    for km in (high, low):  # trees for one prompt and in a batch (rows with paths ending at leaves and not)
        for prompt in prompts:
            lags["prompt"] |= set(run(km, CheckedPrompt, [prompt], **tree).lags)
        lags["batch"] |= set(run(km, CheckedBatch, prompts, **tree, tree_top_k=2, tree_max_nodes=5).lags)
    for where, seen in lags.items():
        assert {0, 1} <= seen and max(seen) > 2, (where, seen)  # cut back, a full chain's last draft, a queue
