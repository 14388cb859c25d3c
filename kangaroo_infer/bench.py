"""Spec-Bench style benchmark: vanilla greedy ``generate``, Kangaroo and peer decoders (e.g. HF prompt lookup)
interleaved per question in one process.

Writes ``results.json`` (overall and per-category speedup, τ, tokens/s, identity; a measured cost profile and the
speedup limit it implies), ``answers.jsonl`` (Spec-Bench's per-question fields), ``speedup.png`` and prints a table;
optionally one Spec-Bench model-answer file per decoder (``--spec-bench-dir``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .base import check_file_target, write_file
from .cache import KangarooCache
from .draft import adapter_logits, shallow_step
from .dtype import cpu_name
from .model import KangarooModel
from .questions import Question, chat_ids
from .verify import deep_logits

ANSWERS = "answers.jsonl"  # one record per question, appended as each finishes
SETTINGS = "bench_settings.json"  # what a resumed run must match
RESULTS, PLOT, SWEEP = "results.json", "speedup.png", "sweep.json"
OWNER = "bench"  # the writer named in --out's written list (kangaroo_infer.base.write_file)
DEFAULT_PLD_TOKENS = (10,)  # HF's own default for prompt_lookup_num_tokens, and Spec-Bench's PLD setting
log = logging.getLogger(__name__)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_vanilla(
    km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> tuple[list[int], float]:
    sampling = {"do_sample": False}
    if temperature > 0:  # plain temperature sampling, as Kangaroo's (no top-k / top-p from the generation config)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return _timed_generate(km, ids, max_new_tokens, **sampling)


def _timed_generate(km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, **kw) -> tuple[list[int], float]:
    """The base's own ``generate`` on one prompt [1, T]: its new tokens and the seconds it took."""
    pad = km.base.generation_config.pad_token_id
    out, seconds = _timed(
        lambda: km.base.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad if pad is not None else 0,
            **kw,
        )
    )
    return out[0, ids.shape[1] :].tolist(), seconds


def run_kangaroo(km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, **kw) -> tuple[Any, float]:
    return _timed(lambda: km.generate(ids, max_new_tokens=max_new_tokens, **kw))


# ---- peers: other lossless decoders of the same base, run beside vanilla and kangaroo -------------------------------


@dataclass
class PeerRun:
    """One question decoded by a peer: its new tokens, wall time, and what each full-model forward committed."""

    tokens: list[int]
    wall_time: float
    accept_lengths: list[int]  # tokens committed per forward of the base (the prefill's first token included)
    decoding_steps: int  # forwards of the base, counted by a forward hook


@dataclass(frozen=True)
class Peer:
    """A named decoder, greedy and lossless by design, that bench checks against vanilla on every question."""

    name: str  # e.g. "pld-10": the column, results.json key and Spec-Bench model id part
    settings: dict[str, Any]  # what results.json records about it
    run: Callable[[KangarooModel, torch.Tensor, int], PeerRun] = field(compare=False)


class _CommitRecorder:
    """A generate streamer: transformers puts the prompt first, then once per forward the tokens it committed."""

    def __init__(self) -> None:
        self.puts: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(int(value.numel()))

    def end(self) -> None:
        pass


def run_generate_peer(km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, **kw: Any) -> PeerRun:
    """The base's ``generate`` with a speculative option of transformers' (``kw``), greedy.

    Its per-forward acceptance is not returned by ``generate``: the commits come from a streamer (transformers
    streams each verification's accepted tokens at once) and the forwards from a hook on the base (an assistant
    model's own forwards are not counted), so τ is measured, not assumed.
    """
    recorder, forwards = _CommitRecorder(), [0]

    def count(*_: Any) -> None:
        forwards[0] += 1

    handle = km.base.register_forward_pre_hook(count)
    try:
        tokens, seconds = _timed_generate(km, ids, max_new_tokens, do_sample=False, streamer=recorder, **kw)
    finally:
        handle.remove()
    return PeerRun(tokens, seconds, recorder.puts[1:], forwards[0])


def run_prompt_lookup(km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, num_tokens: int) -> PeerRun:
    """transformers' prompt lookup decoding (``prompt_lookup_num_tokens``), greedy."""
    return run_generate_peer(km, ids, max_new_tokens, prompt_lookup_num_tokens=num_tokens)


@dataclass
class DraftModel:
    """A standalone draft model directory (``export-draft``'s, or any small model sharing the base's tokenizer),
    loaded on first use in the base's dtype and on its device."""

    path: str
    model: Any = None

    def load(self, km: KangarooModel) -> Any:
        if self.model is None:
            from transformers import AutoModelForCausalLM

            draft = AutoModelForCausalLM.from_pretrained(self.path, dtype=km.base.dtype)
            if draft.config.vocab_size != km.base.config.vocab_size:
                raise ValueError(
                    f"--draft-model {self.path} has a vocabulary of {draft.config.vocab_size} tokens and the base "
                    f"{km.base.config.vocab_size}: a draft model must share the base's tokenizer (export one with "
                    f"`python -m kangaroo_infer export-draft`)."
                )
            self.model = draft.to(km.base.device).eval()
        return self.model


