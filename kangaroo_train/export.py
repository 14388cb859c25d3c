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
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import CONFIG_MAPPING, PretrainedConfig

from kangaroo_infer.adapter import AdapterConfig, KangarooAdapter, check_fingerprint
from kangaroo_infer.base import atomic_directory

TRAINING_INFO = "training.json"  # beside the adapter: which checkpoint and step it came from
ADAPTER_PREFIX = "adapter."
CLI_KEYS = ("ckpt", "out", "generation", "base_model")


def load_training_checkpoint(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict (``state_dict``, ``hyper_parameters``, ``global_step``) of a file or a ZeRO directory."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        if not (path / "latest").is_file():
            raise ValueError(
                f"{path} is a directory but not a DeepSpeed checkpoint (no 'latest' file); pass a Lightning .ckpt "
                f"file or the checkpoint directory Lightning wrote under DeepSpeed."
            )
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:  # the converter insists on writing a file; we keep the dict
            return convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "consolidated.ckpt")
    if not path.is_file():
        raise ValueError(f"Checkpoint {str(path)!r} does not exist; pass ckpt=PATH to a .ckpt file or ZeRO directory.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch/pickle raise many types for a damaged file
        raise ValueError(f"{path} is not a readable checkpoint ({err}); pass another checkpoint.") from err


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
    adapter.load_state_dict({k[len(ADAPTER_PREFIX) :]: v.float() for k, v in state.items()}, strict=True)
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
    checkpoint = load_training_checkpoint(ckpt)
    step = int(checkpoint.get("global_step", -1))
    generation = dict(generation) if generation is not None else checkpoint["hyper_parameters"].get("generation")
    info = {"checkpoint": str(ckpt), "global_step": step, "generation": generation, "base_model": base_model}
    info_path = out / TRAINING_INFO
    if info_path.is_file() and json.loads(info_path.read_text()) == info and (out / "model.safetensors").is_file():
        return out
    adapter = adapter_from_checkpoint(checkpoint, base_model)
    with atomic_directory(out) as tmp:  # a reader never sees a half-written adapter
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
