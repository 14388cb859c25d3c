"""SLURM's time-limit warning: checkpoint at the next step boundary, then requeue the job.

``#SBATCH --signal=SIGUSR1@90`` sends SIGUSR1 to every task 90 s before the time limit. Lightning's own SLURM
auto-requeue saves its ``hpc_ckpt`` from inside the signal handler, i.e. wherever the step happened to be (between a
backward and its optimizer step, inside a collective), and calls collectives there; a job resumed from such a
checkpoint may repeat or skip a step, and ranks can hang. Here the handler only raises a flag; after the next
optimizer step every rank agrees on it (one boolean reduction per step under SLURM), all ranks save
``step-<N>.ckpt`` together, and rank 0 runs ``scontrol requeue``. SLURM then sends SIGTERM, on which Lightning
stops after the step in flight and ``Checkpoints`` saves again at a step boundary; the next start resumes from the
newest of them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

log = logging.getLogger("kangaroo_train")


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for an array task, else the job id (None outside SLURM)."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def under_slurm() -> bool:
    """A SLURM job as Lightning detects it: not torchrun inside SLURM, not an interactive allocation."""
    return SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()


def slurm_plugins() -> list[SLURMEnvironment]:
    """Under SLURM, its cluster environment with Lightning's in-handler auto-requeue off (``SlurmRequeue`` takes its
    place); else nothing, and Lightning picks the environment itself."""
    return [SLURMEnvironment(auto_requeue=False)] if under_slurm() else []


class SlurmRequeue(Callback):
    """On ``signum`` (SIGUSR1): save ``dirpath/step-<N>.ckpt`` after the next optimizer step and requeue the job.
    Does nothing outside a SLURM job."""

    def __init__(self, dirpath: str | Path, signum: int | str = "SIGUSR1") -> None:
        self.dirpath = Path(dirpath)
        self.signum = signal.Signals[signum] if isinstance(signum, str) else signal.Signals(signum)
        self._signalled = False
        self._requeued = False
        self._seen_step: int | None = None
        self._previous: Any = None
        self._active = False

    def _notice(self, signum: int, frame: FrameType | None) -> None:  # a signal handler: set a flag, nothing else
        self._signalled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = under_slurm()
        if not self._active:
            return
        self._previous = signal.signal(self.signum, self._notice)
        log.info(
            "slurm requeue: on %s a checkpoint is saved after the next step and job %s is requeued",
            self.signum.name,
            slurm_job_id(),
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # not under SLURM, requeued already, or mid gradient accumulation
        if not self._active or self._requeued or step == self._seen_step:
            return
        self._seen_step = step
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):  # any rank signalled
            return
        path = self.dirpath / f"step-{step:08d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # full state (resuming); collective under DeepSpeed
        self._requeued = True
        if not trainer.is_global_zero:
            return
        job = slurm_job_id()
        result = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
        if result.returncode == 0:
            log.info("slurm requeue: saved %s at step %d; requeued SLURM job %s", path, step, job)
        else:  # the checkpoint is there: a manual resubmission with resume=true continues from it
            log.warning(
                "slurm requeue: saved %s at step %d, but `scontrol requeue %s` failed (%s): resubmit the job to "
                "continue from it",
                path,
                step,
                job,
                (result.stderr or result.stdout).strip(),
            )
