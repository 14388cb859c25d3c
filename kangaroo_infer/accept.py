"""The acceptance rule: which proposed tokens a round commits, and the full model's token after them.

Exact speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft x, drawn from q, is accepted with
probability min(1, p(x)/q(x)) until the first rejection; there the token is drawn from norm(max(0, p − q)); when
every counted draft is accepted a bonus token is drawn from p. Each committed token is then distributed exactly as
p, whatever q is and wherever drafting stopped (stopping depends on q and the drafts alone).

Two special cases, one rule:
- greedy decoding is the one-hot case: p = one-hot(argmax), q = one-hot(draft). A draft is accepted iff it is the
  argmax, and the residual at a rejection is the argmax itself. Computed without materialising the one-hots.
- a copied token (lookup drafting) is a point-mass draft: q = one-hot(x). It is accepted with probability p(x); the
  residual is p with x removed, renormalised.
A tree (greedy) applies the one-hot rule at every node on the way down: of a node's children, the one that is the
model's argmax there is accepted, and the walk ends at a node with no such child.
"""

from __future__ import annotations

import torch

from .proposal import Proposal
from .sample import SamplingConfig, draw, process


def accept(
    drafts: torch.Tensor,  # [B, k] proposed tokens
    counted: torch.Tensor,  # [B] how many leading drafts of each row count (the rest are padding, never accepted)
    logits: torch.Tensor,  # [B, k + 1, V] full-model logits after the last committed token and after each draft
    sampling: SamplingConfig,
    q: torch.Tensor | None = None,  # [B, k, V] distributions the drafts were drawn from; None: point masses
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # accepted drafts per row [B], next token per row [B]
    batch, k = drafts.shape
    device = drafts.device
    in_count = torch.arange(k, device=device)[None] < counted[:, None]  # [B, k]
    if sampling.greedy:  # one-hot p and q: u < p(x)/q(x) holds exactly when x is the argmax
        targets = logits.argmax(dim=-1)  # [B, k + 1]
        passed = (drafts == targets[:, :k]) & in_count
        accepted = passed.long().cumprod(dim=-1).sum(dim=-1)
        return accepted, targets.gather(1, accepted[:, None])[:, 0]
    p = process(logits, sampling)  # [B, k + 1, V]
    rows = torch.arange(batch, device=device)
    u = torch.rand(batch, k, generator=generator, device=device)
    p_x = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # [B, k]
    q_x = torch.ones_like(p_x) if q is None else q.gather(-1, drafts[..., None])[..., 0]
    passed = (u * q_x < p_x) & in_count  # u < p/q, with q(x) > 0 since x was drawn from q
    accepted = passed.long().cumprod(dim=-1).sum(dim=-1)  # [B] leading passes
    p_next = p[rows, accepted]  # [B, V]
    rejected = (accepted < counted)[:, None]  # a rejection to correct; else a bonus draw from p
    if q is None:
        at = drafts.gather(1, accepted.clamp_max(max(k - 1, 0))[:, None]) if k else drafts.new_zeros(batch, 1)
        residual = p_next.scatter(1, at, 0.0)
        residual = torch.where(rejected, residual, p_next)
    else:
        q_next = torch.cat([q, q.new_zeros(batch, 1, q.shape[-1])], dim=1)[rows, accepted]  # [B, V]
        residual = (p_next - q_next * rejected).clamp_min(0)
    empty = residual.sum(dim=-1, keepdim=True) <= 1e-12  # p == q up to rounding: rejection had probability ~0
    return accepted, draw(torch.where(empty, p_next, residual), generator)


def accept_proposal(
    proposal: Proposal,
    logits: torch.Tensor,  # [k + 1, V] the full model's logits after node 0 (the last committed token) and each node
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:  # accepted path of nodes (0 first), next token
    """One round's acceptance: the kept path (a chain: 0..n) and the full model's token after it."""
    tree = proposal.tree
    if tree is not None:  # greedy: follow the model's choice down the tree while a child proposed it
        targets = logits.argmax(dim=-1).tolist()
        path = [0]
        while (child := tree.children.get((path[-1], targets[path[-1]]))) is not None:
            path.append(child)
        return path, targets[path[-1]]
    k = len(proposal.tokens)
    drafts = torch.tensor([proposal.tokens], dtype=torch.long, device=logits.device).reshape(1, k)
    q = None if proposal.q is None else proposal.q[None]
    accepted, next_token = accept(drafts, torch.tensor([k], device=logits.device), logits[None], sampling, q, generator)
    return list(range(int(accepted[0]) + 1)), int(next_token[0])


def cut_at_eos(tokens: list[int], eos_ids: frozenset[int]) -> list[int]:
    """The committed tokens up to and including the first end-of-sequence token."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens
