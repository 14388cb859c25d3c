"""The loss alignment against a hand-computed example, the LR schedule and the step-aligned sampler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kangaroo_train import module
from kangaroo_train.module import StepAlignedSampler, kangaroo_loss, lr_multiplier, position_weights, teacher_targets


def identity_head(vocab: int) -> nn.Linear:
    """hidden == logits, so the example can be computed by hand."""
    head = nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return head


def test_position_weights_shift_the_mask_by_one():
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]])
    # position t predicts token t+1: weight_t = loss_mask[t+1], the last position predicts nothing
    expected = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(position_weights(loss_mask), expected)


def test_loss_matches_a_hand_computed_example():
    # One sequence of 4 tokens: tokens 2 and 3 are the assistant's, so positions 1 and 2 are trained.
    loss_mask = torch.tensor([[0, 0, 1, 1]])
    target = torch.tensor([[[9.0, 9.0], [math.log(3.0), 0.0], [0.0, 0.0], [5.0, -5.0]]])  # p at positions 1, 2
    draft = torch.tensor([[[-9.0, 9.0], [0.0, 0.0], [0.0, math.log(3.0)], [-5.0, 5.0]]])  # q at positions 1, 2
    out = kangaroo_loss(draft, target, loss_mask, identity_head(2))
    # position 1: p = (3/4, 1/4), q = (1/2, 1/2) -> CE = log 2, argmax 0 vs tie -> argmax 0 (first), min-sum 3/4
    # position 2: p = (1/2, 1/2), q = (1/4, 3/4) -> CE = -(1/2 log 1/4 + 1/2 log 3/4), argmax 0 vs 1, min-sum 3/4
    ce1 = math.log(2.0)
    ce2 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert out["count"].item() == 2
    assert out["loss"].item() == pytest.approx((ce1 + ce2) / 2, abs=1e-6)
    assert out["top1"].item() == pytest.approx(0.5)
    assert out["accept"].item() == pytest.approx(0.75, abs=1e-6)


def test_loss_ignores_unweighted_positions_and_padding():
    loss_mask = torch.tensor([[0, 1, 0, 0]])  # only position 0 (predicting token 1) counts
    target = torch.randn(1, 4, 5)
    draft = torch.randn(1, 4, 5)
    changed = draft.clone()
    changed[:, 1:] = torch.randn(1, 3, 5) * 10  # anything after position 0 must not matter
    head = identity_head(5)
    assert kangaroo_loss(draft, target, loss_mask, head)["loss"].item() == pytest.approx(
        kangaroo_loss(changed, target, loss_mask, head)["loss"].item()
    )


def test_loss_with_no_trained_position_is_zero_and_differentiable():
    draft = torch.randn(1, 3, 4, requires_grad=True)
    out = kangaroo_loss(draft, torch.randn(1, 3, 4), torch.tensor([[1, 0, 0]]), identity_head(4))
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and draft.grad is not None


def test_temperature_softens_both_distributions():
    loss_mask = torch.tensor([[0, 1]])
    draft, target = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[0.0, 2.0], [0.0, 0.0]]])
    t = 2.0
    p = torch.softmax(torch.tensor([0.0, 2.0]) / t, -1)
    log_q = torch.log_softmax(torch.tensor([2.0, 0.0]) / t, -1)
    expected = -(p * log_q).sum().item()
    assert kangaroo_loss(draft, target, loss_mask, identity_head(2), t)["loss"].item() == pytest.approx(expected)


def test_draft_vocabulary_loss_and_metrics_match_a_hand_computed_example():
    """With a draft vocabulary q is a softmax over those tokens only (as when drafting); p keeps all tokens."""
    loss_mask, vocab = torch.tensor([[0, 1, 1]]), torch.tensor([2, 0])  # positions 0 and 1 trained; drafts from {2, 0}
    target = torch.tensor([[[0.0, math.log(2.0), 0.0], [math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]])
    draft = torch.tensor([[[0.0, 9.0, math.log(3.0)], [0.0, 9.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    out = kangaroo_loss(draft, target, loss_mask, identity_head(3), vocab=vocab)
    # position 0: p = (1/4, 1/2, 1/4) over tokens 0, 1, 2; q over (2, 0) = (3/4, 1/4): token 1 (logit 9) is out
    #   of reach. CE = -(1/4 log 3/4 + 1/4 log 1/4); the draft's top is token 2, p's is 1; min-sum 1/4 + 1/4
    # position 1: p = (1/2, 1/4, 1/4); q over (2, 0) = (1/2, 1/2); CE = -(1/4 log 1/2 + 1/2 log 1/2); top: tie ->
    #   first in vocab order, token 2, p's is 0; min-sum 1/4 + 1/2
    ce0 = -(0.25 * math.log(0.75) + 0.25 * math.log(0.25))
    ce1 = -(0.25 * math.log(0.5) + 0.5 * math.log(0.5))
    assert out["loss"].item() == pytest.approx((ce0 + ce1) / 2, abs=1e-6)
    assert out["top1"].item() == 0.0
    assert out["accept"].item() == pytest.approx((0.5 + 0.75) / 2, abs=1e-6)
    out["loss"].backward()
    assert torch.all(draft.grad[..., 1] == 0)  # a token outside the draft vocabulary gets no gradient
    vocab = torch.tensor([1, 0])  # now p's top is draftable at both positions, and drafted at position 0
    assert kangaroo_loss(draft, target, loss_mask, identity_head(3), vocab=vocab)["top1"].item() == 0.5
    with torch.no_grad():  # the full vocabulary is the vocab=None case
        full = kangaroo_loss(draft, target, loss_mask, identity_head(3))
        every = kangaroo_loss(draft, target, loss_mask, identity_head(3), vocab=torch.arange(3))
    assert all(torch.allclose(full[k].float(), every[k].float()) for k in ("loss", "top1", "accept", "count"))


def test_cached_teacher_targets_give_the_same_loss_and_metrics():
    """The feature cache's lse/top spare the full-vocabulary head; the loss, its gradient and metrics stay put."""
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=True)
    loss_mask = torch.tensor([[0, 1, 1, 1, 0, 1], [1, 1, 0, 1, 1, 0]])
    target, vocab = torch.randn(2, 6, 8), torch.tensor([3, 7, 11, 20, 21, 40, 49])
    select = position_weights(loss_mask)
    lse, top = torch.zeros(2, 6), torch.full((2, 6), -1)
    lse[select], top[select] = teacher_targets(head, target[select])
    assert torch.equal(top[select], head(target[select]).argmax(-1))
    for v in (None, vocab):
        draft = torch.randn(2, 6, 8, requires_grad=True)
        full = kangaroo_loss(draft, target, loss_mask, head, vocab=v)
        cached = kangaroo_loss(draft, target, loss_mask, head, vocab=v, teacher=(lse, top))
        for key in ("loss", "top1", "accept", "count"):
            torch.testing.assert_close(cached[key], full[key])
        (grad_full,) = torch.autograd.grad(full["loss"], draft)
        (grad_cached,) = torch.autograd.grad(cached["loss"], draft)
        torch.testing.assert_close(grad_cached, grad_full)
    # at another temperature the cached log-normaliser (temperature 1) does not apply: every logit is read again
    hot = kangaroo_loss(draft, target, loss_mask, head, 2.0, vocab, teacher=(torch.zeros(2, 6), top))
    torch.testing.assert_close(hot["loss"], kangaroo_loss(draft, target, loss_mask, head, 2.0, vocab)["loss"])


