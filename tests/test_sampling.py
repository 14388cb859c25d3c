"""Exact speculative sampling: the tokens Kangaroo samples are distributed exactly as the base model's.

The χ² tests compare the empirical joint distribution of the first generated tokens (thousands of fixed seeds, so
the tests are deterministic) with the base model's distribution computed by enumeration, after the same
temperature / top-k / top-p processing. The tiny model has a 16-token vocabulary, and max_new_tokens=4 makes the
first round draft two tokens, so the tested tokens come from accepted drafts, residual draws after rejections and
bonus draws (checked to all occur).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from kangaroo_infer import KangarooModel, bench
from kangaroo_infer.accept import accept
from kangaroo_infer.questions import Question
from kangaroo_infer.sample import SamplingConfig, draw, process

from .conftest import VOCAB, identity_adapter, tiny_model

SMALL_VOCAB = 16
MAX_NEW = 4  # round 1 drafts x2, x3 (remaining 3 -> at most 2 drafts) and may add x4 as a bonus
P_MIN = 1e-3
# Sequential χ² tests: the slow set runs every sampling configuration at the full seed count; the default set runs
# one per path (adapter drafts, lookup copies, multi-block adapter) at CHI_SQUARE_SEEDS_FAST, a count at which the
# same test still rejects a wrong residual rule (test_fast_chi_square_rejects_a_wrong_residual_rule).
CHI_SQUARE_SEEDS = 2000
CHI_SQUARE_SEEDS_FAST = 1000  # at 500 a wrong residual rule on the adapter path still passed (p = 0.039)
CONFIGS = {
    "temperature": SamplingConfig(temperature=1.0),
    "top-k": SamplingConfig(temperature=0.8, top_k=4),
    "top-p": SamplingConfig(temperature=1.2, top_p=0.8),
}


def small_kangaroo():
    """3 layers, exit layer 1, random adapter: q overlaps p without being close to it, so that a wrong acceptance or
    residual rule shifts the distribution of the tested tokens visibly."""
    model = tiny_model(
        "llama", layers=3, exit_layer=1, seed=4, vocab_size=SMALL_VOCAB, hidden_size=32,
        intermediate_size=64, initializer_range=0.1,
    )  # fmt: skip
    return KangarooModel.from_pretrained(model, exit_layer=1, init="random")


@torch.no_grad()
def exact_joint(model, prompt: list[int], cfg: SamplingConfig) -> torch.Tensor:  # [V, V, V] P(x1, x2, x3)
    """The base model's processed distribution of its first three tokens, by enumerating every prefix."""
    v = SMALL_VOCAB
    ids = torch.tensor([prompt])
    p1 = process(model(ids).logits[0, -1], cfg).double()  # [V]
    p2 = process(model(torch.cat([ids.expand(v, -1), torch.arange(v)[:, None]], 1)).logits[:, -1], cfg)  # [V, V]
    pairs = torch.cartesian_prod(torch.arange(v), torch.arange(v))  # [V², 2]
    p3 = process(model(torch.cat([ids.expand(v * v, -1), pairs], 1)).logits[:, -1], cfg).reshape(v, v, v)
    return p1[:, None, None] * p2.double()[:, :, None] * p3.double()


def chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson χ² p-value; bins expected below 5 are merged into one. A sample in a 0-probability bin fails."""
    observed, expected_probs = observed.flatten().double(), expected_probs.flatten().double()
    impossible = observed[expected_probs <= 0].sum()
    assert impossible == 0, f"{int(impossible)} samples fell on tokens of probability 0"
    expected = expected_probs * observed.sum()
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def joint_p_values(samples: list[tuple[int, int, int]], joint: torch.Tensor) -> tuple[float, float]:
    """p-values of the pairs (x1, x2) and (x2, x3) against their exact marginals."""
    v = SMALL_VOCAB
    first, second = torch.zeros(v, v), torch.zeros(v, v)
    for x1, x2, x3 in samples:
        first[x1, x2] += 1
        second[x2, x3] += 1
    return chi_square_p(first, joint.sum(dim=2)), chi_square_p(second, joint.sum(dim=0))


def first_tokens(km, prompt: list[int], seeds: int, **kwargs) -> tuple[list[tuple[int, int, int]], list[tuple]]:
    """The first three generated tokens of ``seeds`` sequential runs (seed 0, 1, ...) and each run's first round:
    (draft lengths, accept lengths, lookup rounds)."""
    samples, rounds = [], []
    for seed in range(seeds):
        out = km.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, seed=seed, **kwargs)
        samples.append(tuple(out.sequences[0, len(prompt) : len(prompt) + 3].tolist()))
        rounds.append((out.draft_lengths, out.accept_lengths, out.lookup_rounds))
    return samples, rounds


def adapter_round_kind(draft_lengths: list[int], accept_lengths: list[int], lookup_rounds: list[int]) -> str:
    drafted, committed = draft_lengths[0], accept_lengths[1]
    return "all accepted" if committed == drafted + 1 else "rejected at 1" if committed == 1 else "rejected at 2"


def sampling_kwargs(cfg: SamplingConfig) -> dict:
    return dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


ADAPTER_KW = dict(eos_token_id=None, threshold=0.0, max_draft_steps=3, policy="fixed")


@pytest.mark.parametrize(
    "name,seeds",
    [pytest.param("temperature", CHI_SQUARE_SEEDS_FAST, id="temperature-fast")]
    + [pytest.param(name, CHI_SQUARE_SEEDS, id=name, marks=pytest.mark.slow) for name in CONFIGS],
)
def test_chi_square_single_prompt(name, seeds):
    cfg = CONFIGS[name]
    km = small_kangaroo()
    prompt = [5, 9, 3, 11]
    joint = exact_joint(km.base, prompt, cfg)
    samples, rounds = first_tokens(km, prompt, seeds, **ADAPTER_KW, **sampling_kwargs(cfg))
    kinds = Counter(adapter_round_kind(*r) for r in rounds)
    assert min(kinds.values()) > seeds // 50 and len(kinds) == 3, kinds  # both acceptances and rejections happen
    p12, p23 = joint_p_values(samples, joint)
    assert p12 > P_MIN and p23 > P_MIN, (p12, p23)


def test_chi_square_batch_with_ragged_prompts():
    """Every row of one batch is an independent exact sample; two prompts of different lengths, left-padded."""
    cfg = SamplingConfig(temperature=0.9, top_k=6, top_p=0.9)
    km = small_kangaroo()
    prompts, n = [[5, 9, 3, 11], [7, 2]], 2000
    ids = torch.tensor([[5, 9, 3, 11]] * n + [[0, 0, 7, 2]] * n)
    mask = torch.tensor([[1, 1, 1, 1]] * n + [[0, 0, 1, 1]] * n)
    out = km.generate(
        ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=None, threshold=0.0, max_draft_steps=3,
        policy="fixed", temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=7,
    )  # fmt: skip
    assert out.sequences.shape == (2 * n, 4 + MAX_NEW)
    assert {row[1] for row in out.accept_lengths} >= {1, 2, 3}  # rejected at 1, at 2, all accepted
    for group, prompt in enumerate(prompts):
        rows = out.sequences[group * n : (group + 1) * n, 4:7].tolist()
        p12, p23 = joint_p_values([tuple(r) for r in rows], exact_joint(km.base, prompt, cfg))
        assert p12 > P_MIN and p23 > P_MIN, (prompt, p12, p23)


def test_acceptance_rule_reproduces_p():
    """One draft from q, then the exact rule: the committed token is distributed as p, for several (p, q)."""
    gen = torch.Generator().manual_seed(0)
    v, n = 6, 20000
    for p_logits, q_logits in [(torch.randn(v, generator=gen), torch.randn(v, generator=gen)) for _ in range(3)]:
        p, q = p_logits.softmax(-1), (2 * q_logits).softmax(-1)
        drafts = draw(q.expand(n, -1), gen)[:, None]  # [n, 1]
        logits = p.log().expand(n, 2, -1)  # at temperature 1 the processed distribution is p itself
        ones = torch.ones(n, dtype=torch.long)
        accepted, nxt = accept(drafts, ones, logits, SamplingConfig(1.0), q.expand(n, 1, -1), gen)
        committed = torch.where(accepted == 1, drafts[:, 0], nxt)
        assert 0 < float(accepted.float().mean()) < 1
        assert chi_square_p(torch.bincount(committed, minlength=v), p) > P_MIN


def test_point_mass_drafts_reproduce_p():
    """A copied token (q = one-hot): accepted with probability p(x), else drawn from p without x; committed ~ p."""
    gen = torch.Generator().manual_seed(1)
    v, n = 6, 20000
    for _ in range(3):
        p = torch.randn(v, generator=gen).softmax(-1)
        drafts = torch.randint(0, v, (n, 1), generator=gen)  # any copy, whatever its source
        ones = torch.ones(n, dtype=torch.long)
        accepted, nxt = accept(drafts, ones, p.log().expand(n, 2, -1), SamplingConfig(1.0), None, gen)
        committed = torch.where(accepted == 1, drafts[:, 0], nxt)
        assert 0 < float(accepted.float().mean()) < 1
        assert chi_square_p(torch.bincount(committed, minlength=v), p) > P_MIN


def test_greedy_acceptance_is_the_one_hot_case_of_the_sampling_rule():
    """With one-hot p (logits -inf but at the argmax) and one-hot q, the sampling rule decides as greedy does."""
    gen = torch.Generator().manual_seed(2)
    b, k, v = 64, 4, 7
    logits = torch.randn(b, k + 1, v, generator=gen)
    targets = logits.argmax(-1)
    drafts = torch.where(torch.rand(b, k, generator=gen) < 0.7, targets[:, :k], torch.randint(0, v, (b, k)))
    counted = torch.randint(0, k + 1, (b,), generator=gen)
    greedy = accept(drafts, counted, logits, SamplingConfig())
    one_hot_p = torch.full_like(logits, float("-inf")).scatter(-1, targets[..., None], 0.0)
    one_hot_q = torch.zeros(b, k, v).scatter(-1, drafts[..., None], 1.0)
    for q in (one_hot_q, None):  # an adapter draft or a copied token: both are one-hot
        sampled = accept(drafts, counted, one_hot_p, SamplingConfig(1.0), q, gen)
        assert torch.equal(greedy[0], sampled[0]) and torch.equal(greedy[1], sampled[1])
    assert len(set(greedy[0].tolist())) > 2


def test_processing_matches_transformers_warpers():
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(5, 40, generator=gen)
    for t, k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.5, 10, 0.9), (2.0, 1, 0.3)]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        torch.testing.assert_close(process(logits, SamplingConfig(t, top_p, k)), ref.softmax(-1))


def test_same_seed_same_output_and_seeds_differ():
    model = tiny_model("qwen2", deep_scale=0.3, exit_layer=2, seed=6)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=40, eos_token_id=None, temperature=0.7, top_p=0.95)
    runs = {seed: [km.generate(ids, seed=seed, **kw).sequences.tolist() for _ in range(2)] for seed in range(4)}
    assert all(a == b for a, b in runs.values())
    assert len({str(a) for a, _ in runs.values()}) > 1
    batch = torch.cat([ids, ids, torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))])
    one, two = (km.generate(batch, seed=11, **kw) for _ in range(2))
    assert one.sequences.tolist() == two.sequences.tolist() and one.accept_lengths == two.accept_lengths
    assert one.sequences[0].tolist() != one.sequences[1].tolist()  # rows are independent samples


def test_sampling_stops_at_eos_and_uses_draft_vocabulary():
    """Drafts from a token subset (q = 0 elsewhere): those tokens then only come from residual or bonus draws."""
    model = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=8)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    ids = torch.tensor([[5, 9, 14]])
    kw = dict(max_new_tokens=40, temperature=0.5, seed=1, threshold=0.0, policy="fixed")
    full = km.generate(ids, eos_token_id=None, **kw)
    seen = sorted(set(full.sequences[0].tolist()))
    km.adapter.set_draft_vocab(seen[::2])
    free = km.generate(ids, eos_token_id=None, **kw)
    assert free.tau > 1.2 and free.num_new_tokens == 40
    assert set(free.sequences[0, 3:].tolist()) - set(seen[::2])  # tokens outside the draft vocabulary occur
    new = free.sequences[0, 3:].tolist()
    eos = new[10]
    chunks = []

    class Collect:
        def put(self, value):
            chunks.append(value.reshape(-1).tolist())

        def end(self):
            chunks.append("end")

    out = km.generate(ids, eos_token_id=eos, streamer=Collect(), **kw)
    assert out.sequences[0, -1].item() == eos and eos not in out.sequences[0, 3:-1].tolist()
    assert chunks[0] == [5, 9, 14] and chunks[-1] == "end"
    assert (
        sum(chunks[1:-1], []) == out.sequences[0, 3:].tolist() and [len(c) for c in chunks[1:-1]] == out.accept_lengths
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -0.5}, "temperature must be"),
        ({"temperature": 1.0, "top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ({"temperature": 1.0, "top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ({"temperature": 1.0, "top_k": -1}, "top_k must be an integer >= 0"),
        ({"temperature": 1.0, "seed": -3}, "seed must be a non-negative integer"),
        ({"temperature": 1.0, "tree": True}, "tree=True drafts greedily"),
        ({"temperature": 1.0, "policy": "nope"}, "Unknown policy"),
        ({"top_p": 0.9}, "top_p cuts the sampling distribution, and temperature 0 decodes greedily"),
        ({"tree_max_nodes": 8}, "tree_max_nodes shapes draft trees, which are off; add tree=True"),
    ],
)
def test_sampling_argument_errors(kwargs, message):
    km = KangarooModel.from_pretrained(tiny_model("llama"), exit_layer=2)
    with pytest.raises(ValueError, match=message):
        km.generate(torch.tensor([[5, 6]]), max_new_tokens=3, **kwargs)


def test_cli_generate_samples_reproducibly(tiny_dirs, capsys):
    """generate --temperature --top-k --top-p --seed prints the text that km.generate gives with the same seed (the
    CLI's main() in this process; test_cli runs it once as a subprocess)."""
    from kangaroo_infer.cli import main

    root, _, tokenizer = tiny_dirs
    args = ["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "5"]
    capsys.readouterr()
    code = main(
        ["generate", "--adapter", str(root / "adapter"), "--prompt", "Hello there", "--max-new-tokens", "16", *args]
    )
    result = capsys.readouterr()
    assert code == 0, result.err
    km = KangarooModel.from_pretrained(None, adapter=root / "adapter")
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    out = km.generate(ids, max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=5)
    assert result.out.strip() == tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_bench_with_temperature_reports_tau_without_identity(tiny_dirs, tmp_path):
    root, _, tokenizer = tiny_dirs
    km = KangarooModel.from_pretrained(None, adapter=root / "adapter")
    questions = [Question(i, "x", p) for i, p in enumerate(["Write a poem.", "Who wrote Hamlet?"])]
    summary = bench.bench(
        km, tokenizer, questions, tmp_path, max_new_tokens=12, threshold=0.1, profile=False, progress=False,
        temperature=0.8,
    )  # fmt: skip
    overall = summary["overall"]
    assert overall["identical"] is None and overall["tau"] > 1.0 and overall["speedup"] > 0
    assert summary["config"]["temperature"] == 0.8
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    runs = [a["decoders"]["kangaroo"] for a in answers]
    assert all(r["identical"] is None and sum(r["accept_lengths"]) == r["new_tokens"] for r in runs)
    assert all(a["decoders"]["vanilla"]["identical"] is None for a in answers)
    bench.print_table(summary)


# ---- lookup copies under sampling: point-mass drafts ------------------------------------------------------------

LOOKUP_PROMPT = [5, 9, 3, 11, 7, 2, 12, 14, 6, 4, 8, 10, 5, 9]  # 12 of the 16 tokens: most first tokens get copies
LOOKUP_KW = dict(lookup_tokens=2, lookup_min_ngram=1, lookup_max_ngram=3, policy="fixed", eos_token_id=None)


def lookup_round_kinds(draft_lengths: list[int], accept_lengths: list[int], lookup_rounds: list[int]) -> str | None:
    """How the first round ended, when it verified copied tokens."""
    if 0 not in lookup_rounds:
        return None
    return adapter_round_kind(draft_lengths, accept_lengths, lookup_rounds)


@pytest.mark.parametrize(
    "seeds",
    [pytest.param(CHI_SQUARE_SEEDS_FAST, id="fast"), pytest.param(CHI_SQUARE_SEEDS, id="full", marks=pytest.mark.slow)],
)
def test_chi_square_lookup_copies_single_prompt(seeds):
    """A copied token is accepted with probability p(x), else the residual p without x is drawn: the first three
    tokens keep the base's exact joint distribution, with copies fully accepted, partly and not at all."""
    cfg = SamplingConfig(temperature=0.7)
    km = small_kangaroo()
    joint = exact_joint(km.base, LOOKUP_PROMPT, cfg)
    samples, rounds = first_tokens(km, LOOKUP_PROMPT, seeds, temperature=cfg.temperature, **LOOKUP_KW)
    kinds = Counter(lookup_round_kinds(*r) for r in rounds)
    assert len(kinds) == 4 and min(kinds.values()) >= 10 * seeds // CHI_SQUARE_SEEDS, kinds  # all outcomes occur
    p12, p23 = joint_p_values(samples, joint)
    assert p12 > P_MIN and p23 > P_MIN, (p12, p23)


def wrong_residual_rule(real_accept):
    """The acceptance rule with a classic mistake: after a rejection the token is drawn from p itself instead of
    norm(max(0, p - q)) (for a copied token: p with the rejected token left in). Acceptances are unchanged."""

    def accept_wrongly(drafts, counted, logits, sampling, q=None, generator=None):
        accepted, _ = real_accept(drafts, counted, logits, sampling, q, generator)
        p_next = process(logits, sampling)[torch.arange(drafts.shape[0]), accepted]
        return accepted, draw(p_next, generator)

    return accept_wrongly


@pytest.mark.slow  # a test of the default set's test: CI runs it
@pytest.mark.parametrize("path", ["adapter", "lookup"])
def test_fast_chi_square_rejects_a_wrong_residual_rule(monkeypatch, path):
    """The default set's χ² (CHI_SQUARE_SEEDS_FAST seeds) is not too weak to see a wrong rule: with the residual drawn
    from p, the same samples fail the same test (p-value <= P_MIN), on both drafting paths."""
    from kangaroo_infer import accept as accept_module

    monkeypatch.setattr(accept_module, "accept", wrong_residual_rule(accept_module.accept))
    km = small_kangaroo()
    if path == "adapter":
        cfg, prompt, kw = CONFIGS["temperature"], [5, 9, 3, 11], ADAPTER_KW
    else:
        cfg, prompt, kw = SamplingConfig(temperature=0.7), LOOKUP_PROMPT, LOOKUP_KW
    samples, _ = first_tokens(km, prompt, CHI_SQUARE_SEEDS_FAST, **kw, **sampling_kwargs(cfg))
    p12, p23 = joint_p_values(samples, exact_joint(km.base, prompt, cfg))
    assert min(p12, p23) <= P_MIN, (p12, p23)


def test_chi_square_lookup_copies_batch_with_ragged_prompts():
    """Per-row copies in one batch under sampling (top-k and top-p too): every row stays an exact sample."""
    cfg = SamplingConfig(temperature=0.8, top_k=8, top_p=0.95)
    km = small_kangaroo()
    short = LOOKUP_PROMPT[6:]
    prompts, n, width = [LOOKUP_PROMPT, short], 2000, len(LOOKUP_PROMPT)
    ids = torch.tensor([LOOKUP_PROMPT] * n + [[0] * (width - len(short)) + short] * n)
    mask = (torch.arange(width)[None] >= torch.tensor([0] * n + [width - len(short)] * n)[:, None]).long()
    out = km.generate(
        ids, attention_mask=mask, max_new_tokens=MAX_NEW, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, seed=3, **LOOKUP_KW,
    )  # fmt: skip
    rows = zip(out.draft_lengths, out.accept_lengths, out.lookup_rounds, strict=True)
    kinds = Counter(lookup_round_kinds(*r) for r in rows)
    assert len(kinds) == 4 and min(kinds.values()) >= 10, kinds
    for group, prompt in enumerate(prompts):
        rows = out.sequences[group * n : (group + 1) * n, width : width + 3].tolist()
        p12, p23 = joint_p_values([tuple(r) for r in rows], exact_joint(km.base, prompt, cfg))
        assert p12 > P_MIN and p23 > P_MIN, (prompt, p12, p23)
