"""bench never loses answers (arguments checked before the model loads or a file is touched, --resume/--overwrite,
resume across path spellings and changed questions, matplotlib checked first), runs peers (HF prompt lookup,
assisted generation, Kangaroo without its adapter) beside vanilla and kangaroo, and writes Spec-Bench model-answer
files that Spec-Bench's own evaluation scripts read."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

from kangaroo_infer import cli
from kangaroo_infer.bench import bench
from kangaroo_infer.questions import load_questions

QUESTIONS = [
    {"question_id": 82, "category": "coding", "turns": ["Write hello world in C. Write hello world in C."]},
    {"question_id": 81, "category": "writing", "turns": ["Write a poem about the sea, the sea, the sea.", "Shorter."]},
    {"question_id": 201, "category": "translation", "turns": ["Translate 'bonjour' to English."]},
    {"question_id": 202, "category": "translation", "turns": ["Translate 'hola' to English."]},
    {"question_id": 301, "category": "qa", "turns": ["Who wrote Hamlet? Who wrote Hamlet?"]},
]
MT_BENCH = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def grad_mode_kept():
    """cli.main turns autograd off for the process; give the tests that follow it back as it was."""
    import torch

    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


@pytest.fixture
def no_model_load(monkeypatch):
    """A tripwire: these runs must be refused before any model loads."""

    def refuse(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", refuse)


def bench_args(adapter, questions, threshold="0.1"):
    return ["--adapter", str(adapter), "--questions", str(questions), "--max-new-tokens", "8", "--threshold",
            threshold, "--steps", "3", "--no-profile", "--warmup", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_once(tiny_dirs, tmp_path_factory):
    """An --out directory holding 3 finished answers (1 question per category; MT-bench folded: 3 categories)."""
    root, _, _ = tiny_dirs
    tmp = tmp_path_factory.mktemp("finished")
    questions = write_jsonl(tmp / "q.jsonl", QUESTIONS)
    out = tmp / "out"
    assert cli.main(["bench", *bench_args(root / "adapter", questions), "--num-questions", "1", "--out", str(out)]) == 0
    assert len((out / "answers.jsonl").read_text().splitlines()) == 3
    return out


@pytest.fixture
def finished(tiny_dirs, finished_once, tmp_path):
    """A copy of that directory (each test may change it), its questions file and the arguments that wrote it."""
    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    shutil.copytree(finished_once, out)
    return out, bench_args(root / "adapter", questions), questions


def snapshot(out):
    return {name: (out / name).read_bytes() for name in ("answers.jsonl", "bench_settings.json")}


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err  # one line, no traceback (progress bars aside)
    return errors[0]


@pytest.mark.parametrize(
    "bad,message",
    [
        (["--threshold", "2"], "--threshold (η) must lie in [0, 1]"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
        (["--steps", "-1"], "--steps must be an integer >= 0"),
        (["--num-questions", "0"], "--num-questions must be an integer >= 1"),
        (["--warmup", "-1"], "--warmup must be an integer >= 0"),
        (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
        (["--tree", "--tree-max-nodes", "0"], "--tree-max-nodes must be an integer >= 1"),
        (["--lookup-tokens", "-1"], "--lookup-tokens must be an integer >= 0"),
        (["--peers", "pld", "--pld-tokens", "0"], "--pld-tokens takes comma-separated integers >= 1"),
        (["--peers", "pld", "--pld-tokens", "4,x"], "--pld-tokens takes comma-separated integers"),
        (["--peers", "medusa"], "Unknown peers ['medusa']"),
        (["--peers", "lookup", "--lookup-tokens", "0"], "--lookup-tokens 0 turns lookup off (that is --peers plain)"),
        (["--peers", "adapter", "--lookup-tokens", "0"], "--lookup-tokens 0 already makes the kangaroo run that"),
        (["--context", "64"], "--context does nothing in a question benchmark"),
        (["--resume", "--overwrite"], "pass one of them"),
        ([], "already holds 3 answers (answers.jsonl); pass --resume"),
    ],
)
def test_a_rejected_run_leaves_the_answers_as_they_were(finished, capsys, no_model_load, bad, message):
    out, base, _ = finished
    before = snapshot(out)
    assert cli.main(["bench", *base, *bad, "--out", str(out)]) == 2
    err = error_line(capsys)
    assert message in err
    if not bad:
        assert "--overwrite" in err  # names both ways on
    assert snapshot(out) == before


def test_bench_itself_checks_before_writing(tiny_dirs, finished):
    """The library entry point too: nothing in --out changes when an argument is refused."""
    from kangaroo_infer import KangarooModel, load_tokenizer

    root, _, _ = tiny_dirs
    out, _, questions = finished
    km = KangarooModel.from_pretrained(None, adapter=root / "adapter")
    tokenizer = load_tokenizer(km.base)
    before = snapshot(out)
    qs = load_questions(questions, None, 1)
    for kw, message in (
        ({"threshold": 2.0}, "must lie in"),
        ({"max_new_tokens": 0}, "max.new.tokens"),
        ({"peers": ["pld"], "temperature": 0.7, "resume": True}, "drop --peers or --temperature"),
        ({}, "already holds 3 answers"),
    ):
        with pytest.raises(ValueError, match=message):
            bench(km, tokenizer, qs, out, progress=False, **kw)
        assert snapshot(out) == before


def test_out_naming_a_file_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert cli.main(["bench", "--adapter", "x", "--out", str(target)]) == 2
    assert "is a file" in error_line(capsys) and target.read_text() == "mine"


def test_overwrite_starts_over(finished):
    out, base, _ = finished
    assert cli.main(["bench", *base, "--categories", "qa", "--overwrite", "--out", str(out)]) == 0
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [301]


def test_resume_accepts_another_spelling_of_the_adapter_path_and_names_what_differs(
    tiny_dirs, finished, monkeypatch, capsys
):
    root, _, _ = tiny_dirs
    out, _, questions = finished
    before = (out / "answers.jsonl").read_text()
    monkeypatch.chdir(root)
    relative = bench_args("adapter", questions)  # the same adapter, typed relative to the working directory
    assert cli.main(["bench", *relative, "--num-questions", "1", "--resume", "--out", str(out)]) == 0
    assert (out / "answers.jsonl").read_text() == before  # all 3 kept, none decoded again
    capsys.readouterr()
    changed = bench_args("adapter", questions, threshold="0.5")
    assert cli.main(["bench", *changed, "--num-questions", "1", "--resume", "--out", str(out)]) == 2
    err = error_line(capsys)
    assert "threshold (saved 0.1, now 0.5)" in err
    assert "torch_threads" not in err and "max_draft_steps" not in err  # only the field that differs
    settings = json.loads((out / "bench_settings.json").read_text())
    assert settings["adapter"] == "adapter" and not settings["base_model"].startswith("/")


def test_resume_decodes_again_the_questions_whose_text_changed(finished, caplog):
    out, base, questions = finished
    first = {json.loads(line)["question_id"]: line for line in (out / "answers.jsonl").read_text().splitlines()}
    rows = [dict(q) for q in QUESTIONS]
    rows[4]["turns"] = ["Who wrote Macbeth?"]  # question 301, same id, other text
    write_jsonl(questions, rows)
    with caplog.at_level(logging.WARNING, logger="kangaroo_infer.bench"):
        assert cli.main(["bench", *base, "--num-questions", "1", "--resume", "--out", str(out)]) == 0
    assert "1 question(s) changed text" in caplog.text and "301" in caplog.text
    now = {json.loads(line)["question_id"]: line for line in (out / "answers.jsonl").read_text().splitlines()}
    assert sorted(now) == [82, 201, 301]
    assert now[82] == first[82] and now[201] == first[201]  # unchanged questions kept as they were
    assert now[301] != first[301]
    from kangaroo_infer.questions import Question

    assert json.loads(now[301])["prompt_sha256"] == Question(301, "qa", "Who wrote Macbeth?").prompt_sha256


def test_missing_matplotlib_is_reported_before_decoding(tiny_dirs, tmp_path, monkeypatch, capsys, no_model_load):
    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "out"
    assert cli.main(["bench", *bench_args(root / "adapter", questions), "--out", str(out)]) == 2
    assert "pip install 'kangaroo[bench]'" in error_line(capsys)
    assert not out.exists()


def test_peers_are_refused_with_sampling(tiny_dirs, tmp_path, capsys, no_model_load):
    root, _, _ = tiny_dirs
    args = ["bench", "--adapter", str(root / "adapter"), "--peers", "pld", "--temperature", "0.7", "--out",
            str(tmp_path / "o")]  # fmt: skip
    assert cli.main(args) == 2
    assert "drop --peers or --temperature" in error_line(capsys)
    assert cli.main(["bench", "--adapter", "a", "--sweep", "--peers", "pld", "--out", str(tmp_path / "o")]) == 2
    assert "--peers does nothing with --sweep; drop it (it is read in a question benchmark)" in error_line(capsys)


@pytest.mark.parametrize(
    "given,message",
    [
        (["--sweep", "--batch-size", "4"], "--sweep and --batch-size are separate modes of bench"),
        (["--cost-profile-only", "--threshold", "0.3"], "--threshold does nothing with --cost-profile-only"),
        (["--cost-profile-only", "--tree"], "--tree does nothing with --cost-profile-only"),
        (["--cost-profile-only", "--questions", "q.jsonl"], "--questions does nothing with --cost-profile-only"),
        (["--base-config", "c.json"], "--base-config does nothing in a question benchmark"),
        (["--context", "512"], "(it is read with --cost-profile-only)"),
        (["--cost-profile-only", "--context", "0"], "--context must be >= 1"),
        (["--batch-size", "4", "--no-profile"], "--no-profile does nothing with --batch-size"),
        (["--sweep", "--temperature", "0.7"], "--temperature does nothing with --sweep"),
        (["--sweep", "--tree", "--sweep-steps", "2"], "(it is read with --sweep without --tree)"),
        (["--sweep", "--tree-top-k", "2"], "--tree-top-k does nothing with --sweep"),
        (["--sweep", "--sweep-top-k", "2"], "(it is read with --sweep and --tree)"),
        (["--cost-profile-only", "--base-config", "c.json", "--exit-layer", "1"],
         "--adapter does nothing with --cost-profile-only --base-config (a random base with a fresh adapter)"),
    ],
)  # fmt: skip
def test_bench_refuses_an_option_its_mode_ignores(tmp_path, capsys, no_model_load, given, message):
    """Nothing silently ignored: an option the chosen bench mode never reads is refused by name (with the modes that
    do read it) before anything loads, and two modes at once are refused."""
    assert cli.main(["bench", "--adapter", "a", *given, "--out", str(tmp_path / "o")]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_assisted_peer_needs_a_draft_model_directory(tiny_dirs, tmp_path, capsys, no_model_load):
    root, _, _ = tiny_dirs
    args = ["bench", "--adapter", str(root / "adapter"), "--out", str(tmp_path / "o")]
    assert cli.main([*args, "--peers", "assisted"]) == 2
    assert "--peers assisted needs --draft-model DIR" in error_line(capsys)
    assert cli.main([*args, "--draft-model", str(root / "base")]) == 2
    assert "add --peers assisted, or drop --draft-model" in error_line(capsys)
    assert cli.main([*args, "--peers", "assisted", "--draft-model", str(tmp_path / "nowhere")]) == 2
    assert "no model directory there (no config.json)" in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_assisted_peer_with_an_exported_draft(tiny_dirs, tmp_path, capsys):
    """export-draft's directory as transformers' assistant model, beside vanilla and kangaroo: identical output, its
    τ from what each base forward committed, the draft recorded by name only."""
    root, _, _ = tiny_dirs
    draft = tmp_path / "draft"
    assert cli.main(["export-draft", "--adapter", str(root / "adapter"), "--out", str(draft)]) == 0
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:3])
    out = tmp_path / "out"
    args = ["bench", *bench_args(root / "adapter", questions), "--peers", "assisted", "--draft-model", str(draft),
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    assert "assisted speedup" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    peer = summary["decoders"]["assisted"]
    assert peer["settings"] == {
        "kind": "assisted", "implementation": "transformers generate(assistant_model)", "draft_model": "draft"
    }  # fmt: skip
    assert peer["overall"]["identical"] is True and peer["overall"]["questions"] == 3 and peer["overall"]["tau"] >= 1
    assert summary["config"]["draft_model"] == "draft"
    for a in (json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()):
        run = a["decoders"]["assisted"]
        assert run["identical"] and sum(run["accept_lengths"]) == run["new_tokens"]
        assert len(run["accept_lengths"]) == run["decoding_steps"]
    assert str(tmp_path) not in (out / "results.json").read_text()


def test_kangaroo_without_its_adapter_as_peers(tiny_dirs, tmp_path, capsys):
    """--peers plain,lookup,adapter: kangaroo's own loop with no drafting (one token per forward), with lookup only
    and with the adapter only, beside the full kangaroo; identical output, settings recorded, so a report shows what
    each drafter adds."""
    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    args = ["bench", *bench_args(root / "adapter", questions), "--lookup-tokens", "4", "--peers",
            "plain,lookup,adapter", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "kangaroo-plain speedup" in printed and "kangaroo-lookup speedup" in printed
    summary = json.loads((out / "results.json").read_text())
    plain, lookup = summary["decoders"]["kangaroo-plain"], summary["decoders"]["kangaroo-lookup"]
    adapter = summary["decoders"]["kangaroo-adapter"]
    assert adapter["settings"]["implementation"] == "kangaroo generate(lookup_tokens=0)"
    assert adapter["overall"]["identical"] and adapter["overall"]["tau"] > 1.0
    assert plain["settings"]["implementation"] == "kangaroo generate(max_draft_steps=0, lookup_tokens=0)"
    assert lookup["settings"]["lookup_tokens"] == 4 == summary["config"]["lookup_tokens"]
    assert plain["overall"]["tau"] == 1.0 and plain["overall"]["identical"] and lookup["overall"]["identical"]
    assert summary["overall"]["tau"] > 1.0  # the adapter's drafts are accepted when it is on
    for a in (json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()):
        assert set(a["decoders"]["kangaroo-plain"]["accept_lengths"]) == {1}
        run = a["decoders"]["kangaroo-lookup"]
        assert sum(run["accept_lengths"]) == run["new_tokens"] == a["decoders"]["vanilla"]["new_tokens"]
        assert len(run["accept_lengths"]) == run["decoding_steps"]


def test_vanilla_fp32_peer_beside_a_bf16_run(tiny_dirs, tmp_path, capsys):
    """--peers fp32: vanilla generate on the base loaded again in float32, timed in the same bf16 run (the dtype
    question answered in one process); refused, before anything is written, when the run is float32 already."""
    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    args = ["bench", *bench_args(root / "adapter", questions), "--num-questions", "1", "--peers", "fp32",
            "--dtype", "bfloat16", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    fp32 = summary["decoders"]["vanilla-fp32"]
    assert fp32["settings"]["dtype"] == "float32" and summary["config"]["dtype"] == "bfloat16"
    assert fp32["overall"]["tau"] == 1.0 and fp32["overall"]["tokens_per_s"] > 0
    assert summary["overall"]["identical"]  # kangaroo in bf16 equals vanilla in bf16
    for a in (json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()):
        assert a["decoders"]["vanilla-fp32"]["new_tokens"] == len(a["decoders"]["vanilla-fp32"]["accept_lengths"])
    refused = tmp_path / "refused"
    args[args.index("bfloat16")], args[-1] = "float32", str(refused)
    assert cli.main(args) == 2
    assert "this run is float32 already" in capsys.readouterr().err and not refused.exists()


# ---- Spec-Bench's evaluation scripts, as they read answer files (their logic, re-expressed) ---------------------


def spec_bench_select(path, task):
    """evaluation/speed.py: every line of the file, kept by task ("overall", "mt_bench" = MT-bench's 8 categories,
    else the category itself)."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    if task == "overall":
        return rows
    if task == "mt_bench":
        return [r for r in rows if r["category"] in MT_BENCH]
    return [r for r in rows if r["category"] == task]


