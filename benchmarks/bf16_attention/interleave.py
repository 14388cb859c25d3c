"""The loop this directory's benchmarks share: decoders run one after another on each prompt, in rotating order."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


def interleaved(
    decoders: dict[str, Callable[[torch.Tensor], Any]], prompts: list[torch.Tensor]
) -> Iterator[dict[str, tuple[Any, float]]]:
    """Per prompt ([1, T] ids), each decoder's result and seconds. Every decoder first runs once on the first prompt's
    first 32 tokens (warm-up, not timed); the order rotates by one each prompt, so none always runs first."""
    names = list(decoders)
    with torch.inference_mode():
        for decode in decoders.values():
            decode(prompts[0][:, :32])
        for i, ids in enumerate(prompts):
            timed = {}
            for name in names[i % len(names) :] + names[: i % len(names)]:
                begin = time.perf_counter()
                result = decoders[name](ids)
                timed[name] = (result, time.perf_counter() - begin)
            yield timed
