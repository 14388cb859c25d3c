"""Generation options and settings, validated once (the role of transformers' ``GenerationConfig``).

``GenerationOptions`` is what a caller may set for a ``generate`` call: each keyword's name, default and command-line
flag is written there and nowhere else (``generate``, ``generation_settings``, the CLI and bench read it). Every unset
one takes the adapter checkpoint's recorded generation default, else ``DEFAULT_GENERATION``; every bad value (and a
bad prompt) is refused with one message that names the problem and the fix. The decoding loop then reads a frozen
``GenerationSettings`` and checks nothing.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

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
FROM_GENERATION_CONFIG = "from_generation_config"  # eos_token_id default: as base.generate without the argument


def option(default: Any, flag: str | None = None) -> Any:
    """A ``generate`` keyword's default and the command-line flag that sets it (how ``check(flags=True)`` names it;
    None: no flag)."""
    return field(default=default, metadata={"flag": flag})


@dataclass(frozen=True)
class GenerationOptions:
    """The keyword arguments of ``generate``, as the caller gave them. None: the adapter checkpoint's recorded
    default, else DEFAULT_GENERATION's (``filled``). A new option is one field here, its check in ``check``, and a
    line in ``generate``'s docstring (and a field of ``GenerationSettings`` of the same name if decoding reads it)."""

    max_new_tokens: int = option(128, "--max-new-tokens")
    threshold: float | None = option(None, "--threshold (η)")  # η: a draft step below it ends the round's drafting
    max_draft_steps: int | None = option(None, "--steps")  # γ: most adapter drafts per round (0: off)
    eos_token_id: int | list[int] | None | str = option(FROM_GENERATION_CONFIG)
    policy: str | PolicyConfig = option("adaptive", "--policy")
    tree: bool = option(False, "--tree")
    tree_top_k: int | None = option(None, "--tree-top-k")
    tree_max_nodes: int | None = option(None, "--tree-max-nodes")
    temperature: float = option(0.0, "--temperature")
    top_p: float = option(1.0, "--top-p")
    top_k: int = option(0, "--top-k")
    seed: int | None = option(None, "--seed")
    lookup_tokens: int | None = option(None, "--lookup-tokens")  # 0: lookup drafting off
    lookup_min_ngram: int | None = option(None, "--lookup-min-ngram")
    lookup_max_ngram: int | None = option(None, "--lookup-max-ngram")

    @classmethod
    def of(cls, options: Mapping[str, Any], caller: str, others: tuple[str, ...] = ()) -> GenerationOptions:
        """``options``, the ``**options`` of ``caller``: a name that is not an option is refused as Python refuses
        an unknown keyword (TypeError), with the closest valid name and all of them (``others``: the caller's own)."""
        valid = [*others, *(f.name for f in fields(cls))]
        for key in options:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(
                    f"{caller} got an unexpected keyword argument {key!r}{hint}; its keyword arguments are "
                    f"{', '.join(valid)}."
                )
        return cls(**options)

    def filled(self, defaults: Mapping[str, Any]) -> GenerationOptions:
        """Every None replaced by ``defaults`` (the adapter checkpoint's) over DEFAULT_GENERATION."""
        defaults = {**DEFAULT_GENERATION, **defaults}
        return replace(self, **{key: defaults[key] for key in DEFAULT_GENERATION if getattr(self, key) is None})

    def check(self, *, flags: bool = False, filled: bool = False) -> None:
        """Every option that can be checked without a model (None: the adapter's default, checked once filled in),
        so the CLI refuses a bad value before a model loads for minutes, and an option that would do nothing (a
        sampling cut for greedy decoding, a tree shape without trees; not checkable once ``filled`` with defaults).
        ``flags`` names values by their command-line flags (``--steps``) instead of ``generate``'s keywords."""
        flag = {f.name: f.metadata["flag"] for f in fields(self)}

        def name(key: str) -> str:
            return flag[key] if flags else key

        check_int(name("max_new_tokens"), self.max_new_tokens, 1, rule=None if flags else "be a positive integer")
        if self.threshold is not None:
            check_real(name("threshold"), self.threshold, 0.0, 1.0, rule="lie in [0, 1]")
        for key, low in (("max_draft_steps", 0), ("tree_top_k", 1), ("tree_max_nodes", 1), ("lookup_tokens", 0),
                         ("lookup_min_ngram", 1), ("lookup_max_ngram", 1)):  # fmt: skip
            if getattr(self, key) is not None:
                check_int(name(key), getattr(self, key), low)
        low_n, high_n = self.lookup_min_ngram, self.lookup_max_ngram
        if None not in (low_n, high_n) and low_n > high_n:
            raise ValueError(
                f"{name('lookup_min_ngram')} ({low_n}) must not exceed {name('lookup_max_ngram')} ({high_n})."
            )
        if not isinstance(self.tree, bool):
            raise ValueError(f"{name('tree')} must be True or False; got {self.tree!r}.")
        check_real(name("temperature"), self.temperature, 0.0, rule="be a finite number >= 0 (0 = greedy)")
        check_real(name("top_p"), self.top_p, 0.0, 1.0, low_open=True, rule="lie in (0, 1] (1 = no nucleus cut)")
        check_int(name("top_k"), self.top_k, 0, rule="be an integer >= 0 (0 = no top-k cut)")
        if self.seed is not None:
            rule = "be an integer in [0, 2**63 - 1] (a torch seed)" if flags else "be a non-negative integer or None"
            check_int(name("seed"), self.seed, 0, 2**63 - 1, rule=rule)
        if self.temperature == 0:
            for key, off in (("top_p", 1.0), ("top_k", 0)):
                if getattr(self, key) != off:
                    raise ValueError(
                        f"{name(key)} cuts the sampling distribution, and {name('temperature')} 0 decodes greedily; "
                        f"set {name('temperature')} > 0 to sample, or drop {name(key)}."
                    )
        if not (filled or self.tree):
            for key in ("tree_top_k", "tree_max_nodes"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{name(key)} shapes draft trees, which are off; add {'--tree' if flags else 'tree=True'} or "
                        f"drop {name(key)}."
                    )
        if self.tree and self.temperature > 0:
            drop, hot = (name("tree"), name("temperature")) if flags else ("tree", "temperature")
            raise ValueError(f"{'--tree' if flags else 'tree=True'} drafts greedily; drop {drop} for {hot} > 0.")
        check_policy(self.policy)


