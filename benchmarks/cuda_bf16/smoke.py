"""CUDA check of #24: tiny random Llama / Qwen2 / Mistral models (SmolLM2-like widths) in bf16 on the GPU, every
decoding mode of tests/test_bf16.py (chains, trees, lookup, scheduler) and padded batches against `generate`, exact
verification on and off. Run from the repository root: python benchmarks/cuda_bf16/smoke.py [DEVICE] (default cuda)."""

import sys
import time

sys.path.insert(0, ".")
from kangaroo_infer import KangarooModel  # noqa: E402
from kangaroo_infer.bench import left_padded  # noqa: E402
from tests.conftest import identity_adapter  # noqa: E402
from tests.test_bf16 import GREEDY_MODES, bf16_model, greedy_prompts, vanilla  # noqa: E402

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
for arch in ("llama", "qwen2", "mistral"):
    model = bf16_model(arch, seed=4, initializer_range=0.02).to(dev)  # as the test: logits close together
    prompts = [ids.to(dev) for ids in greedy_prompts()]
    refs = [vanilla(model, ids, 60)[0].tolist() for ids in prompts]
    for exact in (True, False):
        km = KangarooModel.from_pretrained(model, exit_layer=2, exact_verify=exact)
        identity_adapter(km)
        for kw in GREEDY_MODES:
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
        rows = [prompts[0][:, :150], prompts[1][:, :200], prompts[0][:, 20:120]]
        ids, mask = left_padded(rows, 0)
        for kw in (dict(), dict(tree=True, threshold=0.0, policy="fixed")):
            out = km.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=None, **kw)
            same = 0
            for i, r in enumerate(rows):
                ref = vanilla(model, r, 40)[0, r.shape[1] :].tolist()
                same += out.sequences[i, ids.shape[1] :].tolist() == ref
            print(f"{arch} exact={exact} batch {kw}: rows identical to own generate {same}/{len(rows)}", flush=True)
