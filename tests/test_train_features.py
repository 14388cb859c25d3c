"""Base features for training: compute_features against the model's own hidden states, the on-disk cache (round
trip, resume, staleness, corruption, several ranks) and collation."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch

from kangaroo_infer import base_fingerprint
from kangaroo_train.data import data_hash
from kangaroo_train.features import (
    FeatureCache,
    collate_features,
    collate_tokens,
    compute_features,
)
from kangaroo_train.module import position_weights, teacher_targets
from kangaroo_train.shards import MANIFEST_NAME

from .conftest import VOCAB, tiny_model

EXIT_LAYER = 2
REPO = Path(__file__).resolve().parents[1]


def token_dataset(count: int = 10, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        length = 3 + (7 * i) % 18
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        mask = [0] * (length // 2) + [1] * (length - length // 2)
        rows.append({"input_ids": ids, "loss_mask": mask})
    return datasets.Dataset.from_list(rows)


def make_cache(directory: Path, base, dataset, **overrides) -> FeatureCache:
    kwargs = dict(
        fingerprint=base_fingerprint(base.config),
        exit_layer=EXIT_LAYER,
        dtype="float32",
        data_hash=data_hash(dataset),
        shard_size=3,
    )
    kwargs.update(overrides)
    return FeatureCache(directory, **kwargs)


def reference_features(base, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one unpadded sample, from output_hidden_states."""
    out = base(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[EXIT_LAYER][0], out.hidden_states[-1][0]  # [T, H] each


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", layers=4)


# ----------------------------------------------------------------------------------------------------------------
# compute_features and collation
# ----------------------------------------------------------------------------------------------------------------


def test_compute_features_matches_output_hidden_states(base):
    samples = [{"input_ids": row["input_ids"], "loss_mask": row["loss_mask"]} for row in token_dataset(3)]
    batch = collate_tokens(samples, pad_id=0)
    exit_states, final_states = compute_features(base, batch["input_ids"], batch["attention_mask"], EXIT_LAYER)
    with torch.no_grad():
        out = base(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    assert exit_states.shape == final_states.shape == (3, batch["input_ids"].shape[1], base.config.hidden_size)
    torch.testing.assert_close(exit_states, out.hidden_states[EXIT_LAYER], rtol=0, atol=0)
    torch.testing.assert_close(final_states, out.hidden_states[-1], rtol=0, atol=0)
    assert not exit_states.requires_grad and not final_states.requires_grad
    # Right padding leaves the real tokens' features as in an unpadded pass.
    with torch.no_grad():
        alone_exit, alone_final = reference_features(base, samples[0]["input_ids"])
    length = len(samples[0]["input_ids"])
    torch.testing.assert_close(exit_states[0, :length], alone_exit, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final_states[0, :length], alone_final, rtol=1e-4, atol=1e-4)


def test_compute_features_refuses_bad_arguments(base):
    ids = torch.randint(3, VOCAB, (2, 5))
    left_padded = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        compute_features(base, ids, left_padded, EXIT_LAYER)
    with pytest.raises(ValueError, match=r"exit_layer=4 is out of range .* \[1, 3\]"):
        compute_features(base, ids, None, 4)


def test_collate_pads_right():
    samples = [
        {
            "input_ids": torch.tensor([5, 6, 7]),
            "loss_mask": torch.tensor([0, 1, 1]),
            "exit_states": torch.ones(3, 4, dtype=torch.bfloat16),
            "final_states": torch.full((3, 4), 2.0, dtype=torch.bfloat16),
            "target_lse": torch.tensor([3.5, 4.5, 0.0]),
            "target_top": torch.tensor([7, 9, -1]),
        },
        {
            "input_ids": torch.tensor([8]),
            "loss_mask": torch.tensor([1]),
            "exit_states": torch.ones(1, 4, dtype=torch.bfloat16),
            "final_states": torch.full((1, 4), 2.0, dtype=torch.bfloat16),
            "target_lse": torch.tensor([0.0]),
            "target_top": torch.tensor([-1]),
        },
    ]
    batch = collate_features(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["exit_states"].shape == (2, 3, 4) and batch["exit_states"].dtype == torch.bfloat16
    assert batch["final_states"][1, :, 0].tolist() == [2.0, 0.0, 0.0]
    assert batch["target_lse"].tolist() == [[3.5, 4.5, 0.0], [0.0, 0.0, 0.0]]
    assert batch["target_top"].tolist() == [[7, 9, -1], [-1, -1, -1]]

    tokens = collate_tokens(
        [{"input_ids": [1, 2], "loss_mask": [0, 1]}, {"input_ids": [3], "loss_mask": [1]}], pad_id=9
    )
    assert tokens["input_ids"].tolist() == [[1, 2], [3, 9]] and tokens["input_ids"].dtype == torch.long
    assert tokens["loss_mask"].tolist() == [[0, 1], [1, 0]]
    assert tokens["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="2 input_ids but 1 loss_mask"):
        collate_tokens([{"input_ids": [1, 2], "loss_mask": [1]}], pad_id=0)


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 1e-2)])
def test_cache_round_trip(tmp_path, base, dtype, tolerance):
    dataset = token_dataset(10)
    cache = make_cache(tmp_path / "cache", base, dataset, dtype=dtype)
    assert not cache.is_complete()
    cache.build(base, dataset, batch_size=2, progress=False)
    assert cache.is_complete()

    manifest = json.loads((tmp_path / "cache" / MANIFEST_NAME).read_text())
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert manifest["complete"] and manifest["num_samples"] == 10 and manifest["num_tokens"] == sum(lengths)
    assert [s["num_tokens"] for s in manifest["shards"]] == [sum(lengths[i : i + 3]) for i in range(0, 10, 3)]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(4)]

    cached = cache.dataset()
    assert len(cached) == 10
    for index in (0, 4, 9, -1):
        row = dataset[index]
        sample = cached[index]
        assert sample["input_ids"].dtype == sample["loss_mask"].dtype == torch.long
        assert sample["input_ids"].tolist() == row["input_ids"] and sample["loss_mask"].tolist() == row["loss_mask"]
        assert sample["exit_states"].dtype == getattr(torch, dtype)
        with torch.no_grad():
            exit_states, final_states = compute_features(base, torch.tensor([row["input_ids"]]), None, EXIT_LAYER)
        torch.testing.assert_close(sample["exit_states"].float(), exit_states[0], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(sample["final_states"].float(), final_states[0], rtol=tolerance, atol=tolerance)
        # the teacher's full-vocabulary targets, from the stored final states, at trained positions only
        select = position_weights(sample["loss_mask"][None])[0]
        lse, top = teacher_targets(base.get_output_embeddings(), sample["final_states"][select])
        assert torch.equal(sample["target_lse"][select], lse) and torch.equal(sample["target_top"][select], top)
        assert sample["target_lse"].dtype == torch.float32 and sample["target_top"].dtype == torch.long
        assert torch.all(sample["target_lse"][~select] == 0) and torch.all(sample["target_top"][~select] == -1)

    loader = torch.utils.data.DataLoader(cached, batch_size=4, collate_fn=collate_features)
    batch = next(iter(loader))
    assert batch["exit_states"].shape == (4, max(lengths[:4]), base.config.hidden_size)
    assert len(pickle.loads(pickle.dumps(cached))) == 10  # picklable for DataLoader workers, even with shards open


def test_resume_rebuilds_only_missing_shards(tmp_path, base):
    dataset = token_dataset(10)
    cache = make_cache(tmp_path, base, dataset)
    cache.build(base, dataset, progress=False)
    stamps = {i: cache.shard_path(i).stat().st_mtime_ns for i in range(4)}
    cache.shard_path(1).unlink()
    assert not cache.is_complete()
    with pytest.raises(ValueError, match=r"incomplete \(3 of 4 shards\)"):
        cache.dataset()
    cache.build(base, dataset, progress=False)
    assert cache.is_complete()
    assert {i: cache.shard_path(i).stat().st_mtime_ns for i in (0, 2, 3)} == {i: stamps[i] for i in (0, 2, 3)}
    assert cache.shard_path(1).stat().st_mtime_ns != stamps[1]
    assert cache.dataset()[4]["input_ids"].tolist() == dataset[4]["input_ids"]


def test_stale_cache_names_the_field(tmp_path, base):
    dataset = token_dataset(4)
    make_cache(tmp_path, base, dataset).build(base, dataset, progress=False)
    other_fingerprint = {**base_fingerprint(base.config), "hidden_size": 128}
    for overrides, field in [
        ({"fingerprint": other_fingerprint}, r"base_fingerprint differs \(hidden_size: cache 64 vs run 128\)"),
        ({"exit_layer": 1}, r"exit_layer differs \(cache 2 vs run 1\)"),
        ({"dtype": "bfloat16"}, r"dtype differs \(cache 'float32' vs run 'bfloat16'\)"),
        ({"base_dtype": "bfloat16"}, r"base_dtype differs \(cache 'float32' vs run 'bfloat16'\)"),
        ({"data_hash": "0" * 64}, r"data_hash differs"),
    ]:
        stale = make_cache(tmp_path, base, dataset, **overrides)
        assert not stale.is_complete()
        with pytest.raises(ValueError, match=rf"is stale: its {field}.*Delete the directory .*point cache\.dir"):
            stale.check()
        with pytest.raises(ValueError, match="is stale"):
            stale.dataset()
    # A cache written by the previous format (no teacher targets) is stale too, and says so.
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ValueError, match=r"is stale: its format_version differs \(cache 2 vs run 3\)"):
        make_cache(tmp_path, base, dataset).check()
    # Without its manifest, a directory's old shards are still recognised as another cache's.
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match=r"shard-00000\.safetensors was written for another cache"):
        make_cache(tmp_path, base, dataset, exit_layer=1).build(base, dataset, progress=False)


