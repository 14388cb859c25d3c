"""The tiny experiment end to end through the real entry point, and the errors it reports for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# REPO, run_train and assert_clean_error are imported from here by other test files too.
from tests.helpers import REPO, assert_clean_error, metrics, run_train, train_rows  # noqa: F401


def compose_tiny(output_dir: Path, *overrides: str):
    """The config ``python -m kangaroo_train experiment=tiny paths.output_dir=... overrides`` runs with."""
    from hydra import compose, initialize_config_dir

    from kangaroo_train.train import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=tiny", f"paths.output_dir={output_dir}", *overrides])


def refused_by_config(output_dir: Path, *overrides: str) -> str:
    """validate_config's error for these overrides (what the entry point prints as its one ``error:`` line before
    loading anything; test_training_again_without_resume_is_refused checks that line and the exit code)."""
    from kangaroo_train.train import validate_config

    with pytest.raises(ValueError) as err:
        validate_config(compose_tiny(output_dir, *overrides))
    return str(err.value)


def refused_by_run(output_dir: Path, *overrides: str) -> str:
    """The stages' error for these overrides, run in this process (kangaroo_train.train.run, what main() calls)."""
    from kangaroo_train.stages import run

    with pytest.raises(ValueError) as err:
        run(compose_tiny(output_dir, *overrides))
    return str(err.value)


def assert_phrases(message: str, *phrases: str) -> None:
    for phrase in phrases:
        assert phrase in message, message


def test_all_stages_leave_their_outputs(tiny_run):
    assert (tiny_run / "features" / "train" / "manifest.json").is_file()
    assert (tiny_run / "checkpoints" / "last.ckpt").is_file()
    config = json.loads((tiny_run / "adapter" / "config.json").read_text())
    assert Path(config["base_model"]).is_absolute() and Path(config["base_model"], "config.json").is_file()
    assert config["exit_layer"] == 2 and config["generation"] == {"threshold": 0.5, "max_draft_steps": 3}
    assert config["draft_vocab_size"] == 64  # the 64 most frequent assistant tokens, stored with the weights
    rows = metrics(tiny_run)
    steps = [int(r["step"]) for r in train_rows(rows)]
    assert steps == list(range(12))  # max_steps=12, logged every optimizer step
    logged = set(rows[0])
    assert {"train/loss", "train/top1", "train/accept", "train/lr", "train/tokens_per_s"} <= logged
    assert {"val/loss", "val/top1", "val/accept"} <= logged
    assert "lr-AdamW/pg1" in logged  # a callback added from the command line (+callbacks.lr_monitor) ran
    runs = list((tiny_run / "logs" / "wandb").glob("offline-run-*"))
    assert runs, "wandb wrote no offline run"


def test_checkpoint_holds_only_the_adapter(tiny_run):
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 12
    assert ckpt["state_dict"] and all(k.startswith("adapter.") for k in ckpt["state_dict"])
    assert not any("lm_head" in k or "embed" in k for k in ckpt["state_dict"])


def test_exported_adapter_decodes_losslessly(tiny_run):
    from kangaroo_infer import KangarooModel, load_tokenizer

    km = KangarooModel.from_pretrained(None, adapter=tiny_run / "adapter")  # the base recorded in the adapter
    tokenizer = load_tokenizer(km.base)
    for prompt in ["Tell me about kangaroos.", "Write a haiku about the sea"]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        ours = km.generate(ids, max_new_tokens=24)
        reference = km.base.generate(ids, do_sample=False, max_new_tokens=24, attention_mask=torch.ones_like(ids))
        assert torch.equal(ours.sequences, reference), prompt


def test_rerun_skips_finished_stages_and_export_cli(tiny_run, tmp_path):
    again = run_train(tiny_run, "stage=cache")  # data and cache are found complete
    assert "building" not in again.stdout + again.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kangaroo_train.export",
            f"ckpt={tiny_run / 'checkpoints' / 'step-00000008.ckpt'}",
            f"out={tmp_path / 'exported'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "exported" / "training.json").read_text())
    assert info["global_step"] == 8


def test_init_from_trains_an_exported_adapter_further(tiny_run, tmp_path):
    """adapter.init_from starts from an exported adapter's weights and draft vocabulary (at lr 0 they come out
    unchanged), and the run's first validation scores that adapter, not a fresh one."""
    from safetensors.torch import load_file

    source = tiny_run / "adapter"
    run_train(tmp_path, f"adapter.init_from={source}", "adapter.draft_vocab_size=64", "optim.lr=0", "stage=all")
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "adapter" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    run_train(tmp_path / "lr", f"adapter.init_from={source}", "adapter.draft_vocab_size=64", "trainer.max_steps=2")
    again = load_file(tmp_path / "lr" / "adapter" / "model.safetensors")
    assert torch.equal(again["draft_vocab"], before["draft_vocab"])
    assert not torch.equal(again["self_attn.q_proj.weight"], before["self_attn.q_proj.weight"])


