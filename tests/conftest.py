"""Shared fixtures: tiny random models of the three supported architectures, built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
VOCAB = 96


def tiny_model(
    arch: str = "llama",
    layers: int = 4,
    tied: bool = False,
    deep_scale: float = 1.0,
    exit_layer: int = 2,
    seed: int = 0,
    attn: str = "sdpa",
    **overrides,
):
    """A random tiny causal LM; ``deep_scale`` < 1 shrinks layers >= exit_layer towards identity.

    The init scale is large so logits are well separated: float rounding differences between one-token and
    multi-token passes then never flip a greedy choice.
    """
    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        initializer_range=0.25,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation=attn,
    )
    kwargs.update(overrides)
    model = AutoModelForCausalLM.from_config(ARCHS[arch](**kwargs)).eval()
    if deep_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.layers[exit_layer:]:
                layer.self_attn.o_proj.weight.mul_(deep_scale)
                layer.mlp.down_proj.weight.mul_(deep_scale)
    return model


def identity_adapter(km) -> None:
    """Make the adapter pass its input through (attention output 0) and reuse the base's final norm weights,
    so drafts equal the base's "logit lens" at the exit layer: accepted often when deep layers are near identity."""
    with torch.no_grad():
        km.adapter.self_attn.o_proj.weight.zero_()
        km.adapter.norm.weight.copy_(km.base.model.norm.weight)


@pytest.fixture
def kangaroo_home(tmp_path, monkeypatch):
    """An empty $KANGAROO_HOME for tests that must not see the user's cache."""
    home = tmp_path / "kangaroo_home"
    monkeypatch.setenv("KANGAROO_HOME", str(home))
    return home
