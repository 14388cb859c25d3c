"""Dynamic tree drafting: lossless greedy decoding, and the tree mask and cache gather checked directly."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import DynamicCache

from kangaroo_infer import KangarooModel
from kangaroo_infer.accept import accept_proposal
from kangaroo_infer.arch import TreeAttention
from kangaroo_infer.cache import KangarooCache
from kangaroo_infer.proposal import Tree
from kangaroo_infer.sample import SamplingConfig
from kangaroo_infer.scheduler import PolicyConfig
from kangaroo_infer.tree import draft_tree
from kangaroo_infer.verify import Verifier

from .conftest import VOCAB, identity_adapter, tiny_model
from .test_lossless import check_identical


def hand_made_tree() -> Tree:
    """root(0) -> a(1) -> c(3); root -> b(2); b -> d(4)."""
    tree = Tree.rooted_at(10, capacity=5)
    tree.add(0, 11, -0.1)
    tree.add(0, 12, -0.2)
    tree.add(1, 13, -0.3)
    tree.add(2, 14, -0.4)
    return tree


def test_tree_mask_on_a_hand_made_tree():
    tree = hand_made_tree()
    positions, allowed, key_positions = tree.attention([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], 3, 3, torch.device("cpu"))
    assert positions.tolist() == [3, 4, 4, 5, 5]  # prefix length + depth
    assert key_positions.tolist() == [0, 1, 2, 3, 4, 4, 5, 5]
    expected_tree_part = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 0, 1, 0, 1],
    ]
    assert allowed[:, :3].all()  # the committed prefix is always visible
    assert allowed[:, 3:].int().tolist() == expected_tree_part
    # A level computed on its own sees the nodes already cached (in their cache order) and itself.
    _, allowed, _ = tree.attention([3, 4], [0, 2, 1, 3, 4], 3, 3, torch.device("cpu"))
    assert allowed[:, 3:].int().tolist() == [[1, 0, 1, 1, 0], [1, 1, 0, 0, 1]]


def sequential_logits(model, ids: list[int]) -> torch.Tensor:  # [len(ids), V]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@torch.no_grad()
def test_every_tree_node_sees_exactly_its_path(arch):
    """Deep logits of each node = a plain forward over prompt + root-to-node path; the caches then hold the
    accepted path exactly as a plain forward over the committed tokens would."""
    model = tiny_model(
        arch, deep_scale=0.3, exit_layer=2, seed=12, **({"sliding_window": 6} if arch == "mistral" else {})
    )
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    prompt = [5, 17, 33, 8, 40, 41, 2 + 7]
    cache = KangarooCache(2, km.backbone.num_layers)
    first = int(km.prefill(torch.tensor([prompt]), cache).argmax())
    proposal = draft_tree(km.backbone, km.adapter, km.draft_head, cache, first, 3, 3, 9, 0.0, frozenset())
    tree = proposal.tree
    assert proposal.tokens == tree.tokens[1:]
    assert tree.num_drafts == 9 and max(tree.depths) == 3
    # Peek at the deep logits by re-running verification's deep pass on a copy of the pending states.
    from kangaroo_infer.verify import deep_logits

    order = list(tree.shallow_order)
    pending = list(cache.deep_pending)
    root_pos = cache.deep_len
    positions, allowed, key_positions = tree.attention(order, order, root_pos, root_pos, torch.device("cpu"))
    logits, _ = deep_logits(km.backbone, 2, cache, positions=positions, mask=TreeAttention(allowed, key_positions))
    for row, node in enumerate(order):
        path = []
        n = node
        while n != -1:
            path.append(tree.tokens[n])
            n = tree.parents[n]
        expected = sequential_logits(model, prompt + path[::-1])[-1]
        assert torch.allclose(logits[row], expected, atol=1e-4), f"node {node}"
    # Undo the peek and verify for real.
    for layer in cache.base.layers[2:]:
        layer.crop(-len(order))
    cache.deep_pending = pending
    verifier = Verifier(km.backbone, 2, cache)
    node_logits = verifier.logits(first, proposal)  # [n + 1, V], row i after node i
    assert torch.allclose(node_logits[order], logits, atol=1e-5)
    path, next_token = accept_proposal(proposal, node_logits, SamplingConfig())
    verifier.keep(path)
    assert all(tree.parents[b] == a for a, b in zip(path, path[1:], strict=False)) and path[0] == 0
    committed = [tree.tokens[n] for n in path[1:]] + [next_token]
    sequence = prompt + [first] + committed[:-1]  # everything the caches should now hold
    with torch.no_grad():  # a plain DynamicCache keeps every entry, also for sliding-window layers
        ref = model(torch.tensor([sequence]), cache=DynamicCache(), use_cache=True).cache
    for idx in range(km.backbone.num_layers):
        assert cache.base.layers[idx].keys.shape[-2] == len(sequence)
        assert torch.allclose(cache.base.layers[idx].keys, ref.layers[idx].keys, atol=1e-4), f"layer {idx}"
        assert torch.allclose(cache.base.layers[idx].values, ref.layers[idx].values, atol=1e-4)
    assert cache.adapter_len + cache.unread_len == len(sequence)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tree_lossless_sweep(arch):
    rng = random.Random(arch)
    lookups = 0
    grid = list(itertools.product([0.0, 0.3, 0.9], [1, 3, 6], [1, 2, 4, 7], [1, 4, 16, 40]))
    for deep_scale, exit_layer, adapter_kind in [(0.05, 2, "identity"), (0.4, 1, "identity"), (1.0, 3, "random")]:
        model = tiny_model(
            arch, tied=exit_layer == 1, deep_scale=deep_scale, exit_layer=exit_layer, seed=rng.randrange(99)
        )
        km = KangarooModel.from_pretrained(model, exit_layer=exit_layer)
        if adapter_kind == "identity":
            identity_adapter(km)
        for i, (threshold, steps, top_k, max_nodes) in enumerate(rng.sample(grid, 10)):
            ids = torch.randint(3, VOCAB, (1, rng.choice([1, 5, 17])), generator=torch.Generator().manual_seed(i))
            policy = "fixed" if i % 2 else PolicyConfig(measure_costs=False)
            lookup_tokens = 0 if i % 3 else None  # lookup rounds (default) interleave with tree rounds
            out = check_identical(
                km, ids, rng.choice([1, 2, 13, 37]), eos_token_id=None, threshold=threshold, max_draft_steps=steps,
                policy=policy, tree=True, tree_top_k=top_k, tree_max_nodes=max_nodes, lookup_tokens=lookup_tokens,
            )  # fmt: skip
            lookups += len(out.lookup_rounds)
            if lookup_tokens == 0:
                assert out.lookup_rounds == []
            copied = set(out.lookup_rounds)
            assert all(d <= max_nodes for i, d in enumerate(out.draft_lengths) if i not in copied)
            assert all(out.draft_lengths[i] <= 12 for i in copied)  # the default lookup_tokens
    assert lookups > 0


def test_tree_beats_chain_when_second_guesses_are_right():
    """A model whose deep layers change the greedy choice now and then: siblings rescue rejected drafts."""
    model = tiny_model("llama", deep_scale=0.4, exit_layer=2, seed=3)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    taus = {"chain": [], "tree": []}
    for seed in range(4):
        ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(seed))
        chain = check_identical(km, ids, 40, eos_token_id=None, threshold=0.0, max_draft_steps=5, policy="fixed")
        tree = check_identical(
            km, ids, 40, eos_token_id=None, threshold=0.0, max_draft_steps=5, policy="fixed", tree=True,
            tree_top_k=4, tree_max_nodes=20,
        )  # fmt: skip
        taus["chain"].append(chain.tau)
        taus["tree"].append(tree.tau)
    assert sum(taus["tree"]) > sum(taus["chain"]), taus


def test_tree_eos_and_bad_arguments():
    model = tiny_model("qwen2", deep_scale=0.1, exit_layer=2, seed=6)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    free = km.generate(ids, max_new_tokens=30, eos_token_id=None, tree=True)
    new = free.sequences[0, 5:].tolist()
    for eos in (new[0], new[3], new[11], [new[6], new[20]]):
        check_identical(km, ids, 30, eos_token_id=eos, tree=True, threshold=0.1, policy="fixed")
    for kwargs, message in [
        ({"tree_top_k": 0}, "tree_top_k must be an integer >= 1"),
        ({"tree_max_nodes": -3}, "tree_max_nodes must be an integer >= 1"),
        ({"tree": "yes"}, "tree must be True or False"),
    ]:
        with pytest.raises(ValueError, match=message):
            km.generate(ids, max_new_tokens=4, **{"tree": True, **kwargs})
