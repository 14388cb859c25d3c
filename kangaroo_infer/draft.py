"""Drafting: shallow layers [0, ℓ) + adapter + LM head, one token at a time, stopping early on low confidence.

Greedy and sampled drafting are one loop with a different pick (``DraftPick``): the argmax, or a draw from the
processed q (kept, as the acceptance rule needs it). Whatever proposes tokens returns a ``Proposal``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .adapter import KangarooAdapter
from .arch import CAUSAL, Backbone
from .cache import KangarooCache
from .proposal import ADAPTER, Proposal
from .sample import SamplingConfig, draw, full_vocab_logits, process


@dataclass
class DraftHead:
    """The LM head as drafting uses it: the full head, or only the rows of the adapter's draft vocabulary."""

    weight: torch.Tensor  # [V_draft, H]
    bias: torch.Tensor | None  # [V_draft]
    vocab: torch.Tensor | None  # [V_draft] token id of each row (None: row i is token i)
    linear: Callable = torch.nn.functional.linear  # (x, weight, bias) -> x W^T + b; packed.py's where packing is on

    @classmethod
    def of(cls, lm_head: torch.nn.Linear, adapter: KangarooAdapter, linear: Callable | None = None) -> DraftHead:
        linear = linear or torch.nn.functional.linear
        vocab = getattr(adapter, "draft_vocab", None)
        if vocab is None:
            return cls(lm_head.weight, lm_head.bias, None, linear)
        bias = None if lm_head.bias is None else lm_head.bias[vocab].contiguous()
        return cls(lm_head.weight[vocab].contiguous(), bias, vocab, linear)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V_draft]
        return self.linear(hidden, self.weight, self.bias)

    def token(self, index: int) -> int:
        return index if self.vocab is None else int(self.vocab[index])

    def tokens(self, index: torch.Tensor) -> torch.Tensor:  # [...] rows of the head -> token ids [...]
        return index if self.vocab is None else self.vocab[index]


def shallow_step(backbone: Backbone, exit_layer: int, cache: KangarooCache, token: torch.Tensor) -> torch.Tensor:
    """Run tokens ([1, q]) through layers [0, ℓ); queue their exit states for the deep layers; return them [1, q, H]."""
    pos = cache.shallow_len
    positions = torch.arange(pos, pos + token.shape[1], device=token.device)
    hidden = backbone.embed_tokens(token)  # [1, q, H]
    pe = backbone.rotary_emb(hidden, position_ids=positions[None])
    exit_state = backbone.run_layers(hidden, 0, exit_layer, pe, positions, cache.base)
    cache.deep_pending.append(exit_state)
    return exit_state


def adapter_logits(
    backbone: Backbone, adapter: KangarooAdapter, head: DraftHead, cache: KangarooCache, exit_state: torch.Tensor
) -> torch.Tensor:  # [V_draft] draft logits for the token after the one whose exit state is given
    """Feed the adapter everything it has not read yet (ending with ``exit_state``) and read the last position."""
    states = cache.take_unread(exit_state)  # [1, a, H]
    start = cache.adapter_len
    positions = torch.arange(start, start + states.shape[1], device=states.device)
    pe = backbone.rotary_emb(states, position_ids=positions[None])
    mask = CAUSAL.bias(positions, start, None, states.dtype, backbone.eager)
    out = adapter(states, position_embeddings=pe, attention_mask=mask, cache=cache.adapter)  # [1, a, H]
    return head.logits(out[0, -1])


@dataclass
class DraftPick:
    """How a draft token is chosen from the adapter's logits: greedy (argmax) or drawn from the processed q."""

    head: DraftHead
    sampling: SamplingConfig
    vocab_size: int
    generator: torch.Generator | None = None

    def __call__(
        self,
        logits: torch.Tensor,  # [b, V_draft]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # tokens [b], confidence [b], q [b, V] or None
        """One draft per row and its confidence (the top probability of the draft distribution, which η bounds);
        the processed q of every row when sampling. One prompt and a batch's lockstep drafting both pick here."""
        if self.sampling.greedy:
            top_logit, top_id = logits.max(dim=-1)
            confidence = torch.exp(top_logit - torch.logsumexp(logits.float(), dim=-1))
            return self.head.tokens(top_id), confidence, None
        q = process(full_vocab_logits(self.head.vocab, logits, self.vocab_size), self.sampling)  # [b, V]
        return draw(q, self.generator), q.max(dim=-1).values, q


def draft_proposal(
    backbone: Backbone,
    adapter: KangarooAdapter,
    pick: DraftPick,
    cache: KangarooCache,
    last_token: int,
    max_steps: int,
    threshold: float,
    eos_ids: frozenset[int],
) -> Proposal:
    """Propose up to ``max_steps`` tokens d_1..d_k after ``last_token``.

    Stops after a draft whose confidence (top probability of the draft distribution) is below ``threshold`` (that
    draft is still proposed) or that is an end-of-sequence token. Layers [0, ℓ) run exactly once per token and their
    exit states are kept for verification; the newest token (last draft, or ``last_token`` itself when nothing was
    drafted) still needs its shallow pass, which verification gives it.
    """
    exit_layer = adapter.config.exit_layer
    device = backbone.embed_tokens.weight.device
    tokens: list[int] = []
    qs: list[torch.Tensor] = []
    token = last_token
    for _ in range(max_steps):
        exit_state = shallow_step(backbone, exit_layer, cache, torch.tensor([[token]], device=device))
        picked, confidence, q = pick(adapter_logits(backbone, adapter, pick.head, cache, exit_state)[None])
        token = int(picked[0])
        tokens.append(token)
        if q is not None:
            qs.append(q[0])
        if float(confidence[0]) < threshold or token in eos_ids:
            break
    if pick.sampling.greedy:
        return Proposal(tokens)
    return Proposal(tokens, torch.stack(qs) if qs else torch.zeros(0, pick.vocab_size, device=device))


@dataclass
class AdapterChain:
    """The paper's drafter: up to γ adapter steps in a chain, each on the one before (``draft_proposal``)."""

    backbone: Backbone
    adapter: KangarooAdapter
    pick: DraftPick
    cache: KangarooCache
    max_steps: int  # γ
    threshold: float  # η
    eos_ids: frozenset[int]
    name: str = ADAPTER
    free: bool = False
    fanout: tuple[int, int] | None = None

    def offer(self, limit: int) -> int:
        return min(self.max_steps, limit)

    def propose(self, last_token: int, steps: int) -> Proposal:
        return draft_proposal(
            self.backbone, self.adapter, self.pick, self.cache, last_token, steps, self.threshold, self.eos_ids
        )

    def observe(self, committed: list[int]) -> None:
        pass  # the verifier's rollback keeps the adapter's cache in step
