"""The Lightning side of training: the loss, the LightningModule (only the adapter trains) and the DataModule.

Loss alignment (the part the seed trainer got wrong). For a sequence x_0 .. x_{T-1}:
- the full model's distribution at position t, p_t = softmax(head(final_t)), predicts token t+1;
- the adapter's distribution at position t, q_t = softmax(head(adapter(exit_0 .. exit_t))_t), predicts token t+1
  from the same prefix (causal attention: position t never sees exit states after t);
- ``loss_mask[t] = 1`` means token t is an assistant token. Position t is trained when the token it predicts, t+1,
  is an assistant token: weight_t = loss_mask[t+1], and the last position (which predicts nothing) gets weight 0.
The loss is the soft-label cross-entropy -Σ_v p_t(v) log q_t(v), averaged over the weighted positions of the batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from kangaroo_infer.adapter import KangarooAdapter

SCHEDULES = ("cosine", "linear", "constant")
TEACHER_BLOCK = 8192  # vocabulary rows per block in teacher_targets (a cache-friendly size, not a setting)


# ---- loss ------------------------------------------------------------------------------------------------------


def position_weights(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] loss mask of tokens -> [B, T] weights of positions: weight_t = loss_mask[t+1], last position 0."""
    weights = torch.zeros_like(loss_mask, dtype=torch.bool)
    weights[:, :-1] = loss_mask[:, 1:].bool()
    return weights


def kangaroo_loss(
    draft_hidden: torch.Tensor,  # [B, T, H] adapter output (normed), position t has seen exit states 0..t
    target_hidden: torch.Tensor,  # [B, T, H] the full model's hidden states after its final norm
    loss_mask: torch.Tensor,  # [B, T] 1 = assistant token
    head: nn.Module,  # frozen LM head: H -> V
    temperature: float = 1.0,
    vocab: torch.Tensor | None = None,  # [V'] the adapter's draft vocabulary (None: all V tokens)
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,  # [B, T] each: teacher_targets' lse and top, cached
) -> dict[str, torch.Tensor]:
    """Soft-label cross-entropy of the adapter against the full model, plus agreement metrics (module docstring).

    The head runs only on the weighted positions, which keeps the [N, V] logits small. With a draft vocabulary the
    adapter's distribution q is a softmax over those V' tokens only, as when it drafts: the loss is
    -Σ_{v in V'} p(v) log q(v) (the target's mass outside V' is out of the draft's reach), and the draft's head costs
    V'/V of the full one (the target's p still spans all V tokens). Returns ``loss`` (mean over weighted positions,
    differentiable), ``top1`` (the draft's argmax equals the full model's), ``accept`` (Σ_v min(p, q), the expected
    acceptance of a drafted token under speculative sampling) and ``count`` (N). Metrics use temperature 1.
    ``teacher`` (from the feature cache) spares the full-vocabulary head at temperature 1: only the V' logits the
    loss reads are computed.
    """
    select = position_weights(loss_mask)  # [B, T]
    weight, bias = head.weight, getattr(head, "bias", None)  # [V, H], [V] or None
    if vocab is not None:
        weight, bias = weight[vocab], (bias[vocab] if bias is not None else None)  # [V', H]
    draft_logits = F.linear(draft_hidden[select].to(weight.dtype), weight, bias).float()  # [N, V']
    count = select.sum()
    denom = count.clamp(min=1).float()
    with torch.no_grad():
        hidden = target_hidden[select].to(head.weight.dtype)  # [N, H]
        if teacher is not None and temperature == 1.0:
            reach = F.linear(hidden, weight, bias).float()  # [N, V']
            target_top = teacher[1][select]  # [N]
            p_t = p = torch.exp(reach - teacher[0][select].unsqueeze(-1))  # normalised over all V: [N, V']
        else:  # the log-normaliser at temperature t needs every logit
            target_logits = head(hidden).float()  # [N, V]
            target_top = target_logits.argmax(-1)  # [N]
            reach = target_logits if vocab is None else target_logits[:, vocab]  # [N, V']

            def probs(t: float) -> torch.Tensor:  # p over the draftable tokens, normalised over all V: [N, V']
                return torch.exp(reach / t - torch.logsumexp(target_logits / t, dim=-1, keepdim=True))

            p_t = probs(temperature)
            p = p_t if temperature == 1.0 else probs(1.0)
    log_q_t = F.log_softmax(draft_logits / temperature, dim=-1)  # [N, V']
    loss = -(p_t * log_q_t).sum(-1).sum() / denom
    with torch.no_grad():
        q = log_q_t.exp() if temperature == 1.0 else F.softmax(draft_logits, dim=-1)
        draft_top = draft_logits.argmax(-1) if vocab is None else vocab[draft_logits.argmax(-1)]  # [N] token ids
        top1 = (draft_top == target_top).float().sum() / denom
        accept = torch.minimum(p, q).sum(-1).sum() / denom
    return {"loss": loss, "top1": top1, "accept": accept, "count": count}


