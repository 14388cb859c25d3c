"""The question benchmark: every decoder (vanilla, Kangaroo, its tree mode, the peers) on every question,
interleaved in rotating order in one process; each question's record appended to answers.jsonl as it finishes, so
``--resume`` continues a run that was stopped."""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checks import check_int
from ..dtype import machine
from ..files import write_file
from ..model import KangarooModel
from ..questions import Question, chat_ids
from ..settings import GenerationOptions
from .cost import cost_profile, rounds_limit
from .decoders import KANGAROO, VANILLA, make_decoders, make_peers
from .out_dir import (
    ANSWERS,
    OWNER,
    PLOT,
    RESULTS,
    SETTINGS,
    check_out_dir,
    display_name,
    may_replace,
    require_matplotlib,
)
from .records import run_record, summarize_decoders, upgrade_record
from .report import plot
from .spec_bench import check_spec_bench_dir, spec_bench_model_ids, write_spec_bench

log = logging.getLogger(__name__)


def check_bench_args(
    *,
    max_new_tokens: int = 256,
    threshold: float | None = None,
    steps: int | None = None,
    warmup: int = 1,
    temperature: float = 0.0,
    tree: bool = False,
    tree_top_k: int | None = None,
    tree_max_nodes: int | None = None,
    lookup_tokens: int | None = None,
    num_questions: int | None = None,
    peers: list[str] | None = None,
    pld_tokens: list[int] | None = None,
    draft_model: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Every setting of a question benchmark that can be checked without the model: a rejected run must not have
    loaded a model for minutes, nor touched the answers of an earlier one."""
    GenerationOptions(
        max_new_tokens=max_new_tokens, threshold=threshold, max_draft_steps=steps, temperature=temperature, tree=tree,
        tree_top_k=tree_top_k, tree_max_nodes=tree_max_nodes, lookup_tokens=lookup_tokens,
    ).check(flags=True)  # fmt: skip
    if num_questions is not None:
        check_int("--num-questions", num_questions, 1)
    check_int("--warmup", warmup, 0)
    if pld_tokens is not None:
        try:
            for n in pld_tokens or [None]:
                check_int("--pld-tokens", n, 1)
        except ValueError:
            raise ValueError(
                f"--pld-tokens takes comma-separated integers >= 1, e.g. 4,10; got {pld_tokens!r}."
            ) from None
        if len(set(pld_tokens)) != len(pld_tokens):
            raise ValueError(f"--pld-tokens names a value twice: {pld_tokens}.")
    make_peers(peers, pld_tokens, draft_model, lookup_tokens)  # unknown or repeated peers, a missing draft model
    if peers and temperature > 0:
        raise ValueError(
            f"Peers ({', '.join(peers)}) are compared with vanilla greedy decoding token for token; drop --peers or "
            f"--temperature."
        )
    if resume and overwrite:
        raise ValueError("--resume keeps the answers in --out and --overwrite discards them; pass one of them.")


def adapter_fingerprint(km: KangarooModel) -> str:
    """sha256 of the adapter's weights: a resumed run must decode with the same adapter, wherever its files are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(km.adapter.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_config(
    km: KangarooModel,
    threshold: float | None,
    steps: int | None,
    policy: str,
    temperature: float,
    max_new_tokens: int,
    lookup_tokens: int | None = None,
) -> dict[str, Any]:
    """The settings a benchmark ran with, as written into results.json (η / γ / lookup after the adapter's
    defaults)."""
    settings = km.generation_settings(
        threshold=threshold, max_draft_steps=steps, temperature=temperature, lookup_tokens=lookup_tokens
    )
    return {
        "base_model": display_name(km.base.config.name_or_path),
        "exit_layer": km.exit_layer,
        "threshold": settings.threshold,
        "max_draft_steps": settings.max_draft_steps,
        "policy": policy,
        "lookup_tokens": settings.lookup_tokens,
        "lookup_ngram": [settings.lookup_min_ngram, settings.lookup_max_ngram],
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "dtype": str(km.base.dtype).removeprefix("torch."),
        "exact_verify": km.backbone.invariance is not None,
        "packed_weights": km.packing is not None,
        "device": str(km.backbone.embed_tokens.weight.device),
        "torch_threads": torch.get_num_threads(),
    }


_MISSING = "(missing)"


def _shown(key: str, value: Any) -> str:
    text = repr(value)
    return text[:13] + "…'" if key.endswith("sha256") and isinstance(value, str) else text


