"""Batch-invariant verification: every row of a multi-row pass gets the numerics of the one-row decode step.

Vanilla ``generate`` computes each new token in a forward over one row. Kangaroo computes the k + 1 rows of a
verification (and the copies of a lookup round, the nodes of a tree level) in one forward. In bf16 the kernels round a
row differently depending on which other rows they compute with it, and a near-tie in the logits then flips the greedy
choice: output no longer token-identical. Two kinds of op do this (``../shared/tools/rowwise_attention.py`` found them
on an AMD EPYC with avx512_bf16; ``tests/test_bf16.py`` checks the result on any CPU):

- **Attention.** A multi-row pass gives the kernel several query rows, a mask and a longer key block than any of its
  rows would see alone; the kernel's small GEMMs round differently for several rows, and its softmax sums the keys
  in vector lanes up to the last full vector and then one by one, so where a row's last key falls decides the
  rounding. Here each query row is computed as a one-row problem over exactly the keys it may see: alone through the
  model's attention function without a mask (the call the one-row step makes), or, on CPU with sdpa, rows whose key
  counts share a vector block (n // W, W the kernel's fp32 vector width: 16 with AVX-512, 8 with AVX2) and a 512-key
  block are one kernel call with the rows as a batch of one-row problems, each masked to its own keys (identical
  arithmetic: masked keys add exact zeros after the last full vector). That grouping relies on the kernel's
  blocking, so W is probed against one call per row on first use (16, then 8: rows crossing a multiple of W but not
  of 2W tell them apart), and batching is dropped if neither matches.
- **Some linear layers.** A GEMM may split its reduction by the number of rows (bf16 oneDNN: the 1536→576 down
  projection of SmolLM2, not its 576-wide layers). Which shapes do is a property of the machine's kernels, so it is
  probed, not assumed: the first pass of M rows through a weight of a new shape compares an M-row product with M
  one-row products on random inputs; shapes that differ run one row at a time in multi-row passes, the rest as one GEMM.

Everything else on a decoder's path (norms, rotary, activations, residual adds) works row by row already. The prefill
is left alone: vanilla ``generate`` computes it as one pass over the prompt too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

ROWWISE = "kangaroo_rowwise"  # the attention implementation name a multi-row pass runs under
# Output elements a probe compares per (shape, rows). A kernel that sums in another order for M rows than for one
# differs from the one-row result only where the fp32 sum sits near a bf16 rounding boundary: measured 2e-4 of the
# elements for SmolLM2's down projection (K = 1536), so 2^17 elements see ~25 differences (a miss: e^-25); shapes
# that sum in the same order never differ (0 of 3e5 elements for its K = 576 layers).
PROBE_ELEMENTS = 1 << 17
MAX_PROBED_ROWS = 64  # passes with more rows run row-dependent shapes one row at a time without probing
KEY_VECTORS = (16, 8)  # rows batched in one attention call share n // W: the widths tried (fp32 lanes: AVX-512, AVX2)
KEY_BLOCK = 512  # ... and (n - 1) // KEY_BLOCK (the CPU flash kernel's key block)


@dataclass
class RowKeys:
    """What each query row of a pass may see, passed to attention in place of a mask: per batch row and query, a
    contiguous run of cache entries (a slice) or any set of them in cache order (an index tensor, e.g. a tree node's
    ancestors); and whether rows may share a kernel call (``batched``, see ``groups``)."""

    keys: list[list[slice | torch.Tensor]]  # [B][q]
    attention: Callable  # the model's own attention function, as the one-row step calls it
    key_vector: int | None = None  # set: runs of rows whose keys share a start, n // key_vector and a key block run as
    # one batch of one-row problems; None: one call per row

    @classmethod
    def of(cls, allowed: torch.Tensor, attention: Callable, key_vector: int | None = None) -> RowKeys:  # [B, q, kv]
        keys: list[list[slice | torch.Tensor]] = []
        for rows in allowed:
            keys.append([])
            for row in rows:
                idx = row.nonzero().flatten()
                first, count = int(idx[0]), idx.numel()
                contiguous = int(idx[-1]) - first + 1 == count
                keys[-1].append(slice(first, first + count) if contiguous else idx)
        return cls(keys, attention, key_vector)

    def groups(self, b: int) -> list[list[int]]:
        """Query rows of batch row b computed by one call: contiguous runs [s, s + n) with equal s, n // key_vector
        and (n - 1) // KEY_BLOCK, in order (the kernel blocks keys from the run's start)."""
        groups: list[list[int]] = []
        last = None
        for i, keys in enumerate(self.keys[b]):
            block = None
            if isinstance(keys, slice) and self.key_vector is not None:
                n = keys.stop - keys.start
                block = (keys.start, n // self.key_vector, (n - 1) // KEY_BLOCK)
            if block is not None and block == last:
                groups[-1].append(i)
            else:
                groups.append([i])
            last = block
        return groups


def batched_one_row_sdpa(
    module: nn.Module,
    query: torch.Tensor,  # [1, Hq, g, d]: g query rows
    key: torch.Tensor,  # [1, Hkv, L, d]: the keys of the row that sees most
    value: torch.Tensor,  # [1, Hkv, L, d]
    lengths: list[int],  # each row's key count (<= L), from the same first key
    scaling: float | None,
) -> torch.Tensor:  # [1, g, Hq, d]
    """g one-row attention problems in one sdpa call: the rows as the batch, each masked to its own keys."""
    rows = len(lengths)
    queries = query[0].transpose(0, 1)[:, :, None]  # [g, Hq, 1, d]
    span = torch.arange(key.shape[2], device=key.device)
    mask = span[None, :] < torch.tensor(lengths, device=key.device)[:, None]  # [g, L]
    gqa = {"enable_gqa": True} if getattr(module, "num_key_value_groups", 1) > 1 else {}
    out = nn.functional.scaled_dot_product_attention(
        queries, key.expand(rows, -1, -1, -1), value.expand(rows, -1, -1, -1), attn_mask=mask[:, None, None],
        scale=scaling, **gqa,
    )  # fmt: skip  [g, Hq, 1, d]
    return out[:, :, 0][None]  # [1, g, Hq, d]


def rowwise_attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, Hq, q, d]
    key: torch.Tensor,  # [B, Hkv, kv, d]
    value: torch.Tensor,  # [B, Hkv, kv, d]
    attention_mask: RowKeys,
    **kwargs,
) -> tuple[torch.Tensor, None]:  # [B, q, Hq, d]
    """Each query row as a one-row problem over its own keys: bit for bit what a one-row forward computes."""
    rows = attention_mask
    batch = []
    for b in range(query.shape[0]):
        qb, kb, vb = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        outs = []
        for group in rows.groups(b):
            if len(group) > 1:
                first, last = rows.keys[b][group[0]], rows.keys[b][group[-1]]
                lengths = [rows.keys[b][i].stop - first.start for i in group]
                k, v = kb[:, :, first.start : last.stop], vb[:, :, first.start : last.stop]
                q = qb[:, :, group[0] : group[-1] + 1]
                outs.append(batched_one_row_sdpa(module, q, k, v, lengths, kwargs.get("scaling")))
                continue
            (i,) = group
            keys = rows.keys[b][i]
            if isinstance(keys, slice):
                k, v = kb[:, :, keys], vb[:, :, keys]
            else:
                k, v = kb.index_select(2, keys), vb.index_select(2, keys)
            out, _ = rows.attention(module, qb[:, :, i : i + 1], k, v, None, **kwargs)  # [1, 1, Hq, d]
            outs.append(out)
        batch.append(torch.cat(outs, dim=1))
    return torch.cat(batch, dim=0), None


