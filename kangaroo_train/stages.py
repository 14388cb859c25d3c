"""The stages of ``python -m kangaroo_train`` in the order they run (``config.STAGES``), each skipping finished work:

  distill  regenerate every assistant turn with the frozen base (``distill=greedy|sampled``; skipped with the default
           ``distill=none``); it reads data.source, and the data stage then tokenizes the distilled conversations
           (docs/distillation.md); every rank makes its share of the shards
  data     tokenize the conversations (cached by the datasets library under ``paths.data_dir``)
  cache    run the frozen base once and store its features (``cache.dir``; skipped with ``cache=none``)
  train    train the adapter with Lightning (checkpoints in ``paths.ckpt_dir``; ``resume=true`` continues)
  export   write the kangaroo_infer checkpoint to ``paths.adapter_dir`` from the last checkpoint

``stage=X`` runs the stages up to X (``stage=export`` only exports). Under an external multi-process launcher
(``srun``, ``torchrun``), rank 0 tokenizes while the others wait, and every rank builds its share of the shards.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from .adapter_setup import training_adapter
from .checkpoint import check_resumable, last_checkpoint
from .config import (
    container,
    generation_defaults,
    instantiate,
    instantiate_group,
    resolve_auto_dtype,
    stages_to_run,
    validate_config,
)
from .launch import Launch, external_launch, is_main_process, wait_for
from .shards import sha256_json

log = logging.getLogger("kangaroo_train")


def run(cfg: DictConfig) -> None:
    """The stages ``cfg.stage`` asks for (``config.stages_to_run``), in ``config.STAGES`` order: each stage's output is
    the next one's input (distilled conversations -> tokenized data -> features -> checkpoints -> adapter)."""
    validate_config(cfg)
    decided = resolve_auto_dtype(cfg)
    if decided:
        log.info(decided)
    stages = stages_to_run(cfg.stage)
    if stages == ("export",):
        stage_export(cfg)
        return
    launch = external_launch()
    base_name = prepare_base(cfg)
    data_cfg = stage_distill(cfg, base_name, launch) if "distill" in stages else cfg
    if "data" not in stages:
        return
    train_set, val_set, tokenizer = stage_data(data_cfg, base_name, launch)
    if "cache" in stages:
        stage_cache(cfg, base_name, train_set, val_set, launch)
    if "train" in stages:
        stage_train(cfg, base_name, train_set, val_set, tokenizer)
    if "export" in stages:
        stage_export(cfg)


def checkpoint_of(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume or export from (``checkpoint.last_checkpoint`` of the run's directories)."""
    return last_checkpoint(cfg.paths.ckpt_dir, cfg.paths.output_dir)


def prepare_base(cfg: DictConfig) -> str:
    """The base model name to load and record: tiny models are built on first use; local paths made absolute."""
    name = str(cfg.model.name)
    if cfg.model.tiny is not None:
        from .tiny import ensure_tiny_model

        return str(ensure_tiny_model(name, container(cfg.model.tiny)))
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


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
        wait_for(distilled.is_complete, where, cfg.wait_timeout_minutes)
    distilled.log_report()
    return distilled_data_config(cfg, distilled)


def stage_data(cfg: DictConfig, base_name: str, launch: Launch):
    """Tokenized (train, val) datasets; rank 0 builds them first under an external launcher."""
    from kangaroo_infer.base import load_tokenizer

    from .data import build_datasets

    data_dir = Path(cfg.paths.data_dir)
    marker = data_dir / f".ready-{sha256_json([container(cfg.data), base_name])[:16]}"
    if launch.rank != 0 and not marker.exists():
        wait_for(marker.exists, f"rank 0 to tokenize the data into {data_dir}", cfg.wait_timeout_minutes)
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


def feature_caches(cfg: DictConfig, base_name: str, train_set, val_set) -> dict[str, Any]:
    """The FeatureCache of each split, identified by base fingerprint, exit layer, dtypes (stored, and the base's
    compute dtype) and data."""
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
            base_dtype=cfg.model.dtype,
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
            wait_for(caches[split].is_complete, where, cfg.wait_timeout_minutes)
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


def stage_train(cfg: DictConfig, base_name: str, train_set, val_set, tokenizer) -> None:
    """Fit the adapter; every process of a multi-device run executes this (Lightning launches the others)."""
    from kangaroo_infer.base import load_base

    from .features import collate_features, collate_tokens, compute_features
    from .module import FrozenParts, KangarooDataModule, KangarooModule
    from .requeue import slurm_plugins
    from .strategy import build_strategy

    ckpt_dir = Path(cfg.paths.ckpt_dir)
    ckpt_path = checkpoint_of(cfg)
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
    adapter = training_adapter(cfg, base, base_name, train_set)
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
        optim=container(cfg.optim),
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
        strategy=build_strategy(container(cfg.strategy), t.accelerator, t.devices, t.num_nodes),
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
    log.info("train: finished at step %d; last checkpoint %s", trainer.global_step, checkpoint_of(cfg))


def stage_export(cfg: DictConfig) -> Path | None:
    from .export import export_checkpoint

    if not is_main_process():
        return None
    ckpt = checkpoint_of(cfg)
    if ckpt is None:
        raise ValueError(f"Nothing to export: {cfg.paths.ckpt_dir} holds no last.ckpt; run stage=train first.")
    out = export_checkpoint(ckpt, cfg.paths.adapter_dir, generation=generation_defaults(cfg))
    log.info("export: adapter written to %s", out)
    return out