def spec_bench_speed(method_path, base_path, tokenizer, task):
    """evaluation/speed.py: the method's tokens/s from its own new_tokens and wall_time; the baseline's tokens
    re-counted from its text (tokenizer ids minus one); speedup = ratio of the mean tokens/s; τ = mean accept
    length."""
    speeds, accepted = [], []
    for r in spec_bench_select(method_path, task):
        choice = r["choices"][0]
        speeds.append(sum(choice["new_tokens"]) / sum(choice["wall_time"]))
        accepted.extend(choice["accept_lengths"])
    base_speeds = []
    for r in spec_bench_select(base_path, task):
        choice = r["choices"][0]
        tokens = sum(len(tokenizer(text).input_ids) - 1 for text in choice["turns"])
        base_speeds.append(tokens / sum(choice["wall_time"]))
    mean = sum(speeds) / len(speeds)
    return mean, mean / (sum(base_speeds) / len(base_speeds)), sum(accepted) / len(accepted)


def spec_bench_equal(path_a, path_b):
    """evaluation/equal.py: str(choices[0]["turns"]) per line, compared line by line."""

    def contents(path):
        return [str(json.loads(line)["choices"][0]["turns"]) for line in open(path, encoding="utf-8")]

    return all(a == b for a, b in zip(contents(path_a), contents(path_b), strict=False))


