"""Hydra entry point: ``python -m kangaroo_train experiment=NAME [overrides]``. ``config.py`` validates and
instantiates the config, ``stages.py`` runs the stages; here: Hydra multirun (a directory per job, every job
validated before the first starts) and the exit codes.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from .config import CONFIG_DIR, STAGES, generation_defaults, instantiate_group, validate_config  # noqa: F401 (API)
from .stages import run


def sweep_job_output_dir(cfg: DictConfig) -> None:
    """Under ``-m`` (Hydra multirun) give each job its own ``paths.output_dir``: the configured one plus the job's
    overrides (e.g. ``outputs/NAME/experiment=NAME,model.exit_layer=4``), so jobs never share checkpoints and a rerun
    of the sweep finds each job's finished stages again (``resume=true`` continues each one)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    overrides = HydraConfig.get().job.override_dirname
    if overrides:
        cfg.paths.output_dir = f"{cfg.paths.output_dir}/{overrides}"


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of each job a Hydra multirun expands ``overrides`` (the command line's) into."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


class CheckSweepJobs(Callback):
    """Under ``-m``, every job's config is composed and validated before the first job starts: a bad value in the
    last job must not wait for the earlier jobs' hours of work (configs/train.yaml: hydra.callbacks)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose

        jobs = sweep_jobs(list(config.hydra.overrides.task))
        for number, job in enumerate(jobs):
            try:
                validate_config(compose(config_name=config.hydra.job.config_name, overrides=job))
            except ValueError as err:
                print(f"error: job {number} ({','.join(job)}): {err} No job was started.", file=sys.stderr)
                sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    sweep_job_output_dir(cfg)
    try:
        run(cfg)
    except ValueError as err:  # bad input: one clear message, no traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: finished shards, cache and checkpoints are kept
        print(
            "interrupted: finished work (distilled and cached shards, checkpoints) is kept; rerun the same command "
            "with resume=true to continue.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    except SIGTERMException:  # Lightning stopped after the current step; the Checkpoints callback saved it
        print("interrupted by SIGTERM: checkpoint saved; continue with resume=true", file=sys.stderr, flush=True)
        sys.exit(128 + 15)
