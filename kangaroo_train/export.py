"""Export a training checkpoint as a kangaroo_infer adapter checkpoint.

``python -m kangaroo_train.export ckpt=PATH out=DIR [generation.threshold=0.6 generation.max_draft_steps=6]
[base_model=NAME]``

``ckpt`` is a Lightning checkpoint file or a DeepSpeed ZeRO checkpoint directory (what Lightning writes under
DeepSpeed; its fp32 weights are consolidated from the ZeRO shards). The result is ``KangarooAdapter.save_pretrained``
output with the base model recorded, so ``python -m kangaroo_infer generate --adapter DIR`` needs no ``--base``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from transformers import CONFIG_MAPPING, PretrainedConfig

from kangaroo_infer.adapter import AdapterConfig, KangarooAdapter, check_fingerprint, check_finite
from kangaroo_infer.files import atomic_directory, check_replaceable

from .checkpoint import load_training_checkpoint

TRAINING_INFO = "training.json"  # beside the adapter: which checkpoint and step it came from
ADAPTER_PREFIX = "adapter."
CLI_KEYS = ("ckpt", "out", "generation", "base_model")
ADAPTER_FILES = frozenset({"config.json", "model.safetensors", TRAINING_INFO})  # what an export writes


def adapter_from_checkpoint(checkpoint: Mapping[str, Any], base_model: str | None = None) -> KangarooAdapter:
    """Rebuild the adapter from the hyper-parameters the training module saved, and load its weights strictly."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if "adapter_config" not in hparams or "base_config" not in hparams:
        raise ValueError(
            "The checkpoint was not written by kangaroo_train (its hyper_parameters lack adapter_config/base_config)."
        )
    config = AdapterConfig(**hparams["adapter_config"])
    if base_model is not None:
        config.base_model = base_model
    base_config = _base_config(hparams["base_config"])
    check_fingerprint(config, base_config, "in the checkpoint")
    adapter = KangarooAdapter(config, base_config)
    state = checkpoint["state_dict"]
    foreign = sorted(k for k in state if not k.startswith(ADAPTER_PREFIX))
    if foreign:
        raise ValueError(f"The checkpoint holds weights outside the adapter ({foreign[:5]}...); it is not ours.")
    weights = {k[len(ADAPTER_PREFIX) :]: v.float() for k, v in state.items()}
    check_finite(weights, "The checkpoint")
    adapter.load_state_dict(weights, strict=True)
    return adapter


def _base_config(values: Mapping[str, Any]) -> PretrainedConfig:
    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"The checkpoint's base model type {model_type!r} is unknown to this transformers version.")
    return CONFIG_MAPPING[model_type].from_dict(dict(values))


def export_checkpoint(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    generation: Mapping[str, Any] | None = None,
    base_model: str | None = None,
) -> Path:
    """Write the adapter of ``ckpt`` to ``out``; skipped when ``out`` already holds this checkpoint's export."""
    ckpt, out = Path(ckpt).expanduser().resolve(), Path(out).expanduser().resolve()
    check_replaceable(out, ADAPTER_FILES)  # before any loading: never replace a directory we did not write
    checkpoint = load_training_checkpoint(ckpt)
    step = int(checkpoint.get("global_step", -1))
    generation = dict(generation) if generation is not None else checkpoint["hyper_parameters"].get("generation")
    info = {"checkpoint": str(ckpt), "global_step": step, "generation": generation, "base_model": base_model}
    info_path = out / TRAINING_INFO
    if info_path.is_file() and json.loads(info_path.read_text()) == info and (out / "model.safetensors").is_file():
        return out
    adapter = adapter_from_checkpoint(checkpoint, base_model)
    with atomic_directory(out, ADAPTER_FILES) as tmp:  # a reader never sees a half-written adapter
        adapter.save_pretrained(tmp, generation=generation)
        (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    args = OmegaConf.from_cli(sys.argv[1:] if argv is None else argv)
    unknown = sorted(set(args) - set(CLI_KEYS))
    missing = [k for k in ("ckpt", "out") if args.get(k) is None]
    if unknown or missing:
        print(
            f"error: unknown arguments {unknown} / missing {missing}. Usage: python -m kangaroo_train.export "
            f"ckpt=PATH out=DIR [generation.threshold=X generation.max_draft_steps=N] [base_model=NAME]",
            file=sys.stderr,
        )
        return 2
    generation = OmegaConf.to_container(args.generation) if args.get("generation") is not None else None
    try:
        out = export_checkpoint(args.ckpt, args.out, generation=generation, base_model=args.get("base_model"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported adapter to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