def test_peers_and_spec_bench_answer_files(tiny_dirs, tmp_path, capsys):
    root, _, tokenizer = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out, spec = tmp_path / "out", tmp_path / "model_answer"
    args = ["bench", "--adapter", str(root / "adapter"), "--questions", str(questions), "--max-new-tokens", "16",
            "--threshold", "0.1", "--steps", "3", "--tree", "--no-profile", "--peers", "pld", "--pld-tokens", "2,4",
            "--spec-bench-dir", str(spec), "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "pld-2 speedup" in printed and "pld-4 speedup" in printed

    summary = json.loads((out / "results.json").read_text())
    assert list(summary["decoders"]) == ["kangaroo", "kangaroo-tree", "pld-2", "pld-4"]
    assert summary["config"]["peers"] == ["pld-2", "pld-4"]
    for name, n in (("pld-2", 2), ("pld-4", 4)):
        peer = summary["decoders"][name]
        assert peer["settings"]["num_tokens"] == n
        assert set(peer["categories"]) == {"mt_bench", "translation", "qa"}
        for row in [peer["overall"], *peer["categories"].values()]:
            assert row["identical"] is True and row["speedup"] > 0 and row["tokens_per_s"] > 0 and row["tau"] >= 1
        assert peer["overall"]["questions"] == 5
    assert summary["config"]["base_model"] == "base" and summary["config"]["adapter"] == "adapter"
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    for a in answers:
        for run in a["decoders"].values():
            assert run["identical"] and sum(run["accept_lengths"]) == run["new_tokens"]
            assert len(run["accept_lengths"]) == run["decoding_steps"]  # streamer commits vs hook-counted forwards
    spec_files = sorted(p for p in spec.iterdir() if p.name != ".kangaroo-written")  # bench's list of its files
    for path in [out / "results.json", out / "bench_settings.json", out / "answers.jsonl", *spec_files]:
        assert str(tmp_path) not in path.read_text() and str(root) not in path.read_text()  # no machine paths

    ids = {d: f"base-{d}-float32-temp-0.0" for d in ("vanilla", "kangaroo", "kangaroo-tree", "pld-2", "pld-4")}
    assert [p.name for p in spec_files] == sorted(f"{m}.jsonl" for m in ids.values())
    assert summary["config"]["spec_bench_files"] == [f"{m}.jsonl" for m in ids.values()]
    for decoder, model_id in ids.items():
        rows = [json.loads(line) for line in (spec / f"{model_id}.jsonl").read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [81, 82, 201, 202, 301]  # one line each, sorted by id
        assert [r["category"] for r in rows] == ["writing", "coding", "translation", "translation", "qa"]
        assert len({r["answer_id"] for r in rows}) == 5
        for r in rows:
            assert set(r) == {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
            assert r["model_id"] == model_id and isinstance(r["tstamp"], float)
            (choice,) = r["choices"]
            assert set(choice) == {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
            assert choice["index"] == 0 and len(choice["turns"]) == 1 and isinstance(choice["turns"][0], str)
            assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])
            assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])
            if decoder == "vanilla":
                assert choice["accept_lengths"] == [1] * choice["new_tokens"][0]
        vanilla = spec / f"{ids['vanilla']}.jsonl"
        assert spec_bench_equal(vanilla, spec / f"{model_id}.jsonl")
        for task in ("mt_bench", "translation", "qa", "overall"):
            tokens_per_s, speedup, tau = spec_bench_speed(spec / f"{model_id}.jsonl", vanilla, tokenizer, task)
            assert tokens_per_s > 0 and speedup > 0 and tau >= 1
    by_id = {a["question_id"]: a for a in answers}
    pld4 = [json.loads(line) for line in (spec / f"{ids['pld-4']}.jsonl").read_text().splitlines()]
    assert [r["choices"][0]["accept_lengths"] for r in pld4] == [
        by_id[r["question_id"]]["decoders"]["pld-4"]["accept_lengths"] for r in pld4
    ]

    capsys.readouterr()
    again = [*args[:-2], "--num-questions", "1", "--out", str(tmp_path / "out2")]
    assert cli.main(again) == 2  # the Spec-Bench files of the first run are not replaced without a flag
    assert "already holds Spec-Bench answers" in error_line(capsys)


