"""Training checkpoints: written at step boundaries (``Checkpoints``), read safely (tensors and plain values only,
never pickled code).

``Checkpoints`` (configs/callbacks/default.yaml ``checkpoint``) is Lightning's ``ModelCheckpoint`` saving every N
optimizer steps, at the end and on SIGTERM, but not on other exceptions.
Lightning ``.ckpt`` files load with ``torch.load(weights_only=True)``; DeepSpeed ZeRO checkpoint directories are
consolidated with every ``torch.load`` inside forced to weights-only. kangaroo_train keeps its hyper-parameters plain
(``module.plain_containers``) so its own checkpoints always pass; a crafted file is refused before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.serialization import safe_globals

_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it at every call


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make every ``torch.load`` inside the block refuse pickled code, even where a library passes
    ``weights_only=False`` (DeepSpeed's ZeRO consolidation does): torch honours TORCH_FORCE_WEIGHTS_ONLY_LOAD."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_FORCE_WEIGHTS_ONLY]
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def _deepspeed_data_classes() -> list[type]:
    """The DeepSpeed classes a ZeRO-2 checkpoint's optimizer files pickle: plain data holders (an enum, a dataclass,
    the loss scaler's state), allowed by name so that nothing else in those files can run."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_training_checkpoint(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict (``state_dict``, ``hyper_parameters``, ``global_step``) of a file or a ZeRO directory.

    Loaded with ``weights_only=True``: tensors and plain containers only, so a crafted file cannot run code (the
    training module keeps its hyper-parameters plain for exactly this).
    """
    path = Path(ckpt).expanduser()
    if path.is_dir():
        if not (path / "latest").is_file():
            raise ValueError(
                f"{path} is a directory but not a DeepSpeed checkpoint (no 'latest' file); pass a Lightning .ckpt "
                f"file or the checkpoint directory Lightning wrote under DeepSpeed."
            )
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        try:
            # the converter insists on writing a file; we keep the dict
            with tempfile.TemporaryDirectory() as tmp, _weights_only_loads(), safe_globals(_deepspeed_data_classes()):
                checkpoint = convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "consolidated.ckpt")
        except pickle.UnpicklingError as err:
            raise _unsafe(path, err) from None
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise ValueError(f"{path} is not a readable DeepSpeed checkpoint ({err}); pass another one.") from err
    else:
        if not path.is_file():
            raise ValueError(
                f"Checkpoint {str(path)!r} does not exist; pass ckpt=PATH to a .ckpt file or ZeRO directory."
            )
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _unsafe(path, err) from None
        except Exception as err:  # torch/zipfile raise many types for a damaged file
            raise ValueError(f"{path} is not a readable checkpoint ({err}); pass another checkpoint.") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise ValueError(
            f"{path} is not a kangaroo_train checkpoint (it has no hyper_parameters, e.g. a plain torch.save of "
            f"weights); pass a checkpoint written by python -m kangaroo_train (paths.ckpt_dir/last.ckpt)."
        )
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} holds no state_dict; pass a checkpoint written by python -m kangaroo_train.")
    return checkpoint


def _unsafe(path: Path, err: Exception) -> ValueError:
    reason = str(err).strip().splitlines()
    detail = next((line for line in reason if "Unsupported global" in line or "GLOBAL" in line), reason[0])
    return ValueError(
        f"{path} holds pickled Python objects, which kangaroo refuses to load (loading them could run code from the "
        f"file; nothing from it was executed): {detail.strip()}. kangaroo_train's checkpoints hold only tensors and "
        f"plain values; pass one of those."
    )


def checkpoint_header(ckpt: str | os.PathLike) -> dict[str, Any]:
    """``hyper_parameters`` and ``global_step`` of a checkpoint, read safely without consolidating ZeRO shards;
    a ValueError when the file is damaged or unsafe."""
    path = Path(ckpt)
    if path.is_dir():  # DeepSpeed: Lightning's own state rides in the model-states file as client state
        files = sorted(path.glob("*/mp_rank_00_model_states.pt"))
        if not files:
            raise ValueError(f"{path} is a checkpoint directory without mp_rank_00_model_states.pt (incomplete).")
        path = files[0]
    try:
        with _weights_only_loads():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unsafe(path, err) from None
    except Exception as err:  # truncated zip, missing records, ...
        raise ValueError(f"{path} is not a readable checkpoint ({err}).") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise ValueError(f"{path} is not a kangaroo_train checkpoint (it has no hyper_parameters).")
    return {"hyper_parameters": checkpoint["hyper_parameters"], "global_step": checkpoint.get("global_step")}


def last_checkpoint(ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path | None:
    """The newest of ``last.ckpt``, the ``step-*.ckpt`` ones and Lightning's SLURM-requeue ``hpc_ckpt_*.ckpt``
    (files, or directories under DeepSpeed), or None before the first checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [
        ckpt_dir / "last.ckpt",
        *ckpt_dir.glob("step-*.ckpt"),
        *Path(output_dir).glob("hpc_ckpt_*.ckpt"),
    ]
    existing = [path for path in candidates if path.exists()]
    return max(existing, key=lambda path: (path.stat().st_mtime, path.name == "last.ckpt")) if existing else None


