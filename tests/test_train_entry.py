"""Entry-point helpers: wandb's automatic offline mode and how external launchers' ranks are read."""

from __future__ import annotations

from kangaroo_train.launch import Launch, external_launch
from kangaroo_train.loggers import wandb_api_key_available


def test_wandb_goes_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not wandb_api_key_available()  # no netrc file
    netrc.write_text("machine example.com login user password secret\n")
    netrc.chmod(0o600)
    assert not wandb_api_key_available()  # a netrc without the wandb host
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_api_key_available()
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_api_key_available()


def test_external_launch_reads_srun_and_torchrun(monkeypatch):
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert external_launch() == Launch(0, 1, 0)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert external_launch() == Launch(9, 16, 1)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a one-task step (or an salloc shell) is one process
    assert external_launch() == Launch(0, 1, 0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert external_launch() == Launch(3, 4, 3)


def test_missing_train_extra_names_the_extra():
    """Without the trainer's dependencies (here: hydra made unimportable), one error line says what to install."""
    import subprocess
    import sys

    code = "import sys, runpy; sys.modules['hydra'] = None; runpy.run_module('kangaroo_train', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "needs the 'train' extra (missing module 'hydra')" in out.stderr and "kangaroo[train]" in out.stderr