def test_prompt_lookup_peer_records_what_each_forward_committed():
    """On a model whose greedy output cycles (every layer an identity: the next token depends on the last one only),
    prompt lookup copies whole stretches: the recorded commits per forward exceed 1, add up to the new tokens, and
    match the forwards counted by the hook; the output equals vanilla's."""
    import torch

    from kangaroo_infer import KangarooModel
    from kangaroo_infer.bench import make_peers, run_vanilla

    from .conftest import tiny_model

    km = KangarooModel.from_pretrained(tiny_model(deep_scale=0.0, exit_layer=0), exit_layer=2)
    ids = torch.tensor([[5, 17, 33, 8, 61, 5, 17]])
    (peer,) = make_peers(["pld"], [4])
    run = peer.run(km, ids, 40)
    vanilla, _ = run_vanilla(km, ids, 40)
    assert run.tokens == vanilla and len(vanilla) == 40
    assert sum(run.accept_lengths) == 40 and len(run.accept_lengths) == run.decoding_steps
    assert max(run.accept_lengths) == 5  # 4 copied tokens accepted + the verifier's own next token
    assert run.decoding_steps < 40 and run.wall_time > 0


# ---- answers of bench's earlier schema (kangaroo at the top level, tree and peers under keys, vanilla_* fields) ------

