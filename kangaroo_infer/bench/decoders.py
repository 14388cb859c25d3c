"""The decoders a benchmark compares, all of one kind: vanilla ``generate``, Kangaroo (chain and tree) and the peers
(HF prompt lookup, assisted generation, Kangaroo with drafters turned off). Each is a ``Decoder``: a name, the
settings results.json records, and a function that decodes one prompt into a ``DecoderRun``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..base import load_base
from ..model import KangarooModel
from .out_dir import display_name

DEFAULT_PLD_TOKENS = (10,)  # HF's own default for prompt_lookup_num_tokens, and Spec-Bench's PLD setting
VANILLA, KANGAROO, TREE = "vanilla", "kangaroo", "kangaroo-tree"  # the decoders every question benchmark has


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def sampling_kwargs(temperature: float) -> dict[str, Any]:
    """``generate``'s sampling arguments for plain temperature sampling, as Kangaroo's (no top-k / top-p from the
    generation config)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return {"do_sample": False}


def run_vanilla(
    km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> tuple[list[int], float]:
    """The base's own ``generate`` on one prompt [1, T]: its new tokens and the seconds it took."""
    if temperature > 0:
        torch.manual_seed(seed)
    return _timed_generate(km.base, ids, max_new_tokens, **sampling_kwargs(temperature))


def _timed_generate(model: Any, ids: torch.Tensor, max_new_tokens: int, **kw: Any) -> tuple[list[int], float]:
    pad = model.generation_config.pad_token_id
    out, seconds = _timed(
        lambda: model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad if pad is not None else 0,
            **kw,
        )
    )
    return out[0, ids.shape[1] :].tolist(), seconds


def run_kangaroo(km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, **kw: Any) -> tuple[Any, float]:
    """``KangarooModel.generate`` and the seconds it took."""
    return _timed(lambda: km.generate(ids, max_new_tokens=max_new_tokens, **kw))


@dataclass
class DecoderRun:
    """One question decoded by one decoder: its new tokens, wall time, and what each full-model forward committed."""

    tokens: list[int]
    wall_time: float
    accept_lengths: list[int]  # tokens committed per forward of the base (the prefill's first token included)
    decoding_steps: int  # forwards of the base
    draft_lengths: list[int] | None = None  # Kangaroo's own loop: tokens proposed per round
    lookup_rounds: list[int] | None = None  # Kangaroo's own loop: the rounds whose drafts were copies


@dataclass(frozen=True)
class Decoder:
    """A named decoder of the base, run on every question (interleaved with the others) and compared with vanilla.

    ``run(km, ids, max_new_tokens, seed=0)`` decodes one prompt [1, T]; ``seed`` matters to sampling decoders only.
    ``prepare(km)``, where given, loads what the decoder needs besides ``km`` (a draft model, a float32 base) before
    the first question, so a missing file is reported before anything is written or timed.
    """

    name: str  # e.g. "pld-10": the key in answers.jsonl and results.json, and the Spec-Bench model id part
    settings: dict[str, Any]  # what results.json records about it
    run: Callable[..., DecoderRun] = field(compare=False)
    prepare: Callable[[KangarooModel], Any] | None = field(default=None, compare=False)


Peer, PeerRun = Decoder, DecoderRun  # the names of the peers' API before vanilla and kangaroo were decoders too


def run_vanilla_decoder(
    km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, seed: int = 0, temperature: float = 0.0
) -> DecoderRun:
    """Vanilla as a decoder: one token per forward."""
    tokens, seconds = run_vanilla(km, ids, max_new_tokens, temperature, seed)
    return DecoderRun(tokens, seconds, [1] * len(tokens), len(tokens))


class _CommitRecorder:
    """A generate streamer: transformers puts the prompt first, then once per forward the tokens it committed."""

    def __init__(self) -> None:
        self.puts: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(int(value.numel()))

    def end(self) -> None:
        pass


