"""Adapters with more than one block (``num_layers`` > 1): structure, growth from a smaller adapter, lossless
decoding on every path (chains, trees, lookup, batches, sampling) and the standalone draft export."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kangaroo_infer import KangarooAdapter, KangarooModel, export_draft, load_tokenizer
from kangaroo_infer.sample import SamplingConfig
from kangaroo_infer.scheduler import PolicyConfig

from .conftest import VOCAB, assert_fp32_close, reduction_length, tiny_model
from .test_batch import check_batch
from .test_draft_export import draft_logits, kangaroo_draft_logits
from .test_lossless import check_identical, classify
from .test_sampling import (
    ADAPTER_KW,
    CHI_SQUARE_SEEDS,
    CHI_SQUARE_SEEDS_FAST,
    P_MIN,
    SMALL_VOCAB,
    exact_joint,
    first_tokens,
    joint_p_values,
)


def near_identity_blocks(km: KangarooModel, noise: float, seed: int = 0) -> None:
    """First block passes its input through (drafts = the base's logit lens at ℓ, often accepted when the deep layers
    are near identity); the other blocks get small random output projections, so they change the drafts a little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        blocks = km.adapter.all_blocks()
        blocks[0].silence()
        for block in blocks[1:]:
            block.silence()
            weight = block.self_attn.o_proj.weight
            weight.add_(noise * torch.randn(weight.shape, generator=generator))
        km.adapter.norm.weight.copy_(km.base.model.norm.weight)


def test_blocks_are_named_copied_and_cached_per_block():
    base = tiny_model("llama", layers=5)
    adapter = KangarooAdapter.for_base(base, exit_layer=2, init="copy", mlp=True, num_layers=3).eval()
    names = set(adapter.state_dict())
    assert {"self_attn.q_proj.weight", "mlp.down_proj.weight", "norm.weight"} <= names  # block 0: the 1-block keys
    assert {"blocks.0.self_attn.q_proj.weight", "blocks.1.mlp.up_proj.weight"} <= names
    assert not any(name.startswith("blocks.2.") for name in names)
    assert torch.equal(adapter.blocks[0].self_attn.q_proj.weight, base.model.layers[3].self_attn.q_proj.weight)
    assert torch.equal(adapter.blocks[1].mlp.up_proj.weight, base.model.layers[4].mlp.up_proj.weight)
    deepest = KangarooAdapter.for_base(base, exit_layer=4, init="copy", num_layers=2)  # past the last layer: the last
    assert torch.equal(deepest.blocks[0].self_attn.k_proj.weight, base.model.layers[4].self_attn.k_proj.weight)

    x = torch.randn(1, 7, 64)
    full = adapter(x)
    cache = DynamicCache()
    steps = [adapter(x[:, i : i + 1], position_ids=torch.tensor([[i]]), cache=cache) for i in range(7)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert len(cache.layers) == 3 and all(layer.get_seq_length() == 7 for layer in cache.layers)
    with pytest.raises(ValueError, match="num_layers=0 must be an integer >= 1"):
        KangarooAdapter.for_base(base, exit_layer=2, num_layers=0)


def test_a_grown_adapter_drafts_exactly_as_the_smaller_one(tmp_path):
    base = tiny_model("qwen2", tied=True)
    small = KangarooAdapter.for_base(base, exit_layer=2, init="random", mlp=True).eval()
    small.set_draft_vocab(list(range(10, 60)))
    grown = KangarooAdapter.for_base(base, exit_layer=2, init="copy", mlp=True, num_layers=3).eval()
    grown.grow_from(small)
    x = torch.randn(2, 9, 64)
    assert torch.equal(grown(x), small(x))
    assert torch.equal(grown.draft_vocab, small.draft_vocab) and grown.config.draft_vocab_size == 50
    assert grown.blocks[1].self_attn.q_proj.weight.abs().sum() > 0  # only the output projections are silenced
    grown.save_pretrained(tmp_path / "grown")
    loaded = KangarooAdapter.from_pretrained(tmp_path / "grown", base)
    assert loaded.config.num_layers == 3 and torch.equal(loaded.eval()(x), small(x))

    with pytest.raises(ValueError, match="num_layers: 3 vs 1"):
        KangarooAdapter.for_base(base, exit_layer=2, mlp=True).grow_from(grown)
    with pytest.raises(ValueError, match="mlp: True vs False"):
        KangarooAdapter.for_base(base, exit_layer=2, num_layers=2).grow_from(small)
    with pytest.raises(ValueError, match="exit_layer: 2 vs 1"):
        KangarooAdapter.for_base(base, exit_layer=1, mlp=True, num_layers=2).grow_from(small)


@pytest.mark.parametrize(
    "arch,overrides",
    [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("mistral", {"sliding_window": 5})],
    ids=["llama", "qwen2-tied", "mistral-window5"],
)
def test_multi_block_adapter_decodes_losslessly(arch, overrides):
    """Chains (fixed and adaptive), trees, lookup rounds and batches with a 2-block adapter: each equals generate."""
    rng = random.Random(arch)
    model = tiny_model(arch, deep_scale=0.05, exit_layer=2, seed=31, **overrides)
    adapter = KangarooAdapter.for_base(model, exit_layer=2, init="copy", mlp=arch == "llama", num_layers=2)
    km = KangarooModel(model, adapter)
    near_identity_blocks(km, noise=0.3)
    kinds: set[str] = set()
    lookups = 0
    for i in range(6):
        ids = torch.randint(3, VOCAB, (1, rng.choice([1, 6, 17])), generator=torch.Generator().manual_seed(i))
        policy = "fixed" if i % 2 else PolicyConfig(measure_costs=False)
        kw = dict(eos_token_id=None, threshold=rng.choice([0.0, 0.5]), max_draft_steps=rng.choice([1, 3, 6]))
        kinds |= classify(check_identical(km, ids, 30, policy=policy, lookup_tokens=0, **kw))
        lookups += len(check_identical(km, ids, 30, policy=policy, lookup_min_ngram=1, **kw).lookup_rounds)
        check_identical(km, ids, 30, policy="fixed", tree=True, tree_top_k=3, tree_max_nodes=8, **kw)
    assert {"all-accepted", "partly-accepted", "all-rejected"} <= kinds, kinds
    assert lookups > 0  # copied rounds happened between adapter rounds
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(4)]
    check_batch(km, prompts, 20, threshold=0.0, max_draft_steps=4, policy="fixed")


