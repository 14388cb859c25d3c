"""KangarooModel: a base causal LM plus an adapter at exit layer ℓ, decoding losslessly by self-speculation."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .adapter import INITS, KangarooAdapter, check_exit_layer, read_adapter_config
from .arch import Backbone
from .base import load_base
from .batch import generate_batch
from .cache import KangarooCache
from .draft import DraftHead, draft_chain
from .lookup import NgramLookup
from .policy import DraftPolicy, PolicyConfig
from .sample import (
    SamplingConfig,
    draft_chain_sampled,
    draw,
    make_generator,
    nominal_costs,
    process,
    verify_chain_sampled,
)
from .tree import draft_tree, verify_tree
from .verify import deep_logits, verify_chain, verify_lookup

DEFAULT_GENERATION = {
    "threshold": 0.6,
    "max_draft_steps": 6,
    "tree_top_k": 4,
    "tree_max_nodes": 16,
    "lookup_tokens": 12,
    "lookup_min_ngram": 2,
    "lookup_max_ngram": 3,
}
FROM_GENERATION_CONFIG = "from_generation_config"  # eos_token_id default: as base.generate without the argument


@dataclass
class GenerateOutput:
    sequences: torch.LongTensor  # [1, T + n]: prompt + new tokens ([B, T + n_max] for a batch)
    accept_lengths: list[int]  # tokens committed by each full-model forward (the prefill included); sum == n
    draft_lengths: list[int] = field(default_factory=list)  # drafts proposed in each round (prefill excluded)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    lookup_rounds: list[int] = field(default_factory=list)  # indices (into draft_lengths) of the rounds whose drafts
    # were copied by lookup drafting (lookup.py) instead of drafted by the adapter
    # For a batch (batch.py) accept_lengths and draft_lengths are lists per row: list[list[int]].

    @property
    def num_new_tokens(self) -> int:
        """New tokens (summed over the rows of a batch)."""
        return sum(sum(x) if isinstance(x, list) else x for x in self.accept_lengths)

    @property
    def tau(self) -> float:
        """Mean tokens committed per full-model forward (per row and forward, for a batch)."""
        forwards = sum(len(x) if isinstance(x, list) else 1 for x in self.accept_lengths)
        return self.num_new_tokens / max(forwards, 1)


def _eos_set(eos_token_id: int | list[int] | torch.Tensor | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


class KangarooModel:
    """Double early exiting: draft with layers [0, ℓ) + adapter, verify with layers [ℓ, L) in one pass."""

    def __init__(self, base: PreTrainedModel, adapter: KangarooAdapter):
        self.base = base
        self.adapter = adapter.eval()
        self.backbone = Backbone.of(base)
        check_exit_layer(adapter.config.exit_layer, self.backbone.num_layers)
        self._draft_head: tuple[tuple, DraftHead] | None = None

    @property
    def exit_layer(self) -> int:
        return self.adapter.config.exit_layer

    @property
    def draft_head(self) -> DraftHead:
        """The LM head rows drafting uses; rebuilt only when the draft vocabulary or the head's weights change."""
        vocab = getattr(self.adapter, "draft_vocab", None)
        weight = self.backbone.lm_head.weight
        key = (id(vocab), None if vocab is None else vocab.data_ptr(), weight.data_ptr(), weight.dtype, weight.device)
        if self._draft_head is None or self._draft_head[0] != key:
            self._draft_head = (key, DraftHead.of(self.backbone.lm_head, self.adapter))
        return self._draft_head[1]

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike | PreTrainedModel | None,
        adapter: str | os.PathLike | None = None,
        exit_layer: int | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        init: str = "random",
    ) -> KangarooModel:
        """Load a base model and an adapter checkpoint (or make a fresh adapter when ``adapter`` is None).

        ``base_model`` is an HF directory, a hub id, an alias (``smollm2-135m-instruct``) or a loaded model; None
        takes the base recorded in the adapter's config. ``exit_layer`` is required for a fresh adapter and, with a
        checkpoint, must agree with the checkpoint's.
        """
        if adapter is None:
            if base_model is None:
                raise ValueError("Name a base model (base_model=...) or an adapter checkpoint (adapter=DIR).")
            if exit_layer is None:
                raise ValueError("A fresh adapter (adapter=None) needs exit_layer=ℓ, the number of shallow layers.")
            if init not in INITS:
                raise ValueError(f"Unknown adapter init {init!r}; choose one of {list(INITS)}.")
            base = load_base(base_model, dtype, device)
            check_exit_layer(exit_layer, base.config.num_hidden_layers)
            name = None if isinstance(base_model, PreTrainedModel) else str(base_model)
            return cls(base, KangarooAdapter.for_base(base, exit_layer, init=init, base_name=name))
        config = read_adapter_config(adapter)
        if exit_layer is not None and exit_layer != config.exit_layer:
            raise ValueError(
                f"exit_layer={exit_layer} disagrees with the adapter checkpoint {adapter}, trained at exit layer "
                f"{config.exit_layer}; drop exit_layer or pass the matching adapter."
            )
        if base_model is None:
            if not config.base_model:
                raise ValueError(f"Adapter {adapter} records no base model; pass base_model=... explicitly.")
            base_model = _resolve_recorded_base(config.base_model, Path(adapter))
        base = load_base(base_model, dtype, device)
        return cls(base, KangarooAdapter.from_pretrained(adapter, base))

    def resolve_eos(self, eos_token_id: int | list[int] | None | str) -> frozenset[int]:
        """As transformers' generate: left out, the generation config names EOS; None or [] disables it."""
        if isinstance(eos_token_id, str):
            if eos_token_id != FROM_GENERATION_CONFIG:
                raise ValueError(f"eos_token_id must be an int, a list of ints or None; got {eos_token_id!r}.")
            eos_token_id = self.base.generation_config.eos_token_id
        return _eos_set(eos_token_id)

    @property
    def generation_defaults(self) -> dict:
        """kangaroo_infer's decoding defaults, overridden by those recorded in the adapter checkpoint."""
        return {**DEFAULT_GENERATION, **self.adapter.config.generation}

    def resolve_generation(self, threshold: float | None, max_draft_steps: int | None) -> tuple[float, int]:
        """Fill unset η / γ from the adapter checkpoint's generation defaults, else 0.6 / 6."""
        defaults = self.generation_defaults
        return (
            defaults["threshold"] if threshold is None else threshold,
            defaults["max_draft_steps"] if max_draft_steps is None else max_draft_steps,
        )

    def _check_inputs(self, input_ids: torch.Tensor, max_new_tokens: int, threshold: float, steps: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError("input_ids must be an integer torch tensor of shape [1, T].")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids must have shape [1, T] (one prompt); got {list(input_ids.shape)}. Decode prompts one at a "
                f"time, or unsqueeze a 1-D prompt with input_ids[None]."
            )
        if input_ids.shape[1] == 0:
            raise ValueError("The prompt is empty (input_ids has 0 tokens); give at least one token.")
        vocab = self.base.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids contain ids outside the vocabulary [0, {vocab}); check the tokenizer.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
        limit = self.backbone.max_positions
        total = input_ids.shape[1] + max_new_tokens
        if limit is not None and total > limit:
            raise ValueError(
                f"Prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's {limit} positions; shorten the prompt or lower max_new_tokens to "
                f"{limit - input_ids.shape[1]}."
            )
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1]; got {threshold!r}.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"max_draft_steps must be an integer >= 1; got {steps!r}.")

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int = 128,
        threshold: float | None = None,
        max_draft_steps: int | None = None,
        eos_token_id: int | list[int] | None | str = FROM_GENERATION_CONFIG,
        streamer=None,
        policy: str | PolicyConfig = "adaptive",
        tree: bool = False,
        tree_top_k: int | None = None,
        tree_max_nodes: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
        lookup_tokens: int | None = None,
        lookup_min_ngram: int | None = None,
        lookup_max_ngram: int | None = None,
    ) -> GenerateOutput:
        """Greedy decoding, token-identical to ``base.generate(input_ids, do_sample=False, ...)``.

        ``threshold`` (η) and ``max_draft_steps`` (γ) default to the adapter checkpoint's recorded generation
        defaults, else 0.6 and 6.
        ``eos_token_id`` behaves as in transformers' ``generate``: left out, the base's generation config names the
        end-of-sequence token(s); an explicit None (or []) disables stopping early. ``streamer``
        is any object with ``put(tensor)`` / ``end()`` (e.g. transformers' TextStreamer); it first receives the
        prompt, then each round's committed tokens. ``policy`` "adaptive" (default) drafts only as many tokens per
        round (up to γ, possibly none) as the observed acceptance and costs make worthwhile; "fixed" always drafts
        up to γ; a ``PolicyConfig`` selects the adaptive policy with those settings (see ``policy.py``).
        ``tree=True`` drafts a dynamic tree instead of a chain (``tree.py``): up to ``tree_top_k`` children per level
        (default 4), at most ``tree_max_nodes`` drafts (default 16), depth up to γ; η stops a branch's growth.
        ``temperature`` > 0 samples instead (exact speculative sampling, ``sample.py``), after ``top_k`` / ``top_p``
        processing, from a generator seeded with ``seed``. ``input_ids`` [B, T] with B > 1, or any
        ``attention_mask`` (left padding), decodes a batch (``batch.py``): ``sequences`` is then [B, T + n_max] and
        ``accept_lengths`` / ``draft_lengths`` are lists per row.
        ``lookup_tokens`` (default: adapter's, else 12; 0 disables) lets a round draft up to that many tokens by
        copying what followed the latest earlier occurrence of the last ``lookup_max_ngram`` .. ``lookup_min_ngram``
        tokens (default 3 .. 2) in prompt + output (``lookup.py``), when the policy expects that to beat the
        adapter's draft; greedy decoding of one prompt only (the default is not applied to batches or sampling).
        """
        sampling = SamplingConfig(temperature, top_p, top_k)
        shape = getattr(input_ids, "shape", ())
        batched = attention_mask is not None or (len(shape) == 2 and shape[0] > 1)
        if tree and (batched or not sampling.greedy):
            raise ValueError("tree=True drafts for one prompt, greedily; drop tree for batches or temperature > 0.")
        lookup = self._check_lookup(lookup_tokens, lookup_min_ngram, lookup_max_ngram, batched or not sampling.greedy)
        extended = (max_new_tokens, threshold, max_draft_steps, eos_token_id, streamer, policy, sampling, seed)
        if batched:
            return generate_batch(self, input_ids, attention_mask, *extended)
        threshold, max_draft_steps = self.resolve_generation(threshold, max_draft_steps)
        self._check_inputs(input_ids, max_new_tokens, threshold, max_draft_steps)
        tree_top_k, tree_max_nodes = self._check_tree(tree, tree_top_k, tree_max_nodes)
        policy = DraftPolicy.create(policy, max_draft_steps)
        lookup_tokens, min_ngram, max_ngram = lookup
        copier = NgramLookup(input_ids[0].tolist(), min_ngram, max_ngram) if lookup_tokens else None
        copy_policy = policy.companion(lookup_tokens) if lookup_tokens else None
        eos_ids = self.resolve_eos(eos_token_id)
        device = self.backbone.embed_tokens.weight.device
        generator = None if sampling.greedy else make_generator(seed, device)
        input_ids = input_ids.to(device=device, dtype=torch.long)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        backbone, ell = self.backbone, self.exit_layer
        cache = KangarooCache(ell, backbone.num_layers)
        head = self.draft_head

        t0 = time.perf_counter()
        logits = self._prefill(input_ids, cache)  # [V]
        first = int(logits.argmax()) if sampling.greedy else int(draw(process(logits, sampling)[None], generator))
        t1 = time.perf_counter()
        new_tokens = [first]
        accept_lengths = [1]
        draft_lengths: list[int] = []
        lookup_rounds: list[int] = []
        if streamer is not None:
            streamer.put(torch.tensor([first]))
        while len(new_tokens) < max_new_tokens and new_tokens[-1] not in eos_ids:
            remaining = max_new_tokens - len(new_tokens)
            round_start = time.perf_counter()
            steps = policy.plan(remaining)
            copied = copier.propose(min(lookup_tokens, remaining - 1)) if copier is not None else []
            if copied:  # how many of them are worth verifying (more rows cost more)
                copied = copied[: copy_policy.plan(len(copied) + 1)]
            if copied and copy_policy.beats(policy, len(copied), steps):
                # A lookup round: drafting was a dictionary lookup; all layers verify the copied tokens at once.
                lookup_rounds.append(len(draft_lengths))
                drafted_at = time.perf_counter()
                committed = verify_lookup(backbone, ell, cache, new_tokens[-1], copied)
                num_drafts = depth = len(copied)
                used, idle = copy_policy, policy
            else:
                used, idle = policy, copy_policy
                if tree and steps > 0:
                    drafts = draft_tree(
                        backbone, self.adapter, head, cache, new_tokens[-1], steps, tree_top_k, tree_max_nodes,
                        threshold, eos_ids,
                    )  # fmt: skip
                    drafted_at = time.perf_counter()
                    committed = verify_tree(backbone, ell, cache, drafts)
                    num_drafts, depth = drafts.num_drafts, max(drafts.depths)
                elif sampling.greedy:
                    chain = draft_chain(
                        backbone, self.adapter, head, cache, new_tokens[-1], steps, threshold, eos_ids, device
                    )
                    drafted_at = time.perf_counter()
                    committed = verify_chain(backbone, ell, cache, new_tokens[-1], chain)
                    num_drafts = depth = len(chain)
                else:
                    sampled = draft_chain_sampled(
                        backbone, self.adapter, head, cache, new_tokens[-1], steps, threshold, eos_ids, sampling,
                        generator,
                    )  # fmt: skip
                    committed = verify_chain_sampled(backbone, ell, cache, new_tokens[-1], sampled, sampling, generator)
                    num_drafts = depth = len(sampled.tokens)
            if idle is not None:
                idle.fade()
            if sampling.greedy:
                # For a tree the policy sees its depth as the draft length (an approximation of the tree's cost).
                used.update(depth, len(committed) - 1, drafted_at - round_start, time.perf_counter() - drafted_at)
            else:  # a timing-driven schedule would make a seed's output depend on the machine's load
                used.update(depth, len(committed) - 1, *nominal_costs(used, depth))
            for i, token in enumerate(committed):  # stop right after an end-of-sequence token
                if token in eos_ids:
                    committed = committed[: i + 1]
                    break
            new_tokens.extend(committed)
            if copier is not None:
                copier.extend(committed)
            accept_lengths.append(len(committed))
            draft_lengths.append(num_drafts)
            if streamer is not None:
                streamer.put(torch.tensor(committed))
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([input_ids, torch.tensor([new_tokens], device=device)], dim=1)
        return GenerateOutput(
            sequences, accept_lengths, draft_lengths, t1 - t0, time.perf_counter() - t1, lookup_rounds
        )

    def _check_tree(self, tree: bool, top_k: int | None, max_nodes: int | None) -> tuple[int, int]:
        defaults = self.generation_defaults
        top_k = defaults["tree_top_k"] if top_k is None else top_k
        max_nodes = defaults["tree_max_nodes"] if max_nodes is None else max_nodes
        if not isinstance(tree, bool):
            raise ValueError(f"tree must be True or False; got {tree!r}.")
        for name, value in (("tree_top_k", top_k), ("tree_max_nodes", max_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
        return top_k, max_nodes

    def _check_lookup(
        self, tokens: int | None, min_ngram: int | None, max_ngram: int | None, unsupported: bool
    ) -> tuple[int, int, int]:
        """(lookup_tokens, min n-gram, max n-gram) with defaults filled; lookup_tokens 0 where lookup is off."""
        explicit = tokens is not None and tokens != 0
        defaults = self.generation_defaults
        tokens = defaults["lookup_tokens"] if tokens is None else tokens
        min_ngram = defaults["lookup_min_ngram"] if min_ngram is None else min_ngram
        max_ngram = defaults["lookup_max_ngram"] if max_ngram is None else max_ngram
        for name, value, low in (("lookup_tokens", tokens, 0), ("lookup_min_ngram", min_ngram, 1),
                                 ("lookup_max_ngram", max_ngram, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
        if min_ngram > max_ngram:
            raise ValueError(f"lookup_min_ngram ({min_ngram}) must not exceed lookup_max_ngram ({max_ngram}).")
        if unsupported:
            if explicit:
                raise ValueError(
                    "lookup_tokens drafts for one prompt, greedily; drop it (or pass 0) for batches or temperature > 0."
                )
            tokens = 0
        return tokens, min_ngram, max_ngram

    def _prefill(self, input_ids: torch.Tensor, cache: KangarooCache) -> torch.Tensor:  # [V]
        """All layers over the prompt; the adapter also reads the prompt's exit states. Returns the last logits."""
        backbone, ell = self.backbone, self.exit_layer
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = backbone.embed_tokens(input_ids)  # [1, T, H]
        pe = backbone.rotary_emb(hidden, position_ids=positions[None])
        exit_states = backbone.run_layers(hidden, 0, ell, pe, positions, cache.base)  # [1, T, H]
        cache.deep_pending.append(exit_states)
        logits, _ = deep_logits(backbone, ell, cache, last_only=True)  # [1, V]
        cache.adapter_pending.append(exit_states)  # the adapter reads them with its first draft step
        return logits[-1]


def _resolve_recorded_base(recorded: str, adapter_dir: Path) -> str:
    """A recorded relative path is taken relative to the adapter directory when it exists there."""
    candidate = adapter_dir / recorded
    if not Path(recorded).is_absolute() and candidate.exists():
        return str(candidate)
    return recorded