def test_init_from_grows_an_adapter_by_blocks(tiny_run, tmp_path):
    """adapter.num_layers above init_from's: its blocks are taken as they are and the new ones pass their input
    through (at lr 0 the grown adapter drafts exactly as the source); fewer blocks than the source is refused."""
    from safetensors.torch import load_file

    source = tiny_run / "adapter"
    grown = tmp_path / "grown"
    run_train(grown, f"adapter.init_from={source}", "adapter.draft_vocab_size=64", "adapter.num_layers=2", "optim.lr=0")
    before, after = load_file(source / "model.safetensors"), load_file(grown / "adapter" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not after["blocks.0.self_attn.o_proj.weight"].any() and after["blocks.0.self_attn.q_proj.weight"].any()
    assert json.loads((grown / "adapter" / "config.json").read_text())["num_layers"] == 2
    message = refused_by_config(
        tmp_path / "fewer", f"adapter.init_from={grown / 'adapter'}", "adapter.draft_vocab_size=64"
    )
    assert_phrases(message, "adapter.num_layers=1 but the adapter has 2")
    assert_phrases(
        refused_by_config(tmp_path / "none", "adapter.num_layers=0"), "adapter.num_layers=0 must be a positive integer"
    )


def test_init_from_that_does_not_fit_is_refused(tiny_run, tmp_path):
    source = tiny_run / "adapter"
    message = refused_by_config(tmp_path, f"adapter.init_from={source}", "stage=train")  # draft vocab 64 vs none
    assert_phrases(message, "adapter.draft_vocab_size=None but the adapter has 64")
    message = refused_by_config(
        tmp_path, f"adapter.init_from={source}", "adapter=attention_mlp", "adapter.draft_vocab_size=64"
    )
    assert_phrases(message, "adapter.mlp=True but the adapter has False")
    message = refused_by_config(tmp_path, f"adapter.init_from={tmp_path / 'nowhere'}")
    assert_phrases(message, "adapter.init_from=", "does not exist")
    other = tmp_path / "other_base"  # the same adapter, recorded for a base with another vocabulary
    import shutil

    shutil.copytree(source, other)
    config = json.loads((other / "config.json").read_text())
    config["base_fingerprint"]["vocab_size"] += 1
    (other / "config.json").write_text(json.dumps(config))
    message = refused_by_run(tmp_path, f"adapter.init_from={other}", "adapter.draft_vocab_size=64")
    assert_phrases(message, "adapter.init_from=", "trained for another base model", "vocab_size")


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_output_dir(tmp_path):
    """-m sweeps: every job trains and exports in paths.output_dir/<its overrides>, none overwrites another."""
    run_train(tmp_path, "model.exit_layer=1,2", "trainer.max_steps=2", multirun=True)
    for ell in (1, 2):
        job = tmp_path / f"experiment=tiny,model.exit_layer={ell},trainer.max_steps=2"
        assert json.loads((job / "adapter" / "config.json").read_text())["exit_layer"] == ell
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "hydra").glob("multirun-*/1/.hydra/overrides.yaml"))


def test_training_again_without_resume_is_refused(tiny_run):
    """The entry point's error path as users meet it (a subprocess): exit code 2, one error line, no traceback. The
    other bad inputs below are checked in this process, through the same validate_config / run that main() calls."""
    out = run_train(tiny_run, "stage=train", check=False)
    assert_clean_error(out, "resume=true")
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error: ")]  # one error line
    assert "resume=true" in line


# ---- errors surface cleanly from the entry point -------------------------------------------------------------


def test_stale_cache_is_refused(tiny_run, tmp_path):
    # same data, but another exit layer: the cached features belong to ℓ=2
    message = refused_by_run(tmp_path, f"cache.dir={tiny_run / 'features'}", "model.exit_layer=1", "stage=cache")
    assert_phrases(message, "stale", "exit_layer")


def test_corrupt_shard_is_reported(tiny_run, tmp_path):
    features = tmp_path / "features"
    import shutil

    shutil.copytree(tiny_run / "features", features)
    shard = features / "train" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    assert_phrases(
        refused_by_run(tmp_path, f"cache.dir={features}", "stage=cache"),
        "shard-00001.safetensors",
        "corrupt or truncated",
    )


def test_empty_data_is_reported(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")  # no reply
    assert_phrases(refused_by_run(tmp_path, f"data.source={data}", "stage=data"), "No usable conversation")


def test_online_features_without_a_cache(tmp_path):
    """cache=none: the frozen base computes the features inside each step; checkpoints still hold only the adapter."""
    run_train(tmp_path, "cache=none", "trainer.max_steps=3", "trainer.val_check_interval=3")
    assert not (tmp_path / "features").exists()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and all(k.startswith("adapter.") for k in ckpt["state_dict"])
    rows = metrics(tmp_path)
    assert any(r["val/top1"] for r in rows) and len(train_rows(rows)) == 3
    assert (tmp_path / "adapter" / "model.safetensors").is_file()


@pytest.mark.slow
def test_max_time_stops_with_a_checkpoint_and_an_export(tmp_path):
    """trainer.max_time caps wall-clock time: the run ends early, saves last.ckpt at the step it reached, and
    exports it (how a time-boxed GPU allocation is used)."""
    run_train(
        tmp_path,
        "cache=none",
        "trainer.max_steps=1000000",
        "callbacks.checkpoint.every_n_train_steps=1000000",
        'trainer.max_time="00:00:00:03"',
    )
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 0 < ckpt["global_step"] < 1000000
    last_row = train_rows(metrics(tmp_path))[-1]  # the step it stopped after, and that step's epoch
    assert int(last_row["step"]) == ckpt["global_step"] - 1
    assert ckpt["epoch"] == int(last_row["epoch"])  # saved as unfinished: a resumed run completes that epoch
    assert json.loads((tmp_path / "adapter" / "training.json").read_text())["global_step"] == ckpt["global_step"]
