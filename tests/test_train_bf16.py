"""Training in bf16 on CPU: the frozen base computes features in bf16, the adapter trains under bf16-mixed with fp32
master weights, and the export decodes losslessly in bf16."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from kangaroo_infer import KangarooModel

from .helpers import run_train


def test_tiny_training_in_bf16_end_to_end(tmp_path):
    out = tmp_path / "run"
    run_train(out, "model.dtype=bfloat16", "trainer.precision=bf16-mixed")
    manifest = json.loads((out / "features" / "train" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == "bfloat16"
    weights = load_file(out / "adapter" / "model.safetensors")
    floats = [w for w in weights.values() if w.is_floating_point()]
    assert floats and all(w.dtype == torch.float32 for w in floats)  # fp32 master weights, exported as trained
    assert all(torch.isfinite(w).all() for w in floats)
    km = KangarooModel.from_pretrained(None, adapter=out / "adapter", dtype="bfloat16")
    assert km.base.dtype == torch.bfloat16 and km.backbone.invariance is not None
    ids = torch.tensor([[1, 400, 2300, 7001, 120, 33, 4096, 12]])
    ref = km.base.generate(ids, do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    assert km.generate(ids, max_new_tokens=24, eos_token_id=None).sequences[0].tolist() == ref[0].tolist()