def _settings_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'field (saved X, now Y)' for each setting that differs: a refused resume names what to change."""
    now = json.loads(json.dumps(now))
    keys = list(dict.fromkeys([*now, *saved]))
    return [
        f"{k} (saved {_shown(k, saved.get(k, _MISSING))}, now {_shown(k, now.get(k, _MISSING))})"
        for k in keys
        if saved.get(k, _MISSING) != now.get(k, _MISSING)
    ]


def _finished_records(out_dir: Path, settings: dict[str, Any], questions: list[Question], resume: bool) -> list[dict]:
    """The answers a resumed run keeps (none unless ``resume``), in this schema (records of the earlier one are
    converted). Reads only: refuses answers written with other settings, and leaves out (to decode again) those whose
    question text changed since."""
    path, settings_path = out_dir / ANSWERS, out_dir / SETTINGS
    records: list[dict] = []
    if not (resume and path.is_file()):
        return records
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(
                    f"{path}: line {number} is not valid JSON; pass --overwrite to start over (or repair that line)."
                ) from None
            continue  # the line being written when the run was stopped: that question runs again
        try:
            records.append(upgrade_record(record))
        except ValueError as err:
            raise ValueError(f"{path}: line {number} is {err}; pass --overwrite to start over.") from None
    if not records:
        return records
    if not settings_path.is_file():
        raise ValueError(
            f"{out_dir} holds answers but not {SETTINGS}, so their settings are unknown; pass --overwrite to start "
            f"over, or use another --out."
        )
    differences = _settings_differences(json.loads(settings_path.read_text()), settings)
    if differences:
        raise ValueError(
            f"{out_dir} holds answers from a benchmark with other settings: {'; '.join(differences)}. Resume with "
            f"the saved settings, or pass --overwrite instead of --resume to start over, or use another --out."
        )
    current = {(q.category, q.question_id): q.prompt_sha256 for q in questions}
    changed = [
        r
        for r in records
        if (r["category"], r["question_id"]) in current
        and r.get("prompt_sha256") != current[(r["category"], r["question_id"])]
    ]
    if changed:
        ids = ", ".join(str(r["question_id"]) for r in changed)
        log.warning(
            "%d question(s) changed text since their answers were written (question_id %s): decoding them again.",
            len(changed),
            ids,
        )
        records = [r for r in records if r not in changed]
    return records


def bench(
    km: KangarooModel,
    tokenizer: Any,
    questions: list[Question],
    out_dir: str | Path,
    max_new_tokens: int = 256,
    threshold: float | None = None,
    steps: int | None = None,
    warmup: int = 1,
    profile: bool = True,
    progress: bool = True,
    adapter_name: str | None = None,
    policy: str = "adaptive",
    tree: bool = False,
    tree_top_k: int | None = None,
    tree_max_nodes: int | None = None,
    lookup_tokens: int | None = None,
    temperature: float = 0.0,
    resume: bool = False,
    overwrite: bool = False,
    peers: list[str] | None = None,
    pld_tokens: list[int] | None = None,
    spec_bench_dir: str | Path | None = None,
    draft_model: str | Path | None = None,
) -> dict[str, Any]:
    """Run every question with every decoder (rotating which goes first) and write the results.

    The decoders: vanilla, kangaroo, with ``tree=True`` kangaroo in tree mode too, and ``peers`` (kinds from
    PEER_KINDS, e.g. ["pld"] with ``pld_tokens`` [4, 10], or ["assisted"] with ``draft_model`` a standalone draft
    directory; greedy only). Each is checked against vanilla token for token and summarized under results.json's
    ``decoders``; kangaroo's summary is also the headline ``overall`` and ``categories``.
    With ``temperature`` > 0 vanilla and kangaroo sample (seed = question index): identity is recorded as None.
    Each question's record is appended to ``answers.jsonl`` as soon as it is done; ``resume=True`` keeps the
    records already there (same settings only; questions whose text changed run again) and runs the remaining
    questions, so a long run that was interrupted loses at most the question in flight. A directory that holds
    answers needs ``resume`` or ``overwrite``; every argument is checked before anything there is touched.
    ``spec_bench_dir`` also gets one Spec-Bench model-answer file per decoder (``write_spec_bench``).
    """
    check_bench_args(
        max_new_tokens=max_new_tokens, threshold=threshold, steps=steps, warmup=warmup, temperature=temperature,
        tree=tree, tree_top_k=tree_top_k, tree_max_nodes=tree_max_nodes, lookup_tokens=lookup_tokens, peers=peers,
        pld_tokens=pld_tokens, draft_model=draft_model, resume=resume, overwrite=overwrite,
    )  # fmt: skip
    if not questions:
        raise ValueError("No questions to benchmark; check --questions, --categories and --num-questions.")
    require_matplotlib()
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume, overwrite)
    config = run_config(km, threshold, steps, policy, temperature, max_new_tokens, lookup_tokens)
    peer_list = make_peers(peers, pld_tokens, draft_model, config["lookup_tokens"], policy)
    kangaroo = {"threshold": threshold, "max_draft_steps": steps, "policy": policy, "lookup_tokens": lookup_tokens}
    if temperature > 0:
        kangaroo["temperature"] = temperature
    tree_kw = None
    if tree:
        shape = km.generation_settings(tree=True, tree_top_k=tree_top_k, tree_max_nodes=tree_max_nodes)
        tree_kw = {**kangaroo, "tree": True, "tree_top_k": shape.tree_top_k, "tree_max_nodes": shape.tree_max_nodes}
    decoders = make_decoders(kangaroo, tree_kw, peer_list)
    device = km.backbone.embed_tokens.weight.device
    settings = {
        "adapter": display_name(adapter_name),
        "adapter_sha256": adapter_fingerprint(km),
        **config,
        "tree": [tree_top_k, tree_max_nodes] if tree else None,
        "peers": [p.name for p in peer_list],
        **({"draft_model": display_name(draft_model)} if draft_model is not None else {}),
    }
    for d in decoders:
        if d.prepare is not None:
            d.prepare(km)
    model_ids = spec_bench_model_ids(km, temperature, decoders)
    if spec_bench_dir is not None:
        check_spec_bench_dir(Path(spec_bench_dir), model_ids, resume or overwrite)
    done = _finished_records(out_dir, settings, questions, resume)  # reads only; raises on other settings
    replace = may_replace(out_dir, overwrite)  # decided before bench writes (then its files are listed as its own)
    # answers.jsonl was checked by check_out_dir (kept with --resume, discarded with --overwrite): replaced here
    write_file(out_dir / ANSWERS, "".join(json.dumps(r) + "\n" for r in done), OWNER, overwrite=True)
    write_file(out_dir / SETTINGS, json.dumps(settings, indent=2) + "\n", OWNER, overwrite=replace)
    finished = {(r["category"], r["question_id"]) for r in done}
    for q in questions[:warmup]:
        ids = chat_ids(tokenizer, q.prompt, device)  # [1, T]
        for d in decoders:
            d.run(km, ids, min(32, max_new_tokens))
    records = list(done)
    todo = [(i, q) for i, q in enumerate(questions) if (q.category, q.question_id) not in finished]
    for i, q in tqdm(todo, desc="bench", unit="question") if progress else todo:
        ids = chat_ids(tokenizer, q.prompt, device)  # [1, T]
        turn = i % len(decoders)
        runs = {d.name: d.run(km, ids, max_new_tokens, seed=i) for d in decoders[turn:] + decoders[:turn]}
        reference = runs[VANILLA].tokens if temperature == 0 else None
        record = {
            "question_id": q.question_id,
            "category": q.category,
            "source_category": q.source_category,
            "prompt_sha256": q.prompt_sha256,
            "tstamp": time.time(),
            "decoders": {d.name: run_record(runs[d.name], tokenizer, reference) for d in decoders},
        }
        records.append(record)
        with open(out_dir / ANSWERS, "a") as f:
            f.write(json.dumps(record) + "\n")
    order = {(q.category, q.question_id): i for i, q in enumerate(questions)}
    records = [r for r in records if (r["category"], r["question_id"]) in order]
    records.sort(key=lambda r: order[(r["category"], r["question_id"])])
    summaries = summarize_decoders(records, decoders)
    summary: dict[str, Any] = {**summaries[KANGAROO], "decoders": summaries}
    del summary["settings"]
    if profile:
        summary["cost_profile"] = _profile(km, chat_ids(tokenizer, questions[0].prompt, device), records)
    summary["config"] = dict(settings)
    summary["config"]["dtype_reason"] = km.dtype_reason
    summary["config"]["machine"] = machine(device)
    if done:
        summary["config"]["resumed_questions"] = len(finished & set(order))
    if spec_bench_dir is not None:
        written = write_spec_bench(records, spec_bench_dir, model_ids)
        summary["config"]["spec_bench_files"] = [p.name for p in written]
    write_file(out_dir / RESULTS, json.dumps(summary, indent=2) + "\n", OWNER, overwrite=replace)
    plot(summary, out_dir / PLOT, overwrite=replace)
    return summary


def _profile(km: KangarooModel, ids: torch.Tensor, records: list[dict]) -> dict[str, Any]:
    """The cost profile at the first question's context, and what it implies for the rounds kangaroo ran."""
    costs = cost_profile(km, ids)
    kangaroo = [r["decoders"][KANGAROO] for r in records]
    drafts = [d for run in kangaroo for d in run["draft_lengths"]]
    costs["mean_drafts_per_round"] = statistics.fmean(drafts) if drafts else 0.0
    costs["lookup_round_share"] = sum(len(run.get("lookup_rounds", [])) for run in kangaroo) / max(len(drafts), 1)
    costs["speedup_limit_at_measured_tau"] = rounds_limit(costs, records)
    return costs
