"""Every experiment composes and validates, including the 7B/13B ones, without loading or downloading anything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kangaroo_train.config import resolve_auto_dtype
from kangaroo_train.strategy import build_strategy
from kangaroo_train.train import CONFIG_DIR, generation_defaults, validate_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_the_four_experiments_exist():
    assert {"tiny", "smollm2_135m", "vicuna7b", "vicuna13b"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_resolves_and_validates(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    validate_config(cfg)
    assert cfg.name == experiment
    assert cfg.paths.adapter_dir == f"{tmp_path}/adapter"
    build_strategy(cfg.strategy, cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes)


def test_vicuna_settings_follow_the_paper():
    seven = compose_train(["experiment=vicuna7b"])
    thirteen = compose_train(["experiment=vicuna13b"])
    assert (seven.model.name, seven.model.exit_layer) == ("lmsys/vicuna-7b-v1.3", 2)
    assert (thirteen.model.name, thirteen.model.exit_layer) == ("lmsys/vicuna-13b-v1.3", 3)
    for cfg in (seven, thirteen):
        assert cfg.strategy.name == "deepspeed" and cfg.strategy.config.zero_optimization.stage == 2
        assert cfg.trainer.devices == 8 and cfg.trainer.accelerator == "gpu"
        assert cfg.trainer.precision in ("bf16-mixed", "16-mixed")
        assert cfg.trainer.max_epochs == 10 and list(cfg.optim.betas) == [0.9, 0.95]
        assert generation_defaults(cfg) == {"threshold": 0.6, "max_draft_steps": 6}


def test_overrides_used_by_outside_checks(tmp_path):
    cfg = compose_train(
        [
            "experiment=tiny",
            f"paths.output_dir={tmp_path}",
            "stage=cache",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "strategy=deepspeed",
            "resume=true",
            "logger=wandb",
        ]
    )
    validate_config(cfg)
    assert cfg.strategy.name == "deepspeed" and set(cfg.logger) == {"wandb"} and cfg.resume is True
    zero3 = compose_train(["experiment=vicuna7b", "strategy=deepspeed_zero3"])
    assert zero3.strategy.config.zero_optimization.stage == 3
    both = compose_train(["experiment=tiny", "logger=[csv,wandb]", "cache=none", "strategy=ddp"])
    assert set(both.logger) == {"csv", "wandb"} and both.cache.enabled is False


def test_bad_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match="stage="):
        validate_config(compose_train(["experiment=tiny", "stage=everything"]))
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches"):
        validate_config(compose_train(["experiment=tiny", "trainer.accumulate_grad_batches=0"]))
    with pytest.raises(ValueError, match="adapter.init='zeros' must be random or copy"):
        validate_config(compose_train(["experiment=tiny", "adapter.init=zeros"]))
    with pytest.raises(ValueError, match="optim.schedule='step' must be cosine, linear or constant"):
        validate_config(compose_train(["experiment=tiny", "optim.schedule=step"]))
    with pytest.raises(ValueError, match="model.exit_layer=0 must be a positive integer"):
        validate_config(compose_train(["experiment=tiny", "model.exit_layer=0"]))
    with pytest.raises(ValueError, match="data.batch_size=0 must be a positive integer"):
        validate_config(compose_train(["experiment=tiny", "data.batch_size=0"]))
    with pytest.raises(ValueError, match="draft_vocab_loss='yes please' must be true or false"):
        validate_config(compose_train(["experiment=tiny", "draft_vocab_loss='yes please'"]))
    with pytest.raises(ValueError, match="callbacks.checkpoint is off"):
        validate_config(compose_train(["experiment=tiny", "callbacks.checkpoint=null"]))
    with pytest.raises(ValueError, match=r"callbacks.progress_lines._target_='kangaroo_train.progres.ProgressLines'"):
        validate_config(
            compose_train(["experiment=tiny", "callbacks.progress_lines._target_=kangaroo_train.progres.ProgressLines"])
        )
    with pytest.raises(ValueError, match="callbacks.checkpoint.every_n_train_steps=0 must be a positive integer"):
        validate_config(compose_train(["experiment=tiny", "callbacks.checkpoint.every_n_train_steps=0"]))
    with pytest.raises(ValueError, match="logger.csv._target_="):
        validate_config(compose_train(["experiment=tiny", "logger.csv._target_=nowhere.CSVLogger"]))
    with pytest.raises(ValueError, match="strategy=single runs one process"):
        cfg = compose_train(["experiment=tiny", "trainer.devices=2"])
        build_strategy(cfg.strategy, "cpu", 2, 1)


@pytest.mark.slow  # a subprocess; the same config is composed and validated in process above
def test_vicuna7b_cfg_job_from_the_command_line(tmp_path):
    """`--cfg job` composes the 7B experiment and prints it without touching the model or the data."""
    out = subprocess.run(
        [sys.executable, "-m", "kangaroo_train", "experiment=vicuna7b", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "lmsys/vicuna-7b-v1.3" in out.stdout and "exit_layer: 2" in out.stdout
    assert not (tmp_path / "outputs").exists()


def test_gpu_experiment_is_the_recipe_of_the_shipped_adapter():
    """experiment=smollm2_135m_gpu is documented as how checkpoints/smollm2-135m-instruct was trained: keep the two
    in step (adapter shape, exit layer, draft vocabulary, generation defaults)."""
    shipped = json.loads((CONFIG_DIR.parent / "checkpoints" / "smollm2-135m-instruct" / "config.json").read_text())
    cfg = compose_train(["experiment=smollm2_135m_gpu"])
    assert shipped["base_model"] == cfg.model.name and shipped["exit_layer"] == cfg.model.exit_layer
    assert shipped["mlp"] == cfg.adapter.mlp and shipped["init"] == cfg.adapter.init
    assert shipped.get("num_layers", 1) == cfg.adapter.num_layers  # written before num_layers existed: one block
    assert shipped["draft_vocab_size"] == cfg.adapter.draft_vocab_size
    assert shipped["generation"] == generation_defaults(cfg)


def test_auto_dtype_and_precision(monkeypatch):
    """model.dtype=auto takes kangaroo_infer's choice for the machine ($KANGAROO_DTYPE pins it here, so the test holds
    on any CPU); trainer.precision=auto follows the chosen dtype; explicit values are kept."""
    for pinned, precision in (("bfloat16", "bf16-mixed"), ("float32", "32-true")):
        monkeypatch.setenv("KANGAROO_DTYPE", pinned)
        cfg = compose_train(["experiment=tiny", "model.dtype=auto", "trainer.precision=auto"])
        validate_config(cfg)
        decided = resolve_auto_dtype(cfg)
        assert (cfg.model.dtype, cfg.trainer.precision) == (pinned, precision)
        assert f"model.dtype=auto -> {pinned} ($KANGAROO_DTYPE)" in decided
    monkeypatch.setenv("KANGAROO_DTYPE", "bfloat16")
    explicit = compose_train(["experiment=tiny", "model.dtype=float32", "trainer.precision=auto"])
    resolve_auto_dtype(explicit)
    assert (explicit.model.dtype, explicit.trainer.precision) == ("float32", "32-true")
    kept = compose_train(["experiment=tiny", "model.dtype=auto", "trainer.precision=32-true"])
    resolve_auto_dtype(kept)
    assert (kept.model.dtype, kept.trainer.precision) == ("bfloat16", "32-true")
    with pytest.raises(ValueError, match=r"model.dtype='bf16' must be one of \['auto', 'float32'"):
        validate_config(compose_train(["experiment=tiny", "model.dtype=bf16"]))
