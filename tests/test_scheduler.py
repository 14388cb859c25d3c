"""The scheduler: which drafter and how many tokens per round, with bounded regret on any machine.

The regret tests feed the scheduler simulated machines (no wall clock): verification of m tokens costs
c·(1 + slope·(m − 1)), a draft step d·c, every timing is off by up to ±20%, and each draft is accepted with
probability α (geometric acceptance, α changing mid-answer in some runs). The realised cost per committed token
must stay within 5% of the best fixed choice in hindsight: always plain steps or always k drafts, for the best k.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kangaroo_infer import KangarooModel
from kangaroo_infer.scheduler import PLAIN, PolicyConfig, Scheduler

from .conftest import VOCAB, identity_adapter, tiny_model

ADAPTER = {"adapter": False}
UNIT = 0.06  # seconds of a one-token verification: the scheduler must not care about the unit


def expected_tokens(k: int, alpha: float) -> float:
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def cost_per_token(k: int, alpha: float, slope: float, draft: float) -> float:
    """A fixed choice's expected cost per committed token (units of a one-token verification)."""
    return (k * draft + 1 + slope * k) / expected_tokens(k, alpha)


def simulate(scheduler: Scheduler, slope, draft, phases, seed, gamma=6, lookup=None) -> float:
    """Run a simulated request; return the realised cost per committed token in units of a one-token verification.

    ``phases``: [(α, tokens)], the acceptance changing after each phase's tokens. ``lookup`` (α, share): a free
    drafter offering ``gamma`` copied tokens in that share of the rounds, accepted with its own α."""
    rng = random.Random(seed)
    cost = tokens = 0.0
    for alpha, n in phases:
        end = tokens + n
        while tokens < end:
            offers = {"adapter": gamma}
            if lookup is not None and rng.random() < lookup[1]:
                offers["lookup"] = gamma
            name, k = scheduler.choose(offers)
            rate = lookup[0] if name == "lookup" else alpha
            accepted = 0
            while accepted < k and rng.random() < rate:
                accepted += 1
            draft_s = (0.0 if name in (PLAIN, "lookup") else k * draft) * UNIT * rng.uniform(0.8, 1.2)
            verify_s = (1 + slope * k) * UNIT * rng.uniform(0.8, 1.2)
            scheduler.observe(name, k, accepted, draft_s, verify_s)
            cost += draft_s + verify_s
            tokens += accepted + 1
    return cost / UNIT / tokens


def best_fixed(slope, draft, phases, gamma=6) -> float:
    total = sum(n for _, n in phases)
    return min(sum(n * cost_per_token(k, a, slope, draft) for a, n in phases) for k in range(gamma + 1)) / total


MACHINES = list(itertools.product([0.0, 0.1, 0.5, 1.0], [0.05, 0.15, 0.3]))  # verify slope per row, draft step
ANSWERS = {
    **{f"alpha{a}": [(a, 800)] for a in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)},
    "good-then-bad": [(0.9, 400), (0.05, 400)],
    "bad-then-good": [(0.05, 400), (0.9, 400)],
    "up-and-down": [(0.3, 300), (0.8, 300), (0.1, 300)],
}


@pytest.mark.parametrize("answer", list(ANSWERS))
def test_regret_against_the_best_fixed_choice_on_every_machine(answer):
    """Mean over 3 seeds of realised cost per token ≤ 1.05 × the best fixed choice in hindsight, for every machine
    (verification free to +100% per row, draft step 5-30% of a forward) under ±20% timing noise."""
    phases = ANSWERS[answer]
    worst = []
    for slope, draft in MACHINES:
        realised = [simulate(Scheduler.create("adaptive", ADAPTER), slope, draft, phases, seed) for seed in range(3)]
        ratio = sum(realised) / 3 / best_fixed(slope, draft, phases)
        worst.append((ratio, slope, draft))
    assert max(worst)[0] <= 1.05, sorted(worst)[-3:]


