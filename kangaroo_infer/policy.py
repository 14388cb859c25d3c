"""How many tokens to draft each round: fixed γ, or adaptive ("no regret") from observed acceptance and costs.

Drafting only pays when the tokens it saves outweigh what it costs. With per-draft acceptance rate α, a round that
drafts k tokens commits E(k) = 1 + α + ... + α^k tokens in expectation and costs k·c_draft + c_verify(k + 1),
while a plain decoding step (k = 0) commits one token for c_verify(1). The adaptive policy estimates α and the
costs online, per request, and each round picks the k in [0, γ] with the best expected tokens per second. When
drafting does not pay (k = 0) it still probes now and then (with exponential back-off) so it notices when the
adapter starts to agree with the model again. Losslessness never depends on the policy: every draft is verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("adaptive", "fixed")


@dataclass
class PolicyConfig:
    prior_accepted: float = 1.0  # Beta prior on α: optimistic enough to try drafting at the start
    prior_rejected: float = 1.0
    decay: float = 0.9  # weight of older rounds in the acceptance counts (recency)
    cost_ema: float = 0.3  # weight of a new timing in the cost averages
    draft_cost_prior: float = 0.25  # c_draft / c_verify(1) before anything is measured
    verify_slope_prior: float = 0.15  # c_verify(m) / c_verify(1) = 1 + slope·(m − 1) before m is measured
    probe_interval: int = 4  # plain steps before drafting is tried again
    max_probe_interval: int = 64
    measure_costs: bool = True  # False: decide from the priors above alone (deterministic, for tests and GPUs)


@dataclass
class DraftPolicy:
    """Per-request state: call ``plan()`` before a round and ``update(...)`` after it."""

    max_steps: int
    adaptive: bool = True
    config: PolicyConfig = field(default_factory=PolicyConfig)
    accepted: float = 0.0
    rejected: float = 0.0
    draft_cost: float | None = None  # seconds per draft step
    verify_cost: dict[int, float] = field(default_factory=dict)  # seconds to verify m pending tokens
    plain_streak: int = 0
    probe_interval: int = 0
    probing: bool = False

    @classmethod
    def create(cls, policy: str | PolicyConfig, max_steps: int) -> DraftPolicy:
        """From generate's ``policy`` argument: "adaptive", "fixed" or a PolicyConfig (adaptive with settings)."""
        if isinstance(policy, PolicyConfig):
            return cls(max_steps, adaptive=True, config=policy)
        if policy not in POLICIES:
            raise ValueError(f"Unknown policy {policy!r}; choose one of {list(POLICIES)} or pass a PolicyConfig.")
        return cls(max_steps, adaptive=policy == "adaptive")

    def __post_init__(self):
        self.accepted, self.rejected = self.config.prior_accepted, self.config.prior_rejected
        self.probe_interval = self.config.probe_interval

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

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

    def expected_rate(self, k: int) -> float:
        """Expected committed tokens per second of a round that drafts k tokens."""
        alpha = self.alpha
        tokens = sum(alpha**i for i in range(k + 1))
        return tokens / (k * self._draft() + self._verify(k + 1))

    def plan(self, remaining: int) -> int:
        """Drafts to propose this round (0 = plain decoding step); never more than remaining − 1."""
        limit = min(self.max_steps, remaining - 1)
        if not self.adaptive or limit <= 0:
            return max(limit, 0)
        best = max(range(limit + 1), key=self.expected_rate)
        if best > 0:
            self.plain_streak = 0
            return best
        self.plain_streak += 1
        if self.plain_streak >= self.probe_interval:
            self.plain_streak, self.probing = 0, True
            return 1
        return 0

    def update(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        """Record a round: ``accepted`` of ``drafted`` drafts matched; timings of its two phases."""
        c = self.config
        if drafted > 0:
            self.accepted = c.decay * self.accepted + accepted
            self.rejected = c.decay * self.rejected + (1 if accepted < drafted else 0)
            if self.probing:  # a failed probe doubles the wait before the next one; a success resets it
                self.probing = False
                failed = accepted == 0
                self.probe_interval = min(2 * self.probe_interval, c.max_probe_interval) if failed else c.probe_interval
        if not c.measure_costs:
            return
        if drafted > 0:
            sample = draft_seconds / drafted
            old = self.draft_cost
            self.draft_cost = sample if old is None else (1 - c.cost_ema) * old + c.cost_ema * sample
        m = drafted + 1
        old = self.verify_cost.get(m)
        self.verify_cost[m] = verify_seconds if old is None else (1 - c.cost_ema) * old + c.cost_ema * verify_seconds