def run_assisted(km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, draft: DraftModel) -> PeerRun:
    """transformers' assisted generation (``assistant_model``) with a standalone draft model, greedy."""
    return run_generate_peer(km, ids, max_new_tokens, assistant_model=draft.load(km))


def run_kangaroo_peer(km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, **kw: Any) -> PeerRun:
    """Kangaroo's own loop with some drafting turned off (``kw``), e.g. none at all: what the loop saves by itself."""
    out, seconds = run_kangaroo(km, ids, max_new_tokens, **kw)
    return PeerRun(out.sequences[0, ids.shape[1] :].tolist(), seconds, out.accept_lengths, len(out.accept_lengths))


def _plain_peers(options: dict[str, Any]) -> list[Peer]:
    settings = {"kind": "plain", "implementation": "kangaroo generate(max_draft_steps=0, lookup_tokens=0)"}
    return [Peer("kangaroo-plain", settings, partial(run_kangaroo_peer, max_draft_steps=0, lookup_tokens=0))]


def _lookup_peers(options: dict[str, Any]) -> list[Peer]:
    """Kangaroo's lookup drafting alone: the same lookup and policy settings as the kangaroo run, adapter off."""
    lookup, policy = options["lookup_tokens"], options["policy"]
    settings = {"kind": "lookup", "implementation": "kangaroo generate(max_draft_steps=0)", "lookup_tokens": lookup}
    run = partial(run_kangaroo_peer, max_draft_steps=0, lookup_tokens=lookup, policy=policy)
    return [Peer("kangaroo-lookup", settings, run)]


def _adapter_peers(options: dict[str, Any]) -> list[Peer]:
    """Kangaroo's adapter alone: the same policy as the kangaroo run, lookup off."""
    settings = {"kind": "adapter", "implementation": "kangaroo generate(lookup_tokens=0)"}
    run = partial(run_kangaroo_peer, lookup_tokens=0, policy=options["policy"])
    return [Peer("kangaroo-adapter", settings, run)]


def check_draft_model(path: str | None, kinds: list[str]) -> None:
    """``--draft-model`` goes with ``--peers assisted`` and names a model directory."""
    if "assisted" in kinds and path is None:
        raise ValueError(
            "--peers assisted needs --draft-model DIR: a draft model directory, e.g. one written by "
            "`python -m kangaroo_infer export-draft --adapter ADAPTER --out DIR`."
        )
    if path is not None and "assisted" not in kinds:
        raise ValueError("--draft-model sets the assisted peer: add --peers assisted, or drop --draft-model.")
    if path is not None and not (Path(path) / "config.json").is_file():
        raise ValueError(
            f"--draft-model {path}: no model directory there (no config.json); export one with "
            f"`python -m kangaroo_infer export-draft --adapter ADAPTER --out {path}`."
        )


def _pld_peers(pld_tokens: list[int]) -> list[Peer]:
    return [
        Peer(
            f"pld-{n}",
            {"kind": "pld", "implementation": "transformers generate(prompt_lookup_num_tokens)", "num_tokens": n},
            partial(run_prompt_lookup, num_tokens=n),
        )
        for n in pld_tokens
    ]


# Peer kinds by the name --peers takes; each builds its peers from bench's peer options (a new kind adds an entry).
PEER_KINDS: dict[str, Callable[[dict[str, Any]], list[Peer]]] = {
    "pld": lambda options: _pld_peers(list(options.get("pld_tokens") or DEFAULT_PLD_TOKENS)),
    "assisted": lambda options: [
        Peer(
            "assisted",
            {
                "kind": "assisted",
                "implementation": "transformers generate(assistant_model)",
                "draft_model": display_name(options["draft_model"]),
            },
            partial(run_assisted, draft=DraftModel(options["draft_model"])),
        )
    ],
    # Kangaroo without its adapter: every round a plain step (the loop's own saving over generate), or lookup only.
    "plain": _plain_peers,
    "lookup": _lookup_peers,
    "adapter": _adapter_peers,
}


def make_peers(
    kinds: list[str] | None,
    pld_tokens: list[int] | None = None,
    draft_model: str | None = None,
    lookup_tokens: int | None = None,
    policy: str = "adaptive",
) -> list[Peer]:
    """The peers named by ``--peers`` (kinds from PEER_KINDS), in the order given; nothing is loaded yet.
    ``lookup_tokens`` and ``policy`` are kangaroo's, which the lookup peer shares."""
    kinds = list(kinds or [])
    unknown = [k for k in kinds if k not in PEER_KINDS]
    if unknown:
        raise ValueError(f"Unknown peers {unknown}; --peers takes a comma-separated list of {sorted(PEER_KINDS)}.")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"--peers names a peer twice: {kinds}.")
    if pld_tokens is not None and "pld" not in kinds:
        raise ValueError("--pld-tokens sets the pld peer: add --peers pld, or drop --pld-tokens.")
    check_draft_model(draft_model, kinds)
    if "adapter" in kinds and lookup_tokens == 0:
        raise ValueError(
            "--peers adapter is kangaroo with lookup off, and --lookup-tokens 0 already makes the kangaroo run that; "
            "drop one of them."
        )
    if "lookup" in kinds and lookup_tokens == 0:
        raise ValueError(
            "--peers lookup drafts by lookup only and --lookup-tokens 0 turns lookup off (that is --peers plain); "
            "drop one of them."
        )
    options = {
        "pld_tokens": pld_tokens,
        "draft_model": None if draft_model is None else str(draft_model),
        "lookup_tokens": lookup_tokens,
        "policy": policy,
    }
    peers = [p for kind in kinds for p in PEER_KINDS[kind](options)]
    return peers