def test_never_slower_than_plain_steps_where_drafting_cannot_pay():
    """2-row verification at 1.5x a 1-row one and acceptance 0.2 (the slower CPU that made the old policy lose):
    the scheduler must end within 3% of plain decoding, and so for every seed."""
    assert best_fixed(0.5, 0.25, [(0.2, 600)]) == pytest.approx(1.0)  # plain steps are the best fixed choice
    for seed in range(5):
        assert simulate(Scheduler.create("adaptive", ADAPTER), 0.5, 0.25, [(0.2, 600)], seed) <= 1.03


def test_regret_with_a_free_lookup_drafter():
    """Copies (free, offered in 40% of the rounds) that are often right, an adapter that is rarely right: the
    scheduler must beat both "adapter only at its best k" and "plain" (it may copy), on a dear and a cheap machine."""
    for slope, draft in [(0.5, 0.25), (0.1, 0.15)]:
        for seed in range(3):
            scheduler = Scheduler.create("adaptive", {"adapter": False, "lookup": True})
            realised = simulate(scheduler, slope, draft, [(0.1, 800)], seed, lookup=(0.9, 0.4))
            assert realised <= 1.02 * best_fixed(slope, draft, [(0.1, 800)])


def test_exploration_spends_at_most_its_budget():
    """With drafts that are never accepted on a dear machine, what the exploring rounds lose stays within
    explore_share of the total cost (plus the first rounds that measure the costs)."""
    scheduler = Scheduler.create("adaptive", ADAPTER)
    realised = simulate(scheduler, 1.0, 0.3, [(0.0, 2000)], seed=0)
    assert realised <= 1 + scheduler.config.explore_share + 0.01


def test_same_observations_same_decisions():
    """A pure function of what it observed: two schedulers fed the same history decide the same."""
    plans = []
    for _ in range(2):
        scheduler = Scheduler.create("adaptive", ADAPTER)
        simulate(scheduler, 0.1, 0.15, [(0.6, 300)], seed=4)
        plans.append([scheduler.choose({"adapter": k}) for k in range(1, 7)])
    assert plans[0] == plans[1]


# ---- behaviour ----------------------------------------------------------------------------------------------------


def feed(scheduler: Scheduler, rounds: int, accept_all: bool, draft_s=0.002, verify_s=0.010) -> list[int]:
    plans = []
    for _ in range(rounds):
        name, k = scheduler.choose({"adapter": 6})
        plans.append(k)
        scheduler.observe(name, k, k if accept_all else 0, draft_s * k, verify_s * (1 + 0.1 * k))
    return plans


def test_fixed_policy_always_drafts_gamma():
    scheduler = Scheduler.create("fixed", ADAPTER)
    assert feed(scheduler, 10, accept_all=False) == [6] * 10
    assert scheduler.choose({"adapter": 2}) == ("adapter", 2) and scheduler.choose({"adapter": 0}) == (PLAIN, 0)


def test_adaptive_drafts_long_when_everything_is_accepted():
    scheduler = Scheduler.create("adaptive", ADAPTER)
    plans = feed(scheduler, 60, accept_all=True)
    assert plans[-20:] == [6] * 20 and scheduler.alpha("adapter") > 0.9
    assert plans.count(0) <= 3  # the plain steps that measure the yardstick, then no more


def test_a_batch_is_priced_by_what_each_row_offers():
    """A batch shares one round's cost among rows that commit what their own offers allow: a lookup copy that
    only one row of eight has is not worth a round that verifies k + 1 tokens for all eight, while the same copy
    for every row is (a well-accepted free drafter, verification 20% dearer per extra token)."""
    scheduler = Scheduler.create("adaptive", {"lookup": True})
    for _ in range(5):
        scheduler.observe(PLAIN, 0, 0, 0.0, UNIT)
        scheduler.observe("lookup", 6, 6, 0.0, UNIT * 2.2)
    assert scheduler.choose({"lookup": [6] * 8}) == ("lookup", 6)
    assert scheduler.choose({"lookup": [6] + [0] * 7})[0] is PLAIN
    assert scheduler.choose({"lookup": 6}) == scheduler.choose({"lookup": [6]}) == ("lookup", 6)  # one prompt


