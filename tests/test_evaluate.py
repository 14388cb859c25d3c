"""On-policy evaluation (kangaroo_infer/evaluate.py, eval-adapter, kangaroo_train/onpolicy.py) on real tiny models."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kangaroo_infer import KangarooModel
from kangaroo_infer.cache import KangarooCache
from kangaroo_infer.draft import DraftHead, DraftPick, adapter_logits, draft_proposal, shallow_step
from kangaroo_infer.evaluate import EvalAnswer, depth_counts, greedy_answers, score_answers
from kangaroo_infer.packed import PackedWeights, packing_available
from kangaroo_infer.questions import chat_prompt_ids, load_questions
from kangaroo_infer.sample import SamplingConfig

from . import helpers
from .conftest import identity_adapter, tiny_model

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 40, 41, 42, 43, 44]]
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem about the sea."]},
    {"question_id": 2, "category": "writing", "turns": ["Describe a kangaroo."]},
    {"question_id": 3, "category": "coding", "turns": ["Write hello world in C."]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend
    command = [sys.executable, "-m", "kangaroo_infer", "eval-adapter", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


# ---- the metric ---------------------------------------------------------------------------------------------------


def test_identity_deep_layers_and_pass_through_adapter_agree_exactly():
    """Deep layers that add nothing (zero o_proj / down_proj) + an adapter that passes its input through and applies
    the base's final norm: the draft distribution IS the full model's, so top-1 = 1 and Σ min(p, q) = 1."""
    model = tiny_model("llama", deep_scale=0.0, exit_layer=2)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    answers = [EvalAnswer(p, a) for p, a in zip(PROMPTS, greedy_answers(model, PROMPTS, 10), strict=True)]
    result = score_answers(model, km.adapter, answers, depth=3)["overall"]
    assert result["positions"] == sum(len(a.answer_ids) - 1 for a in answers) > 0
    assert result["top1"] == 1.0
    assert result["accept"] == pytest.approx(1.0, abs=1e-5)
    assert result["depth_agreement"] == [1.0, 1.0, 1.0]
    assert result["tau_estimate"] == pytest.approx(4.0)
    assert result["greedy_mismatches"] == 0


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_scores_equal_a_brute_force_step_by_step_drafting(draft_vocab):
    """Against an independent computation per position: the base's own forward for p, a real draft step (shallow
    layers + adapter through KangarooCache) for q, and draft.draft_proposal for the chained depths."""
    model = tiny_model("llama", deep_scale=0.3, exit_layer=2)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    if draft_vocab:  # drafting restricted to 48 of the 96 tokens: q is zero outside them
        km.adapter.set_draft_vocab(list(range(0, 96, 2)))
    depth = 3
    answers = [EvalAnswer(p, a) for p, a in zip(PROMPTS, greedy_answers(model, PROMPTS, 12), strict=True)]
    result = score_answers(model, km.adapter, answers, depth=depth)["overall"]

    head = DraftHead.of(km.backbone.lm_head, km.adapter)
    top1, accept, positions = 0, 0.0, 0
    hits, trials = [0] * depth, [0] * depth
    with torch.no_grad():
        for a in answers:
            seq = a.prompt_ids + a.answer_ids
            for i in range(len(a.answer_ids) - 1):  # position holding answer token i drafts answer token i + 1
                context = a.prompt_ids + a.answer_ids[: i + 1]
                p = torch.softmax(model(torch.tensor([context])).logits[0, -1], -1)  # [V]
                cache = KangarooCache(2, km.backbone.num_layers)
                km.prefill(torch.tensor([context[:-1]]), cache)
                state = shallow_step(km.backbone, 2, cache, torch.tensor([[context[-1]]]))
                q_rows = torch.softmax(adapter_logits(km.backbone, km.adapter, head, cache, state), -1)
                q = torch.zeros_like(p)
                q[head.vocab if head.vocab is not None else slice(None)] = q_rows
                top1 += int(q.argmax()) == int(p.argmax())
                accept += float(torch.minimum(p, q).sum())
                positions += 1
                cache = KangarooCache(2, km.backbone.num_layers)
                km.prefill(torch.tensor([context[:-1]]), cache)
                pick = DraftPick(head, SamplingConfig(), km.backbone.lm_head.weight.shape[0])  # greedy
                chain = draft_proposal(
                    km.backbone, km.adapter, pick, cache, context[-1], depth, 0.0, frozenset()
                ).tokens
                truth = seq[len(context) : len(context) + depth]
                for d in range(1, depth + 1):
                    if len(truth) >= d:
                        trials[d - 1] += 1
                        hits[d - 1] += chain[:d] == truth[:d]
    assert result["positions"] == positions
    assert result["top1"] == pytest.approx(top1 / positions, abs=1e-12)
    assert 0.0 < result["top1"] < 1.0  # a real mismatch case
    assert result["accept"] == pytest.approx(accept / positions, abs=1e-5)
    assert result["depth_agreement"] == pytest.approx([h / t for h, t in zip(hits, trials, strict=True)])
    assert hits[1] > 0  # at least one 2-token chain matched, so the chained depths are exercised


def test_depth_counts():
    hits, trials = depth_counts([True, True, False, True], 3)
    assert trials == [4, 3, 2]  # from position i, depth d needs d more answer tokens
    assert hits == [3, 1, 0]


def test_per_category_aggregation_pools_positions():
    model = tiny_model("llama", deep_scale=0.3, exit_layer=2)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    identity_adapter(km)
    generated = greedy_answers(model, PROMPTS, 8)
    answers = [EvalAnswer(p, a, c) for p, a, c in zip(PROMPTS, generated, ["x", "y", "x"], strict=True)]
    result = score_answers(model, km.adapter, answers)
    x, y, overall = result["categories"]["x"], result["categories"]["y"], result["overall"]
    assert x["answers"] == 2 and y["answers"] == 1
    assert x["positions"] + y["positions"] == overall["positions"]
    pooled = (x["top1"] * x["positions"] + y["top1"] * y["positions"]) / overall["positions"]
    assert overall["top1"] == pytest.approx(pooled)


def test_greedy_answers_equal_each_prompts_own_generate(tiny_dirs):
    _, model, tokenizer = tiny_dirs
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in QUESTIONS]
    answers = greedy_answers(model, prompts, 20)
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, do_sample=False, max_new_tokens=20)
        assert answer == ref[0, ids.shape[1] :].tolist()


def test_greedy_answers_in_bf16_run_packed_and_equal_generate(tiny_dirs, monkeypatch):
    """A bf16 base on CPU answers through packed linears (where torch has them): still each prompt's own generate."""
    _, model, tokenizer = tiny_dirs
    model = copy.deepcopy(model).to(torch.bfloat16)
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in QUESTIONS]
    runs = []
    real_run = PackedWeights.run
    monkeypatch.setattr(PackedWeights, "run", staticmethod(lambda *a, **k: runs.append(1) or real_run(*a, **k)))
    answers = greedy_answers(model, prompts, 20)
    monkeypatch.undo()
    assert bool(runs) == packing_available(model.lm_head.weight)  # the packed kernel ran wherever it exists
    assert all("forward" not in vars(m) for m in model.modules())  # forwards restored afterwards
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, do_sample=False, max_new_tokens=20)
        assert answer == ref[0, ids.shape[1] :].tolist()


