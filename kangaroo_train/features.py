"""Features of the frozen base model for adapter training, computed online or cached on disk.

The adapter learns to map the hidden state entering exit layer ℓ to the base model's final hidden state (what its
LM head reads). The base is frozen, so both can be computed once: ``FeatureCache`` runs the base over a tokenized
dataset and stores the pairs in safetensors shards with a JSON manifest, and ``CachedFeatureDataset`` reads them
back lazily. The manifest records what the features depend on (base fingerprint, exit layer, dtype, data hash), so
a cache built for anything else is refused rather than silently reused.

Layout of a cache directory::

    manifest.json                  identity + shard list; "complete": true once every shard exists
    shard-00000.safetensors        samples [0, shard_size): "<j>.input_ids", "<j>.loss_mask", "<j>.exit_states",
    shard-00001.safetensors        "<j>.final_states", "<j>.target_lse", "<j>.target_top" for local index j, plus
                                   counts in the header metadata and "<j>.crc32", a checksum of sample j's data
                                   checked on every read

``target_lse`` / ``target_top`` [T] are the full model's log-normaliser and argmax over its whole vocabulary at
every trained position (``module.teacher_targets``; 0 / -1 elsewhere): computed once here, the epochs skip the
full-vocabulary LM head.
"""

from __future__ import annotations

import json
import math
import zlib
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kangaroo_infer.adapter import base_fingerprint, check_exit_layer
from kangaroo_infer.files import atomic_file

from .data import data_hash as compute_data_hash
from .module import position_weights, teacher_targets
from .shards import ShardedDirectory

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OWNER = "feature cache"  # the writer named in cache.dir's written list (kangaroo_infer.files.claim_directory)
CACHE_FORMAT = "kangaroo-feature-cache"
CACHE_FORMAT_VERSION = 3  # 2: a CRC-32 of every sample's data in its shard's header; 3: target_lse, target_top
FIELDS = ("input_ids", "loss_mask", "exit_states", "final_states", "target_lse", "target_top")


# ----------------------------------------------------------------------------------------------------------------
# Running the frozen base
# ----------------------------------------------------------------------------------------------------------------


def compute_features(
    base: PreTrainedModel,
    input_ids: torch.Tensor,  # [B, T]
    attention_mask: torch.Tensor | None,  # [B, T], 1 = real token, right padding only
    exit_layer: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # exit_states [B, T, H], final_states [B, T, H]
    """One no-grad pass of the base: the hidden state entering layer ``exit_layer`` (= output_hidden_states[ℓ])
    and the last hidden state after the final norm. The LM head is skipped: nothing here needs logits."""
    decoder = base.get_decoder()
    layers: nn.ModuleList = decoder.layers
    check_exit_layer(exit_layer, len(layers))
    device = base.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}."
        )
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise ValueError("attention_mask has left padding or holes; features need right-padded batches (1s, then 0s).")

    captured: dict[str, torch.Tensor] = {}

    def grab_layer_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["exit"] = args[0] if args else kwargs["hidden_states"]

    # A hook keeps only the one intermediate state instead of all L + 1 that output_hidden_states would hold.
    handle = layers[exit_layer].register_forward_pre_hook(grab_layer_input, with_kwargs=True)
    try:
        with torch.no_grad():
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return captured["exit"], out.last_hidden_state


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


