"""Serve the exported Kangaroo draft in vLLM and check that speculative decoding changes no output (issue #27).

Run by the engine environment's python (scripts/serve_check.sh sets it up), never by the project's .venv: it imports
only vllm, transformers and torch as that environment has them, nothing from kangaroo_infer.

The parent process reads the Spec-Bench questions, applies the base's chat template (as kangaroo's ``bench`` does:
one user turn plus the assistant header) and starts one worker process per mode, each with its own engine:

- ``plain``: vLLM without speculation (the reference),
- ``draft``: vLLM with the exported draft (``method: draft_model``),
- ``ngram``: vLLM's own prompt-lookup speculation (``method: ngram``), a peer,
- ``hf``: HF transformers ``generate`` on the same token ids (a peer for speed; not part of the exit status).

Every mode decodes the same prompt token ids greedily with the same max tokens, one prompt at a time after a
warm-up, so tokens/s is single-stream decoding speed. The parent compares the token ids, writes ``results.json``
and ``outputs.jsonl`` and prints one summary line last. Exit status 0 iff every speculative output equals the plain
one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("plain", "draft", "ngram", "hf")
SPECULATIVE = ("draft", "ngram")
# Spec-Bench folds MT-bench's eight categories into one (kangaroo_infer/questions.py does the same).
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


def select_questions(path: Path, count: int) -> list[dict[str, Any]]:
    """The first ceil(count / categories) questions of each category, in file order, cut to ``count``.

    With 6 Spec-Bench categories and count 12 these are exactly the questions of ``kangaroo_infer bench
    --num-questions 2``, so kangaroo's own numbers can be taken on the same prompts.
    """
    if count < 1:
        raise ValueError(f"--num-prompts must be >= 1; got {count}.")
    if not path.is_file():
        raise ValueError(f"Questions file {str(path)!r} does not exist; pass Spec-Bench's question.jsonl.")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not row.get("turns") or "category" not in row:
            raise ValueError(f"{path}, line {lineno}: needs fields question_id, category and turns.")
        category = "mt_bench" if row["category"] in MT_BENCH_CATEGORIES else row["category"]
        rows.append({"question_id": row.get("question_id"), "category": category, "text": row["turns"][0]})
    categories = list(dict.fromkeys(r["category"] for r in rows))
    per_category = -(-count // len(categories))
    taken: dict[str, int] = {}
    kept = []
    for row in rows:
        if taken.get(row["category"], 0) < per_category:
            taken[row["category"]] = taken.get(row["category"], 0) + 1
            kept.append(row)
    if len(kept) < count:
        raise ValueError(f"{path} holds only {len(kept)} questions for --num-prompts {count}.")
    return kept[:count]


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """One user turn in the chat template plus the assistant header (kangaroo_infer.questions.chat_prompt_ids)."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )


def spec_counters(llm: Any) -> dict[str, float]:
    """vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens) as they stand now."""
    wanted = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
    }
    counters = {v: 0.0 for v in wanted.values()}
    for metric in llm.get_metrics():
        if metric.name in wanted:
            counters[wanted[metric.name]] += float(metric.value)
    return counters


def run_vllm(mode: str, job: dict[str, Any]) -> dict[str, Any]:
    """Decode every prompt with one vLLM engine: no speculation, the exported draft, or n-gram lookup."""
    import vllm
    from vllm import LLM, SamplingParams

    spec = None
    if mode == "draft":
        spec = {"method": "draft_model", "model": job["draft"], "num_speculative_tokens": job["k"]}
    elif mode == "ngram":
        spec = {
            "method": "ngram",
            "num_speculative_tokens": job["ngram_k"],
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 2,
        }
    started = time.perf_counter()
    llm = LLM(
        model=job["base"],
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        speculative_config=spec,
        disable_log_stats=False,
        seed=0,
    )
    startup_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    llm.generate(
        [{"prompt_token_ids": job["prompts"][0]}], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False
    )  # warm-up outside the timed loop
    before = spec_counters(llm)
    outputs, seconds = [], []
    for ids in job["prompts"]:
        t0 = time.perf_counter()
        result = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        outputs.append(list(result[0].outputs[0].token_ids))
    after = spec_counters(llm)
    counters = {key: after[key] - before[key] for key in after}
    return {
        "engine": f"vllm {vllm.__version__}",
        "startup_s": startup_s,
        "outputs": outputs,
        "seconds": seconds,
        "spec": counters if spec else None,
        "speculative_config": spec,
    }


