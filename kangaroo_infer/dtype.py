"""The dtype that fits the machine: bf16 where the hardware computes it natively and it measures faster, else fp32.

Drafting pays only where verifying several tokens costs about what one costs. On CPUs with native bf16 (avx512_bf16,
AMX) oneDNN's bf16 GEMM is nearly flat from 1 to 8 rows while MKL's fp32 GEMM costs 2-4x one row for 2-8 rows
(docs/decoding.md), and bf16 moves half the bytes. CUDA GPUs compute bf16 natively. Elsewhere (no bf16 instructions)
bf16 is emulated and slower than fp32. The flags say whether bf16 can be fast; a one-off timing on the first use says
whether it is for the model at hand (its own linear shapes: a small model's layers may not amortise bf16's cost per
call, as on an Intel Xeon with AMX), and is cached per CPU model, torch version and shapes in
``$KANGAROO_HOME/dtype.json``. ``dtype="auto"`` is the default of every command; an explicit dtype always wins, and
$KANGAROO_DTYPE pins "auto" (the test suite pins float32, so it runs alike on every CPU; test_bf16.py covers bf16).
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from .files import UnwritableError, atomic_write

AUTO = "auto"
ENV = "KANGAROO_DTYPE"  # when set, what "auto" stands for
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
TIMING_SHAPE = (2048, 2048)  # out x in features of the timed linear when no model is named: ~1 ms a pass
TIMING_ROWS = (1, 4)  # its rows: a decode step and a verification
DECODE_ROWS = (1, 3)  # a model's own linears are timed for a decode step and a verification of 2 drafts (γ = 2)
DECODE_CALLS = 10  # timed calls per (shape, rows, dtype); the median counts


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere, which then means fp32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a timing depends on besides the code, for every benchmark result: the CPU and its native-bf16 flags, the
    cores and the threads torch computes with, the GPU when ``device`` is one, and the versions whose kernels ran."""
    import transformers

    device = torch.device(device or "cpu")
    return {
        "cpu": cpu_name(),
        "cpu_bf16_flags": sorted(cpu_flags() & set(CPU_BF16_FLAGS)),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def machine_line(record: dict[str, Any]) -> str:
    """``machine()`` in one printed line, e.g. "AMD EPYC (avx512_bf16), 2 threads of 2 cores, torch 2.13.0"."""
    flags = ", ".join(record["cpu_bf16_flags"]) or "no native bf16"
    gpu = f"{record['gpu']} on " if record["gpu"] else ""
    return (
        f"{gpu}{record['cpu']} ({flags}), {record['torch_threads']} threads of {record['cores']} cores, "
        f"torch {record['torch']}, transformers {record['transformers']}"
    )


def call_seconds(fn: Callable[[], object], calls: int) -> list[float]:
    """How long each of ``calls`` calls of ``fn`` took, in seconds: the one timing loop behind every choice the
    runtime makes by measuring (this dtype, ``invariance``'s way of computing a row-dependent layer)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_seconds(fn: Callable[[], object], calls: int) -> float:
    """The median of ``calls`` timed calls: the statistic of the dtype's timings."""
    times = sorted(call_seconds(fn, calls))
    return times[len(times) // 2]


def _time_linear(dtype: torch.dtype, rows: int, repeats: int = 20) -> float:
    weight = torch.randn(*TIMING_SHAPE).to(dtype)
    x = torch.randn(rows, TIMING_SHAPE[1]).to(dtype)
    with torch.inference_mode():
        return _median_seconds(lambda: torch.nn.functional.linear(x, weight), repeats)


def measure_cpu_bf16() -> dict:
    """Median time of a linear layer for 1 and 4 rows in fp32 and bf16 on this CPU (seconds)."""
    return {
        str(dtype).removeprefix("torch."): {str(rows): _time_linear(dtype, rows) for rows in TIMING_ROWS}
        for dtype in (torch.float32, torch.bfloat16)
    }


def decode_linears(config: PretrainedConfig) -> dict[tuple[int, int], int]:
    """(out, in) features of each linear a decode step of this (Llama-shaped) model runs, and how many times: q, k, v,
    o, gate, up and down in every layer, and the LM head."""
    hidden, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv, mlp = heads * head_dim, kv_heads * head_dim, config.intermediate_size
    shapes: Counter[tuple[int, int]] = Counter()
    for shape in ((q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (mlp, hidden), (mlp, hidden), (hidden, mlp)):
        shapes[shape] += layers
    shapes[(config.vocab_size, hidden)] += 1
    return dict(shapes)


def measure_decode_linears(shapes: dict[tuple[int, int], int]) -> dict:
    """A decode step's linears (``decode_linears``) for 1 and 3 rows in fp32 and bf16 on this CPU, seconds summed
    over the step (medians per shape). bf16 is timed on packed weights where torch has them (``packed.py``: what
    Kangaroo runs). On some CPUs bf16 pays a fixed cost per call that a small model's layers do not amortise (an
    Intel Xeon with AMX: ~50 µs per SmolLM2 layer in bf16 against 12-70 µs in fp32; benchmarks/xeon_amx/), while a
    large square layer is faster in bf16 there: the model's own shapes decide."""
    from .packed import PackedWeights  # packed -> invariance -> this module: imported when first needed

    packing = PackedWeights()
    timing: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            timing[name] = dict.fromkeys(map(str, DECODE_ROWS), 0.0)
            for (out_features, in_features), count in shapes.items():
                weight = torch.randn(out_features, in_features).to(dtype)
                packed = packing.pack(weight)
                for rows in DECODE_ROWS:
                    x = torch.randn(rows, in_features).to(dtype)
                    if packed is None:
                        call = partial(torch.nn.functional.linear, x, weight)
                    else:
                        call = partial(PackedWeights.run, x, packed, None)
                    call()
                    timing[name][str(rows)] += count * _median_seconds(call, DECODE_CALLS)
    return timing


def auto_dtype(
    device: torch.device | str | None,
    home: Path,
    flags: set[str] | None = None,
    config: PretrainedConfig | None = None,
) -> tuple[torch.dtype, str]:
    """The dtype ``auto`` stands for on ``device``, and why (printed and recorded with every result); a CPU's timing
    is cached in ``home``/dtype.json. ``flags``: the CPU's feature flags (default: this CPU's). ``config``: the model
    to decode, whose own linear shapes a CPU times (``measure_decode_linears``); without one, a 2048x2048 layer."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA with native bf16"
        return torch.float32, "CUDA without bf16"
    if device.type != "cpu":
        return torch.float32, f"{device.type}: bf16 speed not measured here"
    flags = (cpu_flags() if flags is None else flags) & set(CPU_BF16_FLAGS)
    if not flags:
        return torch.float32, f"CPU without native bf16 ({' / '.join(CPU_BF16_FLAGS)} absent)"
    cache_path = home / "dtype.json"
    key = f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    shapes = None
    if config is not None:
        shapes = decode_linears(config)
        key += " | linears " + " ".join(f"{o}x{i}:{n}" for (o, i), n in sorted(shapes.items()))
    try:
        cached = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict) or key not in cached:
        cached = cached if isinstance(cached, dict) else {}
        cached[key] = measure_cpu_bf16() if shapes is None else measure_decode_linears(shapes)
        try:
            atomic_write(cache_path, json.dumps(cached, indent=2) + "\n")  # processes measuring at once: one file wins
        except (UnwritableError, OSError) as error:  # the cache only saves the next run a timing: use this one
            warnings.warn(
                f"Could not keep the bf16 timing in {cache_path} ({error}); it will be measured again next time. "
                f"Set $KANGAROO_HOME to a writable directory, or pass an explicit dtype.",
                stacklevel=2,
            )
    timing = cached[key]
    fp32, bf16 = (sum(timing[name].values()) for name in ("float32", "bfloat16"))
    native = "+".join(sorted(flags))
    timed = "on a 2048x2048 layer" if shapes is None else "on this model's linears"
    if bf16 < fp32:
        return torch.bfloat16, f"CPU with {native}, bf16 measured {fp32 / bf16:.1f}x faster than fp32 {timed}"
    return torch.float32, f"CPU with {native}, but bf16 measured slower than fp32 {timed} ({bf16 / fp32:.1f}x the time)"


def resolve_dtype(
    dtype: torch.dtype | str | None,
    device: torch.device | str | None,
    home: Path,
    config: PretrainedConfig | Callable[[], PretrainedConfig | None] | None = None,
) -> tuple[torch.dtype | None, str]:
    """An explicit dtype as given; ``"auto"`` as $KANGAROO_DTYPE names it, else as ``auto_dtype`` decides for the
    model ``config`` (or a function giving it, called only then); None stays None (keep a model's dtype).
    $KANGAROO_DTYPE pins what "auto" means on a machine or in a test suite."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype, "explicit" if dtype is not None else "the model's own"
    if dtype == AUTO:
        pinned = os.environ.get(ENV)
        if pinned:
            if pinned not in DTYPES:
                raise ValueError(f"${ENV}={pinned!r} is not a dtype; set it to one of {list(DTYPES)} or unset it.")
            return DTYPES[pinned], f"${ENV}"
        return auto_dtype(device, home, config=config() if callable(config) else config)
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {[AUTO, *DTYPES]}.")
    return DTYPES[dtype], "explicit"
