"""Two CPU processes under DDP and DeepSpeed ZeRO-2, and resuming a killed run, through the real entry point.

All of it is the slow set (``-m slow``): each test trains twice or on two processes (DeepSpeed builds its op).
By default, test_hostile_input.py resumes from a truncated last.ckpt and refuses a resume with another adapter."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from kangaroo_infer import KangarooModel
from kangaroo_train.module import lr_multiplier
from tests.helpers import REPO, metrics, run_train, train_env, train_rows

LR, WARMUP = 1e-3, 2  # configs/experiment/tiny.yaml


def assert_schedule(rows, total: int) -> None:
    """One logged lr per optimizer step, following warmup + cosine over ``total`` optimizer steps."""
    for row in rows:
        step = int(row["step"])
        expected = LR * lr_multiplier(step, warmup=WARMUP, total=total, schedule="cosine")
        assert float(row["train/lr"]) == pytest.approx(expected, rel=1e-5), f"step {step}"


def steps_per_epoch(output_dir, sequences_per_step: int) -> int:
    manifest = json.loads((output_dir / "features" / "train" / "manifest.json").read_text())
    return manifest["num_samples"] // sequences_per_step


@pytest.mark.slow
def test_resume_from_an_epoch_end_starts_the_next_epoch(tmp_path):
    run_train(tmp_path, "trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.val_check_interval=100")
    per_epoch = steps_per_epoch(tmp_path, sequences_per_step=2)
    run_train(tmp_path, "trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.val_check_interval=100", "resume=true")
    resumed = train_rows(metrics(tmp_path, version=1))
    assert [(int(r["epoch"]), int(r["step"])) for r in resumed] == [(1, s) for s in range(per_epoch, 2 * per_epoch)]


@pytest.mark.slow
def test_resume_after_a_mid_epoch_stop_finishes_that_epoch(tmp_path):
    """A run that stops mid-epoch (max_steps here, max_time or a callback's should_stop alike) saves the epoch as
    unfinished, so resuming trains the rest of it instead of skipping to the next epoch."""
    common = ("trainer.max_epochs=2", "trainer.val_check_interval=100", "callbacks.checkpoint.every_n_train_steps=1000")
    run_train(tmp_path, "trainer.max_steps=7", *common)
    per_epoch = steps_per_epoch(tmp_path, sequences_per_step=2)
    assert 7 < per_epoch
    run_train(tmp_path, "trainer.max_steps=-1", *common, "resume=true")
    resumed = train_rows(metrics(tmp_path, version=1))
    expected = [(s // per_epoch, s) for s in range(7, 2 * per_epoch)]  # epoch 0 finishes, then epoch 1
    assert [(int(r["epoch"]), int(r["step"])) for r in resumed] == expected


@pytest.mark.slow
def test_resume_after_a_stop_from_mid_epoch_validation_finishes_that_epoch(tmp_path):
    """EarlyStopping stops the run from validation, here after step 5 of an epoch longer than that: last.ckpt holds
    the unfinished epoch, so the resumed run (without the callback) trains the rest of it."""
    common = (
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        "trainer.val_check_interval=5",
        "callbacks.checkpoint.every_n_train_steps=1000",
    )
    stop = (
        "+callbacks.stop={_target_: lightning.pytorch.callbacks.EarlyStopping, monitor: val/loss, mode: min, "
        "stopping_threshold: 1.0e9, check_on_train_epoch_end: false}"  # the first validation reaches it
    )
    run_train(tmp_path, *common, stop)
    per_epoch = steps_per_epoch(tmp_path, sequences_per_step=2)
    assert 5 < per_epoch
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 5
    )
    run_train(tmp_path, *common, "resume=true")
    resumed = train_rows(metrics(tmp_path, version=1))
    assert [(int(r["epoch"]), int(r["step"])) for r in resumed] == [
        (s // per_epoch, s) for s in range(5, 2 * per_epoch)
    ]


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    run_train(tmp_path, "trainer.devices=2", "strategy=ddp", "trainer.accumulate_grad_batches=3")
    rows = train_rows(metrics(tmp_path))
    assert [int(r["step"]) for r in rows] == list(range(12))
    assert_schedule(rows, total=12)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 12 and all(k.startswith("adapter.") for k in ckpt["state_dict"])
    KangarooModel.from_pretrained(None, adapter=tmp_path / "adapter")


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_with_accumulation(tmp_path):
    """ZeRO-2 on 2 CPU processes, 2 micro-batches per optimizer step: the schedule counts optimizer steps."""
    run_train(tmp_path, "trainer.devices=2", "strategy=deepspeed", "trainer.accumulate_grad_batches=2", timeout=420)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert (last / "checkpoint").is_dir()  # a ZeRO checkpoint directory
    rows = train_rows(metrics(tmp_path))
    assert [int(r["step"]) for r in rows] == list(range(12))
    assert_schedule(rows, total=12)
    # epochs hold whole optimizer steps of 2 processes x 2 accumulated batches x batch size 2 = 8 sequences
    per_epoch = steps_per_epoch(tmp_path, sequences_per_step=8)
    assert [int(r["epoch"]) for r in rows] == [s // per_epoch for s in range(12)]
    km = KangarooModel.from_pretrained(None, adapter=tmp_path / "adapter")  # exported from the ZeRO directory
    assert json.loads((tmp_path / "adapter" / "training.json").read_text())["global_step"] == 12
    assert km.exit_layer == 2


@pytest.mark.slow
def test_resume_after_kill_continues_the_step_count(tmp_path):
    total = 40
    env = train_env()
    command = [
        sys.executable,
        "-m",
        "kangaroo_train",
        "experiment=tiny",
        f"paths.output_dir={tmp_path}",
        f"trainer.max_steps={total}",
        "callbacks.checkpoint.every_n_train_steps=4",
        "trainer.val_check_interval=100",
    ]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 4 <= saved < total and saved % 4 == 0

    run_train(tmp_path, f"trainer.max_steps={total}", "callbacks.checkpoint.every_n_train_steps=4", "resume=true")
    resumed = train_rows(metrics(tmp_path, version=1))
    assert [int(r["step"]) for r in resumed] == list(range(saved, total))  # continues where the checkpoint was
    assert_schedule(resumed, total=total)  # the schedule continues too
    # the interrupted epoch continues where it stopped (not replayed), so epochs end where they would have
    per_epoch = steps_per_epoch(tmp_path, sequences_per_step=2)
    assert [int(r["epoch"]) for r in resumed] == [s // per_epoch for s in range(saved, total)]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == total
    assert json.loads((tmp_path / "adapter" / "training.json").read_text())["global_step"] == total