EARLIER = Path(__file__).resolve().parents[1] / "benchmarks" / "spec_bench_60_peers"


def earlier_schema(record: dict) -> dict:
    """A record as bench wrote it before every decoder was one: written out by hand, field by field."""
    decoders = record["decoders"]
    old = {k: record[k] for k in ("question_id", "category", "source_category", "prompt_sha256")}
    old.update(decoders["kangaroo"])
    if "kangaroo-tree" in decoders:
        old["tree"] = decoders["kangaroo-tree"]
    peers = {k: v for k, v in decoders.items() if k not in ("vanilla", "kangaroo", "kangaroo-tree")}
    if peers:
        old["peers"] = peers
    vanilla = decoders["vanilla"]
    old.update(vanilla_turns=vanilla["turns"], vanilla_new_tokens=vanilla["new_tokens"])
    old.update(vanilla_wall_time=vanilla["wall_time"], tstamp=record["tstamp"])
    return old


def test_a_results_directory_of_the_earlier_schema_reads_as_it_was_summarized():
    """benchmarks/spec_bench_60_peers was written by the earlier bench: its answers, converted, give back the
    speedups, τ and identity its results.json holds, for kangaroo and for each peer."""
    from kangaroo_infer.bench import summarize, upgrade_record

    lines = (EARLIER / "answers.jsonl").read_text().splitlines()
    records = [upgrade_record(json.loads(line)) for line in lines]
    saved = json.loads((EARLIER / "results.json").read_text())
    assert "decoders" not in json.loads(lines[0]) and len(records) == saved["overall"]["questions"]
    assert set(records[0]["decoders"]) == {"vanilla", "kangaroo", *saved["peers"]}
    for name, table in [("kangaroo", saved), *saved["peers"].items()]:
        now = summarize(records, name)
        for key in ("speedup", "tau", "vanilla_tokens_per_s", "identical", "questions"):
            assert now[key] == pytest.approx(table["overall"][key]), (name, key)
    vanilla = records[0]["decoders"]["vanilla"]
    assert vanilla["accept_lengths"] == [1] * vanilla["new_tokens"] == [1] * vanilla["decoding_steps"]
    assert vanilla["turns"] == json.loads(lines[0])["vanilla_turns"] and vanilla["identical"] is True