def run_generate_peer(
    km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, seed: int = 0, **kw: Any
) -> DecoderRun:
    """The base's ``generate`` with a speculative option of transformers' (``kw``), greedy (``seed`` unused).

    Its per-forward acceptance is not returned by ``generate``: the commits come from a streamer (transformers
    streams each verification's accepted tokens at once) and the forwards from a hook on the base (an assistant
    model's own forwards are not counted), so τ is measured, not assumed.
    """
    recorder, forwards = _CommitRecorder(), [0]

    def count(*_: Any) -> None:
        forwards[0] += 1

    handle = km.base.register_forward_pre_hook(count)
    try:
        tokens, seconds = _timed_generate(km.base, ids, max_new_tokens, do_sample=False, streamer=recorder, **kw)
    finally:
        handle.remove()
    return DecoderRun(tokens, seconds, recorder.puts[1:], forwards[0])


def run_prompt_lookup(
    km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, seed: int = 0, num_tokens: int = 10
) -> DecoderRun:
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


def run_assisted(
    km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, seed: int = 0, draft: DraftModel | None = None
) -> DecoderRun:
    """transformers' assisted generation (``assistant_model``) with a standalone draft model, greedy."""
    assert draft is not None
    return run_generate_peer(km, ids, max_new_tokens, assistant_model=draft.load(km))


@dataclass
class Float32Base:
    """The base loaded again in float32 from its own files (not the run's bf16 weights widened), on first use, on
    the run's device: vanilla ``generate`` in the dtype a machine without native bf16 would run."""

    model: Any = None

    def load(self, km: KangarooModel) -> Any:
        if self.model is None:
            if km.base.dtype == torch.float32:
                raise ValueError(
                    "--peers fp32 times vanilla generate in float32 beside a run in another dtype, and this run is "
                    "float32 already (its vanilla is that): drop fp32 from --peers, or pass --dtype bfloat16."
                )
            name = km.base.config.name_or_path
            if not name or not Path(name).is_dir():
                raise ValueError(
                    f"--peers fp32 loads the base again in float32 from its directory, and the base records none "
                    f"({name!r}): pass --base DIR."
                )
            self.model = load_base(name, torch.float32, km.base.device)
        return self.model


def run_vanilla_fp32(
    km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, seed: int = 0, base: Float32Base | None = None
) -> DecoderRun:
    """Vanilla ``generate`` of the base in float32, greedy: one token per forward."""
    assert base is not None
    tokens, seconds = _timed_generate(base.load(km), ids, max_new_tokens, do_sample=False)
    return DecoderRun(tokens, seconds, [1] * len(tokens), len(tokens))


def run_kangaroo_peer(
    km: KangarooModel, ids: torch.Tensor, max_new_tokens: int, seed: int = 0, **kw: Any
) -> DecoderRun:
    """Kangaroo's own loop with ``kw`` (some drafting turned off, a tree, sampling): seeded when it samples."""
    seeded = {"seed": seed} if kw.get("temperature", 0.0) > 0 else {}
    out, seconds = run_kangaroo(km, ids, max_new_tokens, **kw, **seeded)
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    steps = len(out.accept_lengths)
    return DecoderRun(tokens, seconds, out.accept_lengths, steps, out.draft_lengths, out.lookup_rounds)


def _plain_peers(options: dict[str, Any]) -> list[Decoder]:
    settings = {"kind": "plain", "implementation": "kangaroo generate(max_draft_steps=0, lookup_tokens=0)"}
    return [Decoder("kangaroo-plain", settings, partial(run_kangaroo_peer, max_draft_steps=0, lookup_tokens=0))]


def _lookup_peers(options: dict[str, Any]) -> list[Decoder]:
    """Kangaroo's lookup drafting alone: the same lookup and policy settings as the kangaroo run, adapter off."""
    lookup, policy = options["lookup_tokens"], options["policy"]
    settings = {"kind": "lookup", "implementation": "kangaroo generate(max_draft_steps=0)", "lookup_tokens": lookup}
    run = partial(run_kangaroo_peer, max_draft_steps=0, lookup_tokens=lookup, policy=policy)
    return [Decoder("kangaroo-lookup", settings, run)]


