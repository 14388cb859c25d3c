"""Sampling: how the next-token distribution is processed, and the request's one source of randomness.

Both the drafts' distribution q and the full model's p get the same processing (temperature, then top-k, then top-p,
in the order of transformers' ``generate`` warpers); the acceptance rule (``accept.py``) then keeps every committed
token distributed exactly as p. Reproducibility: all randomness comes from one ``torch.Generator`` seeded by
``seed``; the random numbers a request consumes depend on how many tokens each round proposes, so under sampling the
scheduler decides from its cost priors, never from wall-clock timings (same seed, same inputs -> same output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_int, check_real


@dataclass(frozen=True)
class SamplingConfig:
    """How the next-token distribution is processed; temperature 0 means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut

    def __post_init__(self):
        check_real("temperature", self.temperature, 0, rule="be a finite number >= 0 (0 = greedy)")
        check_real("top_p", self.top_p, 0, 1, rule="lie in (0, 1] (1 = no nucleus cut)", low_open=True)
        check_int("top_k", self.top_k, 0, rule="be an integer >= 0 (0 = no top-k cut)")

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
    else:
        check_int("seed", seed, 0, rule="be a non-negative integer or None")
        generator.manual_seed(seed)
    return generator


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # [B, V] (unnormalised ok) -> [B]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def full_vocab_logits(vocab: torch.Tensor | None, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft logits [..., V_draft] scattered into the full vocabulary ([..., V]) by the draft vocabulary's token ids
    (``vocab`` [V_draft], None: the full vocabulary); tokens outside it get -inf, so q(x) = 0 there and such tokens
    only ever come from the residual or bonus draw."""
    if vocab is None:
        return logits
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    full[..., vocab] = logits
    return full