def collate_tokens(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token samples: input_ids [B, T] (pad_id), loss_mask [B, T] (0 on padding), attention_mask [B, T]."""
    if not batch:
        raise ValueError("Cannot collate an empty batch.")
    ids = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in batch]
    masks = [torch.as_tensor(s["loss_mask"], dtype=torch.long) for s in batch]
    size, length = len(batch), max(x.shape[0] for x in ids)
    out = {
        "input_ids": torch.full((size, length), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros(size, length, dtype=torch.long),
        "attention_mask": torch.zeros(size, length, dtype=torch.long),
    }
    for row, (x, m) in enumerate(zip(ids, masks, strict=True)):
        if m.shape != x.shape:
            raise ValueError(f"Sample {row} of the batch has {x.shape[0]} input_ids but {m.shape[0]} loss_mask values.")
        out["input_ids"][row, : x.shape[0]] = x
        out["loss_mask"][row, : x.shape[0]] = m
        out["attention_mask"][row, : x.shape[0]] = 1
    return out


def collate_features(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad cached samples: the token fields of ``collate_tokens`` (pad id 0) plus exit_states and
    final_states [B, T, H] (zeros on padding, in the stored dtype) and target_lse / target_top [B, T] (0 / -1)."""
    out = collate_tokens(batch, pad_id=0)
    size, length = out["input_ids"].shape
    for name, fill in (("exit_states", 0), ("final_states", 0), ("target_lse", 0), ("target_top", -1)):
        first = batch[0][name]
        padded = torch.full((size, length, *first.shape[1:]), fill, dtype=first.dtype)  # [B, T, H] or [B, T]
        for row, sample in enumerate(batch):
            padded[row, : sample[name].shape[0]] = sample[name]
        out[name] = padded
    return out


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


class FeatureCache(ShardedDirectory):
    """A directory of feature shards for one (base model, exit layer, dtype, dataset) combination."""

    LABEL = "Feature cache"
    GROUP = "cache"
    OWNER = OWNER
    KEY_FIELD = "cache_key"  # in the manifest and in every shard's header metadata
    SUFFIX = ".safetensors"
    OTHER = "another cache (base, exit layer, dtypes or data)"
    ON_DISK = "cache"
    STALE = (
        "Feature cache {directory} is stale: its {fields} {differ} ({detail}). Delete the directory {directory} or "
        "point cache.dir elsewhere, then rerun the cache stage."
    )

    def __init__(
        self,
        directory: str | Path,
        *,
        fingerprint: dict,
        exit_layer: int,
        dtype: str = "bfloat16",
        data_hash: str,
        shard_size: int = 256,
        base_dtype: str = "float32",
    ) -> None:
        for name, value in (("dtype", dtype), ("base dtype", base_dtype)):
            if value not in STORAGE_DTYPES:
                raise ValueError(f"Feature cache {name} {value!r} is not supported; use one of {list(STORAGE_DTYPES)}.")
        identity: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "format_version": CACHE_FORMAT_VERSION,
            "base_fingerprint": json.loads(json.dumps(fingerprint)),  # as it reads back from JSON
            "exit_layer": exit_layer,
            "dtype": dtype,
            "base_dtype": base_dtype,  # the dtype the frozen base computes in: fp32 and bf16 features differ
            "data_hash": data_hash,
            "shard_size": shard_size,
        }
        super().__init__(directory, identity, shard_size)
        self.exit_layer = exit_layer
        self.dtype = dtype
        self.data_hash = data_hash

    def complete_files(self, manifest: dict[str, Any]) -> list[Path]:
        return [self.directory / shard["file"] for shard in manifest["shards"]]

    def shard_key(self, path: Path) -> str | None:
        try:
            with safe_open(str(path), framework="pt") as handle:
                return (handle.metadata() or {}).get(self.KEY_FIELD, "")
        except SafetensorError:
            return None  # truncated or corrupt: rebuild it

    def dataset(self) -> CachedFeatureDataset:
        """The cached samples, in dataset order."""
        self.check()
        manifest = self.read_manifest()
        if manifest is None or not self.is_complete():
            done = 0 if manifest is None else sum((self.directory / s["file"]).is_file() for s in manifest["shards"])
            total = "?" if manifest is None else len(manifest["shards"])
            raise ValueError(
                f"Feature cache {self.directory} is incomplete ({done} of {total} shards); run the cache stage "
                f"(FeatureCache.build on every rank) first."
            )
        return CachedFeatureDataset(self.directory, manifest["shards"], self.key)

    def build(
        self,
        base: PreTrainedModel,
        dataset: datasets.Dataset,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 4,
        progress: bool = True,
    ) -> None:
        """Write this rank's missing shards (shard i belongs to rank i % world_size); whichever rank finds all
        shards present afterwards writes the complete manifest, so no barrier is needed inside."""
        if len(dataset) == 0:
            raise ValueError("Cannot build a feature cache from an empty dataset.")
        if base_fingerprint(base.config) != self.identity["base_fingerprint"]:
            raise ValueError(
                "The base model passed to FeatureCache.build is not the one whose fingerprint the cache was created "
                "with; pass kangaroo_infer.base_fingerprint(base.config) of the same base."
            )
        if base.dtype != STORAGE_DTYPES[self.identity["base_dtype"]]:
            raise ValueError(
                f"The base passed to FeatureCache.build computes in {str(base.dtype).removeprefix('torch.')}, but the "
                f"cache is for features computed in {self.identity['base_dtype']}; load the base in that dtype "
                f"(model.dtype) or create the cache with base_dtype={str(base.dtype).removeprefix('torch.')!r}."
            )
        if compute_data_hash(dataset) != self.data_hash:
            raise ValueError(
                "The dataset passed to FeatureCache.build does not match the cache's data_hash; create the cache with "
                "data_hash(dataset) of the same dataset you build it from."
            )
        num_shards = math.ceil(len(dataset) / self.shard_size)
        todo = self.start(num_shards, rank, world_size, self._manifest(len(dataset), num_shards, counts=None))
        lengths = _sample_lengths(dataset)
        tokens = sum(sum(lengths[slice(*self.bounds(i, len(dataset)))]) for i in todo)
        mine = len(range(rank, num_shards, world_size))
        with tqdm(
            total=tokens,
            unit="tok",
            unit_scale=True,
            desc=f"Feature cache (rank {rank}, {len(todo)} of {mine} shards to build)",
            position=rank,
            disable=not progress,
        ) as bar:
            for index in todo:
                self._build_shard(base, dataset, index, batch_size, bar)

        counts = self._shard_counts(num_shards)
        if counts is not None:
            self.write_manifest(self._manifest(len(dataset), num_shards, counts))

    def _build_shard(
        self, base: PreTrainedModel, dataset: datasets.Dataset, index: int, batch_size: int, bar: tqdm
    ) -> None:
        lo, hi = self.bounds(index, len(dataset))
        rows = dataset.with_format(None)[lo:hi]  # plain lists, whatever format the caller set
        ids, masks = rows["input_ids"], rows["loss_mask"]
        storage = STORAGE_DTYPES[self.dtype]
        head = base.get_output_embeddings()
        order = sorted(range(len(ids)), key=lambda j: len(ids[j]))  # similar lengths per batch: less padding
        tensors: dict[str, torch.Tensor] = {}
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            batch = collate_tokens([{"input_ids": ids[j], "loss_mask": masks[j]} for j in group], pad_id=0)
            exit_states, final_states = compute_features(
                base, batch["input_ids"], batch["attention_mask"], self.exit_layer
            )
            for row, j in enumerate(group):
                length = len(ids[j])
                tensors[f"{j}.input_ids"] = torch.tensor(ids[j], dtype=torch.long)  # [T]
                tensors[f"{j}.loss_mask"] = torch.tensor(masks[j], dtype=torch.uint8)  # [T]
                # clone: safetensors refuses views that share storage with other tensors
                tensors[f"{j}.exit_states"] = exit_states[row, :length].to("cpu", storage).clone()  # [T, H]
                final = tensors[f"{j}.final_states"] = final_states[row, :length].to("cpu", storage).clone()  # [T, H]
                # from the stored states, which training reads: [T] each
                select = position_weights(batch["loss_mask"][row : row + 1, :length])[0]
                lse, top = teacher_targets(head, final[select].to(head.weight.device))
                tensors[f"{j}.target_lse"] = torch.zeros(length).masked_scatter_(select, lse.cpu())
                tensors[f"{j}.target_top"] = torch.full((length,), -1, dtype=torch.int32).masked_scatter_(
                    select, top.to("cpu", torch.int32)
                )
            bar.update(sum(len(ids[j]) for j in group))
        metadata = {f"{j}.crc32": str(sample_crc32({n: tensors[f"{j}.{n}"] for n in FIELDS})) for j in range(hi - lo)}
        metadata |= {
            self.KEY_FIELD: self.key,
            "first_sample": str(lo),
            "num_samples": str(hi - lo),
            "num_tokens": str(sum(len(x) for x in ids)),
            "num_loss_tokens": str(sum(sum(m) for m in masks)),
        }
        with atomic_file(self.shard_path(index)) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def _shard_counts(self, num_shards: int) -> list[dict[str, int]] | None:
        """Per-shard sample/token counts from the shard headers, or None while any shard is missing."""
        counts = []
        for index in range(num_shards):
            path = self.shard_path(index)
            if not path.is_file():
                return None
            try:
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata() or {}
            except SafetensorError as err:
                raise _corrupt_shard(path, err) from None
            counts.append({k: int(metadata[k]) for k in ("num_samples", "num_tokens", "num_loss_tokens")})
        return counts

    def _manifest(self, num_samples: int, num_shards: int, counts: list[dict[str, int]] | None) -> dict[str, Any]:
        shards = []
        for index in range(num_shards):
            lo, hi = self.bounds(index, num_samples)
            shard = {"file": self.shard_path(index).name, "num_samples": hi - lo}
            if counts is not None:
                shard.update(counts[index])
            shards.append(shard)
        totals = {}
        if counts is not None:
            totals = {name: sum(c[name] for c in counts) for name in ("num_tokens", "num_loss_tokens")}
        return self.manifest(num_samples=num_samples, complete=counts is not None, **totals, shards=shards)