def test_build_refuses_another_base_or_dataset(tmp_path, base):
    dataset = token_dataset(4)
    cache = make_cache(tmp_path, base, dataset)
    with pytest.raises(ValueError, match="does not match the cache's data_hash"):
        cache.build(base, token_dataset(4, seed=1), progress=False)
    with pytest.raises(ValueError, match="not the one whose fingerprint"):
        cache.build(tiny_model("llama", layers=3), dataset, progress=False)
    with pytest.raises(ValueError, match=r"computes in bfloat16, but the cache is for features computed in float32"):
        cache.build(copy.deepcopy(base).to(torch.bfloat16), dataset, progress=False)


def test_corrupt_shard_names_the_file_and_is_rebuilt(tmp_path, base):
    dataset = token_dataset(10)
    cache = make_cache(tmp_path, base, dataset)
    cache.build(base, dataset, progress=False)
    shard = cache.shard_path(2)
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, e.g. a full disk
    cached = cache.dataset()
    with pytest.raises(ValueError, match=rf"shard {shard} is corrupt or truncated"):
        cached.verify()
    assert cached[0]["input_ids"].tolist() == dataset[0]["input_ids"]
    with pytest.raises(ValueError, match=rf"shard {shard} is corrupt or truncated .*Delete that file and rerun"):
        cached[7]
    cache.build(base, dataset, progress=False)  # the rerun replaces the unreadable shard
    assert cache.dataset()[7]["input_ids"].tolist() == dataset[7]["input_ids"]