def test_library_errors():
    model = tiny_model("llama", exit_layer=2)
    km = KangarooModel.from_pretrained(model, exit_layer=2)
    with pytest.raises(ValueError, match="No answers to score"):
        score_answers(model, km.adapter, [])
    with pytest.raises(ValueError, match="No answer position to score"):
        score_answers(model, km.adapter, [EvalAnswer([5, 6], [7])])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        greedy_answers(model, PROMPTS, 0)
    with pytest.raises(ValueError, match="No prompts"):
        greedy_answers(model, [], 4)


# ---- the CLI --------------------------------------------------------------------------------------------------------


def test_cli_on_generated_answers(tiny_dirs, tmp_path, capsys):
    """In process (the same main() as the command); test_cli_on_a_bench_answers_file runs it as a subprocess."""
    from kangaroo_infer.cli import main

    root, model, tokenizer = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "eval.json"
    capsys.readouterr()
    with torch.enable_grad():
        code = main([
            "eval-adapter", "--adapter", str(root / "adapter"), "--questions", str(questions), "--num-questions", "2",
            "--max-new-tokens", "12", "--out", str(out),
        ])  # fmt: skip
    result = capsys.readouterr()
    assert code == 0, result.err
    assert "on-policy adapter agreement" in result.out and "writing" in result.out and "coding" in result.out
    saved = json.loads(out.read_text())
    assert set(saved["categories"]) == {"writing", "coding"}
    assert saved["categories"]["writing"]["answers"] == 2 and saved["config"]["max_new_tokens"] == 12

    km = KangarooModel.from_pretrained(None, adapter=root / "adapter")
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in QUESTIONS]
    answers = [
        EvalAnswer(p, a, q["category"])
        for p, a, q in zip(prompts, greedy_answers(km.base, prompts, 12), QUESTIONS, strict=True)
    ]
    expected = score_answers(km.base, km.adapter, answers)
    for name in ("top1", "accept", "positions"):
        assert saved["overall"][name] == pytest.approx(expected["overall"][name], abs=1e-6)


