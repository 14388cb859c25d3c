"""KangarooModel: a base causal LM plus an adapter at exit layer ℓ, decoding losslessly by self-speculation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .adapter import INITS, KangarooAdapter, check_exit_layer, read_adapter_config
from .arch import Backbone
from .base import base_config, kangaroo_home, load_base
from .batch import BatchRows
from .cache import KangarooCache
from .draft import DraftHead, adapter_logits, shallow_step
from .dtype import AUTO, resolve_dtype
from .invariance import RowInvariance
from .outputs import GenerateOutput
from .packed import PackedWeights, packing_available
from .rounds import PromptRows, decode
from .sample import make_generator
from .settings import (
    DEFAULT_GENERATION,
    FROM_GENERATION_CONFIG,
    GenerationOptions,
    GenerationSettings,
    ModelLimits,
    prompt_padding,
    resolve_eos,
    with_options_signature,
)
from .verify import deep_logits

__all__ = ["DEFAULT_GENERATION", "FROM_GENERATION_CONFIG", "GenerateOutput", "KangarooModel"]


class KangarooModel:
    """Double early exiting: draft with layers [0, ℓ) + adapter, verify with layers [ℓ, L) in one pass."""

    def __init__(
        self,
        base: PreTrainedModel,
        adapter: KangarooAdapter,
        exact_verify: bool | None = None,
        pack_weights: bool | None = None,
    ):
        """``exact_verify`` (default: on in bf16 and fp16, off in fp32) gives every row of a multi-row pass the
        numerics of the one-row decode step (``invariance.py``): greedy output token-identical to ``generate`` in
        that dtype, at the cost of per-row attention and of running row-dependent GEMM shapes one row at a time.
        In fp32 the rounding differences between those paths are ~1e-7 relative and have not flipped a token in the
        lossless suites, while every fp32 GEMM shape is row-dependent on MKL, so the price would be most of the gain.
        """
        self.base = base
        self.dtype_reason = "the loaded model's own"  # how the base's dtype was chosen (from_pretrained sets it)
        self.adapter = adapter.eval()
        self.backbone = Backbone.of(base)
        if exact_verify is None:
            exact_verify = base.dtype in (torch.bfloat16, torch.float16)
        if exact_verify:
            self.backbone.invariance = RowInvariance(base.config, self.backbone.layers, self.backbone.lm_head)
        check_exit_layer(adapter.config.exit_layer, self.backbone.num_layers)
        if pack_weights is None:
            pack_weights = packing_available(self.backbone.lm_head.weight)
        self.packing = PackedWeights() if pack_weights else None
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
            linear = self.packing.linear if self.packing is not None else torch.nn.functional.linear
            self._draft_head = (key, DraftHead.of(self.backbone.lm_head, self.adapter, linear))
        return self._draft_head[1]

    @contextmanager
    def packed(self) -> Iterator[None]:
        """Within: the base's linears run on packed weights (``pack_weights``; bit-equal, faster); outside, the base
        model is as loaded. ``generate`` decodes inside it; wrap other timed uses of the round pieces below in it."""
        if self.packing is None:
            yield
            return
        with self.packing.patched(self.backbone.linears):
            yield

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike | PreTrainedModel | None,
        adapter: str | os.PathLike | None = None,
        exit_layer: int | None = None,
        dtype: torch.dtype | str | None = AUTO,
        device: torch.device | str | None = None,
        init: str = "random",
        exact_verify: bool | None = None,
        pack_weights: bool | None = None,
    ) -> KangarooModel:
        """Load a base model and an adapter checkpoint (or make a fresh adapter when ``adapter`` is None).

        ``base_model`` is an HF directory, a hub id, an alias (``smollm2-135m-instruct``) or a loaded model; None
        takes the base recorded in the adapter's config. ``exit_layer`` is required for a fresh adapter and, with a
        checkpoint, must agree with the checkpoint's. ``dtype`` "auto" (default) loads bf16 where the machine computes
        it natively and faster, else fp32 (``dtype.py``; a loaded model keeps its own); ``dtype_reason`` says which
        and why. ``exact_verify``, ``pack_weights``: see ``KangarooModel``.
        """
        options = {"exact_verify": exact_verify, "pack_weights": pack_weights}
        km, reason = cls._load(base_model, adapter, exit_layer, dtype, device, init, options)
        km.dtype_reason = reason
        return km

    @classmethod
    def _load(
        cls, base_model, adapter, exit_layer, dtype, device, init, options: dict[str, Any]
    ) -> tuple[KangarooModel, str]:  # the model, and why its dtype
        if adapter is None:
            if base_model is None:
                raise ValueError("Name a base model (base_model=...) or an adapter checkpoint (adapter=DIR).")
            if exit_layer is None:
                raise ValueError("A fresh adapter (adapter=None) needs exit_layer=ℓ, the number of shallow layers.")
            if init not in INITS:
                raise ValueError(f"Unknown adapter init {init!r}; choose one of {list(INITS)}.")
            base, reason = _load_base(base_model, dtype, device)
            check_exit_layer(exit_layer, base.config.num_hidden_layers)
            name = None if isinstance(base_model, PreTrainedModel) else str(base_model)
            return cls(base, KangarooAdapter.for_base(base, exit_layer, init=init, base_name=name), **options), reason
        config = read_adapter_config(adapter)
        if exit_layer is not None and exit_layer != config.exit_layer:
            raise ValueError(
                f"exit_layer={exit_layer} disagrees with the adapter checkpoint {adapter}, trained at exit layer "
                f"{config.exit_layer}; drop exit_layer or pass the matching adapter."
            )
        if base_model is None:
            if not config.base_model:
                raise ValueError(f"Adapter {adapter} records no base model; pass base_model=... explicitly.")
            base_model = resolve_recorded_base(config.base_model, Path(adapter))
        base, reason = _load_base(base_model, dtype, device)
        return cls(base, KangarooAdapter.from_pretrained(adapter, base), **options), reason

    @property
    def limits(self) -> ModelLimits:
        """What generation settings and prompts are checked against."""
        config = self.base.config
        return ModelLimits(config.vocab_size, self.backbone.max_positions, self.base.generation_config.eos_token_id)

    @with_options_signature
    def generation_settings(self, **options: Any) -> GenerationSettings:
        """``generate``'s options (``GenerationOptions``), defaults filled from the adapter checkpoint, validated: what
        a run would decode with (one prompt or a batch: the same settings)."""
        options = GenerationOptions.of(options, "KangarooModel.generation_settings()")
        return GenerationSettings.resolve(self.limits, self.adapter.config.generation, options)

    def resolve_eos(self, eos_token_id: int | list[int] | None | str) -> frozenset[int]:
        """As transformers' generate: left out, the generation config names EOS; None or [] disables it."""
        return resolve_eos(eos_token_id, self.limits)

    @with_options_signature
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.LongTensor,
        *,
        streamer=None,
        attention_mask: torch.Tensor | None = None,
        **options: Any,
    ) -> GenerateOutput:
        """Decode losslessly: greedy output token-identical to ``base.generate(input_ids, do_sample=False, ...)``.

        Every keyword but ``streamer`` and ``attention_mask`` is an option of ``GenerationOptions`` (``settings.py``),
        where its name and default are written; ``help()`` lists them all, and an unknown keyword is a TypeError
        that names it and the valid ones.

        ``threshold`` (η) and ``max_draft_steps`` (γ) default to the adapter checkpoint's recorded generation
        defaults, else 0.6 and 6; ``max_draft_steps=0`` turns adapter drafting off (with ``lookup_tokens=0`` too, every
        round is a plain step of the full model: the loop without drafting, a baseline for what drafting adds).
        ``eos_token_id`` behaves as in transformers' ``generate``: left out, the base's generation config names the
        end-of-sequence token(s); an explicit None (or []) disables stopping early. ``streamer``
        is any object with ``put(tensor)`` / ``end()`` (e.g. transformers' TextStreamer); it first receives the
        prompt, then each round's committed tokens. ``policy`` "adaptive" (default) lets the scheduler
        (``scheduler.py``) pick each round's drafter and how many tokens (up to γ, possibly none: a plain step) from
        the observed acceptance and costs; "fixed" always drafts up to γ (copies when lookup has any); a
        ``PolicyConfig`` selects the adaptive scheduler with those settings.
        ``tree=True`` drafts a dynamic tree instead of a chain (``tree.py``): up to ``tree_top_k`` children per level
        (default 4), at most ``tree_max_nodes`` drafts (default 16), depth up to γ; η stops a branch's growth.
        ``temperature`` > 0 samples instead (exact speculative sampling, ``accept.py``), after ``top_k`` / ``top_p``
        processing, from a generator seeded with ``seed``. ``input_ids`` [B, T] with B > 1, or any
        ``attention_mask`` (left padding), decodes a batch (``batch.py``): ``sequences`` is then [B, T + n_max] and
        ``accept_lengths`` / ``draft_lengths`` / ``lookup_rounds`` are lists per row.
        ``lookup_tokens`` (default: adapter's, else 12; 0 disables) lets a round propose up to that many tokens by
        copying what followed the latest earlier occurrence of the last ``lookup_max_ngram`` .. ``lookup_min_ngram``
        tokens (default 3 .. 2) in prompt + output (``lookup.py``), when the scheduler expects that to pay; greedy or
        sampled, one prompt or a batch (per row).
        """
        shape = getattr(input_ids, "shape", ())
        batched = attention_mask is not None or (len(shape) == 2 and shape[0] > 1)
        options = GenerationOptions.of(options, "KangarooModel.generate()", ("input_ids", "streamer", "attention_mask"))
        settings = GenerationSettings.resolve(self.limits, self.adapter.config.generation, options)
        if batched:
            if streamer is not None:
                raise ValueError("A streamer takes one prompt: pass input_ids of shape [1, T] without attention_mask.")
            pad = prompt_padding(input_ids, attention_mask)
            for row in range(input_ids.shape[0]):
                settings.check_prompt(input_ids[row : row + 1, int(pad[row]) :], self.limits)
        else:
            settings.check_prompt(input_ids, self.limits)
        device = self.backbone.embed_tokens.weight.device
        generator = None if settings.sampling.greedy else make_generator(settings.seed, device)
        with self.packed():
            if batched:
                rows = BatchRows(self, input_ids, pad, settings, generator)
            else:
                rows = PromptRows(self, input_ids, settings, generator)
            return decode(rows, settings, generator, batched, streamer)

    def prefill(self, input_ids: torch.Tensor, cache: KangarooCache) -> torch.Tensor:  # [1, T] -> [V]
        """All layers over the prompt into ``cache``; the adapter will read the prompt's exit states with its first
        draft step. Returns the logits after the prompt's last token."""
        logits, exit_states = self.backbone.prefill(input_ids, self.exit_layer, cache.base)  # [1, V], [1, T, H]
        cache.unread = exit_states
        return logits[0]

    # ---- the pieces of a round, for measuring them (bench's cost profile) -------------------------------------------

    def new_cache(self) -> KangarooCache:
        """An empty cache for ``prefill`` and the round pieces below."""
        return KangarooCache(self.exit_layer, self.backbone.num_layers)

    def shallow_pass(self, tokens: torch.Tensor, cache: KangarooCache) -> torch.Tensor:  # [1, k] -> [1, k, H]
        """Layers [0, ℓ) over new tokens: their exit states, which also wait in ``cache`` for ``deep_pass``."""
        return shallow_step(self.backbone, self.exit_layer, cache, tokens)

    def draft_logits(self, exit_states: torch.Tensor, cache: KangarooCache) -> torch.Tensor:  # [1, q, H] -> [V_draft]
        """A draft step's adapter and draft head over the newest exit state (after ``shallow_pass``)."""
        return adapter_logits(self.backbone, self.adapter, self.draft_head, cache, exit_states)

    def deep_pass(self, cache: KangarooCache) -> torch.Tensor:  # [m, V]
        """Verification's pass: layers [ℓ, L) and the LM head over every pending token."""
        return deep_logits(self.backbone, self.exit_layer, cache)[0]


def resolve_recorded_base(recorded: str, adapter_dir: Path) -> str:
    """A recorded relative path is taken relative to the adapter directory when it exists there."""
    candidate = adapter_dir / recorded
    if not Path(recorded).is_absolute() and candidate.exists():
        return str(candidate)
    return recorded


def _load_base(base_model, dtype, device) -> tuple[PreTrainedModel, str]:
    """The base in the dtype asked for, and why that dtype: "auto" times this model's own linear shapes (read from
    its config before any weights load); a loaded model under "auto" keeps its own."""
    if isinstance(base_model, PreTrainedModel) and dtype == AUTO:
        return load_base(base_model, None, device), "the loaded model's own"
    dtype, reason = resolve_dtype(dtype, device, kangaroo_home(), partial(base_config, base_model))
    return load_base(base_model, dtype, device), reason
