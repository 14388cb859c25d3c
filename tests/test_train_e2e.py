"""The tiny experiment end to end through the real entry point, and the errors it reports for bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def run_train(
    output_dir: Path, *overrides: str, timeout: int = 300, check: bool = True, multirun: bool = False
) -> subprocess.CompletedProcess:
    """``python -m kangaroo_train [-m] experiment=tiny paths.output_dir=... overrides`` in a subprocess."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "kangaroo_train", *(["-m"] if multirun else [])]
    command += ["experiment=tiny", f"paths.output_dir={output_dir}", *overrides]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    if check:
        assert out.returncode == 0, f"{' '.join(command)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def metrics(output_dir: Path, version: int = 0) -> list[dict[str, str]]:
    with open(output_dir / "logs" / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r.get("train/loss")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One full tiny run (data -> cache -> train -> export) with csv and offline wandb logging."""
    output_dir = tmp_path_factory.mktemp("tiny_run")
    run_train(
        output_dir,
        "logger=[csv,wandb]",
        "+callbacks.lr_monitor={_target_: lightning.pytorch.callbacks.LearningRateMonitor, logging_interval: step}",
        "+trainer.detect_anomaly=false",
        "generation.threshold=0.5",
        "generation.max_draft_steps=3",
        "adapter.draft_vocab_size=64",
    )
    return output_dir


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
    out = run_train(
        tmp_path / "fewer", f"adapter.init_from={grown / 'adapter'}", "adapter.draft_vocab_size=64", check=False
    )
    assert_clean_error(out, "adapter.num_layers=1 but the adapter has 2")
    out = run_train(tmp_path / "none", "adapter.num_layers=0", check=False)
    assert_clean_error(out, "adapter.num_layers=0 must be a positive integer")


def test_init_from_that_does_not_fit_is_refused(tiny_run, tmp_path):
    source = tiny_run / "adapter"
    out = run_train(tmp_path, f"adapter.init_from={source}", "stage=train", check=False)  # draft vocab 64 vs none
    assert_clean_error(out, "adapter.draft_vocab_size=None but the adapter has 64")
    out = run_train(
        tmp_path, f"adapter.init_from={source}", "adapter=attention_mlp", "adapter.draft_vocab_size=64", check=False
    )
    assert_clean_error(out, "adapter.mlp=True but the adapter has False")
    out = run_train(tmp_path, f"adapter.init_from={tmp_path / 'nowhere'}", check=False)
    assert_clean_error(out, "adapter.init_from=", "does not exist")
    other = tmp_path / "other_base"  # the same adapter, recorded for a base with another vocabulary
    import shutil

    shutil.copytree(source, other)
    config = json.loads((other / "config.json").read_text())
    config["base_fingerprint"]["vocab_size"] += 1
    (other / "config.json").write_text(json.dumps(config))
    out = run_train(tmp_path, f"adapter.init_from={other}", "adapter.draft_vocab_size=64", check=False)
    assert_clean_error(out, "adapter.init_from=", "trained for another base model", "vocab_size")


def test_multirun_gives_each_job_its_own_output_dir(tmp_path):
    """-m sweeps: every job trains and exports in paths.output_dir/<its overrides>, none overwrites another."""
    run_train(tmp_path, "model.exit_layer=1,2", "trainer.max_steps=2", multirun=True)
    for ell in (1, 2):
        job = tmp_path / f"experiment=tiny,model.exit_layer={ell},trainer.max_steps=2"
        assert json.loads((job / "adapter" / "config.json").read_text())["exit_layer"] == ell
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "hydra").glob("multirun-*/1/.hydra/overrides.yaml"))


def test_training_again_without_resume_is_refused(tiny_run):
    out = run_train(tiny_run, "stage=train", check=False)
    assert out.returncode == 2 and "resume=true" in out.stderr


# ---- errors surface cleanly from the entry point -------------------------------------------------------------


def assert_clean_error(out: subprocess.CompletedProcess, *phrases: str) -> None:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for phrase in phrases:
        assert phrase in out.stderr, out.stderr[-3000:]


def test_stale_cache_is_refused(tiny_run, tmp_path):
    # same data, but another exit layer: the cached features belong to ℓ=2
    out = run_train(tmp_path, f"cache.dir={tiny_run / 'features'}", "model.exit_layer=1", "stage=cache", check=False)
    assert_clean_error(out, "stale", "exit_layer")


def test_corrupt_shard_is_reported(tiny_run, tmp_path):
    features = tmp_path / "features"
    import shutil

    shutil.copytree(tiny_run / "features", features)
    shard = features / "train" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    out = run_train(tmp_path, f"cache.dir={features}", "stage=cache", check=False)
    assert_clean_error(out, "shard-00001.safetensors", "corrupt or truncated")


def test_empty_data_is_reported(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")  # no reply
    out = run_train(tmp_path, f"data.source={data}", "stage=data", check=False)
    assert_clean_error(out, "No usable conversation")


def test_online_features_without_a_cache(tmp_path):
    """cache=none: the frozen base computes the features inside each step; checkpoints still hold only the adapter."""
    run_train(tmp_path, "cache=none", "trainer.max_steps=3", "trainer.val_check_interval=3")
    assert not (tmp_path / "features").exists()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and all(k.startswith("adapter.") for k in ckpt["state_dict"])
    rows = metrics(tmp_path)
    assert any(r["val/top1"] for r in rows) and len(train_rows(rows)) == 3
    assert (tmp_path / "adapter" / "model.safetensors").is_file()


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