def sample_crc32(sample: dict[str, torch.Tensor]) -> int:
    """CRC-32 over the bytes of a sample's tensors in FIELDS order: damaged data with an intact header (which
    safetensors cannot notice) is caught when the sample is read, before it can turn the loss into NaN."""
    crc = 0
    for name in FIELDS:
        crc = zlib.crc32(sample[name].contiguous().view(torch.uint8).numpy(), crc)
    return crc


def _sample_lengths(dataset: datasets.Dataset) -> list[int]:
    """Token count of every sample, read from the Arrow column without building Python lists of ids."""
    table = dataset.select_columns(["input_ids"]).with_format("arrow")[:]
    return pc.list_value_length(table["input_ids"]).to_pylist()


def _corrupt_shard(path: Path, err: Exception | str) -> ValueError:
    return ValueError(
        f"Feature cache shard {path} is corrupt or truncated ({err}). Delete that file and rerun the cache stage: "
        f"the missing shard is rebuilt and the others are kept."
    )


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Samples of a complete feature cache, read lazily with at most ``max_open`` shards open (memory-mapped)."""

    def __init__(self, directory: str | Path, shards: list[dict[str, Any]], cache_key: str, max_open: int = 2) -> None:
        self.directory = Path(directory)
        self.files = [shard["file"] for shard in shards]
        self.sizes = [int(shard["num_samples"]) for shard in shards]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]  # first global index of each shard
        self.cache_key = cache_key
        self.max_open = max_open
        self._open: OrderedDict[int, Any] = OrderedDict()  # shard -> (safe_open handle, metadata), least recent first

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a feature cache of {len(self)} samples")
        shard = bisect_right(self.starts, index) - 1
        local = index - self.starts[shard]
        handle, metadata = self._handle(shard)
        try:
            sample = {name: handle.get_tensor(f"{local}.{name}") for name in FIELDS}
        except SafetensorError as err:
            raise _corrupt_shard(self.directory / self.files[shard], err) from None
        if sample_crc32(sample) != int(metadata[f"{local}.crc32"]):
            raise _corrupt_shard(self.directory / self.files[shard], f"sample {local}'s data fails its checksum")
        sample["input_ids"] = sample["input_ids"].long()  # [T]
        sample["loss_mask"] = sample["loss_mask"].long()  # [T]
        sample["target_top"] = sample["target_top"].long()  # [T]
        return sample  # exit_states, final_states: [T, H] in the cache's dtype; target_lse [T] float32

    def verify(self) -> None:
        """Open every shard's header now, so a missing, truncated or foreign shard fails before training starts
        rather than mid-epoch (safetensors checks that the header covers the whole file)."""
        for shard in range(len(self.files)):
            self._handle(shard)
        self._open.clear()

    def _handle(self, shard: int) -> Any:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.directory / self.files[shard]
        if not path.is_file():
            raise ValueError(f"Feature cache shard {path} is missing; rerun the cache stage to rebuild it.")
        try:
            handle = safe_open(str(path), framework="pt")
            metadata = handle.metadata() or {}
        except SafetensorError as err:
            raise _corrupt_shard(path, err) from None
        if metadata.get("cache_key") != self.cache_key or int(metadata.get("num_samples", -1)) != self.sizes[shard]:
            raise ValueError(
                f"Feature cache shard {path} does not belong to this cache's manifest; delete it and rerun the cache "
                f"stage (it is rebuilt)."
            )
        self._open[shard] = handle, metadata
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handle, metadata

    def __getstate__(self) -> dict[str, Any]:
        """Open shard handles cannot be pickled (DataLoader workers): each worker reopens what it reads."""
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state
