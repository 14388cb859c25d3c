"""Where this process stands among the processes a launcher started, and how ranks wait for each other's work.

Under ``srun`` or ``torchrun`` every process runs the entry point: rank 0 tokenizes while the others wait, and every
rank builds its share of the distilled and feature shards. Lightning's own DDP children count as one process here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes an external launcher started (1 process when run directly)."""

    rank: int
    world_size: int
    local_rank: int


def external_launch() -> Launch:
    """srun (inside a job step) or torchrun; Lightning's own DDP children count as one process for data/cache."""
    env = os.environ
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)))
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    return Launch(0, 1, 0)


def wait_for(ready: Callable[[], bool], what: str, timeout_minutes: float) -> None:
    """Poll until ``ready()``: how ranks > 0 wait for work that rank 0 (or the other ranks) do on a shared disk."""
    deadline = time.monotonic() + 60 * timeout_minutes
    while not ready():
        if time.monotonic() > deadline:
            raise ValueError(
                f"Timed out after {timeout_minutes} min waiting for {what}; check the other ranks' logs, or run that "
                f"stage alone first (stage=data / stage=cache), or raise wait_timeout_minutes."
            )
        time.sleep(5)


def is_main_process() -> bool:
    """False in Lightning's DDP children and on ranks > 0 of an external launcher."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0:
        return False
    return external_launch().rank == 0 and int(os.environ.get("RANK", "0")) == 0
