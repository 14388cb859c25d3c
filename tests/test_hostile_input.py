"""Input a careless or hostile user might give: nothing may be lost, nothing in a file may run, each gets one error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kangaroo_infer import KangarooAdapter, KangarooModel
from kangaroo_infer.base import check_device, materialize_smollm2
from kangaroo_infer.files import WRITTEN_LIST, atomic_directory, atomic_write
from tests.conftest import tiny_model
from tests.test_train_e2e import REPO, assert_clean_error, run_train

# ---- 1. writing a directory never deletes what we did not write ------------------------------------------------


def test_atomic_directory_replaces_only_its_own_output(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("2")
    assert sorted((target / WRITTEN_LIST).read_text().split()) == ["a.txt", "sub/b.txt"]
    with atomic_directory(target) as tmp:  # ours: replaced
        (tmp / "a.txt").write_text("3")
    assert (target / "a.txt").read_text() == "3" and not (target / "sub").exists()

    (target / "notes.md").write_text("the user's")  # a foreign file inside: refused, nothing touched
    with pytest.raises(ValueError, match=r"holds files this tool did not write \(notes.md\)"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("4")
    assert (target / "a.txt").read_text() == "3" and (target / "notes.md").is_file()

    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    (user / "data" / "x.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="did not write"), atomic_directory(user):
        pass
    assert (user / "data" / "x.bin").is_file()

    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    with pytest.raises(ValueError, match="exists and is not a directory"), atomic_directory(a_file):
        pass
    assert a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "out", "user"]  # no temporary left behind
    with pytest.raises(ValueError, match=r"Cannot write .*file.txt/out/x: .*file.txt is not a writable directory"):
        with atomic_directory(a_file / "out" / "x"):  # under a file: nothing can be made there
            pass
    with pytest.raises(ValueError, match=r"Cannot write .*file.txt/x.json: .*Choose a writable location"):
        atomic_write(a_file / "x.json", "{}")  # no policy check: the creation itself fails, named


def test_materialize_refuses_a_foreign_directory_before_converting(kangaroo_home):
    target = kangaroo_home / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="did not write"):
        materialize_smollm2()
    assert (target / "mine.txt").read_text() == "keep"


def test_materialize_names_an_unwritable_home_before_converting(tmp_path, monkeypatch):
    home_file = tmp_path / "home"
    home_file.write_text("a file where $KANGAROO_HOME should be a directory")
    monkeypatch.setenv("KANGAROO_HOME", str(home_file))
    unwritable = r"Cannot write .*smollm2-135m-instruct: .*home is not a writable directory.*set \$KANGAROO_HOME"
    with pytest.raises(ValueError, match=unwritable):
        materialize_smollm2()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_run")
    run_train(
        out, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=100"
    )
    return out


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kangaroo_train.export", *args], capture_output=True, text=True, cwd=REPO
    )


def test_export_into_the_run_directory_deletes_nothing(tiny_run):
    before = sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*"))
    out = export(f"ckpt={tiny_run / 'checkpoints' / 'last.ckpt'}", f"out={tiny_run}")
    assert_clean_error(out, str(tiny_run), "did not write", "another output directory")
    assert sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*")) == before


def test_export_replaces_its_own_and_legacy_exports(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    legacy = tmp_path / "legacy"  # what an export wrote before the written-files list existed
    shutil.copytree(tiny_run / "adapter", legacy)
    (legacy / WRITTEN_LIST).unlink()
    (legacy / "training.json").write_text("{}")
    assert export(f"ckpt={ckpt}", f"out={legacy}").returncode == 0
    assert json.loads((legacy / "training.json").read_text())["global_step"] == 4
    step2 = tiny_run / "checkpoints" / "step-00000002.ckpt"
    assert export(f"ckpt={step2}", f"out={legacy}").returncode == 0  # ours now: replaced
    assert json.loads((legacy / "training.json").read_text())["global_step"] == 2


def test_export_to_an_existing_file_or_a_plain_state_dict(tiny_run, tmp_path):
    a_file = tmp_path / "adapter.bin"
    a_file.write_text("keep")
    out = export(f"ckpt={tiny_run / 'checkpoints' / 'last.ckpt'}", f"out={a_file}")
    assert_clean_error(out, "exists and is not a directory")
    assert a_file.read_text() == "keep"
    plain = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    assert_clean_error(export(f"ckpt={plain}", f"out={tmp_path / 'x'}"), "not a kangaroo_train checkpoint")


# ---- 3. NaN never travels from a damaged cache to an adapter ----------------------------------------------------


def test_damaged_cache_data_is_caught_by_its_checksum(tiny_run, tmp_path):
    features = tmp_path / "features"
    shutil.copytree(tiny_run / "features", features)
    shard = features / "train" / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    for i in range(header + 64, len(raw), 97):  # damage the data, keep the header intact
        raw[i] ^= 0xFF
    shard.write_bytes(bytes(raw))
    out = run_train(tmp_path, f"cache.dir={features}", check=False)
    assert_clean_error(out, "shard-00001.safetensors", "checksum", "rerun the cache stage")
    assert not (tmp_path / "adapter").exists()


def test_non_finite_loss_stops_training(tiny_run, tmp_path):
    """Features that are NaN with a valid checksum (e.g. a base overflowing in fp16): the loss check stops it."""
    from kangaroo_train.features import FIELDS, sample_crc32

    features = tmp_path / "features"
    shutil.copytree(tiny_run / "features", features)
    for shard in (features / "train").glob("shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no iteration)
        for key in [k for k in tensors if k.endswith(".exit_states")]:
            j = key.split(".")[0]
            tensors[key] = torch.full_like(tensors[key], float("nan"))
            metadata[f"{j}.crc32"] = str(sample_crc32({n: tensors[f"{j}.{n}"] for n in FIELDS}))
        save_file(tensors, str(shard), metadata=metadata)
    out = run_train(tmp_path, f"cache.dir={features}", check=False)
    assert_clean_error(out, "NaN/inf at step 0", "cache.dir")
    assert not (tmp_path / "adapter").exists()


def test_non_finite_weights_are_refused_on_export_and_load(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("o_proj.weight"))
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    assert_clean_error(export(f"ckpt={tmp_path / 'nan.ckpt'}", f"out={tmp_path / 'a'}"), "non-finite", key[8:])

    base = tiny_model()
    adapter = KangarooAdapter.for_base(base, exit_layer=2)
    with torch.no_grad():
        adapter.norm.weight[0] = float("inf")
    adapter.save_pretrained(tmp_path / "inf_adapter")
    with pytest.raises(ValueError, match=r"non-finite .* \['norm.weight'\]"):
        KangarooModel.from_pretrained(base, adapter=tmp_path / "inf_adapter")


# ---- 4. no pickled code runs ------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call that writes a marker file: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_crafted_ckpt_file_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(marker)}}, crafted)
    out = export(f"ckpt={crafted}", f"out={tmp_path / 'a'}")
    assert_clean_error(out, "pickled Python objects", "nothing from it was executed")
    assert not marker.exists()


def test_crafted_zero_directory_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted_zero"
    (crafted / "checkpoint").mkdir(parents=True)
    (crafted / "latest").write_text("checkpoint")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        payload = {"optimizer_state_dict": _Payload(marker), "module": _Payload(marker)}
        torch.save(payload, crafted / "checkpoint" / name)
    out = export(f"ckpt={crafted}", f"out={tmp_path / 'a'}")
    assert_clean_error(out, "pickled Python objects", "nothing from it was executed")
    assert not marker.exists()


# ---- 7. resuming after a change, or from a damaged checkpoint ---------------------------------------------------


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def test_resume_from_a_truncated_last_ckpt_names_the_intact_one(run_copy):
    last = run_copy / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    out = run_train(run_copy, "stage=train", "resume=true", "trainer.max_steps=6", check=False)
    assert_clean_error(out, "Cannot resume", "step-00000004.ckpt (step 4)", "delete")


def test_resume_with_another_adapter_or_batch_is_refused(run_copy):
    out = run_train(run_copy, "stage=train", "resume=true", "adapter=attention_mlp", "trainer.max_steps=6", check=False)
    assert_clean_error(out, "another adapter config", "mlp: checkpoint False vs now True")
    out = run_train(run_copy, "stage=train", "resume=true", "data.batch_size=4", "trainer.max_steps=6", check=False)
    assert_clean_error(out, "another batch layout", "batch_size: checkpoint 2 vs now 4")
    # a checkpoint from before adapter.num_layers existed counts as the default, one block
    last = run_copy / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    del ckpt["hyper_parameters"]["adapter_config"]["num_layers"]
    torch.save(ckpt, last)
    out = run_train(run_copy, "stage=train", "resume=true", "adapter.num_layers=2", "trainer.max_steps=6", check=False)
    assert_clean_error(out, "another adapter config", "num_layers: checkpoint 1 vs now 2")


# ---- 7. devices and generation arguments ------------------------------------------------------------------------


def test_a_device_this_machine_lacks_is_refused_before_loading():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the refusal is for machines without it
    with pytest.raises(ValueError, match="no CUDA GPU; use --device cpu"):
        check_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu0")
    check_device("cpu")


def test_cli_device_cuda_without_cuda_is_one_error_line(tiny_dirs):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root, _, _ = tiny_dirs
    out = subprocess.run(
        [sys.executable, "-m", "kangaroo_infer", "generate", "--adapter", str(root / "adapter"), "--device", "cuda",
         "--prompt", "hi"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr and "no CUDA GPU" in out.stderr, out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
        (["--threshold", "2"], "--threshold (η) must lie in [0, 1]"),
        (["--steps", "-1"], "--steps must be an integer >= 0"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--top-p", "0"], "--top-p must lie in (0, 1]"),
        (["--top-k", "-2"], "--top-k must be an integer >= 0"),
        (["--lookup-tokens", "-1"], "--lookup-tokens must be an integer >= 0"),
        (["--tree-max-nodes", "0"], "--tree-max-nodes must be an integer >= 1"),
        (["--seed", "99999999999999999999999"], "--seed must be an integer in [0, 2**63 - 1]"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2**63 - 1]"),
        # options that would do nothing are refused too
        (["--top-p", "0.9"], "--top-p cuts the sampling distribution, and --temperature 0 decodes greedily"),
        (["--top-k", "5"], "set --temperature > 0 to sample, or drop --top-k"),
        (["--tree-top-k", "3"], "--tree-top-k shapes draft trees, which are off; add --tree or drop --tree-top-k"),
    ],
)
def test_generate_numeric_arguments_are_checked_before_the_model_loads(tmp_path, args, message, capsys):
    from kangaroo_infer.cli import main

    missing = tmp_path / "no-such-adapter"  # would fail on loading: the check must come first
    try:
        assert main(["generate", "--adapter", str(missing), "--prompt", "hi", *args]) == 2
    finally:
        torch.set_grad_enabled(True)  # cli.main turns autograd off for the process
    err = capsys.readouterr().err
    assert message in err and "does not exist" not in err, err


def test_generate_names_an_unknown_keyword_and_lists_every_option():
    """generate's options are written once (GenerationOptions); a misspelt one is still refused as clearly as Python
    refuses an unknown keyword, and help() still lists every option with its default."""
    import inspect
    from dataclasses import fields

    from kangaroo_infer.settings import GenerationOptions

    km = KangarooModel.from_pretrained(tiny_model(), exit_layer=2)
    with pytest.raises(TypeError) as err:
        km.generate(torch.tensor([[5, 6, 7]]), tresh=0.5)
    message = str(err.value)
    assert "KangarooModel.generate() got an unexpected keyword argument 'tresh' (did you mean 'threshold'?)" in message
    assert all(f.name in message for f in fields(GenerationOptions)) and "attention_mask" in message, message
    with pytest.raises(TypeError, match="generation_settings\\(\\) got an unexpected keyword argument 'streamer'"):
        km.generation_settings(streamer=None)
    options = {f.name: f.default for f in fields(GenerationOptions)}
    for method in (km.generate, km.generation_settings):
        listed = {name: p.default for name, p in inspect.signature(method).parameters.items()}
        assert options.items() <= listed.items(), listed


# ---- 8. issue #28: settings checked before any stage, adapter configs, Ctrl-C, messages that name the fix -------


def compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir

    from kangaroo_train.train import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=tiny", *overrides])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", "optim.lr='abc' must be >= 0 (a finite number)"),
        ("optim.lr=-1", "optim.lr=-1 must be >= 0 (a finite number)"),
        ("optim.lr=nan", "optim.lr=nan must be >= 0 (a finite number)"),
        ("optim.betas=[0.9,1.5]", "optim.betas[1]=1.5 must be in [0, 1)"),
        ("optim.warmup_steps=1.5", "optim.warmup_steps=1.5 must be an integer >= 0"),
        ("data.val_fraction=1", "data.val_fraction=1 must be in [0, 1)"),
        ("data.max_len=0", "data.max_len=0 must be a positive integer"),
        ("cache.batch_size=abc", "cache.batch_size='abc' must be a positive integer"),
        ("distill=greedy distill.temperature=nan", "distill.temperature=nan must be >= 0"),
        ("distill=greedy distill.top_p=0", "distill.top_p=0 must be in (0, 1]"),
        ("distill=greedy distill.empty_prompts=skip", "distill.empty_prompts='skip' must be one of"),
        ("adapter.draft_vocab_size=-3", "adapter.draft_vocab_size=-3 must be a positive integer or null"),
        ("temperature=nan", "temperature=nan must be > 0"),
        ("generation.threshold=2", "generation.threshold=2 must be in [0, 1]"),
    ],
)
def test_every_setting_is_checked_before_any_stage(override, message, tmp_path):
    """validate_config is the first thing run() does, whatever the stage (stage=data included)."""
    from kangaroo_train.train import validate_config

    cfg = compose_train(f"paths.output_dir={tmp_path}", "stage=data", *override.split())
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    assert message in str(err.value), err.value
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_checks_compare_an_int_too_large_for_a_float_exactly():
    """One predicate (is_real) for both packages: an int beyond float range is a number, compared exactly, not an
    OverflowError from math.isfinite."""
    from kangaroo_infer.checks import check_real, is_real
    from kangaroo_train.checks import require_number

    assert is_real(10**400, 0) and not is_real(10**400, 0, 1) and not is_real(True) and not is_real(float("inf"))
    with pytest.raises(ValueError, match="x must be a finite number >= 0; got -1000"):
        check_real("x", -(10**400), 0)
    require_number("optim.lr", 10**400, 0)
    with pytest.raises(ValueError, match=r"optim.betas\[0\]=1000.* must be in \[0, 1\)"):
        require_number("optim.betas[0]", 10**400, 0, 1, high_open=True)


def test_distill_settings_refuse_nan():
    from kangaroo_train.regenerate import DistillSettings

    with pytest.raises(ValueError, match="distill.temperature=nan must be >= 0"):
        DistillSettings(temperature=float("nan"))


def test_multirun_checks_every_job_before_the_first_starts(tmp_path):
    """The exit code and the absence of a traceback are the point: one subprocess. The bad value is in the second
    job, so the first would have run its data stage had the check waited for it."""
    out = run_train(tmp_path, "optim.lr=1e-3,abc", "stage=data", check=False, multirun=True)
    assert_clean_error(
        out, "job 1 (", "optim.lr=abc,", "optim.lr='abc' must be >= 0 (a finite number)", "No job was started"
    )
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob("optim.lr=*"))


@pytest.mark.parametrize("value", [-3, "12", 0, 2.5])
def test_adapter_config_fields_are_checked_when_read(tiny_dirs, tmp_path, capsys, value):
    from kangaroo_infer.adapter import read_adapter_config
    from kangaroo_infer.cli import main

    root, _, _ = tiny_dirs
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    config = json.loads((adapter / "config.json").read_text())
    config["draft_vocab_size"] = value
    (adapter / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"draft_vocab_size=.* must be null or >= 1; the file is damaged"):
        read_adapter_config(adapter)
    for args in (["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["export-draft", "--adapter", str(adapter), "--out", str(tmp_path / "draft")]):  # fmt: skip
        try:
            assert main(args) == 2
        finally:
            torch.set_grad_enabled(True)
        err = capsys.readouterr().err
        assert "Traceback" not in err and "draft_vocab_size" in err and "Re-export the adapter" in err, err


def test_ctrl_c_ends_bench_with_one_line_and_resume_continues(tiny_dirs, tmp_path, capsys):
    """A real SIGINT, sent to this process once the first answer is on disk (no mock): main() answers with one line
    that says how to resume, and --resume then finishes the benchmark."""
    import os
    import signal
    import threading
    import time

    from kangaroo_infer.cli import main
    from tests.test_evaluate import write_jsonl

    root, _, _ = tiny_dirs
    n_questions = 6
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "category": "writing", "turns": [f"Tell me {i}"]}
                                                   for i in range(n_questions)])  # fmt: skip
    out = tmp_path / "out"
    answers = out / "answers.jsonl"

    def interrupt() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (answers.is_file() and answers.read_text().count("\n") >= 1):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    args = ["bench", "--adapter", str(root / "adapter"), "--questions", str(questions), "--out", str(out),
            "--max-new-tokens", "48", "--no-profile", "--warmup", "0"]  # fmt: skip
    # A shell that starts a job in the background (`cmd &` without job control) starts it with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: the test sets Python's own handler, as a terminal has it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        code = main(args)
    finally:
        torch.set_grad_enabled(True)
        thread.join()
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert str(answers) in line and "--resume" in line
    done = answers.read_text().count("\n")
    assert 1 <= done < n_questions
    try:
        assert main([*args, "--resume"]) == 0
    finally:
        torch.set_grad_enabled(True)
    assert json.loads((out / "results.json").read_text())["config"]["resumed_questions"] == done


def test_non_utf8_data_names_file_line_and_fix(tmp_path):
    from kangaroo_train.data import load_conversations

    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(
        good.encode() + b"\n" + '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"data.jsonl, line 2, column 47: byte 0xe9 is not UTF-8.*iconv"):
        load_conversations(str(jsonl))
    as_json = tmp_path / "data.json"
    as_json.write_bytes(b"[\n" + good.encode() + b",\n" + good.replace("hi", "h\u00e9").encode("latin-1") + b"]")
    with pytest.raises(ValueError, match=r"data.json, line 3, column .*: byte 0xe9 is not UTF-8.*data.source"):
        load_conversations(str(as_json))


def test_eval_adapter_answers_of_another_base_name_the_base(tiny_dirs, tmp_path, capsys):
    from kangaroo_infer.cli import main
    from tests.test_evaluate import QUESTIONS, write_jsonl

    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    text = "purple elephants negotiate quantum bananas seventeen times"  # not what the tiny base says greedily
    records = [{"question_id": q["question_id"], "category": q["category"], "turns": [text], "identical": True}
               for q in QUESTIONS]  # fmt: skip
    answers = write_jsonl(tmp_path / "answers.jsonl", records)
    try:
        code = main(["eval-adapter", "--adapter", str(root / "adapter"), "--questions", str(questions),
                     "--answers", str(answers)])  # fmt: skip
    finally:
        torch.set_grad_enabled(True)
    err = capsys.readouterr().err
    assert code == 2 and "raise max_new_tokens" not in err, err
    assert "none of the answers' tokens is the base's own greedy choice" in err and "--base" in err, err


def test_distill_report_counts_records_without_a_user_turn(tmp_path):
    from kangaroo_train.data import load_conversations
    from kangaroo_train.regenerate import prompts_from_conversations

    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [turn, [{"role": "assistant", "content": "no question"}], [{"role": "user", "content": "no reply"}], turn]
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    dropped: dict[str, int] = {}
    prompts = prompts_from_conversations(load_conversations(str(source), "openai", None, dropped))
    assert dropped == {"no_user": 1, "no_reply": 1} and len(prompts.skeletons) == 2
