"""Generic access to a decoder-only transformers model: embeddings, a slice of its decoder layers, final norm, head.

Kangaroo runs the base model in pieces (layers [0, ℓ) while drafting, layers [ℓ, L) while verifying), so it needs
the parts rather than ``model.forward``. The parts are discovered from the model's own structure; architectures
whose forward does more than "embed -> layers -> norm -> head" (embedding scales, logit soft-capping, ...) are
refused by name rather than decoded wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache, PretrainedConfig, PreTrainedModel

from .invariance import RowInvariance

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ATTENTION = ("sdpa", "eager")


def check_supported(config: PretrainedConfig) -> None:
    """Refuse, by name, architectures whose forward is not plain "embed -> layers -> norm -> head"."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise ValueError(
            f"Unsupported architecture {name} (model_type {model_type!r}). Kangaroo supports model types "
            f"{list(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)."
        )


@dataclass
class Backbone:
    """The pieces of a base causal LM that Kangaroo calls directly."""

    model: PreTrainedModel
    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Linear
    windows: list[int | None]  # sliding-window size of each layer's attention (None = full causal)
    invariance: RowInvariance | None = None  # set: multi-row passes after the prefill get one-row numerics

    @classmethod
    def of(cls, model: PreTrainedModel) -> Backbone:
        config = model.config
        check_supported(config)
        decoder = model.get_decoder()
        lm_head = model.get_output_embeddings()
        missing = [
            name
            for name, part in (
                ("model.embed_tokens", getattr(decoder, "embed_tokens", None)),
                ("model.layers", getattr(decoder, "layers", None)),
                ("model.norm", getattr(decoder, "norm", None)),
                ("model.rotary_emb", getattr(decoder, "rotary_emb", None)),
                ("lm_head", lm_head),
            )
            if part is None
        ]
        if missing:
            raise ValueError(f"{type(model).__name__} lacks the parts Kangaroo needs: {', '.join(missing)}.")
        attn_impl = config._attn_implementation
        if attn_impl not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"Attention implementation {attn_impl!r} cannot take Kangaroo's verification masks; load the base "
                f"model with attn_implementation='sdpa' (or 'eager')."
            )
        windows = []
        for layer in decoder.layers:
            attn = layer.self_attn
            # Qwen2 keeps a per-layer window on the module; Mistral reads it from the config for every layer.
            window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
            windows.append(window)
        return cls(model, decoder.embed_tokens, decoder.layers, decoder.norm, decoder.rotary_emb, lm_head, windows)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def run_layers(
        self,
        hidden: torch.Tensor,  # [B, q, H]
        start: int,
        end: int,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,  # [q] absolute positions of the q new tokens
        cache: Cache,
        tree: tuple[torch.Tensor, torch.Tensor] | None = None,  # allowed [q, kv] and key positions [kv]
    ) -> torch.Tensor:  # [B, q, H]
        """Run decoder layers [start, end) on new tokens, appending their keys/values to ``cache``.

        Without ``tree`` the new tokens continue the cached sequence causally. With it, ``allowed[i, j]`` says
        whether new token i may attend to cache entry j (the cache plus the new tokens), as tree drafting needs.
        """
        q, past = positions.shape[0], cache.get_seq_length(start)
        if self.invariance is not None and q > 1 and past > 0:  # not the prefill: generate runs that in one pass too
            with self.invariance.rows(range(start, end), q):
                return self._run(hidden, start, end, position_embeddings, positions, past, cache, tree, True)
        return self._run(hidden, start, end, position_embeddings, positions, past, cache, tree, False)

    def _run(self, hidden, start, end, position_embeddings, positions, past, cache, tree, rowwise: bool):
        masks: dict[int | None, object] = {}
        for idx in range(start, end):
            window = self.windows[idx]
            if window not in masks:
                if not rowwise and tree is None and not self.eager and allowed_by_kernel(positions, past, window):
                    masks[window] = None  # e.g. a one-row step: no mask to build
                    allowed = None
                elif tree is None:
                    allowed = causal_allowed(positions, past + positions.shape[0], window)
                else:
                    allowed = tree_allowed(positions, *tree, window)
                if allowed is not None:
                    masks[window] = (
                        self.invariance.row_keys(allowed)
                        if rowwise
                        else attention_bias(allowed[None, None], hidden.dtype, self.eager)
                    )
            hidden = self.layers[idx](
                hidden, attention_mask=masks[window], position_embeddings=position_embeddings, cache=cache
            )
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [1, q, H] -> [1, q, V]
        """Final norm and LM head; with ``invariance``, each row of a multi-row pass as a one-row step computes it."""
        if self.invariance is not None and hidden.shape[1] > 1:
            with self.invariance.rows(range(0), hidden.shape[1], head=True):
                return self.lm_head(self.norm(hidden))
        return self.lm_head(self.norm(hidden))

    @property
    def eager(self) -> bool:
        return self.model.config._attn_implementation == "eager"


def allowed_by_kernel(positions: torch.Tensor, past: int, window: int | None) -> bool:
    """Whether sdpa needs no mask: one query over the whole cache, or queries aligned with the keys (is_causal)."""
    q = positions.shape[0]
    return (window is None or past + q <= window) and (q == 1 or past == 0)


def causal_allowed(
    positions: torch.Tensor,  # [q] absolute positions of the queries; keys are positions 0..kv_len-1
    kv_len: int,
    window: int | None,
) -> torch.Tensor:  # [q, kv_len] bool
    """Which keys each query may see: causal, optionally within a sliding window."""
    keys = torch.arange(kv_len, device=positions.device)
    allowed = keys[None, :] <= positions[:, None]  # [q, kv]
    if window is not None:
        allowed &= positions[:, None] - keys[None, :] < window
    return allowed


def causal_mask(
    positions: torch.Tensor,  # [q] absolute positions of the queries; keys are positions 0..kv_len-1
    kv_len: int,
    window: int | None,
    dtype: torch.dtype,
    eager: bool,
) -> torch.Tensor | None:  # [1, 1, q, kv_len] or None when the attention kernel's own causal rule is exact
    """Causal (optionally sliding-window) mask of queries at ``positions`` over a cache holding positions < kv_len."""
    if not eager and allowed_by_kernel(positions, kv_len - positions.shape[0], window):
        return None
    return attention_bias(causal_allowed(positions, kv_len, window)[None, None], dtype, eager)


def tree_allowed(
    positions: torch.Tensor,  # [q] absolute positions of the queries
    allowed: torch.Tensor,  # [q, kv] bool: which cache entries each query may see (ancestors, itself, the prefix)
    key_positions: torch.Tensor,  # [kv] absolute position of each cache entry
    window: int | None,
) -> torch.Tensor:  # [q, kv] bool
    """Tree attention, with a sliding window applied on positions (not on cache indices)."""
    if window is not None:
        allowed = allowed & (positions[:, None] - key_positions[None, :] < window)
    return allowed


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype, eager: bool) -> torch.Tensor:
    """sdpa takes a boolean mask (True = attend); the eager kernel adds a float bias."""
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