def test_a_batch_row_is_priced_at_its_own_acceptance():
    """Rows of a batch differ: here rows 0 and 1 copy a repeated passage (every copied token accepted) and rows 2
    and 3 copy nothing useful (first token rejected). Copies offered by rows 0 and 1 are worth a round; copies
    offered by rows 2 and 3 are not. Row ids stay with their rows when another row leaves the batch."""
    scheduler = Scheduler.create(PolicyConfig(explore_share=0.0), {"lookup": True})
    rows = [0, 1, 2, 3]
    for _ in range(8):
        scheduler.observe_rows(PLAIN, 0, [(0, 0)] * 4, 0.0, UNIT, rows=rows)
        scheduler.observe_rows("lookup", 6, [(6, 6), (6, 6), (6, 0), (6, 0)], 0.0, 3 * UNIT, rows=rows)
    assert scheduler.alpha("lookup", row=0) > 0.9 > 0.1 > scheduler.alpha("lookup", row=2)
    assert scheduler.choose({"lookup": [6, 6, 0, 0]}, rows)[0] == "lookup"
    assert scheduler.choose({"lookup": [0, 0, 6, 6]}, rows)[0] is PLAIN
    assert scheduler.choose({"lookup": [6, 6, 0]}, [1, 0, 3])[0] == "lookup"  # row 2 left
    assert scheduler.choose({"lookup": [6, 6, 0]}, [2, 3, 1])[0] is PLAIN  # row 0 left, the rows in another order


def test_a_batch_round_is_priced_by_the_tokens_it_verifies_in_all_rows():
    """Costs are kept per total tokens verified (rows × width): a plain step of 8 rows prices a 2-token round of
    4 rows, and a draft step measured at 8 rows prices one at 4 rows like the plain steps scale."""
    scheduler = Scheduler.create("adaptive", {"adapter": False})
    scheduler.observe_rows(PLAIN, 0, [(0, 0)] * 8, 0.0, 3.0)
    scheduler.observe_rows(PLAIN, 0, [(0, 0)] * 4, 0.0, 2.0)
    assert scheduler.verify(2, rows=4) == pytest.approx(3.0) and scheduler.verify(1, rows=8) == pytest.approx(3.0)
    scheduler.observe_rows("adapter", 2, [(2, 1)] * 8, 0.6, 4.0)
    assert scheduler.draft("adapter", rows=8) == pytest.approx(0.3)
    scale = scheduler.verify(1, rows=4) / scheduler.verify(1, rows=8)  # the plain steps' ratio, 2.0 / 3.0 before
    assert scale < 0.9 and scheduler.draft("adapter", rows=4) == pytest.approx(0.3 * scale)
    assert scheduler.verify(3, rows=8) == scheduler.verify(6, rows=4) == scheduler.verify(24)
    assert scheduler.round_cost("adapter", 2, rows=8) == pytest.approx(0.6 + scheduler.verify(3, rows=8))


def test_adaptive_falls_back_to_plain_steps_with_occasional_retries():
    scheduler = Scheduler.create("adaptive", ADAPTER)
    plans = feed(scheduler, 600, accept_all=False)
    tail = plans[100:]
    assert tail.count(0) > 0.95 * len(tail)  # plain decoding almost always
    assert any(plans[-200:]) and any(plans[100:300])  # but retries keep coming
    assert scheduler.alpha("adapter") < 0.1


