"""Batch-invariant verification: every row of a multi-row pass gets the numerics of the one-row decode step.

Vanilla ``generate`` computes each new token in a forward over one row. Kangaroo computes the k + 1 rows of a
verification (and the copies of a lookup round, the nodes of a tree level) in one forward. In bf16 the kernels round a
row differently depending on which other rows they compute with it, and a near-tie in the logits then flips the greedy
choice: output no longer token-identical. Two kinds of op do this (``../shared/tools/rowwise_attention.py`` found them
on an AMD EPYC with avx512_bf16; ``tests/test_bf16.py`` checks the result on any CPU):

- **Attention.** A multi-row pass gives the kernel several query rows, a mask and a longer key block than any of its
  rows would see alone; the kernel's small GEMMs and its softmax round differently then. Here each query row is
  computed as a one-row problem over exactly the keys it may see, alone through the model's attention function without
  a mask: the call the one-row step makes (on CUDA in its memory layout too: ``one_row_layout``). (Several rows as
  one masked batch of one-row problems, grouped by where their keys end, matched one call per row on random inputs
  but not on SmolLM2's activations: 7 rows of 24 differed after 178 cached tokens. So every row is its own call.)
- **Some linear layers.** A GEMM may split its reduction by the number of rows (bf16 oneDNN: the 1536→576 down
  projection of SmolLM2, not its 576-wide layers). Which shapes do is a property of the machine's kernels, so it is
  probed, not assumed: the first pass of M rows through a weight of a new shape compares an M-row product with M
  one-row products on random inputs; shapes that agree run as one GEMM. A shape that differs runs one row at a time,
  or, where that is probed bit-equal too and timed faster, as one GEMM over its input in column-major layout (oneDNN's
  bf16 kernel on an AMD EPYC then sums each row as it sums a lone row: 8 rows of the down projection in ~165 µs
  against ~330 µs one at a time).

Everything else on a decoder's path (norms, rotary, activations, residual adds) works row by row already. The prefill
is left alone: vanilla ``generate`` computes it as one pass over the prompt too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .dtype import call_seconds

ROWWISE = "kangaroo_rowwise"  # the attention implementation name a multi-row pass runs under
# Output elements a probe compares per (shape, rows). A kernel that sums in another order for M rows than for one
# differs from the one-row result only where the fp32 sum sits near a bf16 rounding boundary: measured 2e-4 of the
# elements for SmolLM2's down projection (K = 1536), so 2^17 elements see ~25 differences (a miss: e^-25); shapes
# that sum in the same order never differ (0 of 3e5 elements for its K = 576 layers).
PROBE_ELEMENTS = 1 << 17
MAX_PROBED_ROWS = 64  # passes with more rows run row-dependent shapes one row at a time without probing
TIMED_CALLS = 5  # calls of each way to compute a row-dependent shape, timed when both are exact; the faster is kept


@dataclass
class RowKeys:
    """What each query row of a pass may see, passed to attention in place of a mask: per batch row and query, a
    contiguous run of cache entries (a slice) or any set of them in cache order (an index tensor, e.g. a tree node's
    ancestors)."""

    keys: list[list[slice | torch.Tensor]]  # [B][q]
    attention: Callable  # the model's own attention function, as the one-row step calls it

    @classmethod
    def of(cls, allowed: torch.Tensor, attention: Callable) -> RowKeys:  # allowed: [B, q, kv]
        keys: list[list[slice | torch.Tensor]] = []
        for rows in allowed:
            keys.append([])
            for row in rows:
                idx = row.nonzero().flatten()
                first, count = int(idx[0]), idx.numel()
                contiguous = int(idx[-1]) - first + 1 == count
                keys[-1].append(slice(first, first + count) if contiguous else idx)
        return cls(keys, attention)


def one_row_layout(
    query: torch.Tensor,  # [1, Hq, 1, d]
    key: torch.Tensor,  # [1, Hkv, kv, d]
    value: torch.Tensor,  # [1, Hkv, kv, d]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same values with the strides transformers' one-row decode step passes: all three contiguous (its rotary
    embedding returns a fresh query, its cache a fresh concatenation), where a row of a multi-row pass has a query
    strided over the pass's rows and keys sliced from a longer cache. On CUDA, cuDNN's attention (torch's first choice
    on Hopper with CUDA 13) builds its execution plan from the strides, so another layout may mean another plan."""
    return query.clone(memory_format=torch.contiguous_format), key.contiguous(), value.contiguous()


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
    outs = []  # B · q one-row outputs [1, 1, Hq, d], batch row by batch row
    for b in range(query.shape[0]):
        qb, kb, vb = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        for i, keys in enumerate(rows.keys[b]):
            if isinstance(keys, slice):
                k, v = kb[:, :, keys], vb[:, :, keys]
            else:
                k, v = kb.index_select(2, keys), vb.index_select(2, keys)
            q = qb[:, :, i : i + 1]
            if q.is_cuda:  # CPU kernels give the same bits for any layout (tests/test_bf16.py); copies cost 2-19% there
                q, k, v = one_row_layout(q, k, v)
            out, _ = rows.attention(module, q, k, v, None, **kwargs)  # [1, 1, Hq, d]
            outs.append(out)
    return torch.cat(outs, dim=1).view(query.shape[0], query.shape[2], *outs[0].shape[2:]), None