# ---- checks made before a model loads or a file is touched ---------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
    draft_model: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Every setting of a question benchmark that can be checked without the model: a rejected run must not have
    loaded a model for minutes, nor touched the answers of an earlier one."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be an integer >= 1; got {max_new_tokens!r}.")
    if threshold is not None and (not _is_real(threshold) or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"--threshold (η) must lie in [0, 1]; got {threshold!r}.")
    for flag, value, low in (
        ("--steps", steps, 0),
        ("--tree-top-k", tree_top_k, 1),
        ("--tree-max-nodes", tree_max_nodes, 1),
        ("--lookup-tokens", lookup_tokens, 0),
        ("--num-questions", num_questions, 1),
    ):
        if value is not None and (not _is_int(value) or value < low):
            raise ValueError(f"{flag} must be an integer >= {low}; got {value!r}.")
    if not _is_int(warmup) or warmup < 0:
        raise ValueError(f"--warmup must be an integer >= 0; got {warmup!r}.")
    if not _is_real(temperature) or temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}.")
    if temperature > 0 and tree:
        raise ValueError("Tree drafting is greedy; drop --tree or --temperature.")
    if pld_tokens is not None:
        if not pld_tokens or any(not _is_int(n) or n < 1 for n in pld_tokens):
            raise ValueError(f"--pld-tokens takes comma-separated integers >= 1, e.g. 4,10; got {pld_tokens!r}.")
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


def _complete_lines(path: Path) -> int:
    """Answers in an answers.jsonl: its lines that parse (a line cut off by an interrupted run does not count)."""
    count = 0
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        count += 1
    return count


def may_replace(out_dir: Path, overwrite: bool) -> bool:
    """Whether bench may replace files in ``out_dir`` it did not list as its own: with --overwrite, or in a
    directory an earlier bench wrote before it listed its files (answers and settings both there)."""
    return overwrite or ((out_dir / ANSWERS).is_file() and (out_dir / SETTINGS).is_file())


def check_out_files(out_dir: str | Path, names: tuple[str, ...], overwrite: bool = False) -> None:
    """Refuse, before any work, to replace a file in ``out_dir`` that bench did not write (base.write_file)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; name a directory (a new one, or one bench wrote).")
    replace = may_replace(out_dir, overwrite)
    for name in names:
        check_file_target(out_dir / name, OWNER, overwrite=replace, fix="pass --overwrite to replace it")


def check_out_dir(out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> int:
    """The number of answers already in ``out_dir``; refuses a file, files bench did not write (without
    --overwrite), and answers that neither --resume keeps nor --overwrite discards (forgetting --resume must not
    throw hours of answers away)."""
    out_dir = Path(out_dir)
    check_out_files(out_dir, (SETTINGS, RESULTS, PLOT), overwrite)
    path = out_dir / ANSWERS
    found = _complete_lines(path) if path.is_file() else 0
    if path.exists() and not found:  # no answer in it: a file of the user's, or an empty one of ours
        check_file_target(path, OWNER, overwrite=may_replace(out_dir, overwrite), fix="pass --overwrite to replace it")
    if found and not resume and not overwrite:
        raise ValueError(
            f"{out_dir} already holds {found} answers ({ANSWERS}); pass --resume to keep them and run only the "
            f"missing questions, or --overwrite to discard them and start over (or use another --out)."
        )
    return found


def require_matplotlib() -> None:
    """bench draws speedup.png at the end: find out before decoding for an hour that it cannot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "bench draws speedup.png with matplotlib, which is not installed; pip install 'kangaroo[bench]' "
            "(or pip install matplotlib)."
        ) from None


def display_name(name: Any) -> str | None:
    """A model or adapter as results files record it: a hub id or alias as given, a local path by its directory's
    name (results never hold a path of the machine they ran on)."""
    if name is None or str(name) == "":
        return None
    path = Path(str(name)).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve().name
    return str(name)


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
    batched: bool = False,
) -> dict[str, Any]:
    """The settings a benchmark ran with, as written into results.json (η / γ / lookup after the adapter's
    defaults)."""
    settings = km.generation_settings(
        batched=batched, threshold=threshold, max_draft_steps=steps, temperature=temperature,
        lookup_tokens=lookup_tokens,
    )  # fmt: skip
    threshold, steps = settings.threshold, settings.max_draft_steps
    lookup, min_ngram, max_ngram = settings.lookup_tokens, settings.lookup_min_ngram, settings.lookup_max_ngram
    return {
        "base_model": display_name(km.base.config.name_or_path),
        "exit_layer": km.exit_layer,
        "threshold": threshold,
        "max_draft_steps": steps,
        "policy": policy,
        "lookup_tokens": lookup,
        "lookup_ngram": [min_ngram, max_ngram],
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "dtype": str(km.base.dtype).removeprefix("torch."),
        "exact_verify": km.backbone.invariance is not None,
        "device": str(km.backbone.embed_tokens.weight.device),
        "torch_threads": torch.get_num_threads(),
    }


