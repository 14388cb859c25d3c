"""Exact speculative sampling: drafts sampled from the adapter's q, verified against the full model's p.

Both distributions get the same processing (temperature, then top-k, then top-p, in the order of transformers'
``generate`` warpers). A draft x is accepted with probability min(1, p(x)/q(x)); at the first rejection the token is
drawn from norm(max(0, p − q)); when every draft is accepted a bonus token is drawn from p. Each committed token is
then distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023), whatever q is. Drafting stops early when q's
top probability falls below η or the draft is an end-of-sequence token: both depend on q and the drafts alone, so
exactness holds for any stopping point.

Reproducibility: all randomness comes from one ``torch.Generator`` seeded by ``seed``. The random numbers a request
consumes depend on how many tokens are drafted each round, so the draft policy must not depend on wall-clock timings:
the sampled paths feed the adaptive policy its prior (nominal) costs instead of measured ones, i.e. it adapts the
number of drafts to the observed acceptance only (``nominal_costs``). Same seed, same inputs -> same output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import KangarooAdapter
from .arch import Backbone
from .cache import KangarooCache
from .draft import DraftHead, adapter_logits, shallow_step
from .policy import DraftPolicy
from .verify import deep_logits


@dataclass(frozen=True)
class SamplingConfig:
    """How the next-token distribution is processed; temperature 0 means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy); got {self.temperature!r}.")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got {self.temperature!r}.")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = no nucleus cut); got {self.top_p!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k cut); got {self.top_k!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:  # [..., V] -> probabilities [..., V]
    """Temperature, then top-k, then top-p (keeping at least one token), as transformers' warpers do; float32."""
    logits = logits.float() / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - cfg.top_p
        drop_sorted[..., -1] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The one source of randomness of a request; an unseeded generator draws a fresh seed."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None; got {seed!r}.")
    else:
        generator.manual_seed(seed)
    return generator


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # [B, V] (unnormalised ok) -> [B]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def full_vocab_logits(head: DraftHead, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft logits [..., V_draft] scattered into the full vocabulary ([..., V]); tokens outside the draft vocab get
    -inf, so q(x) = 0 there and such tokens only ever come from the residual or bonus draw."""
    if head.vocab is None:
        return logits
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    full[..., head.vocab] = logits
    return full


def accept_sampled(
    drafts: torch.Tensor,  # [B, k] drafted tokens
    num_drafts: torch.Tensor,  # [B] how many leading drafts of each row count (the rest are ignored)
    q: torch.Tensor,  # [B, k, V] draft distributions the drafts were sampled from
    p: torch.Tensor,  # [B, k + 1, V] target distributions after the last committed token and after each draft
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # accepted drafts per row [B], next token per row [B]
    """The exact rule: accept x with probability min(1, p(x)/q(x)) until the first rejection, then draw from
    norm(max(0, p − q)) at that position; a row whose counted drafts all pass draws a bonus token from p there."""
    batch, k = drafts.shape
    rows = torch.arange(batch, device=drafts.device)
    u = torch.rand(batch, k, generator=generator, device=drafts.device)
    p_x = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_x = q.gather(-1, drafts[..., None])[..., 0]
    counted = torch.arange(k, device=drafts.device)[None] < num_drafts[:, None]
    passed = (u * q_x < p_x) & counted  # u < p/q, with q(x) > 0 since x was drawn from q
    accepted = passed.long().cumprod(dim=-1).sum(dim=-1)  # [B] leading passes
    q_next = torch.cat([q, q.new_zeros(batch, 1, q.shape[-1])], dim=1)[rows, accepted]  # [B, V]
    q_next = q_next * (accepted < num_drafts)[:, None]  # no draft to correct at a bonus position: q = 0
    p_next = p[rows, accepted]  # [B, V]
    residual = (p_next - q_next).clamp_min(0)
    empty = residual.sum(dim=-1, keepdim=True) <= 1e-12  # p == q up to rounding: rejection had probability ~0
    next_tokens = draw(torch.where(empty, p_next, residual), generator)
    return accepted, next_tokens


def nominal_costs(policy: DraftPolicy, drafted: int) -> tuple[float, float]:
    """Draft and verify "seconds" of a round as the policy's priors predict them (units of one verify of 1 token):
    fed to ``DraftPolicy.update`` instead of wall-clock timings so that the draft schedule, hence the random numbers
    consumed, depends only on the tokens (reproducible seeds)."""
    c = policy.config
    return drafted * c.draft_cost_prior, 1.0 + c.verify_slope_prior * drafted


@dataclass
class SampledDraft:
    tokens: list[int]  # d_1..d_k
    q: torch.Tensor  # [k, V] the processed draft distribution each was drawn from


def draft_chain_sampled(
    backbone: Backbone,
    adapter: KangarooAdapter,
    head: DraftHead,
    cache: KangarooCache,
    last_token: int,
    max_steps: int,
    threshold: float,
    eos_ids: frozenset[int],
    cfg: SamplingConfig,
    generator: torch.Generator,
) -> SampledDraft:
    """As ``draft_chain``, but each draft is drawn from the processed q; stops after a draft whose q has top
    probability below ``threshold`` or that is an end-of-sequence token."""
    device = backbone.embed_tokens.weight.device
    vocab_size = backbone.lm_head.weight.shape[0]
    tokens: list[int] = []
    qs: list[torch.Tensor] = []
    token = last_token
    for _ in range(max_steps):
        exit_state = shallow_step(backbone, adapter.config.exit_layer, cache, torch.tensor([[token]], device=device))
        q = process(
            full_vocab_logits(head, adapter_logits(backbone, adapter, head, cache, exit_state), vocab_size), cfg
        )
        token = int(draw(q[None], generator))
        tokens.append(token)
        qs.append(q)
        if float(q.max()) < threshold or token in eos_ids:
            break
    q_all = torch.stack(qs) if qs else torch.zeros(0, vocab_size, device=device)
    return SampledDraft(tokens, q_all)


def verify_chain_sampled(
    backbone: Backbone,
    exit_layer: int,
    cache: KangarooCache,
    last_token: int,
    draft: SampledDraft,
    cfg: SamplingConfig,
    generator: torch.Generator,
) -> list[int]:
    """As ``verify_chain`` (one deep pass over last token + drafts, then rollback), with the exact acceptance rule."""
    device = backbone.embed_tokens.weight.device
    newest = draft.tokens[-1] if draft.tokens else last_token
    shallow_step(backbone, exit_layer, cache, torch.tensor([[newest]], device=device))
    start = cache.deep_len
    logits, states = deep_logits(backbone, exit_layer, cache)  # [k + 1, V], [1, k + 1, H]
    k = len(draft.tokens)
    accepted, next_token = accept_sampled(
        torch.tensor([draft.tokens], device=device, dtype=torch.long).reshape(1, k),
        torch.tensor([k], device=device),
        draft.q[None],
        process(logits, cfg)[None],
        generator,
    )
    n = int(accepted[0])
    cache.rollback(start + n + 1, states[:, n : n + 1])
    return draft.tokens[:n] + [int(next_token[0])]
