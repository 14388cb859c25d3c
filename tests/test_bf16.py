"""bf16: verification rows bit-equal to one-row decode steps, and greedy output token-identical to bf16 generate."""

from __future__ import annotations

import contextlib
import copy
import json
import os

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kangaroo_infer import KangarooModel
from kangaroo_infer.invariance import RowInvariance, one_row_layout
from kangaroo_infer.packed import PackedWeights, packing_available
from kangaroo_infer.scheduler import PolicyConfig

from .conftest import VOCAB, identity_adapter, tiny_model

BF16 = torch.bfloat16


def bf16_model(arch: str, seed: int = 0, **kw):
    """Head dim 64 and an MLP 1536 wide, as SmolLM2's: shapes whose bf16 kernels round rows differently when
    computed together (attention over a long cache; a GEMM with a long reduction)."""
    shape = dict(hidden_size=256, intermediate_size=1536, num_attention_heads=4, num_key_value_heads=2)
    return tiny_model(arch, deep_scale=0.05, exit_layer=2, seed=seed, max_position_embeddings=1024, **shape, **kw).to(
        BF16
    )


def one_row_states(model, cache: DynamicCache, tokens: torch.Tensor) -> list[list[torch.Tensor]]:
    """Hidden states of every layer for each token fed alone, as generate's decode step feeds it."""
    rows = []
    for i in range(tokens.shape[1]):
        out = model(tokens[:, i : i + 1], cache=cache, use_cache=True, output_hidden_states=True)
        rows.append([h[:, 0] for h in out.hidden_states] + [out.logits[:, 0]])
    return rows


def pass_states(backbone, cache: DynamicCache, tokens: torch.Tensor) -> list[list[torch.Tensor]]:
    """The same per row of one pass of tokens [1, R] after the cache, layer by layer as Kangaroo's verification runs
    it (with the backbone's invariance, if any): embedding, layer outputs, final norm, logits."""
    past = cache.get_seq_length()
    positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)
    hidden = backbone.embed_tokens(tokens)
    pe = backbone.rotary_emb(hidden, position_ids=positions[None])
    states = [hidden]
    for layer in range(backbone.num_layers):
        states.append(backbone.run_layers(states[-1], layer, layer + 1, pe, positions, cache))
    logits, normed = backbone.logits(states[-1]), backbone.norm(states[-1])
    return [[s[:, r] for s in states[:-1]] + [normed[:, r], logits[:, r]] for r in range(tokens.shape[1])]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_multi_row_verify_equals_one_row_steps_bit_for_bit(arch, attn):
    """The check that fails without the fix (on the CPUs seen so far, sdpa's multi-row kernel rounds every row
    differently): 2-9 new tokens in one pass after a long context, every layer's output and the logits compared
    with one-row forwards through the same model, bit for bit."""
    model = bf16_model(arch, attn=attn)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    backbone = km.backbone
    assert isinstance(backbone.invariance, RowInvariance)  # on by default in bf16
    gen = torch.Generator().manual_seed(1)
    for context in (37, 300, 611):
        prompt = torch.randint(3, VOCAB, (1, context), generator=gen)
        with torch.inference_mode():
            prefill = model(prompt, use_cache=True).cache
            for rows in (2, 5, 9):
                new = torch.randint(3, VOCAB, (1, rows), generator=gen)
                expected = one_row_states(model, copy.deepcopy(prefill), new)
                got = pass_states(backbone, copy.deepcopy(prefill), new)
                for r in range(rows):
                    for depth, (a, b) in enumerate(zip(got[r], expected[r], strict=True)):
                        assert torch.equal(a, b), f"context {context}, {rows} rows: row {r} differs at state {depth}"