def summarize(records: list[dict], mode: str | None = None) -> dict[str, Any]:
    """speedup = mean over questions of kangaroo tokens/s ÷ vanilla tokens/s; τ = new tokens ÷ full forwards.

    ``mode`` None reads the chain results of each record, "tree" its ``tree`` sub-record.
    """
    runs = [r if mode is None else r[mode] for r in records]
    v_tps = [r["vanilla_new_tokens"] / r["vanilla_wall_time"] for r in records]
    k_tps = [r["new_tokens"] / r["wall_time"] for r in runs]
    return {
        "speedup": statistics.fmean(k / v for k, v in zip(k_tps, v_tps, strict=True)),
        "tau": sum(r["new_tokens"] for r in runs) / sum(len(r["accept_lengths"]) for r in runs),
        "vanilla_tokens_per_s": statistics.fmean(v_tps),
        "kangaroo_tokens_per_s": statistics.fmean(k_tps),
        "identical": None if any(r["identical"] is None for r in runs) else all(r["identical"] for r in runs),
        "questions": len(records),
    }


def summarize_by_category(records: list[dict], mode: str | None = None) -> dict[str, Any]:
    categories = list(dict.fromkeys(r["category"] for r in records))
    return {
        "overall": summarize(records, mode),
        "categories": {c: summarize([r for r in records if r["category"] == c], mode) for c in categories},
    }


def summarize_peer(records: list[dict], name: str) -> dict[str, Any]:
    """A peer as kangaroo is summarized: speedup = mean over questions of its tokens/s ÷ vanilla tokens/s;
    τ = its new tokens ÷ its full-model forwards; identical = every output equals vanilla's."""
    runs = [r["peers"][name] for r in records]
    v_tps = [r["vanilla_new_tokens"] / r["vanilla_wall_time"] for r in records]
    p_tps = [r["new_tokens"] / r["wall_time"] for r in runs]
    return {
        "speedup": statistics.fmean(p / v for p, v in zip(p_tps, v_tps, strict=True)),
        "tau": sum(r["new_tokens"] for r in runs) / max(sum(r["decoding_steps"] for r in runs), 1),
        "tokens_per_s": statistics.fmean(p_tps),
        "vanilla_tokens_per_s": statistics.fmean(v_tps),
        "identical": all(r["identical"] for r in runs),
        "questions": len(records),
    }


def summarize_peers(records: list[dict], peers: list[Peer]) -> dict[str, Any]:
    """results.json's ``peers``: per peer, its settings and the overall and per-category summaries."""
    categories = list(dict.fromkeys(r["category"] for r in records))
    return {
        p.name: {
            "settings": p.settings,
            "overall": summarize_peer(records, p.name),
            "categories": {c: summarize_peer([r for r in records if r["category"] == c], p.name) for c in categories},
        }
        for p in peers
    }


@torch.inference_mode()
def cost_profile(km: KangarooModel, ids: torch.Tensor, max_k: int = 8, reps: int = 5) -> dict[str, Any]:
    """Median milliseconds of the pieces of a round, measured at the context of ``ids``.

    full_forward_1: all layers + head for one token; deep_verify_k: layers [ℓ, L) + head over k tokens;
    draft_step: layers [0, ℓ) + adapter + head for one token.
    """
    backbone, ell = km.backbone, km.exit_layer
    cache = KangarooCache(ell, backbone.num_layers)
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)  # time finished work only
    token = int(km.prefill(ids, cache).argmax())
    base_len = cache.shallow_len
    adapter_len = base_len  # after the first draft step below, the adapter has read the prompt
    device = ids.device

    def reset():
        cache.crop(base_len, adapter_len)

    exit_state = shallow_step(backbone, ell, cache, torch.tensor([[token]], device=device))
    adapter_logits(backbone, km.adapter, km.draft_head, cache, exit_state)  # the adapter reads the prompt once
    reset()

    def measure(fn) -> float:
        times = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1000)
            reset()
        return statistics.median(times)

    def one_token_full():
        shallow_step(backbone, ell, cache, torch.tensor([[token]], device=device))
        deep_logits(backbone, ell, cache)

    def draft_step():
        state = shallow_step(backbone, ell, cache, torch.tensor([[token]], device=device))
        adapter_logits(backbone, km.adapter, km.draft_head, cache, state).max(-1)

    def verify(k):
        def run():
            sync()
            start = time.perf_counter()
            deep_logits(backbone, ell, cache)
            sync()
            return (time.perf_counter() - start) * 1000

        times = []
        for _ in range(reps):
            for _ in range(k):
                shallow_step(backbone, ell, cache, torch.tensor([[token]], device=device))
            times.append(run())
            reset()
        return statistics.median(times)

    measure(one_token_full)  # warm-up
    profile = {
        "context_tokens": base_len,
        "full_forward_1_ms": measure(one_token_full),
        "draft_step_ms": measure(draft_step),
        "deep_verify_ms": {str(k): verify(k) for k in range(1, max_k + 1)},
    }
    return profile