def test_records_that_are_not_bench_answers_are_refused_not_guessed_at():
    from kangaroo_infer.bench import upgrade_record

    for bad in ([1, 2], {"question_id": 1, "category": "qa"}, {"turns": ["x"]}, {"category": "qa", "turns": "x"}):
        with pytest.raises(ValueError, match="not a bench answer record"):
            upgrade_record(bad)
    oldest = {"question_id": 1, "category": "qa", "turns": ["x"], "new_tokens": 2, "identical": True}
    assert upgrade_record(oldest)["decoders"]["vanilla"] == {"turns": ["x"], "new_tokens": 2, "identical": True}
    sampled = upgrade_record({**oldest, "identical": None})["decoders"]["vanilla"]
    assert sampled == {"identical": None}  # no greedy answer of the base in a sampled record


def test_resume_keeps_answers_of_the_earlier_schema(finished):
    """An --out directory whose answers.jsonl the earlier bench wrote: --resume keeps them (converted, nothing
    decoded again) and decodes only the missing questions."""
    out, base, _ = finished
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    write_jsonl(out / "answers.jsonl", [earlier_schema(r) for r in records[:2]])
    assert cli.main(["bench", *base, "--num-questions", "1", "--resume", "--out", str(out)]) == 0
    now = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert now[:2] == records[:2]  # converted back to exactly what was decoded (wall times included)
    assert now[2]["question_id"] == records[2]["question_id"] and now[2]["tstamp"] != records[2]["tstamp"]
    summary = json.loads((out / "results.json").read_text())
    assert summary["config"]["resumed_questions"] == 2 and summary["overall"]["questions"] == 3


def test_a_run_that_differs_records_where_it_first_differs(tiny_dirs):
    """answers.jsonl says at which new token an inexact decoder left vanilla's answer (a prefix: where it ended)."""
    from kangaroo_infer.bench import DecoderRun, first_difference
    from kangaroo_infer.bench.records import run_record

    _, _, tokenizer = tiny_dirs
    assert first_difference([1, 2, 3], [1, 2, 3]) is None and first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2 == first_difference([1, 2, 3], [1, 2])
    run = DecoderRun(tokens=[5, 6, 7], wall_time=1.0, accept_lengths=[1, 2], decoding_steps=2)
    assert run_record(run, tokenizer, [5, 6, 8])["first_difference"] == 2
    assert "first_difference" not in run_record(run, tokenizer, [5, 6, 7])  # identical
    assert "first_difference" not in run_record(run, tokenizer, None)  # sampled: identity not checked