AttentionInterface.register(ROWWISE, rowwise_attention)


def _rowwise_linear(forward: Callable, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
    """``forward`` one row at a time, each row as its own [1, 1, K] call (the one-row step's call)."""
    out = torch.cat([forward(row) for row in x.reshape(-1, 1, 1, x.shape[-1])], dim=0)
    return out.reshape(*x.shape[:-1], -1)


def _column_major_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` as one call with the input's rows in column-major layout ([..., K] -> [..., N]).
    Where probed, each row then rounds as in its own one-row call, for a fraction of the row-by-row time."""
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    out = nn.functional.linear(rows.t().contiguous().t(), weight, bias)  # [M, N]
    return out.reshape(*x.shape[:-1], -1)


class _RowwiseForward:
    """A row-dependent layer's forward within ``RowInvariance.rows``: one row per call through its forward before."""

    def __init__(self, module: nn.Module):
        self.inner = module.forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _rowwise_linear(self.inner, x)


class _ColumnMajorForward:
    """A row-dependent layer's forward within ``RowInvariance.rows`` where the column-major call is exact: one call."""

    def __init__(self, module: nn.Linear):
        self.weight, self.bias = module.weight, module.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _column_major_linear(self.weight, self.bias, x)


@contextmanager
def forwards_replaced(modules: list[nn.Module], wrap: Callable[[nn.Module], Callable]) -> Iterator[None]:
    """Within: each module's forward is ``wrap(module)`` (which may call the forward it had); after, whatever forward
    each had is back (its class's, or an earlier replacement: packed.py's under this module's row-wise one)."""
    saved = [(m, m.__dict__.get("forward")) for m in modules]
    for m in modules:
        m.forward = wrap(m)
    try:
        yield
    finally:
        for m, forward in saved:
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def agree_on_random_inputs(
    weight: torch.Tensor, rows: int, generator: torch.Generator, first: Callable, second: Callable
) -> bool:
    """Whether two computations of ``x @ weight.T`` give bit-equal outputs on random [rows, K] inputs, over
    PROBE_ELEMENTS output elements (enough to expose a different summation order)."""
    for _ in range(-(-PROBE_ELEMENTS // (rows * weight.shape[0]))):
        x = torch.randn(rows, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
        if not torch.equal(first(x), second(x)):
            return False
    return True


class RowInvariance:
    """Runs a model's multi-row passes with one-row numerics (see the module docstring); one per loaded model.

    How each linear computes M rows is probed once per (weight shape, dtype, device, bias, rows): the kernels depend on
    nothing else.
    """

    def __init__(self, config: PretrainedConfig, layers: nn.ModuleList, lm_head: nn.Linear):
        self.config = config
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
        self.layer_linears = [[m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in layers]
        self.lm_head = lm_head
        self._ways: dict[tuple, type | None] = {}
        self._patches: dict[tuple, dict[nn.Linear, type]] = {}  # per (layers, rows, head): the linears to patch, how
        self._generator = torch.Generator().manual_seed(0)  # probe inputs; the caller's RNG is left alone

    def row_dependent(self, linear: nn.Linear, rows: int) -> bool:
        """Whether some row of an ``rows``-row product through this layer's kernel differs from its one-row product."""
        return self.way(linear, rows) is not None

    def way(self, linear: nn.Linear, rows: int) -> type | None:
        """How a pass of ``rows`` rows computes this layer with one-row numerics: None (its own forward, one GEMM: the
        kernel is row-invariant there), ``_ColumnMajorForward`` (one GEMM over column-major input: probed exact and
        timed faster) or ``_RowwiseForward`` (one call per row)."""
        if rows > MAX_PROBED_ROWS:
            return _RowwiseForward
        weight = linear.weight
        key = (tuple(weight.shape), weight.dtype, weight.device, linear.bias is None, rows)
        if key not in self._ways:
            self._ways[key] = self._choose(linear, rows)
        return self._ways[key]

    @torch.inference_mode()
    def _choose(self, linear: nn.Linear, rows: int) -> type | None:
        weight, bias = linear.weight, linear.bias

        def plain(x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, weight, bias)

        one_by_one = partial(_rowwise_linear, plain)  # the reference: each row as the one-row step computes it
        if agree_on_random_inputs(weight, rows, self._generator, plain, one_by_one):
            return None
        columns = partial(_column_major_linear, weight, bias)
        if not agree_on_random_inputs(weight, rows, self._generator, columns, one_by_one):
            return _RowwiseForward
        x = torch.randn(1, rows, weight.shape[1], generator=self._generator).to(weight.device, weight.dtype)
        by_rows = partial(_rowwise_linear, linear.forward)  # what the pass would call per row (packed, if patched)
        return _ColumnMajorForward if _fastest_call(columns, x) < _fastest_call(by_rows, x) else _RowwiseForward

    def row_keys(self, allowed: torch.Tensor) -> RowKeys:  # allowed: [B, q, kv] or [q, kv] bool
        return RowKeys.of(allowed if allowed.dim() == 3 else allowed[None], self.attention)

    @contextmanager
    def rows(self, layers: range, rows: int, head: bool = False) -> Iterator[None]:
        """Within: attention under ``ROWWISE`` (the layers must get ``RowKeys`` as their mask), and the linears of
        ``layers`` (and the LM head with ``head``) that are row-dependent at ``rows`` rows patched to compute each row
        as a one-row product (``way``)."""
        key = (layers.start, layers.stop, rows, head)
        patches = self._patches.get(key)
        if patches is None:  # once per kind of pass: ~200 linears a pass made the lookups 2% of decoding
            linears = [m for i in layers for m in self.layer_linears[i]] + ([self.lm_head] if head else [])
            patches = self._patches[key] = {m: way for m in linears if (way := self.way(m, rows)) is not None}
        saved = self.config._attn_implementation_internal
        self.config._attn_implementation_internal = ROWWISE  # the attribute behind the validating setter
        try:
            with forwards_replaced(list(patches), lambda m: patches[m](m)):
                yield
        finally:
            self.config._attn_implementation_internal = saved


def _fastest_call(fn: Callable, x: torch.Tensor) -> float:
    """The shortest of ``TIMED_CALLS`` calls, in seconds, after one untimed call (the kernel's first-use setup)."""
    fn(x)
    return min(call_seconds(partial(fn, x), TIMED_CALLS))
