"""Prepacked bf16 weights: torch's own bf16 linear kernel on CPU, without the weight copy it makes on every call.

On a CPU torch computes a bf16 ``nn.Linear`` with oneDNN, which first copies the weight into the blocked layout of
its kernel, on every call. Decoding calls each layer with a few rows, so that copy is a large share of a step. Copied
once (``torch.ops.mkldnn._reorder_linear_weight``) and run by ``torch.ops.mkldnn._linear_pointwise`` (what torch's
compiler uses for frozen weights), the same kernel does the same arithmetic: the outputs are bit-equal, the time is
not (AMD EPYC with avx512_bf16, one row: SmolLM2's 1536→576 projection 111 → 50 µs, its 49,152-row LM head
20.6 → 12.0 ms, both measured on a loaded machine; docs/decoding.md).

Bit-equality is probed, never assumed: a (weight shape, bias, row count) is packed only after random inputs gave
identical outputs through both paths (``invariance.PROBE_ELEMENTS`` output elements, enough to expose a different
summation order); every other call, and every pass of more than ``MAX_ROWS`` rows (a long prefill), runs
``nn.functional.linear`` as before. Where the op is missing or the weights are not bf16 on a CPU, nothing is packed.
Kangaroo's output therefore never depends on packing; only its speed does. The base model itself is left alone:
its linears run packed only inside Kangaroo's own passes (``patched``), so a vanilla ``generate`` on the same model
is unchanged. Packing keeps a second copy of each packed weight (for a model computing in bf16 on CPU: the size of
its linear layers).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import partial

import torch
from torch import nn

from .invariance import agree_on_random_inputs, forwards_replaced

MAX_ROWS = 64  # passes with more rows (a long prefill) run unpacked: their kernels are not probed
_OPS_AVAILABLE = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
)  # fmt: skip


def packing_available(weight: torch.Tensor) -> bool:
    """bf16 weights on a CPU whose torch has oneDNN's packed linear."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and _OPS_AVAILABLE


class PackedWeights:
    """Packed copies of frozen bf16 weights and the probes that allow using them; one per loaded model."""

    def __init__(self) -> None:
        self._packed: dict[int, tuple[tuple, torch.Tensor | None]] = {}  # id(weight) -> (packed from, packed)
        self._equal: dict[tuple, bool] = {}  # (shape, bias is None, rows) -> packed output equals F.linear's
        self._generator = torch.Generator().manual_seed(0)  # probe inputs; the caller's RNG is left alone

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``nn.functional.linear(x, weight, bias)``, bit for bit; packed where the probe allows it."""
        return self._linear(x, weight, bias, self.pack(weight), (tuple(weight.shape), bias is None))

    def patched(self, linears: list[nn.Linear]) -> AbstractContextManager[None]:
        """Within: these modules compute through their packed weights (restored after, whatever forward they had).
        Each weight is checked once, on entry: a weight changed in place since the last pass is packed again."""
        return forwards_replaced(linears, partial(_PackedForward, self))

    def pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The weight in oneDNN's layout, packed again when the tensor changed; None where it cannot be packed."""
        if not packing_available(weight):
            return None
        source = (weight.data_ptr(), _version(weight), tuple(weight.shape), weight.stride())
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] != source:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            except RuntimeError:
                packed = None
            entry = (source, packed)
            self._packed[id(weight)] = entry
        return entry[1]

    def _linear(
        self,
        x: torch.Tensor,  # [..., K]
        weight: torch.Tensor,  # [N, K]
        bias: torch.Tensor | None,
        packed: torch.Tensor | None,  # ``pack(weight)``
        shape: tuple,  # (weight shape, bias is None): the probe's key without the row count
    ) -> torch.Tensor:  # [..., N]
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if packed is None or not 0 < rows <= MAX_ROWS or x.dtype != weight.dtype:
            return nn.functional.linear(x, weight, bias)
        same = self._equal.get((*shape, rows))
        if same is None:
            same = self._equal[(*shape, rows)] = self._probe(weight, bias, packed, rows)
        if not same:
            return nn.functional.linear(x, weight, bias)
        out = self.run(x.reshape(rows, x.shape[-1]), packed, bias)  # [rows, N]
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def run(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [rows, K] -> [rows, N]
        """The packed kernel itself (``pack``'s output), unprobed."""
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")

    @torch.inference_mode()
    def _probe(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, rows: int) -> bool:
        try:
            return agree_on_random_inputs(
                weight, rows, self._generator, partial(self.run, packed=packed, bias=bias),
                partial(nn.functional.linear, weight=weight, bias=bias),
            )  # fmt: skip
        except RuntimeError:
            return False


def packed_linears(model: nn.Module) -> AbstractContextManager[None]:
    """Within: every ``nn.Linear`` of ``model`` runs on its packed weight where the probe allows it, bit for bit (a
    fresh ``PackedWeights``). For the base's own ``generate`` where only its answers matter (reference answers for
    scoring, distillation); a vanilla ``generate`` that is timed against Kangaroo stays unpacked."""
    return PackedWeights().patched([m for m in model.modules() if isinstance(m, nn.Linear)])


def _version(weight: torch.Tensor) -> int | None:
    """The tensor's in-place update count (an inference tensor has none: it cannot change outside inference mode)."""
    try:
        return weight._version
    except RuntimeError:
        return None


class _PackedForward:
    """A module's forward on its weight packed when the patch began (a callable object, so the patch holds no
    closure). Per call only the row count is checked: the per-call checks of ``linear`` cost about half the kernel's
    time at one row."""

    def __init__(self, packing: PackedWeights, module: nn.Linear):
        self.linear, self.weight, self.bias = packing._linear, module.weight, module.bias
        self.packed, self.shape = packing.pack(module.weight), (tuple(module.weight.shape), module.bias is None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias, self.packed, self.shape)