def test_two_ranks_sequentially(tmp_path, base):
    dataset = token_dataset(10)
    single = make_cache(tmp_path / "single", base, dataset)
    single.build(base, dataset, progress=False)
    split = make_cache(tmp_path / "split", base, dataset)
    split.build(base, dataset, rank=0, world_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "split").glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00002.safetensors",
    ]
    assert not split.is_complete()
    split.build(base, dataset, rank=1, world_size=2, progress=False)
    assert split.is_complete()
    assert (tmp_path / "split" / MANIFEST_NAME).read_text() == (tmp_path / "single" / MANIFEST_NAME).read_text()
    for index in range(10):
        for name, value in split.dataset()[index].items():
            assert torch.equal(value, single.dataset()[index][name]), (index, name)


RANK_SCRIPT = textwrap.dedent(
    """
    import sys
    import datasets
    from transformers import AutoModelForCausalLM
    from kangaroo_infer import base_fingerprint
    from kangaroo_train.data import data_hash
    from kangaroo_train.features import FeatureCache

    root, rank = sys.argv[1], int(sys.argv[2])
    base = AutoModelForCausalLM.from_pretrained(root + "/base").eval()
    dataset = datasets.load_from_disk(root + "/data")
    cache = FeatureCache(root + "/cache", fingerprint=base_fingerprint(base.config), exit_layer=2,
                         dtype="bfloat16", data_hash=data_hash(dataset), shard_size=2)
    cache.build(base, dataset, rank=rank, world_size=2, progress=False)
    """
)


@pytest.mark.slow  # two processes; test_two_ranks_sequentially checks the same split in one
def test_two_ranks_in_two_processes(tmp_path, base):
    base.save_pretrained(tmp_path / "base")
    dataset = token_dataset(9)
    dataset.save_to_disk(str(tmp_path / "data"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path), str(rank)], env=env, stderr=subprocess.PIPE)
        for rank in range(2)
    ]
    for process in ranks:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode()[-2000:]
    cache = make_cache(tmp_path / "cache", base, dataset, dtype="bfloat16", shard_size=2)
    assert cache.is_complete()
    cached = cache.dataset()
    assert len(cached) == 9 and len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 5
    for index in (0, 5, 8):
        with torch.no_grad():
            exit_states, _ = compute_features(base, torch.tensor([dataset[index]["input_ids"]]), None, EXIT_LAYER)
        torch.testing.assert_close(cached[index]["exit_states"].float(), exit_states[0], rtol=1e-2, atol=1e-2)