def speedup_limit(profile: dict[str, Any], tau: float, mean_drafts: float) -> float:
    """Best speedup the measured costs allow at τ, with no overhead at all.

    A round commits τ tokens for k draft steps, one shallow pass of the newest token and one deep verification of
    k + 1 tokens (k = the measured mean drafts per round); plain decoding pays one full forward per token.
    """
    verify = profile["deep_verify_ms"]
    shallow = profile["full_forward_1_ms"] - verify["1"]
    k = min(max(0, round(mean_drafts)), max(int(x) for x in verify) - 1)
    round_ms = mean_drafts * profile["draft_step_ms"] + shallow + verify[str(k + 1)]
    return tau * profile["full_forward_1_ms"] / round_ms


def rounds_limit(profile: dict[str, Any], records: list[dict]) -> float:
    """Best speedup the measured costs allow for the rounds the benchmark actually ran, with no overhead at all.

    An adapter round of k drafts costs k draft steps, the newest token's shallow pass and a deep verification of
    k + 1 tokens; a lookup round of k copied tokens costs one shallow pass and one deep verification over k + 1
    tokens (the shallow layers' extra rows are counted as free); plain decoding pays one full forward per token.
    Verifications wider than the profile measured are priced as its widest one (the limit errs high there).
    """
    verify = profile["deep_verify_ms"]
    widest = max(int(x) for x in verify)
    shallow = profile["full_forward_1_ms"] - verify["1"]
    tokens, ideal_ms = 0, 0.0
    for r in records:
        copied = set(r.get("lookup_rounds", []))
        for i, (k, committed) in enumerate(zip(r["draft_lengths"], r["accept_lengths"][1:], strict=True)):
            drafting = 0.0 if i in copied else k * profile["draft_step_ms"]
            ideal_ms += drafting + shallow + verify[str(min(k + 1, widest))]
            tokens += committed
    return tokens * profile["full_forward_1_ms"] / ideal_ms if ideal_ms else 1.0


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
    ids = torch.randint(0, km.base.config.vocab_size, (1, context), generator=generator).to(device)
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
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
        },
    }
    write_file(out_dir / RESULTS, json.dumps(summary, indent=2) + "\n", OWNER, overwrite=may_replace(out_dir, False))
    return summary


def _decoders(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, {"overall", "categories"}) of every decoder compared with vanilla in a summary."""
    decoders = [("kangaroo", summary)]
    if "tree" in summary:
        decoders.append(("kangaroo tree", summary["tree"]))
    decoders += list(summary.get("peers", {}).items())
    return decoders


def plot(summary: dict[str, Any], path: Path, overwrite: bool = False) -> None:
    """Speedup and τ per category, one bar per decoder (kangaroo, its tree mode, each peer), written to ``path``
    under base.write_file's policy."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*summary["categories"], "overall"]
    decoders = _decoders(summary)
    width = 0.8 / len(decoders)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6, (1.0 + 0.3 * len(decoders)) * len(names)), 3.8))
    for d, (label, table) in enumerate(decoders):
        rows = [*table["categories"].values(), table["overall"]]
        xs = [i - 0.4 + width * (d + 0.5) for i in range(len(names))]
        ax1.bar(xs, [r["speedup"] for r in rows], width, label=label)
        ax2.bar(xs, [r["tau"] for r in rows], width, label=label)
    ax1.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax1.set_title("speedup vs vanilla (×)")
    ax2.set_title("τ (tokens per full forward)")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)), names, rotation=45)
    top = 1.0
    if len(decoders) > 1:  # above the plots, where no bar is
        handles, labels = ax1.get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(decoders), fontsize="small", frameon=False)
        top = 0.92
    fig.tight_layout(rect=(0, 0, 1, top))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_file(path, png.getvalue(), OWNER, overwrite=overwrite)


