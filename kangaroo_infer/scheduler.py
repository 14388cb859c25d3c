"""The scheduler: each round, which drafter proposes and how many tokens (0 = a plain decoding step).

A round that proposes k tokens from a drafter with per-token acceptance α commits E(k) = 1 + α + ... + α^k tokens
in expectation and costs k·c_draft + c_verify(k + 1); a plain step commits 1 token for c_verify(1). The scheduler
keeps, per drafter, a recency-weighted estimate of α, and for the machine an estimate of c_verify(m) per width m
and of c_draft per drafter (copied tokens cost nothing to draft). Each round it takes the choice with the best
expected tokens per unit of cost at the estimated α ("exploit"). A tree drafter verifies more tokens than it takes
draft steps: k steps of a tree with K children per level and at most N nodes verify w(k) = min(K·k, N) tokens, so
its round costs k·c_draft + c_verify(w(k) + 1), and its α is per draft step (accepted path length over depth).
A batch shares each round's cost among its rows, and a row commits what its own offer and its own acceptance allow:
the rate of k drafts is the rows' mean of E(min(k, k_row), α_row) over the round's cost, so a lookup copy that one
row of eight has is not priced as if all eight had it (each row verifies k + 1 slots all the same), and a row whose
copies keep failing is not priced at the acceptance of a row that copies a repeated passage. α_row is the row's own
recency-weighted counts on top of ``row_prior`` pseudo-counts at the drafter's pooled α. Costs are kept per total
tokens a round verifies (rows × width): a batch's rows leave as they finish, and a round of 4 rows × 2 tokens costs
about what 8 rows × 1 costs, so what was measured at one batch size prices the next. A draft step's cost is kept per
batch size; a size not yet measured scales the nearest one's like a plain step.

Regret. Exploiting alone could stay on plain steps forever after a bad start; exploring blindly (the retries of an
optimistic policy) loses on every machine where verification is dear. So exploration is paid from a budget: every
round adds ``explore_share`` of its cost to it, and a round may instead take the choice that is best at an
optimistic α (mean + ``optimism``·std) only when its expected loss against the exploit choice fits in the budget.
Exploration therefore costs at most ``explore_share`` of the total. Acceptance that changes mid-answer is caught by
a surprise test: an outcome that the current estimate gives less than ``surprise`` probability restarts the
drafter's evidence from that round alone. tests/test_scheduler.py checks on simulated machines (verification width
free to +100% per row, draft steps 5-30% of a forward, acceptance 0.05-0.95 and changing, ±20% timing noise) that
the realised cost per token stays within a few percent of the best fixed choice in hindsight.

The scheduler is a pure function of what it is told (acceptances and costs): no clock, no randomness. With
``measure_costs`` False (and for sampling, whose random numbers must not depend on the machine's load) the costs are
the priors, so the schedule depends on the tokens alone. Losslessness never depends on it: every draft is verified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

POLICIES = ("adaptive", "fixed")
PLAIN = None  # the drafter name of a plain step
MIN_SAMPLES = 3  # measurements of a plain step before its cost is trusted
SHRINK = 5  # a width's own average outweighs the line through all widths after this many measurements


@dataclass(frozen=True)
class PolicyConfig:
    prior_accepted: float = 0.5  # Beta prior on α (pseudo-counts of accepted and rejected drafts)
    prior_rejected: float = 0.5
    decay: float = 0.95  # weight of older evidence, per round of the same drafter
    optimism: float = 1.0  # exploration decides at α = posterior mean + optimism · posterior std
    explore_share: float = 0.02  # most of the total cost that exploration may lose
    surprise: float = 0.05  # an outcome this unlikely under the estimate restarts the drafter's evidence
    cost_ema: float = 0.1  # weight of a new timing in the cost averages
    draft_cost_prior: float = 0.25  # c_draft / c_verify(1) before anything is measured
    row_prior: float = 2.0  # pseudo-counts at the drafter's pooled α that a batch row's own estimate starts from
    verify_slope_prior: float = 0.1  # c_verify(m) / c_verify(1) = 1 + slope·(m − 1) before m is measured
    measure_costs: bool = True  # False: decide from the priors above alone (deterministic, for tests and sampling)

    def __post_init__(self):
        ranges = {
            "prior_accepted": (self.prior_accepted > 0, "> 0"),
            "prior_rejected": (self.prior_rejected > 0, "> 0"),
            "decay": (0 < self.decay <= 1, "in (0, 1]"),
            "optimism": (self.optimism >= 0, ">= 0"),
            "explore_share": (0 <= self.explore_share < 1, "in [0, 1)"),
            "surprise": (0 <= self.surprise < 1, "in [0, 1)"),
            "cost_ema": (0 < self.cost_ema <= 1, "in (0, 1]"),
            "draft_cost_prior": (self.draft_cost_prior >= 0, ">= 0"),
            "verify_slope_prior": (self.verify_slope_prior >= 0, ">= 0"),
            "row_prior": (self.row_prior > 0, "> 0"),
        }
        for name, (ok, allowed) in ranges.items():
            if not ok:
                raise ValueError(f"PolicyConfig({name}={getattr(self, name)!r}): must be {allowed}.")


def check_policy(policy: str | PolicyConfig) -> None:
    """generate's ``policy``: a name from POLICIES or a PolicyConfig (whose own fields it checks itself)."""
    if not isinstance(policy, PolicyConfig) and policy not in POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; choose one of {list(POLICIES)} or pass a PolicyConfig.")


