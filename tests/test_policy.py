"""The adaptive draft policy: drafts when drafting pays, falls back to plain steps (with retries) when it does not."""

from __future__ import annotations

import pytest
import torch

from kangaroo_infer import KangarooModel
from kangaroo_infer.policy import DraftPolicy, PolicyConfig

from .conftest import VOCAB, identity_adapter, tiny_model


def feed(policy: DraftPolicy, rounds: int, accept_all: bool, draft_s=0.002, verify_s=0.010) -> list[int]:
    plans = []
    for _ in range(rounds):
        k = policy.plan(remaining=1000)
        plans.append(k)
        policy.update(k, k if accept_all else 0, draft_s * k, verify_s * (1 + 0.1 * k))
    return plans


def test_fixed_policy_always_drafts_gamma_within_remaining():
    policy = DraftPolicy(max_steps=5, adaptive=False)
    assert feed(policy, 10, accept_all=False) == [5] * 10
    assert policy.plan(remaining=3) == 2 and policy.plan(remaining=1) == 0


def test_adaptive_drafts_long_when_everything_is_accepted():
    policy = DraftPolicy(max_steps=6)
    plans = feed(policy, 30, accept_all=True)
    assert plans[-10:] == [6] * 10 and policy.alpha > 0.9


def test_adaptive_falls_back_to_plain_steps_with_occasional_retries():
    policy = DraftPolicy(max_steps=6)
    plans = feed(policy, 300, accept_all=False)
    tail = plans[100:]
    assert tail.count(0) > 0.8 * len(tail)  # plain decoding almost always
    assert set(tail) == {0, 1}  # retries draft a single token, and they keep coming (fading evidence)
    assert policy.alpha < 0.3 < policy.optimistic_alpha() + 0.1


def test_optimism_drafts_on_uncertain_evidence_and_zero_optimism_decides_at_the_mean():
    """Just below break-even (α ≈ 0.29 < 0.3 for these costs): the mean says plain, the upper bound says draft."""
    plans = {}
    for optimism in (0.0, 1.0):
        policy = DraftPolicy(
            max_steps=1,
            config=PolicyConfig(optimism=optimism, measure_costs=False, draft_cost_prior=0.2, verify_slope_prior=0.1),
        )
        policy.accepted, policy.rejected = 1.0, 4.0  # posterior Beta(2, 5): mean 0.286
        plans[optimism] = policy.plan(remaining=100)
    assert plans == {0.0: 0, 1.0: 1}


def test_adaptive_recovers_when_drafts_start_being_accepted():
    policy = DraftPolicy(max_steps=4)
    feed(policy, 200, accept_all=False)
    plans = feed(policy, 200, accept_all=True)
    assert plans[-5:] == [4] * 5


# Decisions from the cost priors alone (measured timings would make a test depend on the machine's load).
PRIORS = PolicyConfig(measure_costs=False)


def test_adaptive_generate_is_lossless_and_skips_a_useless_adapter():
    model = tiny_model("llama", seed=4)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    with torch.no_grad():  # a useless adapter: zero output, so every draft is token 0, which the model never picks
        km.adapter.norm.weight.zero_()
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    out = km.generate(ids, max_new_tokens=120, eos_token_id=None, max_draft_steps=5, threshold=0.0, policy=PRIORS)
    ref = model.generate(ids, do_sample=False, max_new_tokens=120, eos_token_id=None)
    assert out.sequences.tolist() == ref.tolist()
    assert out.draft_lengths.count(0) > 0.8 * len(out.draft_lengths)
    assert out.tau == 1.0

    good = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=4)
    km_good = KangarooModel.from_pretrained(good, exit_layer=2)
    identity_adapter(km_good)
    out = km_good.generate(ids, max_new_tokens=120, eos_token_id=None, max_draft_steps=5, threshold=0.0, policy=PRIORS)
    assert out.sequences.tolist() == good.generate(ids, do_sample=False, max_new_tokens=120, eos_token_id=None).tolist()
    assert sum(out.draft_lengths) > 2 * len(out.draft_lengths) and out.tau > 2


def test_priors_only_policy_ignores_timings():
    """measure_costs=False: the same acceptance history gives the same plans whatever the timings were."""
    plans = []
    for draft_s, verify_s in ((1e-6, 1.0), (5.0, 1e-6)):
        policy = DraftPolicy(max_steps=6, config=PRIORS)
        plans.append(feed(policy, 40, accept_all=False, draft_s=draft_s, verify_s=verify_s))
        assert policy.draft_cost is None and policy.verify_cost == {}
    assert plans[0] == plans[1]


@pytest.mark.parametrize(
    "bad", [{"decay": 0.0}, {"decay": 1.5}, {"optimism": -1.0}, {"prior_accepted": 0.0}, {"cost_ema": 0.0}]
)
def test_policy_config_rejects_values_outside_their_range(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"PolicyConfig\\({name}="):
        PolicyConfig(**bad)