def with_options_signature(method: Callable) -> Callable:
    """``method``'s signature with GenerationOptions' fields in place of its ``**options``, so that ``help()`` and
    editors that read ``inspect.signature`` list every option with its default, written only in GenerationOptions."""
    signature = inspect.signature(method)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    keyword = inspect.Parameter.KEYWORD_ONLY
    listed = [
        inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type) for f in fields(GenerationOptions)
    ]
    method.__signature__ = signature.replace(parameters=[*own, *listed])
    return method


@dataclass(frozen=True)
class ModelLimits:
    """What the settings are checked against: the base model's vocabulary, positions and default EOS."""

    vocab_size: int
    max_positions: int | None
    default_eos: int | list[int] | torch.Tensor | None


@dataclass(frozen=True)
class GenerationSettings:
    """The options resolved for decoding: defaults filled, EOS as a set of ids, sampling as one config; a field
    with an option's name holds that option's value."""

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

    @classmethod
    def resolve(
        cls, limits: ModelLimits, defaults: Mapping[str, Any], options: GenerationOptions
    ) -> GenerationSettings:
        """Fill unset options from ``defaults`` (the adapter's, over DEFAULT_GENERATION) and validate everything."""
        options.check()
        options = options.filled(defaults)
        options.check(filled=True)  # the adapter's defaults too
        sampling = SamplingConfig(options.temperature, options.top_p, options.top_k)
        eos_ids = resolve_eos(options.eos_token_id, limits)
        same = {f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)}
        return cls(**{**same, "threshold": float(options.threshold)}, eos_ids=eos_ids, sampling=sampling)

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
        if wanted >= limit:  # no shorter prompt can make room: only max_new_tokens can
            raise ValueError(
                f"max_new_tokens ({wanted}) alone reaches the model's {limit} positions; with this {length}-token "
                f"prompt lower it to at most {limit - length}."
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
