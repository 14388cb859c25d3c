"""Dynamic tree drafting and verification (greedy): the adapter's second-best guesses get verified too.

A round grows a tree of drafts from the last committed token (the root), one level per draft step. Every node of
the newest level whose own draft probability reaches η is expanded with its top-K children; of all children made at
a level, the K with the highest cumulative draft probability join the tree, within a cap of N nodes and a depth of
γ. The shallow layers and the adapter run on a whole level at once, each node attending to the committed prefix,
its ancestors and itself (a tree attention mask; positions = prefix length + depth). The deep layers then verify
every node in one pass with the same kind of mask; the longest root-to-node path whose tokens match the model's
greedy choices is accepted, plus the model's own next token, and every KV cache keeps only that path (gathered,
not recomputed). Drafting lives here; the verification pass is ``verify.Verifier``'s and the acceptance walk
``accept.accept_proposal``'s, as for every other proposal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapter import KangarooAdapter
from .arch import Backbone, TreeAttention
from .cache import KangarooCache
from .draft import DraftHead, adapter_logits, shallow_step
from .proposal import ADAPTER, Proposal, Tree


def _shallow_level(backbone: Backbone, exit_layer: int, cache: KangarooCache, tree: Tree, nodes: list[int], root_pos):
    """Layers [0, ℓ) on a set of tree nodes at once; their exit states join the deep layers' queue."""
    device = backbone.embed_tokens.weight.device
    positions, allowed, key_positions = tree.attention(nodes, tree.shallow_order + nodes, root_pos, root_pos, device)
    hidden = backbone.embed_tokens(torch.tensor([[tree.tokens[n] for n in nodes]], device=device))  # [1, q, H]
    pe = backbone.rotary_emb(hidden, position_ids=positions[None])
    mask = TreeAttention(allowed, key_positions)
    exit_states = backbone.run_layers(hidden, 0, exit_layer, pe, positions, cache.base, mask)
    cache.deep_pending.append(exit_states)
    tree.shallow_order.extend(nodes)
    return exit_states  # [1, q, H]


def grow_level(
    tree: Tree,
    expanded: list[int],
    logits: torch.Tensor,  # [len(expanded), V_draft] the adapter's draft logits after each expanded node
    head: DraftHead,
    top_k: int,
    max_nodes: int,
    threshold: float,
    eos_ids: frozenset[int],
) -> list[int]:
    """One level: of the expanded nodes' top_k children each, the top_k by cumulative draft probability join the tree
    (within ``max_nodes`` drafts); returns the new nodes to expand next, those whose own probability reaches η and
    that are not an end-of-sequence token (one below η is still verified, not expanded: the chain's early exit)."""
    if not expanded:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)  # [len(expanded), V_draft]
    top_logp, top_idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    base_scores = torch.tensor([tree.scores[n] for n in expanded])[:, None]
    cumulative = (base_scores + top_logp.cpu()).flatten()
    budget = min(top_k, max_nodes - tree.num_drafts)
    chosen = cumulative.topk(min(budget, cumulative.numel())).indices.tolist()
    width = top_idx.shape[-1]
    top_idx, top_logp = top_idx.cpu().tolist(), top_logp.cpu().tolist()
    new_level = []
    for flat in chosen:
        row, col = divmod(flat, width)
        node = tree.add(expanded[row], head.token(top_idx[row][col]), float(cumulative[flat]))
        if math.exp(top_logp[row][col]) >= threshold and tree.tokens[node] not in eos_ids:
            new_level.append(node)
    return new_level


def draft_tree(
    backbone: Backbone,
    adapter: KangarooAdapter,
    head: DraftHead,
    cache: KangarooCache,
    last_token: int,
    max_depth: int,
    top_k: int,
    max_nodes: int,
    threshold: float,
    eos_ids: frozenset[int],
) -> Proposal:
    """Grow a draft tree of depth <= ``max_depth`` and at most ``max_nodes`` drafts below ``last_token``; every node
    has had its shallow pass. The proposal's tokens are the nodes 1..n in order (node 0 is ``last_token``)."""
    exit_layer = adapter.config.exit_layer
    device = backbone.embed_tokens.weight.device
    root_pos = cache.shallow_len  # the root's position = committed prefix length before it
    tree = Tree.rooted_at(last_token, max_nodes + 1)

    # Depth 0: the root continues the committed sequence, exactly as in chain drafting.
    root_exit = shallow_step(backbone, exit_layer, cache, torch.tensor([[last_token]], device=device))
    tree.shallow_order.append(0)
    logits = adapter_logits(backbone, adapter, head, cache, root_exit)[None]  # [1, V_draft]
    adapter_prefix = cache.adapter_len  # adapter entries up to and including the root
    tree.adapter_slot[0] = adapter_prefix - 1
    expanded = [0]
    for depth in range(1, max_depth + 1):
        new_level = grow_level(tree, expanded, logits, head, top_k, max_nodes, threshold, eos_ids)
        if depth == max_depth or not new_level or tree.num_drafts >= max_nodes:
            break
        # Expand the new level: shallow layers + adapter on all its nodes at once.
        exit_states = _shallow_level(backbone, exit_layer, cache, tree, new_level, root_pos)
        expanded_before = [n for n in tree.adapter_slot if n != 0]  # in adapter-cache order
        columns = expanded_before + new_level
        positions, allowed, key_pos = tree.attention(new_level, columns, adapter_prefix, root_pos, device)
        pe = backbone.rotary_emb(exit_states, position_ids=positions[None])
        mask = TreeAttention(allowed, key_pos).bias(positions, adapter_prefix, None, exit_states.dtype, backbone.eager)
        start = cache.adapter_len
        out = adapter(exit_states, position_embeddings=pe, attention_mask=mask, cache=cache.adapter)  # [1, q, H]
        for i, node in enumerate(new_level):
            tree.adapter_slot[node] = start + i
        logits = head.logits(out[0])  # [q, V_draft]
        expanded = new_level
    leaves = [n for n in range(len(tree.tokens)) if n not in set(tree.shallow_order)]
    if leaves:
        _shallow_level(backbone, exit_layer, cache, tree, leaves, root_pos)
    return Proposal(tree.tokens[1:], tree=tree)


@dataclass
class AdapterTree:
    """The adapter's drafts as a tree (``draft_tree``): up to K children per level, N nodes, depth γ."""

    backbone: Backbone
    adapter: KangarooAdapter
    head: DraftHead
    cache: KangarooCache
    max_steps: int  # γ
    top_k: int  # K
    max_nodes: int  # N
    threshold: float  # η
    eos_ids: frozenset[int]
    name: str = ADAPTER
    free: bool = False

    @property
    def fanout(self) -> tuple[int, int]:
        return self.top_k, self.max_nodes

    def offer(self, limit: int) -> int:
        return min(self.max_steps, limit)

    def propose(self, last_token: int, steps: int) -> Proposal:
        return draft_tree(
            self.backbone, self.adapter, self.head, self.cache, last_token, steps, self.top_k, self.max_nodes,
            self.threshold, self.eos_ids,
        )  # fmt: skip

    def observe(self, committed: list[int]) -> None:
        pass  # the verifier gathers the accepted path in every cache