@torch.no_grad()
def teacher_targets(
    head: nn.Module,  # frozen LM head: H -> V
    target_hidden: torch.Tensor,  # [N, H] the full model's hidden states after its final norm
) -> tuple[torch.Tensor, torch.Tensor]:  # lse [N] float32, top [N] long
    """The only part of ``kangaroo_loss`` that reads all V logits: their log-sum-exp (temperature 1) and argmax.
    The feature cache computes it once per position, so the epochs skip the full head (on SmolLM2 with a 16k draft
    vocabulary that head was ~60% of the loss's time on a 2-core CPU). The vocabulary is read in blocks of
    ``TEACHER_BLOCK`` rows: the [N, V] fp32 logits never exist at once (SmolLM2, 300 positions: 138 -> 93 ms)."""
    hidden = target_hidden.to(head.weight.dtype)  # [N, H]
    bias = getattr(head, "bias", None)
    lse, best, top = None, None, None  # [N] each: running log-sum-exp, max logit and its token
    for start in range(0, head.weight.shape[0], TEACHER_BLOCK):
        rows = slice(start, start + TEACHER_BLOCK)
        logits = F.linear(hidden, head.weight[rows], None if bias is None else bias[rows]).float()  # [N, block]
        block_lse, (block_best, block_top) = torch.logsumexp(logits, dim=-1), logits.max(-1)
        if lse is None:
            lse, best, top = block_lse, block_best, block_top
        else:
            lse = torch.logaddexp(lse, block_lse)
            better = block_best > best  # ties keep the earlier token, as argmax does
            best, top = torch.where(better, block_best, best), torch.where(better, block_top + start, top)
    return lse, top


# ---- learning-rate schedule -----------------------------------------------------------------------------------


def lr_multiplier(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Factor on the peak LR after ``step`` optimizer steps: linear warmup, then cosine/linear decay/constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"Unknown LR schedule {schedule!r}; choose one of {list(SCHEDULES)} (optim.schedule).")
    return min_ratio + (1.0 - min_ratio) * shape


# ---- LightningModule ------------------------------------------------------------------------------------------


@dataclass
class FrozenParts:
    """Frozen base-model pieces, held outside the module tree on purpose.

    Kept out of ``nn.Module`` registration so they are never in ``state_dict`` (checkpoints hold the adapter only),
    never wrapped by DDP/DeepSpeed (no gradient buckets, no ZeRO partitioning, no dtype casting) and never optimised.
    ``base`` is set only when features are computed online (no cache); the cache path needs just the LM head.
    """

    lm_head: nn.Module
    base: nn.Module | None = None

    def to(self, device: torch.device) -> None:
        self.lm_head.to(device)
        if self.base is not None:
            self.base.to(device)