def test_one_row_layout_is_the_one_row_steps():
    """On CUDA the row-wise path hands attention each row's query, keys and values in the layout of the one-row decode
    step (cuDNN's attention plans depend on strides): the strides recorded from a real one-row step through
    transformers' attention equal ``one_row_layout``'s for a row sliced from a multi-row pass, values unchanged."""
    model = bf16_model("llama")
    seen = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def record(module, query, key, value, mask, **kw):
        seen.append((query.shape, query.stride(), key.shape, key.stride(), value.stride()))
        return sdpa(module, query, key, value, mask, **kw)

    prompt = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    AttentionInterface.register("sdpa", record)
    try:
        with torch.inference_mode():
            cache = model(prompt, use_cache=True).cache
            model(prompt[:, -1:], cache=cache, use_cache=True)  # the decode step: 41 keys
    finally:
        AttentionInterface.register("sdpa", sdpa)
    step = seen[-1]
    heads, kv_heads, dim = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    rows = torch.randn(1, 3, heads, dim).to(BF16).transpose(1, 2)  # [1, Hq, 3, d]: a 3-row pass's projection
    cache_keys = torch.randn(1, kv_heads, 43, dim).to(BF16)  # the cache after that pass: 40 + 3 keys
    q, k, v = one_row_layout(rows[:, :, :1], cache_keys[:, :, :41], cache_keys[:, :, :41])  # its first row's view
    assert (q.shape, q.stride(), k.shape, k.stride(), v.stride()) == step
    assert torch.equal(q, rows[:, :, :1]) and torch.equal(k, cache_keys[:, :, :41])
    assert rows[:, :, :1].stride() != q.stride() and cache_keys[:, :, :41].stride() != k.stride()  # not already so


# Every kind of greedy round: adapter chains, trees, lookup copies, plain steps, fixed and cost-blind policies (also
# what benchmarks/cuda_bf16/smoke.py runs on a GPU).
GREEDY_MODES = (
    dict(lookup_tokens=0),
    dict(lookup_tokens=0, tree=True),
    dict(max_draft_steps=0),
    dict(policy="fixed"),
    dict(policy=PolicyConfig(measure_costs=False), threshold=0.0, max_draft_steps=8),
)


def greedy_prompts() -> list[torch.Tensor]:
    """Two [1, T] prompts long enough that sdpa's multi-row rounding differs; the second repeats a 40-token run, so
    lookup finds n-grams to copy."""
    gen = torch.Generator().manual_seed(7)
    first = torch.randint(3, VOCAB, (1, 150), generator=gen)
    second = torch.randint(3, VOCAB, (1, 280), generator=gen)
    return [first, torch.cat([second[:, :40]] * 7, dim=1)]


def vanilla(model, ids, max_new_tokens):
    return model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_bf16_greedy_identical_chains_trees_lookup(arch):
    """Chains, trees and lookup copies in bf16, long enough contexts that sdpa's multi-row rounding differs: every
    output token-identical to bf16 generate, with rounds of every kind (all/partly/none accepted)."""
    model = bf16_model(arch, seed=4, initializer_range=0.02)  # logits close together: rounding flips tokens
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    accepted_some = False
    for ids in greedy_prompts():
        ref = vanilla(model, ids, 60)[0].tolist()
        for kw in GREEDY_MODES:
            out = km.generate(ids, max_new_tokens=60, eos_token_id=None, **kw)
            assert out.sequences[0].tolist() == ref, f"{arch}, prompt {ids.shape[1]}: mismatch with {kw}"
            accepted_some |= any(a > 1 for a in out.accept_lengths[1:])
    assert accepted_some


def test_exact_verify_off_and_fp32_default():
    """exact_verify=False turns the per-row path off in bf16; fp32 models decode without it by default."""
    model = bf16_model("llama")
    assert KangarooModel.from_pretrained(model, exit_layer=2, exact_verify=False).backbone.invariance is None
    fp32 = tiny_model("llama")
    assert KangarooModel.from_pretrained(fp32, exit_layer=2).backbone.invariance is None
    assert KangarooModel.from_pretrained(fp32, exit_layer=2, exact_verify=True).backbone.invariance is not None


