"""A seeded random tiny Llama with the SmolLM2 tokenizer: a real HF model directory that trains in seconds.

It is built from a config (no download) and saved once, so tests, the ``tiny`` experiment and kangaroo_infer all load
it the same way, by its absolute directory path (which the exported adapter records as its base model). The SmolLM2
tokenizer is saved beside it so the chat template and special tokens match the real model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kangaroo_infer.base import SMOLLM2_ALIAS, load_tokenizer
from kangaroo_infer.files import atomic_directory

SPEC_FILE = "kangaroo_tiny.json"  # the spec a directory was built from; a different spec rebuilds it
SPEC_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_positions",
    "initializer_range",
    "seed",
    "deep_scale",
    "deep_from",
)


def _check_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    missing = sorted(set(SPEC_KEYS) - set(spec))
    if unknown or missing:
        raise ValueError(
            f"Tiny model spec has unknown keys {unknown} / lacks keys {missing}; it takes exactly {list(SPEC_KEYS)} "
            f"(see configs/model/tiny.yaml)."
        )
    return dict(spec)


def build_tiny_model(spec: Mapping[str, Any], vocab_size: int, bos: int, eos: int, pad: int) -> LlamaForCausalLM:
    """The random model; ``deep_scale`` < 1 shrinks layers >= ``deep_from`` towards identity (a learnable target)."""
    spec = _check_spec(spec)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=spec["max_positions"],
        initializer_range=spec["initializer_range"],
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config).eval()
    if spec["deep_scale"] != 1.0:
        with torch.no_grad():
            for layer in model.model.layers[spec["deep_from"] :]:
                layer.self_attn.o_proj.weight.mul_(spec["deep_scale"])
                layer.mlp.down_proj.weight.mul_(spec["deep_scale"])
    return model


def _weights_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as far as it decides the weights: ``deep_from`` means nothing while ``deep_scale`` is 1, so runs at
    another exit layer share the directory instead of rebuilding it."""
    spec = dict(spec)
    if spec.get("deep_scale") == 1.0:
        spec["deep_from"] = None
    return spec


def ensure_tiny_model(directory: str | os.PathLike, spec: Mapping[str, Any]) -> Path:
    """Build and save the tiny model + SmolLM2 tokenizer into ``directory`` unless it already holds this spec."""
    spec = _weights_spec(_check_spec(spec))
    directory = Path(directory).expanduser().resolve()
    spec_path = directory / SPEC_FILE
    saved = _weights_spec(json.loads(spec_path.read_text())) if spec_path.is_file() else None
    if saved == spec and (directory / "config.json").is_file():
        return directory
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model = build_tiny_model(spec, len(tokenizer), bos, tokenizer.eos_token_id, pad)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad
    with atomic_directory(directory) as tmp:  # a half-written model is never seen
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return directory
