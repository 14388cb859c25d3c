"""bf16 divergence of the fast (non-exact) verification, beside the noise floor of batched vanilla generate (issue #24).

For each Spec-Bench question, greedy, bf16, SmolLM2-135M-Instruct with the shipped adapter:

- reference: ``base.generate`` on the prompt alone, keeping its per-step logits;
- noise_floor: ``base.generate`` on the prompt inside a left-padded batch of 2 (partner: the next question);
- fast: ``KangarooModel.generate`` with ``exact_verify=False`` (adapter + lookup drafting, the defaults);
- fast_adapter_only: the same with ``lookup_tokens=0``;
- exact: ``KangarooModel.generate`` with ``exact_verify=True`` on the same base (expected: always the reference).

Every output that differs from the reference is located (first differing position t) and the reference's logits at t
are inspected: top-1 / top-2 margin, absolute and in bf16 ulps at the top-1 logit, and the rank of the diverging
run's token there. The margins at every position of every reference answer give the background distribution: how
rare a near-tie as small as those at the divergences is. Writes results.json beside this file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import kangaroo_infer
from kangaroo_infer import KangarooModel, load_tokenizer
from kangaroo_infer.accept import cut_at_eos
from kangaroo_infer.bench import first_difference
from kangaroo_infer.dtype import machine
from kangaroo_infer.questions import chat_prompt_ids, load_questions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFAULT_QUESTIONS = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
DEFAULT_ADAPTER = ROOT / "checkpoints" / "smollm2-135m-instruct"
MODES = ("noise_floor", "fast", "fast_adapter_only", "exact")
# Histogram bins of the top-1 / top-2 margin in bf16 ulps at the top-1 logit: (label, lower bound exclusive, upper
# bound inclusive). The margin is a whole number of ulps unless top-2 lies in a lower binade than top-1.
ULP_BINS = (("0", -1.0, 0.0), ("1", 0.0, 1.0), ("2", 1.0, 2.0), ("3-4", 2.0, 4.0), ("5-8", 4.0, 8.0))
ULP_BINS += ((">8", 8.0, math.inf),)


def bf16_ulp(x: float) -> float:
    """The spacing of bf16 numbers at |x| (8 significant bits): 2^(floor(log2|x|) - 7)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x != 0 else 2.0**-133


def code_version() -> str:
    """Which kangaroo_infer ran: this checkout's (its commit, and whether kangaroo_infer/ had uncommitted changes),
    or, imported from elsewhere (PYTHONPATH: e.g. ``git archive`` of a commit while the checkout is being edited),
    that path and $KANGAROO_CODE_COMMIT."""
    path = Path(kangaroo_infer.__file__).resolve().parent
    if path == ROOT / "kangaroo_infer":
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "kangaroo_infer"], capture_output=True, text=True)
        return f"{head}{' + uncommitted changes' if dirty.stdout.strip() else ''}"
    return f"{os.environ.get('KANGAROO_CODE_COMMIT', 'unknown commit')} (imported from {path})"