class KangarooModule(L.LightningModule):
    """Trains a KangarooAdapter to match the full model's next-token distribution (see the module docstring)."""

    def __init__(
        self,
        adapter: KangarooAdapter,
        frozen: FrozenParts,
        *,
        optim: Mapping[str, Any],
        temperature: float,
        draft_vocab_loss: bool,
        base_config: Mapping[str, Any],
        generation: Mapping[str, Any] | None,
        compute_features: Callable | None = None,
        batch: Mapping[str, int] | None = None,
    ):
        super().__init__()
        self.adapter = adapter
        self.frozen = frozen
        self.compute_features = compute_features  # online mode: (base, ids, mask, ℓ) -> (exit, final)
        for module in (frozen.lm_head, frozen.base):
            if module is not None:
                module.requires_grad_(False).eval()
        # Everything export needs to rebuild the adapter without the training config.
        self.save_hyperparameters(
            {
                "adapter_config": plain_containers(asdict(adapter.config)),
                "base_config": plain_containers(base_config),
                "generation": plain_containers(generation) if generation is not None else None,
                "optim": plain_containers(optim),
                "temperature": float(temperature),
                "draft_vocab_loss": bool(draft_vocab_loss),
                "batch": plain_containers(batch) if batch is not None else None,  # the step layout resuming needs
            }
        )
        self._last_step_time: float | None = None
        self._val_sums: torch.Tensor | None = None

    def on_fit_start(self) -> None:
        self.frozen.to(self.device)

    def _features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "exit_states" in batch:  # from the feature cache
            return batch["exit_states"], batch["final_states"]
        if self.frozen.base is None or self.compute_features is None:
            raise ValueError("Batch has no cached features and no base model was given to compute them online.")
        with torch.no_grad():
            return self.compute_features(
                self.frozen.base, batch["input_ids"], batch["attention_mask"], self.adapter.config.exit_layer
            )

    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        exit_states, final_states = self._features(batch)  # [B, T, H] each
        param = next(self.adapter.parameters())
        # Right-padded batches: causal attention alone keeps real positions from seeing padding.
        draft = self.adapter(exit_states.to(param.dtype))  # [B, T, H]
        # the tokens it drafts from (None: all V)
        vocab = getattr(self.adapter, "draft_vocab", None) if self.hparams.draft_vocab_loss else None
        teacher = (batch["target_lse"], batch["target_top"]) if "target_lse" in batch else None  # cached
        return kangaroo_loss(
            draft, final_states, batch["loss_mask"], self.frozen.lm_head, self.hparams.temperature, vocab, teacher
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        # Every process decides together (one tiny all-reduce), so no rank waits forever on one that stopped.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(out["loss"])), all=True):
            raise ValueError(
                f"The training loss became NaN/inf at step {self.global_step} (before any update from it: the "
                f"checkpoints in paths.ckpt_dir hold only finite weights). Likely causes: damaged input features "
                f"(delete cache.dir and rerun stage=cache), a learning rate too high (lower optim.lr), or fp16 "
                f"overflow (use trainer.precision=bf16-mixed or 32)."
            )
        log = {"train/loss": out["loss"], "train/top1": out["top1"], "train/accept": out["accept"]}
        self.log_dict(log, prog_bar=True, on_step=True, batch_size=max(1, int(out["count"])))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True, prog_bar=True)
        now = time.perf_counter()
        if self._last_step_time is not None:  # this micro-batch's tokens over the time since the previous one
            per_process = float(batch["attention_mask"].sum()) / max(now - self._last_step_time, 1e-9)
            # the whole job's rate: every process reads different sequences at about the same pace
            self.log("train/tokens_per_s", per_process * self.trainer.world_size, on_step=True, prog_bar=True)
        self._last_step_time = now
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._step(batch)
        n = out["count"].double()
        self._val_sums += torch.stack([out["loss"].double() * n, out["top1"].double() * n, out["accept"] * n, n])

    def on_validation_epoch_end(self) -> None:
        # token-weighted means over every process's share of the held-out split
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        n = sums[3].clamp(min=1)
        for i, name in enumerate(("loss", "top1", "accept")):
            self.log(f"val/{name}", (sums[i] / n).float(), prog_bar=name != "loss", sync_dist=True)
        self._last_step_time = None  # do not count validation time against training throughput

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.hparams.optim
        decay = [p for p in self.adapter.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.adapter.parameters() if p.requires_grad and p.dim() < 2]  # norms, biases
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim["lr"],
            betas=tuple(optim["betas"]),
            eps=optim["eps"],
        )
        total = int(self.trainer.estimated_stepping_batches)  # optimizer steps: accumulation and devices included
        warmup = int(optim["warmup_steps"]) if optim["warmup_steps"] is not None else 0
        if optim.get("warmup_ratio"):
            warmup = int(round(optim["warmup_ratio"] * total))
        schedule, min_ratio = optim["schedule"], float(optim["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(step, warmup=warmup, total=total, schedule=schedule, min_ratio=min_ratio),
        )
        # interval "step": Lightning steps it once per optimizer step, i.e. after each accumulation window
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def plain_containers(value: Any) -> Any:
    """Plain Python containers (no tuples), so checkpoints load with torch.load(weights_only=True)."""
    if isinstance(value, Mapping):
        return {str(k): plain_containers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_containers(v) for v in value]
    return value


# ---- data -----------------------------------------------------------------------------------------------------


class StepAlignedSampler(Sampler[int]):
    """This process's share of a dataset, cut to whole optimizer steps.

    Each epoch (reshuffled with ``seed + epoch`` when ``shuffle``) keeps a multiple of
    ``world_size * batch_size * accumulate`` samples, so every optimizer step sees exactly that many sequences on
    every strategy (DeepSpeed does not step on a partial accumulation window at an epoch's end; DDP would), and the
    step count Lightning estimates for the LR schedule is exact. ``skip(epoch)`` gives how many of this process's
    samples of that epoch were already trained on: after a mid-epoch resume the epoch continues where it stopped.
    """

    def __init__(
        self,
        size: int,
        *,
        rank: int,
        world_size: int,
        multiple: int,
        shuffle: bool,
        seed: int,
        skip: Callable[[int], int] | None = None,
    ):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.multiple, self.shuffle, self.seed, self.skip = multiple, shuffle, seed, skip
        self.epoch = 0
        self.kept = (size // (world_size * multiple)) * world_size * multiple

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        mine = order[: self.kept][self.rank :: self.world_size].tolist()
        return iter(mine[self.skip(self.epoch) if self.skip is not None else 0 :])

    def __len__(self) -> int:  # the whole epoch: Lightning plans epochs and the LR schedule with it
        return self.kept // self.world_size


class KangarooDataModule(L.LightningDataModule):
    """Serves cached features (or token batches for online features) with step-aligned sharding per process.
    ``held_out`` is the tokenized held-out split itself (what on-policy validation takes its prompts from)."""

    def __init__(
        self,
        train_set: Dataset,
        val_set: Dataset,
        collate: Callable,
        *,
        batch_size: int,
        accumulate_grad_batches: int,
        num_workers: int,
        seed: int,
        held_out: Dataset | None = None,
    ):
        super().__init__()
        self.train_set, self.val_set, self.collate, self.held_out = train_set, val_set, collate, held_out
        self.batch_size, self.accumulate = batch_size, accumulate_grad_batches
        self.num_workers, self.seed = num_workers, seed
        self.steps_per_epoch = 0  # set with the training loader

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        # training: whole optimizer steps on every process; validation: the same number of sequences per process
        multiple = self.batch_size * self.accumulate if train else 1
        sampler = StepAlignedSampler(
            len(dataset),
            rank=rank,
            world_size=world,
            multiple=multiple,
            shuffle=train,
            seed=self.seed,
            skip=self._samples_done if train else None,
        )
        if len(sampler) == 0:
            if train:
                need = f"{world} processes x batch size {self.batch_size} x accumulation {self.accumulate}"
                fix = "lower data.batch_size / trainer.accumulate_grad_batches"
            else:
                need = f"one per process, {world} processes"
                fix = "raise data.val_fraction"
            raise ValueError(
                f"The {'training' if train else 'held-out'} split has {len(dataset)} sequences, fewer than one "
                f"{'optimizer step' if train else 'round'} needs ({need} = {world * multiple}). Use more data "
                f"(data.num_conversations) or {fix}."
            )
        if train:
            self.steps_per_epoch = len(sampler) // multiple
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=False,  # the sampler already yields whole batches
        )

    def _samples_done(self, epoch: int) -> int:
        """This process's samples of ``epoch`` already trained on: 0, except in the epoch a resumed run restarts in.

        Every epoch holds exactly ``steps_per_epoch`` optimizer steps, so the global step restored from the
        checkpoint says where in the epoch the run stopped (Lightning alone would replay the epoch from its start).
        """
        per_step = self.batch_size * self.accumulate  # samples per optimizer step on this process
        done = self.trainer.global_step - epoch * self.steps_per_epoch
        return min(max(done, 0), self.steps_per_epoch) * per_step

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