def check_resumable(ckpt_path: Path, hparams: dict[str, Any]) -> None:
    """Before Lightning loads ``ckpt_path``: it must be intact, and trained with this run's adapter and batch layout
    (a resumed run would otherwise fail deep inside Lightning, or silently follow another step schedule)."""
    from kangaroo_infer.adapter import AdapterConfig

    try:
        saved = checkpoint_header(ckpt_path)["hyper_parameters"]
    except ValueError as err:
        intact = None
        for other in sorted(ckpt_path.parent.glob("step-*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                step = checkpoint_header(other)["global_step"]
            except ValueError:
                continue
            if other != ckpt_path:
                intact = f"The newest intact checkpoint is {other} (step {step}): delete {ckpt_path} and rerun with "
                intact += "resume=true to continue from there."
                break
        raise ValueError(
            f"Cannot resume: {err} {intact or 'No intact step-*.ckpt is left: start over in another paths.output_dir.'}"
        ) from None
    adapter, now = saved.get("adapter_config") or {}, hparams["adapter_config"]
    keys = ("exit_layer", "mlp", "num_layers", "init", "draft_vocab_size", "base_fingerprint")
    # fields newer than the checkpoint take their defaults, as they do when its exported config.json is read
    saved_config = {f.name: f.default for f in fields(AdapterConfig) if f.default is not MISSING} | adapter
    diffs = [
        f"{k}: checkpoint {saved_config.get(k)!r} vs now {now[k]!r}" for k in keys if saved_config.get(k) != now[k]
    ]
    if diffs:
        raise ValueError(
            f"Cannot resume from {ckpt_path}: it was trained with another adapter config ({'; '.join(diffs)}). "
            f"Resume with the settings it was trained with, or start a new run in another paths.output_dir."
        )
    batch, now = saved.get("batch"), hparams["batch"]
    if batch is not None and batch != now:
        diffs = [f"{k}: checkpoint {batch.get(k)!r} vs now {now[k]!r}" for k in now if batch.get(k) != now[k]]
        raise ValueError(
            f"Cannot resume from {ckpt_path} with another batch layout ({'; '.join(diffs)}): its step count, epoch "
            f"boundaries and LR schedule were planned for the old one. Resume with the old trainer settings, or start "
            f"a new run in another paths.output_dir."
        )


class Checkpoints(ModelCheckpoint):
    """Every N optimizer steps, at the end, and on SIGTERM; not on other errors, where one crashed rank would hang
    DeepSpeed's collective save (and a NaN loss must not be saved)."""

    saved_step: int | None = None  # the global step of the newest checkpoint this run wrote or resumed from

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved_step = trainer.global_step  # step 0, or the step of the checkpoint resumed from

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)  # the periodic step-N.ckpt
        # A run that stops after this step (max_time, max_steps, a callback's should_stop) is saved here, while
        # Lightning still counts the epoch as unfinished: saved in on_train_end instead, the epoch would count as
        # done and a resumed run would skip the rest of it (and end short of its planned steps and LR schedule).
        max_steps = trainer.max_steps
        if trainer.should_stop or (max_steps is not None and 0 <= max_steps <= trainer.global_step):
            self._save_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # A callback that stops the run from validation (EarlyStopping) does so mid-epoch when validation runs every
        # N steps: save now too, for the same reason as above (ModelCheckpoints run after the other callbacks).
        if trainer.should_stop and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._save_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning saves at the end only when no last.ckpt was written at all: keep the steps since the last
        # periodic checkpoint too (an epoch end, or max_epochs).
        self._save_last(trainer)
        super().on_train_end(trainer, pl_module)

    def _save_last(self, trainer: L.Trainer) -> None:
        if self.saved_step != trainer.global_step:
            last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(last, weights_only=False)  # full state: resuming needs the optimizer