def test_packed_weights_bit_equal_restored_and_repacked():
    """Packing (on by default for a bf16 base on CPU where oneDNN has the op) changes no output: ``linear`` equals
    ``nn.functional.linear`` for every row count, with and without bias, also after the weight changes in place;
    modules get their own forward back after ``packed()`` and after the exact path's per-row patch inside it."""
    model = bf16_model("qwen2")  # q/k/v with bias
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    assert (km.packing is not None) == packing_available(km.backbone.lm_head.weight)
    packing = km.packing or PackedWeights()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        layer = model.model.layers[0]
        for linear in (layer.self_attn.q_proj, layer.mlp.down_proj, km.backbone.lm_head):
            for rows in (1, 2, 3, 5, 9, 70):
                x = torch.randn(1, rows, linear.in_features, generator=gen).to(BF16)
                assert torch.equal(packing.linear(x, linear.weight, linear.bias), linear(x))
        down = model.model.layers[1].mlp.down_proj
        x = torch.randn(1, 3, down.in_features, generator=gen).to(BF16)
        packing.linear(x, down.weight, None)
        down.weight.mul_(2)  # a new version of the weight: packed again, never the stale copy
        assert torch.equal(packing.linear(x, down.weight, None), torch.nn.functional.linear(x, down.weight))
    with km.packed():
        patched = "forward" in km.backbone.lm_head.__dict__
        with km.backbone.invariance.rows(range(km.backbone.num_layers), 4, head=True):
            pass
        assert ("forward" in km.backbone.lm_head.__dict__) == patched
    assert not any("forward" in m.__dict__ for m in km.backbone.linears)
    assert KangarooModel.from_pretrained(model, exit_layer=2, pack_weights=False).packing is None
    assert KangarooModel.from_pretrained(tiny_model("llama"), exit_layer=2).packing is None  # fp32


