"""Plain progress lines for logs that are files.

Under ``sbatch`` (or ``python -m kangaroo_train ... > log``) stdout is a file, and Lightning's live progress bar
writes nothing useful there: a cluster job's log stays silent for hours. ``ProgressLines`` logs one plain line every N
optimizer steps on global rank 0 instead, e.g.::

    train: step 120/1000 (12.0%) | loss 2.3412 | top1 0.518 | 41,230 tokens/s | elapsed 0:04:10 | ETA 0:30:35

Loss and top-1 are rank 0's values of the step's last micro-batch (the module's ``train/loss`` and ``train/top1``);
tokens/s counts the non-padding tokens of every micro-batch since the previous line (rank 0's times the number of
processes, which all read different sequences at about the same pace), validation time excluded; the ETA assumes the
pace of this run so far (a resumed run counts only its own steps).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback

from .checks import require_positive_int

log = logging.getLogger("kangaroo_train")


def stream_is_terminal(stream: TextIO) -> bool:
    """True when ``stream`` is an interactive terminal (where the progress bar shows)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_lines_enabled(setting: bool | None, stream: TextIO | None = None) -> bool:
    """``callbacks.progress_lines.enabled``: true / false force; null means exactly when stdout is not a terminal."""
    if setting is not None:
        return bool(setting)
    return not stream_is_terminal(sys.stdout if stream is None else stream)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class ProgressLines(Callback):
    """Logs ``train: step S/TOTAL | loss | top1 | tokens/s | elapsed | ETA`` every ``every_n_steps`` optimizer steps
    (and at the last step) on global rank 0; silent unless ``enabled`` (null: when stdout is not a terminal)."""

    def __init__(self, every_n_steps: int, enabled: bool | None = None):
        require_positive_int("callbacks.progress_lines.every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.enabled = progress_lines_enabled(enabled)
        self._start_time = 0.0  # when this run's first step began
        self._start_step = 0  # the global step this run started from (> 0 after a resume)
        self._last_step = -1  # the last global step a line was written for
        self._window_time = 0.0  # start of the current tokens/s window
        self._window_tokens = 0  # rank 0's non-padding tokens since the window started
        self._total: int | None = None  # optimizer steps of the whole run (None: unknown, e.g. an unsized loader)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = self._last_step = trainer.global_step
        self._start_time = self._window_time = time.monotonic()
        self._window_tokens = 0
        total = trainer.estimated_stepping_batches  # max_steps, or what max_epochs amounts to
        self._total = int(total) if math.isfinite(total) else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None  # [B, T], 1 = real token
        if mask is not None:
            self._window_tokens += int(mask.sum())
        step = trainer.global_step  # optimizer steps done, counted from the run's very first start
        total = self._total
        if step == self._last_step or (step % self.every_n_steps and step != total):
            return  # mid-accumulation micro-batch, or not a step to report
        self._last_step = step
        now = time.monotonic()
        elapsed = now - self._start_time
        done_here = step - self._start_step
        where = f"{step}/{total} ({100.0 * step / total:.1f}%)" if total else f"{step}"
        parts = [f"train: step {where}"]
        metrics = trainer.callback_metrics
        for key, label, digits in (("train/loss", "loss", 4), ("train/top1", "top1", 3)):
            if key in metrics:
                parts.append(f"{label} {float(metrics[key]):.{digits}f}")
        window = now - self._window_time
        if mask is not None and window > 0:
            parts.append(f"{self._window_tokens * trainer.world_size / window:,.0f} tokens/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if total and 0 < done_here and step < total:
            parts.append(f"ETA {_duration(elapsed / done_here * (total - step))}")
        log.info(" | ".join(parts))
        self._window_time, self._window_tokens = now, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # validation is not training throughput: start the tokens/s window again after it
        self._window_time, self._window_tokens = time.monotonic(), 0
