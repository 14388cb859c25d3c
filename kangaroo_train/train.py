"""Hydra entry point: ``python -m kangaroo_train experiment=NAME [overrides]``.

Runs the stages in order, each skipping work already done:
  data   tokenize the conversations (cached by the datasets library under ``paths.data_dir``)
  distill regenerate every assistant turn with the frozen base (``distill=greedy|sampled``; skipped with the default
         ``distill=none``); it reads data.source, and the conversations tokenized for the later stages are then the
         distilled ones (docs/distillation.md); every rank makes its share of the shards
  cache  run the frozen base once and store its features (``cache.dir``; skipped with ``cache=none``)
  train  train the adapter with Lightning (checkpoints in ``paths.ckpt_dir``; ``resume=true`` continues)
  export write the kangaroo_infer checkpoint to ``paths.adapter_dir`` from the last checkpoint

``stage=X`` runs the stages up to X (``stage=export`` only exports). Under an external multi-process launcher
(``srun``, ``torchrun``), rank 0 tokenizes while the others wait, and every rank caches its share of the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kangaroo_infer.base import kangaroo_home

from .checks import check_values, require_positive_int

log = logging.getLogger("kangaroo_train")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the repo's configs/, wherever Python runs from
STAGES = ("data", "distill", "cache", "train", "export")
STAGE_CHOICES = ("all", *STAGES)
DTYPES = ("float32", "bfloat16", "float16")

OmegaConf.register_new_resolver("kangaroo_home", lambda: str(kangaroo_home()), replace=True)


# ---- processes --------------------------------------------------------------------------------------------------


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


def _wait_for(ready: Callable[[], bool], what: str, timeout_minutes: float) -> None:
    """Poll until ``ready()``: how ranks > 0 wait for work that rank 0 (or the other ranks) do on a shared disk."""
    deadline = time.monotonic() + 60 * timeout_minutes
    while not ready():
        if time.monotonic() > deadline:
            raise ValueError(
                f"Timed out after {timeout_minutes} min waiting for {what}; check the other ranks' logs, or run that "
                f"stage alone first (stage=data / stage=cache), or raise wait_timeout_minutes."
            )
        time.sleep(5)


# ---- configuration ----------------------------------------------------------------------------------------------


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
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype={cfg.model.dtype!r} must be one of {list(DTYPES)}.")
    if cfg.adapter.init not in INITS:
        raise ValueError(f"adapter.init={cfg.adapter.init!r} must be random or copy.")
    require_positive_int("adapter.num_layers", cfg.adapter.num_layers)
    if cfg.adapter.get("init_from"):
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


def generation_defaults(cfg: DictConfig) -> dict[str, Any] | None:
    """The generation settings that are set (None when none are): kangaroo_infer falls back for the rest."""
    chosen = {k: v for k, v in (_container(cfg.generation) or {}).items() if v is not None}
    return chosen or None


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


# ---- stages -----------------------------------------------------------------------------------------------------


def prepare_base(cfg: DictConfig) -> str:
    """The base model name to load and record: tiny models are built on first use; local paths made absolute."""
    name = str(cfg.model.name)
    if cfg.model.tiny is not None:
        from .tiny import ensure_tiny_model

        return str(ensure_tiny_model(name, _container(cfg.model.tiny)))
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def stage_data(cfg: DictConfig, base_name: str, launch: Launch):
    """Tokenized (train, val) datasets; rank 0 builds them first under an external launcher."""
    from kangaroo_infer.base import load_tokenizer

    from .data import build_datasets

    data_dir = Path(cfg.paths.data_dir)
    marker = data_dir / f".ready-{_short_hash([_container(cfg.data), base_name])}"
    if launch.rank != 0 and not marker.exists():
        _wait_for(marker.exists, f"rank 0 to tokenize the data into {data_dir}", cfg.wait_timeout_minutes)
    tokenizer = load_tokenizer(base_name)
    train_set, val_set = build_datasets(cfg.data, tokenizer, data_dir)
    if len(train_set) == 0:
        raise ValueError(
            f"The training split of data.source={cfg.data.source!r} is empty; use more conversations "
            f"(data.num_conversations) or a smaller data.val_fraction."
        )
    if len(val_set) == 0:
        raise ValueError(
            f"The held-out split of data.source={cfg.data.source!r} is empty; raise data.val_fraction or "
            f"data.num_conversations."
        )
    if launch.rank == 0:
        marker.touch()
    log.info("data: %d training / %d held-out sequences (%s)", len(train_set), len(val_set), data_dir)
    return train_set, val_set, tokenizer


def stage_distill(cfg: DictConfig, base_name: str, launch: Launch) -> DictConfig:
    """Regenerate the training conversations' answers with the frozen base (this rank's shards, then wait for the
    others); returns the config whose data stage tokenizes them (``cfg`` itself with distill=none)."""
    if not cfg.distill.enabled:
        log.info("distill: disabled (distill=none): training on the replies in data.source")
        return cfg
    from kangaroo_infer.base import load_base

    from .distill import distilled_data_config, open_distillation

    distilled, tokenizer = open_distillation(cfg, base_name)  # settings, chat template, prompts, directory checked
    if not distilled.is_complete():
        base = load_base(base_name, dtype=cfg.model.dtype, device=_feature_device(cfg, launch))
        distilled.build(base, tokenizer, rank=launch.rank, world_size=launch.world_size)
        del base
        where = f"every rank's distilled shards in {distilled.directory}"
        _wait_for(distilled.is_complete, where, cfg.wait_timeout_minutes)
    distilled.log_report()
    return distilled_data_config(cfg, distilled)


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def feature_caches(cfg: DictConfig, base_name: str, train_set, val_set) -> dict[str, Any]:
    """The FeatureCache of each split, identified by base fingerprint, exit layer, dtype and data."""
    from transformers import AutoConfig

    from kangaroo_infer.adapter import base_fingerprint
    from kangaroo_infer.base import resolve_base_path

    from .data import data_hash
    from .features import FeatureCache

    fingerprint = base_fingerprint(AutoConfig.from_pretrained(resolve_base_path(base_name)))
    return {
        split: FeatureCache(
            Path(cfg.cache.dir) / split,
            fingerprint=fingerprint,
            exit_layer=cfg.model.exit_layer,
            dtype=cfg.cache.dtype,
            data_hash=data_hash(dataset),
            shard_size=cfg.cache.shard_size,
        )
        for split, dataset in (("train", train_set), ("val", val_set))
    }


def stage_cache(cfg: DictConfig, base_name: str, train_set, val_set, launch: Launch) -> None:
    """Build the feature caches (this rank's shards), or check the ones on disk; skipped with cache=none."""
    if not cfg.cache.enabled:
        log.info("cache: disabled (cache=none): features are computed online while training")
        return
    from kangaroo_infer.base import load_base

    caches = feature_caches(cfg, base_name, train_set, val_set)
    datasets = {"train": train_set, "val": val_set}
    for cache in caches.values():
        cache.check()  # a cache built for another base / exit layer / dtype / data is an error, not reused
    todo = [split for split, cache in caches.items() if not cache.is_complete()]
    if todo:
        device = _feature_device(cfg, launch)
        base = load_base(base_name, dtype=cfg.model.dtype, device=device)
        for split in todo:
            log.info("cache: building %s features in %s on %s", split, caches[split].directory, device)
            caches[split].build(
                base, datasets[split], rank=launch.rank, world_size=launch.world_size, batch_size=cfg.cache.batch_size
            )
        del base
        for split in todo:  # the last rank to finish marks the cache complete
            where = f"every rank's feature shards in {caches[split].directory}"
            _wait_for(caches[split].is_complete, where, cfg.wait_timeout_minutes)
    for split, cache in caches.items():
        verify_shards(cache)
        log.info("cache: %s features complete in %s", split, cache.directory)


def verify_shards(cache) -> None:
    """Read one sample of every shard, so a truncated or foreign shard is reported before training starts."""
    dataset = cache.dataset()
    for first in dataset.starts:  # raises a ValueError naming the bad file and the fix
        dataset[first]


def _feature_device(cfg: DictConfig, launch: Launch) -> torch.device:
    if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", launch.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


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


def last_checkpoint(cfg: DictConfig) -> Path | None:
    """The newest of ``last.ckpt``, the ``step-*.ckpt`` ones and Lightning's SLURM-requeue ``hpc_ckpt_*.ckpt``
    (files, or directories under DeepSpeed), or None before the first checkpoint."""
    ckpt_dir = Path(cfg.paths.ckpt_dir)
    candidates = [
        ckpt_dir / "last.ckpt",
        *ckpt_dir.glob("step-*.ckpt"),
        *Path(cfg.paths.output_dir).glob("hpc_ckpt_*.ckpt"),
    ]
    existing = [path for path in candidates if path.exists()]
    return max(existing, key=lambda path: (path.stat().st_mtime, path.name == "last.ckpt")) if existing else None


def check_resumable(ckpt_path: Path, hparams: dict[str, Any]) -> None:
    """Before Lightning loads ``ckpt_path``: it must be intact, and trained with this run's adapter and batch layout
    (a resumed run would otherwise fail deep inside Lightning, or silently follow another step schedule)."""
    from kangaroo_infer.adapter import AdapterConfig

    from .checkpoint import checkpoint_header

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


def check_init_from(cfg: DictConfig) -> None:
    """``adapter.init_from`` (an exported adapter to train further) must fit this run exactly: the same exit layer,
    adapter layout and draft-vocabulary size, so the result exports and loads like any adapter of this config (the
    base fingerprint is checked when the base is loaded). It may have fewer blocks than ``adapter.num_layers``: the
    run then grows it (``KangarooAdapter.grow_from``)."""
    from kangaroo_infer.adapter import read_adapter_config

    source = Path(cfg.adapter.init_from).expanduser()
    where = f"adapter.init_from={str(source)!r}"
    try:
        config = read_adapter_config(source)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    wanted = {
        "model.exit_layer": (config.exit_layer, cfg.model.exit_layer),
        "adapter.mlp": (config.mlp, cfg.adapter.mlp),
        "adapter.draft_vocab_size": (config.draft_vocab_size, cfg.adapter.get("draft_vocab_size")),
    }
    diffs = [
        f"{key}={ours!r} but the adapter has {theirs!r}" for key, (theirs, ours) in wanted.items() if theirs != ours
    ]
    if config.num_layers > cfg.adapter.num_layers:
        diffs.append(f"adapter.num_layers={cfg.adapter.num_layers!r} but the adapter has {config.num_layers!r}")
    if diffs:
        raise ValueError(
            f"{where} does not fit this run: {'; '.join(diffs)}. Set these to the adapter's values "
            f"(adapter=attention_mlp for mlp=true; adapter.num_layers may also be larger, to grow it) or train from "
            f"scratch without adapter.init_from."
        )


def warm_start_adapter(cfg: DictConfig, base):
    """The exported adapter at ``adapter.init_from`` (e.g. the shipped one, to train on self-distilled answers),
    grown to ``adapter.num_layers`` blocks if it has fewer; its fit with the run was checked by ``validate_config``,
    its base fingerprint is checked here."""
    from kangaroo_infer.adapter import KangarooAdapter

    try:
        adapter = KangarooAdapter.from_pretrained(Path(cfg.adapter.init_from).expanduser(), base)
    except ValueError as err:
        raise ValueError(f"adapter.init_from={cfg.adapter.init_from!r}: {err}") from None
    if adapter.config.num_layers == cfg.adapter.num_layers:
        return adapter
    grown = fresh_adapter(cfg, base, adapter.config.base_model)
    grown.grow_from(adapter)
    return grown


def fresh_adapter(cfg: DictConfig, base, base_name: str | None):
    """A new adapter of the run's layout (``cfg.adapter``) for ``base``."""
    from kangaroo_infer.adapter import KangarooAdapter

    a = cfg.adapter
    return KangarooAdapter.for_base(
        base, cfg.model.exit_layer, init=a.init, mlp=a.mlp, num_layers=a.num_layers, base_name=base_name
    )


def stage_train(cfg: DictConfig, base_name: str, train_set, val_set, tokenizer) -> None:
    """Fit the adapter; every process of a multi-device run executes this (Lightning launches the others)."""
    from kangaroo_infer.base import load_base

    from .features import collate_features, collate_tokens, compute_features
    from .module import FrozenParts, KangarooDataModule, KangarooModule
    from .requeue import slurm_plugins
    from .strategy import build_strategy

    ckpt_dir = Path(cfg.paths.ckpt_dir)
    ckpt_path = last_checkpoint(cfg)
    if ckpt_path is not None and not cfg.resume:
        raise ValueError(
            f"{ckpt_dir} already holds checkpoints from an earlier run. Continue it with resume=true, or start over "
            f"in another paths.output_dir (or delete {ckpt_dir})."
        )
    if cfg.resume and ckpt_path is None:
        log.warning("train: resume=true but there is no checkpoint in %s yet: starting from step 0", ckpt_dir)
    elif cfg.resume:
        log.info("train: resuming from %s", ckpt_path)

    L.seed_everything(cfg.seed, workers=True)
    t = cfg.trainer
    base = load_base(base_name, dtype=cfg.model.dtype)
    if cfg.adapter.get("init_from"):  # fine-tune an exported adapter: its weights and draft vocabulary
        adapter = warm_start_adapter(cfg, base).float()
    else:
        adapter = fresh_adapter(cfg, base, base_name).float()  # fp32 master weights; mixed precision casts for compute
        if cfg.adapter.get("draft_vocab_size"):
            from .data import frequent_tokens

            adapter.set_draft_vocab(frequent_tokens(train_set, base.config.vocab_size, cfg.adapter.draft_vocab_size))
    if cfg.cache.enabled:
        caches = feature_caches(cfg, base_name, train_set, val_set)
        train_data, val_data = caches["train"].dataset(), caches["val"].dataset()
        frozen, collate, features = FrozenParts(lm_head=base.get_output_embeddings()), collate_features, None
        del base  # from the cache only the LM head is needed
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_data, val_data = train_set, val_set
        frozen, collate = (
            FrozenParts(lm_head=base.get_output_embeddings(), base=base),
            partial(collate_tokens, pad_id=pad),
        )
        features = compute_features
    module = KangarooModule(
        adapter,
        frozen,
        optim=_container(cfg.optim),
        temperature=cfg.temperature,
        draft_vocab_loss=cfg.draft_vocab_loss,
        base_config=adapter.base_config.to_dict(),
        generation=generation_defaults(cfg),
        compute_features=features,
        batch={
            "batch_size": cfg.data.batch_size,
            "accumulate_grad_batches": t.accumulate_grad_batches,
            "processes": t.devices * t.num_nodes,
        },
    )
    if cfg.resume and ckpt_path is not None:
        check_resumable(ckpt_path, module.hparams)
    datamodule = KangarooDataModule(
        train_data,
        val_data,
        collate,
        batch_size=cfg.data.batch_size,
        accumulate_grad_batches=t.accumulate_grad_batches,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        held_out=val_set,
    )
    trainer: L.Trainer = instantiate(
        t,  # configs/trainer/: Lightning's own arguments
        "trainer",
        strategy=build_strategy(_container(cfg.strategy), t.accelerator, t.devices, t.num_nodes),
        callbacks=instantiate_group(cfg.callbacks, "callbacks"),
        logger=instantiate_group(cfg.logger, "logger"),
        plugins=slurm_plugins(),
    )
    for logger in trainer.loggers:  # the full resolved config (wandb: the run's config)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit:
        if trainer.interrupted:  # Ctrl-C: Lightning saved a checkpoint (save_on_exception) and exits; say how to go on
            raise KeyboardInterrupt from None
        raise
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # a clean exit (a late abort was seen once without it)
    log.info("train: finished at step %d; last checkpoint %s", trainer.global_step, last_checkpoint(cfg))


def is_main_process() -> bool:
    """False in Lightning's DDP children and on ranks > 0 of an external launcher."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0:
        return False
    return external_launch().rank == 0 and int(os.environ.get("RANK", "0")) == 0


def stage_export(cfg: DictConfig) -> Path | None:
    from .export import export_checkpoint

    if not is_main_process():
        return None
    ckpt = last_checkpoint(cfg)
    if ckpt is None:
        raise ValueError(f"Nothing to export: {cfg.paths.ckpt_dir} holds no last.ckpt; run stage=train first.")
    out = export_checkpoint(ckpt, cfg.paths.adapter_dir, generation=generation_defaults(cfg))
    log.info("export: adapter written to %s", out)
    return out


# ---- entry --------------------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> None:
    """All stages up to ``cfg.stage``."""
    validate_config(cfg)
    stages = (
        STAGES
        if cfg.stage == "all"
        else (("export",) if cfg.stage == "export" else STAGES[: STAGES.index(cfg.stage) + 1])
    )
    if stages == ("export",):
        stage_export(cfg)
        return
    launch = external_launch()
    base_name = prepare_base(cfg)
    data_cfg = stage_distill(cfg, base_name, launch) if "distill" in stages else cfg
    train_set, val_set, tokenizer = stage_data(data_cfg, base_name, launch)
    if "cache" in stages:
        stage_cache(cfg, base_name, train_set, val_set, launch)
    if "train" in stages:
        stage_train(cfg, base_name, train_set, val_set, tokenizer)
    if "export" in stages:
        stage_export(cfg)


def sweep_job_output_dir(cfg: DictConfig) -> None:
    """Under ``-m`` (Hydra multirun) give each job its own ``paths.output_dir``: the configured one plus the job's
    overrides (e.g. ``outputs/NAME/experiment=NAME,model.exit_layer=4``), so jobs never share checkpoints and a rerun
    of the sweep finds each job's finished stages again (``resume=true`` continues each one)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    overrides = HydraConfig.get().job.override_dirname
    if overrides:
        cfg.paths.output_dir = f"{cfg.paths.output_dir}/{overrides}"


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of each job a Hydra multirun expands ``overrides`` (the command line's) into."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


class CheckSweepJobs(Callback):
    """Under ``-m``, every job's config is composed and validated before the first job starts: a bad value in the
    last job must not wait for the earlier jobs' hours of work (configs/train.yaml: hydra.callbacks)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose

        jobs = sweep_jobs(list(config.hydra.overrides.task))
        for number, job in enumerate(jobs):
            try:
                validate_config(compose(config_name=config.hydra.job.config_name, overrides=job))
            except ValueError as err:
                print(f"error: job {number} ({','.join(job)}): {err} No job was started.", file=sys.stderr)
                sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    sweep_job_output_dir(cfg)
    try:
        run(cfg)
    except ValueError as err:  # bad input: one clear message, no traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: finished shards, cache and checkpoints are kept
        print(
            "interrupted: finished work (distilled and cached shards, checkpoints) is kept; rerun the same command "
            "with resume=true to continue.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    except SIGTERMException:  # Lightning stopped after the current step; the Checkpoints callback saved it
        print("interrupted by SIGTERM: checkpoint saved; continue with resume=true", file=sys.stderr, flush=True)
        sys.exit(128 + 15)