def test_probe_finds_a_row_dependent_kernel():
    """The probe says "row-dependent" for a layer whose multi-row kernel rounds differently from its one-row kernel
    (an fp32 GEMM against its one-row product: MKL on every x86 CPU seen so far blocks K by the row count; if a CPU
    computes every row alike the probe must say so, and the assertion adapts), and is cached per shape and rows."""
    invariance = RowInvariance(tiny_model("llama").config, torch.nn.ModuleList(), torch.nn.Linear(1, 1))
    linear = torch.nn.Linear(4096, 64, bias=False)
    rows = 8
    x = torch.randn(1, rows, 4096, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        differs = not torch.equal(linear(x), torch.cat([linear(x[:, r : r + 1]) for r in range(rows)], dim=1))
        verdict = invariance.row_dependent(linear, rows)
    if differs:
        assert verdict
    assert invariance.row_dependent(torch.nn.Linear(4096, 64, bias=False), rows) == verdict  # cached per shape


@pytest.mark.parametrize("packed", [False, True])
def test_row_dependent_layer_gives_one_row_products(packed):
    """A layer whose multi-row kernel rounds differently from its one-row kernel (SmolLM2's bf16 down projection on the
    CPUs seen so far) computes, inside ``rows``, every row of an M-row pass bit-equal to that row alone, whichever way
    was chosen for it (column-major input where probed exact and timed faster, else one call per row); checked on
    inputs the probe never saw, with the layer on packed weights (the default) and on plain ones."""
    down = torch.nn.Linear(1536, 576, bias=False).to(BF16)
    layers = torch.nn.ModuleList([torch.nn.Sequential(down)])
    invariance = RowInvariance(tiny_model("llama").config, layers, torch.nn.Linear(1, 1))
    gen = torch.Generator().manual_seed(1)
    patch = PackedWeights().patched([down]) if packed else contextlib.nullcontext()
    with torch.inference_mode(), patch:
        forward = down.__dict__.get("forward")  # the packed forward, or none
        for rows in (2, 3, 8):
            for _ in range(10):  # without the fix ~0.4 outputs of a pass differ here: 10 passes catch it
                x = torch.randn(1, rows, 1536, generator=gen).to(BF16)
                alone = [torch.nn.functional.linear(x[:, r : r + 1], down.weight) for r in range(rows)]
                with invariance.rows(range(1), rows):
                    together = down(x)
                assert torch.equal(together, torch.cat(alone, dim=1)), (rows, invariance.way(down, rows))
                assert down.__dict__.get("forward") is forward  # the forward it had is back after ``rows``


def test_dtype_auto_explicit_and_fallback(tmp_path):
    """auto: fp32 on a CPU without bf16 instructions whatever the timing; with them, what the cached timing says
    (measured on first use, then read from $KANGAROO_HOME/dtype.json); an explicit dtype always wins."""
    from kangaroo_infer.dtype import auto_dtype, cpu_name, decode_linears, resolve_dtype

    dtype, why = auto_dtype("cpu", tmp_path, flags={"avx2", "fma"})
    assert dtype == torch.float32 and "without native bf16" in why
    dtype, why = auto_dtype("cpu", tmp_path, flags={"avx512_bf16"})  # measures once, caches
    timing = json.loads((tmp_path / "dtype.json").read_text())
    (key,) = timing
    assert cpu_name() in key
    faster = sum(timing[key]["bfloat16"].values()) < sum(timing[key]["float32"].values())
    assert dtype == (torch.bfloat16 if faster else torch.float32), why
    timing[key] = {"float32": {"1": 1.0, "4": 1.0}, "bfloat16": {"1": 3.0, "4": 3.0}}  # bf16 emulated: slower
    (tmp_path / "dtype.json").write_text(json.dumps(timing))
    dtype, why = auto_dtype("cpu", tmp_path, flags={"amx_bf16"})
    assert dtype == torch.float32 and "slower" in why
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)  # fmt: skip
    assert decode_linears(config) == {(64, 64): 6, (32, 64): 6, (160, 64): 6, (64, 160): 3, (300, 64): 1}
    dtype, why = auto_dtype("cpu", tmp_path, flags={"avx512_bf16"}, config=config)  # this model's own linears
    timing = json.loads((tmp_path / "dtype.json").read_text())
    (shaped,) = [k for k in timing if k != key]  # timed apart from the 2048x2048 layer, by its shapes
    assert "64x160:3" in shaped and set(timing[shaped]["float32"]) == {"1", "3"} and "this model's linears" in why
    faster = sum(timing[shaped]["bfloat16"].values()) < sum(timing[shaped]["float32"].values())
    assert dtype == (torch.bfloat16 if faster else torch.float32), why
    timing[shaped] = {"float32": {"1": 3.0, "3": 3.0}, "bfloat16": {"1": 1.0, "3": 1.0}}  # read, not timed again
    (tmp_path / "dtype.json").write_text(json.dumps(timing))
    assert auto_dtype("cpu", tmp_path, flags={"avx512_bf16"}, config=config)[0] == torch.bfloat16
    assert resolve_dtype("auto", "cpu", tmp_path, lambda: config)[0] == torch.float32  # $KANGAROO_DTYPE pins auto
    unwritable = tmp_path / "dtype.json" / "home"  # under a file: no directory can be made there
    with pytest.warns(UserWarning, match="Could not keep the bf16 timing .*KANGAROO_HOME"):
        dtype, why = auto_dtype("cpu", unwritable, flags={"avx512_bf16"})  # measured, used, not kept
    assert dtype in (torch.bfloat16, torch.float32) and "measured" in why
    assert resolve_dtype("float32", "cpu", tmp_path) == (torch.float32, "explicit")
    assert resolve_dtype(torch.bfloat16, "cpu", tmp_path) == (torch.bfloat16, "explicit")
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu", tmp_path)
    os.environ["KANGAROO_DTYPE"] = "bfloat16"
    try:
        assert resolve_dtype("auto", "cpu", tmp_path) == (torch.bfloat16, "$KANGAROO_DTYPE")
        os.environ["KANGAROO_DTYPE"] = "fp32"
        with pytest.raises(ValueError, match="KANGAROO_DTYPE='fp32' is not a dtype"):
            resolve_dtype("auto", "cpu", tmp_path)
    finally:
        os.environ["KANGAROO_DTYPE"] = "float32"


