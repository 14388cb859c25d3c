"""Helpers the trainer tests share, written once: the entry point in a subprocess, its logged metrics, its errors.

Fixtures live in conftest.py (the session's one tiny training run among them); these are plain functions.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a trainer subprocess: offline, and one thread (a tiny model gains nothing from threads and
    loses a lot when the machine is shared)."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(extra or {})}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train_command(output_dir: Path, *overrides: str, multirun: bool = False) -> list[str]:
    command = [sys.executable, "-m", "kangaroo_train", *(["-m"] if multirun else [])]
    return command + ["experiment=tiny", f"paths.output_dir={output_dir}", *overrides]


def run_train(
    output_dir: Path,
    *overrides: str,
    timeout: int = 600,
    check: bool = True,
    multirun: bool = False,
    env: dict[str, str] | None = None,
    popen: bool = False,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m kangaroo_train [-m] experiment=tiny paths.output_dir=... overrides`` in a subprocess; with
    ``popen`` it is started and returned at once (stdout and stderr piped)."""
    command = train_command(output_dir, *overrides, multirun=multirun)
    if popen:
        return subprocess.Popen(
            command, cwd=REPO, env=train_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=train_env(env), timeout=timeout)
    if check:
        assert out.returncode == 0, f"{' '.join(command)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def assert_clean_error(out: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit code 2, no traceback, every phrase in stderr: how the entry points report bad input."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for phrase in phrases:
        assert phrase in out.stderr, out.stderr[-3000:]


def metrics(output_dir: Path, version: int = 0) -> list[dict[str, str]]:
    with open(output_dir / "logs" / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r.get("train/loss")]