def test_adaptive_recovers_when_drafts_start_being_accepted():
    scheduler = Scheduler.create("adaptive", ADAPTER)
    feed(scheduler, 200, accept_all=False)
    plans = feed(scheduler, 200, accept_all=True)
    assert plans[-5:] == [6] * 5


# Decisions from the cost priors alone (measured timings would make a test depend on the machine's load).
PRIORS = PolicyConfig(measure_costs=False)


def test_adaptive_generate_is_lossless_and_skips_a_useless_adapter():
    model = tiny_model("llama", seed=4)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    with torch.no_grad():  # a useless adapter: zero output, so every draft is token 0, which the model never picks
        km.adapter.norm.weight.zero_()
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=120, eos_token_id=None, max_draft_steps=5, threshold=0.0, policy=PRIORS, lookup_tokens=0)
    out = km.generate(ids, **kw)
    ref = model.generate(ids, do_sample=False, max_new_tokens=120, eos_token_id=None)
    assert out.sequences.tolist() == ref.tolist()
    assert out.draft_lengths.count(0) > 0.8 * len(out.draft_lengths)
    assert out.tau == 1.0

    good = tiny_model("llama", deep_scale=0.05, exit_layer=2, seed=4)
    km_good = KangarooModel.from_pretrained(good, exit_layer=2)
    identity_adapter(km_good)
    out = km_good.generate(ids, **kw)
    assert out.sequences.tolist() == good.generate(ids, do_sample=False, max_new_tokens=120, eos_token_id=None).tolist()
    assert sum(out.draft_lengths) > 2 * len(out.draft_lengths) and out.tau > 2


def test_priors_only_scheduler_ignores_timings():
    """measure_costs=False: the same acceptance history gives the same plans whatever the timings were."""
    plans = []
    for draft_s, verify_s in ((1e-6, 1.0), (5.0, 1e-6)):
        scheduler = Scheduler.create(PRIORS, ADAPTER)
        plans.append(feed(scheduler, 40, accept_all=False, draft_s=draft_s, verify_s=verify_s))
        assert scheduler.drafters["adapter"].draft_cost == {} and scheduler.verify_cost == {}
    assert plans[0] == plans[1]


def test_a_tree_is_priced_by_the_tokens_it_verifies():
    """A tree of K children per level and at most N nodes verifies min(K·k, N) tokens for k draft steps: where
    verification is dear, it is planned shallower than a chain at the same acceptance, and its measured rounds are
    filed under the width they verified."""
    config = PolicyConfig(measure_costs=False, verify_slope_prior=0.5, draft_cost_prior=0.05, explore_share=0.0)
    chain = Scheduler.create(config, ADAPTER)
    tree = Scheduler.create(config, ADAPTER, fanout={"adapter": (4, 10)})
    assert [tree.width("adapter", k) for k in (1, 2, 3, 4)] == [4, 8, 10, 10] and chain.width("adapter", 3) == 3
    assert tree.round_cost("adapter", 2) == pytest.approx(2 * 0.05 + 1 + 0.5 * 8)
    for scheduler in (chain, tree):
        for _ in range(30):
            scheduler.observe("adapter", 3, 2, *scheduler.nominal_costs("adapter", 3))
    assert chain.choose({"adapter": 6})[1] > tree.choose({"adapter": 6})[1]

    timed = Scheduler.create("adaptive", ADAPTER, fanout={"adapter": (4, 16)})
    timed.observe("adapter", 3, 1, 0.3, 2.0, verified=11)
    assert timed.verify_cost == {12: 2.0} and timed.draft("adapter") == pytest.approx(0.1)


@pytest.mark.parametrize(
    "bad",
    [{"decay": 0.0}, {"decay": 1.5}, {"optimism": -1.0}, {"prior_accepted": 0.0}, {"cost_ema": 0.0},
     {"explore_share": 1.0}],
)  # fmt: skip
def test_policy_config_rejects_values_outside_their_range(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"PolicyConfig\\({name}="):
        PolicyConfig(**bad)
