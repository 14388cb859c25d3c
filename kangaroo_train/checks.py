"""The checks that configuration values share: counts, bounded finite numbers, and every value of the training
config checked at once, before any stage runs. What a number is (finite, not a bool, within bounds) is decided by
kangaroo_infer's one predicate, ``is_real``; only the wording (``key=value must ...; set it with key=VALUE``) is the
training config's own."""

from __future__ import annotations

from typing import Any

from kangaroo_infer.checks import is_int, is_real


def require_positive_int(key: str, value: Any, *, optional: bool = False, hint: str = "") -> None:
    """Refuse ``value`` unless it is an int >= 1 (bools are not counts), or None when ``optional``; ``key`` is the
    override the user would fix (e.g. ``data.max_len``), ``hint`` an optional clause appended to the message."""
    if optional and value is None:
        return
    if not is_int(value, 1):
        raise ValueError(f"{key}={value!r} must be a positive integer{' or null' if optional else ''}{hint}.")


def require_number(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Refuse ``value`` unless it is a finite number (an int when ``integer``; never a bool, a string or NaN) in the
    range given by ``low``/``high`` (``*_open``: that end excluded), or None when ``optional``."""
    if optional and value is None:
        return
    if not is_real(value, low, high, low_open, high_open) or (integer and not is_int(value)):
        if low is not None and high is not None:
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f"{'>' if low_open else '>='} {low:g}"
        else:
            bounds = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        if integer:
            what = f"an integer {bounds}".rstrip()
        else:
            what = f"{bounds} (a finite number)" if bounds else "a finite number"
        raise ValueError(f"{key}={value!r} must be {what}{' or null' if optional else ''}; set it with {key}=VALUE.")


def require_choice(key: str, value: Any, choices: tuple) -> None:
    """Refuse ``value`` unless it is one of ``choices``."""
    if isinstance(value, bool) != any(isinstance(c, bool) for c in choices) or value not in choices:
        raise ValueError(f"{key}={value!r} must be one of {list(choices)}.")


def check_values(cfg: Any) -> None:
    """Type and range of every numeric or boolean value of the training config (each group), so a bad one stops
    the run before the first stage, not after hours of data and cache stages."""
    o, d, t = cfg.optim, cfg.data, cfg.trainer
    require_number("optim.lr", o.lr, 0)  # 0 freezes the weights (tests of init_from use it)
    require_number("optim.eps", o.eps, 0, low_open=True)
    require_number("optim.weight_decay", o.weight_decay, 0)
    require_number("optim.warmup_steps", o.warmup_steps, 0, integer=True)
    require_number("optim.warmup_ratio", o.get("warmup_ratio"), 0, 1, high_open=True, optional=True)
    require_number("optim.min_lr_ratio", o.min_lr_ratio, 0, 1)
    require_number("optim.clip", o.get("clip"), 0, low_open=True, optional=True)
    betas = list(o.betas) if not isinstance(o.betas, str) and hasattr(o.betas, "__len__") else None
    if betas is None or len(betas) != 2:
        raise ValueError(f"optim.betas={o.betas!r} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95].")
    for i, beta in enumerate(betas):
        require_number(f"optim.betas[{i}]", beta, 0, 1, high_open=True)
    require_positive_int("data.max_len", d.max_len)
    require_positive_int("data.num_conversations", d.get("num_conversations"), optional=True)
    require_number("data.val_fraction", d.val_fraction, 0, 1, high_open=True)
    require_number("data.seed", d.seed, integer=True)
    require_number("data.min_assistant_tokens", d.min_assistant_tokens, 0, integer=True)
    require_positive_int("data.num_proc", d.get("num_proc"), optional=True)
    require_number("data.num_workers", d.num_workers, 0, integer=True)
    if cfg.cache.enabled:
        require_positive_int("cache.shard_size", cfg.cache.shard_size)
        require_positive_int("cache.batch_size", cfg.cache.batch_size)
    s = cfg.distill
    if s.enabled:
        require_number("distill.temperature", s.temperature, 0)
        require_number("distill.top_p", s.top_p, 0, 1, low_open=True)
        require_number("distill.seed", s.seed, integer=True)
        require_positive_int("distill.max_new_tokens", s.max_new_tokens)
        require_positive_int("distill.max_len", s.max_len, optional=True)
        require_positive_int("distill.num_conversations", s.num_conversations, optional=True)
        require_positive_int("distill.batch_size", s.batch_size)
        require_positive_int("distill.shard_size", s.shard_size)
        require_choice("distill.mix_original", s.mix_original, (True, False))
        require_choice("distill.empty_prompts", s.empty_prompts, ("error", "truncate"))
    require_positive_int("adapter.draft_vocab_size", cfg.adapter.get("draft_vocab_size"), optional=True)
    require_choice("adapter.mlp", cfg.adapter.mlp, (True, False))
    require_number("trainer.max_steps", t.max_steps, -1, integer=True)
    require_number("trainer.max_epochs", t.max_epochs, -1, integer=True, optional=True)
    require_number("seed", cfg.seed, integer=True)
    require_number("temperature", cfg.temperature, 0, low_open=True)
    require_number("wait_timeout_minutes", cfg.wait_timeout_minutes, 0, low_open=True)
    g = cfg.get("generation") or {}
    require_number("generation.threshold", g.get("threshold"), 0, 1, optional=True)
    require_number("generation.max_draft_steps", g.get("max_draft_steps"), 0, integer=True, optional=True)
    require_number("generation.lookup_tokens", g.get("lookup_tokens"), 0, integer=True, optional=True)