AttentionInterface.register(ROWWISE, rowwise_attention)


def _rowwise_linear(linear: nn.Module, x: torch.Tensor, forward: Callable | None = None) -> torch.Tensor:
    """The layer one row at a time, each row as its own [1, 1, K] call (the one-row step's call), through
    ``forward`` (default: ``nn.functional.linear`` with the layer's weights)."""
    rows = x.reshape(-1, 1, 1, x.shape[-1])
    if forward is None:
        out = torch.cat([nn.functional.linear(row, linear.weight, linear.bias) for row in rows], dim=0)
    else:
        out = torch.cat([forward(row) for row in rows], dim=0)
    return out.reshape(*x.shape[:-1], -1)


class _RowwiseForward:
    """A row-dependent layer's forward within ``RowInvariance.rows``: one row per call through its forward before."""

    def __init__(self, module: nn.Module):
        self.module, self.inner = module, module.forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _rowwise_linear(self.module, x, self.inner)


class RowInvariance:
    """Runs a model's multi-row passes with one-row numerics (see the module docstring); one per loaded model.

    ``probe`` results are kept per (weight shape, dtype, device, bias, rows): the kernels depend on nothing else.
    """

    def __init__(self, config: PretrainedConfig, layers: nn.ModuleList, lm_head: nn.Linear):
        self.config = config
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
        self.layer_linears = [[m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in layers]
        self.lm_head = lm_head
        self.attention_module = layers[0].self_attn if len(layers) else None
        self._key_vector: int | None | bool = False  # False: not probed yet; else RowKeys.key_vector (probed)
        self._row_dependent: dict[tuple, bool] = {}
        self._generator = torch.Generator().manual_seed(0)  # probe inputs; the caller's RNG is left alone

    def row_dependent(self, linear: nn.Linear, rows: int) -> bool:
        """Whether some row of an ``rows``-row product through this layer's kernel differs from its one-row product."""
        if rows > MAX_PROBED_ROWS:
            return True
        weight = linear.weight
        key = (tuple(weight.shape), weight.dtype, weight.device, linear.bias is None, rows)
        if key not in self._row_dependent:
            self._row_dependent[key] = self._probe(linear, rows)
        return self._row_dependent[key]

    @torch.inference_mode()
    def _probe(self, linear: nn.Linear, rows: int) -> bool:
        weight = linear.weight
        for _ in range(-(-PROBE_ELEMENTS // (rows * weight.shape[0]))):
            x = torch.randn(1, rows, weight.shape[1], generator=self._generator).to(weight.device, weight.dtype)
            together = nn.functional.linear(x, weight, linear.bias)  # [1, rows, N]
            alone = _rowwise_linear(linear, x)
            if not torch.equal(together, alone):
                return True
        return False

    def row_keys(self, allowed: torch.Tensor) -> RowKeys:  # allowed: [B, q, kv] or [q, kv] bool
        allowed = allowed if allowed.dim() == 3 else allowed[None]
        return RowKeys.of(allowed, self.attention, self.key_vector(allowed.device))

    def key_vector(self, device: torch.device) -> int | None:
        """The key-count width W by which rows may share an attention call (CPU, sdpa, and the probe found every
        row of every group equal to its own call); None: one call per row."""
        if self._key_vector is False:
            usable = device.type == "cpu" and self.attention is sdpa_attention_forward
            self._key_vector = next((w for w in KEY_VECTORS if usable and self._probe_batched_attention(w)), None)
        return self._key_vector

    @torch.inference_mode()
    def _probe_batched_attention(self, width: int) -> bool:
        """Random queries, keys and values of the model's head shape, 9 rows after prefixes whose key counts cross a
        multiple of ``width`` that is not one of 2·width (where a wider grouping would be wrong), and 512-key blocks:
        each batched group against one call per row through the model's attention function."""
        module = self.attention_module
        config = self.config
        head_dim = getattr(module, "head_dim", config.hidden_size // config.num_attention_heads)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        param = module.q_proj.weight
        gen = self._generator
        for past in (width - 4, 3 * width - 4, 33 * width - 4, 250, 503, 509, 1021):
            rows = 9
            kv = past + rows
            shape = (1, kv_heads, kv, head_dim)
            q = torch.randn(1, heads, rows, head_dim, generator=gen).to(param.device, param.dtype)
            k, v = (torch.randn(*shape, generator=gen).to(param.device, param.dtype) for _ in range(2))
            allowed = (torch.arange(kv)[None, :] <= torch.arange(past, kv)[:, None])[None]
            kwargs = {"dropout": 0.0, "scaling": module.scaling}
            together, _ = rowwise_attention(module, q, k, v, RowKeys.of(allowed, self.attention, width), **kwargs)
            alone, _ = rowwise_attention(module, q, k, v, RowKeys.of(allowed, self.attention), **kwargs)
            if not torch.equal(together, alone):
                return False
        return True

    @contextmanager
    def rows(self, layers: range, rows: int, head: bool = False) -> Iterator[None]:
        """Within: attention under ``ROWWISE`` (the layers must get ``RowKeys`` as their mask), and the linears of
        ``layers`` (and the LM head with ``head``) that are row-dependent at ``rows`` rows patched to run row by row."""
        linears = [m for i in layers for m in self.layer_linears[i]] + ([self.lm_head] if head else [])
        patched = [m for m in linears if self.row_dependent(m, rows)]
        saved = self.config._attn_implementation_internal
        self.config._attn_implementation_internal = ROWWISE  # the attribute behind the validating setter
        forwards = [(m, m.__dict__.get("forward")) for m in patched]  # e.g. packed.py's, kept underneath
        for m in patched:
            m.forward = _RowwiseForward(m)
        try:
            yield
        finally:
            self.config._attn_implementation_internal = saved
            for m, forward in forwards:
                if forward is None:
                    del m.forward
                else:
                    m.forward = forward
