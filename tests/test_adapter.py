"""Adapter structure, checkpoint round trip and every strict-loading error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kangaroo_infer import KangarooAdapter, KangarooModel
from kangaroo_infer.adapter import CONFIG_NAME, WEIGHTS_NAME

from .conftest import VOCAB, tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_adapter_uses_the_base_architecture(arch):
    base = tiny_model(arch, tied=arch == "qwen2")
    adapter = KangarooAdapter.for_base(base, exit_layer=2)
    names = set(adapter.state_dict())
    expected = {"input_layernorm.weight", "norm.weight"} | {f"self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")}
    if arch == "qwen2":  # Qwen2's q/k/v projections carry biases
        expected |= {f"self_attn.{p}_proj.bias" for p in ("q", "k", "v")}
    assert names == expected
    assert type(adapter.self_attn) is type(base.model.layers[0].self_attn)
    assert type(adapter.norm) is type(base.model.norm)
    assert adapter.self_attn.k_proj.weight.shape == base.model.layers[0].self_attn.k_proj.weight.shape  # GQA


def test_copy_init_copies_layer_ell_and_random_init_does_not():
    base = tiny_model("llama")
    copied = KangarooAdapter.for_base(base, exit_layer=3, init="copy")
    layer = base.model.layers[3]
    assert torch.equal(copied.self_attn.q_proj.weight, layer.self_attn.q_proj.weight)
    assert torch.equal(copied.input_layernorm.weight, layer.input_layernorm.weight)
    assert torch.equal(copied.norm.weight, base.model.norm.weight)
    fresh = KangarooAdapter.for_base(base, exit_layer=3, init="random")
    assert not torch.equal(fresh.self_attn.q_proj.weight, layer.self_attn.q_proj.weight)


def test_adapter_forward_is_causal_and_matches_incremental_cache():
    from transformers import DynamicCache

    base = tiny_model("llama")
    adapter = KangarooAdapter.for_base(base, exit_layer=2, init="copy").eval()
    x = torch.randn(1, 7, 64)
    full = adapter(x)
    assert torch.allclose(adapter(x[:, :4]), full[:, :4], atol=1e-5)  # position t sees only 0..t
    cache = DynamicCache()
    steps = [adapter(x[:, i : i + 1], position_ids=torch.tensor([[i]]), cache=cache) for i in range(7)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("mlp", [False, True], ids=["attention", "attention+mlp"])
def test_checkpoint_round_trip(tmp_path, mlp):
    base = tiny_model("llama")
    adapter = KangarooAdapter.for_base(base, exit_layer=2, init="copy", mlp=mlp, base_name="my/base")
    adapter.save_pretrained(tmp_path / "ckpt", generation={"threshold": 0.4, "max_draft_steps": 3})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert config["exit_layer"] == 2 and config["base_model"] == "my/base" and config["mlp"] is mlp
    assert config["generation"] == {"threshold": 0.4, "max_draft_steps": 3}
    assert config["base_fingerprint"]["num_hidden_layers"] == 4
    assert config["base_fingerprint"]["num_key_value_heads"] == 2
    assert config["base_fingerprint"]["rope"]["rope_theta"] == 10000.0
    loaded = KangarooAdapter.from_pretrained(tmp_path / "ckpt", base)
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    km = KangarooModel.from_pretrained(base, adapter=tmp_path / "ckpt")
    assert km.exit_layer == 2 and km.base is base
    ids = torch.randint(3, VOCAB, (1, 5))
    out = km.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert out.draft_lengths and max(out.draft_lengths) <= 3  # the checkpoint's max_draft_steps is the default


@pytest.fixture
def saved(tmp_path):
    base = tiny_model("llama")
    KangarooAdapter.for_base(base, exit_layer=2, init="copy").save_pretrained(tmp_path / "ckpt")
    return base, tmp_path / "ckpt"


def test_missing_and_unexpected_keys(saved):
    base, ckpt = saved
    state = load_file(str(ckpt / WEIGHTS_NAME))
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\].*unexpected keys \['extra.weight'\]"):
        KangarooAdapter.from_pretrained(ckpt, base)


def test_shape_mismatch(saved):
    base, ckpt = saved
    state = load_file(str(ckpt / WEIGHTS_NAME))
    state["self_attn.q_proj.weight"] = torch.zeros(8, 64)
    save_file(state, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"shape mismatches \[self_attn.q_proj.weight: checkpoint \(8, 64\)"):
        KangarooAdapter.from_pretrained(ckpt, base)


def test_adapter_for_another_base(saved):
    _, ckpt = saved
    other = tiny_model("llama", layers=6)
    with pytest.raises(ValueError, match="trained for another base model.*num_hidden_layers: adapter 4 vs base 6"):
        KangarooModel.from_pretrained(other, adapter=ckpt)
    qwen = tiny_model("qwen2")
    with pytest.raises(ValueError, match="model_type: adapter 'llama' vs base 'qwen2'"):
        KangarooModel.from_pretrained(qwen, adapter=ckpt)
    rope = tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with pytest.raises(ValueError, match="rope"):
        KangarooModel.from_pretrained(rope, adapter=ckpt)


def test_corrupt_files_and_wrong_paths(saved, tmp_path):
    base, ckpt = saved
    with pytest.raises(ValueError, match="does not exist or is not a directory"):
        KangarooModel.from_pretrained(base, adapter=tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        KangarooModel.from_pretrained(base, adapter=tmp_path)
    (ckpt / WEIGHTS_NAME).write_bytes((ckpt / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        KangarooModel.from_pretrained(base, adapter=ckpt)
    (ckpt / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        KangarooModel.from_pretrained(base, adapter=ckpt)
    (ckpt / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        KangarooModel.from_pretrained(base, adapter=ckpt)
    (ckpt / CONFIG_NAME).write_text(json.dumps({"format": "kangaroo-adapter", "format_version": 1, "bogus": 1}))
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        KangarooModel.from_pretrained(base, adapter=ckpt)


def test_exit_layer_disagreeing_with_checkpoint(saved):
    base, ckpt = saved
    with pytest.raises(ValueError, match="disagrees with the adapter checkpoint"):
        KangarooModel.from_pretrained(base, adapter=ckpt, exit_layer=3)
    assert KangarooModel.from_pretrained(base, adapter=ckpt, exit_layer=2).exit_layer == 2


@pytest.mark.parametrize("exit_layer", [0, 4, -1, 10, 1.5, True])
def test_exit_layer_out_of_range(exit_layer):
    with pytest.raises(ValueError, match=r"exit_layer=.* out of range .* 4 layers: choose an integer in \[1, 3\]"):
        KangarooModel.from_pretrained(tiny_model("llama"), exit_layer=exit_layer)


def test_fresh_adapter_needs_exit_layer_and_known_init():
    with pytest.raises(ValueError, match="needs exit_layer"):
        KangarooModel.from_pretrained(tiny_model("llama"))
    with pytest.raises(ValueError, match="Unknown adapter init 'zeros'"):
        KangarooModel.from_pretrained(tiny_model("llama"), exit_layer=1, init="zeros")
    with pytest.raises(ValueError, match="Name a base model"):
        KangarooModel.from_pretrained(None)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"Unsupported architecture .*'gpt2'.*supports"):
        KangarooModel.from_pretrained(gpt2, exit_layer=1)


def test_base_model_path_errors(tmp_path):
    with pytest.raises(ValueError, match="neither an existing directory nor a hub id"):
        KangarooModel.from_pretrained(str(tmp_path / "missing-model"), exit_layer=1)


def test_bad_generate_inputs():
    km = KangarooModel.from_pretrained(tiny_model("llama"), exit_layer=2)
    ok = torch.tensor([[5, 6, 7]])
    cases = [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "prompt is empty"),
        (dict(input_ids=torch.tensor([5, 6])), r"shape \[1, T\]"),
        (dict(input_ids=torch.tensor([[5.0]])), "integer torch tensor"),
        (dict(input_ids=torch.tensor([[5, VOCAB]])), "outside the vocabulary"),
        (dict(input_ids=ok, max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(input_ids=ok, max_new_tokens=254), r"exceeds the model's 256 positions.*max_new_tokens to 253"),
        (dict(input_ids=ok, max_new_tokens=9999), r"max_new_tokens \(9999\) alone reaches .*lower it to at most 253"),
        (
            dict(input_ids=torch.ones(1, 257, dtype=torch.long), max_new_tokens=1),
            r"no room for new tokens in the model's 256 positions; shorten the prompt by at least 2 tokens",
        ),
        (dict(input_ids=ok, threshold=1.5), r"threshold must lie in \[0, 1\]"),
        (dict(input_ids=ok, threshold=-0.1), r"threshold must lie in \[0, 1\]"),
        (dict(input_ids=ok, max_draft_steps=-1), "max_draft_steps must be an integer >= 0"),
        (dict(input_ids=ok, eos_token_id="eos"), "eos_token_id must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            km.generate(**kwargs)
    out = km.generate(ok, max_new_tokens=253, eos_token_id=None)  # exactly at the limit is fine
    assert out.sequences.shape[1] == 256


def test_package_file_names_what_to_install():
    from kangaroo_infer.base import package_file

    with pytest.raises(ValueError, match="needs the PyPI package 'no-such-kangaroo-pkg'.*pip install no-such"):
        package_file("no-such-kangaroo-pkg", ".gguf", "The alias x", "pip install no-such-kangaroo-pkg")
    with pytest.raises(ValueError, match=r"installed but its file \*\.nothing is missing"):
        package_file("safetensors", ".nothing", "Test", "pip install safetensors")


def test_atomic_directory_replaces_only_on_success(tmp_path):
    from kangaroo_infer.files import atomic_directory

    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "1"  # the old content survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