def test_from_pretrained_dtype(tiny_dirs, kangaroo_home, monkeypatch):
    """A path loads in the dtype asked for (explicit wins over auto); auto times the base's own linear shapes (read
    from its config before the weights); a loaded model keeps its own under auto."""
    root, model, _ = tiny_dirs
    km = KangarooModel.from_pretrained(None, adapter=root / "adapter", dtype="float32")
    assert km.base.dtype == torch.float32 and km.dtype_reason == "explicit" and km.backbone.invariance is None
    km = KangarooModel.from_pretrained(None, adapter=root / "adapter", dtype="bfloat16")
    assert km.base.dtype == torch.bfloat16 and km.backbone.invariance is not None
    km = KangarooModel.from_pretrained(None, adapter=root / "adapter")  # auto, pinned by $KANGAROO_DTYPE here
    assert km.dtype_reason == "$KANGAROO_DTYPE" and km.base.dtype == torch.float32
    assert KangarooModel.from_pretrained(model, exit_layer=2).base.dtype == model.dtype
    monkeypatch.delenv("KANGAROO_DTYPE")
    km = KangarooModel.from_pretrained(None, adapter=root / "adapter")  # auto, as on a user's machine
    if "without native bf16" not in km.dtype_reason:  # a CPU with avx512_bf16 / AMX: timed, cached by the shapes
        assert "this model's linears" in km.dtype_reason
        (key,) = json.loads((kangaroo_home / "dtype.json").read_text())
        assert f"{model.config.vocab_size}x{model.config.hidden_size}:1" in key  # its LM head among them


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_bf16_batch_rows_equal_their_own_generate(arch):
    """A ragged bf16 batch (adapter rounds, draft trees, lookup copies, plain batched steps): every row token-identical
    to that prompt's own bf16 generate, which a padded batched pass alone would not give."""
    model = bf16_model(arch, seed=5, initializer_range=0.02)  # logits close together: rounding flips tokens
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (90, 260, 37)]
    prompts[1] = torch.cat([prompts[1][:30]] * 8)[:260]  # repeats: lookup copies
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    for kw in (
        dict(),
        dict(lookup_tokens=0),
        dict(max_draft_steps=0, lookup_tokens=0),
        dict(tree=True, threshold=0.0, policy="fixed"),
    ):
        out = km.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=None, **kw)
        for row, p in enumerate(prompts):
            ref = vanilla(model, p[None], 40)[0, len(p) :].tolist()
            assert out.sequences[row, width:].tolist() == ref, f"{arch}, row {row}, {kw}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_batch_of_one_row_equals_its_own_generate(arch):
    """A batch that is one row (a prompt passed with an attention mask, with or without left padding; also what is
    left of a batch when the other rows have finished): its one-query plain steps must run as the one-row step runs
    them, unmasked over its own keys, not as a masked kernel call over the padded cache."""
    model = bf16_model(arch, seed=5, initializer_range=0.02)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    prompt = torch.randint(3, VOCAB, (150,), generator=torch.Generator().manual_seed(4))
    ref = vanilla(model, prompt[None], 60)[0, len(prompt) :].tolist()
    for padding in (0, 23):
        ids = torch.cat([torch.zeros(padding, dtype=torch.long), prompt])[None]
        mask = (torch.arange(ids.shape[1]) >= padding).long()[None]
        for kw in (dict(max_draft_steps=0, lookup_tokens=0), dict()):
            out = km.generate(ids, attention_mask=mask, max_new_tokens=60, eos_token_id=None, **kw)
            assert out.sequences[0, ids.shape[1] :].tolist() == ref, f"{arch}, padding {padding}, {kw}"


def test_bf16_chi_square_single_prompt():
    """Exact speculative sampling in bf16 with exact verification: the first tokens' joint distribution matches the
    bf16 base's own (enumerated), adapter drafts accepted and rejected."""
    from collections import Counter

    from kangaroo_infer.sample import SamplingConfig

    from .test_sampling import (
        ADAPTER_KW,
        CHI_SQUARE_SEEDS_FAST,
        P_MIN,
        adapter_round_kind,
        exact_joint,
        first_tokens,
        joint_p_values,
        sampling_kwargs,
        small_kangaroo,
    )

    fp32 = small_kangaroo()
    km = KangarooModel(fp32.base.to(BF16), fp32.adapter.to(BF16))
    assert km.backbone.invariance is not None
    cfg, prompt = SamplingConfig(temperature=1.0), [5, 9, 3, 11]
    joint = exact_joint(km.base, prompt, cfg)
    samples, rounds = first_tokens(km, prompt, CHI_SQUARE_SEEDS_FAST, **ADAPTER_KW, **sampling_kwargs(cfg))
    kinds = Counter(adapter_round_kind(*r) for r in rounds)
    assert len(kinds) == 3, kinds  # all accepted, rejected at the first and at the second draft
    p12, p23 = joint_p_values(samples, joint)
    assert p12 > P_MIN and p23 > P_MIN, (p12, p23)
