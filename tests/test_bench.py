"""The bench command end to end on a tiny model (results schema, identity, plot), and its input errors."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from kangaroo_infer import cli
from kangaroo_infer.dtype import cpu_name, machine_line
from kangaroo_infer.questions import load_questions

KEYS = {"speedup", "tau", "tokens_per_s", "vanilla_tokens_per_s", "identical", "questions"}
SPEC_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["Write a poem about the sea.", "Shorter."]},
    {"question_id": 82, "category": "coding", "turns": ["Write hello world in C."]},
    {"question_id": 201, "category": "translation", "turns": ["Translate 'bonjour' to English."]},
    {"question_id": 202, "category": "translation", "turns": ["Translate 'hola' to English."]},
    {"question_id": 301, "category": "qa", "turns": ["Who wrote Hamlet?"]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_bench(*args):
    """The CLI in this process (a subprocess would load torch again and compete for the threads)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch.enable_grad():  # grad mode kept
        code = cli.main(["bench", *args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_bench_subprocess(*args):
    return subprocess.run(
        [sys.executable, "-m", "kangaroo_infer", "bench", *args], capture_output=True, text=True, timeout=600
    )


def test_bench_end_to_end(tiny_dirs, tmp_path):
    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", SPEC_BENCH)
    out = tmp_path / "out"
    result = run_bench(
        "--adapter", str(root / "adapter"), "--questions", str(questions), "--max-new-tokens", "24",
        "--threshold", "0.1", "--steps", "4", "--policy", "fixed", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["overall"]) == KEYS
    assert summary["overall"]["identical"] is True and summary["overall"]["questions"] == 5
    assert set(summary["categories"]) == {"mt_bench", "translation", "qa"}  # MT-bench categories folded
    assert summary["categories"]["translation"]["questions"] == 2
    for row in summary["categories"].values():
        assert set(row) == KEYS and row["tau"] >= 1.0 and row["speedup"] > 0
    assert summary["overall"]["tau"] > 1.2  # the identity-like adapter is accepted often
    profile = summary["cost_profile"]
    assert profile["full_forward_1_ms"] > 0 and profile["draft_step_ms"] > 0 and "4" in profile["deep_verify_ms"]
    assert profile["speedup_limit_at_measured_tau"] > 0
    assert summary["config"]["threshold"] == 0.1 and summary["config"]["max_draft_steps"] == 4
    assert summary["config"]["policy"] == "fixed"
    assert summary["config"]["lookup_tokens"] == 12 and summary["config"]["lookup_ngram"] == [2, 3]  # defaults
    assert 0 <= profile["lookup_round_share"] <= 1
    machine = summary["config"]["machine"]  # the machine the timings belong to, printed and recorded
    assert machine["cpu"] == cpu_name() and machine["torch"] == torch.__version__ and machine["gpu"] is None
    assert set(machine["cpu_bf16_flags"]) <= {"avx512_bf16", "amx_bf16"} and machine["torch_threads"] >= 1
    assert f"machine: {machine_line(machine)}" in result.stdout
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 5
    for a in answers:
        assert {"question_id", "category", "prompt_sha256", "tstamp", "decoders"} <= set(a)
        assert list(a["decoders"]) == ["vanilla", "kangaroo"]
        run = a["decoders"]["kangaroo"]
        assert {"turns", "new_tokens", "wall_time", "accept_lengths", "lookup_rounds"} <= set(run)
        assert sum(run["accept_lengths"]) == run["new_tokens"] and run["identical"]
        assert all(0 <= i < len(run["draft_lengths"]) for i in run["lookup_rounds"])
        assert a["decoders"]["vanilla"]["accept_lengths"] == [1] * a["decoders"]["vanilla"]["new_tokens"]
    assert summary["decoders"]["kangaroo"]["overall"] == summary["overall"]  # the headline is kangaroo's
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overall" in result.stdout and "speedup limit" in result.stdout


def test_bench_sweep_and_category_filter(tiny_dirs, tmp_path):
    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", SPEC_BENCH)
    out = tmp_path / "sweep"
    result = run_bench(
        "--adapter", str(root / "adapter"), "--questions", str(questions), "--categories", "translation,qa",
        "--num-questions", "1", "--max-new-tokens", "12", "--sweep", "--sweep-thresholds", "0.1,0.9",
        "--sweep-steps", "1,3", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["grid"]) == 4 and sweep["questions"] == 2
    assert [(g["threshold"], g["max_draft_steps"]) for g in sweep["grid"]] == [(0.1, 1), (0.1, 3), (0.9, 1), (0.9, 3)]
    assert all(g["identical"] for g in sweep["grid"])
    assert sweep["best"] == max(sweep["grid"], key=lambda g: g["speedup"])
    assert sweep["machine"]["cpu"] == cpu_name() and f"machine: {machine_line(sweep['machine'])}" in result.stdout
    assert "best: threshold" in result.stdout


def test_bench_tree_beside_chain_and_tree_sweep(tiny_dirs, tmp_path):
    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", SPEC_BENCH)
    out = tmp_path / "tree"
    result = run_bench(
        "--adapter", str(root / "adapter"), "--questions", str(questions), "--num-questions", "1",
        "--max-new-tokens", "16", "--tree", "--tree-top-k", "3", "--tree-max-nodes", "9", "--no-profile",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "results.json").read_text())
    tree = summary["decoders"]["kangaroo-tree"]
    assert set(tree["overall"]) == KEYS and tree["overall"]["identical"] is True
    assert set(tree["categories"]) == set(summary["categories"])
    assert tree["settings"]["tree_top_k"] == 3 and tree["settings"]["tree_max_nodes"] == 9
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    trees = [a["decoders"]["kangaroo-tree"] for a in answers]
    assert all(t["identical"] and max(t["draft_lengths"], default=0) <= 9 for t in trees)
    assert "overall (tree)" in result.stdout
    result = run_bench(
        "--adapter", str(root / "adapter"), "--questions", str(questions), "--num-questions", "1",
        "--categories", "qa", "--max-new-tokens", "12", "--tree", "--sweep", "--sweep-top-k", "2,4",
        "--sweep-max-nodes", "4,12", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(g["tree_top_k"], g["tree_max_nodes"]) for g in sweep["grid"]] == [(2, 4), (2, 12), (4, 4), (4, 12)]
    assert all(g["identical"] and g["tree"] for g in sweep["grid"])
    assert "best: tree_top_k" in result.stdout


def test_question_loading_rules(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", SPEC_BENCH)
    assert [q.category for q in load_questions(path)] == ["mt_bench", "mt_bench", "translation", "translation", "qa"]
    assert [q.question_id for q in load_questions(path, num_questions=1)] == [81, 201, 301]
    mt_only = write_jsonl(tmp_path / "mt.jsonl", SPEC_BENCH[:2])
    assert [q.category for q in load_questions(mt_only)] == ["writing", "coding"]  # plain MT-bench keeps its own


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ('{"question_id": 1, "category": "qa", "turns": ["a"]}\n{oops\n', "line 2: not valid JSON"),
        ('{"question_id": 1, "category": "qa", "turns": []}\n', "line 1: needs fields"),
        ("\n\n", "holds no questions"),
    ],
)
def test_question_file_errors(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_questions(path)


def test_unknown_category_on_cli(tiny_dirs, tmp_path):
    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", SPEC_BENCH)
    result = run_bench("--adapter", str(root / "adapter"), "--questions", str(questions), "--categories", "poetry",
                       "--out", str(tmp_path / "o"))  # fmt: skip
    assert result.returncode == 2 and "Unknown categories ['poetry']" in result.stderr


def test_resume_keeps_finished_answers_and_reruns_a_cut_off_one(tiny_dirs, tmp_path):
    """An interrupted or partial benchmark continues: finished questions are not decoded again, the question whose
    record was being written reruns, and the summary covers every question."""
    from kangaroo_infer import KangarooModel, load_tokenizer
    from kangaroo_infer.bench import bench

    root, _, _ = tiny_dirs
    km = KangarooModel.from_pretrained(None, adapter=root / "adapter")
    tokenizer = load_tokenizer(km.base)
    path = write_jsonl(tmp_path / "q.jsonl", SPEC_BENCH)
    out = tmp_path / "out"
    kw = dict(max_new_tokens=12, threshold=0.1, steps=3, profile=False, progress=False, adapter_name="a")
    bench(km, tokenizer, load_questions(path, None, 1), out, **kw)  # 1 per category (MT-bench folded): 3 of the 5
    first = (out / "answers.jsonl").read_text().splitlines()
    assert len(first) == 3
    (out / "answers.jsonl").write_text("\n".join(first[:2]) + "\n" + first[2][:25])  # stopped while writing
    summary = bench(km, tokenizer, load_questions(path), out, resume=True, **kw)
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert lines[:2] == first[:2]  # kept as they were (wall times included), not decoded again
    assert len(lines) == 5 and sorted(json.loads(x)["question_id"] for x in lines) == [81, 82, 201, 202, 301]
    assert summary["overall"]["questions"] == 5 and summary["overall"]["identical"] is True
    assert summary["config"]["resumed_questions"] == 2

    with pytest.raises(ValueError, match=r"other settings: threshold \(saved 0.1, now 0.5\)\."):
        bench(km, tokenizer, load_questions(path), out, resume=True, **{**kw, "threshold": 0.5})
    with pytest.raises(ValueError, match="already holds 5 answers"):  # neither --resume nor --overwrite
        bench(km, tokenizer, load_questions(path, None, 1), out, **kw)
    assert len((out / "answers.jsonl").read_text().splitlines()) == 5
    bench(km, tokenizer, load_questions(path, None, 1), out, overwrite=True, **kw)  # starts over
    assert len((out / "answers.jsonl").read_text().splitlines()) == 3


def test_resume_is_refused_outside_the_question_benchmark(tiny_dirs, tmp_path):
    root, _, _ = tiny_dirs
    result = run_bench_subprocess(  # also: python -m kangaroo_infer bench is the entry point
        "--adapter", str(root / "adapter"), "--sweep", "--resume", "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "--resume does nothing with --sweep" in result.stderr


def test_cost_profile_only_on_a_random_model_from_a_config(tmp_path):
    """What the GPU check runs (Vicuna-7B's shape in bf16), here on a tiny config on the CPU."""
    config = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256,
    }  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    out = tmp_path / "profile"
    result = run_bench(
        "--cost-profile-only", "--base-config", str(tmp_path / "cfg.json"), "--exit-layer", "1", "--dtype",
        "bfloat16", "--context", "40", "--tau", "1.5", "--drafts-per-round", "1", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "results.json").read_text())
    profile = summary["cost_profile"]
    assert profile["context_tokens"] == 40 and set(profile["deep_verify_ms"]) == {str(k) for k in range(1, 9)}
    assert profile["tau"] == 1.5 and profile["speedup_limit_at_tau"] > 0
    assert summary["config"]["dtype"] == "bfloat16" and summary["config"]["num_layers"] == 4
    assert summary["config"]["exact_verify"] is True  # bf16's default
    assert summary["config"]["machine"]["cpu"] == cpu_name() and "machine: " in result.stdout
    assert "speedup limit at τ=1.5" in result.stdout and "exact verification on" in result.stdout
    fast = run_bench(
        "--cost-profile-only",
        "--base-config",
        str(tmp_path / "cfg.json"),
        "--exit-layer",
        "1",
        "--dtype",
        "bfloat16",
        "--no-exact-verify",
        "--context",
        "20",
        "--out",
        str(tmp_path / "fast"),
    )
    assert fast.returncode == 0, fast.stderr  # the flag reaches the random base's model (it was once dropped)
    assert json.loads((tmp_path / "fast" / "results.json").read_text())["config"]["exact_verify"] is False
    missing = run_bench("--cost-profile-only", "--base-config", str(tmp_path / "nope.json"), "--exit-layer", "1",
                        "--out", str(out))  # fmt: skip
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_exit = run_bench("--cost-profile-only", "--base-config", str(tmp_path / "cfg.json"), "--out", str(out))
    assert no_exit.returncode == 2 and "--exit-layer" in no_exit.stderr