@pytest.mark.slow
def test_cli_on_a_bench_answers_file(tiny_dirs, tmp_path):
    """Answers recorded by a real bench run are re-tokenized and scored on their leading tokens that the base chooses
    greedily; a sampled record (identical None) and an old-format record that is not identical are left out."""
    from kangaroo_infer import bench, load_tokenizer

    root, _, _ = tiny_dirs
    questions_file = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    km = KangarooModel.from_pretrained(None, adapter=root / "adapter")
    tokenizer = load_tokenizer(km.base)
    questions = load_questions(questions_file)
    bench.bench(km, tokenizer, questions, tmp_path / "b", max_new_tokens=12, warmup=0, profile=False, progress=False)
    records = [json.loads(line) for line in (tmp_path / "b" / "answers.jsonl").read_text().splitlines()]
    assert all(run["identical"] for r in records for run in r["decoders"].values())
    for run in records[0]["decoders"].values():
        run["identical"] = None  # as a sampled run writes
    kangaroo = records[1]["decoders"]["kangaroo"]  # as an older bench wrote: kangaroo's run at the top level, and
    records[1] = {"question_id": records[1]["question_id"], "category": records[1]["category"], **kangaroo}
    records[1]["identical"] = False  # no vanilla_turns: only identical records hold the greedy answer
    answers_file = write_jsonl(tmp_path / "answers.jsonl", records)
    out = tmp_path / "eval.json"
    result = run_cli(
        "--adapter", str(root / "adapter"), "--questions", str(questions_file), "--answers", str(answers_file),
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    config = saved["config"]
    assert config["records"] == 3 and config["not_greedy"] == 2 and config["used"] == 1
    assert 0 < config["answer_tokens_kept"] <= config["answer_tokens_total"]
    assert saved["overall"]["greedy_mismatches"] == 0  # only the base's greedy continuation is scored
    assert "records used" in result.stderr


@pytest.mark.parametrize(
    "args,content,message",
    [
        (["--num-questions", "0"], None, "--num-questions must be >= 1"),
        (["--max-new-tokens", "0"], None, "--max-new-tokens must be >= 1"),
        (["--depth", "0"], None, "--depth must be >= 1"),
        ([], "", "holds no questions"),
        (["--answers", "ANSWERS"], "none", "has no usable answer"),
        (["--answers", "ANSWERS"], "empty", "has no usable answer"),
        (["--answers", "/no/such/answers.jsonl"], None, "does not exist"),
        (["--answers", "ANSWERS"], "other_prompt", "was asked with another prompt"),
        (["--max-new-tokens", "1"], None, "No answer position to score"),
    ],
)
def test_cli_errors(tiny_dirs, tmp_path, capsys, args, content, message):
    """In process (the same main() as the command); grad mode is restored after main() turns it off."""
    from kangaroo_infer.cli import main

    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    if content == "":
        questions.write_text("")
    answers = tmp_path / "answers.jsonl"
    if content == "none":  # records that are not the base's greedy answer
        write_jsonl(answers, [{"question_id": 1, "category": "writing", "turns": ["x"], "identical": False}])
    elif content == "empty":
        answers.write_text("")
    elif content == "other_prompt":  # same question id and category, but another prompt's hash
        record = {"question_id": 1, "category": "writing", "turns": ["x"], "identical": True, "prompt_sha256": "0"}
        write_jsonl(answers, [record])
    args = [str(answers) if a == "ANSWERS" else a for a in args]
    adapter = "/no/such/adapter" if "must be >= 1" in message else str(root / "adapter")  # checked before loading
    with torch.enable_grad():
        code = main(["eval-adapter", "--adapter", adapter, "--questions", str(questions), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]  # one clear message
    assert message in line and "Traceback" not in err


# ---- the training callback ----------------------------------------------------------------------------------------


def run_train(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return helpers.run_train(
        output_dir, "trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.onpolicy.num_prompts=4",
        "callbacks.onpolicy.max_new_tokens=16", *overrides,
    )  # fmt: skip


@pytest.mark.slow
def test_training_logs_onpolicy_metrics_and_reuses_cached_answers(tmp_path):
    answers_dir = tmp_path / "answers"
    first = run_train(tmp_path / "one", f"callbacks.onpolicy.cache_dir={answers_dir}")
    assert "generating the base's greedy answers to 4 held-out prompts" in first.stdout + first.stderr
    (cached,) = answers_dir.glob("answers-*.json")
    saved = json.loads(cached.read_text())
    assert len(saved["prompts"]) == 4 and all(len(a) <= 16 for a in saved["answers"])
    written = cached.stat().st_mtime_ns
    with open(tmp_path / "one" / "logs" / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("val/onpolicy_top1")]
    assert [int(r["step"]) for r in logged] == [1, 3]  # each validation (after optimizer steps 2 and 4)
    for r in logged:
        assert 0.0 <= float(r["val/onpolicy_top1"]) <= 1.0 and 0.0 < float(r["val/onpolicy_accept"]) <= 1.0
        assert r["val/onpolicy_tau"]

    second = run_train(tmp_path / "two", f"callbacks.onpolicy.cache_dir={answers_dir}")
    assert "reusing the cached greedy answers" in second.stdout + second.stderr
    assert "generating the base's greedy answers" not in second.stdout + second.stderr
    assert cached.stat().st_mtime_ns == written and list(answers_dir.glob("answers-*.json")) == [cached]


def test_onpolicy_config_off_and_bad_values(tmp_path):
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir

    from kangaroo_train.onpolicy import OnPolicyEval
    from kangaroo_train.strategy import CPUDeepSpeedStrategy
    from kangaroo_train.train import instantiate_group

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        on = compose(config_name="train", overrides=["experiment=tiny"])
        off = compose(config_name="train", overrides=["experiment=tiny", "callbacks.onpolicy=null"])
        bad = compose(config_name="train", overrides=["experiment=tiny", "callbacks.onpolicy.num_prompts=0"])
    assert any(isinstance(c, OnPolicyEval) for c in instantiate_group(on.callbacks, "callbacks"))
    assert not any(isinstance(c, OnPolicyEval) for c in instantiate_group(off.callbacks, "callbacks"))
    with pytest.raises(ValueError, match="callbacks.onpolicy.num_prompts=0 must be a positive integer"):
        instantiate_group(bad.callbacks, "callbacks")
    zero3 = CPUDeepSpeedStrategy(config={"zero_optimization": {"stage": 3}}, parallel_devices=[torch.device("cpu", 0)])
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=zero3, logger=False, enable_progress_bar=False)
    callback = OnPolicyEval(num_prompts=2, max_new_tokens=4, dtype="float32", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="callbacks.onpolicy=null with strategy=deepspeed_zero3"):
        callback.setup(trainer, L.LightningModule(), "fit")
