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