@pytest.mark.parametrize(
    "seeds",
    [pytest.param(CHI_SQUARE_SEEDS_FAST, id="fast"), pytest.param(CHI_SQUARE_SEEDS, id="full", marks=pytest.mark.slow)],
)
def test_multi_block_adapter_samples_exactly(seeds):
    """χ² of the first sampled tokens against the base's own distribution, drafts from a random 2-block adapter."""
    model = tiny_model(
        "llama", layers=3, exit_layer=1, seed=4, vocab_size=SMALL_VOCAB, hidden_size=32, intermediate_size=64,
        initializer_range=0.1,
    )  # fmt: skip
    km = KangarooModel(model, KangarooAdapter.for_base(model, exit_layer=1, init="random", num_layers=2))
    cfg = SamplingConfig(temperature=1.0)
    prompt = [5, 9, 3, 11]
    samples, runs = first_tokens(km, prompt, seeds, **ADAPTER_KW, temperature=cfg.temperature)
    rounds = Counter(accept_lengths[1] - 1 for _, accept_lengths, _ in runs)  # drafts accepted in the first round
    assert len(rounds) == 3, rounds  # none, one and both drafts accepted all happen
    p12, p23 = joint_p_values(samples, exact_joint(model, prompt, cfg))
    assert p12 > P_MIN and p23 > P_MIN, (p12, p23)


@pytest.mark.parametrize("arch,mlp", [("llama", True), ("qwen2", False)])
def test_multi_block_adapter_exports_as_that_many_draft_layers(tmp_path, arch, mlp):
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    base = tiny_model(arch, tied=arch == "qwen2", vocab_size=len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = KangarooAdapter.for_base(
        base, exit_layer=2, init="copy", mlp=mlp, num_layers=2, base_name=str(tmp_path / "base")
    )
    with torch.no_grad():  # noise on every weight: any wrong mapping changes the logits
        generator = torch.Generator().manual_seed(0)
        for param in adapter.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    adapter.save_pretrained(tmp_path / "adapter")
    draft = AutoModelForCausalLM.from_pretrained(export_draft(tmp_path / "adapter", tmp_path / "draft")).eval()
    assert draft.config.num_hidden_layers == 4
    km = KangarooModel.from_pretrained(str(tmp_path / "base"), adapter=tmp_path / "adapter")
    ids = torch.randint(3, len(tokenizer), (1, 11), generator=torch.Generator().manual_seed(1))
    expected = kangaroo_draft_logits(km, ids, chunk=4)
    assert_fp32_close(draft_logits(draft, ids, chunk=4), expected, reduction_length(base.config, ids.shape[1]))