@dataclass
class DrafterStats:
    """What the scheduler knows about one drafter."""

    free: bool  # drafts cost nothing to make (lookup copies)
    fanout: int = 1  # tokens verified per draft step (a tree: its children per level K)
    max_width: int | None = None  # most tokens one round verifies (a tree: its node cap N)
    accepted: float = 0.0  # recency-weighted counts of accepted drafts and of rejections
    rejected: float = 0.0
    rows: dict[int, tuple[float, float]] = field(default_factory=dict)  # a batch row's own (accepted, rejected)
    draft_cost: dict[int, float] = field(default_factory=dict)  # cost per draft step, measured, per batch size
    draft_steps: dict[int, int] = field(default_factory=dict)  # rounds it was measured in, per batch size
    idle: int = 0  # rounds since this drafter last proposed


@dataclass
class Scheduler:
    """Per-request state: ``choose`` before a round, ``observe`` after it."""

    drafters: dict[str, DrafterStats]
    adaptive: bool = True
    config: PolicyConfig = field(default_factory=PolicyConfig)
    verify_cost: dict[int, float] = field(default_factory=dict)  # measured cost of verifying n tokens (all rows)
    samples: dict[int, int] = field(default_factory=dict)  # how many measurements each average holds
    budget: float = 0.0  # exploration budget, in cost units

    @classmethod
    def create(
        cls,
        policy: str | PolicyConfig,
        drafters: dict[str, bool],
        timed: bool = True,
        fanout: dict[str, tuple[int, int]] | None = None,
    ) -> Scheduler:
        """From generate's ``policy``: "adaptive", "fixed" or a PolicyConfig; ``drafters`` maps name -> free.
        ``timed`` False ignores measured timings (the priors decide), as sampling needs. ``fanout`` maps a tree
        drafter to (children per level K, node cap N)."""
        config = policy if isinstance(policy, PolicyConfig) else PolicyConfig()
        if not timed and config.measure_costs:
            config = PolicyConfig(**{**config.__dict__, "measure_costs": False})
        check_policy(policy)
        stats = {name: DrafterStats(free, *(fanout or {}).get(name, (1, None))) for name, free in drafters.items()}
        return cls(stats, adaptive=policy != "fixed", config=config)

    # ---- estimates ------------------------------------------------------------------------------------------------

    def alpha(self, name: str, optimism: float = 0.0, row: int | None = None) -> float:
        """Posterior mean of the drafter's per-token acceptance, plus ``optimism`` posterior std (at most 1); for a
        batch row, its own counts on top of ``row_prior`` pseudo-counts at the pooled mean.

        The optimistic value also lets the evidence fade with the rounds the drafter sat idle: the longer it has not
        been tried, the more an exploration round is worth."""
        stats, c = self.drafters[name], self.config
        fade = c.decay**stats.idle if optimism > 0 else 1.0
        a, b = fade * stats.accepted + c.prior_accepted, fade * stats.rejected + c.prior_rejected
        if row is not None:
            pooled = a / (a + b)
            accepted, rejected = stats.rows.get(row, (0.0, 0.0))
            a, b = fade * accepted + c.row_prior * pooled, fade * rejected + c.row_prior * (1 - pooled)
        n = a + b
        return min(1.0, a / n + optimism * math.sqrt(a * b / (n * n * (n + 1))))

    def alphas(self, name: str, optimism: float, rows: list[int] | None) -> float | list[float]:
        """``alpha`` of one prompt (``rows`` None) or of each batch row."""
        if rows is None:
            return self.alpha(name, optimism)
        return [self.alpha(name, optimism, row) for row in rows]

    def verify(self, m: int, rows: int = 1) -> float:
        """Cost of verifying m tokens in each of ``rows`` rows, kept per total t = rows · m: a line through the
        measured totals (each weighted by its measurements; the prior slope while only one is known), pulled towards
        t's own average as that fills up."""
        costs, samples, slope = self.verify_cost, self.samples, self.config.verify_slope_prior
        t = rows * m
        if not costs:
            return 1.0 + slope * (t - 1)
        weights = {x: min(samples[x], SHRINK * 4) for x in costs}
        total = sum(weights.values())
        mx = sum(w * x for x, w in weights.items()) / total
        my = sum(w * costs[x] for x, w in weights.items()) / total
        var = sum(w * (x - mx) ** 2 for x, w in weights.items())
        if var > 0:  # never falling with width
            fit = max(0.0, sum(w * (x - mx) * (costs[x] - my) for x, w in weights.items()) / var)
        else:
            fit = my * slope / (1.0 + slope * (mx - 1))
        line = max(my + fit * (t - mx), 1e-3 * my)
        n = samples.get(t, 0)
        return (n * costs[t] + SHRINK * line) / (n + SHRINK) if n else line

    def draft(self, name: str, rows: int = 1) -> float:
        """Cost of one draft step for ``rows`` rows: as measured for that many rows; else as measured for the
        nearest batch size, scaled like a plain step; else the prior share of a plain step."""
        stats = self.drafters[name]
        if stats.free:
            return 0.0
        if rows in stats.draft_cost:
            return stats.draft_cost[rows]
        if stats.draft_cost:
            near = min(stats.draft_cost, key=lambda size: abs(size - rows))
            return stats.draft_cost[near] * self.verify(1, rows) / self.verify(1, near)
        return self.config.draft_cost_prior * self.verify(1, rows)

    def width(self, name: str, k: int) -> int:
        """Tokens a round of k draft steps from ``name`` verifies."""
        stats = self.drafters[name]
        return k * stats.fanout if stats.max_width is None else min(k * stats.fanout, stats.max_width)

    def round_cost(self, name: str | None, k: int, verified: int | None = None, rows: int = 1) -> float:
        """Cost of a round of k draft steps from ``name`` that verifies ``verified`` tokens per row (default: what
        k steps of ``name`` verify), for ``rows`` rows."""
        if name is PLAIN or k == 0:
            return self.verify(1, rows)
        width = self.width(name, k) if verified is None else verified
        return k * self.draft(name, rows) + self.verify(width + 1, rows)

    @staticmethod
    def expected_tokens(k: int, alpha: float) -> float:
        return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)

    def row_tokens(self, k: int, alpha: float | list[float], rows: list[int] | None = None) -> float:
        """Expected tokens a round of k draft steps commits per row: each row proposes min(k, what it offered)
        (a batch row whose lookup found nothing proposes none and commits one token) and accepts at its own α
        (``alpha`` a list, one per row) or at one α; ``rows`` None: one row that offered k."""
        if rows is None:
            return self.expected_tokens(k, alpha)
        alphas = alpha if isinstance(alpha, list) else [alpha] * len(rows)
        return sum(self.expected_tokens(min(k, most), a) for most, a in zip(rows, alphas, strict=True)) / len(rows)

    def rate(self, name: str | None, k: int, alpha: float | list[float], rows: list[int] | None = None) -> float:
        """Expected committed tokens per row per unit of cost of a round proposing k tokens from ``name``."""
        return self.row_tokens(k, alpha, rows) / self.round_cost(name, k, rows=1 if rows is None else len(rows))

    # ---- decisions ------------------------------------------------------------------------------------------------

    def choose(self, offers: dict[str, int | list[int]], rows: list[int] | None = None) -> tuple[str | None, int]:
        """(drafter, k) for this round; ``offers`` maps each drafter to the most tokens it can propose now (a
        lookup: the length of its copy; the adapter: min(γ, remaining − 1)), one number per row for a batch, whose
        rows share the round's cost but commit what each row's own offer and acceptance allow; ``rows`` names the
        batch's rows (ids that stay the same from round to round), in the offers' order. (None, 0) is a plain step."""
        offered = {name: most if isinstance(most, list) else [most] for name, most in offers.items()}
        offered = {name: most for name, most in offered.items() if max(most) > 0}
        if not offered:
            return PLAIN, 0
        if not self.adaptive:  # "fixed": a free drafter when it has tokens, else the adapter, always at the most
            name = next((n for n in offered if self.drafters[n].free), next(iter(offered)))
            return name, max(offered[name])
        size = len(next(iter(offered.values())))  # rows in the round
        if self.config.measure_costs and not self.verify_cost:
            return PLAIN, 0  # every decision compares with a plain step: measure it first
        best = self._best(offered, rows, optimism=0.0)
        bold = [self._best(offered, rows, optimism=self.config.optimism)]
        if self.config.measure_costs and self.samples.get(size, 0) < MIN_SAMPLES:
            bold.append((PLAIN, 0))  # the plain step's cost is the yardstick: average a few measurements
        mean = {name: self.alphas(name, 0.0, rows) for name in offered}
        best_rate = self.rate(*best, mean.get(best[0], 0.0), offered.get(best[0], [0] * size))
        for option in bold:
            if option == best:
                continue
            tokens = self.row_tokens(option[1], mean.get(option[0], 0.0), offered.get(option[0], [0] * size))
            loss = self.round_cost(*option, rows=size) - tokens / best_rate  # cost beyond what its tokens are worth
            if loss <= self.budget:
                self.budget -= max(loss, 0.0)
                return option
        return best

    def _best(self, offers: dict[str, list[int]], rows: list[int] | None, optimism: float) -> tuple[str | None, int]:
        size = len(next(iter(offers.values())))
        choice, top = (PLAIN, 0), self.rate(PLAIN, 0, 0.0, [0] * size)
        for name, most in offers.items():
            alpha = self.alphas(name, optimism, rows)
            for k in range(1, max(most) + 1):
                rate = self.rate(name, k, alpha, most)
                if rate > top:
                    choice, top = (name, k), rate
        return choice

    def observe(
        self,
        name: str | None,
        drafted: int,
        accepted: int,
        draft_cost: float,
        verify_cost: float,
        verified: int | None = None,
    ) -> None:
        """Record a round: ``accepted`` of ``drafted`` draft steps from ``name`` matched; what its two phases cost;
        ``verified``: the tokens it verified when that is not ``drafted`` (a tree's nodes).

        Costs are in any unit (seconds), as long as it is the same every round; ignored without measure_costs."""
        self.observe_rows(name, drafted, [(drafted, accepted)], draft_cost, verify_cost, verified)

    def observe_rows(
        self,
        name: str | None,
        width: int,
        outcomes: list[tuple[int, int]],
        draft_cost: float,
        verify_cost: float,
        verified: int | None = None,
        rows: list[int] | None = None,
    ) -> None:
        """Record a round of one or more rows (a batch): each row's (drafted, accepted); the round took up to
        ``width`` draft steps per row, verified ``verified`` (default: ``width``) tokens per row after the last
        committed one, and cost what it cost, all rows together. ``rows``: the batch's row ids, as for ``choose``."""
        c = self.config
        for stats in self.drafters.values():
            stats.idle += 1
        if name is not PLAIN and width > 0:
            stats = self.drafters[name]
            stats.idle = 0
            for i, (drafted, accepted) in enumerate(outcomes):
                if drafted == 0:
                    continue
                if rows is not None:
                    row_counts = stats.rows.get(rows[i], (0.0, 0.0))
                    stats.rows[rows[i]] = self._counted(row_counts, self.alpha(name, row=rows[i]), drafted, accepted)
                stats.accepted, stats.rejected = self._counted(
                    (stats.accepted, stats.rejected), self.alpha(name), drafted, accepted
                )
        m = (width if verified is None else verified) + 1  # tokens verified per row
        size = len(outcomes)
        if c.measure_costs:
            if name is not PLAIN and width > 0 and not self.drafters[name].free:
                stats = self.drafters[name]
                stats.draft_steps[size] = steps = stats.draft_steps.get(size, 0) + 1
                weight = max(c.cost_ema, 1 / steps)
                stats.draft_cost[size] = (1 - weight) * stats.draft_cost.get(size, 0.0) + weight * draft_cost / width
            n = m * size
            self.samples[n] = count = self.samples.get(n, 0) + 1
            weight = max(c.cost_ema, 1 / count)  # a plain mean of the first measurements, then recency-weighted
            self.verify_cost[n] = (1 - weight) * self.verify_cost.get(n, 0.0) + weight * verify_cost
            spent = draft_cost + verify_cost
        else:
            spent = self.round_cost(name, width, m - 1, rows=size)
        self.budget += c.explore_share * spent

    def _counted(self, counts: tuple[float, float], alpha: float, drafted: int, accepted: int) -> tuple[float, float]:
        """Recency-weighted (accepted, rejected) after a row's round; an outcome that ``alpha`` gives less than
        ``surprise`` probability means the acceptance changed, and the counts start afresh."""
        c = self.config
        rejected = 1 if accepted < drafted else 0
        if alpha**accepted * ((1 - alpha) if rejected else 1.0) < c.surprise:
            counts = (0.0, 0.0)
        return c.decay * counts[0] + accepted, c.decay * counts[1] + rejected

    def nominal_costs(self, name: str | None, drafted: int, verified: int | None = None) -> tuple[float, float]:
        """Draft and verify costs of a round as the priors predict them (sampling's timing-free schedule)."""
        draft = 0.0 if name is PLAIN or self.drafters[name].free else drafted * self.config.draft_cost_prior
        return draft, 1.0 + self.config.verify_slope_prior * (drafted if verified is None else verified)