def _adapter_peers(options: dict[str, Any]) -> list[Decoder]:
    """Kangaroo's adapter alone: the same policy as the kangaroo run, lookup off."""
    settings = {"kind": "adapter", "implementation": "kangaroo generate(lookup_tokens=0)"}
    run = partial(run_kangaroo_peer, lookup_tokens=0, policy=options["policy"])
    return [Decoder("kangaroo-adapter", settings, run)]


def _pld_peers(options: dict[str, Any]) -> list[Decoder]:
    return [
        Decoder(
            f"pld-{n}",
            {"kind": "pld", "implementation": "transformers generate(prompt_lookup_num_tokens)", "num_tokens": n},
            partial(run_prompt_lookup, num_tokens=n),
        )
        for n in list(options.get("pld_tokens") or DEFAULT_PLD_TOKENS)
    ]


def _assisted_peers(options: dict[str, Any]) -> list[Decoder]:
    settings = {
        "kind": "assisted",
        "implementation": "transformers generate(assistant_model)",
        "draft_model": display_name(options["draft_model"]),
    }
    draft = DraftModel(options["draft_model"])
    return [Decoder("assisted", settings, partial(run_assisted, draft=draft), draft.load)]


def _fp32_peers(options: dict[str, Any]) -> list[Decoder]:
    settings = {"kind": "fp32", "implementation": "transformers generate, base loaded in float32", "dtype": "float32"}
    base = Float32Base()
    return [Decoder("vanilla-fp32", settings, partial(run_vanilla_fp32, base=base), base.load)]


# Peer kinds by the name --peers takes; each builds its peers from bench's peer options (a new kind adds an entry).
PEER_KINDS: dict[str, Callable[[dict[str, Any]], list[Decoder]]] = {
    "pld": _pld_peers,
    "assisted": _assisted_peers,
    # Kangaroo without its adapter: every round a plain step (the loop's own saving over generate), or lookup only.
    "plain": _plain_peers,
    "lookup": _lookup_peers,
    "adapter": _adapter_peers,
    # vanilla generate in float32 beside a bf16 run: the dtype question answered in the same process (its
    # "identical" says whether fp32's greedy answer equals bf16's, which nothing promises).
    "fp32": _fp32_peers,
}


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


def make_peers(
    kinds: list[str] | None,
    pld_tokens: list[int] | None = None,
    draft_model: str | Path | None = None,
    lookup_tokens: int | None = None,
    policy: str = "adaptive",
) -> list[Decoder]:
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
    check_draft_model(None if draft_model is None else str(draft_model), kinds)
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
    return [p for kind in kinds for p in PEER_KINDS[kind](options)]


def make_decoders(kangaroo: dict[str, Any], tree: dict[str, Any] | None, peers: list[Decoder]) -> list[Decoder]:
    """Every decoder of a question benchmark, in the order they start their first question: vanilla, kangaroo with
    ``kangaroo`` (generate's keyword arguments), kangaroo in tree mode with ``tree`` (when given), then the peers."""
    temperature = kangaroo.get("temperature", 0.0)
    vanilla = Decoder(
        VANILLA,
        {"kind": "vanilla", "implementation": "transformers generate"},
        partial(run_vanilla_decoder, temperature=temperature),
    )
    chain = Decoder(
        KANGAROO, {"kind": "kangaroo", "implementation": "kangaroo generate"}, partial(run_kangaroo_peer, **kangaroo)
    )
    decoders = [vanilla, chain]
    if tree is not None:
        settings = {"kind": "tree", "implementation": "kangaroo generate(tree=True)"}
        settings.update(tree_top_k=tree.get("tree_top_k"), tree_max_nodes=tree.get("tree_max_nodes"))
        decoders.append(Decoder(TREE, settings, partial(run_kangaroo_peer, **tree)))
    return decoders + list(peers)