def print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [*summary["categories"].items(), ("overall", summary["overall"])]
    peers = summary.get("peers", {})
    peer_cells = {
        name: [
            f"{r['speedup']:.3f}x" + ("" if r["identical"] else " (differs)")
            for r in [*peer["categories"].values(), peer["overall"]]
        ]
        for name, peer in peers.items()
    }
    if "tree" in summary:
        tree = summary["tree"]
        rows += [(f"{name} (tree)", r) for name, r in [*tree["categories"].items(), ("overall", tree["overall"])]]
    temperature = summary.get("config", {}).get("temperature", 0.0)
    versus = "kangaroo" + "".join(f", {name}" for name in peers)
    table = Table(title=f"{versus} vs vanilla ({f'temperature {temperature}' if temperature else 'greedy'})")
    table.add_column("category", no_wrap=True, min_width=max(len(name) for name, _ in rows))
    columns = ("questions", "speedup", "τ", "vanilla tok/s", "kangaroo tok/s", "identical")
    for col in (*columns, *(f"{p} speedup" for p in peers)):
        table.add_column(col, justify="right")
    for i, (name, r) in enumerate(rows):
        table.add_row(
            name,
            str(r["questions"]),
            f"{r['speedup']:.3f}x",
            f"{r['tau']:.2f}",
            f"{r['vanilla_tokens_per_s']:.1f}",
            f"{r['kangaroo_tokens_per_s']:.1f}",
            "n/a" if r["identical"] is None else "yes" if r["identical"] else "NO",
            *(cells[i] if i < len(cells) else "" for cells in peer_cells.values()),  # tree rows: no peer cells
        )
    Console(width=max(100 + sum(len(p) + 12 for p in peers), Console().width)).print(table)


