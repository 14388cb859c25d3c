"""CUDA check of #24: tiny random Llama / Qwen2 / Mistral models (SmolLM2-like widths) in bf16 on the GPU, every
decoding mode (chains, trees, lookup, scheduler, padded batches) against `generate`, exact verification on and off.
Run from the repository root: python benchmarks/cuda_bf16/smoke.py [DEVICE] (default cuda)."""

import sys
import time

import torch

sys.path.insert(0, ".")
from kangaroo_infer import KangarooModel  # noqa: E402
from kangaroo_infer.scheduler import PolicyConfig  # noqa: E402
from tests.conftest import VOCAB, identity_adapter, tiny_model  # noqa: E402

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
shape = dict(hidden_size=256, intermediate_size=1536, num_attention_heads=4, num_key_value_heads=2)
for arch in ("llama", "qwen2", "mistral"):
    model = (
        tiny_model(
            arch, deep_scale=0.05, exit_layer=2, seed=4, initializer_range=0.02, max_position_embeddings=1024, **shape
        )
        .to(torch.bfloat16)
        .to(dev)
    )
    gen = torch.Generator().manual_seed(7)
    prompts = []
    for prompt_len, repeat in ((150, False), (280, True)):
        ids = torch.randint(3, VOCAB, (1, prompt_len), generator=gen)
        if repeat:
            ids = torch.cat([ids[:, :40]] * 7, dim=1)
        prompts.append(ids.to(dev))
    refs = [
        model.generate(ids, do_sample=False, max_new_tokens=60, pad_token_id=0, eos_token_id=None)[0].tolist()
        for ids in prompts
    ]
    for exact in (True, False):
        km = KangarooModel.from_pretrained(model, exit_layer=2, exact_verify=exact)
        identity_adapter(km)
        for kw in (
            dict(lookup_tokens=0),
            dict(lookup_tokens=0, tree=True),
            dict(max_draft_steps=0),
            dict(policy="fixed"),
            dict(policy=PolicyConfig(measure_costs=False), threshold=0.0, max_draft_steps=8),
        ):
            same, multi = 0, 0
            t0 = time.perf_counter()
            for ids, ref in zip(prompts, refs, strict=True):
                out = km.generate(ids, max_new_tokens=60, eos_token_id=None, **kw)
                same += out.sequences[0].tolist() == ref
                multi += sum(a > 1 for a in out.accept_lengths[1:])
            print(
                f"{arch} exact={exact} {kw}: identical {same}/{len(prompts)}, multi-token rounds {multi}, "
                f"{time.perf_counter() - t0:.1f}s",
                flush=True,
            )
        # a left-padded batch of 3: each row against its own generate
        rows = [prompts[0][0, :150], prompts[1][0, :200], prompts[0][0, 20:120]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
        for kw in (dict(), dict(tree=True, threshold=0.0, policy="fixed")):
            out = km.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=None, **kw)
            same = 0
            for i, r in enumerate(rows):
                ref = model.generate(r[None], do_sample=False, max_new_tokens=40, pad_token_id=0, eos_token_id=None)
                got = out.sequences[i, width:].tolist()
                same += got == ref[0, len(r) :].tolist()
            print(f"{arch} exact={exact} batch {kw}: rows identical to own generate {same}/{len(rows)}", flush=True)