class StepLogits:
    """The reference's per-step logits [n, V] (fp32 copies of the bf16 head's output) and their top-2 margins."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        top = logits.topk(2, dim=-1).values
        self.top1 = top[:, 0].tolist()
        self.margins = (top[:, 0] - top[:, 1]).tolist()
        self.ulps = [m / bf16_ulp(t1) for m, t1 in zip(self.margins, self.top1, strict=True)]

    def at(self, t: int, token: int | None) -> dict[str, Any]:
        """The reference's logits at step t, and where ``token`` (the diverging run's, None: it ended) ranks there."""
        row = self.logits[t]
        values, ids = row.sort(descending=True, stable=True)  # ties in index order, as argmax breaks them
        info = {
            "top1_id": int(ids[0]),
            "top1_logit": float(values[0]),
            "top2_id": int(ids[1]),
            "top2_logit": float(values[1]),
            "margin": self.margins[t],
            "margin_ulps": self.ulps[t],
            "token": token,
        }
        if token is not None:
            rank = int((ids == token).nonzero()[0, 0]) + 1  # ties broken by token id
            rank_ties = int((row > row[token]).sum()) + 1  # 1 + how many logits are strictly larger
            gap = float(values[0] - row[token])
            info.update(rank=rank, rank_ties=rank_ties, token_logit=float(row[token]), gap=gap)
            info["gap_ulps"] = gap / bf16_ulp(float(values[0]))
        return info


def compare(ref: list[int], steps: StepLogits, other: list[int]) -> dict[str, Any]:
    t = first_difference(ref, other)
    record: dict[str, Any] = {"length": len(other), "identical": t is None}
    if t is None:
        return record
    record["position"] = t
    if t >= len(ref):  # the reference ended (EOS) where the other went on: no reference logits at t
        record["note"] = "reference ended first; no reference logits at this position"
        return record
    record.update(steps.at(t, other[t] if t < len(other) else None))
    record["reference_token"] = ref[t]
    return record


def decode_all(km_fast: KangarooModel, km_exact: KangarooModel, tok, ids: list[int], partner: list[int], n: int, eos):
    base = km_fast.base
    pad = tok.pad_token_id
    x = torch.tensor([ids], device=base.device)
    out = base.generate(
        x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=n,
        pad_token_id=pad,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ref = out.sequences[0, x.shape[1] :].tolist()
    logits = torch.cat(out.logits, dim=0).float().cpu()  # [n_ref, V]
    batch = tok.pad({"input_ids": [ids, partner]}, padding=True, return_tensors="pt").to(base.device)  # left pad
    both = base.generate(
        batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False, max_new_tokens=n, pad_token_id=pad
    )
    runs = {
        "noise_floor": cut_at_eos(both[0, batch["input_ids"].shape[1] :].tolist(), eos),
        "fast": km_fast.generate(x, max_new_tokens=n).sequences[0, x.shape[1] :].tolist(),
        "fast_adapter_only": km_fast.generate(x, max_new_tokens=n, lookup_tokens=0).sequences[0, x.shape[1] :].tolist(),
        "exact": km_exact.generate(x, max_new_tokens=n).sequences[0, x.shape[1] :].tolist(),
    }
    return ref, logits, runs


def passed_near_ties(steps: StepLogits, record: dict[str, Any], limits: tuple[float, ...]) -> dict[str, int]:
    """Reference positions with margin <= each limit (ulps) that the run went through with the same token."""
    end = len(steps.margins) if record["identical"] else record["position"]
    return {f"le_{lim:g}_ulps": sum(u <= lim for u in steps.ulps[:end]) for lim in limits}


def summarize(questions: list[dict[str, Any]], all_margins: list[float], all_ulps: list[float]) -> dict[str, Any]:
    n = len(questions)
    divs = {m: [q["modes"][m] for q in questions if not q["modes"][m]["identical"]] for m in MODES}
    with_logits = [d for m in MODES for d in divs[m] if "margin_ulps" in d]
    max_ulps = max((d["margin_ulps"] for d in with_logits), default=None)
    max_abs = max((d["margin"] for d in with_logits), default=None)
    per_mode = {}
    for m in MODES:
        ds = [d for d in divs[m] if "margin_ulps" in d]
        passed = [q["modes"][m]["passed_near_ties"] for q in questions]
        per_mode[m] = {
            "identical": n - len(divs[m]),
            "questions": n,
            "divergences": len(divs[m]),
            "divergences_without_reference_logits": len(divs[m]) - len(ds),
            "margin_le_1_ulp": sum(d["margin_ulps"] <= 1 for d in ds),
            "margin_le_2_ulps": sum(d["margin_ulps"] <= 2 for d in ds),
            "margin_gt_2_ulps": sum(d["margin_ulps"] > 2 for d in ds),
            "max_margin_ulps": max((d["margin_ulps"] for d in ds), default=None),
            "max_margin": max((d["margin"] for d in ds), default=None),
            "diverging_token_is_top2": sum(d.get("rank") == 2 for d in ds),
            "diverging_token_has_top2_logit": sum(d.get("gap") == d["margin"] for d in ds),
            "diverging_token_ranks": sorted(d.get("rank") for d in ds if d.get("rank") is not None),
            "near_ties_passed_unflipped": {k: sum(p[k] for p in passed) for k in passed[0]} if passed else {},
            "near_ties_flipped": {
                "le_1_ulps": sum(d["margin_ulps"] <= 1 for d in ds),
                "le_2_ulps": sum(d["margin_ulps"] <= 2 for d in ds),
            },
        }
    total = len(all_ulps)
    hist = {label: sum(lo < u <= hi for u in all_ulps) for label, lo, hi in ULP_BINS}
    background = {
        "positions": total,
        "histogram_ulps": hist,
        "histogram_ulps_fraction": {k: v / total for k, v in hist.items()} if total else {},
        "max_divergence_margin_ulps": max_ulps,
        "max_divergence_margin": max_abs,
        "fraction_le_max_divergence_margin_ulps": (
            sum(u <= max_ulps for u in all_ulps) / total if max_ulps is not None and total else None
        ),
        "fraction_le_max_divergence_margin_abs": (
            sum(m <= max_abs for m in all_margins) / total if max_abs is not None and total else None
        ),
        "median_margin": sorted(all_margins)[total // 2] if total else None,
        "median_margin_ulps": sorted(all_ulps)[total // 2] if total else None,
    }
    return {"per_mode": per_mode, "background": background}


def table(summary: dict[str, Any]) -> str:
    head = f"{'mode':<20} {'identical':>9} {'<=1 ulp':>8} {'<=2 ulps':>8} {'larger':>6} {'max margin (ulps / abs)':>24}"
    lines = [head, "-" * len(head)]
    for m, s in summary["per_mode"].items():
        mx = "-" if s["max_margin_ulps"] is None else f"{s['max_margin_ulps']:g} / {s['max_margin']:g}"
        lines.append(
            f"{m:<20} {s['identical']:>4}/{s['questions']:<4} {s['margin_le_1_ulp']:>8} {s['margin_le_2_ulps']:>8} "
            f"{s['margin_gt_2_ulps']:>6} {mx:>24}"
        )
    b = summary["background"]
    lines.append("")
    lines.append(f"reference positions: {b['positions']}; margin histogram (bf16 ulps at top-1):")
    lines.append(
        "  " + "  ".join(f"{k}: {v} ({b['histogram_ulps_fraction'][k]:.2%})" for k, v in b["histogram_ulps"].items())
    )
    if b["max_divergence_margin_ulps"] is not None:
        lines.append(
            f"positions with margin <= the largest at any divergence ({b['max_divergence_margin_ulps']:g} ulps): "
            f"{b['fraction_le_max_divergence_margin_ulps']:.2%}; <= {b['max_divergence_margin']:g} absolute: "
            f"{b['fraction_le_max_divergence_margin_abs']:.2%}"
        )
    return "\n".join(lines)


def brief(record: dict[str, Any]) -> str:
    if record["identical"]:
        return "same"
    ulps = record.get("margin_ulps")
    return f"pos {record['position']} " + (
        "(no ref logits)" if ulps is None else f"{ulps:g} ulps r{record.get('rank')}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS))
    p.add_argument("--num-questions", type=int, default=5, help="first N per category")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (the GPU check of issue #24)")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--report", action="store_true", help="only print the summary of the results.json at --out")
    args = p.parse_args()
    if args.report:  # e.g. of a run that was interrupted: the questions finished so far
        records = json.loads(Path(args.out).read_text())["questions"]
        margins = [m for r in records for m in r["reference_margins"]]
        ulps = [u for r in records for u in r["reference_margins_ulps"]]
        print(table(summarize(records, margins, ulps)))
        return

    questions = load_questions(args.questions, None, args.num_questions)
    km_fast = KangarooModel.from_pretrained(
        None, adapter=args.adapter, dtype="bfloat16", device=args.device, exact_verify=False
    )
    km_exact = KangarooModel(km_fast.base, km_fast.adapter, exact_verify=True)  # same base, loaded once
    assert km_fast.backbone.invariance is None and km_exact.backbone.invariance is not None
    tok = load_tokenizer(km_fast.base)
    tok.padding_side = "left"
    eos = km_fast.resolve_eos("from_generation_config")
    prompts = [chat_prompt_ids(tok, q.prompt) for q in questions]
    config = {
        "model": "SmolLM2-135M-Instruct",
        "adapter": str(Path(args.adapter).resolve().relative_to(ROOT)),
        "dtype": str(km_fast.base.dtype),
        "questions_file": args.questions,
        "num_questions_per_category": args.num_questions,
        "max_new_tokens": args.max_new_tokens,
        "pad_token_id": tok.pad_token_id,
        "eos_token_ids": sorted(eos),
        "machine": {
            **machine(args.device),
            "kangaroo_infer": code_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    print(json.dumps(config, indent=1), flush=True)

    records, all_margins, all_ulps = [], [], []
    ulp_limits = (1.0, 2.0)
    for i, q in enumerate(questions):
        start = time.perf_counter()
        partner = prompts[(i + 1) % len(prompts)]
        ref, logits, runs = decode_all(km_fast, km_exact, tok, prompts[i], partner, args.max_new_tokens, eos)
        assert len(ref) == logits.shape[0]
        steps = StepLogits(logits)
        all_margins += steps.margins
        all_ulps += steps.ulps
        modes = {}
        for m, tokens in runs.items():
            modes[m] = compare(ref, steps, tokens)
            modes[m]["passed_near_ties"] = passed_near_ties(steps, modes[m], ulp_limits)
        records.append(
            {
                "question_id": q.question_id,
                "category": q.source_category,
                "prompt_tokens": len(prompts[i]),
                "partner_question_id": questions[(i + 1) % len(questions)].question_id,
                "reference_length": len(ref),
                "reference_is_argmax": bool((logits.argmax(-1) == torch.tensor(ref)).all()),
                "logits_bf16_representable": bool((logits.bfloat16().float() == logits).all()),
                "reference_margins": steps.margins,
                "reference_margins_ulps": steps.ulps,
                "seconds": round(time.perf_counter() - start, 1),
                "modes": modes,
            }
        )
        shown = "  ".join(f"{m}={brief(r)}" for m, r in modes.items())
        print(f"[{i + 1}/{len(questions)}] {q.question_id} ({q.source_category}) ref {len(ref)} tok, "
              f"{time.perf_counter() - start:.0f}s: {shown}", flush=True)  # fmt: skip
        if not modes["exact"]["identical"]:
            print(f"!!! exact verification differs from the reference on question {q.question_id}", flush=True)
        summary = summarize(records, all_margins, all_ulps)
        Path(args.out).write_text(json.dumps({"config": config, "summary": summary, "questions": records}, indent=1))
    print()
    print(table(summary))
    exact_bad = [r["question_id"] for r in records if not r["modes"]["exact"]["identical"]]
    if exact_bad:
        print(f"!!! exact verification differed from the reference on: {exact_bad}")


if __name__ == "__main__":
    main()