def run_hf(job: dict[str, Any]) -> dict[str, Any]:
    """HF transformers greedy ``generate`` on the same token ids, in the same dtype (a speed peer)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    dtype = getattr(torch, job["dtype"])
    model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=dtype).eval()
    with torch.inference_mode():
        warm = torch.tensor([job["prompts"][0]])
        model.generate(warm, attention_mask=torch.ones_like(warm), do_sample=False, max_new_tokens=8)
        outputs, seconds = [], []
        for ids in job["prompts"]:
            prompt = torch.tensor([ids])
            t0 = time.perf_counter()
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=job["max_tokens"]
            )
            seconds.append(time.perf_counter() - t0)
            new = out[0, prompt.shape[1] :].tolist()
            outputs.append(new)
    return {
        "engine": f"transformers {transformers.__version__} (torch {torch.__version__})",
        "outputs": outputs,
        "seconds": seconds,
        "spec": None,
    }


def worker(mode: str, job_path: Path, result_path: Path) -> None:
    """One mode in its own process (one vLLM engine per process)."""
    job = json.loads(job_path.read_text())
    result = run_hf(job) if mode == "hf" else run_vllm(mode, job)
    result_path.write_text(json.dumps(result))


def tokens_per_s(result: dict[str, Any]) -> float:
    return sum(len(o) for o in result["outputs"]) / sum(result["seconds"])


def mean_acceptance(spec: dict[str, float] | None) -> tuple[float, float] | None:
    """(tokens committed per target forward = 1 + accepted / drafts, share of draft tokens accepted)."""
    if not spec or not spec["drafts"]:
        return None
    return 1.0 + spec["accepted_tokens"] / spec["drafts"], spec["accepted_tokens"] / max(spec["draft_tokens"], 1)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the target model's HF directory")
    parser.add_argument("--draft", required=True, help="the exported draft's directory (export-draft)")
    parser.add_argument("--questions", required=True, help="Spec-Bench question.jsonl")
    parser.add_argument("--num-prompts", type=int, default=12, help="prompts to decode (default 12)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    parser.add_argument("--k", type=int, default=2, help="num_speculative_tokens for the draft (default 2)")
    parser.add_argument("--ngram-k", type=int, default=4, help="num_speculative_tokens for n-gram (default 4)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--modes", default="plain,draft,ngram,hf", help=f"comma-separated, from {list(MODES)}")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the hf mode (default: all cores)"
    )
    parser.add_argument("--out", required=True, help="directory for results.json, outputs.jsonl and worker logs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.job), Path(args.result))
        return 0

    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "plain" not in modes:
        raise SystemExit(f"error: --modes must include plain and take only {list(MODES)}; got {args.modes!r}.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    questions = select_questions(Path(args.questions), args.num_prompts)
    prompts = [chat_ids(tokenizer, q["text"]) for q in questions]
    job = {
        "base": str(Path(args.base).absolute()),
        "draft": str(Path(args.draft).absolute()),
        "dtype": args.dtype,
        "k": args.k,
        "ngram_k": args.ngram_k,
        "max_tokens": args.max_tokens,
        # fixed, so that vLLM's compile cache (keyed on it) is reused across runs
        "max_model_len": max(2048, 1 << (max(len(p) for p in prompts) + args.max_tokens).bit_length()),
        "threads": args.threads,
        "prompts": prompts,
    }
    (out / "job.json").write_text(json.dumps(job))
    env = dict(os.environ)
    # vLLM keeps its own CPU defaults: it reserves one core for the engine process and binds its compute threads to
    # the rest (1 of 2 here). Binding both cores (VLLM_CPU_OMP_THREADS_BIND=0-1) ran at 2.9 tokens/s against 16.5 with
    # the default in one trial each on this shared 2-core machine: pinned OpenMP threads wait on a busy neighbour.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default sizes it from free memory
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        log = out / f"{mode}.log"
        print(f"[serve_check] {mode}: running (log {log})", file=sys.stderr, flush=True)
        with log.open("w") as handle:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--base",
                    args.base,
                    "--draft",
                    args.draft,
                    "--questions",
                    args.questions,
                    "--out",
                    str(out),
                    "--worker",
                    mode,
                    "--job",
                    str(out / "job.json"),
                    "--result",
                    str(out / f"{mode}.json"),
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
        if proc.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            print(f"[serve_check] {mode} failed (exit {proc.returncode}); end of {log}:\n{tail}", file=sys.stderr)
            print(f"serve_check: FAILED in mode {mode} (see {log})")
            return 1
        results[mode] = json.loads((out / f"{mode}.json").read_text())

    return summarize(results, questions, prompts, tokenizer.decode, args, out)


def summarize(
    results: dict[str, dict[str, Any]],
    questions: list[dict[str, Any]],
    prompts: list[list[int]],
    decode: Any,
    args: argparse.Namespace,
    out: Path,
) -> int:
    """Compare every mode's outputs with plain vLLM's, write results.json and outputs.jsonl, print the summary line.

    Returns the exit status: 0 iff every speculative mode's outputs equal the plain ones.
    """
    modes = list(results)
    reference = results["plain"]["outputs"]
    summary: dict[str, Any] = {
        "engine": results["plain"]["engine"],
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "hf_threads": args.threads,
        "vllm_threads": "vLLM CPU default (VLLM_CPU_OMP_THREADS_BIND=auto: one core reserved, compute on the rest)",
        "nproc": os.cpu_count(),
        "cpu": cpu_name(),
        "modes": {},
    }
    with (out / "outputs.jsonl").open("w") as handle:
        for i, q in enumerate(questions):
            record = {**{k: q[k] for k in ("question_id", "category")}, "prompt_len": len(prompts[i])}
            for mode, result in results.items():
                record[f"{mode}_equal"] = result["outputs"][i] == reference[i]
                record[f"{mode}_tokens"] = result["outputs"][i]
                record[f"{mode}_s"] = round(result["seconds"][i], 4)
            record["plain_text"] = decode(reference[i])
            handle.write(json.dumps(record) + "\n")
    all_equal = True
    for mode, result in results.items():
        equal = sum(a == b for a, b in zip(result["outputs"], reference, strict=True))
        acceptance = mean_acceptance(result.get("spec"))
        summary["modes"][mode] = {
            "engine": result["engine"],
            "equal_to_plain": equal,
            "tokens": sum(len(o) for o in result["outputs"]),
            "seconds": sum(result["seconds"]),
            "tokens_per_s": tokens_per_s(result),
            "speedup_vs_plain": tokens_per_s(result) / tokens_per_s(results["plain"]),
            "startup_s": result.get("startup_s"),
            "spec_counters": result.get("spec"),
            "mean_acceptance_length": acceptance[0] if acceptance else None,
            "draft_acceptance_rate": acceptance[1] if acceptance else None,
            "speculative_config": result.get("speculative_config"),
        }
        if mode in SPECULATIVE and equal != len(prompts):
            all_equal = False
    summary["all_speculative_outputs_equal"] = all_equal
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")

    n = len(prompts)
    parts = [
        f"serve_check: {summary['engine']} {args.dtype}, {n} Spec-Bench prompts x {args.max_tokens} tokens,"
        f" on {summary['nproc']}-core {summary['cpu']}"
    ]
    modes_info = summary["modes"]
    parts.append(
        "equal to plain: " + ", ".join(f"{m} {modes_info[m]['equal_to_plain']}/{n}" for m in modes if m != "plain")
    )
    parts.append(
        "tokens/s: "
        + ", ".join(
            f"{m} {modes_info[m]['tokens_per_s']:.1f}"
            + ("" if m == "plain" else f" ({modes_info[m]['speedup_vs_plain']:.2f}x)")
            for m in modes
        )
    )
    accepted = [
        f"{m} {modes_info[m]['mean_acceptance_length']:.2f}"
        for m in SPECULATIVE
        if m in modes and modes_info[m]["mean_acceptance_length"] is not None
    ]
    if accepted:
        parts.append("mean tokens per verify step (1 + accepted/drafts): " + ", ".join(accepted))
    parts.append("OK" if all_equal else "MISMATCH")
    print(" | ".join(parts))
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
