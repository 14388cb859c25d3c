"""Shared fixtures: tiny random models of the three supported architectures, built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from kangaroo_infer import KangarooAdapter, load_tokenizer

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("KANGAROO_DTYPE", "float32")  # "auto" the same on every CPU; bf16 is tested explicitly

torch.set_num_threads(1)  # tiny models gain nothing from threads, and lose a lot when the machine is shared

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


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, reduction: int) -> None:
    """Logits of one model computed along two fp32 paths that are not the same kernels: a row alone or among others
    (MKL's GEMM gives a row different bits depending on how many rows it computes together), GEMV vs GEMM, an
    explicit mask vs ``is_causal`` in attention. No CPU promises equal bits there, only equal values up to rounding.

    Derivation: each logit ends a chain of fp32 dot products of at most ``reduction`` terms (hidden size, MLP width
    or sequence length, whichever is longest); a dot product of n terms is off by at most n * eps * sum|a_i b_i|
    (Higham's gamma_n bound), and we take max|expected| as the scale of sum|a_i b_i|. So
    rtol = reduction * eps(fp32) and atol = reduction * eps(fp32) * max|expected|. A wrong weight mapping changes
    logits by O(1), orders of magnitude above this. Where the same rows go through the same computation, tests assert
    equality instead (``torch.equal``), and token identity where the algorithm guarantees it.
    """
    assert expected.dtype == actual.dtype == torch.float32
    tol = reduction * torch.finfo(torch.float32).eps
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def reduction_length(config, seq_len: int) -> int:
    """The longest fp32 sum on a decoder's path to its logits (see assert_fp32_close)."""
    return max(config.hidden_size, config.intermediate_size, seq_len)


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The session's one full tiny training (data -> cache -> train -> export, 12 steps) with csv and offline wandb
    logging, through the real entry point. Tests read its outputs or start from its data, features, checkpoints and
    adapter (copied when they change them) instead of training again."""
    from .helpers import run_train

    output_dir = tmp_path_factory.mktemp("tiny_run")
    run_train(
        output_dir,
        "logger=[csv,wandb]",
        "+callbacks.lr_monitor={_target_: lightning.pytorch.callbacks.LearningRateMonitor, logging_interval: step}",
        "+trainer.detect_anomaly=false",
        "generation.threshold=0.5",
        "generation.max_draft_steps=3",
        "adapter.draft_vocab_size=64",
    )
    return output_dir


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A tiny random Llama saved as an HF directory with SmolLM2's tokenizer, plus an adapter checkpoint for it."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model("llama", deep_scale=0.05, exit_layer=2, vocab_size=len(tokenizer), max_position_embeddings=512)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter = KangarooAdapter.for_base(model, exit_layer=2, init="copy", base_name=str(root / "base"))

    with torch.no_grad():  # as identity_adapter: drafts = the base's logit lens at ℓ, often accepted
        adapter.self_attn.o_proj.weight.zero_()
        adapter.norm.weight.copy_(model.model.norm.weight)
    adapter.save_pretrained(root / "adapter")
    return root, model, tokenizer
