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
        positions: torch.Tensor,  # [q] cache slots of the q new tokens (one sequence: their absolute positions)
        cache: Cache,
        mask: Mask | None = None,  # which keys each query sees; default CAUSAL
    ) -> torch.Tensor:  # [B, q, H]
        """Run decoder layers [start, end) on new tokens, appending their keys/values to ``cache``.

        The one layer runner of every pass: a chain or a copy (``CAUSAL``), a tree level or a verified tree
        (``TreeAttention``), the rows of a padded batch (``PaddedRows``). With ``invariance``, a pass of several rows
        after the prefill gives every row the numerics of its own one-row decode step.
        """
        mask = CAUSAL if mask is None else mask
        past, rows = cache.get_seq_length(start), hidden.shape[0] * positions.shape[0]
        # One row the kernel computes unmasked is the one-row step itself; one row that needs a mask (a padded batch
        # row) is not, and goes row by row too. Not the prefill: generate runs it in one pass as well.
        exact = self.invariance is not None and past > 0
        if exact and (rows > 1 or self._needs_mask(mask, positions, past, start, end)):
            with self.invariance.rows(range(start, end), rows):
                return self._run(hidden, start, end, position_embeddings, positions, past, cache, mask, True)
        return self._run(hidden, start, end, position_embeddings, positions, past, cache, mask, False)

    def _needs_mask(self, mask: Mask, positions: torch.Tensor, past: int, start: int, end: int) -> bool:
        return any(not mask.kernel_exact(positions, past, window) for window in set(self.windows[start:end]))

    def _run(self, hidden, start, end, position_embeddings, positions, past, cache, mask: Mask, rowwise: bool):
        masks: dict[int | None, object] = {}
        for idx in range(start, end):
            window = self.windows[idx]
            if window not in masks:
                if rowwise:
                    masks[window] = self.invariance.row_keys(mask.allowed(positions, past, window))
                else:
                    masks[window] = mask.bias(positions, past, window, hidden.dtype, self.eager)
            hidden = self.layers[idx](
                hidden, attention_mask=masks[window], position_embeddings=position_embeddings, cache=cache
            )
        return hidden

    def prefill(
        self, input_ids: torch.Tensor, exit_layer: int, cache: Cache
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [1, T] -> logits [1, V], exit states [1, T, H]
        """Every layer over a prompt into an empty ``cache``, as ``generate``'s first forward computes it; the logits
        after its last token, and its exit states (the adapter reads them)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.embed_tokens(input_ids)  # [1, T, H]
        pe = self.rotary_emb(hidden, position_ids=positions[None])
        exit_states = self.run_layers(hidden, 0, exit_layer, pe, positions, cache)
        final = self.run_layers(exit_states, exit_layer, self.num_layers, pe, positions, cache)
        return self.logits(final[:, -1:])[:, 0], exit_states

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [1, q, H] -> [1, q, V]
        """Final norm and LM head; with ``invariance``, each row of a multi-row pass as a one-row step computes it."""
        if self.invariance is not None and hidden.shape[1] > 1:
            with self.invariance.rows(range(0), hidden.shape[1], head=True):
                return self.lm_head(self.norm(hidden))
        return self.lm_head(self.norm(hidden))

    @property
    def linears(self) -> list[nn.Linear]:
        """Every linear layer of the decoder layers, and the LM head."""
        return [m for layer in self.layers for m in layer.modules() if isinstance(m, nn.Linear)] + [self.lm_head]

    @property
    def eager(self) -> bool:
        return self.model.config._attn_implementation == "eager"


class Mask:
    """Which cache entries each query of a pass may attend to. ``allowed`` gives the rule as a boolean tensor
    [B, q, kv] (B = 1 unless rows differ); ``bias`` gives it as the attention kernel takes it, or None where the
    kernel's own rule is exact (no mask to build)."""

    def allowed(self, positions: torch.Tensor, past: int, window: int | None) -> torch.Tensor:
        raise NotImplementedError

    def kernel_exact(self, positions: torch.Tensor, past: int, window: int | None) -> bool:
        return False

    def bias(
        self, positions: torch.Tensor, past: int, window: int | None, dtype: torch.dtype, eager: bool
    ) -> torch.Tensor | None:  # [B, 1, q, kv] or None
        if not eager and self.kernel_exact(positions, past, window):
            return None
        return attention_bias(self.allowed(positions, past, window)[:, None], dtype, eager)


class Causal(Mask):
    """A chain: the queries continue the cached sequence (positions = cache slots), optionally in a sliding window."""

    def allowed(self, positions: torch.Tensor, past: int, window: int | None) -> torch.Tensor:  # [1, q, kv]
        keys = torch.arange(past + positions.shape[0], device=positions.device)
        allowed = keys[None, :] <= positions[:, None]  # [q, kv]
        if window is not None:
            allowed &= positions[:, None] - keys[None, :] < window
        return allowed[None]

    def kernel_exact(self, positions: torch.Tensor, past: int, window: int | None) -> bool:
        """sdpa needs no mask for one query over the whole cache, or queries aligned with the keys (is_causal)."""
        q = positions.shape[0]
        return (window is None or past + q <= window) and (q == 1 or past == 0)


CAUSAL = Causal()


@dataclass
class TreeAttention(Mask):
    """Tree nodes: each sees the committed prefix, its ancestors and itself; the window applies to positions.
    One prompt's tree gives [q, kv] / [kv] (its queries' positions are the pass's positions); a batch's trees give
    one per row, [B, q, kv] / [B, kv] with the queries' positions [B, q] (the pass's positions are cache slots)."""

    tree_allowed: torch.Tensor  # [q, kv] or [B, q, kv] bool: which cache entries each query may see
    key_positions: torch.Tensor  # [kv] or [B, kv] absolute position of each cache entry
    query_positions: torch.Tensor | None = None  # [B, q]; None: the pass's positions

    def allowed(self, positions: torch.Tensor, past: int, window: int | None) -> torch.Tensor:  # [B or 1, q, kv]
        allowed = self.tree_allowed if self.tree_allowed.dim() == 3 else self.tree_allowed[None]
        if window is not None:
            queries = positions[None] if self.query_positions is None else self.query_positions  # [B or 1, q]
            keys = self.key_positions if self.key_positions.dim() == 2 else self.key_positions[None]  # [B or 1, kv]
            allowed = allowed & (queries[:, :, None] - keys[:, None, :] < window)
        return allowed


@dataclass
class PaddedRows(Mask):
    """The rows of a left-padded batch: causal over each row's own slots; padding slots are never attended.

    A padding query attends to itself, so that no attention row is empty: an empty row would give NaN states whose
    keys and values, even masked, poison later attention (0 × NaN).
    """

    pad: torch.Tensor  # [B] left padding slots of each row

    def kernel_exact(self, positions: torch.Tensor, past: int, window: int | None) -> bool:
        """A batch of one row without padding is a chain."""
        return self.pad.shape[0] == 1 and int(self.pad[0]) == 0 and CAUSAL.kernel_exact(positions, past, window)

    def allowed(self, positions: torch.Tensor, past: int, window: int | None) -> torch.Tensor:  # [B, q, kv]
        keys = torch.arange(past + positions.shape[0], device=positions.device)  # [kv]
        queries = positions[None, :, None]  # [1, q, 1] slots
        allowed = (keys[None, None, :] >= self.pad[:, None, None]) & (keys[None, None, :] <= queries)
        if window is not None:
            allowed &= queries - keys[None, None, :] < window
        return allowed | (keys[None, None, :] == queries)


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype, eager: bool) -> torch.Tensor:
    """sdpa takes a boolean mask (True = attend); the eager kernel adds a float bias."""
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
