"""The two benchmarks beside the question benchmark: ``--sweep`` (the fastest η/γ or tree shape on a few
questions) and ``--batch-size`` (batched throughput, Kangaroo vs the base's own batched ``generate``)."""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..accept import cut_at_eos
from ..checks import check_int
from ..dtype import machine
from ..files import write_file
from ..model import KangarooModel
from ..questions import Question, chat_ids
from .decoders import _timed, run_kangaroo, run_vanilla, sampling_kwargs
from .out_dir import OWNER, RESULTS, SWEEP, check_out_files, may_replace
from .run import run_config


def sweep(
    km: KangarooModel,
    tokenizer: Any,
    questions: list[Question],
    out_dir: str | Path,
    grid: list[dict[str, Any]],
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Decode a few questions once per grid point (generate keyword arguments, e.g. threshold and max_draft_steps,
    or tree_top_k and tree_max_nodes); vanilla is timed once per question. Picks the fastest point."""
    out_dir = Path(out_dir)
    check_out_files(out_dir, (SWEEP,))
    device = km.backbone.embed_tokens.weight.device
    prompts = [chat_ids(tokenizer, q.prompt, device) for q in questions]  # each [1, T_i]
    run_vanilla(km, prompts[0], min(32, max_new_tokens))  # warm-up
    vanilla = [run_vanilla(km, ids, max_new_tokens) for ids in prompts]
    results = []
    for point in tqdm(grid, desc="sweep", unit="setting"):
        ratios, new_tokens, forwards, identical = [], 0, 0, True
        for ids, (ref, ref_time) in zip(prompts, vanilla, strict=True):
            out, wall = run_kangaroo(km, ids, max_new_tokens, **point)
            new = out.sequences[0, ids.shape[1] :].tolist()
            ratios.append((len(new) / wall) / (len(ref) / ref_time))
            new_tokens += len(new)
            forwards += len(out.accept_lengths)
            identical &= new == ref
        results.append(
            {**point, "speedup": statistics.fmean(ratios), "tau": new_tokens / forwards, "identical": identical}
        )
    best = max(results, key=lambda g: g["speedup"])
    result = {"grid": results, "best": best, "questions": len(questions), "machine": machine(device)}
    write_file(out_dir / SWEEP, json.dumps(result, indent=2) + "\n", OWNER, overwrite=may_replace(out_dir, False))
    return result


def left_padded(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, T_i] prompts -> ids [B, T] with left padding and attention_mask [B, T]."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    return ids, mask


def batch_throughput(
    km: KangarooModel,
    tokenizer: Any,
    questions: list[Question],
    out_dir: str | Path,
    batch_sizes: list[int],
    max_new_tokens: int = 256,
    threshold: float | None = None,
    steps: int | None = None,
    policy: str = "adaptive",
    temperature: float = 0.0,
    warmup: int = 1,
    lookup_tokens: int | None = None,
    tree: bool = False,
    tree_top_k: int | None = None,
    tree_max_nodes: int | None = None,
) -> dict[str, Any]:
    """Throughput mode: for each B, the questions in batches of B (left-padded), Kangaroo batched vs the base's own
    batched ``generate``; tokens/s over the batch = new tokens of all rows ÷ wall time. With ``tree`` Kangaroo's
    batches draft a tree per row (K and N: the adapter's defaults unless given). Written under "batch" in
    results.json (other keys there are kept). Greedy rows are compared with vanilla's batched rows for information
    only: padding changes float rounding, and exactness is defined against each row's own unbatched run."""
    from ..batch import pad_token_id

    for size in batch_sizes or [None]:
        check_int("--batch-size", size, 1, rule="name positive batch sizes, e.g. 1,4,8")
    out_dir = Path(out_dir)
    check_out_files(out_dir, (RESULTS,))
    device = km.backbone.embed_tokens.weight.device
    pad_id = pad_token_id(km)
    eos_ids = km.resolve_eos("from_generation_config")
    prompts = [chat_ids(tokenizer, q.prompt, device) for q in questions]  # each [1, T_i]
    kw = {"threshold": threshold, "max_draft_steps": steps, "policy": policy, "temperature": temperature}
    if lookup_tokens is not None:  # batches copy per row too (0: off); None keeps the adapter's default
        kw["lookup_tokens"] = lookup_tokens
    shape = None
    if tree:
        settings = km.generation_settings(tree=True, tree_top_k=tree_top_k, tree_max_nodes=tree_max_nodes)
        shape = [settings.tree_top_k, settings.tree_max_nodes]
        kw.update(tree=True, tree_top_k=shape[0], tree_max_nodes=shape[1])
    sampling = sampling_kwargs(temperature)

    def vanilla(ids: torch.Tensor, mask: torch.Tensor, seed: int) -> list[list[int]]:  # ids, mask [B, T]
        torch.manual_seed(seed)
        out = km.base.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
        return [cut_at_eos(row, eos_ids) for row in out[:, ids.shape[1] :].tolist()]

    def kangaroo(ids: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[list[list[int]], Any]:
        out = km.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, seed=seed, **kw)
        new = out.sequences[:, ids.shape[1] :].tolist()
        return [row[: sum(a)] for row, a in zip(new, out.accept_lengths, strict=True)], out

    for p in prompts[:warmup]:
        ids, mask = left_padded([p, p], pad_id)
        vanilla(ids, mask, 0)
        kangaroo(ids, mask, 0)
    results: dict[str, Any] = {}
    for size in batch_sizes:
        totals = {"vanilla_tokens": 0, "vanilla_seconds": 0.0, "tokens": 0, "seconds": 0.0, "rows_identical": 0}
        forwards, batches = 0, 0
        for start in range(0, len(prompts), size):
            ids, mask = left_padded(prompts[start : start + size], pad_id)
            run_vanilla_batch = partial(vanilla, ids, mask, start)
            run_kangaroo_batch = partial(kangaroo, ids, mask, start)
            if batches % 2 == 0:  # alternate who goes first
                ref, ref_time = _timed(run_vanilla_batch)
                (rows, out), wall = _timed(run_kangaroo_batch)
            else:
                (rows, out), wall = _timed(run_kangaroo_batch)
                ref, ref_time = _timed(run_vanilla_batch)
            totals["vanilla_tokens"] += sum(len(r) for r in ref)
            totals["vanilla_seconds"] += ref_time
            totals["tokens"] += sum(len(r) for r in rows)
            totals["seconds"] += wall
            totals["rows_identical"] += sum(a == b for a, b in zip(rows, ref, strict=True))
            forwards += sum(len(a) for a in out.accept_lengths)
            batches += 1
        vanilla_tps = totals["vanilla_tokens"] / totals["vanilla_seconds"]
        kangaroo_tps = totals["tokens"] / totals["seconds"]
        results[str(size)] = {
            "batches": batches,
            "rows": len(prompts),
            "vanilla_tokens_per_s": vanilla_tps,
            "kangaroo_tokens_per_s": kangaroo_tps,
            "speedup": kangaroo_tps / vanilla_tps,
            "tau": totals["tokens"] / max(forwards, 1),
            "rows_identical_to_vanilla_batch": totals["rows_identical"] if temperature == 0 else None,
            **totals,
        }
    path = out_dir / RESULTS
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary["batch"] = results
    summary["batch_config"] = {
        **run_config(km, threshold, steps, policy, temperature, max_new_tokens),
        "tree": shape,
        "machine": machine(km.backbone.embed_tokens.weight.device),
    }
    write_file(path, json.dumps(summary, indent=2) + "\n", OWNER, overwrite=may_replace(out_dir, False))
    return summary
