"""On-policy validation: the adapter scored on the base model's own greedy answers while it trains.

The held-out loss and top-1 (``val/loss``, ``val/top1``) score the adapter on ShareGPT replies, text the base did not
write; decoding checks every draft against the base's own greedy choice. ``OnPolicyEval`` (``callbacks.onpolicy``)
logs what decoding sees: at every ``every``-th validation, rank 0 scores the adapter teacher-forced on the base's
greedy answers to a fixed set of held-out prompts (``kangaroo_infer.evaluate``) and logs

- ``val/onpolicy_top1``: the draft's argmax equals the base's next token,
- ``val/onpolicy_accept``: Σ_v min(p, q), the chance that speculative sampling accepts a draft,
- ``val/onpolicy_tau``: 1 + Σ_{d<=depth} agreement of d chained drafts (an estimate of τ at γ = depth).

Prompts: the first user turn of the first ``num_prompts`` held-out conversations (their tokens before the
first assistant token: the chat template's system prompt, the user turn and the assistant header), so they were
never trained on. The greedy answers (``max_new_tokens`` tokens at most) are generated once and cached in
``cache_dir``, keyed by the base (name, fingerprint, dtype), the prompts and max_new_tokens.

Memory: scoring needs the whole base. With ``cache=none`` the base that computes the features is reused; with a
feature cache only the LM head is loaded for training, so rank 0 loads the base itself (a 7B base in bf16 adds ~14 GB
on that GPU; ``keep_base=false`` frees it after each evaluation at the cost of reloading it; ``callbacks.onpolicy=null``
turns the evaluation off). ZeRO-3 partitions the adapter's weights across ranks, so it is refused there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch

from kangaroo_infer.arch import Backbone
from kangaroo_infer.base import load_base
from kangaroo_infer.evaluate import EvalAnswer, greedy_answers, score_answers
from kangaroo_infer.files import write_file

from .checks import require_positive_int
from .shards import read_json_object, sha256_json

log = logging.getLogger("kangaroo_train")

METRICS = ("val/onpolicy_top1", "val/onpolicy_accept", "val/onpolicy_tau")


def held_out_prompts(val_set, num_prompts: int) -> list[list[int]]:
    """The tokens before the first assistant token of the first ``num_prompts`` held-out sequences."""
    prompts = []
    for row in val_set.select_columns(["input_ids", "loss_mask"]):
        if len(prompts) == num_prompts:
            break
        first = row["loss_mask"].index(1) if 1 in row["loss_mask"] else 0
        if first > 0:
            prompts.append(list(row["input_ids"][:first]))
    return prompts


class AnswerCache:
    """The base's greedy answers to a list of prompts, on disk: one file per identity (base, prompts, settings),
    named by its key (``shards.sha256_json``) and holding the identity, so a file for anything else is refused."""

    OWNER = "on-policy evaluation"  # the writer named in the directory's written list

    def __init__(self, directory: str | Path, base_name: str, fingerprint: dict, dtype: str, max_new_tokens: int):
        self.directory = Path(directory)
        self.identity = {
            "base": base_name,
            "fingerprint": fingerprint,
            "dtype": dtype,
            "max_new_tokens": max_new_tokens,
        }

    def path(self, prompts: list[list[int]]) -> Path:
        return self.directory / f"answers-{sha256_json({**self.identity, 'prompts': prompts})[:16]}.json"

    def load(self, prompts: list[list[int]]) -> list[list[int]] | None:
        path = self.path(prompts)
        saved = read_json_object(path, "On-policy answer cache", "delete it and it is generated again.")
        if saved is None:
            return None
        if saved.get("identity") != self.identity or saved.get("prompts") != prompts:
            raise ValueError(f"{path} holds answers for other prompts or another base; delete it.")
        return saved["answers"]

    def save(self, prompts: list[list[int]], answers: list[list[int]]) -> Path:
        value = {"identity": self.identity, "prompts": prompts, "answers": answers}
        return write_file(self.path(prompts), json.dumps(value) + "\n", self.OWNER)  # atomic


class OnPolicyEval(L.Callback):
    """Logs the adapter's agreement with the base's own greedy answers at validation (module docstring). The base
    (from the adapter's config) and the held-out prompts (from ``KangarooDataModule.held_out``) are taken from the
    run in ``setup``."""

    def __init__(
        self,
        *,
        num_prompts: int,
        max_new_tokens: int,
        dtype: str,
        cache_dir: str | Path,
        every: int = 1,
        depth: int = 4,
        keep_base: bool = True,
    ):
        counts = {"num_prompts": num_prompts, "max_new_tokens": max_new_tokens, "every": every, "depth": depth}
        for key, value in counts.items():
            require_positive_int(f"callbacks.onpolicy.{key}", value, hint=" (turn it off: callbacks.onpolicy=null)")
        self.num_prompts, self.cache_dir = num_prompts, cache_dir
        self.max_new_tokens, self.dtype, self.every, self.depth, self.keep_base = (
            max_new_tokens, dtype, every, depth, keep_base,
        )  # fmt: skip
        self.base_name: str | None = None
        self.prompts: list[list[int]] = []
        self.cache: AnswerCache | None = None
        self.answers: list[list[int]] | None = None
        self._base: torch.nn.Module | None = None
        self._validations = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
            raise ValueError(
                "On-policy validation runs the whole adapter on rank 0, but ZeRO-3 partitions its weights across "
                "ranks; use callbacks.onpolicy=null with strategy=deepspeed_zero3."
            )
        held_out = getattr(trainer.datamodule, "held_out", None)
        if held_out is None:
            raise ValueError("On-policy validation needs the tokenized held-out split (KangarooDataModule.held_out).")
        self.prompts = held_out_prompts(held_out, self.num_prompts)
        if not self.prompts:
            raise ValueError(
                "The held-out split has no sequence with a prompt before its first reply; use callbacks.onpolicy=null."
            )
        if len(self.prompts) < self.num_prompts:
            log.warning(
                "onpolicy: the held-out split has only %d prompts (num_prompts=%d)", len(self.prompts), self.num_prompts
            )
        self.base_name = pl_module.adapter.config.base_model
        fingerprint = pl_module.adapter.config.base_fingerprint
        self.cache = AnswerCache(self.cache_dir, self.base_name, fingerprint, self.dtype, self.max_new_tokens)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        values = self.evaluate(pl_module) if trainer.is_global_zero else None
        values = trainer.strategy.broadcast(values, src=0)  # every rank logs the same numbers
        for name, value in zip(METRICS, values, strict=True):
            pl_module.log(name, value, prog_bar=name == "val/onpolicy_top1", sync_dist=True)  # equal on all ranks

    def _base_model(self, pl_module: L.LightningModule) -> torch.nn.Module:
        frozen = getattr(pl_module, "frozen", None)
        if frozen is not None and frozen.base is not None:  # cache=none: the feature base is the whole base
            return frozen.base
        if self._base is None:
            with torch.inference_mode(False):  # ordinary weights, although validation runs in inference mode
                self._base = load_base(self.base_name, dtype=self.dtype, device=pl_module.device)
        return self._base

    def evaluate(self, pl_module: L.LightningModule) -> list[float]:
        base = self._base_model(pl_module)
        if self.answers is None:
            self.answers = self.cache.load(self.prompts)
            if self.answers is None:
                log.info("onpolicy: generating the base's greedy answers to %d held-out prompts", len(self.prompts))
                self.answers = greedy_answers(base, self.prompts, self.max_new_tokens)
                where = self.cache.save(self.prompts, self.answers)
                log.info("onpolicy: greedy answers cached in %s", where)
            else:
                log.info("onpolicy: reusing the cached greedy answers in %s", self.cache.path(self.prompts))
        adapter = pl_module.adapter
        answers = [EvalAnswer(p, a) for p, a in zip(self.prompts, self.answers, strict=True)]
        result = score_answers(Backbone.of(base), adapter, answers, depth=self.depth)["overall"]
        if not self.keep_base:
            self._base = None
        return [float(result["top1"]), float(result["accept"]), float(result["tau_estimate"])]
