"""export-draft: the adapter as a plain transformers draft model whose logits equal Kangaroo's draft logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kangaroo_infer import SMOLLM2_ALIAS, KangarooAdapter, KangarooModel, export_draft, load_tokenizer
from kangaroo_infer.cache import KangarooCache
from kangaroo_infer.cli import main
from kangaroo_infer.draft import DraftHead, adapter_logits, shallow_step
from kangaroo_infer.draft_export import TOKENIZER_FILES, _weight_names, check_engine_path, check_engine_rules

from .conftest import assert_fp32_close, reduction_length, tiny_model

EXIT_LAYER = 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SMOLLM2_ALIAS)


def save_base(root: Path, tokenizer, arch: str, tied: bool, **overrides) -> tuple[AutoModelForCausalLM, Path]:
    """A tiny random base saved with a tokenizer and a generation config naming eos / pad ids."""
    model = tiny_model(arch, tied=tied, vocab_size=len(tokenizer), **overrides)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return model, root / "base"


def save_adapter(root: Path, base, base_dir: Path, mlp: bool, noise: float = 0.05, seed: int = 0) -> Path:
    """A copy-initialised adapter plus noise on every weight, so that any wrong mapping changes the logits."""
    adapter = KangarooAdapter.for_base(base, EXIT_LAYER, init="copy", mlp=mlp, base_name=str(base_dir))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(noise * torch.randn(param.shape, generator=generator))
    adapter.save_pretrained(root / "adapter")
    return root / "adapter"


def load_draft(path: Path):
    draft, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return draft.eval()


@torch.no_grad()
def kangaroo_draft_logits(km: KangarooModel, ids: torch.Tensor, chunk: int, full: bool = True) -> torch.Tensor:
    """Kangaroo's own drafting path, over the FULL vocabulary (else its draft vocabulary): the first ``chunk`` tokens
    at once (as after a prefill), then one token at a time. Returns [T - chunk + 1, V]: logits after each token from
    chunk - 1 on."""
    backbone, ell = km.backbone, km.exit_layer
    head = DraftHead(backbone.lm_head.weight, backbone.lm_head.bias, None) if full else km.draft_head
    cache = KangarooCache(ell, backbone.num_layers)
    exit_state = shallow_step(backbone, ell, cache, ids[:, :chunk])
    rows = [adapter_logits(backbone, km.adapter, head, cache, exit_state)]
    for t in range(chunk, ids.shape[1]):
        exit_state = shallow_step(backbone, ell, cache, ids[:, t : t + 1])
        rows.append(adapter_logits(backbone, km.adapter, head, cache, exit_state))
    return torch.stack(rows)


@torch.no_grad()
def draft_logits(draft, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """The standalone draft, decoded in the same chunks as kangaroo_draft_logits with a KV cache: [T - chunk + 1, V]."""
    out = draft(ids[:, :chunk], use_cache=True)
    rows = [out.logits[0, -1]]
    for t in range(chunk, ids.shape[1]):
        out = draft(ids[:, t : t + 1], cache=out.cache, use_cache=True)
        rows.append(out.logits[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("mlp", [False, True], ids=["attention", "attention+mlp"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_draft_logits_equal_kangaroo_draft_logits(tmp_path, tokenizer, arch, tied, mlp):
    base, base_dir = save_base(tmp_path, tokenizer, arch, tied)
    adapter_dir = save_adapter(tmp_path, base, base_dir, mlp)
    out = export_draft(adapter_dir, tmp_path / "draft")
    assert out == tmp_path / "draft"
    draft = load_draft(out)
    assert type(draft) is type(base)
    assert draft.config.num_hidden_layers == EXIT_LAYER + 1
    assert draft.config.tie_word_embeddings is tied
    assert (draft.lm_head.weight.data_ptr() == draft.model.embed_tokens.weight.data_ptr()) is tied
    assert draft.generation_config.eos_token_id == 2 and draft.generation_config.pad_token_id == 0
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()

    km = KangarooModel.from_pretrained(str(base_dir), adapter=adapter_dir)
    ids = torch.randint(3, len(tokenizer), (1, 11), generator=torch.Generator().manual_seed(1))
    expected = kangaroo_draft_logits(km, ids, chunk=4)  # [8, V]
    # Same chunks, different kernels (HF's masks and lm_head over all chunk rows): equal up to fp32 rounding.
    reduction = reduction_length(base.config, ids.shape[1])
    assert_fp32_close(draft_logits(draft, ids, chunk=4), expected, reduction)
    with torch.no_grad():
        logits = draft(ids).logits[0, 3:]  # [8, V] all positions in one pass
    assert_fp32_close(logits, expected, reduction)
    # The draft is not the base's logit lens at ℓ: the adapter's weights matter (a wrong mapping would fail above).
    with torch.no_grad():
        lens = base(ids, output_hidden_states=True).hidden_states[EXIT_LAYER][0, 3:]
        lens_logits = base.lm_head(base.model.norm(lens))
    assert not torch.allclose(logits, lens_logits, atol=1e-2)


def test_sliding_window_shallow_layers_and_full_attention_adapter(tmp_path, tokenizer):
    """Qwen2 with sliding-window shallow layers: the draft keeps their windows and makes its last layer full."""
    base, base_dir = save_base(
        tmp_path, tokenizer, "qwen2", False, use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    assert base.config.layer_types[:3] == ["full_attention", "sliding_attention", "sliding_attention"]
    adapter_dir = save_adapter(tmp_path, base, base_dir, mlp=True)
    draft = load_draft(export_draft(adapter_dir, tmp_path / "draft"))
    assert draft.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    km = KangarooModel.from_pretrained(str(base_dir), adapter=adapter_dir)
    ids = torch.randint(3, len(tokenizer), (1, 14), generator=torch.Generator().manual_seed(2))  # longer than 4
    expected = kangaroo_draft_logits(km, ids, chunk=3)
    reduction = reduction_length(base.config, ids.shape[1])
    assert_fp32_close(draft_logits(draft, ids, chunk=3), expected, reduction)
    with torch.no_grad():
        logits = draft(ids).logits[0, 2:]
    assert_fp32_close(logits, expected, reduction)


def test_qwen2_without_sliding_layers_gets_full_attention_everywhere(tmp_path, tokenizer):
    base, base_dir = save_base(tmp_path, tokenizer, "qwen2", True)
    export_draft(save_adapter(tmp_path, base, base_dir, mlp=False), tmp_path / "draft")
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert config["layer_types"] == ["full_attention"] * (EXIT_LAYER + 1)
    assert config["max_window_layers"] == EXIT_LAYER + 1 and config["num_hidden_layers"] == EXIT_LAYER + 1
    assert config["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("arch,tied,mlp", [("llama", False, True), ("qwen2", True, False), ("mistral", False, False)])
def test_assisted_generation_equals_greedy(tmp_path, tokenizer, arch, tied, mlp):
    """HF assisted generation with the exported draft is token-identical to plain greedy decoding."""
    base, base_dir = save_base(tmp_path, tokenizer, arch, tied, deep_scale=0.05, exit_layer=EXIT_LAYER)
    # Nearly the base's logit lens at ℓ (deep layers near identity): many drafts are accepted, some are not.
    adapter_dir = save_adapter(tmp_path, base, base_dir, mlp, noise=0.02)
    draft = load_draft(export_draft(adapter_dir, tmp_path / "draft"))
    agree = []
    for seed, length in [(3, 5), (4, 17)]:
        ids = torch.randint(3, len(tokenizer), (1, length), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            plain = base.generate(ids, do_sample=False, max_new_tokens=24)
            assisted = base.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=24)
            new = slice(length - 1, plain.shape[1] - 1)  # predictions of the generated tokens
            agree += (base(plain).logits[0, new].argmax(-1) == draft(plain).logits[0, new].argmax(-1)).tolist()
        assert assisted[0].tolist() == plain[0].tolist()
    assert any(agree) and not all(agree)  # drafts were both accepted and rejected along the way


def test_dtype_and_draft_vocab_not_carried_over(tmp_path, tokenizer):
    base, base_dir = save_base(tmp_path, tokenizer, "llama", False)
    adapter = KangarooAdapter.for_base(base, EXIT_LAYER, init="copy", base_name=str(base_dir))
    adapter.set_draft_vocab(list(range(100, 400)))
    adapter.save_pretrained(tmp_path / "adapter")
    draft = AutoModelForCausalLM.from_pretrained(export_draft(tmp_path / "adapter", tmp_path / "d", dtype="bfloat16"))
    assert draft.dtype == torch.bfloat16
    assert draft.config.vocab_size == len(tokenizer) and draft.lm_head.weight.shape[0] == len(tokenizer)


def test_empty_output_directory_is_used(tmp_path, tokenizer):
    base, base_dir = save_base(tmp_path, tokenizer, "llama", True)
    adapter_dir = save_adapter(tmp_path, base, base_dir, mlp=False)
    (tmp_path / "draft").mkdir()
    assert main(["export-draft", "--adapter", str(adapter_dir), "--out", str(tmp_path / "draft")]) == 0
    load_draft(tmp_path / "draft")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left


def run_cli(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["export-draft", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error:") == 1
    return err


def test_bad_inputs(tmp_path, tokenizer, capsys):
    base, base_dir = save_base(tmp_path, tokenizer, "llama", False)
    adapter_dir = save_adapter(tmp_path, base, base_dir, mlp=False)
    out = str(tmp_path / "draft")

    # wrong adapter path
    assert "does not exist" in run_cli(capsys, "--adapter", str(tmp_path / "nope"), "--out", out)
    # output directory exists and is not empty: refused, its file untouched
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    err = run_cli(capsys, "--adapter", str(adapter_dir), "--out", str(tmp_path / "full"))
    assert "not an empty directory" in err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    # recorded base gone, no --base
    gone = tmp_path / "gone"
    orphan = KangarooAdapter.for_base(base, EXIT_LAYER, base_name=str(gone))
    orphan.save_pretrained(tmp_path / "orphan")
    err = run_cli(capsys, "--adapter", str(tmp_path / "orphan"), "--out", out)
    assert "cannot be loaded" in err and "--base" in err
    # no recorded base at all, no --base
    nameless = KangarooAdapter.for_base(base, EXIT_LAYER)
    nameless.config.base_model = None
    nameless.save_pretrained(tmp_path / "nameless")
    assert "records no base model" in run_cli(capsys, "--adapter", str(tmp_path / "nameless"), "--out", out)
    assert not (tmp_path / "draft").exists()
    # ... while --base fixes it
    assert main(["export-draft", "--adapter", str(tmp_path / "orphan"), "--out", out, "--base", str(base_dir)]) == 0
    load_draft(tmp_path / "draft")
    with pytest.raises(ValueError, match="dtype"):
        export_draft(adapter_dir, tmp_path / "other", dtype="int8")


def test_mistral_sliding_window_that_bites_is_refused(tmp_path, tokenizer):
    base, base_dir = save_base(tmp_path, tokenizer, "mistral", False, sliding_window=8)
    adapter_dir = save_adapter(tmp_path, base, base_dir, mlp=False)
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        export_draft(adapter_dir, tmp_path / "draft")
    assert not (tmp_path / "draft").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_shipped_smollm2_adapter(tmp_path):
    """The shipped SmolLM2 adapter (attention + MLP, 16k draft vocabulary) as a draft model for the real base."""
    shipped = Path(__file__).resolve().parent.parent / "checkpoints" / SMOLLM2_ALIAS
    draft = load_draft(export_draft(shipped, tmp_path / "draft"))
    km = KangarooModel.from_pretrained(None, adapter=shipped)
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    assert draft.config.num_hidden_layers == km.exit_layer + 1 == 3

    def chat(text: str) -> torch.Tensor:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]

    ids = chat("Explain in two sentences why the sky is blue.")
    chunk = ids.shape[1] - 4
    expected = kangaroo_draft_logits(km, ids, chunk)  # [5, V]
    logits = draft_logits(draft, ids, chunk)  # [5, V]
    reduction = reduction_length(km.base.config, ids.shape[1])
    assert_fp32_close(logits, expected, reduction)
    vocab = km.adapter.draft_vocab  # kangaroo drafts from these rows only; the draft model keeps the full head
    assert_fp32_close(logits[:, vocab], kangaroo_draft_logits(km, ids, chunk, full=False), reduction)
    with torch.no_grad():
        one_pass = draft(ids).logits[0, -5:]  # all positions at once
    assert_fp32_close(one_pass, expected, reduction)
    for prompt in ["Write a haiku about autumn leaves.", "What is 17 times 23? Show your work."]:
        ids = chat(prompt)
        with torch.no_grad():
            plain = km.base.generate(ids, do_sample=False, max_new_tokens=32)
            assisted = km.base.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=32)
        assert assisted[0].tolist() == plain[0].tolist()


@pytest.mark.parametrize("name", ["my-eagle3-draft", "EAGLE-smollm2", "x/dflash", "drafts/dspark_1"])
def test_paths_vllm_would_misread_are_refused(tmp_path, tokenizer, capsys, name):
    """vLLM 0.32 switches to EAGLE / DFlash / DSpark when the draft's path holds these words, whatever the method."""
    base, base_dir = save_base(tmp_path, tokenizer, "llama", True)
    adapter_dir = save_adapter(tmp_path, base, base_dir, mlp=False)
    err = run_cli(capsys, "--adapter", str(adapter_dir), "--out", str(tmp_path / name))
    assert "vLLM chooses its speculative method from the draft's path" in err
    assert "Choose a path without 'eagle', 'dflash' or 'dspark'" in err
    assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="speculative method"):
        check_engine_path(tmp_path / name)


