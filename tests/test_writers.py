"""One writer policy for every path a user names (kangaroo_infer.files.write_file / claim_directory): a writer fills
only a new or empty place, or one it wrote itself, atomically; anything else is refused before any work, with the
path and the fix, and is left exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from kangaroo_infer.files import (
    WRITTEN_LIST,
    atomic_directory,
    check_claimable,
    check_file_target,
    claim_directory,
    write_file,
)
from kangaroo_train.train import CONFIG_DIR, validate_config
from tests.test_evaluate import QUESTIONS, write_jsonl


def cli(*args: str) -> int:
    from kangaroo_infer.cli import main

    with torch.enable_grad():  # cli.main turns autograd off for the process
        return main(list(args))


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_write_file_writes_new_and_own_files_and_refuses_the_rest(tmp_path):
    out = tmp_path / "r.json"
    write_file(out, "1", "tool")
    assert out.read_text() == "1" and "r.json\ttool" in (tmp_path / WRITTEN_LIST).read_text()
    write_file(out, "2", "tool")  # its own: replaced
    assert out.read_text() == "2"
    with pytest.raises(ValueError, match=r"r.json exists and other did not write it; nothing was changed"):
        write_file(out, "3", "other")  # another writer's file
    user = tmp_path / "notes.txt"
    user.write_text("mine")
    with pytest.raises(ValueError, match="tool did not write it; nothing was changed. Choose another output path"):
        write_file(user, "x", "tool")
    with pytest.raises(ValueError, match="or pass --overwrite to replace it"):
        check_file_target(user, "tool", fix="pass --overwrite to replace it")
    with pytest.raises(ValueError, match="is also an input"):
        check_file_target(user, "tool", overwrite=True, inputs=(tmp_path / "." / "notes.txt",))
    assert user.read_text() == "mine"
    write_file(user, "x", "tool", overwrite=True)  # the user asked for it
    assert user.read_text() == "x"
    with pytest.raises(ValueError, match="is a directory"):
        write_file(tmp_path, "x", "tool", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WRITTEN_LIST, "notes.txt", "r.json"]  # no temporary left
    # a directory holding a file listed by write_file is still not one atomic_directory may replace wholesale
    with pytest.raises(ValueError, match="did not write"), atomic_directory(tmp_path):
        pass


def test_claimed_directories(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "conversations.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"holds files distill did not write \(conversations.jsonl\)"):
        claim_directory(user, "distill")
    assert sorted(p.name for p in user.iterdir()) == ["conversations.jsonl"]
    mine = claim_directory(tmp_path / "new", "distill")
    write_file(mine / "manifest.json", "{}", "distill", overwrite=True)
    check_claimable(mine, "distill")  # claimed: accepted again
    with pytest.raises(ValueError, match="feature cache did not write"):
        check_claimable(mine, "feature cache")


# ---- 1. eval-adapter --out --------------------------------------------------------------------------------------


def test_eval_adapter_out_never_replaces_inputs_foreign_files_or_directories(tiny_dirs, tmp_path, capsys):
    root, _, _ = tiny_dirs
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    bench = tmp_path / "bench"
    bench.mkdir()
    answers = write_jsonl(bench / "answers.jsonl", [{"question_id": 1, "category": "writing", "turns": ["x"]}])
    before = {p: p.read_bytes() for p in (questions, answers)}
    missing = str(tmp_path / "no-such-adapter")  # the out check must come before anything loads
    base = ["eval-adapter", "--adapter", missing, "--questions", str(questions)]
    for args, message in (
        (["--answers", str(answers), "--out", str(answers), "--overwrite"], "is also an input of this command"),
        (["--out", str(questions), "--overwrite"], "is also an input of this command"),
        (["--out", str(bench)], "is a directory; name a file"),
        (["--out", str(answers)], "eval-adapter did not write it; nothing was changed"),
        (["--out", str(answers / "results.json")], "is not a writable directory"),  # under a file
    ):
        assert cli(*base, *args) == 2
        line = error_line(capsys)
        assert message in line and "does not exist" not in line, line
    assert {p: p.read_bytes() for p in before} == before

    foreign = tmp_path / "results.json"
    foreign.write_text("the user's")
    run = ["eval-adapter", "--adapter", str(root / "adapter"), "--questions", str(questions), "--num-questions", "1",
           "--max-new-tokens", "6", "--out", str(foreign)]  # fmt: skip
    assert cli(*run) == 2 and "pass --overwrite to replace it" in error_line(capsys)
    assert foreign.read_text() == "the user's"
    assert cli(*run, "--overwrite") == 0  # asked for
    assert "overall" in json.loads(foreign.read_text())
    assert cli(*run) == 0  # now its own: replaced without --overwrite


# ---- 2. distill.dir ---------------------------------------------------------------------------------------------


def test_distill_dir_holding_user_files_is_refused_before_any_stage(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "conversations.jsonl").write_text('{"messages": []}\n')
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=tiny", "distill=greedy", f"distill.dir={folder}",
                                                      f"paths.output_dir={tmp_path / 'run'}"])  # fmt: skip
        with pytest.raises(ValueError, match=r"distill did not write \(conversations.jsonl\).*distill.dir"):
            validate_config(cfg)
        legacy = tmp_path / "legacy"  # distilled before directories were claimed: recognised by its manifest
        legacy.mkdir()
        (legacy / "manifest.json").write_text(json.dumps({"distill_key": "k"}))
        (legacy / "conversations.jsonl").write_text("")
        validate_config(compose(config_name="train", overrides=["experiment=tiny", "distill=greedy",
                                                                f"distill.dir={legacy}"]))  # fmt: skip
        a_file = folder / "conversations.jsonl"  # a new cache directory that cannot be made: refused at once too
        with pytest.raises(ValueError, match=r"Cannot write .*conversations.jsonl/cache/train: .*not a writable"):
            validate_config(compose(config_name="train", overrides=["experiment=tiny", f"cache.dir={a_file}/cache"]))
    assert sorted(p.name for p in folder.iterdir()) == ["conversations.jsonl"]


# ---- 3. bench --out ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["results.json", "bench_settings.json", "speedup.png", "answers.jsonl"])
def test_bench_out_keeps_the_users_files(tmp_path, capsys, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("the user's")
    missing = str(tmp_path / "no-such-adapter")
    assert cli("bench", "--adapter", missing, "--out", str(out)) == 2
    line = error_line(capsys)
    assert f"{name} exists and bench did not write it" in line and "--overwrite" in line, line
    assert (out / name).read_text() == "the user's"
    if name == "answers.jsonl":  # no answer in it to resume from: --resume must not replace it either
        assert cli("bench", "--adapter", missing, "--out", str(out), "--resume") == 2
        assert "answers.jsonl exists and bench did not write it" in error_line(capsys)
    assert cli("bench", "--adapter", missing, "--out", str(out), "--overwrite") == 2  # passes the check, then
    assert "does not exist" in error_line(capsys)  # fails on the adapter, before anything is written
    assert sorted(p.name for p in out.iterdir()) == [name]
    for mode in (["--sweep"], ["--batch-size", "2"]):  # the other modes' own files
        target = out / ("sweep.json" if mode == ["--sweep"] else "results.json")
        target.write_text("the user's")
        assert cli("bench", "--adapter", missing, "--out", str(out), *mode) == 2
        assert "bench did not write it" in error_line(capsys)
        assert target.read_text() == "the user's"
