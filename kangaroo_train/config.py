"""The training config: where it lives, the stage order (``STAGES``, the one truth that the code, the validation and
docs/training.md follow), validating a composed config before anything is loaded, and instantiating its
``_target_`` nodes with one clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from kangaroo_infer.base import kangaroo_home
from kangaroo_infer.dtype import AUTO

from .checks import check_values, require_positive_int

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the repo's configs/, wherever Python runs from
STAGES = ("distill", "data", "cache", "train", "export")  # the order stages.run runs them in
STAGE_CHOICES = ("all", *STAGES)
DTYPES = ("float32", "bfloat16", "float16")
PRECISION_OF_DTYPE = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}  # trainer.precision=auto

OmegaConf.register_new_resolver("kangaroo_home", lambda: str(kangaroo_home()), replace=True)


def stages_to_run(stage: str) -> tuple[str, ...]:
    """``stage=all``: every stage; ``stage=export``: export alone; else the stages up to and including ``stage``."""
    if stage == "all":
        return STAGES
    if stage == "export":
        return ("export",)
    return STAGES[: STAGES.index(stage) + 1]


def validate_config(cfg: DictConfig) -> None:
    """Catch impossible settings before anything is loaded, each with the override that fixes it."""
    from kangaroo_infer.adapter import INITS

    from .module import SCHEDULES

    if cfg.stage not in STAGE_CHOICES:
        raise ValueError(f"stage={cfg.stage!r} is not one of {list(STAGE_CHOICES)}.")
    check_values(cfg)  # every group's numbers, whatever the stage: a bad optim.lr must not wait for stage=train
    if cfg.distill.enabled and cfg.distill.dir is not None:
        from .distill import DistilledData

        DistilledData.check_directory(cfg.distill.dir)
    if cfg.cache.enabled:
        from .features import FeatureCache

        for split in ("train", "val"):  # feature_caches: one FeatureCache directory per split
            FeatureCache.check_directory(Path(cfg.cache.dir) / split)
    require_positive_int("model.exit_layer", cfg.model.exit_layer)
    if cfg.model.dtype not in (AUTO, *DTYPES):
        raise ValueError(f"model.dtype={cfg.model.dtype!r} must be one of {[AUTO, *DTYPES]}.")
    if cfg.adapter.init not in INITS:
        raise ValueError(f"adapter.init={cfg.adapter.init!r} must be random or copy.")
    require_positive_int("adapter.num_layers", cfg.adapter.num_layers)
    if cfg.adapter.get("init_from"):
        from .adapter_setup import check_init_from

        check_init_from(cfg)
    if cfg.cache.enabled and cfg.cache.dtype not in DTYPES:
        raise ValueError(f"cache.dtype={cfg.cache.dtype!r} must be one of {list(DTYPES)}.")
    t = cfg.trainer
    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint")
    if checkpoint is None:
        raise ValueError(
            "callbacks.checkpoint is off, but resuming and export read its checkpoints; keep it (configs/callbacks/)."
        )
    if str(checkpoint.get("dirpath")) != str(cfg.paths.ckpt_dir):
        raise ValueError(
            f"callbacks.checkpoint.dirpath={checkpoint.get('dirpath')!r} differs from paths.ckpt_dir="
            f"{cfg.paths.ckpt_dir!r}, where resuming and export look; set paths.ckpt_dir instead."
        )
    for key, value in (
        ("data.batch_size", cfg.data.get("batch_size")),
        ("trainer.accumulate_grad_batches", t.accumulate_grad_batches),
        ("trainer.val_check_interval", t.val_check_interval),
        ("trainer.devices", t.devices),
        ("callbacks.checkpoint.every_n_train_steps", checkpoint.get("every_n_train_steps")),
    ):
        require_positive_int(key, value)
    if t.max_steps == -1 and (t.max_epochs is None or t.max_epochs < 1):
        raise ValueError("Set trainer.max_steps or trainer.max_epochs (>= 1): training needs an end.")
    if cfg.optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={cfg.optim.schedule!r} must be cosine, linear or constant.")
    if not isinstance(cfg.draft_vocab_loss, bool):
        raise ValueError(f"draft_vocab_loss={cfg.draft_vocab_loss!r} must be true or false.")
    if cfg.strategy.name not in ("single", "ddp", "deepspeed"):
        raise ValueError(f"strategy={cfg.strategy.name!r}: choose strategy=single, ddp or deepspeed.")
    if not any(node is not None for node in (cfg.logger or {}).values()):
        raise ValueError("No logger configured: use logger=wandb, logger=csv or logger=[wandb,csv].")
    if cfg.stage in ("all", "train"):
        instantiate_group(cfg.callbacks, "callbacks")  # cheap objects: a bad value fails now, not after the cache
        for key, node in cfg.logger.items():  # loggers may touch disk or network: only their _target_ is checked
            if node is not None:
                _locate(node, f"logger.{key}")


def resolve_auto_dtype(cfg: DictConfig) -> str | None:
    """``model.dtype=auto``: the dtype kangaroo_infer picks for the device the frozen base runs on (bf16 where the
    machine computes it natively and faster, docs/decoding.md), written into ``cfg`` before any stage reads it, so
    the feature cache, distilled answers and export record the dtype used. ``trainer.precision=auto`` follows
    ``model.dtype`` (bf16 -> bf16-mixed: the adapter keeps fp32 master weights). Each process decides alone: on
    CPU nodes of different kinds, set ``model.dtype`` explicitly. Returns what was decided, for the log."""
    from kangaroo_infer.dtype import resolve_dtype

    decided = []
    if cfg.model.dtype == AUTO:
        accelerator = str(cfg.trainer.get("accelerator", "cpu"))
        cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        dtype, reason = resolve_dtype(AUTO, "cuda" if cuda else "cpu", kangaroo_home())
        cfg.model.dtype = str(dtype).removeprefix("torch.")
        decided.append(f"model.dtype=auto -> {cfg.model.dtype} ({reason})")
    if cfg.trainer.get("precision") == AUTO:
        cfg.trainer.precision = PRECISION_OF_DTYPE[cfg.model.dtype]
        decided.append(f"trainer.precision=auto -> {cfg.trainer.precision} (follows model.dtype)")
    return "; ".join(decided) or None


def generation_defaults(cfg: DictConfig) -> dict[str, Any] | None:
    """The generation settings that are set (None when none are): kangaroo_infer falls back for the rest."""
    chosen = {k: v for k, v in (container(cfg.generation) or {}).items() if v is not None}
    return chosen or None


def container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def instantiate(node: DictConfig, where: str, **runtime: Any) -> Any:
    """``hydra.utils.instantiate`` with one clear error: a bad value the object itself rejects (its ValueError) or
    a ``_target_`` that does not import, named by its config key."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **runtime)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise ValueError(
            f"{where} could not be instantiated from _target_={node.get('_target_')!r}: {err.__cause__ or err}. "
            f"Fix its arguments (configs/, or the override that set them)."
        ) from None


def _locate(node: Any, where: str) -> None:
    """The ``_target_`` of ``node`` imports (a typo is reported before any stage runs)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ValueError(
            f"{where} is not an object to instantiate: it needs a _target_ (e.g. {where}._target_=my.module.MyClass), "
            f"or null to turn it off."
        )
    try:
        hydra.utils.get_object(node._target_)
    except Exception as err:  # ImportError, AttributeError, ...: one message either way
        raise ValueError(f"{where}._target_={node._target_!r} cannot be imported ({err}); fix the name.") from None


def instantiate_group(group: DictConfig | None, name: str) -> list:
    """The objects of a config group whose entries are ``_target_`` nodes (configs/callbacks/, configs/logger/), in
    order; an entry set to null is off."""
    objects = []
    for key, node in (group or {}).items():
        if node is None:
            continue
        _locate(node, f"{name}.{key}")
        objects.append(instantiate(node, f"{name}.{key}"))
    return objects