def test_teacher_targets_read_the_vocabulary_in_blocks(monkeypatch):
    """Blockwise log-sum-exp and argmax equal the whole-vocabulary ones; a tie across blocks keeps the first token."""
    monkeypatch.setattr(module, "TEACHER_BLOCK", 16)  # 50 tokens: four blocks, the last one short
    torch.manual_seed(0)
    head, hidden = nn.Linear(8, 50, bias=True), torch.randn(7, 8)
    lse, top = teacher_targets(head, hidden)
    logits = head(hidden)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    assert torch.equal(top, logits.argmax(-1))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[[5, 37]] = hidden[0]  # tokens 5 and 37 (blocks 0 and 2) share the highest logit
    assert teacher_targets(head, hidden[:1])[1].item() == 5


def test_lr_schedule_warmup_then_cosine_and_linear():
    kw = {"warmup": 4, "total": 14}
    assert [lr_multiplier(s, schedule="cosine", **kw) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_multiplier(4, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(14, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_multiplier(9, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_multiplier(14, schedule="linear", min_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_multiplier(100, schedule="constant", **kw) == 1.0
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_multiplier(5, schedule="step", **kw)


def test_sampler_keeps_whole_steps_and_disjoint_shards():
    shards = [StepAlignedSampler(23, rank=r, world_size=2, multiple=4, shuffle=True, seed=1) for r in range(2)]
    for shard in shards:
        shard.set_epoch(3)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 8 == len(shards[0])  # 23 -> 16 kept: 2 steps of 2 processes x 4 sequences
    assert not set(a) & set(b)
    shards[0].set_epoch(4)
    assert list(shards[0]) != a  # reshuffled each epoch
