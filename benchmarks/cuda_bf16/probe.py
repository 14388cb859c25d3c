"""Batch invariance on a GPU (#24): for SmolLM2-135M's bf16 linear shapes, how many rows of an M-row product differ
from the 1-row product (20 random trials per M); and sdpa with grouped-query attention: a 4-row masked pass against
four 1-row passes over their own keys. Run: python benchmarks/cuda_bf16/probe.py [DEVICE] (default cuda)."""

import sys

import torch

torch.manual_seed(0)
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
SHAPES = {"lm_head": (49152, 576), "q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536)}
for name, (out_f, in_f) in SHAPES.items():
    w = (torch.randn(out_f, in_f, device=dev) / in_f**0.5).bfloat16()
    bad = {}
    for m in (2, 3, 4, 5, 8, 16):
        bad[m] = 0
        for _ in range(20):
            x = torch.randn(m, in_f, device=dev).bfloat16()
            y = torch.nn.functional.linear(x, w)
            bad[m] += sum(not torch.equal(y[r : r + 1], torch.nn.functional.linear(x[r : r + 1], w)) for r in range(m))
            # the decode step's call is [1, 1, K]
    print(
        f"linear bf16 {name:8} {in_f}->{out_f}: rows differing of 20*M, M=2/3/4/5/8/16: "
        + " / ".join(str(bad[m]) for m in bad),
        flush=True,
    )
sdpa = torch.nn.functional.scaled_dot_product_attention
for ctx in (37, 300, 900):
    q = torch.randn(1, 4, 9, 64, device=dev).bfloat16().transpose(1, 2)  # [1, Hq, 4, d]
    k = torch.randn(1, 3, ctx + 4, 64, device=dev).bfloat16()
    v = torch.randn(1, 3, ctx + 4, 64, device=dev).bfloat16()
    mask = torch.ones(4, ctx + 4, dtype=torch.bool, device=dev).tril(ctx)
    multi = sdpa(q, k, v, attn_mask=mask[None, None], enable_gqa=True)
    diff = 0
    for r in range(4):
        one = sdpa(q[:, :, r : r + 1], k[:, :, : ctx + r + 1], v[:, :, : ctx + r + 1], enable_gqa=True)
        diff += not torch.equal(one, multi[:, :, r : r + 1])
    print(f"sdpa GQA ctx {ctx}: rows of a 4-row masked pass differing from their 1-row pass: {diff}/4", flush=True)
