"""Generation settings, validated once (the role of transformers' ``GenerationConfig``).

``KangarooModel.generate`` hands its keyword arguments here; every unset one takes the adapter checkpoint's recorded
generation default, else ``DEFAULT_GENERATION``; every bad value (and a bad prompt) is refused with one message that
names the problem and the fix. The decoding loop then reads a frozen ``GenerationSettings`` and checks nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sample import SamplingConfig
from .scheduler import POLICIES, PolicyConfig

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


@dataclass(frozen=True)
class ModelLimits:
    """What the settings are checked against: the base model's vocabulary, positions and default EOS."""

    vocab_size: int
    max_positions: int | None
    default_eos: int | list[int] | torch.Tensor | None


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    threshold: float  # η: a draft step below this top probability ends the round's drafting
    max_draft_steps: int  # γ: most adapter drafts per round (0: adapter drafting off)
    eos_ids: frozenset[int]
    policy: str | PolicyConfig
    sampling: SamplingConfig
    seed: int | None
    tree: bool
    tree_top_k: int
    tree_max_nodes: int
    lookup_tokens: int  # 0: lookup drafting off
    lookup_min_ngram: int
    lookup_max_ngram: int
    batched: bool

    @classmethod
    def resolve(
        cls,
        limits: ModelLimits,
        defaults: dict,
        *,
        batched: bool = False,
        max_new_tokens: int = 128,
        threshold: float | None = None,
        max_draft_steps: int | None = None,
        eos_token_id: int | list[int] | None | str = FROM_GENERATION_CONFIG,
        policy: str | PolicyConfig = "adaptive",
        tree: bool = False,
        tree_top_k: int | None = None,
        tree_max_nodes: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        lookup_tokens: int | None = None,
        lookup_min_ngram: int | None = None,
        lookup_max_ngram: int | None = None,
    ) -> GenerationSettings:
        """Fill unset values from ``defaults`` (the adapter's, over DEFAULT_GENERATION) and validate everything."""
        defaults = {**DEFAULT_GENERATION, **defaults}

        def pick(name: str, value):
            return defaults[name] if value is None else value

        threshold, steps = pick("threshold", threshold), pick("max_draft_steps", max_draft_steps)
        tree_top_k, tree_max_nodes = pick("tree_top_k", tree_top_k), pick("tree_max_nodes", tree_max_nodes)
        lookup = [pick(name, value) for name, value in (
            ("lookup_tokens", lookup_tokens), ("lookup_min_ngram", lookup_min_ngram),
            ("lookup_max_ngram", lookup_max_ngram))]  # fmt: skip
        sampling = SamplingConfig(temperature, top_p, top_k)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1]; got {threshold!r}.")
        _check_int("max_draft_steps", steps, 0)
        if not isinstance(tree, bool):
            raise ValueError(f"tree must be True or False; got {tree!r}.")
        _check_int("tree_top_k", tree_top_k, 1)
        _check_int("tree_max_nodes", tree_max_nodes, 1)
        if tree and (batched or not sampling.greedy):
            raise ValueError("tree=True drafts for one prompt, greedily; drop tree for batches or temperature > 0.")
        names = ("lookup_tokens", "lookup_min_ngram", "lookup_max_ngram")
        for name, value, low in zip(names, lookup, (0, 1, 1), strict=True):
            _check_int(name, value, low)
        if lookup[1] > lookup[2]:
            raise ValueError(f"lookup_min_ngram ({lookup[1]}) must not exceed lookup_max_ngram ({lookup[2]}).")
        if not isinstance(policy, PolicyConfig) and policy not in POLICIES:
            raise ValueError(f"Unknown policy {policy!r}; choose one of {list(POLICIES)} or pass a PolicyConfig.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None; got {seed!r}.")
        eos_ids = resolve_eos(eos_token_id, limits)
        return cls(
            max_new_tokens, float(threshold), steps, eos_ids, policy, sampling, seed, tree, tree_top_k,
            tree_max_nodes, *lookup, batched,
        )  # fmt: skip

    def check_prompt(self, input_ids: torch.Tensor, limits: ModelLimits) -> None:
        """One prompt ([1, T], no padding): integer ids inside the vocabulary, and room for max_new_tokens."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError("input_ids must be an integer torch tensor of shape [1, T].")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids must have shape [1, T] (one prompt); got {list(input_ids.shape)}. Decode prompts one at a "
                f"time, or unsqueeze a 1-D prompt with input_ids[None]."
            )
        length = input_ids.shape[1]
        if length == 0:
            raise ValueError("The prompt is empty (input_ids has 0 tokens); give at least one token.")
        vocab = limits.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids contain ids outside the vocabulary [0, {vocab}); check the tokenizer.")
        limit, wanted = limits.max_positions, self.max_new_tokens
        if limit is None or length + wanted <= limit:
            return
        if length >= limit:
            raise ValueError(
                f"The prompt ({length} tokens) leaves no room for new tokens in the model's {limit} positions; "
                f"shorten the prompt by at least {length - limit + 1} tokens ({length + wanted - limit} to get all "
                f"max_new_tokens={wanted})."
            )
        raise ValueError(
            f"Prompt ({length} tokens) + max_new_tokens ({wanted}) = {length + wanted} exceeds the model's {limit} "
            f"positions; shorten the prompt by {length + wanted - limit} tokens or lower max_new_tokens to "
            f"{limit - length}."
        )


def resolve_eos(eos_token_id: int | list[int] | None | str, limits: ModelLimits) -> frozenset[int]:
    """As transformers' generate: left out, the generation config names EOS; None or [] disables it."""
    if isinstance(eos_token_id, str):
        if eos_token_id != FROM_GENERATION_CONFIG:
            raise ValueError(f"eos_token_id must be an int, a list of ints or None; got {eos_token_id!r}.")
        eos_token_id = limits.default_eos
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if not isinstance(ids, list | tuple | set | frozenset) or any(
        isinstance(i, bool) or not isinstance(i, int) for i in ids
    ):
        raise ValueError(f"eos_token_id must be an int, a list of ints or None; got {eos_token_id!r}.")
    outside = sorted(i for i in ids if not 0 <= i < limits.vocab_size)
    if outside:
        raise ValueError(
            f"eos_token_id {outside} lies outside the vocabulary [0, {limits.vocab_size}): decoding could never stop "
            f"on it; pass the tokenizer's eos_token_id (or None to disable stopping early)."
        )
    return frozenset(ids)


def prompt_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:  # [B]
    """Left padding of each row of a batch; refuses right padding, holes, empty rows and shape mismatches."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError("input_ids must be an integer torch tensor of shape [B, T].")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, T] with B, T >= 1; got {list(input_ids.shape)}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"attention_mask must be a tensor of input_ids' shape {list(input_ids.shape)}; got {got}. Pass the mask "
            f"the tokenizer returned with the ids."
        )
    mask = attention_mask.to(device=input_ids.device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token).")
    mask = mask.long()
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError(
            "attention_mask has padding after a token (right padding or holes); Kangaroo batches need left padding: "
            "set tokenizer.padding_side = 'left' before tokenizing."
        )
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).nonzero()[:, 0].tolist()
        raise ValueError(f"Rows {empty} of attention_mask are all padding; every prompt needs at least one token.")
    return input_ids.shape[1] - lengths


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
