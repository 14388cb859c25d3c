"""How many tokens to draft each round: fixed γ, or adaptive ("no regret") from observed acceptance and costs.

Drafting only pays when the tokens it saves outweigh what it costs. With per-draft acceptance rate α, a round that
drafts k tokens commits E(k) = 1 + α + ... + α^k tokens in expectation and costs k·c_draft + c_verify(k + 1),
while a plain decoding step (k = 0) commits one token for c_verify(1). The adaptive policy estimates α (a Beta
posterior over this request's recent rounds) and the costs online, and each round picks the k in [0, γ] with the
best expected tokens per second at an optimistic α (the posterior mean plus ``optimism`` standard deviations, an
upper confidence bound). Evidence fades every round, drafted or not, so after a run of plain steps the estimate is
uncertain again and drafting is retried: a request whose drafts stop paying costs only those occasional retries,
and one whose drafts start agreeing again is noticed. Losslessness never depends on the policy: every draft is
verified.

Lookup drafting (``lookup.py``) has a companion policy of its own: its own acceptance posterior, drafts that cost
(almost) nothing, the same verification costs. A round copies when that policy's expected rate for the copied
tokens is at least the best rate the adapter's policy can plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

POLICIES = ("adaptive", "fixed")


@dataclass
class PolicyConfig:
    prior_accepted: float = 1.0  # Beta prior on α (pseudo-counts of accepted and rejected drafts)
    prior_rejected: float = 1.0
    decay: float = 0.95  # per round, drafted or not: the weight of older evidence (recency and re-trying)
    optimism: float = 0.5  # decide at α = posterior mean + optimism · posterior std (0: at the mean)
    cost_ema: float = 0.3  # weight of a new timing in the cost averages
    draft_cost_prior: float = 0.25  # c_draft / c_verify(1) before anything is measured
    verify_slope_prior: float = 0.1  # c_verify(m) / c_verify(1) = 1 + slope·(m − 1) before m is measured
    measure_costs: bool = True  # False: decide from the priors above alone (deterministic, for tests and GPUs)

    def __post_init__(self):
        ranges = {
            "prior_accepted": (self.prior_accepted > 0, "> 0"),
            "prior_rejected": (self.prior_rejected > 0, "> 0"),
            "decay": (0 < self.decay <= 1, "in (0, 1]"),
            "optimism": (self.optimism >= 0, ">= 0"),
            "cost_ema": (0 < self.cost_ema <= 1, "in (0, 1]"),
            "draft_cost_prior": (self.draft_cost_prior >= 0, ">= 0"),
            "verify_slope_prior": (self.verify_slope_prior >= 0, ">= 0"),
        }
        for name, (ok, allowed) in ranges.items():
            if not ok:
                raise ValueError(f"PolicyConfig({name}={getattr(self, name)!r}): must be {allowed}.")


@dataclass
class DraftPolicy:
    """Per-request state: call ``plan()`` before a round and ``update(...)`` after it."""

    max_steps: int
    adaptive: bool = True
    config: PolicyConfig = field(default_factory=PolicyConfig)
    accepted: float = 0.0  # decayed counts of accepted drafts and of rounds that ended in a rejection
    rejected: float = 0.0
    draft_cost: float | None = None  # seconds per draft step
    verify_cost: dict[int, float] = field(default_factory=dict)  # seconds to verify m pending tokens

    @classmethod
    def create(cls, policy: str | PolicyConfig, max_steps: int) -> DraftPolicy:
        """From generate's ``policy`` argument: "adaptive", "fixed" or a PolicyConfig (adaptive with settings)."""
        if isinstance(policy, PolicyConfig):
            return cls(max_steps, adaptive=True, config=policy)
        if policy not in POLICIES:
            raise ValueError(f"Unknown policy {policy!r}; choose one of {list(POLICIES)} or pass a PolicyConfig.")
        return cls(max_steps, adaptive=policy == "adaptive")

    def _posterior(self) -> tuple[float, float]:
        return self.accepted + self.config.prior_accepted, self.rejected + self.config.prior_rejected

    @property
    def alpha(self) -> float:
        """Posterior mean of the per-draft acceptance rate."""
        a, b = self._posterior()
        return a / (a + b)

    def optimistic_alpha(self) -> float:
        """The acceptance rate decisions use: mean + optimism · std of the Beta posterior, at most 1."""
        a, b = self._posterior()
        n = a + b
        return min(1.0, a / n + self.config.optimism * math.sqrt(a * b / (n * n * (n + 1))))

    def _verify(self, m: int) -> float:
        if m in self.verify_cost:
            return self.verify_cost[m]
        slope = self.config.verify_slope_prior
        if not self.verify_cost:
            return 1.0 + slope * (m - 1)
        known = min(self.verify_cost, key=lambda x: abs(x - m))  # scale the nearest measurement by the prior curve
        return self.verify_cost[known] * (1.0 + slope * (m - 1)) / (1.0 + slope * (known - 1))

    def _draft(self) -> float:
        if self.draft_cost is not None:
            return self.draft_cost
        return self.config.draft_cost_prior * self._verify(1)

    def expected_rate(self, k: int, alpha: float | None = None) -> float:
        """Expected committed tokens per second of a round that drafts k tokens (at ``alpha``, default the mean)."""
        alpha = self.alpha if alpha is None else alpha
        tokens = sum(alpha**i for i in range(k + 1))
        return tokens / (k * self._draft() + self._verify(k + 1))

    def plan(self, remaining: int) -> int:
        """Drafts to propose this round (0 = plain decoding step); never more than remaining − 1."""
        limit = min(self.max_steps, remaining - 1)
        if not self.adaptive or limit <= 0:
            return max(limit, 0)
        alpha = self.optimistic_alpha()
        return max(range(limit + 1), key=lambda k: self.expected_rate(k, alpha))

    def companion(self, max_steps: int) -> DraftPolicy:
        """The policy of a second draft source whose drafts cost nothing to make (lookup drafting): same settings,
        its own acceptance estimate, and this policy's verification costs (one shared table)."""
        return DraftPolicy(max_steps, self.adaptive, self.config, draft_cost=0.0, verify_cost=self.verify_cost)

    def beats(self, other: DraftPolicy, drafted: int, other_planned: int) -> bool:
        """Whether a round verifying ``drafted`` of this policy's drafts is expected (optimistically) to commit
        tokens at least as fast as the round ``other`` planned (``other.plan``); always true for the fixed policy."""
        if not self.adaptive:
            return True
        mine = self.expected_rate(drafted, self.optimistic_alpha())
        return mine >= other.expected_rate(other_planned, other.optimistic_alpha())

    def fade(self) -> None:
        """Let old evidence fade by one round (a round this policy did not decide)."""
        self.accepted *= self.config.decay
        self.rejected *= self.config.decay

    def update(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        """Record a round: ``accepted`` of ``drafted`` drafts matched; timings of its two phases."""
        c = self.config
        self.fade()
        if drafted > 0:
            self.accepted += accepted
            self.rejected += 1 if accepted < drafted else 0
        if not c.measure_costs:
            return
        if drafted > 0:
            sample = draft_seconds / drafted
            old = self.draft_cost
            self.draft_cost = sample if old is None else (1 - c.cost_ema) * old + c.cost_ema * sample
        m = drafted + 1
        old = self.verify_cost.get(m)
        self.verify_cost[m] = verify_seconds if old is None else (1 - c.cost_ema) * old + c.cost_ema * verify_seconds