def bench(
    km: KangarooModel,
    tokenizer,
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
    """Run every question with vanilla, Kangaroo and each peer (rotating which goes first) and write the results.

    With ``tree=True`` each question is also decoded in tree mode, reported under ``"tree"`` next to the chain.
    ``peers`` (kinds from PEER_KINDS, e.g. ["pld"] with ``pld_tokens`` [4, 10], or ["assisted"] with
    ``draft_model`` a standalone draft directory) decode each question too, are checked against vanilla token for
    token and reported under ``"peers"``; greedy only.
    With ``temperature`` > 0 both sample (seed = question index), so outputs differ: identity is recorded as None.
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
    device = km.backbone.embed_tokens.weight.device
    settings = {
        "adapter": display_name(adapter_name),
        "adapter_sha256": adapter_fingerprint(km),
        **config,
        "tree": [tree_top_k, tree_max_nodes] if tree else None,
        "peers": [p.name for p in peer_list],
        **({"draft_model": display_name(draft_model)} if draft_model is not None else {}),
    }
    model_ids = spec_bench_model_ids(km, temperature, tree, peer_list)
    if spec_bench_dir is not None:
        _check_spec_bench_dir(Path(spec_bench_dir), model_ids, resume or overwrite)
    done = _finished_records(out_dir, settings, questions, resume)  # reads only; raises on other settings
    replace = may_replace(out_dir, overwrite)  # decided before bench writes (then its files are listed as its own)
    # answers.jsonl was checked by check_out_dir (kept with --resume, discarded with --overwrite): replaced here
    write_file(out_dir / ANSWERS, "".join(json.dumps(r) + "\n" for r in done), OWNER, overwrite=True)
    write_file(out_dir / SETTINGS, json.dumps(settings, indent=2) + "\n", OWNER, overwrite=replace)
    finished = {(r["category"], r["question_id"]) for r in done}
    modes: dict[str | None, dict] = {
        None: {"threshold": threshold, "max_draft_steps": steps, "policy": policy, "lookup_tokens": lookup_tokens}
    }
    if temperature > 0:
        modes[None]["temperature"] = temperature
    if tree:
        modes["tree"] = {**modes[None], "tree": True, "tree_top_k": tree_top_k, "tree_max_nodes": tree_max_nodes}
    peer_by_name = {p.name: p for p in peer_list}
    for q in questions[:warmup]:
        ids = chat_ids(tokenizer, q.prompt, device)
        run_vanilla(km, ids, min(32, max_new_tokens))
        for kw in modes.values():
            run_kangaroo(km, ids, min(32, max_new_tokens), **kw)
        for p in peer_list:
            p.run(km, ids, min(32, max_new_tokens))
    records = list(done)
    todo = [(i, q) for i, q in enumerate(questions) if (q.category, q.question_id) not in finished]
    iterator = tqdm(todo, desc="bench", unit="question") if progress else todo
    for i, q in iterator:
        ids = chat_ids(tokenizer, q.prompt, device)
        runs: dict[str | None, tuple] = {}
        peer_runs: dict[str, PeerRun] = {}
        order = ["vanilla", *modes, *peer_by_name]
        for name in order[i % len(order) :] + order[: i % len(order)]:  # rotate who goes first
            if name == "vanilla":
                vanilla_tokens, vanilla_time = run_vanilla(km, ids, max_new_tokens, temperature, seed=i)
            elif name in peer_by_name:
                peer_runs[name] = peer_by_name[name].run(km, ids, max_new_tokens)
            else:
                seeded = {"seed": i} if temperature > 0 else {}
                runs[name] = run_kangaroo(km, ids, max_new_tokens, **modes[name], **seeded)
        record = {
            "question_id": q.question_id,
            "category": q.category,
            "source_category": q.source_category,
            "prompt_sha256": q.prompt_sha256,
        }
        for name, (out, wall) in runs.items():
            new = out.sequences[0, ids.shape[1] :].tolist()
            result = {
                "turns": [tokenizer.decode(new, skip_special_tokens=True)],
                "new_tokens": len(new),
                "wall_time": wall,
                "accept_lengths": out.accept_lengths,
                "decoding_steps": len(out.accept_lengths),
                "draft_lengths": out.draft_lengths,
                "lookup_rounds": out.lookup_rounds,
                "identical": new == vanilla_tokens if temperature == 0 else None,
            }
            if name is None:
                record.update(result)
            else:
                record[name] = result
        if peer_runs:
            record["peers"] = {
                name: {
                    "turns": [tokenizer.decode(run.tokens, skip_special_tokens=True)],
                    "new_tokens": len(run.tokens),
                    "wall_time": run.wall_time,
                    "accept_lengths": run.accept_lengths,
                    "decoding_steps": run.decoding_steps,
                    "identical": run.tokens == vanilla_tokens,
                }
                for name, run in peer_runs.items()
            }
        record.update(
            {
                "vanilla_turns": [tokenizer.decode(vanilla_tokens, skip_special_tokens=True)],
                "vanilla_new_tokens": len(vanilla_tokens),
                "vanilla_wall_time": vanilla_time,
                "tstamp": time.time(),
            }
        )
        records.append(record)
        with open(out_dir / ANSWERS, "a") as f:
            f.write(json.dumps(record) + "\n")
    order = {(q.category, q.question_id): i for i, q in enumerate(questions)}
    records = [r for r in records if (r["category"], r["question_id"]) in order]
    records.sort(key=lambda r: order[(r["category"], r["question_id"])])
    summary: dict[str, Any] = summarize_by_category(records)
    if tree:
        tree_settings = km.generation_settings(tree=True, tree_top_k=tree_top_k, tree_max_nodes=tree_max_nodes)
        top_k, max_nodes = tree_settings.tree_top_k, tree_settings.tree_max_nodes
        summary["tree"] = {**summarize_by_category(records, "tree"), "tree_top_k": top_k, "tree_max_nodes": max_nodes}
    if peer_list:
        summary["peers"] = summarize_peers(records, peer_list)
    mean_drafts = statistics.fmean(d for r in records for d in r["draft_lengths"]) if records else 0.0
    if profile:
        costs = cost_profile(km, chat_ids(tokenizer, questions[0].prompt, device))
        costs["mean_drafts_per_round"] = mean_drafts
        rounds = sum(len(r["draft_lengths"]) for r in records)
        costs["lookup_round_share"] = sum(len(r.get("lookup_rounds", [])) for r in records) / max(rounds, 1)
        costs["speedup_limit_at_measured_tau"] = rounds_limit(costs, records)
        summary["cost_profile"] = costs
    summary["config"] = dict(settings)
    summary["config"]["dtype_reason"] = km.dtype_reason
    summary["config"]["cpu"] = cpu_name()
    if done:
        summary["config"]["resumed_questions"] = len(finished & set(order))
    if spec_bench_dir is not None:
        written = write_spec_bench(records, spec_bench_dir, model_ids)
        summary["config"]["spec_bench_files"] = [p.name for p in written]
    write_file(out_dir / RESULTS, json.dumps(summary, indent=2) + "\n", OWNER, overwrite=replace)
    plot(summary, out_dir / PLOT, overwrite=replace)
    return summary


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
    """The answers a resumed run keeps (none unless ``resume``). Reads only: refuses answers written with other
    settings, and leaves out (to decode again) those whose question text changed since."""
    path, settings_path = out_dir / ANSWERS, out_dir / SETTINGS
    records: list[dict] = []
    if not (resume and path.is_file()):
        return records
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(
                    f"{path}: line {number} is not valid JSON; pass --overwrite to start over (or repair that line)."
                ) from None
            # the line being written when the run was stopped: that question runs again
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


# ---- Spec-Bench model-answer files ---------------------------------------------------------------------------------


def spec_bench_model_ids(km: KangarooModel, temperature: float, tree: bool, peers: list[Peer]) -> dict[str, str]:
    """decoder -> Spec-Bench model id, in Spec-Bench's naming (model, method, dtype, temperature), e.g.
    ``smollm2-135m-instruct-pld-10-float32-temp-0.0``."""
    model = (display_name(km.base.config.name_or_path) or "model").rsplit("/", 1)[-1]
    dtype = str(km.base.dtype).removeprefix("torch.")
    decoders = ["vanilla", "kangaroo", *(["kangaroo-tree"] if tree else []), *(p.name for p in peers)]
    return {d: f"{model}-{d}-{dtype}-temp-{float(temperature)}" for d in decoders}


def _check_spec_bench_dir(directory: Path, model_ids: dict[str, str], replace: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--spec-bench-dir {directory} is a file; name a directory.")
    existing = [f"{m}.jsonl" for m in model_ids.values() if (directory / f"{m}.jsonl").exists()]
    if existing and not replace:
        raise ValueError(
            f"{directory} already holds Spec-Bench answers {existing}; pass --resume or --overwrite to replace them "
            f"(or use another --spec-bench-dir)."
        )


def _question_order(record: dict) -> tuple:
    """Spec-Bench sorts answer files by question_id (integers there); other ids sort after them, as text."""
    qid = record["question_id"]
    numeric = isinstance(qid, int | float) and not isinstance(qid, bool)
    return (0, qid, "") if numeric else (1, 0, str(qid)), record["category"]


def _decoder_run(record: dict, decoder: str) -> dict[str, Any]:
    """One decoder's result in a record: turns, new_tokens, wall_time, accept_lengths, decoding_steps."""
    if decoder == "vanilla":
        n = record["vanilla_new_tokens"]  # one token per forward: plain decoding
        return {
            "turns": record["vanilla_turns"],
            "new_tokens": n,
            "wall_time": record["vanilla_wall_time"],
            "accept_lengths": [1] * n,
            "decoding_steps": n,
        }
    if decoder == "kangaroo":
        return record
    if decoder == "kangaroo-tree":
        return record["tree"]
    return record["peers"][decoder]


def write_spec_bench(records: list[dict], directory: str | Path, model_ids: dict[str, str]) -> list[Path]:
    """One Spec-Bench model-answer file per decoder, ``DIR/<model_id>.jsonl``, that Spec-Bench's
    evaluation/speed.py and evaluation/equal.py read as they read their own: a line per question, sorted by
    question_id, with the question file's own category and ``choices[0]`` holding turns, decoding_steps,
    new_tokens, wall_time (one entry per turn; bench decodes the first turn) and accept_lengths (tokens committed
    per full-model forward)."""
    directory = Path(directory)
    rows = sorted(records, key=_question_order)
    written = []
    for decoder, model_id in model_ids.items():
        lines = []
        for r in rows:
            run = _decoder_run(r, decoder)
            choice = {
                "index": 0,
                "turns": run["turns"],
                "decoding_steps": [run["decoding_steps"]],
                "new_tokens": [run["new_tokens"]],
                "wall_time": [run["wall_time"]],
                "accept_lengths": run["accept_lengths"],
            }
            answer = {
                "question_id": r["question_id"],
                "category": r.get("source_category", r["category"]),
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "choices": [choice],
                "tstamp": r.get("tstamp", time.time()),
            }
            lines.append(json.dumps(answer) + "\n")
        # checked by _check_spec_bench_dir (replaced only with --resume or --overwrite); atomic: never half a file
        written.append(write_file(directory / f"{model_id}.jsonl", "".join(lines), OWNER, overwrite=True))
    return written


def sweep(
    km: KangarooModel,
    tokenizer,
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
    prompts = [chat_ids(tokenizer, q.prompt, device) for q in questions]
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
    result = {"grid": results, "best": best, "questions": len(questions)}
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


def _row_tokens(new: list[int], eos_ids: frozenset[int]) -> list[int]:
    """A batched generate's new tokens for one row, up to and including its first end-of-sequence token."""
    for i, token in enumerate(new):
        if token in eos_ids:
            return new[: i + 1]
    return new


def batch_throughput(
    km: KangarooModel,
    tokenizer,
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
) -> dict[str, Any]:
    """Throughput mode: for each B, the questions in batches of B (left-padded), Kangaroo batched vs the base's own
    batched ``generate``; tokens/s over the batch = new tokens of all rows ÷ wall time. Written under "batch" in
    results.json (other keys there are kept). Greedy rows are compared with vanilla's batched rows for information
    only: padding changes float rounding, and exactness is defined against each row's own unbatched run."""
    from .batch import pad_token_id

    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"--batch-size needs positive batch sizes, e.g. 1,4,8; got {batch_sizes}.")
    out_dir = Path(out_dir)
    check_out_files(out_dir, (RESULTS,))
    device = km.backbone.embed_tokens.weight.device
    pad_id = pad_token_id(km)
    eos_ids = km.resolve_eos("from_generation_config")
    prompts = [chat_ids(tokenizer, q.prompt, device) for q in questions]
    kw = {"threshold": threshold, "max_draft_steps": steps, "policy": policy, "temperature": temperature}
    if lookup_tokens is not None:  # batches copy per row too (0: off); None keeps the adapter's default
        kw["lookup_tokens"] = lookup_tokens
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}

    def vanilla(ids, mask, seed):
        torch.manual_seed(seed)
        out = km.base.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
        return [_row_tokens(row, eos_ids) for row in out[:, ids.shape[1] :].tolist()]

    def kangaroo(ids, mask, seed):
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
    summary["batch_config"] = run_config(km, threshold, steps, policy, temperature, max_new_tokens, batched=True)
    write_file(path, json.dumps(summary, indent=2) + "\n", OWNER, overwrite=may_replace(out_dir, False))
    return summary


def print_batch_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="batched throughput: kangaroo vs vanilla (tokens/s over the batch)")
    for col in ("batch size", "rows", "vanilla tok/s", "kangaroo tok/s", "speedup", "τ"):
        table.add_column(col, justify="right")
    for size, r in summary["batch"].items():
        table.add_row(
            size,
            str(r["rows"]),
            f"{r['vanilla_tokens_per_s']:.1f}",
            f"{r['kangaroo_tokens_per_s']:.1f}",
            f"{r['speedup']:.3f}x",
            f"{r['tau']:.2f}",
        )
    Console(width=max(100, Console().width)).print(table)
