"""The adapter a run trains: a fresh one of the run's layout, or an exported one to train further
(``adapter.init_from``), grown to the run's number of blocks; with its draft vocabulary."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


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


def training_adapter(cfg: DictConfig, base, base_name: str, train_set):
    """The adapter ``stage_train`` fits, in fp32 (master weights; mixed precision casts for compute): warm-started from
    ``adapter.init_from`` (its weights and draft vocabulary), or fresh, drafting over the ``adapter.draft_vocab_size``
    most frequent assistant tokens of ``train_set`` when that is set."""
    if cfg.adapter.get("init_from"):
        return warm_start_adapter(cfg, base).float()
    adapter = fresh_adapter(cfg, base, base_name).float()
    if cfg.adapter.get("draft_vocab_size"):
        from .data import frequent_tokens

        adapter.set_draft_vocab(frequent_tokens(train_set, base.config.vocab_size, cfg.adapter.draft_vocab_size))
    return adapter
