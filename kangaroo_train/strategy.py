"""Distributed strategy factory: DeepSpeed ZeRO (GPUs, and CPUs for tests), DDP, or a single device.

Lightning's DeepSpeedStrategy refuses a CPU accelerator, although DeepSpeed itself runs on CPUs (its CPU accelerator
with gloo). ``CPUDeepSpeedStrategy`` lifts only that check, so the same ZeRO code path is exercised by CPU tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy

from .module import plain_containers

STRATEGIES = ("single", "ddp", "deepspeed")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy without the CUDA-only check (the rest of its environment setup is DDP's)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)


def _on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def build_strategy(strategy_cfg: Mapping[str, Any], accelerator: str, devices: int | str, num_nodes: int) -> Strategy:
    """The Lightning strategy named by ``strategy.name`` for this accelerator and device count."""
    name = strategy_cfg["name"]
    cpu = _on_cpu(accelerator)
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; choose strategy=single, ddp or deepspeed.")
    if name == "single":
        if devices not in (1, "1") or num_nodes != 1:
            raise ValueError(
                f"strategy=single runs one process, but trainer.devices={devices} and trainer.num_nodes={num_nodes}; "
                f"use strategy=ddp or strategy=deepspeed for several devices, or set trainer.devices=1."
            )
        device = torch.device("cpu") if cpu else torch.device("cuda", 0)
        return SingleDeviceStrategy(device=device)
    if cpu and not isinstance(devices, int):
        raise ValueError(f"On CPU, trainer.devices must be a number of processes; got {devices!r}.")
    # On CPU, indexed devices: Lightning checks each process's device index against its local rank.
    parallel = [torch.device("cpu", i) for i in range(devices)] if cpu else None
    backend = "gloo" if cpu else strategy_cfg.get("process_group_backend")
    timeout = timedelta(minutes=strategy_cfg.get("timeout_minutes", 30))
    if name == "ddp":
        return DDPStrategy(
            parallel_devices=parallel,
            process_group_backend=backend,
            find_unused_parameters=bool(strategy_cfg.get("find_unused_parameters", False)),
            timeout=timeout,
        )
    config = plain_containers(strategy_cfg["config"])
    if "gradient_accumulation_steps" in config or "train_micro_batch_size_per_gpu" in config:
        raise ValueError(
            "strategy.config must not set gradient_accumulation_steps / train_micro_batch_size_per_gpu: they come "
            "from trainer.accumulate_grad_batches and data.batch_size so every strategy counts steps alike."
        )
    cls = CPUDeepSpeedStrategy if cpu else DeepSpeedStrategy
    return cls(config=config, parallel_devices=parallel, process_group_backend=backend, timeout=timeout)