def rewrite_config(draft: Path, **changes) -> None:
    config = json.loads((draft / "config.json").read_text())
    config.update(changes)
    (draft / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False), ("mistral", True)])
def test_written_draft_follows_vllm_draft_model_rules(tmp_path, tokenizer, arch, tied):
    """What vLLM's draft_model method reads: own embeddings and head, the target's vocab, a plain model_type."""
    base, base_dir = save_base(tmp_path, tokenizer, arch, tied)
    draft = export_draft(save_adapter(tmp_path, base, base_dir, mlp=True), tmp_path / "draft")
    check_engine_rules(draft, base.config)  # export_draft ran it too; the written directory passes as it is
    config = json.loads((draft / "config.json").read_text())
    assert config["vocab_size"] == base.config.vocab_size == len(tokenizer)
    assert config["model_type"] == arch and config["tie_word_embeddings"] is tied
    weights = _weight_names(draft)
    assert "model.embed_tokens.weight" in weights and ("lm_head.weight" in weights) is not tied

    def refused(match: str, **changes) -> None:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(draft, bad)
        rewrite_config(bad, **changes)
        with pytest.raises(ValueError, match=match):
            check_engine_rules(bad, base.config)

    refused("vocab_size is 50000", vocab_size=50000)
    refused("max_position_embeddings is 64", max_position_embeddings=64)
    refused("model_type 'medusa'", model_type="medusa")
    refused("num_hidden_layers is 4", num_hidden_layers=4)
    if tied:
        refused("no lm_head.weight", tie_word_embeddings=False)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(draft, no_tokenizer)
    for name in TOKENIZER_FILES:
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no tokenizer file"):
        check_engine_rules(no_tokenizer, base.config)
