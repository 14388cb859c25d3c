"""End to end on the real SmolLM2-135M-Instruct, reached through the built-in alias (slow: ~1 minute)."""

from __future__ import annotations

import pytest
import torch

from kangaroo_infer import SMOLLM2_ALIAS, KangarooModel, load_tokenizer
from kangaroo_infer.base import kangaroo_home

pytestmark = pytest.mark.slow


def test_alias_materialises_once_and_decodes_losslessly():
    km = KangarooModel.from_pretrained(SMOLLM2_ALIAS, exit_layer=2, init="copy")
    home = kangaroo_home() / "models" / SMOLLM2_ALIAS
    assert (home / "model.safetensors").is_file() and km.base.config.num_hidden_layers == 30
    assert km.adapter.config.base_model == SMOLLM2_ALIAS
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "List three colours."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        ref = km.base.generate(ids, do_sample=False, max_new_tokens=40)
    out = km.generate(ids, max_new_tokens=40, threshold=0.0, max_draft_steps=4)
    assert out.sequences[0].tolist() == ref[0].tolist()
    assert sum(out.accept_lengths) == ref.shape[1] - ids.shape[1]


def test_bench_with_the_shipped_adapter(tmp_path):
    """The trained adapter shipped in checkpoints/ decodes two MT-bench questions identically to vanilla."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "checkpoints" / SMOLLM2_ALIAS
    config = json.loads((shipped / "config.json").read_text())
    assert config["base_model"] == SMOLLM2_ALIAS and config["generation"]
    result = subprocess.run(
        [
            sys.executable, "-m", "kangaroo_infer", "bench", "--adapter", str(shipped), "--categories",
            "writing,coding", "--num-questions", "1", "--max-new-tokens", "48", "--no-profile", "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["overall"]["identical"] is True and summary["overall"]["questions"] == 2
    assert summary["overall"]["tau"] >= 1.0


def test_bf16_exact_verification_on_real_activations():
    """SmolLM2 in bf16 on MT-bench question 151: verification passes of 2-3 rows after 176-179 cached tokens write
    the same keys and values and give the same logits, bit for bit, as one-row decode steps; and decoding is
    token-identical to bf16 generate. Here an earlier rule (rows batched as one masked attention call when their
    key counts shared a 16-key block) passed every random-input check but changed layer 4's output at 179 keys."""
    import copy

    from kangaroo_infer.questions import chat_ids, default_questions, load_questions

    km = KangarooModel.from_pretrained(SMOLLM2_ALIAS, exit_layer=2, dtype="bfloat16")
    base, backbone = km.base, km.backbone
    question = next(q for q in load_questions(default_questions()) if int(q.question_id) == 151)
    ids = chat_ids(load_tokenizer(SMOLLM2_ALIAS), question.prompt, "cpu")  # [1, 58]
    with torch.inference_mode():
        ref = base.generate(ids, do_sample=False, max_new_tokens=128)
        out = km.generate(ids, max_new_tokens=128, policy="fixed", max_draft_steps=2, threshold=0.0, lookup_tokens=0)
        assert out.sequences.tolist() == ref.tolist()
        seq, cache = ref[0], base(ids, use_cache=True).cache
        for position in range(ids.shape[1], 176):
            base(seq[None, position : position + 1], cache=cache, use_cache=True)
        for context in range(176, 180):
            for rows in (2, 3):
                expected_cache = copy.deepcopy(cache)
                expected = [
                    base(seq[None, i : i + 1], cache=expected_cache, use_cache=True).logits[0, 0]
                    for i in range(context, context + rows)
                ]
                got_cache = copy.deepcopy(cache)
                positions = torch.arange(context, context + rows)
                hidden = backbone.embed_tokens(seq[None, context : context + rows])
                pe = backbone.rotary_emb(hidden, position_ids=positions[None])
                final = backbone.run_layers(hidden, 0, backbone.num_layers, pe, positions, got_cache)
                logits = backbone.logits(final)[0]
                for i in range(rows):
                    assert torch.equal(logits[i], expected[i]), f"context {context}, {rows} rows: row {i}'s logits"
                for layer, (a, b) in enumerate(zip(got_cache.layers, expected_cache.layers, strict=True)):
                    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), f"layer {layer}'s cache"
            base(seq[None, context : context + 1], cache=cache, use_cache=True)
