"""Generation settings, validated once (the role of transformers' ``GenerationConfig``).

``KangarooModel.generate`` hands its keyword arguments here; every unset one takes the adapter checkpoint's recorded
generation default, else ``DEFAULT_GENERATION``; every bad value (and a bad prompt) is refused with one message that
names the problem and the fix. The decoding loop then reads a frozen ``GenerationSettings`` and checks nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_int, check_real, is_int
from .sample import SamplingConfig
from .scheduler import PolicyConfig, check_policy

DEFAULT_GENERATION = {
    "threshold": 0.6,
    "max_draft_steps": 6,
    "tree_top_k": 4,
    "tree_max_nodes": 16,
    "lookup_tokens": 12,
    "lookup_min_ngram": 2,
    "lookup_max_ngram": 3,
}
FLAGS = {  # generate's keyword -> the command line's flag, as check(flags=True) names it
    "max_new_tokens": "--max-new-tokens", "threshold": "--threshold (η)", "max_draft_steps": "--steps",
    "tree": "--tree", "tree_top_k": "--tree-top-k", "tree_max_nodes": "--tree-max-nodes",
    "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed",
    "lookup_tokens": "--lookup-tokens", "lookup_min_ngram": "--lookup-min-ngram",
    "lookup_max_ngram": "--lookup-max-ngram", "policy": "--policy",
}  # fmt: skip
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
        cls.check(
            max_new_tokens=max_new_tokens, threshold=threshold, max_draft_steps=steps, policy=policy, tree=tree,
            tree_top_k=tree_top_k, tree_max_nodes=tree_max_nodes, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, lookup_tokens=lookup[0], lookup_min_ngram=lookup[1], lookup_max_ngram=lookup[2], batched=batched,
        )  # fmt: skip
        sampling = SamplingConfig(temperature, top_p, top_k)
        eos_ids = resolve_eos(eos_token_id, limits)
        return cls(
            max_new_tokens, float(threshold), steps, eos_ids, policy, sampling, seed, tree, tree_top_k,
            tree_max_nodes, *lookup, batched,
        )  # fmt: skip

    @staticmethod
    def check(
        *,
        flags: bool = False,
        batched: bool = False,
        max_new_tokens: int = 128,
        threshold: float | None = None,
        max_draft_steps: int | None = None,
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
    ) -> None:
        """Every setting that can be checked without a model (None: the adapter's default, checked once filled in),
        so the CLI refuses a bad value before a model loads for minutes. ``flags`` names values by their
        command-line flags (``--steps``) instead of ``generate``'s keywords."""

        def name(key: str) -> str:
            return FLAGS[key] if flags else key

        check_int(name("max_new_tokens"), max_new_tokens, 1, rule=None if flags else "be a positive integer")
        if threshold is not None:
            check_real(name("threshold"), threshold, 0.0, 1.0, rule="lie in [0, 1]")
        optional = (("max_draft_steps", max_draft_steps, 0), ("tree_top_k", tree_top_k, 1),
                    ("tree_max_nodes", tree_max_nodes, 1), ("lookup_tokens", lookup_tokens, 0),
                    ("lookup_min_ngram", lookup_min_ngram, 1), ("lookup_max_ngram", lookup_max_ngram, 1))  # fmt: skip
        for key, value, low in optional:
            if value is not None:
                check_int(name(key), value, low)
        if None not in (lookup_min_ngram, lookup_max_ngram) and lookup_min_ngram > lookup_max_ngram:
            raise ValueError(
                f"{name('lookup_min_ngram')} ({lookup_min_ngram}) must not exceed {name('lookup_max_ngram')} "
                f"({lookup_max_ngram})."
            )
        if not isinstance(tree, bool):
            raise ValueError(f"{name('tree')} must be True or False; got {tree!r}.")
        check_real(name("temperature"), temperature, 0.0, rule="be a finite number >= 0 (0 = greedy)")
        check_real(name("top_p"), top_p, 0.0, 1.0, low_open=True, rule="lie in (0, 1] (1 = no nucleus cut)")
        check_int(name("top_k"), top_k, 0, rule="be an integer >= 0 (0 = no top-k cut)")
        if seed is not None:
            rule = "be an integer in [0, 2**63 - 1] (a torch seed)" if flags else "be a non-negative integer or None"
            check_int(name("seed"), seed, 0, 2**63 - 1, rule=rule)
        if tree and (batched or temperature > 0):
            drop, hot = (name("tree"), name("temperature")) if flags else ("tree", "temperature")
            raise ValueError(
                f"{'--tree' if flags else 'tree=True'} drafts for one prompt, greedily; drop {drop} for batches or "
                f"{hot} > 0."
            )
        check_policy(policy)

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
    if not isinstance(ids, list | tuple | set | frozenset) or not all(is_int(i) for i in ids):
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
