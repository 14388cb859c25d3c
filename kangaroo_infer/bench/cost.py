"""The cost profile: the measured pieces of a round (a full forward, a draft step, verification of k tokens), and
the speedup they allow, priced by the scheduler's own round-cost model (``Scheduler.round_cost``)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..dtype import machine
from ..files import write_file
from ..model import KangarooModel
from ..scheduler import PLAIN, Scheduler
from .out_dir import OWNER, RESULTS, check_out_files, display_name, may_replace

ADAPTER, LOOKUP = "adapter", "lookup"  # the drafters a profile prices: the adapter's steps, and free copies


@torch.inference_mode()
def cost_profile(km: KangarooModel, ids: torch.Tensor, max_k: int = 8, reps: int = 5) -> dict[str, Any]:
    """Median milliseconds of the pieces of a round, measured at the context of ``ids`` [1, T].

    full_forward_1: all layers + head for one token; deep_verify_k: layers [ℓ, L) + head over k tokens;
    draft_step: layers [0, ℓ) + adapter + head for one token. Timed inside ``km.packed()``, as ``generate`` runs.
    """
    with km.packed():
        cache = km.new_cache()
        sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)  # time finished work only
        token = torch.tensor([[int(km.prefill(ids, cache).argmax())]], device=ids.device)  # [1, 1]
        base_len = cache.shallow_len
        adapter_len = base_len  # after the first draft step below, the adapter has read the prompt
        km.draft_logits(km.shallow_pass(token, cache), cache)  # the adapter reads the prompt once
        cache.crop(base_len, adapter_len)

        def median_ms(setup: Callable[[], None], fn: Callable[[], Any]) -> float:
            """``fn`` timed ``reps`` times after an untimed ``setup``, the cache put back after each."""
            times = []
            for _ in range(reps):
                setup()
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times.append((time.perf_counter() - start) * 1000)
                cache.crop(base_len, adapter_len)
            return statistics.median(times)

        def nothing() -> None:
            pass

        def one_token_full() -> None:
            km.shallow_pass(token, cache)
            km.deep_pass(cache)

        def draft_step() -> None:
            km.draft_logits(km.shallow_pass(token, cache), cache).max(-1)

        def pending(k: int) -> Callable[[], None]:
            def setup() -> None:  # k tokens whose shallow pass is done, waiting for the deep pass
                for _ in range(k):
                    km.shallow_pass(token, cache)

            return setup

        median_ms(nothing, one_token_full)  # warm-up
        return {
            "context_tokens": base_len,
            "full_forward_1_ms": median_ms(nothing, one_token_full),
            "draft_step_ms": median_ms(nothing, draft_step),
            "deep_verify_ms": {str(k): median_ms(pending(k), lambda: km.deep_pass(cache)) for k in range(1, max_k + 1)},
        }


def profile_scheduler(profile: dict[str, Any], reps: int = 5) -> Scheduler:
    """A scheduler that has observed the profile (each width ``reps`` times): verifying m tokens costs the newest
    token's shallow pass plus the deep verification of m tokens, an adapter draft step its measured cost, a lookup
    copy nothing. Its ``round_cost`` then prices any round as decoding would."""
    scheduler = Scheduler.create("adaptive", {ADAPTER: False, LOOKUP: True})
    verify = profile["deep_verify_ms"]
    shallow = profile["full_forward_1_ms"] - verify["1"]
    for _ in range(reps):
        for width, ms in verify.items():
            m = int(width)
            drafted = m - 1
            draft = drafted * profile["draft_step_ms"]
            scheduler.observe(ADAPTER if drafted else PLAIN, drafted, drafted, draft, shallow + ms)
    return scheduler


def speedup_limit(profile: dict[str, Any], tau: float, mean_drafts: float) -> float:
    """Best speedup the measured costs allow at τ, with no overhead at all: τ tokens per round of ``mean_drafts``
    draft steps (verifying the nearest whole number of them plus one) against one plain step per token."""
    scheduler = profile_scheduler(profile)
    widest = max(int(x) for x in profile["deep_verify_ms"])
    k = min(max(0, round(mean_drafts)), widest - 1)
    return tau * scheduler.round_cost(PLAIN, 0) / scheduler.round_cost(ADAPTER, mean_drafts, verified=k)


def rounds_limit(profile: dict[str, Any], records: list[dict]) -> float:
    """Best speedup the measured costs allow for the rounds Kangaroo actually ran (``records``' kangaroo runs), with
    no overhead at all: each adapter round and lookup round priced by ``round_cost``, against one plain step per
    committed token. Verifications wider than the profile measured follow the scheduler's line through the widths."""
    scheduler = profile_scheduler(profile)
    tokens, ideal = 0, 0.0
    for record in records:
        run = record["decoders"]["kangaroo"]
        copied = set(run.get("lookup_rounds", []))
        for i, (k, committed) in enumerate(zip(run["draft_lengths"], run["accept_lengths"][1:], strict=True)):
            ideal += scheduler.round_cost(LOOKUP if i in copied else ADAPTER, k)
            tokens += committed
    return tokens * scheduler.round_cost(PLAIN, 0) / ideal if ideal else 1.0


def profile_only(
    km: KangarooModel,
    out_dir: str | Path,
    context: int = 128,
    tau: float | None = None,
    drafts_per_round: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The cost profile alone, at a context of random tokens (no tokenizer or questions needed), and the speedup
    limit it implies at a τ measured elsewhere (e.g. on CPU with the trained adapter)."""
    out_dir = Path(out_dir)
    check_out_files(out_dir, (RESULTS,))
    device = km.backbone.embed_tokens.weight.device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, km.base.config.vocab_size, (1, context), generator=generator).to(device)  # [1, context]
    profile = cost_profile(km, ids)
    if tau is not None:
        drafts = drafts_per_round if drafts_per_round is not None else km.generation_settings().max_draft_steps
        profile["tau"] = tau
        profile["mean_drafts_per_round"] = drafts
        profile["speedup_limit_at_tau"] = speedup_limit(profile, tau, drafts)
    summary = {
        "cost_profile": profile,
        "config": {
            "base_model": display_name(km.base.config.name_or_path),
            "model_type": km.base.config.model_type,
            "num_layers": km.backbone.num_layers,
            "hidden_size": km.base.config.hidden_size,
            "exit_layer": km.exit_layer,
            "dtype": str(km.base.dtype).removeprefix("torch."),
            "exact_verify": km.backbone.invariance is not None,
            "packed_weights": km.packing is not None,
            "device": str(device),
            "machine": machine(device),  # its threads, CPU, GPU and versions
        },
    }
    write_file(out_dir / RESULTS, json.dumps(summary, indent=2) + "\n", OWNER, overwrite=may_replace(out_dir, False))
    return summary
